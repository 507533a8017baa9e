import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest

from tests.conftest import QUICK, copy_bundle, error_line, rtk
from toolkit.core.manifest import Recommendation
from toolkit.errors import CheckFailed
from toolkit.evaluation import runners
from toolkit.evaluation.optimize import ORT_OPT_FILE, OptimizeConfig, format_table, optimize_bundle
from toolkit.export.quantize import QuantRecipe
from toolkit.serving import sessions
from toolkit.serving.classifier import Classifier

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")
def test_accuracy_control_returns_layers_to_fp32_where_plain_int8_fails(tiny_bundle, tiny_data, tmp_path, no_compile):
    """Calibrated on flat grey images, NNCF's plain int8 saturates on real ones and must fail verification;
    its accuracy control against the held-out images keeps only the layers int8 can hold, and passes."""
    from PIL import Image

    from toolkit.core.openvino_ir import IR_INT8, IR_INT8_AC
    from toolkit.export.openvino import nncf_problem

    if nncf_problem():
        pytest.skip(nncf_problem())
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (128, 128, 128)).save(grey / f"{i}.png")
    # held-out images labelled with the fp32 model's own answers (a one-epoch model is right on few of them),
    # so an int8 file within the accuracy bound also agrees with fp32 as verification demands
    holdout = tmp_path / "holdout"
    images = sorted((tiny_data / "val").rglob("*.png"))
    classes = (bundle / "labels.txt").read_text().split()
    for path, prediction in zip(images, Classifier.load(bundle).predict(images)):
        (holdout / classes[prediction.indices[0]]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, holdout / classes[prediction.indices[0]] / path.name)
    for name in classes:
        (holdout / name).mkdir(exist_ok=True)
    lines: list[str] = []
    config = OptimizeConfig(calibration_data=str(grey), holdout=str(holdout), recipes=(QuantRecipe(),),
                            batch_sizes=(1,), threads=1, **QUICK, rounds=1)
    report = optimize_bundle(bundle, config, echo=lines.append)
    rows = {r["artifact"]: r for r in report["candidates"] if r["runtime"] == "openvino"}
    assert rows[IR_INT8]["status"] == "failed verification" and "max_accuracy_drop" in rows[IR_INT8]["failed_metrics"]
    assert rows[IR_INT8_AC]["status"] == "passed" and rows[IR_INT8_AC]["accuracy_change_points"] >= -0.5
    entry = json.loads((bundle / "manifest.json").read_text())["files"][IR_INT8_AC]
    plain = json.loads((bundle / "manifest.json").read_text())["files"][IR_INT8]
    assert 0 < entry["int8_layers"] < plain["int8_layers"] == plain["layers"] == entry["layers"]
    assert entry["accuracy_control"]["max_drop_points"] == 0.5 and entry["accuracy_control"]["holdout_images"] == 18
    assert any(line.startswith(f"built {IR_INT8_AC}") for line in lines)


@pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")
def test_nncf_int8_ir_is_built_verified_and_servable(optimized):
    from toolkit.core.openvino_ir import IR_INT8
    from toolkit.export.openvino import nncf_problem

    if nncf_problem():
        pytest.skip(nncf_problem())
    bundle, report = optimized
    entry = json.loads((bundle / "manifest.json").read_text())["files"][IR_INT8]
    assert entry["format"] == "openvino" and entry["precision"] == "int8" and entry["weights"]["file"] == "model.openvino-int8.bin"
    rows = [r for r in report["candidates"] if r["artifact"] == IR_INT8]
    assert sorted(r["settings"] for r in rows) == ["1 threads, precision f32", "1 threads, precision f32, static batch"]
    assert all(r["runtime"] == "openvino" and r["status"] in ("passed", "failed verification") for r in rows)
    with np.load(bundle / "selftest.npz") as data:
        assert f"openvino:{IR_INT8}" in data.files


@pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")
def test_the_nncf_int8_ir_is_served_after_its_self_test(optimized, tiny_data, tmp_path):
    """Recommended for serving, the IR is what Classifier loads (rtk serve's path): its stored self-test outputs
    are this IR's own (a zeroed or foreign expectation fails), and it answers like the fp32 model."""
    from toolkit.core.openvino_ir import IR_INT8
    from toolkit.export.openvino import nncf_problem

    if nncf_problem():
        pytest.skip(nncf_problem())
    bundle = tmp_path / "served"
    shutil.copytree(optimized[0], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended"] = Recommendation(
        runtime="openvino", artifact=IR_INT8, precision="int8", threads=1,
        session={"engine": "openvino", "device": "cpu", "threads": 1, "precision_hint": "f32"}).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    clf = Classifier.load(bundle, self_test=True)
    assert clf.path.name == IR_INT8 and clf.backend.name == "openvino" and clf.precision == "int8"
    paths = sorted((tiny_data / "val").rglob("*.png"))
    served = [p.indices[0] for p in clf.predict(paths)]
    fp32 = [p.indices[0] for p in Classifier.load(bundle / "model.onnx").predict(paths)]
    assert np.mean(np.array(served) == np.array(fp32)) >= 0.8
    with np.load(bundle / "selftest.npz") as data:
        arrays = dict(data)
    arrays[f"openvino:{IR_INT8}"] = np.zeros_like(arrays[f"openvino:{IR_INT8}"])
    np.savez(bundle / "selftest.npz", **arrays)
    with pytest.raises(CheckFailed, match=f"self-test failed for {IR_INT8}"):
        Classifier.load(bundle, self_test=True)


def test_builds_missing_candidates_and_labels_the_hardware_specific_graph(optimized):
    bundle, _ = optimized
    manifest = json.loads((bundle / "manifest.json").read_text())
    qoperator = "model.int8-minmax-u8-per-tensor-u8-weights-qoperator.onnx"
    for name in ("model.int8.onnx", "model.int8-minmax-s8.onnx", qoperator, ORT_OPT_FILE):
        assert (bundle / name).is_file() and name in manifest["files"]
    assert manifest["files"]["model.int8-minmax-s8.onnx"]["quantization"] == {
        "calibration": "minmax", "activations": "s8", "per_channel": True, "reduce_range": False, "weights": "s8",
        "format": "qdq"}
    # the format and the weight type asked for are what the files hold
    qdq_ops = {n.op_type for n in onnx.load(str(bundle / "model.int8-minmax-s8.onnx")).graph.node}
    assert "DequantizeLinear" in qdq_ops and "QLinearConv" not in qdq_ops
    graph = onnx.load(str(bundle / qoperator)).graph
    conv = next(n for n in graph.node if n.op_type == "QLinearConv")
    assert {i.name: i for i in graph.initializer}[conv.input[3]].data_type == onnx.TensorProto.UINT8
    graph = onnx.load(str(bundle / "model.int8-minmax-u8-u8-weights.onnx")).graph
    quantized = {i.name: i.data_type for i in graph.initializer if i.name.endswith("weight_quantized")}
    assert quantized and set(quantized.values()) == {onnx.TensorProto.UINT8}
    rows = [r for r in optimized[1]["candidates"] if r["artifact"] == qoperator]
    # onnxruntime runs it; OpenVINO's ONNX reader cannot convert QLinearConv, so it is not planned there
    assert [r["runtime"] for r in rows] == ["ort-cpu"] and rows[0]["status"] in ("passed", "failed verification")
    # model.int8.onnx holds export's choice for this CPU (7-bit weights or not): only the other one is built
    chosen = QuantRecipe.of(manifest["files"]["model.int8.onnx"])
    other = QuantRecipe(reduce_range=not chosen.reduce_range)
    assert other.file_name in manifest["files"] and chosen.file_name not in manifest["files"]
    label = manifest["files"][ORT_OPT_FILE]["hardware_specific"]
    assert label["cpu"] and "avx512" in label["isa"] and label["onnxruntime"]
    with np.load(bundle / "selftest.npz") as data:
        assert {"model.int8.onnx", "model.int8-minmax-s8.onnx", ORT_OPT_FILE} <= set(data.files)


def test_every_candidate_is_verified_and_only_passing_ones_are_timed(optimized):
    _, report = optimized
    rows = report["candidates"]
    assert {r["runtime"] for r in rows} >= {"eager", "eager-bf16", "ort-cpu"} | ({"openvino", "openvino-bf16"} if HAS_OPENVINO else set())
    settings = {r.get("settings") for r in rows if r["runtime"] == "ort-cpu" and r["artifact"] == "model.onnx"}
    assert settings == {"1 threads, graph all", "1 threads, graph basic", "1 threads, graph extended"}
    broken = next(r for r in rows if r["artifact"] == "model.fp16.onnx" and r["runtime"] == "ort-cpu")
    assert broken["status"] == "failed verification" and "top1_agreement" in broken["failed_metrics"]
    assert "b1" not in broken  # never benchmarked, so never ranked
    for r in rows:
        if r["status"] == "passed":
            assert r["b1"]["p50_ms"] > 0 and r["b2"]["p50_ms"] > 0 and r["accuracy"] is not None
            assert r["accuracy_change_points"] >= -0.5
    eager = next(r for r in rows if r["runtime"] == "eager")
    assert eager["b1"]["speedup_vs_eager"] == pytest.approx(1.0)


