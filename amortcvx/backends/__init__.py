"""C solver backends (SCS 3, OSQP 1): one instance or a batch, cold or warm, with exact iteration counts.

Layer 3 of amortcvx (see docs/backends.md): takes the canonical per-instance containers of
:mod:`amortcvx.canon.data` and returns :class:`SolveResult` objects in one status vocabulary.
Solver packages are imported lazily, on the first solve.
"""

from amortcvx.backends.base import BackendInfo, SolveResult, Status, WarmStart
from amortcvx.backends.parallel import map_chunks, shutdown_workers, solve_batch
from amortcvx.backends.persistent import PersistentSolver
from amortcvx.backends.registry import BACKENDS, get_backend, solve

__all__ = [
    "BACKENDS", "BackendInfo", "PersistentSolver", "SolveResult", "Status", "WarmStart", "get_backend", "map_chunks",
    "shutdown_workers", "solve", "solve_batch",
]
