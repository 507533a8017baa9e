"""The bundle on disk: model files, labels.txt and manifest.json (standard library only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import RtkError
from toolkit.fileio import write_json

MANIFEST = "manifest.json"
LABELS = "labels.txt"
SELFTEST = "selftest.npz"
# File name -> (format, precision). Fixed names so a service finds what it needs without guessing.
FILES = {
    "model.onnx": ("onnx", "fp32"),
    "model.fp16.onnx": ("onnx", "fp16"),
    "model.int8.onnx": ("onnx", "int8"),
    "model.ts": ("torchscript", "fp32"),
    "model.pt2": ("pt2", "fp32"),
}
FORMATS = ("onnx", "torchscript", "pt2")
PRECISIONS = ("fp32", "fp16", "int8")


def file_name(fmt: str, precision: str = "fp32") -> str:
    for name, key in FILES.items():
        if key == (fmt, precision):
            return name
    raise RtkError(f"no {precision} {fmt} file: only ONNX has fp16 and int8 variants")


@dataclass(frozen=True)
class Bundle:
    """A read view of an exported bundle folder."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        root = Path(path)
        if root.is_file():
            raise RtkError(f"{root} is a file; give the bundle folder that holds {MANIFEST}")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise RtkError(f"{root} is not an rtk bundle (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RtkError(f"{manifest_path} is not valid JSON: {exc}") from None
        return cls(root, manifest)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Model files present in the bundle with their manifest entries: the standard files first,
        then variants (`rtk optimize` adds int8 variants and an optimised graph), by name."""
        entries = self.manifest.get("files", {})
        order = [n for n in FILES if n in entries] + sorted(n for n in entries if n not in FILES)
        return {name: entries[name] for name in order if (self.root / name).is_file()}

    def path(self, name: str) -> Path:
        return self.root / name

    def update(self, key: str, value: Any) -> None:
        """Store `value` under `key` in manifest.json (atomically)."""
        self.manifest[key] = value
        write_json(self.root / MANIFEST, self.manifest)
