"""Datasets of solved instances: parameters and the C solver's optimal primal-dual solutions, stored on disk.

Usage::

    from amortcvx.canon import ParametricProblem
    from amortcvx.datasets import Dataset, generate_dataset

    pp = ParametricProblem(family.problem, form="cone")
    ds = generate_dataset(pp, family.sample(1000, seed=0), "scs", "data/", name="train")
    train, val = ds.split((0.9, 0.1))
    ds = Dataset.open("data/", pp, "scs", name="train")     # later, in another process

See ``docs/datasets.md`` for the layout on disk, the atomicity / resume guarantees and the Ray path.
"""

from amortcvx.datasets.dataset import Dataset, dataset_dirname
from amortcvx.datasets.generate import (
    BACKEND_FORMS,
    DEFAULT_SETTINGS,
    effective_settings,
    generate_dataset,
    generate_family_dataset,
)
from amortcvx.datasets.storage import DatasetError

__all__ = [
    "BACKEND_FORMS", "DEFAULT_SETTINGS", "Dataset", "DatasetError", "dataset_dirname", "effective_settings",
    "generate_dataset", "generate_family_dataset",
]
