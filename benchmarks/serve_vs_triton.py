"""`rtk serve` and the CPU Triton (2.51.0, onnxruntime backend) side by side on the same bundle, in one run.

    python benchmarks/serve_vs_triton.py BUNDLE [--rounds 3] [--seconds 8] [--clients 8] [--threads N] [--tag NAME]

Both servers run the same ONNX file (what `rtk triton --device cpu` picks: the recommended ONNX file, else
model.onnx) with dynamic batching (max batch 8, 2 ms queue delay) and the same onnxruntime thread count, on
127.0.0.1. Each round times both, in alternating order: round-trip p50/p99 of one batch-1 client, then img/s
with N concurrent batch-1 clients (tritonclient HTTP, binary tensors, the same request for both).
Needs the CPU Triton (`make triton`). Writes benchmarks/results/serve_vs_triton-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import Server, closed_loop  # noqa: E402

from tests.triton_local import TritonServer, rss_mb, triton_problem  # noqa: E402
from toolkit.core.hardware import cpu_info  # noqa: E402
from toolkit.core.tables import render  # noqa: E402
from toolkit.serving.classifier import Classifier  # noqa: E402

MAX_BATCH, DELAY_MS = 8, 2


def repository(bundle: str, root: Path, threads: int) -> Path:
    """`rtk triton` of the bundle as model "model", with onnxruntime's intra-op threads set like rtk serve's."""
    repo = root / "repo"
    subprocess.run([sys.executable, "-m", "toolkit", "triton", bundle, "--output", str(repo), "--name", "model",
                    "--device", "cpu", "--max-batch-size", str(MAX_BATCH), "--threads", str(threads)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return repo


def round_of(url: str, clients: int, seconds: float, image: np.ndarray) -> dict:
    single = closed_loop(url, 1, seconds, image)
    many = closed_loop(url, clients, seconds, image)
    return {"p50_ms": single["p50_ms"], "p99_ms": single["p99_ms"], "img_per_s": many["img_per_s"],
            "errors": single["errors"] + many["errors"], "p50_ms_loaded": many["p50_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    if triton_problem():
        sys.exit(f"serve_vs_triton: {triton_problem()}")
    cpu = cpu_info()
    tag = args.tag or cpu.tag
    with tempfile.TemporaryDirectory() as tmp:
        repo = repository(args.bundle, Path(tmp), args.threads)
        served = (repo / "model" / "1" / "model.onnx").read_bytes()
        file = next(p.name for p in Path(args.bundle).glob("*.onnx") if p.read_bytes() == served)
        crop = Classifier.load(Path(args.bundle) / file, threads=1).spec.crop_size
        image = np.random.default_rng(0).integers(0, 256, (1, crop, crop, 3), dtype=np.uint8)
        rtk = Server(str(Path(args.bundle) / file), args.threads, max_batch_size=MAX_BATCH, max_queue_delay_ms=DELAY_MS,
                     max_queue=256)
        rtk_rss = rss_mb(rtk.proc.pid)
        with TritonServer(repo, Path(tmp) / "triton.log") as triton:
            triton_rss = triton.rss_mb()
            targets = {"rtk serve": rtk.url, "Triton": triton.http}
            for url in targets.values():  # warm both: first requests allocate arenas
                closed_loop(url, args.clients, 2, image)
            rounds: dict[str, list[dict]] = {name: [] for name in targets}
            for r in range(args.rounds):
                order = list(targets) if r % 2 == 0 else list(targets)[::-1]
                for name in order:
                    rounds[name].append(round_of(targets[name], args.clients, args.seconds, image))
            triton_ready = triton.ready_seconds
        rtk.stop()
    report = {"cpu": cpu.to_dict(), "bundle": args.bundle, "file": file, "crop_size": crop, "threads": args.threads,
              "clients": args.clients, "seconds": args.seconds, "rounds": rounds,
              "ready_seconds": {"rtk serve": rtk.ready_seconds, "Triton": triton_ready},
              "rss_mb_at_ready": {"rtk serve": rtk_rss, "Triton": triton_rss}}
    write(report, tag, args)


def median(rounds: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rounds]))


def write(report: dict, tag: str, args) -> None:
    out = ROOT / "benchmarks" / "results"
    (out / f"serve_vs_triton-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    rounds = report["rounds"]
    rows = [[name, f"{median(r, 'p50_ms'):.2f}", f"{median(r, 'p99_ms'):.2f}", f"{median(r, 'img_per_s'):.1f}",
             f"{median(r, 'p50_ms_loaded'):.1f}", str(sum(x["errors"] for x in r)),
             f"{report['ready_seconds'][name]:.2f}", f"{report['rss_mb_at_ready'][name]:.0f}"] for name, r in rounds.items()]
    ratio = [a["img_per_s"] / b["img_per_s"] for a, b in zip(rounds["rtk serve"], rounds["Triton"])]
    gap = [a["p50_ms"] - b["p50_ms"] for a, b in zip(rounds["rtk serve"], rounds["Triton"])]
    cpu = report["cpu"]
    md = [f"# rtk serve vs Triton 2.51.0 (CPU, onnxruntime backend): {Path(report['bundle']).name}/{report['file']}, "
          f"{report['crop_size']} px", "",
          f"CPU: {cpu['name']} ({cpu['usable_cpus']} usable CPUs); onnxruntime intra-op threads {report['threads']} in "
          f"both; dynamic batching in both (max batch {MAX_BATCH}, {DELAY_MS} ms queue delay); {args.rounds} rounds of "
          f"{args.seconds:g} s per measurement, alternating which server goes first; servers and clients on one "
          f"machine (127.0.0.1). Medians over rounds. `python benchmarks/serve_vs_triton.py {report['bundle']}`.", "",
          render(["server", "b1 p50 ms", "b1 p99 ms", f"img/s, {args.clients} clients", f"p50 ms, {args.clients} clients",
                  "errors", "ready s", "RSS MB at ready"], rows, "markdown"), "",
          f"- rtk serve / Triton img/s at {args.clients} clients, per round: "
          + ", ".join(f"{x:.2f}x" for x in ratio) + f" (median **{float(np.median(ratio)):.2f}x**)",
          "- rtk serve p50 minus Triton p50 at batch 1, per round: " + ", ".join(f"{x:+.2f} ms" for x in gap)
          + f" (median **{float(np.median(gap)):+.2f} ms**)"]
    (out / f"serve_vs_triton-{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
