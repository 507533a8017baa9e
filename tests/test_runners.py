"""The Runner layer: provider resolution, skip reasons and CUDA plumbing (checked on CPU), plus
`cuda`-marked tests that run the CUDA runtimes for real where a GPU exists."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import TRAIN_ARGS, copy_bundle, needs_cuda, rtk
from toolkit import runners
from toolkit.bundle import Bundle
from toolkit.errors import RtkError
from toolkit.runners import OrtRunner, RunOptions, RuntimeUnavailable, Skipped, node_placement, plan


def test_cuda_provider_options():
    r = OrtRunner("ort-cuda", "model.onnx", "fp32", RunOptions(), provider="CUDAExecutionProvider")
    name, opts = r.providers()[0]
    assert name == "CUDAExecutionProvider" and opts["use_tf32"] == 0 and opts["enable_cuda_graph"] == 0
    assert r.providers()[-1] == "CPUExecutionProvider"
    graph = OrtRunner("ort-cuda-iobinding", "model.onnx", "fp32", RunOptions(cuda_graph=True, tf32=True),
                      provider="CUDAExecutionProvider", io_binding=True)
    assert graph.providers()[0][1] == {"device_id": 0, "use_tf32": 1, "enable_cuda_graph": 1}


def test_tensorrt_engine_cache_is_keyed_by_the_model_hash(tiny_bundle, tmp_path):
    bundle = Bundle.open(copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.fp16.onnx")))
    entries = plan(bundle, ["ort-tensorrt"], lambda: None, RunOptions())
    assert len(entries) == 1  # fp32 ONNX only; TensorRT builds its own fp16 engine
    trt = OrtRunner("ort-tensorrt", "model.onnx", "fp16", RunOptions(), provider="TensorrtExecutionProvider",
                    trt_cache=bundle.root / "trt-cache" / bundle.files["model.onnx"]["sha256"][:16])
    name, opts = trt.providers()[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"]
    assert opts["trt_engine_cache_path"].endswith(bundle.files["model.onnx"]["sha256"][:16])
    assert opts["trt_timing_cache_path"] == opts["trt_engine_cache_path"]
    assert [p if isinstance(p, str) else p[0] for p in trt.providers()][1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_plan_lists_every_runtime_and_skips_with_reasons(tiny_bundle):
    entries = plan(Bundle.open(tiny_bundle), None, lambda: None, RunOptions())
    runtimes = {e.runtime for e in entries}
    assert runtimes == set(runners.RUNTIMES)
    for e in entries:
        if isinstance(e, Skipped):
            assert e.reason
            if e.runtime in ("eager-cuda", "torchscript-cuda") and "is_available" in e.reason:
                assert e.reason == "torch.cuda.is_available() is False"
    ort_cuda = [e for e in entries if e.runtime == "ort-cuda"]
    assert {e.artifact for e in ort_cuda} == {"model.onnx", "model.fp16.onnx"}  # never the int8 file


def test_silent_cpu_fallback_is_refused(tiny_bundle, monkeypatch):
    class FallbackSession:
        def __init__(self, *a, **k):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(runners, "provider_problem", lambda provider: None)
    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    r = OrtRunner("ort-cuda", "model.onnx", "fp32", RunOptions(), path=tiny_bundle / "model.onnx",
                  provider="CUDAExecutionProvider")
    with pytest.raises(RuntimeUnavailable, match=r"asked for CUDAExecutionProvider, onnxruntime gave \['CPUExecutionProvider'\]"):
        r.load()


def test_missing_provider_reason_names_the_available_ones():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    reason = runners.provider_problem("CUDAExecutionProvider")
    assert "CUDAExecutionProvider not in onnxruntime's providers" in reason and "CPUExecutionProvider" in reason


def test_node_placement_counts_nodes_per_provider(tiny_bundle):
    placement = node_placement(tiny_bundle / "model.onnx", ["CPUExecutionProvider"], 1, np.zeros((1, 32, 32, 3), np.uint8))
    assert list(placement) == ["CPUExecutionProvider"] and placement["CPUExecutionProvider"] > 10


def test_runners_reject_wrong_input():
    with pytest.raises(RtkError, match="uint8 arrays"):
        runners.check_batch(np.zeros((1, 3, 32, 32), np.float32))


def test_training_on_cuda_without_a_gpu_is_a_clear_error(tiny_data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = rtk("train", tiny_data, "--output", tmp_path / "o", "--weights", "none", "--device", "cuda")
    assert result.exit_code == 2 and "torch.cuda.is_available() is False" in result.output


# ---------------------------------------------------------------- on a GPU

@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@needs_cuda
def test_cuda_training_steps(tiny_data, tmp_path, precision):
    args = [a for a in TRAIN_ARGS if a not in ("fp32",)]
    args[args.index("--precision") + 1: args.index("--precision") + 1] = [precision]
    result = rtk("train", tiny_data, "--output", tmp_path / "o", *args, "--device", "cuda")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["precision"] == precision


@needs_cuda
def test_torch_cuda_runtimes_pass_verification(tiny_bundle, tiny_data):
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--runtime", "eager-cuda", "--runtime", "eager-fp16",
                 "--runtime", "torchscript-cuda", "--runtime", "torch-export-cuda")
    assert result.exit_code == 0, result.output


@needs_cuda
def test_onnxruntime_cuda_parity_and_io_binding(tiny_bundle, tiny_data):
    reason = runners.provider_problem("CUDAExecutionProvider")
    if reason:
        pytest.skip(reason)
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--runtime", "ort-cuda", "--runtime", "ort-cuda-iobinding")
    assert result.exit_code == 0, result.output
    plain = OrtRunner("ort-cuda", "model.onnx", "fp32", RunOptions(), path=tiny_bundle / "model.onnx",
                      provider="CUDAExecutionProvider")
    bound = OrtRunner("ort-cuda-iobinding", "model.onnx", "fp32", RunOptions(), path=tiny_bundle / "model.onnx",
                      provider="CUDAExecutionProvider", io_binding=True)
    plain.load()
    bound.load()
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(bound(x), plain(x), atol=1e-5)
    y = x[::-1].copy()  # same shape: the bound device buffer is refilled, not reused stale
    np.testing.assert_allclose(bound(y), plain(y), atol=1e-5)
    assert plain.details["node_placement"].get("CUDAExecutionProvider", 0) > 0


@needs_cuda
def test_cuda_benchmark_runs_on_the_device(tiny_bundle, tmp_path):
    result = rtk("benchmark", tiny_bundle, "--runtime", "eager-cuda", "--runtime", "eager-fp16", "--batch-size", "2",
                 "--warmup", "2", "--iterations", "5", "--min-seconds", "0", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["environment"]["cuda"]["available"] and report["environment"]["cuda"]["name"]
    assert all(r["cuda_peak_allocated_mb"] > 0 for r in report["results"] if not r["skipped"])
