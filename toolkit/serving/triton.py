"""`rtk triton`: a bundle as a Triton Inference Server model repository (onnxruntime backend).

REPO/NAME/config.pbtxt + REPO/NAME/1/model.onnx + REPO/NAME/labels.txt (Triton's classification
extension reads it). Names, dtypes and dims come from the ONNX file itself; every config is parsed
with Triton's own `ModelConfig` protobuf (shipped by `tritonclient`) and checked against the file.
The model folder is written in a staging folder and swapped in, and may not be, hold or lie inside
the bundle it is made from. Torch-free.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.bundle import LABELS, MANIFEST, Bundle
from toolkit.core.fileio import check_replaceable, install_folder, naming, refuse_overlap, write_text
from toolkit.errors import ArtifactBroken, RtkError
from toolkit.serving.sessions import SessionSettings, open_onnxruntime
from toolkit.serving.signing import copy_hashed, load_private_key, sign_folder, trusted_copy

ONNX_TO_TRITON = {"tensor(uint8)": "TYPE_UINT8", "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16"}
PREFERRED_BATCH_SIZES = (4, 8, 16, 32, 64)
# A model name is a folder of the repository and a quoted string in config.pbtxt: no "/", "..", quotes
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


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
    threads: int | None = None  # onnxruntime's intra-op threads per instance; None: onnxruntime's default (all cores)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise RtkError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.max_batch_size < 1:
            raise RtkError("--max-batch-size must be at least 1")
        if self.tensorrt and self.device != "cuda":
            raise RtkError("--tensorrt needs --device cuda")
        if self.threads is not None and self.threads < 1:
            raise RtkError("--threads must be at least 1")


def served_name(bundle: Bundle, device: str) -> str:
    """The ONNX file Triton should serve. CUDA gets model.onnx; the CPU gets `rtk optimize`'s recommended
    ONNX file when there is one, except onnxruntime's hardware-specific optimised graph (another machine
    may load it)."""
    rec = bundle.manifest.recommended
    if device == "cpu" and rec is not None and rec.device == "cpu" and rec.onnx_file:
        entry = bundle.manifest.files.get(rec.artifact)
        if entry is not None and not entry.get("hardware_specific"):
            return rec.artifact
    return "model.onnx"


def model_file(bundle: Bundle, device: str) -> tuple[str, bool]:
    """The ONNX file Triton should serve (served_name), checked, and whether OpenVINO was recommended for it."""
    rec = bundle.manifest.recommended
    name = served_name(bundle, device)
    if name not in bundle.files:
        raise RtkError(f"{bundle.root} has no {name}: export with --format onnx first")
    bundle.check_file(name)  # confined to the bundle before it is hashed: no file outside it is read
    openvino = device == "cpu" and rec is not None and rec.engine == "openvino" and rec.artifact == name
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


Tensor = tuple[str, str, list]  # (name, Triton data type, dims without the batch dimension; a str dim is dynamic)


def model_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor], *, max_batch_size: int,
                 max_queue_delay_us: int, preferred_batch_sizes: Sequence[int] = (), device: str = "cpu",
                 instances: int = 1, parameters: dict[str, str] | None = None,
                 accelerator: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Triton model configuration in Triton's JSON shape (what its `/config` endpoint answers): what
    `rtk triton` writes as config.pbtxt (config_text) and what `rtk serve` answers about itself.
    `accelerator`: the `execution_accelerators` message, e.g. {"cpu_execution_accelerator": [{"name": "openvino"}]}."""
    def tensors(values: Sequence[Tensor]) -> list[dict[str, Any]]:
        return [{"name": n, "data_type": t, "dims": [d if isinstance(d, int) else -1 for d in dims],
                 **({"label_filename": LABELS} if n == "logits" else {})} for n, t, dims in values]

    batching: dict[str, Any] = {"preferred_batch_size": list(preferred_batch_sizes)} if preferred_batch_sizes else {}
    config: dict[str, Any] = {
        "name": name, "backend": "onnxruntime", "max_batch_size": max_batch_size,
        "input": tensors(inputs), "output": tensors(outputs),
        "dynamic_batching": {**batching, "max_queue_delay_microseconds": max_queue_delay_us},
        "instance_group": [{"count": instances, "kind": "KIND_GPU" if device != "cpu" else "KIND_CPU"}]}
    if parameters:
        config["parameters"] = {key: {"string_value": value} for key, value in parameters.items()}
    if accelerator:
        config["optimization"] = {"execution_accelerators": accelerator}
    return config


