"""CLIP image preprocessing for the IP-Adapter image encoder, in PIL + numpy.

Reproduces transformers' ``CLIPImageProcessor`` on its PIL backend
(``CLIPImageProcessorPil``, the behaviour of the "slow" processor the
reference used; transformers 5 defaults to a torchvision backend whose
antialiased bicubic differs slightly):

1. convert to RGB: images with an alpha band or a ``transparency`` entry are
   composited onto white (transformers 5; transformers 4 called
   ``image.convert("RGB")``, which drops alpha), everything else is
   ``image.convert("RGB")``. One deliberate difference: 16-bit grayscale
   (PIL modes ``I;16*``, and ``I`` holding values above 255) is scaled to 8 bits
   first; PIL's ``convert("RGB")``, and so transformers, clips every value above
   255 to white, which turns a 16-bit picture into a white square;
2. resize so the shortest side is ``size`` (the long side is
   ``int(size * long / short)``, truncated) with PIL bicubic;
3. centre crop ``crop_size`` at offsets ``(H - h) // 2``, ``(W - w) // 2``;
4. ``uint8 * (1/255)`` in float64, cast to float32, then ``(x - mean) / std``
   in float32.

Files and bytes are opened with EXIF orientation applied (as diffusers'
``load_image`` does; PIL images are used as given, as the pipeline does) and checked: unreadable, truncated, non-image, empty and oversized
inputs raise ``ImageInputError`` naming the file.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError
from .spec import ModelDims

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 64_000_000  # larger files are refused before decoding (decompression bombs)

ImageSource = Union[str, Path, bytes, Image.Image]


class ImageInputError(InputError):
    """A reference image cannot be read or is unusable."""


class PreprocessConfigError(InputError):
    """preprocessor_config.json asks for something this preprocessing does not reproduce."""


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP preprocessing settings; the defaults are Kolors' IP-Adapter-Plus (ViT-L/14-336)."""

    size: int = ModelDims.image_size  # shortest side after resizing
    crop_size: tuple = (ModelDims.image_size, ModelDims.image_size)  # (height, width)
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dict(cls, config: Mapping, source: str = "preprocessor config") -> "ClipPreprocess":
        """Read a transformers ``preprocessor_config.json`` dict of a CLIP image processor."""
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(key, True) is not True:
                raise PreprocessConfigError(
                    f"{source}: {key}={config[key]!r} is not supported; the runtime always resizes, crops, "
                    "rescales, normalises and converts to RGB like CLIPImageProcessor's defaults"
                )
        size = config.get("size", cls.size)
        if isinstance(size, Mapping):
            if "shortest_edge" not in size:
                raise PreprocessConfigError(f"{source}: size {size} is not supported, expected {{'shortest_edge': N}}")
            size = size["shortest_edge"]
        crop = config.get("crop_size", cls.crop_size)
        if isinstance(crop, Mapping):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        made = cls(
            size=int(size),
            crop_size=tuple(int(c) for c in crop),
            mean=tuple(float(m) for m in config.get("image_mean", cls.mean)),
            std=tuple(float(s) for s in config.get("image_std", cls.std)),
            rescale_factor=float(config.get("rescale_factor", cls.rescale_factor)),
            resample=int(config.get("resample", cls.resample)),
        )
        if len(made.mean) != 3 or len(made.std) != 3 or min(made.std) <= 0:
            raise PreprocessConfigError(f"{source}: expected 3 means and 3 positive stds, found {made.mean} / {made.std}")
        if made.size < 1 or min(made.crop_size) < 1 or max(made.crop_size) > made.size:
            raise PreprocessConfigError(
                f"{source}: expected 1 <= crop_size {made.crop_size} <= size {made.size}; a crop larger than the "
                "resized image would need the zero padding transformers adds, which the runtime does not reproduce"
            )
        return made

    @classmethod
    def from_file(cls, path: str | Path) -> "ClipPreprocess":
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PreprocessConfigError(f"preprocessor config {path}: cannot read it as JSON ({err})") from err
        return cls.from_dict(config, source=str(path))

    @classmethod
    def of_folder(cls, folder) -> "ClipPreprocess":
        """A model folder's: its preprocessor_config.json when it has one, else the manifest's runtime constants;
        checked against the image encoder's input size."""
        config = folder.root / "image_processor" / "preprocessor_config.json"
        if config.is_file():
            clip = cls.from_file(config)
        else:
            size = int(folder.runtime.get("image_size", folder.model_dims.image_size))
            clip = cls(size=size, crop_size=(size, size), mean=tuple(folder.runtime.get("image_mean", cls.mean)),
                       std=tuple(folder.runtime.get("image_std", cls.std)))
        want = folder.model_dims.image_size
        if tuple(clip.crop_size) != (want, want):
            raise PreprocessConfigError(
                f"{config}: crop_size {clip.crop_size} differs from the image encoder's input {want}x{want}")
        return clip

    def __call__(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Images -> pixel_values, float32 [B, 3, crop_h, crop_w]."""
        if isinstance(images, (str, Path, bytes, Image.Image)):
            images = [images]
        if len(images) == 0:
            raise ImageInputError("image preprocessing: expected at least one image, found none")
        batch = []
        for source in images:
            image = load_image(source)
            try:
                batch.append(self.pixels(image))
            except (OSError, ValueError) as err:
                raise ImageInputError(
                    f"image {_name(source)}: cannot convert mode {image.mode} to RGB and resize it ({err})"
                ) from err
        return np.stack(batch)  # [B, 3, crop_h, crop_w]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One loaded image -> float32 [3, crop_h, crop_w]."""
        rgb = to_rgb(image)
        width, height = rgb.size
        new_h, new_w = resize_size(height, width, self.size)
        rgb = rgb.resize((new_w, new_h), resample=self.resample)
        top, left = (new_h - self.crop_size[0]) // 2, (new_w - self.crop_size[1]) // 2
        crop = np.asarray(rgb)[top : top + self.crop_size[0], left : left + self.crop_size[1]]  # [h, w, 3] uint8
        scaled = (crop.astype(np.float64) * self.rescale_factor).astype(np.float32)
        normed = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normed.transpose(2, 0, 1))  # [3, h, w]


