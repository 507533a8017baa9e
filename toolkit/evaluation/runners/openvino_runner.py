"""OpenVINO on the CPU, through the same backend the production runtime serves with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.evaluation.runners.base import Runner
from toolkit.serving.sessions import SessionSettings, open_openvino


@dataclass
class OpenVinoRunner(Runner):
    path: Path = Path()
    settings: SessionSettings = SessionSettings(engine="openvino")

    def load(self) -> None:
        import openvino as ov

        self.backend = open_openvino(self.path, self.settings)
        self.details.update(openvino=ov.get_version(), precision_hint=self.settings.precision_hint,
                            threads=self.settings.threads, compiled_precision=self.backend.compiled_precision,
                            session=self.settings.to_dict())

    def release(self) -> None:
        self.backend = None

    def run_prepared(self, prepared: np.ndarray) -> np.ndarray:
        return self.backend.run(prepared)
