"""The GPU denoising loop's arithmetic (runtime/backend_trt.py `_Step`: CFG combine with
one guidance scale per row and Euler update in torch on the engine's buffers) against
the numpy loop that the ONNX Runtime backend runs and that matches diffusers. Runs on the CPU device of
the stand-in (tests/trt_standin): a fake UNet computes the same function in torch (on the preallocated
buffers, as TensorRT would) and in numpy. TensorRT itself is not involved (test_runtime_trt.py runs the
loop on the TensorRT stand-in)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kolors_trt.export.tiny import KOLORS_SCHEDULER  # noqa: E402
from kolors_trt.runtime.backend_trt import TrtEngine, _Step  # noqa: E402
from kolors_trt.runtime.backend_ort import OrtBackend  # noqa: E402
from kolors_trt.runtime.engine import Engine  # noqa: E402
from kolors_trt.runtime.scheduler import EulerDiscreteScheduler, SchedulerConfig  # noqa: E402
from kolors_trt.runtime.spec import DimRange, ModelDims, Profile, dim_values, engine_specs, shape_of  # noqa: E402

DIMS = ModelDims(text_hidden=8, cross_attention_dim=12)
SPEC = engine_specs(DIMS, Profile(DimRange(1, 1, 2), DimRange(64, 64, 128), DimRange(64, 96, 128)))["unet"]


def fake_eps(sample, t, ehs, text, ip, scale, xp):
    """A UNet stand-in that depends on every input, per batch row."""
    def per_row(a):
        return a.reshape(a.shape[0], -1).mean(1).reshape(-1, 1, 1, 1)

    return 0.5 * sample * (t / 1000.0) + 0.1 * per_row(ehs) - 0.2 * per_row(text) + scale * per_row(ip) \
        + 0.05 * xp.sin(sample)


class NumpyUNet(Engine):
    def _execute(self, feeds, values):
        f = feeds
        return {"noise_pred": fake_eps(f["sample"], f["timestep"][0], f["encoder_hidden_states"], f["text_embeds"],
                                       f["ip_tokens"], f["ip_scale"].reshape(-1, 1, 1, 1), np).astype(np.float32)}


class FakeContext:
    """An execution context that accepts every shape and address (the UNet below computes in torch)."""

    def set_input_shape(self, name, shape):
        return True

    def set_tensor_address(self, name, address):
        return True

    def is_stream_capturable(self, stream):
        return True


class TorchUNet(TrtEngine):
    """A stand-in for the UNet plan: TrtEngine's buffers, contexts and shape handling, with a torch function
    writing noise_pred in place of the engine launch (on the CPU device, or on a CUDA stream for the GPU test)."""

    def __init__(self, spec, device, cuda_graph=False):
        Engine.__init__(self, spec, Path("unet.plan"))
        self.device, self.engine, self.jit_cache = device, None, None
        self._make_context = lambda engine: FakeContext()
        largest = dim_values(spec, "max")
        self.buffers = {t.name: torch.zeros(shape_of(t, largest), device=device.current_device())
                        for t in spec.inputs + spec.outputs}
        self.stream = device.Stream()
        self._shapes, self._seen = {}, set()
        self.cuda_graph, self.graphs = cuda_graph, {}
        self.context = self.new_context()

    def enqueue(self, context=None):
        v = self.set_shapes(self._shapes[id(self.context if context is None else context)], context)
        v["noise_pred"].copy_(fake_eps(v["sample"], v["timestep"][0], v["encoder_hidden_states"], v["text_embeds"],
                                       v["ip_tokens"], v["ip_scale"].reshape(-1, 1, 1, 1), torch))


@pytest.mark.parametrize("guidance, steps, h, w, kind", [
    ([5.0], 4, 8, 12, "epsilon"), ([7.5, 2.0], 3, 16, 8, "epsilon"), ([1.0], 2, 8, 8, "epsilon"),
    ([0.5, 1.0], 2, 8, 16, "epsilon"), ([5.0, 3.0], 3, 8, 12, "v_prediction"), ([4.0], 2, 8, 8, "sample")])
def test_gpu_loop_math_equals_numpy_loop(guidance, steps, h, w, kind, trt_standin):
    n = len(guidance)
    rng = np.random.default_rng(n + steps)
    do_cfg = min(guidance) > 1
    guidance = np.array(guidance, np.float32)
    b = 2 * n if do_cfg else n
    cond = {
        "encoder_hidden_states": rng.standard_normal((b, 256, DIMS.text_hidden)).astype(np.float32),
        "text_embeds": rng.standard_normal((b, DIMS.text_hidden)).astype(np.float32),
        "time_ids": np.tile(np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]], np.float32), (b, 1)),
        "ip_tokens": rng.standard_normal((b, 16, DIMS.cross_attention_dim)).astype(np.float32),
        "ip_scale": np.resize(np.array([0.6, 0.0, 1.2], np.float32), b),
    }
    latents = rng.standard_normal((n, 4, h, w)).astype(np.float32) * np.float32(14.6)
    config = SchedulerConfig.from_dict({**KOLORS_SCHEDULER, "prediction_type": kind})
    scheduler = EulerDiscreteScheduler(config, steps)
    want = OrtBackend({"unet": NumpyUNet(SPEC, Path("unet.onnx"))}).denoise(latents, cond, scheduler, guidance, do_cfg)

    step = _Step(TorchUNet(SPEC, trt_standin.CpuDevice()), latents, cond, scheduler, guidance, do_cfg)
    for i in range(steps):
        step.load(i)
        step.body()
    got = step.x.numpy()
    assert not np.allclose(got, latents)  # the loop moved the latents
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def conditioning(rng, n, do_cfg, h, w):
    b = 2 * n if do_cfg else n
    return {
        "encoder_hidden_states": rng.standard_normal((b, 256, DIMS.text_hidden)).astype(np.float32),
        "text_embeds": rng.standard_normal((b, DIMS.text_hidden)).astype(np.float32),
        "time_ids": np.tile(np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]], np.float32), (b, 1)),
        "ip_tokens": rng.standard_normal((b, 16, DIMS.cross_attention_dim)).astype(np.float32),
        "ip_scale": np.resize(np.array([0.6, 0.0, 1.2], np.float32), b),
    }


def test_numpy_loop_drops_rows_and_keeps_the_others_exact():
    """on_step returning the rows to keep: the kept rows end exactly as in a loop without the dropped ones."""
    rng = np.random.default_rng(3)
    n, steps = 2, 4
    cond = conditioning(rng, n, True, 8, 8)
    latents = rng.standard_normal((n, 4, 8, 8)).astype(np.float32) * np.float32(14.6)
    guidance = np.array([5.0, 2.0], np.float32)
    scheduler = EulerDiscreteScheduler(SchedulerConfig.from_dict(KOLORS_SCHEDULER), steps)
    backend = OrtBackend({"unet": NumpyUNet(SPEC, Path("unet.onnx"))})
    got = backend.denoise(latents, cond, scheduler, guidance, True, lambda i, x: [1] if i == 1 else None)
    alone = backend.denoise(latents[[1]], {k: v[[1, 3]] for k, v in cond.items()}, scheduler, guidance[[1]], True)
    full = backend.denoise(latents, cond, scheduler, guidance, True)
    assert got.shape == (1, 4, 8, 8)
    np.testing.assert_allclose(got, alone, rtol=1e-6, atol=1e-6 * np.abs(alone).max())
    np.testing.assert_allclose(got, full[[1]], rtol=1e-6, atol=1e-6 * np.abs(alone).max())
    assert not np.allclose(full[0], full[1])
    assert backend.denoise(latents, cond, scheduler, guidance, True, lambda i, x: []).shape == (0, 4, 8, 8)
    assert backend.engines["unet"].runs == steps + steps + steps + 1


@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cuda_loop_and_graph_replay_equal_the_numpy_loop(cuda_graph, device, trt_standin):
    """denoise_torch (and its captured CUDA-graph step) with the torch stand-in UNet, on a GPU and on the CPU
    device, across requests that change batch, guidance and steps, and a request whose rows are dropped mid-loop."""
    from kolors_trt.runtime.backend_trt import denoise_torch

    unet = TorchUNet(SPEC, torch.cuda if device == "cuda" else trt_standin.CpuDevice(), cuda_graph=cuda_graph)
    reference = OrtBackend({"unet": NumpyUNet(SPEC, Path("unet.onnx"))})
    rng = np.random.default_rng(7)
    for guidance, steps, h, w, drop in [([5.0], 4, 8, 12, None), ([7.5, 2.0], 3, 16, 8, None), ([5.0], 6, 8, 12, None),
                                        ([1.0, 1.0], 2, 8, 8, None), ([7.5, 2.0], 4, 16, 8, (1, [1]))]:
        n, do_cfg = len(guidance), min(guidance) > 1
        guidance = np.array(guidance, np.float32)
        cond = conditioning(rng, n, do_cfg, h, w)
        latents = rng.standard_normal((n, 4, h, w)).astype(np.float32) * np.float32(14.6)
        scheduler = EulerDiscreteScheduler(SchedulerConfig.from_dict(KOLORS_SCHEDULER), steps)
        keep = None if drop is None else (lambda i, x, at=drop[0], rows=drop[1]: rows if i == at else None)
        want = reference.denoise(latents, cond, scheduler, guidance, do_cfg, keep)
        got = denoise_torch(unet, latents, cond, scheduler, guidance, do_cfg, keep)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if cuda_graph:
        assert unet.graphs  # steps were captured and replayed
