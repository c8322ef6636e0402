"""Opening TensorRT / TensorRT-RTX plans: the host checks, the GPU memory plan and RTX's kernel cache.

NVIDIA's diffusion demo (demo/Diffusion) keeps GPU memory to the weights plus one activation
allocation; so does this module:

- **Plans** are deserialized from a memory map of the file (``deserialize_cuda_engine`` takes any
  buffer): TensorRT reads the file's pages while it copies the weights to the GPU, and no second
  host copy of a multi-GB plan is made in Python.
- **Activations**: every execution context is created with ``ExecutionContextAllocationStrategy.
  USER_MANAGED`` and handed the same allocation, the largest ``device_memory_size_v2`` of the
  engines. The engines run one at a time on one stream (the pipeline serialises them), so they can
  share it; a context without its own memory costs next to nothing, which is what lets each
  captured CUDA graph keep a context of its own (backend_trt.py).
- **TensorRT-RTX** finishes kernels just in time on the user's GPU. ``--runtime-cache PATH`` keeps
  them in a file: loaded at start (a file from another RTX version, GPU or driver is refused by
  TensorRT-RTX itself and replaced), attached to every context's IRuntimeConfig, and written
  atomically after each batch that ran a new shape (the first one is the warm-up) and at exit.
"""

from __future__ import annotations

import importlib
import logging
import mmap
import weakref
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError
from .folder import BackendError, ModelFolder
from .manifest import write_bytes_atomic
from .spec import COMPONENTS

logger = logging.getLogger(__name__)

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
PIP_EXTRAS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx"}
ALIGNMENT = 256  # bytes: IExecutionContext.set_device_memory needs 256-byte aligned memory
# TensorRT-RTX AOT plans run on "8.0, 8.6, 8.9, 12.0 and later" (CPU-only AOT docs): a plan for
# SM120 also serves later parts (e.g. SM121, GB10); others need their exact capability.
RTX_OPEN_ENDED = 120


def load_module(backend: str):
    """Import tensorrt / tensorrt_rtx, or raise BackendError naming the pip extra."""
    module = MODULES[backend]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendError(
            f"runtime: backend {backend!r} needs the Python package {module!r} ({err}); "
            f"pip install 'kolors-trt[{PIP_EXTRAS[backend]}]'"
        ) from err


def _sm(name: str) -> int:
    """"SM89" -> 89, "SM120" -> 120."""
    return int(str(name).upper().removeprefix("SM"))


def plan_serves(targets: Sequence[str], capability: tuple, rtx: bool) -> bool:
    """Whether a plan built for compute capabilities ``targets`` (["SM89"], ...) runs on a GPU of
    ``capability`` (major, minor). TensorRT: the GPU it was built on. TensorRT-RTX: the listed ones, and
    every later GPU for a plan that includes SM120."""
    device = 10 * int(capability[0]) + int(capability[1])
    wanted = [_sm(t) for t in targets]
    if device in wanted:
        return True
    return rtx and any(w >= RTX_OPEN_ENDED and device >= w for w in wanted)


def check_host(folder: ModelFolder, backend: str, device, trt=None):
    """The runtime package (``trt``, or imported), a GPU, and plans built by this version for this GPU."""
    module = MODULES[backend]
    trt = load_module(backend) if trt is None else trt
    if not device.is_available():
        raise BackendError(f"runtime: backend {backend!r} needs an NVIDIA GPU and none is visible to torch "
                           "(CUDA build of torch, driver, CUDA_VISIBLE_DEVICES); use an export folder with --backend onnxruntime")
    capability = tuple(device.get_device_capability())
    device_cc = f"SM{capability[0]}{capability[1]}"
    for name in COMPONENTS:
        entry, plan = folder.entries[name], folder.files[name].name
        builder = entry.get("builder", {})
        if builder.get("name") != module:
            raise BackendError(f"runtime: {plan} was built by {builder.get('name')!r}, not {module!r}")
        if str(builder.get("version")) != str(trt.__version__):
            raise BackendError(
                f"runtime: {plan} was built with {module} {builder.get('version')} and this host has "
                f"{trt.__version__}; plans only load in the version that built them: rebuild with kolors-trt build "
                f"or install {module}=={builder.get('version')}"
            )
        ccs = [str(c) for c in entry.get("compute_capabilities", []) if c and c != "unknown"]
        if ccs and not plan_serves(ccs, capability, backend == "tensorrt-rtx"):
            raise BackendError(
                f"runtime: {plan} targets compute capabilities {ccs}, this GPU ({device.get_device_name()}) is "
                f"{device_cc}; rebuild on this GPU"
                + (f" or with --compute-capability {device_cc}" if backend == "tensorrt-rtx" else "")
            )
    return trt


