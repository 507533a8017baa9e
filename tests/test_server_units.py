"""The server's batcher and request codec on their own (no model, no sockets: milliseconds each): rows merged and
given back to their own request, a request that does not fit carried to the next batch, a model failure
reaching every waiting request, the drain on stop; the KServe v2 JSON/binary codec both ways."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve tests need the serve extra")
from toolkit.serving.server import (  # noqa: E402
    BINARY_HEADER,
    BadRequest,
    Batcher,
    Metrics,
    ModelInfo,
    QueueFull,
    infer_response,
    parse_infer,
)

pytestmark = pytest.mark.serving

INFO = ModelInfo("m", 2, ("a", "b", "c"), ("logits", "probabilities"), "model.onnx", 4)


def rows(n: int, first: int = 0) -> np.ndarray:
    """n images of 2x2x3 whose first pixel holds their number: the fake model's logits give it back."""
    images = np.zeros((n, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(first, first + n)
    return images


class FakeModel:
    """Logits [number, 2 * number, 0] per image; records each call's batch size. `gate` holds calls back."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[int] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.gate.wait(10)
        self.calls.append(len(images))
        if self.fail:
            raise self.fail
        n = images[:, 0, 0, 0].astype(np.float32)
        return np.stack([n, 2 * n, np.zeros_like(n)], axis=1)


def batch_counts(metrics: Metrics) -> tuple[float, float]:
    samples = metrics.batch_size.collect()[0].samples
    return (next(s.value for s in samples if s.name.endswith("_count")),
            next(s.value for s in samples if s.name.endswith("_sum")))


async def _serve(model: FakeModel, requests: list[np.ndarray], max_batch: int = 4, delay_s: float = 0.2,
                 max_queue: int = 16, hold: bool = False):
    """Submit every request at once to a fresh batcher; each request's outcome (logits or exception)."""
    batcher = Batcher(model, max_batch, delay_s, max_queue, Metrics())
    batcher.start()
    if hold:
        model.gate.clear()
    tasks = [asyncio.ensure_future(batcher.submit(r)) for r in requests]
    await asyncio.sleep(0.01)
    model.gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    await asyncio.wait_for(batcher.stop(), 10)
    return outcomes, batcher


def _expected(images: np.ndarray) -> np.ndarray:
    n = images[:, 0, 0, 0].astype(np.float32)
    return np.stack([n, 2 * n, np.zeros_like(n)], axis=1)


def test_multi_row_requests_are_merged_and_each_gets_its_own_rows():
    model = FakeModel()
    requests = [rows(1, 0), rows(2, 1), rows(1, 3)]  # 4 rows: one model call
    outcomes, batcher = asyncio.run(_serve(model, requests))
    assert model.calls == [4]
    for request, got in zip(requests, outcomes):
        np.testing.assert_array_equal(got, _expected(request))
    assert batch_counts(batcher.metrics) == (1, 4)
    inference = {s.name: s.value for s in batcher.metrics.inference.collect()[0].samples}
    assert inference["rtk_inference_seconds_count"] == 1 and 0 <= inference["rtk_inference_seconds_sum"] < 5


def test_a_request_that_does_not_fit_starts_the_next_batch():
    model = FakeModel()
    requests = [rows(3, 0), rows(2, 3), rows(1, 5), rows(4, 6)]  # 3 | 2+1 | 4 with max 4
    outcomes, _ = asyncio.run(_serve(model, requests))
    assert model.calls == [3, 3, 4] and sum(model.calls) == 10
    for request, got in zip(requests, outcomes):
        np.testing.assert_array_equal(got, _expected(request))


def test_a_full_batch_is_sent_without_waiting_for_the_delay():
    model = FakeModel()

    async def timed():
        loop = asyncio.get_running_loop()
        start = loop.time()
        outcome = await _serve(model, [rows(2), rows(2, 2)], delay_s=5.0)
        return outcome, loop.time() - start

    (outcomes, _), seconds = asyncio.run(timed())
    assert model.calls == [4] and seconds < 2.0
    np.testing.assert_array_equal(outcomes[1], _expected(rows(2, 2)))


def test_the_delay_bounds_the_wait_of_a_lone_request():
    model = FakeModel()

    async def timed():
        loop = asyncio.get_running_loop()
        start = loop.time()
        outcome = await _serve(model, [rows(1)], delay_s=0.3)
        return outcome, loop.time() - start

    (outcomes, _), seconds = asyncio.run(timed())
    assert model.calls == [1] and 0.25 < seconds < 3.0
    np.testing.assert_array_equal(outcomes[0], _expected(rows(1)))


def test_a_zero_delay_sends_each_request_alone():
    model = FakeModel()
    outcomes, _ = asyncio.run(_serve(model, [rows(1, i) for i in range(3)], delay_s=0.0, hold=True))
    assert sum(model.calls) == 3 and model.calls[0] == 1
    for i, got in enumerate(outcomes):
        np.testing.assert_array_equal(got, _expected(rows(1, i)))


def test_a_model_exception_reaches_every_waiting_request():
    model = FakeModel(fail=RuntimeError("the model broke"))
    outcomes, batcher = asyncio.run(_serve(model, [rows(1), rows(2, 1), rows(3, 3)]))
    assert len(outcomes) == 3 and all(isinstance(o, RuntimeError) and str(o) == "the model broke" for o in outcomes)
    assert model.calls == [3, 3] and batcher.queue.qsize() == 0


def test_the_batcher_keeps_serving_after_a_model_exception():
    class FailsOnce(FakeModel):
        def __call__(self, images):
            if not self.calls:
                self.calls.append(len(images))
                raise ValueError("once")
            return super().__call__(images)

    async def scenario():
        model = FailsOnce()
        batcher = Batcher(model, 4, 0.0, 8, Metrics())
        batcher.start()
        with pytest.raises(ValueError, match="once"):
            await asyncio.wait_for(batcher.submit(rows(1)), 10)
        got = await asyncio.wait_for(batcher.submit(rows(1, 7)), 10)
        await asyncio.wait_for(batcher.stop(), 10)
        return got

    np.testing.assert_array_equal(asyncio.run(scenario()), _expected(rows(1, 7)))


def test_a_request_whose_client_left_is_skipped_and_the_others_answered():
    async def scenario():
        model = FakeModel()
        batcher = Batcher(model, 4, 0.2, 8, Metrics())
        batcher.start()
        gone = asyncio.ensure_future(batcher.submit(rows(1, 0)))
        stays = asyncio.ensure_future(batcher.submit(rows(2, 1)))
        await asyncio.sleep(0.02)
        gone.cancel()  # the handler of a client that disconnected is cancelled while it waits
        got = await asyncio.wait_for(stays, 10)
        await asyncio.wait_for(batcher.stop(), 10)
        return got, model.calls, gone.cancelled()

    got, calls, cancelled = asyncio.run(scenario())
    np.testing.assert_array_equal(got, _expected(rows(2, 1)))
    assert cancelled and sum(calls) == 3  # the batch ran; the left request's rows were not sent to anyone


def test_stop_drains_the_queue_before_it_returns():
    """What SIGTERM relies on: every request queued when the server stops is still run and answered."""
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher = Batcher(model, 1, 0.0, 8, Metrics())
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(rows(1, i))) for i in range(4)]
        await asyncio.sleep(0.02)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # the first call is still held: stop waits
        model.gate.set()
        await asyncio.wait_for(stopping, 10)
        return [t.result() for t in tasks if t.done()], model.calls

    answers, calls = asyncio.run(scenario())
    assert calls == [1, 1, 1, 1] and len(answers) == 4
    for i, got in enumerate(answers):
        np.testing.assert_array_equal(got, _expected(rows(1, i)))


