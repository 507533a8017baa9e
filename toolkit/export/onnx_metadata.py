"""The rtk metadata an ONNX file carries in its metadata_props (classes, preprocessing, precision, ...), so
every file describes itself. Needs onnx; no torch."""

from __future__ import annotations

from toolkit import __version__


def set_onnx_metadata(model, meta: dict[str, str]) -> None:
    import onnx

    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep + [onnx.StringStringEntryProto(key=k, value=v) for k, v in meta.items()])
    model.producer_name, model.producer_version = "rtk", __version__
