"""Tests of amortcvx.datasets: generation, storage, resumption after crashes, mismatches, Ray, Dataset API."""

from __future__ import annotations

import json
import shutil
import sys

import cvxpy as cp
import numpy as np
import pytest
import torch

from amortcvx import problems
from amortcvx.backends import solve
from amortcvx.canon import ParametricProblem
from amortcvx.datasets import (
    Dataset,
    DatasetError,
    effective_settings,
    generate,
    generate_dataset,
    generate_family_dataset,
    storage,
)
from amortcvx.solvers import FORMS

REAL_SOLVE_CHUNK = generate._solve_chunk
N = 10
CHUNK = 4  # 3 chunks: 4 + 4 + 2


def tiny_problem(n: int = 4, weight: float = 1.0) -> cp.Problem:
    """min w ||x||^2 + c'x  s.t.  x >= lo, sum(x) <= 1  (infeasible when sum(lo) > 1)."""
    x = cp.Variable(n, name="x")
    c = cp.Parameter(n, name="c")
    lo = cp.Parameter(n, name="lo")
    return cp.Problem(cp.Minimize(weight * cp.sum_squares(x) + c @ x), [x >= lo, cp.sum(x) <= 1])


def tiny_params(num: int = N, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"c": rng.standard_normal((num, n)), "lo": -1.0 + 0.1 * rng.standard_normal((num, n))}


def gen(pp, params, backend, root, **kwargs):
    kwargs.setdefault("chunk_size", CHUNK)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 1)
    return generate_dataset(pp, params, backend, root, **kwargs)


def assert_same_results(a: Dataset, b: Dataset) -> None:
    assert len(a) == len(b)
    for key in a.params:
        np.testing.assert_array_equal(a.params[key], b.params[key])
    for field in ("x", "y", "s", "objective"):
        va, vb = getattr(a, field), getattr(b, field)
        if va is None:
            assert vb is None
        else:
            np.testing.assert_array_equal(va, vb)  # same solver, same input: bit-identical
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.iterations, b.iterations)


@pytest.fixture(scope="module", params=["scs", "osqp"])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def pp_by_backend():
    return {b: ParametricProblem(tiny_problem(), form=f) for b, f in FORMS.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pp_by_backend):
    """An uninterrupted run of each backend, shared by the tests that compare against it."""
    root = tmp_path_factory.mktemp("reference")
    return {b: gen(pp_by_backend[b], tiny_params(), b, root) for b in FORMS}


# ---------------------------------------------------------------------- generation
def test_generation_shapes_manifest_and_solutions_match_backend(backend, pp_by_backend, reference, tmp_path):
    pp = pp_by_backend[backend]
    params = tiny_params()
    ds = reference[backend]
    assert ds.path.name == f"{pp.fingerprint}-{backend}"
    assert len(ds) == N and ds.ok.all()
    assert ds.x.shape == (N, pp.n) and ds.y.shape == (N, pp.m)
    assert (ds.s.shape == (N, pp.m)) if backend == "scs" else ds.s is None
    assert ds.status.shape == ds.iterations.shape == ds.objective.shape == (N,)
    assert np.all(ds.iterations > 0)
    np.testing.assert_array_equal(ds.index, np.arange(N))
    for key in params:
        np.testing.assert_array_equal(ds.params[key], params[key])

    man = json.loads((ds.path / "manifest.json").read_text())
    assert man["fingerprint"] == pp.fingerprint and man["backend"] == backend
    assert man["form"] == FORMS[backend]
    assert man["num_instances"] == N and man["chunk_size"] == CHUNK and man["complete"] is True
    assert man["settings"]["eps_abs"] == 1e-8 and man["settings"]["eps_rel"] == 1e-8
    assert man["parameters"] == [[k, list(v)] for k, v in pp.parameter_shapes.items()]
    assert (man["n"], man["m"]) == (pp.n, pp.m)
    assert man["versions"]["amortcvx"]
    assert [e["count"] for e in man["chunks"]] == [4, 4, 2]
    for e in man["chunks"]:
        assert storage.sha256_file(ds.path / e["file"]) == e["sha256"]

    # The stored solutions are the backend's on the same instances, with the same settings.
    data = pp.canonicalize(params)
    settings = effective_settings(backend, None)
    for i in (0, 5, N - 1):
        res = solve(data.instance(i), backend, settings=settings, exact_iterations=False)
        np.testing.assert_allclose(ds.x[i], res.x, rtol=0, atol=1e-9)
        np.testing.assert_allclose(ds.y[i], res.y, rtol=0, atol=1e-9)
        if backend == "scs":
            np.testing.assert_allclose(ds.s[i], res.s, rtol=0, atol=1e-9)
        assert ds.iterations[i] == res.iterations
        assert ds.objective[i] == pytest.approx(res.objective, abs=1e-9)

    # ... and they solve the CVXPY problem (to the tight default tolerance).
    prob = tiny_problem()
    pars = {p.name(): p for p in prob.parameters()}
    for key, p in pars.items():
        p.value = params[key][3]
    prob.solve(solver=cp.CLARABEL)
    sol = pp.recover(ds.x[3], ds.y[3])
    np.testing.assert_allclose(sol.variables["x"], prob.variables()[0].value, atol=1e-5)
    assert ds.objective[3] == pytest.approx(prob.value, abs=1e-5)


