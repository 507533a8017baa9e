"""`rtk demo`: the public commands, run in order on the built-in digits, ending in report.md/report.html.

Each stage is the real `rtk` command (invoked in-process); the report lists the exact command line
that reproduces it.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from toolkit.core.fileio import write_text
from toolkit.core.manifest import Manifest
from toolkit.errors import RtkError


@dataclass(frozen=True)
class DemoConfig:
    output: Path = Path("artifacts/demo")
    arch: str = "resnet18"
    epochs: int = 8
    image_size: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    min_seconds: float = 1.0
    calibration_size: int = 200
    # also compile AOTInductor packages (fp32, PT2E int8) and load them: the demo compiled them itself, in its
    # export stage, so it passes --allow-native-code; a bundle from elsewhere needs --trust
    native_code: bool = True


@dataclass
class Stage:
    name: str
    command: list[str]
    seconds: float = 0.0
    exit_code: int = 0
    output: str = ""


@dataclass
class Section:
    """One part of the report, rendered to both Markdown and HTML."""

    title: str
    text: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


def run_rtk(cli: click.Command, args: list[str], show: bool) -> tuple[int, str]:
    """Run one `rtk` command in this process (its stdout shown when `show`); returns (exit code, stdout)."""
    real_stdout = sys.stdout

    class Tee(io.StringIO):
        def write(self, s: str) -> int:
            if show:
                real_stdout.write(s)
            return super().write(s)

    buf = Tee()
    code = 0
    with contextlib.redirect_stdout(buf):
        try:
            cli.main(args=args, prog_name="rtk", standalone_mode=False)
        except SystemExit as exc:
            code = int(exc.code or 0)
        except Exception as exc:  # click's ClickException carries the exit code
            code = getattr(exc, "exit_code", 1)
            buf.write(f"error: {getattr(exc, 'message', exc)}\n")
    return code, buf.getvalue()


def write_photos(folder: Path) -> list[Path]:
    """The two JPEG photos scikit-learn ships (china.jpg, flower.jpg), copied as they are."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise RtkError("the demo needs scikit-learn and matplotlib: pip install -e '.[demo]'") from None
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in load_sample_images().filenames:
        target = folder / Path(name).name
        shutil.copyfile(name, target)
        out.append(target)
    return out


