"""`rtk optimize`: find the fastest CPU deployment of a bundle that still matches the eager model.

Candidates: every CPU runtime on every ONNX/torch artifact (eager, eager-bf16, TorchScript,
torch.export, onnxruntime at several graph-optimisation levels, OpenVINO f32/bf16/int8), onnxruntime
int8 variants (calibration method, signed/unsigned activations and weights, 7-bit weights, per-channel
or per-tensor weights, QDQ or QOperator format), NNCF's int8 OpenVINO IRs (plain, and with accuracy
control against the held-out images) and onnxruntime's saved optimised graph. Each candidate is
verified against the eager model on held-out labelled images; only those that pass are benchmarked; the fastest passing one is
written to the manifest as `recommended`. A candidate that fails verification is never
recommended, whatever its speed.
"""

from __future__ import annotations

import dataclasses
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.bundle import Bundle, selftest_key
from toolkit.core.fileio import atomic_path, folder_lock, library_writes, sha256_file
from toolkit.core.hardware import cpu_info, usable_cpus
from toolkit.core.manifest import FileEntry, Recommendation
from toolkit.core.tables import render
from toolkit.core.versions import version_of
from toolkit.errors import RtkError
from toolkit.evaluation.runners.torch_runner import keeps_torch_threads
from toolkit.evaluation.verify import (
    Gates,
    accuracy_pairs,
    change_words,
    compare,
    load_inputs,
    near_tie_words,
    reference_logits,
    run_batched,
)
from toolkit.export.exporter import metadata
from toolkit.export.quantize import QuantRecipe, calibration_crops, write_int8
from toolkit.serving.sessions import ENGINES, SessionSettings, describe, open_onnxruntime, open_openvino

DEFAULT_RECIPES = (
    QuantRecipe(),
    QuantRecipe(reduce_range=True),
    QuantRecipe(activations="s8"),
    QuantRecipe(per_channel=False),
    QuantRecipe(calibration="entropy"),
    QuantRecipe(calibration="percentile"),
    QuantRecipe(weights="u8"),  # u8 x u8: onnxruntime's other remedy for u8 x s8 saturation without VNNI
    QuantRecipe(format="qoperator"),  # QLinearConv etc. instead of QDQ pairs the graph optimiser must fuse
    QuantRecipe(format="qoperator", weights="u8", per_channel=False),  # its only u8-weight convolutions
)
ORT_OPT_FILE = "model.ort-opt.onnx"
# Each file is swapped into the bundle under its folder_lock (the lock Bundle.update merges the manifest
# under), taken only around the swap: never around Bundle.update, which takes it itself.
LOCK = "rtk optimize"


@dataclass(frozen=True)
class OptimizeConfig:
    calibration_data: str
    holdout: str | None = None
    max_accuracy_drop: float = 0.5  # points of top-1 accuracy on the held-out images
    batch_sizes: tuple[int, ...] = (1,)
    threads: int | None = None
    calibration_size: int = 200
    recipes: tuple[QuantRecipe, ...] = DEFAULT_RECIPES
    warmup: int = 10
    iterations: int = 30
    min_seconds: float = 2.0
    seed: int = 0
    rounds: int = 10  # interleaved timing rounds (see rtk benchmark)
    gates: Gates = Gates()  # top-1 on the decisive images (its margin), the interval's confidence
    allow_native_code: bool = False  # AOTInductor packages (compiled native code) are candidates too

    def __post_init__(self) -> None:
        if self.max_accuracy_drop < 0:
            raise RtkError("--max-accuracy-drop must be >= 0 (points)")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise RtkError("--batch-size must be at least 1")


def split_folders(calibration: str, holdout: str | None) -> tuple[Path, Path]:
    """Calibration images and held-out labelled images: DIR/train + DIR/val when DIR has both."""
    root = Path(calibration)
    if not root.is_dir():
        raise RtkError(f"calibration folder not found: {root}")
    if holdout is not None:
        return root, Path(holdout)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / "train", root / "val"
    raise RtkError(f"give --holdout DIR (labelled images the calibration never saw), or a {root} with train/ and val/")


