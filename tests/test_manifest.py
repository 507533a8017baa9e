"""The typed manifest: read, validated with one clear error, written back without losing keys."""

import json
import re

import pytest

from toolkit.core.manifest import FileEntry, Manifest, Recommendation
from toolkit.errors import RtkError

pytestmark = pytest.mark.serving


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


# what `rtk optimize` writes (the keys and value types of its `recommended`), a figure without a baseline null
OPTIMIZED = {"runtime": "ort-cpu", "artifact": "model.int8.onnx", "precision": "int8", "device": "cpu", "threads": 2,
             "settings": "2 threads, graph all", "session": {"engine": "onnxruntime", "device": "cpu", "threads": 2},
             "cpu": {"name": "some CPU", "avx512f": True}, "speedup_vs_onnxruntime_default": 1.5,
             "speedup_vs_openvino_default": None, "speedup_vs_pytorch_native": 2.0, "batch_size": 1, "p50_ms": 0.75, "speedup_vs_eager": 3.0,
             "speedup_vs_eager_spread": 0.05, "accuracy_change_points": -0.25, "accuracy_interval_points": [-1.0, 0.5]}


def test_a_recommendation_is_typed_and_written_back_as_it_was_read(tiny_bundle, tmp_path):
    data = {**json.loads((tiny_bundle / "manifest.json").read_text()), "recommended": OPTIMIZED}
    manifest = Manifest.from_dict(json.loads(json.dumps(data)))
    rec = manifest.recommended
    assert isinstance(rec, Recommendation) and rec.engine == "onnxruntime" and rec.onnx_file
    assert rec.accuracy_interval_points == (-1.0, 0.5) and rec.servable_on("cpu") and not rec.servable_on("cuda")
    manifest.write(tmp_path / "m.json")
    written = json.loads((tmp_path / "m.json").read_text())
    assert written == data and list(written["recommended"]) == list(OPTIMIZED)  # optimize's keys, in its order
    assert Recommendation(runtime="openvino-bf16", artifact="model.onnx", precision="fp32").engine == "openvino"
    assert Recommendation(runtime="torchscript", artifact="model.ts", precision="fp32").engine == "torch"


def test_an_older_optimizes_recommendation_still_loads_and_is_not_served_as_recorded(tiny_bundle):
    """Before `device` and `session` were written (benchmarks/results/optimize-resnet18-xeon-amx-2cpu.json has
    that shape), serving opened model.onnx with default settings: it still does, and the figures are kept."""
    old = {"runtime": "ort-cpu", "artifact": "model.int8.onnx", "precision": "int8", "settings": "2 threads",
           "p50_ms": 1.25, "speedup_vs_eager": 2.5}
    data = {**json.loads((tiny_bundle / "manifest.json").read_text()), "recommended": old}
    rec = Manifest.from_dict(data).recommended
    assert (rec.device, rec.session, rec.p50_ms) == ("cpu", None, 1.25) and not rec.servable_on("cpu")


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(p50_ms="0.75"), "'recommended': 'p50_ms' must be int or float or null, got str"),
    (lambda r: r.update(threads=True), "'recommended': 'threads' must be int or null, got bool"),
    (lambda r: r.update(session=["onnxruntime"]), "'recommended': 'session' must be dict or null, got list"),
    (lambda r: r.update(accuracy_interval_points=[1]), "'accuracy_interval_points' must be a list of two numbers"),
    (lambda r: r.update(artifcat="model.onnx"), "'recommended': unknown key 'artifcat'"),
    (lambda r: r.pop("precision"), "'recommended': missing key 'precision'"),
    (lambda r: r.update(artifact="../model.onnx"), "is not a plain file name"),
])
def test_a_malformed_recommendation_is_one_clear_error(tiny_bundle, change, message):
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    data["recommended"] = dict(OPTIMIZED)
    change(data["recommended"])
    with pytest.raises(RtkError, match=re.escape(message)) as caught:
        Manifest.from_dict(data)
    assert "\n" not in str(caught.value)


def test_truncated_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"arch": "resnet18", "clas')
    with pytest.raises(RtkError, match="is not valid JSON"):
        Manifest.read(tmp_path / "manifest.json")
