"""Loading the torch artifacts export writes (TorchScript, torch.export .pt2) with no code from the file run:
a TorchScript archive through TorchScript's own unpickler, a .pt2 archive only after every member and shape
expression is checked and with pickling refused. An AOTInductor package is the exception: it is native code,
loaded (after its archive is checked) only where the caller allows native code. Export reloads what it wrote
through these; the torch runners load through them too, so what verify runs is what export checked."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from toolkit.errors import ArtifactBroken, RtkError, first_line


def _torch():
    import torch

    return torch


def _load_file(loader: Callable[[], Any], path: Path, what: str):
    if not path.is_file():
        raise ArtifactBroken(f"{path.name} is missing ({path})")
    try:
        return loader()
    except ArtifactBroken:
        raise
    except Exception as exc:
        raise ArtifactBroken(f"{path.name}: {what} cannot load it: {first_line(exc)}") from None


def _program_on(program, device: str):
    if device == "cpu":
        return program
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, device)


def load_torchscript(path: Path, device: str = "cpu"):
    """A TorchScript module. Its archive's pickles are read by TorchScript's own unpickler, which resolves
    only TorchScript types (a pickled Python global is an error, not a call); its code is TorchScript."""
    return _load_file(lambda: _torch().jit.load(str(path), map_location=device).eval(), Path(path), "torch.jit.load")


def load_pt2(path: Path, device: str = "cpu"):
    """A torch.export program as a module on `device`, loaded with no code from the file run (see
    `check_pt2_archive`). An exported program records its device in the graph, so a CUDA runner moves
    the program (torch.export's own pass), not just its weights."""
    import logging

    path = Path(path)
    if path.is_file():
        check_pt2_archive(path)
    # torch.export.load logs a full traceback at WARNING before raising on a broken file; the raise is what counts.
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with pickle_refused():
            return _load_file(lambda: _program_on(_export_load(path), device).module(), path, "torch.export.load")
    finally:
        logger.setLevel(level)


def _export_load(path: Path):
    import pickle

    try:
        return _torch().export.load(str(path))
    except pickle.UnpicklingError:  # torch's own message would suggest loading it unsafely
        raise ArtifactBroken(f"{path.name} needs pickling to load (a pickled object in the archive is not plain "
                             "weights); refused: unpickling runs code from the file") from None


# ---------------------------------------------------------------- no code from a .pt2 archive runs

_FORCE_SAFE, _FORCE_UNSAFE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_PICKLE_LOCK = threading.Lock()
PT2_JSON_MAX_BYTES = 256 << 20  # a resnet152's model.json is a few MB
EXPR_MAX_CHARS = 10_000
# What a shape expression in an archive's model.json may call: torch.export evaluates each one with
# sympy.sympify (Python's eval), so any other name could reach code (`__import__`, sympy's lambdify, ...).
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity"})
_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]{1,9}")  # torch's symbol names: s0, s77, u3, ...
_EXPR_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
               ast.Compare, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
               ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


@contextlib.contextmanager
def pickle_refused() -> Iterator[None]:
    """Every torch.load inside the block is weights-only, even one that asks for weights_only=False
    (torch.export.load does, for a tensor its archive marks `use_pickle`, and as a fallback for sample
    inputs): torch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call and it overrides the argument."""
    with _PICKLE_LOCK:  # the variable is process-wide: one block at a time restores it exactly
        saved = {k: os.environ.pop(k, None) for k in (_FORCE_SAFE, _FORCE_UNSAFE)}
        os.environ[_FORCE_SAFE] = "1"
        try:
            yield
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None)
                if value is not None:
                    os.environ[key] = value


