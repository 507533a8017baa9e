"""`rtk serve`: a bundle behind the Open Inference Protocol (KServe v2, what Triton and KServe speak).

Torch-free: FastAPI/Starlette + uvicorn, prometheus_client and the runtime's `Classifier`, so what is
served is the session verify checked. Concurrent requests are merged by a dynamic batcher (up to
`max_batch_size` rows within `max_queue_delay_ms`); inference runs off the event loop on one worker
thread; a bounded queue answers 503 with Retry-After when full, so memory never grows without bound.

Every request is hostile until checked, and every bound is a `rtk serve` option (`ServeConfig`):

- bodies: at most `--max-body-mb`, counted as they stream (Content-Length, chunked and multipart alike:
  multipart is parsed in memory from the bounded bytes, never spooled to disk), all bodies in memory
  together at most `--max-inflight-mb` (503 beyond), each complete within `--body-timeout-s`; an
  oversized or late body is a 400 that closes the connection;
- JSON (`/infer`): the JSON part at most `--max-json-mb` and nested at most `MAX_JSON_DEPTH` (checked on
  the raw bytes before parsing), parsed off the event loop; UINT8 data integers 0-255 only, as Triton;
- `/classify`: at most `--max-images` images a request, decoded in a pool of `PARSE_THREADS` threads and run
  `--max-batch-size` at a time; `/infer` rows are split the same way, so no model call exceeds the batch size;
- connections (uvicorn's h11 protocol, which bounds headers where httptools cannot): request line and
  headers at most `--max-header-kb`, the head complete within `--header-timeout-s`, idle keep-alive
  closed after `--keep-alive-s`, at most `--max-connections` open (the longest-idle one makes room for a
  new one, a connection whose request is waiting unread not counting as idle; with none idle the new one
  is closed);
- auth by route: with a token set, every route but `/v2/health/live` needs it; `/metrics` needs the token of
  `--metrics-token-env` when one is given. 401 and 404 answers name no model.

Every refused request is one `{"error": ...}` JSON answer (400 for the client's mistakes, a body over the
limit included: 400 rather than 413, as the limit has always answered; 401, 404, 503 when busy); an unexpected exception is a 500 `{"error": ...}` and one log line, never a traceback; a client
that leaves mid-body is one log line. A self-test that fails in any way leaves the server up and not ready,
the reason on `/v2/health/ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations by name
from fastapi.responses import JSONResponse, Response

from toolkit import __version__
from toolkit.errors import RtkError, first_line
from toolkit.serving.classifier import Classifier, softmax

if TYPE_CHECKING:
    import uvicorn

BINARY_HEADER = "Inference-Header-Content-Length"
RETRY_AFTER_S = 1
TOKEN_ENV = "RTK_SERVE_TOKEN"
# The deepest legal infer request: the object, its inputs list, the tensor object, 4 levels of data. 3 to spare.
MAX_JSON_DEPTH = 10
PARSE_THREADS = min(4, os.cpu_count() or 1)  # JSON, multipart and image decoding, off the event loop
# uvicorn's own logger: its handler and format, one line per event
LOG = logging.getLogger("uvicorn.error")


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
    max_images: int = 64
    max_json_mb: float = 8.0
    max_inflight_mb: float = 256.0
    max_connections: int = 256
    max_header_kb: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0
    metrics_token_env: str | None = None
    trust: tuple[str, ...] = ()  # public keys: serve only a bundle one of them signed (toolkit.serving.signing)

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_queue, self.max_images, self.max_connections, self.max_header_kb) < 1:
            raise RtkError("--max-batch-size, --max-queue, --max-images, --max-connections and --max-header-kb "
                           "must be at least 1")
        if self.max_queue_delay_ms < 0 or min(self.max_body_mb, self.max_json_mb, self.header_timeout_s,
                                              self.body_timeout_s, self.keep_alive_s) <= 0:
            raise RtkError("--max-queue-delay-ms must be >= 0; --max-body-mb, --max-json-mb and the timeouts > 0")
        if self.max_inflight_mb < self.max_body_mb:
            raise RtkError(f"--max-inflight-mb ({self.max_inflight_mb:g}) must be at least --max-body-mb "
                           f"({self.max_body_mb:g})")
        if not 0 < self.port < 65536:
            raise RtkError(f"--port must be 1-65535, got {self.port}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * 2**20)


class BadRequest(Exception):
    """The request is malformed; answered 400 with this message (closing the connection when `close`)."""

    def __init__(self, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.close = close


class QueueFull(Exception):
    """The batcher's queue (or the in-flight body budget) is full; answered 503 with Retry-After."""


