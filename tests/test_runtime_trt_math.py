"""The device loop's arithmetic (runtime/trt_loop.py: per-step gathers of the UNet rows, per-row CFG under
guidance intervals, every sampler's step from its tables, the history, captured CUDA graphs) against the
numpy loop that the ONNX Runtime backend runs and that matches diffusers (tests/test_samplers.py). Runs on
the CPU device of the stand-in (tests/trt_standin), and on CUDA where there is a GPU: a fake UNet computes
the same function in torch (on the engine's buffers, as TensorRT would) and in numpy. TensorRT itself is
not involved (test_runtime_trt.py runs the loop on the TensorRT stand-in)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kolors_trt.export.tiny import KOLORS_SCHEDULER  # noqa: E402
from kolors_trt.runtime.backend_ort import OrtBackend  # noqa: E402
from kolors_trt.runtime.backend_trt import TrtEngine  # noqa: E402
from kolors_trt.runtime.deep_cache import full_mask  # noqa: E402
from kolors_trt.runtime.engine import DenoiseBatch, Engine  # noqa: E402
from kolors_trt.runtime.noise import torch_randn_draws  # noqa: E402
from kolors_trt.runtime.samplers import SAMPLERS, sampler_tables  # noqa: E402
from kolors_trt.runtime.scheduler import SchedulerConfig  # noqa: E402
from kolors_trt.runtime.spec import DimRange, ModelDims, Profile, dim_values, engine_specs, shape_of  # noqa: E402
from kolors_trt.runtime.trt_loop import denoise_device  # noqa: E402

DIMS = ModelDims(text_hidden=8, cross_attention_dim=12)
SPEC = engine_specs(DIMS, Profile(DimRange(1, 1, 2), DimRange(64, 64, 128), DimRange(64, 96, 128)))["unet"]
STATIC_SPEC = engine_specs(DIMS, Profile.static(2, 64, 96))["unet"]  # UNet batch exactly 4
THREE_SPEC = engine_specs(DIMS, Profile(DimRange(1, 1, 3), DimRange(64, 64, 128), DimRange(64, 96, 128)))["unet"]


def per_row(a):
    return a.reshape(a.shape[0], -1).mean(1).reshape(-1, 1, 1, 1)


def fake_eps(sample, t, ehs, text, ip, scale, xp):
    """A UNet stand-in that depends on every input, per batch row."""
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


def loop_inputs(rng, sampler, guidance, interval_steps, h, w, seed=5):
    """A DenoiseBatch of len(guidance) images: conditioning [uncond rows, cond rows]; image k guided at the steps
    ``interval_steps[k]`` (None: every step) when its guidance is > 1; the sampler's noise from ``seed``."""
    n = len(guidance)
    cond = {
        "encoder_hidden_states": rng.standard_normal((2 * n, 256, DIMS.text_hidden)).astype(np.float32),
        "text_embeds": rng.standard_normal((2 * n, DIMS.text_hidden)).astype(np.float32),
        "time_ids": np.tile(np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]], np.float32), (2 * n, 1)),
        "ip_tokens": rng.standard_normal((2 * n, 16, DIMS.cross_attention_dim)).astype(np.float32),
        "ip_scale": np.resize(np.array([0.6, 0.0, 1.2], np.float32), 2 * n),
    }
    cfg = np.zeros((sampler.steps, n), bool)
    for k, (g, where) in enumerate(zip(guidance, interval_steps)):
        if g > 1:
            cfg[:, k] = True if where is None else np.isin(np.arange(sampler.steps), where)
    latents = rng.standard_normal((n, 4, h, w)).astype(np.float32) * sampler.init_noise_sigma
    noise = torch_randn_draws((n, 4, h, w), seed, sampler.steps) if sampler.stochastic else None  # [steps, n, ...]
    return DenoiseBatch(latents, cond, np.array(guidance, np.float32), cfg, noise)


