"""Open the backend for a model folder: the one place that knows every backend.

    open_backend(folder, "onnxruntime" | "tensorrt" | "tensorrt-rtx", cuda_graph, runtime_cache) -> engine.Backend

The TensorRT module is imported only when asked for (it imports torch); the ONNX
Runtime path imports no torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .engine import Backend
from .folder import TRT_BACKENDS, BackendError, ModelFolder

logger = logging.getLogger(__name__)


def open_backend(folder: ModelFolder, backend: str, cuda_graph: Optional[bool] = None,
                 runtime_cache: Optional[Path] = None) -> Backend:
    """The engines of ``folder`` on a resolved backend name (folder.resolve_backend). runtime_cache: TensorRT-RTX's
    file of just-in-time kernels (other backends compile nothing at run time and ignore it)."""
    if backend == "onnxruntime":
        from .backend_ort import OrtBackend

        if runtime_cache is not None:
            logger.warning("--runtime-cache %s: ONNX Runtime compiles no kernels at run time; ignored", runtime_cache)
        return OrtBackend.open(folder)
    if backend in TRT_BACKENDS:
        from .backend_trt import TrtBackend

        return TrtBackend.open(folder, backend, cuda_graph, runtime_cache)
    raise BackendError(f"runtime: unknown backend {backend!r}")


__all__ = ["open_backend"]