class ClientGone(Exception):
    """The client disconnected before its request was read; logged in one line."""


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

    def config(self, max_queue_delay_ms: float, device: str = "cpu") -> dict[str, Any]:
        """Triton's model configuration, as its `/config` endpoint answers it: the one `rtk triton` writes
        (toolkit.serving.triton.model_config), with this server's batching delay and one instance (one
        inference thread) on `device`. `platform` is what Triton fills in from the backend."""
        from toolkit.serving.triton import model_config

        s = self.crop_size
        config = model_config(self.name, [("image", "TYPE_UINT8", [s, s, 3])],
                              [(o, "TYPE_FP32", [len(self.classes)]) for o in self.outputs],
                              max_batch_size=self.max_batch_size, max_queue_delay_us=round(max_queue_delay_ms * 1000),
                              device=device, parameters={"file": self.file})
        return {"name": self.name, "platform": "onnxruntime_onnx", **config}


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: np.ndarray
    outputs: dict[str, bool]  # name -> binary


def parse_infer(body: bytes, header_length: str | None, info: ModelInfo, max_rows: int,
                max_json_bytes: int = 8 * 2**20) -> InferRequest:
    """A KServe v2 infer request (JSON, or JSON + binary tensor data), checked against the model.
    CPU-bound on big JSON: call it off the event loop."""
    head, binary = _split_binary(body, header_length)
    request = _load_json(head, max_json_bytes)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("the request must be a JSON object with an 'inputs' list")
    if len(request["inputs"]) != 1 or not isinstance(request["inputs"][0], dict):
        raise BadRequest(f"expected exactly one input, 'image'; got {len(request['inputs'])}")
    tensor = request["inputs"][0]
    if tensor.get("name") != "image":
        raise BadRequest(f"unknown input {_short(tensor.get('name'))}; the model's input is 'image'")
    if tensor.get("datatype") != "UINT8":
        raise BadRequest(f"input 'image' must have datatype UINT8, got {_short(tensor.get('datatype'))}")
    shape = tensor.get("shape")
    s = info.crop_size
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or shape[1:] != [s, s, 3] or shape[0] < 1):
        raise BadRequest(f"input 'image' must have shape [N, {s}, {s}, 3], got {_short(shape)}")
    if shape[0] > max_rows:
        raise BadRequest(f"input 'image' has {shape[0]} images; this server takes at most {max_rows} per request")
    params = _parameters(tensor, "input 'image'")
    if "binary_data_size" in params:
        images = _binary_images(binary, params["binary_data_size"], shape)
    else:
        if binary:
            raise BadRequest("binary data sent but the input has no binary_data_size parameter")
        if not isinstance(tensor.get("data"), list):
            raise BadRequest("input 'image' has neither 'data' nor a binary_data_size parameter")
        images = uint8_data(tensor["data"], shape)
    request_id = request.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, images, _outputs(request, info))


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a body (the binary tensor data extension)."""
    if header_length is None:
        return body, b""
    try:
        json_length = int(header_length)
    except ValueError:
        raise BadRequest(f"{BINARY_HEADER} must be an integer, got {_short(header_length)}") from None
    if not 0 < json_length <= len(body):
        raise BadRequest(f"{BINARY_HEADER} is {json_length} but the body has {len(body)} bytes")
    return body[:json_length], body[json_length:]


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal, escapes included


def json_depth(text: bytes, limit: int) -> int:
    """How deep `text` nests arrays and objects, up to `limit + 1` (strings are skipped, so a bracket inside
    one does not count). Vectorised 1 MB at a time: linear, and cheap next to the parse it saves."""
    scan = np.frombuffer(_JSON_STRING.sub(b'""', text), dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, len(scan), 2**20):
        chunk = scan[start:start + 2**20]
        step = ((chunk == ord("[")) | (chunk == ord("{"))).astype(np.int32)
        step -= (chunk == ord("]")) | (chunk == ord("}"))
        running = depth + np.cumsum(step)
        if running.size:
            deepest, depth = max(deepest, int(running.max())), int(running[-1])
        if deepest > limit:
            break
    return deepest


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _load_json(head: bytes, max_json_bytes: int) -> Any:
    """json.loads with a size and a depth bound, both checked before parsing (Python's parser has neither:
    deep nesting is slow to turn into arrays, and 100,000 levels overflow the stack)."""
    if len(head) > max_json_bytes:
        raise BadRequest(f"the JSON part is {len(head)} bytes, over the limit of {max_json_bytes} (--max-json-mb); "
                         f"send large tensors with the binary tensor data extension")
    if json_depth(head, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels; data must be flat or nested as its shape")
    try:
        return json.loads(head, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def uint8_data(data: list, shape: list[int]) -> np.ndarray:
    """JSON tensor data, flat or nested as `shape`: integers 0-255 only. Triton refuses floats, strings and
    booleans; truncating them would answer 0-1 floats with the black image's prediction."""
    count = int(np.prod(shape))
    try:
        values = np.asarray(data, dtype=object)
    except ValueError:
        raise BadRequest(f"input 'image' data is ragged; it must be flat or nested as shape {shape}") from None
    kinds = set(map(type, values.ravel())) - {int}
    if list in kinds:  # numpy stops at the first level whose lists differ in length
        raise BadRequest(f"input 'image' data is ragged; it must be flat or nested as shape {shape}")
    if values.ndim == 1 and values.size != count:
        raise BadRequest(f"input 'image' has {values.size} values for shape {shape} ({count})")
    if values.shape not in ((count,), tuple(shape)):
        raise BadRequest(f"input 'image' data has shape {list(values.shape)}; it must be flat or nested as {shape}")
    if kinds:
        raise BadRequest(f"UINT8 data must be integers 0-255; got {', '.join(sorted(k.__name__ for k in kinds))}")
    try:
        ints = values.astype(np.int64)
    except OverflowError:
        ints = None
    if ints is None or (ints.size and (ints.min() < 0 or ints.max() > 255)):
        raise BadRequest("UINT8 values must be between 0 and 255")
    return ints.astype(np.uint8).reshape(shape)


