"""Held-out models: the completed models a fit never saw (neither fitted on nor used to choose
lambda), their rows, and a fit judged on them with its evaluation files and figures written
beside it (:func:`evaluate_fit`).

Which models the fit saw is read from its ``manifest.json`` (the exact model indices it was
fitted and validated on), never from the experiment's current settings or the current dataset:
editing ``num_train`` or rewriting the dataset after more models complete changes nothing here.
Before scoring, the rows the fit used are checked against the store (their configuration ids and
a digest of their masks and outputs): a fit whose rows were retrained since is refused, since
its weights describe rows that no longer exist.

Disjointness is checked by index and by mask. A completed model that the fit did not use but
whose mask equals the mask of a model it used (a replicate group straddling the split, or a
repeated random draw) is **excluded** from the held-out set and reported, not refused: the fit
saw that exact training set with an output, so scoring on it measures memorization rather
than generalization, while refusing would make designs with replicate groups unusable.

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dm_assets.errors import DmError
from dm_assets.regression.fit import ManifestMissingError
from dm_assets.regression.manifest import (
    UNKNOWN_CONFIGURATION,
    FitManifest,
    ManifestError,
    rows_digest_of_store,
)
from dm_assets.store.store import Store

if TYPE_CHECKING:
    from dm_assets.evaluation.curve import LdsCurve
    from dm_assets.evaluation.metrics import Evaluation
    from dm_assets.evaluation.uncertainty import HeldOutScores
    from dm_assets.regression.config import RegressionConfig
    from dm_assets.regression.fit import FitFolder

logger = logging.getLogger(__name__)

_REFIT = (
    "refit on the store as it is now (materialize <experiment>/regression_dataset then "
    "<experiment>/datamodels, or write the dataset again and rerun python -m "
    "dm_assets.regression.compute_datamodels), then evaluate the new fit"
)
_ROWS_PER_CHUNK = 4096


class HeldOutError(DmError, ValueError):
    """No trustworthy held-out set for a fit: too few held-out models are trained, the fit's
    folder does not record the models it used (no manifest), or rows it used changed since."""


class RowsChangedError(HeldOutError):
    """Rows a fit used were rewritten since the fit (another configuration, other values, or
    no longer completed); the message names what changed and says to refit."""


@dataclass(frozen=True)
class FitRows:
    """Where a fit's models are.

    ``store``: the store the dataset was written from (read now); ``x_name``, ``y_name``: the
    store keys of the masks and the outputs (the manifest's own, when it records them, win).
    ``dataset``, ``num_train``, ``num_val``, ``target_start``, ``target_end``: the experiment's
    *current* settings; the evaluation uses the fit's manifest instead and only warns where
    they differ (so a user sees that a refit would use another split).
    """

    store: Path
    dataset: Path
    x_name: str
    y_name: str
    num_train: int
    num_val: int
    target_start: int = 0
    target_end: int = -1

    @classmethod
    def of(
        cls, config: RegressionConfig, *, store: str | Path, x_name: str, y_name: str
    ) -> FitRows:
        """The rows of the fit configured by ``config`` (its ``data`` section: ``data_path``,
        ``num_train``, ``num_val``, ``target_start_ind``, ``target_end_ind``)."""
        data = config["data"]
        return cls(
            store=Path(store),
            dataset=Path(data["data_path"]),
            x_name=x_name,
            y_name=y_name,
            num_train=int(data["num_train"]),
            num_val=int(data["num_val"]),
            target_start=int(data["target_start_ind"]),
            target_end=int(data["target_end_ind"]),
        )


def fit_manifest(fit: FitFolder) -> FitManifest:
    """The fit's manifest; a folder without one (or with an unreadable one) is a
    :class:`HeldOutError` saying why it cannot be evaluated and to refit."""
    try:
        return fit.manifest()
    except (ManifestMissingError, ManifestError) as exc:
        raise HeldOutError(
            f"cannot tell which models are held out: {exc}", source=fit.path
        ) from exc


@dataclass(frozen=True)
class HeldOutSet:
    """A fit's models in the store now: ``fitted`` int64 ``(num_train + num_val,)`` (train
    then validation, from the manifest), ``held_out`` int64 ``(n,)`` (completed, not fitted,
    mask unlike every fitted mask; increasing), ``excluded_same_mask`` int64 ``(m,)``
    (completed, not fitted, but with a fitted model's mask), and the ``manifest``."""

    manifest: FitManifest
    fitted: np.ndarray
    held_out: np.ndarray
    excluded_same_mask: np.ndarray
    x_name: str
    y_name: str

    @property
    def num_train(self) -> int:
        return len(self.manifest.train_indices)

    @property
    def num_val(self) -> int:
        return len(self.manifest.val_indices)


def _describe_configuration_change(
    manifest: FitManifest, now: dict[int, Any], before: int, after: int
) -> str:
    if after == UNKNOWN_CONFIGURATION:
        return f"configuration {before} -> unknown"
    if before == UNKNOWN_CONFIGURATION or before not in manifest.configurations:
        return f"configuration unknown -> {after}"
    if after not in now:
        return f"configuration {before} -> {after}"
    from dm_assets.training.configuration import TrainingConfiguration

    old = TrainingConfiguration.from_dict(manifest.configurations[before]["configuration"])
    lines = old.differences(now[after])
    detail = f" ({'; '.join(lines)})" if lines else ""
    return f"configuration {before} -> {after}{detail}"


def check_rows_unchanged(
    manifest: FitManifest, store: Store, *, x_name: str, y_name: str, source: Path | None = None
) -> None:
    """Raise :class:`RowsChangedError` when the rows the fit used differ now from what the
    manifest recorded: no longer completed, another configuration id (when the manifest read
    the ids from the store), or another digest of their masks and outputs
    (:func:`~dm_assets.regression.manifest.rows_digest_of_store`)."""
    fitted = manifest.fitted_indices
    problems = []
    if len(fitted) and int(fitted.max()) >= store.spec.num_models:
        raise RowsChangedError(
            f"the fit used models up to {int(fitted.max())} but the store {store.path} holds "
            f"{store.spec.num_models}: this is not the store the fit came from; {_REFIT}",
            source=source,
        )
    gone = fitted[~store.completed_mask()[fitted]]
    if len(gone):
        problems.append(
            f"{len(gone)} of the {len(fitted)} models the fit used are no longer completed "
            f"(e.g. {gone[:5].tolist()})"
        )
    before = manifest.row_configuration_ids().astype(np.int64)
    after = np.asarray(store.configuration_ids(fitted), dtype=np.int64)
    # a fit not told its store recorded every id as unknown without reading them: only the
    # rows' digest can tell a change then
    changed = np.flatnonzero(before != after) if manifest.store is not None else np.zeros(0, int)
    if len(changed):
        now = store.configurations()
        examples = [
            f"model {int(fitted[i])}: "
            + _describe_configuration_change(manifest, now, int(before[i]), int(after[i]))
            for i in changed[:5]
        ]
        problems.append(
            f"{len(changed)} of the {len(fitted)} models the fit used were written since under "
            f"another training configuration: {', '.join(examples)}"
        )
    if not problems:
        digest = rows_digest_of_store(store, fitted, x_name=x_name, y_name=y_name)
        if digest != manifest.rows.get("digest"):
            problems.append(
                f"the masks or outputs of the {len(fitted)} models the fit used changed since "
                f"the fit (rows digest {manifest.rows.get('digest')} at the fit, {digest} now)"
            )
    if problems:
        raise RowsChangedError(
            [*problems, f"the fit's weights describe rows that no longer exist: {_REFIT}"],
            source=source,
        )


def _mask_keys(masks: np.ndarray, indices: np.ndarray) -> list[bytes]:
    """A 16-byte digest of each mask row ``indices`` of ``masks`` (equal rows, equal keys)."""
    keys = []
    for start in range(0, len(indices), _ROWS_PER_CHUNK):
        part = np.asarray(masks[indices[start : start + _ROWS_PER_CHUNK]])
        part = np.ascontiguousarray(part.reshape(len(part), -1), dtype=np.uint8)
        keys += [hashlib.blake2b(row.data, digest_size=16).digest() for row in part]
    return keys


def held_out_set(
    fit: FitFolder, store: Store, *, x_name: str, y_name: str, check: bool = True
) -> HeldOutSet:
    """The held-out models of ``fit`` in ``store`` now (see :class:`HeldOutSet`), after
    checking (unless ``check`` is false) that the rows it used are unchanged.

    ``x_name``, ``y_name``: the store keys, used when the manifest does not record them.

    Raises
    ------
    HeldOutError
        The fit has no manifest.
    RowsChangedError
        Rows the fit used changed since (see :func:`check_rows_unchanged`).
    """
    manifest = fit_manifest(fit)
    if manifest.store is not None:
        x_name, y_name = manifest.store["x_name"], manifest.store["y_name"]
    if check:
        check_rows_unchanged(manifest, store, x_name=x_name, y_name=y_name, source=fit.path)
    fitted = manifest.fitted_indices
    candidates = np.setdiff1d(store.completed_indices(), fitted)
    masks = store.read(x_name)
    seen = set(_mask_keys(masks, fitted))
    same = np.asarray([k in seen for k in _mask_keys(masks, candidates)], dtype=bool).reshape(
        len(candidates)
    )
    if same.any():
        logger.warning(
            "%d completed model(s) the fit did not use have the mask of a model it used (e.g. "
            "%s): left out of the held-out set, since the fit saw that training set",
            int(same.sum()),
            candidates[same][:5].tolist(),
        )
    return HeldOutSet(
        manifest=manifest,
        fitted=fitted,
        held_out=candidates[~same],
        excluded_same_mask=candidates[same],
        x_name=x_name,
        y_name=y_name,
    )


def _warn_where_settings_moved(manifest: FitManifest, rows: FitRows) -> None:
    fitted_as = (len(manifest.train_indices), len(manifest.val_indices))
    if (rows.num_train, rows.num_val) != fitted_as:
        logger.warning(
            "the experiment now says num_train=%d, num_val=%d but this fit used %d and %d "
            "(its manifest): evaluating the fit as it was made; refit to use the new split",
            rows.num_train,
            rows.num_val,
            *fitted_as,
        )


def read_rows(
    store: Store,
    indices: np.ndarray,
    *,
    x_name: str,
    y_name: str,
    target_start: int = 0,
    target_end: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """The masks ``(n, p)`` and the outputs float64 ``(n, t)`` of models ``indices``, the
    outputs cut to the regression's targets ``[target_start, target_end)`` (-1: to the end)."""
    masks = np.asarray(store.read(x_name)[indices])
    outputs = np.asarray(store.read(y_name)[indices], dtype=np.float64).reshape(len(indices), -1)
    return masks, outputs[:, target_start : None if target_end == -1 else target_end]


def held_out_predictions(
    fit: FitFolder, rows: FitRows
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(model_indices, predicted, actual)`` on the held-out models of ``fit`` (its manifest's
    :func:`held_out_set`, rows checked unchanged): int64 ``(n,)`` and float64 ``(n, t)``
    twice."""
    from dm_assets.evaluation.metrics import predict

    manifest = fit_manifest(fit)
    start, end = manifest.targets
    with Store.open(rows.store) as store:
        held = held_out_set(fit, store, x_name=rows.x_name, y_name=rows.y_name)
        masks, actual = read_rows(
            store,
            held.held_out,
            x_name=held.x_name,
            y_name=held.y_name,
            target_start=start,
            target_end=end,
        )
    return held.held_out, predict(fit.weights(), masks), actual


@dataclass(frozen=True, eq=False)
class FitEvaluation:
    """A fit judged on held-out models: ``held_out`` their indices (int64 ``(n,)``),
    ``scores`` the scores with their intervals (``scores.evaluation`` the point estimates per
    target), ``curve`` the budget-honest LDS curve (None without curve sizes), ``report`` what
    ``evaluation.json`` holds."""

    held_out: np.ndarray
    scores: HeldOutScores
    curve: LdsCurve | None
    report: dict[str, Any]

    @property
    def evaluation(self) -> Evaluation:
        return self.scores.evaluation

    def metrics(self) -> dict[str, float]:
        """The scalar results for MLflow: LDS with its interval, Pearson, R^2 and, where
        replicates allowed it, the noise ceiling and LDS/ceiling (with intervals), and the same
        against the mean of the seeds' outputs (``mean_of_seeds_*``)."""
        out = {"pearson": self.evaluation.pearson, "r2": self.evaluation.r2}
        truths = [("", self.scores.single)]
        if self.scores.mean_of_seeds is not None:
            truths.append(("mean_of_seeds_", self.scores.mean_of_seeds))
        for prefix, truth in truths:
            for key in ("lds", "noise_ceiling", "lds_over_ceiling"):
                value = getattr(truth, key)
                if value is None:
                    continue
                out[prefix + key] = float(value)
                interval = getattr(truth, f"{key}_ci")
                if interval is not None:
                    out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = map(
                        float, interval
                    )
        return out


def _check_replicates(
    masks: np.ndarray, replicates: int | None, *, experiment: str, source: Path
) -> np.ndarray:
    """Group ids of the held-out ``masks`` (same id = same mask); with ``replicates`` set, a
    :class:`HeldOutError` when no held-out mask repeats, a warning when the groups' sizes are
    not all ``replicates``."""
    from dm_assets.evaluation.ceiling import group_identical_masks

    groups = group_identical_masks(masks)
    if replicates is None:
        return groups
    sizes = np.bincount(groups)
    if not (sizes >= 2).any():
        raise HeldOutError(
            f"evaluation.replicates = {replicates} but no two held-out models of {experiment!r} "
            "share a mask: the trainer must train each held-out mask that many times (digits: "
            "trainer args digits.repeat_start = num_train + num_val, digits.repeats = "
            f"{replicates}), or drop evaluation.replicates",
            source=source,
        )
    if not (sizes == replicates).all():
        values, counts_of = np.unique(sizes, return_counts=True)
        counts = {int(k): int(v) for k, v in zip(values, counts_of, strict=True)}
        logger.warning(
            "evaluation.replicates = %d but the held-out masks have these numbers of models "
            "(models per mask: masks): %s; the ceiling and the mean-of-seeds truth use what "
            "is there",
            replicates,
            counts,
        )
    return groups


def evaluate_fit(
    fit: FitFolder,
    rows: FitRows,
    *,
    config: RegressionConfig | None = None,
    curve_sizes: Sequence[int] = (),
    folds: int = 5,
    replicates: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
    experiment: str,
) -> FitEvaluation:
    """Judge the fit in ``fit`` on its held-out models and write the evaluation files beside
    it (:data:`~dm_assets.regression.fit.EVALUATION_FILES`).

    The held-out models are those of :func:`held_out_set`: completed in the store now, not
    among the manifest's ``train_indices`` and ``val_indices``, with a mask unlike theirs; the
    rows the fit used are checked unchanged first. ``evaluation.json`` records them
    (``held_out_indices``, ``excluded_same_mask``) and the digests checked.

    Scores (:func:`~dm_assets.evaluation.uncertainty.score_held_out`): LDS, Pearson, R^2
    against each held-out model's own output, with 95% bootstrap intervals over the held-out
    masks; where masks repeat, the noise ceiling and LDS / ceiling (with intervals) and the
    same against the mean of each mask's models (the second ground truth).

    Parameters
    ----------
    fit : FitFolder
        The fit to judge (with its ``manifest.json``); its weights predict, and its folder
        receives the files.
    rows : FitRows
        The store the fit's dataset was written from (read now); its split and target range
        are the experiment's current ones, compared with the manifest's (a warning where they
        differ) but not used.
    config : RegressionConfig, optional
        Settings of the LDS curve's refits (``cfg``); default the fit's own (its manifest's
        ``regression``).
    curve_sizes : sequence of int
        Total numbers of trained models N for the LDS curve
        (:func:`~dm_assets.evaluation.curve.lds_curve`: lambda by ``folds``-fold inside the
        fit's first N models, train then validation, refit on all N, scored on the same
        held-out models); empty: no curve (the curve's figure says so).
    replicates : int, optional
        Models per held-out mask the experiment trains (``evaluation.replicates``): checked
        against the held-out masks (no repeated mask is an error; other group sizes a warning).
    resamples, seed
        Bootstrap resamples of the held-out masks (0: no intervals) and their seed.
    experiment : str
        The experiment's name, in messages and the curve's title.

    Raises
    ------
    HeldOutError
        The fit has no manifest, fewer than 3 held-out models are trained, or replicates were
        promised and no held-out mask repeats.
    RowsChangedError
        Rows the fit used changed since the fit (retrained, rewritten, no longer completed).
    """
    import pandas as pd

    from dm_assets.evaluation.curve import lambda_at_grid_ends, lds_curve
    from dm_assets.evaluation.figures import plot_lds_curve, plot_predicted_vs_actual
    from dm_assets.evaluation.metrics import predict
    from dm_assets.evaluation.uncertainty import score_held_out
    from dm_assets.regression.config import load_config

    manifest = fit_manifest(fit)
    _warn_where_settings_moved(manifest, rows)
    target_start, target_end = manifest.targets
    weights = fit.weights()
    with Store.open(rows.store) as store:
        chosen = held_out_set(fit, store, x_name=rows.x_name, y_name=rows.y_name)
        seen, held = chosen.fitted, chosen.held_out
        if len(held) < 3:
            excluded = len(chosen.excluded_same_mask)
            raise HeldOutError(
                f"only {len(held)} held-out model(s) of {experiment!r} are trained "
                f"(completed models beyond the {len(seen)} the fit used"
                + (f", {excluded} more left out for sharing a fitted mask" if excluded else "")
                + "): train the partitions after them",
                source=rows.store,
            )
        # the curve refits on the fitted models and scores the held-out ones: read them all
        # once; without a curve only the held-out rows are needed
        order = np.concatenate([seen, held]) if curve_sizes else held
        x, y = read_rows(
            store,
            order,
            x_name=chosen.x_name,
            y_name=chosen.y_name,
            target_start=target_start,
            target_end=target_end,
        )
    masks, actual = x[len(order) - len(held) :], y[len(order) - len(held) :]
    groups = _check_replicates(masks, replicates, experiment=experiment, source=fit.path)
    predicted = predict(weights, masks)
    fit_config = load_config(None, manifest.regression)
    scores = score_held_out(predicted, actual, groups=groups, resamples=resamples, seed=seed)
    result = scores.evaluation
    curve = None
    if curve_sizes:
        curve = lds_curve(
            x,
            y,
            sizes=curve_sizes,
            folds=folds,
            held_out=slice(len(seen), len(order)),
            fitted=len(seen),
            groups=groups,
            resamples=resamples,
            seed=seed,
            config=fit_config if config is None else config,
        )
    plot_lds_curve(
        curve,
        fit.file("lds_curve.png"),
        title=f"{experiment}: LDS on {len(held)} held-out models",
        ceiling=scores.noise_ceiling,
        ceiling_ci=scores.noise_ceiling_ci,
    )
    plot_predicted_vs_actual(predicted, actual, fit.file("predicted_vs_actual.png"))
    grid_ends = lambda_at_grid_ends(weights, eps=float(fit_config["cfg"]["eps"]))
    report = {
        **scores.to_dict(),
        "pearson": result.pearson,
        "r2": result.r2,
        "curve": None if curve is None else curve.to_dict(),
        "lambda_at_grid_ends": None
        if grid_ends is None
        else {"largest": grid_ends[0], "smallest": grid_ends[1]},
        "held_out_indices": [int(i) for i in held],
        "excluded_same_mask": [int(i) for i in chosen.excluded_same_mask],
        "fitted_models": len(seen),
        "rows_digest": manifest.rows.get("digest"),
        "dataset_digest": manifest.dataset.get("digest"),
        "evaluated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    per_target = pd.DataFrame(
        {
            "target": np.arange(result.n_targets) + target_start,
            "lds": result.lds_per_target,
            "pearson": result.pearson_per_target,
            "r2": result.r2_per_target,
        }
    )
    if result.ceiling is not None:
        per_target["noise_ceiling"] = result.ceiling.lds_per_target
    # written last: evaluation.json present means the figures are there too
    fit.write_evaluation(report, per_target)
    return FitEvaluation(held_out=held, scores=scores, curve=curve, report=report)
