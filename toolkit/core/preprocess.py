"""The preprocessing spec and image decoding, with no torch import.

`toolkit.serving.classifier` (the torch-free production runtime) and the training/verify stages share this
decoding, so a service feeds a model exactly the uint8 crop the model was checked on. Resize and
center crop follow torchvision's rules for PIL images (`transforms.Resize(int)` then
`transforms.CenterCrop`), which a test checks byte for byte against torchvision.

Work per image is bounded, whatever its shape (an image is hostile input):
- decoding: at most `max_pixels` (default 64 MP) decoded pixels; greyscale of 16/32 bits and images
  with alpha are converted to RGB in bands of `BAND_PIXELS`, in integer arithmetic for 16/32-bit
  integers, so converting costs the decoded image plus its RGB copy and a band, nothing more.
- resize + crop (`resize_crop`): Pillow's full resize is used while what it allocates (its output
  plus its horizontal pass, in pixels) stays within `FULL_RESIZE_BUDGET`; above that (long thin
  images: a 1,000,000 x 1 PNG would resize to 256,000,000 x 256) only the crop's source region is
  resampled, with Pillow's own coefficients and fixed-point arithmetic recomputed here, so the
  result is the same bytes at any aspect ratio and the work is bounded by the crop's source region,
  not the long side. "nearest" has no such path: above the budget it is refused with an RtkError.
- the any-size model file resizes inside its graph with weights of crop x (width + height) values
  per image; `any_size_array` refuses an image whose weights would exceed `MAX_GRAPH_WEIGHTS`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
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
# Pixels Pillow's full resize may allocate (output + horizontal pass, 4 bytes each: 32 MiB) before
# the crop switches to resampling only the crop's source region.
FULL_RESIZE_BUDGET = 1 << 23
# Weights the any-size graph builds per image (crop x (width + height), float64): 128 MiB each.
MAX_GRAPH_WEIGHTS = 1 << 24
BAND_PIXELS = 1 << 20  # pixels converted at a time by `to_rgb` for modes that need temporaries

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


_GREY_DEEP = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. Transparent pixels are composited on white (a service gets the image
    a person sees); 16/32-bit greyscale is scaled to 8 bits rather than clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in _GREY_DEEP:
        # 'I' holding 8-bit values (as some decoders give) is kept; wider integers are scaled like 16-bit
        scale = img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255)
        return _in_bands(img, lambda band: _grey_to_rgb(band, scale))
    if img.mode == "P" and "transparency" in img.info:
        return _in_bands(img, lambda band: _on_white(band.convert("RGBA")))
    if img.mode in _ALPHA:
        return _in_bands(img, _on_white)
    return img.convert("RGB")


def _in_bands(img: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """`convert` (a per-pixel conversion to RGB) applied band by band: the same pixels, with its
    temporaries the size of a band instead of the image."""
    w, h = img.size
    rows = max(1, BAND_PIXELS // max(w, 1))
    if rows >= h:
        return convert(img)
    out = Image.new("RGB", img.size)
    for top in range(0, h, rows):
        out.paste(convert(img.crop((0, top, w, min(h, top + rows)))), (0, top))
    return out


# round(x / 257) for every 16-bit x, as a lookup table (a gather is 10x faster than dividing)
_SIXTEEN_TO_EIGHT = ((np.arange(1 << 16, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def _grey_to_rgb(band: Image.Image, scale: bool) -> Image.Image:
    """16/32-bit greyscale to RGB: round(x / 257) (65535 -> 255) when `scale` (always for 16-bit), else x,
    clipped to 0..255. Integers stay integers: x = 257q + r rounds up exactly when r >= 129 (257 is odd:
    no ties), which for 16-bit is the lookup table; 'F' is rounded to nearest, NaN to 0."""
    arr = np.asarray(band)
    if band.mode == "F":
        levels = np.clip(np.rint(np.nan_to_num(arr, nan=0.0)), 0, 255)
    elif band.mode.startswith("I;16"):
        levels = _SIXTEEN_TO_EIGHT[arr]
    elif scale:
        q, r = np.divmod(arr.astype(np.int64), 257)
        levels = np.clip(q + (r >= 129), 0, 255)
    else:
        levels = np.clip(arr, 0, 255)
    return Image.fromarray(levels.astype(np.uint8)).convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


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


def resized_size(size: tuple[int, int], resize_size: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(resize_size)`: shorter side to `resize_size`,
    longer side truncated."""
    w, h = size
    if min(w, h) < 1:
        raise RtkError(f"image has a zero-sized side ({w}x{h})")
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize_size * long / short)
    return (resize_size, new_long) if w <= h else (new_long, resize_size)


