"""Free 127.0.0.1 ports for the servers the tests start, a range of its own for each pytest-xdist worker.

A port from `bind(("127.0.0.1", 0))` is in the kernel's ephemeral range: any client connection of another
test may be given it before the server binds it, and two workers may be handed the same one. Ports below that
range (32768 on Linux), split between the workers and each handed out once, are not.
"""

from __future__ import annotations

import os
import socket

FIRST, SPAN = 20000, 1500  # worker k probes [FIRST + k * SPAN, FIRST + (k + 1) * SPAN): 8 workers below 32000


def _worker() -> int:
    """This process's pytest-xdist worker number (gw3 -> 3), 0 without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name[2:].isdigit() else 0


_start = FIRST + _worker() * SPAN
_candidates = iter(range(_start, _start + SPAN))


def free_port() -> int:
    """A port nothing listens on now and that no other worker (or earlier call) is given."""
    for port in _candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken by something else on this machine: the next one
                continue
            return port
    raise RuntimeError(f"no free port left in this worker's range of {SPAN}")