def _add_file(bundle: Bundle, name: str, precision: str, extra: dict[str, Any], fmt: str = "onnx") -> None:
    path = bundle.path(name)
    bundle.add_file(name, FileEntry(fmt, precision, sha256_file(path), path.stat().st_size, extra))


def build_nncf_irs(bundle: Bundle, crops: np.ndarray, control, echo) -> list[str]:
    """NNCF's int8 OpenVINO IRs of model.onnx that the bundle lacks: plain post-training int8, and int8 with
    accuracy control against the held-out images (`control`), kept only when it returned some layers to
    fp32 (otherwise it is the plain file again). Without NNCF, a line saying what to install."""
    from toolkit.core.openvino_ir import IR_INT8, IR_INT8_AC
    from toolkit.export.openvino import nncf_problem

    problem = nncf_problem()
    if problem:
        echo(f"not built: {IR_INT8}, {IR_INT8_AC}: {problem}")
        return []
    built = []
    if IR_INT8 not in bundle.files:
        _write_ir(bundle, IR_INT8, crops, None, "OpenVINO read_model + NNCF quantize")
        built.append(IR_INT8)
        echo(f"built {IR_INT8} (NNCF post-training int8, OpenVINO IR)")
    if IR_INT8_AC not in bundle.files:
        plain = _int8_layers(bundle.path(IR_INT8))

        def returned_layers(info: dict[str, Any]) -> bool:  # none returned to fp32: the plain file again
            return info["int8_layers"] < plain

        info = _write_ir(bundle, IR_INT8_AC, crops, control, "OpenVINO read_model + NNCF quantize_with_accuracy_control",
                         keep=returned_layers)
        ac = info["accuracy_control"]
        figures = (f"held-out top-1 fp32 {100 * ac['fp32_top1']:.2f}%, int8 {100 * ac['int8_top1']:.2f}%, "
                   f"{info['int8_layers']} of {info['layers']} layers int8 (plain int8: {plain})")
        if returned_layers(info):
            built.append(IR_INT8_AC)
            echo(f"built {IR_INT8_AC} (NNCF int8 with accuracy control: {figures})")
        else:
            echo(f"not kept: {IR_INT8_AC}: accuracy control returned no layer to fp32 ({figures})")
    return built


def _int8_layers(xml: Path) -> int:
    import openvino as ov

    from toolkit.export.openvino import int8_layers

    return int8_layers(ov.Core().read_model(str(xml)))[0]


def _write_ir(bundle: Bundle, name: str, crops: np.ndarray, control, exporter: str,
              keep: Callable[[dict[str, Any]], bool] = lambda info: True) -> dict[str, Any]:
    """Quantise model.onnx into the IR `name`; the .xml and .bin are written in a staging folder and moved into
    the bundle together, if `keep` says so."""
    import os
    import tempfile

    from toolkit.core.openvino_ir import entry_extra, weights_of
    from toolkit.export.openvino import write_nncf_int8
    from toolkit.training.checkpoint import ModelSource

    source = ModelSource.from_manifest(bundle.manifest)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".rtk-ir-", dir=bundle.root) as staging:
        xml = Path(staging) / name
        with library_writes(bundle.path(name)):  # OpenVINO writes in C++: a full disk is one line naming the file
            info = write_nncf_int8(bundle.path("model.onnx"), xml, crops, metadata(source, "int8", bundle.manifest.softmax),
                              control)
        if not keep(info):
            return info
        with folder_lock(bundle.root, LOCK):
            os.replace(weights_of(xml), weights_of(bundle.path(name)))
            os.replace(xml, bundle.path(name))
    _add_file(bundle, name, "int8", {"exporter": exporter, **info, "seconds": round(time.perf_counter() - start, 3),
                                     **entry_extra(bundle.path(name))}, fmt="openvino")
    return info


