"""TensorRT / TensorRT-RTX backend on a GPU: engine folders built from the fp32 export must reproduce the ONNX
Runtime pipeline, request after request. Skipped without a GPU, and per target without its package; a
TensorRT-RTX test is skipped on a GPU that TensorRT-RTX does not build for (Hopper: SM90), and builds for
exactly this GPU's compute capability otherwise. `make gpu-check` runs these on a GPU host.

fp32 graphs, so the tolerance is tight; TF32 is allowed only in the VAE, which these compare past (latents).
A captured step graph must pick up each request's new state: the requests differ in prompt, seed, step
count, guidance and reference image, and a dynamic folder switches shapes and back (each captured shape
keeps its own execution context)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gpu

TARGETS = ("tensorrt", "tensorrt-rtx")
REQUESTS = [  # (prompt, seed, steps, guidance, image seed)
    ("a cat", 4, 3, 5.0, 0),
    ("一只可爱的小狗在奔跑", 11, 5, 7.5, 1),
    ("a cat", 4, 3, 5.0, 0),  # back to the first: no state may leak from the second
]


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8))


def _close(got, want):
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3


def build_args(target: str) -> dict:
    """build_engines arguments for ``target`` on this GPU, or skip: the target's package must be installed, and
    TensorRT-RTX must have this GPU's compute capability (its plans do not run on Hopper)."""
    import torch

    trt = pytest.importorskip({"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}[target])
    if target == "tensorrt":
        return {"target": target}
    major, minor = torch.cuda.get_device_capability()
    cc = f"SM{major}{minor}"
    if getattr(trt.ComputeCapability, cc, None) is None:
        pytest.skip(f"TensorRT-RTX {trt.__version__} builds no plan for this GPU ({cc})")
    return {"target": target, "compute_capabilities": [cc]}


# Session-scoped, so a test skips before the (session) export fixture is built.
@pytest.fixture(scope="session", params=TARGETS)
def target_args(request):
    return build_args(request.param)


@pytest.fixture(scope="session")
def rtx_args():
    return build_args("tensorrt-rtx")


STATIC = (1, 64, 96)


@pytest.fixture(scope="session")
def static_engines(target_args, onnx_fp32, tmp_path_factory):
    """One static engine folder per target for the session (TensorRT builds take seconds each)."""
    from kolors_trt.engines.builder import build_engines
    from kolors_trt.runtime.spec import Profile

    engines = tmp_path_factory.mktemp("gpu-static") / "engines"
    build_engines(onnx_fp32, engines, profile=Profile.static(*STATIC), **target_args)
    return engines


@pytest.fixture(scope="session")
def dynamic_engines(target_args, onnx_fp32, tmp_path_factory):
    from kolors_trt.engines.builder import build_engines
    from kolors_trt.runtime.spec import DimRange, Profile

    engines = tmp_path_factory.mktemp("gpu-dynamic") / "engines"
    build_engines(onnx_fp32, engines, profile=Profile(DimRange(1, 1, 2), DimRange(64, 64, 128), DimRange(64, 96, 128)),
                  **target_args)
    return engines


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_static_engines_match_onnxruntime_across_requests(static_engines, onnx_fp32, cuda_graph):
    from kolors_trt.runtime.pipeline import Pipeline

    ort, pipe = Pipeline.load(onnx_fp32), Pipeline.load(static_engines, cuda_graph=cuda_graph)
    for prompt, seed, steps, guidance, image in REQUESTS:
        args = dict(height=STATIC[1], width=STATIC[2], num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                    output_type="latent")
        _close(pipe.generate(prompt, _image(image), **args).latents,
               ort.generate(prompt, _image(image), **args).latents)
    memory = pipe.stats()["device_memory"]
    assert memory["weights"] > 0 and memory["activations"] >= 0 and memory["io_buffers"] > 0


@pytest.mark.parametrize("cuda_graph", [None, True])
def test_dynamic_engines_change_shape_batch_and_guidance(dynamic_engines, onnx_fp32, cuda_graph):
    from kolors_trt.runtime.pipeline import Pipeline

    ort, pipe = Pipeline.load(onnx_fp32), Pipeline.load(dynamic_engines, cuda_graph=cuda_graph)
    for h, w, n, guidance in [(64, 96, 1, 5.0), (128, 64, 2, 5.0), (64, 64, 1, 1.0), (64, 96, 1, 5.0)]:
        args = dict(height=h, width=w, num_inference_steps=3, guidance_scale=guidance, seed=h + w,
                    num_images_per_prompt=n, output_type="latent")
        _close(pipe.generate("a cat", _image(0), **args).latents, ort.generate("a cat", _image(0), **args).latents)


def test_rtx_runtime_cache_is_written_and_read_back(rtx_args, onnx_fp32, tmp_path):
    from kolors_trt.engines.builder import build_engines
    from kolors_trt.runtime.pipeline import Pipeline
    from kolors_trt.runtime.spec import Profile

    engines, cache = tmp_path / "engines", tmp_path / "rtx.cache"
    build_engines(onnx_fp32, engines, profile=Profile.static(*STATIC), **rtx_args)
    args = dict(height=STATIC[1], width=STATIC[2], num_inference_steps=2, seed=1, output_type="latent")
    first = Pipeline.load(engines, runtime_cache=cache).generate("a cat", _image(0), **args).latents
    assert cache.stat().st_size > 0
    second = Pipeline.load(engines, runtime_cache=cache).generate("a cat", _image(0), **args).latents
    np.testing.assert_array_equal(first, second)
