"""Batch prediction (`rtk predict --output`): the model's own batch throughput against the in-process job and
Ray Data with 1 and 2 actors, and the job's peak RSS as the image count grows.

    python benchmarks/batch_predict.py BUNDLE IMAGES [--images 2000] [--batch-size 32] [--threads N]
    python benchmarks/batch_predict.py BUNDLE IMAGES --rss-at 10000 --rss-at 50000   # memory flatness only

IMAGES is a folder; its images are repeated in a .txt manifest up to `--images` rows. Every configuration
runs `python -m toolkit predict ... --output` in a fresh process (and a fresh local Ray cluster) twice, on
a quarter of the images and on all: img/s is (images - a quarter) / (difference of the two walls), so the
start-up cancels out; start-up is the short run's wall less its images at that rate. Peak RSS is the
process tree's (driver, raylet, actors) sampled every 0.1 s. The model's own throughput is
`Classifier.logits` on ready-made crops at the same batch size and threads (no decode, no writing).
"ms per image over in-process" is what the engine adds per image once started.

Writes benchmarks/results/batch_predict-<model>-<cpu tag>.md, the CPU named in its header.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.core.hardware import cpu_info, usable_cpus  # noqa: E402
from toolkit.serving.batch import walk_images  # noqa: E402
from toolkit.serving.classifier import Classifier  # noqa: E402


def manifest(images: Path, count: int, folder: Path) -> Path:
    """A .txt manifest of `count` rows repeating the images under `images`."""
    names = [str(p) for p in walk_images(images)]
    if not names:
        raise SystemExit(f"no images under {images}")
    path = folder / f"list-{count}.txt"
    path.write_text("\n".join(names[i % len(names)] for i in range(count)) + "\n")
    return path


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_job(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the process tree, summary line) of one `rtk predict --output` run."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "predict", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"rtk predict {' '.join(args)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, peak[0], out.strip().splitlines()[-1]


def model_throughput(bundle: str, batch: int, threads: int, seconds: float = 10.0) -> float:
    """img/s of Classifier.logits alone on random crops of the bundle's size."""
    clf = Classifier.load(bundle, threads=threads)
    crops = np.random.default_rng(0).integers(0, 256, (batch, clf.spec.crop_size, clf.spec.crop_size, 3), np.uint8)
    for _ in range(3):
        clf.logits(crops)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        clf.logits(crops)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def configurations(threads: int) -> list[tuple[str, list[str]]]:
    """(name, extra options) per engine; Ray keeps one CPU of the local cluster for its read tasks."""
    cpus = usable_cpus()
    rows = [("in-process", ["--threads", str(threads)])]
    for actors in (1, 2):
        per_actor = max(1, (cpus - 1) // actors)
        if actors * per_actor >= cpus:
            rows.append((f"ray, {actors} actors", []))  # refused by the CPU-budget check: recorded as such
            continue
        rows.append((f"ray, {actors} actor{'s' * (actors > 1)} x {per_actor} CPUs",
                     ["--engine", "ray", "--workers", str(actors), "--threads", str(per_actor)]))
    return rows


def throughput_table(args, work: Path) -> list[str]:
    small, large = args.count // 4, args.count
    lists = {n: manifest(args.images, n, work) for n in (small, large)}
    model = model_throughput(args.bundle, args.batch_size, args.threads)
    lines = ["| engine | img/s | vs model alone | vs in-process | start-up s | wall s | peak RSS MB | "
             "ms per image over in-process |", "|---|---|---|---|---|---|---|---|",
             f"| model alone (`Classifier.logits`, batch {args.batch_size}, {args.threads} threads) | {model:.1f} | "
             "1.00 | - | - | - | - | - |"]
    local_rate = None
    for name, options in configurations(args.threads):
        if not options:
            lines.append(f"| {name} | refused: actors x CPUs would take all {usable_cpus()} CPUs | | | | | | |")
            continue
        walls, rss, summary = {}, 0, ""
        for n in (small, large):
            walls[n], peak, summary = run_job([args.bundle, str(lists[n]), "--batch-size", str(args.batch_size),
                                               *options, "--output", str(work / f"out-{len(lines)}-{n}")])
            rss = max(rss, peak)
        rate = (large - small) / (walls[large] - walls[small])  # the start-up cancels out
        startup = walls[small] - small / rate
        local_rate = local_rate or rate
        lines.append(f"| {name} | {rate:.1f} | {rate / model:.2f} | {rate / local_rate:.2f} | {startup:.1f} | "
                     f"{walls[large]:.1f} | {rss / 2**20:.0f} | {1e3 / rate - 1e3 / local_rate:+.2f} |")
        print(name, summary, flush=True)
    return lines


def rss_table(args, work: Path) -> list[str]:
    lines = ["| images | wall s | peak RSS MB |", "|---|---|---|"]
    for count in args.rss_at:
        wall, rss, summary = run_job([args.bundle, str(manifest(args.images, count, work)), "--batch-size",
                                      str(args.batch_size), "--threads", str(args.threads),
                                      "--output", str(work / f"rss-{count}")])
        lines.append(f"| {count} | {wall:.1f} | {rss / 2**20:.0f} |")
        print(count, summary, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("images", type=Path)
    parser.add_argument("--images", dest="count", type=int, default=2000, help="rows of the timed runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--rss-at", type=int, action="append", default=[], help="only measure RSS at these counts")
    parser.add_argument("--name", default="resnet50", help="the model, for the results file's name")
    parser.add_argument("--tag", default=None, help="the machine [toolkit.core.hardware's CPU tag]")
    args = parser.parse_args()
    # the manifests live in a temporary folder, and a manifest's relative paths are relative to it
    args.images, args.bundle = args.images.resolve(), str(Path(args.bundle).resolve())
    cpu = cpu_info()
    work = Path(tempfile.mkdtemp(prefix="rtk-batch-bench-"))
    try:
        if args.rss_at:
            what, table = "peak RSS of the in-process job against the image count", rss_table(args, work)
        else:
            what, table = (f"{args.name}, {args.count} images, batch {args.batch_size}",
                           throughput_table(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/batch_predict.py " + " ".join(sys.argv[1:])
    lines = [f"# Batch prediction: {what}", "",
             f"CPU: {cpu.name}, {cpu.usable_cpus} usable CPUs ({cpu.logical_cpus} logical). Bundle `{args.bundle}`, "
             f"images from `{args.images}` repeated in a manifest. `{command}`", "", *table, ""]
    kind = "rss" if args.rss_at else args.name
    out = ROOT / "benchmarks" / "results" / f"batch_predict-{kind}-{args.tag or cpu.tag}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
