"""Export stage: TorchScript, torch.export and ONNX (fp32, fp16, int8) bundles with preprocessing in the graph.

Every file is written into a staging folder that replaces the bundle folder only once every file
was written and checked, so a failure never leaves a half-written bundle. Every file goes through a
Python file object (a full disk is an OSError naming the file, never an abort of the process), and
the output may not be, hold or lie inside what the export reads (checkpoint, run, calibration images).
"""

from __future__ import annotations

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
from toolkit.core.bundle import (
    ANY_SIZE,
    ANY_SIZE_FILE,
    FORMATS,
    INPUT_NAME,
    LABELS,
    MANIFEST,
    OUTPUT_NAMES,
    PRECISIONS,
    SELFTEST,
    file_name,
)
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
from toolkit.core.hardware import cpu_info
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
        if set(self.precisions) - {"fp32"} and "onnx" not in self.formats:
            raise RtkError("fp16 and int8 are ONNX files: add --format onnx")
        if "openvino" in self.formats and "onnx" not in self.formats:
            raise RtkError("--format openvino converts the ONNX file: add --format onnx")
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


def reload_runner(path: Path, fmt: str):
    """A function running the written file as a fresh reader would: onnxruntime, OpenVINO, torch.jit or torch.export."""
    if fmt == "onnx":
        from toolkit.serving.sessions import SessionSettings, open_onnxruntime

        session = open_onnxruntime(path, SessionSettings()).session
        return lambda x: session.run(None, {INPUT_NAME: x.numpy()})
    if fmt == "openvino":
        from toolkit.serving.sessions import SessionSettings, open_openvino

        compiled = open_openvino(path, SessionSettings(engine="openvino")).compiled
        return lambda x: [np.asarray(v) for v in compiled(x.numpy()).values()]
    from toolkit.export.loaders import load_pt2, load_torchscript

    module = load_torchscript(path) if fmt == "torchscript" else load_pt2(path)

    def run(x):
        with torch.inference_mode():
            out = module(x)
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

    return run


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


