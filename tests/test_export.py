import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import BLOCK_TORCH, error_line, rtk
from toolkit.core.preprocess import PreprocessSpec
from toolkit.errors import RtkError
from toolkit.export.graph import ImageClassifier
from toolkit.export.quantize import QuantRecipe
from toolkit.training.checkpoint import load_checkpoint, model_from_checkpoint


def eager_logits(checkpoint, images: np.ndarray) -> np.ndarray:
    ckpt = load_checkpoint(checkpoint)
    module = ImageClassifier(model_from_checkpoint(ckpt), PreprocessSpec.from_dict(ckpt["preprocess"])).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(images)).numpy()


def random_batch(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_bundle_contents_and_manifest(tiny_bundle, tiny_run):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.ts", "model.pt2",
                                      "model.any-size.onnx"}
    assert (tiny_bundle / "labels.txt").read_text().split() == ["circle", "square", "stripes"]
    onnx_entry = manifest["files"]["model.onnx"]
    assert onnx_entry["inputs"] == [{"name": "image", "dtype": "uint8", "shape": ["batch", 32, 32, 3]}]
    assert onnx_entry["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}]
    assert onnx_entry["opset"] == 18 and onnx_entry["exporter"] == "dynamo"
    for entry in manifest["files"].values():
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0 and entry["seconds"] >= 0
    assert manifest["source"]["sha256"] and manifest["versions"]["torch"]


def test_metadata_inside_every_file(tiny_bundle, tiny_run):
    digest = load_checkpoint(tiny_run / "checkpoint.pt") and json.loads((tiny_bundle / "manifest.json").read_text())["source"]["sha256"]
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        meta = {p.key: p.value for p in onnx.load(str(tiny_bundle / name), load_external_data=False).metadata_props}
        assert json.loads(meta["classes"]) == ["circle", "square", "stripes"]
        spec = json.loads(meta["preprocess"])
        assert spec["crop_size"] == 32 and spec["layout"] == "NHWC" and spec["dtype"] == "uint8"
        assert meta["arch"] == "resnet18" and meta["source_sha256"] == digest and meta["torch_version"]
    extra = {"classes.txt": "", "preprocess.txt": "", "arch.txt": ""}
    torch.jit.load(str(tiny_bundle / "model.ts"), _extra_files=extra)
    assert json.loads(extra["classes.txt"]) == ["circle", "square", "stripes"]
    extra = {"classes.txt": "", "arch.txt": ""}
    torch.export.load(str(tiny_bundle / "model.pt2"), extra_files=extra)
    assert extra["arch.txt"] == "resnet18"


def test_onnx_matches_eager_in_a_process_without_torch(tiny_bundle, tiny_run, tmp_path):
    images = random_batch(5)
    np.save(tmp_path / "x.npy", images)
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        try:
            import torch
            raise SystemExit('torch imported')
        except ImportError:
            pass
        s = ort.InferenceSession({str(tiny_bundle / 'model.onnx')!r}, providers=['CPUExecutionProvider'])
        np.save({str(tmp_path / 'y.npy')!r}, s.run(None, {{'image': np.load({str(tmp_path / 'x.npy')!r})}})[0])
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), eager_logits(tiny_run / "checkpoint.pt", images), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["model.ts", "model.pt2"])
def test_torch_formats_match_eager_with_dynamic_batch(tiny_bundle, tiny_run, name):
    from toolkit.export.loaders import load_pt2, load_torchscript

    module = load_torchscript(tiny_bundle / name) if name.endswith(".ts") else load_pt2(tiny_bundle / name)
    for n in (1, 3, 16):
        images = random_batch(n, seed=n)
        with torch.inference_mode():
            got = module(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(got, eager_logits(tiny_run / "checkpoint.pt", images), atol=1e-4, rtol=1e-3)


def test_onnx_batch_dimension_is_dynamic(tiny_bundle):
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(tiny_bundle / name), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == "tensor(uint8)"
        assert session.get_outputs()[0].type == "tensor(float)"
        for n in (1, 7):
            assert session.run(None, {"image": random_batch(n)})[0].shape == (n, 3)


def test_int8_is_much_smaller(tiny_bundle):
    fp32 = (tiny_bundle / "model.onnx").stat().st_size
    assert (tiny_bundle / "model.int8.onnx").stat().st_size < 0.3 * fp32
    assert (tiny_bundle / "model.fp16.onnx").stat().st_size < 0.55 * fp32
    int8 = onnx.load(str(tiny_bundle / "model.int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format


def test_softmax_and_legacy_exporter(tiny_run, tmp_path):
    out = tmp_path / "b"
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", out, "--format", "onnx", "--exporter", "legacy",
                 "--opset", "17", "--softmax", "--no-verify")
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    logits, probs = session.run(None, {"image": random_batch(4)})
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(logits, eager_logits(tiny_run / "checkpoint.pt", random_batch(4)), atol=1e-4, rtol=1e-3)
    assert json.loads((out / "manifest.json").read_text())["files"]["model.onnx"]["exporter"] == "legacy"


def test_export_verifies_by_default(tiny_run, tiny_data, tmp_path):
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", tmp_path / "b", "--format", "onnx",
                 "--calibration-data", tiny_data / "val")
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    verification = json.loads((tmp_path / "b" / "manifest.json").read_text())["verification"]
    assert verification["passed"] and verification["images"] == 18 + 16  # calibration images + random ones


def test_non_empty_output_needs_force(tiny_run, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", out, "--format", "onnx", "--no-verify")
    assert result.exit_code == 2 and "--force" in error_line(result)
    assert (out / "keep.txt").exists()
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", out, "--format", "onnx", "--no-verify", "--force")
    assert result.exit_code == 0 and not (out / "keep.txt").exists() and (out / "model.onnx").exists()


def test_plain_state_dict_needs_arch_and_num_classes(tiny_run, tmp_path):
    sd = tmp_path / "sd.pt"
    torch.save(load_checkpoint(tiny_run / "checkpoint.pt")["state_dict"], sd)
    result = rtk("export", sd, "--output", tmp_path / "b1", "--no-verify")
    assert result.exit_code == 2 and "--arch and --num-classes" in error_line(result)
    result = rtk("export", sd, "--output", tmp_path / "b2", "--arch", "resnet18", "--num-classes", "3",
                 "--image-size", "32", "--format", "onnx", "--no-verify")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case, args, message", [
    ("missing", ["{tmp}/nope.pt"], "checkpoint not found"),
    ("corrupt", ["{tmp}/corrupt.pt"], "cannot read"),
    ("arch", ["{ckpt}", "--arch", "resnet50"], "holds a resnet18 checkpoint, but --arch is resnet50"),
    ("opset", ["{ckpt}", "--opset", "13"], "--opset 13 is outside"),
    ("int8", ["{ckpt}", "--precision", "int8"], "needs --calibration-data"),
    ("empty", ["{ckpt}", "--precision", "int8", "--calibration-data", "{tmp}/empty"], "holds no images"),
    ("fp16 only ts", ["{ckpt}", "--precision", "fp16", "--format", "torchscript"], "add --format onnx"),
])
def test_bad_input_is_one_line_and_leaves_no_bundle(tiny_run, tmp_path, case, args, message):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    args = [a.format(tmp=tmp_path, ckpt=tiny_run / "checkpoint.pt") for a in args]
    out = tmp_path / "bundle"
    result = rtk("export", *args, "--output", out, "--no-verify")
    assert result.exit_code == 2, result.output
    assert message in error_line(result)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no staging folder left


