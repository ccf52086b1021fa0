"""Dagster definitions: the one place where experiments, assets and resources are wired.

The asset graph (store, model_outputs, regression_dataset, datamodels, datamodel_eval per
experiment) is not built yet; until it is, this module loads with no assets so that
``dagster dev -w workspace.yaml`` starts. The training half it will wire is in
:mod:`dm_assets.store` and :mod:`dm_assets.worker`.
"""

from __future__ import annotations

import dagster as dg

defs = dg.Definitions()
