"""The one place that opens inference sessions: onnxruntime and OpenVINO, from a file and its settings.

Torch-free (standard library, numpy, onnxruntime, optionally openvino): `Classifier`, the
verify/benchmark runners and `rtk optimize` all open sessions here, so what a service runs is what
verify checked. This module alone knows the provider options, TF32, `preload_dlls`, the refusal of
onnxruntime's silent CPU fallback and the per-node placement check.

Each engine is one opener (a backend class and its `open_*` function) and one row of `ENGINES`: the
devices and files it opens, why it cannot run here, its settings in words, the engine serving falls
back to, and the settings `rtk optimize` also tries. Adding an engine is those two things here plus
its runtime rows in `toolkit.evaluation.runners.registry`; nothing else names an engine.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.bundle import selftest_key
from toolkit.core.hardware import cpu_info
from toolkit.errors import ArtifactBroken, RtkError, RuntimeUnavailable, first_line

DEVICES = ("cpu", "cuda", "tensorrt")
ORT_GRAPH_LEVELS = ("disable", "basic", "extended", "all")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@dataclass(frozen=True)
class SessionSettings:
    """Everything that decides what a session computes and how fast. Stored with a recommendation, so a
    service reproduces exactly the session that was verified."""

    engine: str = "onnxruntime"  # onnxruntime | openvino
    device: str = "cpu"  # cpu | cuda | tensorrt (onnxruntime); cpu (openvino)
    threads: int | None = None
    graph_optimization: str = "all"  # onnxruntime: disable | basic | extended | all
    precision_hint: str = "f32"  # openvino: f32 | bf16
    # openvino: one static-shape compile per power-of-two batch bucket (a batch is padded up to its bucket),
    # as benchmark_app's -shape runs it, instead of one dynamic-batch compile
    static_batch: bool = False
    tf32: bool = False  # off: fp32 parity needs full-precision matmuls (onnxruntime turns TF32 on by default)
    cuda_graph: bool = False  # onnxruntime CUDA graphs; needs IO binding with a fixed input buffer
    trt_cache: str | None = None  # TensorRT engine/timing cache folder

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise RtkError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        if self.device not in ENGINES[self.engine].devices:
            raise RtkError(f"{self.engine} cannot run on device {self.device!r}")
        if self.graph_optimization not in ORT_GRAPH_LEVELS:
            raise RtkError(f"unknown onnxruntime graph optimization level {self.graph_optimization!r}; "
                           f"choose from {ORT_GRAPH_LEVELS}")
        if self.precision_hint not in ("f32", "bf16"):
            raise RtkError(f"OpenVINO precision hint must be f32 or bf16, got {self.precision_hint!r}")
        if self.threads is not None and self.threads < 1:
            raise RtkError("threads must be at least 1")

    @property
    def on_gpu(self) -> bool:
        return self.device in ("cuda", "tensorrt")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trimmed(self) -> SessionSettings:
        """These settings with what their engine does not read back at its default (one session, one record)."""
        keep = {"engine", "device", "threads", *ENGINES[self.engine].own}
        defaults = SessionSettings()
        return replace(self, **{f.name: getattr(defaults, f.name) for f in fields(self) if f.name not in keep})

    def on_engine(self, engine: str) -> SessionSettings:
        """These settings for another engine: what only the old one read goes back to its default."""
        return replace(self, engine=engine).trimmed()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RtkError(f"unknown session settings {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------- availability (never touches a model file)


def preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu use the CUDA/cuDNN libraries from torch's wheels (onnxruntime >= 1.21)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # a missing library shows as a provider fallback, refused at session creation
            pass


def _loadable(library: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def provider_problem(provider: str) -> str | None:
    """Why this onnxruntime execution provider cannot run here; None when it can."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime cannot be imported: {exc}"
    available = ort.get_available_providers()
    if provider not in available:
        return f"{provider} not in onnxruntime's providers {available}"
    if provider == "TensorrtExecutionProvider":
        import ctypes.util

        # onnxruntime-gpu lists TensorRT even without its libraries, then falls back to CUDA at session creation.
        if ctypes.util.find_library("nvinfer") is None and not _loadable("libnvinfer.so.10"):
            return "TensorRT's libraries (libnvinfer) are not installed: onnxruntime lists the provider but cannot use it"
    return None


