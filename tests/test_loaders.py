"""No code from a bundle or a checkpoint runs, loader by loader: TorchScript, ONNX, OpenVINO IR and
checkpoints each given a file built to run code (or to make the runtime load code), with its hash
recorded so that only the loader can stop it. Each must be a FAIL (or one error line), never a skip,
and the payload must not have run. (.pt2 archives and selftest.npz: tests/test_trust.py.)"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from tests.conftest import copy_bundle, error_line, reseal, rtk
from tests.test_trust import Payload, _no_traceback, _rewrite_zip


def _one_fail(result, artifact: str, runtime: str) -> None:
    assert result.exit_code == 1, result.output
    _no_traceback(result)
    fails = [ln for ln in result.output.splitlines() if ln.startswith("FAIL ")]
    assert len(fails) == 1 and fails[0].startswith(f"FAIL {artifact} on {runtime}: "), result.output


def test_a_torchscript_archive_with_a_pickled_global_fails_and_runs_nothing(tiny_bundle, tmp_path):
    """TorchScript's data.pkl replaced by a standard pickle whose __reduce__ calls open(): TorchScript's
    own unpickler must refuse the global instead of calling it."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.ts",))
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker), protocol=2)
    replaced = []

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("/data.pkl"):
            replaced.append(name)
            return payload
        return data

    _rewrite_zip(bundle / "model.ts", change)
    assert replaced, "the TorchScript archive has no data.pkl: the attack did not apply"
    reseal(bundle, "model.ts")
    result = rtk("verify", bundle, "--random", "2", "--runtime", "torchscript")
    _one_fail(result, "model.ts", "torchscript")
    assert not marker.exists(), "the payload ran inside rtk verify"


def test_an_onnx_file_asking_for_a_custom_operator_fails(tiny_bundle, tmp_path):
    """A node in an unknown domain is the hook for a custom-op library: onnxruntime must refuse the file
    (rtk never registers a library), and verify must count it a failure, not a skip."""
    import onnx

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    model = onnx.load(str(bundle / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Relu")
    node.op_type, node.domain = "LoadLibraryAndRun", "com.attacker"
    model.opset_import.append(onnx.helper.make_opsetid("com.attacker", 1))
    onnx.save(model, str(bundle / "model.onnx"))
    reseal(bundle, "model.onnx")
    result = rtk("verify", bundle, "--random", "2", "--runtime", "ort-cpu")
    _one_fail(result, "model.onnx", "ort-cpu")


def test_an_openvino_ir_with_an_unknown_layer_fails(tiny_bundle, tmp_path):
    """An IR naming an op no OpenVINO opset has (an extension's hook): a FAIL, not a load of anything."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from toolkit.core.openvino_ir import IR_FP32, entry_extra
    from toolkit.export.openvino import write_fp32

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    xml = bundle / IR_FP32
    write_fp32(bundle / "model.onnx", xml, {"classes": json.dumps(json.loads((bundle / "manifest.json").read_text())["classes"])})
    text = xml.read_text()
    assert 'type="ReLU"' in text
    xml.write_text(text.replace('type="ReLU" version="opset1"', 'type="EvilExtensionOp" version="attacker1"', 1))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][IR_FP32] = {"format": "openvino", "precision": "fp32", "sha256": "", "bytes": 0, **entry_extra(xml)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    reseal(bundle, IR_FP32)
    result = rtk("verify", bundle, "--random", "2", "--runtime", "openvino")
    _one_fail(result, IR_FP32, "openvino")


def test_a_checkpoint_with_a_reduce_payload_is_refused(tiny_run, tmp_path):
    """torch.load(weights_only=True) for every checkpoint: a pickled __reduce__ is one error line."""
    import torch

    marker = tmp_path / "payload-ran"
    ckpt = torch.load(tiny_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    ckpt["evil"] = Payload(marker)
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil)
    result = rtk("export", evil, "--output", tmp_path / "bundle", "--format", "onnx", "--no-verify")
    assert result.exit_code == 2, result.output
    _no_traceback(result)
    assert str(evil) in error_line(result)
    assert not marker.exists(), "the payload ran inside rtk export"
    assert not (tmp_path / "bundle").exists()


def test_a_verify_checkpoint_with_a_reduce_payload_is_refused(tiny_bundle, tmp_path):
    """The same through `rtk verify --checkpoint` (the reference model comes from the user's file)."""
    import torch

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, evil)
    result = rtk("verify", tiny_bundle, "--random", "2", "--checkpoint", evil, "--runtime", "ort-cpu")
    assert result.exit_code == 2, result.output
    _no_traceback(result)
    error_line(result)
    assert not marker.exists(), "the payload ran inside rtk verify"


def test_payload_is_real(tmp_path):
    """The payload used above does run when unpickled without protection: the tests above can fail."""
    marker = tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert Path(marker).exists()
