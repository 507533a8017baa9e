"""`rtk serve`: a bundle behind the Open Inference Protocol (KServe v2, what Triton and KServe speak).

Torch-free: FastAPI/Starlette + uvicorn, prometheus_client and the runtime's `Classifier`, so what is
served is the session verify checked. Concurrent requests are merged by a dynamic batcher (up to
`max_batch_size` rows within `max_queue_delay_ms`); inference runs off the event loop on one worker
thread; a bounded queue answers 503 with Retry-After when full, so memory never grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations by name
from fastapi.responses import JSONResponse, Response

from toolkit import __version__
from toolkit.errors import CheckFailed, RtkError
from toolkit.runtime import Classifier, softmax

BINARY_HEADER = "Inference-Header-Content-Length"
RETRY_AFTER_S = 1
TOKEN_ENV = "RTK_SERVE_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    name: str | None = None
    max_batch_size: int = 8
    max_queue_delay_ms: float = 2.0
    max_queue: int = 64
    provider: str = "cpu"
    threads: int | None = None
    max_body_mb: float = 32.0
    token_env: str = TOKEN_ENV

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise RtkError("--max-batch-size and --max-queue must be at least 1")
        if self.max_queue_delay_ms < 0 or self.max_body_mb <= 0:
            raise RtkError("--max-queue-delay-ms must be >= 0 and --max-body-mb > 0")
        if not 0 < self.port < 65536:
            raise RtkError(f"--port must be 1-65535, got {self.port}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class BadRequest(Exception):
    """The request is malformed; answered 400 with this message."""


class QueueFull(Exception):
    """The batcher's queue is full; answered 503 with Retry-After."""


