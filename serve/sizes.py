"""The sizes a model card offers (``sizes`` in GET /v1/models), as OpenAI's "WIDTHxHEIGHT".

Kolors was trained on a few aspect-ratio buckets (runtime.spec.KOLORS_SIZES, about one
megapixel each); its images are best there. A folder's profile may take other sizes:
an export folder on ONNX Runtime takes every multiple of the size unit up to its limit,
and on a CPU a 1024x1024 image with the real weights takes minutes, so a user checking
a deployment there wants a small size. The card therefore lists the buckets and the
buckets scaled down by powers of two, each kept only where both sides stay exact
multiples of the size unit (the bucket's aspect ratio exactly) and the profile takes it,
plus the manifest's default size and the profile's optimum, largest first. Any other
size the profile takes is still accepted by the API; this is the list to pick from.
"""

from __future__ import annotations

import logging

from kolors_trt.runtime.spec import KOLORS_SIZES

logger = logging.getLogger(__name__)


def size_text(height: int, width: int) -> str:
    return f"{width}x{height}"


def offered_sizes(folder, defaults: dict) -> list[str]:
    """"WIDTHxHEIGHT" strings the folder's profile takes: Kolors' buckets at 1, 1/2, 1/4, ... of their sides,
    the manifest default and the profile optimum; largest area first, each once."""
    unit, profile = folder.size_multiple, folder.profile
    smallest = min(profile.height.min, profile.width.min)
    found: dict = {}  # (height, width) -> None, in the order found
    scale = 1
    while max(min(h, w) for h, w in KOLORS_SIZES) // scale >= smallest:
        for h, w in KOLORS_SIZES:
            if h % scale == 0 and w % scale == 0:
                found.setdefault((h // scale, w // scale), None)
        scale *= 2
    found.setdefault((defaults.get("height"), defaults.get("width")), None)
    found.setdefault((profile.height.opt, profile.width.opt), None)
    taken = [(h, w) for h, w in found
             if isinstance(h, int) and isinstance(w, int) and h % unit == 0 and w % unit == 0
             and profile.height.contains(h) and profile.width.contains(w)]
    return [size_text(h, w) for h, w in sorted(taken, key=lambda hw: -hw[0] * hw[1])]


__all__ = ["offered_sizes", "size_text"]
