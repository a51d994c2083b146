"""Batched C solves: in process or on a pool of spawned worker processes.

The pool is created on first use and kept for later batches of the same worker count (spawning a worker
imports numpy / scipy / torch, about a second or more, which would otherwise dominate small batches);
:func:`shutdown_workers` releases it (also done at interpreter exit). Workers run one solve at a time with
``OMP_NUM_THREADS=MKL_NUM_THREADS=OPENBLAS_NUM_THREADS=1`` unless those are set, so ``workers`` processes
use ``workers`` cores.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from amortcvx.backends.base import SolveResult, Status, WarmStart, failed_result, instance_sizes
from amortcvx.backends.registry import get_backend
from amortcvx.canon.data import ConeInstance, QPInstance

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[int, ProcessPoolExecutor] = {}
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _watch_parent() -> None:
    """Exit this worker when the process that spawned it dies (SIGKILL / SIGTERM of the parent)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        from multiprocessing.connection import wait

        wait([parent.sentinel])  # returns when the parent exits, however it exits
        os._exit(1)

    threading.Thread(target=watch, name="amortcvx-parent-watchdog", daemon=True).start()


def _init_worker(barrier: Any = None) -> None:
    _watch_parent()
    for name in _THREAD_ENV:
        os.environ.setdefault(name, "1")
    if barrier is not None:  # hold every worker until all have started (see _get_pool)
        barrier.wait(timeout=600)


def _noop() -> int:
    return os.getpid()


_STARTUP_HINT = (
    "worker processes died while starting. Worker processes are spawned: they re-import the __main__ "
    "module, so a script that calls solve_batch must do so under `if __name__ == '__main__':`; "
    "or pass workers=1 to solve in this process")


def _get_pool(workers: int) -> ProcessPoolExecutor:
    """The cached pool of ``workers`` spawned processes; a new pool must start (RuntimeError otherwise)."""
    pool = _POOLS.get(workers)
    if pool is None or getattr(pool, "_broken", False):
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(ctx.Barrier(workers),))
        # The executor spawns a process per submit while none is idle: `workers` tasks start them all, and
        # the barrier makes each wait for the others, so the pool is fully started when these return.
        try:
            for fut in [pool.submit(_noop) for _ in range(workers)]:
                fut.result()
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(_STARTUP_HINT) from None
        _POOLS[workers] = pool
    return pool


def _drop_pool(workers: int) -> None:
    pool = _POOLS.pop(workers, None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def shutdown_workers() -> None:
    """Shut down the worker pools kept by :func:`solve_batch` (they are re-created when needed)."""
    for workers in list(_POOLS):
        pool = _POOLS.pop(workers)
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_workers)


def _is_input_error(exc: BaseException) -> bool:
    return isinstance(exc, (ValueError, TypeError))


def map_chunks(fn: Callable[[list[T]], list[R]], items: Sequence[T], *, workers: int,
               on_failure: Callable[[T, BaseException], R], chunksize: int | None = None,
               progress: bool = False, desc: str = "solving") -> list[R]:
    """``[fn([item])[0] for item in items]``, computed in chunks on ``workers`` processes, in input order.

    ``workers <= 1`` runs in this process. Otherwise ``fn`` must be picklable (a top-level function or an
    instance of a top-level class: workers are spawned) and chunks of ``chunksize`` items (default: about
    four chunks per worker) are sent to the cached pool. A chunk that fails with anything but a ValueError
    / TypeError (a worker that crashed and broke the pool, a MemoryError, ...) is retried one item at a
    time on a 1-worker pool, so only the item at fault gets ``on_failure(item, exception)``; in process,
    such an item gets it directly. ValueError and TypeError mean bad input and are re-raised.

    Raises:
        RuntimeError: the worker processes cannot start (see the message: usually a script without an
            ``if __name__ == "__main__":`` guard).
    """
    from tqdm.auto import tqdm

    n = len(items)
    results: list[Any] = [None] * n
    if n == 0:
        return []
    with tqdm(total=n, disable=not progress, desc=desc, unit="inst") as bar:
        if workers <= 1:
            for i, item in enumerate(items):
                try:
                    results[i] = fn([item])[0]
                except Exception as exc:  # noqa: BLE001 - one failing item never stops the batch
                    if _is_input_error(exc):
                        raise
                    results[i] = on_failure(item, exc)
                bar.update(1)
            return results
        size = chunksize or max(1, math.ceil(n / (4 * workers)))
        starts = list(range(0, n, size))
        pool = _get_pool(workers)
        futures: dict[Future, int] = {pool.submit(fn, list(items[s:s + size])): s for s in starts}
        failed: list[int] = []
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                start = futures[fut]
                exc = fut.exception()
                if exc is None:
                    out = fut.result()
                    results[start:start + len(out)] = out
                    bar.update(len(out))
                elif _is_input_error(exc):
                    for other in pending:
                        other.cancel()
                    raise exc
                else:
                    failed.append(start)
        retry = [i for s in sorted(failed) for i in range(s, min(s + size, n))]
        if retry and getattr(pool, "_broken", False):
            _drop_pool(workers)
        for i in retry:  # one at a time on a 1-worker pool: a crash takes down only the item causing it
            fut = _get_pool(1).submit(fn, [items[i]])
            exc = fut.exception()
            if exc is None:
                results[i] = fut.result()[0]
            elif _is_input_error(exc):
                raise exc
            else:
                if isinstance(exc, BrokenProcessPool):
                    _drop_pool(1)
                results[i] = on_failure(items[i], exc)
            bar.update(1)
    return results