def _binary_images(binary: bytes, size: Any, shape: list[int]) -> np.ndarray:
    count = int(np.prod(shape))
    if not isinstance(size, int) or isinstance(size, bool) or size != count:
        raise BadRequest(f"binary_data_size {_short(size)} does not match shape {shape} ({count} bytes of UINT8)")
    if len(binary) != size:
        raise BadRequest(f"truncated binary body: expected {size} bytes of tensor data, got {len(binary)}")
    return np.frombuffer(binary, dtype=np.uint8).reshape(shape)


def _parameters(holder: dict, what: str) -> dict:
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"'parameters' of {what} must be an object, got {type(params).__name__}")
    return params


def _outputs(request: dict, info: ModelInfo) -> dict[str, bool]:
    """The outputs asked for, each with whether it is wanted as binary data."""
    binary_default = bool(_parameters(request, "the request").get("binary_data_output", False))
    wanted = request.get("outputs")
    if wanted is None:
        return {name: binary_default for name in info.outputs}
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise BadRequest("'outputs' must be a list of objects")
    outputs = {}
    for o in wanted:
        if o.get("name") not in info.outputs:
            raise BadRequest(f"unknown output {_short(o.get('name'))}; the model's outputs are {list(info.outputs)}")
        outputs[o["name"]] = bool(_parameters(o, f"output {o['name']!r}").get("binary_data", binary_default))
    return outputs


