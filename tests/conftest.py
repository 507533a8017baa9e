"""Shared fixtures: a tiny real ImageFolder, a resnet18 trained on it for one epoch, and its bundle.

Where torch is installed the fixtures build the bundle (and `--rtk-write-bundles DIR` keeps a copy); where it
is not (the serving side's venv, `make test-serving`), `tiny_bundle` is read from the folder `RTK_TEST_BUNDLES`
names. This module imports no torch: the serving run imports it too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from toolkit.cli import main

CLASSES = ("circle", "square", "stripes")
HAS_TORCH = importlib.util.find_spec("torch") is not None
BUNDLES_ENV = "RTK_TEST_BUNDLES"
# read once, from where pytest started (a test may change the working directory)
PREBUILT = Path(os.environ[BUNDLES_ENV]).resolve() if os.environ.get(BUNDLES_ENV) else None
TORCH_STACK = ("torch", "torchvision", "onnx")
# prepended to the code of a child process: torch and torchvision cannot be imported in it
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'torchvision'):
                raise ImportError('torch is blocked in this test')
    sys.meta_path.insert(0, _NoTorch())
""")


# torch.compile's caches (Inductor's kernels and FX graphs, Triton's) in one folder for this session: a graph the
# tests compile once is loaded, not compiled again, by every later test and child process; none goes to
# /tmp/torchinductor_$USER or ~/.cache (a TORCHINDUCTOR_CACHE_DIR set by the caller is kept)
SESSION_INDUCTOR_CACHE = (tempfile.mkdtemp(prefix="rtk-test-inductor-")
                          if HAS_TORCH and "TORCHINDUCTOR_CACHE_DIR" not in os.environ else None)