@pytest.mark.parametrize("args", [["--format", "tflite"], ["--precision", "int4"]])
def test_unknown_format_or_precision(tiny_run, tmp_path, args):
    result = rtk("export", tiny_run / "checkpoint.pt", "--output", tmp_path / "b", *args)
    assert result.exit_code == 2 and "Invalid value" in result.output


def test_export_straight_from_torchvision_weights(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "th" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    result = rtk("export", "--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--output", tmp_path / "b",
                 "--format", "onnx", "--no-verify")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert len(manifest["classes"]) == 1000 and manifest["classes"][0] == "tench"
    assert manifest["preprocess"]["resize_size"] == 256 and manifest["preprocess"]["crop_size"] == 224
    assert manifest["source"] == {"kind": "torchvision", "arch": "resnet18", "path": None, "sha256": None,
                                  "weights": "ResNet18_Weights.IMAGENET1K_V1", "num_classes": 1000}
    result = rtk("verify", tmp_path / "b", "--random", "2", "--runtime", "ort-cpu")
    assert result.exit_code == 0, result.output


def test_torchscript_convolutions_are_traced_without_tf32(tiny_bundle):
    """Tracing bakes cuDNN's allow_tf32 into each convolution; on a GPU a TF32 file misses fp32 parity."""
    import torch

    module = torch.jit.load(str(tiny_bundle / "model.ts"))
    convs = [n for n in module.inlined_graph.nodes() if n.kind() == "aten::_convolution"]
    assert len(convs) == 20  # resnet18: 17 convolutions in the blocks + 3 downsample
    assert all(list(n.inputs())[-1].toIValue() is False for n in convs)


def test_int8_setting_follows_the_instruction_set(tiny_bundle):
    """u8 x s8 where int8 dot products are one instruction; 7-bit weights where onnxruntime's kernels saturate."""
    from toolkit.core.hardware import CpuInfo
    from toolkit.export.quantize import QuantRecipe, int8_recipe_for

    avx2 = CpuInfo("EPYC", 2, 2, frozenset({"avx2", "fma"}))
    avx512 = CpuInfo("Xeon", 2, 2, frozenset({"avx2", "avx512f", "avx512bw"}))
    vnni = CpuInfo("Zen4", 2, 2, frozenset({"avx2", "avx512f", "avx512_vnni"}))
    amx = CpuInfo("SPR", 2, 2, frozenset({"avx512f", "amx_tile", "amx_int8"}))
    assert int8_recipe_for(avx2) == int8_recipe_for(avx512) == QuantRecipe(reduce_range=True)
    assert int8_recipe_for(vnni) == int8_recipe_for(amx) == QuantRecipe()
    assert QuantRecipe(reduce_range=True).file_name == "model.int8-minmax-u8-reduce-range.onnx"
    entry = json.loads((tiny_bundle / "manifest.json").read_text())["files"]["model.int8.onnx"]
    assert entry["quantization"]["reduce_range"] is not entry["quantized_for"]["vnni"]


@pytest.mark.parametrize("settings, message", [
    ({"format": "qoperator", "weights": "u8"}, "per-channel convolution weights as s8"),
    ({"activations": "s8", "weights": "u8"}, "s8 activations with u8 weights"),
    ({"format": "qop"}, "format must be one of qdq, qoperator"),
    ({"calibration": "mse"}, "calibration must be one of"),
])
def test_quant_recipes_onnxruntime_would_not_honour_are_refused(settings, message):
    with pytest.raises(RtkError, match=message):
        QuantRecipe(**settings)
