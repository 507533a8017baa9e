"""The preprocessing spec and image decoding, with no torch import.

`toolkit.runtime` (the torch-free production runtime) and the training/verify stages share this
decoding, so a service feeds a model exactly the uint8 crop the model was checked on. Resize and
center crop follow torchvision's rules for PIL images (`transforms.Resize(int)` then
`transforms.CenterCrop`), which a test checks byte for byte against torchvision.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from toolkit.errors import RtkError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Decompression-bomb guard: 8K x 8K. PIL's own limit only warns below 2x its value.
DEFAULT_MAX_PIXELS = 64_000_000

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded RGB image becomes model input: shorter side to `resize_size`, center crop
    `crop_size`, then (inside the exported graph) x/255, minus mean, over std, NHWC -> NCHW."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    layout: str = "NHWC"
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.crop_size < 1 or self.resize_size < 1:
            raise RtkError(f"image sizes must be positive (resize {self.resize_size}, crop {self.crop_size})")
        if self.resize_size < self.crop_size:
            raise RtkError(f"--resize-size ({self.resize_size}) must be at least the crop size ({self.crop_size})")
        if self.interpolation not in _RESAMPLING:
            raise RtkError(f"unknown interpolation {self.interpolation!r}; choose from {sorted(_RESAMPLING)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise RtkError("mean and std need three values each, std positive")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. Transparent pixels are composited on white (a service gets the image
    a person sees); 16/32-bit greyscale is scaled to 8 bits rather than clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a path, bytes, PIL image or HWC array to an RGB PIL image, EXIF orientation applied."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise RtkError(f"arrays must be uint8 HWC RGB (or HW / HWC with 1 or 4 channels), got {source.dtype} {source.shape}")
        arr = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    if isinstance(source, Image.Image):
        img = source
    else:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source)
        try:
            img = Image.open(fp)
        except Exception as exc:  # PIL raises several types for a bad file
            raise RtkError(f"cannot decode image {_name(source)}: {exc}") from None
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise RtkError(f"image {_name(source)} has {img.width}x{img.height} pixels, above the limit of {max_pixels}")
    try:
        img = ImageOps.exif_transpose(img)
        img.load()
        return to_rgb(img)
    except RtkError:
        raise
    except Exception as exc:
        raise RtkError(f"cannot decode image {_name(source)}: {exc}") from None


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """torchvision's `Resize(size)` for PIL: shorter side to `size`, longer side truncated."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), _RESAMPLING[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop(size)` for an image at least `size` on each side."""
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def crop_array(source: ImageSource, spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode, resize and center-crop one image: uint8 array [S, S, 3], ready for the model."""
    img = open_image(source, max_pixels)
    img = center_crop(resize_shorter(img, spec.resize_size, spec.interpolation), spec.crop_size)
    return np.asarray(img, dtype=np.uint8)


def list_images(path: str | os.PathLike) -> list[Path]:
    """Image files in a folder (recursively, sorted), or the file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RtkError(f"no such file or folder: {path}")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"
