"""A real Triton Inference Server (2.51.0, CPU, the onnxruntime backend built by .ci/build-triton.sh) loads
what `rtk triton --device cpu` writes and answers like `Classifier`; `rtk verify --endpoint` proves a live
server (Triton or rtk serve) serves a file of the bundle, or says it does not."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TRAIN_ARGS, copy_bundle, error_line, rtk
from tests.ports import free_port
from tests.triton_local import TritonServer, triton_problem

pytestmark = pytest.mark.skipif(triton_problem() is not None, reason=str(triton_problem()))
httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient (dev extra)")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

from toolkit.core.manifest import Recommendation  # noqa: E402
from toolkit.serving.classifier import Classifier  # noqa: E402


# A bundle copy whose manifest recommends `artifact` on `runtime`, as `rtk optimize` would write it.
def recommending(src: Path, dst: Path, runtime: str, artifact: str, files: tuple[str, ...]) -> Path:
    bundle = copy_bundle(src, dst, files=files)
    manifest = json.loads((bundle / "manifest.json").read_text())
    engine = "openvino" if runtime.startswith("openvino") else "onnxruntime"
    manifest["recommended"] = Recommendation(runtime=runtime, artifact=artifact, threads=1,
                                             precision=manifest["files"][artifact]["precision"],
                                             session={"engine": engine, "device": "cpu", "threads": 1}).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


@pytest.fixture(scope="module")
def other_bundle(tiny_data, tmp_path_factory) -> Path:
    """The same architecture and data, another seed: a different checkpoint's model.onnx."""
    root = tmp_path_factory.mktemp("other")
    args = list(TRAIN_ARGS) + ["--seed", "7"]
    assert rtk("train", tiny_data, "--output", root / "run", *args).exit_code == 0
    result = rtk("export", root / "run" / "checkpoint.pt", "--output", root / "bundle", "--format", "onnx",
                 "--precision", "fp32", "--no-verify")
    assert result.exit_code == 0, result.output
    return root / "bundle"


@pytest.fixture(scope="module")
def triton(tiny_bundle, optimized, other_bundle, tmp_path_factory):
    """One server for the module: fp32, int8, what optimize recommends, another checkpoint, and an
    OpenVINO-accelerated repository this build cannot load (readiness not strict, so the others serve)."""
    tmp = tmp_path_factory.mktemp("triton")
    repo = tmp / "repo"
    bundles = {
        "fp32": tiny_bundle,
        "int8": recommending(tiny_bundle, tmp / "int8", "ort-cpu", "model.int8.onnx", ("model.onnx", "model.int8.onnx")),
        "recommended": optimized[0],
        "other": other_bundle,
        "openvino": recommending(tiny_bundle, tmp / "ov", "openvino", "model.onnx", ("model.onnx",)),
    }
    for name, bundle in bundles.items():
        threads = ["--threads", "1"] if name == "fp32" else []
        result = rtk("triton", bundle, "--output", repo, "--name", name, "--device", "cpu", "--max-batch-size", "16",
                     *threads)
        assert result.exit_code == 0, result.output
    with TritonServer(repo, tmp / "triton.log", strict=False) as server:
        yield server, repo


def served_file(repo: Path, name: str, bundle: Path) -> str:
    """Which bundle file `rtk triton` copied into the repository."""
    data = (repo / name / "1" / "model.onnx").read_bytes()
    [file] = [p.name for p in bundle.glob("*.onnx") if p.read_bytes() == data]
    return file


def images(clf: Classifier, tiny_data: Path, random: int = 3) -> np.ndarray:
    files = sorted((tiny_data / "val").rglob("*.png"))[:6]
    crops = np.stack([clf.model_input(p) for p in files])
    noise = np.random.default_rng(1).integers(0, 256, (random, *crops.shape[1:]), dtype=np.uint8)
    return np.concatenate([crops, noise])


@contextlib.contextmanager
def connected(server, protocol: str = "http"):
    """A client, closed afterwards: Triton's shutdown waits for open HTTP connections."""
    lib = httpclient if protocol == "http" else grpcclient
    client = lib.InferenceServerClient(server.http if protocol == "http" else server.grpc)
    try:
        yield client
    finally:
        client.close()