def check_pt2_archive(path: Path) -> None:
    """Refuse (ArtifactBroken, naming the file) a .pt2 whose loading would run code from it: compiled
    AOTInductor libraries, a payload marked `use_pickle` (torch.export.load unpickles it with
    weights_only=False), or a shape expression other than symbols and arithmetic (it goes through eval)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_member(path, archive, info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArtifactBroken(f"{path.name}: torch.export.load cannot load it: {first_line(exc)}") from None


def _check_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    name = info.filename
    if "aotinductor/" in name or name.endswith((".so", ".dll", ".dylib")):
        raise ArtifactBroken(f"{path.name} holds compiled native code ({name}); refused: loading it would run it")
    if not name.endswith(".json"):
        return
    if info.file_size > PT2_JSON_MAX_BYTES:
        raise ArtifactBroken(f"{path.name}: {name} declares {info.file_size} bytes, above {PT2_JSON_MAX_BYTES}")
    try:
        data = json.loads(archive.read(info))
    except (ValueError, RecursionError) as exc:
        raise ArtifactBroken(f"{path.name}: {name} is not valid JSON: {first_line(exc)}") from None
    stack = [data]
    while stack:  # iterative: a deeply nested file is walked, not a RecursionError
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("use_pickle") is True:
                raise ArtifactBroken(f"{path.name} needs pickling to load ({name} marks a payload use_pickle); "
                                     "refused: unpickling runs code from the file")
            if isinstance(node.get("expr_str"), str):
                _check_expression(path, node["expr_str"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _check_expression(path: Path, expr: str) -> None:
    """A shape expression is only symbols, numbers, arithmetic and the sympy functions torch.export uses."""
    problem = None
    try:
        tree = ast.parse(expr, mode="eval") if len(expr) <= EXPR_MAX_CHARS else None
    except (SyntaxError, ValueError, RecursionError):
        tree = None
    if tree is None:
        problem = "not an expression"
    else:
        for node in ast.walk(tree):
            if not isinstance(node, _EXPR_NODES):
                problem = f"{type(node).__name__} is not allowed"
            elif isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                problem = "it calls something other than a sympy function"
            elif isinstance(node, ast.Name) and node.id not in _SYMPY_CALLS and not _SYMBOL.fullmatch(node.id):
                problem = f"unknown name {node.id!r}"
            elif isinstance(node, ast.keyword) and (node.arg is None or node.arg.startswith("_")):
                problem = "a keyword argument is not allowed"
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not _SYMBOL.fullmatch(node.value):
                problem = f"string {node.value[:40]!r} is not a symbol name"
            elif isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str)):
                problem = f"constant {type(node.value).__name__} is not allowed"
            if problem:
                break
    if problem:
        raise ArtifactBroken(f"{path.name} has a shape expression torch.export would evaluate as Python code "
                             f"({problem}): {expr[:80]!r}; refused")


def archive_extra(path: Path, name: str, max_bytes: int = 1 << 20) -> str | None:
    """An extra file (`extra/NAME`) stored in a TorchScript or .pt2 archive, read from the zip itself,
    without loading the archive: None when it has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            found = [i for i in archive.infolist() if i.filename.count("/") == 2
                     and i.filename.split("/", 1)[1] == f"extra/{name}"]
            if len(found) != 1:
                return None
            if found[0].file_size > max_bytes:
                raise ArtifactBroken(f"{path.name}: extra/{name} declares {found[0].file_size} bytes, "
                                     f"above {max_bytes}")
            return archive.read(found[0]).decode("utf-8")
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ArtifactBroken(f"{path.name}: cannot read extra/{name}: {first_line(exc)}") from None


# ---------------------------------------------------------------- AOTInductor packages: native code, checked first

AOTI_MAX_BYTES = 8 << 30  # the declared size of all members: a resnet152 package at 224 px is ~250 MB
AOTI_METADATA_MAX_BYTES = 1 << 20
AOTI_MAX_BATCH = 65536  # the batch bound the package was exported with (toolkit.export.aoti.MAX_BATCH)
# What AOTInductor writes into a package, relative to its one top folder: the archive's own records, and per
# compiled model the library, its sources and metadata (rtk embeds a CUDA package's kernels in its library).
_AOTI_RECORDS = frozenset({"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"})
# wrapper.json: the extern kernel calls (by op name, e.g. oneDNN's int8 convolutions) an int8 package makes
_AOTI_MODEL = re.compile(r"data/aotinductor/model/[a-z0-9]{1,128}\.(wrapper\.so|wrapper\.cpp|kernel\.cpp|"
                         r"wrapper\.json|wrapper_metadata\.json|kernel_metadata\.json)")


def _aoti_member(path: Path, info: zipfile.ZipInfo, top: str) -> str:
    """The member's kind (the suffix _AOTI_MODEL matched, or "record"); ArtifactBroken for a name that is not
    relative, leaves the package's folder, is a link or a folder, or is not something AOTInductor writes."""
    import stat

    name = info.filename
    parts = name.split("/")
    if (name.startswith(("/", "\\")) or "\\" in name or ":" in parts[0] or any(p in ("", ".", "..") for p in parts)
            or stat.S_ISLNK(info.external_attr >> 16) or info.is_dir()):
        raise ArtifactBroken(f"{path.name}: member {name[:120]!r} is not a plain file inside the package; refused "
                             "before loading it")
    rest = name[len(top) + 1:] if parts[0] == top else None
    if rest in _AOTI_RECORDS:
        return "record"
    found = _AOTI_MODEL.fullmatch(rest or "")
    if found is None:
        raise ArtifactBroken(f"{path.name}: member {name[:120]!r} is not part of an AOTInductor package; refused "
                             "before loading it")
    return found.group(1)


