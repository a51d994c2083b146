"""Generate datasets of solved instances: parameters theta_i and the solver's optimal (x*, y*, s*)(theta_i).

For a parametric problem ``P(theta)`` compiled by :class:`~amortcvx.canon.ParametricProblem` and a batch of
parameters ``theta_1 .. theta_N``, :func:`generate_dataset` canonicalizes each instance, solves it with a C
backend (SCS for the cone form, OSQP for the QP form) to a tight tolerance, and stores, chunk by chunk,

    theta_i,  x*_i (n),  y*_i (m),  s*_i (m, SCS only),  status_i,  iterations_i,  objective_i,  times_i

in ``root/<fingerprint>-<backend>[-<name>]/`` (see :mod:`amortcvx.datasets.storage` and ``docs/datasets.md``).
Runs are resumable: finished chunks are kept and verified, the rest is computed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from amortcvx.backends import BACKENDS, solve_batch
from amortcvx.canon import ParametricProblem
from amortcvx.canon.parametric import real_array
from amortcvx.datasets import storage
from amortcvx.datasets.dataset import Dataset, dataset_dirname
from amortcvx.datasets.storage import DatasetError
from amortcvx.solvers import FORMS, get_solver


class Family(Protocol):
    """What :func:`generate_family_dataset` reads of a problem family (``amortcvx.problems.Family`` is one)."""

    name: str
    problem: Any

    def sample(self, num: int, seed: int) -> dict[str, np.ndarray]: ...

# Form of the canonical data each backend solves (from the solver descriptions).
BACKEND_FORMS: Mapping[str, str] = FORMS

# Default solver settings for the targets (on top of the backend's own defaults): tight tolerances, generous
# iteration limits, and OSQP's polishing (an active-set refinement that makes the solution exact).
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "scs": {"eps_abs": 1e-8, "eps_rel": 1e-8, "max_iters": 100_000},
    "osqp": {"eps_abs": 1e-8, "eps_rel": 1e-8, "max_iter": 100_000, "polishing": True},
}

# Statuses whose x, y, s are stored; the other rows hold NaN.
SOLUTION_STATUSES = ("optimal", "optimal_inaccurate")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*$")


def _library_version() -> str:
    try:
        return importlib.metadata.version("amortcvx")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return None


def _check_backend(pp: ParametricProblem, backend: str) -> str:
    get_solver(backend, what="backend")  # ValueError listing the known solvers
    if pp.form != BACKEND_FORMS[backend]:
        raise ValueError(f"backend {backend!r} solves form {BACKEND_FORMS[backend]!r}, but the problem was "
                         f"compiled with form {pp.form!r}; use ParametricProblem(problem, "
                         f"form={BACKEND_FORMS[backend]!r})")
    return backend


def effective_settings(backend: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Solver settings used for a dataset.

    The backend's own ``default_settings``, updated by :data:`DEFAULT_SETTINGS` of ``backend``, updated by
    ``settings`` (a new dict; ``settings`` is not modified). Values must be JSON scalars (bool, int, float,
    str, None; numpy scalars are converted), since they are recorded in the manifest and compared on resume.
    """
    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping or None; got {type(settings).__name__}")
    out = dict(BACKENDS[backend].default_settings)
    out.update(DEFAULT_SETTINGS.get(backend, {}))
    for key, value in (settings or {}).items():
        if isinstance(value, np.generic):
            value = value.item()
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise TypeError(f"setting {key!r} must be a bool, int, float, str or None (it is stored in the "
                            f"manifest); got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"setting {key!r} must be finite; got {value}")
        out[str(key)] = value
    return out


def _validate_params(pp: ParametricProblem, params: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """Copy ``params`` to float64 arrays (N, *shape) in the problem's parameter order; return them and N."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping name -> array (N, *shape); got {type(params).__name__}")
    shapes = pp.parameter_shapes
    unknown = sorted(set(params) - set(shapes))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; the problem's parameters are {sorted(shapes)}")
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise ValueError(f"missing values for parameter(s) {missing}")
    out: dict[str, np.ndarray] = {}
    num = None
    for name, shape in shapes.items():
        value = params[name]
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().numpy()
        arr = np.array(real_array(value, name), copy=True)  # complex or non-numeric values: a clear error
        if arr.ndim != len(shape) + 1 or tuple(arr.shape[1:]) != tuple(shape):
            raise ValueError(f"parameter {name!r} must have shape (N, *{tuple(shape)}) with a leading batch "
                             f"dimension; got {arr.shape}")
        if num is not None and arr.shape[0] != num:
            raise ValueError(f"parameter {name!r} has {arr.shape[0]} instances, but another parameter has "
                             f"{num}")
        num = int(arr.shape[0])
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"parameter {name!r} contains NaN or inf values")
        out[name] = arr
    if not num:
        raise ValueError("empty parameter batch (N = 0)")
    pp.parameter_vector(out)  # the parameters' declared attributes (nonneg=, bounds=, ...), per instance
    return out, num


def _chunk_bounds(num: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num)) for start in range(0, num, chunk_size)]


# ---------------------------------------------------------------------- solving one chunk
def _solve_chunk(instances: list, backend: str, settings: dict[str, Any], exact_iterations: bool,
                 workers: int | None) -> dict[str, np.ndarray]:
    """Solve a list of canonical instances and pack the results as arrays (see :func:`_pack_results`).

    Module-level (picklable) so that it also runs as a Ray task.
    """
    results = solve_batch(instances, backend, settings=settings, exact_iterations=exact_iterations,
                          workers=workers, progress=False)
    first = instances[0]
    n = int(first.A.shape[1])
    m = int(first.A.shape[0])
    return _pack_results(results, n, m, with_s=backend == "scs")


def _status_str(status: Any) -> str:
    value = getattr(status, "value", status)
    return str(value)


def _row(vec: Any, size: int) -> np.ndarray | None:
    if vec is None:
        return None
    arr = np.asarray(vec, dtype=np.float64).ravel()
    return arr if arr.size == size else None


def _pack_results(results: list, n: int, m: int, with_s: bool) -> dict[str, np.ndarray]:
    """Stack backend ``SolveResult``s into arrays.

    Rows whose status is not in :data:`SOLUTION_STATUSES`, or whose solution is missing, hold NaN in x, y, s
    and objective (certificates of infeasibility are not stored).
    """
    count = len(results)
    x = np.full((count, n), np.nan)
    y = np.full((count, m), np.nan)
    s = np.full((count, m), np.nan) if with_s else None
    status = []
    iterations = np.full(count, -1, dtype=np.int64)
    objective = np.full(count, np.nan)
    setup_time = np.full(count, np.nan)
    solve_time = np.full(count, np.nan)
    for i, res in enumerate(results):
        st = _status_str(res.status)
        xi, yi = _row(res.x, n), _row(res.y, m)
        si = _row(res.s, m) if with_s else None
        if st in SOLUTION_STATUSES and (xi is None or yi is None or (with_s and si is None)):
            st = "solver_error"  # a solution status without a complete solution cannot be used as a target
        if st in SOLUTION_STATUSES:
            x[i], y[i] = xi, yi
            if with_s:
                s[i] = si
            if res.objective is not None:
                objective[i] = float(res.objective)
        status.append(st)
        if res.iterations is not None:
            iterations[i] = int(res.iterations)
        if res.setup_time is not None:
            setup_time[i] = float(res.setup_time)
        if res.solve_time is not None:
            solve_time[i] = float(res.solve_time)
    out = {"x": x, "y": y, "status": np.array(status, dtype=str), "iterations": iterations,
           "objective": objective, "setup_time": setup_time, "solve_time": solve_time}
    if with_s:
        out["s"] = s
    return out


# ---------------------------------------------------------------------- manifest handling
def _spec(pp: ParametricProblem, backend: str, settings: dict[str, Any], exact_iterations: bool,
          name: str | None) -> dict[str, Any]:
    """The part of the manifest that identifies what the folder holds (compared on resume)."""
    return {
        "format_version": storage.FORMAT_VERSION,
        "fingerprint": pp.fingerprint,
        "backend": backend,
        "form": pp.form,
        "settings": settings,
        "exact_iterations": bool(exact_iterations),
        "name": name,
        "parameters": [[k, list(v)] for k, v in pp.parameter_shapes.items()],
        "n": int(pp.n),
        "m": int(pp.m),
    }


def _new_manifest(spec: dict[str, Any], num: int, chunk_size: int, hashes: list[str],
                  bounds: list[tuple[int, int]], objective_sign: float = 1.0) -> dict[str, Any]:
    manifest = dict(spec)
    manifest.update({
        "objective_sign": objective_sign,  # stored objective = canonical value * this (CVXPY's sign)
        "num_instances": num,
        "chunk_size": chunk_size,
        "params_sha256": storage.sha256_bytes("".join(hashes).encode()),
        "complete": False,
        "versions": {"amortcvx": _library_version(), "numpy": np.__version__,
                     "cvxpy": _package_version("cvxpy"), "scs": _package_version("scs"),
                     "osqp": _package_version("osqp")},
        "chunks": [{"index": k, "start": a, "count": b - a, "params_sha256": h, "file": None, "sha256": None}
                   for k, ((a, b), h) in enumerate(zip(bounds, hashes, strict=True))],
    })
    return manifest


def _check_same(folder: Path, old: Mapping[str, Any], spec: Mapping[str, Any], num: int, chunk_size: int,
                hashes: list[str]) -> None:
    """Raise DatasetError when the existing manifest ``old`` describes another dataset than the request."""
    labels = {"fingerprint": "problem fingerprint", "backend": "backend", "form": "canonical form",
              "settings": "solver settings", "exact_iterations": "exact_iterations", "name": "name",
              "parameters": "parameter names/shapes", "n": "n", "m": "m", "format_version": "format_version"}
    for key, label in labels.items():
        if old.get(key) != spec[key]:
            raise DatasetError(
                f"{folder} holds a dataset made with another {label}: stored {old.get(key)!r}, requested "
                f"{spec[key]!r}. Use another root or name=, or delete the folder.")
    if old["num_instances"] != num or old["chunk_size"] != chunk_size:
        raise DatasetError(
            f"{folder} holds a different dataset: {old['num_instances']} instances in chunks of "
            f"{old['chunk_size']}, requested {num} in chunks of {chunk_size}. Use another root or name=, or "
            "delete the folder.")
    for entry, h in zip(old["chunks"], hashes, strict=True):
        if entry["params_sha256"] != h:
            raise DatasetError(
                f"{folder} holds a different dataset: the stored parameters of chunk {entry['index']} "
                f"(instances {entry['start']}..{entry['start'] + entry['count'] - 1}) differ from the "
                f"requested ones (SHA-256 {entry['params_sha256'][:12]}... vs {h[:12]}...). Use another root "
                "or name=, or delete the folder.")


def _chunk_is_valid(folder: Path, entry: Mapping[str, Any], params_sha: str) -> str | None:
    """SHA-256 of the chunk file if it exists, loads, and holds the expected parameters; else None."""
    path = folder / storage.chunk_name(entry["index"])
    if not path.is_file():
        return None
    try:
        digest = storage.sha256_file(path)
        if entry.get("sha256") is not None and digest != entry["sha256"]:
            return None
        arrays = storage.load_chunk(path)
    except Exception as exc:  # unreadable / not an npz (OSError, ValueError, BadZipFile, ...)
        warnings.warn(f"ignoring unreadable chunk file {path} ({exc}); it will be recomputed", stacklevel=4)
        return None
    stored = arrays.get("params_sha256")
    if stored is None or str(stored) != params_sha or len(arrays.get("status", ())) != entry["count"]:
        return None
    return digest


# ---------------------------------------------------------------------- executors
@contextlib.contextmanager
def _ray_session(address: str) -> Iterator[Any]:
    """Import Ray and connect to ``address`` unless Ray is initialized; disconnect on exit if we connected."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "ray_address was given but Ray is not installed; install it with `pip install 'amortcvx[ray]'` "
            "(or `pip install ray`), or leave ray_address=None to use local processes") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _run_local(tasks: Iterator[tuple[int, list]], solve_args: tuple, workers: int | None, on_done) -> None:
    for k, instances in tasks:
        on_done(k, _solve_chunk(instances, *solve_args, workers))


def _run_ray(tasks: Iterator[tuple[int, list]], solve_args: tuple, address: str, on_done,
             max_in_flight: int | None) -> None:
    with _ray_session(address) as ray:
        remote = ray.remote(num_cpus=1)(_solve_chunk)
        if max_in_flight is None:
            max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        in_flight: dict[Any, int] = {}
        tasks = iter(tasks)
        exhausted = False
        try:
            while in_flight or not exhausted:
                while not exhausted and len(in_flight) < max_in_flight:
                    item = next(tasks, None)
                    if item is None:
                        exhausted = True
                        break
                    k, instances = item
                    in_flight[remote.remote(instances, *solve_args, 1)] = k
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    k = in_flight.pop(ref)
                    on_done(k, ray.get(ref))
        finally:
            for ref in in_flight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)


