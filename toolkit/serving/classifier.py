"""The production runtime: load an rtk ONNX bundle and classify images with onnxruntime alone.

Imports only the standard library, numpy, pillow and onnxruntime (never torch), so a service
needs none of the training stack:

    from toolkit.runtime import Classifier
    clf = Classifier.load("bundle/", self_test=True)
    for p in clf.predict(["cat.jpg", jpeg_bytes, pil_image]):
        print(p.source, p.labels[0], p.scores[0])

Decoding: EXIF orientation applied; every PIL mode becomes RGB, transparent pixels composited on
white, 16-bit greyscale scaled to 8 bits; then resize + center crop exactly as torchvision does.
One InferenceSession serves all threads (onnxruntime's `run` is thread-safe).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.core.bundle import ANY_SIZE, ANY_SIZE_FILE, MANIFEST, SELFTEST, Bundle
from toolkit.core.manifest import preprocess_spec
from toolkit.core.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    PreprocessSpec,
    any_size_array,
    crop_array,
)
from toolkit.errors import CheckFailed, RtkError, RuntimeUnavailable, first_line
from toolkit.serving.sessions import ENGINES, PROVIDERS, SessionSettings, open_session

if TYPE_CHECKING:
    from toolkit.serving.signing import TrustedCopy

DEVICE_OF_PROVIDER = {v: k for k, v in PROVIDERS.items()}
# Self-test tolerance on the largest logit's scale: the same file on other hardware (other SIMD
# kernels, other GPUs) differs by rounding, more for reduced precisions.
SELFTEST_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 2e-2, "int8": 5e-2}


@dataclass(frozen=True)
class Prediction:
    """Top-k for one image; `error` is set (and the lists empty) when the image could not be decoded."""

    source: str
    labels: list[str]
    indices: list[int]
    scores: list[float]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "labels": self.labels, "indices": self.indices, "scores": self.scores,
                "error": self.error}


def device_for(providers: Sequence[str] | None) -> str:
    """The session device for provider names (aliases cpu/cuda/tensorrt allowed): one device per session."""
    names = [PROVIDERS.get(p.lower(), p) for p in (providers or ["cpu"])]
    unknown = [p for p in names if p not in DEVICE_OF_PROVIDER]
    if unknown:
        raise RtkError(f"unknown provider {unknown[0]!r}; choose from cpu, cuda, tensorrt")
    # [cuda, cpu] means "cuda": onnxruntime's CPU fallback is refused anyway, so the first one decides.
    return DEVICE_OF_PROVIDER[names[0]]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Classifier:
    """An ONNX classifier with its labels and preprocessing, read from the model's own metadata."""

    def __init__(self, backend, path: Path, classes: list[str], spec: PreprocessSpec, precision: str,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.backend = backend
        self.path = path
        self.classes = classes
        self.spec = spec
        self.precision = precision
        self.max_pixels = max_pixels
        # the file resizes and crops inside its graph: predict() decodes only, and feeds whole images
        self.any_size = False
        self.trusted = None  # with Classifier.load(trust=...): the private copy of the signed files it serves

    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
             self_test: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS, runtime: str = "auto",
             any_size: bool = False, trust: Sequence[str | os.PathLike] | None = None) -> Classifier:
        """Load a bundle folder or an ONNX file.

        A bundle serves what `rtk optimize` recommended for the device asked for, with exactly the
        session settings it verified (else model.onnx with verify's defaults for that device: TF32
        off). `runtime="auto"` runs the recommended engine when it can run here (else its fallback engine
        runs the same ONNX file, with a warning: onnxruntime for OpenVINO); an engine's name
        (toolkit.serving.sessions.ENGINES: "onnxruntime", "openvino") forces it.
        `trust` (public key files): the bundle must be signed by one of them (toolkit.serving.signing), and what
        is loaded is a private copy of the files it serves whose sha256 are the signed ones.
        """
        if runtime != "auto" and runtime not in ENGINES:
            raise RtkError(f"runtime must be auto, {', '.join(ENGINES)}, got {runtime!r}")
        device = device_for(providers)
        trusted = trusted_files(Path(path), trust, device, threads, runtime, any_size) if trust is not None else None
        model_path, settings = serving_choice(trusted.root if trusted else Path(path), device, threads, runtime,
                                              any_size)
        try:
            backend = open_session(model_path, settings)
            meta = backend.metadata
        except RuntimeUnavailable as exc:
            raise RtkError(str(exc)) from None
        classes, spec = model_metadata(model_path, meta, backend.output_width)
        any_size_file = meta.get("input") == ANY_SIZE
        if not any_size_file:
            check_input_shape(model_path, backend, spec)
        precision = "bf16" if settings.precision_hint == "bf16" else meta.get("precision", "fp32")
        if backend.placement_warning():
            warnings.warn(f"{model_path.name}: {backend.placement_warning()}", stacklevel=2)
        clf = cls(backend, model_path, classes, spec, precision, max_pixels)
        clf.any_size = any_size_file
        clf.trusted = trusted
        if self_test:
            clf.self_test()
        return clf

    @property
    def settings(self) -> SessionSettings:
        """The session settings this classifier runs with."""
        return self.backend.settings

    @property
    def providers(self) -> list[str]:
        return self.backend.providers

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """Raw logits for uint8 crops [N, S, S, 3]."""
        return self.backend.run(crops)

    def self_test(self) -> None:
        """Run the crops stored at export time; refuse to serve if this hardware gives other outputs.
        A corrupt, oversized or mis-shaped selftest.npz is one CheckFailed line."""
        stored = self.path.parent / SELFTEST
        if not stored.is_file():
            raise RtkError(f"no {SELFTEST} beside {self.path.name}: the self-test needs the bundle folder")
        key = self.backend.selftest_key(self.path.name)
        images, expected = read_selftest(stored, key, self.spec.crop_size, len(self.classes))
        got = self.logits(images)
        tol = SELFTEST_TOLERANCE.get(self.precision, 5e-2) * max(1.0, float(np.abs(expected).max()))
        diff = float(np.abs(got - expected).max())
        same_top1 = bool((got.argmax(1) == expected.argmax(1)).all())
        if diff > tol or not same_top1:
            raise CheckFailed(f"self-test failed for {self.path.name} on {self.providers[0]}: max abs diff {diff:.3g} "
                              f"(allowed {tol:.3g}), top-1 {'same' if same_top1 else 'changed'}")

    def top_k(self, logits: np.ndarray, k: int) -> list[tuple[list[int], list[float]]]:
        """The k most likely class indices and their softmax scores, per row of logits."""
        probs = softmax(logits.astype(np.float64))
        top = np.argsort(-probs, axis=1, kind="stable")[:, : min(k, len(self.classes))]
        return [([int(j) for j in row], [float(probs[r, j]) for j in row]) for r, row in enumerate(top)]

    def predict(self, images: Iterable[ImageSource], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Top-k labels, indices and softmax scores per image. An image that cannot be decoded gets a
        Prediction with `error` set; the others are still predicted."""
        if top_k < 1 or batch_size < 1:
            raise RtkError("top_k and batch_size must be at least 1")
        images = list(images)
        k = min(top_k, len(self.classes))
        results: list[Prediction | None] = [None] * len(images)
        for start in range(0, len(images), batch_size):
            inputs, where = [], []
            for i in range(start, min(start + batch_size, len(images))):
                try:
                    inputs.append(self.model_input(images[i]))
                    where.append(i)
                except RtkError as exc:
                    results[i] = Prediction(_name(images[i], i), [], [], [], error=str(exc))
            if not inputs:
                continue
            logits = self.batch_logits(inputs)
            for row, (idx, scores) in zip(where, self.top_k(logits, k)):
                results[row] = Prediction(_name(images[row], row), [self.classes[j] for j in idx], idx, scores)
        return [r for r in results if r is not None]

    def batch_logits(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Logits for a list of `model_input` results, in their order."""
        # an any-size file takes one image size per call: images of the same size still share one
        return self.logits(np.stack(inputs)) if not self.any_size else _by_shape(self.logits, inputs)

    def model_input(self, image: ImageSource) -> np.ndarray:
        """What the file takes for one image: the decoded image (any-size files) or its resized crop."""
        if not self.any_size:
            return crop_array(image, self.spec, self.max_pixels)
        return any_size_array(image, self.spec, self.max_pixels)


SELFTEST_MAX_BYTES = 64 << 20  # a few crops and their logits: far below this for any ResNet


def read_selftest(path: Path, key: str, crop: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`images` (uint8 [N, crop, crop, 3]) and the expected logits `key` (float [N, width]) of a
    selftest.npz, its members' declared sizes checked before anything is decompressed (no npz bomb)
    and pickled objects refused."""
    import zipfile

    if path.is_symlink():
        raise CheckFailed(f"{path} is a symlink: the self-test reads only a plain file of the bundle")
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            arrays = sum(_npy_bytes(archive, info) for info in archive.infolist())
        if max(declared, arrays) > SELFTEST_MAX_BYTES:
            raise CheckFailed(f"{path} declares {max(declared, arrays)} bytes uncompressed, above the self-test's "
                              f"{SELFTEST_MAX_BYTES}: refused")
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data or key not in data:
                raise CheckFailed(f"{path} has no {'images' if 'images' not in data else f'expected outputs for {key}'}")
            images, expected = data["images"], data[key]
    except CheckFailed:
        raise
    except Exception as exc:  # not a zip, a truncated member, an object array (pickle), a bad header
        raise CheckFailed(f"{path} is not a readable self-test file: {first_line(exc)}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (crop, crop, 3) or not len(images):
        raise CheckFailed(f"{path}: images are {images.dtype} {images.shape}, the model takes uint8 "
                          f"[N, {crop}, {crop}, 3]")
    if expected.dtype.kind != "f" or expected.shape != (len(images), width):
        raise CheckFailed(f"{path}: {key} is {expected.dtype} {expected.shape}, expected float "
                          f"[{len(images)}, {width}]")
    return images, expected


def _npy_bytes(archive, info) -> int:
    """The bytes an .npy member's header says its array holds (read before the array itself)."""
    from numpy.lib import format as npy

    with archive.open(info) as fh:
        version = npy.read_magic(fh)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read(fh, max_header_size=10_000)
    if dtype.hasobject:
        raise CheckFailed(f"{info.filename} holds Python objects (a pickle): refused")
    return int(np.prod(shape, dtype=np.float64)) * dtype.itemsize


def model_metadata(path: Path, meta: dict[str, str], width: int | None) -> tuple[list[str], PreprocessSpec]:
    """The class names and preprocessing a model file carries in its metadata, type-checked: anything
    else (missing, not JSON, sizes as strings, a list for the spec) is one RtkError naming the file."""
    if "classes" not in meta or "preprocess" not in meta:
        raise RtkError(f"{path} has no rtk metadata (classes, preprocess): export it with rtk export")
    classes, spec = _json_metadata(path, meta, "classes"), _json_metadata(path, meta, "preprocess")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise RtkError(f"{path}: its metadata 'classes' must be a non-empty JSON list of names")
    if width is not None and width != len(classes):
        raise RtkError(f"{path}: {len(classes)} class names for {width} outputs")
    return classes, preprocess_spec(spec, f"{path}: its metadata 'preprocess'")


def _json_metadata(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError, RecursionError):
        raise RtkError(f"{path}: its metadata {key!r} is not JSON") from None


def check_input_shape(path: Path, backend, spec: PreprocessSpec) -> None:
    """A crop-input file's fixed input sides are the crop size its metadata states (else every
    prediction would fail: refused at load instead)."""
    shape = getattr(backend, "input_shape", None)
    if not isinstance(shape, list) or len(shape) != 4:
        return
    sides = [d for d in shape[1:3] if isinstance(d, int)]
    if any(side != spec.crop_size for side in sides) or (isinstance(shape[3], int) and shape[3] != 3):
        raise RtkError(f"{path}: its input is {shape}, but its metadata crops {spec.crop_size} x {spec.crop_size} x 3")


def _by_shape(run, images: list[np.ndarray]) -> np.ndarray:
    """Logits of images of mixed sizes, one call per distinct size, in the images' order."""
    out: list[np.ndarray | None] = [None] * len(images)
    shapes: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        shapes.setdefault(image.shape, []).append(i)
    for rows in shapes.values():
        for i, logits in zip(rows, run(np.stack([images[i] for i in rows]))):
            out[i] = logits
    return np.stack(out)


def serving_choice(path: Path, device: str, threads: int | None = None,
                   runtime: str = "auto", any_size: bool = False, check: bool = True) -> tuple[Path, SessionSettings]:
    """The ONNX file to serve on `device` and its session settings.

    The bundle's recommendation is used only where it fits: recorded for this device, an ONNX file,
    on an engine that is asked for or installed. Anything else serves model.onnx with the defaults
    verify checks (TF32 off), so CUDA never gets a CPU-only file (int8, the CPU-optimised graph).
    """
    bundle, session = None, None  # session: the recommendation's settings, where it is what is served
    if path.is_file():
        model_path = path
    elif path.is_dir():
        bundle = Bundle.open(path)  # a folder is served only as a bundle: every file it serves is listed
        rec = bundle.manifest.recommended
        # an eager/TorchScript or other-device recommendation is not served: model.onnx is
        served = rec if rec is not None and rec.servable_on(device) and not any_size else None
        model_path = path / (ANY_SIZE_FILE if any_size else served.artifact if served else "model.onnx")
        session = served.session if served else None
        if model_path.name not in bundle.manifest.files:
            raise RtkError(f"{path} has no {model_path.name} in its {MANIFEST}")
    else:
        raise RtkError(f"no such bundle or ONNX file: {path}")
    settings = SessionSettings.from_dict(session) if session is not None else SessionSettings(device=device)
    if runtime != "auto" and runtime != settings.engine:
        model_path, settings = on_engine(model_path, settings, runtime)
    problem = ENGINES[settings.engine].problem(settings)
    fallback = ENGINES[settings.engine].fallback
    if problem and runtime != "auto":
        raise RtkError(f"runtime {runtime} asked for, but {problem}")
    if problem and fallback:
        was = ENGINES[settings.engine].title
        model_path, settings = on_engine(model_path, settings, fallback)
        warnings.warn(f"{path} recommends {was}, which cannot run here ({problem}): serving "
                      f"{model_path.name} with {ENGINES[fallback].title} instead", stacklevel=3)
    if threads:
        settings = replace(settings, threads=threads)
    if bundle is not None and check:  # what is served is the file the manifest describes (and an IR's .bin with it)
        bundle.check_file(model_path.name)
    return model_path, settings


def on_engine(model_path: Path, settings: SessionSettings, engine: str) -> tuple[Path, SessionSettings]:
    """The file and settings `engine` serves in place of `settings`' engine: the same file where it opens it
    (an ONNX file), else the model.onnx the file was converted from (an OpenVINO IR), with default settings."""
    target = ENGINES[engine]
    if settings.device not in target.devices:
        raise RtkError(f"runtime {engine} runs on {', '.join(target.devices)} only, not {settings.device}")
    if model_path.suffix not in target.suffixes:
        return model_path.with_name("model.onnx"), SessionSettings(device=settings.device).on_engine(engine)
    return model_path, settings.on_engine(engine)


def trusted_files(path: Path, trust: Sequence[str | os.PathLike], device: str, threads: int | None, runtime: str,
                  any_size: bool) -> TrustedCopy:
    """The bundle's signature checked against `trust`, then a private copy (toolkit.serving.signing.TrustedCopy) of
    what serving reads: the manifest and self-test data, then the file serving_choice picks from that copied
    manifest, with an OpenVINO IR's weights."""
    from toolkit.serving.signing import trusted_copy

    if not path.is_dir():
        raise RtkError(f"--trust needs a bundle folder (a signature covers a folder), got {path}")

    def served(root: Path) -> list[str]:
        with warnings.catch_warnings():  # said once, by the real choice on the copy
            warnings.simplefilter("ignore")
            model, _ = serving_choice(root, device, threads, runtime, any_size, check=False)
        weights = Bundle.open(root).manifest.files[model.name].get("weights")
        return [model.name] + ([str(weights.get("file"))] if isinstance(weights, dict) else [])

    return trusted_copy(path, trust, served, first=(MANIFEST, SELFTEST))


def _name(source: Any, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} #{index}>"
