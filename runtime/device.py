"""The device seam of the TensorRT backends: every CUDA call they make goes through one object.

The backend (backend_trt.py, trt_plans.py) never names ``torch.cuda`` itself; it is handed a
*device*, an object with these names of ``torch.cuda``'s API and their meaning:

    is_available() -> bool              get_device_capability() -> (major, minor)
    get_device_name() -> str            current_device() -> what torch.empty(device=...) takes
    Stream() -> stream                  stream.cuda_stream (the handle TensorRT enqueues on),
                                        stream.synchronize()
    stream(s) -> context manager        work in the block is issued on ``s``
    CUDAGraph() -> graph                graph(g, stream=s) -> context manager capturing ``g`` on ``s``;
                                        g.replay()
    mem_get_info() -> (free, total)     bytes of device memory

In production the device is the ``torch.cuda`` module itself (``cuda_device()``); tensors are
torch tensors on ``current_device()``. The tests hand the same code a CPU device with the same
names (tests/trt_standin/cuda.py), whose CUDA graphs record launches at capture and re-run them at
replay, so the backend's own code runs in CI without a branch for it.

``host_copy`` is the one way the backend reads a device tensor back: always a copy, so the array
it returns never aliases a buffer the next step or request writes (on the CPU ``.cpu()`` would
return the buffer itself).
"""

from __future__ import annotations

import numpy as np


def cuda_device():
    """The production device: ``torch.cuda``."""
    import torch

    return torch.cuda


def host_copy(tensor) -> np.ndarray:
    """A host copy of a device tensor (waits for the work that writes it, on CUDA)."""
    return tensor.detach().to("cpu", copy=True).numpy()


def from_host(array: np.ndarray, device, dtype=None):
    """A new device tensor holding ``array`` (a copy, never a view of the caller's memory)."""
    import torch

    return torch.tensor(np.ascontiguousarray(array, dtype=dtype), device=device)


__all__ = ["cuda_device", "from_host", "host_copy"]
