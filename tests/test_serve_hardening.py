"""One bad request fails only itself, and OpenAI conformance, against one live `kolors-trt serve` process
(tiny fp32 export, ONNX Runtime, 127.0.0.1): each bad request is fired together with three good ones that
fill one batch; the bad one gets its 4xx before it queues, the good ones their solo images (a local
Pipeline's), and /health/ready stays 200. Then partial_images, GET /v1/models/{id}, fields a newer openai
client sends, x-request-id and the access log, the header timeout (a raw socket that trickles its head), the
server's defaults, a 413's endpoint label and the bounded reference cache. Previews off the worker thread:
an in-process uvicorn serving the same app."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest

from kolors_trt.runtime.pipeline import Pipeline

import serve_live as live

pytestmark = pytest.mark.slow

GEN = "/v1/images/generations"
# three good requests, 64 wide and 32 high: they fill one batch (--max-batch 3)
GOOD = [{"prompt": f"good request {i}", "size": "64x32", "num_inference_steps": 1, "seed": 10 + i} for i in range(3)]
TOKEN_FILE_BYTES = 4224  # one reference's IP tokens of the tiny model: [1, 16, 64] float32 as .npy


png, decode, max_diff = live.png, live.decode, live.max_diff


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening") / "ip-cache"


@pytest.fixture(scope="module")
def pipe(onnx_fp32):
    return Pipeline.load(onnx_fp32)


@pytest.fixture(scope="module")
def solo(pipe):
    """The good requests' images, each run alone by a local Pipeline."""
    return [pipe.generate(g["prompt"], height=32, width=64, num_inference_steps=1, seed=g["seed"],
                          ip_adapter_scale=0).images[0] for g in GOOD]


@pytest.fixture(scope="module")
def server(onnx_fp32, cache_dir):
    srv = live.LiveServer(onnx_fp32, "--max-batch", "3", "--max-wait-ms", "3000", "--max-size", "128",
                          "--default-size", "32x64", "--default-steps", "2", "--header-timeout-s", "1",
                          "--access-log", "--max-body-mb", "1", "--cache-dir", str(cache_dir),
                          "--cache-max-mb", f"{2.5 * TOKEN_FILE_BYTES / 2**20:.6f}")
    srv.start()
    yield srv
    srv.stop()


def edit(**fields):
    return {"files": {"image": ("ref.png", png(1), "image/png")},
            "data": {"prompt": "an edit", "size": "64x32", "num_inference_steps": "2", **fields}}


