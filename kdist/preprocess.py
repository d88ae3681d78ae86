"""Image files -> model input, defined once for predict, export checks and serve.

The same steps that made DermaMNIST from HAM10000: centre square crop, bilinear resize to the
training size, RGB uint8. Normalisation lives inside the model (`DermClassifier`), so the model
input is float RGB in [0, 1], NCHW.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from . import KdistError

MAX_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert what can be converted (grayscale, palette, RGBA, CMYK, 16-bit) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() or 1.0
        scale = 255.0 / (65535.0 if image.mode.startswith("I;16") or high > 255 else max(high, 1.0))
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)  # transparent areas become white, not black
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise KdistError(f"{name}: cannot convert image mode {image.mode} to RGB ({exc})") from None
    return image


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def source_channels(data: bytes, name: str = "image") -> int:
    """1 for a grayscale image file, 3 for colour (read from the header; decode_image names a broken file)."""
    try:
        return 1 if Image.open(io.BytesIO(data)).mode in GRAYSCALE_MODES else 3
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        decode_image(data, name)  # raises the one-line error naming what is wrong
        raise


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Bytes -> RGB PIL image, or KdistError naming what is wrong."""
    if not data:
        raise KdistError(f"{name}: empty file; pass a JPEG or PNG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise KdistError(
                    f"{name}: {image.width}x{image.height} pixels is over the {MAX_PIXELS:,} limit (possible "
                    "decompression bomb)"
                )
            image.load()
    except KdistError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise KdistError(f"{name}: image is too large (possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise KdistError(f"{name}: not an image file PIL can read; pass a JPEG or PNG") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise KdistError(f"{name}: broken or truncated image ({exc})") from None
    if image.width < 1 or image.height < 1:
        raise KdistError(f"{name}: image has no pixels")
    return _to_rgb(image, name)


def to_model_array(image: Image.Image, size: int) -> np.ndarray:
    """Centre square crop, bilinear resize to size x size: uint8 (size, size, 3)."""
    if image.size == (size, size):  # what crop and resize would give, without their cost (every MedMNIST shard sample)
        return np.asarray(image, dtype=np.uint8)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KdistError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise KdistError(f"{path}: is a folder") from None
    except OSError as exc:
        raise KdistError(f"{path}: cannot read ({exc.strerror})") from None
    return to_model_array(decode_image(data, str(path)), size)


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays -> uint8 NCHW tensor (the dataset's in-memory format)."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, and image files (by suffix) inside folders, recursively, sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files
