r"""A fit's baselines against its datamodels (:func:`attribute_fit`): every method of
:mod:`~dm_assets.attribution.methods` scored on the fit's held-out models exactly as the
datamodels are, timed, and drawn as LDS against compute (the shape of TRAK's first figure).

Files written beside the fit (each replaced atomically):

=============================== ===============================================================
``scores_<method>.npy``         float32 ``(p, t)``: the method's scores, row ``i`` training
                                example ``i`` (mask order), column ``j`` target
                                ``target_start + j``; higher = including ``i`` raises ``j``
``attributions.json``           JSON object: ``experiment``, ``fit_dir``, ``targets`` ``[start,
                                end)`` (store output columns), ``held_out_models``,
                                ``seconds_per_model`` (``value``, ``source``, ``models``),
                                ``datamodels`` (the fit's scores on the same targets: the keys
                                of :meth:`HeldOutScores.to_dict` plus ``models``,
                                ``fit_seconds``, ``seconds``), ``methods`` (per method: the
                                keys of :meth:`HeldOutScores.to_dict`, ``seconds``,
                                ``attribution_seconds``, ``training_seconds``,
                                ``models_trained``, ``dattri_lds`` (dattri's own LDS on the same
                                inputs, null for masks of unequal size), ``settings``,
                                ``versions``, ``scores_file``), ``curve`` (the datamodels' LDS
                                curve as drawn: ``models``, ``lds``, ``fit_seconds``,
                                ``seconds``), ``created``
``lds_vs_compute.png``          LDS on held-out models against compute (seconds, log scale):
                                the datamodels as a curve, each baseline as a point with its
                                95% interval, the noise ceiling as a line
=============================== ===============================================================

**Compute.** A baseline's seconds are its attribution plus the training of the model(s) it
needs (wall clock, this process). The datamodels' are ``N x seconds per trained model + the
fit's seconds`` for ``N`` trained models (those fitted and validated on). The seconds per
trained model are measured here: ``timing_models`` models of the experiment's trainer
(``task.train``) on held-out masks, the median, in this process, so that both sides are timed
on the same machine under the same load. The datamodels' curve comes from ``evaluation.json``
(``curve``: its points' model counts and LDS over all the fit's targets; a point's fit seconds
when it records them, else 0, said in ``fit_seconds_source``) and ends in the fit itself, scored
on the attributed targets.

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dm_assets.attribution.methods import METHODS, Attribution, run_method
from dm_assets.attribution.scoring import dattri_lds, score_attribution
from dm_assets.attribution.task import AttributionTask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dm_assets.evaluation.uncertainty import HeldOutScores
    from dm_assets.regression.fit import FitFolder
    from dm_assets.regression.manifest import FitManifest

logger = logging.getLogger(__name__)

REPORT_FILE = "attributions.json"
FIGURE_FILE = "lds_vs_compute.png"


@dataclass(frozen=True)
class ComputePoint:
    """One point of the figure: ``label``, total ``seconds`` (x), ``lds`` (y) and its 95%
    interval ``ci`` (or None)."""

    label: str
    seconds: float
    lds: float
    ci: tuple[float, float] | None = None


@dataclass(frozen=True, eq=False)
class FitAttributions:
    """What :func:`attribute_fit` computed: per method its :class:`Attribution` and
    :class:`HeldOutScores`, the datamodels' scores on the same targets, and ``report`` (what
    ``attributions.json`` holds)."""

    attributions: dict[str, Attribution]
    scores: dict[str, HeldOutScores]
    datamodels: HeldOutScores
    report: dict[str, Any]

    def table(self) -> list[dict[str, Any]]:
        """One row per method, datamodels first: ``method``, ``lds``, ``ci``,
        ``noise_ceiling``, ``lds_over_ceiling``, ``seconds``."""
        rows = [("datamodels", self.report["datamodels"])]
        rows += [(m, self.report["methods"][m]) for m in self.attributions]
        return [
            {
                "method": name,
                "lds": entry["lds"],
                "ci": entry["ci"],
                "noise_ceiling": entry["noise_ceiling"],
                "lds_over_ceiling": entry["lds_over_ceiling"],
                "seconds": entry["seconds"],
            }
            for name, entry in rows
        ]

    def markdown(self) -> str:
        """:meth:`table` as a markdown table."""

        def number(value: float | None, digits: int = 3) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        def interval(ci: Sequence[float | None] | None) -> str:
            if ci is None or ci[0] is None or ci[1] is None:
                return "n/a"
            return f"[{ci[0]:.3f}, {ci[1]:.3f}]"

        lines = [
            "| method | LDS | 95% interval | ceiling | LDS/ceiling | seconds |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {number(r['lds'])} | {interval(r['ci'])} | "
            f"{number(r['noise_ceiling'])} | {number(r['lds_over_ceiling'])} | "
            f"{number(r['seconds'], 1)} |"
            for r in self.table()
        ]
        return "\n".join(lines)


def trainer_of_fit(manifest: FitManifest) -> tuple[str, dict[str, str]] | None:
    """``(main_import, args)`` of the one training configuration the fit's rows were trained
    with (its manifest's ``configurations``), or None when it records none or several."""
    configurations = list(manifest.configurations.values())
    if len(configurations) != 1:
        return None
    configuration = configurations[0]["configuration"]
    return str(configuration["main_import"]), dict(configuration["args"])


def measure_seconds_per_model(
    task: AttributionTask, masks: np.ndarray, *, models: int = 3, seed: int = 10_000
) -> float:
    """The median wall clock of training one model with ``task.train`` on each of the first
    ``models`` rows of ``masks`` (bool ``(n, p)``), seeds ``seed, seed + 1, ...``."""
    if models < 1 or len(masks) < 1:
        raise ValueError(
            f"need at least one model and one mask to time; got {models}, {len(masks)}"
        )
    seconds = []
    for k, mask in enumerate(np.asarray(masks)[:models]):
        started = time.perf_counter()
        task.train(np.asarray(mask, dtype=bool), seed + k)
        seconds.append(time.perf_counter() - started)
    return float(statistics.median(seconds))


def _curve_points(
    evaluation: Mapping[str, Any] | None, seconds_per_model: float
) -> tuple[list[dict[str, Any]], str]:
    points = []
    recorded = True
    curve = (evaluation or {}).get("curve") or []
    # evaluation.json's curve: {"points": [...], ...}; older files: a list of points
    for point in curve.get("points") or [] if isinstance(curve, Mapping) else curve:
        models = next(
            (point[k] for k in ("n_models", "n", "n_models_used", "n_train") if k in point), None
        )
        if models is None or point.get("lds") is None:
            continue
        fit_seconds = point.get("seconds")
        recorded = recorded and fit_seconds is not None
        fit_seconds = float(fit_seconds or 0.0)
        points.append(
            {
                "models": int(models),
                "lds": float(point["lds"]),
                "fit_seconds": fit_seconds,
                "seconds": int(models) * seconds_per_model + fit_seconds,
            }
        )
    source = (
        "the curve points' own fit seconds (evaluation.json)"
        if recorded
        else "not recorded in evaluation.json: training seconds only (fit seconds 0)"
    )
    return sorted(points, key=lambda p: p["models"]), source


def lds_vs_compute_figure(
    curve: Sequence[ComputePoint],
    baselines: Sequence[ComputePoint],
    *,
    ceiling: float | None = None,
    title: str = "LDS against compute",
) -> Figure:
    """LDS (y) against seconds (x, log scale): ``curve`` as the datamodels' line (each point
    labelled with its label, e.g. the number of models), ``baselines`` as points with their
    95% intervals, ``ceiling`` as a dashed horizontal line."""
    from dm_assets.evaluation.figures import _new_figure

    fig = _new_figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    if curve:
        xs = [p.seconds for p in curve]
        ys = [p.lds for p in curve]
        ax.plot(xs, ys, "o-", color="C0", label="datamodels (N trained models)")
        for p in curve:
            ax.annotate(
                p.label,
                (p.seconds, p.lds),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color="C0",
            )
    markers = "sD^vP*X"
    for k, p in enumerate(baselines):
        yerr = None
        if p.ci is not None:
            yerr = [[max(p.lds - p.ci[0], 0.0)], [max(p.ci[1] - p.lds, 0.0)]]
        ax.errorbar(
            [p.seconds],
            [p.lds],
            yerr=yerr,
            fmt=markers[k % len(markers)],
            color=f"C{k + 1}",
            capsize=3,
            label=p.label,
        )
    if ceiling is not None and np.isfinite(ceiling):
        ax.axhline(
            ceiling, color="grey", linestyle="--", linewidth=1, label=f"noise ceiling {ceiling:.3f}"
        )
    ax.set_xscale("log")
    ax.set_xlabel("compute (seconds, wall clock; training included)")
    ax.set_ylabel("LDS on held-out models")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def attribute_fit(
    fit: FitFolder,
    store_path: str | os.PathLike[str],
    task: AttributionTask,
    *,
    methods: Sequence[str] = METHODS,
    targets: int | None = None,
    x_name: str,
    y_name: str,
    resamples: int = 1000,
    seed: int = 0,
    method_settings: Mapping[str, Mapping[str, Any]] | None = None,
    timing_models: int = 3,
    experiment: str = "",
) -> FitAttributions:
    """Run ``methods`` on ``task`` for the fit's first ``targets`` targets (default all), score
    each on the fit's held-out models (:func:`~dm_assets.evaluation.held_out.held_out_set`,
    rows checked unchanged) like the datamodels, and write the files of the module docstring
    beside the fit.

    ``x_name``, ``y_name``: the store keys (the manifest's own win); ``resamples``, ``seed``: the
    bootstrap's; ``method_settings``: keyword settings per method (see
    :mod:`~dm_assets.attribution.methods`); ``timing_models``: models trained to measure the
    seconds per trained model.

    Raises
    ------
    HeldOutError
        The fit has no manifest, or fewer than 3 held-out models.
    RowsChangedError
        Rows the fit used changed since the fit.
    ValueError
        ``targets`` outside the fit's range, or the task's shapes do not match the store.
    """
    from dm_assets.evaluation.ceiling import group_identical_masks
    from dm_assets.evaluation.held_out import HeldOutError, held_out_set, read_rows
    from dm_assets.evaluation.metrics import predict
    from dm_assets.evaluation.uncertainty import score_held_out
    from dm_assets.regression.fit import attribution_scores_file
    from dm_assets.store.store import Store

    manifest = fit.manifest()
    start, end = manifest.targets
    available = end - start
    count = available if targets is None else int(targets)
    if not 1 <= count <= available:
        raise ValueError(
            f"targets={targets}: the fit has {available} targets (store columns [{start}, {end})); "
            "attribute between 1 and that many"
        )
    with Store.open(Path(store_path)) as store:
        held = held_out_set(fit, store, x_name=x_name, y_name=y_name)
        if len(held.held_out) < 3:
            raise HeldOutError(
                f"only {len(held.held_out)} held-out model(s): train the models after the fit's",
                source=store_path,
            )
        masks, actual = read_rows(
            store,
            held.held_out,
            x_name=held.x_name,
            y_name=held.y_name,
            target_start=start,
            target_end=start + count,
        )
    masks = masks.reshape(len(masks), -1)
    problems = []
    if masks.shape[1] != task.num_train:
        problems.append(
            f"the store's masks have {masks.shape[1]} entries but the task {task.num_train} "
            "training examples: the trainer's attribution task must list them in mask order"
        )
    if start + count > task.num_targets:
        problems.append(
            f"the fit's targets reach store column {start + count} but the task has "
            f"{task.num_targets} targets"
        )
    if problems:
        raise ValueError(
            "the attribution task does not match the store:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    columns = np.arange(start, start + count)
    groups = group_identical_masks(masks)

    weights = fit.weights()
    dm_predicted = predict(weights, masks)[:, :count]
    dm_scores = score_held_out(dm_predicted, actual, groups=groups, resamples=resamples, seed=seed)

    spm = measure_seconds_per_model(task, masks, models=timing_models)
    n_models = len(held.fitted)
    fit_seconds = float(fit.summary().get("seconds") or 0.0)

    attributions: dict[str, Attribution] = {}
    scored: dict[str, HeldOutScores] = {}
    entries: dict[str, Any] = {}
    for method in methods:
        result = run_method(
            method, task, targets=columns, **dict((method_settings or {}).get(method, {}))
        )
        attributions[method] = result
        scored[method] = score_attribution(
            result.scores, masks, actual, resamples=resamples, seed=seed
        )
        name = attribution_scores_file(method)
        _write_npy(fit.file(name), result.scores.astype(np.float32))
        entries[method] = {
            **scored[method].to_dict(),
            "seconds": result.seconds,
            "attribution_seconds": result.attribution_seconds,
            "training_seconds": result.training_seconds,
            "models_trained": result.models_trained,
            "dattri_lds": dattri_lds(result.scores, masks, actual),
            "settings": result.settings,
            "versions": result.versions,
            "scores_file": name,
        }
        logger.info(
            "%s: LDS %.3f in %.1f s (dattri's LDS %s)",
            method,
            scored[method].lds,
            result.seconds,
            entries[method]["dattri_lds"],
        )

    curve, fit_seconds_source = _curve_points(fit.evaluation(), spm)
    report = {
        "experiment": experiment,
        "fit_dir": str(fit.path),
        "targets": [int(start), int(start + count)],
        "held_out_models": len(held.held_out),
        "seconds_per_model": {
            "value": spm,
            "source": f"measured: median of {min(timing_models, len(masks))} models trained "
            "with the experiment's trainer (task.train) on held-out masks, in this process",
            "models": min(timing_models, len(masks)),
        },
        "datamodels": {
            **dm_scores.to_dict(),
            "models": n_models,
            "fit_seconds": fit_seconds,
            "seconds": n_models * spm + fit_seconds,
        },
        "methods": entries,
        "curve": curve,
        "fit_seconds_source": fit_seconds_source,
        "task": task.description,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    from dm_assets.evaluation.figures import save_png

    drawn = [ComputePoint(str(p["models"]), p["seconds"], p["lds"]) for p in curve]
    if not any(p["models"] == n_models for p in curve):
        drawn.append(ComputePoint(f"{n_models} (fit)", n_models * spm + fit_seconds, dm_scores.lds))
    save_png(
        lds_vs_compute_figure(
            sorted(drawn, key=lambda p: p.seconds),
            [
                ComputePoint(m, attributions[m].seconds, scored[m].lds, scored[m].lds_ci)
                for m in attributions
            ],
            ceiling=dm_scores.noise_ceiling,
            title=f"{experiment}: LDS against compute ({count} targets)"
            if experiment
            else f"LDS against compute ({count} targets)",
        ),
        fit.file(FIGURE_FILE),
    )
    # written last: attributions.json present means the scores and the figure are there too
    _write_json(fit.file(REPORT_FILE), report)
    return FitAttributions(
        attributions=attributions, scores=scored, datamodels=dm_scores, report=report
    )