def test_rerun_of_a_finished_dataset_solves_nothing(pp_by_backend, reference, tmp_path, monkeypatch):
    src = reference["scs"].path
    root = tmp_path / "root"
    shutil.copytree(src, root / src.name)
    calls = []
    monkeypatch.setattr(generate, "_solve_chunk", lambda *a, **k: calls.append(1))
    ds = gen(pp_by_backend["scs"], tiny_params(), "scs", root)
    assert calls == []
    assert_same_results(ds, reference["scs"])


def test_infeasible_instance_is_recorded_and_masked(backend, pp_by_backend, tmp_path):
    params = tiny_params(num=5)
    params["lo"][2] = 1.0  # sum(lo) = 4 > 1: infeasible
    ds = gen(pp_by_backend[backend], params, backend, tmp_path)
    assert ds.status[2] == "infeasible"
    np.testing.assert_array_equal(ds.ok, [True, True, False, True, True])
    assert np.isnan(ds.x[2]).all() and np.isnan(ds.y[2]).all() and np.isnan(ds.objective[2])
    assert np.isfinite(ds.x[ds.ok]).all() and np.isfinite(ds.y[ds.ok]).all()
    assert ds.subset(ds.ok).status.tolist() == ["optimal"] * 4


# ---------------------------------------------------------------------- interruption and resumption
class Crash(RuntimeError):
    pass


