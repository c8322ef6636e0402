"""A CPU stand-in for the CUDA pieces of the TensorRT backend: the *device* of runtime/device.py.

``CpuDevice`` has the names of ``torch.cuda`` that the backend calls (is_available,
get_device_capability, get_device_name, current_device, Stream, stream, CUDAGraph, graph,
mem_get_info, synchronize); tensors live in CPU memory, so TensorRT's stand-in (runtime.py) and
ONNX Runtime can read and write them through raw pointers.

Work runs when it is issued: on a CPU there is nothing to overlap, so this device cannot show a
missing stream synchronisation. What it keeps of CUDA is what the backend's results depend on:

- **Streams** have an integer handle (``cuda_stream``) that TensorRT's ``execute_async_v3`` takes.
  Every launch goes through ``launch(handle, fn)``: run now, or recorded when the stream is being
  captured. Synchronising a capturing stream, or reading a tensor's value on the host during
  capture (``.item()``, ``.cpu()``), raises as CUDA does ("operation not permitted when stream is
  capturing").
- **Graph capture** (``graph(g, stream=s)``) changes nothing the backend can observe, because on a
  GPU captured work does not execute. A TorchDispatchMode sees every torch operation in the block:
  an operation that writes a tensor (``copy_``, ``div_``, ``out=``) is recorded and not run; a view
  is made (views are metadata, not launches); any other operation is recorded and run once to give
  its result a shape (its values are never read: on a GPU they would be garbage). TensorRT launches
  on the capturing stream are recorded, not run.
- **Replay** (``g.replay()``) re-runs the record in order on the tensors captured: an operation that
  writes runs on them; another runs again and its new result is copied into the tensor it returned
  at capture, which later records read. Scalars are what they were at capture (Python numbers are
  baked into a CUDA graph's kernels too); tensors are read at replay. A TensorRT launch re-runs the
  enqueue it recorded: the addresses it was given at capture, the context's state at replay.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"
_handles = itertools.count(0x5000)
_streams: dict = {}  # handle -> Stream: the "driver" that TensorRT's stand-in launches through
_capturing: dict = {}  # handle -> CpuGraph being captured on that stream


class Stream:
    """A stream: an integer handle and a synchronize() that is a no-op outside capture."""

    def __init__(self):
        self.cuda_stream = next(_handles)
        _streams[self.cuda_stream] = self

    def synchronize(self) -> None:
        if self.cuda_stream in _capturing:
            raise RuntimeError(CAPTURE_ERROR)


def launch(handle: int, fn) -> None:
    """Issue ``fn`` on the stream ``handle``: recorded while that stream is captured, else run now. A launch on
    another stream while any capture is running is refused, as in CUDA's global capture mode."""
    graph = _capturing.get(handle)
    if graph is not None:
        graph.record_launch(fn)
    elif _capturing:
        raise RuntimeError(CAPTURE_ERROR + f" (launch on stream {handle:#x}, another stream is being captured)")
    else:
        fn()


def _written(func, args, kwargs) -> list:
    """The tensors an operation writes (schema arguments marked ``(a!)``)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = kwargs[arg.name] if arg.name in kwargs else (args[i] if i < len(args) else None)
            if value is not None:
                out.append(value)
    return out


class _Recorder(TorchDispatchMode):
    """Records the torch operations of a capture into ``graph`` (see the module docstring)."""

    def __init__(self, graph: "CpuGraph"):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default,):
            raise RuntimeError(CAPTURE_ERROR + f" ({func} reads a device value on the host)")
        written = _written(func, args, kwargs)
        if written:
            self.graph.ops.append(("write", func, args, kwargs, None))
            return written[0] if len(written) == 1 else tuple(written)
        result = func(*args, **kwargs)
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.graph.ops.append(("compute", func, args, kwargs, result))
        return result


class CpuGraph:
    """torch.cuda.CUDAGraph on the CPU: a record of launches, replayed in order."""

    def __init__(self):
        self.ops: list = []
        self.replays = 0

    def record_launch(self, fn) -> None:
        self.ops.append(("launch", fn, (), {}, None))

    def replay(self) -> None:
        if not self.ops:
            raise RuntimeError("CUDA graph replay before capture")
        for kind, func, args, kwargs, result in self.ops:
            if kind == "compute":
                new = func(*args, **kwargs)
                for old, value in zip(_tensors(result), _tensors(new)):
                    old.copy_(value)
            else:
                func(*args, **kwargs)
        self.replays += 1


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else []


class CpuDevice:
    """The device of runtime/device.py on the CPU: the names of torch.cuda the TensorRT backend uses."""

    def __init__(self, capability: tuple = (8, 9), name: str = "CPU stand-in", total_bytes: int = 24 << 30):
        self.capability = tuple(capability)
        self.name = f"{name} (SM{self.capability[0]}{self.capability[1]})"
        self.total_bytes = total_bytes
        self._current: Optional[Stream] = None
        self.graphs: list = []  # every graph captured on this device (tests count replays)

    def is_available(self) -> bool:
        return True

    def get_device_capability(self) -> tuple:
        return self.capability

    def get_device_name(self) -> str:
        return self.name

    def current_device(self) -> str:
        return "cpu"

    def Stream(self) -> Stream:  # noqa: N802 - torch.cuda's name
        return Stream()

    def current_stream(self) -> Optional[Stream]:
        return self._current

    @contextlib.contextmanager
    def stream(self, stream: Stream):
        previous, self._current = self._current, stream
        try:
            yield stream
        finally:
            self._current = previous

    def synchronize(self) -> None:
        if _capturing:
            raise RuntimeError(CAPTURE_ERROR)

    def CUDAGraph(self) -> CpuGraph:  # noqa: N802 - torch.cuda's name
        graph = CpuGraph()
        self.graphs.append(graph)
        return graph

    @contextlib.contextmanager
    def graph(self, graph: CpuGraph, stream: Optional[Stream] = None):
        """Capture ``graph`` on ``stream`` (torch.cuda.graph's arguments)."""
        stream = stream or Stream()
        if _capturing:
            raise RuntimeError(CAPTURE_ERROR + " (nested capture)")
        _capturing[stream.cuda_stream] = graph
        try:
            with self.stream(stream), _Recorder(graph):
                yield graph
        finally:
            del _capturing[stream.cuda_stream]

    def mem_get_info(self) -> tuple:
        return self.total_bytes, self.total_bytes


__all__ = ["CAPTURE_ERROR", "CpuDevice", "CpuGraph", "Stream", "launch"]
