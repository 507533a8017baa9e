"""Atomic file writes and hashing (standard library only)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

# Free bytes under which a C++ writer's failure (OpenVINO's "iostream error") is taken to be a full disk.
FULL_DISK_BYTES = 1 << 20


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised in the block `path` as its file name when it has none.

    A write() that fails (ENOSPC, EDQUOT, EIO) raises an OSError without a file name: the user would read
    "No space left on device" without knowing which file or disk."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, lock: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it over `final` only if the block succeeds.

    A run killed at any moment leaves either the old file or the new one, never a truncated one. An
    OSError names `final`. With `lock` (the command's name), the rename happens under `folder_lock` of
    the folder, so writers of one bundle take turns (the caller must not hold that lock itself).
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
        with naming(final):
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            with folder_lock(final.parent, lock) if lock else contextlib.nullcontext():
                os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class _KeepError(io.RawIOBase):
    """A file object for C++ serialisers (torch.save, torch.export.save) that never raises inside them.

    An exception thrown back into their writer callback is swallowed into an "unexpected pos" RuntimeError
    or aborts the process (SIGABRT); this keeps the first OSError, discards what follows, and lets the
    caller raise it once the serialiser has returned."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self.fh = fh
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:  # torch.export.save asks; it only writes forward
        return True

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.fh.seek(offset, whence)

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.fh.write(data)
            except OSError as exc:
                self.error = exc
        return len(memoryview(data))


@contextlib.contextmanager
def writer_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open `path` for a serialiser written in C++; its first write error is raised once it returns
    (wrap in `naming` or `atomic_path` to give it the path the user knows)."""
    with open(path, "wb") as fh:
        sink = _KeepError(fh)
        yield sink  # type: ignore[misc]
        if sink.error is not None:
            raise sink.error


@contextlib.contextmanager
def library_writes(path: str | os.PathLike) -> Iterator[None]:
    """For a library that writes `path` itself in C++ and takes no file object (OpenVINO's save_model).

    Its failure is a RuntimeError without errno or path ("basic_ios::clear: iostream error"): on a folder
    with less than FULL_DISK_BYTES free it becomes ENOSPC naming `path`, otherwise one RtkError line."""
    from toolkit.errors import RtkError, first_line

    path = Path(path)
    try:
        with naming(path):
            yield
    except RuntimeError as exc:
        stat = os.statvfs(path.parent)
        if stat.f_bavail * stat.f_frsize < FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise RtkError(f"cannot write {path}: {first_line(exc)}") from None


def refuse_overlap(output: str | os.PathLike, sources: Iterable[tuple[str, str | os.PathLike]], command: str) -> None:
    """Refuse an output that is, contains or lies inside something `command` reads (resolved paths).

    Replacing such an output would delete the input (`rtk triton BUNDLE -o PARENT --force` removed the
    bundle); writing inside it would change the input. The message does not offer --force: no flag makes it safe."""
    from toolkit.errors import RtkError

    out = Path(output).resolve()
    for what, source in sources:
        src = Path(source).resolve()
        relation = ("is" if out == src else "contains" if out in src.parents else
                    "lies inside" if src in out.parents else None)
        if relation:
            raise RtkError(f"the output {output} {relation} {what} {source}, which {command} reads: "
                           "write the output somewhere else")


def check_replaceable(final: Path, force: bool) -> None:
    """`final` is absent, an empty folder, or a folder that `force` allows to replace."""
    from toolkit.errors import RtkError

    if final.exists() and not final.is_dir():
        raise RtkError(f"{final} exists and is not a folder")
    if final.is_dir() and any(final.iterdir()) and not force:
        raise RtkError(f"{final} is not empty; pass --force to replace it")


def install_folder(staging: Path, final: Path, force: bool, command: str) -> None:
    """Move the finished `staging` folder to `final`, replacing an old non-empty one only with `force`.

    Under the lock of the parent (and of `final` when it exists), so two commands writing one new folder
    take turns: the second finds it filled and refuses instead of silently replacing the first's work."""
    with folder_lock(final.parent, command), (folder_lock(final, command) if final.is_dir()
                                              else contextlib.nullcontext()):
        check_replaceable(final, force)
        old = None
        if final.is_dir() and any(final.iterdir()):
            old = final.with_name(f".{final.name}.old-{time.time_ns()}")
            final.rename(old)
        staging.chmod(0o755)  # mkdtemp makes it 0700
        staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
