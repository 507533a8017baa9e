"""Bounded work per image (issue 23, defects 1 and 5): long thin images, deep greyscale, any mode.

Bounds asserted: a 1,000,000 x 1 or 3,000,000 x 1 PNG crops in under 200 MB of RSS growth and 10 s
(before: MemoryError, a 500); an 8000 x 8000 16-bit PNG in under 600 MB and 20 s (before: 1.6 GB);
under hypothesis, every decoded image (up to 1:10^6, 2 MP) in under 150 MB of peak RSS growth and 5 s,
its crop byte-identical to torchvision's where torchvision can resize it, and the region path
byte-identical to Pillow's full resize wherever both run.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from toolkit.core.preprocess import (
    _RESAMPLING,
    FULL_RESIZE_BUDGET,
    PreprocessSpec,
    any_size_array,
    center_crop,
    crop_array,
    full_resize_cost,
    open_image,
    region_resize_crop,
    resized_size,
    to_rgb,
)
from toolkit.errors import RtkError

pytestmark = pytest.mark.serving

MB = 1 << 20
CHILD = r"""
import json, resource, sys, time
from toolkit.errors import RtkError
from toolkit.core.preprocess import PreprocessSpec, any_size_array, crop_array
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    fn = any_size_array if sys.argv[2] == "any-size" else crop_array
    out = fn(data, PreprocessSpec())
    result = {"shape": list(out.shape), "values": sorted(set(out.reshape(-1, out.shape[-1])[:, 0].tolist()))[:5]}
except RtkError as exc:
    result = {"error": str(exc)}
result["seconds"] = time.perf_counter() - start
result["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(result))
"""


def run_child(path: Path, what: str = "crop") -> dict:
    """Decode `path` in a fresh process: its RSS growth (ru_maxrss, which sees Pillow's allocations) and time."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), what], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("width", [1_000_000, 3_000_000])
def test_long_thin_png_crops_in_bounded_memory_and_time(tmp_path, width):
    path = tmp_path / "thin.png"
    Image.new("RGB", (width, 1), (10, 200, 30)).save(path, optimize=True)
    assert path.stat().st_size < 20_000  # the attack: a few KB that once resized to 256 x 256,000,000
    got = run_child(path)
    assert got["shape"] == [224, 224, 3] and got["values"] == [10]  # the crop of a flat colour is that colour
    assert got["growth_mb"] < 200 and got["seconds"] < 10, got


def test_long_thin_png_is_refused_for_the_any_size_model(tmp_path):
    path = tmp_path / "thin.png"
    Image.new("RGB", (1_000_000, 1)).save(path, optimize=True)
    got = run_child(path, "any-size")
    assert "too large on its long side" in got["error"] and "\n" not in got["error"]
    assert got["growth_mb"] < 200 and got["seconds"] < 10, got
    ok = any_size_array(Image.new("RGB", (640, 480)), PreprocessSpec())
    assert ok.shape == (480, 640, 3)


def test_sixteen_bit_8k_png_converts_in_bounded_memory(tmp_path):
    path = tmp_path / "grey16.png"
    Image.new("I;16", (8000, 8000), 40000).save(path)
    assert path.stat().st_size < 200_000
    got = run_child(path)
    assert got["shape"] == [224, 224, 3] and got["values"] == [156]  # round(40000 / 257)
    assert got["growth_mb"] < 600 and got["seconds"] < 20, got  # before: 1.6 GB through float64


def test_deep_greyscale_keeps_its_levels_in_integer_arithmetic():
    x = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(x)))[..., 1], np.rint(x / 257.0).astype(np.uint8))
    big = np.array([[-2**31, -129, 128, 129, 385, 2**31 - 1]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(big, "I")))[0, :, 0].tolist() == [0, 0, 0, 1, 1, 255]
    small = np.array([[-5, 0, 7, 255]], dtype=np.int32)  # 'I' holding 8-bit values is not divided
    assert np.asarray(to_rgb(Image.fromarray(small, "I")))[0, :, 0].tolist() == [0, 0, 7, 255]
    f = np.array([[np.nan, -3.0, 2.5, 3.5, 254.6, 1e9]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(f, "F")))[0, :, 0].tolist() == [0, 0, 2, 4, 255, 255]


def test_banded_conversion_gives_the_whole_image_result(monkeypatch):
    from toolkit.core import preprocess

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (37, 11, 4), dtype=np.uint8), "RGBA"),
              Image.fromarray(rng.integers(0, 65536, (37, 11), dtype=np.uint16)),
              Image.fromarray(rng.integers(0, 256, (37, 11), dtype=np.uint8)).convert("P")]
    images[2].info["transparency"] = 3
    whole = [np.asarray(preprocess.to_rgb(img)) for img in images]
    monkeypatch.setattr(preprocess, "BAND_PIXELS", 30)  # bands of 2 rows
    assert all(np.array_equal(np.asarray(preprocess.to_rgb(img)), ref) for img, ref in zip(images, whole))


