"""Atomic file writes and hashing (standard library only)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it over `final` only if the block succeeds.

    A run killed at any moment leaves either the old file or the new one, never a truncated one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 would make bundles unreadable to a service user
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(final: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Call `writer(tmp_path)` and move the result to `final` atomically."""
    with atomic_path(final) as tmp:
        writer(tmp)


def write_text(final: str | os.PathLike, text: str) -> None:
    atomic_write(final, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(final: str | os.PathLike, data: Any) -> None:
    write_text(final, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable_dir(folder: str | os.PathLike) -> None:
    """Fail now, with the path, if `folder` (or the nearest existing folder above it) cannot take new files.

    Checked before a stage's expensive work, so a bad output path does not cost a training run. Creating
    and removing a probe file tests what os.access cannot (read-only mounts, root on a read-only share).
    """
    from toolkit.errors import RtkError

    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise RtkError(f"cannot write to {folder}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rtk-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RtkError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def check_writable_file(path: str | os.PathLike | None) -> None:
    """The folder of an output file (a --json/--csv/--markdown path) can take it; None passes."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        from toolkit.errors import RtkError

        raise RtkError(f"{path} is a folder; give a file path")
    check_writable_dir(path.parent)



@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, wait_s: float = 60.0) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on the folder itself while `what` writes in it.

    Two rtk commands writing one folder (two exports into one parent, verify's write-back beside
    optimize) take turns instead of silently overwriting each other. The lock is on the folder's own
    descriptor, so no lock file is added to a bundle (a signed bundle's file list stays the same).
    """
    from toolkit.errors import RtkError

    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RtkError(f"{folder} is being written by another rtk command; {what} waited "
                                   f"{wait_s:g} s for it: try again when it has finished") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
