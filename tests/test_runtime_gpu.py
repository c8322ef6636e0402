"""TensorRT / TensorRT-RTX backend on a GPU: the engine folder built from the fp32
export must reproduce the ONNX Runtime pipeline. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trt_matches_onnxruntime(onnx_fp32, tmp_path, cuda_graph):
    from kolors_trt.engines.builder import build_engines
    from kolors_trt.runtime.pipeline import Pipeline
    from kolors_trt.runtime.spec import Profile

    engines = tmp_path / "engines"
    build_engines(onnx_fp32, engines, profile=Profile.static(1, 64, 96))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    args = dict(height=64, width=96, num_inference_steps=3, seed=4, output_type="latent")
    want = Pipeline.load(onnx_fp32).generate("a cat", image, **args).latents
    pipe = Pipeline.load(engines, cuda_graph=cuda_graph)
    for _ in range(2):  # the second request replays the captured graph
        got = pipe.generate("a cat", image, **args).latents
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-2
