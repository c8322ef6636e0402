"""`kolors-trt generate` on an export folder: PNGs with their parameters, typed errors as exit code 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kolors_trt.cli import main
from kolors_trt.runtime.cli import output_paths
from kolors_trt.runtime.postprocess import read_png_parameters


@pytest.fixture
def ref(tmp_path):
    path = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_writes_png_with_parameters(onnx_fp32, ref, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = main(["generate", "--onnx", str(onnx_fp32), "--image", str(ref), "--prompt", "a red fox",
               "--negative-prompt", "blurry", "--out", str(out), "--seed", "5", "--steps", "2", "--height", "64",
               "--width", "96", "--guidance", "4.5", "--ip-scale", "0.7", "--cache-dir", str(tmp_path / "cache"),
               "--no-progress"])
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (96, 64) and im.mode == "RGB"
        assert im.text["prompt"] == "a red fox" and im.text["seed"] == "5"
    params = read_png_parameters(out)
    assert params["negative_prompt"] == "blurry" and params["num_inference_steps"] == 2
    assert params["guidance_scale"] == 4.5 and params["ip_adapter_scale"] == 0.7 and params["image"] == str(ref)
    assert "wrote" in capsys.readouterr().out
    assert list((tmp_path / "cache").glob("*.npy"))


def test_generate_several_images(onnx_fp32, ref, tmp_path):
    out = tmp_path / "many.png"
    rc = main(["generate", "--onnx", str(onnx_fp32), "--image", str(ref), "--prompt", "x", "--out", str(out),
               "--steps", "1", "--height", "64", "--width", "64", "--num-images", "2", "--seed", "1", "--no-progress"])
    assert rc == 0
    assert [read_png_parameters(p)["index"] for p in output_paths(out, 2)] == [0, 1]
    assert not out.exists()


def test_generate_error_exit_code(onnx_fp32, ref, tmp_path, capsys):
    rc = main(["generate", "--onnx", str(onnx_fp32), "--image", str(ref), "--prompt", "x", "--out",
               str(tmp_path / "o.png"), "--height", "70", "--no-progress"])
    assert rc == 1
    assert "multiple of 32" in capsys.readouterr().err


def test_output_paths():
    assert output_paths("a/b.png", 1) == [Path("a/b.png")]
    assert output_paths("a/b.PNG", 1) == [Path("a/b.PNG")] and output_paths("a/b.jpg", 1) == [Path("a/b.jpg.png")]
    assert [p.name for p in output_paths("a/b.png", 3)] == ["b-0.png", "b-1.png", "b-2.png"]
    assert [p.name for p in output_paths("a/b", 1)] == ["b.png"]
