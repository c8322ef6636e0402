"""TensorRT / TensorRT-RTX engines and the on-device denoising loop.

NEEDS AN NVIDIA GPU: nothing here runs on a CPU-only host (the tests for it are
marked ``gpu``). Written to the TensorRT 10/11 Python API, which TensorRT-RTX
keeps: ``trt.Runtime(logger).deserialize_cuda_engine(plan)``,
``engine.create_execution_context()``, ``context.set_input_shape``,
``context.set_tensor_address``, ``context.execute_async_v3(stream)``.
torch provides the CUDA buffers, the stream and CUDA graphs.

- Buffers are preallocated from the spec at the profile's max shapes; a run at a
  smaller shape uses a contiguous prefix of each buffer, so tensor addresses are
  set once, at load.
- One CUDA stream for everything. The denoising loop (UNet, CFG combine with one
  guidance scale per row, Euler update) stays on the device with no host sync;
  the per-step scalars (sigma, dt, 1/input divisor, t) are read from small device
  tables. The loop copies latents to the host only when ``on_step`` asks for
  them, and when rows are dropped (a cancelled request), which is rare.
- With ``cuda_graph`` one step is captured as a CUDA graph per (batch, size)
  and replayed; the step's scalars are copied into fixed slots before each
  replay. Default: on when the engine profile is static.
"""

from __future__ import annotations

import importlib
import logging
from typing import Mapping, Optional

import numpy as np

from .engine import Backend, Engine, StepCallback, conditioning_rows, guidance_column
from .folder import BackendError, ModelFolder
from .postprocess import check_finite
from .spec import COMPONENTS, EngineSpec, check_feeds, dim_values, shape_of
from .trt_logger import trt_logger

logger = logging.getLogger(__name__)

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
PIP_EXTRAS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx"}


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "int64": torch.int64}[name]


def check_host(folder: ModelFolder, backend: str):
    """Import the runtime package and check GPU, plan builder version and compute capability."""
    module = MODULES[backend]
    try:
        trt = importlib.import_module(module)
    except ImportError as err:
        raise BackendError(
            f"runtime: backend {backend!r} needs the Python package {module!r} ({err}); "
            f"pip install 'kolors-trt[{PIP_EXTRAS[backend]}]'"
        ) from err
    try:
        import torch
    except ImportError as err:
        raise BackendError(f"runtime: backend {backend!r} uses torch for CUDA buffers and streams; install torch with CUDA") from err
    if not torch.cuda.is_available():
        raise BackendError(f"runtime: backend {backend!r} needs an NVIDIA GPU and none is visible to torch "
                           "(CUDA build of torch, driver, CUDA_VISIBLE_DEVICES); use an export folder with --backend onnxruntime")
    major, minor = torch.cuda.get_device_capability()
    device_cc = f"SM{major}{minor}"
    for name in COMPONENTS:
        entry = folder.entries[name]
        builder = entry.get("builder", {})
        if builder.get("name") != module:
            raise BackendError(f"runtime: {folder.files[name].name} was built by {builder.get('name')!r}, not {module!r}")
        if str(builder.get("version")) != str(trt.__version__):
            raise BackendError(
                f"runtime: {folder.files[name].name} was built with {module} {builder.get('version')} and this host has "
                f"{trt.__version__}; plans only load in the version that built them: rebuild with kolors-trt build "
                f"or install {module}=={builder.get('version')}"
            )
        ccs = [str(c) for c in entry.get("compute_capabilities", []) if c and c != "unknown"]
        if ccs and device_cc not in ccs:
            raise BackendError(
                f"runtime: {folder.files[name].name} targets compute capabilities {ccs}, this GPU "
                f"({torch.cuda.get_device_name()}) is {device_cc}; rebuild on this GPU"
                + (" or with --compute-capability" if backend == "tensorrt-rtx" else "")
            )
    return trt


