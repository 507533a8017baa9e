"""`rtk serve` through Triton's official HTTP client on 127.0.0.1: health, metadata, config, inference
(binary and JSON) equal to Classifier, every bad request, the 503 of a full queue, the token, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BLOCK_TORCH, copy_bundle
from tests.ports import free_port

httpclient = pytest.importorskip("tritonclient.http", reason="the serve tests need tritonclient[http] (dev extra)")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

from toolkit.serving.classifier import Classifier  # noqa: E402
from toolkit.serving.server import ServeConfig, create_app, model_info, uvicorn_config  # noqa: E402

pytestmark = pytest.mark.serving


@contextlib.contextmanager
def running(bundle: Path, slow_s: float = 0.0, self_test: bool = True, **options):
    """An in-process server on a free 127.0.0.1 port; `slow_s` makes every model call that much slower."""
    with started(bundle, slow_s, self_test, **options) as (server, thread, handle):
        yield handle


@contextlib.contextmanager
def started(bundle: Path, slow_s: float = 0.0, self_test: bool = True, graceful_s: float | None = None, **options):
    """`running`, also giving the uvicorn server and its thread; `graceful_s` bounds uvicorn's own wait for the
    requests in flight at shutdown (after it, uvicorn cancels them)."""
    import uvicorn

    config = ServeConfig(bundle=str(bundle), port=free_port(), **options)
    clf = Classifier.load(bundle, threads=1)
    if slow_s:
        run = clf.backend.run
        clf.backend.run = lambda x: (time.sleep(slow_s), run(x))[1]
    info = model_info(clf, str(bundle), config.name, config.max_batch_size)
    app = create_app(clf, config, info, self_test=self_test)
    settings = uvicorn_config(app, config, log_level="error")
    if graceful_s is not None:
        settings.timeout_graceful_shutdown = graceful_s
    server = uvicorn.Server(settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield server, thread, (f"127.0.0.1:{config.port}", info, clf, app)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served(tiny_bundle):
    with running(tiny_bundle, max_batch_size=8, max_queue_delay_ms=5) as handle:
        yield handle


def crops(clf, tiny_data, n=5) -> tuple[list[Path], np.ndarray]:
    from toolkit.core.preprocess import crop_array

    paths = sorted((tiny_data / "val").rglob("*.png"))[:n]
    return paths, np.stack([crop_array(p, clf.spec) for p in paths])


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(f"http://{url}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def test_health_metadata_and_config(served):
    url, info, clf, _ = served
    client = httpclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(info.name)
    meta = client.get_model_metadata(info.name)
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    config = client.get_model_config(info.name)
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [32, 32, 3]
    assert client.get_server_metadata()["name"] == "rtk"


@pytest.mark.parametrize("binary", [True, False])
def test_inference_equals_the_classifier(served, tiny_data, binary):
    url, info, clf, _ = served
    _, images = crops(clf, tiny_data)
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    result = client.infer(info.name, [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary)],
                          request_id="r1")
    got = result.as_numpy("logits")
    assert got.shape == (5, 3) and got.dtype == np.float32 and result.get_response()["id"] == "r1"
    assert float(np.abs(got - clf.logits(images)).max()) <= 1e-5


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(tiny_bundle, tiny_data):
    with running(tiny_bundle, max_batch_size=8, max_queue_delay_ms=200) as (url, info, clf, app):
        _, images = crops(clf, tiny_data, 6)
        expected = clf.logits(images)
        results: dict[int, np.ndarray] = {}

        def one(i: int) -> None:
            client = httpclient.InferenceServerClient(url)
            tensor = httpclient.InferInput("image", [1, 32, 32, 3], "UINT8")
            tensor.set_data_from_numpy(images[i : i + 1])
            results[i] = client.infer(info.name, [tensor]).as_numpy("logits")[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == list(range(6))
        for i in range(6):
            np.testing.assert_allclose(results[i], expected[i], atol=1e-5)
        batches = app.state.metrics.batch_size.collect()[0].samples
        count = next(s.value for s in batches if s.name.endswith("_count"))
        rows = next(s.value for s in batches if s.name.endswith("_sum"))
        assert rows == 6 and count < 6  # merged: fewer model calls than requests


def test_classify_endpoint_takes_encoded_images(served, tiny_data, photos):
    url, info, clf, _ = served
    raw = photos[0].read_bytes()
    status, _, body = http(f"{url}/v2/models/{info.name}/classify?top_k=2", "POST", raw, {"Content-Type": "image/jpeg"})
    assert status == 200, body
    [p] = json.loads(body)["predictions"]
    [expected] = clf.predict([raw], top_k=2)
    assert p["indices"] == expected.indices and np.allclose(p["scores"], expected.scores, atol=1e-6)
    boundary = "rtkboundary"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + path.read_bytes() + b"\r\n"
                     for path in crops(clf, tiny_data, 2)[0])
    status, _, body = http(f"{url}/v2/models/{info.name}/classify", "POST", parts + f"--{boundary}--\r\n".encode(),
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, body
    assert [p["source"] for p in json.loads(body)["predictions"]] == [p.name for p in crops(clf, tiny_data, 2)[0]]


BAD_REQUESTS = [
    ("malformed JSON", b"{not json", {}, "malformed JSON"),
    ("wrong input name", json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}]}).encode(), {}, "unknown input 'x'"),
    ("wrong dtype", json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 32, 32, 3], "data": [0] * 3072}]}).encode(), {}, "must have datatype UINT8"),
    ("wrong shape", json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}]}).encode(), {}, "must have shape [N, 32, 32, 3]"),
    ("too few values", json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 10}]}).encode(), {}, "has 10 values"),
    ("out of range", json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [300] * 3072}]}).encode(), {}, "between 0 and 255"),
    ("truncated binary", json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "parameters": {"binary_data_size": 3072}}]}).encode() + b"\0" * 100, "binary", "truncated binary body"),
    ("unknown output", json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}], "outputs": [{"name": "probs"}]}).encode(), {}, "unknown output 'probs'"),
]


@pytest.mark.parametrize("what,body,headers,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_400_and_the_server_keeps_serving(served, what, body, headers, message):
    url, info, clf, _ = served
    if headers == "binary":
        headers = {"Inference-Header-Content-Length": str(body.index(b"\0"))}
    status, _, answer = http(f"{url}/v2/models/{info.name}/infer", "POST", body, {"Content-Type": "application/json", **headers})
    assert status == 400 and message in json.loads(answer)["error"]
    assert httpclient.InferenceServerClient(url).is_server_ready()


def test_bad_requests_through_the_official_client(served):
    url, info, _, _ = served
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput("image", [1, 16, 16, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(InferenceServerException, match=r"must have shape \[N, 32, 32, 3\]"):
        client.infer(info.name, [tensor])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    status, _, _ = http(f"{url}/v2/models/nope/infer", "POST", b"{}")
    assert status == 404


def test_undecodable_image_and_oversized_body(tiny_bundle):
    with running(tiny_bundle, max_body_mb=0.01) as (url, info, _, _):
        status, _, body = http(f"{url}/v2/models/{info.name}/classify", "POST", b"not an image")
        assert status == 400 and "body" in json.loads(body)["error"]
        status, _, body = http(f"{url}/v2/models/{info.name}/classify", "POST", b"x" * 20000)
        assert status == 400 and "over the size limit" in json.loads(body)["error"]


def test_a_full_queue_answers_503_with_retry_after(tiny_bundle):
    with running(tiny_bundle, slow_s=0.4, max_batch_size=1, max_queue=1, max_queue_delay_ms=0) as (url, info, _, _):
        body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}]}).encode()
        answers: list[tuple[int, dict]] = []

        def one() -> None:
            status, headers, _ = http(f"{url}/v2/models/{info.name}/infer", "POST", body)
            answers.append((status, headers))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        statuses = sorted(s for s, _ in answers)
        assert len(answers) == 6 and set(statuses) == {200, 503}, statuses
        assert all(h.get("retry-after") == "1" for s, h in answers if s == 503)


def test_a_bearer_token_guards_everything_but_liveness(tiny_bundle, monkeypatch):
    monkeypatch.setenv("RTK_TEST_TOKEN", "s3cret")
    with running(tiny_bundle, token_env="RTK_TEST_TOKEN") as (url, info, _, _):
        client = httpclient.InferenceServerClient(url)
        assert client.is_server_live()
        assert http(f"{url}/v2/health/ready")[0] == 401
        with pytest.raises(InferenceServerException):
            client.get_model_metadata(info.name)
        good = {"Authorization": "Bearer s3cret"}
        assert client.get_model_metadata(info.name, headers=good)["name"] == info.name
        assert http(f"{url}/v2/health/ready", headers={"Authorization": "Bearer wrong"})[0] == 401


def test_metrics(served, tiny_data):
    url, info, clf, _ = served
    status, _, body = http(f"{url}/metrics")
    text = body.decode()
    assert status == 200
    for name in ("rtk_requests_total", "rtk_request_seconds_bucket", "rtk_batch_size_bucket", "rtk_queue_depth",
                 "rtk_inference_seconds_count"):
        assert name in text
    assert 'endpoint="infer",status="200"' in text and 'status="400"' in text


def test_a_failed_self_test_never_becomes_ready(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    with np.load(bundle / "selftest.npz") as data:
        arrays = dict(data)
    arrays["model.onnx"] = arrays["model.onnx"] + 5.0  # what "another machine" computed
    np.savez(bundle / "selftest.npz", **arrays)
    with running(bundle) as (url, info, _, _):
        client = httpclient.InferenceServerClient(url)
        assert client.is_server_live() and not client.is_server_ready()
        status, _, body = http(f"{url}/v2/health/ready")
        assert status == 503 and "self-test failed" in json.loads(body)["error"]
        tensor = httpclient.InferInput("image", [1, 32, 32, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
        with pytest.raises(InferenceServerException, match="not ready"):
            client.infer(info.name, [tensor])


def test_rtk_serve_without_torch_finishes_in_flight_work_on_sigterm(tiny_bundle, tmp_path):
    """The real command, in a process where torch and onnx cannot be imported; SIGTERM while a request waits."""
    port = free_port()
    code = BLOCK_TORCH + textwrap.dedent(f"""
        from toolkit.cli import main
        main(['serve', {str(tiny_bundle)!r}, '--port', '{port}', '--max-queue-delay-ms', '800', '--threads', '1'])
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while http_ready(url) is False:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
            time.sleep(0.1)
        answers = []
        body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [7] * 3072}]}).encode()
        sender = threading.Thread(target=lambda: answers.append(http(f"{url}/v2/models/bundle/infer", "POST", body)))
        sender.start()
        time.sleep(0.3)  # the request now waits in the batcher (800 ms window)
        proc.send_signal(signal.SIGTERM)
        sender.join(20)
        assert proc.wait(20) == 0
        assert answers and answers[0][0] == 200, answers
        out = proc.stdout.read()
        assert "ready at http://127.0.0.1" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()


