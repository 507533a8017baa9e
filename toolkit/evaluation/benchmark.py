"""Benchmark stage: latency and throughput of every runtime through the one Runner interface.

Method (see benchmarks/README.md): the same uint8 batch goes to every runtime; `warmup` untimed
calls; then timed calls until both `iterations` and `min_seconds` are reached; each call is timed
with time.perf_counter and returns host arrays (CUDA runners synchronise before returning), so
every figure includes the same work. torch and onnxruntime get the same thread count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.bundle import Bundle
from toolkit.core.fileio import write_json, write_text
from toolkit.core.hardware import usable_cpus
from toolkit.core.tables import render
from toolkit.errors import RtkError, first_line
from toolkit.evaluation.env import environment
from toolkit.evaluation.runners.torch_runner import keeps_torch_threads

UNSTABLE_CV = 0.10
# onnxruntime's and OpenMP's worker threads spin for a while after a call; in interleaved rounds the next
# runtime would share the cores with them
SETTLE_S = 0.02
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class BenchConfig:
    runtimes: tuple[str, ...] | None = None
    device: str | None = None  # only runtimes on this device; unavailable ones are skipped, not errors
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 10
    iterations: int = 50
    min_seconds: float = 2.0
    threads: int | None = None
    sweep: bool = False
    cuda_graph: bool = False
    seed: int = 0
    any_size_input: tuple[int, int] = (640, 480)  # width, height of the whole images an any-size file gets
    # Interleaved timing: `rounds` rounds, each running every (runtime, batch) in a new shuffled order, so a
    # slowdown of the host hits all alike (Google Benchmark's random interleaving). False: one runtime after
    # the other, each timed in one block.
    interleave: bool = True
    rounds: int = 10
    allow_native_code: bool = False  # load AOTInductor packages (compiled native code)
    artifacts: tuple[str, ...] | None = None  # only these bundle files (the checkpoint's runtimes always run)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise RtkError("--batch-size values must be at least 1")
        if self.warmup < 0 or self.iterations < 1 or self.min_seconds < 0:
            raise RtkError("--warmup must be >= 0, --iterations >= 1, --min-seconds >= 0")
        if self.threads is not None and self.threads < 1:
            raise RtkError("--threads must be at least 1")
        if self.rounds < 1:
            raise RtkError("--rounds must be at least 1")
        if min(self.any_size_input) < 1:
            raise RtkError("--any-size-input must be WIDTHxHEIGHT with both at least 1")
        if self.cuda_graph and (len(self.batch_sizes) != 1 or self.sweep):
            raise RtkError("--cuda-graph captures one input shape: give exactly one --batch-size and no --sweep")

    @property
    def thread_count(self) -> int:
        return self.threads or usable_cpus()


def latency_stats(seconds: list[float], batch: int) -> dict[str, float]:
    """Summary of per-call latencies (ms), throughput from the mean, and the coefficient of variation."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    p = np.percentile(ms, [50, 90, 95, 99])
    return {
        "iterations": len(ms), "mean_ms": mean, "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "min_ms": float(ms.min()), "p50_ms": float(p[0]), "p90_ms": float(p[1]), "p95_ms": float(p[2]),
        "p99_ms": float(p[3]), "max_ms": float(ms.max()), "images_per_second": batch * 1e3 / mean,
        "cv": (float(ms.std(ddof=1)) / mean if len(ms) > 1 and mean > 0 else 0.0),
    }


def time_runner(call: Callable[[Any], Any], prepared: Any, warmup: int, iterations: int, min_seconds: float) -> list[float]:
    for _ in range(warmup):
        call(prepared)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < iterations or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        call(prepared)
        samples.append(time.perf_counter() - t0)
    return samples


