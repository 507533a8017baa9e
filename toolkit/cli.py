"""The `rtk` command line: parse options, call one library function, print.

Heavy libraries (torch, onnx, onnxruntime) are imported inside the commands so `rtk --help` is instant.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import warnings
from pathlib import Path

import click

from toolkit import __version__
from toolkit.core.formats import DEFAULT_FORMATS, FORMATS, PRECISIONS
from toolkit.errors import RtkError


class _RtkFailure(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RtkGroup(click.Group):
    """Turns the toolkit's own errors into a one-line message and the error's exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RtkError as exc:
            raise _RtkFailure(str(exc), exc.exit_code) from None
        except OSError as exc:
            if exc.errno not in USER_OS_ERRORS:
                raise  # a genuine bug keeps its traceback
            where = f": {exc.filename}" if exc.filename else ""
            raise _RtkFailure(f"{exc.strerror or exc}{where}", 2) from None
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top not in EXTRA_OF_MODULE:
                raise  # a genuine bug keeps its traceback
            command = ctx.invoked_subcommand or "this command"
            raise _RtkFailure(f"rtk {command} needs {top}, which is not installed here: "
                              f"pip install 'rtk[{EXTRA_OF_MODULE[top]}]'", 2) from None


# Errors of the machine or the user's paths (permission, no space, missing file): one line naming the path.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
                  errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG}

# A missing optional library -> the extra that installs it (the serving install has no training stack).
EXTRA_OF_MODULE = {
    "torch": "train,cpu", "torchvision": "train,cpu", "onnx": "train,cpu", "onnxscript": "train,cpu",
    "onnxruntime": "cpu", "fastapi": "serve,cpu", "uvicorn": "serve,cpu", "starlette": "serve,cpu",
    "prometheus_client": "serve,cpu", "multipart": "serve,cpu", "python_multipart": "serve,cpu",
    "tritonclient": "triton", "pyarrow": "batch", "ray": "ray", "openvino": "openvino", "sklearn": "demo", "matplotlib": "demo",
}


# Public keys a consumer trusts (toolkit.serving.signing): repeatable, or RTK_TRUST as a colon-separated list.
trust_option = click.option(
    "--trust", "trust", multiple=True, envvar="RTK_TRUST", show_envvar=True, type=click.Path(path_type=Path),
    help="A public key (PEM, EC): accept only a bundle it signed (rtk sign). Repeatable.")
# An AOTInductor package is a compiled library: loading it runs it (toolkit.evaluation.runners.registry.plan).
native_code_option = click.option(
    "--allow-native-code", "allow_native_code", is_flag=True,
    help="Also load AOTInductor packages (compiled native code: loading one runs it) [only from a --trust'ed bundle].")


@click.group(cls=RtkGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="rtk")
def main() -> None:
    """rtk: fine-tune a torchvision ResNet, export it with the preprocessing inside, prove the export
    matches, benchmark it, and serve it without torch.

    \b
    Pipeline: rtk data digits -> rtk train -> rtk export -> rtk verify -> rtk benchmark -> rtk predict
    """
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    # TorchScript is deprecated upstream; rtk writes model.pt2 (its successor) beside it on purpose.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Versions, CPU features, CUDA and onnxruntime providers. Exit 1 if something needed is broken."""
    from toolkit.evaluation.env import doctor_report

    report = doctor_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"rtk {report['toolkit']}  python {report['python']}  {report['platform']}")
        for name, version in report["versions"].items():
            click.echo(f"  {name:<12} {version or 'not installed'}")
        ort = report["onnxruntime"]
        click.echo(f"onnxruntime providers: {', '.join(ort.get('providers') or []) or 'none'}")
        cuda = report["cuda"]
        click.echo("CUDA: " + (f"{cuda['name']} (capability {cuda['capability']}, {cuda['memory_gib']} GiB, "
                               f"driver {cuda.get('driver')})" if cuda["available"] else f"not usable ({cuda['reason']})"))
        cpu = report["cpu"]
        click.echo(f"CPU: {cpu['name']}; {cpu['usable_cpus']} of {cpu['logical_cpus']} CPUs usable; "
                   f"AVX-512 {_yes(cpu['avx512'])}, AVX512-BF16 {_yes(cpu['avx512_bf16'])}, AMX {_yes(cpu['amx'])}")
        for w in report["warnings"]:
            click.echo(f"warning: {w}")
        for p in report["problems"]:
            click.echo(f"problem: {p}")
    if report["problems"]:
        sys.exit(1)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@main.group()
