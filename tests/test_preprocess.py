"""Image files for predict/serve: every mode that can be converted is, everything else is a named error."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kdist import KdistError
from kdist.preprocess import MAX_PIXELS, decode_image, load_image, to_model_array


def encode(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "image, fmt",
    [
        (Image.new("L", (40, 30), 128), "PNG"),  # grayscale
        (Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"),  # transparent -> white
        (Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"),
        (Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG"),  # 16-bit
        (Image.new("P", (40, 30)), "PNG"),
        (Image.new("1", (40, 30), 1), "PNG"),
    ],
    ids=["grayscale", "rgba", "cmyk", "16-bit", "palette", "bilevel"],
)
def test_convertible_modes_become_rgb(image, fmt):
    rgb = decode_image(encode(image, fmt))
    assert rgb.mode == "RGB"
    assert to_model_array(rgb, 28).shape == (28, 28, 3)


def test_transparent_pixels_become_white():
    rgb = decode_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    rgb = decode_image(encode(Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))))
    assert 120 <= rgb.getpixel((0, 0))[0] <= 135


def test_centre_square_crop_then_resize():
    array = np.zeros((450, 600, 3), dtype=np.uint8)
    array[:, :75] = 255  # a white band only in the part the centre crop removes
    out = to_model_array(Image.fromarray(array), 28)
    assert out.shape == (28, 28, 3) and out.max() == 0


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image file"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "broken or truncated"),
        (encode(Image.new("RGB", (64, 64)), "PNG")[:-30], "broken or truncated"),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png"],
)
def test_unreadable_images_are_named(data, message):
    with pytest.raises(KdistError, match=message):
        decode_image(data, "x.jpg")


def test_decompression_bomb_is_refused():
    side = int(MAX_PIXELS**0.5) + 100
    bomb = encode(Image.new("1", (side, side)), "PNG")  # tiny file, huge image
    assert len(bomb) < 2_000_000
    with pytest.raises(KdistError, match="decompression bomb"):
        decode_image(bomb, "bomb.png")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(KdistError, match="file not found"):
        load_image(tmp_path / "nope.png", 28)
    with pytest.raises(KdistError, match="is a folder"):
        load_image(tmp_path, 28)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_load_or_raise_kdist_error(data):
    try:
        image = decode_image(data)
    except KdistError:
        return
    assert image.mode == "RGB"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF"]), st.integers(1, 400))
def test_fuzz_corrupted_real_images(seed, fmt, cut):
    rng = np.random.default_rng(seed)
    data = bytearray(encode(Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)), fmt))
    for position in rng.integers(0, len(data), size=3):
        data[position] = int(rng.integers(0, 256))
    try:
        image = decode_image(bytes(data[: max(1, len(data) - cut)]))
    except KdistError:
        return
    assert to_model_array(image, 28).shape == (28, 28, 3)
