"""Data stage: the built-in digits dataset, ImageFolder discovery and splitting, torch datasets."""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.core.fileio import atomic_write, check_writable_dir
from toolkit.core.preprocess import IMAGE_EXTENSIONS, open_image
from toolkit.errors import RtkError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass(frozen=True)
class DatasetSplit:
    """Train and val samples of one ImageFolder, classes in ImageFolder order (sorted names)."""

    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    skipped: tuple[str, ...] = ()


def write_digits(out: str | Path, size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write scikit-learn's UCI handwritten digits (1,797 8x8 images) as an RGB ImageFolder."""
    if size < 8:
        raise RtkError("--size must be at least 8 (the digits are 8x8)")
    if not 0 < val_fraction < 1:
        raise RtkError("--val-fraction must be between 0 and 1")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RtkError("the digits need scikit-learn: pip install -e '.[demo]'") from None
    out = Path(out)
    check_writable_dir(out)
    digits = load_digits()
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = [i for i, t in enumerate(digits.target) if t == label]
        rng.shuffle(indices)
        n_val = max(1, round(len(indices) * val_fraction))
        for rank, i in enumerate(indices):
            split = "val" if rank < n_val else "train"
            pixels = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            target = out / split / str(label) / f"{i:04d}.png"
            atomic_write(target, lambda p, img=img: img.save(p, format="PNG"))
            counts[split] += 1
    return counts


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _check_decodable(paths: list[Path], strict: bool, workers: int = 4) -> tuple[list[Path], list[str]]:
    """Keep files that decode; a bad one is a warning naming it, or an error under `strict`."""

    def bad(path: Path) -> str | None:
        try:
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (64, 64))  # decode at reduced scale: still reads every byte
                img.load()
            return None
        except Exception as exc:
            return f"{path}: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(bad, paths))
    skipped = [r for r in reasons if r]
    if skipped and strict:
        raise RtkError(f"undecodable image (--strict): {skipped[0]}" + (f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""))
    for reason in skipped:
        log.warning("skipping undecodable image %s", reason)
    return [p for p, r in zip(paths, reasons) if r is None], skipped


def _scan(root: Path, classes: list[str] | None, strict: bool) -> tuple[list[str], list[Sample], list[str]]:
    dirs = _class_dirs(root)
    if not dirs:
        raise RtkError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    names = [d.name for d in dirs]
    if classes is not None and names != classes:
        raise RtkError(f"{root} has classes {names}, but train has {classes}")
    samples, skipped = [], []
    for label, d in enumerate(dirs):
        good, bad = _check_decodable(_files(d), strict)
        skipped += bad
        if not good:
            raise RtkError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [Sample(p, label) for p in good]
    return names, samples, skipped


def discover(data: str | Path, val_split: float = 0.2, seed: int = 0, strict: bool = False) -> DatasetSplit:
    """Read DATA/train + DATA/val, or one folder of class folders split (seeded, stratified)."""
    root = Path(data)
    if not root.is_dir():
        raise RtkError(f"data folder not found: {root}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train, skipped = _scan(root / "train", None, strict)
        _, val, skipped_val = _scan(root / "val", classes, strict)
        skipped += skipped_val
    else:
        if not 0 < val_split < 1:
            raise RtkError("--val-split must be between 0 and 1")
        classes, samples, skipped = _scan(root, None, strict)
        rng = random.Random(seed)
        train, val = [], []
        for label in range(len(classes)):
            members = [s for s in samples if s.label == label]
            rng.shuffle(members)
            n_val = min(len(members) - 1, max(1, round(len(members) * val_split))) if len(members) > 1 else 0
            val += members[:n_val]
            train += members[n_val:]
        if not val:
            raise RtkError(f"{root}: too few images to hold out a validation split")
    if len(classes) < 2:
        raise RtkError(f"{root} has a single class ({classes[0]}): a classifier needs at least two")
    return DatasetSplit(tuple(classes), tuple(train), tuple(val), tuple(skipped))


class ImageDataset:
    """A torch-style dataset over samples; decoding (EXIF, any mode to RGB) is `open_image`'s."""

    def __init__(self, samples: tuple[Sample, ...], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        return self.transform(open_image(sample.path, max_pixels=None)), sample.label
