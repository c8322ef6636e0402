"""Open the backend for a model folder: the one place that knows every backend.

    open_backend(folder, "onnxruntime" | "tensorrt" | "tensorrt-rtx", cuda_graph) -> engine.Backend

The TensorRT module is imported only when asked for (it imports torch); the ONNX
Runtime path imports no torch.
"""

from __future__ import annotations

from typing import Optional

from .engine import Backend
from .folder import TRT_BACKENDS, BackendError, ModelFolder


def open_backend(folder: ModelFolder, backend: str, cuda_graph: Optional[bool] = None) -> Backend:
    """The engines of ``folder`` on a resolved backend name (folder.resolve_backend)."""
    if backend == "onnxruntime":
        from .backend_ort import OrtBackend

        return OrtBackend.open(folder)
    if backend in TRT_BACKENDS:
        from .backend_trt import TrtBackend

        return TrtBackend.open(folder, backend, cuda_graph)
    raise BackendError(f"runtime: unknown backend {backend!r}")


__all__ = ["open_backend"]