def _solve_chunk(backend: str, settings: Mapping[str, Any] | None, exact_iterations: bool,
                 chunk: list[tuple[ConeInstance | QPInstance, WarmStart | None]]) -> list[SolveResult]:
    """Worker entry point: solve each (validated) instance of the chunk."""
    info = get_backend(backend)
    return [info.run(inst, ws, settings, exact_iterations) for inst, ws in chunk]


class _ChunkSolver:
    """Picklable ``fn(chunk)`` for :func:`map_chunks` bound to a backend and its settings."""

    def __init__(self, backend: str, settings: dict[str, Any] | None, exact_iterations: bool):
        self.backend = backend
        self.settings = settings
        self.exact_iterations = exact_iterations

    def __call__(self, chunk: list[tuple[Any, WarmStart | None]]) -> list[SolveResult]:
        return _solve_chunk(self.backend, self.settings, self.exact_iterations, chunk)


def _failure(item: tuple[Any, WarmStart | None], exc: BaseException) -> SolveResult:
    n, m, slack = instance_sizes(item[0])
    return failed_result(n, m, slack, Status.SOLVER_ERROR, f"worker failed: {exc!r}")


def solve_batch(instances: Sequence[ConeInstance | QPInstance], backend: str,
                warm_starts: Sequence[WarmStart | None] | None = None,
                settings: Mapping[str, Any] | None = None, exact_iterations: bool = True,
                workers: int | None = None, progress: bool = False,
                chunksize: int | None = None) -> list[SolveResult]:
    """Solve many instances, each from a fresh solver object; results in input order.

    Every instance and warm start is validated in this process first, so bad input raises before any
    solve. Then each instance is solved exactly as :func:`amortcvx.backends.solve` would (same settings,
    same counts); infeasible / unbounded / failing instances get their status and never stop the batch.

    Args:
        instances: ConeInstance (SCS) or QPInstance (OSQP) objects.
        backend: a registered backend name.
        warm_starts: one :class:`WarmStart` or None per instance; None for all cold.
        settings: solver settings for every instance (copied, never mutated).
        exact_iterations: see :func:`amortcvx.backends.solve`.
        workers: processes; None -> ``os.cpu_count()``, 1 -> in this process, > 1 -> a spawned pool.
        progress: show a tqdm progress bar.
        chunksize: instances per task sent to a worker (default: about four tasks per worker).

    Returns:
        One :class:`SolveResult` per instance, in input order.

    Raises:
        ValueError: unknown backend, bad instance / warm start (the message names its index), bad settings,
            ``warm_starts`` of the wrong length, ``workers < 1``.
        RuntimeError: worker processes cannot start (a script calling this without a ``__main__`` guard).
    """
    info = get_backend(backend)
    instances = list(instances)
    n = len(instances)
    if warm_starts is None:
        starts: list[WarmStart | None] = [None] * n
    else:
        starts = list(warm_starts)
        if len(starts) != n:
            raise ValueError(f"warm_starts has {len(starts)} entries for {n} instances")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers}")
    for i, (inst, ws) in enumerate(zip(instances, starts, strict=True)):
        try:
            info.validate(inst, ws)
        except (ValueError, TypeError) as e:
            raise type(e)(f"instance {i}: {e}") from None
    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping or None, got {type(settings).__name__}")
    fn = _ChunkSolver(backend, None if settings is None else dict(settings), exact_iterations)
    items = list(zip(instances, starts, strict=True))
    return map_chunks(fn, items, workers=workers if n > 1 else 1, on_failure=_failure, chunksize=chunksize,
                      progress=progress, desc=f"{backend} solves")
