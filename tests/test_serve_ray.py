"""`kolors-trt serve --ray`: the server as Ray Serve replicas.

Fast tests of the pure parts (flags -> deployment options, the Serve config file, --autoscale, the
application's settings, the replica header, the health check). Then one live `kolors-trt serve --ray
--replicas 2` process for the module (tiny fp32 export, ONNX Runtime, 127.0.0.1; one Ray instance, its
state in a fresh short TMPDIR): two replicas answer a burst of openai requests with the local Pipeline's
images; a reference uploaded to one replica serves on both; SIGKILL of a replica during a burst ends
every request and Ray brings a new replica; SIGTERM exits 0 leaving no process and no folder. These run
as phases of one test on one instance. Every wait is bounded; whatever the command started is ended by
the fixture (only processes that name or hold its temporary folder).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray", reason="kolors-trt[ray] is not installed")

from kolors_trt.cli import build_parser, main  # noqa: E402
from kolors_trt.serve import ray_app  # noqa: E402
from kolors_trt.serve.ray_local import processes_of  # noqa: E402
from kolors_trt.serve.config import ConfigError, ServeConfig  # noqa: E402

import serve_live as live

HEADER = re.compile(r"^(KolorsServer#\w+)/(\d+)$")
KEY = "sk-ray-test-0123"


# ---- the pure parts -----------------------------------------------------------------------------------


def options(*flags: str, ceiling: int = 4) -> dict:
    """deployment_options as `kolors-trt serve --ray FLAGS` derives them."""
    args = build_parser().parse_args(["serve", "--ray", *flags])
    settings = ray_app.settings_from_args(args)
    ns = ray_app.parse_settings(settings)
    from kolors_trt.serve.config import config_from_args

    autoscale = ray_app.parse_autoscale(ns.autoscale) if ns.autoscale else None
    return ray_app.deployment_options(config_from_args(ns, read_key=False), ns.replicas or 1, autoscale,
                                      gpu=ns.engines is not None, ceiling=ceiling)


def test_flags_become_deployment_options():
    o = options("--onnx", "/m/onnx", "--replicas", "2", "--drain-timeout-s", "7")
    assert o["num_replicas"] == 2 and "autoscaling_config" not in o
    # one batch running + one forming in the replica's own batcher; the rest waits in Ray's queue
    assert (o["max_ongoing_requests"], o["max_queued_requests"]) == (8, 64)
    assert o["graceful_shutdown_timeout_s"] == 7.0
    assert o["ray_actor_options"] == {"num_cpus": ray_app.ORT_CPUS, "num_gpus": 0}

    o = options("--onnx", "/m/onnx", "--max-batch", "2", "--max-queue", "1", ceiling=2)
    assert (o["num_replicas"], o["max_ongoing_requests"], o["max_queued_requests"]) == (1, 3, 1)

    o = options("--engines", "/m/engines", "--autoscale", "1:3", ceiling=8)
    assert o["ray_actor_options"] == {"num_cpus": ray_app.GPU_CPUS, "num_gpus": 1}  # one GPU per replica
    assert "num_replicas" not in o
    scale = o["autoscaling_config"]
    assert (scale["min_replicas"], scale["initial_replicas"], scale["max_replicas"]) == (1, 1, 3)
    assert scale["target_ongoing_requests"] == 8  # one full batch per replica
    assert options("--engines", "/m", "--autoscale", "0:2")["autoscaling_config"]["initial_replicas"] == 1


@pytest.mark.parametrize("text, want", [("1:4", (1, 4)), ("0:1", (0, 1)), ("2:2", (2, 2))])
def test_autoscale_parses_min_max(text, want):
    assert ray_app.parse_autoscale(text) == want


@pytest.mark.parametrize("text", ["4", "a:b", "1:", "3:1", "0:0", "-1:2", "1:2:3"])
def test_autoscale_refuses_what_is_not_min_max(text):
    with pytest.raises(ConfigError, match="--autoscale"):
        ray_app.parse_autoscale(text)


def test_scale_flag_errors(capsys):
    with pytest.raises(SystemExit):  # argparse: not both
        build_parser().parse_args(["serve", "--ray", "--onnx", "x", "--replicas", "2", "--autoscale", "1:2"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--ray", "--onnx", "x", "--replicas", "0"])
    capsys.readouterr()
    assert main(["serve", "--onnx", "x", "--replicas", "2"]) == 1  # without --ray
    assert "--replicas: only with --ray" in capsys.readouterr().err
    assert main(["serve", "--ray", "--onnx", "x", "--autoscale", "3:1", "--write-config", "k.yaml"]) == 1
    assert "need 0 <= MIN <= MAX" in capsys.readouterr().err


def test_settings_take_the_flags_names_checks_and_defaults():
    ns = ray_app.parse_settings({"onnx": "/m/onnx", "replicas": 2, "max-queue": 3, "no_verify": True,
                                 "cache_dir": None, "max_batch_size": 2})  # the older name of --max-batch
    assert (ns.onnx, ns.replicas, ns.max_queue, ns.verify, ns.max_wait_ms, ns.max_batch) == ("/m/onnx", 2, 3, False,
                                                                                          25.0, 2)
    for bad, match in [({"onnx": "/m", "colour": 1}, "unknown setting 'colour'"),
                       ({"onnx": "/m", "port": 80}, "http_options"),
                       ({"onnx": "/m", "max_queue": "many"}, "max-queue"),
                       ({"replicas": 2}, "engines"),
                       ({"onnx": "/m", "engines": "/e"}, "not allowed with")]:
        with pytest.raises(ConfigError, match=match):
            ray_app.parse_settings(bad)
    with pytest.raises(ConfigError, match="mapping"):
        ray_app.parse_settings(["--onnx", "/m"])


def test_write_config_is_a_serve_config_for_the_builder(tmp_path, onnx_fp32, capsys):
    import yaml

    key = tmp_path / "key"
    key.write_text("sk-secret-value\n")
    out = tmp_path / "kolors.yaml"
    assert main(["serve", "--ray", "--onnx", str(onnx_fp32), "--autoscale", "1:3", "--max-batch", "2",
                 "--api-key-file", str(key), "--no-verify", "--port", "8123", "--write-config", str(out)]) == 0
    assert f"serve deploy {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "kolors.yaml"]  # atomic: no leftovers
    text = out.read_text()
    assert "sk-secret-value" not in text  # the path of the key file travels, never the key
    config = yaml.safe_load(text)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("kolors", "/",
                                                                      "kolors_trt.serve.ray_app:app_builder")
    args = app["args"]
    assert args["onnx"] == str(onnx_fp32) and args["api_key_file"] == str(key) and args["autoscale"] == "1:3"
    assert (args["max_batch"], args["no_verify"], args["drain_timeout_s"]) == (2, True, 30.0)
    assert "replicas" not in args and "port" not in args
    built = ray_app.app_builder(args)  # what `serve deploy` calls with the file's args
    assert type(built).__name__ == "Application"


def test_the_builder_reads_the_profile_and_never_the_key(onnx_fp32, monkeypatch):
    monkeypatch.setenv("KOLORS_TRT_API_KEY", "sk-from-env")
    seen = {}
    real = ray_app.deployment_options

    def spy(config, replicas, autoscale, gpu, ceiling):
        seen.update(config=config, ceiling=ceiling, replicas=replicas)
        return real(config, replicas, autoscale, gpu, ceiling)

    monkeypatch.setattr(ray_app, "deployment_options", spy)
    ray_app.app_builder({"onnx": str(onnx_fp32), "replicas": 3})
    assert seen["config"].api_key is None and seen["replicas"] == 3
    assert seen["ceiling"] == 4  # the export folder's batch limit, read from its manifest
    ray_app.app_builder({"onnx": "/nowhere/onnx"})  # a cluster's path: the default profile's ceiling
    assert seen["ceiling"] == 4


def test_replica_header_is_on_every_response():
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"x"})

    async def send(message):
        sent.append(message)

    asyncio.run(ray_app.ReplicaHeader(app, "KolorsServer#abc/42")({"type": "http"}, None, send))
    assert sent[0]["status"] == 503 and (b"x-kolors-replica", b"KolorsServer#abc/42") in sent[0]["headers"]
    assert sent[1] == {"type": "http.response.body", "body": b"x"}


@pytest.mark.parametrize("state, alive, healthy", [("ready", True, True), ("failing", True, False),
                                                   ("failed", True, False), ("stopped", False, False),
                                                   ("ready", False, False)])
def test_health_check_is_the_workers_readiness(state, alive, healthy):
    worker = SimpleNamespace(state=state, load_error=None, alive=alive, status=lambda: {"consecutive_failures": 3})
    replica = SimpleNamespace(worker=worker, name="KolorsServer#abc")
    check = ray_app.KolorsServer.func_or_class.check_health
    if healthy:
        check(replica)
    else:
        with pytest.raises(ray_app.RayServeError, match="KolorsServer#abc"):
            check(replica)


def test_the_constructor_waits_for_the_worker_with_a_bound(monkeypatch):
    class Loading:
        state, load_error, config = "loading", None, ServeConfig("/m")
        stopped = False

        def stop(self):
            self.stopped = True

    worker = Loading()
    with pytest.raises(ray_app.RayServeError, match="did not load in 0.2 s"):
        asyncio.run(ray_app.wait_loaded(worker, 0.2))
    assert worker.stopped
    worker = SimpleNamespace(state="failed", load_error=ConfigError("bad folder"))
    with pytest.raises(ConfigError, match="bad folder"):
        asyncio.run(ray_app.wait_loaded(worker, 5))


# ---- one live `kolors-trt serve --ray --replicas 2` ------------------------------------------------------


def png_of(b64: str) -> Image.Image:
    import base64

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def max_diff(got: Image.Image, want: Image.Image) -> int:
    assert got.size == want.size
    return int(np.abs(np.asarray(got.convert("RGB"), int) - np.asarray(want, int)).max())


def replicas_seen(server, tries: int = 30) -> set:
    """The X-Kolors-Replica values of up to ``tries`` health requests."""
    seen = set()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for _ in range(tries):
            seen.add(http.get("/health/live").headers["x-kolors-replica"])
            if len(seen) >= 2:
                break
    return seen


def held_by(server, replica=None, tries: int = 200) -> bool:
    """Whether a /metrics scrape (each goes to one replica) finds a request in flight, on ``replica`` when given;
    bounded in scrapes (Ray spreads them over the replicas)."""
    with server.client(timeout=10) as http:
        for _ in range(tries):
            r = http.get("/metrics")
            if replica is not None and r.headers["x-kolors-replica"] != replica:
                continue
            if re.search(r"^kolors_trt_in_flight [1-9]", r.text, re.M):
                return True
            time.sleep(0.05)
    return False


@pytest.fixture
def base():
    """A fresh short TMPDIR for the command: Ray's whole local state goes into a folder under it."""
    path = Path(tempfile.mkdtemp(prefix="ktr-", dir="/tmp"))
    yield path
    for pid in processes_of(path):  # the safety net: only processes that name or hold our folder
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_server(onnx_fp32, base):
    home_ray = Path.home() / ".ray"
    key_file = base / "key"  # each replica reads it itself: the key never travels inside the deployment
    key_file.write_text(KEY + "\n")
    server = live.LiveServer(onnx_fp32, "--ray", "--replicas", "2", "--max-wait-ms", "50", "--timeout-s", "60",
                             "--drain-timeout-s", "20", "--api-key-file", str(key_file), key=KEY,
                             env={"TMPDIR": str(base)})
    server.home_ray_existed = home_ray.exists()
    started = time.monotonic()
    server.start(timeout=120)
    server.startup_s = time.monotonic() - started
    yield server
    server.stop(timeout=60)


