"""One `Runner` interface for every runtime: uint8 NHWC images in, float32 logits on the host out.

Parity (`verify`), timing (`benchmark`) and `optimize` are written once against it:
- `registry`: one row per runtime (device, artifacts, precision, builder, why unavailable);
- `loop`: load one runner, use it, release it;
- `torch_runner` for the torch runtimes (eager, TorchScript, torch.export); `session_runner` for every
  serving engine (onnxruntime, OpenVINO), whose sessions come from `toolkit.serving.sessions`, the same
  code the production runtime uses.
A runtime that cannot exist here is `Skipped` with its reason; a broken artifact is `Failed`.
"""

from toolkit.errors import RuntimeUnavailable
from toolkit.evaluation.runners.base import Failed, Planned, Runner, RunOptions, Skipped, check_batch
from toolkit.evaluation.runners.loop import MemoryScope, each_loaded
from toolkit.evaluation.runners.registry import (
    REGISTRY,
    RUNTIMES,
    VERIFY_DEFAULT,
    RuntimeSpec,
    plan,
    require_named,
    runtime,
    runtimes_on,
    with_options,
)

__all__ = ["REGISTRY", "RUNTIMES", "VERIFY_DEFAULT", "Planned", "Failed", "MemoryScope", "RunOptions", "Runner",
           "RuntimeSpec", "RuntimeUnavailable", "Skipped", "check_batch", "each_loaded", "plan",
           "require_named", "runtime", "runtimes_on", "with_options"]