def test_stop_leaves_no_task_or_thread_behind():
    async def scenario():
        batcher = Batcher(FakeModel(), 2, 0.0, 4, Metrics())
        batcher.start()
        await asyncio.wait_for(batcher.submit(rows(1)), 10)
        await batcher.stop()  # awaited directly: nothing else runs between its end and the check
        # checked while the batcher is still referenced: a dropped executor's idle thread also exits once
        # the executor is garbage-collected, which would hide a stop() that never shut it down
        left = [t for t in threading.enumerate() if t.name.startswith("rtk-infer")]
        return batcher.worker.done(), left

    done, left = asyncio.run(scenario())
    assert done and not left


def test_the_queue_depth_metric_follows_the_queue():
    def depth(batcher) -> float:
        return batcher.metrics.queue_depth.collect()[0].samples[0].value

    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher = Batcher(model, 1, 0.0, 8, Metrics())
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(rows(1, 0)))]
        await asyncio.sleep(0.05)  # taken by the worker, held in the model
        tasks += [asyncio.ensure_future(batcher.submit(rows(1, i))) for i in (1, 2)]
        await asyncio.sleep(0.05)
        waiting = depth(batcher)
        model.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        after = depth(batcher)
        await asyncio.wait_for(batcher.stop(), 10)
        return waiting, after

    assert asyncio.run(scenario()) == (2, 0)


