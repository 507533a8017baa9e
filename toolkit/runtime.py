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

import importlib.util
import json
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bundle import MANIFEST, SELFTEST
from toolkit.errors import CheckFailed, RtkError
from toolkit.preprocess import DEFAULT_MAX_PIXELS, ImageSource, PreprocessSpec, crop_array

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
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


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Provider names (aliases cpu/cuda/tensorrt allowed); each must be one onnxruntime can give here."""
    import onnxruntime as ort

    wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in (providers or ["cpu"])]
    available = ort.get_available_providers()
    for p in wanted:
        if p not in available:
            raise RtkError(f"{p} is not available in this onnxruntime (available: {', '.join(available)})")
    return wanted


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class OrtBackend:
    """onnxruntime: one InferenceSession, whose run() is safe to call from many threads."""

    name = "onnxruntime"

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def selftest_key(self, file: str) -> str:
        return file

    def run(self, crops: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: crops})[0]


class OpenVinoBackend:
    """OpenVINO on the CPU (when `rtk optimize` recommends it and openvino is installed). The
    compiled model is shared; each thread gets its own infer request, which is not thread-safe."""

    name = "openvino"

    def __init__(self, path: Path, threads: int | None, precision_hint: str) -> None:
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.output = self.compiled.output(0)
        self.hint = precision_hint
        self.local = threading.local()

    @property
    def providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self.hint})"]

    def selftest_key(self, file: str) -> str:
        return f"{'openvino-bf16' if self.hint == 'bf16' else 'openvino'}:{file}"

    def run(self, crops: np.ndarray) -> np.ndarray:
        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        return np.array(request.infer({0: crops})[self.output], dtype=np.float32, copy=True)


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

    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
             self_test: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS, runtime: str = "auto") -> Classifier:
        """Load a bundle folder or an ONNX file.

        A bundle serves the ONNX artifact `rtk optimize` recommended (else model.onnx), with the
        recommended threads. `runtime="auto"` runs it on the recommended runtime when that is
        installed (OpenVINO is optional: without it onnxruntime runs the same file, with a
        warning); "onnxruntime" or "openvino" force one.
        """
        import onnxruntime as ort

        path = Path(path)
        model_path, recommended = _model_file(path)
        if runtime not in ("auto", "onnxruntime", "openvino"):
            raise RtkError(f"runtime must be auto, onnxruntime or openvino, got {runtime!r}")
        use_openvino = runtime == "openvino" or (
            runtime == "auto" and providers is None and str(recommended.get("runtime", "")).startswith("openvino"))
        if use_openvino and importlib.util.find_spec("openvino") is None:
            if runtime == "openvino":
                raise RtkError("runtime openvino asked for, but openvino is not installed (pip install openvino)")
            warnings.warn(f"{path} recommends {recommended['runtime']}, which is not installed here: serving "
                          f"{model_path.name} with onnxruntime instead", stacklevel=2)
            use_openvino = False
        threads = threads or recommended.get("threads")
        wanted = resolve_providers(providers)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if ("CUDAExecutionProvider" in wanted or "TensorrtExecutionProvider" in wanted) and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        try:
            session = ort.InferenceSession(str(model_path), options, providers=wanted)
        except Exception as exc:
            raise RtkError(f"onnxruntime cannot load {model_path}: {str(exc).splitlines()[0]}") from None
        got = session.get_providers()
        if got[0] != wanted[0]:
            raise RtkError(f"asked for {wanted[0]} but onnxruntime gave {got}: refusing to fall back silently")
        meta = session.get_modelmeta().custom_metadata_map
        if "classes" not in meta or "preprocess" not in meta:
            raise RtkError(f"{model_path} has no rtk metadata (classes, preprocess): export it with rtk export")
        classes = json.loads(meta["classes"])
        width = session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(classes):
            raise RtkError(f"{model_path}: {len(classes)} class names for {width} outputs")
        precision = meta.get("precision", "fp32")
        backend: OrtBackend | OpenVinoBackend = OrtBackend(session)
        if use_openvino:  # the metadata came from the onnxruntime session; OpenVINO serves
            hint = "bf16" if recommended.get("runtime") == "openvino-bf16" else "f32"
            backend = OpenVinoBackend(model_path, threads, hint)
            precision = "bf16" if hint == "bf16" else precision
        clf = cls(backend, model_path, classes, PreprocessSpec.from_dict(json.loads(meta["preprocess"])), precision, max_pixels)
        if self_test:
            clf.self_test()
        return clf

    @property
    def providers(self) -> list[str]:
        return self.backend.providers

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """Raw logits for uint8 crops [N, S, S, 3]."""
        return self.backend.run(crops)

    def self_test(self) -> None:
        """Run the crops stored at export time; refuse to serve if this hardware gives other outputs."""
        stored = self.path.parent / SELFTEST
        if not stored.is_file():
            raise RtkError(f"no {SELFTEST} beside {self.path.name}: the self-test needs the bundle folder")
        key = self.backend.selftest_key(self.path.name)
        with np.load(stored) as data:
            if key not in data:
                raise RtkError(f"{SELFTEST} has no expected outputs for {key}")
            images, expected = data["images"], data[key]
        got = self.logits(images)
        tol = SELFTEST_TOLERANCE.get(self.precision, 5e-2) * max(1.0, float(np.abs(expected).max()))
        diff = float(np.abs(got - expected).max())
        same_top1 = bool((got.argmax(1) == expected.argmax(1)).all())
        if diff > tol or not same_top1:
            raise CheckFailed(f"self-test failed for {self.path.name} on {self.providers[0]}: max abs diff {diff:.3g} "
                              f"(allowed {tol:.3g}), top-1 {'same' if same_top1 else 'changed'}")

    def predict(self, images: Iterable[ImageSource], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Top-k labels, indices and softmax scores per image. An image that cannot be decoded gets a
        Prediction with `error` set; the others are still predicted."""
        if top_k < 1 or batch_size < 1:
            raise RtkError("top_k and batch_size must be at least 1")
        images = list(images)
        k = min(top_k, len(self.classes))
        results: list[Prediction | None] = [None] * len(images)
        for start in range(0, len(images), batch_size):
            crops, where = [], []
            for i in range(start, min(start + batch_size, len(images))):
                try:
                    crops.append(crop_array(images[i], self.spec, self.max_pixels))
                    where.append(i)
                except RtkError as exc:
                    results[i] = Prediction(_name(images[i], i), [], [], [], error=str(exc))
            if not crops:
                continue
            probs = softmax(self.logits(np.stack(crops)).astype(np.float64))
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            for row, i in enumerate(where):
                idx = [int(j) for j in top[row]]
                results[i] = Prediction(_name(images[i], i), [self.classes[j] for j in idx], idx,
                                        [float(probs[row, j]) for j in idx])
        return [r for r in results if r is not None]


def _model_file(path: Path) -> tuple[Path, dict[str, Any]]:
    """The ONNX file to serve and the bundle's recommendation (empty when there is none)."""
    if path.is_file():
        return path, {}
    if not path.is_dir():
        raise RtkError(f"no such bundle or ONNX file: {path}")
    manifest = path / MANIFEST
    recommended: dict[str, Any] = {}
    if manifest.is_file():
        recommended = json.loads(manifest.read_text(encoding="utf-8")).get("recommended") or {}
    if not str(recommended.get("artifact", "")).endswith(".onnx"):
        recommended = {}  # an eager/TorchScript recommendation needs torch: serve model.onnx instead
    name = recommended.get("artifact", "model.onnx")
    if not (path / name).is_file():
        raise RtkError(f"{path} has no {name}")
    return path / name, recommended


def _name(source: Any, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} #{index}>"
