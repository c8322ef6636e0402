"""LoRA on a live `kolors-trt serve --lora-dir` process: requests with different `lora` fields in one burst
(JSON, and a JSON string in multipart) each equal the local Pipeline's image with the same adapters; swaps are
counted in /metrics; GET /v1/loras lists the folder; bad adapters, names and weights are 400s naming `lora`,
and change nothing."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from kolors_trt.runtime.pipeline import Pipeline

import serve_live as live
import lora_support as support

pytestmark = pytest.mark.slow

COMMON = dict(size="96x64", extra_body={"seed": 4, "num_inference_steps": 2})
SETS = [{"ink": 0.8}, {"pixel": 0.5}, {}, {"ink": 0.8, "pixel": 0.5}, {"ink": 0.8}]


@pytest.fixture(scope="module")
def lora_dir(tiny, store, tmp_path_factory):
    kolors, _ = tiny
    root = tmp_path_factory.mktemp("serve-loras")
    folder = root / "loras"
    folder.mkdir()
    made = {"ink": support.unet_lora(kolors / "unet", seed=11),
            "pixel": support.unet_lora(kolors / "unet", seed=12, targets=support.CONV_TARGETS, r=2, alpha=2),
            "other": support.unet_lora(store.tiny("alt")[0] / "unet", seed=13)}
    for name, layers in made.items():
        shutil.copy(support.save_diffusers(root / name, unet=layers), folder / f"{name}.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(onnx_fp32, lora_dir):
    srv = live.LiveServer(onnx_fp32, "--lora-dir", str(lora_dir), "--max-wait-ms", "300", "--timeout-s", "120")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipe(onnx_fp32, lora_dir):
    return Pipeline.load(onnx_fp32, lora_dir=lora_dir)


def decode(b64_json: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_json))).convert("RGB"), dtype=np.int16)


def local(pipe: Pipeline, loras: dict, **extra) -> np.ndarray:
    g = pipe.generate("a red fox in the snow", height=64, width=96, num_inference_steps=2, seed=4,
                      ip_adapter_scale=extra.pop("ip_adapter_scale", 0.0), loras=loras, **extra)
    return np.asarray(g.images[0], dtype=np.int16)


def test_a_burst_of_mixed_loras_equals_the_local_pipeline(server, pipe):
    with server.client() as http:
        listed = http.get("/v1/loras").json()
    assert listed["object"] == "list"
    assert {(i["id"], i["loaded"]) for i in listed["data"]} == {("ink", False), ("pixel", False), ("other", False)}
    client = server.openai(timeout=120)
    before = server.metrics()
    calls = [lambda s=s: client.images.generate(prompt="a red fox in the snow", **{
        **COMMON, "extra_body": {**COMMON["extra_body"], "lora": s}}) for s in SETS]
    results = live.concurrently(calls, timeout=300)
    after = server.metrics()
    for chosen, r in zip(SETS, results):
        assert not isinstance(r, Exception), r
        assert r.parameters["lora"] == chosen
        diff = int(np.abs(decode(r.data[0].b64_json) - local(pipe, chosen)).max())
        assert diff <= 1, f"{chosen}: 8-bit difference {diff}"
    assert int(np.abs(decode(results[0].data[0].b64_json) - decode(results[2].data[0].b64_json)).max()) > 30
    # four UNet sets in the burst: three or four swaps (none if the base set ran first), each timed
    swaps = live.total(after, "kolors_trt_lora_swaps_total", component="unet") - \
        live.total(before, "kolors_trt_lora_swaps_total", component="unet")
    timed = live.total(after, "kolors_trt_lora_swap_seconds_count", component="unet") - \
        live.total(before, "kolors_trt_lora_swap_seconds_count", component="unet")
    assert 3 <= swaps <= 4 and timed == swaps
    assert live.total(after, "kolors_trt_lora_swaps_total", component="text_encoder") == 0  # UNet-only adapters
    with server.client() as http:
        listed = {i["id"]: i for i in http.get("/v1/loras").json()["data"]}
    assert listed["ink"]["loaded"] and len(listed["ink"]["sha256"]) == 64 and listed["ink"]["components"] == {
        "unet": pipe.lora.adapter("ink").info()["components"]["unet"]}


def test_multipart_edits_take_lora_as_a_json_string(server, pipe):
    ref = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(ref, "PNG")
    with server.client(timeout=120) as http:
        r = http.post("/v1/images/edits", files={"image": ("r.png", ref.getvalue(), "image/png")},
                      data={"prompt": "a red fox in the snow", "size": "96x64", "seed": "4", "num_inference_steps": "2",
                            "ip_adapter_scale": "0.5", "lora": json.dumps({"pixel": 0.5})})
    assert r.status_code == 200, r.text
    want = local(pipe, {"pixel": 0.5}, ip_adapter_image=ref.getvalue(), ip_adapter_scale=0.5)
    assert int(np.abs(decode(r.json()["data"][0]["b64_json"]) - want).max()) <= 1


@pytest.mark.parametrize("lora, match", [
    ({"nope": 1.0}, "unknown adapter 'nope'"),
    ({"other": 1.0}, "cannot place key"),  # a LoRA of another model in the folder
    ({"../ink": 1.0}, "should match pattern"),
    ({"ink": 11}, "less than or equal to 10"),
    ({"ink": True}, "valid number"),
    ({str(i): 1 for i in range(9)}, "at most 8"),
])
def test_bad_lora_fields_are_400s_and_change_nothing(server, pipe, lora, match):
    with server.client(timeout=120) as http:
        bad = http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "lora": lora})
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("lora"), bad.text
        assert match in bad.json()["error"]["message"]
        form = http.post("/v1/images/edits", files={"image": ("r.png", b"not read", "image/png")},
                         data={"prompt": "x", "lora": "{not json"})
        assert form.status_code == 400 and "lora: expected a JSON object" in form.json()["error"]["message"]
        ok = http.post("/v1/images/generations", json={"prompt": "a red fox in the snow", "size": "96x64", "seed": 4,
                                                       "num_inference_steps": 2, "lora": {"pixel": 0.5}})
    assert ok.status_code == 200
    assert int(np.abs(decode(ok.json()["data"][0]["b64_json"]) - local(pipe, {"pixel": 0.5})).max()) <= 1