def export_bundle(output: str | Path, config: ExportConfig, checkpoint: str | Path | None = None, arch: str | None = None,
                  weights: str | None = None, num_classes: int | None = None, image_size: int | None = None,
                  echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write a bundle to `output` and return its manifest. Verification (on by default) follows."""
    output = Path(output)
    refuse_overlap(output, _sources(checkpoint, arch, weights, config.calibration_data), "rtk export")
    _prepare_output(output, config.force)
    model, source = load_source(checkpoint, arch, weights, num_classes, image_size)
    spec = source.preprocess
    crops = (calibration_crops(config.calibration_data, config.calibration_size, spec, config.seed)
             if config.calibration_data else None)
    module = ImageClassifier(model, spec, softmax=config.softmax).eval()
    example = _example(spec, config.example_batch, config.seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    files: dict[str, Any] = {}
    try:
        jobs: list[tuple[str, str, str, Callable[[Path, dict[str, str]], None]]] = []
        if "onnx" in config.formats:
            jobs.append((file_name("onnx"), "onnx", "fp32", lambda p, m: write_onnx(module, example, p, config, m)))
            onnx_fp32 = staging / file_name("onnx")
            if "fp16" in config.precisions:
                jobs.append((file_name("onnx", "fp16"), "onnx", "fp16", lambda p, m: write_fp16(onnx_fp32, p, m)))
            if "int8" in config.precisions:
                recipe = int8_recipe_for(cpu_info())
                jobs.append((file_name("onnx", "int8"), "onnx", "int8", lambda p, m: write_int8(onnx_fp32, p, crops, m, recipe)))
            if config.any_size and config.exporter == "dynamo":
                any_size = AnySizeClassifier(model, spec, softmax=config.softmax).eval()
                jobs.append((ANY_SIZE_FILE, "onnx", "fp32", lambda p, m: write_any_size(any_size, p, config, m)))
            elif config.any_size:
                echo(f"{ANY_SIZE_FILE} not written: the legacy exporter bakes the example's image size into the resize")
        if "openvino" in config.formats:
            from toolkit.core import openvino_ir
            from toolkit.export import openvino

            jobs.append((openvino_ir.IR_FP32, "openvino", "fp32", lambda p, m: _openvino(openvino.write_fp32, onnx_fp32, p, m)))
            if "int8" in config.precisions:
                if openvino.nncf_problem():
                    echo(f"{openvino_ir.IR_INT8} not written: {openvino.nncf_problem()}")
                else:
                    jobs.append((openvino_ir.IR_INT8, "openvino", "int8",
                                 lambda p, m: _openvino(openvino.write_int8, onnx_fp32, p, crops, m)))
        if "torchscript" in config.formats:
            jobs.append((file_name("torchscript"), "torchscript", "fp32", lambda p, m: write_torchscript(module, example, p, m)))
        if "pt2" in config.formats:
            jobs.append((file_name("pt2"), "pt2", "fp32", lambda p, m: write_pt2(module, example, p, m)))
        for name, fmt, precision, write in jobs:
            path = staging / name
            start = time.perf_counter()
            with naming(output / name), torch.inference_mode(False), torch.no_grad():
                write(path, metadata(source, precision, config.softmax))
            seconds = time.perf_counter() - start
            contract = check_onnx(path) if fmt == "onnx" else {
                "inputs": [{"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", spec.crop_size, spec.crop_size, 3]}],
                "outputs": [{"name": n, "dtype": "float32", "shape": ["batch", len(source.classes)]}
                            for n in OUTPUT_NAMES[: 2 if config.softmax else 1]]}
            check_dynamic_batch(path, fmt, spec, len(source.classes), config.softmax)
            if name == ANY_SIZE_FILE:
                check_any_size(path, any_size)
                contract["input"] = ANY_SIZE
            if fmt == "openvino":
                from toolkit.core.openvino_ir import entry_extra

                contract.update(entry_extra(path))
            if precision == "int8" and fmt == "onnx":  # which setting, and for which instruction set it was chosen
                cpu = cpu_info()
                contract["quantization"] = asdict(int8_recipe_for(cpu))
                contract["quantized_for"] = {"cpu": cpu.name, "vnni": cpu.vnni, "avx512": cpu.avx512, "amx": cpu.amx}
            files[name] = {
                "format": fmt, "precision": precision, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                **contract, "opset": config.opset if fmt == "onnx" else None,
                "exporter": (config.exporter if precision == "fp32" else f"{config.exporter} + onnxruntime "
                             + ("float16" if precision == "fp16" else f"quantize_static ({int8_recipe_for(cpu_info()).label})"))
                if fmt == "onnx" else {"torchscript": "torch.jit.trace", "pt2": "torch.export",
                                       "openvino": "OpenVINO read_model" + (" + NNCF quantize" if precision == "int8" else "")}[fmt],
                "seconds": round(seconds, 3),
            }
            echo(f"wrote {name} ({files[name]['bytes'] / 1e6:.1f} MB, {seconds:.1f}s); batches {CHECK_BATCHES} ran")
        with naming(output / SELFTEST):
            selftest = _selftest(module, staging, files, spec, crops, config.seed)
        write_text(staging / LABELS, "\n".join(source.classes) + "\n")
        manifest = {
            "format": "rtk-bundle", "version": 1, "toolkit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "arch": source.arch, "classes": list(source.classes), "preprocess": spec.to_dict(),
            "source": source.to_dict(), "softmax": config.softmax, "files": files,
            "selftest": selftest, "versions": library_versions(),
            "calibration": {"folder": str(config.calibration_data), "images": int(len(crops))} if crops is not None else None,
        }
        write_json(staging / MANIFEST, manifest)
        install_folder(staging, output, config.force, "rtk export")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


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
        if entry["format"] == "onnx":
            arrays[name] = reload_runner(folder / name, "onnx")(torch.from_numpy(images))[0]
        elif entry["format"] == "openvino":  # the key OpenVINO's serving backend looks up (f32 inference)
            arrays[f"openvino:{name}"] = reload_runner(folder / name, "openvino")(torch.from_numpy(images))[0]
    np.savez_compressed(folder / SELFTEST, **arrays)
    return {"file": SELFTEST, "images": int(len(images)), "from": "calibration images" if crops is not None else "random"}
