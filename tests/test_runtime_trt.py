"""The TensorRT backend's own code (runtime/backend_trt.py, trt_plans.py) on the CPU: the real TrtBackend,
TrtEngine and on-device denoising loop, opened on engine folders whose plans the TensorRT stand-in
reads (tests/trt_standin: ONNX Runtime through raw pointers, and a CPU device whose CUDA graphs record
and replay launches). Every result is compared with the ONNX Runtime backend on the same fp32 graphs:
within 1/255 per pixel. DeepCache runs both UNet graphs on the device loop (its feature cache a device
buffer: no host copy per step), with CUDA graphs per step key, padded static profiles and cancellation.

To add tests on the stand-in (LoRA refit, ...), use conftest.py's fixtures:

    folder = standin_engines(Profile(...), target="tensorrt" | "tensorrt-rtx", refit=False)
    pipe = trt_pipeline(folder, cuda_graph=None, device=None, runtime_cache=None)
    pipe.generate(...) / pipe.generate_batch([...])          # compare with Pipeline.load(onnx_fp32)
    pipe._runner                                             # the TrtBackend: .engines["unet"].engine is the
                                                             # stand-in ICudaEngine (runs, jit_compilations)

``trt_standin.CpuDevice(capability=(8, 9))`` is the device to pass to see its captured graphs
(``device.graphs``) or to play another GPU.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from kolors_trt.runtime.pipeline import GenerationRequest, Pipeline
from kolors_trt.runtime.spec import DimRange, Profile

torch = pytest.importorskip("torch")

DYNAMIC = Profile(DimRange(1, 1, 2), DimRange(64, 64, 128), DimRange(64, 96, 128))
STATIC = Profile.static(2, 64, 96)


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40 + seed, 52, 3), dtype=np.uint8), "RGB")


def same_image(got, want) -> None:
    """Within 1/255 per pixel (8-bit images) and the latents to float32 rounding."""
    for a, b in zip(got.images, want.images):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert diff.max() <= 1, diff.max()
    np.testing.assert_allclose(got.latents, want.latents, rtol=1e-4, atol=1e-4 * np.abs(want.latents).max())


@pytest.fixture(scope="module")
def ort(onnx_fp32):
    return Pipeline.load(onnx_fp32)


@pytest.fixture(scope="module")
def dynamic(standin_engines, trt_pipeline):
    return trt_pipeline(standin_engines(DYNAMIC))


REQUESTS = [  # size, steps, guidance (1.0: no CFG), IP scale (0: no IP attention), negative prompt
    GenerationRequest("a red fox in the snow", image(1), None, 64, 96, 3, 5.0, 0.5, 7),
    GenerationRequest("一只可爱的小狗在奔跑", image(2), "blurry", 128, 64, 2, 7.5, 0.0, 11),
    GenerationRequest("a lighthouse", image(3), "", 96, 96, 2, 1.0, 0.8, 5, num_images_per_prompt=2),
]


@pytest.mark.parametrize("index", range(len(REQUESTS)))
def test_single_requests_match_onnxruntime(dynamic, ort, index):
    same_image(dynamic.generate_batch([REQUESTS[index]])[0], ort.generate_batch([REQUESTS[index]])[0])


def test_a_batch_keeps_each_rows_guidance_and_ip_scale(dynamic, ort):
    batch = [GenerationRequest("a cat", image(4), None, 64, 96, 2, 3.0, 1.2, 21),
             GenerationRequest("a dog", image(5), "ugly", 64, 96, 2, 8.0, 0.0, 22)]
    before = dynamic.stats()["engine_runs"]["unet"]
    got = dynamic.generate_batch(batch)
    assert dynamic.stats()["engine_runs"]["unet"] - before == 2  # one UNet batch per step
    for g, request in zip(got, batch):
        same_image(g, ort.generate_batch([request])[0])


def test_cancellation_drops_rows_and_the_others_finish_alone(dynamic, ort):
    batch = [GenerationRequest("a cat", image(6), None, 64, 96, 3, 5.0, 0.5, 31),
             GenerationRequest("a dog", image(7), None, 64, 96, 3, 6.0, 0.3, 32)]
    shapes = []
    unet = dynamic.engines["unet"]
    real = unet.enqueue

    def watch(context=None):
        shapes.append(unet.context.get_tensor_shape("sample") if context is None else context.get_tensor_shape("sample"))
        real(context)

    unet.enqueue = watch
    try:
        got = dynamic.generate_batch(batch, on_step=lambda *a: None, cancelled=lambda i: i == 0 and len(shapes) >= 1)
    finally:
        del unet.enqueue
    assert got[0].cancelled and not got[1].cancelled
    assert [s[0] for s in shapes] == [4, 2, 2]  # 2 images under CFG, then the survivor alone
    same_image(got[1], ort.generate_batch([batch[1]])[0])
    before = dynamic.stats()["engine_runs"]
    got = dynamic.generate_batch(batch, on_step=lambda *a: None, cancelled=lambda i: True)
    assert all(g.cancelled for g in got)  # every request cancelled after step 0: the loop stops, no VAE
    after = dynamic.stats()["engine_runs"]
    assert after["unet"] - before["unet"] == 1 and after["vae_decoder"] == before["vae_decoder"]


def test_a_static_profile_pads_and_replays_one_graph(standin_engines, trt_pipeline, trt_standin, ort):
    device = trt_standin.CpuDevice()
    pipe = trt_pipeline(standin_engines(STATIC), device=device)  # static: CUDA graphs by default
    requests = [GenerationRequest("a boat", image(8), None, 64, 96, 3, 5.0, 0.5, 41),
                GenerationRequest("a tree", image(9), "dark", 64, 96, 2, 7.0, 0.7, 42)]
    for request in requests:  # one request padded to the profile's 2 images; the second replays the graph
        same_image(pipe.generate_batch([request])[0], ort.generate_batch([request])[0])
    assert len(pipe.engines["unet"].graphs) == 1 and [g.replays for g in device.graphs] == [5]


def test_cuda_graphs_across_two_shapes_keep_each_graph_with_its_context(standin_engines, trt_pipeline, trt_standin,
                                                                          ort):
    """Shape A captured, then B captured, then A replayed: A's graph must not run with B's context state."""
    device = trt_standin.CpuDevice()
    pipe = trt_pipeline(standin_engines(DYNAMIC), cuda_graph=True, device=device)
    a = GenerationRequest("a cat", image(10), None, 64, 96, 2, 5.0, 0.5, 51)
    b = GenerationRequest("a cat", image(10), None, 96, 64, 2, 5.0, 0.5, 52)
    for request in (a, b, a):
        same_image(pipe.generate_batch([request])[0], ort.generate_batch([request])[0])
    assert len(pipe.engines["unet"].graphs) == 2 and sum(g.replays for g in device.graphs) == 6


def test_tensorrt_rtx_static_folders_use_its_own_cuda_graphs(standin_engines, trt_pipeline, trt_standin, ort):
    """TensorRT-RTX captures its own launches (IRuntimeConfig.cuda_graph_strategy): no torch-level graph."""
    rtx = trt_standin.module("tensorrt_rtx")
    device = trt_standin.CpuDevice((12, 0))
    pipe = trt_pipeline(standin_engines(STATIC, "tensorrt-rtx", compute_capabilities=("SM120",)), device=device)
    unet = pipe.engines["unet"]
    assert not unet.cuda_graph and unet.context.config.cuda_graph_strategy == rtx.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
    assert pipe.engines["vae_decoder"].context.config.cuda_graph_strategy == rtx.CudaGraphStrategy.DISABLED
    request = GenerationRequest("a boat", image(8), None, 64, 96, 2, 5.0, 0.5, 44)
    same_image(pipe.generate_batch([request])[0], ort.generate_batch([request])[0])
    assert not device.graphs


def test_without_stream_capture_the_steps_run_eagerly(standin_engines, trt_pipeline, trt_standin, ort, monkeypatch,
                                                      caplog):
    monkeypatch.setattr(trt_standin.runtime.IExecutionContext, "is_stream_capturable", lambda self, stream: False)
    device = trt_standin.CpuDevice()
    pipe = trt_pipeline(standin_engines(STATIC), device=device)
    request = GenerationRequest("a boat", image(8), None, 64, 96, 2, 5.0, 0.5, 43)
    with caplog.at_level(logging.WARNING):
        same_image(pipe.generate_batch([request])[0], ort.generate_batch([request])[0])
    assert "cannot be captured" in caplog.text and not device.graphs and not pipe.engines["unet"].cuda_graph


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras", "unipc"])
def test_samplers_and_guidance_intervals_match_onnxruntime(standin_engines, trt_pipeline, trt_standin, ort, name):
    """A batch of two requests with different guidance and intervals, CUDA graphs on (one per UNet batch size):
    each image and the UNet rows evaluated equal the ONNX Runtime backend's."""
    device = trt_standin.CpuDevice()
    pipe = trt_pipeline(standin_engines(DYNAMIC), cuda_graph=True, device=device)
    sigmas = ort.samplers.tables(name, 4).sigmas
    batch = [GenerationRequest("a cat", image(11), None, 64, 96, 4, 5.0, 0.5, 61, scheduler=name),
             GenerationRequest("a dog", image(12), "ugly", 64, 96, 4, 7.0, 0.8, 62, scheduler=name,
                               guidance_interval=(sigmas[2], sigmas[0]))]  # guided at steps 0 and 1 only
    ort_rows = ort.stats()["unet_rows"]["unet"]
    want = ort.generate_batch(batch)
    got = pipe.generate_batch(batch)
    for g, w in zip(got, want):
        same_image(g, w)
    assert pipe.stats()["unet_rows"]["unet"] == ort.stats()["unet_rows"]["unet"] - ort_rows == 4 * 4 - 2
    assert sorted(g.replays for g in device.graphs) == [2, 2]  # 4 rows at steps 0 and 1, 3 rows at 2 and 3


