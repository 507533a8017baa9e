"""A bundle file is served or verified only if it is the file the manifest describes: size and sha256, and the
same for an OpenVINO IR's weights file. Hand-made bundles (no model needed) and one real bundle through verify."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.conftest import copy_bundle, rtk
from toolkit.core.bundle import Bundle, file_name
from toolkit.core.manifest import FileEntry, Manifest, check_plain_name, preprocess_spec
from toolkit.errors import ArtifactBroken, RtkError

pytestmark = pytest.mark.serving

XML, BIN = "model.openvino.xml", "model.openvino.bin"


def _entry(path: Path, fmt: str = "onnx", **extra) -> dict:
    data = path.read_bytes()
    return {"format": fmt, "precision": "fp32", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **extra}


def make_bundle(root: Path) -> Path:
    """A bundle folder with an ONNX-named file and an OpenVINO IR (xml + bin), their manifest entries exact."""
    root.mkdir()
    (root / "model.onnx").write_bytes(bytes(range(256)) * 4)
    (root / XML).write_bytes(b"<net name='m'>" + b"x" * 100 + b"</net>")
    (root / BIN).write_bytes(bytes(range(200)) * 3)
    (root / "labels.txt").write_text("cat\ndog\n")
    weights = {"file": BIN, **{k: v for k, v in _entry(root / BIN).items() if k in ("sha256", "bytes")}}
    manifest = {"format": "rtk-bundle", "arch": "resnet18", "classes": ["cat", "dog"],
                "preprocess": {"resize_size": 36, "crop_size": 32}, "source": {"kind": "checkpoint", "arch": "resnet18"},
                "files": {"model.onnx": _entry(root / "model.onnx"), XML: _entry(root / XML, "openvino", weights=weights)}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _flip(path: Path, where: int | None = None) -> None:
    """One byte altered, the size kept: only the sha256 can tell."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if where is None else where] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "b")


def test_an_intact_bundle_has_no_integrity_problem(bundle):
    opened = Bundle.open(bundle)
    assert opened.integrity_problem("model.onnx") is None and opened.integrity_problem(XML) is None
    opened.check_file("model.onnx")
    opened.check_file(XML)


@pytest.mark.parametrize("where", [0, None, -1])  # the first, a middle and the last byte
def test_a_file_altered_at_the_same_size_is_refused(bundle, where):
    _flip(bundle / "model.onnx", where)
    problem = Bundle.open(bundle).integrity_problem("model.onnx")
    assert problem == "model.onnx's sha256 differs from the manifest's (the file was altered)"
    with pytest.raises(ArtifactBroken, match="sha256 differs"):
        Bundle.open(bundle).check_file("model.onnx")


@pytest.mark.parametrize("change", [lambda b: b[:-1], lambda b: b + b"\0"])
def test_a_file_of_another_size_is_refused(bundle, change):
    path = bundle / "model.onnx"
    path.write_bytes(change(path.read_bytes()))
    problem = Bundle.open(bundle).integrity_problem("model.onnx")
    assert problem.startswith(f"model.onnx has {path.stat().st_size} bytes, the manifest says 1024")


@pytest.mark.parametrize("change", ["flip", "truncate", "grow"])
def test_an_openvino_weights_file_is_checked_with_its_ir(bundle, change):
    path = bundle / BIN
    if change == "flip":
        _flip(path)
    else:
        path.write_bytes(path.read_bytes()[:-1] if change == "truncate" else path.read_bytes() + b"\0")
    opened = Bundle.open(bundle)
    assert opened.integrity_problem("model.onnx") is None  # the other file is not affected
    assert opened.integrity_problem(XML) == f"{BIN} (the weights of {XML}) differs from the manifest (truncated or altered)"
    with pytest.raises(ArtifactBroken, match="the weights of"):
        opened.check_file(XML)


def test_an_altered_ir_xml_is_refused_even_with_intact_weights(bundle):
    _flip(bundle / XML)
    assert "sha256 differs" in Bundle.open(bundle).integrity_problem(XML)


def test_a_missing_weights_file_is_refused(bundle):
    (bundle / BIN).unlink()
    assert Bundle.open(bundle).integrity_problem(XML) == f"{BIN} (the weights of {XML}) is missing from {bundle}"


def test_a_weights_entry_with_a_wrong_sha256_is_refused(bundle):
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"][XML]["weights"]["sha256"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(data))
    assert "differs from the manifest" in Bundle.open(bundle).integrity_problem(XML)


def test_unlisted_missing_and_symlinked_files(bundle, tmp_path):
    opened = Bundle.open(bundle)
    assert opened.integrity_problem("model.ts") == f"model.ts is not listed in {bundle / 'manifest.json'}"
    (bundle / "model.onnx").rename(tmp_path / "elsewhere.onnx")
    assert Bundle.open(bundle).integrity_problem("model.onnx") == f"model.onnx is missing from {bundle}"
    (bundle / "model.onnx").symlink_to(tmp_path / "elsewhere.onnx")  # the same bytes: only the link gives it away
    assert "is a symlink" in Bundle.open(bundle).integrity_problem("model.onnx")


