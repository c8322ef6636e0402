"""Tampered, foreign and hostile model folders, bad cache files, out-of-range sizes and the generate
command's bad paths: each gives a typed error naming the file and field (or recovers), and nothing
outside the folder is read, written or deleted."""

from __future__ import annotations

import json
import logging
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from kolors_trt.cli import main
from kolors_trt.runtime.errors import InputError
from kolors_trt.runtime.folder import FolderError, Limits
from kolors_trt.runtime.manifest import ManifestError, PathEscapeError
from kolors_trt.runtime.pipeline import Pipeline, PipelineInputError
from kolors_trt.runtime.postprocess import read_png_parameters
from kolors_trt.runtime.preprocess import ImageInputError

import faults

SMALL = dict(height=64, width=64, num_inference_steps=2, seed=1, output_type="latent")


def ref_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def folder(onnx_fp32, tmp_path):
    """A private copy of the fp32 export folder and a sentinel file beside it (outside the folder)."""
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_fp32, copy, ignore=shutil.ignore_patterns(".verified.json"))
    (tmp_path / "sentinel.onnx").write_bytes(b"outside the folder")
    return copy


def edit_manifest(folder, change) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def sentinel_intact(folder) -> bool:
    return (folder.parent / "sentinel.onnx").read_bytes() == b"outside the folder"


@pytest.mark.parametrize("value, error", [
    ("/etc/hostname", "absolute path"),
    ("../sentinel.onnx", "climbs out"),
    ("sub/../../sentinel.onnx", "climbs out"),
    ("escape.onnx", "outside"),  # a symlink out of the folder
])
def test_hostile_graph_paths_are_refused(folder, value, error):
    (folder / "escape.onnx").symlink_to(folder.parent / "sentinel.onnx")
    edit_manifest(folder, lambda m: m["components"]["unet"].update(file=value))
    with pytest.raises(PathEscapeError, match=error) as err:
        Pipeline.load(folder)
    assert "components.unet.file" in str(err.value) and str(folder / "manifest.json") in str(err.value)
    assert sentinel_intact(folder)


@pytest.mark.parametrize("change, match", [
    (lambda m: m["components"]["vae_decoder"].pop("sha256"), r"'components\.vae_decoder\.sha256' is missing"),
    (lambda m: m["components"]["vae_decoder"].update(sha256="abc"), r"'components\.vae_decoder\.sha256' must be a sha256"),
    (lambda m: m["components"].update(unet="unet.onnx"), r"'components\.unet' must be an object"),
    (lambda m: m["runtime"].update(vae_scaling_factor="0.13"), r"'runtime\.vae_scaling_factor' must be a number"),
    (lambda m: m["model_dims"].update(text_hidden="wide"), r"'model_dims\.text_hidden' must be an int"),
    (lambda m: m.update(version=1), "export version 1.*re-export"),
    (lambda m: m.update(components=[]), r"'components' must be an object"),
])
def test_malformed_manifest_names_file_and_field(folder, change, match):
    edit_manifest(folder, change)
    with pytest.raises(FolderError, match=match) as err:
        Pipeline.load(folder)
    assert str(folder / "manifest.json") in str(err.value)