def data() -> None:
    """Built-in datasets."""


@data.command("digits")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", default=64, show_default=True, help="Side of the written images (upscaled from 8x8).")
@click.option("--val-fraction", default=0.2, show_default=True, help="Share of each class held out in val/.")
@click.option("--seed", default=0, show_default=True)
def data_digits(out: Path, size: int, val_fraction: float, seed: int) -> None:
    """Write scikit-learn's handwritten digits (1,797 images, 10 classes) as an RGB ImageFolder."""
    from toolkit.training.data import write_digits

    counts = write_digits(out, size=size, val_fraction=val_fraction, seed=seed)
    click.echo(f"wrote {counts['train']} train and {counts['val']} val images ({size}x{size}) to {out}")


@main.command("train")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Folder for checkpoints and metrics.")
@click.option("--arch", default="resnet18", show_default=True, help="Any torchvision ResNet (resnet18 ... resnext101_64x4d).")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="DEFAULT, a weights name (IMAGENET1K_V1, IMAGENET1K_V2), a file (state dict or rtk checkpoint), or none.")
@click.option("--reset-head", is_flag=True, help="Load all weights but the final fc layer (another class count).")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=2e-3, show_default=True, help="Peak learning rate of the new head.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--weight-decay", default=0.05, show_default=True)
@click.option("--warmup-epochs", default=1.0, show_default=True, help="Linear warm-up, then cosine decay to zero.")
@click.option("--label-smoothing", default=0.1, show_default=True)
@click.option("--freeze-backbone", is_flag=True, help="Train the head only (until --unfreeze-at).")
@click.option("--unfreeze-at", type=int, default=None, help="Epoch (from 1) at which a frozen backbone starts learning.")
@click.option("--backbone-lr-scale", default=1.0, show_default=True,
              help="Backbone learning rate as a share of --lr; 0.1 keeps pretrained features from drifting.")
@click.option("--image-size", default=224, show_default=True, help="Crop side fed to the network.")
@click.option("--resize-size", type=int, default=None, help="Eval resize of the shorter side [image-size / 0.875].")
@click.option("--crop-scale", default=0.35, show_default=True,
              help="Lower area bound of RandomResizedCrop. torchvision's ImageNet 0.08 is too aggressive for small "
                   "or low-resolution datasets; lower it only for large, varied data.")
@click.option("--hflip/--no-hflip", default=True, show_default=True,
              help="Random horizontal flips; turn off when mirror images mean something else (digits, text).")
@click.option("--val-split", default=0.2, show_default=True, help="Held-out share when DATA has no train/ and val/.")
@click.option("--workers", type=int, default=None, help="Data loader processes [from the usable CPUs].")
@click.option("--seed", default=0, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on CPUs with AMX/AVX512-BF16 (images over 16 px), fp16 AMP on CUDA, else fp32.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--strict", is_flag=True, help="Fail on an undecodable image instead of skipping it.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue from DIR/last.pt with its saved options (--epochs may extend the run).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def train_cmd(ctx: click.Context, data_dir: Path, output: Path, resume: Path | None, quiet: bool, **options) -> None:
    """Fine-tune a torchvision ResNet on an ImageFolder (DATA/train + DATA/val, or DATA/<class>/...).

    Defaults suit small datasets: AdamW, warm-up then cosine, label smoothing 0.1, crops covering at
    least 35% of the image. Writes checkpoint.pt (best val top-1), last.pt, history.csv, metrics.json.
    """
    from toolkit.training.train import TrainConfig, train

    explicit_epochs = ctx.get_parameter_source("epochs") == click.core.ParameterSource.COMMANDLINE
    config = TrainConfig(**options)
    # a resumed run keeps its own plan; only an explicit --epochs extends it
    metrics = train(data_dir, output, config, resume=resume, echo=click.echo, progress=not quiet,
                    extend_to=options["epochs"] if resume is not None and explicit_epochs else None)
    if metrics.get("rank", 0) != 0:
        return  # under torchrun only rank 0 reports
    click.echo(f"best val top-1 {metrics['best_val_top1']:.4f} (epoch {metrics['best_epoch']}), "
               f"top-5 {metrics['best_val_top5']:.4f}; {metrics['train_seconds']:.1f}s, "
               f"{metrics['images_per_second']:.1f} img/s; wrote {output}/checkpoint.pt")


@main.command("export")
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMATS),
              help="Repeatable [onnx, torchscript, pt2]; openvino adds OpenVINO IRs (with onnx); aoti an AOTInductor "
                   "package (compiled native code).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
              help="Repeatable [fp32]: fp16 and int8 ONNX files (int8 needs --calibration-data), a bf16 AOTInductor "
                   "package (on a CPU with AMX or AVX512-BF16).")