def resize_size(height: int, width: int, size: int) -> tuple:
    """(height, width) with the shortest side ``size``; transformers' get_resize_output_image_size."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_8bit_gray(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L": round(value * 255 / 65535), values clipped to [0, 65535]."""
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers 5 convert_to_rgb: alpha (or palette transparency) composited onto white; 16-bit
    grayscale scaled to 8 bits first (PIL's convert clips it)."""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.getextrema()[1] > 255):
        image = to_8bit_gray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _name(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<PIL image {getattr(source, 'mode', '?')} {getattr(source, 'size', '?')}>"


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and decode a path or encoded bytes with EXIF orientation applied
    (as diffusers' ``load_image``); a PIL image is used as given, as the
    diffusers pipeline does."""
    name = _name(source)
    if isinstance(source, (str, Path)):
        if str(source).lower().startswith(("http://", "https://", "ftp://", "s3://", "gs://", "data:")):
            raise ImageInputError(f"image {name}: a URL; kolors-trt reads local files only: download it first")
        if Path(source).is_dir():
            raise ImageInputError(f"image {name}: is a folder; pass an image file (PNG, JPEG, WebP, ...)")
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, Path, bytes)):
        image = _open(source, name, max_pixels)
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageInputError(f"image {name}: cannot apply its EXIF orientation ({err})") from err
    else:
        raise ImageInputError(
            f"image {name}: expected a file path, encoded image bytes or a PIL image, found {type(source).__name__}"
        )
    if image.width < 1 or image.height < 1:
        raise ImageInputError(f"image {name}: has size {image.width}x{image.height}, expected at least 1x1 pixels")
    return image


def _open(source, name: str, max_pixels: int) -> Image.Image:
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; ours (max_pixels) is checked below, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise ImageInputError(
                f"image {name}: {image.width}x{image.height} is {pixels / 1e6:.1f} megapixels, over the "
                f"{max_pixels / 1e6:.0f} MP limit (a decompression bomb guard); downscale it first"
            )
        image.load()
    except ImageInputError:
        raise
    except FileNotFoundError as err:
        raise ImageInputError(f"image {name}: file not found") from err
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"image {name}: refused as a decompression bomb ({err}); downscale it first") from err
    except Image.UnidentifiedImageError as err:
        raise ImageInputError(f"image {name}: not an image file PIL can read (PNG, JPEG, WebP, ...)") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageInputError(f"image {name}: cannot decode it ({err}); the file may be truncated or corrupt") from err
    logger.debug("loaded %s: %s %dx%d", name, image.mode, image.width, image.height)
    return image


def preprocess(images: Sequence[ImageSource]) -> np.ndarray:
    """Kolors' default CLIP preprocessing: float32 [B, 3, 336, 336]."""
    return ClipPreprocess()(images)


__all__ = [
    "ClipPreprocess",
    "ImageInputError",
    "PreprocessConfigError",
    "load_image",
    "preprocess",
    "resize_size",
    "to_8bit_gray",
    "to_rgb",
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_PIXELS",
]