@pytest.fixture
def pipe(onnx_fp32):
    from kolors_trt.runtime.pipeline import Pipeline

    return Pipeline.load(onnx_fp32)


def two_replicas_share_a_burst_with_the_local_pipelines_images(ray_server, pipe):
    """(1) 8 concurrent openai requests: all 200, both replicas answer, images equal the local Pipeline's."""
    client = ray_server.openai(max_retries=0, timeout=60)
    calls = [lambda i=i: client.images.with_raw_response.generate(
        prompt=f"a red fox #{i}", size="96x64", extra_body={"seed": i, "num_inference_steps": 3}) for i in range(8)]
    answers = live.concurrently(calls, timeout=90)
    assert all(not isinstance(a, Exception) and a.status_code == 200 for a in answers), answers
    names = {HEADER.match(a.headers["x-kolors-replica"]).group(1) for a in answers}
    if len(names) < 2:  # Ray routed the whole burst to one replica (possible, unlikely): ask both directly
        names |= {HEADER.match(v).group(1) for v in replicas_seen(ray_server)}
    assert len(names) == 2, names
    with httpx.Client(base_url=ray_server.url, timeout=10) as http:  # no key: the replica's own 401
        refused = http.post("/v1/images/generations", json={"prompt": "x"})
    assert refused.status_code == 401 and refused.json()["error"]["code"]
    assert HEADER.match(refused.headers["x-kolors-replica"])
    with httpx.Client(base_url=ray_server.url, timeout=10) as http:  # the playground page needs no key, its API does
        page = http.get("/playground")
        assert page.status_code == 200 and "/playground/playground.js" in page.text
        assert http.get("/playground/playground.js").status_code == 200
    with ray_server.client(timeout=10) as http:
        assert "64x64" in http.get("/v1/models").json()["data"][0]["sizes"]
    for i, answer in enumerate(answers):
        want = pipe.generate(f"a red fox #{i}", height=64, width=96, num_inference_steps=3, seed=i,
                             ip_adapter_scale=0)
        assert max_diff(png_of(answer.parse().data[0].b64_json), want.images[0]) <= 1


