"""Differentiable solver layers: SCS 3 and OSQP 1 fixed-point iterations in torch.

Each algorithm is a pair of pure functions ``init`` / ``step`` over a NamedTuple state, batched over
instances, on any device, differentiable by unrolling. :func:`make_algorithm` binds one to a batch of
canonical data (:class:`~amortcvx.canon.ConeData` for ``"scs"``, :class:`~amortcvx.canon.QPData` for
``"osqp"``); the loops of :mod:`.loop` run it for ``k`` steps, to a tolerance, or unrolled for
backpropagation. See ``docs/iterations.md``.

Beside them, :mod:`.kkt` writes a canonical problem's optimality conditions as one equation and provides its
Newton refinement and implicit differentiation (with :mod:`.krylov` for the matrix-free solves); deployment's
certified finish, training's solution derivatives and the torch layer build on it (``docs/layers.md``).
"""

from amortcvx.iterations.linalg import FactorCache, KKTSolver
from amortcvx.iterations.loop import (
    AndersonSettings,
    FixedPointAlgorithm,
    LoopResult,
    run,
    run_to_tolerance,
    unroll,
)
from amortcvx.iterations.osqp import (
    OsqpSettings,
    OsqpSolution,
    OsqpState,
    OsqpWork,
    osqp_init,
    osqp_residual,
    osqp_setup,
    osqp_solution,
    osqp_step,
)
from amortcvx.iterations.polish import check_polishable, equality_qp
from amortcvx.iterations.registry import ALGORITHMS, DATA_FORMS, make_algorithm, make_osqp, make_scs
from amortcvx.iterations.scs import (
    ScsCOutput,
    ScsSettings,
    ScsSolution,
    ScsState,
    ScsWork,
    scs_c_output,
    scs_init,
    scs_residual,
    scs_rsk,
    scs_setup,
    scs_solution,
    scs_step,
)

__all__ = [
    "ALGORITHMS", "AndersonSettings", "DATA_FORMS", "FactorCache", "FixedPointAlgorithm", "KKTSolver", "LoopResult",
    "OsqpSettings",
    "OsqpSolution", "OsqpState", "OsqpWork", "ScsCOutput", "ScsSettings", "ScsSolution", "ScsState", "ScsWork",
    "check_polishable", "equality_qp", "make_algorithm", "make_osqp", "make_scs", "osqp_init", "osqp_residual",
    "osqp_setup", "osqp_solution", "osqp_step", "run", "run_to_tolerance", "scs_c_output", "scs_init", "scs_residual",
    "scs_rsk", "scs_setup", "scs_solution", "scs_step", "unroll",
]
