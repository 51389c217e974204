"""The datasets of the benchmark, in one table: name, task, metric, where the data comes from.

The paper's three datasets (SPEC.md 1.1-1.3) are CelebA and CelebA-HQ (multi-label over 40
attributes, scored by mAP) and MUFAC (8 age classes, scored by top-1 accuracy); the reference's
hyper-parameter table (``const.py:get_const``, ``oneshui_jax.hparams``) has values for these
three. SynthFaces is this package's generated stand-in (``oneshui_jax.data.synthfaces``), scored
like CelebA.

Only the standard library is imported here, so that any module (the report, the hyper-parameter
table, the command-line tools) can read the table cheaply.
"""

from __future__ import annotations

import dataclasses

from oneshui_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the package knows about one dataset.

    Attributes:
      name: the ``--dataset`` / ``config.dataset`` value.
      task: ``"multilabel"`` or ``"classification"``.
      metric: the paper's metric, ``"mAP"`` (multi-label) or ``"acc"`` (classification).
      real: read from local files under ``data_dir`` (True) or generated (False: SynthFaces).
      reference_table: the reference's hyper-parameter table has values for it.
    """

    name: str
    task: str
    metric: str
    real: bool
    reference_table: bool


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("synthfaces", "multilabel", "mAP", real=False, reference_table=False),
    DatasetSpec("celeba", "multilabel", "mAP", real=True, reference_table=True),
    DatasetSpec("celebahq", "multilabel", "mAP", real=True, reference_table=True),
    DatasetSpec("mufac", "classification", "acc", real=True, reference_table=True),
)}


def spec(name: str) -> DatasetSpec:
    """The entry of ``name``; ConfigError naming the known datasets when there is none."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def names(**filters: object) -> tuple[str, ...]:
    """The datasets whose fields equal ``filters``, in table order: ``names(real=True)``."""
    unknown = set(filters) - {f.name for f in dataclasses.fields(DatasetSpec)}
    if unknown:
        raise TypeError(f"DatasetSpec has no field {', '.join(sorted(unknown))}")
    return tuple(name for name, s in DATASETS.items()
                 if all(getattr(s, key) == value for key, value in filters.items()))
