"""Helpers of the parity tests against diffusers' KolorsPipeline (tests/test_samplers.py, test_lora.py,
tests/test_deep_cache.py): a reference image, diffusers' pipeline with a sampler's scheduler and its
documented dynamic-CFG callback, a runtime request of the same case, and the 1/255 comparison."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from PIL import Image

from kolors_trt.runtime.pipeline import GenerationRequest
from kolors_trt.runtime.samplers import SAMPLERS


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (50 + seed, 70, 3), dtype=np.uint8), "RGB")


@contextlib.contextmanager
def scheduler_of(ref, name: str):
    """diffusers' pipeline with sampler ``name``'s scheduler, built from the pipeline's own config."""
    import diffusers

    original = ref.scheduler
    class_name, overrides = SAMPLERS[name]
    ref.scheduler = getattr(diffusers, class_name).from_config(original.config, **overrides)
    try:
        yield ref
    finally:
        ref.scheduler = original


def reference(ref, case: dict, name: str = "euler", latents=None, **call) -> tuple:
    """diffusers' final latents and uint8 images for one request."""
    with scheduler_of(ref, name), torch.no_grad():
        ref.set_ip_adapter_scale(case["ip_adapter_scale"])
        out = ref(prompt=case["prompt"], negative_prompt=case.get("negative_prompt"), ip_adapter_image=case["image"],
                  height=case["height"], width=case["width"], num_inference_steps=case["num_inference_steps"],
                  guidance_scale=case["guidance_scale"], generator=torch.Generator("cpu").manual_seed(case["seed"]),
                  latents=None if latents is None else torch.from_numpy(latents), output_type="latent", **call).images
        decoded = ref.vae.decode(out / ref.vae.config.scaling_factor, return_dict=False)[0]
        images = ref.image_processor.postprocess(decoded, output_type="pil")
    return out.numpy(), np.stack([np.asarray(im) for im in images])


def request(case: dict, **extra) -> GenerationRequest:
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    return GenerationRequest(**{k: v for k, v in case.items() if k in fields and k != "image"},
                             ip_adapter_image=case["image"], **extra)


def assert_equal_images(got, want_latents, want_images, what: str) -> None:
    rel = float(np.abs(got.latents.astype(np.float64) - want_latents).max() / np.abs(want_latents).max())
    assert rel < 1e-4, f"{what}: latents differ by {rel:.2e} of their max"
    pixels = np.stack([np.asarray(im) for im in got.images])
    diff = int(np.abs(pixels.astype(int) - want_images.astype(int)).max())
    assert pixels.shape == want_images.shape and diff <= 1, f"{what}: max 8-bit difference {diff}"


def dynamic_cfg(ref, until: int):
    """diffusers' documented dynamic classifier-free guidance (docs: "Pipeline callbacks"): after step
    ``until`` - 1 the callback keeps the conditional half of the batched embeddings and sets guidance to 0.
    Kolors' UNet also takes pooled text embeddings and time ids (callback tensor inputs) and IP image embeds,
    which are no callback input: the pipeline's list of them, returned by ``prepare_ip_adapter_image_embeds``,
    is captured and sliced in place, the same list object the denoising loop reads."""
    captured = {}
    prepare = ref.prepare_ip_adapter_image_embeds

    def keep(*args, **kwargs):
        captured["image_embeds"] = prepare(*args, **kwargs)
        return captured["image_embeds"]

    def callback(pipe, step_index, timestep, callback_kwargs):
        if step_index == until - 1:
            for key in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
                callback_kwargs[key] = callback_kwargs[key].chunk(2)[-1]
            embeds = captured["image_embeds"]
            embeds[:] = [e.chunk(2)[-1] for e in embeds]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    return keep, dict(callback_on_step_end=callback,
                      callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"])


def one_image(steps: int) -> dict:
    """The single-image case of the parity tests: non-square, negative prompt, guidance 5, IP scale 0.5."""
    return dict(prompt="a red fox in the snow", negative_prompt="blurry", seed=5, height=64, width=96,
                num_inference_steps=steps, guidance_scale=5.0, ip_adapter_scale=0.5)


def sigmas(pipe, name: str, steps: int) -> np.ndarray:
    """The sampler's sigma at the start of each step (what a guidance interval is compared with)."""
    return pipe.samplers.tables(name, steps).sigmas[:steps].astype(np.float64)