def _short(value: Any, limit: int = 80) -> str:
    """repr() of a client's value, cut short: error messages must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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


class BodyReader:
    """Reads request bodies with a size limit per body, a total for all bodies held in memory at once,
    and a deadline; counts what it reads as it streams, so chunked bodies are bounded like any other."""

    def __init__(self, max_bytes: int, max_inflight_bytes: int, timeout_s: float) -> None:
        self.max_bytes, self.max_inflight_bytes, self.timeout_s = max_bytes, max_inflight_bytes, timeout_s
        self.inflight = 0

    @contextlib.asynccontextmanager
    async def read(self, request: Request) -> AsyncIterator[bytes]:
        """The whole body, counted against the in-flight total until the block ends."""
        from starlette.requests import ClientDisconnect

        loop = asyncio.get_running_loop()
        deadline, stream = loop.time() + self.timeout_s, request.stream().__aiter__()
        held, chunks = 0, []
        try:
            try:
                while True:  # asyncio.timeout() would need Python 3.11
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
                    except StopAsyncIteration:
                        break
                    held += len(chunk)
                    self.inflight += len(chunk)
                    self._check(held)
                    chunks.append(chunk)
            except asyncio.TimeoutError:
                raise BadRequest(f"the request body did not arrive within {self.timeout_s:g} s (--body-timeout-s)",
                                 close=True) from None
            except ClientDisconnect:
                raise ClientGone(f"{_client(request)} went away after sending {held} bytes of its body") from None
            body = b"".join(chunks)
            chunks.clear()
            yield body
        finally:
            self.inflight -= held

    def _check(self, held: int) -> None:
        if held > self.max_bytes:
            raise BadRequest(f"request body over the size limit ({self.max_bytes} bytes)", close=True)
        if self.inflight > self.max_inflight_bytes:
            raise QueueFull(f"too many request bodies in memory ({self.max_inflight_bytes} bytes, --max-inflight-mb)")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every refusal: one `{"error": ...}` JSON answer."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Service:
    """What the handlers of one app share: the classifier, the bounds, the metrics, readiness, the batcher
    and the parsing pool (both started by the app's lifespan)."""

    def __init__(self, clf: Classifier, config: ServeConfig, info: ModelInfo, self_test: bool) -> None:
        self.clf, self.config, self.info, self.self_test = clf, config, info, self_test
        self.metrics = Metrics()
        self.state = ServerState()
        self.token = os.environ.get(config.token_env) or None
        self.metrics_token = _metrics_token(config)
        self.bodies = BodyReader(config.max_body_bytes, int(config.max_inflight_mb * 2**20), config.body_timeout_s)
        # what /config answers: built like `rtk triton`'s config.pbtxt, with the delay this server waits
        self.model_config = info.config(config.max_queue_delay_ms, clf.settings.device)
        self.batcher: Batcher | None = None
        self.parse: ThreadPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app) -> AsyncIterator[None]:
        config = self.config
        self.batcher = Batcher(self.clf.logits, config.max_batch_size, config.max_queue_delay_ms / 1e3, config.max_queue,
                               self.metrics)
        self.batcher.start()
        self.parse = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="rtk-parse")
        if self.self_test:
            self.state.ready, self.state.reason = await _self_test(self.clf)
        else:
            self.state.ready, self.state.reason = True, "ready (self-test skipped)"
        yield
        await self.batcher.stop()  # uvicorn has finished the requests in flight; drain what is queued
        self.parse.shutdown(wait=True)

    def needed_token(self, endpoint: str) -> str | None:
        """Only liveness is open; `/metrics` has a token of its own."""
        return None if endpoint == "live" else self.metrics_token if endpoint == "metrics" else self.token

    def check_model(self, name: str, version: str = "1") -> JSONResponse | None:
        if name != self.info.name:  # the answer does not say what is served: that is for token holders
            return _error(404, f"unknown model {_short(name)}")
        if version != "1":
            return _error(404, f"unknown version {_short(version)} of model {name!r}; this server has version 1")
        return None

    def offload(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        """CPU-bound parsing and decoding in the bounded pool, never on the event loop."""
        return asyncio.get_running_loop().run_in_executor(self.parse, fn, *args)

    async def run_model(self, images: np.ndarray) -> np.ndarray:
        """Logits for any number of rows, `max_batch_size` rows per model call."""
        if not self.state.ready or self.batcher is None:
            raise QueueFull(f"model not ready: {self.state.reason}")
        step = self.config.max_batch_size
        parts = [await self.batcher.submit(images[i:i + step]) for i in range(0, len(images), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def infer(self, request: Request) -> Response:
        async with self.bodies.read(request) as body:
            parsed = await self.offload(parse_infer, body, request.headers.get(BINARY_HEADER), self.info,
                                        max(256, self.config.max_batch_size), self.config.max_json_bytes)
        logits = await self.run_model(parsed.images)
        content, headers = infer_response(self.info, parsed, logits)
        return Response(content, headers=headers)

    async def classify(self, request: Request, top_k: int) -> dict[str, Any]:
        if top_k < 1:
            raise BadRequest("top_k must be at least 1")
        step, clf = self.config.max_batch_size, self.clf
        async with self.bodies.read(request) as body:
            sources = await self.offload(encoded_images, request.headers.get("content-type", ""), body,
                                         self.config.max_images)
        logits = []
        for i in range(0, len(sources), step):  # decoded a batch at a time: bounded memory
            crops = await asyncio.gather(*(self.offload(_decode, clf, data, label) for label, data in sources[i:i + step]))
            logits.append(await self.run_model(np.stack(crops)))
        predictions = [{"source": label, "labels": [clf.classes[j] for j in idx], "indices": idx, "scores": scores}
                       for (label, _), (idx, scores) in zip(sources, clf.top_k(np.concatenate(logits), top_k))]
        return {"model_name": self.info.name, "predictions": predictions}


async def _answered(work: Awaitable[Any]) -> Any:
    """The handler's answer, or the refusal its exception stands for."""
    try:
        return await work
    except BadRequest as exc:
        return _error(400, str(exc), {"Connection": "close"} if exc.close else None)
    except QueueFull as exc:
        return _error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
    except ClientGone as exc:
        LOG.warning("client %s", exc)
        return _error(400, str(exc))  # nobody reads it; the metrics count it


def _guard(service: Service) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """The middleware: bearer token by route, the size a body announces, the request metrics, and the last resort."""
    max_body = service.config.max_body_bytes

    async def guard(request: Request, call_next) -> Response:
        start = time.perf_counter()
        endpoint = _endpoint(request.url.path)
        needed = service.needed_token(endpoint)
        length = request.headers.get("content-length")
        if needed and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                              f"Bearer {needed}".encode()):
            response = _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        elif length is not None and (not length.isdigit() or int(length) > max_body):
            response = _error(400, f"request body over the size limit ({max_body} bytes)", {"Connection": "close"})
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # a bug of ours, not the client's: one log line and a JSON 500
                LOG.error("%s %s: unexpected %s", request.method, endpoint, _first_line(exc))
                response = _error(500, f"internal error ({type(exc).__name__}); see the server log")
        return _count(service.metrics, endpoint, response, start)

    return guard


def _routes(service: Service):
    """The Open Inference Protocol's routes (and /metrics) on `service`."""
    from fastapi import APIRouter

    router, state, info, check = APIRouter(), service.state, service.info, service.check_model

    @router.get("/v2")
    async def server_metadata():
        return {"name": "rtk", "version": __version__, "extensions": ["binary_tensor_data", "model_configuration"]}

    @router.get("/v2/health/live")
    async def live():
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready():
        return {"ready": True} if state.ready else _error(503, state.reason)

    @router.get("/v2/models/{name}")
    @router.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "1"):
        return check(name, version) or info.metadata()

    @router.get("/v2/models/{name}/ready")
    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "1"):
        return check(name, version) or ({"name": name, "ready": True} if state.ready else _error(503, state.reason))

    @router.get("/v2/models/{name}/config")
    @router.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str = "1"):
        return check(name, version) or service.model_config

    @router.post("/v2/models/{name}/infer")
    @router.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = "1"):
        return check(name, version) or await _answered(service.infer(request))

    @router.post("/v2/models/{name}/classify")
    async def classify(name: str, request: Request, top_k: int = 5):
        """Encoded images (a raw body, or multipart files) in; top-k labels and scores out."""
        return check(name) or await _answered(service.classify(request, top_k))

    @router.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router


