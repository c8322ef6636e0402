"""The server's API against a live `kolors-trt serve` process (tiny fp32 export, ONNX Runtime, 127.0.0.1, an
API key): the official openai client, images compared with a local Pipeline's for the same parameters at
sizes other than the export sample, engine-run counters and Prometheus text from the server's /metrics."""

from __future__ import annotations

import io
import json
import threading

import openai
import pytest
from PIL import Image

from kolors_trt.runtime.pipeline import Pipeline
from kolors_trt.runtime.postprocess import PNG_PARAMETERS_KEY

import serve_live as live

KEY = "sk-test-0123456789"
RUNS = "kolors_trt_engine_runs_total"


png, decode, max_diff = live.png, live.decode, live.max_diff


@pytest.fixture(scope="module")
def server(onnx_fp32, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("serve-api") / "key"
    key_file.write_text(KEY + "\n")
    srv = live.LiveServer(onnx_fp32, "--api-key-file", str(key_file), "--max-wait-ms", "150", "--timeout-s", "60",
                          "--max-size", "320", key=KEY)  # an export folder's size limit, lowered
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipe(onnx_fp32):
    return Pipeline.load(onnx_fp32)


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_generate_equals_the_local_pipeline_with_openai_width_x_height(client, pipe):
    r = client.images.generate(model="kolors", prompt="a red fox in the snow", size="96x64", n=2,
                               extra_body={"seed": 7, "num_inference_steps": 3, "negative_prompt": "blurry"})
    want = pipe.generate("a red fox in the snow", negative_prompt="blurry", height=64, width=96,
                         num_inference_steps=3, seed=7, num_images_per_prompt=2, ip_adapter_scale=0)
    assert r.size == "96x64" and r.output_format == "png" and len(r.data) == 2
    assert r.parameters["seed"] == 7 and r.parameters["height"] == 64 and r.parameters["width"] == 96
    assert r.parameters["ip_adapter_scale"] == 0  # no reference: plain Kolors
    for i, (item, image) in enumerate(zip(r.data, want.images)):
        got = decode(item.b64_json)
        assert got.size == (96, 64) and max_diff(got, image) <= 1
        carried = json.loads(got.text[PNG_PARAMETERS_KEY])
        assert carried["seed"] == 7 and carried["index"] == i and carried["prompt"] == "a red fox in the snow"


def test_a_random_seed_is_returned_and_reproduces_the_image(client):
    first = client.images.generate(prompt="a lighthouse", size="64x64", extra_body={"num_inference_steps": 2})
    seed = first.parameters["seed"]
    again = client.images.generate(prompt="a lighthouse", size="64x64",
                                   extra_body={"num_inference_steps": 2, "seed": seed})
    assert max_diff(decode(again.data[0].b64_json), decode(first.data[0].b64_json)) == 0


def test_edit_runs_ip_adapter_on_the_uploaded_reference(client, pipe):
    ref = png(1)
    r = client.images.edit(image=("ref.png", ref, "image/png"), prompt="一只可爱的小狗在奔跑", size="64x96",
                           extra_body={"seed": 3, "num_inference_steps": 2, "ip_adapter_scale": 0.7})
    want = pipe.generate("一只可爱的小狗在奔跑", ip_adapter_image=ref, height=96, width=64, num_inference_steps=2,
                         seed=3, ip_adapter_scale=0.7)
    assert max_diff(decode(r.data[0].b64_json), want.images[0]) <= 1
    assert r.parameters["reference_id"] == pipe.image_key(pipe.pixel_values(ref))
    plain = pipe.generate("一只可爱的小狗在奔跑", height=96, width=64, num_inference_steps=2, seed=3,
                          ip_adapter_scale=0)
    assert max_diff(decode(r.data[0].b64_json), plain.images[0]) > 1  # the reference changed the image


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_the_parameters_in_exif(client, fmt):
    r = client.images.generate(prompt="a cat", size="64x32", output_format=fmt,
                               extra_body={"seed": 2, "num_inference_steps": 1})
    image = decode(r.data[0].b64_json)
    assert image.format == fmt.upper() and image.size == (64, 32) and r.output_format == fmt
    assert json.loads(image.getexif()[0x010E])["seed"] == 2


def test_reference_id_reuses_cached_tokens_without_the_image_encoder(server, client, pipe):
    ref = png(2, size=(90, 40))
    with server.client() as http:
        up = http.post("/v1/references", files={"image": ("r.png", ref, "image/png")}).json()
        again = http.post("/v1/references", files={"image": ("r.png", ref, "image/png")}).json()
    assert up["id"] == pipe.image_key(pipe.pixel_values(ref)) and up["object"] == "reference"
    assert (up["cached"], again["cached"], again["id"]) == (False, True, up["id"])
    before = server.metrics()
    r = client.images.generate(prompt="a dog", size="64x64", extra_body={
        "reference_id": up["id"], "seed": 4, "num_inference_steps": 2, "ip_adapter_scale": 0.6})
    after = server.metrics()
    assert live.sample(after, RUNS, component="image_encoder") == live.sample(before, RUNS, component="image_encoder")
    assert live.sample(after, RUNS, component="unet") - live.sample(before, RUNS, component="unet") == 2
    want = pipe.generate("a dog", ip_adapter_image=ref, height=64, width=64, num_inference_steps=2, seed=4,
                         ip_adapter_scale=0.6)
    assert max_diff(decode(r.data[0].b64_json), want.images[0]) <= 1
    assert r.parameters["reference_id"] == up["id"]


def test_sampler_and_guidance_interval_equal_the_pipeline_and_other_samplers_batch_apart(server, client, pipe):
    """scheduler and guidance_interval (JSON, and "LOW:HIGH" in a form) give the local Pipeline's image; the UNet
    rows metric counts the skipped unconditional rows; requests of two samplers never share a batch."""
    sigmas = pipe.samplers.tables("dpmpp_2m_karras", 3).sigmas[:3]
    before = server.metrics()
    r = client.images.generate(prompt="a cat", size="64x64", extra_body={
        "seed": 5, "num_inference_steps": 3, "scheduler": "dpmpp_2m_karras", "guidance_interval": [0.28, 5.42]})
    after = server.metrics()
    want = pipe.generate("a cat", height=64, width=64, num_inference_steps=3, seed=5, ip_adapter_scale=0,
                         scheduler="dpmpp_2m_karras", guidance_interval=(0.28, 5.42))
    assert max_diff(decode(r.data[0].b64_json), want.images[0]) <= 1
    assert r.parameters["scheduler"] == "dpmpp_2m_karras" and r.parameters["guidance_interval"] == [0.28, 5.42]
    guided = int(((sigmas > 0.28) & (sigmas <= 5.42)).sum())
    assert 0 < guided < 3
    rows = "kolors_trt_unet_rows_total"
    assert live.sample(after, rows, graph="unet") - live.sample(before, rows, graph="unet") == 3 + guided
    edit = client.images.edit(image=("ref.png", png(8), "image/png"), prompt="a dog", size="64x64",
                              extra_body={"seed": 6, "num_inference_steps": 2, "scheduler": "euler_a",
                                          "guidance_interval": "0.28:5.42"})
    want = pipe.generate("a dog", ip_adapter_image=png(8), height=64, width=64, num_inference_steps=2, seed=6,
                         scheduler="euler_a", guidance_interval=(0.28, 5.42))
    assert max_diff(decode(edit.data[0].b64_json), want.images[0]) <= 1
    before = server.metrics()
    live.concurrently([lambda name=name: server.openai().images.generate(
        prompt="same", size="64x64", extra_body={"seed": 1, "num_inference_steps": 2, "scheduler": name})
        for name in ("unipc", "dpmpp_2m")])
    after = server.metrics()
    assert live.sample(after, "kolors_trt_batch_size_count") - live.sample(before, "kolors_trt_batch_size_count") == 2
    assert live.sample(after, RUNS, component="unet") - live.sample(before, RUNS, component="unet") == 2 * 2


def test_deep_cache_interval_equals_the_pipeline_and_counts_the_shallow_rows(server, client, pipe):
    """deep_cache_interval (JSON, and a form's text) gives the local Pipeline's image; the model card says the
    folder has DeepCache; kolors_trt_unet_rows_total{graph="unet_shallow"} counts the shallow rows."""
    with server.client() as http:
        assert http.get("/v1/models").json()["data"][0]["deep_cache"] is True
    before = server.metrics()
    r = client.images.generate(prompt="a cat", size="96x64", extra_body={
        "seed": 8, "num_inference_steps": 5, "deep_cache_interval": 3, "scheduler": "unipc"})
    after = server.metrics()
    want = pipe.generate("a cat", height=64, width=96, num_inference_steps=5, seed=8, ip_adapter_scale=0,
                         scheduler="unipc", deep_cache_interval=3)
    assert max_diff(decode(r.data[0].b64_json), want.images[0]) <= 1
    assert r.parameters["deep_cache_interval"] == 3
    rows = "kolors_trt_unet_rows_total"
    assert live.sample(after, rows, graph="unet") - live.sample(before, rows, graph="unet") == 2 * 2  # steps 0, 3
    assert live.sample(after, rows, graph="unet_shallow") - live.sample(before, rows, graph="unet_shallow") == 2 * 3
    edit = client.images.edit(image=("ref.png", png(9), "image/png"), prompt="a dog", size="64x64",
                              extra_body={"seed": 6, "num_inference_steps": 3, "deep_cache_interval": "2"})
    want = pipe.generate("a dog", ip_adapter_image=png(9), height=64, width=64, num_inference_steps=3, seed=6,
                         deep_cache_interval=2)
    assert max_diff(decode(edit.data[0].b64_json), want.images[0]) <= 1


def test_stream_sends_a_preview_per_step_then_the_final_image(client, pipe):
    events = list(client.images.generate(prompt="a cat", size="96x64", stream=True, partial_images=3,
                                         extra_body={"seed": 9, "num_inference_steps": 3}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [(e.partial_image_index, e.step, e.steps) for e in events[:3]] == [(0, 1, 3), (1, 2, 3), (2, 3, 3)]
    assert all(decode(e.b64_json).size == (12, 8) for e in events[:3])  # latent resolution: no VAE per step
    final = events[-1]
    assert final.size == "96x64" and final.parameters["seed"] == 9
    want = pipe.generate("a cat", height=64, width=96, num_inference_steps=3, seed=9, ip_adapter_scale=0)
    assert max_diff(decode(final.b64_json), want.images[0]) <= 1


def test_edit_stream_with_partial_images(client):
    events = list(client.images.edit(image=("ref.png", png(3), "image/png"), prompt="a dog", size="64x64",
                                     stream=True, partial_images=1, extra_body={"seed": 1, "num_inference_steps": 4}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[0].step == 4 and decode(events[1].b64_json).size == (64, 64)


def test_models_lists_the_model_and_its_profile(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["kolors"]
    card = models[0].model_extra
    assert card["profile"]["height"] == {"min": 32, "opt": 32, "max": 320} and card["size_multiple"] == 32
    assert card["max_images_per_batch"] == {"cfg": 4, "no_cfg": 4} and card["startup_seconds"] > 0
    assert card["max_steps"] == 1000
    assert card["samplers"] == ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]


GOOD = {"prompt": "ok", "size": "32x32", "num_inference_steps": 1}


def edit(image: bytes, **fields):
    return {"files": {"image": ("ref.png", image, "image/png")}, "data": {**GOOD, **fields}}


def pixel_bomb() -> bytes:
    """65 KB of PNG that would decode to 67 M pixels (over the runtime's pixel limit)."""
    buffer = io.BytesIO()
    Image.new("L", (8200, 8200)).save(buffer, "PNG")
    return buffer.getvalue()


def chunked_upload(size: int):
    """A multipart upload without Content-Length: the limit has to count the bytes as they come."""
    yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="r.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(size // 2**20):
        yield b"x" * 2**20
    yield b"\r\n--b--\r\n"


BAD = [  # (what, request, status, error.code, error.param); a callable value is called per request
    ("non-image upload", ("/v1/images/edits", edit(b"plain text, not an image")), 422, "invalid_image", None),
    ("truncated image", ("/v1/images/edits", edit(png(5)[:300])), 422, "invalid_image", None),
    ("image over the pixel limit", ("/v1/images/edits", {"files": lambda: {"image": ("b.png", pixel_bomb())},
                                                         "data": GOOD}), 422, "invalid_image", None),
    ("a path as the image", ("/v1/images/edits", {"data": {**GOOD, "image": "/etc/passwd"}}), 400, "invalid_value",
     "image"),
    ("size not a multiple of 32", ("/v1/images/generations", {"json": {**GOOD, "size": "100x64"}}), 400,
     "invalid_value", "size"),
    ("size outside the limits", ("/v1/images/generations", {"json": {**GOOD, "size": "64x352"}}), 400,
     "invalid_value", "size"),
    ("size in the wrong shape", ("/v1/images/generations", {"json": {**GOOD, "size": "1024"}}), 400,
     "invalid_value", "size"),
    ("steps 0", ("/v1/images/generations", {"json": {**GOOD, "num_inference_steps": 0}}), 400, "invalid_value",
     "num_inference_steps"),
    ("NaN guidance", ("/v1/images/generations", {"content": b'{"prompt": "x", "guidance_scale": NaN}',
                                                 "headers": {"content-type": "application/json"}}), 400,
     "invalid_value", "guidance_scale"),
    ("NaN guidance in a form", ("/v1/images/edits", edit(png(6), guidance_scale="nan")), 400, "invalid_value",
     "guidance_scale"),
    ("guidance past its range (the latents would overflow)", ("/v1/images/generations",
                                                              {"json": {**GOOD, "guidance_scale": 1e38}}), 400,
     "invalid_value", "guidance_scale"),
    ("seed -1", ("/v1/images/generations", {"json": {**GOOD, "seed": -1}}), 400, "invalid_value", "seed"),
    ("n past the profile", ("/v1/images/generations", {"json": {**GOOD, "n": 5}}), 400, "invalid_value", "n"),
    ("misspelt extra field", ("/v1/images/generations", {"json": {**GOOD, "guidence_scale": 3}}), 400,
     "invalid_value", "guidence_scale"),
    ("prompt over the cap", ("/v1/images/generations", {"json": {**GOOD, "prompt": "x" * 4001}}), 400,
     "invalid_value", "prompt"),
    ("IP scale without a reference", ("/v1/images/generations", {"json": {**GOOD, "ip_adapter_scale": 0.5}}), 400,
     "invalid_value", "ip_adapter_scale"),
    ("unknown reference_id", ("/v1/images/generations", {"json": {**GOOD, "reference_id": "ab" * 32}}), 404,
     "not_found", "reference_id"),
    ("a path as reference_id", ("/v1/images/generations", {"json": {**GOOD, "reference_id": "../../etc/passwd"}}),
     400, "invalid_value", "reference_id"),
    ("another model", ("/v1/images/generations", {"json": {**GOOD, "model": "gpt-image-1"}}), 404, "not_found",
     "model"),
    ("oversize body", ("/v1/images/generations", {"json": {**GOOD, "negative_prompt": "x" * (21 * 2**20)}}), 413,
     "request_too_large", None),
    ("oversize upload, chunked", ("/v1/images/edits", {"content": lambda: chunked_upload(21 * 2**20),
                                                       "headers": {"content-type": "multipart/form-data; boundary=b"}}),
     413, "request_too_large", None),
    ("no API key", ("/v1/images/generations", {"json": GOOD, "headers": {"Authorization": ""}}), 401,
     "invalid_api_key", None),
    ("wrong API key", ("/v1/images/generations", {"json": GOOD, "headers": {"Authorization": "Bearer nope"}}), 401,
     "invalid_api_key", None),
    ("unknown route", ("/v1/images/variations", {"json": GOOD}), 404, "not_found", None),
    ("unknown sampler", ("/v1/images/generations", {"json": {**GOOD, "scheduler": "ddim"}}), 400, "invalid_value",
     "scheduler"),
    ("guidance interval low >= high", ("/v1/images/generations", {"json": {**GOOD, "guidance_interval": [5, 1]}}),
     400, "invalid_value", "guidance_interval"),
    ("negative guidance interval", ("/v1/images/generations", {"json": {**GOOD, "guidance_interval": [-1, 1]}}), 400,
     "invalid_value", "guidance_interval.0"),
    ("guidance interval of one value", ("/v1/images/generations", {"json": {**GOOD, "guidance_interval": [1]}}), 400,
     "invalid_value", "guidance_interval"),
    ("guidance interval in a form", ("/v1/images/edits", edit(png(7), guidance_interval="5:1")), 400, "invalid_value",
     "guidance_interval"),
    ("DeepCache interval 0", ("/v1/images/generations", {"json": {**GOOD, "deep_cache_interval": 0}}), 400,
     "invalid_value", "deep_cache_interval"),
    ("DeepCache interval 1.5", ("/v1/images/generations", {"json": {**GOOD, "deep_cache_interval": 1.5}}), 400,
     "invalid_value", "deep_cache_interval"),
    ("DeepCache interval as a string", ("/v1/images/generations", {"json": {**GOOD, "deep_cache_interval": "3"}}),
     400, "invalid_value", "deep_cache_interval"),
    ("DeepCache interval in a form", ("/v1/images/edits", edit(png(7), deep_cache_interval="x")), 400,
     "invalid_value", "deep_cache_interval"),
]


@pytest.mark.parametrize("what,call,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_4xx_with_an_openai_error_body_and_the_next_request_succeeds(
        server, what, call, status, code, param):
    path, kwargs = call
    kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}
    with server.client() as http:
        r = http.post(path, **kwargs)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == (code, param) and error["message"]
        if param is not None:
            assert error["message"].startswith(param)
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        assert http.post("/v1/images/generations", json=GOOD).status_code == 200


def test_health_needs_no_key_and_everything_else_does(server):
    import httpx

    assert httpx.get(f"{server.url}/health/live").status_code == 200
    ready = httpx.get(f"{server.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    for path in ("/metrics", "/v1/models"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_burst_of_compatible_requests_shares_batches_and_each_image_equals_its_solo_result(server, pipe):
    prompts = [f"request {i}" for i in range(6)]
    before = server.metrics()
    results: dict = {}
    start = threading.Barrier(6)

    def send(i):
        start.wait(10)
        results[i] = server.openai().images.generate(prompt=prompts[i], size="64x64",
                                                     extra_body={"seed": 100 + i, "num_inference_steps": 3})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = server.metrics()
    assert sorted(results) == list(range(6))
    batches = after[("kolors_trt_batch_size_count", ())] - before.get(("kolors_trt_batch_size_count", ()), 0)
    images = after[("kolors_trt_batch_size_sum", ())] - before.get(("kolors_trt_batch_size_sum", ()), 0)
    single = (after[("kolors_trt_batch_size_bucket", (("le", "1.0"),))]
              - before.get(("kolors_trt_batch_size_bucket", (("le", "1.0"),)), 0))
    assert images == 6 and batches < 6 and single < batches  # at least one batch of more than one image
    runs = live.sample(after, RUNS, component="unet") - live.sample(before, RUNS, component="unet")
    assert runs == 3 * batches  # one UNet call per step per batch
    for i in range(6):
        want = pipe.generate(prompts[i], height=64, width=64, num_inference_steps=3, seed=100 + i, ip_adapter_scale=0)
        assert max_diff(decode(results[i].data[0].b64_json), want.images[0]) <= 1, i


def test_metrics_count_requests_queue_waits_and_steps(server, client):
    before = server.metrics()
    client.images.generate(prompt="metrics", size="32x64", extra_body={"num_inference_steps": 4})
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="metrics", size="33x64")
    after = server.metrics()

    def delta(name, **labels):
        return live.sample(after, name, **labels) - live.sample(before, name, **labels)

    gen = "/v1/images/generations"
    assert delta("kolors_trt_requests_total", endpoint=gen, status="200") == 1
    assert delta("kolors_trt_requests_total", endpoint=gen, status="400") == 1
    assert delta("kolors_trt_request_seconds_count", endpoint=gen) == 2
    assert delta("kolors_trt_queue_wait_seconds_count") == 1 and delta("kolors_trt_batch_size_count") == 1
    assert delta("kolors_trt_denoise_step_seconds_count") == 3  # steps 2..4 (step 1's time includes the encoders)
    assert delta("kolors_trt_cache_misses_total", cache="prompt") == 1
    assert live.sample(after, "kolors_trt_queue_depth") == 0 and live.sample(after, "kolors_trt_in_flight") == 0
    assert live.sample(after, "kolors_trt_ready") == 1 and live.sample(after, "kolors_trt_startup_seconds") > 0


@pytest.mark.slow
def test_ci_load_run_loses_nothing_and_answers_no_5xx(server):
    from kolors_trt import loadgen

    config = loadgen.LoadConfig(server.url, concurrency=8, requests=64, height=64, width=64, steps=2,
                                guidance_scale=5.0, warmup=0, timeout_s=60, max_seconds=120, api_key=KEY)
    result = loadgen.run_load(config, progress=False)
    assert result["lost"] == 0 and result["statuses"] == {"200": 64}, result
    assert result["batches"]["mean_images"] > 1 and result["images_per_second"] > 0
    assert "| 8 " in loadgen.markdown({"server": result})


def test_bench_server_cli_prints_the_table_and_writes_json(server, onnx_fp32, tmp_path, monkeypatch, capsys):
    from kolors_trt.cli import main

    monkeypatch.setenv("KOLORS_TRT_API_KEY", KEY)
    out = tmp_path / "load.json"
    code = main(["bench", "--onnx", str(onnx_fp32), "--server", server.url, "--concurrency", "2", "--requests", "4",
                 "--size", "64x32", "--steps", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["server"]["statuses"] == {"200": 4} and result["server"]["lost"] == 0
    assert (result["server"]["config"]["height"], result["server"]["config"]["width"]) == (64, 32)
    assert result["server"]["config"]["api_key"] is None  # the key is not written out
    assert result["local"]["images_per_second"] > 0
    assert "local 1-at-a-time images/s" in capsys.readouterr().out


@pytest.mark.slow
def test_references_survive_a_restart_in_the_cache_dir(onnx_fp32, tmp_path, pipe):
    cache = tmp_path / "ip-cache"
    ref = png(8, size=(64, 80))
    first = live.LiveServer(onnx_fp32, "--cache-dir", str(cache)).start()
    try:
        with first.client() as http:
            reference_id = http.post("/v1/references", files={"image": ("r.png", ref, "image/png")}).json()["id"]
    finally:
        assert first.stop() == 0
    assert [p.name for p in cache.iterdir()] == [f"{reference_id}.npy"]  # named by content, not by the client
    second = live.LiveServer(onnx_fp32, "--cache-dir", str(cache)).start()
    try:
        encoder_at_load = live.sample(second.metrics(), RUNS, component="image_encoder")  # the zero image's tokens
        r = second.openai().images.generate(prompt="a dog", size="64x64", extra_body={
            "reference_id": reference_id, "seed": 5, "num_inference_steps": 2})
        after = second.metrics()
    finally:
        second.stop()
    assert live.sample(after, RUNS, component="image_encoder") == encoder_at_load
    assert live.sample(after, "kolors_trt_cache_hits_total", cache="ip", tier="disk") == 1
    want = pipe.generate("a dog", ip_adapter_image=ref, height=64, width=64, num_inference_steps=2, seed=5)
    assert max_diff(decode(r.data[0].b64_json), want.images[0]) <= 1


def test_export_folder_limits_name_their_range(server):
    with server.client() as http:
        r = http.post("/v1/images/generations", json={**GOOD, "size": "352x64"})
        assert r.status_code == 400 and "[32, 320]" in r.json()["error"]["message"], r.text
        assert http.post("/v1/images/generations", json={**GOOD, "size": "320x64"}).status_code == 200
        card = http.get("/v1/models").json()["data"][0]
        assert card["profile"]["width"]["max"] == 320