def tables(name: str, steps: int, **override):
    return sampler_tables(SchedulerConfig.from_dict({**KOLORS_SCHEDULER, **override}), name, steps)


def reference_loop(batch, sampler, keep=None, spec=SPEC):
    return OrtBackend({"unet": NumpyUNet(spec, Path("unet.onnx"))}).denoise(batch, sampler, keep)


CASES = [  # guidance per image, steps each image is guided at (None: all), size
    ([5.0], [None], 8, 12),
    ([7.5, 2.0], [None, [0, 2]], 16, 8),  # mixed intervals: the UNet batch is 4, 3, 4, 3 rows
    ([1.0, 6.0], [None, [1, 2, 3]], 8, 8),  # one image never guided
    ([1.0], [None], 8, 16),
]


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_device_loop_equals_the_numpy_loop_for_every_sampler(name, cuda_graph, trt_standin):
    unet = TorchUNet(SPEC, trt_standin.CpuDevice(), cuda_graph=cuda_graph)
    rng = np.random.default_rng(len(name))
    for guidance, where, h, w in CASES:
        sampler = tables(name, 4)
        batch = loop_inputs(rng, sampler, guidance, where, h, w)
        want = reference_loop(batch, sampler)
        rows = unet.rows
        got = denoise_device(unet, batch, sampler)
        assert unet.rows - rows == int(batch.cfg.sum()) + batch.n * sampler.steps  # one row per guided image more
        assert not np.allclose(got, batch.latents)  # the loop moved the latents
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    if cuda_graph:  # one loop state per (image rows, size), one graph per UNet batch size of each
        sizes = {key: sorted(rows for rows, shallow, _ in loop.graphs) for key, loop in unet.graphs.items()}
        assert sorted(map(tuple, sizes.values())) == [(1,), (2,), (2, 3), (3, 4)]
        assert all(shallow == 0 for loop in unet.graphs.values() for _, shallow, _ in loop.graphs)  # no DeepCache


@pytest.mark.parametrize("name, override", [("unipc", {}), ("euler_a", {}), ("dpmpp_2m_karras", {}),
                                            ("euler", {"prediction_type": "v_prediction"})])
def test_rows_dropped_mid_loop_keep_their_history_and_noise(name, override, trt_standin):
    """on_step keeping one image: the survivor's history (UniPC's corrected sample, the last data predictions)
    and its noise rows carry over the restart, so it ends as in the numpy loop."""
    sampler = tables(name, 5, **override)
    batch = loop_inputs(np.random.default_rng(3), sampler, [5.0, 3.0, 6.0], [None, [0, 1], [3, 4]], 8, 12)
    keep = lambda i, x: [0, 2] if i == 1 else ([1] if i == 3 else None)  # noqa: E731
    want = reference_loop(batch, sampler, keep, THREE_SPEC)
    for cuda_graph in (False, True):
        got = denoise_device(TorchUNet(THREE_SPEC, trt_standin.CpuDevice(), cuda_graph), batch, sampler, keep)
        assert got.shape == (1, 4, 8, 12)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    stopped = denoise_device(TorchUNet(THREE_SPEC, trt_standin.CpuDevice()), batch, sampler, lambda i, x: [])
    assert stopped.shape == (0, 4, 8, 12)


def test_a_static_profile_pads_every_step_and_replays_one_graph(trt_standin):
    """UNet batch fixed at 4: one image guided at 2 of 4 steps is padded to 4 rows at every step."""
    device = trt_standin.CpuDevice()
    unet = TorchUNet(STATIC_SPEC, device, cuda_graph=True)
    sampler = tables("dpmpp_2m", 4)
    batch = loop_inputs(np.random.default_rng(9), sampler, [5.0], [[1, 2]], 8, 12)
    want = reference_loop(batch, sampler, spec=STATIC_SPEC)
    got = denoise_device(unet, batch, sampler)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    assert unet.rows == 4 * 4 and [g.replays for g in device.graphs] == [4]


