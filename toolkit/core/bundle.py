"""The bundle on disk: model files, labels.txt and manifest.json (standard library only)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from toolkit.core.fileio import folder_lock, sha256_file
from toolkit.core.formats import ANY_SIZE_FILE, FILES, FORMATS, PRECISIONS, file_name  # noqa: F401 (re-exported)
from toolkit.core.manifest import FileEntry, Manifest, Recommendation, check_plain_name
from toolkit.errors import ArtifactBroken, RtkError

MANIFEST = "manifest.json"
LABELS = "labels.txt"
SELFTEST = "selftest.npz"
# every exported graph's I/O: one uint8 NHWC input, logits (and probabilities with --softmax) out
INPUT_NAME, OUTPUT_NAMES = "image", ("logits", "probabilities")
ANY_SIZE = "any-size"  # a manifest entry's "input": decoded images of any size, not crops
_HELD: dict[tuple[str, int], int] = {}  # (bundle root, thread) holding the writer lock, and how deeply
LABELS_MAX_BYTES = 1 << 20  # a label file for 100,000 classes fits; anything larger is not a label file


def selftest_key(name: str, engine: str = "onnxruntime") -> str:
    """The key of a file's expected logits in selftest.npz: onnxruntime's under the file name, another
    engine's ("openvino", "openvino-bf16": OpenVINO computes a little differently) under "ENGINE:FILE"."""
    return name if engine == "onnxruntime" else f"{engine}:{name}"


def takes_any_size(entry) -> bool:
    """The file resizes and crops inside its graph (its input is a whole decoded image)."""
    return entry.get("input") == ANY_SIZE


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

    def confined(self, name: str, what: str | None = None) -> Path:
        """The path of bundle file `name`, refused (ArtifactBroken) unless it is a plain file name whose
        resolved path is a regular file directly inside the bundle: no absolute path, no `..`, no symlink."""
        what = what or name
        try:
            check_plain_name(name, f"{self.root / MANIFEST}")
        except RtkError as exc:
            raise ArtifactBroken(str(exc)) from None
        path = self.root / name
        if path.is_symlink():
            raise ArtifactBroken(f"{what} in {self.root} is a symlink: a bundle file must be a plain file inside it")
        if not path.exists():
            raise ArtifactBroken(f"{what} is missing from {self.root}")
        if not path.is_file() or path.resolve().parent != self.root.resolve():
            raise ArtifactBroken(f"{what} in {self.root} is not a plain file inside the bundle")
        return path

    def labels(self) -> list[str]:
        """labels.txt, read confined to the bundle, checked to equal the manifest's classes exactly.

        Whoever copies or serves the labels (Triton's label_filename) calls this: a symlink to a secret
        file, a huge file or labels that disagree with the model's classes are one ArtifactBroken line."""
        path = self.confined(LABELS)
        size = path.stat().st_size
        if size > LABELS_MAX_BYTES:
            raise ArtifactBroken(f"{path} has {size} bytes, more than a label file's {LABELS_MAX_BYTES} bytes")
        try:
            with open(path, "rb") as fh:
                text = fh.read(LABELS_MAX_BYTES + 1).decode("utf-8")
        except UnicodeDecodeError:
            raise ArtifactBroken(f"{path} is not UTF-8 text") from None
        except OSError as exc:
            raise ArtifactBroken(f"cannot read {path}: {exc.strerror or exc}") from None
        labels = [line.strip() for line in text.splitlines() if line.strip()]
        classes = self.classes
        if len(labels) != len(classes):
            raise ArtifactBroken(f"{path} has {len(labels)} labels, the manifest has {len(classes)} classes")
        if labels != classes:
            i = next(i for i, (a, b) in enumerate(zip(labels, classes)) if a != b)
            raise ArtifactBroken(f"{path}: label {i + 1} is {labels[i]!r}, the manifest's class {i + 1} is {classes[i]!r}")
        return labels

    def any_size(self, artifact: str) -> bool:
        """`artifact` is a bundle file that resizes inside its graph (fed whole images, not crops);
        the eager checkpoint is not."""
        return artifact in self.manifest.files and takes_any_size(self.manifest.files[artifact])

    def integrity_problem(self, name: str) -> str | None:
        """Why the file is not the one the manifest describes (not listed, missing, a symlink, wrong size,
        other sha256, and the same for an OpenVINO IR's weights file); None if it is."""
        if name not in self._integrity:
            entry = self.manifest.files.get(name)
            problem = f"{name} is not listed in {self.root / MANIFEST}" if entry is None else self._file_problem(
                name, entry.bytes, entry.sha256, name)
            weights = entry.get("weights") if entry is not None else None  # an OpenVINO IR's second file
            if problem is None and isinstance(weights, dict):
                problem = self._file_problem(str(weights.get("file")), weights.get("bytes"), weights.get("sha256"),
                                             f"{weights.get('file')} (the weights of {name})")
            self._integrity[name] = problem
        return self._integrity[name]

    def _file_problem(self, name: str, size: Any, sha256: Any, what: str) -> str | None:
        try:
            path = self.confined(name, what)
        except RtkError as exc:
            return str(exc)
        if what != name and (path.stat().st_size != size or sha256_file(path) != sha256):
            return f"{what} differs from the manifest (truncated or altered)"
        if path.stat().st_size != size:
            return f"{what} has {path.stat().st_size} bytes, the manifest says {size} (truncated or replaced)"
        if sha256_file(path) != sha256:
            return f"{what}'s sha256 differs from the manifest's (the file was altered)"
        return None

    def check_file(self, name: str) -> None:
        problem = self.integrity_problem(name)
        if problem:
            raise ArtifactBroken(problem)

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Hold the bundle's writer lock (re-entrant within this process): a command that writes in the
        bundle holds it for its whole run, and every manifest write takes it, so writers take turns."""
        key = (os.path.realpath(self.root), threading.get_ident())
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        with folder_lock(self.root, what):
            _HELD[key] = 1
            try:
                yield
            finally:
                del _HELD[key]

    def update(self, *, verification: dict[str, Any] | None = None, optimization: dict[str, Any] | None = None,
               recommended: Recommendation | None = None) -> None:
        """Replace the reports given (None: kept as they are) and write manifest.json (atomically). The manifest
        is re-read under the bundle's lock and only those keys replaced, so what another writer added since
        this bundle was opened (optimize's `recommended`, a new file) is kept."""
        given = {"verification": verification, "optimization": optimization, "recommended": recommended}
        changes = {key: value for key, value in given.items() if value is not None}
        self._write(lambda current: current.with_values(**changes))

    def add_file(self, name: str, entry: FileEntry) -> None:
        check_plain_name(name, f"{self.root}: a new bundle file")
        self._integrity.pop(name, None)
        self._write(lambda current: current.with_values(files={**current.files, name: entry}))

    def _write(self, change: Callable[[Manifest], Manifest]) -> None:
        with self.writing(f"writing {MANIFEST}"):
            self.manifest = change(Manifest.read(self.root / MANIFEST))
            self.manifest.write(self.root / MANIFEST)

    def check_writable(self) -> None:
        """A stage that records its report in the manifest checks this before the work starts."""
        if not os.access(self.root / MANIFEST, os.W_OK) or not os.access(self.root, os.W_OK):
            raise RtkError(f"{self.root} is not writable: the report is stored in its {MANIFEST}")