@click.option("--opset", default=18, show_default=True)
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True,
              help="dynamo: torch.onnx.export(dynamo=True); legacy: the TorchScript-based exporter.")
@click.option("--softmax", is_flag=True, help="Add a second output, probabilities.")
@click.option("--calibration-data", type=click.Path(), default=None, help="Images or an ImageFolder for int8.")
@click.option("--calibration-size", default=200, show_default=True)
@click.option("--arch", default=None, help="With no CHECKPOINT: export torchvision weights; with a plain state dict: its arch.")
@click.option("--weights", default=None, help="torchvision weights for --arch (DEFAULT, IMAGENET1K_V1, ...).")
@click.option("--num-classes", type=int, default=None, help="Classes of a plain state dict.")
@click.option("--image-size", type=int, default=None, help="Crop size for a plain state dict [224].")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Run rtk verify on the new bundle.")
@click.option("--any-size/--no-any-size", default=True, show_default=True,
              help="With ONNX, also write model.any-size.onnx: resize and center crop inside the graph (any image size in).")
def export_cmd(checkpoint: Path | None, output: Path, formats: tuple[str, ...], precisions: tuple[str, ...], opset: int,
               exporter: str, softmax: bool, calibration_data: str | None, calibration_size: int, arch: str | None,
               weights: str | None, num_classes: int | None, image_size: int | None, force: bool, verify: bool,
               any_size: bool) -> None:
    """Export CHECKPOINT (or torchvision --arch/--weights) to a bundle: model.onnx, model.ts, model.pt2,
    labels.txt, manifest.json. Input: uint8 [N, S, S, 3] RGB; the preprocessing is inside the graph."""
    from toolkit.export.exporter import ExportConfig, export_bundle

    config = ExportConfig(formats=formats or DEFAULT_FORMATS, precisions=precisions or ("fp32",),
                          opset=opset, exporter=exporter, softmax=softmax, calibration_data=calibration_data,
                          calibration_size=calibration_size, force=force, verify=verify, any_size=any_size)
    export_bundle(output, config, checkpoint, arch, weights, num_classes, image_size, echo=click.echo)
    click.echo(f"bundle written to {output}")
    if verify:
        _run_verify(output, images=calibration_data, random_images=config.verify_random, checkpoint=None)



@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Reference checkpoint [the one the manifest names, sha256 checked].")
@click.option("--images", type=click.Path(), default=None, help="Image files, a folder, or an ImageFolder (gives accuracy).")
@click.option("--random", "random_images", type=int, default=None, help="Add N random uint8 images [16 without --images].")
@click.option("--runtime", "runtimes", multiple=True, help="Only these runtimes (repeatable) [every one available].")
@click.option("--atol", default=1e-4, show_default=True, help="fp32 allclose atol.")
@click.option("--rtol", default=1e-3, show_default=True, help="fp32 allclose rtol.")
@click.option("--fp16-min-top1", default=1.0, show_default=True,
              help="fp16/bf16 minimum top-1 agreement on the images where the reference is decisive.")
