"""The server under pressure and faults, each against a live `kolors-trt serve` process on 127.0.0.1: a full
queue (429), deadlines and client disconnects (the UNet run counter proves the loop stopped early), SIGTERM
during a burst (every accepted request answered, exit status 0) and the drain timeout; the worker's recovery
probe in-process. Every wait is bounded."""

from __future__ import annotations

import importlib.util
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from kolors_trt.serve.config import ServeConfig
from kolors_trt.serve.errors import UnavailableError
from kolors_trt.serve.worker import GENERATE, Work, Worker

_spec = importlib.util.spec_from_file_location("serve_live", Path(__file__).with_name("serve_live.py"))
live = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(live)

pytestmark = pytest.mark.slow

UNET = ("kolors_trt_engine_runs_total", (("component", "unet"),))
LONG = {"prompt": "a long one", "size": "64x64", "num_inference_steps": 600, "seed": 1}  # ~15 s of denoising


def unet_runs(server) -> float:
    return server.metrics()[UNET]


def stopped(server, reason: str, where: str) -> float:
    return live.sample(server.metrics(), "kolors_trt_requests_stopped_total", reason=reason, where=where)


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
    server = live.LiveServer(onnx_fp32, "--max-queue", "1", "--max-batch-size", "1", "--max-wait-ms", "0",
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
    server = live.LiveServer(onnx_fp32, "--timeout-s", "2", "--max-batch-size", "1", "--max-wait-ms", "0").start()
    yield server
    server.stop()


def test_a_request_past_its_deadline_gets_504_and_its_loop_stops(deadline_server):
    before, started = unet_runs(deadline_server), time.monotonic()
    with deadline_server.client() as http:
        r = http.post("/v1/images/generations", json=LONG)
    elapsed = time.monotonic() - started
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert "between denoising steps" in r.json()["error"]["message"] and 1.5 < elapsed < 6
    ran = unet_runs(deadline_server) - before
    assert 0 < ran < 600
    time.sleep(0.3)
    assert unet_runs(deadline_server) - before == ran  # nothing runs for nobody
    assert stopped(deadline_server, "deadline", "running") >= 1


def test_a_client_that_disconnects_stops_its_loop_before_the_deadline(deadline_server):
    before, gone = unet_runs(deadline_server), stopped(deadline_server, "disconnected", "running")
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{deadline_server.url}/v1/images/generations", json=LONG, timeout=0.5)
    assert until(lambda: stopped(deadline_server, "disconnected", "running") > gone, timeout=1.0)
    assert time.monotonic() - started < 2.0  # stopped by the disconnect, not by the 2 s deadline
    ran = unet_runs(deadline_server) - before
    time.sleep(0.3)
    assert unet_runs(deadline_server) - before == ran < 600


def test_a_stream_closed_early_stops_its_loop(deadline_server):
    before, gone = unet_runs(deadline_server), stopped(deadline_server, "disconnected", "running")
    body = dict(LONG, stream=True, partial_images=600)
    with httpx.stream("POST", f"{deadline_server.url}/v1/images/generations", json=body, timeout=10) as r:
        first = next(r.iter_lines())
    assert first.startswith("data: ") and '"image_generation.partial_image"' in first
    assert until(lambda: stopped(deadline_server, "disconnected", "running") > gone, timeout=1.5)
    ran = unet_runs(deadline_server) - before
    time.sleep(0.3)
    assert unet_runs(deadline_server) - before == ran < 600


def test_a_queued_request_whose_client_left_never_runs(deadline_server):
    before, gone = unet_runs(deadline_server), stopped(deadline_server, "disconnected", "queue")

    def queued():  # waits behind the long request (batch ceiling 1) and gives up after 0.4 s
        time.sleep(0.2)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{deadline_server.url}/v1/images/generations", json=dict(LONG, seed=2), timeout=0.4)

    long = lambda: httpx.post(f"{deadline_server.url}/v1/images/generations", json=LONG, timeout=10)  # noqa: E731
    answers = concurrently([long, queued])
    assert answers[0].status_code == 504 and answers[1] is None
    assert stopped(deadline_server, "disconnected", "queue") == gone + 1
    assert unet_runs(deadline_server) - before < 600  # only the long request's steps ran


def test_sigterm_during_a_burst_answers_every_accepted_request_and_exits_0(onnx_fp32):
    server = live.LiveServer(onnx_fp32, "--max-batch-size", "1", "--max-wait-ms", "0").start()
    try:
        bodies = [{"prompt": f"burst {i}", "size": "64x64", "num_inference_steps": 40, "seed": i} for i in range(5)]
        calls = [lambda b=b: httpx.post(f"{server.url}/v1/images/generations", json=b, timeout=60) for b in bodies]
        answers: list = []
        burst = threading.Thread(target=lambda: answers.extend(concurrently(calls)))
        burst.start()
        accepted = until(lambda: live.sample(server.metrics(), "kolors_trt_in_flight") == 5, timeout=10)
        assert accepted
        server.signal(signal.SIGTERM)
        assert until(lambda: httpx.get(f"{server.url}/health/ready").status_code == 503, timeout=2)
        late = httpx.post(f"{server.url}/v1/images/generations", json=bodies[0], timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        burst.join(60)
        assert [a.status_code for a in answers] == [200] * 5
        assert server.wait(30) == 0
        assert "draining" in server.output and "stopped" in server.output
    finally:
        server.stop()


def test_the_drain_timeout_answers_what_is_left_with_503_and_exits_0(onnx_fp32):
    server = live.LiveServer(onnx_fp32, "--max-batch-size", "1", "--max-wait-ms", "0", "--drain-timeout-s", "1",
                             "--timeout-s", "60").start()
    try:
        calls = [lambda s=s: httpx.post(f"{server.url}/v1/images/generations", json=dict(LONG, seed=s), timeout=30)
                 for s in (1, 2)]
        answers: list = []
        pair = threading.Thread(target=lambda: answers.extend(concurrently(calls)))
        pair.start()
        assert until(lambda: live.sample(server.metrics(), "kolors_trt_in_flight") == 2, timeout=10)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        pair.join(30)
        assert sorted(a.status_code for a in answers) == [503, 503]  # one queued, one stopped between steps
        assert all(a.json()["error"]["code"] == "shutting_down" for a in answers)
        assert server.wait(30) == 0 and time.monotonic() - started < 10
    finally:
        server.stop()


def test_a_worker_takes_no_work_before_it_has_loaded_and_warmed_up(onnx_fp32):
    worker = Worker(ServeConfig(str(onnx_fp32)))  # not started
    assert worker.status()["ready"] is False and worker.status()["state"] == "starting"
    with pytest.raises(UnavailableError):
        worker.submit(Work(GENERATE, None, done=lambda r, e: None), (64, 64, 1, True), 1)
    assert worker.in_flight == 0


def test_the_worker_reports_failing_and_recovers_by_probing_when_idle(onnx_fp32):
    worker = Worker(ServeConfig(str(onnx_fp32), failure_threshold=1, probe_interval_s=0.2)).start()
    try:
        assert until(lambda: worker.state == "ready", timeout=30)
        from kolors_trt.runtime.request import GenerationRequest

        answer: dict = {}
        request = GenerationRequest("x", height=64, width=64, num_inference_steps=1, guidance_scale=1e38,
                                    ip_adapter_scale=0.0, seed=0)
        checked = worker.pipe.check(request)
        worker.submit(Work(GENERATE, request, done=lambda r, e: answer.update(error=e, state=worker.state)),
                      checked.key, 1)
        assert until(lambda: "error" in answer, timeout=10)
        assert type(answer["error"]).__name__ == "NonFiniteError" and answer["state"] == "failing"
        assert until(lambda: worker.state == "ready", timeout=5)
        assert worker.status()["consecutive_failures"] == 0
    finally:
        worker.stop()