def infer(server, protocol: str, model: str, x: np.ndarray, class_count: int = 0):
    lib = httpclient if protocol == "http" else grpcclient
    tensor = lib.InferInput("image", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x, **({"binary_data": True} if protocol == "http" else {}))
    wanted = lib.InferRequestedOutput("logits", class_count=class_count)
    with connected(server, protocol) as client:
        return client.infer(model, [tensor], outputs=[wanted]).as_numpy("logits")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["fp32", "int8", "recommended"])
def test_triton_answers_like_the_classifier_on_the_same_file(triton, tiny_bundle, optimized, tiny_data, model, protocol):
    server, repo = triton
    bundle = {"fp32": tiny_bundle, "int8": tiny_bundle, "recommended": optimized[0]}[model]
    file = served_file(repo, model, bundle)
    rec = optimized[1]["recommended"]
    assert file == {"fp32": "model.onnx", "int8": "model.int8.onnx"}.get(model, rec["artifact"]
                                                                          if rec["artifact"].endswith(".onnx") else file)
    if model == "recommended" and rec["runtime"].startswith("openvino") and rec["artifact"] == file:
        # optimize chose OpenVINO (timings decide): the repository asks for Triton's OpenVINO accelerator,
        # which this CPU build of the onnxruntime backend does not have, so Triton refuses the model
        assert "unknown Execution Accelerator 'openvino'" in server.log_text()
        with connected(server, protocol) as client:
            assert not client.is_model_ready(model)
        return
    clf = Classifier.load(bundle / file, threads=1)  # onnxruntime in-process on the very file Triton serves
    x = images(clf, tiny_data)
    ours = clf.logits(x)
    theirs = infer(server, protocol, model, x)
    assert theirs.shape == ours.shape and np.abs(theirs - ours).max() <= 1e-5


def test_the_thread_count_reaches_the_onnxruntime_backend(triton):
    server, _ = triton
    with connected(server) as client:
        config = client.get_model_config("fp32")
        default = client.get_model_config("int8")
    assert config["parameters"] == {"intra_op_thread_count": {"string_value": "1"}}
    assert "parameters" not in default or "intra_op_thread_count" not in default["parameters"]


def test_classification_extension_gives_our_top_k_labels(triton, tiny_bundle, tiny_data):
    server, _ = triton
    clf = Classifier.load(tiny_bundle, threads=1)
    x = images(clf, tiny_data)
    logits = clf.logits(x)
    for protocol in ("http", "grpc"):
        answer = infer(server, protocol, "fp32", x, class_count=2)  # rows of b"value:index:label"
        got = [[entry.decode().split(":") for entry in row] for row in answer]
        assert [[int(i) for _, i, _ in row] for row in got] == [idx for idx, _ in clf.top_k(logits, 2)]
        assert [[label for _, _, label in row] for row in got] == [[clf.classes[i] for i in idx] for idx, _ in clf.top_k(logits, 2)]
        assert np.allclose([[float(v) for v, _, _ in row] for row in got], np.sort(logits, axis=1)[:, ::-1][:, :2], atol=1e-5)


def test_dynamic_batching_merges_concurrent_requests(triton, tiny_bundle):
    server, _ = triton
    with connected(server) as client:
        before = client.get_inference_statistics("int8")["model_stats"][0]
    x = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(6):  # bounded: 16 clients x 6 requests
                infer(server, "http", "int8", x)
        except BaseException as exc:  # reported below, never lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    deadline = time.monotonic() + 5  # Triton counts a request just after answering it
    with connected(server) as client:
        while True:
            after = client.get_inference_statistics("int8")["model_stats"][0]
            inferences = after["inference_count"] - before["inference_count"]
            if inferences >= 96 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 96 and executions < inferences  # Triton's own count: requests were merged


@pytest.mark.parametrize("shape,dtype,name,message", [
    ((1, 31, 32, 3), "UINT8", "image", "unexpected shape"),
    ((1, 32, 32, 3), "FP32", "image", "expects 'UINT8'"),
    ((1, 32, 32, 3), "UINT8", "pixels", "unexpected inference input 'pixels'"),
])
def test_a_malformed_request_is_refused_and_serving_goes_on(triton, shape, dtype, name, message):
    server, _ = triton
    tensor = httpclient.InferInput(name, list(shape), dtype)
    tensor.set_data_from_numpy(np.zeros(shape, np.uint8 if dtype == "UINT8" else np.float32), binary_data=True)
    with connected(server) as client, pytest.raises(InferenceServerException) as refused:
        client.infer("fp32", [tensor])
    assert refused.value.status() == "400" and message in refused.value.message()
    assert infer(server, "http", "fp32", np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 3)


