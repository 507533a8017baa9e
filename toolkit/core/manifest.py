"""manifest.json as a typed, standard-library dataclass: read and validated once, used by every stage.

A missing key or a value of the wrong type is one clear RtkError naming the file and the key.
Keys the toolkit does not know (added by a newer version, or by hand) are kept when it writes, except in
`recommended` (Recommendation), what serving opens: its keys are exactly what `rtk optimize` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from toolkit.core.fileio import write_json
from toolkit.core.preprocess import PreprocessSpec
from toolkit.errors import RtkError, first_line

FORMAT = "rtk-bundle"


def _check(where: str, data: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    if key not in data:
        if required:
            raise RtkError(f"{where}: missing key {key!r}")
        return None
    value = data[key]
    if value is None and not required:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no number
        raise RtkError(f"{where}: {key!r} must be {' or '.join(map(_type_name, kinds))}, got {_type_name(type(value))}")
    return value


def _type_name(kind: type) -> str:
    return "null" if kind is type(None) else kind.__name__


def check_plain_name(name: Any, where: str) -> str:
    """`name` is a plain file name (no folder part, no `..`, not absolute): a bundle file stays in its bundle."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or name != name.strip()):
        raise RtkError(f"{where}: {name!r} is not a plain file name inside the bundle")
    return name


MAX_IMAGE_SIDE = 8192  # resize and crop sizes above this are not a classifier's input: refused, not tried
_SPEC_TYPES = {"resize_size": int, "crop_size": int, "interpolation": str, "layout": str, "dtype": str}


def preprocess_spec(data: Any, where: str) -> PreprocessSpec:
    """A PreprocessSpec from JSON data (a manifest's or a model file's metadata), every field type-checked:
    a string size, a list instead of an object or a size beyond MAX_IMAGE_SIDE is one clear RtkError,
    never a silent fall back to the defaults."""
    if not isinstance(data, dict):
        raise RtkError(f"{where} must be an object with resize_size and crop_size, got {type(data).__name__}")
    for key in ("resize_size", "crop_size"):
        _check(where, data, key, int)
        if not 1 <= data[key] <= MAX_IMAGE_SIDE:
            raise RtkError(f"{where}: {key!r} is {data[key]}, outside 1..{MAX_IMAGE_SIDE}")
    for key, kind in _SPEC_TYPES.items():
        _check(where, data, key, kind, required=False)
    for key in ("mean", "std"):
        values = _check(where, data, key, list, required=False)
        if values is not None and (len(values) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise RtkError(f"{where}: {key!r} must be a list of three numbers")
    try:
        return PreprocessSpec.from_dict(data)
    except (TypeError, ValueError, RtkError) as exc:
        raise RtkError(f"{where} is not a preprocessing spec: {first_line(exc)}") from None


@dataclass(frozen=True)
class FileEntry:
    """One model file: what it is, its hash and size, and its I/O contract. `extra` keeps the rest
    (opset, exporter, seconds, quantization, hardware_specific, ...)."""

    format: str
    precision: str
    sha256: str
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FileEntry:
        if not isinstance(data, dict):
            raise RtkError(f"{where} must be an object, got {type(data).__name__}")
        core = {k: _check(where, data, k, kind) for k, kind in
                (("format", str), ("precision", str), ("sha256", str), ("bytes", int))}
        weights = _check(where, data, "weights", dict, required=False)  # an OpenVINO IR's .bin
        if weights is not None:
            check_plain_name(_check(f"{where} 'weights'", weights, "file", str), f"{where} 'weights' 'file'")
            _check(f"{where} 'weights'", weights, "sha256", str)
            _check(f"{where} 'weights'", weights, "bytes", int)
        return cls(**core, extra={k: v for k, v in data.items() if k not in core})

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "precision": self.precision, "sha256": self.sha256, "bytes": self.bytes, **self.extra}

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))