def openvino_problem(precision_hint: str = "f32") -> str | None:
    """Why OpenVINO (with this inference precision) cannot run here; None when it can."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install -e '.[openvino]')"
    if precision_hint == "bf16" and not cpu_info().fast_bf16:
        return "this CPU has neither AMX nor AVX512-BF16 (OpenVINO would not run bf16)"
    return None


# ---------------------------------------------------------------- onnxruntime


def ort_session_options(settings: SessionSettings, profile: bool = False, optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if settings.threads:
        so.intra_op_num_threads = settings.threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[settings.graph_optimization]
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="rtk-ort-profile-"), "ort")
    return so


def ort_providers(settings: SessionSettings) -> list:
    """The provider list for onnxruntime: the asked-for one first, with its options."""
    if settings.device == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": int(settings.tf32),
                                      "enable_cuda_graph": int(settings.cuda_graph)})
    if settings.device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    trt = ("TensorrtExecutionProvider", {
        "device_id": 0, "trt_fp16_enable": True,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(settings.trt_cache),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(settings.trt_cache),
    })
    return [trt, cuda, "CPUExecutionProvider"]



def node_placement(path: str | Path, settings: SessionSettings, example: np.ndarray) -> dict[str, int]:
    """Which provider ran how many nodes, from one profiled run of a separate session."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), ort_session_options(settings, profile=True),
                                   providers=ort_providers(settings))
    session.run(None, {session.get_inputs()[0].name: example})
    profile = session.end_profiling()
    try:
        events = json.loads(Path(profile).read_text())
    finally:
        Path(profile).unlink(missing_ok=True)
    counts: Counter[str] = Counter()
    seen = set()
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args and ev.get("name", "").endswith("_kernel_time"):
            node = ev["name"].removesuffix("_kernel_time")
            if node not in seen:
                seen.add(node)
                counts[args["provider"]] += 1
    return dict(counts)


class OrtBackend:
    """onnxruntime: one InferenceSession, whose run() is safe to call from many threads."""

    name = "onnxruntime"

    def __init__(self, session, settings: SessionSettings, path: Path) -> None:
        self.session = session
        self.settings = settings
        self.path = path
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.placement: dict[str, int] | None = None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def input_shape(self) -> list:
        return list(self.session.get_inputs()[0].shape)

    @property
    def output_width(self) -> int | None:
        width = self.session.get_outputs()[0].shape[-1]
        return width if isinstance(width, int) else None

    def selftest_key(self, file: str) -> str:
        return selftest_key(file)

    def details(self) -> dict[str, Any]:
        """What a runner records of this session."""
        out: dict[str, Any] = {"providers": self.providers, "threads": self.settings.threads,
                               "graph_optimization": self.settings.graph_optimization}
        if self.placement is not None:
            out["node_placement"] = self.placement
        return out

    def placement_warning(self) -> str | None:
        on_cpu = (self.placement or {}).get("CPUExecutionProvider", 0)
        if self.settings.on_gpu and on_cpu:
            return f"{on_cpu} of {sum(self.placement.values())} nodes ran on CPUExecutionProvider"
        return None

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        """Every output of the file (logits, then probabilities where it has them)."""
        return self.session.run(None, {self.input_name: images})


def onnx_metadata(path: Path) -> dict[str, str]:
    """The rtk metadata of an ONNX file, read by onnxruntime on the CPU."""
    return open_onnxruntime(path, SessionSettings()).metadata


def open_onnxruntime(path: str | Path, settings: SessionSettings, check_placement: bool = True,
                     optimized_path: str | None = None) -> OrtBackend:
    """An onnxruntime session on exactly the provider asked for.

    RuntimeUnavailable: the provider cannot run here (not installed, or a library missing so that
    onnxruntime fell back quietly). ArtifactBroken: the file cannot be loaded.
    """
    import onnxruntime as ort

    path = Path(path)
    problem = unavailable_reason(settings)
    if problem:
        raise RuntimeUnavailable(problem)
    if settings.on_gpu:
        preload_cuda_libraries()
    if settings.trt_cache:
        Path(settings.trt_cache).mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        raise ArtifactBroken(f"{path.name} is missing ({path})")
    try:
        session = ort.InferenceSession(str(path), ort_session_options(settings, optimized_path=optimized_path),
                                       providers=ort_providers(settings))
    except Exception as exc:
        raise ArtifactBroken(f"{path.name}: onnxruntime cannot load it on {PROVIDERS[settings.device]}: "
                             f"{first_line(exc)}") from None
    got = session.get_providers()
    if got[0] != PROVIDERS[settings.device]:
        raise RuntimeUnavailable(f"asked for {PROVIDERS[settings.device]}, onnxruntime gave {got} "
                                 "(a library is missing: run rtk doctor); refusing to fall back silently")
    backend = OrtBackend(session, settings, path)
    if settings.on_gpu and check_placement:
        shape = [d if isinstance(d, int) else 1 for d in backend.input_shape]
        backend.placement = node_placement(path, settings, np.zeros(shape, np.uint8))
    return backend


