"""The runtime registry: one row per runtime. Adding a runtime is one row here plus one backend file.

A row says the runtime's device, which bundle files it runs, the precision it runs them at, how to
build its runner, why it cannot exist here, and whether `rtk verify` runs it by default. Which engine
runs a bundle file comes from its format's row in `toolkit.core.formats`: a torch archive format runs
on the `torch_file_runtimes` of its engine, loaded by the row's loader. A row marked `native_code` (an
AOTInductor package is a compiled library) runs only where the stage's RunOptions allow native code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from toolkit.core.bundle import Bundle, takes_any_size
from toolkit.core.formats import BY_FORMAT
from toolkit.core.formats import ROWS as FORMAT_ROWS
from toolkit.core.hardware import cpu_info
from toolkit.core.manifest import FileEntry
from toolkit.errors import RtkError
from toolkit.evaluation.runners.base import Failed, Planned, Runner, RunOptions, Skipped
from toolkit.serving.sessions import SessionSettings, openvino_problem, provider_problem

# (bundle file name, its manifest entry) -> does this runtime run it
Accepts = Callable[[str, FileEntry], bool]
Reference = Callable[[], tuple[Any, Any]]  # () -> (eager model, PreprocessSpec)


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    device: str  # cpu | cuda
    family: str  # eager, or the engine of core.formats: onnxruntime | openvino | torch.jit | torch.export | torch.aoti
    describes: str  # what it runs, for messages and docs
    accepts: Accepts | None  # None: runs the checkpoint (eager), not a bundle file
    build: Callable[[RuntimeSpec, str, Path, FileEntry | None, RunOptions, Reference], Runner]
    precision: str | None = None  # the precision it runs at; None: the artifact's own
    unavailable: Callable[[], str | None] = lambda: None
    verify_default: bool = True
    session: dict[str, Any] | None = None  # a serving engine's session settings beside threads (engine, device, ...)
    native_code: bool = False  # loading its files runs native code from them: only with RunOptions.native_code


# ---------------------------------------------------------------- what each family accepts


def _onnx(*precisions: str, plain: bool = False, any_size: bool = True) -> Accepts:
    """ONNX files of these precisions; `plain` leaves out onnxruntime's hardware-specific optimised graph,
    `any_size=False` the file that resizes inside its graph (a fixed-shape engine cannot take it)."""
    onnxruntime = _engine("onnxruntime")

    def accepts(name: str, entry: FileEntry) -> bool:
        if not onnxruntime(name, entry) or entry.precision not in precisions:
            return False
        if not any_size and takes_any_size(entry):
            return False
        return not (plain and entry.get("hardware_specific"))
    return accepts


def _openvino_files(*precisions: str, any_size: bool = True) -> Accepts:
    """What OpenVINO compiles: ONNX files of these precisions (not onnxruntime's optimised graph, nor its
    QOperator int8 files, whose QLinearConv OpenVINO's ONNX reader cannot convert) and IRs."""
    onnx, ir = _onnx(*precisions, plain=True, any_size=any_size), _engine("openvino")

    def accepts(name: str, entry: FileEntry) -> bool:
        if ir(name, entry):
            return entry.precision in precisions
        return onnx(name, entry) and (entry.get("quantization") or {}).get("format") != "qoperator"
    return accepts


def _compiled_for(device: str) -> Accepts:
    """AOTInductor packages compiled for `device` (their manifest entry's `device`): a package runs only there."""
    aoti = _engine("torch.aoti")
    return lambda name, entry: aoti(name, entry) and entry.get("device", "cpu") == device


def _engine(engine: str) -> Accepts:
    """The files whose format (toolkit.core.formats) runs on `engine`; a format rtk does not know runs on none."""
    return lambda name, entry: entry.format in BY_FORMAT and BY_FORMAT[entry.format].engine == engine


# ---------------------------------------------------------------- why a runtime cannot exist here


def _cuda() -> str | None:
    from toolkit.evaluation.runners.torch_runner import cuda_problem

    return cuda_problem()


def _compiler(device: str) -> Callable[[], str | None]:
    def problem() -> str | None:
        from toolkit.evaluation.runners.torch_runner import compile_problem

        return compile_problem(device)
    return problem


def _no_fast_bf16() -> str | None:
    return None if cpu_info().fast_bf16 else "this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated)"


def _provider(provider: str, needs_gpu: bool) -> Callable[[], str | None]:
    return lambda: provider_problem(provider) or (_cuda() if needs_gpu else None)


# ---------------------------------------------------------------- builders


def _eager(spec: RuntimeSpec, name, path, entry, options: RunOptions, reference: Reference) -> Runner:
    from toolkit.evaluation.runners.torch_runner import TorchModuleRunner, eager_module

    autocast = spec.precision if spec.precision in ("bf16", "fp16") else None
    return TorchModuleRunner(spec.name, "checkpoint", spec.precision or "fp32", options, device=spec.device,
                             autocast=autocast, module_factory=lambda: eager_module(*reference()),
                             compile=spec.family == "torch.compile")


def _torch_file(spec: RuntimeSpec, name, path, entry, options, reference) -> Runner:
    """A torch archive, loaded by its format's loader (toolkit.core.formats names it in toolkit.export.loaders)."""
    from toolkit.evaluation.runners.torch_runner import TorchModuleRunner
    from toolkit.export import loaders

    load = getattr(loaders, BY_FORMAT[entry.format].loader)
    return TorchModuleRunner(spec.name, name, entry.precision, options, device=spec.device,
                             module_factory=lambda: load(path, spec.device))


def torch_file_runtimes(name: str, engine: str) -> tuple[RuntimeSpec, RuntimeSpec]:
    """The CPU and CUDA runtimes of a torch archive engine, for every file of its formats."""
    describes = ", ".join(n for row in FORMAT_ROWS if row.engine == engine for n in row.names)
    return (RuntimeSpec(name, "cpu", engine, describes, _engine(engine), _torch_file),
            RuntimeSpec(f"{name}-cuda", "cuda", engine, describes, _engine(engine), _torch_file, unavailable=_cuda))


def native_code_refused(name: str) -> str:
    """Why a file of compiled native code is not loaded, and both ways to allow it."""
    return (f"{name} is compiled native code (loading it runs it): pass --allow-native-code, or --trust KEY "
            "for a bundle signed by a key you trust")


def session_settings(spec: RuntimeSpec, entry: FileEntry, options: RunOptions, bundle_root: Path) -> SessionSettings:
    """The session a runtime opens on a file: the row's settings, the stage's threads and TF32 and its session
    variant (rtk optimize's), less what the row's engine does not read."""
    values = {**(spec.session or {}), **dict(options.session)}
    if values.get("device") == "tensorrt":  # engines are keyed by the model's hash: a new file never reuses an old engine
        values["trt_cache"] = str(bundle_root / "trt-cache" / entry.sha256[:16])
    return SessionSettings(threads=options.threads, tf32=options.tf32,
                           cuda_graph=options.cuda_graph and spec.name == "ort-cuda-iobinding", **values).trimmed()


def _session(spec: RuntimeSpec, name, path, entry, options, reference) -> Runner:
    """Any serving engine's runner: the row's `session` names the engine (toolkit.serving.sessions.ENGINES)."""
    from toolkit.evaluation.runners.session_runner import SessionRunner

    return SessionRunner(spec.name, name, spec.precision or entry.precision, options, path=path,
                         settings=session_settings(spec, entry, options, path.parent),
                         io_binding=spec.name == "ort-cuda-iobinding")


_COMPILED = "checkpoint fp32 under torch.compile (Inductor, default mode); compiled on the first call"
ROWS = (
    RuntimeSpec("eager", "cpu", "eager", "checkpoint fp32", None, _eager),
    RuntimeSpec("eager-bf16", "cpu", "eager", "checkpoint, bf16 autocast, channels_last", None, _eager, "bf16",
                _no_fast_bf16, verify_default=False),
    RuntimeSpec("eager-cuda", "cuda", "eager", "checkpoint fp32", None, _eager, unavailable=_cuda),
    RuntimeSpec("eager-fp16", "cuda", "eager", "checkpoint, fp16 autocast, channels_last", None, _eager, "fp16",
                _cuda),
    # the eager model under torch.compile: it compiles on its first call (tens of seconds on a small CPU), so
    # verify runs it only when named
    RuntimeSpec("torch-compile", "cpu", "torch.compile", _COMPILED, None, _eager, unavailable=_compiler("cpu"),
                verify_default=False),
    RuntimeSpec("torch-compile-cuda", "cuda", "torch.compile", _COMPILED, None, _eager,
                unavailable=_compiler("cuda"), verify_default=False),
    *torch_file_runtimes("torchscript", "torch.jit"),
    *torch_file_runtimes("torch-export", "torch.export"),
    RuntimeSpec("aoti", "cpu", "torch.aoti", "model.aoti.pt2, model.aoti-bf16.pt2 (compiled native code)",
                _compiled_for("cpu"), _torch_file, native_code=True),
    RuntimeSpec("aoti-cuda", "cuda", "torch.aoti", "model.aoti-cuda.pt2 (compiled native code)", _compiled_for("cuda"),
                _torch_file, unavailable=_cuda, native_code=True),
    RuntimeSpec("ort-cpu", "cpu", "onnxruntime", "every ONNX file", _onnx("fp32", "fp16", "int8"), _session,
                unavailable=_provider("CPUExecutionProvider", False), session={"device": "cpu"}),
    RuntimeSpec("ort-cuda", "cuda", "onnxruntime", "fp32 and fp16 ONNX files", _onnx("fp32", "fp16", plain=True), _session,
                unavailable=_provider("CUDAExecutionProvider", True), session={"device": "cuda"}),
    RuntimeSpec("ort-cuda-iobinding", "cuda", "onnxruntime", "fp32 and fp16 ONNX files; input placed on the device once",
                _onnx("fp32", "fp16", plain=True), _session, unavailable=_provider("CUDAExecutionProvider", True),
                verify_default=False, session={"device": "cuda"}),
    RuntimeSpec("ort-tensorrt", "cuda", "onnxruntime", "fp32 ONNX with TensorRT fp16; engine cache in the bundle",
                _onnx("fp32", plain=True, any_size=False), _session, "fp16", _provider("TensorrtExecutionProvider", True),
                session={"device": "tensorrt"}),
    RuntimeSpec("openvino", "cpu", "openvino", "fp32 and int8 ONNX files and OpenVINO IRs (extra: openvino)",
                _openvino_files("fp32", "int8"), _session, unavailable=lambda: openvino_problem("f32"),
                session={"engine": "openvino", "precision_hint": "f32"}),
    RuntimeSpec("openvino-bf16", "cpu", "openvino", "fp32 ONNX files through OpenVINO with bf16 inference precision",
                # not the any-size file: bf16 matmuls cannot hold the resize's grey levels (8-bit mantissa)
                _openvino_files("fp32", any_size=False), _session, "bf16", lambda: openvino_problem("bf16"),
                session={"engine": "openvino", "precision_hint": "bf16"}),
)
REGISTRY: dict[str, RuntimeSpec] = {row.name: row for row in ROWS}
RUNTIMES: dict[str, tuple[str, str]] = {row.name: (row.device, row.describes) for row in ROWS}
VERIFY_DEFAULT: tuple[str, ...] = tuple(row.name for row in ROWS if row.verify_default)


def runtime(name: str) -> RuntimeSpec:
    if name not in REGISTRY:
        raise RtkError(f"unknown runtime {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def runtimes_on(device: str | None, among: tuple[str, ...] | list[str] | None = None) -> list[str] | None:
    """The runtimes (of `among`, default all) that run on `device` ("cpu" or "cuda"); None keeps them all."""
    if device is None:
        return list(among) if among else None
    if device not in ("cpu", "cuda"):
        raise RtkError(f"--device must be cpu or cuda, got {device!r}")
    return [r for r in (among or REGISTRY) if runtime(r).device == device]


def plan(bundle: Bundle, runtimes: list[str] | None, reference: Reference, options: RunOptions) -> list[Planned]:
    """One entry per (runtime, artifact) asked for: a Runner to load, Skipped (the runtime cannot exist
    here, or its file is native code `options` does not allow) or Failed (the file is not what the manifest
    describes: integrity comes first). `reference()` gives (model, spec); each eager runner copies the model
    when it loads."""
    rows = [runtime(r) for r in (runtimes or REGISTRY)]
    entries: list[Planned] = []
    for row in rows:
        reason = row.unavailable()
        if row.accepts is None:
            precision = row.precision or "fp32"
            entries.append(Skipped(row.name, "checkpoint", precision, reason) if reason
                           else row.build(row, "checkpoint", bundle.root, None, options, reference))
            continue
        for name, entry in bundle.files.items():
            if not row.accepts(name, entry):
                continue
            precision = row.precision or entry.precision
            broken = bundle.integrity_problem(name)
            if broken:  # a broken artifact fails on every runtime, whether or not the runtime exists here
                entries.append(Failed(row.name, name, precision, broken))
            elif reason:
                entries.append(Skipped(row.name, name, precision, reason))
            elif row.native_code and not options.native_code:
                entries.append(Skipped(row.name, name, precision, native_code_refused(name)))
            else:
                entries.append(row.build(row, name, bundle.path(name), entry, options, reference))
    return entries


def require_named(entries: list[Planned], named: list[str] | None) -> None:
    """A runtime the user named explicitly that cannot run here is an error, not a skip."""
    for name in named or []:
        mine = [e for e in entries if e.runtime == name]
        if not mine:
            raise RtkError(f"runtime {name} has nothing to run in this bundle ({runtime(name).describes})")
        if all(isinstance(e, Skipped) for e in mine):
            raise RtkError(f"runtime {name} is not available here: {mine[0].reason}")


def with_options(runner: Runner, **changes: Any) -> Runner:
    """A fresh, unloaded copy of `runner` with other options (the benchmark's thread sweep)."""
    options = replace(runner.options, **changes)
    copy = replace(runner, options=options, details={})
    if hasattr(copy, "settings"):
        copy.settings = replace(copy.settings, threads=options.threads)
    return copy
