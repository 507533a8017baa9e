"""The bundle on disk: model files, labels.txt and manifest.json (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from toolkit.errors import ArtifactBroken, RtkError
from toolkit.fileio import sha256_file
from toolkit.manifest import FileEntry, Manifest

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
    "model.any-size.onnx": ("onnx", "fp32"),  # resize + center crop inside the graph: any image size in
    "model.openvino.xml": ("openvino", "fp32"),  # OpenVINO IR (+ .bin), converted from model.onnx
    "model.openvino-int8.xml": ("openvino", "int8"),  # NNCF int8 IR
    "model.openvino-int8-ac.xml": ("openvino", "int8"),  # NNCF int8 with accuracy control (rtk optimize)
}
ANY_SIZE = "any-size"  # a manifest entry's "input": decoded images of any size, not crops
ANY_SIZE_FILE = "model.any-size.onnx"
FORMATS = ("onnx", "torchscript", "pt2", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")


def takes_any_size(entry) -> bool:
    """The file resizes and crops inside its graph (its input is a whole decoded image)."""
    return entry.get("input") == ANY_SIZE


def file_name(fmt: str, precision: str = "fp32") -> str:
    for name, key in FILES.items():
        if key == (fmt, precision):
            return name
    raise RtkError(f"no {precision} {fmt} file: only ONNX has fp16 and int8 variants")


class Bundle:
    """An exported bundle folder and its typed manifest."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self._integrity: dict[str, str | None] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> Bundle:
        root = Path(path)
        if root.is_file():
            raise RtkError(f"{root} is a file; give the bundle folder that holds {MANIFEST}")
        if not (root / MANIFEST).is_file():
            raise RtkError(f"{root} is not an rtk bundle (no {MANIFEST})")
        return cls(root, Manifest.read(root / MANIFEST))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def files(self) -> dict[str, FileEntry]:
        """Every model file the manifest lists, present or not (a missing one is a failure, not a
        silence): the standard files first, then variants (`rtk optimize` adds some), by name."""
        entries = self.manifest.files
        order = [n for n in FILES if n in entries] + sorted(n for n in entries if n not in FILES)
        return {name: entries[name] for name in order}

    def path(self, name: str) -> Path:
        return self.root / name

    def any_size(self, artifact: str) -> bool:
        """`artifact` is a bundle file that resizes inside its graph (fed whole images, not crops);
        the eager checkpoint is not."""
        return artifact in self.manifest.files and takes_any_size(self.manifest.files[artifact])

    def integrity_problem(self, name: str) -> str | None:
        """Why the file is not the one the manifest describes (missing, wrong size, other sha256); None if it is."""
        if name not in self._integrity:
            entry, path = self.manifest.files[name], self.path(name)
            problem = None
            if not path.is_file():
                problem = f"{name} is missing from {self.root}"
            elif path.stat().st_size != entry.bytes:
                problem = f"{name} has {path.stat().st_size} bytes, the manifest says {entry.bytes} (truncated or replaced)"
            elif sha256_file(path) != entry.sha256:
                problem = f"{name}'s sha256 differs from the manifest's (the file was altered)"
            weights = entry.get("weights")  # an OpenVINO IR's second file
            if problem is None and isinstance(weights, dict):
                wpath = self.root / str(weights.get("file"))
                if not wpath.is_file():
                    problem = f"{wpath.name} (the weights of {name}) is missing from {self.root}"
                elif wpath.stat().st_size != weights.get("bytes") or sha256_file(wpath) != weights.get("sha256"):
                    problem = f"{wpath.name} (the weights of {name}) differs from the manifest (truncated or altered)"
            self._integrity[name] = problem
        return self._integrity[name]

    def check_file(self, name: str) -> None:
        problem = self.integrity_problem(name)
        if problem:
            raise ArtifactBroken(problem)

    def update(self, **changes: Any) -> None:
        """Change typed manifest fields and write manifest.json (atomically)."""
        self.manifest = self.manifest.with_values(**changes)
        self.manifest.write(self.root / MANIFEST)

    def add_file(self, name: str, entry: FileEntry) -> None:
        self._integrity.pop(name, None)
        self.update(files={**self.manifest.files, name: entry})

    def check_writable(self) -> None:
        """A stage that records its report in the manifest checks this before the work starts."""
        if not os.access(self.root / MANIFEST, os.W_OK) or not os.access(self.root, os.W_OK):
            raise RtkError(f"{self.root} is not writable: the report is stored in its {MANIFEST}")
