"""The CPU Triton that `.ci/build-triton.sh` builds, started on free 127.0.0.1 ports and stopped by its PID.

Used by tests/test_triton_server.py and benchmarks/serve_load.py. `TRITON_HOME` (default artifacts/triton)
holds `server/` (tritonserver from the nvidia-pytriton wheel) and `backends/onnxruntime/`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("TRITON_HOME", ROOT / "artifacts" / "triton"))
BINARY = HOME / "server" / "pytriton" / "tritonserver" / "bin" / "tritonserver"
BACKENDS = HOME / "backends"


def triton_problem() -> str | None:
    """Why no CPU Triton can start here, or None."""
    if not BINARY.is_file():
        return f"no tritonserver at {BINARY}: run `bash .ci/build-triton.sh` (make triton)"
    if not (BACKENDS / "onnxruntime" / "libtriton_onnxruntime.so").is_file():
        return f"no onnxruntime backend in {BACKENDS}: run `bash .ci/build-triton.sh` (make triton)"
    return None


def rss_mb(pid: int) -> float:
    """A process's resident memory now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class TritonServer:
    """tritonserver on a model repository, HTTP and gRPC on 127.0.0.1 only, metrics off. A context manager:
    it waits for readiness (or for every model to fail loading) and stops the process it started."""

    def __init__(self, repository: Path, log: Path, strict: bool = True) -> None:
        self.repository, self.log, self.strict = repository, log, strict
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http, self.grpc = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.proc: subprocess.Popen | None = None
        self.ready_seconds = 0.0

    def __enter__(self) -> TritonServer:
        args = [str(BINARY), f"--model-repository={self.repository}", f"--backend-directory={BACKENDS}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}", "--grpc-address=127.0.0.1",
                f"--grpc-port={self.grpc_port}", "--allow-metrics=false", "--allow-sagemaker=false",
                "--allow-vertex-ai=false", f"--strict-readiness={'true' if self.strict else 'false'}",
                "--exit-on-error=false", "--exit-timeout-secs=10", "--model-control-mode=explicit", "--load-model=*", "--log-verbose=0"]
        start = time.perf_counter()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_started(start)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - start
        return self

    def _wait_started(self, start: float, limit_s: float = 60.0) -> None:
        """Until /v2/health/ready answers (200, or 400 when a model failed to load and readiness is strict)."""
        while time.perf_counter() - start < limit_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            status = self.health("ready")
            if status == 200 or (status is not None and "successfully loaded" not in self.log_text()
                                 and "failed to load" in self.log_text()):
                return
            time.sleep(0.05)
        raise RuntimeError(f"tritonserver not ready after {limit_s:g} s: {self.log_text()[-2000:]}")

    def health(self, what: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/{what}", timeout=1) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def rss_mb(self) -> float:
        """The server's resident memory now."""
        return rss_mb(self.proc.pid)

    def stop(self) -> int | None:
        """SIGTERM to the PID this started; SIGKILL if it has not exited 20 s later."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __exit__(self, *exc) -> None:
        self.stop()