class HostReads(TorchDispatchMode):
    """Counts the operations that read a device value on the host (.item(), bool(tensor), .tolist())."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_step_reads_the_device_on_the_host(trt_standin, monkeypatch):
    """Each step is device-to-device copies and launches: no host read of a device value; the latents come back
    once, at the end."""
    import kolors_trt.runtime.trt_loop as trt_loop

    copies = []
    monkeypatch.setattr(trt_loop, "host_copy", lambda t: copies.append(t) or t.detach().clone().numpy())
    sampler = tables("unipc", 6)
    batch = loop_inputs(np.random.default_rng(2), sampler, [5.0, 7.0], [None, [2, 3]], 8, 12)
    with HostReads() as reads:
        denoise_device(TorchUNet(SPEC, trt_standin.CpuDevice()), batch, sampler)
    assert reads.count == 0 and len(copies) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_loop_and_graph_replay_equal_the_numpy_loop(cuda_graph):
    """On a GPU: the loop and its captured CUDA graphs with the torch stand-in UNet, every sampler, mixed
    intervals and a row drop."""
    unet = TorchUNet(SPEC, torch.cuda, cuda_graph=cuda_graph)
    rng = np.random.default_rng(7)
    for name in SAMPLERS:
        sampler = tables(name, 4)
        for guidance, where, h, w in CASES:
            batch = loop_inputs(rng, sampler, guidance, where, h, w)
            keep = (lambda i, x: [0] if i == 1 else None) if len(guidance) > 1 else None
            want = reference_loop(batch, sampler, keep)
            got = denoise_device(unet, batch, sampler, keep)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---- DeepCache: the full UNet also outputs a deep feature, the shallow one takes it ----

DEEP_DIMS = ModelDims(text_hidden=8, cross_attention_dim=12, deep_cache_branch=0, deep_feature_channels=3)
DEEP = engine_specs(DEEP_DIMS, Profile(DimRange(1, 1, 3), DimRange(64, 64, 128), DimRange(64, 96, 128)))
DEEP_STATIC = engine_specs(DEEP_DIMS, Profile.static(2, 64, 96))


def fake_feature(sample, t, text, xp):
    return xp.tanh(sample[:, :3] * (1 + t / 1000.0)) + 0.1 * per_row(text)


def fake_shallow(sample, t, text, feature, xp):
    """Depends on its row's cached feature (a shallow step fed another row's feature would differ)."""
    return 0.3 * sample * (t / 1000.0) + 0.5 * feature.sum(1)[:, None] / 3 - 0.1 * per_row(text) + 0.05 * xp.cos(sample)


class NumpyFullUNet(NumpyUNet):
    def _execute(self, feeds, values):
        f = feeds
        out = super()._execute(feeds, values)
        return {**out, "deep_feature": fake_feature(f["sample"], f["timestep"][0], f["text_embeds"], np).astype(np.float32)}


class NumpyShallowUNet(Engine):
    def _execute(self, feeds, values):
        f = feeds
        return {"noise_pred": fake_shallow(f["sample"], f["timestep"][0], f["text_embeds"], f["deep_feature"],
                                           np).astype(np.float32)}


class TorchFullUNet(TorchUNet):
    def enqueue(self, context=None):
        super().enqueue(context)
        v = self.set_shapes(self._shapes[id(self.context if context is None else context)], context)
        v["deep_feature"].copy_(fake_feature(v["sample"], v["timestep"][0], v["text_embeds"], torch))


class TorchShallowUNet(TorchUNet):
    def enqueue(self, context=None):
        v = self.set_shapes(self._shapes[id(self.context if context is None else context)], context)
        v["noise_pred"].copy_(fake_shallow(v["sample"], v["timestep"][0], v["text_embeds"], v["deep_feature"], torch))


def deep_reference(batch, sampler, keep=None, specs=DEEP):
    engines = {"unet": NumpyFullUNet(specs["unet"], Path("unet.onnx")),
               "unet_shallow": NumpyShallowUNet(specs["unet_shallow"], Path("unet_shallow.onnx"))}
    return OrtBackend(engines).denoise(batch, sampler, keep), engines


def deep_batch(rng, sampler, guidance, where, intervals, h=8, w=12):
    batch = loop_inputs(rng, sampler, guidance, where, h, w)
    return replace(batch, full=full_mask(batch.cfg, intervals))


@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("name", ["euler_a", "unipc"])
def test_deep_cache_on_the_device_equals_the_numpy_loop(name, cuda_graph, trt_standin):
    """Three images at DeepCache intervals 2, 3 and 1, two guided on part of the steps (their uncond rows start
    their cycle late): steps split between the graphs; then a row drop mid loop keeps the survivors' features."""
    device = trt_standin.CpuDevice()
    unet, shallow = (cls(DEEP[n], device, cuda_graph) for cls, n in ((TorchFullUNet, "unet"),
                                                                     (TorchShallowUNet, "unet_shallow")))
    sampler = tables(name, 6)
    batch = deep_batch(np.random.default_rng(4), sampler, [5.0, 3.0, 6.0], [None, [1, 2, 3, 4], [3, 4, 5]], [2, 3, 1])
    for keep in (None, lambda i, x: [0, 2] if i == 2 else None):
        want, engines = deep_reference(batch, sampler, keep)
        rows = (unet.rows, shallow.rows)
        got = denoise_device(unet, batch, sampler, keep, shallow)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
        assert (unet.rows - rows[0], shallow.rows - rows[1]) == (engines["unet"].rows, engines["unet_shallow"].rows)
        assert engines["unet_shallow"].rows > 0
        every = got if keep is None else every
    plain = denoise_device(TorchUNet(DEEP["unet"], device), replace(batch, full=None), sampler)
    assert np.abs(plain - every).max() > 1e-3  # the shallow steps changed the result


