"""runtime/postprocess.py against diffusers' VaeImageProcessor.postprocess; finite checks; PNG metadata."""

import numpy as np
import pytest

from kolors_trt.runtime.postprocess import (
    NonFiniteError,
    check_finite,
    read_png_parameters,
    save_png,
    to_pil,
    to_uint8,
)


def test_uint8_equals_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 24, 40)) * 0.8).astype(np.float32)
    # exact ties after scaling: (v/2 + 0.5) * 255 = k + 0.5 exercises round half to even
    x[0, 0, 0, :8] = (np.arange(8, dtype=np.float32) + np.float32(0.5)) / np.float32(255) * 2 - 1
    x[0, 0, 1, :4] = [-5, 5, -1, 1]
    want = np.stack([np.asarray(im) for im in VaeImageProcessor().postprocess(torch.from_numpy(x), output_type="pil")])
    got = to_uint8(x)
    np.testing.assert_array_equal(got, want)
    assert [im.size for im in to_pil(got)] == [(40, 24)] * 2


def test_to_uint8_shape_error():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        to_uint8(np.zeros((1, 4, 8, 8), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_stage(bad):
    a = np.zeros((1, 4), np.float32)
    check_finite("unet", "noise_pred", a)
    a[0, 2] = bad
    with pytest.raises(NonFiniteError, match="unet.*noise_pred.*1 NaN/Inf"):
        check_finite("unet", "noise_pred", a)


def test_png_metadata(tmp_path):
    img = to_pil(np.zeros((1, 8, 8, 3), np.uint8))[0]
    params = {"prompt": "一只猫", "seed": 3, "guidance_scale": 5.0, "negative_prompt": None}
    path = save_png(img, tmp_path / "sub" / "a.png", params)
    got = read_png_parameters(path)
    assert got == {"prompt": "一只猫", "seed": 3, "guidance_scale": 5.0, "negative_prompt": None}
