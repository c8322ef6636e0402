"""CLIP preprocessing against transformers' CLIPImageProcessor on its PIL backend (bit-exact)."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from kolors_trt.runtime.preprocess import (
    ClipPreprocess,
    ImageInputError,
    PreprocessConfigError,
    load_image,
    preprocess,
    resize_size,
)

pil_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")

SIZES = [(1, 1), (2, 3), (336, 336), (500, 333), (333, 500), (337, 335), (20, 300), (600, 40), (641, 480)]
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1", "YCbCr", "PA", "RGBa"]


@pytest.fixture(scope="module")
def reference():
    # transformers 5 defaults CLIPImageProcessor to torchvision; the reference behaviour is the PIL one
    return pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_convert_rgb=True
    )


def make(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    return rgba if mode == "RGBA" else rgba.convert(mode)


def ref_pixels(reference, images):
    return reference(images, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("mode", MODES)
def test_modes_and_sizes_match_transformers(reference, mode):
    for i, (w, h) in enumerate(SIZES):
        image = make(mode, w, h, seed=i)
        ours = preprocess([image])
        assert ours.dtype == np.float32 and ours.shape == (1, 3, 336, 336)
        if mode in ("I;16", "I") and image.getextrema()[1] > 255:
            # 16-bit: transformers (PIL's convert) clips above 255 to white; ours scales to 8 bits first
            eight = Image.fromarray(np.round(np.asarray(image, np.float64) * 255 / 65535).astype(np.uint8), "L")
            np.testing.assert_array_equal(ours, ref_pixels(reference, eight), err_msg=f"{mode} {w}x{h}")
            continue
        np.testing.assert_array_equal(ours, ref_pixels(reference, image), err_msg=f"{mode} {w}x{h}")


def test_sixteen_bit_grayscale_png_is_not_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))  # dark to bright
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as im:
        assert im.mode.startswith("I")
    row = preprocess([tmp_path / "ramp16.png"])[0, 0, 100]  # normalised red channel, one row
    assert np.all(np.diff(row) >= 0) and row[-1] - row[0] > 2.5  # a ramp, not a white square (constant 1.93)


def test_batch_and_palette_transparency(reference, tmp_path):
    palette = make("P", 120, 90)
    palette.save(tmp_path / "t.png", transparency=3)
    with_alpha = Image.open(tmp_path / "t.png")
    assert with_alpha.info.get("transparency") is not None
    images = [make("RGB", 400, 300), with_alpha, make("LA", 50, 80)]
    np.testing.assert_array_equal(preprocess(images), ref_pixels(reference, images))


def test_alpha_is_composited_on_white():
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    white = Image.new("RGB", (10, 10), (255, 255, 255))
    np.testing.assert_array_equal(preprocess([clear]), preprocess([white]))


def test_other_settings_match_transformers():
    config = {"size": {"shortest_edge": 224}, "crop_size": {"height": 200, "width": 224},
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.25, 0.5], "resample": 2}
    reference = pil_clip.CLIPImageProcessorPil(**config, do_convert_rgb=True)
    ours = ClipPreprocess.from_dict(config)
    for w, h in [(300, 200), (199, 401), (224, 224)]:
        image = make("RGB", w, h)
        got = ours([image])
        assert got.shape == (1, 3, 200, 224)
        np.testing.assert_array_equal(got, ref_pixels(reference, image))


@pytest.mark.parametrize("height, width", [(1, 1), (7, 1000), (500, 333), (333, 500), (336, 337), (1000, 3)])
def test_resize_size_is_transformers(height, width):
    image = np.zeros((3, height, width), np.uint8)
    from transformers.image_transforms import get_resize_output_image_size

    assert resize_size(height, width, 336) == get_resize_output_image_size(
        image, 336, default_to_square=False, input_data_format="channels_first"
    )


def test_files_bytes_and_exif(reference, tmp_path):
    image = make("RGB", 120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    expected = ref_pixels(reference, ImageOps.exif_transpose(Image.open(path)))
    np.testing.assert_array_equal(preprocess([path]), expected)
    np.testing.assert_array_equal(preprocess([str(path)]), expected)
    np.testing.assert_array_equal(preprocess([path.read_bytes()]), expected)
    assert load_image(path).size == (80, 120)
    assert preprocess(path).shape == (1, 3, 336, 336)


def test_bad_inputs_raise_typed_errors(tmp_path):
    png = io.BytesIO()
    make("RGB", 64, 64).save(png, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        (truncated, "truncated.png"),
        (text, "notes.txt: not an image"),
        (tmp_path / "missing.png", "missing.png: file not found"),
        (b"\x89PNG garbage", "bytes"),
        (Image.new("RGB", (0, 5)), "0x5"),
        (42, "found int"),
        (make("RGB", 5, 5).convert("La"), "mode La"),
    ]
    for source, needle in cases:
        with pytest.raises(ImageInputError, match=needle):
            preprocess([source])
    with pytest.raises(ImageInputError, match="at least one"):
        preprocess([])
    assert issubclass(ImageInputError, ValueError)


def test_oversized_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 8000)).save(path)  # 96 MP, a few kB on disk
    with pytest.raises(ImageInputError, match="bomb.png: 12000x8000 is 96.0 megapixels"):
        load_image(path)
    small = tmp_path / "small.png"
    make("RGB", 40, 40).save(small)
    with pytest.raises(ImageInputError, match="megapixels"):
        load_image(small, max_pixels=1000)


def test_config_errors(tmp_path):
    with pytest.raises(PreprocessConfigError, match="do_center_crop"):
        ClipPreprocess.from_dict({"do_center_crop": False})
    with pytest.raises(PreprocessConfigError, match="shortest_edge"):
        ClipPreprocess.from_dict({"size": {"height": 336, "width": 336}})
    with pytest.raises(PreprocessConfigError, match="crop_size"):
        ClipPreprocess.from_dict({"size": 224, "crop_size": 336})
    (tmp_path / "preprocessor_config.json").write_text('{"crop_size": 336, "size": {"shortest_edge": 336}}')
    assert ClipPreprocess.from_file(tmp_path) == ClipPreprocess()
