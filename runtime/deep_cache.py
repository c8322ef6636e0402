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

import re
from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .spec import SHALLOW_UNET

DEFAULT_INTERVAL = 1  # off: every step runs the full UNet
MAX_INTERVAL = 1000  # past the step count every step after the first is shallow; the server's bound too
BRANCH_LAYERS = 3  # DeepCache's cache_branch_id = 3 * block + layer
_BLOCK_MODULE = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


class DeepCacheInputError(InputError):
    """A deep_cache_interval that is not an int >= 1, or > 1 on a folder without the shallow UNet."""

    param = "deep_cache_interval"  # the request field a server names in its 400


def check_interval(value, folder) -> int:
    """``deep_cache_interval`` as an int in [1, MAX_INTERVAL] (None: the default, off); > 1 needs ``folder``'s
    unet_shallow."""
    if value is None:
        return DEFAULT_INTERVAL
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DeepCacheInputError(f"pipeline: deep_cache_interval must be an int >= 1 (1: off), found {value!r}")
    if not 1 <= value <= MAX_INTERVAL:
        raise DeepCacheInputError(f"pipeline: deep_cache_interval must be in [1, {MAX_INTERVAL}] (1: off), found {value}")
    if value > 1 and SHALLOW_UNET not in folder.files:
        raise DeepCacheInputError(
            f"pipeline: deep_cache_interval {value} needs DeepCache's shallow UNet ({SHALLOW_UNET}), which "
            f"{folder.root} does not hold: export without --no-deep-cache (and rebuild the engines), or use "
            "deep_cache_interval 1")
    return int(value)


def skipped(block: int, layer: int, kind: str, branch: int) -> bool:
    """Whether DeepCache reuses module (``block``, ``layer``) of ``kind`` ("down" | "mid" | "up") on a step it
    skips: DeepCacheSDHelper.is_skip_step without its step test. Up blocks and layers count from the output."""
    cache_block, cache_layer = divmod(branch, BRANCH_LAYERS)
    if kind == "mid" or block > cache_block:
        return True
    if block < cache_block:
        return False
    return layer >= cache_layer if kind == "down" else layer > cache_layer


def in_shallow_unet(module: str, branch: int, blocks: int, layers_per_block: int) -> bool:
    """Whether the diffusers UNet module ``module`` (a dotted path) is computed by unet_shallow at ``branch``:
    the modules outside every block (conv_in, the time and added embeddings, conv_out) are, the mid block is not."""
    if module.startswith("mid_block."):
        return False
    found = _BLOCK_MODULE.match(module)
    if found is None:
        return True
    side, index, kind, layer = found.group(1), int(found.group(2)), found.group(3), int(found.group(4))
    if side == "down":
        return not skipped(index, layers_per_block if kind == "downsamplers" else layer, "down", branch)
    layer = 0 if kind == "upsamplers" else layers_per_block - layer  # an up block has layers_per_block + 1 layers
    return not skipped(blocks - 1 - index, layer, "up", branch)


def check_loras(modules_by_adapter: dict, dims, layers_per_block: int) -> None:
    """A LoRA that changes a module of unet_shallow cannot run under DeepCache: the shallow graph keeps the base
    weights (LoRA fuses into the full unet only). {adapter name: its UNet modules} -> DeepCacheInputError."""
    blocks = dims.latent_multiple.bit_length()  # latent sizes divide by 2 ** (blocks - 1)
    for name, modules in modules_by_adapter.items():
        inside = sorted(m for m in modules if in_shallow_unet(m, dims.deep_cache_branch, blocks, layers_per_block))
        if inside:
            raise DeepCacheInputError(
                f"pipeline: LoRA {name!r} changes {len(inside)} module(s) of DeepCache's shallow UNet (e.g. "
                f"{inside[0]}), which runs the base weights: use deep_cache_interval 1 with it, or an adapter of the "
                "inner blocks only")


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


__all__ = ["BRANCH_LAYERS", "DEFAULT_INTERVAL", "DeepCacheInputError", "check_interval", "check_loras", "full_mask",
           "in_shallow_unet", "pad_rows", "row_mask", "skipped", "split_step"]
