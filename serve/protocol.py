"""Request bodies of the Images API and their translation into a GenerationRequest.

OpenAI's fields (prompt, n, size, response_format, output_format, ...) keep
OpenAI's names and meaning; what OpenAI lacks comes as extra body fields with
diffusers' names (negative_prompt, seed, num_inference_steps, guidance_scale,
ip_adapter_scale) plus reference_id. Unknown fields are refused, so a misspelt
extra (``guidence_scale``) is a 400 naming it rather than a silently ignored knob.

``size`` is OpenAI's WIDTHxHEIGHT ("1152x896" is landscape); runtime.spec.parse_size
reads the CLI's HEIGHTxWIDTH and is deliberately not used here.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolors_trt.runtime.request import MAX_SEED, GenerationRequest

from .errors import NotFoundError, ServeInputError

logger = logging.getLogger(__name__)

REFERENCE_ID = r"^[0-9a-f]{64}$"  # a content id: sha256 hex, never a path


class ImageParams(BaseModel):
    """The body of POST /v1/images/generations (JSON) and the fields of /v1/images/edits (multipart)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = Field(1, ge=1)
    size: str = "auto"
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Optional[int] = Field(None, ge=0, le=100)
    stream: bool = False
    partial_images: Optional[int] = Field(None, ge=0)
    model: Optional[str] = None
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    # accepted for compatibility; they have no effect on this model
    quality: Optional[Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]] = None
    background: Optional[Literal["auto", "opaque"]] = None
    style: Optional[Literal["vivid", "natural"]] = None
    moderation: Optional[Literal["auto", "low"]] = None
    input_fidelity: Optional[Literal["high", "low"]] = None
    # diffusers' names (None: the model folder's manifest default)
    negative_prompt: Optional[str] = None
    seed: Optional[int] = Field(None, ge=0, lt=MAX_SEED)
    num_inference_steps: Optional[int] = Field(None, ge=1)
    guidance_scale: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    ip_adapter_scale: Optional[float] = Field(None, allow_inf_nan=False)
    reference_id: Optional[str] = Field(None, pattern=REFERENCE_ID)


def validation_error(err: ValidationError | list) -> ServeInputError:
    """The first problem of a pydantic validation as one typed error naming the field (OpenAI's ``param``)."""
    problems = err.errors() if isinstance(err, ValidationError) else list(err)
    first = problems[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"{param}: unknown field; see GET /docs for the fields this server takes"
    elif first.get("type") == "missing":
        message = f"{param}: required"
    else:
        shown = first.get("input")
        shown = repr(shown) if len(repr(shown)) <= 80 else f"a {type(shown).__name__}"
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}, found {shown}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return ServeInputError(message, param)


def parse_form(fields: dict) -> ImageParams:
    """Multipart fields (strings, as the openai client sends them) -> ImageParams."""
    try:
        return ImageParams.model_validate(fields)
    except ValidationError as err:
        raise validation_error(err) from None


def parse_size(text: str, folder) -> tuple[Optional[int], Optional[int]]:
    """OpenAI's "WIDTHxHEIGHT" -> (height, width), checked against the folder's profile; "auto" -> (None, None),
    the manifest default."""
    if text == "auto":
        return None, None
    w, sep, h = text.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise ServeInputError(f"size: expected WIDTHxHEIGHT (e.g. 1152x896 is landscape) or 'auto', found {text!r}",
                              "size")
    width, height = int(w), int(h)
    unit, profile = folder.size_multiple, folder.profile
    for name, value, r in (("width", width, profile.width), ("height", height, profile.height)):
        if value % unit or not r.contains(value):
            raise ServeInputError(f"size: {name} {value} of {text!r} is not allowed; each side must be a multiple of "
                                  f"{unit} in [{r.min}, {r.max}] (this model's profile), given as WIDTHxHEIGHT", "size")
    return height, width


def check_limits(params: ImageParams, config, pipe) -> None:
    """The checks with HTTP names: prompt length, n against the profile, model name, options this server lacks."""
    if params.model is not None and params.model != config.model_id:
        raise NotFoundError(f"model: {params.model!r} is not served here; this server serves {config.model_id!r} "
                            "(GET /v1/models)", "model")
    for name in ("prompt", "negative_prompt"):
        text = getattr(params, name)
        if text is not None and len(text) > config.max_prompt_chars:
            raise ServeInputError(f"{name}: {len(text)} characters, at most {config.max_prompt_chars} are taken "
                                  "(the text encoder reads 256 tokens)", name)
    guidance = pipe.defaults.get("guidance_scale") if params.guidance_scale is None else params.guidance_scale
    most = pipe.batch_limits(guidance > 1)[1] if guidance is not None else params.n  # no default: the runtime says
    if params.n > most:
        raise ServeInputError(f"n: {params.n} images, this model's profile takes 1 to {most} per request", "n")
    if params.partial_images is not None and not params.stream:
        raise ServeInputError("partial_images: only with stream=true", "partial_images")


def generation_request(params: ImageParams, pipe, image: Optional[bytes], tokens) -> GenerationRequest:
    """The GenerationRequest of a checked body. Without a reference (image or reference_id) the request runs at
    IP scale 0: plain Kolors."""
    height, width = parse_size(params.size, pipe.folder)
    ip_scale = params.ip_adapter_scale
    if image is None and tokens is None:
        if ip_scale not in (None, 0):
            raise ServeInputError("ip_adapter_scale: needs a reference image; send it to /v1/images/edits as `image`, "
                                  "or pass reference_id (POST /v1/references)", "ip_adapter_scale")
        ip_scale = 0.0
    return GenerationRequest(params.prompt, image, params.negative_prompt, height, width, params.num_inference_steps,
                             params.guidance_scale, ip_scale, params.seed, params.n, tokens)


def preview_steps(partial_images: Optional[int], steps: int) -> frozenset:
    """The denoising steps (0-based) after which a stream sends a preview: every step when partial_images is
    None, else that many spread evenly (the last at the last step)."""
    count = steps if partial_images is None else min(partial_images, steps)
    return frozenset((i + 1) * steps // count - 1 for i in range(count)) if count else frozenset()


__all__ = ["ImageParams", "REFERENCE_ID", "check_limits", "generation_request", "parse_form", "parse_size",
           "preview_steps", "validation_error"]
