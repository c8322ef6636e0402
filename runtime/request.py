"""A generation request, its result, and the checks that run before any engine does.

``RequestChecker`` needs the model folder's manifest, its samplers (the scheduler
config) and the CLIP preprocessing, not the engines: a server checks each request
with it (and decodes its image) before the request queues, so a bad request never
reaches a batch.

Guidance interval: ``guidance_interval=(low, high)`` applies classifier-free
guidance at step i only when ``low < sigma_i <= high`` (sigma_i: the sampler's
sigma at the start of step i, in diffusers' units); outside it the request's
unconditional branch is not evaluated and the conditional prediction is used as
is. Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
Sample and Distribution Quality in Diffusion Models".
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .deep_cache import DEFAULT_INTERVAL, check_interval
from .errors import InputError, KolorsTrtError
from .folder import ModelFolder
from .postprocess import denormalize, to_pil, to_uint8
from .preprocess import ClipPreprocess, ImageSource
from .samplers import DEFAULT_SAMPLER, Samplers
from .tokenizer import check_text

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SEED = 2**64

# on_step(request_index, step_index, steps, latents) after each denoising step of a live request;
# latents() returns that request's current latents [n, C, h, w] (a GPU backend copies them only when called)
RequestStepCallback = Callable[[int, int, int, Callable[[], np.ndarray]], None]

class PipelineInputError(InputError):
    """A generation argument is invalid; raised before any engine runs."""


@dataclass
class GenerationRequest:
    """One request: the arguments of ``Pipeline.generate``, same names, same meaning, same defaults
    (None = the model folder's manifest default)."""

    prompt: str
    ip_adapter_image: Optional[ImageSource] = None
    negative_prompt: Optional[str] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    ip_adapter_scale: Optional[float] = None
    seed: Optional[int] = None
    num_images_per_prompt: int = 1
    ip_adapter_tokens: Optional[np.ndarray] = None
    latents: Optional[np.ndarray] = None
    output_type: str = "pil"
    scheduler: Optional[str] = None
    guidance_interval: Optional[tuple] = None
    loras: Optional[dict] = None  # {adapter name: weight}; None: the Pipeline's set_adapters set
    deep_cache_interval: Optional[int] = None


@dataclass
class Generation:
    """One request's result: images (per output_type), the final latents, and what made them.
    A request stopped by ``cancelled`` has ``cancelled`` True and neither images nor latents; one that failed
    alone has its ``error``."""

    images: object  # list of PIL images, float [B, H, W, 3] in [0, 1] ("np") or the latents ("latent")
    latents: Optional[np.ndarray]  # [B, C, H/8, W/8] before 1/vae_scaling_factor
    parameters: dict = field(default_factory=dict)
    cancelled: bool = False
    # the request failed alone while its batch went on (its rows were not finite, its prompt could not be
    # tokenized); images and latents are None. generate() raises it.
    error: Optional[KolorsTrtError] = None

    @classmethod
    def of(cls, output_type: str, latents: np.ndarray, decoded, parameters: dict) -> "Generation":
        """A finished request's result: ``decoded`` is the VAE output [B, 3, H, W] (None for "latent")."""
        if output_type == "latent":
            return cls(latents, latents, parameters)
        if output_type == "np":
            return cls(denormalize(decoded).transpose(0, 2, 3, 1), latents, parameters)
        return cls(to_pil(to_uint8(decoded)), latents, parameters)


@dataclass
class CheckedRequest:
    """A request after its checks: every value resolved, the image preprocessed."""

    index: int
    prompt: str
    negative_prompt: Optional[str]
    height: int
    width: int
    steps: int
    guidance: float
    ip_scale: float
    seed: Optional[int]  # None when the caller gave latents (and the sampler draws no noise)
    n: int
    pixels: Optional[np.ndarray]  # [1, 3, S, S]
    tokens: Optional[np.ndarray]  # [1, T, C]
    latents: Optional[np.ndarray]  # [n, C, h, w]
    output_type: str
    sampler: str = DEFAULT_SAMPLER
    interval: Optional[tuple] = None  # (low, high) in sigma units; None: every step
    cfg: Optional[np.ndarray] = None  # [steps] bool: guidance at step i
    loras: tuple = ()  # ((Adapter, weight), ...): resolved by Pipeline.check (lora.LoraSet)
    deep_cache_interval: int = DEFAULT_INTERVAL  # DeepCache: the full UNet every N steps per row (1: off)

    @property
    def do_cfg(self) -> bool:
        """Guidance at some step (its unconditional branch runs at least once)."""
        return bool(self.cfg.any()) if self.cfg is not None else self.guidance > 1

    @property
    def key(self) -> tuple:
        """Requests with the same key share one UNet batch (guidance, its interval and DeepCache's interval may
        differ: they are per row)."""
        return self.height, self.width, self.steps, self.do_cfg, self.sampler

    def parameters(self, backend: str, model) -> dict:
        """What made this request's result (Generation.parameters)."""
        return {
            "prompt": self.prompt, "negative_prompt": "" if self.negative_prompt is None else self.negative_prompt,
            "seed": self.seed, "height": self.height, "width": self.width, "num_inference_steps": self.steps,
            "guidance_scale": self.guidance, "ip_adapter_scale": self.ip_scale, "num_images_per_prompt": self.n,
            "scheduler": self.sampler, "guidance_interval": None if self.interval is None else list(self.interval),
            "loras": {adapter.name: weight for adapter, weight in self.loras},
            "deep_cache_interval": self.deep_cache_interval, "backend": backend, "model": str(model),
        }


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _finite(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PipelineInputError(f"pipeline: {name} must be a number, found {value!r}") from None
    if not math.isfinite(number):
        raise PipelineInputError(f"pipeline: {name} must be finite, found {number}")
    return number


def batch_limits(folder: ModelFolder, do_cfg: bool) -> tuple[int, int]:
    """(fewest, most) images one UNet batch of ``folder`` takes with or without CFG: the UNet's profile (2 rows
    per image under CFG) and the VAE's together. Fewer than the fewest are padded (static profiles)."""
    specs = folder.specs
    unet, vae = specs["unet"].dims["unet_batch"], specs["vae_decoder"].dims["batch"]
    f = 2 if do_cfg else 1
    return max(-(-unet.min // f), vae.min), min(unet.max // f, vae.max)


def guidance_interval(value) -> Optional[tuple]:
    """(low, high) floats with 0 <= low < high < inf, or None; PipelineInputError otherwise."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple, np.ndarray)) or np.ndim(value) != 1 or len(value) != 2 or any(
            isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) for v in value):
        raise PipelineInputError(f"pipeline: guidance_interval must be (low, high), two numbers in sigma units, "
                                 f"found {value!r}")
    low, high = (_finite(f"guidance_interval {name}", v) for name, v in zip(("low", "high"), value))
    if low < 0:
        raise PipelineInputError(f"pipeline: guidance_interval low must be >= 0 (a sigma), found {low}")
    if low >= high:
        raise PipelineInputError(f"pipeline: guidance_interval must have low < high, found ({low}, {high})")
    return low, high


class RequestChecker:
    """Checks requests against one model folder: sizes against its profile (or limits), sampler and steps
    against its scheduler config, batch against the UNet and VAE profiles, images decoded and preprocessed."""

    def __init__(self, folder: ModelFolder, samplers: Samplers, clip: ClipPreprocess):
        self.folder = folder
        self.samplers = samplers
        self.clip = clip
        self.defaults = {"scheduler": DEFAULT_SAMPLER, "deep_cache_interval": DEFAULT_INTERVAL,
                         **folder.runtime.get("defaults", {})}  # the manifest's win

    def pixel_values(self, image: ImageSource) -> np.ndarray:
        """CLIP preprocessing of one reference image: float32 [1, 3, S, S]; raises ImageInputError."""
        return self.clip([image])

    def batch_limits(self, do_cfg: bool) -> tuple[int, int]:
        """(fewest, most) images one UNet batch takes with or without CFG (``batch_limits``)."""
        return batch_limits(self.folder, do_cfg)

    def _check_size(self, name: str, value, default) -> int:
        value = default if value is None else value
        if not _is_int(value):
            raise PipelineInputError(f"pipeline: {name} must be an int, found {value!r}")
        unit, r = self.folder.size_multiple, getattr(self.folder.profile, name)
        if value % unit:
            raise PipelineInputError(
                f"pipeline: {name} {value} is not a multiple of {unit} (VAE factor {self.folder.model_dims.vae_scale} "
                f"x UNet downsampling {self.folder.model_dims.latent_multiple}); use e.g. {max(unit, value // unit * unit)}"
            )
        if not r.contains(value):
            if self.folder.kind == "engines":
                where, hint = "the engine profile", "rebuild the engines with a profile that covers it"
            else:
                where, hint = "the export folder's limits", "raise them with --max-size (Pipeline.load(limits=...))"
            raise PipelineInputError(f"pipeline: {name} {value} is outside {where} [{r.min}, {r.max}] of "
                                     f"{self.folder.root}; {hint}")
        return int(value)

    def _check_tokens(self, tokens) -> np.ndarray:
        want = (1, self.folder.model_dims.ip_tokens, self.folder.model_dims.cross_attention_dim)
        try:
            arr = np.asarray(tokens, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise PipelineInputError(f"pipeline: ip_adapter_tokens are not a float array ({err})") from None
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape != want:
            raise PipelineInputError(f"pipeline: ip_adapter_tokens have shape {arr.shape}, expected {want} (from encode_image)")
        if not np.isfinite(arr).all():
            raise PipelineInputError("pipeline: ip_adapter_tokens hold NaN or Inf")
        return arr

    def __call__(self, request: GenerationRequest, index: int = 0) -> CheckedRequest:
        """Every check of one request, and its image preprocessed; no engine runs. Raises PipelineInputError
        (or ImageInputError, SchedulerStepError) naming the argument."""
        if not isinstance(request, GenerationRequest):
            raise PipelineInputError(f"pipeline: expected a GenerationRequest, found {type(request).__name__}")
        r, d = request, self.defaults
        if not isinstance(r.prompt, str):
            raise PipelineInputError(f"pipeline: prompt must be a string, found {type(r.prompt).__name__}")
        if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
            raise PipelineInputError(
                f"pipeline: negative_prompt must be a string or None, found {type(r.negative_prompt).__name__}")
        for name in ("prompt", "negative_prompt"):  # what the tokenizer would refuse inside a batch
            if getattr(r, name) is not None:
                check_text(f"pipeline: {name}", getattr(r, name), PipelineInputError)
        if r.output_type not in OUTPUT_TYPES:
            raise PipelineInputError(f"pipeline: output_type {r.output_type!r} is not one of {OUTPUT_TYPES}")
        height = self._check_size("height", r.height, d.get("height"))
        width = self._check_size("width", r.width, d.get("width"))
        steps = d.get("num_inference_steps") if r.num_inference_steps is None else r.num_inference_steps
        if not _is_int(steps) or steps < 1:
            raise PipelineInputError(f"pipeline: num_inference_steps must be an int >= 1, found {steps!r}")
        name = d["scheduler"] if r.scheduler is None else r.scheduler
        if not isinstance(name, str):
            raise PipelineInputError(f"pipeline: scheduler must be a sampler name, found {name!r}")
        sampler = self.samplers.tables(name, int(steps))  # SamplerError, SchedulerStepError, SchedulerConfigError
        guidance = _finite("guidance_scale", d.get("guidance_scale") if r.guidance_scale is None else r.guidance_scale)
        ip_scale = _finite("ip_adapter_scale",
                           d.get("ip_adapter_scale") if r.ip_adapter_scale is None else r.ip_adapter_scale)
        interval = guidance_interval(r.guidance_interval)
        deep_cache = check_interval(d["deep_cache_interval"] if r.deep_cache_interval is None
                                    else r.deep_cache_interval, self.folder)
        sigmas = sampler.sigmas[: sampler.steps].astype(np.float64)
        cfg = np.full(sampler.steps, guidance > 1) if interval is None else \
            (guidance > 1) & (interval[0] < sigmas) & (sigmas <= interval[1])
        n = r.num_images_per_prompt
        fewest, most = self.batch_limits(bool(cfg.any()))
        if not _is_int(n) or not 1 <= n <= most:
            raise PipelineInputError(f"pipeline: num_images_per_prompt must be an int in [1, {most}] (the engine "
                                     f"profile's batch), found {n!r}")
        if fewest > most:
            raise PipelineInputError(
                f"pipeline: the UNet engine of {self.folder.root} takes no batch without guidance (a static profile is "
                "built for guidance > 1 only): set guidance_scale > 1 (with a guidance_interval that holds a step's "
                "sigma) or rebuild the engines")
        seed = r.seed
        if seed is None and (r.latents is None or sampler.stochastic):
            seed = secrets.randbelow(2**63)
        elif seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
            raise PipelineInputError(f"pipeline: seed must be an int in [0, 2**64), found {seed!r}")
        if r.ip_adapter_image is not None and r.ip_adapter_tokens is not None:
            raise PipelineInputError("pipeline: pass either ip_adapter_image or ip_adapter_tokens, not both")
        if r.ip_adapter_image is None and r.ip_adapter_tokens is None and ip_scale != 0:
            raise PipelineInputError(
                "pipeline: an IP-Adapter pipeline needs a reference image (ip_adapter_image) or its tokens "
                "(ip_adapter_tokens from encode_image), as diffusers does; or set ip_adapter_scale=0"
            )
        dims = self.folder.model_dims
        shape = (n, dims.latent_channels, height // dims.vae_scale, width // dims.vae_scale)
        latents = None
        if r.latents is not None:
            latents = np.asarray(r.latents, dtype=np.float32)
            if latents.shape != shape:
                raise PipelineInputError(f"pipeline: latents have shape {latents.shape}, expected {shape}")
            if not np.isfinite(latents).all():
                raise PipelineInputError("pipeline: latents hold NaN or Inf")
            seed = seed if sampler.stochastic else None  # a stochastic sampler's step noise comes from the seed
        tokens = self._check_tokens(r.ip_adapter_tokens) if r.ip_adapter_tokens is not None else None
        pixels = self.pixel_values(r.ip_adapter_image) if r.ip_adapter_image is not None else None  # ImageInputError
        cfg.setflags(write=False)
        return CheckedRequest(index, r.prompt, r.negative_prompt, height, width, int(steps), guidance, ip_scale,
                              None if seed is None else int(seed), int(n), pixels, tokens, latents, r.output_type,
                              name, interval, cfg, deep_cache_interval=deep_cache)

    # ---- requests ----------------------------------------------------------------------------


__all__ = ["CheckedRequest", "batch_limits", "Generation", "GenerationRequest", "MAX_SEED", "OUTPUT_TYPES",
           "PipelineInputError", "RequestChecker", "RequestStepCallback", "guidance_interval"]
