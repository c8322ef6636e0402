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
- One stream for everything. The denoising loop (UNet, CFG combine with one guidance scale per row,
  Euler update) stays on the device with no host sync; the per-step scalars (sigma, dt, 1/input
  divisor, t) are read from small device tables. The loop copies latents to the host only when
  ``on_step`` asks for them, and when rows are dropped (a cancelled request), which is rare.
- With ``cuda_graph`` one step is captured as a CUDA graph per (batch, size, CFG) and replayed; the
  step's scalars are copied into fixed slots before each replay. Each captured shape keeps an
  execution context of its own, whose input shapes never change after capture: TensorRT keeps a
  launch's shape state in the context, so a graph replayed on a context that has since run another
  shape would compute with the wrong shapes. (The other way out, graphs on static profiles only,
  would take graphs from dynamic engine folders for nothing: a context costs no activation memory
  here.) Default: on when the engine profile is static.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .device import cuda_device, from_host, host_copy
from .engine import Backend, Engine, StepCallback, conditioning_rows, guidance_column
from .folder import BackendError, ModelFolder
from .spec import COMPONENTS, EngineSpec, check_feeds, dim_values, shape_of
from .trt_logger import trt_logger
from .trt_plans import DeviceMemory, RuntimeCacheFile, check_host, new_context, read_plan, weight_bytes

logger = logging.getLogger(__name__)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "int64": torch.int64}[name]


class TrtEngine(Engine):
    """One plan, its execution contexts and its preallocated device buffers."""

    def __init__(self, spec: EngineSpec, source: Path, engine, make_context, device, stream,
                 cuda_graph: bool = False, jit_cache: Optional[RuntimeCacheFile] = None, weight_bytes: int = 0):
        super().__init__(spec, source)
        import torch

        self.engine, self.device, self.stream = engine, device, stream
        self.weight_bytes, self.activation_bytes = weight_bytes, int(engine.device_memory_size_v2)
        self._make_context = make_context  # engine -> a context on the shared activation memory
        self.jit_cache = jit_cache
        # cuda_graph: denoise_torch captures whole steps (UNet + CFG + Euler), one graph and context per shape.
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
        """The four plans of ``folder`` on ``device`` (default ``torch.cuda``) with the ``trt`` module (default: the
        folder's package, imported). runtime_cache: TensorRT-RTX's kernel cache file (ignored by TensorRT)."""
        device = cuda_device() if device is None else device
        trt = check_host(folder, backend, device, trt)
        rtx = backend == "tensorrt-rtx"
        if runtime_cache is not None and not rtx:
            logger.warning("--runtime-cache %s: only TensorRT-RTX compiles kernels at run time; ignored for %s",
                           runtime_cache, backend)
            runtime_cache = None
        stream = device.Stream()
        runtime = trt.Runtime(trt_logger(trt))
        plans = {name: read_plan(runtime, folder.files[name], trt) for name in COMPONENTS}
        memory = DeviceMemory(device, max(int(p.device_memory_size_v2) for p in plans.values()))
        cache = RuntimeCacheFile(plans["unet"], runtime_cache) if runtime_cache is not None else None
        graphs = folder.profile.is_static if cuda_graph is None else bool(cuda_graph)
        specs = folder.specs
        engines = {}
        for name in COMPONENTS:
            unet_graphs = graphs and name == "unet"
            # TensorRT-RTX captures and replays its own launches (IRuntimeConfig cuda_graph_strategy), the
            # documented way to use CUDA graphs with its just-in-time kernels.
            make = functools.partial(new_context, trt, memory=memory, rtx=rtx, runtime_graphs=unet_graphs and rtx,
                                     cache=cache)
            engines[name] = TrtEngine(specs[name], folder.files[name], plans[name], make, device, stream,
                                      cuda_graph=unet_graphs and not rtx, jit_cache=cache,
                                      weight_bytes=weight_bytes(trt, plans[name], folder.files[name]))
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

    def denoise(self, latents: np.ndarray, conditioning: Mapping[str, np.ndarray], scheduler, guidance: np.ndarray,
                do_cfg: bool, on_step: Optional[StepCallback] = None) -> np.ndarray:
        return denoise_torch(self.engines["unet"], latents, conditioning, scheduler, guidance, do_cfg, on_step)


