"""Work per request, proven with engine-run counters: encoders run once per new
prompt / reference image, model constants never re-run, the disk cache survives
a new Pipeline; import hygiene of the ONNX Runtime path."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from kolors_trt.runtime.pipeline import Pipeline

SMALL = dict(height=64, width=64, num_inference_steps=2, seed=1, output_type="latent")


def ref_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), "RGB")


def png_bytes(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def runs(pipe: Pipeline) -> dict:
    return dict(pipe.stats()["engine_runs"])


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_constants_run_once_at_load(onnx_fp32):
    pipe = Pipeline.load(onnx_fp32)
    assert runs(pipe) == {"text_encoder": 1, "image_encoder": 1, "unet": 0, "vae_decoder": 0}


def test_encoders_once_per_new_input(onnx_fp32, tmp_path):
    pipe = Pipeline.load(onnx_fp32, cache_dir=tmp_path / "ip")
    image = ref_image()
    r0 = runs(pipe)
    pipe.generate("a cat", image, **SMALL)
    r1 = runs(pipe)
    assert delta(r0, r1) == {"text_encoder": 1, "image_encoder": 1, "unet": 2, "vae_decoder": 0}
    # same prompt, same picture re-encoded as PNG bytes with other metadata: no encoder runs
    pipe.generate("a cat", png_bytes(image, pnginfo=None, compress_level=1), **SMALL)
    r2 = runs(pipe)
    assert delta(r1, r2) == {"text_encoder": 0, "image_encoder": 0, "unet": 2, "vae_decoder": 0}
    # the empty negative prompt (default or explicit "") is a constant: never re-encoded
    pipe.generate("a dog", image, negative_prompt="", **SMALL)
    r3 = runs(pipe)
    assert delta(r2, r3)["text_encoder"] == 1 and delta(r2, r3)["image_encoder"] == 0
    # a non-empty negative is cached like any prompt
    pipe.generate("a dog", image, negative_prompt="blurry", **SMALL)
    pipe.generate("a dog", image, negative_prompt="blurry", **SMALL)
    r4 = runs(pipe)
    assert delta(r3, r4)["text_encoder"] == 1
    # a new reference image runs the image encoder once
    pipe.generate("a dog", ref_image(1), **dict(SMALL, output_type="pil"))
    r5 = runs(pipe)
    assert delta(r4, r5) == {"text_encoder": 0, "image_encoder": 1, "unet": 2, "vae_decoder": 1}
    stats = pipe.stats()
    assert stats["ip_cache"]["misses"] == 2 and stats["ip_cache"]["hits"] == 4
    assert sorted(p.suffix for p in (tmp_path / "ip").iterdir()) == [".npy", ".npy"]


def test_disk_cache_survives_restart(onnx_fp32, tmp_path):
    image = ref_image(2)
    first = Pipeline.load(onnx_fp32, cache_dir=tmp_path)
    tokens = first.encode_image(image)
    second = Pipeline.load(onnx_fp32, cache_dir=tmp_path)
    before = runs(second)
    again = second.encode_image(image)
    assert delta(before, runs(second))["image_encoder"] == 0
    assert second.stats()["ip_cache"]["disk_hits"] == 1
    np.testing.assert_array_equal(tokens, again)


def test_damaged_cache_file_is_recomputed(onnx_fp32, tmp_path):
    image = ref_image(3)
    Pipeline.load(onnx_fp32, cache_dir=tmp_path).encode_image(image)
    (file,) = tmp_path.iterdir()
    file.write_bytes(b"not an npy file")
    pipe = Pipeline.load(onnx_fp32, cache_dir=tmp_path)
    before = runs(pipe)
    pipe.encode_image(image)
    assert delta(before, runs(pipe))["image_encoder"] == 1
    np.load(file, allow_pickle=False)  # rewritten


HYGIENE = r"""
import json, sys
import numpy as np
from PIL import Image
import kolors_trt.runtime.pipeline as P
pipe = P.Pipeline.load(sys.argv[1])
img = Image.fromarray(np.zeros((30, 30, 3), np.uint8))
pipe(prompt="x", ip_adapter_image=img, height=64, width=64, num_inference_steps=1, seed=0)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "onnx", "torch")
             or m.startswith(("kolors_trt.export", "kolors_trt.engines")))
print(json.dumps(bad))
"""


def test_runtime_imports_no_export_stack(onnx_fp32):
    out = subprocess.run([sys.executable, "-c", HYGIENE, str(onnx_fp32)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
