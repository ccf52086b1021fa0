"""Where an experiment's results are, what they say, and the commands that open them.

python -m dm_assets.summary [EXPERIMENT ...]   # default: every experiment with data
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dm_assets.evaluation.report import attribution_lines, curve_lines, score_lines
from dm_assets.home import dm_home, mlflow_tracking_uri
from dm_assets.pipeline.experiment import Experiment, load_experiments
from dm_assets.regression.fit import FitFolder, FitFolderError
from dm_assets.store.store import Store, StoreError, ranges_text


def describe(experiment: Experiment) -> list[str]:
    """Lines about one experiment's store, dataset and latest fit (what exists of them)."""
    paths = experiment.paths()
    lines = [f"{experiment.name}: {paths.root}"]
    try:
        with Store.open(paths.store) as store:
            lines.append(f"  store     {paths.store}: {store.status()}")
    except (StoreError, FileNotFoundError):
        lines.append("  store     not initialized")
        return lines
    if paths.beton.exists():
        lines.append(f"  dataset   {paths.beton} ({paths.beton.stat().st_size:,} bytes)")
    try:
        fit = FitFolder.open(paths.datamodels)
    except FitFolderError:
        return lines  # not fitted yet
    s = fit.summary()
    lines.append(
        f"  fit       {fit.path}: {s['n_targets']} targets x "
        f"{s['n_features']} training examples, fit on {s['n_train']} models "
        f"(lambda chosen on {s['n_val']}); mean validation R^2 {s['mean_val_r2']:.3f}, "
        f"mean nonzeros {s['mean_nonzeros']:.1f}, {s['solver']} on {s['device']} "
        f"in {s['seconds']:.1f} s"
    )
    if fit.has_manifest():
        m = fit.manifest()
        ids = ", ".join(m.configuration_ids.get("counts", {})) or "none"
        lines.append(
            f"  lineage   models {ranges_text(m.fitted_indices)}, dataset "
            f"{m.dataset.get('digest', '?')[:19]}, configuration(s) {ids}"
            f"{' (mixed)' if m.mixed else ''}: python -m dm_assets.lineage {experiment.name}"
        )
    else:
        lines.append("  lineage   not recorded (fitted before manifest.json existed): refit")
    e = fit.evaluation()
    if e is not None:
        if "ground_truth" not in e:  # evaluated before intervals and ground truths existed
            lines.append(
                f"  held out  {e['held_out_models']} models: LDS {e['lds']:.3f} (evaluated by "
                "an older version, no interval: materialize datamodel_eval again)"
            )
        else:
            score, *more = score_lines(e)
            lines.append(f"  held out  {score}")
            lines += [f"            {line}" for line in [*more, *curve_lines(e.get("curve"))]]
        attributions = fit.attributions()
        if attributions is not None:
            lines.append(f"  baselines {fit.file('attributions.json')}")
            lines += [f"            {line}" for line in attribution_lines(attributions)]
        lines.append(f"  pictures  {fit.path}/*.png, notebooks/datamodels_analysis.ipynb")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dm_assets.summary", description=__doc__)
    parser.add_argument("experiments", nargs="*", help="names (default: all with data)")
    args = parser.parse_args(argv)
    known = {e.name: e for e in load_experiments()}
    unknown = [n for n in args.experiments if n not in known]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; known: {', '.join(sorted(known))}")
    names = args.experiments or [n for n, e in known.items() if e.paths().root.exists()]
    for name in names:
        print("\n".join(describe(known[name])))
    print(
        f"\nData: {dm_home()}\n"
        "Dagster UI (runs, assets, lineage, checks):  .venv/bin/python -m dm_assets.ui dagster"
        "   -> http://127.0.0.1:3000\n"
        "MLflow UI (regularization paths per lambda): .venv/bin/python -m dm_assets.ui mlflow"
        f"    -> http://127.0.0.1:5000   (tracking URI {mlflow_tracking_uri()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