# ---------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics in a registry of this server's own (several servers may share a process in tests)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("rtk_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("rtk_request_seconds", "Request latency by endpoint", ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("rtk_batch_size", "Rows per model call", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("rtk_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.inference = Histogram("rtk_inference_seconds", "Model call time", registry=self.registry,
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------- dynamic batching


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Merges concurrent requests into one model call; each request gets its own rows back."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_delay_s: float, max_queue: int,
                 metrics: Metrics) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.metrics = metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtk-infer")
        self.worker: asyncio.Task | None = None
        self.carried: _Pending | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        await self.queue.join()
        if self.worker:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
        self.executor.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        item = _Pending(images, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFull(f"the queue is full ({self.queue.maxsize} requests waiting)") from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return await item.future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self.carried is not None:
            item, self.carried = self.carried, None
            return item
        try:
            item = await (asyncio.wait_for(self.queue.get(), timeout) if timeout is not None else self.queue.get())
        except asyncio.TimeoutError:
            return None
        self.metrics.queue_depth.set(self.queue.qsize())
        return item

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, rows = [first], len(first.images)
            deadline = loop.time() + self.max_delay_s
            while rows < self.max_batch_size:
                remaining = deadline - loop.time()
                item = await self._next(remaining) if remaining > 0 else None
                if item is None:
                    break
                if rows + len(item.images) > self.max_batch_size:
                    self.carried = item  # starts the next batch
                    break
                batch.append(item)
                rows += len(item.images)
            await self._call(loop, batch, rows)

    async def _call(self, loop, batch: list[_Pending], rows: int) -> None:
        self.metrics.batch_size.observe(rows)
        start = time.perf_counter()
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
            logits = await loop.run_in_executor(self.executor, self.run, images)
        except Exception as exc:  # the model failed: every request of the batch gets the error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            offset = 0
            for p in batch:
                if not p.future.done():  # a client that went away is simply skipped
                    p.future.set_result(logits[offset:offset + len(p.images)])
                offset += len(p.images)
        finally:
            self.metrics.inference.observe(time.perf_counter() - start)
            for _ in batch:
                self.queue.task_done()


# ---------------------------------------------------------------- the Open Inference Protocol


@dataclass(frozen=True)
class ModelInfo:
    name: str
    crop_size: int
    classes: tuple[str, ...]
    outputs: tuple[str, ...]  # logits [, probabilities]
    file: str
    max_batch_size: int

    def metadata(self) -> dict[str, Any]:
        s = self.crop_size
        return {"name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, s, s, 3]}],
                "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, len(self.classes)]} for o in self.outputs]}

    def config(self) -> dict[str, Any]:
        """Triton's model configuration, as its `/config` endpoint answers it."""
        s = self.crop_size
        return {"name": self.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
                "max_batch_size": self.max_batch_size,
                "input": [{"name": "image", "data_type": "TYPE_UINT8", "dims": [s, s, 3]}],
                "output": [{"name": o, "data_type": "TYPE_FP32", "dims": [len(self.classes)],
                            **({"label_filename": "labels.txt"} if o == "logits" else {})} for o in self.outputs],
                "dynamic_batching": {"max_queue_delay_microseconds": 0}, "parameters": {"file": {"string_value": self.file}}}


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: np.ndarray
    outputs: dict[str, bool]  # name -> binary


def parse_infer(body: bytes, header_length: str | None, info: ModelInfo, max_rows: int) -> InferRequest:
    """A KServe v2 infer request (JSON, or JSON + binary tensor data), checked against the model."""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise BadRequest(f"{BINARY_HEADER} must be an integer, got {header_length!r}") from None
        if not 0 < json_length <= len(body):
            raise BadRequest(f"{BINARY_HEADER} is {json_length} but the body has {len(body)} bytes")
        head, binary = body[:json_length], body[json_length:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("the request must be a JSON object with an 'inputs' list")
    if len(request["inputs"]) != 1 or not isinstance(request["inputs"][0], dict):
        raise BadRequest(f"expected exactly one input, 'image'; got {len(request['inputs'])}")
    tensor = request["inputs"][0]
    if tensor.get("name") != "image":
        raise BadRequest(f"unknown input {tensor.get('name')!r}; the model's input is 'image'")
    if tensor.get("datatype") != "UINT8":
        raise BadRequest(f"input 'image' must have datatype UINT8, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    s = info.crop_size
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or shape[1:] != [s, s, 3] or shape[0] < 1):
        raise BadRequest(f"input 'image' must have shape [N, {s}, {s}, 3], got {shape!r}")
    if shape[0] > max_rows:
        raise BadRequest(f"input 'image' has {shape[0]} images; this server takes at most {max_rows} per request")
    count = int(np.prod(shape))
    params = tensor.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != count:
            raise BadRequest(f"binary_data_size {size!r} does not match shape {shape} ({count} bytes of UINT8)")
        if len(binary) != size:
            raise BadRequest(f"truncated binary body: expected {size} bytes of tensor data, got {len(binary)}")
        images = np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    else:
        if binary:
            raise BadRequest("binary data sent but the input has no binary_data_size parameter")
        data = tensor.get("data")
        if not isinstance(data, list):
            raise BadRequest("input 'image' has neither 'data' nor a binary_data_size parameter")
        try:
            flat = np.asarray(data, dtype=np.int64).reshape(-1)
        except (ValueError, TypeError):
            raise BadRequest("input 'image' data must be a (nested) list of integers") from None
        if flat.size != count:
            raise BadRequest(f"input 'image' has {flat.size} values for shape {shape} ({count})")
        if flat.size and (flat.min() < 0 or flat.max() > 255):
            raise BadRequest("UINT8 values must be between 0 and 255")
        images = flat.astype(np.uint8).reshape(shape)
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    wanted = request.get("outputs")
    if wanted is None:
        outputs = {name: binary_default for name in info.outputs}
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise BadRequest("'outputs' must be a list of objects")
        outputs = {}
        for o in wanted:
            if o.get("name") not in info.outputs:
                raise BadRequest(f"unknown output {o.get('name')!r}; the model's outputs are {list(info.outputs)}")
            outputs[o["name"]] = bool((o.get("parameters") or {}).get("binary_data", binary_default))
    request_id = request.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, images, outputs)


def infer_response(info: ModelInfo, request: InferRequest, logits: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, or JSON + binary outputs when any output asked for binary."""
    values = {"logits": logits.astype(np.float32, copy=False)}
    if "probabilities" in request.outputs:
        values["probabilities"] = softmax(logits.astype(np.float64)).astype(np.float32)
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        array = np.ascontiguousarray(values[name])
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            out["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(array.tobytes())
        else:
            out["data"] = array.reshape(-1).tolist()
        outputs.append(out)
    head = {"model_name": info.name, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    body = json.dumps(head).encode()
    if not blobs:
        return body, {"content-type": "application/json"}
    return body + b"".join(blobs), {"content-type": "application/octet-stream", BINARY_HEADER: str(len(body))}


# ---------------------------------------------------------------- the app


@dataclass
class ServerState:
    ready: bool = False
    reason: str = "starting"


def create_app(clf: Classifier, config: ServeConfig, info: ModelInfo, self_test: bool = True):
    """The FastAPI application serving `clf` under the name in `info`."""
    from fastapi import FastAPI

    metrics = Metrics()
    state = ServerState()
    token = os.environ.get(config.token_env) or None
    batcher_ref: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(clf.logits, config.max_batch_size, config.max_queue_delay_ms / 1e3, config.max_queue, metrics)
        batcher.start()
        batcher_ref["b"] = batcher
        if self_test:
            try:
                await asyncio.get_running_loop().run_in_executor(None, clf.self_test)
            except (CheckFailed, RtkError) as exc:
                state.reason = f"self-test failed: {exc}"
            else:
                state.ready, state.reason = True, "ready"
        else:
            state.ready, state.reason = True, "ready (self-test skipped)"
        yield
        await batcher.stop()  # uvicorn has finished the requests in flight; drain what is queued

    app = FastAPI(title="rtk serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.rtk = state
    app.state.metrics = metrics

    def error(status: int, message: str, headers: dict[str, str] | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Bearer token (all but liveness), body size limit, and the request metrics."""
        start = time.perf_counter()
        endpoint = _endpoint(request.url.path)
        if token and endpoint not in ("live", "metrics"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                response = error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
                return _count(metrics, endpoint, response, start)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            response = error(400, f"request body over the size limit ({config.max_body_bytes} bytes)")
            return _count(metrics, endpoint, response, start)
        response = await call_next(request)
        return _count(metrics, endpoint, response, start)

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise BadRequest(f"request body over the size limit ({config.max_body_bytes} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(name: str):
        if name != info.name:
            return error(404, f"unknown model {name!r}; this server serves {info.name!r}")
        return None

    async def run_model(images: np.ndarray) -> np.ndarray:
        if not state.ready:
            raise QueueFull(f"model not ready: {state.reason}")
        return await batcher_ref["b"].submit(images)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "rtk", "version": __version__, "extensions": ["binary_tensor_data", "model_configuration"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True} if state.ready else error(503, state.reason)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "1"):
        return check_model(name) or info.metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "1"):
        return check_model(name) or ({"name": name, "ready": True} if state.ready else error(503, state.reason))

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str = "1"):
        return check_model(name) or info.config()

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = "1"):
        missing = check_model(name)
        if missing:
            return missing
        try:
            body = await read_body(request)
            parsed = parse_infer(body, request.headers.get(BINARY_HEADER), info, max(256, config.max_batch_size))
            logits = await run_model(parsed.images)
        except BadRequest as exc:
            return error(400, str(exc))
        except QueueFull as exc:
            return error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
        content, headers = infer_response(info, parsed, logits)
        return Response(content, headers=headers)

    @app.post("/v2/models/{name}/classify")
    async def classify(name: str, request: Request, top_k: int = 5):
        """Encoded images (a raw body, or multipart files) in; top-k labels and scores out."""
        missing = check_model(name)
        if missing:
            return missing
        try:
            if top_k < 1:
                raise BadRequest("top_k must be at least 1")
            sources = await _encoded_images(request, read_body)
            loop = asyncio.get_running_loop()
            crops = await asyncio.gather(*(loop.run_in_executor(None, _decode, clf, data, label)
                                           for label, data in sources))
            logits = await run_model(np.stack(crops))
        except BadRequest as exc:
            return error(400, str(exc))
        except QueueFull as exc:
            return error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
        predictions = [{"source": label, "labels": [clf.classes[j] for j in idx], "indices": idx, "scores": scores}
                       for (label, _), (idx, scores) in zip(sources, clf.top_k(logits, top_k))]
        return {"model_name": info.name, "predictions": predictions}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _endpoint(path: str) -> str:
    """A low-cardinality label for the metrics: the route, not the model name."""
    if path.endswith("/health/live"):
        return "live"
    for suffix in ("infer", "classify", "ready", "config", "metrics"):
        if path.rstrip("/").endswith(suffix):
            return suffix
    return "metadata" if path.startswith("/v2") else "other"


def _count(metrics: Metrics, endpoint: str, response, start: float):
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response


async def _encoded_images(request, read_body) -> list[tuple[str, bytes]]:
    """(label, bytes) of each image: the raw body, or every file part of a multipart form."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart
            raise BadRequest(f"malformed multipart body: {exc}") from None
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise BadRequest("the multipart body holds no files")
        return files
    body = await read_body(request)
    if not body:
        raise BadRequest("empty body: send the encoded image (JPEG, PNG, ...) as the body, or multipart files")
    return [("body", body)]


def _decode(clf: Classifier, data: bytes, label: str) -> np.ndarray:
    from toolkit.preprocess import crop_array

    try:
        return crop_array(data, clf.spec, clf.max_pixels)
    except RtkError as exc:
        raise BadRequest(f"{label}: {exc}") from None


# ---------------------------------------------------------------- rtk serve


def model_info(clf: Classifier, bundle: str, name: str | None, max_batch_size: int) -> ModelInfo:
    from pathlib import Path

    from toolkit.bundle import MANIFEST
    from toolkit.manifest import Manifest

    root = Path(bundle)
    softmax_output = (root / MANIFEST).is_file() and Manifest.read(root / MANIFEST).softmax
    default = root.resolve().name if root.is_dir() else root.stem
    return ModelInfo(name or default, clf.spec.crop_size, tuple(clf.classes),
                     ("logits", "probabilities") if softmax_output else ("logits",), clf.path.name, max_batch_size)


def serve(config: ServeConfig, echo: Callable[[str], None] = print) -> None:
    """Load the bundle, self-test it, and serve until SIGINT/SIGTERM (then finish what is in flight)."""
    import uvicorn

    start = time.perf_counter()
    clf = Classifier.load(config.bundle, providers=[config.provider], threads=config.threads)
    info = model_info(clf, config.bundle, config.name, config.max_batch_size)
    app = create_app(clf, config, info)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           timeout_graceful_shutdown=30, access_log=False))
    token = "on (" + config.token_env + ")" if os.environ.get(config.token_env) else "off"

    echo(f"serving {info.name}: {clf.path.name} on {clf.providers[0]} ({clf.settings.engine}, "
         f"{clf.settings.threads or 'default'} threads); dynamic batching up to {config.max_batch_size} within "
         f"{config.max_queue_delay_ms:g} ms, queue {config.max_queue}; bearer token {token}")
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        state = app.state.rtk
        echo(f"{'ready' if state.ready else 'NOT READY: ' + state.reason} at http://{config.host}:{config.port} "
             f"({time.perf_counter() - start:.2f} s after start)")

    @contextlib.contextmanager
    def exit_cleanly_on_signals():
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would die of the
        # signal; a clean stop (in-flight requests answered, queue drained) is exit 0 for process managers.
        previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    server.startup = startup
    server.capture_signals = exit_cleanly_on_signals
    server.run()
    echo("stopped: requests in flight were answered")
