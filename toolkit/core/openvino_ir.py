"""OpenVINO IR files as a bundle holds them: their names, the weights file beside each .xml, and the rtk
metadata an IR carries in its runtime info. Reading needs openvino only (no torch, no NNCF); the writers
(conversion from model.onnx, NNCF int8) are `toolkit.export.openvino`.

An IR is two files, `NAME.xml` (the graph) and `NAME.bin` (the weights); the manifest entry is the .xml's,
with the .bin's hash and size under `weights`. The rtk metadata (classes, preprocessing, ...) travels in
the model's runtime info under `rtk`, so the file describes itself as the ONNX files do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.core.fileio import sha256_file

IR_FP32 = "model.openvino.xml"
IR_INT8 = "model.openvino-int8.xml"
IR_INT8_AC = "model.openvino-int8-ac.xml"  # NNCF int8 with accuracy control: layers kept fp32 where int8 costs accuracy
RT_KEY = "rtk"


def weights_of(xml: Path) -> Path:
    return xml.with_suffix(".bin")


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