def build_candidates(bundle: Bundle, crops: np.ndarray, recipes: tuple[QuantRecipe, ...], echo) -> list[str]:
    """Write the int8 variants and onnxruntime's optimised graph that the bundle lacks."""
    if "model.onnx" not in bundle.files:
        raise RtkError(f"{bundle.root} has no model.onnx: export with --format onnx first")
    from toolkit.training.checkpoint import ModelSource

    source = ModelSource.from_manifest(bundle.manifest)
    built = []
    present = {QuantRecipe.of(entry) for entry in bundle.files.values()}  # model.int8.onnx holds export's choice
    for recipe in recipes:
        name = recipe.file_name
        if name in bundle.files or recipe in present:
            continue
        start = time.perf_counter()
        with atomic_path(bundle.path(name), lock=LOCK) as tmp:
            used = write_int8(bundle.path("model.onnx"), tmp, crops, metadata(source, "int8", bundle.manifest.softmax),
                              recipe)
        _add_file(bundle, name, "int8", {"exporter": f"onnxruntime quantize_static ({recipe.label})",
                                 "quantization": asdict(recipe), "calibration_images": used,
                                 "seconds": round(time.perf_counter() - start, 3)})
        built.append(name)
        echo(f"built {name} ({recipe.label})")
    if ORT_OPT_FILE not in bundle.files:
        start = time.perf_counter()
        with atomic_path(bundle.path(ORT_OPT_FILE), lock=LOCK) as tmp:
            open_onnxruntime(bundle.path("model.onnx"), SessionSettings(), optimized_path=str(tmp))
        cpu = cpu_info()
        _add_file(bundle, ORT_OPT_FILE, "fp32", {
            "exporter": "onnxruntime ORT_ENABLE_ALL, saved", "seconds": round(time.perf_counter() - start, 3),
            # ORT_ENABLE_ALL lays tensors out for this CPU's vector width: only this kind of CPU should load it.
            "hardware_specific": {"cpu": cpu.name, "isa": {k: v for k, v in cpu.to_dict().items() if isinstance(v, bool)},
                                  "onnxruntime": version_of("onnxruntime") or version_of("onnxruntime-gpu")},
        })
        built.append(ORT_OPT_FILE)
        echo(f"built {ORT_OPT_FILE} (onnxruntime's optimised graph, hardware-specific)")
    return built


def update_selftest(bundle: Bundle, outputs: dict[str, Any]) -> None:
    """Add expected outputs to selftest.npz: {key: runner}, each run on the stored crops."""
    from toolkit.core.bundle import SELFTEST

    path = bundle.path(SELFTEST)
    with folder_lock(bundle.root, LOCK):  # read, add, write back: no other writer's keys are lost
        arrays = _read_selftest(bundle)
        for key, run in outputs.items():
            arrays[key] = run(arrays["images"])
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)


def candidates(bundle: Bundle, reference, threads: int, native_code: bool = False):
    """Every CPU runtime x artifact, plus each engine's session variants on that engine's CPU runtimes:
    onnxruntime's other graph levels on model.onnx, OpenVINO's static batch on every file it runs;
    AOTInductor packages only with `native_code`."""
    from toolkit.evaluation.runners import REGISTRY, RunOptions, plan, runtimes_on

    options = RunOptions(threads=threads, profile_placement=False, native_code=native_code)
    # the any-size file takes whole images, another contract than the crops a recommendation serves
    entries = [e for e in plan(bundle, runtimes_on("cpu"), reference, options)
               if not bundle.any_size(e.artifact)]
    for engine in ENGINES.values():
        on_cpu = [name for name in runtimes_on("cpu") if REGISTRY[name].family == engine.name]
        for variant, every_file in [(v, False) for v in engine.variants] + [(v, True) for v in engine.file_variants]:
            varied = dataclasses.replace(options, session=tuple(variant.items()))
            entries += [e for e in plan(bundle, on_cpu, reference, varied)
                        if (every_file or e.artifact == "model.onnx") and not bundle.any_size(e.artifact)]
    return entries


def settings(runner) -> str:
    """The candidate's settings in words (threads, then its engine's own: graph level, precision hint)."""
    session = getattr(runner, "settings", None)
    words = [f"{runner.options.threads} threads"]
    return ", ".join(words + ([describe(session)] if session is not None else []))


@dataclass(frozen=True)
class Holdout:
    """The held-out labelled images and the eager model's logits on them: what every candidate is checked against."""

    inputs: Any  # toolkit.evaluation.verify's loaded inputs: crops, labels, names
    reference: np.ndarray
    folder: Path


