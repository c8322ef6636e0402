"""The server under pressure and faults, each against a live `kolors-trt serve` process on 127.0.0.1: a full
queue (429), deadlines and client disconnects (the UNet run counter proves the loop stopped early), SIGTERM
during a burst (every accepted request answered, exit status 0) and the drain timeout; the worker's recovery
probe in-process. Every wait is bounded."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

from kolors_trt.serve.config import ServeConfig
from kolors_trt.serve.errors import UnavailableError
from kolors_trt.serve.worker import GENERATE, Work, Worker

import serve_live as live

pytestmark = pytest.mark.slow

UNET = ("kolors_trt_engine_runs_total", (("component", "unet"),))
LONG = {"prompt": "a long one", "size": "64x64", "num_inference_steps": 600, "seed": 1}  # ~15 s of denoising


def unet_runs(server) -> float:
    return server.metrics()[UNET]


def stopped(server, reason: str, where: str) -> float:
    return live.sample(server.metrics(), "kolors_trt_requests_stopped_total", reason=reason, where=where)


def idle(server) -> bool:
    """Nothing accepted and unanswered: no batch runs, none can start (the worker answers a request only after
    its batch's loop has ended)."""
    return live.sample(server.metrics(), "kolors_trt_in_flight") == 0


def until(predicate, timeout: float, every: float = 0.05):
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(every)


concurrently = live.concurrently


def test_a_full_queue_answers_429_at_once_and_loses_nothing(onnx_fp32):
    server = live.LiveServer(onnx_fp32, "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0",
                             env={"KOLORS_TRT_API_KEY": "key-from-env"}, key="key-from-env").start()
    try:
        client = server.openai(max_retries=0)
        calls = [lambda i=i: client.images.with_raw_response.generate(
            prompt=f"p{i}", size="64x64", extra_body={"seed": i, "num_inference_steps": 8}) for i in range(8)]
        answers = concurrently(calls)
        ok = [a for a in answers if not isinstance(a, Exception)]
        limited = [a for a in answers if isinstance(a, openai.RateLimitError)]
        assert len(ok) + len(limited) == 8, answers  # none lost, none 5xx
        assert ok and limited
        assert all(a.status_code == 200 and len(a.parse().data) == 1 for a in ok)
        for err in limited:
            assert err.code == "queue_full" and int(err.response.headers["retry-after"]) >= 1
        totals = server.metrics()
        assert live.sample(totals, "kolors_trt_requests_total", endpoint="/v1/images/generations",
                           status="429") == len(limited)
        assert live.total(totals, "kolors_trt_requests_total", status="500") == 0
        assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the key from the environment holds
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def deadline_server(onnx_fp32):
    server = live.LiveServer(onnx_fp32, "--timeout-s", "2", "--max-batch", "1", "--max-wait-ms", "0").start()
    yield server
    server.stop()


def test_a_request_past_its_deadline_gets_504_and_its_loop_stops(deadline_server):
    before = unet_runs(deadline_server)
    with deadline_server.client() as http:
        r = http.post("/v1/images/generations", json=LONG)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert "between denoising steps" in r.json()["error"]["message"]
    assert until(lambda: idle(deadline_server), timeout=30)
    assert 0 < unet_runs(deadline_server) - before < 600  # the loop stopped early, and nothing runs for nobody
    assert stopped(deadline_server, "deadline", "running") >= 1


def test_a_client_that_disconnects_stops_its_loop_before_the_deadline(deadline_server):
    before, gone = unet_runs(deadline_server), stopped(deadline_server, "disconnected", "running")
    deadlines = stopped(deadline_server, "deadline", "running")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{deadline_server.url}/v1/images/generations", json=LONG, timeout=0.5)
    assert until(lambda: stopped(deadline_server, "disconnected", "running") > gone, timeout=30)
    assert stopped(deadline_server, "deadline", "running") == deadlines  # stopped by the disconnect, not the deadline
    assert until(lambda: idle(deadline_server), timeout=30)
    assert unet_runs(deadline_server) - before < 600


def test_a_stream_closed_early_stops_its_loop_and_counts_as_499(deadline_server):
    before, gone = unet_runs(deadline_server), stopped(deadline_server, "disconnected", "running")
    closed = live.sample(deadline_server.metrics(), "kolors_trt_requests_total", endpoint="/v1/images/generations",
                         status="499")
    queued = stopped(deadline_server, "disconnected", "queue")
    with httpx.stream("POST", f"{deadline_server.url}/v1/images/generations", json=dict(LONG, stream=True),
                      timeout=10) as r:  # the answer has begun (its head), then the client goes
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert until(lambda: stopped(deadline_server, "disconnected", "running") > gone
                 or stopped(deadline_server, "disconnected", "queue") > queued, timeout=30)
    assert until(lambda: idle(deadline_server), timeout=30)
    assert unet_runs(deadline_server) - before < 600
    assert until(lambda: live.sample(deadline_server.metrics(), "kolors_trt_requests_total",
                                     endpoint="/v1/images/generations", status="499") == closed + 1, timeout=30)


def test_a_queued_request_whose_client_left_never_runs(deadline_server):
    before, gone = unet_runs(deadline_server), stopped(deadline_server, "disconnected", "queue")
    answers: list = []
    long = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{deadline_server.url}/v1/images/generations", json=LONG, timeout=30)))
    long.start()
    assert until(lambda: unet_runs(deadline_server) > before, timeout=30)  # the long request holds the worker
    with pytest.raises(httpx.ReadTimeout):  # queued behind it (batch ceiling 1), its client gives up
        httpx.post(f"{deadline_server.url}/v1/images/generations", json=dict(LONG, seed=2), timeout=0.4)
    long.join(30)
    assert answers[0].status_code == 504
    assert until(lambda: stopped(deadline_server, "disconnected", "queue") == gone + 1, timeout=30)
    assert unet_runs(deadline_server) - before < 600  # only the long request's steps ran


def test_sigterm_during_a_burst_answers_every_accepted_request_and_exits_0(onnx_fp32):
    server = live.LiveServer(onnx_fp32, "--max-batch", "1", "--max-wait-ms", "0").start()
    try:
        bodies = [{"prompt": f"burst {i}", "size": "64x64", "num_inference_steps": 40, "seed": i} for i in range(5)]
        calls = [lambda b=b: httpx.post(f"{server.url}/v1/images/generations", json=b, timeout=60) for b in bodies]
        answers: list = []
        burst = threading.Thread(target=lambda: answers.extend(concurrently(calls)))
        burst.start()
        accepted = until(lambda: live.sample(server.metrics(), "kolors_trt_in_flight") == 5, timeout=10)
        assert accepted
        server.signal(signal.SIGTERM)
        assert until(lambda: httpx.get(f"{server.url}/health/ready").status_code == 503, timeout=10)
        late = httpx.post(f"{server.url}/v1/images/generations", json=bodies[0], timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        burst.join(60)
        assert [a.status_code for a in answers] == [200] * 5
        assert server.wait(30) == 0
        assert "draining" in server.output and "stopped" in server.output
    finally:
        server.stop()


def test_the_drain_timeout_answers_what_is_left_with_503_and_exits_0(onnx_fp32):
    server = live.LiveServer(onnx_fp32, "--max-batch", "1", "--max-wait-ms", "0", "--drain-timeout-s", "1",
                             "--timeout-s", "60").start()
    try:
        calls = [lambda s=s: httpx.post(f"{server.url}/v1/images/generations", json=dict(LONG, seed=s), timeout=30)
                 for s in (1, 2)]
        answers: list = []
        pair = threading.Thread(target=lambda: answers.extend(concurrently(calls)))
        pair.start()
        assert until(lambda: live.sample(server.metrics(), "kolors_trt_in_flight") == 2, timeout=10)
        server.signal(signal.SIGTERM)
        pair.join(30)
        assert sorted(a.status_code for a in answers) == [503, 503]  # one queued, one stopped between steps
        assert all(a.json()["error"]["code"] == "shutting_down" for a in answers)
        assert server.wait(30) == 0
    finally:
        server.stop()


def test_a_worker_takes_no_work_before_it_has_loaded_and_warmed_up(onnx_fp32):
    worker = Worker(ServeConfig(str(onnx_fp32)))  # not started
    assert worker.status()["ready"] is False and worker.status()["state"] == "starting"
    with pytest.raises(UnavailableError):
        worker.submit(Work(GENERATE, None, done=lambda r, e: None), (64, 64, 1, True), 1)
    assert worker.in_flight == 0


def test_the_worker_reports_failing_and_recovers_by_probing_when_idle(onnx_fp32):
    """An engine-wide failure (the UNet engine raising, as ONNX Runtime does when it runs out of memory) fails
    the batch and counts; past the threshold the worker is not ready, and its idle probe brings it back."""
    from kolors_trt.runtime.folder import BackendError
    from kolors_trt.runtime.request import GenerationRequest

    worker = Worker(ServeConfig(str(onnx_fp32), failure_threshold=1, probe_interval_s=0.2)).start()
    try:
        assert until(lambda: worker.state == "ready", timeout=30)
        unet = worker.pipe.engines["unet"]
        real, broken = unet._execute, {"on": True}

        def execute(feeds, values):
            if broken["on"]:
                raise BackendError("unet: ONNX Runtime failed (out of memory)")
            return real(feeds, values)

        unet._execute = execute
        answer: dict = {}
        checked = worker.pipe.check(GenerationRequest("x", height=64, width=64, num_inference_steps=1,
                                                      ip_adapter_scale=0.0, seed=0))
        worker.submit(Work(GENERATE, checked, done=lambda r, e: answer.update(error=e, state=worker.state)),
                      checked.key, 1)
        assert until(lambda: "error" in answer, timeout=30)
        assert isinstance(answer["error"], BackendError) and answer["state"] == "failing"
        assert worker.status()["ready"] is False
        broken["on"] = False
        assert until(lambda: worker.state == "ready", timeout=30)
        assert worker.status()["consecutive_failures"] == 0
    finally:
        worker.stop()


def test_a_request_whose_rows_overflow_fails_alone_and_readiness_stays(onnx_fp32):
    """One request whose latents overflow (guidance 1e38: finite, past the HTTP bounds, so built here) in one
    batch with three good ones: it gets its NonFiniteError, the others their solo images, and the worker stays
    ready with no failure counted (failure_threshold 1 would otherwise turn it not-ready)."""
    import numpy as np

    from kolors_trt.runtime.postprocess import NonFiniteError
    from kolors_trt.runtime.request import GenerationRequest

    worker = Worker(ServeConfig(str(onnx_fp32), failure_threshold=1, max_wait_ms=60_000, max_batch=4)).start()
    try:
        assert until(lambda: worker.state == "ready", timeout=30)
        pipe = worker.pipe
        requests = [GenerationRequest(f"p{i}", height=64, width=64, num_inference_steps=2, ip_adapter_scale=0.0,
                                      seed=i, guidance_scale=1e38 if i == 1 else 5.0) for i in range(4)]
        solo = {i: pipe.generate_batch([requests[i]])[0].images[0] for i in (0, 2, 3)}
        answers: dict = {}
        for i, request in enumerate(requests):  # one batch: the fourth fills it
            checked = pipe.check(request)
            worker.submit(Work(GENERATE, checked, done=lambda r, e, i=i: answers.update({i: (r, e)}),
                               request_id=f"r{i}"), checked.key, 1)
        assert until(lambda: len(answers) == 4, timeout=60)
        assert isinstance(answers[1][1], NonFiniteError) and answers[1][0] is None
        for i in (0, 2, 3):
            result, error = answers[i]
            assert error is None and np.array_equal(np.asarray(result.images[0]), np.asarray(solo[i]))
        assert worker.status()["ready"] is True and worker.status()["consecutive_failures"] == 0
        text = worker.metrics.exposition().decode()
        assert 'kolors_trt_request_failures_total{error="NonFiniteError"} 1.0' in text
        assert "kolors_trt_batch_size_sum 4.0" in text  # the four ran as one batch
    finally:
        worker.stop()


def test_a_worker_whose_thread_ended_is_not_ready_and_answers_what_it_held(onnx_fp32):
    """The worker thread ends on an error no handler expects (BaseException from a stream's progress callback):
    the request it held gets 503, /health/ready's status says not ready ("worker_ended"), submit refuses."""
    from kolors_trt.runtime.request import GenerationRequest

    worker = Worker(ServeConfig(str(onnx_fp32))).start()
    try:
        assert until(lambda: worker.state == "ready", timeout=30)
        answer: dict = {}

        def progress(step, steps, latents):
            raise SystemExit("a bug")  # not an Exception: nothing in the batch path catches it

        checked = worker.pipe.check(GenerationRequest("x", height=64, width=64, num_inference_steps=2,
                                                      ip_adapter_scale=0.0, seed=0))
        worker.submit(Work(GENERATE, checked, done=lambda r, e: answer.update(error=e), progress=progress),
                      checked.key, 1)
        assert until(lambda: "error" in answer, timeout=30)
        assert isinstance(answer["error"], UnavailableError)
        assert until(lambda: not worker.alive, timeout=30)
        status = worker.status()
        assert status["ready"] is False and status["state"] == "worker_ended" and status["in_flight"] == 0
        assert worker.state_now == "worker_ended"  # /health/live answers 503 on it
        with pytest.raises(UnavailableError, match="worker_ended"):
            worker.submit(Work(GENERATE, checked, done=lambda r, e: None), checked.key, 1)
    finally:
        worker.stop()
