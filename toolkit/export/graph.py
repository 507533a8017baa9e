"""The exported graph: preprocessing (uint8 NHWC RGB -> normalised NCHW float) composed with the ResNet."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.core.preprocess import PreprocessSpec


class Preprocess(nn.Module):
    """uint8 [N, S, S, 3] -> float [N, 3, S, S]: x / 255, minus mean, over std, NHWC -> NCHW.

    Folded into one multiply-add per channel (x * 1/(255 std) - mean/std), the form exporters keep.
    """

    def __init__(self, spec: PreprocessSpec, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        mean = torch.tensor(spec.mean, dtype=torch.float64)
        std = torch.tensor(spec.std, dtype=torch.float64)
        self.register_buffer("scale", (1.0 / (255.0 * std)).to(dtype))
        self.register_buffer("bias", (-mean / std).to(dtype))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.scale.dtype) * self.scale + self.bias
        return x.permute(0, 3, 1, 2)


class ImageClassifier(nn.Module):
    """Preprocess ∘ ResNet. Input `image` uint8 NHWC; output float32 logits (and probabilities)."""

    def __init__(self, model: nn.Module, spec: PreprocessSpec, softmax: bool = False) -> None:
        super().__init__()
        self.preprocess = Preprocess(spec)
        self.model = model
        self.softmax = softmax

    def forward(self, image: torch.Tensor):
        logits = self.model(self.preprocess(image)).float()
        if self.softmax:
            return logits, torch.softmax(logits, dim=1)
        return logits


# ---------------------------------------------------------------- any image size in: resize and crop inside the graph


def _axis_weights(n_in, n_out, start, count: int) -> torch.Tensor:
    """Pillow's antialiased bilinear weights [count, n_in] for output pixels start .. start+count-1 of a
    resize from n_in to n_out pixels (sizes may be symbolic: the exported graph computes them per image).

    Triangle filter widened by the scale when shrinking, rows normalised, then rounded to Pillow's 22-bit
    fixed-point coefficients, so that a float matmul reproduces Pillow's uint8 result (see README).
    Only the rows of the center crop are built: the full resized image is never materialised.
    """
    scale = torch.full((), n_in, dtype=torch.float64) / torch.full((), n_out, dtype=torch.float64)
    support = torch.clamp(scale, min=1.0)
    center = (torch.arange(count, dtype=torch.float64) + start + 0.5) * scale
    source = torch.arange(n_in, dtype=torch.float64) + 0.5
    w = torch.clamp(1.0 - torch.abs(source[None, :] - center[:, None]) / support, min=0.0)
    w = w / w.sum(dim=1, keepdim=True)
    return (torch.floor(w * PIL_FIXED_POINT + 0.5) / PIL_FIXED_POINT).to(torch.float32)


PIL_FIXED_POINT = float(1 << 22)  # Pillow's PRECISION_BITS for 8-bit images


def _round_half_even_half(d):
    """round(d / 2) with Python's (and torchvision's) ties-to-even, in integer arithmetic on a symbolic size."""
    k = d // 2
    return k + (d % 2) * (k % 2)


def _to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Pillow rounds each pass to uint8 (half up) and clips."""
    return torch.clamp(torch.floor(x + 0.5), 0.0, 255.0)


class ResizeCenterCrop(nn.Module):
    """uint8 [N, H, W, 3] of any H, W -> float [N, S, S, 3] holding uint8 levels: torchvision's
    Resize(resize_size) (shorter side, antialiased bilinear, longer side truncated) then CenterCrop(S),
    as Pillow computes them (horizontal pass, then vertical, each rounded to uint8).

    Written as two matrix products with weights built in the graph from the image's size: onnxruntime
    and OpenVINO both run it (OpenVINO's Resize ignores antialias)."""

    def __init__(self, spec: PreprocessSpec) -> None:
        super().__init__()
        if spec.interpolation != "bilinear":
            raise ValueError(f"in-graph resize implements bilinear only, not {spec.interpolation}")
        self.resize_size, self.crop_size = spec.resize_size, spec.crop_size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = image.shape
        short = torch.sym_min(h, w)
        new_h, new_w = (self.resize_size * h) // short, (self.resize_size * w) // short  # int(R * long / short)
        top = _round_half_even_half(new_h - self.crop_size)
        left = _round_half_even_half(new_w - self.crop_size)
        s = self.crop_size
        x = image.to(torch.float32).transpose(2, 3)  # N, H, 3, W
        x = _to_uint8_levels(x @ _axis_weights(w, new_w, left, s).T)  # N, H, 3, S
        x = x.permute(0, 2, 3, 1)  # N, 3, S, H
        x = _to_uint8_levels(x @ _axis_weights(h, new_h, top, s).T)  # N, 3, S(w), S(h)
        return x.permute(0, 3, 2, 1)  # N, S(h), S(w), 3


class AnySizeClassifier(nn.Module):
    """ResizeCenterCrop ∘ Preprocess ∘ ResNet: decoded RGB uint8 images of any size in, logits out."""

    def __init__(self, model: nn.Module, spec: PreprocessSpec, softmax: bool = False) -> None:
        super().__init__()
        self.resize = ResizeCenterCrop(spec)
        self.classifier = ImageClassifier(model, spec, softmax)

    def forward(self, image: torch.Tensor):
        return self.classifier(self.resize(image))
