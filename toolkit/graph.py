"""The exported graph: preprocessing (uint8 NHWC RGB -> normalised NCHW float) composed with the ResNet."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.preprocess import PreprocessSpec


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
