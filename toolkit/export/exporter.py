"""Export stage: TorchScript, torch.export and ONNX (fp32, fp16, int8) bundles with preprocessing in the graph.

Which files a format family has lives in `toolkit.core.formats`; `WRITERS` here maps each row's writer
key to the function that plans its files (one `Job` each), and the stage writes and checks every job alike.

Every file is written into a staging folder that replaces the bundle folder only once every file
was written and checked, so a failure never leaves a half-written bundle. Every file goes through a
Python file object (a full disk is an OSError naming the file, never an abort of the process), and
the output may not be, hold or lie inside what the export reads (checkpoint, run, calibration images).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import __version__
from toolkit.core.bundle import ANY_SIZE, INPUT_NAME, LABELS, MANIFEST, OUTPUT_NAMES, SELFTEST, selftest_key
from toolkit.core.fileio import (
    check_replaceable,
    check_writable_dir,
    install_folder,
    library_writes,
    naming,
    refuse_overlap,
    sha256_file,
    write_json,
    write_text,
    writer_file,
)
from toolkit.core.formats import (
    ANY_SIZE_FILE,
    FORMATS,
    PRECISIONS,
    ROWS,
    ArtifactFormat,
    file_name,
    of_format,
    row,
)
from toolkit.core.hardware import cpu_info
from toolkit.core.openvino_ir import entry_extra
from toolkit.core.versions import library_versions
from toolkit.errors import RtkError
from toolkit.export.graph import AnySizeClassifier, ImageClassifier
from toolkit.export.onnx_metadata import set_onnx_metadata
from toolkit.export.quantize import calibration_crops, int8_recipe_for, write_int8
from toolkit.training.checkpoint import RUN_FILES, ModelSource, load_source

EXPORTERS = ("dynamo", "legacy")
MIN_OPSET = {"dynamo": 18, "legacy": 11}
CHECK_BATCHES = (1, 3, 16)
SELFTEST_IMAGES = 8


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ("onnx", "torchscript", "pt2")
    precisions: tuple[str, ...] = ("fp32",)
    opset: int = 18
    exporter: str = "dynamo"
    softmax: bool = False
    calibration_data: str | None = None
    calibration_size: int = 200
    example_batch: int = 2
    force: bool = False
    verify: bool = True
    verify_random: int = 16
    seed: int = 0
    any_size: bool = True  # also write model.any-size.onnx (resize + center crop in the graph)

    def __post_init__(self) -> None:
        import onnx

        for f in self.formats:
            if f not in FORMATS:
                raise RtkError(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise RtkError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
        for p in sorted(set(self.precisions) - {"fp32"}):
            having = [r.name for r in ROWS if r.choice and p in r.precisions]
            if not any(r.written_with(self.formats) and p in r.precisions for r in ROWS):
                raise RtkError(f"--precision {p} is written with --format {' or '.join(having)}: add --format {having[0]}")
        for f in self.formats:
            needs = row(f).needs
            if needs and needs not in self.formats:
                raise RtkError(f"--format {f} converts the {row(needs).title} file: add --format {needs}")
        if self.exporter not in EXPORTERS:
            raise RtkError(f"unknown exporter {self.exporter!r}; choose from {', '.join(EXPORTERS)}")
        top = onnx.defs.onnx_opset_version()
        if not MIN_OPSET[self.exporter] <= self.opset <= top:
            raise RtkError(f"--opset {self.opset} is outside what the {self.exporter} exporter supports "
                           f"({MIN_OPSET[self.exporter]} to {top})")
        if "int8" in self.precisions and not self.calibration_data:
            raise RtkError("--precision int8 needs --calibration-data DIR (images or an ImageFolder)")
        if self.calibration_size < 1 or self.example_batch < 2:
            raise RtkError("--calibration-size must be >= 1 and the example batch >= 2")


def metadata(source: ModelSource, precision: str, softmax: bool) -> dict[str, str]:
    """Key/values stored inside every model file, so a file alone says what it is."""
    return {
        "classes": json.dumps(list(source.classes)),
        "num_classes": str(len(source.classes)),
        "preprocess": json.dumps(source.preprocess.to_dict()),
        "arch": source.arch,
        "precision": precision,
        "outputs": json.dumps(list(OUTPUT_NAMES[: 2 if softmax else 1])),
        "source_sha256": source.sha256 or "",
        "source_weights": source.weights or "",
        "toolkit_version": __version__,
        "torch_version": torch.__version__,
    }


# ---------------------------------------------------------------- writers


def _example(spec, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, spec.crop_size, spec.crop_size, 3), dtype=torch.uint8, generator=g)


MIN_SIDE = 2  # the smallest image side the any-size graph is exported for (a 1-pixel side specialises)


def write_onnx(module, example: torch.Tensor, path: Path, config: ExportConfig, meta: dict[str, str],
               any_size: bool = False) -> None:
    import onnx

    softmax = module.classifier.softmax if any_size else module.softmax
    outputs = list(OUTPUT_NAMES[: 2 if softmax else 1])
    tmp = path.with_suffix(".raw.onnx")
    if config.exporter == "dynamo":
        dims = {0: torch.export.Dim("batch", min=1, max=65536)}
        if any_size:  # one size per batch, any size per call
            dims |= {1: torch.export.Dim("height", min=MIN_SIDE, max=65536), 2: torch.export.Dim("width", min=MIN_SIDE, max=65536)}
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=outputs,
                                    opset_version=config.opset, dynamic_shapes={"image": dims}, verbose=False)
        program.save(str(tmp), external_data=False)
    else:
        axes = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
        torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=[INPUT_NAME], output_names=outputs,
                          opset_version=config.opset, dynamic_axes=axes, do_constant_folding=True)
    model = onnx.load(str(tmp))
    tmp.unlink()
    set_onnx_metadata(model, meta)
    onnx.save(model, str(path))


def write_fp16(fp32_path: Path, path: Path, meta: dict[str, str]) -> None:
    """fp16 weights and activations; the uint8 input and float32 outputs stay as they are."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    set_onnx_metadata(model, meta)
    onnx.save(model, str(path))


