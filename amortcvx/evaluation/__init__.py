"""Evaluation layer: baseline warm starts, exact-count comparisons on the C solvers, reports, experiments.

Usage::

    from amortcvx.evaluation import ExperimentConfig, run_experiment
    result = run_experiment(ExperimentConfig(family="portfolio", solver="scs", n_train=1000, n_test=200))
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
from amortcvx.evaluation.config import ExperimentConfig, problem_name
from amortcvx.evaluation.experiment import (
    RUN_FILES,
    ExperimentResult,
    Prepared,
    calibration_notice,
    cold_refined_name,
    evaluate,
    fit,
    format_report,
    learned_name,
    load_config,
    load_source,
    prepare,
    report,
    run_experiment,
)
from amortcvx.evaluation.machine import environment, torch_threads
from amortcvx.evaluation.reports import (
    format_rows,
    format_table,
    plot_iterations_cdf,
    plot_learning_curve,
    plot_medians,
    read_instances_csv,
    write_instances_csv,
    write_summary_csv,
)
from amortcvx.evaluation.sources import (
    ProblemSource,
    bundled_family,
    check_family_algorithm,
    check_sample,
    check_solver,
    family_episodes,
    from_family,
    load_problem_file,
)
from amortcvx.evaluation.timing import (
    TimingResult,
    format_timings,
    measure_end_to_end,
    read_timings_csv,
    write_timings_csv,
)

__all__ = [
    "RUN_FILES", "Comparison", "ExperimentConfig", "ExperimentResult", "NearestNeighbor", "PersistentColdLoop",
    "Prepared", "ProblemSource", "StrategyResult", "Summary", "TimingResult", "bundled_family", "calibration_notice",
    "check_family_algorithm", "check_sample", "check_solver", "cold_refined_name", "cold_warm_starts", "compare",
    "environment", "episode_ids", "evaluate", "family_episodes", "fit", "format_report", "format_rows",
    "format_table", "format_timings", "from_family", "learned_name", "load_config", "load_problem_file",
    "load_source", "measure_end_to_end", "nearest_neighbor_warm_starts", "optimum_warm_starts",
    "plot_iterations_cdf", "plot_learning_curve", "plot_medians", "prepare", "previous_solution_warm_starts",
    "problem_name",
    "read_instances_csv", "read_timings_csv", "report", "run_experiment", "summarize", "torch_threads",
    "write_instances_csv", "write_summary_csv", "write_timings_csv",
]
