"""Load side of a dataset of solved instances: :class:`Dataset`."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from amortcvx.datasets import storage
from amortcvx.datasets.storage import DatasetError

if TYPE_CHECKING:  # pragma: no cover
    from amortcvx.canon import ParametricProblem


def dataset_dirname(fingerprint: str, backend: str, name: str | None = None) -> str:
    """Folder name of a dataset: ``<fingerprint>-<backend>`` or ``<fingerprint>-<backend>-<name>``."""
    return f"{fingerprint}-{backend}" + (f"-{name}" if name else "")


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class Dataset:
    """Solved instances of one parametric problem, loaded from a dataset folder.

    Row ``i`` of every array is instance ``index[i]`` of the generated batch: its parameters ``theta_i`` and
    the backend's solution of ``min 1/2 x'Px + c'x  s.t.  Ax + s = b, s in K`` (SCS) or
    ``min 1/2 x'Px + q'x  s.t.  l <= Ax <= u`` (OSQP) in canonical coordinates. Rows whose status is not
    ``optimal`` / ``optimal_inaccurate`` hold NaN in ``x``, ``y``, ``s`` and ``objective``; use :attr:`ok`.
    Arrays are read-only.

    Attributes:
        path: the dataset folder.
        manifest: the folder's manifest (a private copy).
        params: parameter name -> array ``(N, *shape)``.
        x: primal solutions ``(N, n)``.
        y: dual solutions ``(N, m)``.
        s: SCS slacks ``(N, m)``, or None for OSQP.
        status: status strings ``(N,)`` (values of ``amortcvx.backends.Status``).
        iterations: iteration counts ``(N,)`` (-1 when unknown).
        objective: optimal values ``(N,)`` in CVXPY's sign (``problem.value``): the backend's canonical
            ``1/2 x'Px + c'x + offset`` times ``ParametricProblem.objective_sign`` (-1 for ``cp.Maximize``).
        setup_time: solver setup times in seconds ``(N,)``.
        solve_time: solver solve times in seconds ``(N,)``.
        index: position of each row in the generated batch ``(N,)``.
    """

    path: Path
    manifest: Mapping[str, Any]
    params: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    s: np.ndarray | None
    status: np.ndarray
    iterations: np.ndarray
    objective: np.ndarray
    setup_time: np.ndarray
    solve_time: np.ndarray
    index: np.ndarray

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root_or_dir: str | Path, pp: ParametricProblem | None = None, backend: str | None = None, *,
             name: str | None = None, verify: bool = True, allow_partial: bool = False) -> Dataset:
        """Load a dataset folder, or find one under a root folder.

        Args:
            root_or_dir: a dataset folder (holding ``manifest.json``), or the ``root`` given to
                ``generate_dataset``; in that case the dataset is looked up among its sub-folders by
                ``pp``'s fingerprint, ``backend`` and ``name`` (exactly one must match).
            pp: when given, the dataset's fingerprint, form and parameter shapes must be ``pp``'s.
            backend: when given, the dataset's backend must be this one.
            name: when given, the dataset's name must be this one.
            verify: check each chunk file against the SHA-256 recorded in the manifest.
            allow_partial: load the finished chunks of an unfinished dataset instead of raising.

        Raises:
            FileNotFoundError: no dataset folder found.
            DatasetError: a mismatch with ``pp`` / ``backend`` / ``name`` (naming both values), several
                candidate folders, an unfinished dataset (unless ``allow_partial``) or a damaged chunk.
        """
        path = Path(root_or_dir)
        if (path / storage.MANIFEST).is_file():
            folder = path
        elif path.is_dir():
            folder = _find(path, pp, backend, name)
        else:
            raise FileNotFoundError(f"{path} is neither a dataset folder nor a root folder of datasets")
        manifest = storage.read_manifest(folder)
        _check_matches(folder, manifest, pp, backend, name)
        # Datasets written before the manifest recorded "objective_sign" hold the canonical (minimization)
        # value; with the problem at hand it is turned into CVXPY's value.
        flip = pp.objective_sign if pp is not None and "objective_sign" not in manifest else 1.0
        return _load(folder, manifest, verify=verify, allow_partial=allow_partial, objective_sign=flip)

    # ------------------------------------------------------------------ description
    @property
    def fingerprint(self) -> str:
        """Fingerprint of the problem the instances were generated for (``ParametricProblem.fingerprint``)."""
        return self.manifest["fingerprint"]

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def form(self) -> str:
        return self.manifest["form"]

    @property
    def settings(self) -> dict[str, Any]:
        """Solver settings used to compute the solutions (a copy)."""
        return dict(self.manifest["settings"])

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def m(self) -> int:
        return int(self.manifest["m"])

    @property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.manifest["parameters"]}

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask ``(N,)`` of the instances solved to ``optimal`` status."""
        return self.status == "optimal"

    def __len__(self) -> int:
        return int(self.status.shape[0])

    def __repr__(self) -> str:
        return (f"Dataset({len(self)} instances, {int(self.ok.sum())} optimal, backend={self.backend!r}, "
                f"n={self.n}, m={self.m}, fingerprint={self.fingerprint!r}, path={str(self.path)!r})")

    # ------------------------------------------------------------------ selection
    def subset(self, idx: np.ndarray | Sequence[int] | slice) -> Dataset:
        """The dataset restricted to rows ``idx`` (integer indices, a boolean mask of length N or a slice)."""
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"a boolean mask must have shape ({len(self)},); got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"idx must hold integers or booleans; got dtype {idx.dtype}")
        idx = idx.ravel()
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for a dataset of {len(self)} instances")

        def take(a):
            return None if a is None else _readonly(a[idx])

        return replace(self, params={k: take(v) for k, v in self.params.items()}, x=take(self.x),
                       y=take(self.y), s=take(self.s), status=take(self.status),
                       iterations=take(self.iterations),
                       objective=take(self.objective), setup_time=take(self.setup_time),
                       solve_time=take(self.solve_time), index=take(self.index))

    def split(self, fractions: Sequence[float] = (0.8, 0.2), seed: int = 0, *,
              shuffle: bool = True) -> tuple[np.ndarray, ...]:
        """Partition the rows into disjoint index arrays of sizes ``~fractions[j] * N``.

        Part ``j`` holds the rows ``perm[round(F_{j-1} N) : round(F_j N)]`` with ``F_j`` the cumulative sum of
        the fractions and ``perm`` a seeded random permutation (the identity when ``shuffle`` is False, which
        keeps trajectories of sequential families together). Fractions summing to less than one leave the
        remaining rows out. Each part is sorted. Use :meth:`subset` to get datasets.
        """
        fr = np.asarray(fractions, dtype=np.float64)
        if fr.ndim != 1 or fr.size == 0 or np.any(fr < 0) or not np.all(np.isfinite(fr)):
            raise ValueError(f"fractions must be a non-empty sequence of numbers >= 0; got {fractions!r}")
        if fr.sum() > 1 + 1e-9:
            raise ValueError(f"fractions must sum to at most 1; got {fractions!r} (sum {fr.sum():g})")
        num = len(self)
        perm = np.random.default_rng(seed).permutation(num) if shuffle else np.arange(num)
        ends = np.minimum(np.round(np.cumsum(fr) * num).astype(np.int64), num)
        starts = np.concatenate([[0], ends[:-1]])
        return tuple(np.sort(perm[a:b]) for a, b in zip(starts, ends, strict=True))

    # ------------------------------------------------------------------ torch
    def torch_params(self, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """Parameters as tensors ``name -> (N, *shape)`` on ``device`` (ready for ``pp.canonicalize``)."""
        return {k: torch.as_tensor(np.array(v), dtype=dtype, device=device) for k, v in self.params.items()}

    def torch_solution(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x, y, s)`` as tensors ``(N, n)``, ``(N, m)``, ``(N, m)`` or None (NaN rows where not ok)."""

        def conv(a):
            return None if a is None else torch.as_tensor(np.array(a), dtype=dtype, device=device)

        return conv(self.x), conv(self.y), conv(self.s)


# ---------------------------------------------------------------------- helpers
def _find(root: Path, pp, backend: str | None, name: str | None) -> Path:
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (sub / storage.MANIFEST).is_file():
            continue
        try:
            man = storage.read_manifest(sub)
        except DatasetError:
            continue
        found.append((sub, man))
    if not found:
        raise FileNotFoundError(f"no dataset folder (with {storage.MANIFEST}) under {root}")
    matches = [(sub, man) for sub, man in found
               if (pp is None or man["fingerprint"] == pp.fingerprint)
               and (backend is None or man["backend"] == backend)
               and (name is None or man.get("name") == name)]
    if not matches:
        want = {"fingerprint": None if pp is None else pp.fingerprint, "backend": backend, "name": name}
        have = [f"{sub.name} (fingerprint {man['fingerprint']}, backend {man['backend']}, "
                f"name {man.get('name')})" for sub, man in found]
        raise FileNotFoundError(f"no dataset under {root} matches {want}; found: {have}")
    if len(matches) > 1:
        raise DatasetError(f"several datasets under {root} match; pass backend= / name= or the folder "
                           f"itself: {[sub.name for sub, _ in matches]}")
    return matches[0][0]


def _check_matches(folder: Path, manifest: Mapping[str, Any], pp, backend: str | None,
                   name: str | None) -> None:
    if pp is not None:
        if manifest["fingerprint"] != pp.fingerprint:
            raise DatasetError(
                f"{folder} was generated for problem fingerprint {manifest['fingerprint']}, but the given "
                f"problem has fingerprint {pp.fingerprint}: the dataset belongs to another problem (or other "
                "constants)")
        if manifest["form"] != pp.form:
            raise DatasetError(f"{folder} holds form {manifest['form']!r}; the given problem has form "
                               f"{pp.form!r}")
        shapes = {k: list(v) for k, v in pp.parameter_shapes.items()}
        if {k: list(v) for k, v in manifest["parameters"]} != shapes:
            raise DatasetError(f"{folder} holds parameters {manifest['parameters']}; the problem has "
                               f"{shapes}")
    if backend is not None and manifest["backend"] != backend:
        raise DatasetError(f"{folder} was generated with backend {manifest['backend']!r}, not {backend!r}")
    if name is not None and manifest.get("name") != name:
        raise DatasetError(f"{folder} has name {manifest.get('name')!r}, not {name!r}")


def _load(folder: Path, manifest: Mapping[str, Any], *, verify: bool, allow_partial: bool,
          objective_sign: float = 1.0) -> Dataset:
    chunks = manifest["chunks"]
    unfinished = [e["index"] for e in chunks if e.get("sha256") is None]
    if unfinished and not allow_partial:
        raise DatasetError(
            f"{folder} is unfinished: {len(chunks) - len(unfinished)} of {len(chunks)} chunks are done "
            f"(missing {unfinished[:10]}{'...' if len(unfinished) > 10 else ''}); rerun generate_dataset "
            "with the same inputs to finish it, or pass allow_partial=True")
    names = [k for k, _ in manifest["parameters"]]
    shapes = [tuple(v) for _, v in manifest["parameters"]]
    n, m = int(manifest["n"]), int(manifest["m"])
    with_s = manifest["backend"] == "scs"
    keys = ["x", "y", *(["s"] if with_s else []), *storage.RESULT_KEYS]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys + [f"param_{j}" for j in range(len(names))]}
    index = []
    for entry in chunks:
        if entry.get("sha256") is None:
            continue
        path = folder / storage.chunk_name(entry["index"])
        if not path.is_file():
            raise DatasetError(f"{path} is listed as finished in the manifest but does not exist")
        if verify and storage.sha256_file(path) != entry["sha256"]:
            raise DatasetError(f"{path} does not match the SHA-256 recorded in the manifest: the file is "
                               "damaged; rerun generate_dataset with the same inputs to recompute it")
        arrays = storage.load_chunk(path)
        count = int(entry["count"])
        for key in parts:
            if key not in arrays:
                raise DatasetError(f"{path} lacks the array {key!r}")
            parts[key].append(arrays[key])
        if arrays["x"].shape != (count, n) or arrays["y"].shape != (count, m):
            raise DatasetError(f"{path} holds x {arrays['x'].shape} / y {arrays['y'].shape}; expected "
                               f"({count}, {n}) / ({count}, {m})")
        index.append(np.arange(entry["start"], entry["start"] + count))

    def cat(key: str, tail: tuple[int, ...], dtype) -> np.ndarray:
        if parts[key]:
            return _readonly(np.concatenate(parts[key]))
        return _readonly(np.empty((0, *tail), dtype=dtype))

    params = {k: cat(f"param_{j}", shapes[j], np.float64) for j, k in enumerate(names)}
    return Dataset(
        path=folder, manifest=copy.deepcopy(dict(manifest)), params=params,
        x=cat("x", (n,), np.float64), y=cat("y", (m,), np.float64),
        s=cat("s", (m,), np.float64) if with_s else None,
        status=cat("status", (), str), iterations=cat("iterations", (), np.int64),
        objective=_readonly(objective_sign * cat("objective", (), np.float64)) if objective_sign != 1.0
        else cat("objective", (), np.float64), setup_time=cat("setup_time", (), np.float64),
        solve_time=cat("solve_time", (), np.float64),
        index=_readonly(np.concatenate(index) if index else np.empty(0, dtype=np.int64)))