def write_torchscript(module: ImageClassifier, example: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    # Tracing bakes cuDNN's allow_tf32 flag into every convolution as a constant (on by default): traced
    # with it on, the file would run TF32 convolutions on a GPU whatever the caller sets, and miss fp32 parity.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        traced = torch.jit.trace(module, example, check_inputs=[(example[:1],)])
    with open(path, "wb") as fh:  # given a path, torch.jit.save writes in C++ and aborts on a full disk
        torch.jit.save(traced, fh, _extra_files={f"{k}.txt": v for k, v in meta.items()})


def write_pt2(module: ImageClassifier, example: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(module, (example,), dynamic_shapes={"image": {0: batch}})
    with writer_file(path) as fh:  # torch.export.save aborts on a full disk, given a path or a plain file
        torch.export.save(program, fh, extra_files={f"{k}.txt": v for k, v in meta.items()})


# ---------------------------------------------------------------- checks


def check_onnx(path: Path) -> dict[str, Any]:
    """Full checker, shape inference, and one onnxruntime run; returns the file's I/O contract."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    except Exception as exc:
        raise RtkError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from None

    def contract(values) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": contract(inferred.graph.input), "outputs": contract(inferred.graph.output)}


def _session_runner(path: Path, engine: str):
    """Every output of the file, from the serving session of its format's engine."""
    from toolkit.serving.sessions import SessionSettings, open_session

    backend = open_session(path, SessionSettings(engine=engine))
    return lambda x: backend.run_all(x.numpy())


def _torch_runner(module):
    def run(x):
        with torch.inference_mode():
            out = module(x)
        return [o.cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]  # a CUDA package's too

    return run


def reload_runner(path: Path, fmt: str):
    """A function running the written file as a fresh reader would: its format's serving session
    (onnxruntime, OpenVINO) or its torch loader (torch.jit, torch.export)."""
    family = of_format(fmt, path.name)
    if family.loader is None:  # a serving engine's file (toolkit.serving.sessions.ENGINES)
        return _session_runner(path, family.engine)
    from toolkit.export import loaders

    return _torch_runner(getattr(loaders, family.loader)(path))


def write_any_size(module: AnySizeClassifier, path: Path, config: ExportConfig, meta: dict[str, str]) -> None:
    """The any-size graph, exported from an example whose height and width differ (so neither is mistaken
    for the other) and are not the crop size."""
    s = module.resize.crop_size
    g = torch.Generator().manual_seed(config.seed)
    example = torch.randint(0, 256, (config.example_batch, s + 7, 2 * s + 3, 3), dtype=torch.uint8, generator=g)
    write_onnx(module, example, path, config, {**meta, "input": ANY_SIZE}, any_size=True)


def check_any_size(path: Path, module: AnySizeClassifier) -> None:
    """Run image sizes the export never saw (portrait, landscape, square, tiny, large) against the eager
    module: a size baked in as a constant would show here."""
    run = reload_runner(path, "onnx")
    s = module.resize.crop_size
    for i, (h, w) in enumerate([(3 * s, s + 1), (s, s), (MIN_SIDE, 5 * s), (4 * s + 9, 2)]):
        image = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        got = run(image)[0]
        with torch.inference_mode():
            want = module(image)
            want = (want[0] if isinstance(want, tuple) else want).numpy()
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-3, rtol=1e-3):
            diff = f"max abs diff {float(np.abs(got - want).max()):.3g}" if got.shape == want.shape else f"shape {got.shape}"
            raise RtkError(f"{path.name}: a {h}x{w} image gave other logits than the eager model ({diff})")


def check_dynamic_batch(path: Path, fmt: str, spec, num_classes: int, softmax: bool) -> None:
    """Reload the file and run batches 1, 3 and 16: the batch dimension must really be dynamic."""
    run = reload_runner(path, fmt)
    for n in CHECK_BATCHES:
        outs = run(_example(spec, n, seed=n))
        if outs[0].shape != (n, num_classes) or outs[0].dtype != np.float32 or len(outs) != (2 if softmax else 1):
            raise RtkError(f"{path.name}: batch {n} gave outputs {[o.shape for o in outs]}, expected [{n}, {num_classes}] float32")
        if not np.isfinite(outs[0]).all():
            raise RtkError(f"{path.name}: batch {n} gave non-finite logits")


# ---------------------------------------------------------------- the stage


def _sources(checkpoint: str | Path | None, arch: str | None, weights: str | None,
             calibration_data: str | None) -> list[tuple[str, Path]]:
    """What the export reads, named for the refusal of an output that would replace or change it."""
    sources: list[tuple[str, Path]] = []
    if checkpoint is not None:
        path = Path(checkpoint)
        sources.append(("the checkpoint", path))
        if any((path.parent / name).is_file() for name in RUN_FILES if name != path.name):
            sources.append(("its training run", path.parent))  # last.pt, history.csv ... beside it
    elif arch is not None and weights is not None and weights.lower() != "none":
        from toolkit.training.models import cached_weights_path, pretrained_weights

        sources.append(("the pretrained weights", cached_weights_path(pretrained_weights(arch, weights))))
    if calibration_data:
        sources.append(("the calibration images", Path(calibration_data)))
    return sources


def _prepare_output(output: Path, force: bool) -> None:
    """Fail before the work on an output that needs --force; `install_folder` checks again, under the lock."""
    check_replaceable(output, force)
    # the bundle is staged beside its final place, then moved there
    check_writable_dir(output.parent if output.exists() else output)


@dataclass(frozen=True)
class ExportInputs:
    """What every writer reads, loaded once before the first file is written."""

    config: ExportConfig
    source: ModelSource
    model: Any  # the eager torchvision model
    module: ImageClassifier  # the model with the preprocessing in front: what the crop-size files hold
    example: torch.Tensor  # the uint8 example batch the graphs are traced or exported from
    crops: np.ndarray | None  # the calibration crops (int8 files, the self-test images)
    echo: Callable[[str], None]


@dataclass(frozen=True)
class Job:
    """One file a writer plans: how to write it, what wrote it, and its checks beyond the batch check."""

    name: str
    family: ArtifactFormat
    precision: str
    write: Callable[[Path, dict[str, str]], None]  # (path in the staging folder, metadata to store inside)
    exporter: str  # the manifest entry's "exporter"
    contract: Callable[[Path], dict[str, Any]] | None = None  # reads the I/O contract; None: the declared one
    extra: Callable[[Path], dict[str, Any]] | None = None  # more checks; returns more manifest fields
    opset: int | None = None  # ONNX files only
    device: str = "cpu"  # where the file runs (an AOTInductor package is compiled for one device)


# ---------------------------------------------------------------- the writers, by core.formats writer key


def _beside(path: Path, fmt: str) -> Path:
    """The standard fp32 file of `fmt` in the same (staging) folder: what a derived file is made from."""
    return path.with_name(file_name(fmt))


def _onnx_jobs(inputs: ExportInputs, family: ArtifactFormat) -> list[Job]:
    """model.onnx, and the fp16 and int8 files made from it when those precisions are asked for."""
    config = inputs.config
    job = functools.partial(Job, family=family, contract=check_onnx, opset=config.opset)
    jobs = [job(file_name(family.format), precision="fp32", exporter=config.exporter,
                write=lambda p, m: write_onnx(inputs.module, inputs.example, p, config, m))]
    if "fp16" in config.precisions:
        jobs.append(job(file_name(family.format, "fp16"), precision="fp16", exporter=f"{config.exporter} + onnxruntime float16",
                        write=lambda p, m: write_fp16(_beside(p, family.format), p, m)))
    if "int8" in config.precisions:
        cpu = cpu_info()
        recipe = int8_recipe_for(cpu)
        # which setting, and for which instruction set it was chosen
        chosen = {"quantization": asdict(recipe),
                  "quantized_for": {"cpu": cpu.name, "vnni": cpu.vnni, "avx512": cpu.avx512, "amx": cpu.amx}}
        jobs.append(job(file_name(family.format, "int8"), precision="int8",
                        exporter=f"{config.exporter} + onnxruntime quantize_static ({recipe.label})",
                        write=lambda p, m: write_int8(_beside(p, family.format), p, inputs.crops, m, recipe),
                        extra=lambda p: chosen))
    return jobs


def _any_size_jobs(inputs: ExportInputs, family: ArtifactFormat) -> list[Job]:
    """model.any-size.onnx (unless --no-any-size), checked on image sizes the export never saw."""
    config = inputs.config
    if not config.any_size:
        return []
    if config.exporter != "dynamo":
        inputs.echo(f"{ANY_SIZE_FILE} not written: the legacy exporter bakes the example's image size into the resize")
        return []
    module = AnySizeClassifier(inputs.model, inputs.source.preprocess, softmax=config.softmax).eval()

    def checked(path: Path) -> dict[str, Any]:
        check_any_size(path, module)
        return {"input": ANY_SIZE}

    return [Job(ANY_SIZE_FILE, family, "fp32", lambda p, m: write_any_size(module, p, config, m), config.exporter,
                contract=check_onnx, extra=checked, opset=config.opset)]


def _openvino_jobs(inputs: ExportInputs, family: ArtifactFormat) -> list[Job]:
    """The OpenVINO IR converted from model.onnx, and NNCF's int8 IR with --precision int8 (when NNCF works)."""
    from toolkit.export import openvino

    def convert(write: Callable[..., Any], *args: Any) -> Callable[[Path, dict[str, str]], None]:
        return lambda p, m: _openvino(write, _beside(p, family.needs), p, *args, m)

    jobs = [Job(file_name(family.format), family, "fp32", convert(openvino.write_fp32), "OpenVINO read_model",
                extra=entry_extra)]
    if "int8" in inputs.config.precisions:
        if openvino.nncf_problem():
            inputs.echo(f"{file_name(family.format, 'int8')} not written: {openvino.nncf_problem()}")
        else:
            jobs.append(Job(file_name(family.format, "int8"), family, "int8", convert(openvino.write_nncf_int8, inputs.crops),
                            "OpenVINO read_model + NNCF quantize", extra=entry_extra))
    return jobs


def _archive_jobs(write: Callable[..., None], exporter: str) -> Callable[[ExportInputs, ArtifactFormat], list[Job]]:
    """A torch archive (TorchScript, torch.export): one fp32 file from the module and the example batch."""
    def jobs(inputs: ExportInputs, family: ArtifactFormat) -> list[Job]:
        return [Job(file_name(family.format), family, "fp32", lambda p, m: write(inputs.module, inputs.example, p, m),
                    exporter)]
    return jobs


def _aoti_jobs(inputs: ExportInputs, family: ArtifactFormat) -> list[Job]:
    """The AOTInductor package for the CPU, and for CUDA where export has a GPU (its manifest entry's `device`
    says which); bf16 too with --precision bf16 on a CPU with bf16 matrix units. A package is native code
    compiled here: export's reload check loads what it compiled itself, in its staging folder."""
    from toolkit.export import aoti

    config, cpu_fp32, cuda_fp32 = inputs.config, family.names[0], family.names[1]

    def job(name: str, precision: str, module, device: str = "cpu") -> Job:
        return Job(name, family, precision, lambda p, m: aoti.write_aoti(module, inputs.example, p, m, device),
                   "torch.export + AOTInductor (freezing)", extra=lambda p: {"device": device}, device=device)

    jobs = [job(cpu_fp32, "fp32", inputs.module)]
    if torch.cuda.is_available():
        jobs.append(job(cuda_fp32, "fp32", inputs.module, "cuda"))
    bf16 = file_name(family.format, "bf16")
    if "bf16" in config.precisions and not cpu_info().fast_bf16:
        inputs.echo(f"{bf16} not written: this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, slower than fp32)")
    elif "bf16" in config.precisions:
        network = aoti.Bfloat16Network(inputs.model)
        jobs.append(job(bf16, "bf16", ImageClassifier(network, inputs.source.preprocess, config.softmax).eval()))
    if "int8" in config.precisions:
        jobs += _aoti_int8_jobs(inputs, family)
    return jobs


def _aoti_int8_jobs(inputs: ExportInputs, family: ArtifactFormat) -> list[Job]:
    """PyTorch's own int8: PT2E with torchao's x86 Inductor quantizer, calibrated on the calibration crops,
    compiled by AOTInductor with freezing (which turns the q/dq pairs into int8 kernels); CPU only."""
    from toolkit.export import aoti, pt2e

    name = file_name(family.format, "int8")
    problem = pt2e.pt2e_problem() or (None if inputs.crops is not None else "it needs --calibration-data")
    if problem:
        inputs.echo(f"{name} not written: {problem}")
        return []
    recipe = pt2e.Pt2eRecipe()

    def write(path: Path, meta: dict[str, str]) -> None:
        aoti.compile_package(pt2e.quantized_program(inputs.module, inputs.example, inputs.crops, recipe=recipe),
                             path, meta)

    return [Job(name, family, "int8", write, "torch.export + torchao PT2E (X86InductorQuantizer) + AOTInductor",
                extra=lambda p: {"device": "cpu", "quantization": asdict(recipe)})]


WRITERS: dict[str, Callable[[ExportInputs, ArtifactFormat], list[Job]]] = {
    "onnx": _onnx_jobs,
    "any-size": _any_size_jobs,
    "openvino": _openvino_jobs,
    "torchscript": _archive_jobs(write_torchscript, "torch.jit.trace"),
    "pt2": _archive_jobs(write_pt2, "torch.export"),
    "aoti": _aoti_jobs,
}


# ---------------------------------------------------------------- the stage, step by step


def _load(config: ExportConfig, checkpoint: str | Path | None, arch: str | None, weights: str | None,
          num_classes: int | None, image_size: int | None, echo: Callable[[str], None]) -> ExportInputs:
    model, source = load_source(checkpoint, arch, weights, num_classes, image_size)
    spec = source.preprocess
    crops = (calibration_crops(config.calibration_data, config.calibration_size, spec, config.seed)
             if config.calibration_data else None)
    module = ImageClassifier(model, spec, softmax=config.softmax).eval()
    return ExportInputs(config, source, model, module, _example(spec, config.example_batch, config.seed), crops, echo)


def _jobs(inputs: ExportInputs) -> list[Job]:
    """Every file of every format family the export writes, in the table's order."""
    return [job for family in ROWS if family.written_with(inputs.config.formats)
            for job in WRITERS[family.writer](inputs, family)]


def _declared_contract(inputs: ExportInputs) -> dict[str, Any]:
    """The I/O contract of a file whose graph is not read back (torch archives, IRs): what the module has."""
    spec, classes = inputs.source.preprocess, inputs.source.classes
    return {"inputs": [{"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", spec.crop_size, spec.crop_size, 3]}],
            "outputs": [{"name": n, "dtype": "float32", "shape": ["batch", len(classes)]}
                        for n in OUTPUT_NAMES[: 2 if inputs.config.softmax else 1]]}


