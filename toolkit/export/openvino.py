"""OpenVINO IR writers: OpenVINO's conversion of model.onnx (fp32), and NNCF's int8 quantisation of it,
plain or with accuracy control. Needs openvino; int8 also needs nncf (extra `openvino`). No torch.
The files' names and how they are read: `toolkit.core.openvino_ir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.openvino_ir import RT_KEY
from toolkit.errors import RtkError


def nncf_problem() -> str | None:
    """Why NNCF int8 cannot be built here; None when it can."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"NNCF int8 needs openvino and nncf ({exc.name} is not installed): pip install 'rtk[openvino]'"
    return None


def _save(model, xml: Path, meta: dict[str, str]) -> None:
    import openvino as ov

    for key, value in meta.items():
        model.set_rt_info(value, [RT_KEY, key])
    ov.save_model(model, str(xml), compress_to_fp16=False)  # fp32 weights: the IR must match model.onnx


def write_fp32(onnx_path: Path, xml: Path, meta: dict[str, str]) -> None:
    """OpenVINO's own conversion of model.onnx, saved as IR."""
    import openvino as ov

    _save(ov.Core().read_model(str(onnx_path)), xml, meta)


@dataclass(frozen=True)
class AccuracyControl:
    """Labelled held-out crops and the top-1 drop (points) NNCF's accuracy control may not exceed on them."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int (N,)
    max_drop_points: float


def int8_layers(model) -> tuple[int, int]:
    """(layers with int8 weights, convolution and matmul layers) of an OpenVINO model: NNCF stores each
    quantised layer's weights as one int8 constant, and leaves the weights of a layer it keeps fp32 alone."""
    import openvino as ov

    ops = model.get_ops()
    int8 = sum(op.get_type_name() == "Constant" and op.get_element_type() in (ov.Type.i8, ov.Type.u8) for op in ops)
    return int8, sum(op.get_type_name() in ("Convolution", "MatMul") for op in ops)


def write_nncf_int8(onnx_path: Path, xml: Path, crops: np.ndarray, meta: dict[str, str],
               control: AccuracyControl | None = None) -> dict[str, Any]:
    """NNCF post-training quantisation (its CPU default: symmetric int8 weights and activations) calibrated on
    `crops`. With `control`, `nncf.quantize_with_accuracy_control` instead: it measures top-1 on the held-out
    images and returns layers to fp32, the most harmful first, until the drop is within the bound.
    Returns what was done: images used, int8 layers out of all, and the accuracy control's own figures."""
    problem = nncf_problem()
    if problem:
        raise RtkError(problem)
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    dataset = nncf.Dataset([crops[i : i + 1] for i in range(len(crops))])
    info: dict[str, Any] = {"calibration_images": len(crops)}
    if control is None:
        quantized = nncf.quantize(model, dataset, subset_size=len(crops))
    else:
        if len(control.images) != len(control.labels) or not len(control.images):
            raise RtkError("accuracy control needs held-out images with one label each")
        items = [(control.images[i : i + 1], int(control.labels[i])) for i in range(len(control.images))]
        quantized = nncf.quantize_with_accuracy_control(
            model, dataset, nncf.Dataset(items, lambda item: item[0]), _top1,
            max_drop=control.max_drop_points / 100, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(crops))
        core = ov.Core()
        info["accuracy_control"] = {
            "holdout_images": len(items), "max_drop_points": control.max_drop_points,
            "fp32_top1": _top1(core.compile_model(model, "CPU"), items)[0],
            "int8_top1": _top1(core.compile_model(quantized, "CPU"), items)[0]}
    info["int8_layers"], info["layers"] = int8_layers(quantized)
    _save(quantized, xml, meta)
    return info


def _top1(compiled_model, items) -> tuple[float, list[float]]:
    """NNCF's validation function: top-1 accuracy over (image, label) items, with each item's hit (1.0 or 0.0)
    so NNCF can rank layers without calling it once per item."""
    output = compiled_model.outputs[0]
    hits = [float(np.argmax(compiled_model(image)[output]) == label) for image, label in items]
    return (sum(hits) / len(hits) if hits else 0.0), hits