def http_ready(url: str) -> bool:
    try:
        return http(f"{url}/v2/health/ready")[0] == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


# ---------------------------------------------------------------- real concurrency: merging, overflow, failures, drain


def _infer_body(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                                   "data": images.reshape(-1).tolist()}]}).encode()


def _concurrently(url: str, name: str, requests: list[np.ndarray], timeout: float = 20) -> list:
    """POST every request from its own thread at once; (status, body) per request, in order."""
    answers: list = [None] * len(requests)

    def one(i: int) -> None:
        request = urllib.request.Request(f"http://{url}/v2/models/{name}/infer", data=_infer_body(requests[i]),
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answers[i] = (response.status, json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            body = exc.read()
            answers[i] = (exc.code, json.loads(body) if body.startswith(b"{") else body)
        except OSError as exc:  # no answer at all (reset, timed out): recorded, not raised in the thread
            answers[i] = (None, repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return answers


def _model_calls(app) -> tuple[float, float]:
    samples = app.state.metrics.batch_size.collect()[0].samples
    return (next(s.value for s in samples if s.name.endswith("_count")),
            next(s.value for s in samples if s.name.endswith("_sum")))


def test_multi_row_requests_beyond_the_batch_size_are_all_answered_with_their_own_rows(tiny_bundle, tiny_data):
    """Requests of 3, 2, 1 and 4 rows with --max-batch-size 4: some do not fit the batch being built (they start
    the next one); every request still gets exactly its own rows, and no model call exceeds 4 rows."""
    with running(tiny_bundle, max_batch_size=4, max_queue_delay_ms=300) as (url, info, clf, app):
        _, images = crops(clf, tiny_data, 10)
        expected = clf.logits(images)
        sizes, start = [3, 2, 1, 4], np.cumsum([0, 3, 2, 1])
        calls: list[int] = []
        run = clf.backend.run
        clf.backend.run = lambda x: (calls.append(len(x)), run(x))[1]
        requests = [images[s:s + n] for s, n in zip(start, sizes)]
        answers = _concurrently(url, info.name, requests)
        for (status, body), s, n in zip(answers, start, sizes):
            assert status == 200, body
            got = np.array(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])
            np.testing.assert_allclose(got, expected[s:s + n], atol=1e-5)
        assert sum(calls) == 10 and max(calls) <= 4 and len(calls) < 4  # merged where they fit
        assert _model_calls(app)[1] == 10


def test_a_model_exception_answers_every_waiting_request_with_an_error(tiny_bundle, tiny_data):
    with running(tiny_bundle, max_batch_size=8, max_queue_delay_ms=200) as (url, info, clf, app):
        _, images = crops(clf, tiny_data, 3)
        run = clf.backend.run
        broken = threading.Event()
        broken.set()

        def flaky(x):
            if broken.is_set():
                raise RuntimeError("the device fell off the bus")
            return run(x)

        clf.backend.run = flaky
        start = time.monotonic()
        answers = _concurrently(url, info.name, [images[i:i + 1] for i in range(3)], timeout=10)
        assert time.monotonic() - start < 8  # an error, not a hang until the client gives up
        assert [a[0] for a in answers] == [500, 500, 500], answers
        assert all(a[1]["error"] == "internal error (RuntimeError); see the server log" for a in answers)
        broken.clear()  # the server keeps serving once the model works again
        [(status, body)] = _concurrently(url, info.name, [images[:1]])
        assert status == 200 and np.allclose(body["outputs"][0]["data"], clf.logits(images[:1]).reshape(-1), atol=1e-5)


def test_a_client_that_disconnects_mid_request_does_not_disturb_the_others(tiny_bundle, tiny_data):
    with running(tiny_bundle, slow_s=0.3, max_batch_size=8, max_queue_delay_ms=200) as (url, info, clf, app):
        _, images = crops(clf, tiny_data, 2)
        body = _infer_body(images[:1])
        host, port = url.split(":")
        for _ in range(3):  # three clients send a whole request, then leave before the answer
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(f"POST /v2/models/{info.name}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        [(status, answer)] = _concurrently(url, info.name, [images[1:2]])
        assert status == 200
        np.testing.assert_allclose(answer["outputs"][0]["data"], clf.logits(images[1:2]).reshape(-1), atol=1e-5)
        assert http(f"{url}/v2/health/ready")[0] == 200


def test_shutdown_drains_the_queue_even_after_uvicorn_stops_waiting(tiny_bundle, tiny_data):
    """uvicorn answers what is in flight on its own, but gives up after its graceful timeout (here 0.05 s): the
    requests still queued in the batcher then run before the server returns (the lifespan's drain), so no
    model call is lost half-done or left queued when the process exits."""
    with started(tiny_bundle, slow_s=0.3, max_batch_size=1, max_queue_delay_ms=0, graceful_s=0.05) as (server, thread, handle):
        url, info, clf, app = handle
        _, images = crops(clf, tiny_data, 1)
        calls: list[int] = []
        run = clf.backend.run
        clf.backend.run = lambda x: (calls.append(len(x)), run(x))[1]
        senders = [threading.Thread(target=_concurrently, args=(url, info.name, [images], 5), daemon=True)
                   for _ in range(3)]
        for t in senders:
            t.start()
        deadline = time.monotonic() + 10
        while not calls or app.state.metrics.queue_depth.collect()[0].samples[0].value < 2:
            assert time.monotonic() < deadline, calls  # the first request in the model, two queued behind it
            time.sleep(0.01)
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive() and len(calls) == 3
