"""The interface between the pipeline and a backend.

    Engine.run(feeds: dict[str, np.ndarray], finite=True) -> dict[str, np.ndarray]
    Engine.runs      how many times it ran (tests prove cache hits and early stops with it)
    Engine.rows      batch rows it evaluated (the leading dim of its first input, summed over runs)
    Engine.use_weights(key, fused)   run with other values of some initializers (LoRA, lora.py)

    Backend.engines  {component: Engine} for the four components
    Backend.denoise(batch: DenoiseBatch, sampler: SamplerTables, on_step) -> latents
    Backend.device_memory() -> {kind: bytes} on a GPU backend (weights, activations, I/O buffers)
    Backend.batch_done()     called after each batch (a GPU backend keeps its compiled kernels)

A backend opens its engines and owns its denoising loop: ONNX Runtime runs the
loop on the host in numpy (backend_ort.py), TensorRT keeps it on the GPU in torch
(backend_trt.py). The pipeline sees only this module; backends.py picks one.

The loop contract. ``DenoiseBatch`` holds n image rows: their initial latents
[n, C, h, w] (already times the sampler's init_noise_sigma), the UNet inputs that
stay fixed over the loop as 2n rows (rows 0..n-1 the unconditional branch of each
image, rows n..2n-1 the conditional one), one guidance scale per image, the
guidance mask ``cfg`` [steps, n] (image k applies classifier-free guidance at
step i) and, for a stochastic sampler, the noise of every step [steps, n, C, h, w].
The sampler's per-step scalars come from ``samplers.SamplerTables``, and a step is
``samplers.sampler_step`` on them: a backend states no sampler math of its own.

Step i evaluates the UNet on ``step_rows``: the unconditional rows of the images
with ``cfg[i]`` set, then every image's conditional row (diffusers' [uncond, cond]
order), then copies of the last row up to the UNet profile's smallest batch (a
static profile) - so a step outside an image's guidance interval costs one row,
not two. The model output of an image is ``uncond + g * (cond - uncond)`` where
guided, its conditional output otherwise. Multistep samplers keep per-row history
(their last data predictions, UniPC's corrected sample), allocated once per loop.

After step i the loop calls ``on_step(i, latents)`` with a function returning the
current latents (a GPU backend copies them to the host only when asked).
``on_step`` returns None to go on with every row, a list of the image rows to keep
(the loop drops the others with their conditioning, mask, noise and history), or
an empty list to stop. The loop returns the latents of the rows still kept, finite
or not: the pipeline checks them per request.

DeepCache (deep_cache.py): ``full`` [steps, 2n] says which conditioning rows run
the full ``unet`` at step i (None: all of them, every step); the others run
``unet_shallow`` on the deep feature their last full step output, which the loop
keeps per conditioning row. A step whose rows split between the graphs runs each
graph on its rows (``deep_cache.split_step``, each call padded to the profile's
smallest batch on its own) and puts the noise back in ``step_rows`` order.

Further per-row state (per-row weights) joins ``DenoiseBatch`` as more [n, ...] or
[steps, n] arrays, dropped with the rows by ``DenoiseBatch.keep``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from .errors import InputError
from .postprocess import check_finite
from .spec import EngineSpec, check_feeds

# on_step(step_index, latents) -> None (all rows) | row indices to keep | [] (stop)
StepCallback = Callable[[int, Callable[[], np.ndarray]], Optional[Sequence[int]]]
# fused(restore) -> {initializer name: array in its stored dtype and layout}: the weights of the key asked for,
# plus the base values of what the key `restore` (the one applied before; None: base; UNKNOWN_WEIGHTS: any) changed
FusedWeights = Callable[[Optional[Hashable]], Mapping[str, np.ndarray]]
UNKNOWN_WEIGHTS = ("weights unknown after a failed swap",)  # a weights_key no set has: the next swap rewrites all


class WeightSwapError(InputError):
    """This engine cannot change its weights (a plan built without --refit)."""


class Engine:
    """One component's runnable graph. Backends implement ``_execute``."""

    def __init__(self, spec: EngineSpec, source: Path):
        self.spec = spec
        self.source = Path(source)
        self.runs = 0
        self.rows = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, feeds: Mapping[str, np.ndarray], finite: bool = True) -> dict[str, np.ndarray]:
        """Check the feeds against the spec, run, check the outputs are finite. ``finite=False`` leaves that
        check to the caller: the denoising loops, whose rows belong to several requests, and the pipeline
        checks each request's rows (one request's overflow fails that request, not its batch)."""
        values = check_feeds(self.spec, feeds)
        self.runs += 1
        self.rows += int(feeds[self.spec.inputs[0].name].shape[0])
        outputs = self._execute(feeds, values)
        if finite:
            for name, value in outputs.items():
                check_finite(self.name, name, value)
        return outputs

    def _execute(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Run on feeds already checked; ``values`` are the dynamic dims they imply."""
        raise NotImplementedError

    # The weights the engine runs: None for the graph's (or plan's) own, else a key of lora.py.
    weights_key: Optional[Hashable] = None

    def use_weights(self, key: Optional[Hashable], fused: FusedWeights) -> None:
        """Run with the weights of ``key`` from now on (None: the base weights). ``fused`` computes them; a
        backend calls it only when it has no copy of them already."""
        raise WeightSwapError(f"{self.name}: this backend cannot swap weights")

    def drop_weights(self, unused: Callable[[Hashable], bool]) -> None:
        """Forget any kept copy of weights whose key ``unused(key)`` (an unloaded adapter)."""


@dataclass(frozen=True)
class DenoiseBatch:
    """The image rows of one denoising loop (see the module docstring)."""

    latents: np.ndarray  # [n, C, h, w]
    conditioning: Mapping[str, np.ndarray]  # UNet inputs [2n, ...]: uncond rows, then cond rows
    guidance: np.ndarray  # [n] float32
    cfg: np.ndarray  # [steps, n] bool
    noise: Optional[np.ndarray] = None  # [steps, n, C, h, w] float32 (stochastic samplers)
    full: Optional[np.ndarray] = None  # [steps, 2n] bool: conditioning rows on the full unet (DeepCache); None: all

    @property
    def n(self) -> int:
        return len(self.latents)

    def keep(self, rows: Sequence[int], latents: np.ndarray) -> "DenoiseBatch":
        """These image rows only, with ``latents`` as their current latents."""
        rows = list(rows)
        pairs = conditioning_rows(rows, self.n)
        return replace(self, latents=latents, conditioning={k: v[pairs] for k, v in self.conditioning.items()},
                       guidance=self.guidance[rows], cfg=self.cfg[:, rows],
                       noise=None if self.noise is None else self.noise[:, rows],
                       full=None if self.full is None else self.full[:, pairs])


class Backend:
    """A backend's engines and its denoising loop (see the module docstring)."""

    name = ""

    def __init__(self, engines: Mapping[str, Engine]):
        self.engines = dict(engines)

    def denoise(self, batch: DenoiseBatch, sampler, on_step: Optional[StepCallback] = None) -> np.ndarray:
        raise NotImplementedError

    def device_memory(self) -> dict:
        """Device bytes by kind; empty for a host backend."""
        return {}

    def batch_done(self) -> None:
        """Called by the pipeline after each batch; nothing to do for most backends."""


def conditioning_rows(keep: Sequence[int], n: int) -> list[int]:
    """The conditioning rows of image rows ``keep`` out of ``n``: their uncond rows, then their cond rows."""
    keep = list(keep)
    return keep + [n + k for k in keep]


def step_rows(cfg_step: np.ndarray, fewest: int) -> tuple[np.ndarray, np.ndarray]:
    """(guided image rows, conditioning rows of the step's UNet batch): the guided images' uncond rows, every
    image's cond row, then copies of the last row up to ``fewest`` (a static profile's batch)."""
    n = len(cfg_step)
    guided = np.flatnonzero(cfg_step)
    rows = np.concatenate([guided, n + np.arange(n)])
    if len(rows) < fewest:
        rows = np.concatenate([rows, np.full(fewest - len(rows), rows[-1])])
    return guided, rows


def guidance_column(guidance: np.ndarray) -> np.ndarray:
    """Per-row guidance [n] -> [n, 1, 1, 1] float32, to broadcast over the latents."""
    return np.asarray(guidance, dtype=np.float32).reshape(-1, 1, 1, 1)


__all__ = ["Backend", "DenoiseBatch", "Engine", "FusedWeights", "StepCallback", "UNKNOWN_WEIGHTS", "WeightSwapError",
           "conditioning_rows", "guidance_column", "step_rows"]