def a_reference_uploaded_to_one_replica_serves_on_both(ray_server, pipe):
    """(2) Without --cache-dir the local instance gives its replicas one in its folder: each replica's memory cache
    is its own, the folder is where the other finds the tokens."""
    reference = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(reference, "PNG")
    with ray_server.client(timeout=60) as http:
        up = http.post("/v1/references", files={"image": ("r.png", reference.getvalue(), "image/png")})
        assert up.status_code == 200, up.text
        body = {"prompt": "a dog", "size": "64x64", "reference_id": up.json()["id"], "num_inference_steps": 2,
                "ip_adapter_scale": 0.6}
        answers, names = [], set()
        for seed in range(12):  # bounded: until both replicas answered (each 50% per request when idle)
            r = http.post("/v1/images/generations", json={**body, "seed": seed})
            answers.append(r)
            names.add(HEADER.match(r.headers["x-kolors-replica"]).group(1))
            if len(names) == 2 and len(answers) >= 2:
                break
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers]
    assert HEADER.match(up.headers["x-kolors-replica"]).group(1) in names and len(names) == 2
    want = pipe.generate("a dog", ip_adapter_image=reference.getvalue(), height=64, width=64, num_inference_steps=2,
                         seed=0, ip_adapter_scale=0.6)
    assert max_diff(png_of(answers[0].json()["data"][0]["b64_json"]), want.images[0]) <= 1


