"""The runner of every serving engine (onnxruntime on CPU, CUDA, CUDA with IO binding, TensorRT; OpenVINO):
its session comes from toolkit.serving.sessions, opened exactly as a service opens it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.evaluation.runners.base import Runner
from toolkit.serving.sessions import Backend, SessionSettings, open_session


@dataclass
class SessionRunner(Runner):
    path: Path = Path()
    settings: SessionSettings = SessionSettings()
    io_binding: bool = False  # onnxruntime on CUDA: the input is placed on the device once, then updated in place

    def load(self) -> None:
        self.backend: Backend | None = open_session(self.path, self.settings,
                                                    check_placement=self.options.profile_placement)
        self.details.update(self.backend.details(), session=self.settings.to_dict())
        if self.io_binding:
            self.details["io_binding"] = True
        warning = self.backend.placement_warning()
        if warning:
            self.details["warning"] = warning
        self._bound: dict[tuple, Any] = {}

    def release(self) -> None:
        self._bound = {}
        self.backend = None

    @property
    def selftest_key(self) -> str:
        """The key of what this session is expected to compute on the self-test images (selftest.npz)."""
        return self.backend.selftest_key(self.artifact)

    def prepare(self, images: np.ndarray) -> Any:
        if not self.io_binding:
            return images
        import onnxruntime as ort

        key = images.shape
        if key not in self._bound:
            binding = self.backend.session.io_binding()
            device_input = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
            binding.bind_ortvalue_input(self.backend.input_name, device_input)
            binding.bind_output(self.backend.output_name, "cuda", 0)
            self._bound[key] = (binding, device_input)
        else:  # same device buffer, new contents: what CUDA graphs require
            self._bound[key][1].update_inplace(images)
        return self._bound[key][0]

    def run_prepared(self, prepared: Any) -> np.ndarray:
        if not self.io_binding:
            return self.backend.run(prepared)
        prepared.synchronize_inputs()
        self.backend.session.run_with_iobinding(prepared)
        # copy_outputs_to_cpu waits for the device, so the logits are on the host.
        return prepared.copy_outputs_to_cpu()[0]
