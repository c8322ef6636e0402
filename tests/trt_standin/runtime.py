"""The part of TensorRT's Python runtime API that kolors-trt uses, backed by ONNX Runtime on the CPU.

Faithful to the documented contract (TensorRT 10/11 and TensorRT-RTX 1.7 Python API: Runtime,
ICudaEngine, IExecutionContext, IRuntimeConfig, IRuntimeCache, Refitter), not to what is convenient:

- A *plan* is an ONNX graph with the build's optimisation profile, builder and refit flag in its
  metadata (``build_plan``); ``Runtime.deserialize_cuda_engine`` takes it from any buffer (bytes, an
  mmap), and refuses other bytes or another builder's plan (None, and an error in the log).
- Tensor names, I/O modes, dtypes and shapes (-1 for a dynamic dim) come from the graph;
  ``get_tensor_profile_shape`` from the profile.
- ``set_input_shape`` outside the profile, of the wrong rank or on an output returns False and logs an
  error; ``set_tensor_address`` of an unknown name returns False.
- ``execute_async_v3(stream)`` returns False, logging an error, when an input shape or any tensor
  address is unset, or under ``USER_MANAGED`` allocation when no device memory (256-byte aligned, at
  least ``device_memory_size_v2``) was given. Otherwise it enqueues a launch on the stream
  (cuda.launch: run now, or recorded into a CUDA graph being captured). The launch reads the inputs
  from, and writes the outputs into, the raw addresses it was given, at the shapes of
  ``set_input_shape``, through ONNX Runtime's IOBinding (``bind_input(name, "cpu", 0, dtype, shape,
  address)``): a wrong view, stride or stale address gives a wrong image. Addresses are fixed at
  enqueue (kernel arguments); the shapes are staged in the context by each enqueue and read from
  there when the launch runs. That is the hazard of CUDA graphs with TensorRT: a graph captures the
  launch, not the context's state, so after another enqueue on the same context (another shape) its
  replay computes with the other shape; a captured graph needs a context of its own (a dedicated
  execution context per graph). Each run writes a pattern over the context's activation memory, as
  activations do.
- ``device_memory_size_v2`` is graph_model.activation_bytes at the profile's maximum shapes.
- TensorRT-RTX (``module("tensorrt_rtx")``): IRuntimeConfig carries ``cuda_graph_strategy`` and an
  IRuntimeCache. Each (plan, shapes) run for the first time in a process "compiles" kernels
  (``ICudaEngine.jit_compilations`` counts them) unless the context's runtime cache holds them; a cache
  serializes to bytes and refuses bytes of another version (``deserialize`` returns False).
- ``Refitter(engine, logger)``: refit by weight name (``get_all_weights``, ``get_weights_prototype``,
  ``set_named_weights``, ``get_missing_weights``, ``refit_cuda_engine``) on plans built refittable;
  the new weights take effect on the engine's next launch in every context.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import hashlib
import json
import types
from typing import Optional

import numpy as np

from . import cuda
from .graph_model import activation_bytes, eval_dim

VERSION = "0.0"  # what conftest.engine_folder writes as the builder version
META = "trt_standin"
CACHE_FORMAT = "trt_standin-runtime-cache/1"
ALIGNMENT = 256
SCRIBBLE = 0xA5


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self):
        pass

    def log(self, severity, msg):  # pragma: no cover - subclasses implement it
        raise NotImplementedError


class Logger(ILogger):
    def __init__(self, min_severity=Severity.WARNING):
        super().__init__()
        self.min_severity = min_severity
        self.messages: list = []

    def log(self, severity, msg):
        self.messages.append((severity, msg))


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    BF16 = 7
    INT64 = 8


class CudaGraphStrategy(enum.IntEnum):
    DISABLED = 0
    WHOLE_GRAPH_CAPTURE = 1


class EngineStat(enum.IntEnum):
    TOTAL_WEIGHTS_SIZE = 0
    STRIPPED_WEIGHTS_SIZE = 1


class TensorLocation(enum.IntEnum):
    DEVICE = 0
    HOST = 1


_ORT_TYPES = {"tensor(float)": (DataType.FLOAT, np.float32), "tensor(float16)": (DataType.HALF, np.float16),
              "tensor(int64)": (DataType.INT64, np.int64), "tensor(int32)": (DataType.INT32, np.int32),
              "tensor(bool)": (DataType.BOOL, np.bool_), "tensor(uint8)": (DataType.UINT8, np.uint8)}
_NP_OF = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64, DataType.INT32: np.int32,
          DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT8: np.int8}


def build_plan(onnx_bytes: bytes, profile: dict, builder: str = "tensorrt", refittable: bool = False) -> bytes:
    """A stand-in "build": the ONNX graph with its optimisation profile ({input: [min, opt, max]}), builder
    name (tensorrt | tensorrt_rtx) and refit flag in its metadata."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    for key, value in {f"{META}.profile": json.dumps(profile), f"{META}.builder": builder,
                       f"{META}.refittable": "1" if refittable else "0"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


