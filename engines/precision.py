"""Which GPUs a plan of a given precision can serve: FP8 needs compute capability 8.9 or later.

TensorRT-RTX 1.7 builds an FP8 Q/DQ graph for SM89 and SM120 only; asked for the default
set (SM80, SM86, SM89, SM120) it "succeeds" while dropping SM80/SM86 with a VERBOSE-only
message, so a manifest listing the requested set would promise GPUs the plan cannot run on.
The build therefore checks first: below 8.9 an FP8 engine is refused with the fix named, or,
with ``drop_unsupported``, built for the supported subset, and the manifest lists exactly
that subset. INT8 Q/DQ builds for every capability of the default set (SM75 and later).
"""

from __future__ import annotations

import logging
from typing import Sequence

from kolors_trt.runtime.errors import InputError

log = logging.getLogger(__name__)

FP8_MIN_COMPUTE_CAPABILITY = 89  # Ada (SM89), Hopper (SM90), Blackwell (SM100, SM120)


class UnsupportedTargetError(InputError):
    """A component's precision cannot run on a requested compute capability."""


def _number(cc: str) -> int:
    digits = "".join(ch for ch in cc if ch.isdigit())
    return int(digits) if digits else 0


def supported(precision: str, compute_capability: str) -> bool:
    return precision != "fp8" or _number(compute_capability) >= FP8_MIN_COMPUTE_CAPABILITY


def plan_targets(component: str, precision: str, requested: Sequence[str], explicit: bool,
                 drop_unsupported: bool) -> list[str]:
    """The compute capabilities the plan of ``component`` is built for: ``requested`` (explicit
    --compute-capability values, or the target's default set), less those ``precision`` cannot run
    on when ``drop_unsupported``; otherwise such a capability is an UnsupportedTargetError."""
    requested = list(requested)
    below = [cc for cc in requested if not supported(precision, cc)]
    if not below:
        return requested
    keep = [cc for cc in requested if cc not in below]
    where = "--compute-capability" if explicit else "the default set"
    if drop_unsupported and keep:
        log.warning("%s: %s needs compute capability 8.9 or later; building for %s only (not %s)",
                    component, precision, ", ".join(keep), ", ".join(below))
        return keep
    fix = ("pass --compute-capability 8.9 and/or 12.0" + (", or --drop-unsupported-targets to build the UNet "
           f"for {', '.join(keep)} only" if keep else "") + ", or export the UNet at int8 or fp16")
    raise UnsupportedTargetError(
        f"engines: an {precision} {component} needs compute capability 8.9 or later; {where} has "
        f"{', '.join(below)} ({', '.join(requested)}): {fix}")
