import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import copy_bundle, error_line, reseal, rtk
from toolkit.evaluation import verify as v

# ---------------------------------------------------------------- metrics on arrays with known answers

REF = np.array([[1.0, 2.0, 3.0], [4.0, -2.0, 0.5]])


def test_difference_metrics():
    a = REF + np.array([[0.0, 0.1, 0.0], [-0.3, 0.0, 0.0]])
    assert v.max_abs_diff(a, REF) == pytest.approx(0.3)
    assert v.mean_abs_diff(a, REF) == pytest.approx(0.4 / 6)
    assert v.max_rel_diff(a, REF) == pytest.approx(0.3 / 4.0 if 0.3 / 4 > 0.1 / 2 else 0.05)
    assert v.max_rel_diff(np.array([[1e-3]]), np.array([[0.0]])) == pytest.approx(1e3)  # floored, not inf


def test_cosine_min():
    assert v.cosine_min(REF, REF) == pytest.approx(1.0)
    flipped = REF.copy()
    flipped[1] = -flipped[1]
    assert v.cosine_min(flipped, REF) == pytest.approx(-1.0)
    orth = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert v.cosine_min(*orth) == pytest.approx(0.0)


def test_top1_and_top5_agreement():
    ref = np.array([[0, 1, 2, 3, 4, 5, 6.0], [6, 5, 4, 3, 2, 1, 0.0]])
    same_top1_other_top5 = np.array([[0, 1, 2, 3, 4, 5, 6.0], [6, 5, 4, 3, 0, 1, 2.0]])
    assert v.top1_agreement(same_top1_other_top5, ref) == 1.0
    assert v.top5_agreement(same_top1_other_top5, ref) == 0.5
    swapped = ref[:, ::-1]
    assert v.top1_agreement(swapped, ref) == 0.0


def test_accuracy_and_atol_needed():
    assert v.accuracy(REF, np.array([2, 1])) == 0.5
    a = REF + 0.01
    needed = v.atol_needed(a, REF, rtol=0.0)
    assert needed == pytest.approx(0.01)
    assert np.allclose(a, REF, atol=needed * 1.0001, rtol=0) and not np.allclose(a, REF, atol=needed * 0.99, rtol=0)


def test_metrics_of_nothing_and_of_zero_vectors():
    empty = np.zeros((0, 3))
    assert v.max_abs_diff(empty, empty) == v.max_rel_diff(empty, empty) == v.mean_abs_diff(empty, empty) == 0.0
    assert v.atol_needed(empty, empty, 1e-3) == 0.0 and v.cosine_min(empty, empty) == 1.0
    assert v.top1_agreement(empty, empty) == 1.0 and v.top5_agreement(empty, empty) == 1.0
    zero, one = np.zeros((1, 2)), np.array([[1.0, 0.0]])
    assert v.cosine_min(zero, zero) == 1.0 and v.cosine_min(one, zero) == 0.0 and v.cosine_min(zero, one) == 0.0
    small = np.array([[0.1, 0.0]]), np.array([[0.2, 0.01]])  # norms below one are still vectors
    assert v.cosine_min(*small) == pytest.approx(0.2 / np.hypot(0.2, 0.01) * 1.0)