class Weights:
    """trt.Weights: (dtype, pointer, count) or a numpy array (no copy)."""

    def __init__(self, a=DataType.FLOAT, ptr: Optional[int] = None, count: int = 0):
        if isinstance(a, np.ndarray):
            self._array, self.dtype, self.size = a, _dtype_of(a.dtype), int(a.size)
        else:
            self.dtype, self.size = DataType(a), int(count)
            self._array = None if ptr is None else np.ctypeslib.as_array(
                (ctypes.c_byte * (self.size * np.dtype(_NP_OF[self.dtype]).itemsize)).from_address(ptr)
            ).view(_NP_OF[self.dtype])

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(_NP_OF[self.dtype]).itemsize

    def numpy(self) -> np.ndarray:
        return np.array(self._array, copy=True)


def _dtype_of(np_dtype) -> DataType:
    for dt, npt in _NP_OF.items():
        if np.dtype(npt) == np.dtype(np_dtype):
            return dt
    raise TypeError(f"no TensorRT DataType for {np_dtype}")


class IRuntimeCache:
    """TensorRT-RTX's cache of just-in-time kernels: (plan id, input shapes) entries."""

    def __init__(self, trt):
        self._trt = trt
        self.kernels: set = set()

    def serialize(self) -> np.ndarray:
        data = json.dumps({"format": CACHE_FORMAT, "version": self._trt.__version__,
                           "kernels": sorted(self.kernels)}).encode()
        return np.frombuffer(data, dtype=np.uint8)  # IHostMemory: the buffer protocol and nbytes

    def deserialize(self, blob) -> bool:
        try:
            data = json.loads(bytes(memoryview(blob)).decode())
            ok = data.get("format") == CACHE_FORMAT and data.get("version") == self._trt.__version__
        except (UnicodeDecodeError, ValueError, AttributeError):
            ok = False
        if ok:
            self.kernels |= {k for k in data["kernels"]}
        return ok

    def reset(self) -> bool:
        self.kernels.clear()
        return True


class IRuntimeConfig:
    def __init__(self, trt):
        self._trt = trt
        self._strategy = ExecutionContextAllocationStrategy.STATIC
        self._cache: Optional[IRuntimeCache] = None
        if trt.rtx:
            self.cuda_graph_strategy = CudaGraphStrategy.DISABLED

    def set_execution_context_allocation_strategy(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        self._strategy = ExecutionContextAllocationStrategy(strategy)

    def get_execution_context_allocation_strategy(self):
        return self._strategy

    def __getattr__(self, name):
        if name in ("create_runtime_cache", "set_runtime_cache", "get_runtime_cache") and self._trt.rtx:
            return getattr(self, "_" + name)
        raise AttributeError(f"{self._trt.__name__}.IRuntimeConfig has no attribute {name!r}")

    def _create_runtime_cache(self) -> IRuntimeCache:
        return IRuntimeCache(self._trt)

    def _set_runtime_cache(self, cache=None) -> bool:
        self._cache = cache
        return True

    def _get_runtime_cache(self):
        return self._cache


class Runtime:
    def __init__(self, logger: ILogger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine) -> Optional["ICudaEngine"]:
        kind = type(serialized_engine).__name__
        try:
            data = bytes(memoryview(serialized_engine))
        except TypeError:
            self.logger.log(Severity.ERROR, f"deserialize_cuda_engine: {kind} is not a buffer")
            return None
        try:
            engine = ICudaEngine(self, data, kind)
        except _PlanError as err:
            self.logger.log(Severity.ERROR, f"[runtime.cpp::readHeader] Error Code 2: {err}")
            return None
        return engine


class _PlanError(Exception):
    pass


_ACTIVATIONS: dict = {}  # plan id -> device_memory_size_v2


def _session(data: bytes, overrides: Optional[dict] = None):
    """An ONNX Runtime session of a plan's graph, its refitted weights given with add_initializer. Every session
    runs without the two CPU transformers that would read the graph's own initializers instead of those
    (runtime/backend_ort.py says which): a refit changes weights, not kernels, so a plan refitted back to its
    build weights computes the same bits as before, as TensorRT's does."""
    import onnxruntime as ort

    from kolors_trt.runtime.backend_ort import IGNORE_USER_INITIALIZERS

    options = ort.SessionOptions()
    for name, value in (overrides or {}).items():
        options.add_initializer(name, value)
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(IGNORE_USER_INITIALIZERS))