def triton_model_config(name: str, inputs, outputs, config: TritonConfig, openvino: bool) -> dict[str, Any]:
    """The model configuration `rtk triton` writes for `config`."""
    preferred = [b for b in PREFERRED_BATCH_SIZES if b <= config.max_batch_size] or [config.max_batch_size]
    accelerator = ({"gpu_execution_accelerator": [{"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}]}
                   if config.tensorrt else {"cpu_execution_accelerator": [{"name": "openvino"}]} if openvino else None)
    # intra_op_thread_count: the onnxruntime backend's own parameter (its model config, not the server's flags)
    return model_config(name, inputs, outputs, max_batch_size=config.max_batch_size,
                        max_queue_delay_us=config.max_queue_delay_us, preferred_batch_sizes=preferred,
                        device=config.device, instances=config.instances, accelerator=accelerator,
                        parameters={"intra_op_thread_count": str(config.threads)} if config.threads else None)


def config_text(name: str, inputs, outputs, config: TritonConfig, openvino: bool) -> str:
    """config.pbtxt in Triton's text format."""
    return pbtxt(triton_model_config(name, inputs, outputs, config, openvino))


ENUM_FIELDS = ("data_type", "kind")  # written bare in the text format: TYPE_FP32, not "TYPE_FP32"
MAP_FIELDS = ("parameters",)  # protobuf maps: a JSON object, in the text format one { key value } per entry


def pbtxt(config: dict[str, Any]) -> str:
    """A model configuration in Triton's JSON shape as protobuf text: one top-level field a line (a list of
    messages one element a line), everything nested inline."""
    lines = []
    for key, value in config.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines += [f"{key} [", ",\n".join(f"  {{ {_fields(v)} }}" for v in value), "]"]
        elif isinstance(value, dict) and key not in MAP_FIELDS:
            lines += [f"{key} {{", *(f"  {_field(k, v)}" for k, v in value.items()), "}"]
        else:
            lines.append(_field(key, value))
    return "\n".join(lines) + "\n"


def _fields(message: dict[str, Any]) -> str:
    return " ".join(_field(key, value) for key, value in message.items())


def _field(key: str, value: Any) -> str:
    if key in MAP_FIELDS:
        return " ".join(f"{key} {{ key: {_scalar('', k)} value: "
                        + (f"{{ {_fields(v)} }}" if isinstance(v, dict) else _scalar("", v)) + " }" for k, v in value.items())
    if isinstance(value, dict):
        return f"{key} {{ {_fields(value)} }}"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return f"{key}: [ " + ", ".join(f"{{ {_fields(v)} }}" for v in value) + " ]"
    if isinstance(value, list):
        return f"{key}: [ {', '.join(_scalar(key, v) for v in value)} ]"
    return f"{key}: {_scalar(key, value)}"


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and key not in ENUM_FIELDS:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


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


def model_name(bundle: Bundle, name: str | None) -> str:
    """--name, or the bundle folder's name; a plain folder name that is safe in config.pbtxt."""
    name = name or bundle.root.resolve().name
    if not MODEL_NAME.fullmatch(name):
        raise RtkError(f"{name!r} cannot be a Triton model name (a folder of the repository): give --name "
                       "with letters, digits, '_', '.' and '-'")
    return name


def write_repository(bundle_path: str | Path, config: TritonConfig, trust: Sequence[str | Path] | None = None,
                     key: str | Path | None = None, password: bytes | None = None) -> Path:
    """Write REPO/NAME (config.pbtxt, labels.txt, 1/model.onnx); returns the model folder.

    With `trust`, only from a bundle one of those public keys signed, and from private copies of its files
    (toolkit.serving.signing); with `key`, the model folder is signed too (NAME/bundle.sig) before it is swapped in."""
    bundle = Bundle.open(bundle_path)
    name = model_name(bundle, config.name)
    folder = Path(config.output) / name
    refuse_overlap(folder, [("the bundle", bundle.root)], "rtk triton")  # --force would delete it
    check_replaceable(folder, config.force)
    if key is not None:
        load_private_key(Path(key), password)  # a bad key is refused before the work, not after it
    trusted = None
    if trust is not None:
        trusted = trusted_copy(bundle.root, trust, lambda root: [served_name(Bundle.open(root), config.device)],
                               first=(MANIFEST, LABELS))
        bundle = Bundle.open(trusted.root)
    file, openvino = model_file(bundle, config.device)
    labels = bundle.labels()  # confined, bounded, equal to the manifest's classes: written, never copied
    inputs, outputs = _io(bundle.path(file))
    text = config_text(name, inputs, outputs, config, openvino)
    validate(text, inputs, outputs, config.max_batch_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder.parent))
    try:
        _copy_model(bundle, file, staging / "1" / "model.onnx", folder / "1" / "model.onnx")
        write_text(staging / LABELS, "\n".join(labels) + "\n")
        write_text(staging / "config.pbtxt", text)
        if key is not None:
            sign_folder(staging, key, password)
        install_folder(staging, folder, config.force, "rtk triton")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if trusted is not None:
            trusted.close()
    return folder


def _copy_model(bundle: Bundle, file: str, dest: Path, shown: Path) -> None:
    """Copy the bundle's model file and check the copy's sha256 against the manifest (the file checked
    before may have been swapped since)."""
    with naming(shown), open(bundle.confined(file, "the model file"), "rb") as src:
        dest.parent.mkdir()
        with open(dest, "wb") as out:  # not shutil.copyfile: its ENOSPC names the source, not the full disk
            digest = copy_hashed(src, out)  # the bytes written are the bytes hashed: one read
    if digest != bundle.manifest.files[file].sha256:
        raise ArtifactBroken(f"{file} in {bundle.root} changed while it was copied: its sha256 differs from the manifest's")