def test_a_full_queue_is_refused_at_once():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher = Batcher(model, 1, 0.0, 2, Metrics())
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(rows(1, 0)))]
        await asyncio.sleep(0.05)  # the first request is in the (held) model call: the queue is empty again
        tasks += [asyncio.ensure_future(batcher.submit(rows(1, i))) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        model.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        await asyncio.wait_for(batcher.stop(), 10)
        return outcomes

    outcomes = asyncio.run(scenario())
    refused = [o for o in outcomes if isinstance(o, QueueFull)]
    answered = [o for o in outcomes if isinstance(o, np.ndarray)]
    assert len(refused) == 1 and len(answered) == 3 and "the queue is full (2 requests waiting)" in str(refused[0])


# ---------------------------------------------------------------- the request codec


def _request(n: int = 1, **tensor) -> dict:
    images = rows(n, 5)
    return {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                        "data": images.reshape(-1).tolist(), **tensor}]}


def test_json_data_flat_or_nested_gives_the_same_images():
    flat = parse_infer(json.dumps(_request(2)).encode(), None, INFO, 8)
    nested_body = _request(2)
    nested_body["inputs"][0]["data"] = rows(2, 5).tolist()
    nested = parse_infer(json.dumps(nested_body).encode(), None, INFO, 8)
    np.testing.assert_array_equal(flat.images, rows(2, 5))
    np.testing.assert_array_equal(nested.images, rows(2, 5))
    assert flat.images.dtype == np.uint8 and flat.id is None and flat.outputs == {"logits": False, "probabilities": False}


