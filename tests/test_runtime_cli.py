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


def test_generate_with_a_sampler_and_guidance_interval(onnx_fp32, ref, tmp_path, capsys):
    """The PNG is the Pipeline's image for the same arguments; the rows line counts the skipped uncond rows."""
    from kolors_trt.runtime.pipeline import Pipeline

    out = tmp_path / "unipc.png"
    rc = main(["generate", "--onnx", str(onnx_fp32), "--image", str(ref), "--prompt", "a red fox", "--out", str(out),
               "--seed", "5", "--steps", "3", "--height", "64", "--width", "64", "--scheduler", "unipc",
               "--guidance-interval", "0.28:5.42", "--no-progress"])
    assert rc == 0
    params = read_png_parameters(out)
    assert params["scheduler"] == "unipc" and params["guidance_interval"] == [0.28, 5.42]
    pipe = Pipeline.load(onnx_fp32)
    want = pipe.generate("a red fox", str(ref), seed=5, num_inference_steps=3, height=64, width=64, scheduler="unipc",
                         guidance_interval=(0.28, 5.42))
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im), np.asarray(want.images[0]))
    sigmas = pipe.samplers.tables("unipc", 3).sigmas[:3]
    guided = int(((sigmas > 0.28) & (sigmas <= 5.42)).sum())
    assert 0 < guided < 3
    assert f"UNet rows: unet {3 + guided}" in capsys.readouterr().out


def test_generate_with_deep_cache(onnx_fp32, ref, tmp_path, capsys):
    """--deep-cache-interval: the Pipeline's image for the same arguments; the rows line counts both graphs."""
    from kolors_trt.runtime.pipeline import Pipeline

    out = tmp_path / "cached.png"
    rc = main(["generate", "--onnx", str(onnx_fp32), "--image", str(ref), "--prompt", "a red fox", "--out", str(out),
               "--seed", "5", "--steps", "4", "--height", "64", "--width", "96", "--deep-cache-interval", "3",
               "--no-progress"])
    assert rc == 0 and read_png_parameters(out)["deep_cache_interval"] == 3
    want = Pipeline.load(onnx_fp32).generate("a red fox", str(ref), seed=5, num_inference_steps=4, height=64,
                                             width=96, deep_cache_interval=3)
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im), np.asarray(want.images[0]))
    assert "UNet rows: unet 4, unet_shallow 4" in capsys.readouterr().out  # full at steps 0 and 3, CFG


@pytest.mark.parametrize("args, code, needle", [
    (["--guidance-interval", "5:1"], 1, "low < high"),
    (["--guidance-interval=-1:3"], 1, "low must be >= 0"),
    (["--guidance-interval", "0.3"], 2, "LOW:HIGH"),
    (["--scheduler", "ddim"], 2, "invalid choice: 'ddim'"),
    (["--deep-cache-interval", "0"], 1, "deep_cache_interval must be in [1, 1000]"),
    (["--deep-cache-interval", "2.5"], 2, "invalid int value"),
])
def test_generate_sampler_argument_errors(onnx_fp32, ref, tmp_path, capsys, args, code, needle):
    argv = ["generate", "--onnx", str(onnx_fp32), "--image", str(ref), "--prompt", "x", "--out",
            str(tmp_path / "o.png"), "--steps", "2", "--height", "64", "--width", "64", "--no-progress", *args]
    if code == 2:  # argparse refuses the text itself
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        rc = exit_info.value.code
    else:
        rc = main(argv)
    assert rc == code and needle in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