# ---- DeepCache: the two UNet graphs on the device loop; the feature cache is a device buffer ----


def unet_rows(pipe) -> dict:
    return dict(pipe.stats()["unet_rows"])


def spent(before: dict, after: dict) -> dict:
    return {g: after[g] - before[g] for g in after}


def test_interval_3_matches_onnxruntime_with_cuda_graphs(standin_engines, trt_pipeline, trt_standin, ort):
    """Two requests at interval 3, one guided from step 1 on: steps whose rows split between the two graphs."""
    device = trt_standin.CpuDevice()
    pipe = trt_pipeline(standin_engines(DYNAMIC), cuda_graph=True, device=device)
    assert sorted(pipe.stats()["unet_rows"]) == ["unet", "unet_shallow"]
    sigmas = ort.samplers.tables("dpmpp_2m", 5).sigmas
    batch = [GenerationRequest("a cat", image(1), None, 64, 96, 5, 5.0, 0.5, 61, scheduler="dpmpp_2m",
                               deep_cache_interval=3),
             GenerationRequest("a dog", image(2), "ugly", 64, 96, 5, 7.0, 0.8, 62, scheduler="dpmpp_2m",
                               guidance_interval=(sigmas[4] / 2, sigmas[1]), deep_cache_interval=3)]
    ort_before, before = unet_rows(ort), unet_rows(pipe)
    want = ort.generate_batch(batch)
    got = pipe.generate_batch(batch)
    for g, w in zip(got, want):
        same_image(g, w)
    used = spent(before, unet_rows(pipe))
    # cond rows full at 0, 3; uncond of the first at 0, 3; of the second (from step 1) at 1, 4
    assert used == spent(ort_before, unet_rows(ort)) == {"unet": 2 * 4, "unet_shallow": 3 + 3 + 3 + 2}
    # step keys: 0 (3 full rows), 1 (1 full, 3 shallow), 2 (4 shallow), 3 (3 full, 1 shallow), 4 (1 full, 3 shallow)
    assert sorted(g.replays for g in device.graphs) == [1, 1, 1, 2]
    plain = pipe.generate_batch(batch[:1] + [GenerationRequest("a cat", image(1), None, 64, 96, 5, 5.0, 0.5, 61,
                                                               scheduler="dpmpp_2m")])
    assert np.abs(plain[0].latents - plain[1].latents).max() > 1e-3  # interval 3 differs from the full loop