def full_resize_cost(size: tuple[int, int], new_size: tuple[int, int]) -> int:
    """Pixels Pillow allocates to resize `size` to `new_size`: its output plus its horizontal pass."""
    (w, h), (new_w, new_h) = size, new_size
    return new_w * new_h + (new_w * h if new_w != w else 0)


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """torchvision's `Resize(size)` for PIL: shorter side to `size`, longer side truncated. The
    whole resized image is built, so it is refused above `FULL_RESIZE_BUDGET` (`resize_crop` is not)."""
    new_size = resized_size(img.size, size)
    if full_resize_cost(img.size, new_size) > FULL_RESIZE_BUDGET:
        raise RtkError(f"resizing {img.width}x{img.height} to {new_size[0]}x{new_size[1]} needs more than "
                       f"{FULL_RESIZE_BUDGET} pixels")
    return img.resize(new_size, _RESAMPLING[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop(size)` for an image at least `size` on each side."""
    left, top = _crop_origin(img.size, size)
    return img.crop((left, top, left + size, top + size))


def _crop_origin(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(left, top) of torchvision's center crop (Python's round: ties to even)."""
    return int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """torchvision's `Resize(resize_size)` + `CenterCrop(crop_size)` of an RGB image, as uint8 [S, S, 3],
    never building more than the crop's source region needs (see the module docstring)."""
    new_size = resized_size(img.size, spec.resize_size)
    if full_resize_cost(img.size, new_size) <= FULL_RESIZE_BUDGET:
        return np.asarray(center_crop(resize_shorter(img, spec.resize_size, spec.interpolation), spec.crop_size))
    if spec.interpolation == "nearest":
        raise RtkError(f"image {img.width}x{img.height} is too elongated for nearest interpolation (resized to "
                       f"{new_size[0]}x{new_size[1]}); use bilinear, bicubic or lanczos")
    return region_resize_crop(img, new_size, spec)


def region_resize_crop(img: Image.Image, new_size: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """The center crop of Pillow's resize of `img` to `new_size`, computed from the crop's source region
    only: Pillow's coefficients for the crop's columns and rows (`_axis_taps`), its horizontal pass on
    the rows the vertical pass reads, then the vertical pass, each in its 22-bit fixed point."""
    if img.mode != "RGB":
        raise RtkError(f"region resize takes RGB images, not {img.mode}")
    left, top = _crop_origin(new_size, spec.crop_size)
    support = _SUPPORT[spec.interpolation]
    x0, nx, kx = _axis_taps(img.width, new_size[0], left, spec.crop_size, support, spec.interpolation)
    y0, ny, ky = _axis_taps(img.height, new_size[1], top, spec.crop_size, support, spec.interpolation)
    box = (int(x0.min()), int(y0.min()), int((x0 + nx).max()), int((y0 + ny).max()))
    region = np.asarray(img.crop(box))  # the crop's source region: all either pass reads
    if _vertical_first(img.size, new_size):
        return _apply_taps(_apply_taps(region, y0 - box[1], ky, axis=0), x0 - box[0], kx, axis=1)
    return _apply_taps(_apply_taps(region, x0 - box[0], kx, axis=1), y0 - box[1], ky, axis=0)


def _vertical_first(size: tuple[int, int], new_size: tuple[int, int]) -> bool:
    """The pass order Pillow 13 takes for a shorter-side resize (each pass rounds to uint8, so the order
    shows in the bytes). Measured, as its rule is not documented: horizontal first for wide images and
    for upscaling, vertical first for tall images shrunk at least 3:1 in aspect; in between its choice
    varies, so that band is refused (only reachable above the default pixel limit)."""
    (w, h), (new_w, _) = size, new_size
    if w >= h or new_w >= w:
        return False
    if h >= 3 * w:
        return True
    raise RtkError(f"image {w}x{h} is too large to resize exactly ({FULL_RESIZE_BUDGET} pixels at most for "
                   "tall images under 3:1); lower --max-pixels or the resize size")


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _cubic(x: np.ndarray) -> np.ndarray:  # Pillow's bicubic, a = -0.5, its operations in its order
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos(x: np.ndarray) -> np.ndarray:
    # math.sin is the C library's sin, as Pillow's; numpy's vectorised sin may differ in the last bit
    def sinc(v: float) -> float:
        return 1.0 if v == 0.0 else math.sin(v * math.pi) / (v * math.pi)

    flat = [sinc(v) * sinc(v / 3) if -3.0 <= v < 3.0 else 0.0 for v in x.ravel().tolist()]
    return np.asarray(flat, dtype=np.float64).reshape(x.shape)


_FILTERS = {"bilinear": _triangle, "bicubic": _cubic, "lanczos": _lanczos}
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images (32 - 8 - 2)


def _axis_taps(n_in: int, n_out: int, start: int, count: int, support: float,
               interpolation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for output pixels start..start+count-1
    of a resize from n_in to n_out pixels: first source pixel, tap count and int32 coefficients
    [count, ksize] per output pixel, in the same float64 operations in the same order, so the same bits."""
    if n_out == n_in:  # Pillow skips this pass: identity taps give the same bytes
        return np.arange(start, start + count), np.ones(count, np.int64), np.full((count, 1), 1 << _PRECISION_BITS, np.int32)
    scale = float(np.float32(n_in)) / n_out  # Pillow passes the box as C floats
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    taps = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - first
    offsets = np.arange(ksize)
    live = offsets[None, :] < taps[:, None]
    x = ((first[:, None] + offsets[None, :]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(live, _FILTERS[interpolation](x), 0.0)
    total = np.zeros(count)
    for j in range(ksize):  # summed left to right as Pillow does (numpy's sum is pairwise)
        total += w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, -0.5 + w * float(1 << _PRECISION_BITS), 0.5 + w * float(1 << _PRECISION_BITS))
    return first, taps, np.trunc(fixed).astype(np.int32)


def _apply_taps(src: np.ndarray, first: np.ndarray, coeffs: np.ndarray, axis: int) -> np.ndarray:
    """One Pillow pass along `axis` of uint8 `src`: int32 sums of taps, rounded by the half added up
    front, shifted and clipped to uint8. Taps past an output's count have coefficient 0."""
    last = src.shape[axis] - 1
    shape = [1, 1, 1]
    shape[axis] = len(first)
    acc = np.full(src.shape[:axis] + (len(first),) + src.shape[axis + 1:], 1 << (_PRECISION_BITS - 1), np.int32)
    for j in range(coeffs.shape[1]):
        picked = np.take(src, np.minimum(first + j, last), axis=axis).astype(np.int32)
        acc += picked * coeffs[:, j].reshape(shape)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def crop_array(source: ImageSource, spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode, resize and center-crop one image: uint8 array [S, S, 3], ready for the model."""
    return np.ascontiguousarray(resize_crop(open_image(source, max_pixels), spec), dtype=np.uint8)


def check_graph_resize(size: tuple[int, int], spec: PreprocessSpec) -> None:
    """Refuse an image the any-size graph cannot resize in bounded memory: it builds Pillow's weights
    for the crop's rows and columns over the whole width and height, crop x (width + height) values."""
    w, h = size
    if min(w, h) < 1:
        raise RtkError(f"image has a zero-sized side ({w}x{h})")
    if spec.crop_size * (w + h) > MAX_GRAPH_WEIGHTS:
        raise RtkError(f"image {w}x{h} is too large on its long side for the any-size model "
                       f"(at most {MAX_GRAPH_WEIGHTS // spec.crop_size - min(w, h)} pixels with this short side); "
                       "use the fixed-size model, which takes a crop")


def any_size_array(source: ImageSource, spec: PreprocessSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image for the any-size model file: uint8 [H, W, 3], refused if its in-graph resize
    would not be bounded (`check_graph_resize`)."""
    img = open_image(source, max_pixels)
    check_graph_resize(img.size, spec)
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