def read_plan(runtime, path: Path, trt):
    """Deserialize one plan from a read-only memory map of its file (no copy of the plan in Python)."""
    with open(path, "rb") as f:
        if not path.stat().st_size:
            raise BackendError(f"runtime: {path} is empty; rebuild it with kolors-trt build")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            engine = runtime.deserialize_cuda_engine(mapped)
    if engine is None:
        raise BackendError(f"runtime: {trt.__name__} could not deserialize {path} (see its log above); rebuild it")
    return engine


def weight_bytes(trt, engine, plan: Path) -> int:
    """The engine's weights on the device: EngineStat.TOTAL_WEIGHTS_SIZE where TensorRT has it, else the plan size
    (a plan is its weights plus kernels)."""
    stat = getattr(trt, "EngineStat", None)
    if stat is not None and hasattr(engine, "get_engine_stat"):
        size = int(engine.get_engine_stat(stat.TOTAL_WEIGHTS_SIZE))
        if size >= 0:
            return size
    return plan.stat().st_size


class RuntimeCacheError(InputError):
    """The --runtime-cache path cannot hold the cache file."""


class DeviceMemory:
    """One device allocation of ``size`` bytes at a 256-byte aligned address: the activations of every context."""

    def __init__(self, device, size: int):
        import torch

        self.size = int(size)
        self._tensor = torch.empty(self.size + ALIGNMENT, dtype=torch.uint8, device=device.current_device())
        base = self._tensor.data_ptr()
        self.ptr = (base + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class RuntimeCacheFile:
    """TensorRT-RTX's runtime cache of just-in-time kernels, read from and written to ``path``."""

    def __init__(self, engine, path: Path):
        self.path = Path(path)
        if self.path.is_dir() or not self.path.parent.is_dir():
            problem = "is a folder" if self.path.is_dir() else "its folder does not exist"
            raise RuntimeCacheError(f"--runtime-cache {self.path}: {problem}; give a file path in an existing folder")
        self.cache = engine.create_runtime_config().create_runtime_cache()
        self._state = {"dirty": False}  # kernels compiled since the last save; shared with the exit hook
        if self.path.is_file():
            if self.cache.deserialize(self.path.read_bytes()):
                logger.info("runtime cache: loaded %s", self.path)
            else:
                logger.warning("runtime cache %s was refused (written by another TensorRT-RTX, GPU or driver); "
                               "kernels are compiled again and the file is replaced", self.path)
        weakref.finalize(self, _save, self.cache, self.path, self._state)

    def mark_dirty(self) -> None:
        """An engine ran a shape for the first time: TensorRT-RTX compiled kernels for it."""
        self._state["dirty"] = True

    def save_if_dirty(self) -> None:
        _save(self.cache, self.path, self._state)


def _save(cache, path: Path, state: dict) -> None:
    """Write the cache atomically (a reader never sees half a file) when it gained kernels; also at exit."""
    if not state["dirty"]:
        return
    try:
        write_bytes_atomic(path, bytes(memoryview(cache.serialize())))
    except (OSError, RuntimeError) as err:  # a full disk, or at exit a CUDA context already gone: keep serving
        logger.warning("runtime cache: could not write %s (%s)", path, err)
        return
    state["dirty"] = False
    logger.info("runtime cache: wrote %s", path)


def new_context(trt, engine, memory: DeviceMemory, rtx: bool, runtime_graphs: bool,
                cache: Optional[RuntimeCacheFile]):
    """An execution context without memory of its own, given the shared activation allocation.

    TensorRT: ``create_execution_context(USER_MANAGED)``. TensorRT-RTX: through an IRuntimeConfig, which also
    carries the kernel cache and RTX's own CUDA graphs (``cuda_graph_strategy``)."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    if rtx:
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        if runtime_graphs:
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if cache is not None and not config.set_runtime_cache(cache.cache):
            logger.warning("runtime cache: TensorRT-RTX refused it for this context; its kernels are not kept")
        context = engine.create_execution_context(config)
    else:
        context = engine.create_execution_context(strategy)
    if context is None:
        raise BackendError(f"runtime: {trt.__name__} could not create an execution context (see its log above)")
    context.set_device_memory(memory.ptr, memory.size)
    return context


__all__ = ["DeviceMemory", "RuntimeCacheError", "RuntimeCacheFile", "check_host", "load_module", "new_context", "plan_serves", "read_plan",
           "weight_bytes"]
