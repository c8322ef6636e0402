"""DeepCache at run time: which UNet graph each UNet row runs at each step, and the split of a step's UNet
batch between the two graphs.

DeepCache's uniform skip mode (the ``DeepCache`` package's ``DeepCacheSDHelper``,
``skip_mode="uniform"``): with ``deep_cache_interval`` N, a UNet row runs the full
``unet`` at step i when ``(i - first) % N == 0``, ``first`` being the first step the
row is evaluated at, and otherwise ``unet_shallow`` fed the deep feature the row's
last full step output. N = 1 is off (every step full, today's loop).

The cache is per UNet row, not per batch: an image's conditional and unconditional
branch each keep their own feature. Under a guidance interval the unconditional row
is evaluated on a run of steps that need not start at 0; it starts its own cycle
there (its first evaluation is full: it has no feature yet). Because each row's graph
is its own choice and the UNet treats batch rows independently, requests with
different intervals (or phases) share a UNet batch exactly: a step whose rows split
between the graphs runs each graph on its rows.

The mask is ``DenoiseBatch.full`` [steps, 2n] (conditioning rows: uncond rows, then
cond rows); both loops (backend_ort.py on the host, trt_loop.py on the device) follow
``split_step``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .spec import SHALLOW_UNET

DEFAULT_INTERVAL = 1  # off: every step runs the full UNet


class DeepCacheInputError(InputError):
    """A deep_cache_interval that is not an int >= 1, or > 1 on a folder without the shallow UNet."""

    param = "deep_cache_interval"  # the request field a server names in its 400


def check_interval(value, folder) -> int:
    """``deep_cache_interval`` as an int >= 1 (None: the default, off); > 1 needs ``folder``'s unet_shallow."""
    if value is None:
        return DEFAULT_INTERVAL
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DeepCacheInputError(f"pipeline: deep_cache_interval must be an int >= 1 (1: off), found {value!r}")
    if value < 1:
        raise DeepCacheInputError(f"pipeline: deep_cache_interval must be >= 1 (1: off), found {value}")
    if value > 1 and SHALLOW_UNET not in folder.files:
        raise DeepCacheInputError(
            f"pipeline: deep_cache_interval {value} needs DeepCache's shallow UNet ({SHALLOW_UNET}), which "
            f"{folder.root} does not hold: export without --no-deep-cache (and rebuild the engines), or use "
            "deep_cache_interval 1")
    return int(value)


def row_mask(evaluated: np.ndarray, interval: int) -> np.ndarray:
    """[steps] bool: the steps a row evaluated at ``evaluated`` runs the full UNet."""
    steps = np.flatnonzero(evaluated)
    full = np.zeros(len(evaluated), bool)
    if len(steps):
        full[steps] = (steps - steps[0]) % interval == 0
    return full


def full_mask(cfg: np.ndarray, intervals: Sequence[int]) -> Optional[np.ndarray]:
    """[steps, 2n] bool (uncond rows, then cond rows) of n image rows with guidance mask ``cfg`` [steps, n] and
    intervals ``intervals`` [n]; None when every interval is 1 (every step full)."""
    if all(interval == 1 for interval in intervals):
        return None
    steps, n = cfg.shape
    everywhere = np.ones(steps, bool)
    uncond = [row_mask(cfg[:, k], interval) for k, interval in enumerate(intervals)]
    cond = [row_mask(everywhere, interval) for interval in intervals]
    return np.stack(uncond + cond, axis=1)


def split_step(rows: np.ndarray, count: int, full_step: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the full graph's rows, positions of the shallow graph's) among the first ``count`` of a
    step's UNet rows ``rows`` (conditioning row ids, engine.step_rows, before padding)."""
    positions = np.arange(count)
    if full_step is None:
        return positions, positions[:0]
    full = full_step[rows[:count]]
    return positions[full], positions[~full]


def pad_rows(rows: np.ndarray, fewest: int) -> np.ndarray:
    """``rows`` with copies of the last up to ``fewest`` (a static profile's batch)."""
    if 0 < len(rows) < fewest:
        return np.concatenate([rows, np.full(fewest - len(rows), rows[-1])])
    return rows


__all__ = ["DEFAULT_INTERVAL", "DeepCacheInputError", "check_interval", "full_mask", "pad_rows", "row_mask",
           "split_step"]