def test_atol_needed_with_a_relative_tolerance():
    a = REF + 0.01
    assert v.atol_needed(REF.copy(), REF, rtol=1e-3) == 0.0
    needed = v.atol_needed(a, REF, rtol=1e-3)
    assert needed == pytest.approx(0.01 - 1e-3 * 0.5)  # the smallest |ref| leaves the least to rtol
    assert np.allclose(a, REF, atol=needed * 1.0001, rtol=1e-3) and not np.allclose(a, REF, atol=needed * 0.99, rtol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_non_finite_output_fails(precision):
    a = REF.copy()
    a[0, 0] = np.nan
    m = v.compare(a, REF, ["a", "b"], None, precision, v.Gates(int8_top1=0.0, half_top1=0.0))
    assert not m["passed"] and "finite" in m["failed_metrics"]


def test_the_any_size_tolerance_is_inclusive():
    ref = np.zeros((2, 3))
    at = ref.copy()
    at[0, 0] = v.Gates().any_size_atol  # exactly the tolerance (the scale is 1 for logits below 1)
    assert v.compare(at, ref, ["a", "b"], None, "fp32", v.Gates(), any_size=True)["passed"]
    at[0, 0] = np.nextafter(v.Gates().any_size_atol, 1.0)
    assert not v.compare(at, ref, ["a", "b"], None, "fp32", v.Gates(), any_size=True)["passed"]


def test_only_int8_is_judged_against_the_accuracy_drop_bound():
    labels = np.array([2, 0])
    int8 = v.compare(REF, REF, ["a", "b"], labels, "int8", v.Gates())
    fp16 = v.compare(REF, REF, ["a", "b"], labels, "fp16", v.Gates())
    assert int8["passed"] and fp16["passed"]
    assert int8["accuracy_pairs"]["bound"] == v.Gates().int8_max_accuracy_drop and "bound" not in fp16["accuracy_pairs"]


def test_gates_by_precision():
    gates = v.Gates()
    names = ["a", "b"]
    ok = v.compare(REF + 1e-6, REF, names, None, "fp32", gates)
    assert ok["passed"] and ok["tolerance"]["atol"] == 1e-4
    bad = v.compare(REF + 1e-2, REF, names, None, "fp32", gates)
    assert not bad["passed"] and bad["failed_metrics"] == ["max_abs_diff"] and bad["atol_needed"] > 0.009
    flipped = REF[:, ::-1].copy()
    half = v.compare(flipped, REF, names, None, "fp16", gates)
    assert half["failed_metrics"] == ["top1_agreement"] and half["top1_changed"] == ["a", "b"]
    labels = np.array([2, 0])
    worse = REF.copy()
    worse[1] = [0, 1, 0]  # one image now wrong, but int8 top-1 gate set low
    drop = v.compare(worse, REF, names, labels, "int8", v.Gates(int8_top1=0.0))
    assert drop["accuracy"] == 0.5 and drop["reference_accuracy"] == 1.0
    assert drop["failed_metrics"] == ["accuracy_change"]


# ---------------------------------------------------------------- the command


def test_verify_passes_and_reports_every_artifact(tiny_bundle, tiny_data, tmp_path):
    result = rtk("verify", tiny_bundle, "--images", tiny_data / "val", "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["labelled"] and report["images"] == 18 and report["tf32"] is False
    pairs = {(r["artifact"], r["runtime"]) for r in report["records"]}
    assert {("model.onnx", "ort-cpu"), ("model.fp16.onnx", "ort-cpu"), ("model.int8.onnx", "ort-cpu"),
            ("model.ts", "torchscript"), ("model.pt2", "torch-export"), ("checkpoint", "eager")} <= pairs
    record = report["records"][0]
    for key in ("artifact", "runtime", "precision", "images", "max_abs_diff", "max_rel_diff", "mean_abs_diff", "cosine_min",
                "top1_agreement", "top5_agreement", "accuracy", "reference_accuracy", "tolerance", "passed"):
        assert key in record
    assert record["accuracy"] is not None
    assert report["preprocess_max_abs_diff"] < 1e-5
    assert all(s["reason"] for s in report["skipped"])
    assert json.loads((tiny_bundle / "manifest.json").read_text())["verification"]["images"] == 18


def _corrupt_weight(path):
    model = onnx.load(str(path))
    # the centre tap of the last 3x3 conv (at 32 px its input is 1x1, so corner taps only ever see padding)
    init = [t for t in model.graph.initializer if len(t.dims) == 4 and list(t.dims[2:]) == [3, 3]][-1]
    arr = numpy_helper.to_array(init).copy()
    arr[0, 0, 1, 1] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))


