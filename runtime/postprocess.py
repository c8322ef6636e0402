"""Decoded VAE output -> 8-bit RGB, as diffusers' ``VaeImageProcessor.postprocess``;
finite checks between stages; PNG files with their generation parameters.

diffusers (output_type="pil"): ``(x / 2 + 0.5).clamp(0, 1)`` in float32, to
NHWC, ``(x * 255).round().astype("uint8")`` in numpy (round half to even).
The same float32 operations in the same order give the same bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import ServiceError
from .manifest import atomic_path

logger = logging.getLogger(__name__)

PNG_PARAMETERS_KEY = "kolors-trt"  # PNG tEXt key holding the generation parameters as JSON


class NonFiniteError(ServiceError):
    """A stage produced NaN or Inf (typically an fp16 overflow inside an engine)."""


def check_finite(stage: str, name: str, array: np.ndarray) -> None:
    """Raise NonFiniteError naming the stage and tensor when ``array`` holds NaN or Inf."""
    if np.isfinite(array).all():
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    raise NonFiniteError(
        f"{stage}: output {name!r} {tuple(array.shape)} has {bad} NaN/Inf values; an fp16 graph or engine "
        f"probably overflowed: rebuild {stage} at fp32 (export --component-precision {stage}=fp32) and compare"
    )


def non_finite_rows(stage: str, name: str, rows: dict) -> dict:
    """{request index: NonFiniteError} for the requests whose arrays (``rows``: index -> array) hold NaN or Inf:
    a batch's rows belong to several requests, and each fails on its own."""
    failed = {}
    for index, array in rows.items():
        if np.isfinite(array).all():
            continue
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        failed[index] = NonFiniteError(
            f"{stage}: the {name} of request {index} {tuple(array.shape)} have {bad} NaN/Inf values; this request "
            "failed alone (the others of its batch went on): extreme settings (guidance_scale, ip_adapter_scale) "
            f"or an fp16 overflow in {stage}; retry with milder settings, or rebuild {stage} at fp32 and compare")
        logger.warning("%s", failed[index])
    return failed


def denormalize(images: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1], float32 (diffusers: ``(x / 2 + 0.5).clamp(0, 1)``)."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(x / np.float32(2) + np.float32(0.5), np.float32(0), np.float32(1))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """VAE output float32 [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"postprocess: expected VAE output [B, 3, H, W], found shape {images.shape}")
    x = denormalize(images).transpose(0, 2, 3, 1)  # [B, H, W, 3]
    return (x * np.float32(255)).round().astype(np.uint8)


def to_pil(images: np.ndarray) -> list:
    """uint8 [B, H, W, 3] -> PIL RGB images."""
    return [Image.fromarray(np.ascontiguousarray(img), mode="RGB") for img in images]


def _text(value) -> str:
    """A tEXt value: PNG text chunks end their keyword at a NUL byte, so a NUL inside is written as \\x00."""
    return ("" if value is None else str(value)).replace("\x00", "\\x00")


def png_info(parameters: Mapping) -> PngInfo:
    """PNG text chunks: every parameter as its own key, plus all of them as JSON."""
    info = PngInfo()
    for key, value in parameters.items():
        info.add_text(_text(key), _text(value))
    info.add_text(PNG_PARAMETERS_KEY, json.dumps(dict(parameters), sort_keys=True, default=str))
    return info


def save_png(image: Image.Image, path: str | Path, parameters: Mapping) -> Path:
    """Write ``image`` as a PNG with ``parameters`` in its text metadata, atomically: an interrupted
    write leaves the old file (or none), never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(parameters))
    logger.info("wrote %s", path)
    return path


def read_png_parameters(path: str | Path) -> dict:
    """The generation parameters a PNG written by save_png carries."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
    return json.loads(text[PNG_PARAMETERS_KEY]) if PNG_PARAMETERS_KEY in text else {}


__all__ = [
    "NonFiniteError",
    "check_finite",
    "non_finite_rows",
    "denormalize",
    "to_uint8",
    "to_pil",
    "png_info",
    "save_png",
    "read_png_parameters",
    "PNG_PARAMETERS_KEY",
]