def test_static_profile_pads_each_graph_and_replays(standin_engines, trt_pipeline, trt_standin, ort):
    """Profile for exactly 2 images under CFG: one request's 2 rows pad to 4 in both graphs; the second request
    replays the captured steps."""
    device = trt_standin.CpuDevice()
    pipe = trt_pipeline(standin_engines(STATIC), device=device)  # static: CUDA graphs by default
    before = unet_rows(pipe)
    for seed in (41, 42):
        request = GenerationRequest("a boat", image(8), None, 64, 96, 4, 5.0, 0.5, seed, deep_cache_interval=3)
        same_image(pipe.generate_batch([request])[0], ort.generate_batch([request])[0])
    assert spent(before, unet_rows(pipe)) == {"unet": 2 * 2 * 4, "unet_shallow": 2 * 2 * 4}
    assert sorted(g.replays for g in device.graphs) == [4, 4]  # full steps 0, 3; shallow steps 1, 2


def test_a_cancelled_request_leaves_the_feature_cache(standin_engines, trt_pipeline, ort):
    pipe = trt_pipeline(standin_engines(DYNAMIC), cuda_graph=True)
    batch = [GenerationRequest("a cat", image(6), None, 64, 96, 5, 5.0, 0.5, 31, deep_cache_interval=2),
             GenerationRequest("a dog", image(7), None, 64, 96, 5, 6.0, 0.3, 32, deep_cache_interval=2)]
    seen = []
    got = pipe.generate_batch(batch, on_step=lambda index, step, steps, x: seen.append(step),
                              cancelled=lambda i: i == 0 and max(seen, default=0) >= 2)
    assert got[0].cancelled and not got[1].cancelled
    same_image(got[1], ort.generate_batch([batch[1]])[0])


def test_no_host_copy_per_step(standin_engines, trt_pipeline, monkeypatch):
    """The loop reads the device back once (the final latents), DeepCache or not."""
    import kolors_trt.runtime.trt_loop as trt_loop

    copies = []
    real = trt_loop.host_copy
    monkeypatch.setattr(trt_loop, "host_copy", lambda t: copies.append(tuple(t.shape)) or real(t))
    pipe = trt_pipeline(standin_engines(DYNAMIC), cuda_graph=True)
    pipe.generate_batch([GenerationRequest("a cat", image(3), None, 64, 96, 6, 5.0, 0.5, 5, output_type="latent",
                                           deep_cache_interval=3)])
    assert copies == [(1, 4, 8, 12)]
