"""Request bodies of the Images API and their translation into a GenerationRequest.

The rules for fields, stated once:

- OpenAI's fields keep OpenAI's names, meanings and ranges: prompt, n (1 to 10, and at
  most the batch ceiling), size (WIDTHxHEIGHT or "auto"), response_format (b64_json),
  output_format, output_compression (0 to 100), stream, partial_images (0 to 3, default
  0, as OpenAI documents: a stream without previews), model, user. Those that change
  nothing for this model (quality, background "auto"/"opaque", style, moderation,
  input_fidelity, safety_identifier) are taken and ignored.
- What OpenAI lacks comes with diffusers' names, each bounded: negative_prompt, seed
  [0, 2**53) (JSON's exact integers; a request without one gets a random seed in that range,
  returned in ``parameters``), num_inference_steps [1, --max-steps], guidance_scale [0, 100] (ComfyUI's
  CFG range), ip_adapter_scale [0, 5] (ComfyUI IPAdapter's weight range, negatives left
  out), scheduler (a sampler name; GET /v1/models lists them), guidance_interval
  ([low, high] in sigma units, 0 <= low < high, finite; "LOW:HIGH" in a multipart form);
  deep_cache_interval [1, 1000] (DeepCache; above 1 only where the model card has
  ``deep_cache``: the folder holds the shallow UNet); reference_id on generations; and
  ``lora``, {adapter: weight} (at most 8 adapters, names as in GET /v1/loras, weights in
  [-10, 10]; a JSON object, or a JSON string in multipart). Values past the bounds are refused (400)
  before a request queues, so one request can no longer overflow a shared batch.
- Types are strict: a number takes a JSON number (not true, not "4"), a boolean takes
  true or false. Multipart fields are text: a number there is ASCII decimal digits
  (not "٤"), a boolean is true or false.
- An unknown field is ignored with a logged warning: OpenAI adds fields to its Images
  API, and a newer ``openai`` client sends them (complexity, frame_count, svg, ... in
  openai 3.x); such a client must keep working here. Except a near miss of one of this
  endpoint's own fields (difflib ratio >= ``TYPO_RATIO``: ``guidence_scale``,
  ``num_inference_step``, ``seeds``): a misspelt knob is refused with a 400 naming the
  field it resembles, never silently dropped.

A new request field (a sampler, a cache interval, a LoRA) is one typed, bounded line in
``ImageParams`` (JSON and multipart parsing, the typo rule and the OpenAPI document follow
from it) and its use in ``generation_request``.

``size`` is OpenAI's WIDTHxHEIGHT ("1152x896" is landscape); runtime.spec.parse_size
reads the CLI's HEIGHTxWIDTH and is deliberately not used here.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import secrets
import typing
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from kolors_trt.runtime import deep_cache
from kolors_trt.runtime.request import GenerationRequest, PipelineInputError, guidance_interval
from kolors_trt.runtime.samplers import SAMPLERS
from kolors_trt.runtime.tokenizer import check_text

from .errors import NotFoundError, ServeInputError

logger = logging.getLogger(__name__)

REFERENCE_ID = r"^[0-9a-f]{64}$"  # a content id: sha256 hex, never a path
SIZE = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"  # ASCII digits only; the folder's profile narrows it (size_pattern)
MAX_N = 10  # OpenAI's
MAX_SEED = 2**53 - 1  # JSON's exact integers: a seed the server returns survives any JSON client on its way back
TYPO_RATIO = 0.8
INT_TEXT = re.compile(r"[+-]?[0-9]+\Z")  # re's [0-9] is ASCII: "٤" is no digit here
FLOAT_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
BOOL_TEXT = {"true": True, "false": False}
MAX_DEEP_CACHE_INTERVAL = deep_cache.MAX_INTERVAL
MAX_SIGMA = 1e6  # a guidance interval's bounds: far above any schedule's sigma (Kolors' largest is 29)
_SIGMA = r"[0-9]{1,6}(\.[0-9]{1,9})?"  # below MAX_SIGMA, so the form and JSON take the same values
INTERVAL_TEXT = re.compile(f"{_SIGMA}:{_SIGMA}\\Z")  # guidance_interval in a form: LOW:HIGH, ASCII digits
MAX_LORAS = 8
LoraName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]  # a file stem
LoraWeight = Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)]


def _integral(value):
    """JSON has one number type: 4.0 is the integer 4 (JSON Schema says so too). Booleans and strings stay
    refused by the strict model."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


def _kind(annotation) -> type:
    """int, float, bool, str or list (of floats): what a field's value is, Optional and Literal taken off."""
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation)
    return str if origin is Literal else list if origin is list else dict if origin is dict else annotation


