"""Batch prediction to a Parquet dataset: streamed, resumable, one row per image (no torch).

`rtk predict BUNDLE INPUT... --output OUT` runs `run_local`; `--engine ray` runs the same job on Ray Data
(`toolkit.serving.batch_ray`). Both share everything here: the input listing, the decode (the runtime's own
`Classifier.model_input`, so the same bounds), the rows and the output folder.

- Inputs are streamed: folders are walked one directory at a time (sorted, so every run lists the same
  order), manifests (.txt / .csv / .parquet) are read line by line or batch by batch; no list of all paths
  is ever built.
- Input number i belongs to part i // part_rows. A part is written only whole (temp file, fsync, rename,
  fsync of the folder) and named `part-<part number>-<digest of its sources>.parquet`, so the folder itself
  records what is done: a rerun skips the parts present (checking their digests against the listing, so
  changed inputs are refused instead of mixed) and ends with each input exactly once.
- `job.json` records the model file's sha256, the inputs and the options that change rows: an output
  folder of another job is refused rather than mixed.
- An image that cannot be read (missing, undecodable, too large) is a row with `error` set; the others
  are still predicted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.fileio import atomic_path, refuse_overlap, sha256_file
from toolkit.core.preprocess import IMAGE_EXTENSIONS
from toolkit.errors import RtkError, first_line

PART_ROWS = 4096
JOB_FILE = "job.json"
JOB_FORMAT = 1
PART_NAME = re.compile(r"^part-(\d{8})-([0-9a-f]{16})\.parquet$")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
PATH_COLUMNS = ("path", "uri", "source", "file")  # the first one a manifest has names the images
BYTES_COLUMNS = ("bytes", "image_bytes", "image", "content")  # a Parquet binary column of encoded images
MAX_URI_BYTES = 256 << 20  # an encoded image read from a URI; above it the row fails instead of filling memory
MANIFEST_BATCH = 1024  # Parquet manifest rows read at a time


@dataclass(frozen=True)
class Item:
    """One input: its number in the listing, its path or URI, and its bytes when a manifest carries them."""

    index: int
    source: str
    data: bytes | None = None
    error: str | None = None  # known before decoding (an INPUT that does not exist)


@dataclass(frozen=True)
class BatchOptions:
    """What a batch job computes (the first three change its rows, so they are part of the job record)."""

    top_k: int = 5
    logits: bool = False
    part_rows: int = PART_ROWS
    batch_size: int = 32

    def __post_init__(self) -> None:
        if min(self.top_k, self.part_rows, self.batch_size) < 1:
            raise RtkError("--top-k, --batch-size and the rows per part must be at least 1")


@dataclass
class BatchResult:
    """What one run did: rows predicted now, rows found done, failures of each, time, and (Ray) rows per node."""

    output: Path
    rows: int = 0
    failed: int = 0
    done_rows: int = 0
    done_failed: int = 0
    seconds: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.done_failed)

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        done = f" ({self.done_rows} already done, {self.done_failed} of them failed)" if self.done_rows else ""
        where = f" on {len(self.nodes)} node{'s' * (len(self.nodes) != 1)}" if self.nodes else ""
        return (f"{self.rows} images{done}, {self.failed} failed, {rate:.1f} img/s{where} -> {self.output}")


# --- the input listing -------------------------------------------------------------------------------------

def iter_items(inputs: Sequence[str | os.PathLike]) -> Iterator[Item]:
    """Every input image in a fixed order, numbered from 0: files, folders (recursive, sorted), manifests."""
    index = 0
    for given in inputs:
        for source, data, error in _entries(str(given)):
            yield Item(index, source, data, error)
            index += 1


def _entries(given: str) -> Iterator[tuple[str, bytes | None, str | None]]:
    if is_uri(given):
        yield given, None, None
        return
    path = Path(given)
    if path.is_dir():
        yield from ((str(p), None, None) for p in walk_images(path))
    elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        yield from manifest_entries(path)
    elif path.is_file():
        yield str(path), None, None
    else:
        yield given, None, f"no such file or folder: {given}"


def is_uri(text: str) -> bool:
    return "://" in text


def walk_images(folder: Path) -> Iterator[Path]:
    """Image files under `folder`, depth first, each directory's entries sorted by name. One directory's
    entries are held at a time; symlinked folders are not followed (no cycles)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise RtkError(f"cannot list {folder}: {exc.strerror or first_line(exc)}") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from walk_images(Path(entry.path))
        elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
            yield Path(entry.path)


