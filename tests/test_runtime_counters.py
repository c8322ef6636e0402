"""Work per request, proven with engine-run counters: encoders run once per new
prompt / reference image, model constants never re-run, the disk cache survives
a new Pipeline; import hygiene of the ONNX Runtime path."""

from __future__ import annotations

import io
import json
import os
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
    """The constants at load; DeepCache's shallow UNet is opened but runs only for deep_cache_interval > 1."""
    pipe = Pipeline.load(onnx_fp32)
    assert runs(pipe) == {"text_encoder": 1, "image_encoder": 1, "unet": 0, "vae_decoder": 0, "unet_shallow": 0}


def test_encoders_once_per_new_input(onnx_fp32, tmp_path):
    pipe = Pipeline.load(onnx_fp32, cache_dir=tmp_path / "ip")
    image = ref_image()
    r0 = runs(pipe)
    pipe.generate("a cat", image, **SMALL)
    r1 = runs(pipe)
    assert delta(r0, r1) == {"text_encoder": 1, "image_encoder": 1, "unet": 2, "vae_decoder": 0, "unet_shallow": 0}
    # same prompt, same picture re-encoded as PNG bytes with other metadata: no encoder runs
    pipe.generate("a cat", png_bytes(image, pnginfo=None, compress_level=1), **SMALL)
    r2 = runs(pipe)
    assert delta(r1, r2) == {"text_encoder": 0, "image_encoder": 0, "unet": 2, "vae_decoder": 0, "unet_shallow": 0}
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
    assert delta(r4, r5) == {"text_encoder": 0, "image_encoder": 1, "unet": 2, "vae_decoder": 1, "unet_shallow": 0}
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


def test_disk_cache_stays_within_its_bound_least_recently_used_first(onnx_fp32, tmp_path):
    """Pipelines sharing a bounded folder (two processes' worth, memory caches off): each write deletes the
    least recently used files (a disk hit counts as a use) until the folder fits; what is left still hits."""
    pipes = [Pipeline.load(onnx_fp32, cache_dir=tmp_path, ip_cache_items=0) for _ in range(2)]
    pixels = [pipes[0].pixel_values(ref_image(10 + i)) for i in range(4)]
    keys = [pipes[0].image_key(p) for p in pixels]
    pipes[0].encode_pixels(pixels[0])
    size = (tmp_path / f"{keys[0]}.npy").stat().st_size
    for pipe in pipes:
        pipe.ip_cache.max_bytes = 2 * size + size // 2  # room for two files
    for i, key in enumerate(keys[:2]):
        if i:
            pipes[i % 2].encode_pixels(pixels[i])
        os.utime(tmp_path / f"{key}.npy", ns=(10**9 * (i + 1),) * 2)  # a strict order of last use
    before = runs(pipes[1])
    pipes[1].encode_pixels(pixels[0])  # a disk hit: keys[0] becomes the most recently used
    assert delta(before, runs(pipes[1]))["image_encoder"] == 0
    pipes[0].encode_pixels(pixels[2])  # the third file: keys[1], least recently used, goes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.npy" for k in (keys[0], keys[2]))
    assert pipes[0].stats()["ip_cache"]["evictions"] == 1
    pipes[1].encode_pixels(pixels[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.npy" for k in (keys[2], keys[3]))
    before = runs(pipes[0])
    pipes[0].encode_pixels(pixels[1])  # evicted: computed again
    assert delta(before, runs(pipes[0]))["image_encoder"] == 1


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