def test_binary_manifest(folder):
    (folder / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(ManifestError, match="binary content"):
        Pipeline.load(folder)


def test_tampered_graph_is_found_even_after_a_verified_load(folder):
    Pipeline.load(folder)  # writes the verification stamp
    assert (folder / ".verified.json").is_file()
    graph = folder / "text_encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(FolderError, match="text_encoder.onnx has sha256"):
        Pipeline.load(folder)


@pytest.mark.parametrize("kind", ["wrong-shape", "wrong-dtype", "nan", "zero-bytes", "npz", "pickle"])
def test_bad_cache_file_is_deleted_logged_and_recomputed(onnx_fp32, tmp_path, caplog, kind):
    cache = tmp_path / "ip"
    pipe = Pipeline.load(onnx_fp32, cache_dir=cache)
    image = ref_image(3)
    good = pipe.encode_image(image)
    (path,) = cache.glob("*.npy")
    if kind == "wrong-shape":
        np.save(path, good[:, :8])
    elif kind == "wrong-dtype":
        np.save(path, good.astype(np.float64))
    elif kind == "nan":
        np.save(path, np.where(np.arange(good.size).reshape(good.shape) == 5, np.nan, good).astype(np.float32))
    elif kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "npz":
        with open(path, "wb") as f:
            np.savez(f, tokens=good)
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    fresh = Pipeline.load(onnx_fp32, cache_dir=cache)
    runs = fresh.stats()["engine_runs"]["image_encoder"]
    with caplog.at_level(logging.WARNING, logger="kolors_trt.runtime.cache"):
        tokens = fresh.encode_image(image)
    assert fresh.stats()["engine_runs"]["image_encoder"] == runs + 1  # recomputed, not used
    np.testing.assert_array_equal(tokens, good)
    assert any(str(path) in r.getMessage() and "deleting" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(np.load(path), good)  # rewritten with the good value
    assert fresh.generate("x", image, **SMALL).latents.shape == (1, 4, 8, 8)


def test_export_folder_sizes_are_bounded_and_overridable(onnx_fp32):
    pipe = Pipeline.load(onnx_fp32)
    with pytest.raises(PipelineInputError, match=r"height 1376 is outside the export folder's limits \[32, 1344\]"):
        pipe.generate("x", ref_image(), **dict(SMALL, height=1376))
    with pytest.raises(PipelineInputError, match=r"num_images_per_prompt must be an int in \[1, 4\]"):
        pipe.generate("x", ref_image(), **dict(SMALL, num_images_per_prompt=5))
    small = Pipeline.load(onnx_fp32, limits=Limits(max_side=96, max_batch=1))
    with pytest.raises(PipelineInputError, match=r"\[32, 96\]"):
        small.generate("x", ref_image(), **dict(SMALL, width=128))
    assert small.generate("x", ref_image(), **dict(SMALL, width=96)).latents.shape == (1, 4, 8, 12)
    with pytest.raises(InputError, match="max size"):
        Pipeline.load(onnx_fp32, limits=Limits(max_side=16))


# ---- kolors-trt generate: paths and interrupts ------------------------------------------------------


def generate_args(onnx, image, out, *extra):
    return ["generate", "--onnx", str(onnx), "--image", str(image), "--prompt", "a cat", "--out", str(out),
            "--steps", "2", "--height", "64", "--width", "64", "--seed", "1", "--no-progress", *extra]


@pytest.fixture
def ref(tmp_path):
    path = tmp_path / "ref.png"
    ref_image(1).save(path)
    return path


@pytest.mark.parametrize("out, message", [
    ("{tmp}/outdir", "is a folder; give a file name"),
    ("{tmp}/outdir/", "is a folder; give a file name"),
    ("{tmp}/ref.png/x.png", "cannot write into"),
])
def test_generate_refuses_bad_out_before_running(onnx_fp32, ref, tmp_path, capsys, monkeypatch, out, message):
    (tmp_path / "outdir").mkdir()
    loads = []
    real = Pipeline.load.__func__
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    assert main(generate_args(onnx_fp32, ref, out.format(tmp=tmp_path))) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert loads == []  # refused before any model was loaded: nothing generated
    assert not list((tmp_path / "outdir").iterdir())


@pytest.mark.parametrize("image, message", [("https://example.com/cat.png", "a URL; kolors-trt reads local files only"),
                                            ("{tmp}", "is a folder; pass an image file")])
def test_generate_image_url_or_folder(onnx_fp32, tmp_path, capsys, image, message):
    assert main(generate_args(onnx_fp32, image.format(tmp=tmp_path), tmp_path / "o.png")) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(ImageInputError, match=message):
        Pipeline.load(onnx_fp32).pixel_values(image.format(tmp=tmp_path))


def test_nul_in_prompt_does_not_break_the_png_text(onnx_fp32, ref, tmp_path):
    out = tmp_path / "nul.png"
    args = generate_args(onnx_fp32, ref, out)
    args[args.index("a cat")] = "a\x00cat"
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.text["prompt"] == "a\\x00cat"
    assert read_png_parameters(out)["prompt"] == "a\x00cat"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_generate_keeps_the_old_png(onnx_fp32, ref, tmp_path, signum):
    """A real `kolors-trt generate` stopped in its denoising loop: INT and TERM end it within seconds with one
    line and exit 130; after any of the three the old output is byte for byte what it was, with no leftover."""
    out = tmp_path / "keep.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(out)
    before = out.read_bytes()
    args = generate_args(onnx_fp32, ref, out)
    args[args.index("--steps") + 1] = "400"
    args.remove("--no-progress")
    cmd = faults.Command(*args)
    try:
        cmd.wait_for_line("denoise:")  # the progress bar: the loop is running
        seconds = cmd.signal(signum)
    finally:
        cmd.kill()
    if signum == signal.SIGKILL:
        assert cmd.proc.returncode == -signal.SIGKILL
    else:
        what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        assert cmd.proc.returncode == 130 and seconds < faults.STOP_S
        assert cmd.lines[-1].endswith(f"kolors-trt generate: {what}") and "Traceback" not in cmd.stderr
    assert out.read_bytes() == before
    assert faults.leftovers(tmp_path) == []