def sigkill_of_a_replica_during_a_burst_ends_every_request_and_ray_replaces_it(ray_server):
    """(3) Every request of the burst ends (200, or 5xx for the victim's) before its deadline; a new replica
    (new name and pid) answers, and requests succeed again, within bounds."""
    before = replicas_seen(ray_server)
    assert len(before) == 2, before
    victim = min(before)
    victim_pid = int(HEADER.match(victim).group(2))
    deadline = 90.0  # past the server's own --timeout-s 60 (then 504): a request without an answer by then hangs
    body = {"prompt": "a long one", "size": "64x64", "num_inference_steps": 150}  # seconds in a batch of 4

    def post(i):
        with ray_server.client(timeout=deadline) as http:
            started = time.monotonic()
            r = http.post("/v1/images/generations", json={**body, "seed": i})
            return r.status_code, r.headers.get("x-kolors-replica"), time.monotonic() - started

    results = []
    burst = threading.Thread(target=lambda: results.extend(
        live.concurrently([lambda i=i: post(i) for i in range(8)], timeout=deadline + 5)))
    burst.start()
    assert held_by(ray_server, victim)  # the victim holds some of the burst
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()
    burst.join(deadline + 10)
    # every request ended with an HTTP answer before its deadline (no httpx timeout): 200, or 5xx for those the
    # victim held
    assert len(results) == 8 and all(isinstance(r, tuple) for r in results), results
    assert all(status == 200 or 500 <= status < 600 for status, _, _ in results), results
    assert any(status >= 500 for status, _, _ in results), results  # the victim held some: they failed fast
    # Ray starts a new replica (a new name and pid) and requests succeed again, within a bound
    end = killed + 60
    after = set()
    while time.monotonic() < end:
        after = replicas_seen(ray_server, tries=10)
        if len(after) == 2 and victim not in after:
            break
        time.sleep(0.5)
    assert len(after) == 2 and victim not in after and all(int(HEADER.match(a).group(2)) != victim_pid
                                                             for a in after), (before, after, time.monotonic() - killed)
    client = ray_server.openai(max_retries=0, timeout=30)
    again = live.concurrently([lambda i=i: client.images.with_raw_response.generate(
        prompt=f"again {i}", size="64x64", extra_body={"seed": i, "num_inference_steps": 2}) for i in range(4)], 60)
    assert all(not isinstance(a, Exception) and a.status_code == 200 for a in again), again