@click.option("--int8-min-top1", default=1.0, show_default=True,
              help="int8 minimum top-1 agreement on the images where the reference is decisive.")
@click.option("--int8-max-accuracy-drop", default=0.01, show_default=True, help="int8 maximum accuracy drop (fraction).")
@click.option("--decisive-margin", default=0.05, show_default=True,
              help="Decisive: the reference's top two logits differ by more than this x the largest |logit|.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Only the runtimes on this device (those unavailable here are listed as skipped).")
@click.option("--threads", type=int, default=None)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the records as JSON.")
@click.option("--endpoint", default=None, metavar="URL",
              help="Verify a live KServe-v2 server instead (rtk serve, Triton, KServe): which bundle file it serves, "
                   "and that file's gate against the eager model. Exit 2 when unreachable.")
@click.option("--model", "endpoint_model", default=None, help="With --endpoint: the model name [the bundle folder's name].")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="With --endpoint: the v2 protocol's transport.")
@click.option("--token-env", default=None, metavar="VAR", help="With --endpoint: a variable holding a bearer token.")
@trust_option
@native_code_option
def verify_cmd(bundle: Path, checkpoint: Path | None, images: str | None, random_images: int | None, runtimes: tuple[str, ...],
               atol: float, rtol: float, fp16_min_top1: float, int8_min_top1: float, int8_max_accuracy_drop: float,
               decisive_margin: float, device: str | None, threads: int | None, json_path: Path | None,
               endpoint: str | None, endpoint_model: str | None, protocol: str, token_env: str | None,
               trust: tuple[Path, ...], allow_native_code: bool) -> None:
    """Prove every artifact in BUNDLE matches the eager model, or (--endpoint) that a live server answers like
    one of them. Exit 0 all pass, 1 any fails, 2 usage error or endpoint unreachable."""
    from toolkit.evaluation.verify import Gates

    gates = Gates(atol=atol, rtol=rtol, half_top1=fp16_min_top1, int8_top1=int8_min_top1,
                  int8_max_accuracy_drop=int8_max_accuracy_drop, decisive_margin=decisive_margin)
    random_images = random_images if random_images is not None else (0 if images else 16)
    if endpoint and trust:
        raise RtkError("--trust checks a bundle before verify runs it; with --endpoint the server's file is checked "
                       "against the bundle, which --trust does not cover yet: drop one of the two")
    if endpoint:
        from toolkit.evaluation.endpoint import Endpoint

        target = Endpoint(endpoint, model=endpoint_model, protocol=protocol, token_env=token_env)
        return _run_verify_endpoint(bundle, target, images, random_images, checkpoint, gates, threads, json_path,
                                    list(runtimes) or None)
    _run_verify(bundle, images, random_images, checkpoint, runtimes=list(runtimes) or None, gates=gates,
                threads=threads, device=device, json_path=json_path, trust=list(trust) or None,
                allow_native_code=allow_native_code)


def _run_verify(bundle, images, random_images, checkpoint, json_path=None, **options) -> None:
    from toolkit.core.fileio import check_writable_file
    from toolkit.evaluation.verify import format_report, verify_bundle

    check_writable_file(json_path)
    report = verify_bundle(bundle, images=images, random_images=random_images, checkpoint=checkpoint, **options)

    def failure() -> str:
        failed = [f"{r['artifact']} on {r['runtime']} ({', '.join(r['failed_metrics'])})" for r in report["records"] if not r["passed"]]
        reason = "; ".join(failed) or ("no runtime could run" if not report["records"]
                                       else "in-graph preprocessing differs from Normalize")
        return "verification failed: " + reason

    _report(report, format_report(report), json_path, failure)


def _run_verify_endpoint(bundle, target, images, random_images, checkpoint, gates, threads, json_path, runtimes) -> None:
    from toolkit.core.fileio import check_writable_file
    from toolkit.evaluation.endpoint import failure_line, format_endpoint_report, verify_endpoint

    check_writable_file(json_path)
    report = verify_endpoint(bundle, target, images=images, random_images=random_images, checkpoint=checkpoint,
                             gates=gates, threads=threads, runtimes=runtimes)
    _report(report, format_endpoint_report(report), json_path, lambda: failure_line(report))