def test_recommendation_is_the_fastest_passing_candidate(optimized):
    bundle, report = optimized
    rec = report["recommended"]
    passed = [r for r in report["candidates"] if r["status"] == "passed"]
    fastest = min(passed, key=lambda r: r["b1"]["p50_ms"])
    assert (rec["runtime"], rec["artifact"], rec["settings"]) == (fastest["runtime"], fastest["artifact"], fastest["settings"])
    assert rec["artifact"] != "model.fp16.onnx" and rec["threads"] == 1
    assert json.loads((bundle / "manifest.json").read_text())["recommended"] == rec
    text = format_table(report)
    assert text.splitlines()[1].split()[0] == "1" and "recommended:" in text
    assert "FAIL: top1_agreement" in text


def test_the_recommendation_is_compared_with_the_fastest_pytorch_native_candidate(optimized):
    _, report = optimized
    native = [r for r in report["candidates"] if r["status"] == "passed"
              and r["runtime"] in ("eager", "eager-bf16", "torch-compile", "torchscript", "torch-export", "aoti")]
    fastest = min(native, key=lambda r: r["b1"]["p50_ms"])
    assert report["pytorch_native"] == f"{fastest['runtime']} on {fastest['artifact']}"
    rec = report["recommended"]
    assert rec["speedup_vs_pytorch_native"] == pytest.approx(fastest["b1"]["p50_ms"] / rec["p50_ms"])
    assert rec["speedup_vs_pytorch_native"] >= 1.0  # it is the fastest of all that passed, these included
    assert f"the fastest PyTorch-native ({report['pytorch_native']})" in format_table(report)


def test_classifier_serves_the_recommended_onnx_artifact(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.int8.onnx"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended"] = Recommendation(runtime="ort-cpu", artifact="model.int8.onnx", precision="int8", threads=1,
                                             session={"engine": "onnxruntime", "device": "cpu", "threads": 1}).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    clf = Classifier.load(bundle, self_test=True)
    assert clf.path.name == "model.int8.onnx" and clf.precision == "int8" and clf.backend.name == "onnxruntime"


def test_openvino_recommendation(tiny_bundle, tiny_data, tmp_path, monkeypatch):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended"] = Recommendation(
        runtime="openvino", artifact="model.onnx", precision="fp32", threads=1,
        session={"engine": "openvino", "device": "cpu", "threads": 1, "precision_hint": "f32"}).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    images = sorted((tiny_data / "val").rglob("*.png"))
    expected = [p.indices[0] for p in Classifier.load(bundle, runtime="onnxruntime").predict(images)]
    if HAS_OPENVINO:
        clf = Classifier.load(bundle)
        assert clf.backend.name == "openvino" and clf.providers == ["OpenVINO CPU (f32)"]
        assert [p.indices[0] for p in clf.predict(images)] == expected
    monkeypatch.setattr("toolkit.serving.sessions.openvino_problem", lambda hint: "openvino is not installed (pip install ...)")
    with pytest.warns(UserWarning, match=r"recommends OpenVINO, which cannot run here \(openvino is not installed"):
        clf = Classifier.load(bundle)
    assert clf.backend.name == "onnxruntime"
    with pytest.raises(Exception, match="openvino is not installed"):
        Classifier.load(bundle, runtime="openvino")