# ---------------------------------------------------------------- OpenVINO


STATIC_BUCKETS = tuple(2 ** k for k in range(8))  # 1 ... 128: a larger batch runs in chunks of 128


def bucket_of(batch: int) -> int:
    """The static batch size a batch of `batch` images runs at: the smallest bucket that holds it."""
    return next((b for b in STATIC_BUCKETS if b >= batch), STATIC_BUCKETS[-1])


class OpenVinoBackend:
    """OpenVINO on the CPU. The compiled model is shared; each thread gets its own infer request,
    which is not thread-safe. With `static_batch`, `compile_static(bucket)` compiles the model for each
    batch bucket on first use (at most len(STATIC_BUCKETS) compiles) and a batch is padded up to its bucket."""

    name = "openvino"
    placement = None

    def __init__(self, compiled, settings: SessionSettings, path: Path,
                 compile_static: Callable[[int], Any] | None = None) -> None:
        self.compiled = compiled
        self.settings = settings
        self.path = path
        self.output = compiled.output(0)
        self.local = threading.local()
        self._compile_static = compile_static
        self._static: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self.settings.precision_hint})"]

    @property
    def compiled_precision(self) -> str:
        return str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    @property
    def metadata(self) -> dict[str, str]:
        """An IR's rtk metadata from its rt_info; an ONNX file's from the file, through onnxruntime (OpenVINO's
        ONNX reader drops metadata_props)."""
        if self.path.suffix == ".xml":
            from toolkit.core.openvino_ir import metadata

            return metadata(self.path)
        return onnx_metadata(self.path)

    @property
    def input_shape(self) -> list:
        return [d.get_length() if d.is_static else "?" for d in self.compiled.input(0).get_partial_shape()]

    @property
    def output_width(self) -> int | None:
        width = self.output.get_partial_shape()[-1]
        return width.get_length() if width.is_static else None

    def selftest_key(self, file: str) -> str:
        return selftest_key(file, "openvino-bf16" if self.settings.precision_hint == "bf16" else "openvino")

    def details(self) -> dict[str, Any]:
        """What a runner records of this session."""
        import openvino as ov

        return {"openvino": ov.get_version(), "precision_hint": self.settings.precision_hint,
                "threads": self.settings.threads, "compiled_precision": self.compiled_precision,
                **({"static_batches": sorted(self._static)} if self._compile_static else {})}

    def placement_warning(self) -> str | None:
        return None

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.run_all(images)[0]

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        """Every output of the model (logits, then probabilities where it has them), float32, this call's own."""
        if self._compile_static is None:
            return self._infer(self.compiled, images)
        chunks = [self._run_static(images[i:i + STATIC_BUCKETS[-1]]) for i in range(0, len(images), STATIC_BUCKETS[-1])]
        return [np.concatenate(parts) for parts in zip(*chunks)] if len(chunks) > 1 else chunks[0]

    def _run_static(self, images: np.ndarray) -> list[np.ndarray]:
        batch = len(images)
        bucket = bucket_of(batch)
        if bucket > batch:  # padded with black images, whose outputs are dropped
            images = np.concatenate([images, np.zeros((bucket - batch, *images.shape[1:]), images.dtype)])
        return [out[:batch] for out in self._infer(self._static_model(bucket), images)]

    def _static_model(self, bucket: int):
        compiled = self._static.get(bucket)
        if compiled is None:
            with self._lock:
                compiled = self._static.get(bucket)
                if compiled is None:
                    compiled = self._static[bucket] = self._compile_static(bucket)
        return compiled

    def _infer(self, compiled, images: np.ndarray) -> list[np.ndarray]:
        requests = getattr(self.local, "requests", None)
        if requests is None:
            requests = self.local.requests = {}
        request = requests.get(id(compiled))
        if request is None:
            request = requests[id(compiled)] = compiled.create_infer_request()
        # shared: no copy of the batch into the request nor of the outputs out of it but the copies below
        # (the request's output buffers are reused by its next call)
        result = request.infer({0: images}, share_inputs=True, share_outputs=True)
        return [np.array(v, dtype=np.float32, copy=True) for v in result.values()]


