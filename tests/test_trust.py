"""Hostile bundles (issue 23: 2, 14, 15, 16, 18): no code from a bundle runs, every file it names stays
inside it, what is served is hashed first, and corrupt metadata or self-test data is one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import copy_bundle, error_line, reseal, rtk
from toolkit.core.bundle import Bundle
from toolkit.core.manifest import Recommendation
from toolkit.errors import ArtifactBroken, RtkError


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, data: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(data))


# ---------------------------------------------------------------- 15: labels.txt, confined and exact


def test_labels_are_the_manifests_classes(tiny_bundle):
    assert Bundle.open(tiny_bundle).labels() == ["circle", "square", "stripes"]


@pytest.mark.parametrize("attack,message", [
    ("symlink", "is a symlink"),
    ("extra", "has 5000 labels, the manifest has 3 classes"),
    ("renamed", "label 2 is 'dog', the manifest's class 2 is 'square'"),
    ("huge", "more than a label file's"),
    ("binary", "is not UTF-8 text"),
    ("missing", "labels.txt is missing from"),
])
def test_a_hostile_label_file_is_one_line(tiny_bundle, tmp_path, attack, message):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    labels = bundle / "labels.txt"
    secret = tmp_path / "secret.txt"
    secret.write_text("circle\nsquare\nstripes\n")  # even a secret that looks right is not read through a link
    labels.unlink()
    if attack == "symlink":
        labels.symlink_to(secret)
    elif attack == "extra":
        labels.write_text("circle\nsquare\nstripes\n" + "x\n" * 4997)
    elif attack == "renamed":
        labels.write_text("circle\ndog\nstripes\n")
    elif attack == "huge":
        labels.write_text("circle\nsquare\nstripes\n" + " " * (2 << 20))
    elif attack == "binary":
        labels.write_bytes(b"circle\n\xff\xfe\nstripes\n")
    with pytest.raises(ArtifactBroken, match=message) as info:
        Bundle.open(bundle).labels()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- 2: no code from a bundle runs


class Payload:
    """Unpickling this opens (creates) the marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled(marker: Path) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def _rewrite_zip(path: Path, change) -> None:
    """Rewrite an archive member by member: `change(name, data)` returns the new bytes of a member."""
    import zipfile

    with zipfile.ZipFile(path) as old:
        members = [(i.filename, old.read(i)) for i in old.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as new:
        for name, data in members:
            new.writestr(name, change(name, data))


def _use_pickle_attack(name: str, data: bytes, marker: Path) -> bytes:
    """torch.export's own pickled-tensor path: fc.bias marked use_pickle, its payload a __reduce__."""
    if name.endswith("model_weights_config.json"):
        config = json.loads(data)
        entry = config["config"]["model.fc.bias"]
        entry["use_pickle"] = True
        _use_pickle_attack.target = entry["path_name"]  # type: ignore[attr-defined]
        return json.dumps(config).encode()
    return data


def _pt2_attack(pt2: Path, kind: str, marker: Path) -> None:
    if kind == "use_pickle":
        _rewrite_zip(pt2, lambda n, d: _use_pickle_attack(n, d, marker))
        target = f"model/data/weights/{_use_pickle_attack.target}"  # type: ignore[attr-defined]
        _rewrite_zip(pt2, lambda n, d: _pickled(marker) if n == target else d)
    elif kind == "sample_inputs":  # torch falls back to weights_only=False when weights-only refuses this
        _rewrite_zip(pt2, lambda n, d: _pickled(marker) if n.endswith("sample_inputs/model.pt") else d)
    elif kind == "sympy":  # every shape expression goes through sympy.sympify, i.e. eval
        def sympy(name: str, data: bytes) -> bytes:
            if not name.endswith("models/model.json"):
                return data
            text = data.decode()
            expr = next(iter(__import__("re").findall(r'"expr_str": "(Symbol\([^"]*\))"', text)))
            return text.replace(expr, f"(open({str(marker)!r}, 'w') and {expr})").encode()
        _rewrite_zip(pt2, sympy)
    elif kind == "aoti":
        _rewrite_zip(pt2, lambda n, d: d)
        import zipfile

        with zipfile.ZipFile(pt2, "a") as archive:
            archive.writestr("model/data/aotinductor/model/model.so", b"\x7fELF")


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output


@pytest.mark.parametrize("kind", ["use_pickle", "sample_inputs", "sympy", "aoti"])
def test_a_pt2_that_would_run_code_fails_verify_and_benchmark(tiny_bundle, tmp_path, kind):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.pt2",))
    marker = tmp_path / "payload-ran"
    _pt2_attack(bundle / "model.pt2", kind, marker)
    reseal(bundle, "model.pt2")  # the integrity check is passed: only the loader can stop it
    before = sorted(p.name for p in bundle.iterdir())

    result = rtk("verify", bundle, "--random", "2", "--runtime", "torch-export")
    assert result.exit_code == 1, result.output
    _no_traceback(result)
    fails = [ln for ln in result.output.splitlines() if ln.startswith("FAIL ")]
    assert len(fails) == 1 and fails[0].startswith("FAIL model.pt2 on torch-export: model.pt2"), result.output
    assert "model.pt2" in error_line(result)
    assert not marker.exists(), "the payload ran inside rtk verify"

    result = rtk("benchmark", bundle, "--runtime", "torch-export", "--batch-size", "1", "--warmup", "1",
                 "--iterations", "1", "--min-seconds", "0", "--rounds", "1")
    _no_traceback(result)
    assert [ln for ln in result.output.splitlines() if "model.pt2" in ln and "FAILED: model.pt2" in ln], result.output
    assert not marker.exists(), "the payload ran inside rtk benchmark"
    assert sorted(p.name for p in bundle.iterdir()) == before  # nothing deleted


def test_pickle_refused_overrides_torch_export_weights_only_false(tiny_bundle, tmp_path):
    """The second layer on its own: inside pickle_refused, torch.export.load's own weights_only=False
    load of a use_pickle tensor is weights-only (the archive scan is skipped here on purpose)."""
    import torch

    from toolkit.export.loaders import pickle_refused

    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes((tiny_bundle / "model.pt2").read_bytes())
    marker = tmp_path / "payload-ran"
    _pt2_attack(pt2, "use_pickle", marker)
    # torch's message varies (once, late in a full run: "pop from empty list" from the weights-only
    # unpickler); what counts is that the load fails and the payload did not run
    with pickle_refused(), pytest.raises(Exception, match="(?i)weights.only|pop from empty list"):
        torch.export.load(str(pt2))
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards


def test_the_real_pt2_still_loads_and_passes(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.pt2",))
    result = rtk("verify", bundle, "--random", "2", "--runtime", "torch-export")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- 14: every file the manifest names stays inside


def _outside_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A valid model outside the bundle, at ../x/evil.onnx from it (its hash would match the manifest's)."""
    evil = tmp_path / "x" / "evil.onnx"
    evil.parent.mkdir()
    evil.write_bytes((tiny_bundle / "model.onnx").read_bytes())
    return evil


class Watch:
    """Every path this process stats or opens whose name has `needle`: nothing outside may be touched."""

    def __init__(self, monkeypatch, needle: str) -> None:
        import builtins

        self.seen: list[str] = []
        real_stat, real_open, real_os_open = os.stat, builtins.open, os.open

        def stat(path, *a, **k):
            self._note(path, needle)
            return real_stat(path, *a, **k)

        def open_(path, *a, **k):
            self._note(path, needle)
            return real_open(path, *a, **k)

        def os_open(path, *a, **k):
            self._note(path, needle)
            return real_os_open(path, *a, **k)

        monkeypatch.setattr(os, "stat", stat)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "open", os_open)

    def _note(self, path, needle: str) -> None:
        if isinstance(path, (str, os.PathLike)) and needle in os.fspath(path):
            self.seen.append(os.fspath(path))


@pytest.mark.parametrize("name", ["/etc/passwd", "../x/evil.onnx", "../../x/evil.onnx", "sub/model.onnx", ".."])
def test_a_files_key_outside_the_bundle_is_refused_by_verify(tiny_bundle, tmp_path, monkeypatch, name):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    _outside_copy(tiny_bundle, tmp_path)
    data = _manifest(bundle)
    data["files"][name] = data["files"]["model.onnx"]
    _write_manifest(bundle, data)
    watch = Watch(monkeypatch, "passwd" if "passwd" in name else "evil")
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cpu")
    assert result.exit_code == 2, result.output
    assert "is not a plain file name inside the bundle" in error_line(result)
    _no_traceback(result)
    assert watch.seen == []  # neither stat'd nor opened
    assert _manifest(bundle) == data  # nothing rewritten


@pytest.mark.parametrize("artifact", ["ABSOLUTE", "../../x/evil.onnx", "../x/evil.onnx"])
def test_a_recommended_artifact_outside_the_bundle_is_not_served(tiny_bundle, tmp_path, monkeypatch, artifact):
    from toolkit.serving.classifier import Classifier

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    evil = _outside_copy(tiny_bundle, tmp_path)
    data = _manifest(bundle)
    data["recommended"] = {"artifact": str(evil) if artifact == "ABSOLUTE" else artifact, "runtime": "ort-cpu",
                           "device": "cpu", "session": {"device": "cpu"}, "precision": "fp32"}
    _write_manifest(bundle, data)
    watch = Watch(monkeypatch, "evil")
    with pytest.raises(RtkError, match="is not a plain file name inside the bundle"):
        Classifier.load(bundle)
    result = rtk("predict", bundle, tmp_path / "none.png")
    assert result.exit_code == 2 and "recommended" in error_line(result), result.output
    _no_traceback(result)
    assert watch.seen == []


def test_a_symlinked_model_file_is_refused(tiny_bundle, tmp_path):
    from toolkit.serving.classifier import Classifier

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    evil = _outside_copy(tiny_bundle, tmp_path)
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").symlink_to(evil)  # same bytes, same sha256: only the link gives it away
    with pytest.raises(ArtifactBroken, match="model.onnx in .* is a symlink"):
        Classifier.load(bundle)
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cpu")
    assert result.exit_code == 1 and "FAIL model.onnx on ort-cpu: model.onnx in" in result.output, result.output
    assert evil.exists()


@pytest.mark.parametrize("change", ["flip", "unlisted"])
def test_the_served_file_is_hashed_before_serving(tiny_bundle, tmp_path, change):
    from toolkit.serving.classifier import Classifier

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    if change == "flip":  # same size, one byte altered: only the sha256 tells
        raw = bytearray((bundle / "model.onnx").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (bundle / "model.onnx").write_bytes(bytes(raw))
        message = "sha256 differs from the manifest's"
    else:
        data = _manifest(bundle)
        data["files"].pop("model.onnx")
        _write_manifest(bundle, data)
        message = "has no model.onnx in its manifest.json"
    with pytest.raises(RtkError, match=message):
        Classifier.load(bundle)
    result = rtk("predict", bundle, tmp_path / "none.png")
    assert result.exit_code in (1, 2) and message in error_line(result), result.output
    _no_traceback(result)
    Classifier.load(tiny_bundle / "model.onnx")  # a plain ONNX file is not a bundle: served as given


def test_a_weights_file_outside_the_bundle_is_refused():
    from toolkit.core.manifest import FileEntry

    entry = {"format": "openvino", "precision": "fp32", "sha256": "0" * 64, "bytes": 1,
             "weights": {"file": "../secret.bin", "sha256": "0" * 64, "bytes": 1}}
    with pytest.raises(RtkError, match="'weights' 'file': '../secret.bin' is not a plain file name"):
        FileEntry.from_dict(entry, "manifest.json files['model.openvino.xml']")


# ---------------------------------------------------------------- 16: corrupt self-test data and metadata


def _npz_bomb(path: Path, nbytes: int) -> None:
    """A selftest.npz whose `images` member decompresses to `nbytes` of zeros (deflated: about 1 MB)."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("images.npy", "w", force_zip64=True) as fh:
            npy.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (nbytes // 3072, 32, 32, 3)})
            block = bytes(1 << 22)
            for _ in range(nbytes // len(block)):
                fh.write(block)
        with archive.open("model.onnx.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("kind,message", [
    ("garbage", "is not a readable self-test file"),
    ("object", "holds Python objects"),
    ("wrong_shape", "images are uint8 (2, 8, 8, 3), the model takes uint8 [N, 32, 32, 3]"),
    ("bomb", "uncompressed, above the self-test's"),
])
def test_a_corrupt_selftest_is_one_line(tiny_bundle, tmp_path, kind, message):
    import numpy as np

    from toolkit.errors import CheckFailed
    from toolkit.serving.classifier import Classifier

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    npz = bundle / "selftest.npz"
    if kind == "garbage":
        npz.write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "object":
        np.savez(npz, images=np.array([{"a": 1}], dtype=object), **{"model.onnx": np.zeros((1, 3), np.float32)})
    elif kind == "wrong_shape":
        np.savez(npz, images=np.zeros((2, 8, 8, 3), np.uint8), **{"model.onnx": np.zeros((2, 3), np.float32)})
    else:
        _npz_bomb(npz, 1_100 * (1 << 20))
        assert npz.stat().st_size < 4 << 20
    with pytest.raises(CheckFailed, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Classifier.load(bundle, self_test=True)
    result = rtk("predict", bundle, tmp_path / "none.png", "--self-test")
    assert result.exit_code == 1 and message.split(" [")[0].split(" (")[0] in error_line(result), result.output
    _no_traceback(result)


def test_an_npz_bomb_is_refused_before_it_is_inflated(tiny_bundle, tmp_path):
    """Peak RSS of a child process loading the 1.1 GB bomb stays within 300 MB of its baseline."""
    import subprocess
    import sys

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    _npz_bomb(bundle / "selftest.npz", 1_100 * (1 << 20))
    code = ("import resource, sys\nfrom toolkit.serving.classifier import Classifier\nclf = Classifier.load(sys.argv[1])\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    clf.self_test()\nexcept Exception as exc:\n    print(type(exc).__name__)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    assert out[0] == "CheckFailed" and int(out[1]) < 300, out


def _onnx_with_metadata(bundle: Path, **props: str) -> None:
    import onnx

    model = onnx.load(str(bundle / "model.onnx"))
    for p in model.metadata_props:
        if p.key in props:
            p.value = props[p.key]
    onnx.save(model, str(bundle / "model.onnx"))
    reseal(bundle, "model.onnx")


@pytest.mark.parametrize("props,message", [
    ({"classes": "circle,square,stripes"}, "its metadata 'classes' is not JSON"),
    ({"classes": '{"a": 1}'}, "must be a non-empty JSON list of names"),
    ({"preprocess": "[1,2]"}, "must be an object with resize_size and crop_size, got list"),
    ({"preprocess": '{"resize_size": "36", "crop_size": "32"}'}, "'resize_size' must be int, got str"),
    ({"preprocess": '{"resize_size": 48, "crop_size": 40}'}, "its input is .* but its metadata crops 40 x 40 x 3"),
])
def test_corrupt_model_metadata_is_refused_at_load(tiny_bundle, tmp_path, props, message):
    from toolkit.serving.classifier import Classifier

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    _onnx_with_metadata(bundle, **props)
    with pytest.raises(RtkError, match=message) as info:
        Classifier.load(bundle)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("preprocess,message", [
    ("[1,2]", "'preprocess' must be dict, got str"),
    ([1, 2], "'preprocess' must be dict, got list"),
    ({"resize_size": "256", "crop_size": 224}, "'resize_size' must be int, got str"),
    ({"resize_size": 256, "crop_size": 224, "mean": "abc"}, "'mean' must be list, got str"),
    ({"resize_size": 10**9, "crop_size": 224}, "outside 1..8192"),
])
def test_a_wrong_preprocess_in_the_manifest_is_refused(tiny_bundle, preprocess, message):
    from toolkit.core.manifest import Manifest

    data = _manifest(tiny_bundle)
    data["preprocess"] = preprocess
    with pytest.raises(RtkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Manifest.from_dict(data)


# ---------------------------------------------------------------- 18: verify's write-back keeps another writer's keys


def test_verify_write_back_keeps_a_recommendation_added_meanwhile(tiny_bundle, tmp_path, monkeypatch):
    import toolkit.evaluation.verify as verify

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    recommended = Recommendation(artifact="model.onnx", runtime="ort-cpu", device="cpu", precision="fp32",
                                 session={"device": "cpu", "engine": "onnxruntime", "graph_optimization": "all"}).to_dict()
    real = verify.load_inputs

    def optimize_meanwhile(*args, **kwargs):  # runs after verify opened the bundle, before it writes back
        data = _manifest(bundle)
        data["recommended"] = recommended
        _write_manifest(bundle, data)
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "load_inputs", optimize_meanwhile)
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cpu")
    assert result.exit_code == 0, result.output
    data = _manifest(bundle)
    assert data["recommended"] == recommended and data["verification"]["passed"] is True


def test_manifest_writes_wait_for_the_bundle_lock(tiny_bundle, tmp_path):
    """A writer holding the bundle's lock in another process makes update() wait, then merge."""
    import subprocess
    import sys
    import time

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    opened = Bundle.open(bundle)
    code = ("import json, sys, time\nfrom pathlib import Path\nfrom toolkit.core.fileio import folder_lock\n"
            "b = Path(sys.argv[1])\nwith folder_lock(b, 'test'):\n    print('locked', flush=True)\n"
            "    time.sleep(1.0)\n    m = json.loads((b / 'manifest.json').read_text())\n"
            "    m['optimization'] = {'by': 'other'}\n    (b / 'manifest.json').write_text(json.dumps(m))\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(bundle)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        start = time.monotonic()
        opened.update(verification={"passed": True})
        waited = time.monotonic() - start
    finally:
        child.wait(timeout=30)
    data = _manifest(bundle)
    assert waited > 0.5 and data["optimization"] == {"by": "other"} and data["verification"] == {"passed": True}
