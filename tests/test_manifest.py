"""The typed manifest: read, validated with one clear error, written back without losing keys."""

import json

import pytest

from toolkit.core.manifest import FileEntry, Manifest
from toolkit.errors import RtkError


def test_round_trip_keeps_every_key(tiny_bundle, tmp_path):
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest = Manifest.read(tiny_bundle / "manifest.json")
    assert manifest.arch == "resnet18" and manifest.classes == ("circle", "square", "stripes")
    assert manifest.preprocess.crop_size == 32 and isinstance(manifest.files["model.onnx"], FileEntry)
    assert manifest.files["model.onnx"].get("opset") == 18
    manifest.write(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == data


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop("arch"), "missing key 'arch'"),
    (lambda m: m.update(classes="cat"), "'classes' must be list, got str"),
    (lambda m: m.update(classes=[]), "'classes' must be a non-empty list of strings"),
    (lambda m: m["files"]["model.onnx"].update(bytes="12"), "files['model.onnx']: 'bytes' must be int, got str"),
    (lambda m: m["source"].pop("kind"), "'source': missing key 'kind'"),
    (lambda m: m.update(recommended=[1]), "'recommended' must be dict, got list"),
])
def test_a_wrong_manifest_is_one_clear_error(tiny_bundle, change, message):
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    change(data)
    with pytest.raises(RtkError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        Manifest.from_dict(data)


def test_truncated_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"arch": "resnet18", "clas')
    with pytest.raises(RtkError, match="is not valid JSON"):
        Manifest.read(tmp_path / "manifest.json")
