"""What an artifact format is, in one table (standard library only).

One row per family of bundle files: its file names by precision, the engine that runs it, how its rtk
metadata is read, which exporter writes it and how a fresh reader loads it. The readers, writers and
loaders live in other layers (torch, onnx, OpenVINO); a row names them by key and the layer that owns
them resolves the key (`toolkit.export.exporter.WRITERS`, `toolkit.evaluation.verify.CLASS_READERS`,
`toolkit.export.loaders`). Adding a format is a row here, its writer, its loader and its runtime rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.core.openvino_ir import IR_FP32, IR_INT8, IR_INT8_AC
from toolkit.errors import ArtifactBroken, RtkError

ANY_SIZE_FILE = "model.any-size.onnx"  # resize + center crop inside the graph: any image size in


@dataclass(frozen=True)
class ArtifactFormat:
    """One family of bundle files. Rows that share a manifest `format` share its engine, metadata, loader
    and self-test key (tests/test_formats.py checks it): a reader needs only the manifest entry's format."""

    name: str  # the row's key: a --format choice, or a family written along with `needs` (choice=False)
    format: str  # the manifest entry's "format" of its files
    title: str  # for messages
    files: tuple[tuple[str, str], ...]  # (file name, precision); the first of a precision is the one export writes
    engine: str  # what runs it: onnxruntime | openvino | torch.jit | torch.export | torch.aoti
    metadata: str  # how its rtk metadata is read: a key of toolkit.evaluation.verify.CLASS_READERS
    writer: str  # which exporter writes it: a key of toolkit.export.exporter.WRITERS
    loader: str | None = None  # a torch loader in toolkit.export.loaders; None: opened by a serving session
    needs: str | None = None  # the format it is built from (its writer reads that file)
    choice: bool = True  # a --format choice; False: written whenever `needs` is
    default: bool = True  # written by an export that names no --format
    selftest: bool = False  # export stores its expected logits in selftest.npz (under bundle.selftest_key)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(precision for _, precision in self.files))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.files)

    def written_with(self, formats: tuple[str, ...] | list[str]) -> bool:
        """Does an export of `formats` (the --format choices) write this family?"""
        return self.name in formats if self.choice else self.needs in formats


# The order is the bundle's file order (Bundle.files) and the order export writes them in.
ROWS = (
    ArtifactFormat("onnx", "onnx", "ONNX",
                   (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16"), ("model.int8.onnx", "int8")),
                   engine="onnxruntime", metadata="onnx", writer="onnx", selftest=True),
    ArtifactFormat("torchscript", "torchscript", "TorchScript", (("model.ts", "fp32"),),
                   engine="torch.jit", metadata="torch-archive", writer="torchscript", loader="load_torchscript"),
    ArtifactFormat("pt2", "pt2", "torch.export", (("model.pt2", "fp32"),),
                   engine="torch.export", metadata="torch-archive", writer="pt2", loader="load_pt2"),
    ArtifactFormat("any-size", "onnx", "ONNX with the resize in the graph", ((ANY_SIZE_FILE, "fp32"),),
                   engine="onnxruntime", metadata="onnx", writer="any-size", needs="onnx", choice=False,
                   selftest=True),
    # IRs (+ .bin) converted from model.onnx; the accuracy-controlled int8 IR is written by `rtk optimize`
    ArtifactFormat("openvino", "openvino", "OpenVINO IR",
                   ((IR_FP32, "fp32"), (IR_INT8, "int8"), (IR_INT8_AC, "int8")),
                   engine="openvino", metadata="openvino", writer="openvino", needs="onnx", default=False,
                   selftest=True),
    # compiled native code (a shared library in a zip), for the CPU (and CUDA where export has a GPU): loaded
    # only from a trusted bundle or with --allow-native-code (registry.plan); the int8 file is PT2E's
    ArtifactFormat("aoti", "aoti", "AOTInductor package",
                   (("model.aoti.pt2", "fp32"), ("model.aoti-cuda.pt2", "fp32"), ("model.aoti-bf16.pt2", "bf16"),
                    ("model.aoti-int8.pt2", "int8")),
                   engine="torch.aoti", metadata="aoti", writer="aoti", loader="load_aoti", default=False),
)
BY_NAME: dict[str, ArtifactFormat] = {row.name: row for row in ROWS}
# a manifest entry's format -> its first row (rows sharing a format share how it is run and read)
BY_FORMAT: dict[str, ArtifactFormat] = {row.format: row for row in reversed(ROWS)}
FORMATS: tuple[str, ...] = tuple(row.name for row in ROWS if row.choice)  # the --format choices
DEFAULT_FORMATS: tuple[str, ...] = tuple(row.name for row in ROWS if row.choice and row.default)
PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for row in ROWS for p in row.precisions))
# File name -> (format, precision). Fixed names so a service finds what it needs without guessing.
FILES: dict[str, tuple[str, str]] = {name: (row.format, precision) for row in ROWS for name, precision in row.files}


def row(name: str) -> ArtifactFormat:
    """The row of a --format choice (or of a family written along with one)."""
    if name not in BY_NAME:
        raise RtkError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return BY_NAME[name]


def of_format(fmt: str, where: str = "a bundle file") -> ArtifactFormat:
    """The row that describes a manifest entry's `format` (the first, for a format several rows share);
    a format rtk does not know is a broken bundle, not something to guess a loader for."""
    if fmt not in BY_FORMAT:
        known = ", ".join(dict.fromkeys(r.format for r in ROWS))
        raise ArtifactBroken(f"{where}: unknown format {fmt!r} (rtk reads {known})")
    return BY_FORMAT[fmt]


def file_name(fmt: str, precision: str = "fp32") -> str:
    """The standard file name of a format's file at a precision."""
    for candidate in ROWS:
        if candidate.format == fmt and precision in candidate.precisions:
            return next(name for name, p in candidate.files if p == precision)
    have = ", ".join(dict.fromkeys(p for r in ROWS if r.format == fmt for p in r.precisions)) or "none"
    raise RtkError(f"no {precision} {fmt} file (its precisions: {have})")