def test_binary_tensor_data_round_trips():
    images = rows(3, 9)
    head = json.dumps({"id": 42, "inputs": [{"name": "image", "datatype": "UINT8", "shape": [3, 2, 2, 3],
                                             "parameters": {"binary_data_size": images.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    parsed = parse_infer(head + images.tobytes(), str(len(head)), INFO, 8)
    np.testing.assert_array_equal(parsed.images, images)
    assert parsed.id == "42" and parsed.outputs == {"logits": True}
    logits = _expected(images)
    body, headers = infer_response(INFO, parsed, logits)
    length = int(headers[BINARY_HEADER])
    answer = json.loads(body[:length])
    assert answer["id"] == "42" and answer["model_name"] == "m" and answer["outputs"][0]["shape"] == [3, 3]
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == logits.nbytes == len(body) - length
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32).reshape(3, 3), logits)


def test_json_response_with_probabilities():
    parsed = parse_infer(json.dumps({**_request(2), "outputs": [{"name": "logits"}, {"name": "probabilities"}]}).encode(),
                         None, INFO, 8)
    logits = np.array([[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]], np.float32)
    body, headers = infer_response(INFO, parsed, logits)
    assert headers == {"content-type": "application/json"}
    out = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert out["logits"]["data"] == logits.reshape(-1).tolist() and out["logits"]["shape"] == [2, 3]
    probs = np.array(out["probabilities"]["data"]).reshape(2, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert probs[0].argmax() == 2 and probs[1].argmax() == 0 and probs[0, 2] > probs[0, 1] > probs[0, 0]
    assert "id" not in json.loads(body)


def test_binary_output_by_default_for_the_whole_request():
    parsed = parse_infer(json.dumps({**_request(1), "parameters": {"binary_data_output": True}}).encode(), None, INFO, 8)
    assert parsed.outputs == {"logits": True, "probabilities": True}


@pytest.mark.parametrize("change, message", [
    (lambda r: r["inputs"][0].update(shape=[0, 2, 2, 3], data=[]), "must have shape [N, 2, 2, 3]"),
    (lambda r: r["inputs"][0].update(shape=[1, 2, 2]), "must have shape [N, 2, 2, 3]"),
    (lambda r: r["inputs"][0].update(shape=[True, 2, 2, 3]), "must have shape [N, 2, 2, 3]"),
    (lambda r: r["inputs"][0].update(shape=[9, 2, 2, 3], data=[0] * 108), "has 9 images; this server takes at most 8"),
    (lambda r: r["inputs"][0].update(data=[0] * 11), "has 11 values for shape"),
    (lambda r: r["inputs"][0].update(data=[1.0] * 12), "UINT8 data must be integers 0-255; got float"),
    (lambda r: r["inputs"][0].update(data=[True] * 12), "UINT8 data must be integers 0-255; got bool"),
    (lambda r: r["inputs"][0].update(data=[-1] + [0] * 11), "between 0 and 255"),
    (lambda r: r["inputs"][0].update(data=[256] + [0] * 11), "between 0 and 255"),
    (lambda r: r["inputs"][0].update(data=[2**70] + [0] * 11), "between 0 and 255"),
    (lambda r: r["inputs"][0].update(data=[[0] * 6, [0] * 5]), "ragged"),
    (lambda r: r["inputs"][0].pop("data"), "neither 'data' nor a binary_data_size"),
    (lambda r: r["inputs"].append(r["inputs"][0]), "expected exactly one input"),
    (lambda r: r["inputs"][0].update(parameters=[1]), "'parameters' of input 'image' must be an object"),
    (lambda r: r.update(outputs={"name": "logits"}), "'outputs' must be a list of objects"),
    (lambda r: r.update(inputs={}), "must be a JSON object with an 'inputs' list"),
    (lambda r: r["inputs"][0].update(name="x"), "unknown input 'x'; the model's input is 'image'"),
    (lambda r: r.update(outputs=[{"name": "logits"}, 1]), "'outputs' must be a list of objects"),
    (lambda r: r.update(outputs=[{"name": "probs"}]), "unknown output 'probs'; the model's outputs are"),
    (lambda r: r["inputs"][0].update(datatype="FP32"), "input 'image' must have datatype UINT8, got 'FP32'"),
    (lambda r: r["inputs"][0].update(data=[rows(1).reshape(-1).tolist()]), "data has shape [1, 12]; it must be flat"),
])
def test_bad_json_requests(change, message):
    request = _request(1)
    change(request)
    with pytest.raises(BadRequest) as caught:
        parse_infer(json.dumps(request).encode(), None, INFO, 8)
    assert message in str(caught.value)


def test_values_at_the_uint8_bounds_are_accepted():
    request = _request(1)
    request["inputs"][0]["data"] = [0, 255] * 6
    assert parse_infer(json.dumps(request).encode(), None, INFO, 8).images.reshape(-1).tolist() == [0, 255] * 6


def test_exactly_max_rows_is_accepted():
    assert len(parse_infer(json.dumps(_request(8)).encode(), None, INFO, 8).images) == 8


@pytest.mark.parametrize("header, tail, message", [
    ("x", b"", "must be an integer"),
    ("0", b"", "is 0 but the body has"),
    ("100000", b"", "is 100000 but the body has"),
    (None, b"\0" * 12, None),  # the JSON length header missing: the bytes after the JSON are malformed JSON
])
def test_bad_binary_framing(header, tail, message):
    images = rows(1)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                                   "parameters": {"binary_data_size": images.nbytes}}]}).encode()
    with pytest.raises(BadRequest) as caught:
        parse_infer(head + tail, header, INFO, 8)
    assert message is None or message in str(caught.value)