def create_app(clf: Classifier, config: ServeConfig, info: ModelInfo, self_test: bool = True):
    """The FastAPI application serving `clf` under the name in `info`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    service = Service(clf, config, info, self_test)
    app = FastAPI(title="rtk serve", version=__version__, lifespan=service.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.rtk = service.state
    app.state.metrics = service.metrics

    async def invalid_parameters(request: Request, exc: RequestValidationError):
        return _error(400, _validation_message(exc))

    async def http_error(request: Request, exc: HTTPException):  # unknown routes and methods: ours, not {"detail"}
        return _error(exc.status_code, str(exc.detail), exc.headers)

    app.add_exception_handler(RequestValidationError, invalid_parameters)
    app.add_exception_handler(HTTPException, http_error)
    app.middleware("http")(_guard(service))
    app.include_router(_routes(service))
    return app


def _metrics_token(config: ServeConfig) -> str | None:
    """The token `/metrics` asks for: none unless --metrics-token-env names a variable, which must be set."""
    if config.metrics_token_env is None:
        return None
    value = os.environ.get(config.metrics_token_env)
    if not value:
        raise RtkError(f"--metrics-token-env {config.metrics_token_env}: that environment variable is not set")
    return value


async def _self_test(clf: Classifier) -> tuple[bool, str]:
    """(ready, reason). Any failure, a mismatch or a corrupt selftest.npz alike, leaves the server up and not
    ready: the reason is for /v2/health/ready and the log, never a crash."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, clf.self_test)
    except Exception as exc:  # noqa: BLE001 -- numpy and zipfile raise many kinds on a corrupt file
        reason = f"self-test failed: {_first_line(exc)}"
        LOG.warning("NOT READY: %s", reason)
        return False, reason
    return True, "ready"


