import io

import numpy as np
import pytest
from PIL import Image

from toolkit.core.preprocess import (
    PreprocessSpec,
    center_crop,
    crop_array,
    open_image,
    resize_shorter,
    to_rgb,
)
from toolkit.errors import RtkError
from toolkit.evaluation.verify import torchvision_crop


@pytest.mark.parametrize("spec", [PreprocessSpec(256, 224), PreprocessSpec(232, 224), PreprocessSpec(40, 32),
                                  PreprocessSpec(256, 224, interpolation="bicubic")])
def test_runtime_crop_is_byte_identical_to_torchvision_on_real_jpegs(photos, spec):
    for path in photos:
        ours = crop_array(path, spec)
        theirs = torchvision_crop(path, spec)
        assert ours.shape == (spec.crop_size, spec.crop_size, 3) and ours.dtype == np.uint8
        assert np.array_equal(ours, theirs), path


def test_byte_identical_on_portrait_png(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tall.png"
    Image.fromarray(rng.integers(0, 256, (301, 123, 3), dtype=np.uint8)).save(path)
    spec = PreprocessSpec(64, 56)
    assert np.array_equal(crop_array(path, spec), torchvision_crop(path, spec))


def test_resize_shorter_side_and_center_crop_geometry():
    img = Image.new("RGB", (640, 427))
    resized = resize_shorter(img, 256)
    assert resized.size == (383, 256)  # int(256 * 640 / 427) = 383, as torchvision truncates
    assert center_crop(resized, 224).size == (224, 224)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new("RGB", (8, 6), (200, 100, 50)).convert(mode) if mode != "I;16" else Image.new("I;16", (8, 6), 40000)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    img = Image.new("I;16", (2, 2), 65535)
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I;16", (2, 2), 32896)).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    decoded = open_image(buf.getvalue())
    assert decoded.size == (20, 40)
    assert np.asarray(decoded)[5, 10].mean() > 200  # the white half is now on top


def test_pixel_limit_guards_against_decompression_bombs():
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    with pytest.raises(RtkError, match="above the limit"):
        open_image(buf.getvalue(), max_pixels=5000)


def test_undecodable_bytes_name_the_problem():
    with pytest.raises(RtkError, match="cannot decode"):
        open_image(b"not an image")


def test_spec_validation():
    with pytest.raises(RtkError, match="resize-size"):
        PreprocessSpec(resize_size=20, crop_size=32)
    with pytest.raises(RtkError, match="interpolation"):
        PreprocessSpec(interpolation="cubic-ish")
    spec = PreprocessSpec(40, 32)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("size,mode", [((900, 23), "RGB"), ((17, 700), "RGB"), ((301, 123), "I;16"), ((64, 48), "LA")])
def test_byte_identical_on_elongated_and_deep_pngs(tmp_path, size, mode):
    rng = np.random.default_rng(1)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "x.png"
    img.save(path)
    for spec in (PreprocessSpec(40, 32), PreprocessSpec(24, 20, interpolation="bicubic")):
        assert np.array_equal(crop_array(path, spec), torchvision_crop(path, spec)), (size, mode, spec)


def test_resize_shorter_refuses_to_build_an_unbounded_image():
    with pytest.raises(RtkError, match="needs more than"):
        resize_shorter(Image.new("RGB", (1_000_000, 1)), 256)


def test_the_graph_normalisation_is_torchvisions():
    """The exported graph's first step (uint8 NHWC -> normalised NCHW float, folded into one multiply-add) against
    torchvision's ToDtype(scale=True) + Normalize on the same crops, for the default and a custom mean/std."""
    import torch
    from torchvision.transforms import v2 as T

    from toolkit.export.graph import Preprocess

    crops = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    crops[0, 0, 0] = (0, 128, 255)
    for spec in (PreprocessSpec(36, 32), PreprocessSpec(36, 32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))):
        got = Preprocess(spec)(torch.from_numpy(crops))
        want = T.Normalize(spec.mean, spec.std)(T.ToDtype(torch.float32, scale=True)(torch.from_numpy(crops).permute(0, 3, 1, 2)))
        assert got.shape == (2, 3, 5, 4) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_pillows_pass_order_for_region_resizes():
    """Which pass Pillow takes first (it shows in the bytes): horizontal for wide images and for a width that does
    not shrink, vertical for tall images shrunk at least 3:1 in aspect; the band in between is refused."""
    from toolkit.core.preprocess import _vertical_first

    assert _vertical_first((400, 100), (144, 36)) is False  # wide
    assert _vertical_first((400, 400), (36, 36)) is False  # square: horizontal first, like a wide image
    assert _vertical_first((100, 400), (100, 400)) is False  # tall, but the width does not shrink
    assert _vertical_first((100, 400), (36, 144)) is True
    assert _vertical_first((100, 300), (36, 108)) is True  # exactly 3:1
    for size in ((100, 299), (100, 150)):
        with pytest.raises(RtkError, match=f"image {size[0]}x{size[1]} is too large to resize exactly"):
            _vertical_first(size, (36, 36 * size[1] // size[0]))


def test_region_resizes_refuse_what_they_cannot_compute():
    from toolkit.core.preprocess import region_resize_crop, resized_size

    with pytest.raises(RtkError, match=r"zero-sized side \(0x5\)"):
        resized_size((0, 5), 36)
    with pytest.raises(RtkError, match="region resize takes RGB images, not L"):
        region_resize_crop(Image.new("L", (400, 100)), (144, 36), PreprocessSpec(36, 32))
