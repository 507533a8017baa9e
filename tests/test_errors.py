"""Every command x bad input: the exit code, one `Error:` line, no traceback, and the output folder unchanged.

Plus property-based tests (hypothesis): the runtime's image decoding and the server's request parsing
never crash and never answer with the wrong shape, whatever bytes, shapes and dtypes they get.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import copy_bundle, rtk
from toolkit.core.preprocess import PreprocessSpec, crop_array
from toolkit.errors import RtkError


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _truncate_manifest(b: Path) -> None:
    (b / "manifest.json").write_text((b / "manifest.json").read_text()[:200])


def _drop_key(b: Path) -> None:
    manifest = json.loads((b / "manifest.json").read_text())
    del manifest["preprocess"]
    (b / "manifest.json").write_text(json.dumps(manifest))


def _no_selftest(b: Path) -> None:
    (b / "selftest.npz").unlink()


def _corrupt_selftest(b: Path) -> None:
    (b / "selftest.npz").write_bytes(b"PK\x03\x04 not a zip")


# name -> (prepare the bundle copy, command args after the bundle, exit code, message fragment)
BUNDLE_CASES = {
    "predict: truncated manifest": (_truncate_manifest, ["predict", "{b}", "{img}"], 2, "is not valid JSON"),
    "verify: truncated manifest": (_truncate_manifest, ["verify", "{b}", "--random", "2"], 2, "is not valid JSON"),
    "verify: manifest missing a key": (_drop_key, ["verify", "{b}", "--random", "2"], 2, "missing key 'preprocess'"),
    "benchmark: manifest missing a key": (_drop_key, ["benchmark", "{b}"], 2, "missing key 'preprocess'"),
    "optimize: no selftest.npz": (_no_selftest, ["optimize", "{b}", "--calibration-data", "{data}"], 2, "selftest.npz (missing or corrupt"),
    "optimize: corrupt selftest.npz": (_corrupt_selftest, ["optimize", "{b}", "--calibration-data", "{data}"], 2, "selftest.npz (missing or corrupt"),
    "serve: manifest missing a key": (_drop_key, ["serve", "{b}", "--port", "1"], 2, "missing key 'preprocess'"),
    "triton: truncated manifest": (_truncate_manifest, ["triton", "{b}", "-o", "{tmp}/repo"], 2, "is not valid JSON"),
    "verify: --json under a file": (lambda b: None, ["verify", "{b}", "--random", "2", "--json", "{b}/labels.txt/v.json"], 2, "is a file, not a folder"),
    "benchmark: --json under a file": (lambda b: None, ["benchmark", "{b}", "--json", "{b}/labels.txt/r.json"], 2, "is a file, not a folder"),
    "benchmark: unknown runtime": (lambda b: None, ["benchmark", "{b}", "--runtime", "tvm"], 2, "unknown runtime 'tvm'"),
}


def one_error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_bad_bundle_inputs(case, tiny_bundle, tiny_data, tmp_path):
    prepare, args, code, message = BUNDLE_CASES[case]
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    prepare(bundle)
    before = tree_hash(bundle)
    image = next((tiny_data / "val" / "circle").iterdir())
    args = [a.format(b=bundle, img=image, data=tiny_data, tmp=tmp_path) for a in args]
    result = rtk(*args)
    assert result.exit_code == code, result.output
    assert message in one_error_line(result)
    assert "p50" not in result.output  # nothing was run before the check
    assert tree_hash(bundle) == before


@pytest.mark.parametrize("command", ["train", "export", "data"])
def test_an_output_folder_that_cannot_be_written(command, tiny_data, tiny_run, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "out"
    args = {"train": ["train", tiny_data, "--output", out, "--weights", "none", "--epochs", "1"],
            "export": ["export", tiny_run / "checkpoint.pt", "--output", out, "--no-verify"],
            "data": ["data", "digits", out]}[command]
    before = tree_hash(tmp_path)
    result = rtk(*args)
    assert result.exit_code == 2
    assert "cannot write to" in one_error_line(result) and str(out) in one_error_line(result)
    assert tree_hash(tmp_path) == before


def test_a_read_only_bundle_is_refused_before_verifying(tiny_bundle, tmp_path, monkeypatch):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    before = tree_hash(bundle)
    import os

    real = os.access
    # tests run as root, where chmod does not bite: the bundle answers "not writable", everything else as it is
    monkeypatch.setattr("toolkit.core.bundle.os.access",
                        lambda path, mode: False if mode == os.W_OK and str(path).startswith(str(bundle)) else real(path, mode))
    result = rtk("verify", bundle, "--random", "2")
    assert result.exit_code == 2 and "is not writable" in one_error_line(result)
    assert "max_abs" not in result.output and tree_hash(bundle) == before


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "d"))

    monkeypatch.setattr("toolkit.core.fileio.os.fsync", full)
    result = rtk("data", "digits", tmp_path / "d", "--size", "8")
    assert result.exit_code == 2
    assert one_error_line(result) == f"Error: No space left on device: {tmp_path / 'd'}"


def test_predict_reports_a_missing_path_and_predicts_the_rest(tiny_bundle, tiny_data, tmp_path):
    good = next((tiny_data / "val" / "square").iterdir())
    result = rtk("predict", tiny_bundle, good, tmp_path / "missing.jpg")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(str(good)) and lines[0].count("\t") == 2
    assert "missing.jpg\terror: no such file or folder" in result.output
    assert "1 of 2 images failed" in result.output


def test_export_verify_keeps_the_labels_of_the_calibration_images(tiny_run, tiny_data, tmp_path):
    """The automatic verify mixes random images in; the int8 accuracy gate still applies to the labelled ones."""
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", tmp_path / "b", "--format", "onnx", "--precision", "fp32",
                 "--precision", "int8", "--calibration-data", tiny_data / "val", "--calibration-size", "12")
    report = json.loads((tmp_path / "b" / "manifest.json").read_text())["verification"]
    assert report["labelled"] and report["random_images"] > 0
    int8 = [r for r in report["records"] if r["precision"] == "int8"]
    assert int8 and all(r["accuracy_change"] is not None for r in int8)
    assert all("max_accuracy_drop" in r["tolerance"] for r in int8)
    # the export's exit code is its verification's verdict: 0 only if every record (int8 included) passed
    assert result.exit_code == (0 if report["passed"] else 1), result.output
    assert all(r["passed"] == (not r["failed_metrics"]) for r in report["records"])
    assert ("FAILED" in result.output) == (not report["passed"])


# ---------------------------------------------------------------- property-based


SPEC = PreprocessSpec(resize_size=36, crop_size=32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_decoding_random_bytes_never_crashes(data):
    try:
        crop = crop_array(data, SPEC)
    except RtkError:
        return
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
       st.lists(st.integers(0, 70), min_size=0, max_size=4))
def test_decoding_random_arrays_never_crashes(dtype, shape):
    array = np.ones(shape, dtype=dtype)
    try:
        crop = crop_array(array, SPEC)
    except RtkError:
        return
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8


def _json_values():
    return st.recursive(st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False) | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)


def _requests():
    tensor = st.fixed_dictionaries({"name": st.sampled_from(["image", "x", 3]), "datatype": st.sampled_from(["UINT8", "FP32", None]),
                                    "shape": st.one_of(st.just([1, 4, 4, 3]), st.lists(st.integers(-2, 5), max_size=5), _json_values()),
                                    "data": st.one_of(st.lists(st.integers(-5, 300), max_size=60), _json_values())})
    return st.one_of(_json_values(), st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=2)},
                                                           optional={"outputs": _json_values(), "id": _json_values()}))


@settings(max_examples=300, deadline=None)
@given(_requests(), st.binary(max_size=64), st.one_of(st.none(), st.integers(-5, 400).map(str), st.text(max_size=4)))
def test_server_request_parsing_never_crashes(request, binary, header):
    pytest.importorskip("fastapi")
    from toolkit.serving.server import BadRequest, ModelInfo, parse_infer

    info = ModelInfo("m", 4, ("a", "b"), ("logits",), "model.onnx", 8)
    body = json.dumps(request).encode() + (binary if header is not None else b"")
    try:
        parsed = parse_infer(body, header, info, max_rows=8)
    except BadRequest:
        return
    n = parsed.images.shape[0]
    assert parsed.images.shape == (n, 4, 4, 3) and parsed.images.dtype == np.uint8 and 1 <= n <= 8
    assert set(parsed.outputs) <= {"logits"}


@pytest.mark.parametrize("case", ["missing", "empty", "too small", "holdout without labels"])
def test_bad_calibration_and_holdout_folders(case, tiny_bundle, tiny_data, tmp_path):
    import shutil

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    calibration, holdout = tmp_path / "calib", tiny_data / "val"
    if case == "empty":
        calibration.mkdir()
    elif case == "too small":
        calibration.mkdir()
        for p in sorted((tiny_data / "train" / "circle").iterdir())[:3]:
            shutil.copy(p, calibration / p.name)
    elif case == "holdout without labels":
        calibration, holdout = tiny_data / "train", tmp_path / "flat"
        holdout.mkdir()
        for p in sorted((tiny_data / "val" / "circle").iterdir())[:4]:
            shutil.copy(p, holdout / p.name)
    before = tree_hash(bundle)
    result = rtk("optimize", bundle, "--calibration-data", calibration, "--holdout", holdout)
    assert result.exit_code == 2
    message = one_error_line(result)
    assert {"missing": "calibration folder not found", "empty": "holds no images", "too small": "holds 3 images",
            "holdout without labels": "must be an ImageFolder"}[case] in message
    assert tree_hash(bundle) == before