def _first_line(exc: BaseException) -> str:
    """An exception as one line, cut at 300 characters; an unexpected one's type goes before its message."""
    text = first_line(exc)  # the type's name when the message is empty
    if not isinstance(exc, RtkError) and text != type(exc).__name__:
        text = f"{type(exc).__name__}: {text}"
    return text[:300]


def _validation_message(exc: Any) -> str:
    """FastAPI's validation errors (a query parameter that is not an integer) as one line."""
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
             for e in exc.errors()[:3]]
    return "invalid request parameters: " + "; ".join(parts)


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


_ROUTE = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?(?:/(ready|config|infer|classify))?")


def _endpoint(path: str) -> str:
    """The route a path goes to, exactly as the router matches it: the metrics label (low cardinality: no
    model names) and what decides the token (only liveness is open; `/metrics` has its own)."""
    exact = {"/v2/health/live": "live", "/v2/health/ready": "ready", "/metrics": "metrics", "/v2": "server"}
    if path in exact:
        return exact[path]
    match = _ROUTE.fullmatch(path)
    if match:
        return match.group(1) or "metadata"
    return "other"


def _count(metrics: Metrics, endpoint: str, response, start: float):
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response


def encoded_images(content_type: str, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """(label, bytes) of each image: the raw body, or every file part of a multipart form."""
    if content_type.startswith("multipart/form-data"):
        files = multipart_files(content_type, body, max_images)
        if not files:
            raise BadRequest("the multipart body holds no files")
        return files
    if not body:
        raise BadRequest("empty body: send the encoded image (JPEG, PNG, ...) as the body, or multipart files")
    return [("body", body)]


def multipart_files(content_type: str, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """The file parts of a multipart/form-data body, parsed in memory from bytes already bounded
    (Starlette's request.form() reads the stream without our limit and spools files to disk)."""
    try:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart before 0.0.13 is imported as `multipart`
        from multipart.exceptions import FormParserError
        from multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise BadRequest("malformed multipart body: no boundary in the Content-Type")
    files: list[tuple[str, bytes]] = []
    data, header, value, disposition = bytearray(), bytearray(), bytearray(), [b""]

    def header_end() -> None:
        if bytes(header).lower() == b"content-disposition":
            disposition[0] = bytes(value)
        header.clear()
        value.clear()

    def part_end() -> None:
        options = parse_options_header(disposition[0])[1]
        if b"filename" in options:  # a file; plain form fields are ignored
            if len(files) == max_files:
                raise BadRequest(f"more than {max_files} images in one request; this server takes at most "
                                 f"{max_files} (--max-images)")
            label = options[b"filename"] or options.get(b"name", b"")
            files.append((label.decode("utf-8", "replace"), bytes(data)))
        data.clear()
        disposition[0] = b""

    callbacks = {"on_part_data": lambda b, start, end: data.extend(b[start:end]),
                 "on_header_field": lambda b, start, end: header.extend(b[start:end]),
                 "on_header_value": lambda b, start, end: value.extend(b[start:end]),
                 "on_header_end": header_end, "on_part_end": part_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    return files


def _decode(clf: Classifier, data: bytes, label: str) -> np.ndarray:
    from toolkit.core.preprocess import crop_array

    try:
        return crop_array(data, clf.spec, clf.max_pixels)
    except RtkError as exc:
        raise BadRequest(f"{label}: {exc}") from None


# ---------------------------------------------------------------- connections


def bounded_protocol(config: ServeConfig) -> type:
    """uvicorn's h11 protocol with the bounds uvicorn lacks: a connection that sends no complete request
    head within --header-timeout-s is closed (uvicorn times out only idle keep-alive connections, so one that
    never sends a byte is held forever), and at most --max-connections are open: the longest-idle one makes
    room for a new one, so idle sockets cannot crowd out real clients or the descriptor limit."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        idle_since = 0.0
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()
            if _open(self.connections) > config.max_connections:
                idle = [p for p in self.connections if p is not self and _idle(p)]
                min(idle, key=lambda p: p.idle_since, default=self).transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # h11's refusals (a head over the limit): our JSON
            _send_error(self, 400, f"invalid HTTP request (malformed, or a request head over "
                                   f"{config.max_header_kb} KB)")

        def _await_head(self) -> None:
            self.idle_since = time.monotonic()
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(config.header_timeout_s, self._head_expired, self.cycle)

        def _head_expired(self, cycle: Any) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # no new request began: close
                self.transport.close()

    return BoundedH11Protocol


def _open(connections: Any) -> int:
    return sum(not p.transport.is_closing() for p in connections)


def _unread_bytes(protocol: Any) -> int:
    """Bytes the kernel holds for this connection that the event loop has not read yet (FIONREAD)."""
    import fcntl
    import struct
    import termios

    sock = protocol.transport.get_extra_info("socket")
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except (OSError, AttributeError, ValueError):
        return 0


def _idle(protocol: Any) -> bool:
    """Open and between requests (or before the first), with nothing sent that is still unread: the event
    loop accepts connections in bursts, and a real client accepted in one has its request waiting unread."""
    return (not protocol.transport.is_closing() and (protocol.cycle is None or protocol.cycle.response_complete)
            and _unread_bytes(protocol) == 0)


def _send_error(protocol: Any, status: int, message: str) -> None:
    import h11

    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    with contextlib.suppress(h11.LocalProtocolError):
        for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            protocol.transport.write(protocol.conn.send(event))
    protocol.transport.close()


def uvicorn_config(app, config: ServeConfig, log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn settings of a ServeConfig: its connection bounds, on uvicorn's h11 protocol."""
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=30, http=bounded_protocol(config),
                          h11_max_incomplete_event_size=config.max_header_kb * 1024,
                          timeout_keep_alive=config.keep_alive_s,
                          # requests still running after their clients left count too
                          limit_concurrency=2 * config.max_connections)


# ---------------------------------------------------------------- rtk serve


def model_info(clf: Classifier, bundle: str, name: str | None, max_batch_size: int) -> ModelInfo:
    from pathlib import Path

    from toolkit.core.bundle import MANIFEST
    from toolkit.core.manifest import Manifest

    root = Path(bundle)
    served = clf.path.parent / MANIFEST  # the manifest beside the served file: a trusted bundle's private copy
    softmax_output = root.is_dir() and served.is_file() and Manifest.read(served).softmax
    default = root.resolve().name if root.is_dir() else root.stem
    return ModelInfo(name or default, clf.spec.crop_size, tuple(clf.classes),
                     ("logits", "probabilities") if softmax_output else ("logits",), clf.path.name, max_batch_size)


def serve(config: ServeConfig, echo: Callable[[str], None] = print) -> None:
    """Load the bundle, self-test it, and serve until SIGINT/SIGTERM (then finish what is in flight)."""
    import uvicorn

    start = time.perf_counter()
    # with --trust a refused bundle raises here, before anything listens: it never becomes ready
    clf = Classifier.load(config.bundle, providers=[config.provider], threads=config.threads,
                          trust=list(config.trust) or None)
    info = model_info(clf, config.bundle, config.name, config.max_batch_size)
    app = create_app(clf, config, info)
    server = uvicorn.Server(uvicorn_config(app, config))
    token = "on (" + config.token_env + ")" if os.environ.get(config.token_env) else "off"

    echo(f"serving {info.name}: {clf.path.name} on {clf.providers[0]} ({clf.settings.engine}, "
         f"{clf.settings.threads or 'default'} threads); dynamic batching up to {config.max_batch_size} within "
         f"{config.max_queue_delay_ms:g} ms, queue {config.max_queue}; bearer token {token}")
    if clf.trusted is not None:
        verified = clf.trusted.verified
        echo(f"signature verified: {len(verified.digests)} files of {verified.root} signed by {verified.key}; "
             f"serving private copies in {clf.trusted.root}")
    echo(f"bounds: body {config.max_body_mb:g} MB (JSON {config.max_json_mb:g} MB), {config.max_inflight_mb:g} MB "
         f"of bodies in memory, {config.max_images} images per /classify, {config.max_connections} connections, "
         f"headers {config.max_header_kb} KB, timeouts: head {config.header_timeout_s:g} s, body "
         f"{config.body_timeout_s:g} s, keep-alive {config.keep_alive_s:g} s")
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