def _report(report: dict, text: str, json_path: Path | None, failure) -> None:
    """Print a verification's table, write its JSON, and fail with `failure()`'s line when it did not pass."""
    from toolkit.core.fileio import write_json
    from toolkit.errors import CheckFailed

    click.echo(text)
    if json_path:
        write_json(json_path, report)
    if not report["passed"]:
        raise CheckFailed(failure())


@main.command("benchmark")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runtime", "runtimes", multiple=True, help="Repeatable [every runtime available here].")
@click.option("--artifact", "artifacts", multiple=True,
              help="Only this bundle file (repeatable) [all]; the checkpoint's runtimes (eager, torch-compile) always run.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Only the runtimes on this device (those unavailable here are listed as skipped).")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, help="Repeatable [1 and 8].")
@click.option("--warmup", default=10, show_default=True)
@click.option("--iterations", default=50, show_default=True, help="At least this many timed calls ...")
@click.option("--min-seconds", default=2.0, show_default=True, help="... and at least this long.")
@click.option("--threads", type=int, default=None, help="torch and onnxruntime threads [CPUs in this process's affinity].")
@click.option("--sweep", is_flag=True, help="Also try thread counts x batch sizes; report best latency and throughput.")
@click.option("--cuda-graph", is_flag=True, help="onnxruntime CUDA graphs for the IO-binding runtime (one --batch-size).")
@click.option("--interleave/--sequential", default=True, show_default=True,
              help="Time the runtimes in shuffled rounds (a host slowdown hits all alike), or one after the other.")
@click.option("--rounds", default=10, show_default=True, help="Interleaved rounds.")
@click.option("--any-size-input", default="640x480", show_default=True,
              help="WIDTHxHEIGHT of the whole images model.any-size.onnx gets (it resizes and crops them itself).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None)
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None)
@native_code_option
def benchmark_cmd(bundle: Path, runtimes: tuple[str, ...], artifacts: tuple[str, ...], device: str | None, batch_sizes: tuple[int, ...], warmup: int, iterations: int,
                  min_seconds: float, threads: int | None, sweep: bool, cuda_graph: bool, interleave: bool, rounds: int,
                  any_size_input: str,
                  json_path: Path | None,
                  csv_path: Path | None, markdown_path: Path | None, allow_native_code: bool) -> None:
    """Latency and throughput of BUNDLE on every runtime; unavailable runtimes are listed with the reason."""
    from toolkit.core.fileio import check_writable_file
    from toolkit.evaluation.benchmark import BenchConfig, run_benchmark, table, write_outputs

    for path in (json_path, csv_path, markdown_path):
        check_writable_file(path)  # before the run, not after it
    config = BenchConfig(runtimes=runtimes or None, device=device, batch_sizes=batch_sizes or (1, 8), warmup=warmup,
                         iterations=iterations, min_seconds=min_seconds, threads=threads, sweep=sweep, cuda_graph=cuda_graph,
                         any_size_input=_width_height(any_size_input), interleave=interleave, rounds=rounds,
                         allow_native_code=allow_native_code, artifacts=artifacts or None)
    report = run_benchmark(bundle, config, echo=click.echo)
    click.echo("")
    click.echo(table(report))
    write_outputs(report, json_path, csv_path, markdown_path)
    if not report["passed"]:
        from toolkit.errors import CheckFailed

        failed = [f"{r['runtime']} {r['artifact']}" for r in report["results"] if r.get("failed")]
        raise CheckFailed(f"{len(failed)} runtime(s) could not run their artifact: {', '.join(failed)}")


def _width_height(text: str) -> tuple[int, int]:
    from toolkit.errors import RtkError

    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise RtkError(f"--any-size-input must look like 640x480, got {text!r}") from None
    return width, height


@main.command("optimize")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--calibration-data", required=True, type=click.Path(),
              help="Images for int8 calibration; an ImageFolder with train/ and val/ also gives the held-out set.")
@click.option("--holdout", type=click.Path(), default=None, help="Labelled ImageFolder the candidates are verified on.")
@click.option("--max-accuracy-drop", default=0.5, show_default=True,
              help="Largest top-1 accuracy drop allowed, in points (on the paired point estimate).")