class TrtEngine(Engine):
    """One plan, its execution context and its preallocated device buffers."""

    def __init__(self, spec: EngineSpec, folder: ModelFolder, trt, stream, cuda_graph: bool = False,
                 runtime_graphs: bool = False):
        super().__init__(spec, folder.files[spec.name])
        import torch

        self.stream = stream
        # cuda_graph: denoise_torch captures whole steps (UNet + CFG + Euler), one graph per shape.
        # runtime_graphs: TensorRT-RTX captures and replays its own launches (IRuntimeConfig
        # cuda_graph_strategy), the documented way to use CUDA graphs with RTX's JIT kernels.
        self.cuda_graph = cuda_graph
        self.graphs: dict = {}
        plan = self.source.read_bytes()
        self.engine = trt.Runtime(trt_logger(trt)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"{spec.name}: {trt.__name__} could not deserialize {self.source} (see its log); rebuild it")
        if runtime_graphs:
            config = self.engine.create_runtime_config()
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{spec.name}: could not create an execution context for {self.source} (GPU memory?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = set(spec.input_names + spec.output_names)
        if names != want:
            raise BackendError(f"{spec.name}: {self.source.name} has tensors {sorted(names)}, the spec expects {sorted(want)}")
        largest = dim_values(spec, "max")
        self.buffers = {  # max-shape buffers: addresses never change
            t.name: torch.empty(shape_of(t, largest), dtype=_torch_dtype(t.dtype), device="cuda")
            for t in spec.inputs + spec.outputs
        }
        for name, buf in self.buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        self._values: Optional[dict] = None

    def set_shapes(self, values: Mapping[str, int]) -> dict:
        """Set the input shapes for ``values`` (once per shape); return views of the buffers at those shapes."""
        if values != self._values:
            for t in self.spec.inputs:
                if not self.context.set_input_shape(t.name, shape_of(t, values)):
                    raise BackendError(f"{self.name}: set_input_shape({t.name}, {shape_of(t, values)}) was refused")
            self._values = dict(values)
        return {t.name: self.buffers[t.name].view(-1)[: int(np.prod(shape_of(t, values)))].view(shape_of(t, values))
                for t in self.spec.inputs + self.spec.outputs}

    def enqueue(self) -> None:
        """Launch on the stream (asynchronous; no sync)."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")

    def _execute(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, int]) -> dict[str, np.ndarray]:
        import torch

        with torch.cuda.stream(self.stream):
            views = self.set_shapes(values)
            for name, array in feeds.items():
                views[name].copy_(torch.from_numpy(np.ascontiguousarray(array)), non_blocking=False)
            self.enqueue()
            out = {t.name: views[t.name].cpu().numpy() for t in self.spec.outputs}
        self.stream.synchronize()
        return out


class TrtBackend(Backend):
    """TensorRT / TensorRT-RTX: plans on one CUDA stream, the denoising loop on the GPU. GPU only."""

    def __init__(self, engines: dict, name: str):
        super().__init__(engines)
        self.name = name

    @classmethod
    def open(cls, folder: ModelFolder, backend: str, cuda_graph: Optional[bool]) -> "TrtBackend":
        import torch

        trt = check_host(folder, backend)
        stream = torch.cuda.Stream()
        graphs = folder.profile.is_static if cuda_graph is None else bool(cuda_graph)
        rtx = backend == "tensorrt-rtx"
        specs = folder.specs
        engines = {name: TrtEngine(specs[name], folder, trt, stream, cuda_graph=graphs and name == "unet" and not rtx,
                                   runtime_graphs=graphs and name == "unet" and rtx)
                   for name in COMPONENTS}
        return cls(engines, backend)

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
        self.views = unet.set_shapes(values)
        for name, array in conditioning.items():  # constant for the whole loop
            self.views[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
        device = unet.buffers["sample"].device
        dev = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
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
        self.unet.enqueue()
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


def _capturable(unet: TrtEngine) -> bool:
    """IExecutionContext.is_stream_capturable where the installed TensorRT has it."""
    check = getattr(unet.context, "is_stream_capturable", None)
    return True if check is None else bool(check(unet.stream.cuda_stream))


def _step_and_graph(unet: TrtEngine, latents: np.ndarray, conditioning: Mapping[str, np.ndarray], scheduler,
                    guidance: np.ndarray, do_cfg: bool):
    """A loop state on the device and, with CUDA graphs, the step graph for its shape (captured once per shape)."""
    import torch

    step = _Step(unet, latents, conditioning, scheduler, guidance, do_cfg)
    graph = unet.graphs.get(step.key) if unet.cuda_graph else None
    if unet.cuda_graph and graph is None and not _capturable(unet):
        logger.warning("unet: this execution context cannot be captured on its stream; steps run without a CUDA graph")
        unet.cuda_graph = False
    if unet.cuda_graph and graph is None:
        # TensorRT needs one launch before capture (lazy initialisation); warm up on step 0's values
        step.load(0)
        saved = step.x.clone()
        step.body()
        step.x.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=unet.stream):
            step.body()  # recorded, not run
        step.x.copy_(saved)
        unet.graphs[step.key] = (graph, step)
        return step, graph
    if graph is not None:
        graph, captured = graph
        captured.x.copy_(step.x)  # the graph reads the tensors it captured: move the state there
        for k in step.tables:
            captured.tables[k] = step.tables[k]
        captured.guidance.copy_(step.guidance)
        return captured, graph
    return step, None


def denoise_torch(unet: TrtEngine, latents: np.ndarray, conditioning: Mapping[str, np.ndarray], scheduler,
                  guidance: np.ndarray, do_cfg: bool, on_step: Optional[StepCallback] = None) -> np.ndarray:
    """The denoising loop on the GPU; the contract of engine.Backend.denoise. GPU only."""
    import torch

    cond, g, start = dict(conditioning), np.asarray(guidance, np.float32), 0
    with torch.cuda.stream(unet.stream):
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
                    keep = on_step(i, lambda: step.x.cpu().numpy())
                    if keep is not None:
                        break
            out = step.x.cpu().numpy()  # the one sync of an uninterrupted loop
            if keep is None:
                break
            keep = list(keep)
            rows = conditioning_rows(keep, len(out), do_cfg)
            latents, g, out = out[keep], g[keep], out[keep]
            cond = {name: value[rows] for name, value in cond.items()}
            start = i + 1
            if not keep or start == len(scheduler):
                break
    check_finite("unet", "latents (denoising loop)", out)
    return out


__all__ = ["TrtBackend", "TrtEngine", "check_host", "denoise_torch"]