class _Step:
    """The device-side state of one denoising loop: latents, per-step tables and scalar slots."""

    def __init__(self, unet: TrtEngine, latents: np.ndarray, conditioning: Mapping[str, np.ndarray],
                 scheduler, guidance: np.ndarray, do_cfg: bool):
        import torch

        n = latents.shape[0]
        self.n, self.do_cfg, self.unet = n, do_cfg, unet
        values = {"unet_batch": 2 * n if do_cfg else n, "latent_height": latents.shape[2], "latent_width": latents.shape[3]}
        check_feeds(unet.spec, {**conditioning, "sample": np.empty((values["unet_batch"],) + latents.shape[1:], np.float32),
                                "timestep": np.empty((1,), np.float32)})
        self.values, self.context = values, unet.context  # a captured step gets a context of its own
        self.views = unet.set_shapes(values)
        for name, array in conditioning.items():  # constant for the whole loop
            self.views[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
        device = unet.buffers["sample"].device
        dev = functools.partial(from_host, device=device, dtype=np.float32)
        steps = len(scheduler)
        sig = scheduler.sigmas
        self.tables = {
            "t": dev(scheduler.timesteps),
            "divisor": dev([scheduler.input_divisor(i) for i in range(steps)]),
            "sigma": dev(sig[:steps]),
            "dt": dev([np.float32(sig[i + 1] - sig[i]) for i in range(steps)]),
        }
        self.slots = {k: torch.zeros((), dtype=torch.float32, device=device) for k in self.tables}
        self.guidance = dev(guidance_column(guidance))  # [n, 1, 1, 1]: one scale per image row
        self.kind = scheduler.config.prediction_type
        self.x = dev(latents)  # [n, C, h, w]
        self.key = (values["unet_batch"], values["latent_height"], values["latent_width"], do_cfg, self.kind)

    def load(self, i: int) -> None:
        for k, table in self.tables.items():
            self.slots[k].copy_(table[i])  # device to device: no host sync

    def body(self) -> None:
        """UNet + CFG + Euler, the float32 operations of scheduler.py's step()."""
        import torch

        n, x, s, v = self.n, self.x, self.slots, self.views
        sample = v["sample"]
        sample[:n].copy_(x)
        if self.do_cfg:
            sample[n:].copy_(x)
        sample.div_(s["divisor"])
        v["timestep"].copy_(s["t"].reshape(1))
        self.unet.enqueue(self.context)
        eps = v["noise_pred"]
        if self.do_cfg:
            uncond, cond = eps[:n], eps[n:]
            eps = uncond + self.guidance * (cond - uncond)
        sigma = s["sigma"]
        if self.kind == "epsilon":
            pred = x - sigma * eps
        elif self.kind == "v_prediction":
            pred = eps * (-sigma / torch.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
        else:
            pred = eps
        x.copy_(x + ((x - pred) / sigma) * s["dt"])


def _capturable(unet: TrtEngine, context) -> bool:
    """IExecutionContext.is_stream_capturable where the installed TensorRT has it."""
    check = getattr(context, "is_stream_capturable", None)
    return True if check is None else bool(check(unet.stream.cuda_stream))


def _step_and_graph(unet: TrtEngine, latents: np.ndarray, conditioning: Mapping[str, np.ndarray], scheduler,
                    guidance: np.ndarray, do_cfg: bool):
    """A loop state on the device and, with CUDA graphs, the step graph for its shape (captured once per shape)."""
    step = _Step(unet, latents, conditioning, scheduler, guidance, do_cfg)
    if not unet.cuda_graph:
        return step, None
    captured = unet.graphs.get(step.key)
    if captured is None:
        return _capture(unet, step)
    graph, state = captured
    state.x.copy_(step.x)  # the graph reads the tensors it captured: move the new request's state there
    state.guidance.copy_(step.guidance)
    state.tables = step.tables  # read by load(), outside the graph
    return state, graph


def _capture(unet: TrtEngine, step: _Step):
    """Capture ``step``'s body as a CUDA graph on an execution context of its own, whose shapes never change."""
    context = unet.new_context()
    unet.set_shapes(step.values, context)
    if not _capturable(unet, context):
        logger.warning("unet: this execution context cannot be captured on its stream; steps run without a CUDA graph")
        unet.cuda_graph = False
        return step, None
    step.context = context
    # TensorRT needs one launch before capture (lazy initialisation); warm up on step 0's values
    step.load(0)
    saved = step.x.clone()
    step.body()
    step.x.copy_(saved)
    graph = unet.device.CUDAGraph()
    with unet.device.graph(graph, stream=unet.stream):
        step.body()  # recorded, not run
    unet.graphs[step.key] = (graph, step)
    return step, graph


def denoise_torch(unet: TrtEngine, latents: np.ndarray, conditioning: Mapping[str, np.ndarray], scheduler,
                  guidance: np.ndarray, do_cfg: bool, on_step: Optional[StepCallback] = None) -> np.ndarray:
    """The denoising loop on the device; the contract of engine.Backend.denoise."""
    cond, g, start = dict(conditioning), np.asarray(guidance, np.float32), 0
    with unet.device.stream(unet.stream):
        while True:
            step, graph = _step_and_graph(unet, latents, cond, scheduler, g, do_cfg)
            keep = None
            for i in range(start, len(scheduler)):
                step.load(i)
                if graph is not None:
                    graph.replay()
                else:
                    step.body()
                unet.runs += 1
                if on_step is not None:  # host-side; it waits for the GPU only if it reads the latents
                    keep = on_step(i, lambda: host_copy(step.x))
                    if keep is not None:
                        break
            out = host_copy(step.x)  # the one sync of an uninterrupted loop
            if keep is None:
                break
            keep = list(keep)
            rows = conditioning_rows(keep, len(out), do_cfg)
            latents, g, out = out[keep], g[keep], out[keep]
            cond = {name: value[rows] for name, value in cond.items()}
            start = i + 1
            if not keep or start == len(scheduler):
                break
    return out  # rows of several requests: the pipeline checks each request's rows


__all__ = ["TrtBackend", "TrtEngine", "denoise_torch"]