def test_the_answer_is_remembered_per_file(bundle):
    """A file checked once is not re-hashed on every use; a file added to the manifest is checked anew."""
    opened = Bundle.open(bundle)
    assert opened.integrity_problem("model.onnx") is None
    _flip(bundle / "model.onnx")
    assert opened.integrity_problem("model.onnx") is None  # remembered: the check ran once
    entry = FileEntry.from_dict(_entry(bundle / "model.onnx"), "new")
    _flip(bundle / "model.onnx")  # back to the original bytes: the new entry no longer matches
    opened.add_file("model.onnx", entry)
    assert "sha256 differs" in opened.integrity_problem("model.onnx")


def test_confined_refuses_names_outside_the_bundle(bundle, tmp_path):
    opened = Bundle.open(bundle)
    assert opened.confined("model.onnx") == bundle / "model.onnx"
    for name in ("../b/model.onnx", "/etc/passwd", "..", "", " model.onnx"):
        with pytest.raises(ArtifactBroken, match="not a plain file name"):
            opened.confined(name)
    (bundle / "sub").mkdir()
    with pytest.raises(ArtifactBroken, match="not a plain file inside the bundle"):
        opened.confined("sub")


def test_labels_must_equal_the_manifest_classes(bundle):
    assert Bundle.open(bundle).labels() == ["cat", "dog"]
    (bundle / "labels.txt").write_text("dog\ncat\n")
    with pytest.raises(ArtifactBroken, match="label 1 is 'dog', the manifest's class 1 is 'cat'"):
        Bundle.open(bundle).labels()
    (bundle / "labels.txt").write_text("cat\n")
    with pytest.raises(ArtifactBroken, match="has 1 labels, the manifest has 2 classes"):
        Bundle.open(bundle).labels()


def test_file_names_by_format_and_precision():
    assert file_name("onnx") == "model.onnx" and file_name("onnx", "int8") == "model.int8.onnx"
    assert file_name("openvino") == XML
    with pytest.raises(RtkError, match="no fp16 torchscript file"):
        file_name("torchscript", "fp16")


def test_files_are_listed_standard_names_first_then_variants(bundle):
    opened = Bundle.open(bundle)
    entry = FileEntry.from_dict(_entry(bundle / "model.onnx"), "x")
    for name in ("model.zz.onnx", "model.aa.onnx"):
        opened.add_file(name, entry)
    assert list(Bundle.open(bundle).files) == ["model.onnx", XML, "model.aa.onnx", "model.zz.onnx"]


# ---------------------------------------------------------------- the manifest's own checks


def test_manifest_types_are_checked(bundle):
    good = json.loads((bundle / "manifest.json").read_text())
    assert Manifest.from_dict(good).files["model.onnx"].bytes == 1024
    bad_cases = [
        (lambda d: d["files"]["model.onnx"].update(bytes="1024"), "'bytes' must be int, got str"),
        (lambda d: d["files"]["model.onnx"].update(bytes=True), "'bytes' must be int, got bool"),
        (lambda d: d["files"]["model.onnx"].pop("sha256"), "missing key 'sha256'"),
        (lambda d: d["files"].update({"model.onnx": ["onnx"]}), "files['model.onnx'] must be an object, got list"),
        (lambda d: d["files"][XML]["weights"].pop("bytes"), "missing key 'bytes'"),
        (lambda d: d["files"][XML]["weights"].update(sha256=5), "'weights': 'sha256' must be str, got int"),
        (lambda d: d["files"][XML]["weights"].update(file="../x.bin"), "is not a plain file name"),
        (lambda d: d.update(classes=[]), "'classes' must be a non-empty list of strings"),
        (lambda d: d.update(classes=["a", 1]), "'classes' must be a non-empty list of strings"),
        (lambda d: d["source"].pop("kind"), "missing key 'kind'"),
        (lambda d: d.update(softmax="yes"), "'softmax' must be bool"),
        (lambda d: d.update(recommended={"artifact": "../../model.onnx"}), "is not a plain file name"),
        (lambda d: d["files"].update({"../m.onnx": d["files"]["model.onnx"]}), "is not a plain file name"),
    ]
    for change, message in bad_cases:
        data = json.loads(json.dumps(good))
        change(data)
        with pytest.raises(RtkError, match=re.escape(message)):
            Manifest.from_dict(data)
    assert Manifest.from_dict({**good, "softmax": None}).softmax is False  # optional keys may be null
    with pytest.raises(RtkError, match="m.json must hold a JSON object, got list"):
        Manifest.from_dict([good], "m.json")


