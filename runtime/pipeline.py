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
  reproduced bit for bit in numpy (noise.py), times init_noise_sigma; a
  stochastic sampler (euler_a) draws each step's noise from the same generator
  after it, as diffusers does;
- the sampler's steps (``scheduler``: samplers.py, diffusers' scheduler built
  from the folder's config), latents / vae_scaling_factor, the VAE, then
  postprocess.py's 8-bit conversion.

Where diffusers and the runtime differ: diffusers refuses to run an IP-Adapter
pipeline without an image (the UNet's image projection needs
``image_embeds``). The runtime does the same unless ``ip_adapter_scale`` is 0,
where it uses the zero-image tokens for both branches: the IP attention is
multiplied by 0, so the image equals diffusers' with any reference at scale 0.
One request is one prompt (diffusers also takes lists); several users' requests
run together through ``generate_batch`` (below).

Batching. ``generate_batch`` takes ``GenerationRequest``s, checks every one before
any engine runs, and groups those that share (height, width, steps, guidance at
some step or none, sampler) into one UNet call per step, up to the engine profile's
batch; each row keeps its own prompt and negative embeddings, IP tokens, IP scale
(a per-row UNet input), guidance scale and guidance interval (a per-row CFG
combine; a row outside its interval adds no unconditional row to the step's UNet
batch) and seed (diffusers' per-generator noise), so a batched request gives its
solo result. DeepCache's interval (deep_cache.py) is per row too. ``generate`` is
the one-request case. ``stats()["unet_rows"]`` counts the UNet batch rows evaluated
per graph ("unet", "unet_shallow"). A request fails alone: its rows are checked
for NaN/Inf on their own (the loops leave that check to the pipeline), so one
request's overflow, or a prompt the tokenizer refuses, fails that request
(``Generation.error``) and not its batch.

LoRA (lora.py). ``load_lora_weights``, ``unload_lora_weights`` and ``set_adapters`` as in
diffusers; a request's ``loras`` ({adapter: weight}; None: the ``set_adapters`` set) picks
its adapters without a rebuild. Batches are also keyed by the UNet's adapter set (the set
applied first), prompt embeddings are cached per text-encoder set.

Threads. A Pipeline may be called from several threads: the engine work of each
call (encoders, denoising, VAE) runs under one lock, because the engines share one
stream and one set of buffers; argument checks and image preprocessing run
outside it. The prompt and IP-token caches lock themselves, and the disk cache
writes each file under a name unique to its writer, then renames it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .backends import open_backend
from .cache import DEFAULT_IP_ITEMS, DEFAULT_PROMPT_ITEMS, ArrayCache, LRUCache, content_key, read_only
from .deep_cache import check_loras, full_mask
from .engine import Backend, DenoiseBatch
from .folder import Limits, ModelFolder, read_folder, resolve_backend
from .lora import LoraLoaderMixin, LoraManager
from .errors import InputError
from .noise import request_noise
from .postprocess import NonFiniteError, non_finite_rows
from .preprocess import ClipPreprocess, ImageSource
from .request import (
    OUTPUT_TYPES,
    CheckedRequest,
    Generation,
    GenerationRequest,
    PipelineInputError,
    RequestChecker,
    RequestStepCallback,
)
from .rows import LiveRows, chunks, generations
from .samplers import SamplerTables, Samplers
from .scheduler import SchedulerConfig
from .tokenizer import ChatGLMTokenizer

logger = logging.getLogger(__name__)


