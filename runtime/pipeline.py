"""Kolors + IP-Adapter-Plus text-to-image on an export folder (ONNX Runtime) or an
engine folder (TensorRT / TensorRT-RTX).

The numbers follow diffusers' ``KolorsPipeline`` after ``load_ip_adapter`` and
``set_ip_adapter_scale`` (diffusers/pipelines/kolors/pipeline_kolors.py):

- the prompt is tokenized to 256 tokens and encoded at batch 1; the negative
  prompt defaults to "" and is *encoded* (``force_zeros_for_empty_prompt`` is
  False in Kolors; when a manifest says True, a missing negative is zeros);
- the unconditional IP tokens come from the image encoder on zeros in
  normalised space (``zeros_like(pixel_values)``); they and the empty
  negative's embeddings are constants computed once at load;
- CFG (guidance_scale > 1) batches [uncond, cond] x num_images_per_prompt;
  ``time_ids = [h, w, 0, 0, h, w]``; the UNet gets t, not sigma;
- the initial noise is ``torch.randn`` of a CPU generator seeded with ``seed``,
  reproduced bit for bit in numpy (noise.py), times init_noise_sigma;
- Euler steps (scheduler.py), latents / vae_scaling_factor, the VAE, then
  postprocess.py's 8-bit conversion.

Where diffusers and the runtime differ: diffusers refuses to run an IP-Adapter
pipeline without an image (the UNet's image projection needs
``image_embeds``). The runtime does the same unless ``ip_adapter_scale`` is 0,
where it uses the zero-image tokens for both branches: the IP attention is
multiplied by 0, so the image equals diffusers' with any reference at scale 0.
Only a single string prompt is supported (diffusers also takes lists).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import backends as B
from .cache import DEFAULT_IP_ITEMS, DEFAULT_PROMPT_ITEMS, ArrayCache, LRUCache, content_key, read_only
from .errors import InputError
from .noise import torch_randn
from .postprocess import denormalize, to_pil, to_uint8
from .preprocess import ClipPreprocess, ImageSource, PreprocessConfigError
from .scheduler import EulerDiscreteScheduler, SchedulerConfig
from .tokenizer import ChatGLMTokenizer

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SEED = 2**64


class PipelineInputError(InputError):
    """A generation argument is invalid; raised before any engine runs."""


@dataclass
class Generation:
    """One request's result: images (per output_type), the final latents, and what made them."""

    images: object  # list of PIL images, float [B, H, W, 3] in [0, 1] ("np") or the latents ("latent")
    latents: np.ndarray  # [B, C, H/8, W/8] before 1/vae_scaling_factor
    parameters: dict = field(default_factory=dict)


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


