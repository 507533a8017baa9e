"""`rtk triton`: a model repository whose config Triton's own ModelConfig parses and the ONNX file agrees with."""

import json

import pytest

from tests.conftest import copy_bundle, error_line, rtk
from toolkit.core.manifest import Recommendation

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] (dev extra)")
from google.protobuf import text_format  # noqa: E402

pytestmark = pytest.mark.serving


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("device,kind", [("cuda", "KIND_GPU"), ("cpu", "KIND_CPU")])
def test_repository_layout_and_config(tiny_bundle, tmp_path, device, kind):
    result = rtk("triton", tiny_bundle, "--output", tmp_path / "repo", "--name", "shapes", "--device", device,
                 "--max-batch-size", "16")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "repo" / "shapes"
    assert (folder / "1" / "model.onnx").read_bytes() == (tiny_bundle / "model.onnx").read_bytes()
    assert (folder / "labels.txt").read_text().split() == ["circle", "square", "stripes"]
    config = parse(folder / "config.pbtxt")
    assert config.name == "shapes" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("image", "TYPE_UINT8", [32, 32, 3])]
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims), o.label_filename) for o in config.output] == [
        ("logits", "TYPE_FP32", [3], "labels.txt")]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == kind


def test_tensorrt_and_openvino_accelerators(tiny_bundle, tmp_path):
    result = rtk("triton", tiny_bundle, "--output", tmp_path / "r", "--tensorrt")
    assert result.exit_code == 0, result.output
    [accel] = parse(tmp_path / "r" / "bundle" / "config.pbtxt").optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx", "model.int8.onnx"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended"] = Recommendation(runtime="openvino", artifact="model.int8.onnx", precision="int8", threads=1,
                                             session={"engine": "openvino", "device": "cpu", "threads": 1}).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = rtk("triton", bundle, "--output", tmp_path / "r2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = parse(tmp_path / "r2" / "b" / "config.pbtxt")
    assert [a.name for a in config.optimization.execution_accelerators.cpu_execution_accelerator] == ["openvino"]
    assert (tmp_path / "r2" / "b" / "1" / "model.onnx").read_bytes() == (bundle / "model.int8.onnx").read_bytes()


def test_bad_input(tiny_bundle, tmp_path):
    assert "needs --device cuda" in error_line(rtk("triton", tiny_bundle, "-o", tmp_path / "r", "--device", "cpu", "--tensorrt"))
    assert rtk("triton", tiny_bundle, "-o", tmp_path / "r").exit_code == 0
    again = rtk("triton", tiny_bundle, "-o", tmp_path / "r")
    assert again.exit_code == 2 and "pass --force" in error_line(again)
    broken = copy_bundle(tiny_bundle, tmp_path / "b")
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes()[:1000])
    result = rtk("triton", broken, "-o", tmp_path / "r3")
    assert result.exit_code == 1 and "has 1000 bytes" in error_line(result)


def test_a_config_that_disagrees_with_the_onnx_file_is_refused():
    from toolkit.errors import RtkError
    from toolkit.serving.triton import TritonConfig, config_text, validate

    inputs, outputs = [("image", "TYPE_UINT8", [32, 32, 3])], [("logits", "TYPE_FP32", [3])]
    text = config_text("m", inputs, outputs, TritonConfig(output="x"), openvino=False)
    validate(text, inputs, outputs, 32)
    with pytest.raises(RtkError, match="do not match the ONNX file"):
        validate(text.replace("dims: [ 3 ]", "dims: [ 4 ]"), inputs, outputs, 32)
    with pytest.raises(RtkError, match="does not parse"):
        validate(text.replace("max_batch_size", "max_batch_sizes"), inputs, outputs, 32)
