"""The machine an experiment runs on: what to print beside measured numbers, and torch's thread count."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch


def environment(device: str = "cpu", dtype: str = "float64") -> dict[str, Any]:
    """Machine and versions to print beside measured numbers."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "scs": version("scs"), "osqp": version("osqp"), "cvxpy": version("cvxpy"), "device": dev,
            "dtype": dtype}


@contextlib.contextmanager
def torch_threads(num: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block, restoring it after (None or 0: leave it).

    On a small shared CPU, torch's default of one thread per core competes with the solver processes and
    other jobs; small batched operations then wait on spinning threads (we saw 0.8 ms become 140 ms on a loaded
    2-core machine), so benchmarks there use 1.
    """
    if not num:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(num))
    try:
        yield
    finally:
        torch.set_num_threads(before)
