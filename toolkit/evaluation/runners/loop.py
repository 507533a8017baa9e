"""The one stage loop: load one runner, hand it to the stage, release it, then the next.

Only one runtime's session or model is alive at a time, so each runtime's peak memory is its own:
the loop resets Linux's resident high-water mark before each load and reports the peak above the
process's resident memory at that moment.
"""

from __future__ import annotations

import gc
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

from toolkit.errors import ArtifactBroken, RuntimeUnavailable, first_line
from toolkit.evaluation.runners.base import Failed, Planned, Runner, Skipped


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class MemoryScope:
    """Resident memory over one runtime's life: baseline when it starts, peak since then."""

    baseline_mb: float
    resettable: bool

    @classmethod
    def start(cls) -> MemoryScope:
        resettable = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current resident size
            resettable = True
        except OSError:
            pass
        return cls((_status_kb("VmRSS") or 0) / 1024, resettable)

    def peak_mb(self) -> float:
        hwm = _status_kb("VmHWM")
        return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024

    def to_dict(self) -> dict[str, float | str]:
        peak = self.peak_mb()
        return {"peak_rss_mb": round(peak, 1), "rss_baseline_mb": round(self.baseline_mb, 1),
                "peak_rss_above_baseline_mb": round(peak - self.baseline_mb, 1),
                "peak_rss_scope": "this runtime" if self.resettable else "process so far"}



def _return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so the next runtime's baseline is real."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline then includes memory the allocator kept
        pass


def each_loaded(entries: list[Planned]) -> Iterator[Runner | Skipped | Failed]:
    """Yield each entry with its runner loaded; an unavailable runtime comes back Skipped, an artifact
    that cannot be loaded Failed. A runner is released (and memory collected) before the next loads."""
    for entry in entries:
        if not isinstance(entry, Runner):
            yield entry
            continue
        entry.memory = MemoryScope.start()
        started = time.perf_counter()
        try:
            entry.load()
        except RuntimeUnavailable as exc:
            entry.release()
            yield Skipped(entry.runtime, entry.artifact, entry.precision, str(exc))
            continue
        except ArtifactBroken as exc:
            entry.release()
            yield Failed(entry.runtime, entry.artifact, entry.precision, str(exc))
            continue
        except Exception as exc:  # the runtime refused a file that passed its integrity check: still a failure
            entry.release()
            yield Failed(entry.runtime, entry.artifact, entry.precision,
                         f"{entry.artifact}: {entry.runtime} cannot load it: {first_line(exc)}")
            continue
        entry.load_seconds = time.perf_counter() - started
        try:
            yield entry
        finally:
            entry.release()
            gc.collect()
            _return_freed_memory()
