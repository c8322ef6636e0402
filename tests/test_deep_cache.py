"""DeepCache at run time, end to end on the tiny fp32 export (ONNX Runtime) against the DeepCache package's
DeepCacheSDHelper on diffusers' KolorsPipeline + load_ip_adapter (uniform skip mode, branch 0, the
export's default).

Intervals 3 and 5 equal the helper within one 8-bit level per pixel (latents within 1e-4 of their max) at
a non-square size, in a batch of two requests, and with every sampler; a guidance cutoff composes with it
(diffusers' documented dynamic-CFG callback under the helper). Interval 1 is today's loop exactly. The
rows saved are read from ``stats()["unet_rows"]`` per graph. Requests with different DeepCache and
guidance intervals share a batch and equal their solo results; bad intervals are typed input errors.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest

from kolors_trt.runtime.deep_cache import DeepCacheInputError, full_mask, row_mask
from kolors_trt.runtime.errors import InputError
from kolors_trt.runtime.pipeline import GenerationRequest, Pipeline
from kolors_trt.runtime.samplers import SAMPLERS

import kolors_parity as parity
image, reference, request, assert_equal_images = parity.image, parity.reference, parity.request, parity.assert_equal_images

pytestmark = pytest.mark.slow

STEPS = 7
ONE_IMAGE = parity.one_image(STEPS)


@pytest.fixture(scope="module")
def pipe(onnx_fp32):
    return Pipeline.load(onnx_fp32)


@contextlib.contextmanager
def helper(ref, interval: int, branch: int = 0):
    """DeepCacheSDHelper on the reference pipeline for the duration (uniform skip mode)."""
    from DeepCache import DeepCacheSDHelper

    deep_cache = DeepCacheSDHelper(pipe=ref)
    deep_cache.set_params(cache_interval=interval, cache_branch_id=branch)
    deep_cache.enable()
    try:
        yield deep_cache
    finally:
        deep_cache.disable()
        del ref.unet.forward  # disable() leaves the bound method as an instance attribute


def rows(pipe) -> dict:
    stats = pipe.stats()
    return {graph: (stats["unet_rows"][graph], stats["engine_runs"][graph]) for graph in ("unet", "unet_shallow")}


def spent(before: dict, after: dict) -> dict:
    """{graph: (rows, runs)} evaluated between two ``rows`` readings."""
    return {g: (after[g][0] - before[g][0], after[g][1] - before[g][1]) for g in before}


def full_steps(steps: int, interval: int) -> int:
    return len(range(0, steps, interval))


@pytest.mark.parametrize("interval", [3, 5])
def test_interval_equals_deepcache_helper(kolors_reference, pipe, interval):
    """Non-square, IP scale 0.5, CFG: full steps at 0, interval, ...; the shallow graph between."""
    case = dict(ONE_IMAGE, image=image(1))
    with helper(kolors_reference, interval):
        want = reference(kolors_reference, case)
    before = rows(pipe)
    got = pipe.generate_batch([request(case, deep_cache_interval=interval)])[0]
    full = full_steps(STEPS, interval)
    assert spent(before, rows(pipe)) == {"unet": (2 * full, full), "unet_shallow": (2 * (STEPS - full), STEPS - full)}
    assert got.parameters["deep_cache_interval"] == interval
    assert_equal_images(got, *want, f"deep_cache_interval {interval}")
    plain = pipe.generate_batch([request(case)])[0]
    assert np.abs(plain.latents - got.latents).max() > 1e-3  # the shallow steps changed the image


def test_batch_of_two_requests_equals_the_helper_on_each(kolors_reference, pipe):
    """Two requests (seeds, guidance, IP scales, negatives, images) in one UNet batch per step and graph."""
    cases = [dict(ONE_IMAGE, height=96, width=64, image=image(10)),
             dict(ONE_IMAGE, prompt="一只可爱的小狗在奔跑", negative_prompt="low quality", seed=2**33 + 7, height=96,
                  width=64, guidance_scale=7.5, ip_adapter_scale=0.8, image=image(11))]
    before = rows(pipe)
    got = pipe.generate_batch([request(c, deep_cache_interval=3) for c in cases])
    assert spent(before, rows(pipe)) == {"unet": (4 * 3, 3), "unet_shallow": (4 * 4, 4)}
    for case, g in zip(cases, got):
        with helper(kolors_reference, 3):
            assert_equal_images(g, *reference(kolors_reference, case), f"batched {case['prompt']}")
    assert np.abs(got[0].latents - got[1].latents).max() > 1e-2  # the rows did not mix


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "euler"])
def test_every_sampler_equals_the_helper(kolors_reference, pipe, name):
    case = dict(ONE_IMAGE, image=image(2), num_inference_steps=6)
    with helper(kolors_reference, 3):
        want = reference(kolors_reference, case, name)
    timesteps = pipe.samplers.tables(name, 6).timesteps  # the helper finds the step by its timestep: all distinct
    assert len(set(timesteps.tolist())) == len(timesteps)
    assert_equal_images(pipe.generate_batch([request(case, scheduler=name, deep_cache_interval=3)])[0], *want, name)


def test_guidance_cutoff_composes_with_the_helper(kolors_reference, pipe, monkeypatch):
    """CFG on the first 3 steps (dpmpp_2m_karras, diffusers' dynamic-CFG callback) under interval 3: the
    unconditional row runs full at step 0 and shallow at 1 and 2, then is not evaluated."""
    name, until = "dpmpp_2m_karras", 3
    case = dict(ONE_IMAGE, image=image(3), guidance_scale=6.0)
    s = pipe.samplers.tables(name, STEPS).sigmas
    before = rows(pipe)
    got = pipe.generate_batch([request(case, scheduler=name, guidance_interval=(s[until], s[0]),
                                       deep_cache_interval=3)])[0]
    assert spent(before, rows(pipe)) == {"unet": (1 + 3, 3), "unet_shallow": (2 + 4, 4)}
    keep, call = parity.dynamic_cfg(kolors_reference, until)
    monkeypatch.setattr(kolors_reference, "prepare_ip_adapter_image_embeds", keep)
    with helper(kolors_reference, 3):
        want = reference(kolors_reference, case, name, **call)
    assert_equal_images(got, *want, "cutoff under DeepCache")


def test_interval_1_is_todays_loop(pipe):
    case = dict(ONE_IMAGE, image=image(4), output_type="np")
    today = pipe.generate_batch([request(case)])[0]
    before = rows(pipe)
    off = pipe.generate_batch([request(case, deep_cache_interval=1)])[0]
    assert spent(before, rows(pipe)) == {"unet": (2 * STEPS, STEPS), "unet_shallow": (0, 0)}
    np.testing.assert_array_equal(off.latents, today.latents)
    np.testing.assert_array_equal(off.images, today.images)


def test_the_mask_follows_each_rows_first_step():
    """DeepCache's uniform rule per row: (i - first) % interval == 0, first = the row's first evaluated step."""
    cfg = np.zeros((7, 2), bool)
    cfg[2:6, 0] = True  # image 0 guided at steps 2..5; image 1 never
    full = full_mask(cfg, [3, 2])
    assert full.shape == (7, 4)
    assert np.flatnonzero(full[:, 0]).tolist() == [2, 5]  # uncond of image 0: from step 2
    assert not full[:, 1].any()  # uncond of image 1: never evaluated
    assert np.flatnonzero(full[:, 2]).tolist() == [0, 3, 6] and np.flatnonzero(full[:, 3]).tolist() == [0, 2, 4, 6]
    assert full_mask(cfg, [1, 1]) is None and row_mask(np.ones(4, bool), 1).all()


def test_mixed_intervals_share_a_batch_and_equal_solo_results(pipe):
    """DeepCache intervals 1, 2 and 3 with guidance intervals that start the unconditional rows late: steps whose
    rows split between the two graphs; each request equals its solo result and no row is evaluated twice."""
    name, steps = "unipc", 6
    s = pipe.samplers.tables(name, steps).sigmas
    settings = [(1, None), (2, (s[5] / 2, s[1])), (3, (s[5] / 2, s[2])), (3, None)]
    requests = [GenerationRequest(f"prompt {i}", image(20 + i), None, 64, 96, steps, 4.0 + i, 0.5, 30 + i,
                                  output_type="latent", scheduler=name, guidance_interval=interval,
                                  deep_cache_interval=deep)
                for i, (deep, interval) in enumerate(settings)]
    solo, solo_rows = [], {"unet": 0, "unet_shallow": 0}
    for r in requests:
        before = rows(pipe)
        solo.append(pipe.generate_batch([r])[0].latents)
        for graph, (count, _) in spent(before, rows(pipe)).items():
            solo_rows[graph] += count
    # cond rows from step 0, full: 6 + 3 + 2 + 2 of 6 each; uncond rows (6 steps from 0, 5 from 1, 4 from 2,
    # 6 from 0), full: 6 + 3 + 2 + 2
    assert solo_rows == {"unet": 13 + 13, "unet_shallow": (0 + 3 + 4 + 4) + (0 + 2 + 2 + 4)}
    before = rows(pipe)
    got = pipe.generate_batch(requests)
    used = spent(before, rows(pipe))
    assert {g: c for g, (c, _) in used.items()} == solo_rows
    assert used["unet"][1] == steps and used["unet_shallow"][1] == steps - 1  # step 0 runs the full graph only
    for g, want in zip(got, solo):
        np.testing.assert_allclose(g.latents, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_cancelled_rows_leave_the_feature_cache(pipe):
    """A request cancelled after step 1 leaves a batch at interval 3; the survivor equals its solo result."""
    batch = [GenerationRequest("a cat", image(6), None, 64, 96, 5, 5.0, 0.5, 31, output_type="latent",
                               deep_cache_interval=3),
             GenerationRequest("a dog", image(7), None, 64, 96, 5, 6.0, 0.3, 32, output_type="latent",
                               deep_cache_interval=3)]
    seen = []
    got = pipe.generate_batch(batch, on_step=lambda index, step, steps, x: seen.append(step),
                              cancelled=lambda i: i == 0 and max(seen, default=0) >= 1)
    assert got[0].cancelled and not got[1].cancelled
    want = pipe.generate_batch([batch[1]])[0].latents
    np.testing.assert_allclose(got[1].latents, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("value", [0, -2, 2.0, 1.5, True, "3", 1001, 2**63, 10**30])
def test_bad_intervals_are_input_errors(pipe, value):
    before = pipe.stats()["engine_runs"]
    with pytest.raises(DeepCacheInputError, match="deep_cache_interval must be"):
        pipe.generate("a cat", image(1), height=64, width=64, num_inference_steps=2, deep_cache_interval=value)
    assert pipe.stats()["engine_runs"] == before


def test_a_folder_without_the_shallow_unet_names_the_fix(tmp_path, tiny, onnx_fp32):
    import shutil

    from kolors_trt.export.exporter import export_all, resolve_precisions

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_fp32, folder)
    export_all(*tiny, folder, resolve_precisions("fp32"), ("unet",), progress=False, deep_cache_branch=None)
    plain = Pipeline.load(folder)
    assert "unet_shallow" not in plain.stats()["unet_rows"]
    with pytest.raises(InputError, match="export without --no-deep-cache"):
        plain.generate("a cat", image(1), height=64, width=64, num_inference_steps=2, deep_cache_interval=2)
    one = dataclasses.replace(request(dict(ONE_IMAGE, image=image(5), num_inference_steps=2)), output_type="latent")
    assert plain.generate_batch([one])[0].latents.shape == (1, 4, 8, 12)  # interval 1 needs no shallow graph

