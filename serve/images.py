"""Images out: the final images in the requested format with their parameters, and
the previews a stream sends between denoising steps.

PNG carries the parameters as text chunks (runtime.postprocess.png_info, as the CLI
writes them); JPEG and WebP carry the same JSON in EXIF ImageDescription.

Previews run no VAE: the SDXL latent space (Kolors uses the SDXL VAE) maps to RGB
nearly linearly, so a 4x3 matrix and a bias turn the current latents into a picture
at 1/8 of the size (the factors ComfyUI uses for SDXL previews). Cheap enough for
the worker thread to do after every step.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from typing import Mapping, Optional

import numpy as np
from PIL import Image

from kolors_trt.runtime.postprocess import png_info

logger = logging.getLogger(__name__)

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXIF_IMAGE_DESCRIPTION = 0x010E
# SDXL latents [4] -> RGB in about [-1, 1]
LATENT_RGB = np.array([[0.3651, 0.4232, 0.4341],
                       [-0.2533, -0.0042, 0.1068],
                       [0.1076, 0.1111, -0.0362],
                       [-0.3165, -0.2492, -0.2188]], dtype=np.float32)
LATENT_RGB_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)


def encode(image: Image.Image, output_format: str, compression: Optional[int] = None,
           parameters: Optional[Mapping] = None) -> bytes:
    """One image as PNG, JPEG or WebP bytes; ``compression`` is OpenAI's output_compression (0-100, the quality
    of JPEG and WebP; default 100)."""
    buffer = io.BytesIO()
    fmt = FORMATS[output_format]
    if fmt == "PNG":
        image.save(buffer, format=fmt, pnginfo=png_info(parameters) if parameters else None)
    else:
        exif = Image.Exif()
        if parameters:
            exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(dict(parameters), sort_keys=True, default=str)
        image.save(buffer, format=fmt, quality=100 if compression is None else compression, exif=exif.tobytes())
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def preview(latents: np.ndarray) -> list:
    """Latents [n, 4, h, w] -> n RGB previews of h x w pixels, by the linear latent-to-RGB projection."""
    x = np.asarray(latents, dtype=np.float32)
    rgb = np.einsum("nchw,cr->nhwr", x, LATENT_RGB) + LATENT_RGB_BIAS  # [n, h, w, 3] in about [-1, 1]
    pixels = np.clip((rgb + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return [Image.fromarray(np.ascontiguousarray(p), "RGB") for p in pixels]


__all__ = ["FORMATS", "b64", "encode", "preview"]