def check_aoti_package(path: Path, device: str | None = "cpu") -> dict[str, str]:
    """Refuse (ArtifactBroken, one line) a package before any of its native code is loaded: not a zip, a member
    outside the package or that AOTInductor does not write, more than AOTI_MAX_BYTES declared, a CRC that does
    not match (one flipped byte in the library would run silently), other than one library, compiled for
    `device` (None: any). Returns the package's metadata (rtk's keys and AOTInductor's), read from its json
    member: verify reads the classes from it without loading the library."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactBroken(f"{path.name} is missing ({path})")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            top = infos[0].filename.split("/")[0] if infos else ""
            kinds = [_aoti_member(path, info, top) for info in infos]
            if sum(info.file_size for info in infos) > AOTI_MAX_BYTES:
                raise ArtifactBroken(f"{path.name}: its members declare more than {AOTI_MAX_BYTES >> 30} GiB")
            if kinds.count("wrapper.so") != 1 or kinds.count("wrapper_metadata.json") != 1:
                raise ArtifactBroken(f"{path.name}: an AOTInductor package holds one compiled library and its "
                                     f"metadata, this one {kinds.count('wrapper.so')} and "
                                     f"{kinds.count('wrapper_metadata.json')}")
            bad = archive.testzip()
            if bad is not None:
                raise ArtifactBroken(f"{path.name}: member {bad} fails its CRC check (the file was changed)")
            meta = _aoti_metadata(path, archive, infos[kinds.index("wrapper_metadata.json")])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise ArtifactBroken(f"{path.name}: not a readable AOTInductor package: {first_line(exc)}") from None
    compiled_for = meta.get("AOTI_DEVICE_KEY")
    if device is not None and compiled_for != device.split(":")[0]:
        raise ArtifactBroken(f"{path.name} is compiled for {compiled_for!r}, not for {device}")
    return meta


def _aoti_metadata(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict[str, str]:
    if info.file_size > AOTI_METADATA_MAX_BYTES:
        raise ArtifactBroken(f"{path.name}: {info.filename} declares {info.file_size} bytes, above {AOTI_METADATA_MAX_BYTES}")
    try:
        meta = json.loads(archive.read(info))
    except (ValueError, RecursionError) as exc:
        raise ArtifactBroken(f"{path.name}: its metadata is not valid JSON: {first_line(exc)}") from None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ArtifactBroken(f"{path.name}: its metadata is not an object of strings")
    return meta


def _same_device(a: Any, b: Any) -> bool:
    a, b = _torch().device(a), _torch().device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class CheckedPackage:
    """A loaded AOTInductor package behind a check of every input: the compiled code takes the shape, dtype
    and device it was compiled for on trust (it reads out of bounds otherwise), so anything else is refused
    here in one line. Stands in for a module: `.to()` (its own device only) and `.eval()`."""

    def __init__(self, package: Any, name: str, crop_size: int, device: str) -> None:
        self.package, self.name, self.crop_size, self.device = package, name, crop_size, device

    def to(self, device: Any = None, **kwargs: Any) -> CheckedPackage:
        if device is not None and not _same_device(device, self.device):
            raise ArtifactBroken(f"{self.name} is compiled for {self.device}, not for {device}")
        return self

    def eval(self) -> CheckedPackage:
        return self

    def __call__(self, image: Any) -> Any:
        """The package's outputs (on its device) for uint8 [N, S, S, 3] images, moved to its device first."""
        torch, s = _torch(), self.crop_size
        shape = tuple(getattr(image, "shape", ()))
        if (not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 4
                or shape[1:] != (s, s, 3) or not 1 <= shape[0] <= AOTI_MAX_BATCH):
            got = f"{getattr(image, 'dtype', type(image).__name__)} {list(shape)}"
            raise RtkError(f"{self.name} takes uint8 [N, {s}, {s}, 3] (N 1 to {AOTI_MAX_BATCH}), got {got}")
        return self.package(image.to(self.device).contiguous())


def load_aoti(path: Path, device: str | None = None) -> CheckedPackage:
    """An AOTInductor package on `device` (None: the device it was compiled for), loaded (its library
    dlopened: native code runs) only after `check_aoti_package` passed, and wrapped so that it only ever gets
    the input it was compiled for. Whether native code may be loaded at all is the caller's decision
    (registry.plan's gate; export's own reload check loads what it compiled itself)."""
    path = Path(path)
    meta = check_aoti_package(path, device)
    device = meta.get("AOTI_DEVICE_KEY", "cpu") if device is None else device
    device = "cuda:0" if device == "cuda" else device
    try:
        crop_size = int(json.loads(meta["preprocess"])["crop_size"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactBroken(f"{path.name}: its metadata has no preprocessing crop size ({first_line(exc)})") from None
    index = int(device.split(":")[1]) if ":" in device else -1
    package = _load_file(lambda: _torch()._inductor.aoti_load_package(str(path), device_index=index), path,
                         "aoti_load_package")
    return CheckedPackage(package, path.name, crop_size, device)