@keeps_torch_threads
def run_benchmark(bundle_path: str | Path, config: BenchConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure each (runtime, artifact) at each batch size; returns {environment, config, results}.

    Runtimes run one at a time: loaded, measured, released, so each one's peak memory is its own. A
    runtime that cannot exist here is skipped; an artifact that cannot be loaded is a failure."""
    import torch

    from toolkit.evaluation.runners import each_loaded

    bundle = Bundle.open(bundle_path)
    threads = config.thread_count
    torch.set_num_threads(threads)
    inputs = _BenchInputs.of(bundle.manifest.preprocess, config)
    results: list[dict[str, Any]] = []
    later: list[tuple[Any, dict[int, np.ndarray], dict[str, Any]]] = []  # loaded once, timed together afterwards
    for entry in each_loaded(_entries(bundle, config, threads)):
        results.extend(_measure(entry, bundle, inputs, config, threads, later, echo))
    if later:
        results.extend(interleaved(later, config, echo))
    add_speedups(results)
    mark_recommended(results, bundle.manifest.recommended)
    env = environment()
    env["threads"] = {"requested": threads, "torch": torch.get_num_threads(), "onnxruntime_intra_op": threads,
                      "onnxruntime_inter_op": 1}
    return {"environment": env, "config": asdict(config), "bundle": str(bundle.root),
            "arch": bundle.manifest.arch, "image_size": bundle.manifest.preprocess.crop_size, "results": results,
            "recommended": bundle.manifest.recommended.to_dict() if bundle.manifest.recommended else None,
            "passed": not any(r.get("failed") for r in results)}


def _entries(bundle: Bundle, config: BenchConfig, threads: int) -> list[Any]:
    """The runners to time: the runtimes asked for (all on the device, or all) with this bundle's files."""
    from toolkit.evaluation.runners import RunOptions, plan, require_named, runtimes_on
    from toolkit.training.checkpoint import source_from_manifest

    options = RunOptions(threads=threads, tf32=False, cuda_graph=config.cuda_graph, native_code=config.allow_native_code)
    named = list(config.runtimes) if config.runtimes else None

    def reference():
        return source_from_manifest(bundle.manifest)[0], bundle.manifest.preprocess

    entries = plan(bundle, runtimes_on(config.device, named) if config.device else named, reference, options)
    require_named(entries, named)
    entries += _recommended_variant(bundle, config, options, reference)
    if config.artifacts is None:
        return entries
    missing = sorted(set(config.artifacts) - set(bundle.files))
    if missing:
        raise RtkError(f"--artifact {', '.join(missing)}: not in the bundle (it has {', '.join(bundle.files)})")
    return [e for e in entries if e.artifact == "checkpoint" or e.artifact in config.artifacts]


def _recommended_variant(bundle: Bundle, config: BenchConfig, options, reference) -> list[Any]:
    """The runner `rtk optimize` recommended, when its session is one of its engine's variants (not the
    runtime's default session, which the plan already has): so the recommendation is timed with the rest."""
    from toolkit.evaluation.runners import plan

    rec = bundle.manifest.recommended
    if rec is None or rec.session is None or config.device not in (None, rec.device):
        return []
    if config.runtimes and rec.runtime not in config.runtimes:
        return []
    # the engine's own settings; the stage sets threads, TF32, CUDA graphs and the TensorRT cache itself
    stage = ("engine", "device", "threads", "tf32", "cuda_graph", "trt_cache")
    variant = tuple((k, v) for k, v in rec.session.items() if k not in stage)
    entries = [e for e in plan(bundle, [rec.runtime], reference, replace(options, session=variant))
               if e.artifact == rec.artifact]
    default = [e for e in plan(bundle, [rec.runtime], reference, options) if e.artifact == rec.artifact]
    same = [getattr(e, "settings", None) for e in default] == [getattr(e, "settings", None) for e in entries]
    return [] if same else entries


def mark_recommended(results: list[dict[str, Any]], recommended) -> None:
    """Flag the records of the runner `rtk optimize` recommended (the same runtime, file and session, threads
    aside): the table marks them, so a reader sees the recommendation among every runtime of one run."""
    if recommended is None:
        return
    wanted = _session_key(recommended.session)
    for r in results:
        if (r["runtime"], r["artifact"]) == (recommended.runtime, recommended.artifact) and not r["skipped"]:
            r["recommended"] = _session_key(r.get("session")) == wanted


def _session_key(session: dict[str, Any] | None) -> dict[str, Any] | None:
    """A session's settings as one engine reads them, threads aside (a record may leave defaults out)."""
    from toolkit.serving.sessions import SessionSettings

    if session is None:
        return None
    return SessionSettings.from_dict({**session, "threads": None}).trimmed().to_dict()


@dataclass(frozen=True)
class _BenchInputs:
    """Seeded random uint8 batches at every batch size: crops, and whole images for any-size files."""

    crops: dict[int, np.ndarray]
    whole: dict[int, np.ndarray]
    crop_label: str
    whole_label: str

    @classmethod
    def of(cls, spec, config: BenchConfig) -> _BenchInputs:
        rng = np.random.default_rng(config.seed)
        sizes = sorted(set(config.batch_sizes) | (set(SWEEP_BATCHES) if config.sweep else set()))
        crops = {b: rng.integers(0, 256, (b, spec.crop_size, spec.crop_size, 3), dtype=np.uint8) for b in sizes}
        width, height = config.any_size_input
        whole = {b: rng.integers(0, 256, (b, height, width, 3), dtype=np.uint8) for b in sizes}
        return cls(crops, whole, f"{spec.crop_size}x{spec.crop_size} crop", f"{width}x{height} image, resized in the graph")


def _measure(entry, bundle: Bundle, inputs: _BenchInputs, config: BenchConfig, threads: int,
             later: list[tuple[Any, dict[int, np.ndarray], dict[str, Any]]], echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """One loaded runner's records: its skip or failure, or its cold start and memory and, unless timed later
    with the others (`later`), its latency at each batch size."""
    from toolkit.evaluation.runners import Failed, Skipped

    any_size = bundle.any_size(entry.artifact)
    batches = inputs.whole if any_size else inputs.crops
    base = {"runtime": entry.runtime, "artifact": entry.artifact, "precision": entry.precision,
            "input": inputs.whole_label if any_size else inputs.crop_label}
    if isinstance(entry, (Skipped, Failed)):
        failed = isinstance(entry, Failed)
        echo(f"{entry.runtime:<19} {entry.artifact:<16} {'FAILED' if failed else 'skipped'}: {entry.reason}")
        return [{**base, "skipped": not failed, "failed": failed, "reason": entry.reason}]
    start = time.perf_counter()
    try:
        entry(batches[min(batches)])  # the first result: cold start ends here (load time is in entry.details)
    except Exception as exc:
        echo(f"{entry.runtime:<19} {entry.artifact:<16} FAILED: {first_line(exc)}")
        return [{**base, "skipped": False, "failed": True, "reason": f"{entry.artifact}: {first_line(exc)}"}]
    cold = entry.load_seconds + time.perf_counter() - start
    settings = getattr(entry, "settings", None)  # a serving engine's session: what a recommendation names
    measured = {**base, "cold_start_s": cold, "threads": threads, "skipped": False, "failed": False,
                "session": settings.to_dict() if settings is not None else None}
    measured.update(_cuda_peak(entry, batches, config))
    measured.update(**entry.memory.to_dict(), details=dict(entry.details))
    records = []
    if config.interleave:  # timed afterwards, with every other runtime, in shuffled rounds
        later.append((entry, batches, measured))
    else:
        for b in config.batch_sizes:
            samples = time_runner(entry.run_prepared, entry.prepare(batches[b]), config.warmup, config.iterations,
                                  config.min_seconds)
            record = {**measured, "batch_size": b, **latency_stats(samples, b)}
            record["unstable"] = record["cv"] > UNSTABLE_CV
            records.append(record)
            echo(_row(record))
    if config.sweep:
        records.extend(sweep(entry, batches, config, echo))
    return records


def _cuda_peak(entry, batches: dict[int, np.ndarray], config: BenchConfig) -> dict[str, float]:
    """Device memory of a CUDA runtime alone, at every batch size; nothing for a CPU one."""
    from toolkit.evaluation.runners import runtime

    if runtime(entry.runtime).device != "cuda":
        return {}
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for b in config.batch_sizes:
        entry.run_prepared(entry.prepare(batches[b]))
    return {"cuda_peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def sweep(runner, batches: dict[int, np.ndarray], config: BenchConfig, echo) -> list[dict[str, Any]]:
    """Try thread counts x batch sizes for one runtime; report its best latency and best throughput."""
    import torch

    from toolkit.evaluation.runners import each_loaded, with_options

    counts = sorted({t for t in (1, 2, 4, 8, 16, 32, usable_cpus()) if t <= usable_cpus()})
    trials = []
    for threads in counts:
        torch.set_num_threads(threads)
        for r in each_loaded([with_options(runner, threads=threads, profile_placement=False)]):
            for b in SWEEP_BATCHES:
                samples = time_runner(r.run_prepared, r.prepare(batches[b]), max(2, config.warmup // 2),
                                      max(5, config.iterations // 4), config.min_seconds / 4)
                trials.append({"threads": threads, "batch_size": b, **latency_stats(samples, b)})
    torch.set_num_threads(config.thread_count)
    best_latency = min(trials, key=lambda t: t["p50_ms"])
    best_throughput = max(trials, key=lambda t: t["images_per_second"])
    echo(f"{runner.runtime:<19} {runner.artifact:<16} sweep: best latency {best_latency['p50_ms']:.2f} ms "
         f"(batch {best_latency['batch_size']}, {best_latency['threads']} threads); best throughput "
         f"{best_throughput['images_per_second']:.1f} img/s (batch {best_throughput['batch_size']}, {best_throughput['threads']} threads)")
    return [{"runtime": runner.runtime, "artifact": runner.artifact, "precision": runner.precision, "sweep": True,
             "skipped": False, "best_latency": best_latency, "best_throughput": best_throughput, "trials": trials}]


def interleaved(later: list[tuple[Any, dict[int, np.ndarray], dict[str, Any]]], config: BenchConfig,
                echo) -> list[dict[str, Any]]:
    """Time every (runner, batch) in `config.rounds` rounds, each round in a new shuffled order; each record
    keeps all its samples' statistics and its median per round (for the spread of ratios). Records come back
    in the order of `later`, then of the batch sizes."""
    rng = np.random.default_rng(config.seed)
    calls = max(3, -(-config.iterations // config.rounds))
    warmup = max(1, -(-config.warmup // config.rounds))  # after switching runtimes, caches are cold again
    seconds = config.min_seconds / config.rounds
    pairs = [(i, b) for i in range(len(later)) for b in config.batch_sizes]
    samples: dict[tuple[int, int], list[float]] = {pair: [] for pair in pairs}
    medians: dict[tuple[int, int], list[float]] = {pair: [] for pair in pairs}
    runners = [entry for entry, _, _ in later]
    for r in runners:
        r.load()
    try:
        for _ in range(config.rounds):
            for k in rng.permutation(len(pairs)):
                i, b = pairs[k]
                entry, inputs, _ = later[i]
                time.sleep(SETTLE_S)  # let the previous runtime's spinning worker threads go idle first
                got = time_runner(entry.run_prepared, entry.prepare(inputs[b]), warmup, calls, seconds)
                samples[(i, b)] += got
                medians[(i, b)].append(float(np.median(got)) * 1e3)
    finally:
        for r in runners:
            r.release()
    records = []
    for i, b in pairs:
        record = {**later[i][2], "batch_size": b, **latency_stats(samples[(i, b)], b), "rounds": config.rounds,
                  "round_p50_ms": medians[(i, b)]}
        record["unstable"] = record["cv"] > UNSTABLE_CV
        records.append(record)
        if echo is not None:
            echo(_row(record))
    return records


STAT_KEYS = ("iterations", "mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms",
             "images_per_second", "cv", "rounds", "round_p50_ms")


def add_speedups(results: list[dict[str, Any]]) -> None:
    """speedup_vs_eager: eager fp32's p50 over this record's p50 at the same batch size. With interleaved
    rounds, the ratio of each round is kept too, and its spread, (max - min) / median across rounds."""
    eager = {r["batch_size"]: r for r in results if r["runtime"] == "eager" and not r["skipped"] and "batch_size" in r}
    # (an any-size row also resizes a whole image: its ratio to eager on crops includes that work)
    for r in results:
        if r["skipped"] or "batch_size" not in r:
            continue
        ref = eager.get(r["batch_size"])
        r["speedup_vs_eager"] = ref["p50_ms"] / r["p50_ms"] if ref else None
        if ref:
            r.update(round_ratios(ref, r))


def round_ratios(ref: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The speed ratio ref / record in each interleaved round and its spread, (max - min) / median; empty
    for records timed one after the other. The ratio itself stays the pooled p50s' (samples of both spread
    over the same span of time, robust to bursts that hit some rounds); the rounds show how much it moved."""
    if "round_p50_ms" not in ref or "round_p50_ms" not in record:
        return {}
    ratios = np.asarray(ref["round_p50_ms"]) / np.asarray(record["round_p50_ms"])
    return {"speedup_rounds": [float(x) for x in ratios],
            "speedup_spread": float((ratios.max() - ratios.min()) / np.median(ratios))}


def _row(r: dict[str, Any]) -> str:
    warn = f"  UNSTABLE (cv {100 * r['cv']:.0f}%)" if r.get("unstable") else ""
    return (f"{r['runtime']:<19} {r['artifact']:<16} {r['precision']:<5} b={r['batch_size']:<4} p50 {r['p50_ms']:8.2f} ms  "
            f"p90 {r['p90_ms']:8.2f}  p99 {r['p99_ms']:8.2f}  {r['images_per_second']:8.1f} img/s  cold {r['cold_start_s']:.2f}s{warn}")


def table(report: dict[str, Any], fmt: str = "text") -> str:
    """The results as an aligned text table, GitHub Markdown or CSV, then what failed or was skipped."""
    rows = [r for r in report["results"] if "batch_size" in r]
    head = ["runtime", "artifact", "precision", "input", "batch", "mean ms", "p50 ms", "p90 ms", "p99 ms", "img/s",
            "vs eager", "ratio spread", "cv", "cold s", "peak RSS MB", "above baseline MB"]
    body = [[r["runtime"] + (" (recommended)" if r.get("recommended") and fmt != "csv" else ""), r["artifact"], r["precision"], r.get("input", "").split(" ")[0], str(r["batch_size"]), f"{r['mean_ms']:.2f}", f"{r['p50_ms']:.2f}",
             f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['images_per_second']:.1f}",
             f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-",
             f"{100 * r['speedup_spread']:.1f}%" if r.get("speedup_spread") is not None else "-",
             f"{100 * r['cv']:.1f}%" + (" !" if r["unstable"] else ""), f"{r['cold_start_s']:.2f}",
             f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_above_baseline_mb']:.0f}"]
            for r in rows]
    if fmt == "csv":
        others = [r for r in report["results"] if "batch_size" not in r and not r.get("sweep")]
        return render(head + ["result"], [b + ["measured"] for b in body]
                      + [[r["runtime"], r["artifact"], r["precision"]] + [""] * (len(head) - 3)
                         + [("FAILED: " if r.get("failed") else "skipped: ") + r["reason"]] for r in others], "csv")
    lines = [render(head, body, fmt)]
    bullet = "\n" if fmt == "markdown" else ""
    for r in report["results"]:
        if r.get("failed"):
            lines.append(f"{bullet}FAILED {r['runtime']} {r['artifact']}: {r['reason']}")
        elif r["skipped"]:
            lines.append(f"{bullet}skipped {r['runtime']} {r['artifact']}: {r['reason']}")
    if any(r.get("recommended") for r in rows):
        rec = report["recommended"]
        lines.append(f"{bullet}(recommended): what `rtk optimize` recommended for this bundle, {rec['runtime']} on "
                     f"{rec['artifact']} ({rec['settings']}): the same runtime, file and session settings")
    if any(r["unstable"] for r in rows):
        lines.append(f"{bullet}warning: figures marked ! have a coefficient of variation above {UNSTABLE_CV:.0%}: "
                     "rerun with more --min-seconds or on a quieter machine before quoting them")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], json_path=None, csv_path=None, markdown_path=None) -> None:
    if json_path:
        write_json(json_path, report)
    if csv_path:
        write_text(csv_path, table(report, "csv") + "\n")
    if markdown_path:
        env = report["environment"]
        header = (f"# {report['arch']} at {report['image_size']} px\n\nCPU: {env['cpu']['name']} "
                  f"({env['cpu']['usable_cpus']} usable CPUs, AMX {env['cpu']['amx']}); GPU: "
                  f"{env['cuda'].get('name', 'none')}; threads {env['threads']['requested']}; torch "
                  f"{env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime']}\n\n")
        write_text(markdown_path, header + table(report, "markdown") + "\n")
