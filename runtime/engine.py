"""The interface between the pipeline and a backend.

    Engine.run(feeds: dict[str, np.ndarray], finite=True) -> dict[str, np.ndarray]
    Engine.runs      how many times it ran (tests prove cache hits and early stops with it)

    Backend.engines  {component: Engine} for the four components
    Backend.denoise(latents, conditioning, scheduler, guidance, do_cfg, on_step) -> latents
    Backend.device_memory() -> {kind: bytes} on a GPU backend (weights, activations, I/O buffers)
    Backend.batch_done()     called after each batch (a GPU backend keeps its compiled kernels)

A backend opens its engines and owns its denoising loop: ONNX Runtime runs the
loop on the host in numpy (backend_ort.py), TensorRT keeps it on the GPU in torch
(backend_trt.py). The pipeline sees only this module; backends.py picks one.

The loop contract. ``latents`` [n, C, h, w] are the image rows; ``conditioning``
holds the UNet inputs that stay fixed over the loop, batched [uncond rows, cond
rows] under CFG (2n rows) or n rows without; ``guidance`` [n] is one guidance
scale per image row. After step i the loop calls ``on_step(i, latents)`` with a
function returning the current latents (a GPU backend copies them to the host only
when asked). ``on_step`` returns None to go on with every row, a list of the row
indices to keep (the loop drops the others from the batch, with their
conditioning rows), or an empty list to stop. The loop returns the latents of the
rows still kept, finite or not: the pipeline checks them per request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .postprocess import check_finite
from .spec import EngineSpec, check_feeds

# on_step(step_index, latents) -> None (all rows) | row indices to keep | [] (stop)
StepCallback = Callable[[int, Callable[[], np.ndarray]], Optional[Sequence[int]]]


class Engine:
    """One component's runnable graph. Backends implement ``_execute``."""

    def __init__(self, spec: EngineSpec, source: Path):
        self.spec = spec
        self.source = Path(source)
        self.runs = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, feeds: Mapping[str, np.ndarray], finite: bool = True) -> dict[str, np.ndarray]:
        """Check the feeds against the spec, run, check the outputs are finite. ``finite=False`` leaves that
        check to the caller: the denoising loops, whose rows belong to several requests, and the pipeline
        checks each request's rows (one request's overflow fails that request, not its batch)."""
        values = check_feeds(self.spec, feeds)
        self.runs += 1
        outputs = self._execute(feeds, values)
        if finite:
            for name, value in outputs.items():
                check_finite(self.name, name, value)
        return outputs

    def _execute(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Run on feeds already checked; ``values`` are the dynamic dims they imply."""
        raise NotImplementedError


class Backend:
    """A backend's engines and its denoising loop (see the module docstring)."""

    name = ""

    def __init__(self, engines: Mapping[str, Engine]):
        self.engines = dict(engines)

    def denoise(self, latents: np.ndarray, conditioning: Mapping[str, np.ndarray], scheduler, guidance: np.ndarray,
                do_cfg: bool, on_step: Optional[StepCallback] = None) -> np.ndarray:
        raise NotImplementedError

    def device_memory(self) -> dict:
        """Device bytes by kind; empty for a host backend."""
        return {}

    def batch_done(self) -> None:
        """Called by the pipeline after each batch; nothing to do for most backends."""


def conditioning_rows(keep: Sequence[int], n: int, do_cfg: bool) -> list[int]:
    """The conditioning rows of image rows ``keep`` out of ``n``: [uncond rows, cond rows] under CFG."""
    keep = list(keep)
    return keep + [n + k for k in keep] if do_cfg else keep


def guidance_column(guidance: np.ndarray) -> np.ndarray:
    """Per-row guidance [n] -> [n, 1, 1, 1] float32, to broadcast over the latents."""
    return np.asarray(guidance, dtype=np.float32).reshape(-1, 1, 1, 1)


__all__ = ["Backend", "Engine", "StepCallback", "conditioning_rows", "guidance_column"]