@dataclass(frozen=True)
class Recommendation:
    """What `rtk optimize` found fastest among the candidates that passed verification, and what serving
    opens: the runtime, the file, its session settings and the figures it was chosen on. runtime, artifact
    and precision are required; a key an older rtk optimize did not write takes its default (no `session`:
    serving opens model.onnx with default settings, as it always did for such bundles); a key it does not
    know, or a value of the wrong type, is refused, so a typo never silently serves the defaults."""

    runtime: str  # the runner's registry name: ort-cpu, openvino, openvino-bf16, eager, torchscript, ...
    artifact: str  # a plain file name in the bundle, or "checkpoint" (eager)
    precision: str
    device: str = "cpu"
    threads: int | None = None
    settings: str = ""  # the session in words ("2 threads, graph all")
    # SessionSettings.to_dict() (toolkit.serving.sessions, which core may not import); None for a torch runtime
    session: dict[str, Any] | None = None
    cpu: dict[str, Any] | None = None  # the CPU it was chosen on (CpuInfo.to_dict()): another CPU optimizes again
    speedup_vs_onnxruntime_default: float | None = None
    speedup_vs_openvino_default: float | None = None
    # over the fastest verified PyTorch-native runner (eager, torch.compile, TorchScript, torch.export, AOTInductor)
    speedup_vs_pytorch_native: float | None = None
    batch_size: int = 1  # the batch size the figures are for (optimize's first)
    p50_ms: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_eager_spread: float | None = None  # (max - min) / median of that ratio over the rounds
    accuracy_change_points: float | None = None
    accuracy_interval_points: tuple[float, float] | None = None

    TYPES = {"runtime": str, "artifact": str, "precision": str, "device": str, "threads": (int, type(None)),
             "settings": str, "session": (dict, type(None)), "cpu": (dict, type(None)),
             "speedup_vs_onnxruntime_default": OPTIONAL_NUMBER, "speedup_vs_openvino_default": OPTIONAL_NUMBER,
             "speedup_vs_pytorch_native": OPTIONAL_NUMBER, "batch_size": int, "p50_ms": OPTIONAL_NUMBER, "speedup_vs_eager": OPTIONAL_NUMBER,
             "speedup_vs_eager_spread": OPTIONAL_NUMBER, "accuracy_change_points": OPTIONAL_NUMBER,
             "accuracy_interval_points": (list, type(None))}
    REQUIRED = ("runtime", "artifact", "precision")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Recommendation:
        if not isinstance(data, dict):
            raise RtkError(f"{where} must be an object, got {type(data).__name__}")
        if "artifact" in data:  # first: a path out of the bundle is the refusal that matters most
            check_plain_name(data["artifact"], f"{where} 'artifact'")
        unknown = sorted(set(data) - set(cls.TYPES))
        if unknown:
            raise RtkError(f"{where}: unknown key {', '.join(map(repr, unknown))} (run rtk optimize again)")
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise RtkError(f"{where}: missing key {', '.join(map(repr, missing))} (run rtk optimize again)")
        values = {key: _check(where, data, key, kind) for key, kind in cls.TYPES.items() if key in data}
        interval = values.get("accuracy_interval_points")
        if interval is not None:
            if len(interval) != 2 or not all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in interval):
                raise RtkError(f"{where}: 'accuracy_interval_points' must be a list of two numbers")
            values["accuracy_interval_points"] = tuple(interval)
        if values.get("session") is not None and not all(isinstance(k, str) for k in values["session"]):
            raise RtkError(f"{where}: 'session' must be an object of session settings")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object optimize writes, keys in its order."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.accuracy_interval_points is not None:
            out["accuracy_interval_points"] = list(self.accuracy_interval_points)
        return out

    @property
    def engine(self) -> str:
        """The engine of the recommended session (toolkit.serving.sessions.ENGINES), or torch for a torch
        runtime; a record without session settings is read by its runtime's name."""
        if self.session is not None and isinstance(self.session.get("engine"), str):
            return self.session["engine"]
        if self.runtime.startswith("openvino"):
            return "openvino"
        return "onnxruntime" if self.runtime.startswith("ort") else "torch"

    @property
    def onnx_file(self) -> bool:
        return self.artifact.endswith(".onnx")

    def servable_on(self, device: str) -> bool:
        """Whether the torch-free serving runtime opens it as recorded on `device`: recorded for that device
        with session settings, on an ONNX file or on an OpenVINO IR with an OpenVINO session."""
        if self.session is None or self.device != device:
            return False
        return self.onnx_file or (self.artifact.endswith(".xml") and self.session.get("engine") == "openvino")


@dataclass(frozen=True)
class Manifest:
    arch: str
    classes: tuple[str, ...]
    preprocess: PreprocessSpec
    source: dict[str, Any]
    files: dict[str, FileEntry]
    softmax: bool = False
    recommended: Recommendation | None = None
    verification: dict[str, Any] | None = None
    optimization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # format, version, created, versions, selftest, ...

    TYPED = ("arch", "classes", "preprocess", "source", "files", "softmax", "recommended", "verification", "optimization")

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest.json") -> Manifest:
        if not isinstance(data, dict):
            raise RtkError(f"{where} must hold a JSON object, got {type(data).__name__}")
        classes = _check(where, data, "classes", list)
        if not classes or not all(isinstance(c, str) for c in classes):
            raise RtkError(f"{where}: 'classes' must be a non-empty list of strings")
        spec = preprocess_spec(_check(where, data, "preprocess", dict), f"{where} 'preprocess'")
        source = _check(where, data, "source", dict)
        for key in ("kind", "arch"):
            _check(f"{where} 'source'", source, key, str)
        files = {check_plain_name(name, f"{where} 'files'"): FileEntry.from_dict(entry, f"{where} files[{name!r}]")
                 for name, entry in _check(where, data, "files", dict).items()}
        recommended = _check(where, data, "recommended", dict, required=False)
        if recommended is not None:
            recommended = Recommendation.from_dict(recommended, f"{where} 'recommended'")
        return cls(arch=_check(where, data, "arch", str), classes=tuple(classes), preprocess=spec, source=source,
                   files=files, softmax=bool(_check(where, data, "softmax", bool, required=False)),
                   recommended=recommended,
                   verification=_check(where, data, "verification", dict, required=False),
                   optimization=_check(where, data, "optimization", dict, required=False),
                   extra={k: v for k, v in data.items() if k not in cls.TYPED})

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RtkError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RtkError(f"{path} is not valid JSON (truncated?): {exc}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "arch": self.arch, "classes": list(self.classes),
                               "preprocess": self.preprocess.to_dict(), "source": self.source,
                               "softmax": self.softmax, "files": {n: e.to_dict() for n, e in self.files.items()}}
        if self.recommended is not None:
            out["recommended"] = self.recommended.to_dict()
        for key in ("verification", "optimization"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def with_values(self, **changes: Any) -> Manifest:
        return replace(self, **changes)