def test_openvino_runtime_skips_with_a_reason_without_the_extra(tiny_bundle, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_openvino(name, *a, **k):
        if name.split(".")[0] == "openvino":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    assert sessions.openvino_problem() == "openvino is not installed (pip install -e '.[openvino]')"
    from toolkit.core.bundle import Bundle

    entries = runners.plan(Bundle.open(tiny_bundle), ["openvino"], lambda: None, runners.RunOptions())
    assert entries and all(isinstance(e, runners.Skipped) and "not installed" in e.reason for e in entries)


def test_without_nncf_the_irs_are_not_built_and_a_line_says_what_to_install(tiny_bundle, tiny_run, tiny_data, tmp_path,
                                                                          monkeypatch):
    import builtins

    from toolkit.core.bundle import Bundle
    from toolkit.evaluation.optimize import build_nncf_irs
    from toolkit.export.openvino import nncf_problem

    real = builtins.__import__

    def no_nncf(name, *a, **k):
        if name.split(".")[0] == "nncf":
            exc = ImportError(name)
            exc.name = "nncf"
            raise exc
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    assert nncf_problem() == "NNCF int8 needs openvino and nncf (nncf is not installed): pip install 'rtk[openvino]'"
    bundle = Bundle.open(copy_bundle(tiny_bundle, tmp_path / "b"))
    lines: list[str] = []
    assert build_nncf_irs(bundle, np.zeros((8, 32, 32, 3), np.uint8), None, lines.append) == []
    assert lines == ["not built: model.openvino-int8.xml, model.openvino-int8-ac.xml: NNCF int8 needs openvino and "
                     "nncf (nncf is not installed): pip install 'rtk[openvino]'"]
    assert set(Bundle.open(bundle.root).files) == {"model.onnx"}
    if HAS_OPENVINO:  # export writes the fp32 IR and says why the int8 one is missing
        result = rtk("export", tiny_run / "checkpoint.pt", "--output", tmp_path / "e", "--format", "onnx", "--format",
                     "openvino", "--precision", "fp32", "--precision", "int8", "--calibration-data", tiny_data / "train",
                     "--no-verify", "--no-any-size")
        assert result.exit_code == 0, result.output
        assert ("model.openvino-int8.xml not written: NNCF int8 needs openvino and nncf (nncf is not installed): "
                "pip install 'rtk[openvino]'") in result.output
        assert (tmp_path / "e" / "model.openvino.xml").is_file() and not (tmp_path / "e" / "model.openvino-int8.xml").exists()


@pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")
def test_openvino_takes_part_in_verify_and_benchmark(tiny_bundle, tiny_data, tmp_path):
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--runtime", "openvino", "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "v.json").read_text())["records"]
    assert {(r["artifact"], r["precision"]) for r in records} == {("model.onnx", "fp32"), ("model.int8.onnx", "int8"),
                                                                  ("model.any-size.onnx", "fp32")}
    result = rtk("benchmark", tiny_bundle, "--runtime", "openvino", "--batch-size", "2", "--warmup", "0", "--iterations", "2",
                 "--min-seconds", "0", "--threads", "1", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    measured = [r for r in json.loads((tmp_path / "b.json").read_text())["results"] if not r["skipped"]]
    assert measured and all(r["details"]["threads"] == 1 for r in measured)


def test_optimize_needs_a_holdout(tiny_bundle, tiny_data, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("optimize", bundle, "--calibration-data", tiny_data / "train")
    assert result.exit_code == 2 and "--holdout" in error_line(result)


def test_classifier_serves_the_recommendation_with_the_session_settings_it_was_verified_with(optimized):
    from toolkit.serving.sessions import SessionSettings

    bundle, report = optimized
    rec = report["recommended"]
    verified = next(r for r in report["candidates"] if r["status"] == "passed" and r["runtime"] == rec["runtime"]
                    and r["artifact"] == rec["artifact"] and r["settings"] == rec["settings"])
    if not rec["artifact"].endswith((".onnx", ".xml")):
        pytest.skip(f"the recommendation here is {rec['runtime']} on {rec['artifact']}, which needs torch to serve")
    clf = Classifier.load(bundle)
    assert clf.path.name == rec["artifact"]
    assert clf.settings == SessionSettings.from_dict(verified["session"]) == SessionSettings.from_dict(rec["session"])
    assert clf.settings.threads == 1


def test_a_cpu_recommendation_is_never_served_on_cuda(tiny_bundle, tmp_path):
    from toolkit.serving.classifier import serving_choice
    from toolkit.serving.sessions import SessionSettings

    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.int8.onnx"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended"] = Recommendation(
        runtime="ort-cpu", artifact="model.int8.onnx", precision="int8", threads=1,
        session={"engine": "onnxruntime", "device": "cpu", "threads": 1, "graph_optimization": "extended"}).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    path, settings = serving_choice(bundle, "cpu")
    assert path.name == "model.int8.onnx" and settings.graph_optimization == "extended" and settings.threads == 1
    path, settings = serving_choice(bundle, "cuda")
    assert path.name == "model.onnx" and settings == SessionSettings(device="cuda")  # verify's CUDA defaults: TF32 off


def test_the_recommendation_states_its_speedups_and_its_cpu(optimized):
    _, report = optimized
    rec = report["recommended"]
    assert rec["cpu"]["model"] and "avx512" in rec["cpu"]
    assert rec["speedup_vs_onnxruntime_default"] > 0 and report["rounds"] == 3  # the fixture's
    default = next(r for r in report["candidates"] if r["runtime"] == "ort-cpu" and r["artifact"] == "model.onnx"
                   and r.get("settings", "").endswith("graph all"))
    assert default["b1"]["speedup_vs_onnxruntime_default"] == pytest.approx(1.0)
    assert len(default["b1"]["round_p50_ms"]) == 3  # timed in interleaved rounds
    assert "onnxruntime's default" in format_table(report)