def raw_json(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


BAD = [  # (what, path, httpx arguments, error.param): each answered 400 before it queues
    ("guidance_scale 1e5 (its latents overflowed the batch)", GEN, {"json": {"prompt": "x", "guidance_scale": 1e5}},
     "guidance_scale"),
    ("ip_adapter_scale 1e30 on an edit", "/v1/images/edits", edit(ip_adapter_scale="1e30"), "ip_adapter_scale"),
    ("ip_adapter_scale -5 on an edit", "/v1/images/edits", edit(ip_adapter_scale="-5"), "ip_adapter_scale"),
    ("a lone surrogate in the prompt", GEN, raw_json('{"prompt": "a\\ud800b", "size": "64x32"}'), "prompt"),
    ("a lone surrogate in negative_prompt", GEN, raw_json('{"prompt": "a", "negative_prompt": "\\udfff"}'),
     "negative_prompt"),
    ("steps true", GEN, {"json": {"prompt": "x", "num_inference_steps": True}}, "num_inference_steps"),
    ("steps as a string", GEN, {"json": {"prompt": "x", "num_inference_steps": "4"}}, "num_inference_steps"),
    ("n as a boolean", GEN, {"json": {"prompt": "x", "n": True}}, "n"),
    ("stream as 1", GEN, {"json": {"prompt": "x", "stream": 1}}, "stream"),
    ("size in Arabic-Indic digits", GEN, {"json": {"prompt": "x", "size": "٦٤x٣٢"}}, "size"),
    ("steps in Arabic-Indic digits in a form", "/v1/images/edits", edit(num_inference_steps="٢"),
     "num_inference_steps"),
    ("steps past --max-steps", GEN, {"json": {"prompt": "x", "num_inference_steps": 1001}}, "num_inference_steps"),
    ("partial_images 5 (OpenAI takes 0 to 3)", GEN, {"json": {"prompt": "x", "stream": True, "partial_images": 5}},
     "partial_images"),
    ("a misspelt extra field", GEN, {"json": {"prompt": "x", "guidence_scale": 3}}, "guidence_scale"),
    ("reference_id on an edit", "/v1/images/edits", edit(reference_id="ab" * 32), "reference_id"),
]


@pytest.mark.parametrize("what,path,kwargs,param", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_fails_alone_while_three_good_ones_share_a_batch(server, solo, what, path, kwargs, param):
    before = server.metrics()
    start = threading.Barrier(4)

    def send(path, kwargs):
        start.wait(10)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return http.post(path, **kwargs)

    calls = [lambda g=g: send(GEN, {"json": g}) for g in GOOD] + [lambda: send(path, kwargs)]
    *good, bad = live.concurrently(calls, timeout=90)
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", param)
    assert error["message"].startswith(param)
    for r, want in zip(good, solo):
        assert r.status_code == 200, r.text
        assert max_diff(decode(r.json()["data"][0]["b64_json"]), want) <= 1
    after = server.metrics()
    assert live.sample(after, "kolors_trt_batch_size_count") - live.sample(before, "kolors_trt_batch_size_count") == 1
    assert live.sample(after, "kolors_trt_batch_size_sum") - live.sample(before, "kolors_trt_batch_size_sum") == 3
    ready = httpx.get(f"{server.url}/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["consecutive_failures"] == 0


def test_the_servers_defaults_apply_and_the_model_card_shows_them(server, pipe):
    client = server.openai()
    card = client.models.retrieve("kolors").model_extra
    assert (card["defaults"]["height"], card["defaults"]["width"], card["defaults"]["num_inference_steps"]) == \
        (32, 64, 2)
    assert card["max_images_per_batch"] == {"cfg": 3, "no_cfg": 3}
    # no size, no steps: the server's defaults (n=3 fills a batch, so nothing waits for company)
    r = client.images.generate(prompt="defaults", n=3, extra_body={"seed": 5})
    assert r.size == "64x32" and r.parameters["num_inference_steps"] == 2
    want = pipe.generate("defaults", height=32, width=64, num_inference_steps=2, seed=5, ip_adapter_scale=0,
                         num_images_per_prompt=3)
    assert [max_diff(decode(item.b64_json), image) for item, image in zip(r.data, want.images)] == [0, 0, 0]


def test_get_a_model_by_id(server):
    client = server.openai()
    model = client.models.retrieve("kolors")
    assert (model.id, model.object, model.owned_by) == ("kolors", "model", "kolors-trt")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-image-1")
    assert err.value.code == "not_found" and err.value.param == "model"


def test_partial_images_default_to_none_and_take_0_to_3(server):
    client = server.openai()
    plain = list(client.images.generate(prompt="a", n=3, stream=True, extra_body={"seed": 1}))
    assert [e.type for e in plain] == ["image_generation.completed"] * 3  # OpenAI's default: 0 partial images
    events = list(client.images.generate(prompt="a", n=3, stream=True, partial_images=2, extra_body={"seed": 1}))
    previews = [e for e in events if e.type == "image_generation.partial_image"]
    assert sorted((e.partial_image_index, e.index) for e in previews) == [(p, i) for p in (0, 1) for i in range(3)]
    assert [e.step for e in previews] == [1] * 3 + [2] * 3 and all(decode(e.b64_json).size == (8, 4) for e in previews)


def test_fields_a_newer_openai_client_sends_are_ignored_with_a_warning(server):
    client = server.openai()
    r = client.images.generate(prompt="a", n=3, complexity="low", frame_count=2,  # openai 3.x fields
                               extra_body={"seed": 3, "svg_width": 5})
    assert len(r.data) == 3
    logged = [line for line in server.lines if "ignoring the unknown field" in line]
    assert any("'complexity'" in line for line in logged) and any("'svg_width'" in line for line in logged)


def test_x_request_id_is_echoed_or_made_and_logged(server):
    with server.client() as http:
        mine = http.get("/v1/models", headers={"x-request-id": "trace-42.a"})
        made = http.post(GEN, json={"prompt": "x", "seed": -1})
        odd = http.get("/health/live", headers={"x-request-id": "no spaces allowed"})
    assert mine.headers["x-request-id"] == "trace-42.a"
    assert made.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    made_id = made.headers["x-request-id"]
    end = time.monotonic() + 10  # the access log line is written after the answer
    while time.monotonic() < end and not any(made_id in line for line in server.lines):
        time.sleep(0.05)
    assert any('"GET /v1/models" 200' in line and "request_id=trace-42.a" in line for line in server.lines)
    assert any(f'"POST {GEN}" 400' in line and f"request_id={made_id}" in line for line in server.lines)


def test_a_connection_that_trickles_its_head_is_closed(server):
    """--header-timeout-s 1: a client that sends a header byte every 0.1 s never completes its head; the server
    answers 408 and closes while the client is still trickling (bounded: 300 bytes, 30 s)."""
    host, port = server.url.removeprefix("http://").split(":")
    got, closed = b"", False
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.settimeout(0.1)
        end = time.monotonic() + 30
        for _ in range(300):
            if time.monotonic() > end:
                break
            try:
                sock.sendall(b"a")
                data = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:  # reset: the server closed first
                closed = True
                break
            got += data
            if not data:
                closed = True
                break
    assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert httpx.get(f"{server.url}/health/ready", timeout=10).status_code == 200  # the server goes on


def test_a_413_carries_its_endpoint_label(server):
    before = live.sample(server.metrics(), "kolors_trt_requests_total", endpoint=GEN, status="413")
    r = httpx.post(f"{server.url}{GEN}", json={"prompt": "x" * (2 * 2**20)}, timeout=30)  # --max-body-mb 1
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert live.sample(server.metrics(), "kolors_trt_requests_total", endpoint=GEN, status="413") == before + 1


def test_the_reference_cache_keeps_within_cache_max_mb(server, cache_dir):
    """--cache-max-mb holds two references' tokens: a third upload evicts the least recently used file."""
    with server.client() as http:
        ids = [http.post("/v1/references", files={"image": ("r.png", png(20 + i), "image/png")}).json()["id"]
               for i in range(3)]
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 2 and f"{ids[2]}.npy" in files and f"{ids[0]}.npy" not in files
    assert sum(p.stat().st_size for p in cache_dir.iterdir()) <= 2.5 * TOKEN_FILE_BYTES


def test_previews_are_encoded_off_the_worker_thread(onnx_fp32, monkeypatch):
    """The real app under an in-process uvicorn (real HTTP): every preview's projection and encoding runs on a
    thread other than the worker thread that owns the engines."""
    import uvicorn

    from kolors_trt.serve import routes
    from kolors_trt.serve.app import create_app
    from kolors_trt.serve.config import ServeConfig

    threads = []
    real_preview = routes.preview

    def preview(latents):
        threads.append(threading.current_thread().name)
        return real_preview(latents)

    monkeypatch.setattr(routes, "preview", preview)
    app = create_app(ServeConfig(str(onnx_fp32), max_wait_ms=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and not (server.started and app.state.worker.ready):
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        body = {"prompt": "a", "size": "64x64", "num_inference_steps": 3, "stream": True, "partial_images": 3}
        with httpx.stream("POST", f"http://127.0.0.1:{port}{GEN}", json=body, timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert sum('"image_generation.partial_image"' in e for e in events) == 3
        assert len(threads) == 3 and "kolors-trt-worker" not in threads, threads
    finally:
        server.should_exit = True
        runner.join(30)
