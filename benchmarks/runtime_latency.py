"""Latency of `Classifier.predict` on one JPEG with the torch-free runtime, split by stage.

    python benchmarks/runtime_latency.py BUNDLE [IMAGE] [--repeats 50] [--threads N]

Stages: decode (PIL open + EXIF transpose + RGB), resize + center crop, onnxruntime inference,
and the whole `predict` call (which also does softmax and top-k). Median of `repeats` runs each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from toolkit.core.preprocess import center_crop, open_image, resize_shorter
from toolkit.serving.classifier import Classifier


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("image", nargs="?", default=None, help="a JPEG [scikit-learn's china.jpg]")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    image = args.image
    if image is None:
        from sklearn.datasets import load_sample_images

        image = load_sample_images().filenames[0]
    start = time.perf_counter()
    clf = Classifier.load(args.bundle, threads=args.threads)
    load_s = time.perf_counter() - start
    spec = clf.spec
    data = Path(image).read_bytes()
    decoded = open_image(data)
    crop = np.asarray(center_crop(resize_shorter(decoded, spec.resize_size, spec.interpolation), spec.crop_size))[None]
    rows = {
        "decode (JPEG -> RGB)": median_ms(lambda: open_image(data), args.repeats),
        "resize + center crop": median_ms(lambda: center_crop(resize_shorter(decoded, spec.resize_size, spec.interpolation),
                                                              spec.crop_size).tobytes(), args.repeats),
        "inference (onnxruntime)": median_ms(lambda: clf.logits(crop), args.repeats),
    }
    total = median_ms(lambda: clf.predict([data]), args.repeats)
    print(f"model {clf.path} ({clf.precision}), {Path(image).name} {decoded.size[0]}x{decoded.size[1]}, "
          f"providers {clf.providers}, session load {load_s:.2f}s")
    print("| stage | median ms | share |\n|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {100 * ms / total:.0f}% |")
    print(f"| **predict() total** | **{total:.2f}** | 100% |")


if __name__ == "__main__":
    main()