def run_demo(config: DemoConfig, cli: click.Command, echo: Callable[[str], None] = print) -> Path:
    """Run every stage through `cli` (the `rtk` command group, passed in so this module does not import
    the CLI that imports it); returns the path of report.md. Stops at the first stage that errors."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RtkError("the demo needs matplotlib: pip install -e '.[demo]'") from None
    out = config.output
    out.mkdir(parents=True, exist_ok=True)
    data, train_dir, bundle, photos = out / "data", out / "train", out / "bundle", out / "photos"
    gpu = _cuda_available()
    s = str(config.image_size)
    precisions = ["--precision", "fp32", "--precision", "int8"] + (["--precision", "fp16"] if gpu else [])
    bench = [a for b in config.batch_sizes for a in ("--batch-size", str(b))]
    formats, native = _formats(config.native_code, echo)
    plan = [
        ("data", ["data", "digits", str(data), "--size", s]),
        ("train", ["train", str(data), "--output", str(train_dir), "--arch", config.arch, "--weights", "none",
                   "--image-size", s, "--resize-size", s, "--epochs", str(config.epochs), "--no-hflip", "--quiet"]),
        ("export", ["export", str(train_dir / "checkpoint.pt"), "--output", str(bundle), *formats, *precisions,
                    "--calibration-data", str(data / "train"), "--calibration-size", str(config.calibration_size),
                    "--force", "--no-verify"]),
        ("verify digits", ["verify", str(bundle), "--images", str(data / "val"), *native,
                           "--json", str(out / "verify-digits.json")]),
        ("verify photos", ["verify", str(bundle), "--images", str(photos), *native, "--json", str(out / "verify-photos.json")]),
        ("benchmark", ["benchmark", str(bundle), *bench, "--min-seconds", str(config.min_seconds), *native,
                       "--json", str(out / "benchmark.json"), "--markdown", str(out / "benchmark.md")]),
        ("predict", ["predict", str(bundle), str(data / "val"), str(photos), "--json", "--top-k", "3"]),
    ]
    stages: list[Stage] = []
    total = time.perf_counter()
    for index, (name, args) in enumerate(plan, 1):
        if name == "verify photos":
            write_photos(photos)
        echo(f"\n[{index}/{len(plan)}] {name}: rtk {shlex.join(args)}")
        start = time.perf_counter()
        code, text = run_rtk(cli, args, show=name != "predict")
        stage = Stage(name, ["rtk", *args], time.perf_counter() - start, code, text)
        stages.append(stage)
        echo(f"[{index}/{len(plan)}] {name}: {'done' if code == 0 else f'exit {code}'} in {stage.seconds:.1f}s")
        # A failed verification is a finding to report, not a reason to stop the tour.
        if code != 0 and not name.startswith("verify") and name != "predict":
            raise RtkError(f"demo stage {name!r} failed (exit {code}): {text.strip().splitlines()[-1] if text.strip() else ''}")
    report = write_report(out, stages, time.perf_counter() - total)
    echo(f"\nreport: {report} and {report.with_suffix('.html')}")
    return report


def _formats(native_code: bool, echo: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Export's --format arguments (its defaults, and AOTInductor where native code is wanted and a C++
    compiler is here) and the flag that lets verify and benchmark load the packages the demo compiled."""
    from toolkit.core.formats import DEFAULT_FORMATS
    from toolkit.evaluation.runners.torch_runner import compile_problem

    problem = compile_problem("cpu") if native_code else None
    if problem:
        echo(f"AOTInductor left out: {problem}")
    names = [*DEFAULT_FORMATS, *(["aoti"] if native_code and not problem else [])]
    return [a for name in names for a in ("--format", name)], (["--allow-native-code"] if "aoti" in names else [])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- report