@keeps_torch_threads
def optimize_bundle(bundle_path: str | Path, config: OptimizeConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the candidates the bundle lacks, verify each against the eager model on the held-out images, time
    those that pass in interleaved rounds, and record the fastest in the manifest as `recommended`. Returns
    the report (every candidate's row, the ranking, the recommendation), which is also the manifest's
    `optimization`."""
    import torch

    from toolkit.training.checkpoint import source_from_manifest

    bundle = Bundle.open(bundle_path)
    bundle.check_writable()
    _selftest_images(bundle)  # a missing or corrupt selftest.npz is found now, not after the int8 builds
    spec = bundle.manifest.preprocess
    calib_dir, holdout_dir = split_folders(config.calibration_data, config.holdout)
    model, _ = source_from_manifest(bundle.manifest)
    inputs = load_inputs(holdout_dir, 0, spec, bundle.classes, config.seed)
    if inputs.labels is None:
        raise RtkError(f"{holdout_dir} must be an ImageFolder whose class folders are the bundle's classes")
    crops = calibration_crops(str(calib_dir), config.calibration_size, spec, config.seed)
    build_all(bundle, crops, inputs, config, echo)
    if config.allow_native_code:
        build_native(bundle, model, crops, calib_dir, echo)
    threads = config.threads or usable_cpus()
    torch.set_num_threads(threads)
    holdout = Holdout(inputs, reference_logits(model, spec, inputs.crops), holdout_dir)
    rows, passing, selftest_outputs = verify_candidates(bundle, lambda: (model, spec), holdout, threads, config, echo)
    time_candidates(passing, config, echo)
    add_baseline_speedups(rows, config.batch_sizes)
    pytorch_native = add_pytorch_native_speedups(rows, config.batch_sizes)
    first = config.batch_sizes[0]
    ranked = sorted((r for r in rows if r["status"] == "passed"), key=lambda r: r[f"b{first}"]["p50_ms"])
    if not ranked:
        raise RtkError("no candidate passed verification: nothing to recommend")
    cpu = cpu_info().to_dict()
    recommended = recommendation(ranked[0], threads, cpu, first)
    report = _report(bundle, config, holdout, len(crops), calib_dir, threads, cpu, rows, ranked, recommended)
    report["pytorch_native"] = pytorch_native
    chosen = selftest_outputs.get((recommended.runtime, recommended.artifact))
    if chosen is not None:  # the self-test expects what this session computed (an engine with its own key)
        key, outputs = chosen
        update_selftest(bundle, {key: lambda images: outputs})
    bundle.update(optimization=report, recommended=recommended)
    return report


def build_all(bundle: Bundle, crops: np.ndarray, inputs, config: OptimizeConfig, echo) -> None:
    """Every candidate file the bundle lacks, each with its expected outputs in selftest.npz: the onnxruntime
    int8 variants and optimised graph, then NNCF's int8 IRs (accuracy control against the held-out `inputs`)."""
    from toolkit.export.openvino import AccuracyControl

    built = build_candidates(bundle, crops, config.recipes, echo)
    update_selftest(bundle, {name: _ort_cpu(bundle.path(name)) for name in built})
    control = AccuracyControl(inputs.crops, inputs.labels, config.max_accuracy_drop)
    update_selftest(bundle, {selftest_key(ir, "openvino"): open_openvino(bundle.path(ir), SessionSettings(engine="openvino")).run
                             for ir in build_nncf_irs(bundle, crops, control, echo)})


def build_native(bundle: Bundle, model, crops: np.ndarray | None, calib_dir: Path, echo,
                 precisions: tuple[str, ...] = ("fp32", "bf16", "int8")) -> list[str]:
    """The AOTInductor packages the bundle lacks, compiled here from the checkpoint by export's writer: fp32,
    bf16 on a CPU with bf16 matrix units, PT2E int8 calibrated on `crops` (each skipped with the reason where
    it cannot be built). Only with native code allowed, since verifying them loads them."""
    from toolkit.evaluation.runners.torch_runner import compile_problem
    from toolkit.export.exporter import add_cpu_files

    problem = compile_problem("cpu")
    if problem:
        echo(f"not built: AOTInductor packages: {problem}")
        return []
    built = add_cpu_files(bundle, "aoti", precisions, model, crops, str(calib_dir), LOCK, echo)
    for name in built:
        echo(f"built {name} ({bundle.files[name].extra.get('exporter')})")
    return built


Passing = list[tuple[Any, dict[int, np.ndarray], dict[str, Any]]]  # (runner, batches to time, its row)


def verify_candidates(bundle: Bundle, reference: Callable[[], tuple[Any, Any]], holdout: Holdout, threads: int,
                      config: OptimizeConfig, echo) -> tuple[list[dict[str, Any]], Passing,
                                                              dict[tuple[str, str], tuple[str, np.ndarray]]]:
    """Every candidate's row; the passing ones with the batches to time them on; and what each passing
    candidate whose engine has its own self-test key (OpenVINO) computes on the self-test images: its key and
    expected outputs, by (runtime, artifact), should it be chosen."""
    from toolkit.evaluation.runners import Failed, Skipped, each_loaded

    spec = bundle.manifest.preprocess
    rng = np.random.default_rng(config.seed)
    batches = {b: rng.integers(0, 256, (b, spec.crop_size, spec.crop_size, 3), dtype=np.uint8) for b in config.batch_sizes}
    rows: list[dict[str, Any]] = []
    passing: Passing = []
    selftest_outputs: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
    for entry in each_loaded(candidates(bundle, reference, threads, config.allow_native_code)):
        row: dict[str, Any] = {"runtime": entry.runtime, "artifact": entry.artifact, "precision": entry.precision}
        if isinstance(entry, Skipped):
            rows.append({**row, "status": "skipped", "reason": entry.reason})
            continue
        if isinstance(entry, Failed):
            rows.append({**row, "status": "failed verification", "failed_metrics": ["load"], "reason": entry.reason})
            echo(f"{entry.runtime:<14} {entry.artifact:<36} FAILED: {entry.reason}")
            continue
        row = verified_row(entry, row, holdout, threads, config, echo)
        rows.append(row)
        if row["status"] == "passed":
            passing.append((entry, batches, row))  # timed later, all together, in interleaved rounds
            key = getattr(entry, "selftest_key", None)
            if key is not None and key != selftest_key(entry.artifact):  # export wrote onnxruntime's
                selftest_outputs[(entry.runtime, entry.artifact)] = (key, entry(_selftest_images(bundle)))
    return rows, passing, selftest_outputs


def verified_row(entry, row: dict[str, Any], holdout: Holdout, threads: int, config: OptimizeConfig, echo) -> dict[str, Any]:
    """`row` with the loaded candidate's settings and its verification against the eager model: status
    "passed" or "failed verification" (any gate, or more than --max-accuracy-drop points lost)."""
    inputs, gates = holdout.inputs, config.gates
    row["settings"] = settings(entry)
    if hasattr(entry, "settings"):
        row["session"] = entry.settings.to_dict()
    row["threads"] = threads
    out = run_batched(entry, inputs.crops)
    m = compare(out, holdout.reference, inputs.names, inputs.labels, entry.precision, gates)
    drop_points = -100 * m["accuracy_change"]  # the gate is on the point estimate; the interval is reported
    failed = list(m["failed_metrics"]) + (["max_accuracy_drop"] if drop_points > config.max_accuracy_drop + 1e-9 else [])
    interval, pairs = accuracy_pairs(out, holdout.reference, inputs.labels, gates.confidence, config.max_accuracy_drop / 100)
    row.update(accuracy=m["accuracy"], reference_accuracy=m["reference_accuracy"],
               accuracy_change_points=100 * m["accuracy_change"], accuracy_interval_points=[100 * v for v in interval],
               accuracy_pairs=pairs, top1_agreement=m["top1_agreement"],
               top1_agreement_where_clear=m["top1_agreement_where_clear"], near_ties=m["near_ties"],
               max_abs_diff=m["max_abs_diff"], failed_metrics=failed, passed=not failed)
    if failed:
        echo(f"{entry.runtime:<14} {entry.artifact:<36} {row['settings']:<30} FAILED ({', '.join(failed)})")
        return {**row, "status": "failed verification"}
    echo(f"{entry.runtime:<14} {entry.artifact:<36} {row['settings']:<30} verified: "
         f"accuracy {100 * m['accuracy']:.2f}% ({change_words(row['accuracy_change_points'], row['accuracy_interval_points'], pairs)}; "
         f"near-ties {near_tie_words(row['near_ties'])})")
    return {**row, "status": "passed"}


def time_candidates(passing: Passing, config: OptimizeConfig, echo) -> None:
    """Time every verified candidate in shuffled rounds, so a slowdown of the host hits all alike; each row
    gets its statistics per batch size (`b1`, `b8`, ...)."""
    from toolkit.evaluation.benchmark import STAT_KEYS, BenchConfig, interleaved

    timing = BenchConfig(batch_sizes=config.batch_sizes, warmup=config.warmup, iterations=config.iterations,
                         min_seconds=config.min_seconds, rounds=config.rounds, seed=config.seed)
    records = iter(interleaved(passing, timing, None))
    for _, _, row in passing:
        for b in config.batch_sizes:
            record = next(records)
            row[f"b{b}"] = {k: record[k] for k in STAT_KEYS if k in record}
    for _, _, row in passing:
        echo(f"{row['runtime']:<14} {row['artifact']:<36} {row['settings']:<30} "
             + "  ".join(f"b{b} p50 {row[f'b{b}']['p50_ms']:.2f} ms" for b in config.batch_sizes))


# name -> (runtime, artifact, words its settings contain): what each timed row is compared against
BASELINES = {"eager": ("eager", "checkpoint", None), "onnxruntime_default": ("ort-cpu", "model.onnx", "graph all"),
             "openvino_default": ("openvino", "model.onnx", "precision f32")}


def add_baseline_speedups(rows: list[dict[str, Any]], batch_sizes: tuple[int, ...]) -> None:
    """speedup_vs_NAME of each timed row against each baseline that passed; against eager, also how much the
    ratio moved from round to round."""
    from toolkit.evaluation.benchmark import round_ratios

    for b in batch_sizes:
        for name, (runtime_name, artifact, setting) in BASELINES.items():
            base = next((r for r in rows if r["status"] == "passed" and r["runtime"] == runtime_name
                         and r["artifact"] == artifact and (setting is None or setting in r.get("settings", ""))), None)
            if base is None:
                continue
            for row in rows:
                if f"b{b}" in row:
                    row[f"b{b}"][f"speedup_vs_{name}"] = base[f"b{b}"]["p50_ms"] / row[f"b{b}"]["p50_ms"]
                    if name == "eager":
                        row[f"b{b}"].update(round_ratios(base[f"b{b}"], row[f"b{b}"]))


# the runtimes a PyTorch user has without leaving PyTorch: eager, torch.compile and PyTorch's own archives
PYTORCH_FAMILIES = ("eager", "torch.compile", "torch.jit", "torch.export", "torch.aoti")


def add_pytorch_native_speedups(rows: list[dict[str, Any]], batch_sizes: tuple[int, ...]) -> str | None:
    """speedup_vs_pytorch_native of each timed row: the fastest passing PyTorch-native row's p50 (at the first
    batch size, the one the recommendation is ranked on) over this row's, at each batch size, from the same
    rounds. Returns that row as 'runtime on artifact', or None when no PyTorch-native candidate passed."""
    from toolkit.evaluation.runners import REGISTRY

    first = f"b{batch_sizes[0]}"
    native = [r for r in rows if r["status"] == "passed" and first in r and REGISTRY[r["runtime"]].family in PYTORCH_FAMILIES]
    if not native:
        return None
    base = min(native, key=lambda r: r[first]["p50_ms"])
    for b in batch_sizes:
        for row in rows:
            if f"b{b}" in row and f"b{b}" in base:
                row[f"b{b}"]["speedup_vs_pytorch_native"] = base[f"b{b}"]["p50_ms"] / row[f"b{b}"]["p50_ms"]
    return f"{base['runtime']} on {base['artifact']}"


def recommendation(best: dict[str, Any], threads: int, cpu: dict[str, Any], batch_size: int) -> Recommendation:
    """The fastest passing row as the manifest's recommendation, its figures at `batch_size`."""
    stats = best[f"b{batch_size}"]
    return Recommendation(
        runtime=best["runtime"], artifact=best["artifact"], precision=best["precision"], device="cpu", threads=threads,
        settings=best["settings"], session=best.get("session"),
        cpu=cpu,  # what it was chosen for: another CPU should run optimize again
        speedup_vs_onnxruntime_default=stats.get("speedup_vs_onnxruntime_default"),
        speedup_vs_openvino_default=stats.get("speedup_vs_openvino_default"),
        speedup_vs_pytorch_native=stats.get("speedup_vs_pytorch_native"), batch_size=batch_size,
        p50_ms=stats["p50_ms"], speedup_vs_eager=stats.get("speedup_vs_eager"),
        speedup_vs_eager_spread=stats.get("speedup_spread"), accuracy_change_points=best["accuracy_change_points"],
        accuracy_interval_points=tuple(best["accuracy_interval_points"]))


def _report(bundle: Bundle, config: OptimizeConfig, holdout: Holdout, calibration_images: int, calib_dir: Path,
            threads: int, cpu: dict[str, Any], rows: list[dict[str, Any]], ranked: list[dict[str, Any]],
            recommended: Recommendation) -> dict[str, Any]:
    from toolkit.core.versions import library_versions

    return {"arch": bundle.manifest.arch, "image_size": bundle.manifest.preprocess.crop_size,
            "versions": {**library_versions(), "openvino": version_of("openvino")},
            "holdout": str(holdout.folder), "holdout_images": len(holdout.inputs.crops), "calibration": str(calib_dir),
            "calibration_images": calibration_images, "max_accuracy_drop_points": config.max_accuracy_drop,
            "decisive_margin": config.gates.decisive_margin, "confidence": config.gates.confidence,
            "batch_sizes": list(config.batch_sizes), "threads": threads, "cpu": cpu,
            "rounds": config.rounds,
            "ranking": [f"{r['runtime']}:{r['artifact']}:{r['settings']}" for r in ranked],
            "candidates": rows, "recommended": recommended.to_dict()}


def _selftest_images(bundle: Bundle) -> np.ndarray:
    return _read_selftest(bundle)["images"]


def _read_selftest(bundle: Bundle) -> dict[str, np.ndarray]:
    from toolkit.core.bundle import SELFTEST

    path = bundle.path(SELFTEST)
    try:
        with np.load(path) as data:
            arrays = dict(data)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RtkError(f"cannot read {path} (missing or corrupt; re-export the bundle): {exc}") from None
    if "images" not in arrays:
        raise RtkError(f"{path} has no 'images': re-export the bundle")
    return arrays


def _ort_cpu(path: Path):
    """The file's logits on onnxruntime CPU, as the production runtime computes them."""
    return open_onnxruntime(path, SessionSettings()).run


def fidelity_cells(row: dict[str, Any]) -> list[str]:
    """The accuracy change's interval, whether the held-out set resolves the bound, top-1 on the decisive
    images and the near-ties: '-' for a candidate that never ran."""
    if row.get("accuracy_interval_points") is None:
        return ["-"] * 4
    low, high = row["accuracy_interval_points"]
    pairs = row["accuracy_pairs"]
    held_out = "resolves" if pairs["resolved"] else (
        f"too small: ~{pairs['images_to_resolve']} images" if pairs["images_to_resolve"] else "too small")
    return [f"{low:+.2f} to {high:+.2f}", held_out, f"{100 * row['top1_agreement_where_clear']:.2f}%",
            near_tie_words(row["near_ties"])]


def format_table(report: dict[str, Any], markdown: bool = False) -> str:
    """Ranked candidates: passing ones by p50 at the first batch size, then failed and skipped ones."""
    sizes = report["batch_sizes"]
    head = ["rank", "runtime", "artifact", "precision", "settings"] + [
        h for b in sizes for h in (f"b{b} p50 ms", f"b{b} vs eager", f"b{b} ratio spread")] + [
        "accuracy", "change (pt)", "CI (pt)", "held-out set", "top-1 decisive", "near-ties", "result"]
    passed = sorted((r for r in report["candidates"] if r["status"] == "passed"), key=lambda r: r[f"b{sizes[0]}"]["p50_ms"])
    others = [r for r in report["candidates"] if r["status"] != "passed"]
    body = []
    for i, r in enumerate(passed + others, 1):
        cells = [str(i) if r["status"] == "passed" else "-", r["runtime"], r["artifact"], r["precision"], r.get("settings", "")]
        for b in sizes:
            stats = r.get(f"b{b}")
            spread = stats.get("speedup_spread") if stats else None
            cells += [f"{stats['p50_ms']:.2f}", f"{stats.get('speedup_vs_eager', 0):.2f}x",
                      f"{100 * spread:.1f}%" if spread is not None else "-"] if stats else ["-", "-", "-"]
        cells += [f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "-",
                  f"{r['accuracy_change_points']:+.2f}" if r.get("accuracy_change_points") is not None else "-",
                  *fidelity_cells(r),
                  "pass" if r["status"] == "passed" else (f"FAIL: {', '.join(r['failed_metrics'])}"
                                                           if r["status"] == "failed verification" else f"skipped: {r['reason']}")]
        body.append(cells)
    footer = _footer(report)
    rule = (f"Gates: top-1 as the reference on every image where it is decisive (top two logits {report.get('decisive_margin', 0.05):g} x "
            f"the largest |logit| apart; the near-ties are counted, flipped -> to right / to wrong, not gated); accuracy change "
            f"(paired) >= -{report['max_accuracy_drop_points']} pt on the point estimate; CI: exact "
            f"{100 * report.get('confidence', 0.95):g}% interval (toolkit/evaluation/stats.py); `held-out set` says whether that interval is "
            f"no wider than the bound, or about how many images would make it so.")
    if markdown:
        v = report.get("versions", {})
        title = [f"# rtk optimize: {report.get('arch', '?')} at {report.get('image_size', '?')} px", "",
                 f"CPU: {report['cpu']['name']} ({report['cpu']['usable_cpus']} usable CPUs, AMX {report['cpu']['amx']}); "
                 f"{report['threads']} threads; torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, openvino {v.get('openvino')}.",
                 f"Verified on {report['holdout_images']} held-out labelled images ({report['holdout']}); int8 calibrated on "
                 f"{report['calibration_images']} images of {report['calibration']}; max accuracy drop "
                 f"{report['max_accuracy_drop_points']} pt. Latency: p50 per call; `vs eager` is eager fp32 p50 / this p50; "
                 f"`ratio spread` is (max - min) / median of that ratio over the {report.get('rounds', 1)} interleaved rounds.", ""]
        lines = title + [rule, "", render(head, body, "markdown")]
        return "\n".join(lines) + f"\n\n**{footer}**"
    return render(head, body) + "\n" + footer + "\n" + rule


def _footer(report: dict[str, Any]) -> str:
    """The recommendation in one line: where it runs, its p50, its speedups over the baselines, its accuracy change."""
    rec = Recommendation.from_dict(report["recommended"], "the optimize report's 'recommended'")
    spread = f" (spread {100 * rec.speedup_vs_eager_spread:.1f}% over rounds)" if rec.speedup_vs_eager_spread else ""
    against = [f"{value:.2f}x {name}{spread if key == 'speedup_vs_eager' else ''}" for key, name in (
        ("speedup_vs_eager", "eager fp32"), ("speedup_vs_onnxruntime_default", "onnxruntime's default (model.onnx, graph all)"),
        ("speedup_vs_openvino_default", "OpenVINO's default (model.onnx, f32)"),
        ("speedup_vs_pytorch_native", f"the fastest PyTorch-native ({report.get('pytorch_native')})"))
        if (value := getattr(rec, key))]
    interval = (" ({:g}% CI {:+.2f} to {:+.2f})".format(100 * report.get("confidence", 0.95), *rec.accuracy_interval_points)
                if rec.accuracy_interval_points else "")
    p50 = f"{rec.p50_ms:.2f} ms" if rec.p50_ms is not None else "not timed"
    change = f"{rec.accuracy_change_points:+.2f} pt" if rec.accuracy_change_points is not None else "not measured"
    return (f"recommended: {rec.runtime} on {rec.artifact} ({rec.settings}): p50 {p50} at batch {rec.batch_size}, "
            f"{', '.join(against) or 'no baseline measured'}, accuracy change {change}{interval}; "
            f"timed in {report.get('rounds', 1)} interleaved rounds")
