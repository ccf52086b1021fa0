"""Baseline data attribution (influence functions, TRAK, TracIn) computed by the ``dattri``
library and scored exactly like the datamodels.

``task`` (what an experiment's trainer provides: :class:`AttributionTask`, found by
:func:`load_attribution_task`), ``methods`` (the baselines through dattri, one sign convention:
higher = the example raises the target's output), ``scoring`` (held-out LDS with interval and
ceiling; dattri's own LDS as a cross-check), ``report`` (a fit's baselines against its
datamodels: ``attributions.json``, ``scores_<method>.npy``, ``lds_vs_compute.png``).

Imports neither dagster nor mlflow; dattri only when a method runs.
"""

from dm_assets.attribution.methods import METHODS, Attribution, AttributionError, run_method
from dm_assets.attribution.scoring import dattri_lds, predict_from_scores, score_attribution
from dm_assets.attribution.task import (
    AttributionTask,
    AttributionTaskError,
    load_attribution_task,
)

__all__ = [
    "METHODS",
    "Attribution",
    "AttributionError",
    "AttributionTask",
    "AttributionTaskError",
    "dattri_lds",
    "load_attribution_task",
    "predict_from_scores",
    "run_method",
    "score_attribution",
]
