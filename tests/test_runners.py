"""The Runner layer: provider resolution, skip reasons and CUDA plumbing (checked on CPU), plus
`cuda`-marked tests that run the CUDA runtimes for real where a GPU exists."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import TRAIN_ARGS, copy_bundle, needs_cuda, rtk
from toolkit.core.bundle import Bundle
from toolkit.core.manifest import Recommendation
from toolkit.errors import RtkError
from toolkit.evaluation import runners
from toolkit.evaluation.runners import RunOptions, RuntimeUnavailable, Skipped, plan
from toolkit.serving import sessions
from toolkit.serving.sessions import SessionSettings, ort_providers


def test_cuda_provider_options():
    name, opts = ort_providers(SessionSettings(device="cuda"))[0]
    assert name == "CUDAExecutionProvider" and opts["use_tf32"] == 0 and opts["enable_cuda_graph"] == 0
    assert ort_providers(SessionSettings(device="cuda"))[-1] == "CPUExecutionProvider"
    graph = ort_providers(SessionSettings(device="cuda", cuda_graph=True, tf32=True))
    assert graph[0][1] == {"device_id": 0, "use_tf32": 1, "enable_cuda_graph": 1}


def test_only_the_io_binding_runtime_gets_cuda_graphs(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    entries = plan(bundle, ["ort-cuda", "ort-cuda-iobinding"], lambda: None, RunOptions(cuda_graph=True))
    built = [e for e in entries if isinstance(e, runners.Runner)]
    if not built:  # no CUDA provider here: build the runners directly from the registry rows
        built = [runners.runtime(r).build(runners.runtime(r), "model.onnx", bundle.path("model.onnx"),
                                          bundle.files["model.onnx"], RunOptions(cuda_graph=True), lambda: None)
                 for r in ("ort-cuda", "ort-cuda-iobinding")]
    graphs = {e.runtime: e.settings.cuda_graph for e in built if e.artifact == "model.onnx"}
    assert graphs == {"ort-cuda": False, "ort-cuda-iobinding": True}


def test_tensorrt_engine_cache_is_keyed_by_the_model_hash(tiny_bundle, tmp_path):
    bundle = Bundle.open(copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.fp16.onnx")))
    entries = plan(bundle, ["ort-tensorrt"], lambda: None, RunOptions())
    assert len(entries) == 1  # fp32 ONNX only; TensorRT builds its own fp16 engine
    row = runners.runtime("ort-tensorrt")
    trt = row.build(row, "model.onnx", bundle.path("model.onnx"), bundle.files["model.onnx"], RunOptions(), lambda: None)
    name, opts = ort_providers(trt.settings)[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"] and trt.precision == "fp16"
    assert opts["trt_engine_cache_path"].endswith(bundle.files["model.onnx"].sha256[:16])
    assert opts["trt_timing_cache_path"] == opts["trt_engine_cache_path"]
    assert [p if isinstance(p, str) else p[0] for p in ort_providers(trt.settings)][1:] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_plan_lists_every_runtime_and_skips_with_reasons(tiny_bundle):
    entries = plan(Bundle.open(tiny_bundle), None, lambda: None, RunOptions())
    runtimes = {e.runtime for e in entries}
    # every runtime but AOTInductor's: the fixture bundle holds no package (tests/test_aoti.py builds one)
    assert runtimes == {name for name, row in runners.REGISTRY.items() if row.family != "torch.aoti"}
    for e in entries:
        assert not isinstance(e, runners.Failed)  # every file of the fixture bundle is intact
        if isinstance(e, Skipped):
            assert e.reason
            if e.runtime in ("eager-cuda", "torchscript-cuda") and "is_available" in e.reason:
                assert e.reason == "torch.cuda.is_available() is False"
    ort_cuda = [e for e in entries if e.runtime == "ort-cuda"]
    assert {e.artifact for e in ort_cuda} == {"model.onnx", "model.fp16.onnx", "model.any-size.onnx"}  # never int8
    assert {e.artifact for e in entries if e.runtime == "ort-tensorrt"} == {"model.onnx"}  # fixed-shape engines


def test_the_registry_is_the_one_table_of_runtimes():
    for name, row in runners.REGISTRY.items():
        assert row.name == name and row.device in ("cpu", "cuda") and row.describes
        assert runners.RUNTIMES[name] == (row.device, row.describes)
    assert set(runners.VERIFY_DEFAULT) <= set(runners.REGISTRY)
    assert "eager" in runners.VERIFY_DEFAULT and "ort-cuda-iobinding" not in runners.VERIFY_DEFAULT


def test_silent_cpu_fallback_is_refused(tiny_bundle, monkeypatch):
    class FallbackSession:
        def __init__(self, *a, **k):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(sessions, "provider_problem", lambda provider: None)
    monkeypatch.setattr(sessions, "preload_cuda_libraries", lambda: None)
    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    with pytest.raises(RuntimeUnavailable, match=r"asked for CUDAExecutionProvider, onnxruntime gave \['CPUExecutionProvider'\]"):
        sessions.open_onnxruntime(tiny_bundle / "model.onnx", SessionSettings(device="cuda"))


def test_missing_provider_reason_names_the_available_ones():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    reason = sessions.provider_problem("CUDAExecutionProvider")
    assert "CUDAExecutionProvider not in onnxruntime's providers" in reason and "CPUExecutionProvider" in reason


def test_node_placement_counts_nodes_per_provider(tiny_bundle):
    placement = sessions.node_placement(tiny_bundle / "model.onnx", SessionSettings(threads=1),
                                        np.zeros((1, 32, 32, 3), np.uint8))
    assert list(placement) == ["CPUExecutionProvider"] and placement["CPUExecutionProvider"] > 10


def test_runners_do_not_share_module_state(tiny_run):
    """Each eager runner gets its own copy of the reference model: one that casts or moves its model
    changes neither the reference nor what the next runner loads."""
    import torch

    from toolkit.training.checkpoint import load_source

    model, source = load_source(tiny_run / "checkpoint.pt")
    row = runners.runtime("eager")
    first = row.build(row, "checkpoint", None, None, RunOptions(), lambda: (model, source.preprocess))
    second = row.build(row, "checkpoint", None, None, RunOptions(), lambda: (model, source.preprocess))
    first.load()
    first.module.to(torch.float64)  # what a bf16/fp16/CUDA runner does to its model, in place
    second.load()
    assert all(p.dtype == torch.float32 for p in second.module.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert second.module.model is not model and first.module.model is not second.module.model
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert second(x).dtype == np.float32


def test_the_stage_loop_releases_each_runner_before_the_next(tiny_bundle):
    entries = plan(Bundle.open(tiny_bundle), ["ort-cpu"], lambda: None, RunOptions(threads=1))
    seen = []
    for runner in runners.each_loaded(entries):
        assert runner.backend is not None  # loaded while the stage uses it
        assert all(r.backend is None for r in seen)  # every earlier one already released
        assert runner.memory.baseline_mb > 0 and runner.memory.peak_mb() >= runner.memory.baseline_mb
        seen.append(runner)
    assert len(seen) == 4 and all(r.backend is None for r in seen)


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
    reason = sessions.provider_problem("CUDAExecutionProvider")
    if reason:
        pytest.skip(reason)
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--runtime", "ort-cuda", "--runtime", "ort-cuda-iobinding")
    assert result.exit_code == 0, result.output
    bundle = Bundle.open(tiny_bundle)
    plain, bound = [e for e in plan(bundle, ["ort-cuda", "ort-cuda-iobinding"], lambda: None, RunOptions())
                    if e.artifact == "model.onnx"]
    assert bound.io_binding and not plain.io_binding
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


@needs_cuda
def test_plain_verify_with_the_default_runtimes_on_a_gpu_machine(tiny_bundle, tiny_data, tmp_path):
    """Eager runners on CPU and CUDA in one run: each has its own model on its own device."""
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    ran = {r["runtime"] for r in json.loads((tmp_path / "v.json").read_text())["records"]}
    assert {"eager", "eager-cuda", "eager-fp16", "torchscript", "torchscript-cuda"} <= ran


@needs_cuda
def test_a_cpu_only_recommendation_is_not_served_on_cuda(tiny_bundle, tmp_path):
    from toolkit.serving.classifier import Classifier

    if sessions.provider_problem("CUDAExecutionProvider"):
        pytest.skip(sessions.provider_problem("CUDAExecutionProvider"))
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.int8.onnx"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended"] = Recommendation(runtime="ort-cpu", artifact="model.int8.onnx", precision="int8", threads=1,
                                             session={"engine": "onnxruntime", "device": "cpu", "threads": 1}).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    clf = Classifier.load(bundle, providers=["cuda"], self_test=True)
    assert clf.path.name == "model.onnx" and clf.providers[0] == "CUDAExecutionProvider"
    assert clf.settings.device == "cuda" and not clf.settings.tf32
    assert Classifier.load(bundle).path.name == "model.int8.onnx"