@click.option("--decisive-margin", default=0.05, show_default=True,
              help="Top-1 must agree where the reference's top two logits differ by more than this x the largest |logit|.")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, help="Repeatable [1]; the first one ranks.")
@click.option("--threads", type=int, default=None, help="[CPUs in this process's affinity]")
@click.option("--calibration-size", default=200, show_default=True)
@click.option("--min-seconds", default=2.0, show_default=True, help="Benchmark time per candidate and batch size.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None, help="Write the ranked table.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@native_code_option
def optimize_cmd(bundle: Path, calibration_data: str, holdout: str | None, max_accuracy_drop: float, decisive_margin: float,
                 batch_sizes: tuple[int, ...], threads: int | None, calibration_size: int, min_seconds: float,
                 markdown_path: Path | None, json_path: Path | None, allow_native_code: bool) -> None:
    """Build int8 variants and an optimised graph, verify every CPU candidate on held-out images,
    benchmark those that pass, and record the fastest as the bundle's recommended deployment."""
    from toolkit.core.fileio import check_writable_file, write_json, write_text
    from toolkit.evaluation.optimize import OptimizeConfig, format_table, optimize_bundle
    from toolkit.evaluation.verify import Gates

    for path in (markdown_path, json_path):
        check_writable_file(path)
    config = OptimizeConfig(calibration_data=calibration_data, holdout=holdout, max_accuracy_drop=max_accuracy_drop,
                            batch_sizes=batch_sizes or (1,), threads=threads, calibration_size=calibration_size,
                            min_seconds=min_seconds, gates=Gates(decisive_margin=decisive_margin),
                            allow_native_code=allow_native_code)
    report = optimize_bundle(bundle, config, echo=click.echo)
    click.echo("")
    click.echo(format_table(report))
    if markdown_path:
        write_text(markdown_path, format_table(report, markdown=True) + "\n")
    if json_path:
        write_json(json_path, report)

@main.command("predict")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", default=5, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--provider", "providers", multiple=True, help="onnxruntime provider: cpu, cuda, tensorrt or a full name [cpu].")
@click.option("--threads", type=int, default=None)
@click.option("--self-test", is_flag=True, help="Check the model against the outputs stored at export first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every prediction.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Write a Parquet dataset (a folder of parts; rerun to resume) instead of printing. INPUT may "
                   "then be a manifest: .txt / .csv / .parquet of paths or URIs (.parquet: or image bytes).")
