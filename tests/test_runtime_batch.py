"""Pipeline.generate_batch: heterogeneous requests in one UNet batch equal their solo results; groups,
splits, padding for static profiles, cancellation between steps, and the threading contract. The
ONNX Runtime backend on the tiny fp32 export; engine-run counters prove how often each engine ran."""

from __future__ import annotations

import dataclasses
import inspect
import threading

import numpy as np
import pytest
from PIL import Image

from kolors_trt.runtime.pipeline import GenerationRequest, Pipeline, PipelineInputError

pytestmark = pytest.mark.slow


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (44 + seed, 60, 3), dtype=np.uint8), "RGB")


def rel_err(got, want) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-12))


def unet_runs(pipe: Pipeline) -> int:
    return pipe.stats()["engine_runs"]["unet"]


@pytest.fixture(scope="module")
def pipe(onnx_fp32):
    return Pipeline.load(onnx_fp32)


# Same size and steps; they differ in prompt, seed (one above 2**32), guidance (one <= 1: its own group),
# IP scale (one 0), negative prompt and reference image.
MIXED = [
    GenerationRequest("a red fox in the snow", image(1), None, 64, 96, 3, 5.0, 0.5, 7),
    GenerationRequest("一只可爱的小狗在奔跑", image(2), "blurry", 64, 96, 3, 7.5, 0.0, 2**40 + 3),
    GenerationRequest("a lighthouse at dusk", image(3), "", 64, 96, 3, 1.0, 0.8, 11),
    GenerationRequest("two cats", image(4), "low quality", 64, 96, 3, 3.0, 1.2, 5),
]


def test_request_fields_are_generate_arguments():
    names = [f.name for f in dataclasses.fields(GenerationRequest)]
    assert names == [p for p in inspect.signature(Pipeline.generate).parameters if p not in ("self", "progress")]


def test_batched_rows_equal_solo_results_one_unet_call_per_step(pipe):
    solo = [pipe.generate_batch([r])[0] for r in MIXED]
    before = unet_runs(pipe)
    batched = pipe.generate_batch(MIXED)
    # three requests with guidance > 1 share one batch, the guidance-1 request is its own group: 2 x 3 steps
    assert unet_runs(pipe) - before == 2 * 3
    for r, got, want in zip(MIXED, batched, solo):
        assert got.parameters == want.parameters and got.parameters["seed"] == r.seed
        assert rel_err(got.latents, want.latents) < 1e-5, r.prompt
        diff = np.abs(np.asarray(got.images[0], int) - np.asarray(want.images[0], int)).max()
        assert diff <= 1, f"{r.prompt}: 8-bit difference {diff}"
    # the rows really differ: no request took another's conditioning
    assert min(rel_err(a.latents, b.latents) for a, b in zip(batched, batched[1:])) > 1e-2


def test_mixed_sizes_and_steps_split_into_groups(pipe):
    requests = [
        GenerationRequest("a", image(5), height=64, width=64, num_inference_steps=2, seed=1, output_type="latent"),
        GenerationRequest("b", image(6), height=96, width=64, num_inference_steps=2, seed=2, output_type="latent"),
        GenerationRequest("c", image(7), height=64, width=64, num_inference_steps=3, seed=3, output_type="latent"),
        GenerationRequest("d", image(8), height=64, width=64, num_inference_steps=2, seed=4, output_type="latent",
                          num_images_per_prompt=2),
        GenerationRequest("e", image(9), height=96, width=64, num_inference_steps=2, seed=5, output_type="latent"),
    ]
    solo = [pipe.generate_batch([r])[0].latents for r in requests]
    before = unet_runs(pipe)
    got = pipe.generate_batch(requests)
    assert unet_runs(pipe) - before == 2 + 2 + 3  # groups {a, d}, {b, e}, {c}
    for g, want in zip(got, solo):
        assert g.latents.shape == want.shape and rel_err(g.latents, want) < 1e-5


