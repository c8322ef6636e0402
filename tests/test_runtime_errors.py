"""Bad input fails fast with a typed error before any engine runs; NaN/Inf in a
stage's output names the stage; wrong, stale and engine folders."""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kolors_trt.runtime.folder import BackendError, FolderError, StaleArtifactError, read_folder
from kolors_trt.runtime.pipeline import Pipeline, PipelineInputError
from kolors_trt.runtime.postprocess import NonFiniteError
from kolors_trt.runtime.preprocess import ImageInputError
from kolors_trt.runtime.samplers import SamplerError
from kolors_trt.runtime.scheduler import SchedulerStepError
from kolors_trt.runtime.spec import COMPONENTS, DimRange, Profile

GOOD = dict(height=64, width=64, num_inference_steps=2, seed=0, output_type="latent")


@pytest.fixture(scope="module")
def pipe(onnx_fp32):
    return Pipeline.load(onnx_fp32)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.full((20, 30, 3), 128, np.uint8))


def huge_png(path, width=20000, height=20000):
    """A valid 1x1 PNG whose header claims width x height (a decompression-bomb shape)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def bad_images(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    return {
        "missing": tmp_path / "missing.png",
        "truncated": truncated,
        "not-an-image": text,
        "empty-file": empty,
        "zero-size": Image.new("RGB", (0, 0)),
        "huge": huge_png(tmp_path / "huge.png"),
        "wrong-type": 3.5,
    }


def assert_no_engine_ran(pipe, call, error, match=None):
    before = dict(pipe.stats()["engine_runs"])
    with pytest.raises(error, match=match):
        call()
    assert pipe.stats()["engine_runs"] == before, "an engine ran before the input was rejected"


@pytest.mark.parametrize("case", ["missing", "truncated", "not-an-image", "empty-file", "zero-size", "huge", "wrong-type"])
def test_bad_image(pipe, tmp_path, case):
    source = bad_images(tmp_path)[case]
    assert_no_engine_ran(pipe, lambda: pipe.generate("x", source, **GOOD), ImageInputError)
    assert_no_engine_ran(pipe, lambda: pipe.encode_image(source), ImageInputError)


BAD_ARGS = {
    "height-not-multiple": (dict(height=72), PipelineInputError, "multiple of 32"),
    "width-not-multiple": (dict(width=100), PipelineInputError, "multiple of 32"),
    "height-too-large": (dict(height=1376), PipelineInputError, "outside the export folder's limits \\[32, 1344\\]"),
    "height-zero": (dict(height=0), PipelineInputError, "outside"),
    "height-float": (dict(height=64.0), PipelineInputError, "int"),
    "steps-zero": (dict(num_inference_steps=0), PipelineInputError, "num_inference_steps"),
    "steps-negative": (dict(num_inference_steps=-3), PipelineInputError, "num_inference_steps"),
    "steps-over-schedule": (dict(num_inference_steps=5000), SchedulerStepError, "num_inference_steps"),
    "guidance-nan": (dict(guidance_scale=float("nan")), PipelineInputError, "guidance_scale must be finite"),
    "guidance-inf": (dict(guidance_scale=float("inf")), PipelineInputError, "guidance_scale must be finite"),
    "guidance-str": (dict(guidance_scale="high"), PipelineInputError, "guidance_scale must be a number"),
    "ip-scale-nan": (dict(ip_adapter_scale=float("nan")), PipelineInputError, "ip_adapter_scale must be finite"),
    "ip-scale-inf": (dict(ip_adapter_scale=-float("inf")), PipelineInputError, "ip_adapter_scale must be finite"),
    "images-zero": (dict(num_images_per_prompt=0), PipelineInputError, "num_images_per_prompt"),
    "seed-negative": (dict(seed=-1), PipelineInputError, "seed"),
    "latents-shape": (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), PipelineInputError, "latents"),
    "latents-nan": (dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), PipelineInputError, "NaN"),
    "tokens-shape": (dict(ip_adapter_tokens=np.zeros((1, 8, 4), np.float32)), PipelineInputError, "ip_adapter_tokens"),
    "output-type": (dict(output_type="jpeg"), PipelineInputError, "output_type"),
    "negative-list": (dict(negative_prompt=["a"]), PipelineInputError, "negative_prompt"),
    "scheduler-unknown": (dict(scheduler="ddim"), SamplerError,
                          "'ddim' is not one of the samplers: euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc"),
    "scheduler-not-str": (dict(scheduler=3), PipelineInputError, "scheduler must be a sampler name"),
    "interval-low-high": (dict(guidance_interval=(2.0, 2.0)), PipelineInputError, "low < high"),
    "interval-reversed": (dict(guidance_interval=(5.0, 1.0)), PipelineInputError, "low < high"),
    "interval-negative": (dict(guidance_interval=(-0.5, 1.0)), PipelineInputError, "low must be >= 0"),
    "interval-inf": (dict(guidance_interval=(0.5, float("inf"))), PipelineInputError, "high must be finite"),
    "interval-nan": (dict(guidance_interval=(float("nan"), 1.0)), PipelineInputError, "low must be finite"),
    "interval-one-value": (dict(guidance_interval=(1.0,)), PipelineInputError, "\\(low, high\\)"),
    "interval-str": (dict(guidance_interval="0.3:5"), PipelineInputError, "\\(low, high\\)"),
    "interval-bound-str": (dict(guidance_interval=("a", 1.0)), PipelineInputError, "two numbers"),
    "interval-bound-bool": (dict(guidance_interval=(True, 5.0)), PipelineInputError, "two numbers"),
    "interval-set": (dict(guidance_interval={0.5, 2.0}), PipelineInputError, "two numbers"),
    "interval-dict": (dict(guidance_interval={"low": 0.5, "high": 2.0}), PipelineInputError, "two numbers"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(pipe, image, case):
    override, error, match = BAD_ARGS[case]
    args = dict(GOOD, **override)
    src = None if "ip_adapter_tokens" in override else image
    assert_no_engine_ran(pipe, lambda: pipe.generate("x", src, **args), error, match)


def test_prompt_must_be_str(pipe, image):
    assert_no_engine_ran(pipe, lambda: pipe.generate(["a", "b"], image, **GOOD), PipelineInputError, "prompt")


def test_image_required_unless_scale_zero(pipe, image):
    assert_no_engine_ran(pipe, lambda: pipe.generate("x", None, **GOOD), PipelineInputError, "reference image")
    tokens = pipe.encode_image(image)
    assert_no_engine_ran(pipe, lambda: pipe.generate("x", image, ip_adapter_tokens=tokens, **GOOD),
                         PipelineInputError, "either")
    # At scale 0 the IP branch is multiplied by 0: no image gives the image any reference gives.
    no_image = pipe.generate("x", None, ip_adapter_scale=0.0, **GOOD).latents
    np.testing.assert_array_equal(no_image, pipe.generate("x", image, ip_adapter_scale=0.0, **GOOD).latents)


@pytest.mark.parametrize("stage", ["text_encoder", "image_encoder", "unet", "vae_decoder"])
def test_non_finite_output_names_stage(onnx_fp32, stage):
    pipe = Pipeline.load(onnx_fp32)
    engine = pipe.engines[stage]
    real = engine._execute

    def poisoned(feeds, values):
        out = real(feeds, values)
        first = engine.spec.output_names[0]
        out[first] = out[first].copy()
        out[first].flat[0] = np.inf
        return out

    engine._execute = poisoned
    with pytest.raises(NonFiniteError, match=stage):
        pipe.generate("new prompt", Image.new("RGB", (9, 9), (1, 2, 3)), **dict(GOOD, output_type="pil"))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FolderError, match="no manifest.json"):
        Pipeline.load(tmp_path)
    with pytest.raises(FolderError, match="not a folder"):
        Pipeline.load(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FolderError, match="format"):
        Pipeline.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FolderError, match="not valid JSON"):
        Pipeline.load(tmp_path)


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_stale_graph(onnx_fp32, tmp_path):
    folder = copy_folder(onnx_fp32, tmp_path / "onnx")
    graph = folder / "vae_decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(StaleArtifactError, match="vae_decoder.onnx.*sha256"):
        Pipeline.load(folder)
    graph.unlink()
    with pytest.raises(FolderError, match="missing"):
        Pipeline.load(folder)


def test_missing_runtime_constants(onnx_fp32, tmp_path):
    folder = copy_folder(onnx_fp32, tmp_path / "onnx")
    m = json.loads((folder / "manifest.json").read_text())
    del m["runtime"]
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FolderError, match="runtime"):
        Pipeline.load(folder)


PROFILE = Profile(DimRange(1, 1, 2), DimRange(64, 64, 128), DimRange(64, 96, 128))


def test_engine_folder_reads_profile_and_needs_gpu(onnx_fp32, tmp_path, make_engine_folder):
    folder = make_engine_folder(onnx_fp32, tmp_path / "engines", PROFILE, plans="fake")
    model = read_folder(folder)
    assert model.kind == "engines" and model.target == "tensorrt"
    assert (model.profile.height.min, model.profile.height.max, model.profile.batch.max) == (64, 128, 2)
    with pytest.raises(BackendError, match="export folder|engine folder"):
        Pipeline.load(folder, backend="onnxruntime")
    with pytest.raises(BackendError, match="cannot run on"):
        Pipeline.load(folder, backend="tensorrt-rtx")
    # a CPU host: no tensorrt package, or no GPU visible to torch; a GPU host: the plans' fake builder version
    with pytest.raises(BackendError, match="needs the Python package 'tensorrt'|needs an NVIDIA GPU|"
                                           "only load in the version that built them"):
        Pipeline.load(folder)
    (folder / "unet.plan").write_bytes(b"ftrt-replaced")
    with pytest.raises(StaleArtifactError, match="unet.plan"):
        Pipeline.load(folder)


def test_export_folder_refuses_trt_backend(onnx_fp32):
    with pytest.raises(BackendError, match="export folder"):
        Pipeline.load(onnx_fp32, backend="tensorrt")
    with pytest.raises(BackendError, match="unknown backend"):
        Pipeline.load(onnx_fp32, backend="cuda")


def test_engine_profile_bounds_checked_first(onnx_fp32, tmp_path, image, make_engine_folder):
    """An engine folder's profile bounds sizes and batch: the ONNX graphs stand in for its plans."""
    from kolors_trt.runtime.backend_ort import OrtBackend, OrtEngine

    model = read_folder(make_engine_folder(onnx_fp32, tmp_path / "engines", PROFILE))
    engines = {n: OrtEngine(model.specs[n], onnx_fp32 / f"{n}.onnx") for n in COMPONENTS}
    pipe = Pipeline.on_backend(model, OrtBackend(engines))
    for override, match in [(dict(height=160), "outside the engine profile \\[64, 128\\]"),
                            (dict(width=32), "outside the engine profile"),
                            (dict(num_images_per_prompt=3), "num_images_per_prompt")]:
        assert_no_engine_ran(pipe, lambda: pipe.generate("x", image, **dict(GOOD, **override)), PipelineInputError, match)
    assert pipe.generate("x", image, **dict(GOOD, height=128, width=96)).latents.shape == (1, 4, 16, 12)