@click.option("--logits", is_flag=True, help="With --output: a logits column too.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="With --output: this process, or Ray Data (pip install 'rtk[ray]').")
@click.option("--address", default=None, help="--engine ray: the cluster (auto, ray://host:10001) [a local one].")
@click.option("--workers", type=int, default=None,
              help="With --output: decoding threads (local) [CPUs, at most 8] or Ray actors (ray) [1].")
@click.option("--part-rows", type=int, default=None, help="With --output: rows per part file [4096].")
@trust_option
def predict_cmd(bundle: Path, images: tuple[Path, ...], top_k: int, batch_size: int, providers: tuple[str, ...],
                threads: int | None, self_test: bool, as_json: bool, output: Path | None, logits: bool, engine: str,
                address: str | None, workers: int | None, part_rows: int | None, trust: tuple[Path, ...]) -> None:
    """Classify image files or folders with the torch-free runtime. Exit 1 if any image failed."""
    from toolkit.core.preprocess import list_images
    from toolkit.errors import RtkError
    from toolkit.serving.classifier import Classifier, Prediction

    batch_only = {"--logits": logits, "--engine": engine != "local", "--address": address,
                  "--workers": workers is not None, "--part-rows": part_rows is not None}
    if output is None and any(batch_only.values()):
        raise RtkError(f"{next(k for k, v in batch_only.items() if v)} needs --output")
    if trust and engine == "ray":
        raise RtkError("--trust with --engine ray: the Ray actors load the bundle themselves, unchecked; use --engine local")
    clf = Classifier.load(bundle, providers=providers or None, threads=threads, self_test=self_test,
                          trust=list(trust) or None)
    if output is not None:
        _predict_to_parquet(clf, bundle, images, output, top_k, batch_size, providers, threads, as_json, logits,
                            engine, address, workers, part_rows)
        return
    paths, missing = [], []
    for item in images:  # a missing path is reported with the others' predictions, not instead of them
        try:
            paths += list_images(item)
        except RtkError as exc:
            missing.append(Prediction(str(item), [], [], [], error=str(exc)))
    predictions = clf.predict(paths, top_k=top_k, batch_size=batch_size) + missing
    if as_json:
        click.echo(json.dumps({"model": str(clf.path), "providers": clf.providers,
                               "predictions": [p.to_dict() for p in predictions]}, indent=2))
    else:
        for p in predictions:
            click.echo(f"{p.source}\t{p.labels[0]}\t{p.scores[0]:.4f}" if p.ok else f"{p.source}\terror: {p.error}")
    failed = [p for p in predictions if not p.ok]
    if failed:
        click.echo(f"{len(failed)} of {len(predictions)} images failed", err=True)
        sys.exit(1)


def _predict_to_parquet(clf, bundle: Path, images: tuple[Path, ...], output: Path, top_k: int, batch_size: int,
                        providers: tuple[str, ...], threads: int | None, as_json: bool, logits: bool, engine: str,
                        address: str | None, workers: int | None, part_rows: int | None) -> None:
    """`rtk predict --output`: the batch job (toolkit.serving.batch), one summary line, exit 1 if any row failed."""
    from toolkit.serving.batch import PART_ROWS, BatchOptions, run_local

    if as_json:
        raise RtkError("--json prints predictions; with --output they go to Parquet: drop one of the two")
    options = BatchOptions(top_k=top_k, logits=logits, part_rows=part_rows or PART_ROWS, batch_size=batch_size)
    if engine == "ray":
        from toolkit.serving.batch_ray import run_ray

        result = run_ray(clf, bundle, images, output, options, address=address, workers=workers or 1,
                         threads=threads, providers=providers or None)
    else:
        if address:
            raise RtkError("--address needs --engine ray")
        result = run_local(clf, images, output, options, decoders=workers)
    click.echo(result.summary())
    if result.any_failed:
        sys.exit(1)


@main.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes the server.")
@click.option("--port", default=8000, show_default=True)
@click.option("--name", default=None, help="Model name in the URLs [the bundle folder's name].")
@click.option("--max-batch-size", default=8, show_default=True, help="Rows merged into one model call (1: no batching).")
@click.option("--max-queue-delay-ms", default=2.0, show_default=True, help="How long a request may wait for others.")
@click.option("--max-queue", default=64, show_default=True, help="Requests waiting at most; more get 503 + Retry-After.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="Inference threads [the recommendation's, else onnxruntime's].")
@click.option("--max-body-mb", default=32.0, show_default=True, help="Largest request body.")
@click.option("--token-env", default="RTK_SERVE_TOKEN", show_default=True,
              help="Environment variable holding a bearer token; when set, every endpoint but liveness needs it.")
@click.option("--metrics-token-env", default=None,
              help="Environment variable holding the bearer token /metrics needs [none: /metrics is open].")
@click.option("--max-images", default=64, show_default=True, help="Images in one /classify request at most.")
@click.option("--max-json-mb", default=8.0, show_default=True,
              help="Largest JSON part of an /infer request (send big tensors as binary data).")
@click.option("--max-inflight-mb", default=256.0, show_default=True,
              help="Request bodies held in memory at once, all clients together; beyond it 503.")
@click.option("--max-connections", default=256, show_default=True,
              help="Open connections at most; the longest-idle one is closed to make room.")
@click.option("--max-header-kb", default=64, show_default=True, help="Request line and headers at most.")
@click.option("--header-timeout-s", default=10.0, show_default=True,
              help="A connection must send a whole request head within this time, else it is closed.")
@click.option("--body-timeout-s", default=60.0, show_default=True,
              help="A request body must arrive within this time, else 400 and the connection is closed.")
@click.option("--keep-alive-s", default=5.0, show_default=True, help="Idle keep-alive connections are closed after.")
@trust_option
def serve_cmd(bundle: Path, trust: tuple[Path, ...], **options) -> None:
    """Serve BUNDLE over the Open Inference Protocol (KServe v2 / Triton HTTP): /v2/models/NAME/infer,
    /v2/models/NAME/classify for encoded images, /metrics. Stops cleanly on SIGTERM."""
    from toolkit.serving.server import ServeConfig, serve

    serve(ServeConfig(bundle=str(bundle), trust=tuple(str(k) for k in trust), **options), echo=click.echo)


@main.command("triton")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Triton model repository folder.")
@click.option("--name", default=None, help="Model name [the bundle folder's name].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda", show_default=True)
@click.option("--max-batch-size", default=32, show_default=True)
@click.option("--tensorrt", is_flag=True, help="With --device cuda: Triton's TensorRT accelerator (FP16) for the ONNX model.")
@click.option("--force", is_flag=True, help="Replace the model folder if it exists.")
@click.option("--threads", type=int, default=None,
              help="onnxruntime intra-op threads per instance (intra_op_thread_count) [onnxruntime's default].")
@trust_option
@click.option("--key", type=click.Path(path_type=Path), default=None,
              help="Sign the model folder with this EC private key (NAME/bundle.sig).")
@click.option("--password-env", default=None, metavar="VAR", help="With --key: a variable holding the key's password.")
def triton_cmd(bundle: Path, output: Path, name: str | None, device: str, max_batch_size: int, tensorrt: bool,
               force: bool, threads: int | None, trust: tuple[Path, ...], key: Path | None, password_env: str | None) -> None:
    """Write BUNDLE as a Triton model repository (onnxruntime backend), validated with Triton's own ModelConfig."""
    from toolkit.serving.signing import password_from_env
    from toolkit.serving.triton import TritonConfig, write_repository

    if password_env and key is None:
        raise RtkError("--password-env needs --key")
    folder = write_repository(bundle, TritonConfig(output=output, name=name, device=device, max_batch_size=max_batch_size,
                                                   tensorrt=tensorrt, force=force, threads=threads),
                              trust=list(trust) or None, key=key, password=password_from_env(password_env))
    click.echo(f"wrote {folder} (config.pbtxt validated against Triton's ModelConfig and the ONNX file)"
               + (f"; signed with {key}" if key else ""))


@main.command("sign")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), help="EC private key (PEM; P-256, P-384 or P-521).")
@click.option("--password-env", default=None, metavar="VAR", help="A variable holding the key's password.")
def sign_cmd(bundle: Path, key: Path, password_env: str | None) -> None:
    """Sign every file of BUNDLE (OpenSSF model signing) into BUNDLE/bundle.sig, replacing an old signature.
    Consumers check it with --trust PUB.pem. Sign last: a later change to any file breaks the signature."""
    from toolkit.serving.signing import SIGNATURE, password_from_env, sign_bundle

    count = sign_bundle(bundle, key, password_from_env(password_env))
    click.echo(f"signed {count} files of {bundle} into {bundle / SIGNATURE}")


@main.command("demo")
@click.option("--output", "-o", default="artifacts/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--arch", default="resnet18", show_default=True)
@click.option("--epochs", default=8, show_default=True)
@click.option("--image-size", default=32, show_default=True, help="Side of the digits images and of the crop.")
@click.option("--min-seconds", default=1.0, show_default=True, help="Benchmark time per runtime and batch size.")
@click.option("--native-code/--no-native-code", default=True, show_default=True,
              help="Also compile AOTInductor packages and load them (the demo's own compile) in verify and benchmark.")
def demo_cmd(output: Path, arch: str, epochs: int, image_size: int, min_seconds: float, native_code: bool) -> None:
    """The whole pipeline on the built-in digits: data, train, export, verify, benchmark, predict, report."""
    from toolkit.evaluation.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output=output, arch=arch, epochs=epochs, image_size=image_size, min_seconds=min_seconds,
                        native_code=native_code), cli=main, echo=click.echo)