def test_deep_cache_static_profile_pads_each_graph(trt_standin):
    """UNet batch fixed at 4: each graph's call pads to 4 rows; one graph per step key, replayed."""
    device = trt_standin.CpuDevice()
    unet, shallow = TorchFullUNet(DEEP_STATIC["unet"], device, True), TorchShallowUNet(DEEP_STATIC["unet_shallow"],
                                                                                        device, True)
    sampler = tables("dpmpp_2m", 5)
    batch = deep_batch(np.random.default_rng(8), sampler, [5.0], [[1, 2, 3]], [2])
    want, engines = deep_reference(batch, sampler, specs=DEEP_STATIC)
    got = denoise_device(unet, batch, sampler, None, shallow)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # uncond at steps 1-3, full at 1, 3; cond full at 0, 2, 4: a full call at every step, a shallow one at 1-3
    assert (unet.rows, shallow.rows) == (5 * 4, 3 * 4) == (engines["unet"].rows, engines["unet_shallow"].rows)
    assert sorted(g.replays for g in device.graphs) == [2, 3]  # steps 0, 4 (full only); 1-3 (both graphs)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_deep_cache_loop_equals_the_numpy_loop(cuda_graph):
    """On a GPU: DeepCache's two graphs, the feature cache on the device, captured CUDA graphs, a row drop."""
    unet, shallow = TorchFullUNet(DEEP["unet"], torch.cuda, cuda_graph), TorchShallowUNet(DEEP["unet_shallow"],
                                                                                           torch.cuda, cuda_graph)
    for name in SAMPLERS:
        sampler = tables(name, 6)
        batch = deep_batch(np.random.default_rng(5), sampler, [5.0, 3.0], [None, [2, 3, 4]], [3, 2])
        keep = lambda i, x: [1] if i == 3 else None  # noqa: E731
        want, _ = deep_reference(batch, sampler, keep)
        got = denoise_device(unet, batch, sampler, keep, shallow)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
