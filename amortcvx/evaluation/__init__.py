"""Evaluation layer: baseline warm starts, exact-count comparisons on the C solvers, reports, experiments.

Usage::

    from amortcvx.evaluation import ExperimentConfig, run_experiment
    result = run_experiment(ExperimentConfig(family="portfolio", algorithm="scs", n_train=1000, n_test=200))
    print(result.table)

or, with warm starts of your own::

    from amortcvx.evaluation import compare, format_table
    cmp = compare(instances, "scs", {"cold": [None] * N, "mine": my_warm_starts},
                  settings={"eps_abs": 1e-4, "eps_rel": 1e-4})
    print(format_table(cmp))

See ``docs/evaluation.md``.
"""

from amortcvx.evaluation.baselines import (
    NearestNeighbor,
    PersistentColdLoop,
    cold_warm_starts,
    episode_ids,
    nearest_neighbor_warm_starts,
    optimum_warm_starts,
    previous_solution_warm_starts,
)
from amortcvx.evaluation.compare import Comparison, StrategyResult, Summary, compare, summarize
from amortcvx.evaluation.experiment import (
    ExperimentConfig,
    ExperimentResult,
    TimingResult,
    check_family_algorithm,
    cold_refined_name,
    environment,
    family_episodes,
    format_timings,
    learned_name,
    measure_end_to_end,
    run_experiment,
    torch_threads,
    write_timings_csv,
)
from amortcvx.evaluation.reports import (
    format_rows,
    format_table,
    plot_iterations_cdf,
    plot_medians,
    write_instances_csv,
    write_summary_csv,
)

__all__ = [
    "PersistentColdLoop",
    "Comparison", "ExperimentConfig", "ExperimentResult", "NearestNeighbor", "StrategyResult", "Summary",
    "TimingResult", "check_family_algorithm", "cold_refined_name", "cold_warm_starts", "compare", "environment",
    "episode_ids", "family_episodes", "format_rows", "format_table", "format_timings", "learned_name",
    "measure_end_to_end", "nearest_neighbor_warm_starts", "optimum_warm_starts", "plot_iterations_cdf",
    "plot_medians", "previous_solution_warm_starts", "run_experiment", "summarize", "torch_threads",
    "write_instances_csv", "write_summary_csv", "write_timings_csv",
]