def test_an_openvino_recommendation_cannot_load_in_this_build(triton, tiny_bundle):
    """`rtk triton` keeps the ONNX file and asks for Triton's OpenVINO accelerator; this CPU build of the
    onnxruntime backend has no OpenVINO execution provider, so Triton refuses the model, and says why."""
    server, repo = triton
    assert (repo / "openvino" / "1" / "model.onnx").read_bytes() == (tiny_bundle / "model.onnx").read_bytes()
    assert 'cpu_execution_accelerator: [ { name: "openvino" } ]' in (repo / "openvino" / "config.pbtxt").read_text()
    with connected(server) as client:
        assert not client.is_model_ready("openvino") and client.is_model_ready("fp32")
    assert "unknown Execution Accelerator 'openvino'" in server.log_text()


# ---------------------------------------------------------------- rtk verify --endpoint


def test_verify_endpoint_passes_against_triton_and_names_the_served_file(triton, tiny_bundle, tiny_data):
    server, _ = triton
    result = rtk("verify", tiny_bundle, "--endpoint", server.http, "--model", "fp32", "--images", tiny_data / "val",
                 "--random", "2")
    assert result.exit_code == 0, result.output
    assert "served: model.onnx; fp32 gate" in result.output and "PASS" in result.output
    result = rtk("verify", tiny_bundle, "--endpoint", server.grpc, "--protocol", "grpc", "--model", "int8",
                 "--random", "4", "--runtime", "ort-cpu")
    assert result.exit_code == 0, result.output
    assert "served: model.int8.onnx; int8 gate" in result.output


def test_verify_endpoint_fails_a_model_from_another_checkpoint(triton, tiny_bundle):
    server, _ = triton
    result = rtk("verify", tiny_bundle, "--endpoint", server.http, "--model", "other", "--random", "8",
                 "--runtime", "ort-cpu")
    assert result.exit_code == 1
    line = error_line(result)
    assert "serves no file of this bundle" in line and re.search(r"it fails: \w+", line), line


def test_verify_endpoint_checks_the_metadata_first(triton, optimized, tmp_path):
    """A repository whose model has another input size: refused on the metadata, before any image is sent."""
    server, _ = triton
    import shutil

    bigger = tmp_path / "bigger"
    shutil.copytree(optimized[0], bigger)
    manifest = json.loads((bigger / "manifest.json").read_text())
    manifest["preprocess"].update(crop_size=48, resize_size=52)
    (bigger / "manifest.json").write_text(json.dumps(manifest))
    result = rtk("verify", bigger, "--endpoint", server.http, "--model", "fp32", "--random", "1")
    assert result.exit_code == 1 and "I/O contract: input shape [-1, 32, 32, 3]" in error_line(result)


def test_verify_endpoint_against_rtk_serve(tiny_bundle):
    from tests.test_server import running

    with running(tiny_bundle, max_batch_size=8, max_queue_delay_ms=2) as (url, *_):
        result = rtk("verify", tiny_bundle, "--endpoint", url, "--random", "6", "--runtime", "ort-cpu")
        assert result.exit_code == 0, result.output
        assert "served: model.onnx; fp32 gate" in result.output
    with running(tiny_bundle / "model.int8.onnx", max_batch_size=8, max_queue_delay_ms=2) as (url, info, *_):
        result = rtk("verify", tiny_bundle, "--endpoint", f"http://{url}", "--model", info.name, "--random", "6",
                     "--runtime", "ort-cpu")
        assert result.exit_code == 0, result.output
        assert "served: model.int8.onnx; int8 gate" in result.output


def test_verify_endpoint_unreachable_is_one_line_and_exit_2(tiny_bundle):
    result = rtk("verify", tiny_bundle, "--endpoint", f"127.0.0.1:{free_port()}", "--random", "1")
    assert result.exit_code == 2
    assert "cannot use http://127.0.0.1:" in error_line(result) and "refused" in error_line(result)
    result = rtk("verify", tiny_bundle, "--endpoint", "nowhere", "--random", "1")
    assert result.exit_code == 2 and "give host:port" in error_line(result)
