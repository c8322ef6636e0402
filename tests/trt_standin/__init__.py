"""A stand-in for TensorRT (ONNX Runtime on the CPU) and for the CUDA pieces of the TensorRT backend,
so that runtime/backend_trt.py runs in CI as it runs on a GPU. Test code only: the product imports
nothing from here.

    runtime.module("tensorrt" | "tensorrt_rtx")   the trt module (runtime.py explains the contract)
    runtime.build_plan(onnx_bytes, profile, ...)  a "plan": the ONNX graph with its build profile
    cuda.CpuDevice(capability=(8, 9))             the device of runtime/device.py on the CPU
    open_backend(folder, device, ...)             the real TrtBackend.open with both injected

Tests reach it through conftest.py's fixtures (``trt_standin``, ``standin_engines``,
``trt_pipeline``), which load this package by path.
"""

from __future__ import annotations

from . import cuda, graph_model, runtime
from .cuda import CpuDevice
from .runtime import VERSION, build_plan, module

TRT_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def open_backend(folder, device=None, cuda_graph=None, runtime_cache=None, backend=None):
    """kolors_trt's TrtBackend.open on a read engine folder (runtime.folder.ModelFolder), with the stand-in trt
    module of the folder's target and a CPU device (``CpuDevice()`` unless given)."""
    from kolors_trt.runtime.backend_trt import TrtBackend

    backend = backend or folder.target
    return TrtBackend.open(folder, backend, cuda_graph, runtime_cache, device=device or CpuDevice(),
                           trt=module(TRT_MODULES[backend]))


__all__ = ["CpuDevice", "TRT_MODULES", "VERSION", "build_plan", "cuda", "graph_model", "module", "open_backend",
           "runtime"]