def _write_checked(inputs: ExportInputs, job: Job, staging: Path, output: Path) -> dict[str, Any]:
    """Write one file into the staging folder, reload it and run its checks; return its manifest entry."""
    config, path = inputs.config, staging / job.name
    start = time.perf_counter()
    with naming(output / job.name), torch.inference_mode(False), torch.no_grad():
        job.write(path, metadata(inputs.source, job.precision, config.softmax))
    seconds = time.perf_counter() - start
    contract = job.contract(path) if job.contract else _declared_contract(inputs)
    check_dynamic_batch(path, job.family.format, inputs.source.preprocess, len(inputs.source.classes), config.softmax)
    extra = job.extra(path) if job.extra else {}
    entry = {"format": job.family.format, "precision": job.precision, "sha256": sha256_file(path),
             "bytes": path.stat().st_size, **contract, **extra, "opset": job.opset, "exporter": job.exporter,
             "seconds": round(seconds, 3)}
    inputs.echo(f"wrote {job.name} ({entry['bytes'] / 1e6:.1f} MB, {seconds:.1f}s); batches {CHECK_BATCHES} ran")
    return entry


def _manifest(inputs: ExportInputs, files: dict[str, Any], selftest: dict[str, Any]) -> dict[str, Any]:
    source, config, crops = inputs.source, inputs.config, inputs.crops
    return {
        "format": "rtk-bundle", "version": 1, "toolkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "arch": source.arch, "classes": list(source.classes), "preprocess": source.preprocess.to_dict(),
        "source": source.to_dict(), "softmax": config.softmax, "files": files,
        "selftest": selftest, "versions": library_versions(),
        "calibration": {"folder": str(config.calibration_data), "images": int(len(crops))} if crops is not None else None,
    }


