"""onnxruntime runners (CPU, CUDA, CUDA with IO binding, TensorRT): sessions come from toolkit.serving.sessions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.evaluation.runners.base import Runner
from toolkit.serving.sessions import OrtBackend, SessionSettings, open_onnxruntime


@dataclass
class OrtRunner(Runner):
    path: Path = Path()
    settings: SessionSettings = SessionSettings()
    io_binding: bool = False

    def load(self) -> None:
        self.backend: OrtBackend | None = open_onnxruntime(self.path, self.settings,
                                                           check_placement=self.options.profile_placement)
        self.details.update(providers=self.backend.providers, threads=self.settings.threads, io_binding=self.io_binding,
                            graph_optimization=self.settings.graph_optimization, session=self.settings.to_dict())
        if self.backend.placement is not None:
            self.details["node_placement"] = self.backend.placement
        warning = self.backend.placement_warning()
        if warning:
            self.details["warning"] = warning
        self._bound: dict[tuple, Any] = {}

    def release(self) -> None:
        self._bound = {}
        self.backend = None

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
