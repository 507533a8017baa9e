"""OpenVINO IR artifacts: the fp32 model converted from model.onnx, and NNCF's int8 quantisation of it.

An IR is two files, `NAME.xml` (the graph) and `NAME.bin` (the weights); the manifest entry is the .xml's,
with the .bin's hash and size under `weights`. The rtk metadata (classes, preprocessing, ...) travels in
the model's runtime info under `rtk`, so the file describes itself as the ONNX files do. Needs openvino;
int8 also needs nncf (extra `openvino`). No torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import RtkError
from toolkit.fileio import sha256_file

IR_FP32 = "model.openvino.xml"
IR_INT8 = "model.openvino-int8.xml"
RT_KEY = "rtk"


def weights_of(xml: Path) -> Path:
    return xml.with_suffix(".bin")


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


def write_int8(onnx_path: Path, xml: Path, crops: np.ndarray, meta: dict[str, str]) -> int:
    """NNCF post-training quantisation (its default: symmetric int8 weights, mixed activations) calibrated on
    `crops`; returns how many images it used."""
    problem = nncf_problem()
    if problem:
        raise RtkError(problem)
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    dataset = nncf.Dataset([crops[i : i + 1] for i in range(len(crops))])
    quantized = nncf.quantize(model, dataset, subset_size=len(crops))
    _save(quantized, xml, meta)
    return len(crops)


def metadata(xml: Path) -> dict[str, str]:
    """The rtk metadata stored in an IR's runtime info."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    info = model.get_rt_info()
    if RT_KEY not in info:
        return {}
    section = info[RT_KEY]
    keys = section.keys() if isinstance(section, dict) else section.astype(dict).keys()
    return {key: model.get_rt_info([RT_KEY, key]).astype(str) for key in keys}


def entry_extra(xml: Path) -> dict[str, Any]:
    """The manifest fields of an IR beside its .xml's hash: the weights file's name, hash and size."""
    weights = weights_of(xml)
    return {"weights": {"file": weights.name, "sha256": sha256_file(weights), "bytes": weights.stat().st_size}}


def classes(xml: Path) -> list[str] | None:
    raw = metadata(xml).get("classes")
    return json.loads(raw) if raw else None