def _plots(out: Path, predictions: dict[str, Any], bench: dict[str, Any], classes: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    files = {}
    rows = list(csv.DictReader((out / "train" / "history.csv").open()))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train loss")
    ax1.plot(epochs, [float(r["val_loss"]) for r in rows], "o-", label="val loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss (log scale)"), ax1.set_yscale("log"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(epochs, [float(r["train_top1"]) for r in rows], "o-", label="train top-1")
    ax2.plot(epochs, [float(r["val_top1"]) for r in rows], "o-", label="val top-1")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy"), ax2.set_ylim(0, 1.01), ax2.legend(), ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    files["training"] = "training.png"

    n = len(classes)
    matrix = np.zeros((n, n), dtype=int)
    for p in predictions["predictions"]:
        parts = Path(p["source"]).parts
        if p["error"] is None and len(parts) >= 2 and parts[-2] in classes:
            matrix[classes.index(parts[-2]), p["indices"][0]] += 1
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(n), classes), ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted (ONNX, torch-free runtime)"), ax.set_ylabel("true")
    ax.set_title("confusion matrix, digits val")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)
    files["confusion"] = "confusion.png"

    results = [r for r in bench["results"] if not r["skipped"] and "batch_size" in r]
    batches = sorted({r["batch_size"] for r in results})
    labels = sorted({f"{r['runtime']}\n{r['artifact']}" for r in results}, key=lambda x: x)
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 0.45 * len(labels) + 1.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        vals = {f"{r['runtime']}\n{r['artifact']}": r["p50_ms"] for r in results if r["batch_size"] == b}
        ys = [vals.get(lbl, 0) for lbl in labels]
        ax.barh(range(len(labels)), ys, color="#4c72b0")
        ax.set_yticks(range(len(labels)), [lbl.replace("\n", " ") for lbl in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("p50 latency (ms)"), ax.set_title(f"batch {b}")
        for i, y in enumerate(ys):
            ax.text(y, i, f" {y:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    files["latency"] = "latency.png"
    return files


def _verify_table(path: Path) -> tuple[list[list[str]], dict[str, Any]]:
    report = json.loads(path.read_text())
    rows = [["artifact", "runtime", "precision", "images", "max abs diff", "cosine min", "top-1 agree", "accuracy",
             "accuracy change", "result"]]
    for r in report["records"]:
        acc = f"{100 * r['accuracy']:.2f}%" if r["accuracy"] is not None else "-"
        change = f"{100 * r['accuracy_change']:+.2f} pt" if r["accuracy_change"] is not None else "-"
        rows.append([r["artifact"], r["runtime"], r["precision"], str(r["images"]), f"{r['max_abs_diff']:.2e}",
                     f"{r['cosine_min']:.6f}", f"{100 * r['top1_agreement']:.2f}%", acc, change,
                     "pass" if r["passed"] else "FAIL: " + ", ".join(r["failed_metrics"])])
    return rows, report


def write_report(out: Path, stages: list[Stage], total_seconds: float) -> Path:
    by_name = {s.name: s for s in stages}
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    manifest = Manifest.read(out / "bundle" / "manifest.json")
    bench = json.loads((out / "benchmark.json").read_text())
    predictions = json.loads(by_name["predict"].output[by_name["predict"].output.index("{"):])
    plots = _plots(out, predictions, bench, list(manifest.classes))
    digits_rows, digits = _verify_table(out / "verify-digits.json")
    photo_rows, photos = _verify_table(out / "verify-photos.json")
    env = bench["environment"]
    bench_rows = [["runtime", "artifact", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "vs eager", "cv"]]
    for r in bench["results"]:
        if not r["skipped"] and "batch_size" in r:
            bench_rows.append([r["runtime"], r["artifact"], r["precision"], str(r["batch_size"]), f"{r['p50_ms']:.2f}",
                               f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['images_per_second']:.1f}",
                               f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-",
                               f"{100 * r['cv']:.1f}%" + (" (unstable)" if r["unstable"] else "")])
    skipped = [f"{r['runtime']} ({r['artifact']}): {'FAILED: ' if r.get('failed') else ''}{r['reason']}"
               for r in bench["results"] if r["skipped"] or r.get("failed")]
    photo_preds = [p for p in predictions["predictions"] if Path(p["source"]).parent.name == "photos"]
    val_preds = [p for p in predictions["predictions"] if Path(p["source"]).parent.name != "photos"]
    correct = sum(1 for p in val_preds if p["error"] is None and p["labels"][0] == Path(p["source"]).parent.name)
    sizes = {name: f"{e.bytes / 1e6:.1f} MB" for name, e in manifest.files.items()}
    sections = [
        Section("Summary", [
            f"Fine-tuned {metrics['arch']} on the UCI handwritten digits (scikit-learn) at {manifest.preprocess.crop_size} px: "
            f"best val top-1 **{100 * metrics['best_val_top1']:.2f}%** (epoch {metrics['best_epoch']} of {metrics['epochs']}), "
            f"top-5 {100 * metrics['best_val_top5']:.2f}%, {metrics['train_seconds']:.0f} s of training at "
            f"{metrics['images_per_second']:.0f} img/s ({metrics['precision']} on {metrics['device']}).",
            f"Exported {', '.join(f'{k} ({v})' for k, v in sizes.items())}; verification on the digits val split: "
            f"**{'PASSED' if digits['passed'] else 'FAILED'}**; on the two photos: **{'PASSED' if photos['passed'] else 'FAILED'}**.",
            f"The torch-free runtime (`toolkit.serving.classifier`, onnxruntime only) predicted {correct} of {len(val_preds)} val images "
            f"correctly ({100 * correct / max(1, len(val_preds)):.2f}%).",
            f"Whole demo: {total_seconds:.0f} s.",
        ]),
        Section("Stages", table=[["stage", "seconds", "exit", "command"]] + [
            [s.name, f"{s.seconds:.1f}", str(s.exit_code), "`" + shlex.join(s.command) + "`"] for s in stages]),
        Section("Training", commands=[shlex.join(by_name["train"].command)], images=[plots["training"]]),
        Section("Confusion matrix (deployed ONNX model, digits val)", commands=[shlex.join(by_name["predict"].command)],
                images=[plots["confusion"]]),
        Section("Parity: digits val split", [
            f"{digits['images']} images; TF32 off; in-graph preprocessing vs torchvision Normalize: max abs diff "
            f"{digits['preprocess_max_abs_diff']:.2e}. Gates: fp32 allclose(atol={digits['gates']['atol']}, "
            f"rtol={digits['gates']['rtol']}) and 100% top-1; fp16 >= 99.5% top-1; int8 >= 97% top-1 and <= 1 pt accuracy drop."],
            commands=[shlex.join(by_name["verify digits"].command)], table=digits_rows),
        *_native_code_note(manifest),
        Section("Parity: the two photos scikit-learn ships", [
            "Out-of-distribution for a digits model, but they exercise JPEG decoding, EXIF handling and the "
            "resize of a 640x427 image."], commands=[shlex.join(by_name["verify photos"].command)], table=photo_rows),
        Section("Benchmark", [f"Threads: {env['threads']['requested']} (torch and onnxruntime alike). p50 per call; "
                              "speedup against eager fp32 at the same batch size."] +
                ([f"Skipped: {'; '.join(skipped)}"] if skipped else []),
                commands=[shlex.join(by_name["benchmark"].command)], table=bench_rows, images=[plots["latency"]]),
        Section("Predictions on the photos (torch-free runtime)", table=[["image", "top-1", "score", "top-3"]] + [
            [Path(p["source"]).name, p["labels"][0], f"{p['scores'][0]:.3f}", ", ".join(p["labels"])] for p in photo_preds]),
        Section("Environment", table=[["item", "value"]] + [
            ["CPU", f"{env['cpu']['name']} ({env['cpu']['usable_cpus']} usable of {env['cpu']['logical_cpus']})"],
            ["ISA", ", ".join(k for k in ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx") if env["cpu"].get(k))],
            ["GPU", env["cuda"].get("name") or env["cuda"].get("reason", "")],
            ["onnxruntime providers", ", ".join(env["onnxruntime_providers"])],
        ] + [[k, str(v)] for k, v in env["versions"].items()]),
    ]
    md = ["# rtk demo report", ""] + [line for sec in sections for line in _markdown(sec)]
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_text(out / "report.html", _html(sections))
    return out / "report.md"


def _native_code_note(manifest: Manifest) -> list[Section]:
    """Why the demo may load its AOTInductor packages, when it wrote any."""
    packages = [name for name, entry in manifest.files.items() if entry.format == "aoti"]
    if not packages:
        return []
    return [Section("Compiled native code", [
        f"{', '.join(packages)}: AOTInductor packages, shared libraries that run when loaded. rtk loads one only "
        "with --allow-native-code or from a bundle signed by a key given to --trust. The demo compiled these itself, "
        "in its export stage, so its verify and benchmark stages pass --allow-native-code; a bundle from anywhere "
        "else should be signed (`rtk sign`) and checked with `--trust`."])]


def _markdown(sec: Section) -> list[str]:
    lines = [f"## {sec.title}", ""]
    lines += [t + "\n" for t in sec.text]
    lines += ["```", *sec.commands, "```", ""] if sec.commands else []
    if sec.table:
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in sec.table[0]) + " |", "|" + "---|" * len(sec.table[0])]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in sec.table[1:]] + [""]
    lines += [f"![{img}]({img})\n" for img in sec.images]
    return lines


def _html(sections: list[Section]) -> str:
    def inline(text: str) -> str:
        parts = html.escape(text).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts)).replace("`", "")

    body = []
    for sec in sections:
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        body += [f"<p>{inline(t)}</p>" for t in sec.text]
        body += [f"<pre>{html.escape(c)}</pre>" for c in sec.commands]
        if sec.table:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in sec.table[0])
            rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in sec.table[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        body += [f'<p><img src="{html.escape(img)}" alt="{html.escape(img)}"></p>' for img in sec.images]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left}th{background:#f2f2f2}pre{background:#f6f8fa;padding:8px;overflow-x:auto}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>rtk demo report</title><style>{style}</style></head>"
            f"<body><h1>rtk demo report</h1>{''.join(body)}</body></html>\n")