def sigterm_answers_the_running_request_exits_0_and_leaves_nothing(ray_server, base):
    """(4) The request running at SIGTERM is answered; once the command says so, new requests get the server's own
    503 at once (the replicas heard the drain) while that request still runs; exit 0; no process and no folder
    left, no ~/.ray."""
    folder = Path(re.search(r"local Ray instance in (\S+);", ray_server.output).group(1))
    assert folder.parent == base and folder.is_dir() and (folder / "auth_token").is_file()
    assert processes_of(base)  # the instance runs, found by its folder
    running = {}

    def long_request(seed):
        with ray_server.client(timeout=90) as http:
            r = http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "seed": seed,
                                                          "num_inference_steps": 300})
            running[seed] = r.status_code

    # one on each replica (Ray routes to the less busy), so that a /metrics scrape finds one in flight
    threads = [threading.Thread(target=long_request, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    assert held_by(ray_server)  # the long requests are accepted
    ray_server.signal(signal.SIGTERM)
    end = time.monotonic() + 30
    while time.monotonic() < end and not any(line.startswith("draining: new requests get 503") for line in
                                             ray_server.lines):
        time.sleep(0.05)
    with ray_server.client(timeout=30) as http:
        late = http.post("/v1/images/generations", json={"prompt": "late", "size": "64x64", "num_inference_steps": 1})
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
    assert HEADER.match(late.headers["x-kolors-replica"])  # a replica's answer, not the stand-in's
    assert len(running) < 2  # answered while a request accepted before SIGTERM still ran
    for t in threads:
        t.join(90)
    assert ray_server.wait(60) == 0, ray_server.output
    assert running == {1: 200, 2: 200}  # accepted before SIGTERM: answered
    assert "stopped" in ray_server.lines
    assert not folder.exists()  # session, sockets, logs and the token file went with it
    assert not processes_of(base), [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in processes_of(base)]
    if not ray_server.home_ray_existed:
        assert not (Path.home() / ".ray").exists()  # Ray's token stayed in the folder, not in ~/.ray


@pytest.mark.slow
def test_two_replicas_on_one_ray_instance(ray_server, pipe, base):
    """The live phases in order on one `kolors-trt serve --ray --replicas 2`: one test, so that pytest-xdist
    never splits them across workers (each would start a Ray instance of its own; xdist_group does not group
    under pytest 9, whose items no longer take xdist's node-id suffix)."""
    two_replicas_share_a_burst_with_the_local_pipelines_images(ray_server, pipe)
    a_reference_uploaded_to_one_replica_serves_on_both(ray_server, pipe)
    sigkill_of_a_replica_during_a_burst_ends_every_request_and_ray_replaces_it(ray_server)
    sigterm_answers_the_running_request_exits_0_and_leaves_nothing(ray_server, base)