class Pipeline:
    """Kolors + IP-Adapter-Plus on one model folder. Build it with ``Pipeline.load``."""

    def __init__(self, folder: B.ModelFolder, backend: str, engines: dict, tokenizer: ChatGLMTokenizer,
                 scheduler_config: SchedulerConfig, clip: ClipPreprocess, ip_cache: ArrayCache,
                 prompt_items: int = DEFAULT_PROMPT_ITEMS):
        self.folder = folder
        self.backend = backend
        self.engines = engines
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.clip = clip
        self.ip_cache = ip_cache
        self.prompt_cache = LRUCache(prompt_items)
        self.runtime = folder.runtime
        self.defaults = dict(folder.runtime.get("defaults", {}))
        self._ip_namespace = f"image_encoder:{folder.identity('image_encoder')}"
        # Optional stage -> context manager (the benchmark's timers); None costs nothing.
        self.stage_timer = None
        # Model constants: the unconditional branch of every request.
        self.empty_negative = self._run_text_encoder("")  # (prompt_embeds [1, L, D], pooled [1, D])
        if self.runtime.get("force_zeros_for_empty_prompt", False):
            self.empty_negative = tuple(np.zeros_like(a) for a in self.empty_negative)
        zeros = np.zeros((1, 3) + tuple(clip.crop_size), dtype=np.float32)  # zeros in normalised space
        self.zero_ip_tokens = self.engines["image_encoder"].run({"pixel_values": zeros})["ip_tokens"]  # [1, 16, C]
        read_only((*self.empty_negative, self.zero_ip_tokens))

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | Path, backend: str = "auto", cache_dir: Optional[str | Path] = None,
             verify: bool = True, ip_cache_items: int = DEFAULT_IP_ITEMS,
             cuda_graph: Optional[bool] = None) -> "Pipeline":
        """Open an export folder (ONNX Runtime) or engine folder (TensorRT / TensorRT-RTX).

        backend: "auto" | "onnxruntime" | "tensorrt" | "tensorrt-rtx". cache_dir: a folder for IP tokens
        that survives restarts. verify: hash every graph/plan against the manifest. cuda_graph (TensorRT
        only): capture each denoising step in a CUDA graph; None = when the engine profile is static.
        """
        model = B.read_folder(folder, verify=verify)
        name = B.resolve_backend(model, backend)
        tokenizer = ChatGLMTokenizer.from_file(model.root / "tokenizer", max_length=model.model_dims.text_length)
        scheduler_config = SchedulerConfig.from_file(model.root / "scheduler")
        clip = _clip_preprocess(model)
        ip_cache = ArrayCache(ip_cache_items, cache_dir)
        engines = B.open_engines(model, name, cuda_graph)
        logger.info("loaded %s (%s) on %s", model.root, model.kind, name)
        return cls(model, name, engines, tokenizer, scheduler_config, clip, ip_cache)

    # ---- encoders ----------------------------------------------------------------------------

    def _stage(self, name: str):
        return self.stage_timer(name) if self.stage_timer is not None else contextlib.nullcontext()

    def _run_text_encoder(self, text: str) -> tuple:
        with self._stage("text_encoder"):
            out = self.engines["text_encoder"].run(self.tokenizer([text]))
        return out["prompt_embeds"], out["pooled"]  # [1, L, D], [1, D]

    def encode_prompt(self, text: str) -> tuple:
        """(prompt_embeds [1, 256, D], pooled [1, D]) of one prompt, from the LRU when seen before."""
        if not isinstance(text, str):
            raise PipelineInputError(f"pipeline: prompts must be strings, found {type(text).__name__}")
        cached = self.prompt_cache.get(text)
        if cached is None:
            cached = self._run_text_encoder(text)
            self.prompt_cache.put(text, cached)
        return cached

    def _negative(self, negative_prompt: Optional[str]) -> tuple:
        if negative_prompt is None:
            return self.empty_negative
        if negative_prompt == "" and not self.runtime.get("force_zeros_for_empty_prompt", False):
            return self.empty_negative  # the same text: the constant computed at load
        return self.encode_prompt(negative_prompt)

    def pixel_values(self, image: ImageSource) -> np.ndarray:
        """CLIP preprocessing of one reference image: float32 [1, 3, S, S]; raises ImageInputError."""
        return self.clip([image])

    def encode_image(self, image: ImageSource) -> np.ndarray:
        """IP tokens [1, 16, C] of a reference image (path, bytes or PIL image); cached by content."""
        return self._ip_tokens(self.pixel_values(image))

    def _ip_tokens(self, pixel_values: np.ndarray) -> np.ndarray:
        key = content_key(self._ip_namespace, pixel_values)
        tokens = self.ip_cache.get(key)
        if tokens is None:
            with self._stage("image_encoder"):
                tokens = self.engines["image_encoder"].run({"pixel_values": pixel_values})["ip_tokens"]
            self.ip_cache.put(key, tokens)
        return tokens

    # ---- requests ----------------------------------------------------------------------------

    def stats(self) -> dict:
        """Engine runs per component and cache counters."""
        return {
            "engine_runs": {name: e.runs for name, e in self.engines.items()},
            "prompt_cache": self.prompt_cache.stats.as_dict(),
            "ip_cache": self.ip_cache.stats.as_dict(),
        }

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
            raise PipelineInputError(
                f"pipeline: {name} {value} is outside the engine profile [{r.min}, {r.max}] of {self.folder.root}; "
                "rebuild the engines with a profile that covers it"
            )
        return int(value)

    def _check_tokens(self, tokens) -> np.ndarray:
        want = (1, self.folder.model_dims.ip_tokens, self.folder.model_dims.cross_attention_dim)
        arr = np.asarray(tokens, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape != want:
            raise PipelineInputError(f"pipeline: ip_adapter_tokens have shape {arr.shape}, expected {want} (from encode_image)")
        if not np.isfinite(arr).all():
            raise PipelineInputError("pipeline: ip_adapter_tokens hold NaN or Inf")
        return arr

    def generate(self, prompt: str, ip_adapter_image: Optional[ImageSource] = None,
                 negative_prompt: Optional[str] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 ip_adapter_scale: Optional[float] = None, seed: Optional[int] = None,
                 num_images_per_prompt: int = 1, ip_adapter_tokens: Optional[np.ndarray] = None,
                 latents: Optional[np.ndarray] = None, output_type: str = "pil",
                 progress: bool = False) -> Generation:
        """Run one request; every argument is checked before an engine runs. None = the manifest default."""
        d = self.defaults
        # ---- checks (no engine runs before all of them pass) ----
        if not isinstance(prompt, str):
            raise PipelineInputError(f"pipeline: prompt must be a string, found {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise PipelineInputError(f"pipeline: negative_prompt must be a string or None, found {type(negative_prompt).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise PipelineInputError(f"pipeline: output_type {output_type!r} is not one of {OUTPUT_TYPES}")
        height = self._check_size("height", height, d.get("height"))
        width = self._check_size("width", width, d.get("width"))
        steps = d.get("num_inference_steps") if num_inference_steps is None else num_inference_steps
        if not _is_int(steps) or steps < 1:
            raise PipelineInputError(f"pipeline: num_inference_steps must be an int >= 1, found {steps!r}")
        guidance = _finite("guidance_scale", d.get("guidance_scale") if guidance_scale is None else guidance_scale)
        ip_scale = _finite("ip_adapter_scale", d.get("ip_adapter_scale") if ip_adapter_scale is None else ip_adapter_scale)
        n = num_images_per_prompt
        batch = self.folder.profile.batch
        if not _is_int(n) or not batch.contains(n):
            raise PipelineInputError(
                f"pipeline: num_images_per_prompt must be an int in the engine profile [{batch.min}, {batch.max}], found {n!r}"
            )
        do_cfg = guidance > 1
        unet_batch = self.engines["unet"].spec.dims["unet_batch"]
        if not unet_batch.contains(2 * n if do_cfg else n):
            raise PipelineInputError(
                f"pipeline: the UNet engine takes batches [{unet_batch.min}, {unet_batch.max}]; {n} image(s) "
                f"{'with' if do_cfg else 'without'} guidance need {2 * n if do_cfg else n} (a static profile is built "
                "for guidance > 1 only): change guidance_scale or rebuild the engines"
            )
        if seed is None:
            seed = secrets.randbelow(2**63)
        elif not _is_int(seed) or not 0 <= seed < MAX_SEED:
            raise PipelineInputError(f"pipeline: seed must be an int in [0, 2**64), found {seed!r}")
        if ip_adapter_image is not None and ip_adapter_tokens is not None:
            raise PipelineInputError("pipeline: pass either ip_adapter_image or ip_adapter_tokens, not both")
        if ip_adapter_image is None and ip_adapter_tokens is None and ip_scale != 0:
            raise PipelineInputError(
                "pipeline: an IP-Adapter pipeline needs a reference image (ip_adapter_image) or its tokens "
                "(ip_adapter_tokens from encode_image), as diffusers does; or set ip_adapter_scale=0"
            )
        scheduler = EulerDiscreteScheduler(self.scheduler_config, int(steps))  # SchedulerStepError past the schedule
        dims = self.folder.model_dims
        shape = (n, dims.latent_channels, height // dims.vae_scale, width // dims.vae_scale)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise PipelineInputError(f"pipeline: latents have shape {latents.shape}, expected {shape}")
            if not np.isfinite(latents).all():
                raise PipelineInputError("pipeline: latents hold NaN or Inf")
        tokens = self._check_tokens(ip_adapter_tokens) if ip_adapter_tokens is not None else None
        pixels = self.pixel_values(ip_adapter_image) if ip_adapter_image is not None else None  # ImageInputError

        # ---- encoders: once per request at most, cached ----
        embeds, pooled = self.encode_prompt(prompt)
        if tokens is None:
            tokens = self._ip_tokens(pixels) if pixels is not None else self.zero_ip_tokens
        time_ids = np.array([[height, width, 0, 0, height, width]], dtype=np.float32)  # [1, 6]
        rep = lambda a: np.repeat(a, n, axis=0)  # noqa: E731  [1, ...] -> [n, ...]
        if do_cfg:
            neg_embeds, neg_pooled = self._negative(negative_prompt)
            conditioning = {
                "encoder_hidden_states": np.concatenate([rep(neg_embeds), rep(embeds)]),  # [2n, L, D]
                "text_embeds": np.concatenate([rep(neg_pooled), rep(pooled)]),  # [2n, D]
                "time_ids": np.repeat(time_ids, 2 * n, axis=0),  # [2n, 6]: uncond and cond sizes are equal
                "ip_tokens": np.concatenate([rep(self.zero_ip_tokens), rep(tokens)]),  # [2n, 16, C]
            }
        else:
            conditioning = {"encoder_hidden_states": rep(embeds), "text_embeds": rep(pooled),
                            "time_ids": rep(time_ids), "ip_tokens": rep(tokens)}
        conditioning["ip_scale"] = np.full(len(conditioning["time_ids"]), ip_scale, dtype=np.float32)  # [2n or n]

        # ---- denoising ----
        noise = torch_randn(shape, int(seed)) if latents is None else latents  # [n, C, h, w]
        x = noise * scheduler.init_noise_sigma
        x = self._denoise(x, conditioning, scheduler, guidance, do_cfg, progress)
        parameters = {
            "prompt": prompt, "negative_prompt": "" if negative_prompt is None else negative_prompt,
            "seed": int(seed) if latents is None else None, "height": height, "width": width,
            "num_inference_steps": int(steps), "guidance_scale": guidance, "ip_adapter_scale": ip_scale,
            "num_images_per_prompt": int(n), "backend": self.backend, "model": str(self.folder.root),
        }
        if output_type == "latent":
            return Generation(x, x, parameters)
        decoded = self.decode(x)
        images = denormalize(decoded).transpose(0, 2, 3, 1) if output_type == "np" else to_pil(to_uint8(decoded))
        return Generation(images, x, parameters)

    def __call__(self, prompt: str, ip_adapter_image: Optional[ImageSource] = None,
                 negative_prompt: Optional[str] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 ip_adapter_scale: Optional[float] = None, seed: Optional[int] = None,
                 num_images_per_prompt: int = 1, ip_adapter_tokens: Optional[np.ndarray] = None,
                 latents: Optional[np.ndarray] = None, output_type: str = "pil", progress: bool = False):
        """diffusers-style call: the images only (a list of PIL images for output_type "pil")."""
        return self.generate(prompt, ip_adapter_image, negative_prompt, height, width, num_inference_steps,
                             guidance_scale, ip_adapter_scale, seed, num_images_per_prompt, ip_adapter_tokens,
                             latents, output_type, progress).images

    def _denoise(self, x, conditioning, scheduler, guidance, do_cfg, progress) -> np.ndarray:
        from tqdm import tqdm

        with tqdm(total=len(scheduler), desc="denoise", unit="step", disable=not progress) as bar, self._stage("denoise"):
            on_step = lambda i: bar.update()  # noqa: E731
            if self.backend == "onnxruntime":
                return B.denoise_numpy(self.engines["unet"], x, conditioning, scheduler, guidance, do_cfg, on_step)
            from .backend_trt import denoise_torch

            return denoise_torch(self.engines["unet"], x, conditioning, scheduler, guidance, do_cfg, on_step)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents -> VAE output float32 [B, 3, H, W] in about [-1, 1]."""
        with self._stage("vae_decoder"):
            return self._decode(latents)

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        scaled = latents / np.float32(self.runtime["vae_scaling_factor"])
        shift = self.runtime.get("vae_shift_factor")
        if shift is not None:
            scaled = scaled + np.float32(shift)
        return self.engines["vae_decoder"].run({"latents": scaled.astype(np.float32)})["image"]


def _clip_preprocess(folder: B.ModelFolder) -> ClipPreprocess:
    """The folder's preprocessor_config.json when it has one, else the manifest's runtime constants."""
    config = folder.root / "image_processor" / "preprocessor_config.json"
    if config.is_file():
        clip = ClipPreprocess.from_file(config)
    else:
        size = int(folder.runtime.get("image_size", folder.model_dims.image_size))
        clip = ClipPreprocess(size=size, crop_size=(size, size),
                              mean=tuple(folder.runtime.get("image_mean", ClipPreprocess.mean)),
                              std=tuple(folder.runtime.get("image_std", ClipPreprocess.std)))
    want = folder.model_dims.image_size
    if tuple(clip.crop_size) != (want, want):
        raise PreprocessConfigError(
            f"{config}: crop_size {clip.crop_size} differs from the image encoder's input {want}x{want}"
        )
    return clip


__all__ = ["Generation", "Pipeline", "PipelineInputError", "OUTPUT_TYPES"]