def manifest_entries(path: Path) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(source, bytes or None, None) per row of a manifest; relative paths are relative to its folder."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_entries(path)
        return
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        try:
            if suffix == ".txt":
                sources: Iterable[str] = (line.strip() for line in fh)
            else:
                reader = csv.DictReader(fh)
                column = _path_column(path, reader.fieldnames or [])
                sources = ((row.get(column) or "").strip() for row in reader)
            for source in sources:
                if source and not source.startswith("#"):
                    yield _resolve(path, source), None, None
        except csv.Error as exc:  # a field above csv's size limit, a NUL byte
            raise RtkError(f"{path} is not a readable CSV manifest: {first_line(exc)}") from None


def _parquet_entries(path: Path) -> Iterator[tuple[str, bytes | None, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # not Parquet, truncated: pyarrow raises several types
        raise RtkError(f"{path} is not a readable Parquet manifest: {first_line(exc)}") from None
    schema = file.schema_arrow
    binary = [n for n in BYTES_COLUMNS if n in schema.names
              and (pa.types.is_binary(schema.field(n).type) or pa.types.is_large_binary(schema.field(n).type))]
    paths = [n for n in PATH_COLUMNS if n in schema.names]
    if not binary and not paths:
        raise RtkError(f"{path} has neither a path column ({', '.join(PATH_COLUMNS)}) nor an image-bytes "
                       f"column ({', '.join(BYTES_COLUMNS)} of type binary)")
    row = 0
    for batch in _batches(path, file, paths[:1] + binary[:1]):
        names = batch.column(paths[0]).to_pylist() if paths else [None] * batch.num_rows
        blobs = batch.column(binary[0]).to_pylist() if binary else [None] * batch.num_rows
        for name, blob in zip(names, blobs):
            source = _resolve(path, name) if name else f"{path}#{row}"
            if binary and blob is None:
                yield source, None, f"{path} row {row}: no image bytes"
            elif binary:
                yield source, blob, None
            else:
                yield source, None, None
            row += 1


def _batches(path: Path, file, columns: list[str]) -> Iterator:
    """The manifest's record batches; a corrupt page further on is one RtkError, not a traceback."""
    batches = file.iter_batches(batch_size=MANIFEST_BATCH, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow raises OSError, ArrowInvalid... for a bad page
            raise RtkError(f"{path} is not a readable Parquet manifest: {first_line(exc)}") from None
        yield batch


def _path_column(path: Path, names: Sequence[str]) -> str:
    for name in PATH_COLUMNS:
        if name in names:
            return name
    raise RtkError(f"{path} has no path column: name one of its columns {', '.join(PATH_COLUMNS)}")


def _resolve(manifest: Path, source: str) -> str:
    if is_uri(source) or os.path.isabs(source):
        return source
    return str(manifest.parent / source)


# --- decoding and rows -------------------------------------------------------------------------------------

def image_source(item: Item) -> bytes | Path:
    """What `Classifier.model_input` decodes for an item: its bytes, a URI's bytes, or its path.
    Raises RtkError (the row's error) for a missing file or an unreadable or oversized URI."""
    if item.error:
        raise RtkError(item.error)
    if item.data is not None:
        return item.data
    if is_uri(item.source) and not item.source.startswith("file://"):
        return read_uri(item.source)
    path = Path(item.source.removeprefix("file://"))
    if not path.is_file():
        raise RtkError(f"no such image file: {item.source}")
    return path


def read_uri(uri: str) -> bytes:
    """The bytes at a URI that pyarrow's filesystems open (s3://, gs://, hdfs://...), at most MAX_URI_BYTES."""
    from pyarrow import fs

    try:
        filesystem, where = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(where)
        if info.type != fs.FileType.File:
            raise RtkError(f"no such image file: {uri}")
        if info.size is not None and info.size > MAX_URI_BYTES:
            raise RtkError(f"{uri} has {info.size} bytes, above the limit of {MAX_URI_BYTES}")
        with filesystem.open_input_stream(where) as fh:
            data = fh.read(MAX_URI_BYTES + 1)
    except RtkError:
        raise
    except Exception as exc:  # an unknown scheme, no credentials, a network error: this row fails
        raise RtkError(f"cannot read {uri}: {first_line(exc)}") from None
    if len(data) > MAX_URI_BYTES:
        raise RtkError(f"{uri} has more than {MAX_URI_BYTES} bytes")
    return data


def decode(clf, item: Item) -> np.ndarray | str:
    """The model input for one item, or its error message (the runtime's decode and bounds)."""
    try:
        return clf.model_input(image_source(item))
    except RtkError as exc:
        return str(exc)


def predict_rows(clf, items: Sequence[Item], decoded: Sequence[np.ndarray | str], options: BatchOptions) -> list[dict]:
    """One row per item: top-k (and logits) of those that decoded, the error of those that did not."""
    good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    logits = clf.batch_logits([decoded[i] for i in good]) if good else np.zeros((0, len(clf.classes)))
    rows = [{"index": it.index, "source": it.source, "labels": [], "indices": [], "scores": [], "logits": None,
             "error": d if isinstance(d, str) else None} for it, d in zip(items, decoded)]
    for i, (idx, scores), row_logits in zip(good, clf.top_k(logits, options.top_k), logits):
        rows[i].update(labels=[clf.classes[j] for j in idx], indices=idx, scores=scores,
                       logits=row_logits.astype(np.float32).tolist() if options.logits else None)
    return rows


def row_schema(logits: bool):
    """The columns of every part, whichever engine wrote it."""
    import pyarrow as pa

    fields = [("index", pa.int64()), ("source", pa.string()), ("labels", pa.list_(pa.string())),
              ("indices", pa.list_(pa.int32())), ("scores", pa.list_(pa.float64()))]
    if logits:
        fields.append(("logits", pa.list_(pa.float32())))
    return pa.schema(fields + [("error", pa.string())])


def rows_table(rows: list[dict], logits: bool):
    import pyarrow as pa

    schema = row_schema(logits)
    return pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)


# --- the output folder -------------------------------------------------------------------------------------

def job_record(clf, inputs: Sequence[str | os.PathLike], options: BatchOptions) -> dict[str, Any]:
    """What makes two runs the same job: the model file's bytes, the inputs (absolute) and the row options."""
    return {"format": JOB_FORMAT, "model": clf.path.name, "model_sha256": sha256_file(clf.path),
            "inputs": [str(i) if is_uri(str(i)) else str(Path(i).absolute()) for i in inputs],
            "top_k": options.top_k, "logits": options.logits, "part_rows": options.part_rows}


class OutputFolder:
    """An output folder of one job: its record, the parts already written, and writing new ones atomically."""

    def __init__(self, root: Path, job: dict[str, Any], done: dict[int, str]) -> None:
        self.root, self.job, self.done = root, job, done
        self.job_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def open(cls, root: Path, job: dict[str, Any], inputs: Sequence[str | os.PathLike]) -> OutputFolder:
        """Create `root` for `job`, or reopen it for the same job; refuse anything else in one line."""
        refuse_overlap(root, [("the input", i) for i in inputs if not is_uri(str(i)) and Path(i).exists()],
                       "rtk predict")
        if root.exists() and not root.is_dir():
            raise RtkError(f"the output {root} exists and is not a folder")
        record = root / JOB_FILE
        if record.is_file():
            _check_same_job(record, job)
        elif root.is_dir() and any(root.iterdir()):
            raise RtkError(f"the output {root} is not empty and has no {JOB_FILE}: it is not an rtk batch output; "
                           "choose a new or empty folder")
        else:
            from toolkit.core.fileio import write_json

            root.mkdir(parents=True, exist_ok=True)
            write_json(record, job)
            _fsync_dir(root)
        return cls(root, job, _done_parts(root))

    def part_path(self, number: int, digest: str) -> Path:
        return self.root / f"part-{number:08d}-{digest}.parquet"

    def write(self, number: int, digest: str, table) -> None:
        """Write one whole part: a temp file, fsync, rename, fsync of the folder (a kill leaves no half part)."""
        import pyarrow.parquet as pq

        failures = table.num_rows - table.column("error").null_count
        table = table.replace_schema_metadata({"rtk.job": self.job_id, "rtk.part": str(number),
                                               "rtk.failures": str(failures)})
        with atomic_path(self.part_path(number, digest)) as tmp:
            pq.write_table(table, tmp)
        _fsync_dir(self.root)
        self.done[number] = digest

    def done_counts(self) -> tuple[int, int]:
        """(rows, failed rows) of the parts already written, from their footers."""
        import pyarrow.parquet as pq

        rows = failed = 0
        for number, digest in self.done.items():
            path = self.part_path(number, digest)
            try:
                meta = pq.read_metadata(path)
                failures = int((meta.metadata or {}).get(b"rtk.failures", b"x"))
            except Exception:  # a file named like a part that is not one of ours
                raise RtkError(f"{path} is not a readable part of this job: remove it to predict its rows again") from None
            rows, failed = rows + meta.num_rows, failed + failures
        return rows, failed


def _check_same_job(record: Path, job: dict[str, Any]) -> None:
    try:
        old = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise RtkError(f"{record} is not a readable job record: choose a new or empty output folder") from None
    differs = [k for k in job if not isinstance(old, dict) or old.get(k) != job[k]]
    if differs:
        raise RtkError(f"the output {record.parent} holds parts of a different job ({', '.join(differs)} differ): "
                       "choose another output folder")


def _done_parts(root: Path) -> dict[int, str]:
    """Part number -> sources digest of the parts present; leftovers of a killed write are removed."""
    done: dict[int, str] = {}
    for entry in os.scandir(root):
        if entry.name.startswith(".part-") and entry.name.endswith(".tmp"):
            os.unlink(entry.path)  # atomic_path's temp file of a killed run: never a finished part
            continue
        match = PART_NAME.match(entry.name)
        if not match:
            continue
        number = int(match.group(1))
        if number in done:
            raise RtkError(f"{root} holds two parts numbered {number}: it was written by different inputs")
        done[number] = match.group(2)
    return done


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- splitting the stream into parts -----------------------------------------------------------------------

class PartPlan:
    """Walks the listing once: checks the digests of the parts already done, yields the items still to do,
    and knows each pending part's digest and size once its last item has passed."""

    def __init__(self, folder: OutputFolder, items: Iterator[Item]) -> None:
        self.folder, self.items, self.part_rows = folder, items, folder.job["part_rows"]
        self.digests: dict[int, str] = {}  # pending part -> digest, filled as its items pass
        self.sizes: dict[int, int] = {}

    def pending(self) -> Iterator[Item]:
        number, digest, size = -1, hashlib.sha256(), 0
        for item in self.items:
            part = item.index // self.part_rows
            if part != number:
                self._close(number, digest, size)
                number, digest, size = part, hashlib.sha256(), 0
            digest.update(item.source.encode("utf-8", "surrogatepass") + b"\0")
            size += 1
            if part not in self.folder.done:
                yield item
        self._close(number, digest, size)
        beyond = [n for n in self.folder.done if n > number]
        if beyond:
            raise RtkError(f"{self.folder.root} has part {min(beyond)}, but the inputs now end in part {number}: "
                           "they changed since; choose another output folder")

    def _close(self, number: int, digest, size: int) -> None:
        if number < 0:
            return
        hexdigest = digest.hexdigest()[:16]
        if number in self.folder.done and self.folder.done[number] != hexdigest:
            raise RtkError(f"the inputs of part {number} changed since {self.folder.root} was written: "
                           "choose another output folder")
        if number not in self.folder.done:
            self.digests[number], self.sizes[number] = hexdigest, size


class PartWriter:
    """Collects rows (in input order) and writes each part as soon as all its rows are there."""

    def __init__(self, folder: OutputFolder, plan: PartPlan, logits: bool, progress: Progress | None = None) -> None:
        self.folder, self.plan, self.logits, self.progress = folder, plan, logits, progress
        self.rows: list[dict] = []
        self.number = -1
        self.count = self.failed = 0

    def add(self, rows: Iterable[dict]) -> None:
        for row in rows:
            part = row["index"] // self.plan.part_rows
            if part != self.number:
                self._flush()
                self.number = part
            self.rows.append(row)
            self.count += 1
            self.failed += row["error"] is not None
            if self.plan.sizes.get(part) == len(self.rows):
                self._flush()
        if self.progress:
            self.progress.show(self.count, self.failed)

    def finish(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self.number not in self.plan.sizes or self.plan.sizes[self.number] != len(self.rows):
            raise RuntimeError(f"part {self.number}: {len(self.rows)} rows, expected {self.plan.sizes.get(self.number)}")
        self.folder.write(self.number, self.plan.digests[self.number], rows_table(self.rows, self.logits))
        self.rows = []


class Progress:
    """A one-line progress report (images, failures, img/s) on stderr when it is a terminal; silent otherwise."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.on = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.every_s = every_s

    def show(self, count: int, failed: int) -> None:
        now = time.perf_counter()
        if not self.on or now - self.last < self.every_s:
            return
        self.last = now
        sys.stderr.write(f"\r{count} images, {failed} failed, {count / max(now - self.start, 1e-9):.1f} img/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\n")


# --- the in-process engine ---------------------------------------------------------------------------------

def prepare(clf, inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
            options: BatchOptions) -> tuple[OutputFolder, PartPlan]:
    """The output folder (created or reopened for this job) and the plan of what is left to do."""
    if not inputs:
        raise RtkError("no INPUT given: name image files, folders or a manifest")
    folder = OutputFolder.open(Path(output), job_record(clf, inputs, options), inputs)
    return folder, PartPlan(folder, iter_items(inputs))


def run_local(clf, inputs: Sequence[str | os.PathLike], output: str | os.PathLike, options: BatchOptions,
              decoders: int | None = None) -> BatchResult:
    """Predict every input with `clf` in this process, decoding on `decoders` threads ahead of inference."""
    start = time.perf_counter()
    folder, plan = prepare(clf, inputs, output, options)
    result = BatchResult(Path(output))
    result.done_rows, result.done_failed = folder.done_counts()
    progress = Progress()
    writer = PartWriter(folder, plan, options.logits, progress)
    threads = decoders or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="rtk-decode") as pool:
        for batch, decoded in decoded_batches(clf, plan.pending(), pool, options.batch_size, depth=2 + threads):
            writer.add(predict_rows(clf, batch, decoded, options))
    writer.finish()
    progress.close()
    result.rows, result.failed, result.seconds = writer.count, writer.failed, time.perf_counter() - start
    return result


def decoded_batches(clf, items: Iterator[Item], pool: ThreadPoolExecutor, batch_size: int,
                    depth: int) -> Iterator[tuple[list[Item], list[np.ndarray | str]]]:
    """Batches of items with their decoded inputs, in order. Up to `depth` batches are decoding on the pool
    while the caller runs the model on the oldest (Pillow releases the GIL): memory is bounded by `depth`."""
    queued: deque[tuple[list[Item], list[Future]]] = deque()
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            queued.append((batch, [pool.submit(decode, clf, it) for it in batch]))
            batch = []
            if len(queued) >= depth:
                yield _ready(queued.popleft())
    if batch:
        queued.append((batch, [pool.submit(decode, clf, it) for it in batch]))
    while queued:
        yield _ready(queued.popleft())


def _ready(entry: tuple[list[Item], list[Future]]) -> tuple[list[Item], list[np.ndarray | str]]:
    batch, futures = entry
    return batch, [f.result() for f in futures]
