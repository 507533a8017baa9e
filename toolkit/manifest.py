"""manifest.json as a typed, standard-library dataclass: read and validated once, used by every stage.

A missing key or a value of the wrong type is one clear RtkError naming the file and the key.
Keys the toolkit does not know (added by a newer version, or by hand) are kept when it writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from toolkit.errors import RtkError
from toolkit.fileio import write_json
from toolkit.preprocess import PreprocessSpec

FORMAT = "rtk-bundle"


def _check(where: str, data: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    if key not in data:
        if required:
            raise RtkError(f"{where}: missing key {key!r}")
        return None
    value = data[key]
    if value is None and not required:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RtkError(f"{where}: {key!r} must be {names}, got {type(value).__name__}")
    return value


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
        return cls(**core, extra={k: v for k, v in data.items() if k not in core})

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "precision": self.precision, "sha256": self.sha256, "bytes": self.bytes, **self.extra}

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


@dataclass(frozen=True)
class Manifest:
    arch: str
    classes: tuple[str, ...]
    preprocess: PreprocessSpec
    source: dict[str, Any]
    files: dict[str, FileEntry]
    softmax: bool = False
    recommended: dict[str, Any] | None = None
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
        try:
            spec = PreprocessSpec.from_dict(_check(where, data, "preprocess", dict))
        except (TypeError, ValueError) as exc:
            raise RtkError(f"{where}: 'preprocess' is not a preprocessing spec: {exc}") from None
        source = _check(where, data, "source", dict)
        for key in ("kind", "arch"):
            _check(f"{where} 'source'", source, key, str)
        files = {name: FileEntry.from_dict(entry, f"{where} files[{name!r}]")
                 for name, entry in _check(where, data, "files", dict).items()}
        return cls(arch=_check(where, data, "arch", str), classes=tuple(classes), preprocess=spec, source=source,
                   files=files, softmax=bool(_check(where, data, "softmax", bool, required=False)),
                   recommended=_check(where, data, "recommended", dict, required=False),
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
        for key in ("recommended", "verification", "optimization"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def with_values(self, **changes: Any) -> Manifest:
        return replace(self, **changes)
