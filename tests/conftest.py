"""Shared fixtures: a tiny real ImageFolder, a resnet18 trained on it for one epoch, and its bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from toolkit.cli import main

CLASSES = ("circle", "square", "stripes")


def draw(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A noisy picture of one of three easy classes (so one epoch already learns something)."""
    base = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-3, 3, 2)
    if kind == "circle":
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size / 3) ** 2
        base[mask] = (220, 60, 60)
    elif kind == "square":
        mask = (abs(yy - c[0]) < size / 4) & (abs(xx - c[1]) < size / 4)
        base[mask] = (60, 220, 60)
    else:
        base[(xx // 4) % 2 == 0] = (60, 60, 220)
    return Image.fromarray(base)


def make_imagefolder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(kind, rng).save(folder / f"{kind}_{i:02d}.png")
    return root


def rtk(*args: str, **kwargs) -> Result:
    """Run the CLI in-process, the way a user would call it."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def error_line(result: Result) -> str:
    """The single error line of a failed command."""
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("data"), {"train": 16, "val": 6})


TRAIN_ARGS = ("--arch", "resnet18", "--weights", "none", "--image-size", "32", "--resize-size", "36", "--epochs", "1",
              "--batch-size", "16", "--no-hflip", "--workers", "0", "--quiet", "--precision", "fp32")


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = rtk("train", tiny_data, "--output", out, *TRAIN_ARGS)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", out, "--precision", "fp32", "--precision", "fp16",
                 "--precision", "int8", "--calibration-data", tiny_data / "train", "--calibration-size", "24",
                 "--no-verify")
    assert result.exit_code == 0, result.output
    return out


def copy_bundle(src: Path, dst: Path, files: tuple[str, ...] = ("model.onnx",)) -> Path:
    """A copy of a bundle holding only `files` (model files are large: copy what a test needs)."""
    dst.mkdir(parents=True)
    for name in ("labels.txt", "selftest.npz", *files):
        shutil.copy(src / name, dst / name)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k in files}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def reseal(bundle: Path, name: str) -> None:
    """Record a changed file's sha256 and size in the manifest: an export that was already wrong when
    written, which only the parity check itself can catch."""
    from toolkit.core.fileio import sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name].update(sha256=sha256_file(bundle / name), bytes=(bundle / name).stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


# rtk optimize at its quickest: what the tests check is which candidates pass, not their timings
QUICK = {"warmup": 0, "iterations": 2, "min_seconds": 0.0, "calibration_size": 12}


def _broken_but_fast(src, dst):
    """A model whose head is zeroed: every image gets the same class. It must never be recommended."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if len(init.dims) == 2:  # the fc weight
            init.CopyFrom(numpy_helper.from_array(np.zeros(tuple(init.dims), np.float32), init.name))
    onnx.save(model, str(dst))


@pytest.fixture(scope="session")
def optimized(tiny_bundle, tiny_data, tmp_path_factory):
    """`rtk optimize` on a copy of the tiny bundle (shared: test_optimize and the real Triton read it)."""
    from toolkit.evaluation.optimize import OptimizeConfig, optimize_bundle
    from toolkit.export.quantize import QuantRecipe

    bundle = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("opt") / "b", files=("model.onnx", "model.fp16.onnx", "model.int8.onnx"))
    _broken_but_fast(bundle / "model.onnx", bundle / "model.fp16.onnx")
    reseal(bundle, "model.fp16.onnx")
    config = OptimizeConfig(calibration_data=str(tiny_data), batch_sizes=(1, 2), threads=1, **QUICK,
                            recipes=(QuantRecipe(), QuantRecipe(reduce_range=True), QuantRecipe(activations="s8"), QuantRecipe(weights="u8"),
                                     QuantRecipe(format="qoperator", weights="u8", per_channel=False)))
    report = optimize_bundle(bundle, config, echo=lambda s: None)
    return bundle, report


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The two JPEG photos scikit-learn ships: real camera JPEGs, 640x427."""
    sklearn = pytest.importorskip("sklearn.datasets")
    return [Path(p) for p in sklearn.load_sample_images().filenames]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def needs_cuda(test):
    """Mark a test `cuda` (`pytest -m cuda` selects them) and skip it, with the reason, without a GPU."""
    skip = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    return pytest.mark.cuda(skip(test))