class Pipeline(LoraLoaderMixin):
    """Kolors + IP-Adapter-Plus on one model folder. Build it with ``Pipeline.load``.

    Thread-safe: calls from several threads are serialised around the engines (one stream, one set of
    buffers); their checks and image preprocessing run in parallel; the caches are shared."""

    def __init__(self, folder: ModelFolder, backend: Backend, tokenizer: ChatGLMTokenizer,
                 scheduler_config: SchedulerConfig, clip: ClipPreprocess, ip_cache: ArrayCache,
                 prompt_items: int = DEFAULT_PROMPT_ITEMS, lora_dir: Optional[str | Path] = None):
        self.folder = folder
        self.backend = backend.name
        self.engines = backend.engines
        self._runner = backend
        self._lock = threading.RLock()  # the engines: one caller at a time
        self.tokenizer = tokenizer
        self.samplers = Samplers(scheduler_config)
        self.clip = clip
        self.ip_cache = ip_cache
        self.prompt_cache = LRUCache(prompt_items)
        self.runtime = folder.runtime
        self.checker = RequestChecker(folder, self.samplers, clip)
        self.defaults = self.checker.defaults
        self.lora = LoraManager(folder, self.engines, lora_dir)
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
             verify: bool = True, prompt_cache_items: int = DEFAULT_PROMPT_ITEMS, ip_cache_items: int = DEFAULT_IP_ITEMS,
             cuda_graph: Optional[bool] = None, limits: Optional[Limits] = None,
             runtime_cache: Optional[str | Path] = None, cache_max_bytes: Optional[int] = None,
             lora_dir: Optional[str | Path] = None) -> "Pipeline":
        """Open an export folder (ONNX Runtime) or engine folder (TensorRT / TensorRT-RTX).

        backend: "auto" | "onnxruntime" | "tensorrt" | "tensorrt-rtx". cache_dir: a folder for IP tokens
        that survives restarts. verify: check every graph/plan against the manifest's sha256 (files unchanged
        since the last check are not re-hashed). cuda_graph (TensorRT only): capture each denoising step in a
        CUDA graph; None = when the engine profile is static. limits (export folders): the largest side and
        batch accepted, default ``Limits()`` (engine folders take their build profile). runtime_cache
        (TensorRT-RTX only): a file keeping the kernels it compiles at run time across restarts. cache_max_bytes:
        bound of cache_dir (least recently used files go first; None: no bound). lora_dir: a folder of
        ``<name>.safetensors`` LoRAs that requests may name, loaded on first use.
        """
        model = read_folder(folder, verify=verify, limits=limits)
        name = resolve_backend(model, backend)
        runner = open_backend(model, name, cuda_graph, None if runtime_cache is None else Path(runtime_cache))
        return cls.on_backend(model, runner, cache_dir, prompt_cache_items, ip_cache_items, cache_max_bytes, lora_dir)

    @classmethod
    def on_backend(cls, model: ModelFolder, runner: Backend, cache_dir: Optional[str | Path] = None,
                   prompt_cache_items: int = DEFAULT_PROMPT_ITEMS, ip_cache_items: int = DEFAULT_IP_ITEMS,
                   cache_max_bytes: Optional[int] = None, lora_dir: Optional[str | Path] = None) -> "Pipeline":
        """A pipeline on a backend already open on ``model`` (``load`` opens one from the folder)."""
        tokenizer = ChatGLMTokenizer.from_file(model.root / "tokenizer", max_length=model.model_dims.text_length)
        scheduler_config = SchedulerConfig.from_file(model.root / "scheduler")
        clip = ClipPreprocess.of_folder(model)
        dims = model.model_dims
        ip_cache = ArrayCache(ip_cache_items, cache_dir, shape=(1, dims.ip_tokens, dims.cross_attention_dim),
                              max_bytes=cache_max_bytes)
        logger.info("loaded %s (%s) on %s", model.root, model.kind, runner.name)
        return cls(model, runner, tokenizer, scheduler_config, clip, ip_cache, prompt_cache_items, lora_dir)

    # ---- encoders ----------------------------------------------------------------------------

    def _stage(self, name: str):
        return self.stage_timer(name) if self.stage_timer is not None else contextlib.nullcontext()

    def _run_text_encoder(self, text: str, lora_set=()) -> tuple:
        self.lora.apply("text_encoder", lora_set)
        with self._stage("text_encoder"):
            out = self.engines["text_encoder"].run(self.tokenizer([text]))
        return out["prompt_embeds"], out["pooled"]  # [1, L, D], [1, D]

    def encode_prompt(self, text: str, loras=None) -> tuple:
        """(prompt_embeds [1, 256, D], pooled [1, D]) of one prompt, with the text-encoder part of ``loras`` ({name:
        weight}; None: the default set), from the LRU when seen before."""
        if not isinstance(text, str):
            raise PipelineInputError(f"pipeline: prompts must be strings, found {type(text).__name__}")
        lora_set = self.lora.resolve(loras)
        te_key = self.lora.key(lora_set, "text_encoder")
        key = text if te_key is None else (te_key, text)
        with self._lock:
            cached = self.prompt_cache.get(key)
            if cached is None:
                cached = self._run_text_encoder(text, lora_set)
                self.prompt_cache.put(key, cached)
        return cached

    def _negative(self, negative_prompt: Optional[str], lora_set=()) -> tuple:
        zeros = self.runtime.get("force_zeros_for_empty_prompt", False)
        if negative_prompt is None or (negative_prompt == "" and not zeros):
            if self.lora.key(lora_set, "text_encoder") is None or (negative_prompt is None and zeros):
                return self.empty_negative  # the constant computed at load
            return self.encode_prompt("", lora_set)  # "" through the text encoder with the request's adapters
        return self.encode_prompt(negative_prompt, lora_set)

    def pixel_values(self, image: ImageSource) -> np.ndarray:
        """CLIP preprocessing of one reference image: float32 [1, 3, S, S]; raises ImageInputError."""
        return self.checker.pixel_values(image)

    def encode_image(self, image: ImageSource) -> np.ndarray:
        """IP tokens [1, 16, C] of a reference image (path, bytes or PIL image); cached by content."""
        return self.encode_pixels(self.pixel_values(image))

    def image_key(self, pixel_values: np.ndarray) -> str:
        """The content id of preprocessed pixels (and of this image encoder): the IP-token cache key."""
        return content_key(self._ip_namespace, pixel_values)

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """IP tokens [1, 16, C] of preprocessed pixels (``pixel_values``); cached by content."""
        key = self.image_key(pixel_values)
        with self._lock:
            tokens = self.ip_cache.get(key)
            if tokens is None:
                with self._stage("image_encoder"):
                    tokens = self.engines["image_encoder"].run({"pixel_values": pixel_values})["ip_tokens"]
                self.ip_cache.put(key, tokens)
        return tokens

    # ---- checks ------------------------------------------------------------------------------

    def check(self, request: GenerationRequest, index: int = 0) -> CheckedRequest:
        """Every check of one request, its image preprocessed and its ``loras`` resolved; no engine runs
        (RequestChecker)."""
        checked = dataclasses.replace(self.checker(request, index), loras=self.lora.resolve(request.loras))
        if checked.deep_cache_interval > 1 and checked.loras:  # unet_shallow runs the base weights
            unet_map = self.lora.maps.get("unet")
            check_loras({a.name: a.layers.get("unet", {}) for a, _ in checked.loras}, self.folder.model_dims,
                        unet_map.layers_per_block if unet_map is not None else 2)
        return checked

    def batch_limits(self, do_cfg: bool) -> tuple[int, int]:
        """(fewest, most) images of one UNet batch (RequestChecker.batch_limits)."""
        return self.checker.batch_limits(do_cfg)

    def stats(self) -> dict:
        """Engine runs per component, UNet rows per UNet graph, cache counters and (GPU backends) device bytes by kind."""
        return {
            "engine_runs": {name: e.runs for name, e in self.engines.items()},
            "unet_rows": {name: e.rows for name, e in self.engines.items() if name.startswith("unet")},
            "prompt_cache": self.prompt_cache.stats.as_dict(),
            "ip_cache": self.ip_cache.stats.as_dict(),
            "device_memory": self._runner.device_memory(),
            "lora": {"swaps": self.lora.swaps, "swap_seconds": self.lora.swap_seconds},
        }

    def generate(self, prompt: str, ip_adapter_image: Optional[ImageSource] = None,
                 negative_prompt: Optional[str] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 ip_adapter_scale: Optional[float] = None, seed: Optional[int] = None,
                 num_images_per_prompt: int = 1, ip_adapter_tokens: Optional[np.ndarray] = None,
                 latents: Optional[np.ndarray] = None, output_type: str = "pil", scheduler: Optional[str] = None,
                 guidance_interval: Optional[tuple] = None, loras: Optional[dict] = None,
                 deep_cache_interval: Optional[int] = None, progress: bool = False) -> Generation:
        """Run one request (``generate_batch`` of one); every argument is checked before an engine runs.
        None = the manifest default (for ``loras``: the ``set_adapters`` set). scheduler: a sampler name
        (samplers.SAMPLERS, default "euler"); guidance_interval: (low, high), guidance only at steps whose sigma
        is in (low, high]; loras: {adapter name: weight}; deep_cache_interval: DeepCache's full UNet every N
        steps, the shallow UNet between (default 1: off)."""
        request = GenerationRequest(prompt, ip_adapter_image, negative_prompt, height, width, num_inference_steps,
                                    guidance_scale, ip_adapter_scale, seed, num_images_per_prompt, ip_adapter_tokens,
                                    latents, output_type, scheduler, guidance_interval, loras, deep_cache_interval)
        result = self.generate_batch([request], progress=progress)[0]
        if result.error is not None:
            raise result.error
        return result

    def __call__(self, *args, **kwargs):
        """diffusers-style call: ``generate(...)``'s images only (a list of PIL images for output_type "pil")."""
        return self.generate(*args, **kwargs).images

    __call__.__signature__ = inspect.signature(generate)

    def generate_batch(self, requests: Sequence[GenerationRequest | CheckedRequest], progress: bool = False,
                       on_step: Optional[RequestStepCallback] = None,
                       cancelled: Optional[Callable[[int], bool]] = None) -> list[Generation]:
        """Run several requests; one Generation per request, in order.

        Every request is checked before any engine runs (one bad request raises, nothing runs); a request that
        ``check`` already returned is not checked (or its image decoded) again. Requests that share (height,
        width, steps, guidance at some step or none, sampler, UNet LoRA set) run as one UNet batch per step, up to the
        profile's batch; other lists are split into such groups, run in the order of their first request (those
        with the UNet's LoRA set already applied first).

        on_step(index, step, steps, latents) is called after each denoising step of each request still
        running (index into ``requests``). cancelled(index) is asked between steps: a cancelled request's
        rows leave the batch (where the profile allows a smaller batch) and it gets a Generation with
        ``cancelled`` True; when every request of a batch is cancelled its loop stops.

        A request that fails alone gets a Generation with its ``error`` while the rest of its batch finishes:
        rows that are not finite after an encoder, the denoising loop or the VAE (NonFiniteError), a prompt the
        tokenizer refuses (a CheckedRequest made past the checks). An engine failure raises, failing every request.
        """
        jobs = [dataclasses.replace(r, index=i) if isinstance(r, CheckedRequest) else self.check(r, i)
                for i, r in enumerate(requests)]
        results: list = [None] * len(jobs)
        groups = chunks(jobs, lambda job: self.batch_limits(job.do_cfg)[1], lambda job: self.lora.key(job.loras, "unet"),
                        self.lora.applied("unet"))
        for chunk in groups:
            with self._lock:
                try:
                    for job, result in zip(chunk, self._run_isolated(chunk, progress, on_step, cancelled)):
                        results[job.index] = result
                finally:
                    self._runner.batch_done()
        return results

    def _run_isolated(self, chunk: list, progress: bool, on_step, cancelled) -> list[Generation]:
        """``_run_chunk``; when one request's own encoding fails inside it (a prompt the tokenizer refuses, an
        encoder output that is not finite: the encoders run before any UNet step), the requests of the chunk run
        one by one, so only that request fails (its error in its Generation)."""
        with self._lock:
            try:
                return self._run_chunk(chunk, progress, on_step, cancelled)
            except (InputError, NonFiniteError) as err:
                if len(chunk) == 1:
                    logger.warning("request %d failed alone: %s", chunk[0].index, err)
                    return [Generation(None, None, chunk[0].parameters(self.backend, self.folder.root), error=err)]
                logger.warning("a batch of %d requests failed on one request's input (%s); running them one by one",
                               len(chunk), err)
            return [result for job in chunk for result in self._run_isolated([job], progress, on_step, cancelled)]

    def _run_chunk(self, chunk: list, progress: bool, on_step, cancelled) -> list[Generation]:
        from tqdm import tqdm

        sampler = self.samplers.tables(chunk[0].sampler, chunk[0].steps)
        batch = self._denoise_batch(chunk, sampler)
        bar = tqdm(total=sampler.steps, desc="denoise", unit="step", disable=not progress)
        rows = LiveRows(chunk, on_step, cancelled, progress=bar.update)
        self.lora.apply("unet", chunk[0].loras)  # one UNet set per chunk (rows.chunks)
        try:
            with self._stage("denoise"):
                final = self._runner.denoise(batch, sampler, rows)
        finally:
            bar.close()
        return self._results(chunk, rows, final)

    def _denoise_batch(self, chunk: list, sampler: SamplerTables) -> DenoiseBatch:
        """The loop's inputs: each image's UNet rows (encoders once per request at most, cached), initial latents,
        guidance mask and, for a stochastic sampler, every step's noise."""
        dims = self.folder.model_dims
        uncond_rows, cond_rows, latents, noise = [], [], [], []
        for job in chunk:
            embeds, pooled = self.encode_prompt(job.prompt, job.loras)
            tokens = job.tokens if job.tokens is not None else (
                self.encode_pixels(job.pixels) if job.pixels is not None else self.zero_ip_tokens)
            scale = np.full((1,), job.ip_scale, np.float32)
            cond = (embeds, pooled, tokens, scale)
            # a request never guided has no unconditional branch to encode: its uncond rows are never evaluated
            uncond = (*self._negative(job.negative_prompt, job.loras), self.zero_ip_tokens, scale) if job.do_cfg else cond
            cond_rows.append([np.repeat(a, job.n, axis=0) for a in cond])
            uncond_rows.append([np.repeat(a, job.n, axis=0) for a in uncond])
            shape = (job.n, dims.latent_channels, job.height // dims.vae_scale, job.width // dims.vae_scale)
            x, steps_noise = request_noise(shape, job.seed, job.latents, sampler.steps, sampler.stochastic)
            latents.append(x)  # [n, C, h, w]
            noise.append(steps_noise)  # [steps, n, C, h, w] or None
        stacked = [np.concatenate([part[i] for part in uncond_rows + cond_rows]) for i in range(4)]
        height, width = chunk[0].height, chunk[0].width
        conditioning = {
            "encoder_hidden_states": stacked[0],  # [2n, L, D]: uncond rows, then cond rows
            "text_embeds": stacked[1],  # [2n, D]
            "time_ids": np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (len(stacked[1]), 1)),
            "ip_tokens": stacked[2],  # [2n, T, C]
            "ip_scale": stacked[3],  # [2n]: each request's own scale on both branches
        }
        cfg = np.concatenate([np.repeat(job.cfg[:, None], job.n, axis=1) for job in chunk], axis=1)  # [steps, n]
        return DenoiseBatch(
            latents=np.concatenate(latents) * sampler.init_noise_sigma,  # [n, C, h, w]
            conditioning=conditioning,
            guidance=np.concatenate([np.full(job.n, job.guidance, np.float32) for job in chunk]),
            cfg=cfg,
            noise=np.concatenate(noise, axis=1) if sampler.stochastic else None,
            full=full_mask(cfg, [job.deep_cache_interval for job in chunk for _ in range(job.n)]),
        )

    def _results(self, chunk: list, rows: LiveRows, final: np.ndarray) -> list[Generation]:
        """The VAE on the rows still live, then one Generation per request (cancelled ones empty); each request's
        rows are checked on their own."""
        live = rows.live()
        where = {job.index: rows.where(job.index) for job in live}
        failed = non_finite_rows("unet", "latents (denoising loop)", {job.index: final[where[job.index]] for job in live}
                                 if len(final) else {})
        live = [job for job in live if job.index not in failed]
        images = {}
        if live and len(final):
            order = [k for job in live for k in where[job.index]]
            decode = final[order]
            vae_min = self.engines["vae_decoder"].spec.dims["batch"].min
            if len(decode) < vae_min:  # static profile: pad, then drop
                decode = np.concatenate([decode, np.repeat(decode[-1:], vae_min - len(decode), axis=0)])
            decoded = None
            if any(j.output_type != "latent" for j in live):
                with self._stage("vae_decoder"):
                    decoded = self._decode(decode, finite=False)[: len(order)]
            start = 0
            for job in live:
                part = slice(start, start + job.n)
                start += job.n
                images[job.index] = (final[where[job.index]], None if decoded is None else decoded[part])
            failed.update(non_finite_rows("vae_decoder", "image", {i: d for i, (_, d) in images.items() if d is not None}))
        return generations(chunk, images, failed, self.backend, self.folder.root)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents -> VAE output float32 [B, 3, H, W] in about [-1, 1]."""
        with self._lock, self._stage("vae_decoder"):
            return self._decode(latents)

    def _decode(self, latents: np.ndarray, finite: bool = True) -> np.ndarray:
        scaled = latents / np.float32(self.runtime["vae_scaling_factor"])
        shift = self.runtime.get("vae_shift_factor")
        if shift is not None:
            scaled = scaled + np.float32(shift)
        return self.engines["vae_decoder"].run({"latents": scaled.astype(np.float32)}, finite=finite)["image"]


__all__ = ["Generation", "GenerationRequest", "Pipeline", "PipelineInputError", "OUTPUT_TYPES"]
