"""onnxruntime int8: the quantisation recipes, the one that is safe on this CPU, the calibration crops, and
the writer. Needs onnx and onnxruntime only (no torch), so `rtk optimize` uses it without the exporter."""

from __future__ import annotations

import dataclasses
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.core.bundle import INPUT_NAME
from toolkit.core.preprocess import crop_array, list_images
from toolkit.errors import RtkError
from toolkit.export.onnx_metadata import set_onnx_metadata

MIN_CALIBRATION_IMAGES = 8


def calibration_crops(folder: str, size: int, spec, seed: int) -> np.ndarray:
    """A seeded sample of `size` images from a folder or ImageFolder, decoded to uint8 crops."""
    paths = list_images(folder)
    if not paths:
        raise RtkError(f"calibration folder {folder} holds no images")
    if len(paths) < MIN_CALIBRATION_IMAGES:
        raise RtkError(f"calibration folder {folder} holds {len(paths)} images; int8 ranges from fewer than "
                       f"{MIN_CALIBRATION_IMAGES} are guesses: give at least {MIN_CALIBRATION_IMAGES} (a few hundred is usual)")
    random.Random(seed).shuffle(paths)
    crops, bad = [], []
    for p in paths:
        if len(crops) == size:
            break
        try:
            crops.append(crop_array(p, spec))
        except RtkError as exc:
            bad.append(str(exc))
    if not crops:
        raise RtkError(f"no image in {folder} decodes: {bad[0]}")
    return np.stack(crops)


@dataclass(frozen=True)
class QuantRecipe:
    """An onnxruntime static-quantisation setting. The default is what `--precision int8` writes."""

    calibration: str = "minmax"  # minmax | entropy | percentile
    activations: str = "u8"  # u8 (onnxruntime's recommendation on x86) | s8
    per_channel: bool = True
    # 7-bit weights: onnxruntime's remedy for u8 x s8 saturation on x86 without VNNI (AVX2, AVX-512 w/o VNNI)
    reduce_range: bool = False
    weights: str = "s8"  # s8 | u8 (u8 x u8: onnxruntime's other remedy for saturation)
    format: str = "qdq"  # qdq (QuantizeLinear/DequantizeLinear pairs) | qoperator (QLinearConv, QLinearMatMul ...)

    def __post_init__(self) -> None:
        allowed = {"calibration": ("minmax", "entropy", "percentile"), "activations": ("u8", "s8"),
                   "weights": ("s8", "u8"), "format": ("qdq", "qoperator")}
        for field, values in allowed.items():
            if getattr(self, field) not in values:
                raise RtkError(f"quantisation {field} must be one of {', '.join(values)}, not {getattr(self, field)!r}")
        if self.activations == "s8" and self.weights == "u8":
            raise RtkError("onnxruntime cannot quantise s8 activations with u8 weights")
        if self.format == "qoperator" and self.per_channel and self.weights == "u8":
            # its QLinearConv writer hard-codes s8 for per-channel weights: the file would not be what was asked
            raise RtkError("onnxruntime's QOperator format writes per-channel convolution weights as s8: "
                           "u8 weights need per-tensor quantisation there")

    @property
    def file_name(self) -> str:
        """The variant's own name in a bundle. Export writes the setting it picks for the CPU as
        model.int8.onnx instead, with the setting in the manifest."""
        return (f"model.int8-{self.calibration}-{self.activations}{'' if self.per_channel else '-per-tensor'}"
                f"{'-reduce-range' if self.reduce_range else ''}{'-u8-weights' if self.weights == 'u8' else ''}"
                f"{'-qoperator' if self.format == 'qoperator' else ''}.onnx")

    @classmethod
    def of(cls, entry) -> QuantRecipe | None:
        """The recipe a manifest file entry records (None for a file that is not onnxruntime int8)."""
        recorded = entry.get("quantization")
        if not isinstance(recorded, dict):
            return None
        return cls(**{f.name: recorded[f.name] for f in dataclasses.fields(cls) if f.name in recorded})

    @property
    def label(self) -> str:
        weights = f"{self.weights} weights{' (7-bit: reduce_range)' if self.reduce_range else ''}"
        return (f"{'QOperator' if self.format == 'qoperator' else 'QDQ'}, {self.calibration} calibration, "
                f"{self.activations} activations, {weights} {'per channel' if self.per_channel else 'per tensor'}")


def int8_recipe_for(cpu) -> QuantRecipe:
    """The onnxruntime int8 setting that is safe on this CPU: u8 activations x s8 weights where int8 dot
    products are one instruction (VNNI, AMX); 7-bit weights (reduce_range) on CPUs without, where
    onnxruntime's u8 x s8 kernels can saturate (its quantisation docs) and accuracy drops."""
    return QuantRecipe() if cpu.vnni else QuantRecipe(reduce_range=True)


# onnxruntime's histogram calibrators (entropy, percentile) keep every intermediate tensor of every
# calibration image in memory before binning: ~80 MB per 224 px image for resnet50, so 200 images
# exhaust 24 GB. They get the first 32 crops; MinMax streams and uses them all.
HISTOGRAM_CALIBRATION_LIMIT = 32


def write_int8(fp32_path: Path, path: Path, crops: np.ndarray, meta: dict[str, str], recipe: QuantRecipe = QuantRecipe()) -> int:
    """onnxruntime static quantisation (its pre-processing step, then the recipe's format and types), calibrated
    on `crops`. Returns how many calibration images were used."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    # Histogram calibrators stack per-batch arrays, so they need equal batches: feed them one image at a time.
    step = 8 if recipe.calibration == "minmax" else 1
    if recipe.calibration != "minmax":
        crops = crops[:HISTOGRAM_CALIBRATION_LIMIT]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: crops[i : i + step]} for i in range(0, len(crops), step)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="rtk-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
        quantize_static(str(pre), str(path), Reader(), per_channel=recipe.per_channel,
                        quant_format=QuantFormat.QDQ if recipe.format == "qdq" else QuantFormat.QOperator,
                        activation_type=types[recipe.activations], weight_type=types[recipe.weights],
                        calibrate_method=methods[recipe.calibration],
                        reduce_range=recipe.reduce_range)
    model = onnx.load(str(path))
    set_onnx_metadata(model, meta)
    onnx.save(model, str(path))
    return len(crops)
