"""`rtk triton`: a bundle as a Triton Inference Server model repository (onnxruntime backend).

REPO/NAME/config.pbtxt + REPO/NAME/1/model.onnx + REPO/NAME/labels.txt (Triton's classification
extension reads it). Names, dtypes and dims come from the ONNX file itself; every config is parsed
with Triton's own `ModelConfig` protobuf (shipped by `tritonclient`) and checked against the file.
Torch-free.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from toolkit.bundle import LABELS, Bundle
from toolkit.errors import RtkError
from toolkit.sessions import SessionSettings, open_onnxruntime

ONNX_TO_TRITON = {"tensor(uint8)": "TYPE_UINT8", "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16"}
PREFERRED_BATCH_SIZES = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class TritonConfig:
    output: Path
    name: str | None = None
    device: str = "cuda"  # cuda | cpu
    max_batch_size: int = 32
    tensorrt: bool = False
    max_queue_delay_us: int = 2000
    instances: int = 1
    force: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise RtkError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.max_batch_size < 1:
            raise RtkError("--max-batch-size must be at least 1")
        if self.tensorrt and self.device != "cuda":
            raise RtkError("--tensorrt needs --device cuda")


def model_file(bundle: Bundle, device: str) -> tuple[str, bool]:
    """The ONNX file Triton should serve, and whether OpenVINO was recommended for it.

    CUDA gets model.onnx; the CPU gets `rtk optimize`'s recommended ONNX file when there is one, except
    onnxruntime's hardware-specific optimised graph (another machine may load it)."""
    rec = bundle.manifest.recommended or {}
    name = "model.onnx"
    if device == "cpu" and rec.get("device", "cpu") == "cpu" and str(rec.get("artifact", "")).endswith(".onnx"):
        entry = bundle.manifest.files.get(rec["artifact"])
        if entry is not None and not entry.get("hardware_specific"):
            name = rec["artifact"]
    if name not in bundle.files:
        raise RtkError(f"{bundle.root} has no {name}: export with --format onnx first")
    bundle.check_file(name)
    openvino = device == "cpu" and str(rec.get("runtime", "")).startswith("openvino") and rec.get("artifact") == name
    return name, openvino


def _io(path: Path) -> tuple[list[tuple[str, str, list]], list[tuple[str, str, list]]]:
    """(name, Triton data type, dims without the batch dimension) of the file's inputs and outputs."""
    session = open_onnxruntime(path, SessionSettings()).session

    def describe(values):
        out = []
        for v in values:
            if v.type not in ONNX_TO_TRITON:
                raise RtkError(f"{path.name}: {v.name} has type {v.type}, which this exporter does not map")
            out.append((v.name, ONNX_TO_TRITON[v.type], list(v.shape[1:])))
        return out

    return describe(session.get_inputs()), describe(session.get_outputs())


def config_text(name: str, inputs, outputs, config: TritonConfig, openvino: bool) -> str:
    """config.pbtxt in Triton's text format."""
    def dims(d):
        return ", ".join(str(x if isinstance(x, int) else -1) for x in d)

    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {config.max_batch_size}", "input ["]
    lines += [",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {dims(d)} ] }}' for n, t, d in inputs), "]", "output ["]
    lines += [",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {dims(d)} ]'
                         + (f' label_filename: "{LABELS}"' if n == "logits" else "") + " }" for n, t, d in outputs), "]"]
    preferred = [b for b in PREFERRED_BATCH_SIZES if b <= config.max_batch_size] or [config.max_batch_size]
    lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
              f"  max_queue_delay_microseconds: {config.max_queue_delay_us}", "}",
              "instance_group [", f"  {{ count: {config.instances} kind: {'KIND_GPU' if config.device == 'cuda' else 'KIND_CPU'} }}",
              "]"]
    if config.tensorrt:
        lines += ["optimization { execution_accelerators {", "  gpu_execution_accelerator: [ {", '    name: "tensorrt"',
                  '    parameters { key: "precision_mode" value: "FP16" }', "  } ]", "} }"]
    elif openvino:
        lines += ["optimization { execution_accelerators {", '  cpu_execution_accelerator: [ { name: "openvino" } ]', "} }"]
    return "\n".join(lines) + "\n"


def validate(text: str, inputs, outputs, max_batch_size: int):
    """Parse with Triton's ModelConfig protobuf and check names, types and dims against the ONNX file."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise RtkError(f"validating a Triton config needs tritonclient with grpc ({exc}): pip install 'rtk[triton]'") from None
    try:
        parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise RtkError(f"the generated config.pbtxt does not parse as Triton's ModelConfig: {exc}") from None
    type_name = model_config_pb2.DataType.Name

    def check(kind: str, declared, expected) -> None:
        got = [(t.name, type_name(t.data_type), [int(d) for d in t.dims]) for t in declared]
        want = [(n, t, [d if isinstance(d, int) else -1 for d in dims]) for n, t, dims in expected]
        if got != want:
            raise RtkError(f"config.pbtxt {kind} {got} do not match the ONNX file's {want}")

    check("inputs", parsed.input, inputs)
    check("outputs", parsed.output, outputs)
    if parsed.max_batch_size != max_batch_size or parsed.backend != "onnxruntime":
        raise RtkError("config.pbtxt lost its backend or max_batch_size")
    return parsed


def write_repository(bundle_path: str | Path, config: TritonConfig) -> Path:
    """Write REPO/NAME (config.pbtxt, labels.txt, 1/model.onnx); returns the model folder."""
    bundle = Bundle.open(bundle_path)
    name = config.name or bundle.root.resolve().name
    file, openvino = model_file(bundle, config.device)
    inputs, outputs = _io(bundle.path(file))
    text = config_text(name, inputs, outputs, config, openvino)
    validate(text, inputs, outputs, config.max_batch_size)
    folder = Path(config.output) / name
    if folder.exists():
        if not config.force:
            raise RtkError(f"{folder} exists; pass --force to replace it")
        shutil.rmtree(folder)
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(bundle.path(file), folder / "1" / "model.onnx")
    shutil.copyfile(bundle.path(LABELS), folder / LABELS)
    (folder / "config.pbtxt").write_text(text, encoding="utf-8")
    return folder