def crash_after(monkeypatch, num_ok: int) -> list[int]:
    """Make the chunk solver raise after ``num_ok`` successful chunks; returns the list of calls."""
    real = REAL_SOLVE_CHUNK
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > num_ok:
            raise Crash("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "_solve_chunk", flaky)
    return calls


def test_crash_in_the_middle_keeps_finished_chunks_and_rerun_completes(backend, pp_by_backend, reference,
                                                                        tmp_path, monkeypatch):
    pp, params = pp_by_backend[backend], tiny_params()
    crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        gen(pp, params, backend, tmp_path)
    folder = tmp_path / f"{pp.fingerprint}-{backend}"
    man = storage.read_manifest(folder)
    assert man["complete"] is False
    assert [e["sha256"] is not None for e in man["chunks"]] == [True, True, False]
    with pytest.raises(DatasetError, match="unfinished"):
        Dataset.open(folder)
    part = Dataset.open(folder, allow_partial=True)  # the finished chunks are valid
    assert len(part) == 2 * CHUNK
    assert_same_results(part, reference[backend].subset(np.arange(2 * CHUNK)))

    calls = crash_after(monkeypatch, 100)
    ds = gen(pp, params, backend, tmp_path)
    assert len(calls) == 1  # only the missing chunk was solved
    assert_same_results(ds, reference[backend])
    assert storage.read_manifest(folder)["complete"] is True


def test_crash_while_writing_a_chunk_leaves_nothing_that_is_read(pp_by_backend, reference, tmp_path,
                                                                 monkeypatch):
    pp, params = pp_by_backend["scs"], tiny_params()
    folder = tmp_path / f"{pp.fingerprint}-scs"
    real_replace = storage._replace
    left_behind = folder / ".chunk-00001.npz.tmp-99999-deadbeef"

    def dying_replace(src, dst):
        if str(dst).endswith("chunk-00001.npz"):
            # What a killed process leaves: a truncated temporary file, and no file under the final name.
            left_behind.write_bytes(open(src, "rb").read()[:100])
            raise Crash("killed during the write of chunk 1")
        return real_replace(src, dst)

    monkeypatch.setattr(storage, "_replace", dying_replace)
    with pytest.raises(Crash):
        gen(pp, params, "scs", tmp_path)
    monkeypatch.setattr(storage, "_replace", real_replace)
    assert left_behind.exists() and not (folder / "chunk-00001.npz").exists()
    part = Dataset.open(folder, allow_partial=True)
    assert len(part) == CHUNK  # chunk 0 only; the temporary file is not read
    # A truncated file under a final name that the manifest does not list (copied by hand?) is ignored too.
    (folder / "chunk-00002.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="unreadable chunk"):
        ds = gen(pp, params, "scs", tmp_path)
    assert not left_behind.exists()  # stale temporaries are cleaned by the next run
    assert_same_results(ds, reference["scs"])


def test_chunk_written_but_manifest_not_updated_is_adopted(pp_by_backend, reference, tmp_path, monkeypatch):
    pp, params = pp_by_backend["osqp"], tiny_params()
    real_write = storage.write_manifest
    writes = []

    def dying_write(folder, manifest):
        writes.append(1)
        if len(writes) == 2:  # the manifest is first written with chunk 0; crash after chunk 1 is on disk
            raise Crash("killed before the manifest update")
        return real_write(folder, manifest)

    monkeypatch.setattr(storage, "write_manifest", dying_write)
    with pytest.raises(Crash):
        gen(pp, params, "osqp", tmp_path)
    monkeypatch.setattr(storage, "write_manifest", real_write)
    calls = crash_after(monkeypatch, 100)
    ds = gen(pp, params, "osqp", tmp_path)
    assert len(calls) == 1  # chunk 1 was adopted from disk, only chunk 2 was solved
    assert_same_results(ds, reference["osqp"])


def test_damaged_chunk_is_detected_and_recomputed(pp_by_backend, reference, tmp_path):
    pp, params = pp_by_backend["scs"], tiny_params()
    ds = gen(pp, params, "scs", tmp_path)
    path = ds.path / "chunk-00001.npz"
    blob = bytearray(path.read_bytes())
    blob[-200] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match="SHA-256"):
        Dataset.open(ds.path)
    with pytest.warns(UserWarning, match="damaged"):
        ds2 = gen(pp, params, "scs", tmp_path)
    assert_same_results(ds2, reference["scs"])


# ---------------------------------------------------------------------- mismatches
def test_folder_of_another_problem_is_a_clear_error(pp_by_backend, reference, tmp_path):
    other = ParametricProblem(tiny_problem(weight=2.0), form="cone")
    assert other.fingerprint != pp_by_backend["scs"].fingerprint
    src = reference["scs"].path
    with pytest.raises(DatasetError, match=f"{src.name[:16]}.*{other.fingerprint}"):
        Dataset.open(src, pp=other)
    with pytest.raises(DatasetError, match="backend 'scs', not 'osqp'"):
        Dataset.open(src, backend="osqp")
    # A folder under the other problem's name that holds this problem's data.
    shutil.copytree(src, tmp_path / f"{other.fingerprint}-scs")
    with pytest.raises(DatasetError, match="problem fingerprint"):
        gen(other, tiny_params(), "scs", tmp_path)
    # Looking up under a root by problem finds nothing for the other problem.
    with pytest.raises(FileNotFoundError, match=other.fingerprint):
        Dataset.open(src.parent, pp=other)
    assert len(Dataset.open(src.parent, pp=pp_by_backend["scs"], backend="scs")) == N


def test_other_settings_or_parameters_in_the_same_folder_are_clear_errors(pp_by_backend, tmp_path):
    pp = pp_by_backend["osqp"]
    params = tiny_params(num=3)
    gen(pp, params, "osqp", tmp_path)
    with pytest.raises(DatasetError, match="solver settings"):
        gen(pp, params, "osqp", tmp_path, settings={"eps_abs": 1e-6})
    with pytest.raises(DatasetError, match="different dataset"):
        gen(pp, tiny_params(num=3, seed=1), "osqp", tmp_path)
    with pytest.raises(DatasetError, match="different dataset"):
        gen(pp, params, "osqp", tmp_path, chunk_size=2)
    # A name keeps a second dataset of the same problem beside the first.
    ds = gen(pp, tiny_params(num=3, seed=1), "osqp", tmp_path, name="test")
    assert ds.path.name.endswith("-osqp-test") and len(ds) == 3
    with pytest.raises(DatasetError, match="several datasets"):
        Dataset.open(tmp_path, pp=pp)
    assert Dataset.open(tmp_path, pp=pp, name="test").path == ds.path


def test_bad_inputs_name_the_fault(pp_by_backend, tmp_path):
    pp = pp_by_backend["scs"]
    params = tiny_params(num=3)
    with pytest.raises(ValueError, match="form 'qp'"):
        gen(pp, params, "osqp", tmp_path)
    with pytest.raises(ValueError, match="unknown backend"):
        gen(pp, params, "gurobi", tmp_path)
    with pytest.raises(ValueError, match="missing.*lo"):
        gen(pp, {"c": params["c"]}, "scs", tmp_path)
    with pytest.raises(ValueError, match="'lo'.*shape"):
        gen(pp, {"c": params["c"], "lo": params["lo"][0]}, "scs", tmp_path)
    with pytest.raises(ValueError, match="'lo' has 2 instances"):
        gen(pp, {"c": params["c"], "lo": params["lo"][:2]}, "scs", tmp_path)
    with pytest.raises(ValueError, match="chunk_size"):
        gen(pp, params, "scs", tmp_path, chunk_size=0)
    with pytest.raises(ValueError, match="name"):
        gen(pp, params, "scs", tmp_path, name="../x")
    with pytest.raises(TypeError, match="setting 'eps_abs'"):
        gen(pp, params, "scs", tmp_path, settings={"eps_abs": [1e-3]})
    bad = {k: v.copy() for k, v in params.items()}
    bad["c"][1, 0] = np.nan
    with pytest.raises(ValueError, match="'c'.*NaN"):
        gen(pp, bad, "scs", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was created for bad input


def test_second_generator_on_the_same_folder_is_refused(pp_by_backend, tmp_path):
    pp = pp_by_backend["scs"]
    folder = tmp_path / f"{pp.fingerprint}-scs"
    folder.mkdir()
    with storage.folder_lock(folder):
        with pytest.raises(RuntimeError, match="another process"):
            gen(pp, tiny_params(num=2), "scs", tmp_path)


# ---------------------------------------------------------------------- Dataset API
def test_dataset_split_subset_and_torch(reference):
    ds = reference["scs"]
    a, b = ds.split((0.8, 0.2), seed=3)
    assert len(a) == 8 and len(b) == 2
    assert np.intersect1d(a, b).size == 0 and np.union1d(a, b).tolist() == list(range(N))
    a2, b2 = ds.split((0.8, 0.2), seed=3)
    np.testing.assert_array_equal(a, a2)
    assert not all(np.array_equal(p, q) for p, q in zip(ds.split(seed=4), (a, b), strict=True))
    first, rest = ds.split((0.3, 0.7), shuffle=False)
    np.testing.assert_array_equal(first, [0, 1, 2])
    assert sum(len(p) for p in ds.split((0.5, 0.2))) == 7  # fractions below 1 leave rows out
    with pytest.raises(ValueError, match="sum to at most 1"):
        ds.split((0.8, 0.8))

    sub = ds.subset(b)
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.index, b)
    np.testing.assert_array_equal(sub.x, ds.x[b])
    np.testing.assert_array_equal(sub.params["c"], ds.params["c"][b])
    assert len(ds.subset(slice(2, 5))) == 3
    with pytest.raises(ValueError, match="boolean mask"):
        ds.subset(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="read-only"):
        ds.x[0, 0] = 1.0

    tp = ds.torch_params(device="cpu", dtype=torch.float32)
    assert set(tp) == {"c", "lo"} and tp["c"].dtype == torch.float32 and tp["c"].shape == (N, 4)
    x, y, s = ds.torch_solution(dtype=torch.float64)
    assert x.shape == (N, ds.n) and s.shape == (N, ds.m)
    # The stored parameters map to the stored problem: canonicalize(torch_params) is what was solved.
    pp = ParametricProblem(tiny_problem(), form="cone")
    data = pp.canonicalize(ds.torch_params())
    res = solve(data.instance(7), "scs", settings=ds.settings, exact_iterations=False)
    np.testing.assert_allclose(res.x, ds.x[7], atol=1e-9)
    assert "10 instances" in repr(ds)


def test_generate_family_dataset(tmp_path):
    fam = problems.make("lasso", size="small", seed=0)
    ds = generate_family_dataset(fam, 3, 1, "osqp", tmp_path, chunk_size=2, workers=1,
                                 progress=False)
    assert len(ds) == 3 and ds.path.name.endswith("-osqp-lasso-n3-seed1")
    assert ds.ok.all()
    for key, value in fam.sample(3, 1).items():
        np.testing.assert_array_equal(ds.params[key], value)


# ---------------------------------------------------------------------- Ray
def test_missing_ray_is_a_clear_import_error(pp_by_backend, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'amortcvx\[ray\]'"):
        gen(pp_by_backend["scs"], tiny_params(num=2), "scs", tmp_path, ray_address="local")


def test_ray_gives_the_same_dataset_as_processes(pp_by_backend, tmp_path):
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed (the README's install has no extras; `pip install -e .[test]` or "
                      "`pip install 'amortcvx[ray]'` adds it, as .ci/run does)")
    pp, params = pp_by_backend["scs"], tiny_params()
    with_processes = gen(pp, params, "scs", tmp_path / "processes", workers=2)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with_ray = gen(pp, params, "scs", tmp_path / "ray", ray_address="local")
        assert ray.is_initialized()  # a Ray we did not start is left running
    finally:
        ray.shutdown()
    assert_same_results(with_ray, with_processes)
    man_a = storage.read_manifest(with_ray.path)
    man_b = storage.read_manifest(with_processes.path)
    assert [e["params_sha256"] for e in man_a["chunks"]] == [e["params_sha256"] for e in man_b["chunks"]]