class ImageParams(BaseModel):
    """The fields of POST /v1/images/generations (JSON) and /v1/images/edits (multipart, with ``image``)."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str
    n: int = Field(1, ge=1, le=MAX_N)
    size: str = Field("auto", pattern=SIZE)
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Optional[int] = Field(None, ge=0, le=100)
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)
    model: Optional[str] = None
    user: Optional[str] = None
    # accepted for compatibility; they have no effect on this model
    safety_identifier: Optional[str] = None
    quality: Optional[Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]] = None
    background: Optional[Literal["auto", "opaque"]] = None
    style: Optional[Literal["vivid", "natural"]] = None
    moderation: Optional[Literal["auto", "low"]] = None
    # diffusers' names (None: the server's default, else the model folder's manifest default)
    negative_prompt: Optional[str] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: Optional[int] = Field(None, ge=1)  # at most --max-steps (check_limits)
    guidance_scale: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False)
    ip_adapter_scale: Optional[float] = Field(None, ge=0, le=5, allow_inf_nan=False)
    scheduler: Optional[Literal[tuple(SAMPLERS)]] = None
    guidance_interval: Optional[list[Annotated[float, Field(ge=0, le=MAX_SIGMA, allow_inf_nan=False)]]] = Field(
        None, min_length=2, max_length=2, description="[low, high] in sigma units, low < high: classifier-free "
        "guidance only at steps whose sigma is in (low, high]")
    lora: Optional[dict[LoraName, LoraWeight]] = Field(None, max_length=MAX_LORAS)  # needs --lora-dir
    deep_cache_interval: Optional[int] = Field(
        None, ge=1, le=MAX_DEEP_CACHE_INTERVAL, description="DeepCache: the full UNet every N steps, the shallow UNet "
        "on the cached deep feature between (1: off); above 1 where the model card says deep_cache")

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, value):
        try:
            return None if value is None else list(guidance_interval(value))  # the runtime's rule: 0 <= low < high
        except PipelineInputError as err:
            raise ValueError(str(err).removeprefix("pipeline: guidance_interval ").split(", found")[0]) from None

    @model_validator(mode="before")
    @classmethod
    def _json_integers(cls, data):
        if not isinstance(data, dict):
            return data
        return {name: _integral(value) if name in cls.model_fields and _kind(cls.model_fields[name].annotation)
                is int else value for name, value in data.items()}


class GenerationParams(ImageParams):
    """The JSON body of POST /v1/images/generations."""

    reference_id: Optional[str] = Field(None, pattern=REFERENCE_ID)


class EditParams(ImageParams):
    """The text fields of POST /v1/images/edits (the reference image is the upload ``image``)."""

    input_fidelity: Optional[Literal["high", "low"]] = None


def validation_error(err: ValidationError | list) -> ServeInputError:
    """The first problem of a pydantic validation as one typed error naming the field (OpenAI's ``param``)."""
    problems = err.errors() if isinstance(err, ValidationError) else list(err)
    first = problems[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        message = f"{param}: required"
    else:
        shown = first.get("input")
        shown = repr(shown) if len(repr(shown)) <= 80 else f"a {type(shown).__name__}"
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}, found {shown}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return ServeInputError(message, param)


_warned: set = set()  # unknown fields already logged (bounded: a client may send any name)
WARN_ONCE_MOST = 256


def check_unknown(params: ImageParams, endpoint: str) -> None:
    """The unknown-field rule (module docstring): a near miss of a known field is refused, the rest is ignored
    with a warning (once per endpoint and name)."""
    known = list(type(params).model_fields)
    for name in params.model_extra or {}:
        near = difflib.get_close_matches(name, known, n=1, cutoff=TYPO_RATIO)
        if near:
            raise ServeInputError(f"{name}: unknown field; did you mean {near[0]}? (GET /docs lists the fields)", name)
        if (endpoint, name) not in _warned and len(_warned) < WARN_ONCE_MOST:
            _warned.add((endpoint, name))
            logger.warning("%s: ignoring the unknown field %r (a newer OpenAI field this server does not use)",
                           endpoint, name)


def form_value(name: str, text: str, kind: type):
    """One multipart text field as its field's type: ASCII decimal numbers, true/false."""
    if kind is int and INT_TEXT.match(text) and len(text) <= 40:
        return int(text)
    if kind in (int, float) and FLOAT_TEXT.match(text) and len(text) <= 400:
        return _integral(float(text)) if kind is int else float(text)  # an int field refuses 2.5 in validation
    if kind is bool and text.lower() in BOOL_TEXT:
        return BOOL_TEXT[text.lower()]
    if kind is dict and len(text) <= 4096:  # a JSON object in a text field (lora)
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
    if kind is str:
        return text
    if kind is list and len(text) <= 400 and INTERVAL_TEXT.match(text):
        return [float(part) for part in text.split(":")]  # LOW:HIGH, the CLI's form
    what = {int: "an integer in ASCII digits", float: "a decimal number in ASCII digits", bool: "true or false",
            list: "LOW:HIGH, two decimal numbers in ASCII digits (at most 6 before the point)", dict: "a JSON object"}
    shown = repr(text) if len(text) <= 40 else f"{len(text)} characters"
    raise ServeInputError(f"{name}: expected {what[kind]}, found {shown}", name)


def parse_form(fields: dict, model: type = EditParams) -> ImageParams:
    """Multipart fields (text, as the openai client sends them) -> ``model``, by the same strict rules as JSON."""
    kinds = {name: _kind(f.annotation) for name, f in model.model_fields.items()}
    values = {name: form_value(name, text, kinds[name]) if name in kinds else text for name, text in fields.items()}
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise validation_error(err) from None


def allowed_sides(folder, name: str) -> list[int]:
    """The sizes one side (``height`` or ``width``) may take: multiples of the size unit within the profile."""
    unit, r = folder.size_multiple, getattr(folder.profile, name)
    return [v for v in range(-(-r.min // unit) * unit, r.max + 1, unit)]


def size_pattern(folder) -> str:
    """``size`` as a regular expression of exactly the sizes this folder takes (for the OpenAPI document)."""
    def alternatives(name):
        return "|".join(str(v) for v in allowed_sides(folder, name))

    return f"^(auto|({alternatives('width')})x({alternatives('height')}))$"


def parse_size(text: str, folder) -> tuple[Optional[int], Optional[int]]:
    """OpenAI's "WIDTHxHEIGHT" -> (height, width), checked against the folder's profile; "auto" -> (None, None),
    the server's default."""
    if text == "auto":
        return None, None
    w, sep, h = text.partition("x")
    if not sep or not INT_TEXT.match(w) or not INT_TEXT.match(h) or "+" in text or "-" in text:
        raise ServeInputError(f"size: expected WIDTHxHEIGHT (e.g. 1152x896 is landscape) or 'auto', found {text!r}",
                              "size")
    width, height = int(w), int(h)
    unit, profile = folder.size_multiple, folder.profile
    for name, value, r in (("width", width, profile.width), ("height", height, profile.height)):
        if value % unit or not r.contains(value):
            raise ServeInputError(f"size: {name} {value} of {text!r} is not allowed; each side must be a multiple of "
                                  f"{unit} in [{r.min}, {r.max}] (this model's profile), given as WIDTHxHEIGHT", "size")
    return height, width


def check_limits(params: ImageParams, config, pipe, ceilings: dict) -> None:
    """The checks that depend on the server: model name, prompt length, steps, n against the batch ceiling."""
    if params.model is not None and params.model != config.model_id:
        raise NotFoundError(f"model: {params.model!r} is not served here; this server serves {config.model_id!r} "
                            "(GET /v1/models)", "model")
    for name in ("prompt", "negative_prompt"):
        text = getattr(params, name)
        if text is None:
            continue
        if len(text) > config.max_prompt_chars:
            raise ServeInputError(f"{name}: {len(text)} characters, at most {config.max_prompt_chars} are taken "
                                  "(the text encoder reads 256 tokens)", name)
        check_text(name, text, lambda message, name=name: ServeInputError(message, name))  # what the tokenizer takes
    if params.num_inference_steps is not None and params.num_inference_steps > config.max_steps:
        raise ServeInputError(f"num_inference_steps: {params.num_inference_steps}, this server takes 1 to "
                              f"{config.max_steps} (--max-steps)", "num_inference_steps")
    guidance = pipe.defaults.get("guidance_scale") if params.guidance_scale is None else params.guidance_scale
    most = ceilings[guidance > 1] if guidance is not None else min(ceilings.values())
    if params.n > most:
        raise ServeInputError(f"n: {params.n} images, this server takes 1 to {most} per request (its batch "
                              "ceiling)", "n")


def generation_request(params: ImageParams, pipe, image: Optional[bytes], tokens, config) -> GenerationRequest:
    """The GenerationRequest of a checked body, with the server's defaults. Without a reference (image or
    reference_id) the request runs at IP scale 0: plain Kolors."""
    height, width = parse_size(params.size, pipe.folder)
    if height is None:
        height, width = config.default_hw
    steps = params.num_inference_steps if params.num_inference_steps is not None else config.default_steps
    ip_scale = params.ip_adapter_scale
    if image is None and tokens is None:
        if ip_scale not in (None, 0):
            raise ServeInputError("ip_adapter_scale: needs a reference image; send it to /v1/images/edits as `image`, "
                                  "or pass reference_id (POST /v1/references)", "ip_adapter_scale")
        ip_scale = 0.0
    seed = secrets.randbelow(MAX_SEED + 1) if params.seed is None else params.seed
    if params.lora and config.lora_dir is None:
        raise ServeInputError("lora: this server has no LoRA folder (start it with --lora-dir DIR)", "lora")
    return GenerationRequest(params.prompt, image, params.negative_prompt, height, width, steps,
                             params.guidance_scale, ip_scale, seed, params.n, tokens, scheduler=params.scheduler,
                             guidance_interval=params.guidance_interval, loras=params.lora or {},
                             deep_cache_interval=params.deep_cache_interval)


def preview_steps(partial_images: int, steps: int) -> frozenset:
    """The denoising steps (0-based) after which a stream sends a preview: ``partial_images`` of them spread
    evenly (the last at the last step); none for 0."""
    count = min(partial_images, steps)
    return frozenset((i + 1) * steps // count - 1 for i in range(count)) if count else frozenset()


__all__ = ["EditParams", "GenerationParams", "ImageParams", "REFERENCE_ID", "SIZE", "allowed_sides", "check_limits",
           "check_unknown", "form_value", "generation_request", "parse_form", "parse_size", "preview_steps",
           "size_pattern", "validation_error"]
