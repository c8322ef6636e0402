"""Samplers and the guidance interval, end to end on the tiny fp32 export (ONNX Runtime) against diffusers'
KolorsPipeline + load_ip_adapter with the same scheduler (``Class.from_config(pipe.scheduler.config,
**overrides)``, as a diffusers user swaps it).

Every sampler equals diffusers within one 8-bit level per pixel (latents within 1e-4 of their max) at a
non-square size with IP scale 0.5, and in a batch of two requests with different seeds, guidance and IP
scales; euler_a's per-step noise comes from the seed's generator as diffusers draws it. The guidance
interval: every sigma inside = plain CFG; none inside = diffusers at guidance_scale 1; a cutoff = diffusers'
documented dynamic-CFG callback; rows saved are counted; a mixed-interval batch equals its solo results.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kolors_trt.runtime.pipeline import GenerationRequest, Pipeline
from kolors_trt.runtime.samplers import SAMPLERS

import kolors_parity as parity
image, reference, request, assert_equal_images = parity.image, parity.reference, parity.request, parity.assert_equal_images
dynamic_cfg = parity.dynamic_cfg

pytestmark = pytest.mark.slow

STEPS = 4  # DPM-Solver and UniPC run first, second, second, first order: every update form
ONE_IMAGE = parity.one_image(STEPS)
TWO_REQUESTS = [
    dict(prompt="two cats", seed=2**33 + 7, guidance_scale=7.5, ip_adapter_scale=0.8),
    dict(prompt="一只可爱的小狗在奔跑", negative_prompt="low quality", seed=11, guidance_scale=3.0, ip_adapter_scale=0.5),
]


@pytest.fixture(scope="module")
def pipe(onnx_fp32):
    return Pipeline.load(onnx_fp32)


def rows_and_runs(pipe) -> tuple[int, int]:
    stats = pipe.stats()
    return stats["unet_rows"]["unet"], stats["engine_runs"]["unet"]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_equals_diffusers(kolors_reference, pipe, name):
    case = dict(ONE_IMAGE, image=image(1))
    want = reference(kolors_reference, case, name)
    got = pipe.generate_batch([request(case, scheduler=name)])[0]
    assert got.parameters["scheduler"] == name
    assert_equal_images(got, *want, name)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_batched_requests_equal_diffusers(kolors_reference, pipe, name):
    """Two requests (seed above 2**32, guidance, IP scale, negative, image) in one UNet batch per step."""
    cases = [dict(c, height=64, width=64, num_inference_steps=STEPS, image=image(10 + i))
             for i, c in enumerate(TWO_REQUESTS)]
    rows, runs = rows_and_runs(pipe)
    got = pipe.generate_batch([request(c, scheduler=name) for c in cases])
    assert rows_and_runs(pipe) == (rows + 4 * STEPS, runs + STEPS)  # one batch of 2 x 2 rows per step
    for case, g in zip(cases, got):
        assert_equal_images(g, *reference(kolors_reference, case, name), f"{name} {case['prompt']}")
    assert np.abs(got[0].latents - got[1].latents).max() > 1e-2  # the rows did not mix


def test_euler_a_noise_with_given_latents(kolors_reference, pipe):
    """With latents given, diffusers draws only the step noise from the generator: so does the runtime."""
    case = dict(ONE_IMAGE, image=image(2), seed=123)
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 12)).astype(np.float32)
    want = reference(kolors_reference, case, "euler_a", latents=latents)  # both scale them by init_noise_sigma
    got = pipe.generate_batch([request(case, scheduler="euler_a", latents=latents)])[0]
    assert got.parameters["seed"] == 123
    assert_equal_images(got, *want, "euler_a with latents")


def sigmas(pipe, name: str, steps: int = STEPS) -> np.ndarray:
    return parity.sigmas(pipe, name, steps)


@pytest.mark.parametrize("name", ["euler", "unipc"])
def test_interval_holding_every_sigma_is_plain_cfg(pipe, name):
    case = dict(ONE_IMAGE, image=image(3), output_type="latent")
    plain = pipe.generate_batch([request(case, scheduler=name)])[0].latents
    rows, _ = rows_and_runs(pipe)
    s = sigmas(pipe, name)
    wide = pipe.generate_batch([request(case, scheduler=name, guidance_interval=(s.min() / 2, s.max()))])[0]
    assert rows_and_runs(pipe)[0] - rows == 2 * STEPS
    np.testing.assert_array_equal(wide.latents, plain)
    assert wide.parameters["guidance_interval"] == [s.min() / 2, s.max()]


def test_interval_holding_no_sigma_is_guidance_1(kolors_reference, pipe):
    case = dict(ONE_IMAGE, image=image(4))
    s = sigmas(pipe, "dpmpp_2m_karras")
    rows, _ = rows_and_runs(pipe)
    got = pipe.generate_batch([request(case, scheduler="dpmpp_2m_karras",
                                       guidance_interval=(s.max() + 1, s.max() + 10))])[0]
    assert rows_and_runs(pipe)[0] - rows == STEPS  # the conditional row only
    want = reference(kolors_reference, dict(case, guidance_scale=1.0), "dpmpp_2m_karras")
    assert_equal_images(got, *want, "interval without a sigma")


@pytest.mark.parametrize("name, steps, until", [("dpmpp_2m_karras", 5, 2), ("euler_a", 4, 3)])
def test_cutoff_equals_diffusers_dynamic_cfg(kolors_reference, pipe, monkeypatch, name, steps, until):
    """CFG on the first ``until`` steps: the interval (sigma_until, sigma_0]."""
    case = dict(ONE_IMAGE, image=image(5), num_inference_steps=steps, guidance_scale=6.0)
    s = sigmas(pipe, name, steps)
    rows, _ = rows_and_runs(pipe)
    got = pipe.generate_batch([request(case, scheduler=name, guidance_interval=(s[until], s[0]))])[0]
    assert rows_and_runs(pipe)[0] - rows == 2 * until + (steps - until)
    keep, call = dynamic_cfg(kolors_reference, until)
    monkeypatch.setattr(kolors_reference, "prepare_ip_adapter_image_embeds", keep)
    assert_equal_images(got, *reference(kolors_reference, case, name, **call), f"{name} cutoff at {until}")
    plain = pipe.generate_batch([request(case, scheduler=name)])[0]
    assert np.abs(plain.latents - got.latents).max() > 1e-3  # the cutoff changed the image


def test_mixed_intervals_share_a_batch_and_equal_solo_results(pipe):
    name, steps = "unipc", 5
    s = sigmas(pipe, name, steps)
    intervals = [None, (s[2], s[0]), (s[4] / 2, s[1]), (s[0], s[0] + 1)]  # every step, first 2, last 4, none
    requests = [GenerationRequest(f"prompt {i}", image(20 + i), None, 64, 96, steps, 4.0 + i, 0.5, 30 + i,
                                  output_type="latent", scheduler=name, guidance_interval=interval)
                for i, interval in enumerate(intervals)]
    requests.append(dataclasses.replace(requests[0], prompt="no guidance", guidance_scale=1.0, guidance_interval=None))
    solo, solo_rows = [], 0
    for r in requests:
        before = rows_and_runs(pipe)[0]
        solo.append(pipe.generate_batch([r])[0].latents)
        solo_rows += rows_and_runs(pipe)[0] - before
    assert solo_rows == 2 * steps + (2 * 2 + 3) + (2 * 4 + 1) + steps + steps
    rows, runs = rows_and_runs(pipe)
    got = pipe.generate_batch(requests)
    # the four guided requests share one batch (the one without a sigma in its interval is never guided, so it
    # joins the guidance-1 request's group); no row is evaluated twice
    assert rows_and_runs(pipe) == (rows + solo_rows, runs + 2 * steps)
    for g, want in zip(got, solo):
        np.testing.assert_allclose(g.latents, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_static_profile_pads_the_steps_outside_the_interval(onnx_fp32, tmp_path, make_engine_folder, pipe):
    """A profile built for exactly 2 images under CFG (UNet batch 4): steps outside a request's interval pad the
    UNet batch to 4 rows, and the result equals the dynamic folder's."""
    from kolors_trt.runtime.backend_ort import OrtBackend, OrtEngine
    from kolors_trt.runtime.folder import read_folder
    from kolors_trt.runtime.spec import COMPONENTS, Profile

    model = read_folder(make_engine_folder(onnx_fp32, tmp_path / "engines", Profile.static(2, 64, 96)))
    engines = {n: OrtEngine(model.specs[n], onnx_fp32 / f"{n}.onnx") for n in COMPONENTS}
    static = Pipeline.on_backend(model, OrtBackend(engines))
    s = sigmas(pipe, "dpmpp_2m", 3)
    one = GenerationRequest("a cat", image(6), height=64, width=96, num_inference_steps=3, seed=3,
                            scheduler="dpmpp_2m", guidance_interval=(s[1], s[0]), output_type="latent")
    got = static.generate_batch([one])[0]
    assert static.stats()["unet_rows"] == {"unet": 3 * 4}
    want = pipe.generate_batch([one])[0]
    np.testing.assert_allclose(got.latents, want.latents, rtol=0, atol=1e-5 * np.abs(want.latents).max())