def test_one_changed_weight_fails_verification(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    _corrupt_weight(bundle / "model.onnx")
    reseal(bundle, "model.onnx")
    result = rtk("verify", bundle, "--random", "8", "--runtime", "ort-cpu")
    assert result.exit_code == 1
    assert "FAIL (max_abs_diff" in result.output
    assert "would pass fp32 allclose at atol >=" in result.output
    assert "model.onnx on ort-cpu (max_abs_diff" in error_line(result)


def test_swapped_class_names_fail_verification(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    model = onnx.load(str(bundle / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(["square", "circle", "stripes"])
    onnx.save(model, str(bundle / "model.onnx"))
    reseal(bundle, "model.onnx")
    result = rtk("verify", bundle, "--random", "4", "--runtime", "ort-cpu")
    assert result.exit_code == 1
    assert "FAIL (classes" in result.output


def test_changed_source_checkpoint_is_caught(tiny_bundle, tiny_run, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["source"]["sha256"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = rtk("verify", bundle, "--random", "2")
    assert result.exit_code == 2 and "changed since export" in error_line(result)
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cpu", "--checkpoint", tiny_run / "checkpoint.pt")
    assert result.exit_code == 0, result.output


def test_naming_an_unavailable_runtime_is_a_usage_error(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cuda")
    assert result.exit_code == 2
    line = error_line(result)
    assert "ort-cuda is not available here" in line and "CUDAExecutionProvider" in line
    result = rtk("verify", bundle, "--random", "2", "--runtime", "warp-drive")
    assert result.exit_code == 2 and "unknown runtime" in error_line(result)


def test_gates_are_options(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("verify", bundle, "--random", "4", "--runtime", "ort-cpu", "--atol", "0", "--rtol", "0")
    assert result.exit_code == 1 and "max_abs_diff" in result.output


def test_nothing_compared_is_not_a_pass(tiny_bundle, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    result = rtk("verify", bundle, "--random", "2", "--device", "cuda")
    assert result.exit_code == 1
    assert "every runtime asked for was skipped" in result.output and "no runtime could run" in error_line(result)


# ---------------------------------------------------------------- broken artifacts fail, never skip

# file -> a runtime that runs it (besides the defaults)
RUNS_IT = {"model.onnx": "ort-cpu", "model.int8.onnx": "ort-cpu", "model.ts": "torchscript", "model.pt2": "torch-export"}


def _truncate(path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("name", list(RUNS_IT))
@pytest.mark.parametrize("runtimes", ["default", "named"])
def test_a_truncated_artifact_fails_verification(tiny_bundle, tmp_path, name, runtimes):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=(name,))
    _truncate(bundle / name)
    args = ["--runtime", RUNS_IT[name]] if runtimes == "named" else []
    result = rtk("verify", bundle, "--random", "4", *args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    fails = [ln for ln in result.output.splitlines() if ln.startswith("FAIL ") and name in ln]
    assert fails and all("has 1000 bytes, the manifest says" in ln for ln in fails), result.output
    assert f"{name} on {RUNS_IT[name]} (load)" in error_line(result)


@pytest.mark.parametrize("name,runtime", [("model.onnx", "ort-cpu"), ("model.onnx", "openvino"),
                                          ("model.ts", "torchscript"), ("model.pt2", "torch-export")])
def test_an_artifact_no_runtime_can_load_fails_on_each_runtime(tiny_bundle, tmp_path, name, runtime):
    """The manifest agrees with the (broken) file, so only the runtime's own loader can tell."""
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=(name,))
    _truncate(bundle / name)
    reseal(bundle, name)
    result = rtk("verify", bundle, "--random", "4", "--runtime", runtime)
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = [ln for ln in result.output.splitlines() if ln.startswith("FAIL ")]
    assert line.startswith(f"FAIL {name} on {runtime}: {name}") and "cannot load it" in line


def test_a_deleted_artifact_fails_verification(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.ts"))
    (bundle / "model.ts").unlink()
    result = rtk("verify", bundle, "--random", "4")
    assert result.exit_code == 1
    assert "FAIL model.ts on torchscript: model.ts is missing from" in result.output
    assert re.search(r"^model.onnx +ort-cpu +fp32 .* pass$", result.output, re.M)  # the intact file is still verified


def test_a_manifest_with_a_missing_key_is_one_line(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]["sha256"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = rtk("verify", bundle, "--random", "4")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert error_line(result).endswith("manifest.json files['model.onnx']: missing key 'sha256'")
    del manifest["classes"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = rtk("verify", bundle, "--random", "4")
    assert result.exit_code == 2 and error_line(result).endswith("manifest.json: missing key 'classes'")


def test_an_openvino_ir_is_verified_and_its_weights_file_checked(tiny_run, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    out = tmp_path / "b"
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", out, "--format", "onnx", "--format", "openvino",
                 "--no-any-size", "--no-verify")
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "manifest.json").read_text())["files"]["model.openvino.xml"]
    assert entry["format"] == "openvino" and entry["weights"]["file"] == "model.openvino.bin"
    good = rtk("verify", out, "--random", "4", "--runtime", "openvino")
    assert good.exit_code == 0 and re.search(r"^model.openvino.xml +openvino +fp32 .* pass$", good.output, re.M)
    weights = out / "model.openvino.bin"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one weight's low bit, the size kept: only the sha256 of the .bin tells
    weights.write_bytes(bytes(raw))
    altered = rtk("verify", out, "--random", "4", "--runtime", "openvino")
    assert altered.exit_code == 1
    assert "FAIL model.openvino.xml on openvino: model.openvino.bin (the weights of model.openvino.xml) differs" in altered.output
    weights.write_bytes(weights.read_bytes()[:1000])
    bad = rtk("verify", out, "--random", "4", "--runtime", "openvino")
    assert bad.exit_code == 1 and "model.openvino.bin (the weights of model.openvino.xml) differs" in bad.output