class ICudaEngine:
    def __init__(self, runtime: Runtime, data: bytes, source_kind: str):
        import onnxruntime as ort

        self.runtime, self.source_kind = runtime, source_kind
        self._trt = runtime._trt
        try:
            self._session = _session(data)
        except Exception as err:  # onnxruntime's own exception types: not a graph at all
            raise _PlanError(f"not a plan ({type(err).__name__})") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        if f"{META}.profile" not in meta:
            raise _PlanError("not a plan: an ONNX graph without a build profile")
        if meta[f"{META}.builder"] != self._trt.__name__:
            raise _PlanError(f"a {meta[f'{META}.builder']} plan cannot be read by {self._trt.__name__}")
        self._data = data
        self.plan_id = hashlib.sha256(data).hexdigest()[:16]
        self._profile = {k: [tuple(s) for s in v] for k, v in json.loads(meta[f"{META}.profile"]).items()}
        self.refittable = meta[f"{META}.refittable"] == "1"
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._outputs = {o.name: o for o in self._session.get_outputs()}
        self._names = list(self._inputs) + list(self._outputs)
        self._overrides: dict = {}  # refitted weights: name -> OrtValue (kept alive with the session)
        self.runs = 0
        self.jit_compilations = 0
        self._compiled: set = set()

    # ---- the documented attributes -------------------------------------------------------
    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self._inputs else TensorIOMode.OUTPUT if name in self._outputs \
            else TensorIOMode.NONE

    def _info(self, name: str):
        return self._inputs.get(name) or self._outputs[name]

    def get_tensor_dtype(self, name: str) -> DataType:
        return _ORT_TYPES[self._info(name).type][0]

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple(d if isinstance(d, int) else -1 for d in self._info(name).shape)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        if profile_index != 0 or name not in self._profile:
            self._log(Severity.ERROR, f"get_tensor_profile_shape: no profile {profile_index} for {name!r}")
            return []
        return list(self._profile[name])

    @functools.cached_property
    def _model(self):
        import onnx

        return onnx.load_from_string(self._data)

    @property
    def device_memory_size_v2(self) -> int:
        if self.plan_id not in _ACTIVATIONS:  # the same plan opened again: the same answer
            _ACTIVATIONS[self.plan_id] = activation_bytes(self._model, {k: v[2] for k, v in self._profile.items()})
        return _ACTIVATIONS[self.plan_id]

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return self.device_memory_size_v2

    def get_engine_stat(self, stat=EngineStat.TOTAL_WEIGHTS_SIZE) -> int:
        if stat != EngineStat.TOTAL_WEIGHTS_SIZE:
            return -1
        from onnx import numpy_helper

        return sum(numpy_helper.to_array(i).nbytes for i in self._model.graph.initializer)

    def create_runtime_config(self) -> IRuntimeConfig:
        return IRuntimeConfig(self._trt)

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        if isinstance(strategy, IRuntimeConfig):
            return IExecutionContext(self, strategy.get_execution_context_allocation_strategy(), strategy)
        return IExecutionContext(self, ExecutionContextAllocationStrategy(strategy), None)

    # ---- execution (what a launch does) --------------------------------------------------------
    def _log(self, severity, msg: str) -> None:
        self.runtime.logger.log(severity, msg)

    def _output_shape(self, name: str, dims: dict):
        shape = [eval_dim(d, dims) for d in self._outputs[name].shape]
        return None if any(d is None for d in shape) else tuple(shape)

    def _run(self, addresses: dict, shapes: dict, memory: tuple, cache: Optional[IRuntimeCache]) -> None:
        if self._trt.rtx:
            key = json.dumps([self.plan_id, sorted((k, list(v)) for k, v in shapes.items())])
            if key not in self._compiled and (cache is None or key not in cache.kernels):
                self.jit_compilations += 1
            self._compiled.add(key)
            if cache is not None:
                cache.kernels.add(key)
        ptr, size = memory
        ctypes.memset(ptr, SCRIBBLE, size)  # activations overwrite the scratch memory on every run
        dims = {}
        for name, info in self._inputs.items():
            for d, v in zip(info.shape, shapes[name]):
                if isinstance(d, str):
                    dims[d] = v
        binding = self._session.io_binding()
        for name, info in self._inputs.items():
            binding.bind_input(name, "cpu", 0, _ORT_TYPES[info.type][1], list(shapes[name]), addresses[name])
        unknown = []
        for name, info in self._outputs.items():
            shape = self._output_shape(name, dims)
            if shape is None:
                binding.bind_output(name, "cpu")
                unknown.append(name)
            else:
                binding.bind_output(name, "cpu", 0, _ORT_TYPES[info.type][1], list(shape), addresses[name])
        self._session.run_with_iobinding(binding)
        for name in unknown:  # shapes only the graph knows: written where TensorRT would write them
            value = np.ascontiguousarray(binding.get_outputs()[list(self._outputs).index(name)].numpy())
            ctypes.memmove(addresses[name], value.ctypes.data, value.nbytes)
        self.runs += 1

    def _refit(self, weights: dict) -> None:
        import onnxruntime as ort

        self._overrides.update({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in weights.items()})
        self._session = _session(self._data, self._overrides)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy, config: Optional[IRuntimeConfig]):
        self.engine, self.strategy, self.config = engine, strategy, config
        self.name = ""
        self._shapes: dict = {}
        self._addresses: dict = {}
        self._memory: Optional[tuple] = None
        if strategy != ExecutionContextAllocationStrategy.USER_MANAGED:  # TensorRT allocates it
            self._own = np.empty(engine.device_memory_size_v2 + ALIGNMENT, np.uint8)
            base = self._own.ctypes.data
            self._memory = ((base + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT, engine.device_memory_size_v2)

    def _error(self, msg: str) -> None:
        self.engine._log(Severity.ERROR, f"IExecutionContext::{msg}")

    def set_input_shape(self, name: str, shape) -> bool:
        e = self.engine
        if e.get_tensor_mode(name) != TensorIOMode.INPUT:
            self._error(f"setInputShape: {name!r} is not an input tensor")
            return False
        shape = tuple(int(d) for d in shape)
        declared = e.get_tensor_shape(name)
        lo, _, hi = e._profile.get(name, (declared, declared, declared))
        if len(shape) != len(declared):
            self._error(f"setInputShape: {name} has rank {len(declared)}, got {shape}")
            return False
        for d, want, a, b in zip(shape, declared, lo, hi):
            if (want != -1 and d != want) or not a <= d <= b:
                self._error(f"setInputShape: {name} {shape} is outside the optimization profile [{lo}, {hi}]")
                return False
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        e = self.engine
        if name in e._inputs:
            return self._shapes.get(name, e.get_tensor_shape(name))
        dims = {}
        for n, info in e._inputs.items():
            for d, v in zip(info.shape, self._shapes.get(n, ())):
                if isinstance(d, str):
                    dims[d] = v
        return e._output_shape(name, dims) or e.get_tensor_shape(name)

    def infer_shapes(self) -> list:
        return [n for n in self.engine._inputs if -1 in self.engine.get_tensor_shape(n) and n not in self._shapes]

    @property
    def all_binding_shapes_specified(self) -> bool:
        return not self.infer_shapes()

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self.engine.get_tensor_mode(name) == TensorIOMode.NONE:
            self._error(f"setTensorAddress: no tensor named {name!r}")
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def set_device_memory(self, memory: int, size: int) -> None:
        if self.strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
            self._error("setDeviceMemory: the context was not created with USER_MANAGED allocation")
        elif int(memory) % ALIGNMENT:
            self._error(f"setDeviceMemory: {int(memory):#x} is not {ALIGNMENT}-byte aligned")
        elif int(size) < self.engine.device_memory_size_v2:
            self._error(f"setDeviceMemory: {size} bytes, the engine needs {self.engine.device_memory_size_v2}")
        else:
            self._memory = (int(memory), int(size))

    def is_stream_capturable(self, stream: int) -> bool:
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        e = self.engine
        missing = self.infer_shapes()
        if missing:
            self._error(f"enqueueV3: input shapes of {missing} are not specified")
            return False
        unset = [n for n in e._names if not self._addresses.get(n)]
        if unset:
            self._error(f"enqueueV3: tensor addresses of {unset} are not set")
            return False
        if self._memory is None:
            self._error("enqueueV3: no device memory: a USER_MANAGED context needs set_device_memory first")
            return False
        addresses, memory = dict(self._addresses), (self._memory[0], e.device_memory_size_v2)
        cache = self.config.get_runtime_cache() if self.config is not None and e._trt.rtx else None
        # The host side of every enqueue (during capture too) stages the shapes in the context's memory;
        # launches read them from there when they run.
        self._staged = {n: self._shapes.get(n, e.get_tensor_shape(n)) for n in e._inputs}

        def launch():
            e._run(addresses, dict(self._staged), memory, cache)

        cuda.launch(int(stream_handle), launch)
        return True


class Refitter:
    """Refit a refittable engine's weights by name (the names of the graph's initializers)."""

    def __init__(self, engine: ICudaEngine, logger: ILogger):
        self.engine, self.logger = engine, logger
        self._new: dict = {}
        if not engine.refittable:
            logger.log(Severity.ERROR, "Refitter: the engine was not built refittable (BuilderFlag.REFIT)")

    @functools.cached_property
    def _prototypes(self) -> dict:
        from onnx import numpy_helper

        if not self.engine.refittable:
            return {}
        return {i.name: numpy_helper.to_array(i) for i in self.engine._model.graph.initializer}

    def get_all_weights(self) -> list:
        return sorted(self._prototypes)

    def get_weights_prototype(self, weights_name: str) -> Weights:
        proto = self._prototypes.get(weights_name)
        if proto is None:
            return Weights(DataType.FLOAT, None, -1)
        return Weights(_dtype_of(proto.dtype), None, proto.size)

    def set_named_weights(self, name: str, weights: Weights, location=TensorLocation.HOST) -> bool:
        proto = self._prototypes.get(name)
        if proto is None or weights.size != proto.size or weights.dtype != _dtype_of(proto.dtype):
            self.logger.log(Severity.ERROR, f"Refitter: weights {name!r} rejected (unknown name, size or dtype)")
            return False
        self._new[name] = weights
        return True

    def unset_named_weights(self, weights_name: str) -> bool:
        return self._new.pop(weights_name, None) is not None

    def get_missing_weights(self) -> list:
        return []

    def refit_cuda_engine(self) -> bool:
        if not self.engine.refittable:
            self.logger.log(Severity.ERROR, "Refitter: refit_cuda_engine on an engine that is not refittable")
            return False
        self.engine._refit({n: w.numpy().reshape(self._prototypes[n].shape) for n, w in self._new.items()})
        return True


_MODULES: dict = {}


def module(name: str = "tensorrt", version: str = VERSION) -> types.ModuleType:
    """The stand-in ``tensorrt`` (TensorRT) or ``tensorrt_rtx`` (TensorRT-RTX: runtime cache, RTX CUDA graphs)
    module; one object per name, as an import gives."""
    key = (name, version)
    if key not in _MODULES:
        trt = types.ModuleType(name, f"stand-in for {name} (ONNX Runtime on the CPU)")
        trt.__version__ = version
        trt.rtx = name == "tensorrt_rtx"
        for obj in (ILogger, Logger, ExecutionContextAllocationStrategy, TensorIOMode, DataType, EngineStat,
                    TensorLocation, Weights, Refitter, ICudaEngine, IExecutionContext, IRuntimeConfig):
            setattr(trt, obj.__name__, obj)
        trt.Runtime = type("Runtime", (Runtime,), {"_trt": trt})
        if trt.rtx:
            trt.CudaGraphStrategy = CudaGraphStrategy
            trt.IRuntimeCache = IRuntimeCache
        _MODULES[key] = trt
    return _MODULES[key]


__all__ = ["VERSION", "build_plan", "module"]
