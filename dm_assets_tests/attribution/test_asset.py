"""``<name>/attributions`` is part of an experiment's graph exactly when it has an attributions
section, downstream of ``datamodel_eval``."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

from dm_assets.pipeline.assets import experiment_assets
from dm_assets.pipeline.experiment import load_experiment

DIGITS = Path(__file__).resolve().parents[2] / "dm_assets" / "experiments" / "digits.yaml"


def _keys(path: Path) -> dict[dg.AssetKey, dg.AssetsDefinition]:
    experiment = load_experiment(path)
    return {
        key: a
        for a in experiment_assets(experiment)
        if isinstance(a, dg.AssetsDefinition)
        for key in a.keys
    }


def test_asset_follows_the_attributions_section(tmp_path: Path) -> None:
    data = yaml.safe_load(DIGITS.read_text())
    data["spec"] = str(DIGITS.parent / data["spec"])
    without = tmp_path / "without.yaml"
    without.write_text(yaml.safe_dump(data))
    assert dg.AssetKey(["digits", "attributions"]) not in _keys(without)

    data["attributions"] = {"methods": ["trak", "tracin"], "targets": 10}
    with_section = tmp_path / "with.yaml"
    with_section.write_text(yaml.safe_dump(data))
    keys = _keys(with_section)
    key = dg.AssetKey(["digits", "attributions"])
    asset = keys[key]
    assert asset.asset_deps[key] == {dg.AssetKey(["digits", "datamodel_eval"])}
    assert "trak, tracin" in (asset.descriptions_by_key[key] or "")
