"""ONNX Runtime backend: the export folder's graphs, and the denoising loop on the host in numpy.

Imports no torch: a production host that runs export folders needs numpy,
onnxruntime and PIL only.

LoRA (``use_weights``): ONNX Runtime cannot change an initializer of an open session,
so a weight set is a session of its own, opened from the same graph with the fused
initializers handed over by ``SessionOptions.add_initializer`` (ONNX Runtime uses the
caller's buffers for those). The base session stays open; the ``fused_sessions`` most
recently used fused sessions are kept (an LRU), so switching back to a recent set costs
nothing. Memory: each kept session holds its own copy of the component's weights (the
fp16 UNet 5.2 GB, the fp16 ChatGLM 12.5 GB at Kolors' sizes), so the default keeps 2 per
component; set ``fused_sessions`` to 0 to keep none (each switch then opens a session).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable, Mapping, Optional

import numpy as np

from .deep_cache import pad_rows, split_step
from .engine import (Backend, DenoiseBatch, Engine, FusedWeights, StepCallback, conditioning_rows, guidance_column,
                     step_rows)
from .folder import BackendError, FolderError, ModelFolder
from .samplers import SamplerTables, sampler_step
from .spec import ALL_COMPONENTS, SHALLOW_UNET, EngineSpec

logger = logging.getLogger(__name__)

FUSED_SESSIONS = 2  # fused LoRA weight sets kept open per component, besides the base session
# Two ORT_ENABLE_ALL transformers of the CPU provider build their tensors from the graph's own initializer and
# ignore add_initializer's value (onnxruntime 1.32, measured: zeroing an overridden weight changes nothing):
# the NCHWc layout transformer (Conv weights) and the fp16-to-fp32 initializer fusion (fp16 graphs on a CPU).
# Sessions with replaced initializers run without these two; tests/test_lora.py proves fp32 convs and fp16
# graphs against diffusers.
IGNORE_USER_INITIALIZERS = ("NchwcTransformer", "FuseFp16InitializerToFp32NodeTransformer")


class OrtEngine(Engine):
    """An ONNX graph on ONNX Runtime (CUDA when onnxruntime-gpu offers it, else CPU)."""

    def __init__(self, spec: EngineSpec, path: Path, providers: Optional[list] = None):
        super().__init__(spec, path)
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.providers = providers
        self._base = self._open({})  # (session, the buffers it reads)
        self.session, self._buffers = self._base
        self._fused: OrderedDict = OrderedDict()  # weights key -> session with those initializers (LRU)
        self.fused_sessions = FUSED_SESSIONS
        self._check_inputs(path)
        logger.debug("%s: %s on %s", spec.name, path.name, self.session.get_providers())

    def _open(self, initializers: Mapping[str, np.ndarray]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
        kept = []
        for name, array in initializers.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            options.add_initializer(name, value)
            kept.append(value)
        disabled = list(IGNORE_USER_INITIALIZERS) if initializers else None
        try:
            session = ort.InferenceSession(str(self.source), sess_options=options, providers=self.providers,
                                           disabled_optimizers=disabled)
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"{self.name}: ONNX Runtime cannot load {self.source} ({err}); re-run kolors-trt "
                               "export") from err
        return session, kept  # the session reads `kept`: they live as long as it does

    def use_weights(self, key: Optional[Hashable], fused: FusedWeights) -> None:
        if key == self.weights_key:
            return
        if key is None:
            opened = self._base
        elif key in self._fused:
            opened = self._fused[key]
            self._fused.move_to_end(key)
        else:
            opened = self._open(fused(None))  # every fused session starts from the graph's own weights
            if self.fused_sessions > 0:
                self._fused[key] = opened
                while len(self._fused) > self.fused_sessions:
                    self._fused.popitem(last=False)
        (self.session, self._buffers), self.weights_key = opened, key

    def drop_weights(self, unused: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self._fused if unused(k)]:
            del self._fused[key]

    def _check_inputs(self, path: Path) -> None:
        """The graph's inputs have the spec's names and ranks, and a fixed size where the spec has a named
        (dynamic) dim is a graph from an older contract (e.g. ip_scale [1] before it became per row)."""
        graph = {i.name: i.shape for i in self.session.get_inputs()}
        if set(graph) != set(self.spec.input_names):
            raise FolderError(f"{self.name}: {path.name} has inputs {sorted(graph)}, the spec expects "
                              f"{sorted(self.spec.input_names)}; re-export with this kolors-trt")
        for t in self.spec.inputs:
            shape = graph[t.name]
            stale = len(shape) != len(t.shape) or any(
                isinstance(want, str) and isinstance(got, int) for want, got in zip(t.shape, shape))
            if stale:
                raise FolderError(f"{self.name}: {path.name} input {t.name!r} has shape {shape}, the spec expects "
                                  f"{list(t.shape)}; the graph is from an older kolors-trt: re-export")

    def _execute(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, int]) -> dict[str, np.ndarray]:
        names = self.spec.output_names
        try:
            outputs = self.session.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except Exception as err:  # onnxruntime's own types: RuntimeException on allocation failures, Fail, ...
            shape = "x".join(str(v) for v in values.values())
            raise BackendError(f"{self.name}: ONNX Runtime failed at dims {dict(values)} ({type(err).__name__}: "
                               f"{str(err)[:300]}); out of memory is the usual cause at large sizes ({shape}): use a "
                               "smaller size or batch") from err
        return dict(zip(names, outputs))


class OrtBackend(Backend):
    """ONNX Runtime: engines from an export folder, the loop in numpy (float32, diffusers' operation order)."""

    name = "onnxruntime"

    @classmethod
    def open(cls, folder: ModelFolder) -> "OrtBackend":
        specs = folder.specs
        return cls({name: OrtEngine(specs[name], folder.files[name]) for name in ALL_COMPONENTS if name in folder.files})

    def denoise(self, batch: DenoiseBatch, sampler: SamplerTables, on_step: Optional[StepCallback] = None) -> np.ndarray:
        unet = self.engines["unet"]
        fewest = unet.spec.dims["unet_batch"].min
        x = batch.latents
        previous = [np.zeros_like(x)] * max(sampler.history - 1, 0)  # the last data predictions, newest first
        base = x  # UniPC's corrected sample of the previous step
        cache = _FeatureCache(self.engines, batch)
        for i, t in enumerate(sampler.timesteps):
            k = sampler.at(i)
            guided, rows = step_rows(batch.cfg[i], fewest)
            sample = np.concatenate([x[guided], x]) / k.divisor  # [rows, C, h, w]: the guided uncond rows, then cond
            if batch.full is not None:
                noise = cache.step(sample, t, rows, batch, batch.full[i])
            else:
                if len(rows) > len(sample):
                    sample = np.concatenate([sample, np.repeat(sample[-1:], len(rows) - len(sample), axis=0)])
                feeds = {"sample": sample, "timestep": np.array([t], dtype=np.float32),
                         **{name: value[rows] for name, value in batch.conditioning.items()}}
                noise = unet.run(feeds, finite=False)["noise_pred"]  # rows of several requests: checked per request
            uncond, model_output = noise[: len(guided)], noise[len(guided): len(guided) + len(x)]
            if len(guided):
                g = guidance_column(batch.guidance[guided])
                combined = uncond + g * (model_output[guided] - uncond)
                model_output = combined if len(guided) == len(x) else _put(model_output, guided, combined)
            x, y, base = sampler_step(k, x, model_output, previous, base, None if batch.noise is None else batch.noise[i])
            previous = [y, *previous][: len(previous)]
            keep = on_step(i, lambda: x) if on_step is not None else None
            if keep is not None:
                keep = list(keep)
                if not keep:
                    return x[:0]
                x, base = x[keep], base[keep]
                previous = [p[keep] for p in previous]
                cache.keep(keep, batch.n)
                batch = batch.keep(keep, x)
        return x


class _FeatureCache:
    """DeepCache on the host: the deep feature of each conditioning row's last full step, and a step's UNet
    rows run on the graph ``DenoiseBatch.full`` names for each (deep_cache.py)."""

    def __init__(self, engines: Mapping[str, Engine], batch: DenoiseBatch):
        self.unet, self.shallow = engines["unet"], engines.get(SHALLOW_UNET)
        self.features: Optional[np.ndarray] = None  # [2n, F, h', w'], filled by full steps

    def step(self, sample: np.ndarray, t, rows: np.ndarray, batch: DenoiseBatch, full_step: np.ndarray) -> np.ndarray:
        """The noise of the step's unpadded UNet rows (``sample`` [count, ...], ``rows`` its conditioning rows)."""
        count = len(sample)
        on_full, on_shallow = split_step(rows, count, full_step)
        noise = np.empty_like(sample)
        timestep = np.array([t], dtype=np.float32)
        if len(on_full):
            picks = pad_rows(on_full, self.unet.spec.dims["unet_batch"].min)
            feeds = {"sample": sample[picks], "timestep": timestep,
                     **{name: value[rows[picks]] for name, value in batch.conditioning.items()}}
            out = self.unet.run(feeds, finite=False)
            if self.features is None:
                self.features = np.zeros((2 * batch.n, *out["deep_feature"].shape[1:]), np.float32)
            noise[on_full] = out["noise_pred"][: len(on_full)]
            self.features[rows[on_full]] = out["deep_feature"][: len(on_full)]
        if len(on_shallow):
            if self.shallow is None or self.features is None:
                raise BackendError(f"{SHALLOW_UNET}: a shallow step without the graph or a full step before it; "
                                   "the DeepCache mask is wrong (deep_cache.full_mask)")
            picks = pad_rows(on_shallow, self.shallow.spec.dims["unet_batch"].min)
            names = self.shallow.spec.input_names
            feeds = {"sample": sample[picks], "timestep": timestep, "deep_feature": self.features[rows[picks]],
                     **{name: value[rows[picks]] for name, value in batch.conditioning.items() if name in names}}
            noise[on_shallow] = self.shallow.run(feeds, finite=False)["noise_pred"][: len(on_shallow)]
        return noise

    def keep(self, keep: list, n: int) -> None:
        if self.features is not None:
            self.features = self.features[conditioning_rows(keep, n)]


def _put(values: np.ndarray, rows: np.ndarray, new: np.ndarray) -> np.ndarray:
    out = values.copy()
    out[rows] = new
    return out


__all__ = ["OrtBackend", "OrtEngine"]