@pytest.mark.parametrize("size, sent, message", [
    (11, 12, "binary_data_size 11 does not match shape"),
    (True, 12, "binary_data_size True does not match"),
    (12, 11, "truncated binary body: expected 12 bytes"),
    (12, 13, "truncated binary body: expected 12 bytes"),
])
def test_binary_sizes_must_match_the_shape(size, sent, message):
    head = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                                   "parameters": {"binary_data_size": size}}]}).encode()
    with pytest.raises(BadRequest, match=message):
        parse_infer(head + b"\1" * sent, str(len(head)), INFO, 8)


def test_binary_bytes_without_a_size_are_refused():
    head = json.dumps(_request(1)).encode()
    with pytest.raises(BadRequest, match="binary data sent but the input has no binary_data_size"):
        parse_infer(head + b"\0" * 12, str(len(head)), INFO, 8)


def test_the_json_part_is_limited_before_it_is_parsed():
    limit = 8 * 2**20  # parse_infer's default
    with pytest.raises(BadRequest, match=f"the JSON part is {limit + 1} bytes, over the limit of {limit}"):
        parse_infer(b" " * (limit + 1), None, INFO, 8)
    with pytest.raises(BadRequest, match="malformed JSON"):  # at the limit: parsed (and found empty)
        parse_infer(b" " * limit, None, INFO, 8)


def test_the_json_length_header_may_cover_the_whole_body():
    body = json.dumps(_request(1)).encode()
    assert parse_infer(body, str(len(body)), INFO, 8).images.shape == (1, 2, 2, 3)  # JSON only, no binary part
    with pytest.raises(BadRequest, match="malformed JSON"):  # a 1-byte JSON part is allowed, and is not JSON
        parse_infer(body, "1", INFO, 8)


def test_the_served_config_is_rtk_tritons_with_the_delay_this_server_waits():
    """/config answers the model configuration `rtk triton` builds (one function), with the server's own
    batching delay, in the JSON shape Triton's ModelConfig reads."""
    from toolkit.serving.triton import model_config

    config = INFO.config(2.5, "cpu")
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 2500}  # no preferred sizes: it has none
    assert config["platform"] == "onnxruntime_onnx" and config["parameters"] == {"file": {"string_value": "model.onnx"}}
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}] and INFO.config(0, "cuda")["instance_group"][0]["kind"] == "KIND_GPU"
    tensors = ([("image", "TYPE_UINT8", [2, 2, 3])], [("logits", "TYPE_FP32", [3]), ("probabilities", "TYPE_FP32", [3])])
    assert {k: v for k, v in config.items() if k != "platform"} == model_config(
        "m", *tensors, max_batch_size=4, max_queue_delay_us=2500, parameters={"file": "model.onnx"})
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
    from google.protobuf import json_format

    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 2500 and list(parsed.input[0].dims) == [2, 2, 3]
    assert parsed.output[0].label_filename == "labels.txt" and parsed.max_batch_size == 4