def test_nearest_is_refused_above_the_budget_not_built():
    with pytest.raises(RtkError, match="too elongated for nearest"):
        crop_array(Image.new("RGB", (1_000_000, 1)), PreprocessSpec(interpolation="nearest"))


# ---------------------------------------------------------------- hypothesis: random modes, sizes, aspect ratios

MODES = ["L", "RGB", "RGBA", "P", "PT", "I;16", "I", "F", "LA", "CMYK", "1"]
PEAK_MB, SECONDS, MAX_DECODED = 150, 5.0, 2_000_000


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> int:
    """Reset this process's peak RSS (Linux clear_refs 5) and return the RSS now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS per image")
    return _status("VmRSS")


def _make(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 1 << 16, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 100_000, (h, w), dtype=np.int32), "I")
    if mode == "F":
        return Image.fromarray((rng.standard_normal((h, w)) * 200).astype(np.float32), "F")
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "PT":
        img = rgba.convert("RGB").convert("P")
        img.info["transparency"] = 0
        return img
    return rgba if mode == "RGBA" else rgba.convert(mode)


def _encoded(img: Image.Image) -> bytes | Image.Image:
    """The image as a file (PNG where PNG holds the mode, else TIFF), or the image itself."""
    buf = io.BytesIO()
    try:
        img.save(buf, format="PNG" if img.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16") else "TIFF")
    except (OSError, ValueError, KeyError):
        return img
    return buf.getvalue()


@st.composite
def shapes(draw):
    short = draw(st.integers(1, 48))
    aspect = math.exp(draw(st.floats(0, math.log(1e6))))
    long = max(short, min(int(short * aspect), MAX_DECODED // short))
    w, h = (long, short) if draw(st.booleans()) else (short, long)
    crop = draw(st.integers(1, 48))
    spec = PreprocessSpec(crop + draw(st.integers(0, 24)), crop,
                          interpolation=draw(st.sampled_from(["bilinear", "bicubic", "lanczos"])))
    return w, h, spec


def _torchvision(img_rgb: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    from torchvision import transforms as T

    mode = T.InterpolationMode(spec.interpolation)
    return np.asarray(T.Compose([T.Resize(spec.resize_size, interpolation=mode), T.CenterCrop(spec.crop_size)])(img_rgb))


@pytest.mark.torch_stack
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes(), mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_any_image_decodes_in_bounded_work_and_matches_torchvision(shape, mode, seed):
    w, h, spec = shape
    source = _encoded(_make(mode, w, h, seed))
    rss = _reset_peak()
    start = time.perf_counter()
    crop = crop_array(source, spec)
    seconds = time.perf_counter() - start
    growth = _status("VmHWM") - rss
    assert crop.shape == (spec.crop_size, spec.crop_size, 3) and crop.dtype == np.uint8
    assert growth < PEAK_MB * MB and seconds < SECONDS, (w, h, mode, growth / MB, seconds)
    rgb = open_image(source)
    if full_resize_cost(rgb.size, resized_size(rgb.size, spec.resize_size)) <= FULL_RESIZE_BUDGET:  # torchvision can
        assert np.array_equal(crop, _torchvision(rgb, spec)), (w, h, mode, spec)


@settings(max_examples=60, deadline=None)
@given(short=st.integers(1, 40), aspect=st.floats(1, 400), tall=st.booleans(), seed=st.integers(0, 2**16),
       crop=st.integers(1, 40), extra=st.integers(0, 30), interpolation=st.sampled_from(["bilinear", "bicubic", "lanczos"]))
def test_region_path_is_byte_identical_to_the_full_resize(short, aspect, tall, seed, crop, extra, interpolation):
    """Where both run, resampling only the crop's source region gives Pillow's full resize, cropped."""
    long = max(short, int(short * aspect))
    w, h = (short, long) if tall else (long, short)
    spec = PreprocessSpec(crop + extra, crop, interpolation=interpolation)
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    new_size = resized_size(img.size, spec.resize_size)
    try:
        ours = region_resize_crop(img, new_size, spec)
    except RtkError as exc:  # the measured band where Pillow's pass order varies: refused, never guessed
        assert "too large to resize exactly" in str(exc) and tall and h < 3 * w
        return
    full = np.asarray(center_crop(img.resize(new_size, _RESAMPLING[interpolation]), crop))
    assert np.array_equal(ours, full), (w, h, spec)