if SESSION_INDUCTOR_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = SESSION_INDUCTOR_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if SESSION_INDUCTOR_CACHE:
        shutil.rmtree(SESSION_INDUCTOR_CACHE, ignore_errors=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--rtk-write-bundles", metavar="DIR", default=None,
                     help=f"also write the test bundles built here into DIR, for a run where torch is not "
                          f"installed ({BUNDLES_ENV}=DIR pytest -m serving)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without torch only the modules holding `serving` tests are collected (the others import torch at
    their top, and `-m serving` would deselect all their tests anyway)."""
    if HAS_TORCH or not (collection_path.name.startswith("test_") and collection_path.suffix == ".py"):
        return None
    return "pytest.mark.serving" not in collection_path.read_text()


# Under pytest-xdist `make test` runs 2 workers with --dist loadfile: a module's tests stay on one worker, so
# its module fixtures are built once. These modules share the expensive session fixture `optimized`, so they are
# one unit of work, and it goes out first: the longest unit last would leave one worker alone with it.
# (A module that uses `optimized` and is not listed still passes: that worker builds the fixture again.)
SHARED_UNITS = {"optimized": ("tests/test_optimize.py", "tests/test_torch_compile.py", "tests/test_triton_server.py")}
FIRST = ("tests/test_demo.py", "tests/test_aoti.py")  # the next longest modules (~70 and ~80 s on one core)


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to under `--dist loadfile`: its module, or the shared unit holding it."""
    module = nodeid.split("::", 1)[0]
    return next((name for name, modules in SHARED_UNITS.items() if module in modules), module)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` with the modules of SHARED_UNITS as one unit (xdist's own scheduler otherwise)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureUnits(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return SharedFixtureUnits(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # units go out in collection order (--no-loadscope-reorder)
        first = (*SHARED_UNITS, *FIRST)
        items.sort(key=lambda item: first.index(u) if (u := unit_of(item.nodeid)) in first else len(first))
    skip_without_torch_stack(items)


def skip_without_torch_stack(items: list[pytest.Item]) -> None:
    """Without the torch stack, a serving module's tests marked `torch_stack` skip, saying why."""
    missing = [m for m in TORCH_STACK if importlib.util.find_spec(m) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs {', '.join(missing)}, which this (serving-side) venv does not have")
    for item in items:
        if item.get_closest_marker("torch_stack"):
            item.add_marker(skip)


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


TINY_DATA = {"train": 16, "val": 6}
TRAIN_ARGS = ("--arch", "resnet18", "--weights", "none", "--image-size", "32", "--resize-size", "36", "--epochs", "1",
              "--batch-size", "16", "--no-hflip", "--workers", "0", "--quiet", "--precision", "fp32")


def build_run(data: Path, out: Path) -> Path:
    """`rtk train` at its smallest: one epoch of resnet18 on `data` (needs torch)."""
    result = rtk("train", data, "--output", out, *TRAIN_ARGS)
    assert result.exit_code == 0, result.output
    return out


def build_bundle(run: Path, data: Path, out: Path) -> Path:
    """`rtk export` of the run's checkpoint in every format and precision, int8 calibrated on `data`."""
    result = rtk("export", run / "checkpoint.pt", "--output", out, "--precision", "fp32", "--precision", "fp16",
                 "--precision", "int8", "--calibration-data", data / "train", "--calibration-size", "24",
                 "--no-verify")
    assert result.exit_code == 0, result.output
    return out


# what a folder of prebuilt bundles holds; READY is written last, so a half-written folder is never read
CACHED_BUNDLE, CACHED_PHOTOS, READY = "tiny_bundle", "photos", "READY"


def write_bundles(root: Path, bundle: Path) -> None:
    """Keep a copy of a freshly built bundle (and the sample photos, where scikit-learn is installed) in
    `root`, for a run without torch."""
    from importlib.metadata import version

    root.mkdir(parents=True, exist_ok=True)
    (root / READY).unlink(missing_ok=True)
    for name in (CACHED_BUNDLE, CACHED_PHOTOS):
        shutil.rmtree(root / name, ignore_errors=True)
    shutil.copytree(bundle, root / CACHED_BUNDLE)
    if importlib.util.find_spec("sklearn") is not None:
        (root / CACHED_PHOTOS).mkdir()
        for photo in sample_photos():
            shutil.copy(photo, root / CACHED_PHOTOS / photo.name)
    (root / READY).write_text(f"built by tests/conftest.py with torch {version('torch')}\n")


def prebuilt(name: str) -> Path:
    """`name` in the folder of prebuilt bundles `RTK_TEST_BUNDLES` names (skips where none is named)."""
    if PREBUILT is None:
        pytest.skip(f"torch is not installed here and {BUNDLES_ENV} names no prebuilt test bundles "
                    f"(make test-serving writes them with the torch venv)")
    if not (PREBUILT / READY).is_file():
        pytest.fail(f"{BUNDLES_ENV}={PREBUILT} holds no complete set of test bundles (no {READY} file): "
                    f"python -m tests.build_bundles {PREBUILT}, with torch installed")
    return PREBUILT / name


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("data"), TINY_DATA)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    if not HAS_TORCH:
        pytest.skip("needs torch to train, which this (serving-side) venv does not have")
    return build_run(tiny_data, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def tiny_bundle(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    """Built here where torch is installed, else a private copy of the prebuilt one (tests may change it)."""
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    if not HAS_TORCH:
        return Path(shutil.copytree(prebuilt(CACHED_BUNDLE), out))
    build_bundle(request.getfixturevalue("tiny_run"), request.getfixturevalue("tiny_data"), out)
    if cache := request.config.getoption("--rtk-write-bundles"):
        root = request.config.invocation_params.dir / cache
        root.parent.mkdir(parents=True, exist_ok=True)  # for the lock file beside `root`
        from filelock import FileLock  # every xdist worker builds its own bundle: one writes at a time

        with FileLock(root.with_name(root.name + ".lock")):
            write_bundles(root, out)  # before any test changes it
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


@pytest.fixture
def no_compile(monkeypatch) -> None:
    """The torch-compile runtimes Skipped ("not compiled in this test"): for tests about something else, whose
    time would be mostly Inductor's compile (tests/test_torch_compile.py and the `optimized` fixture compile)."""
    from toolkit.evaluation.runners import torch_runner

    monkeypatch.setattr(torch_runner, "compile_problem", lambda device: "not compiled in this test")


@pytest.fixture(scope="session")
def optimized(tiny_bundle, tiny_data, tmp_path_factory):
    """`rtk optimize` on a copy of the tiny bundle (shared: test_optimize and the real Triton read it)."""
    from toolkit.evaluation.optimize import OptimizeConfig, optimize_bundle
    from toolkit.export.quantize import QuantRecipe

    bundle = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("opt") / "b", files=("model.onnx", "model.fp16.onnx", "model.int8.onnx"))
    _broken_but_fast(bundle / "model.onnx", bundle / "model.fp16.onnx")
    reseal(bundle, "model.fp16.onnx")
    # 3 interleaved rounds, not 10: the timing of ~30 candidates was half the fixture's time
    config = OptimizeConfig(calibration_data=str(tiny_data), batch_sizes=(1, 2), threads=1, **QUICK, rounds=3,
                            recipes=(QuantRecipe(), QuantRecipe(reduce_range=True), QuantRecipe(activations="s8"), QuantRecipe(weights="u8"),
                                     QuantRecipe(format="qoperator", weights="u8", per_channel=False)))
    report = optimize_bundle(bundle, config, echo=lambda s: None)
    return bundle, report


def sample_photos() -> list[Path]:
    from sklearn.datasets import load_sample_images

    return [Path(p) for p in load_sample_images().filenames]


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The two JPEG photos scikit-learn ships: real camera JPEGs, 640x427 (copies of them without it)."""
    if importlib.util.find_spec("sklearn") is not None:
        return sample_photos()
    if PREBUILT is not None and (cached := prebuilt(CACHED_PHOTOS)).is_dir():
        return sorted(cached.iterdir())
    pytest.skip("needs scikit-learn's sample photos: scikit-learn is not installed here")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def needs_cuda(test):
    """Mark a test `cuda` (`pytest -m cuda` selects them) and skip it, with the reason, without a GPU."""
    skip = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    return pytest.mark.cuda(skip(test))
