"""The Runner interface: uint8 NHWC images in, float32 logits on the host out, for every runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.errors import RtkError


@dataclass(frozen=True)
class RunOptions:
    """What a stage asks of every runner it plans, torch runners and sessions alike. A session runner's
    `SessionSettings` (toolkit.serving.sessions: what one session computes, stored with a recommendation) are
    made from these and its registry row by `registry.session_settings`."""

    threads: int | None = None
    tf32: bool = False  # off: fp32 parity needs full-precision matmuls on both sides
    cuda_graph: bool = False
    profile_placement: bool = True
    # session settings beside the runtime row's (rtk optimize's variants, such as a graph level): (field, value)
    session: tuple[tuple[str, Any], ...] = ()
    # may a runtime load compiled native code (an AOTInductor package)? --allow-native-code, or a bundle whose
    # signature a --trust key checked; otherwise such a runtime is Skipped, saying so (registry.plan)
    native_code: bool = False


@dataclass(frozen=True)
class Skipped:
    """This runtime cannot exist here (package missing, no GPU, no bf16 hardware)."""

    runtime: str
    artifact: str
    precision: str
    reason: str


@dataclass(frozen=True)
class Failed:
    """The artifact cannot be run: missing, truncated, unparsable, altered, or the runtime refused it."""

    runtime: str
    artifact: str
    precision: str
    reason: str


@dataclass
class Runner:
    """Base: subclasses open their session or model in `load()`, compute in `run_prepared()` and
    drop everything they hold in `release()`."""

    runtime: str
    artifact: str
    precision: str
    options: RunOptions = field(default_factory=RunOptions)
    details: dict[str, Any] = field(default_factory=dict)
    # set by the stage loop (toolkit.evaluation.runners.loop) around load()
    memory: Any = field(default=None, repr=False, compare=False)
    load_seconds: float = field(default=0.0, repr=False, compare=False)

    def load(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Free the session/model so the next runner starts from a clean process."""

    def prepare(self, images: np.ndarray) -> Any:
        """Place input where the runtime wants it. Only IO-binding runners do work here."""
        return images

    def run_prepared(self, prepared: Any) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        check_batch(images)
        return self.run_prepared(self.prepare(images))

    @property
    def label(self) -> str:
        return f"{self.runtime}:{self.artifact}"


# what `plan` hands the stage loop for one (runtime, artifact): a runner to load, or why there is none
Planned = Runner | Skipped | Failed


def check_batch(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        shape = getattr(images, "shape", None)
        raise RtkError(f"runners take uint8 arrays [N, H, W, 3], got {getattr(images, 'dtype', type(images))} {shape}")
