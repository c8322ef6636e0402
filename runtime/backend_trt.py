"""TensorRT / TensorRT-RTX engines and the on-device denoising loop.

Written to the TensorRT 10/11 Python API, which TensorRT-RTX keeps:
``trt.Runtime(logger).deserialize_cuda_engine(plan)``, ``engine.create_execution_context(...)``,
``context.set_input_shape``, ``context.set_tensor_address``, ``context.execute_async_v3(stream)``.
Opening the plans and the GPU memory plan (one shared activation allocation, contexts with
user-managed memory, RTX's kernel cache) are in trt_plans.py.

Every CUDA call goes through one *device* object (device.py): ``torch.cuda`` in production; the
tests hand the same code a CPU device and a TensorRT stand-in backed by ONNX Runtime
(tests/trt_standin), so this module runs in CI as it runs on a GPU.

- Buffers are preallocated from the spec at the profile's max shapes; a run at a smaller shape uses a
  contiguous prefix of each buffer, so tensor addresses are set once per context, at its creation.
- One stream for everything. The denoising loop (trt_loop.py: UNet, per-row CFG under each row's
  guidance interval, every sampler's step from its coefficient tables) stays on the device with no
  host sync. It copies latents to the host only when ``on_step`` asks for them, and when rows are
  dropped (a cancelled request), which is rare.
- With ``cuda_graph`` one step is captured as a CUDA graph per (loop shape, UNet batch) and
  replayed; the step's values are copied into fixed slots before each replay. Each captured shape
  keeps an execution context of its own, whose input shapes never change after capture: TensorRT
  keeps a launch's shape state in the context, so a graph replayed on a context that has since run
  another shape would compute with the wrong shapes. (The other way out, graphs on static profiles
  only, would take graphs from dynamic engine folders for nothing: a context costs no activation
  memory here.) Default: on when the engine profile is static.
- LoRA (``use_weights``): plans built with ``kolors-trt build --refit`` are refitted in place with
  ``trt.Refitter`` (``set_named_weights`` by the ONNX initializer names the LoRA map records, then
  ``refit_cuda_engine``), after the stream's work is done; the weights set are the new adapter set's
  fused weights plus the base weights of whatever the previous set changed, so every refit starts from
  the base. Captured step graphs are dropped after a refit and captured again on their next use
  (TensorRT does not promise that a refit keeps the weight memory a captured graph reads).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .device import cuda_device, host_copy
from .engine import UNKNOWN_WEIGHTS, Backend, DenoiseBatch, Engine, FusedWeights, StepCallback, WeightSwapError
from .folder import BackendError, ModelFolder
from .samplers import SamplerTables
from .spec import ALL_COMPONENTS, SHALLOW_UNET, EngineSpec, dim_values, shape_of
from .trt_logger import trt_logger
from .trt_loop import denoise_device
from .trt_plans import DeviceMemory, RuntimeCacheFile, check_host, new_context, read_plan, weight_bytes

logger = logging.getLogger(__name__)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "int64": torch.int64}[name]


class TrtEngine(Engine):
    """One plan, its execution contexts and its preallocated device buffers."""

    def __init__(self, spec: EngineSpec, source: Path, engine, make_context, device, stream,
                 cuda_graph: bool = False, jit_cache: Optional[RuntimeCacheFile] = None, weight_bytes: int = 0,
                 trt=None):
        super().__init__(spec, source)
        import torch

        self.engine, self.device, self.stream, self._trt = engine, device, stream, trt
        self.weight_bytes, self.activation_bytes = weight_bytes, int(engine.device_memory_size_v2)
        self._make_context = make_context  # engine -> a context on the shared activation memory
        self.jit_cache = jit_cache
        # cuda_graph: the loop (trt_loop.py) captures whole steps, one graph and context per loop shape and UNet batch.
        self.cuda_graph = cuda_graph
        self.graphs: dict = {}
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        want = set(spec.input_names + spec.output_names)
        if names != want:
            raise BackendError(f"{spec.name}: {self.source.name} has tensors {sorted(names)}, the spec expects {sorted(want)}")
        largest = dim_values(spec, "max")
        self.buffers = {  # max-shape buffers: addresses never change
            t.name: torch.empty(shape_of(t, largest), dtype=_torch_dtype(t.dtype), device=device.current_device())
            for t in spec.inputs + spec.outputs
        }
        self._shapes: dict = {}  # id(context) -> the dim values its input shapes are set to
        self._seen: set = set()  # dim values run so far (TensorRT-RTX compiles kernels per new shape)
        self.context = self.new_context()  # every shape without a captured graph runs here

    @property
    def io_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def new_context(self):
        """An execution context with every tensor address set to this engine's buffers."""
        context = self._make_context(self.engine)
        for name, buf in self.buffers.items():
            if not context.set_tensor_address(name, buf.data_ptr()):
                raise BackendError(f"{self.name}: set_tensor_address({name}) was refused (see the TensorRT log)")
        return context

    def set_shapes(self, values: Mapping[str, int], context=None) -> dict:
        """Set ``context``'s input shapes for ``values`` (once per change); return views of the buffers at them."""
        context = self.context if context is None else context
        if self._shapes.get(id(context)) != values:
            self._shapes.pop(id(context), None)  # a refusal part-way leaves the context's shapes unknown
            for t in self.spec.inputs:
                if not context.set_input_shape(t.name, shape_of(t, values)):
                    raise BackendError(f"{self.name}: set_input_shape({t.name}, {shape_of(t, values)}) was refused")
            self._shapes[id(context)] = dict(values)
            key = tuple(sorted(values.items()))
            if key not in self._seen:
                self._seen.add(key)
                if self.jit_cache is not None:
                    self.jit_cache.mark_dirty()
        return {t.name: self.buffers[t.name].view(-1)[: int(np.prod(shape_of(t, values)))].view(shape_of(t, values))
                for t in self.spec.inputs + self.spec.outputs}

    def enqueue(self, context=None) -> None:
        """Launch on the stream (asynchronous; no sync)."""
        context = self.context if context is None else context
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")

    def use_weights(self, key, fused: FusedWeights) -> None:
        """Refit the plan in place with the weights of ``key`` (see the module docstring)."""
        if key == self.weights_key:
            return
        if self._trt is None or not getattr(self.engine, "refittable", False):
            raise WeightSwapError(f"{self.name}: {self.source.name} was not built refittable, so LoRA cannot change "
                                  "its weights; rebuild the engines with kolors-trt build --refit")
        arrays = {name: np.ascontiguousarray(a) for name, a in fused(self.weights_key).items()}  # alive until done
        refitter = self._trt.Refitter(self.engine, trt_logger(self._trt))
        for name, array in arrays.items():
            if not refitter.set_named_weights(name, self._trt.Weights(array)):
                raise BackendError(f"{self.name}: the refitter refused weights {name!r} ({array.dtype}, {array.size} "
                                   f"values) of {self.source.name}; the folder's LoRA map does not fit its plan: rebuild")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise BackendError(f"{self.name}: the refit also needs {missing[:5]} (weights the plan fused with the "
                               "LoRA's); rebuild the engines with kolors-trt build --refit")
        self.stream.synchronize()  # no launch of this engine may be in flight during the refit
        if not refitter.refit_cuda_engine():
            self.weights_key = UNKNOWN_WEIGHTS  # part may be refitted: the next swap writes every mapped weight
            raise BackendError(f"{self.name}: refit_cuda_engine failed (see the TensorRT log)")
        self.graphs.clear()
        self.weights_key = key

    def _execute(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, int]) -> dict[str, np.ndarray]:
        import torch

        with self.device.stream(self.stream):
            views = self.set_shapes(values)
            for name, array in feeds.items():
                views[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
            self.enqueue()
            out = {t.name: host_copy(views[t.name]) for t in self.spec.outputs}  # waits for the engine
        return out


class TrtBackend(Backend):
    """TensorRT / TensorRT-RTX: plans on one stream, the denoising loop on the device."""

    def __init__(self, engines: dict, name: str, memory: Optional[DeviceMemory] = None,
                 jit_cache: Optional[RuntimeCacheFile] = None, runtime=None):
        super().__init__(engines)
        self.name = name
        self.memory, self.jit_cache = memory, jit_cache
        self.runtime = runtime  # deserialized engines are used while their runtime lives

    @classmethod
    def open(cls, folder: ModelFolder, backend: str, cuda_graph: Optional[bool] = None,
             runtime_cache: Optional[Path] = None, device=None, trt=None) -> "TrtBackend":
        """The plans of ``folder`` (the four, and DeepCache's unet_shallow where it has one) on ``device`` (default
        ``torch.cuda``) with the ``trt`` module (default: the folder's package, imported). runtime_cache: TensorRT-RTX's
        kernel cache file (ignored by TensorRT)."""
        device = cuda_device() if device is None else device
        trt = check_host(folder, backend, device, trt)
        rtx = backend == "tensorrt-rtx"
        if runtime_cache is not None and not rtx:
            logger.warning("--runtime-cache %s: only TensorRT-RTX compiles kernels at run time; ignored for %s",
                           runtime_cache, backend)
            runtime_cache = None
        stream = device.Stream()
        runtime = trt.Runtime(trt_logger(trt))
        names = [name for name in ALL_COMPONENTS if name in folder.files]  # unet_shallow where the folder has it
        plans = {name: read_plan(runtime, folder.files[name], trt) for name in names}
        memory = DeviceMemory(device, max(int(p.device_memory_size_v2) for p in plans.values()))
        cache = RuntimeCacheFile(plans["unet"], runtime_cache) if runtime_cache is not None else None
        graphs = folder.profile.is_static if cuda_graph is None else bool(cuda_graph)
        specs = folder.specs
        engines = {}
        for name in names:
            unet_graphs = graphs and name in ("unet", SHALLOW_UNET)
            # TensorRT-RTX captures and replays its own launches (IRuntimeConfig cuda_graph_strategy), the
            # documented way to use CUDA graphs with its just-in-time kernels.
            make = functools.partial(new_context, trt, memory=memory, rtx=rtx, runtime_graphs=unet_graphs and rtx,
                                     cache=cache)
            engines[name] = TrtEngine(specs[name], folder.files[name], plans[name], make, device, stream,
                                      cuda_graph=unet_graphs and not rtx, jit_cache=cache,
                                      weight_bytes=weight_bytes(trt, plans[name], folder.files[name]), trt=trt)
        opened = cls(engines, backend, memory, cache, runtime)
        logger.info("%s: %s bytes on the device", backend, opened.device_memory())
        return opened

    def device_memory(self) -> dict:
        """Bytes on the device by kind: weights, the shared activations, the engines' I/O buffers."""
        return {"weights": sum(e.weight_bytes for e in self.engines.values()),
                "activations": self.memory.size if self.memory else 0,
                "io_buffers": sum(e.io_bytes for e in self.engines.values())}

    def batch_done(self) -> None:
        """After each batch: keep the kernels TensorRT-RTX compiled for new shapes (the first batch is the warm-up)."""
        if self.jit_cache is not None:
            self.jit_cache.save_if_dirty()

    def denoise(self, batch: DenoiseBatch, sampler: SamplerTables, on_step: Optional[StepCallback] = None) -> np.ndarray:
        return denoise_device(self.engines["unet"], batch, sampler, on_step, self.engines.get(SHALLOW_UNET))


__all__ = ["TrtBackend", "TrtEngine"]