# ---------------------------------------------------------------------- public API
def generate_dataset(pp: ParametricProblem, params: Mapping[str, np.ndarray], backend: str,
                     root: str | Path, *, chunk_size: int = 256, settings: Mapping[str, Any] | None = None,
                     name: str | None = None, exact_iterations: bool = False, workers: int | None = None,
                     ray_address: str | None = None, max_in_flight: int | None = None,
                     progress: bool = True) -> Dataset:
    """Solve every instance of a parameter batch and store the solutions on disk (resumable).

    For each ``theta_i`` (row ``i`` of ``params``) the canonical data ``pp.canonicalize(theta_i)`` is solved
    by ``backend`` and the folder ``root/<pp.fingerprint>-<backend>[-<name>]`` receives, in chunks of
    ``chunk_size`` instances, ``theta_i``, the primal-dual solution ``x*_i`` (n), ``y*_i`` (m), ``s*_i``
    (m, SCS only), the status, iteration count, objective value (the backend's ``1/2 x'Px + c'x + offset``,
    i.e. CVXPY's optimal value) and the setup/solve times.

    A rerun with the same inputs keeps every finished chunk (after checking its content hash) and computes
    only the others; a run that finds a folder made for another problem, backend, settings or parameters
    raises :class:`~amortcvx.datasets.storage.DatasetError`. Solver failures never raise: they are recorded
    in ``status`` (rows whose status is not ``optimal``/``optimal_inaccurate`` hold NaN) and
    ``Dataset.ok`` masks them out.

    Args:
        pp: the compiled problem; its ``form`` must be the backend's (``"cone"`` for scs, ``"qp"`` for osqp).
        params: name -> array ``(N, *shape)`` for every parameter of ``pp`` (numpy or torch; copied).
        backend: ``"scs"`` or ``"osqp"``.
        root: parent folder of the dataset folder (created if needed).
        chunk_size: instances per chunk file (the unit of resumption and of Ray tasks).
        settings: solver settings overriding :data:`DEFAULT_SETTINGS` (eps_abs = eps_rel = 1e-8, high
            iteration limits); the caller's mapping is not modified.
        name: optional suffix of the folder name, to keep several datasets of one problem and backend
            (e.g. ``"train"`` / ``"test"``) under one root. Letters, digits, ``_ . -``.
        exact_iterations: passed to the backend: count iterations exactly (slower: per-iteration termination
            checks). With False the counts are those the solver reports (multiples of 25 for SCS).
        workers: processes for the local path (``backends.solve_batch``): None -> ``os.cpu_count()``,
            1 -> in this process. Ray tasks always solve in their own process (one CPU each).
        ray_address: run each chunk as a Ray task: ``"local"`` starts a local Ray, ``"auto"`` or an address
            connects to a cluster; if Ray is already initialized it is used as is. The folder must be on this
            machine (results come back to this process, which writes them).
        max_in_flight: Ray only: the most chunk tasks submitted at once (default twice the cluster's CPUs).
        progress: show a tqdm progress bar over instances.

    Returns:
        The finished :class:`Dataset`.

    Raises:
        ValueError: bad parameters (naming the parameter and shape), backend, chunk size or name.
        DatasetError: the folder holds another dataset.
        ImportError: ``ray_address`` given but Ray is not installed.
        RuntimeError: another process is generating into the same folder.
    """
    _check_not_bootstrapping()
    backend = _check_backend(pp, backend)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    chunk_size = int(chunk_size)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                or workers < 1):
        raise ValueError(f"workers must be None or a positive int; got {workers!r}")
    if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
        raise ValueError(f"name must be letters, digits, '_', '.', '-' (no leading/trailing '-'); "
                         f"got {name!r}")
    if ray_address is not None and not isinstance(ray_address, str):
        raise TypeError(f"ray_address must be None or a str; got {type(ray_address).__name__}")
    arrays, num = _validate_params(pp, params)
    eff = effective_settings(backend, settings)
    names = list(pp.parameter_shapes)
    bounds = _chunk_bounds(num, chunk_size)
    hashes = [storage.params_hash({k: v[a:b] for k, v in arrays.items()}, names) for a, b in bounds]
    spec = _spec(pp, backend, eff, exact_iterations, name)

    folder = Path(root) / dataset_dirname(pp.fingerprint, backend, name)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _generate_into(folder, pp, arrays, backend, eff, exact_iterations, spec, num, chunk_size, hashes, bounds,
                       names, workers, ray_address, max_in_flight, progress)
    except BaseException:
        if created and not (folder / storage.MANIFEST).exists():
            # Nothing was solved (e.g. a typo in a solver setting): leave no trace, so that the corrected
            # rerun starts afresh instead of meeting a folder that looks like another dataset.
            with contextlib.suppress(OSError):
                storage.remove_stale_temporaries(folder)
                (folder / storage.LOCK).unlink(missing_ok=True)
                folder.rmdir()
        raise
    return Dataset.open(folder, pp)


