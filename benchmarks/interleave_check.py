"""Does interleaving make ratios between runtimes steadier? The same `rtk benchmark` run N times one
runtime after the other, and N times in interleaved rounds; the spread of the ratio ort-cpu / eager across
the N runs of each mode, on a quiet host and with a noisy neighbour (a process that burns one CPU in
bursts of random length, stopping on its own).

    python benchmarks/interleave_check.py BUNDLE [--repeats 5] [--tag NAME]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.core.hardware import cpu_info  # noqa: E402
from toolkit.core.tables import render  # noqa: E402
from toolkit.evaluation.benchmark import BenchConfig, run_benchmark  # noqa: E402


def neighbour(seconds: float, seed: int) -> None:
    """Busy for 0.2-2 s, idle for 0.2-2 s, until `seconds` have passed."""
    rng = np.random.default_rng(seed)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        busy_until = min(end, time.monotonic() + rng.uniform(0.2, 2.0))
        while time.monotonic() < busy_until:
            sum(range(10_000))
        time.sleep(rng.uniform(0.2, 2.0))


def ratios(bundle: str, interleave: bool, repeats: int, threads: int, min_seconds: float) -> list[float]:
    out = []
    for i in range(repeats):
        config = BenchConfig(runtimes=("eager", "ort-cpu"), batch_sizes=(1,), warmup=5, iterations=20,
                             min_seconds=min_seconds, threads=threads, interleave=interleave, rounds=10, seed=i)
        report = run_benchmark(bundle, config, echo=lambda s: None)
        [ort] = [r for r in report["results"] if r["runtime"] == "ort-cpu" and r["artifact"] == "model.onnx"
                 and "batch_size" in r]
        out.append(ort["speedup_vs_eager"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    cpu = cpu_info()
    tag = args.tag or cpu.tag
    rows = []
    for host in ("quiet", "noisy neighbour"):
        for interleave in (False, True):
            proc = None
            if host != "quiet":
                proc = mp.Process(target=neighbour, args=(3600.0, 7), daemon=True)
                proc.start()
            try:
                r = ratios(args.bundle, interleave, args.repeats, args.threads, args.min_seconds)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.join(5)
            med = float(np.median(r))
            rows.append([host, "interleaved (10 rounds)" if interleave else "one after the other", f"{med:.2f}x",
                         f"{min(r):.2f}x - {max(r):.2f}x", f"{100 * (max(r) - min(r)) / med:.1f}%",
                         ", ".join(f"{x:.2f}" for x in r)])
            print(rows[-1], flush=True)
    md = [f"# Ratio stability: ort-cpu / eager p50 at batch 1, {args.repeats} runs per mode",
          "", f"CPU: {cpu.name} ({cpu.usable_cpus} usable CPUs); bundle {Path(args.bundle).name}; {args.threads} thread(s); "
          f"{args.min_seconds:g} s of timing per runtime per run. `python benchmarks/interleave_check.py {args.bundle} --threads {args.threads}`. "
          "The noisy neighbour burns one CPU in bursts of 0.2-2 s with 0.2-2 s pauses.", "",
          render(["host", "timing", "median ratio", "range", "spread (max-min)/median", "each run"], rows, "markdown")]
    out = ROOT / "benchmarks" / "results" / f"interleave-{tag}.md"
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