def export_bundle(output: str | Path, config: ExportConfig, checkpoint: str | Path | None = None, arch: str | None = None,
                  weights: str | None = None, num_classes: int | None = None, image_size: int | None = None,
                  echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write a bundle to `output` and return its manifest. Verification (on by default) follows."""
    output = Path(output)
    refuse_overlap(output, _sources(checkpoint, arch, weights, config.calibration_data), "rtk export")
    _prepare_output(output, config.force)
    inputs = _load(config, checkpoint, arch, weights, num_classes, image_size, echo)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        files = {}
        for job in _jobs(inputs):
            files[job.name] = _write_checked(inputs, job, staging, output)
        with naming(output / SELFTEST):
            selftest = _selftest(inputs.module, staging, files, inputs.source.preprocess, inputs.crops, config.seed)
        write_text(staging / LABELS, "\n".join(inputs.source.classes) + "\n")
        manifest = _manifest(inputs, files, selftest)
        write_json(staging / MANIFEST, manifest)
        install_folder(staging, output, config.force, "rtk export")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def add_cpu_files(bundle, fmt: str, precisions: tuple[str, ...], model, crops: np.ndarray | None, calibration: str,
                  lock: str, echo: Callable[[str], None] = print) -> list[str]:
    """The CPU files of format `fmt` at `precisions` that `bundle` (a toolkit.core.bundle.Bundle) lacks, written
    and checked by export's own writer (rtk optimize's AOTInductor candidates): each is staged inside the bundle,
    moved in under `lock`, then entered in the manifest. Returns the names written."""
    import os

    from toolkit.core.fileio import folder_lock
    from toolkit.core.manifest import FileEntry

    source, family = ModelSource.from_manifest(bundle.manifest), row(fmt)
    config = ExportConfig(formats=(fmt,), precisions=precisions, softmax=bundle.manifest.softmax,
                          calibration_data=calibration)
    module = ImageClassifier(model, source.preprocess, softmax=config.softmax).eval()
    inputs = ExportInputs(config, source, model, module, _example(source.preprocess, config.example_batch, config.seed),
                          crops, echo)
    written = []
    for job in WRITERS[family.writer](inputs, family):
        if job.device != "cpu" or job.name in bundle.files:
            continue
        with tempfile.TemporaryDirectory(prefix=".rtk-add-", dir=bundle.root) as staging:
            entry = _write_checked(inputs, job, Path(staging), bundle.root)
            with folder_lock(bundle.root, lock):
                os.replace(Path(staging) / job.name, bundle.path(job.name))
        bundle.add_file(job.name, FileEntry.from_dict(entry, f"{job.name}'s entry"))
        written.append(job.name)
    return written


def _openvino(write: Callable[..., Any], onnx_path: Path, xml: Path, *args: Any) -> None:
    """OpenVINO's save_model writes in C++ and takes no file object: its failure is turned into one line."""
    with library_writes(xml):
        write(onnx_path, xml, *args)


def _selftest(module: ImageClassifier, folder: Path, files: dict[str, Any], spec, crops: np.ndarray | None,
              seed: int) -> dict[str, Any]:
    """Store a few crops with the logits every file gives on them here, for `Classifier.load(self_test=True)`."""
    images = crops[:SELFTEST_IMAGES] if crops is not None else _example(spec, SELFTEST_IMAGES, seed + 1).numpy()
    arrays = {"images": images}
    with torch.inference_mode():
        out = module(torch.from_numpy(images))
        arrays["eager"] = (out[0] if isinstance(out, tuple) else out).numpy()
    for name, entry in files.items():
        row = of_format(entry["format"], name)
        if row.selftest:  # under the key the serving backend looks up (f32 inference)
            arrays[selftest_key(name, row.engine)] = reload_runner(folder / name, entry["format"])(torch.from_numpy(images))[0]
    np.savez_compressed(folder / SELFTEST, **arrays)
    return {"file": SELFTEST, "images": int(len(images)), "from": "calibration images" if crops is not None else "random"}