def _check_not_bootstrapping() -> None:
    """Refuse to run while a spawned process is still importing its ``__main__`` module.

    Worker processes are spawned: each re-imports the script that started them. A script that calls
    :func:`generate_dataset` outside an ``if __name__ == "__main__":`` guard would call it again in every
    worker, which would then meet the parent's lock (a misleading "another process is generating" error).
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "generate_dataset was called while a worker process was starting: worker processes are spawned "
            "and re-import the __main__ module, so a script that calls generate_dataset (or solve_batch) must "
            "do so under `if __name__ == '__main__':`; or pass workers=1 to solve in this process")


def _generate_into(folder: Path, pp: ParametricProblem, arrays: dict[str, np.ndarray], backend: str,
                   eff: dict[str, Any], exact_iterations: bool, spec: dict[str, Any], num: int, chunk_size: int,
                   hashes: list[str], bounds: list[tuple[int, int]], names: list[str], workers: int | None,
                   ray_address: str | None, max_in_flight: int | None, progress: bool) -> None:
    """The locked part of :func:`generate_dataset`: check or create the manifest, solve the pending chunks."""
    with storage.folder_lock(folder):
        storage.remove_stale_temporaries(folder)
        if (folder / storage.MANIFEST).exists():
            manifest = storage.read_manifest(folder)
            _check_same(folder, manifest, spec, num, chunk_size, hashes)
        else:
            # Written with the first finished chunk: a run that fails before any solve (bad settings, workers
            # that cannot start) leaves no manifest behind.
            manifest = _new_manifest(spec, num, chunk_size, hashes, bounds, pp.objective_sign)
        # stored objective = canonical (minimization) value * this; 1 in manifests written before the key
        stored_sign = float(manifest.get("objective_sign", 1.0))

        # Keep the finished chunks that are intact; adopt complete files the manifest missed.
        pending = []
        changed = False
        for entry in manifest["chunks"]:
            digest = _chunk_is_valid(folder, entry, entry["params_sha256"])
            if digest is None:
                if entry["sha256"] is not None:
                    warnings.warn(f"chunk {entry['index']} of {folder} is missing or damaged; recomputing it",
                                  stacklevel=3)
                    entry["file"], entry["sha256"] = None, None
                    changed = True
                pending.append(entry["index"])
            elif entry["sha256"] != digest:
                entry["file"], entry["sha256"] = storage.chunk_name(entry["index"]), digest
                changed = True
        if not pending and not manifest.get("complete"):
            manifest["complete"] = True
            changed = True
        if changed:
            storage.write_manifest(folder, manifest)

        if pending:
            from tqdm.auto import tqdm

            pending_set = set(pending)
            done = sum(e["count"] for e in manifest["chunks"] if e["index"] not in pending_set)
            bar = tqdm(total=num, initial=done, unit="inst", desc=folder.name,
                       disable=not progress)

            def tasks() -> Iterator[tuple[int, list]]:
                for k in pending:
                    a, b = bounds[k]
                    data = pp.canonicalize({n_: v[a:b] for n_, v in arrays.items()})
                    yield k, data.instances()

            def on_done(k: int, solved: dict[str, np.ndarray]) -> None:
                a, b = bounds[k]
                chunk = {f"param_{j}": arrays[n_][a:b] for j, n_ in enumerate(names)}
                chunk["params_sha256"] = np.array(hashes[k])
                chunk.update(solved)
                chunk["objective"] = stored_sign * np.asarray(solved["objective"], dtype=np.float64)
                blob = storage.encode_chunk(chunk)
                storage.atomic_write_bytes(folder / storage.chunk_name(k), blob)
                entry = manifest["chunks"][k]
                entry["file"], entry["sha256"] = storage.chunk_name(k), storage.sha256_bytes(blob)
                manifest["complete"] = all(e["sha256"] is not None for e in manifest["chunks"])
                storage.write_manifest(folder, manifest)
                bar.update(b - a)

            solve_args = (backend, eff, bool(exact_iterations))
            try:
                if ray_address is None:
                    _run_local(tasks(), solve_args, workers, on_done)
                else:
                    _run_ray(tasks(), solve_args, ray_address, on_done, max_in_flight)
            finally:
                bar.close()


def generate_family_dataset(family: Family, num: int, seed: int, backend: str, root: str | Path, *,
                            name: str | None = None, **kwargs: Any) -> Dataset:
    """Sample ``family.sample(num, seed)`` and pass it to :func:`generate_dataset`.

    The problem is compiled with the backend's form (``"cone"`` for scs, ``"qp"`` for osqp). The folder name
    defaults to ``<family.name>-n<num>-seed<seed>`` so that, e.g., a training and a test set of one family
    live side by side under one root.

    Args:
        family: a :class:`Family`, e.g. ``amortcvx.problems.make(...)``.
        num: number of instances.
        seed: seed of the parameter draws.
        backend: ``"scs"`` or ``"osqp"``.
        root: parent folder.
        name: folder name suffix (see above for the default).
        **kwargs: keyword arguments of :func:`generate_dataset`.
    """
    pp = ParametricProblem(family.problem, form=get_solver(backend, what="backend").form)
    params = family.sample(num, seed)
    if name is None:
        name = f"{family.name}-n{num}-seed{seed}"
    return generate_dataset(pp, params, backend, root, name=name, **kwargs)