def open_openvino(path: str | Path, settings: SessionSettings) -> OpenVinoBackend:
    """An ONNX file compiled by OpenVINO for the CPU with the settings' precision hint and threads."""
    path = Path(path)
    problem = unavailable_reason(settings)
    if problem:
        raise RuntimeUnavailable(problem)
    if not path.is_file():
        raise ArtifactBroken(f"{path.name} is missing ({path})")
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": settings.precision_hint, "PERFORMANCE_HINT": "LATENCY"}
    if settings.threads:
        config["INFERENCE_NUM_THREADS"] = settings.threads
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", config)
    except Exception as exc:
        raise ArtifactBroken(f"{path.name}: OpenVINO cannot load it: {first_line(exc)}") from None
    return OpenVinoBackend(compiled, settings, path,
                           _static_compiler(core, model, config, path) if settings.static_batch else None)


def _static_compiler(core, model, config: dict[str, Any], path: Path) -> Callable[[int], Any]:
    """bucket -> the model compiled with its batch dimension fixed at `bucket` (the other dimensions as they are)."""
    def compile_static(bucket: int):
        static = model.clone()
        shape = static.input(0).get_partial_shape()
        shape[0] = bucket
        try:
            static.reshape({static.input(0): shape})
            return core.compile_model(static, "CPU", config)
        except Exception as exc:  # a file whose batch cannot be fixed: one line, as at open
            raise ArtifactBroken(f"{path.name}: OpenVINO cannot compile it for batch {bucket}: {first_line(exc)}") from None
    return compile_static


# ---------------------------------------------------------------- the engines


Backend = OrtBackend | OpenVinoBackend  # an engine's loaded model: run, run_all, metadata, selftest_key, details


@dataclass(frozen=True)
class Engine:
    """One engine sessions are opened with."""

    name: str  # SessionSettings.engine, and core.formats' engine of the files it runs
    title: str  # for messages
    devices: tuple[str, ...]
    suffixes: tuple[str, ...]  # the files it opens
    open: Callable[[Path, SessionSettings, bool], Backend]  # (file, settings, check_placement) -> backend
    problem: Callable[[SessionSettings], str | None]  # why it cannot run these settings here; None when it can
    words: Callable[[SessionSettings], str]  # its own settings in words, for rtk optimize's table
    own: tuple[str, ...] = ()  # the SessionSettings fields it reads beside engine, device and threads
    fallback: str | None = None  # the engine `Classifier.load(runtime="auto")` serves model.onnx on when this one cannot run
    variants: tuple[dict[str, Any], ...] = ()  # settings beside its defaults that rtk optimize also tries on model.onnx
    file_variants: tuple[dict[str, Any], ...] = ()  # ... and on every file the engine runs


ENGINES: dict[str, Engine] = {engine.name: engine for engine in (
    Engine("onnxruntime", "onnxruntime", DEVICES, (".onnx",),
           lambda path, settings, check: open_onnxruntime(path, settings, check_placement=check),
           lambda settings: provider_problem(PROVIDERS[settings.device]),
           lambda settings: f"graph {settings.graph_optimization}",
           own=("graph_optimization", "tf32", "cuda_graph", "trt_cache"),
           variants=({"graph_optimization": "basic"}, {"graph_optimization": "extended"})),
    Engine("openvino", "OpenVINO", ("cpu",), (".onnx", ".xml"),
           lambda path, settings, check: open_openvino(path, settings),
           lambda settings: openvino_problem(settings.precision_hint),
           lambda settings: f"precision {settings.precision_hint}" + (", static batch" if settings.static_batch else ""),
           own=("precision_hint", "static_batch"), fallback="onnxruntime", file_variants=({"static_batch": True},)),
)}


def engine(name: str) -> Engine:
    if name not in ENGINES:
        raise RtkError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    return ENGINES[name]


def unavailable_reason(settings: SessionSettings) -> str | None:
    """Why the session these settings describe cannot run here; None when it can."""
    return ENGINES[settings.engine].problem(settings)


def describe(settings: SessionSettings) -> str:
    """What the session's engine alone is set to, in words ("graph all", "precision bf16")."""
    return ENGINES[settings.engine].words(settings)


def open_session(path: str | Path, settings: SessionSettings, check_placement: bool = True) -> Backend:
    """The session `settings` describe, on `path`, opened by its engine."""
    return ENGINES[settings.engine].open(Path(path), settings, check_placement)