def test_a_group_larger_than_the_profile_batch_is_split(pipe):
    most = pipe.batch_limits(True)[1]
    requests = [GenerationRequest(f"p{i}", image(i), height=64, width=64, num_inference_steps=2, seed=i,
                                  output_type="latent", num_images_per_prompt=2) for i in range(3)]
    assert 2 * len(requests) > most
    before = unet_runs(pipe)
    got = pipe.generate_batch(requests)
    assert unet_runs(pipe) - before == 2 * -(-2 * len(requests) // most)
    assert [g.latents.shape[0] for g in got] == [2, 2, 2]
    assert rel_err(got[2].latents, pipe.generate_batch(requests[2:])[0].latents) < 1e-5


def test_one_bad_request_fails_the_batch_before_any_engine_runs(pipe):
    bad = dataclasses.replace(MIXED[2], height=70)
    before = pipe.stats()["engine_runs"]
    with pytest.raises(PipelineInputError, match="height 70"):
        pipe.generate_batch([MIXED[0], bad, MIXED[1]])
    assert pipe.stats()["engine_runs"] == before
    with pytest.raises(PipelineInputError, match="GenerationRequest"):
        pipe.generate_batch([{"prompt": "x"}])
    assert pipe.generate_batch([]) == []


def test_a_request_whose_rows_overflow_fails_alone_and_its_batch_finishes(pipe):
    """guidance_scale 1e38 is finite (the checks pass) but its latents overflow: that request gets its
    NonFiniteError in its Generation while the three others of its UNet batch give their solo results."""
    from kolors_trt.runtime.postprocess import NonFiniteError

    good = [dataclasses.replace(r, num_inference_steps=2) for r in (MIXED[0], MIXED[1], MIXED[3])]
    bad = dataclasses.replace(MIXED[0], prompt="overflow", guidance_scale=1e38, seed=3, num_inference_steps=2)
    solo = [pipe.generate_batch([r])[0] for r in good]
    before = unet_runs(pipe)
    got = pipe.generate_batch([good[0], bad, good[1], good[2]])
    assert unet_runs(pipe) - before == 2  # one UNet batch of four requests per step
    assert isinstance(got[1].error, NonFiniteError) and got[1].images is None and got[1].latents is None
    assert "request 1" in str(got[1].error) and str(got[1].error).startswith("unet:")
    for g, want in zip((got[0], got[2], got[3]), solo):
        assert g.error is None and g.parameters == want.parameters
        np.testing.assert_array_equal(g.latents, want.latents)
        assert np.array_equal(np.asarray(g.images[0]), np.asarray(want.images[0]))
    with pytest.raises(NonFiniteError, match="unet"):  # one request alone: generate() raises its error
        pipe.generate(**{f.name: getattr(bad, f.name) for f in dataclasses.fields(GenerationRequest)})


def test_a_prompt_the_tokenizer_refuses_fails_alone(pipe):
    """A lone surrogate ("a\\ud800b" in JSON) is refused by the checks; a CheckedRequest made past them fails
    alone inside its batch (TokenizerError in its Generation) while the others finish."""
    from kolors_trt.runtime.tokenizer import TokenizerError

    lone = "a\ud800b"
    before = pipe.stats()["engine_runs"]
    with pytest.raises(PipelineInputError, match="lone surrogate"):
        pipe.generate_batch([MIXED[0], dataclasses.replace(MIXED[1], negative_prompt=lone)])
    assert pipe.stats()["engine_runs"] == before
    good = [dataclasses.replace(MIXED[i], num_inference_steps=2, output_type="latent") for i in (0, 1)]
    solo = [pipe.generate_batch([r])[0].latents for r in good]
    bad = dataclasses.replace(pipe.check(good[0]), prompt=lone)
    got = pipe.generate_batch([good[0], bad, good[1]])
    assert isinstance(got[1].error, TokenizerError) and "lone surrogate" in str(got[1].error)
    for g, want in zip((got[0], got[2]), solo):
        assert g.error is None
        np.testing.assert_array_equal(g.latents, want)


def test_cancelled_request_leaves_the_batch_and_the_loop_stops_when_all_are(pipe):
    requests = [dataclasses.replace(r, num_inference_steps=6, output_type="latent") for r in MIXED[:2]]
    seen = []

    def on_step(index, step, steps, latents):
        seen.append((index, step, latents().shape))

    before = unet_runs(pipe)
    got = pipe.generate_batch(requests, on_step=on_step, cancelled=lambda index: index == 1 and len(seen) >= 4)
    assert unet_runs(pipe) - before == 6
    assert got[1].cancelled and got[1].latents is None and not got[0].cancelled
    assert rel_err(got[0].latents, pipe.generate_batch(requests[:1])[0].latents) < 1e-5
    assert seen[:4] == [(0, 0, (1, 4, 8, 12)), (1, 0, (1, 4, 8, 12)), (0, 1, (1, 4, 8, 12)), (1, 1, (1, 4, 8, 12))]
    assert [s for i, s, _ in seen if i == 1] == [0, 1] and [s for i, s, _ in seen if i == 0] == list(range(6))
    # every request cancelled after step 2: the loop stops there, the VAE never runs
    vae = pipe.stats()["engine_runs"]["vae_decoder"]
    before = unet_runs(pipe)
    got = pipe.generate_batch([dataclasses.replace(r, output_type="pil") for r in requests],
                              on_step=lambda *a: None, cancelled=lambda index: unet_runs(pipe) - before >= 2)
    assert unet_runs(pipe) - before == 2 and all(g.cancelled for g in got)
    assert pipe.stats()["engine_runs"]["vae_decoder"] == vae


def test_static_profile_pads_a_short_batch(onnx_fp32, tmp_path, make_engine_folder):
    """An engine folder built for exactly 2 images: one request is padded to 2 rows and equals its solo result
    on the ONNX folder (the ONNX graphs stand in for plans, as in test_runtime_errors)."""
    from kolors_trt.runtime.backend_ort import OrtBackend, OrtEngine
    from kolors_trt.runtime.folder import read_folder
    from kolors_trt.runtime.spec import COMPONENTS, Profile

    folder = make_engine_folder(onnx_fp32, tmp_path / "engines", Profile.static(2, 64, 96))
    model = read_folder(folder)
    engines = {n: OrtEngine(model.specs[n], onnx_fp32 / f"{n}.onnx") for n in COMPONENTS}
    static = Pipeline.on_backend(model, OrtBackend(engines))
    assert static.batch_limits(True) == (2, 2)
    one = GenerationRequest("a cat", image(3), height=64, width=96, num_inference_steps=2, seed=3)
    got = static.generate_batch([one])[0]
    assert got.latents.shape == (1, 4, 8, 12) and len(got.images) == 1
    want = Pipeline.load(onnx_fp32).generate_batch([one])[0]
    assert rel_err(got.latents, want.latents) < 1e-5
    with pytest.raises(PipelineInputError, match="guidance > 1 only"):
        static.generate_batch([dataclasses.replace(one, guidance_scale=1.0)])


def test_threads_give_the_sequential_results_bit_for_bit(onnx_fp32):
    pipe = Pipeline.load(onnx_fp32)
    requests = [dataclasses.replace(MIXED[i % 4], num_inference_steps=2, seed=100 + i, output_type="latent",
                                    height=64 if i % 2 else 96, width=64) for i in range(8)]
    want = [pipe.generate_batch([r])[0].latents for r in requests]
    got: dict = {}
    errors = []
    barrier = threading.Barrier(len(requests))

    def work(i):
        try:
            barrier.wait(timeout=30)
            got[i] = pipe.generate(**{f.name: getattr(requests[i], f.name)
                                      for f in dataclasses.fields(GenerationRequest)}).latents
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for i, latents in enumerate(want):
        np.testing.assert_array_equal(got[i], latents)


def test_threads_encode_one_new_image_into_one_cache_dir(onnx_fp32, tmp_path):
    pipes = [Pipeline.load(onnx_fp32, cache_dir=tmp_path / "ip") for _ in range(2)]  # two processes' worth
    picture = image(42)
    results, errors = [], []
    barrier = threading.Barrier(12)

    def work(i):
        try:
            barrier.wait(timeout=30)
            results.append(pipes[i % 2].encode_image(picture))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 12
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    files = sorted(p.name for p in (tmp_path / "ip").iterdir())
    assert len(files) == 1 and files[0].endswith(".npy")  # one entry, no temporary file left
    fresh = Pipeline.load(onnx_fp32, cache_dir=tmp_path / "ip")
    np.testing.assert_array_equal(fresh.encode_image(picture), results[0])
    assert fresh.stats()["ip_cache"]["disk_hits"] == 1


def test_checked_requests_run_without_a_second_check(pipe, tmp_path):
    """A request from Pipeline.check runs as checked: its image is not read again (the file is gone), its seed
    stays the one the check drew, and the result equals the unchecked request's."""
    path = tmp_path / "ref.png"
    image(12).save(path)
    request = GenerationRequest("a boat", path, height=64, width=64, num_inference_steps=2, output_type="latent")
    checked = pipe.check(request, index=7)
    path.unlink()
    got = pipe.generate_batch([MIXED[0], checked])[1]
    assert got.parameters["seed"] == checked.seed
    image(12).save(path)
    want = pipe.generate_batch([dataclasses.replace(request, seed=checked.seed)])[0]
    np.testing.assert_array_equal(got.latents, want.latents)


def test_cache_contains_counts_nothing(onnx_fp32, tmp_path):
    first = Pipeline.load(onnx_fp32, cache_dir=tmp_path / "ip")
    pixels = first.pixel_values(image(13))
    key = first.image_key(pixels)
    assert not first.ip_cache.contains(key)
    first.encode_pixels(pixels)
    second = Pipeline.load(onnx_fp32, cache_dir=tmp_path / "ip")
    before = second.stats()["ip_cache"]
    assert second.ip_cache.contains(key) and key not in second.ip_cache.memory  # on disk only
    assert second.stats()["ip_cache"] == before