@pytest.mark.parametrize("data, message", [
    ({"resize_size": 36}, "missing key 'crop_size'"),
    ({"resize_size": "36", "crop_size": 32}, "'resize_size' must be int"),
    ({"resize_size": 0, "crop_size": 32}, "'resize_size' is 0, outside 1..8192"),
    ({"resize_size": 36, "crop_size": 8193}, "'crop_size' is 8193, outside 1..8192"),
    ({"resize_size": 36, "crop_size": 32, "mean": [0.5, 0.5]}, "'mean' must be a list of three numbers"),
    ({"resize_size": 36, "crop_size": 32, "std": [1, 1, True]}, "'std' must be a list of three numbers"),
    ([36, 32], "must be an object"),
    ({"resize_size": 36, "crop_size": 32, "interpolation": 3}, "'interpolation' must be str, got int"),
    ({"resize_size": 30, "crop_size": 32}, "spec is not a preprocessing spec: --resize-size"),
    ({"resize_size": 36, "crop_size": 32, "interpolation": "sideways"}, "spec is not a preprocessing spec"),
    ({"resize_size": 36, "crop_size": 32, "layout": ["NHWC"]}, "'layout' must be str, got list"),
])
def test_preprocess_specs_are_checked(data, message):
    with pytest.raises(RtkError, match=message):
        preprocess_spec(data, "spec")


def test_preprocess_spec_bounds_are_inclusive():
    assert preprocess_spec({"resize_size": 8192, "crop_size": 8192}, "spec").crop_size == 8192
    assert preprocess_spec({"resize_size": 1, "crop_size": 1}, "spec").resize_size == 1
    assert preprocess_spec({"resize_size": 36, "crop_size": 32, "mean": [0, 0.5, 1]}, "spec").mean == (0, 0.5, 1)


@pytest.mark.parametrize("name", ["a/b", "a\\b", ".", "..", "", " x", "x\0", None, 3])
def test_plain_names(name):
    with pytest.raises(RtkError, match="not a plain file name"):
        check_plain_name(name, "here")


def test_a_plain_name_is_returned():
    assert check_plain_name("model.onnx", "here") == "model.onnx"


def test_unknown_keys_survive_a_write(bundle, tmp_path):
    data = json.loads((bundle / "manifest.json").read_text())
    data["future_key"] = {"kept": True}
    data["files"]["model.onnx"]["opset"] = 18
    manifest = Manifest.from_dict(data)
    manifest.write(tmp_path / "m.json")
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["future_key"] == {"kept": True} and written["files"] == data["files"]
    assert Manifest.read(tmp_path / "m.json") == manifest


# ---------------------------------------------------------------- a real bundle, through rtk verify


@pytest.mark.torch_stack  # rtk verify
def test_verify_refuses_a_model_altered_at_the_same_size(tiny_bundle, tmp_path):
    """Bytes changed inside the ONNX file's metadata: the model computes the same logits, so parity cannot
    tell; the manifest's sha256 must."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    raw = (bundle / "model.onnx").read_bytes()
    at = raw.index(b"circle")
    (bundle / "model.onnx").write_bytes(raw[:at] + b"Circle" + raw[at + 6:])
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cpu")
    assert result.exit_code == 1, result.output
    assert "FAIL model.onnx on ort-cpu: model.onnx's sha256 differs from the manifest's" in result.output


def test_any_size_is_read_from_the_manifest_entry(bundle):
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"]["model.onnx"]["input"] = "any-size"
    (bundle / "manifest.json").write_text(json.dumps(data))
    opened = Bundle.open(bundle)
    assert opened.any_size("model.onnx") and not opened.any_size(XML) and not opened.any_size("checkpoint")


def test_a_huge_labels_file_is_refused_unread(bundle):
    (bundle / "labels.txt").write_bytes(b"cat\ndog\n" + b"x" * (1 << 20))
    with pytest.raises(ArtifactBroken, match=r"bytes, more than a label file's 1048576 bytes"):
        Bundle.open(bundle).labels()
    (bundle / "labels.txt").write_bytes(b"cat\n\xff\xfe\n")
    with pytest.raises(ArtifactBroken, match="is not UTF-8 text"):
        Bundle.open(bundle).labels()


def test_a_labels_file_of_exactly_the_limit_is_read_whole(bundle):
    from toolkit.core.bundle import LABELS_MAX_BYTES

    (bundle / "labels.txt").write_bytes(b"cat\n" + b"\n" * (LABELS_MAX_BYTES - 7) + b"dog")  # its last byte counts
    assert (bundle / "labels.txt").stat().st_size == LABELS_MAX_BYTES
    assert Bundle.open(bundle).labels() == ["cat", "dog"]


def test_an_unreadable_labels_file_is_one_line(bundle, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("toolkit.core.bundle.open", refuse, raising=False)
    with pytest.raises(ArtifactBroken) as caught:
        Bundle.open(bundle).labels()
    assert str(caught.value) == f"cannot read {bundle / 'labels.txt'}: Permission denied"
