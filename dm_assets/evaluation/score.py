r"""Any attribution method judged like our datamodels: LDS on the same held-out models.

An attribution matrix ``scores`` float ``(p, t)`` holds, in row ``j`` and column ``i``, the
score of training example ``j`` for target ``i`` (higher: including the example raises the
target's output). It predicts held-out model ``m`` (trained on mask ``masks[m]``, bool
``(p,)``) by the sum of the scores of the examples it saw::

    predicted[m, i] = masks[m] @ scores[:, i]          (float64, exactly; no offset)

and is scored with :func:`~dm_assets.evaluation.uncertainty.score_held_out`: per target the
Spearman correlation across held-out models between ``predicted`` and the models' outputs,
averaged over targets (the LDS), with its bootstrap interval over held-out masks, the noise
ceiling and LDS / ceiling, and, where masks were trained on several seeds, the LDS against
the mean of their outputs.

**Which held-out models.** With a fit (``fit_dir``, or the experiment's latest
``$DM_HOME/<name>/datamodels``), exactly those :func:`evaluate_fit` scores the fit on:
:func:`~dm_assets.evaluation.held_out.held_out_set` (completed models outside the manifest's
``train_indices`` and ``val_indices``, the fitted rows checked unchanged, replicates of a
fitted mask left out) and the manifest's target columns. Without a fit yet, the experiment's
settings: completed models from index ``regression.data.num_train + num_val`` on, and the
target columns ``[target_start_ind, target_end_ind)`` of its regression config (by default
every column). Either way, ``p`` is the length of the store's masks and ``t`` the number of
those target columns.

**Our own datamodels as scores.** A fit's ``datamodels.pt`` is accepted in place of a
``.npy``: its scores are ``weight / std[:, None]``. Our prediction is
``((mask - mean) / std) @ weight + bias = mask @ (weight / std[:, None]) + c`` with ``c``
``(t,)`` the same for every model, and Spearman correlations ignore a per-target constant, so
this LDS equals the fit's own (``evaluation.json``) up to floating point.

Imports neither dagster nor mlflow (torch only to read a ``datamodels.pt``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dm_assets.errors import DmError
from dm_assets.store.store import Store, ranges_text

if TYPE_CHECKING:
    from dm_assets.evaluation.uncertainty import HeldOutScores, TruthScores
    from dm_assets.pipeline.experiment import Experiment

MIN_HELD_OUT = 3
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format
# scores (and the masks' matching columns) are read in blocks of about this many values
# (float64): a memory-mapped (p, t) matrix larger than memory is scored without loading it whole
_BLOCK_VALUES = 2**22


class ScoreError(DmError, ValueError):
    """Attributions that cannot be scored: an unknown experiment, a scores file that is
    missing, unreadable, of the wrong shape or not finite, or too few held-out models."""


def resolve_experiment(name_or_path: str) -> Experiment:
    """The experiment ``name_or_path`` names: a YAML file (``.yaml``/``.yml`` or an existing
    file), else a shipped experiment's name or one in ``$DM_EXPERIMENTS``."""
    from dm_assets.pipeline.experiment import load_experiment, load_experiments

    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ScoreError(f"no experiment file {path}: pass an existing YAML file or a name")
        return load_experiment(path)
    experiments = {e.name: e for e in load_experiments()}
    if name_or_path not in experiments:
        raise ScoreError(
            f"{name_or_path!r} is neither an experiment file nor an experiment; the "
            f"experiments are {sorted(experiments)} (add yours with DM_EXPERIMENTS)"
        )
    return experiments[name_or_path]


@dataclass(frozen=True, eq=False)
class HeldOutModels:
    """The models an attribution is judged on.

    ``indices`` int64 ``(n,)`` their store indices (increasing); ``masks`` ``(n, p)`` (the
    store's dtype, bool or 0/1); ``actual`` float64 ``(n, t)`` their outputs on the target
    columns ``targets`` = ``[start, end)`` of ``y_name``; ``excluded_same_mask`` int64
    ``(m,)`` completed models left out for sharing a fitted model's mask (fit source only);
    ``source`` ``{"fit_dir": str, "manifest": True}`` or ``{"experiment": str}``, plus
    ``store`` and, for the experiment source, ``first_held_out``.
    """

    experiment: str
    indices: np.ndarray
    masks: np.ndarray
    actual: np.ndarray
    targets: tuple[int, int]
    x_name: str
    y_name: str
    excluded_same_mask: np.ndarray
    source: dict[str, Any]

    @property
    def p(self) -> int:
        return int(self.masks.shape[1])

    @property
    def t(self) -> int:
        return int(self.actual.shape[1])

    def source_text(self) -> str:
        if "fit_dir" in self.source:
            return (
                f"fit {self.source['fit_dir']}: completed models outside its manifest.json's "
                "train and validation models"
            )
        return (
            f"experiment {self.experiment!r} settings (no fit yet): completed models from "
            f"index {self.source['first_held_out']} (num_train + num_val) on"
        )


def held_out_models(
    experiment: Experiment,
    *,
    fit_dir: str | Path | None = None,
    home: str | Path | None = None,
) -> HeldOutModels:
    """The held-out models of ``experiment`` (see the module docstring): those of the fit in
    ``fit_dir`` when given, else of its latest fit when there is one, else of its settings.

    Raises
    ------
    ScoreError
        No fit and no ``regression`` section, or fewer than 3 held-out models.
    HeldOutError, RowsChangedError, FitFolderError, StoreError
        From the fit and the store (a folder without a manifest, rows changed since the fit,
        no store), each naming the fix.
    """
    from dm_assets.evaluation.held_out import fit_manifest, held_out_set, read_rows
    from dm_assets.pipeline.experiment import RegressionSettings
    from dm_assets.regression.fit import FitFolder

    paths = experiment.paths(home)
    reg = experiment.regression or RegressionSettings()
    if fit_dir is None and (paths.datamodels.exists() or paths.datamodels.is_symlink()):
        fit_dir = paths.datamodels
    with Store.open(paths.store) as store:
        if fit_dir is not None:
            fit = FitFolder.open(fit_dir)
            start, end = fit_manifest(fit).targets
            held = held_out_set(fit, store, x_name=reg.x_name, y_name=reg.y_name)
            x_name, y_name, indices = held.x_name, held.y_name, held.held_out
            excluded = held.excluded_same_mask
            source: dict[str, Any] = {"fit_dir": str(fit.path), "manifest": True}
            fitted = len(held.fitted)
        else:
            if experiment.regression is None:
                raise ScoreError(
                    f"experiment {experiment.name!r} has no fit and no regression section, so "
                    "which models are held out is unknown: add regression.data (num_train, "
                    "num_val; the models after them are held out) or pass --fit FIT_DIR",
                    source=experiment.source,
                )
            data = reg.config(data_path=paths.beton, out_dir=paths.datamodels)["data"]
            fitted = int(data["num_train"]) + int(data["num_val"])
            start, end = int(data["target_start_ind"]), int(data["target_end_ind"])
            x_name, y_name = reg.x_name, reg.y_name
            completed = store.completed_indices()
            indices = completed[completed >= fitted]
            excluded = np.zeros(0, dtype=np.int64)
            source = {"experiment": experiment.name, "first_held_out": fitted}
        source["store"] = str(paths.store)
        if len(indices) < MIN_HELD_OUT:
            more = (
                f", {len(excluded)} more left out for sharing a fitted mask"
                if len(excluded)
                else ""
            )
            raise ScoreError(
                f"only {len(indices)} held-out model(s) of {experiment.name!r} are trained "
                f"(completed models beyond the {fitted} fitted ones{more}); correlations need "
                f"at least {MIN_HELD_OUT}: train the partitions after them",
                source=paths.store,
            )
        masks, actual = read_rows(
            store, indices, x_name=x_name, y_name=y_name, target_start=start, target_end=end
        )
    end = start + actual.shape[1]
    return HeldOutModels(
        experiment=experiment.name,
        indices=np.asarray(indices, dtype=np.int64),
        masks=masks.reshape(len(indices), -1),
        actual=actual,
        targets=(int(start), int(end)),
        x_name=x_name,
        y_name=y_name,
        excluded_same_mask=np.asarray(excluded, dtype=np.int64),
        source=source,
    )


def sha256_of(path: Path) -> str:
    """``sha256:<hex>`` of every byte of the file at ``path``, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for piece in iter(lambda: f.read(2**20), b""):
            digest.update(piece)
    return f"sha256:{digest.hexdigest()}"


def _datamodels_scores(path: Path) -> np.ndarray:
    import torch

    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ScoreError(f"cannot read {path} as a datamodels.pt: {exc}", source=path) from exc
    if not isinstance(weights, Mapping) or not {"weight", "std"} <= set(weights):
        found = sorted(weights) if isinstance(weights, Mapping) else type(weights).__name__
        raise ScoreError(
            f"{path} is a torch file but not a datamodels.pt (a dict with weight (p, t) and "
            f"std (p,)); it holds {found}",
            source=path,
        )
    weight = np.asarray(weights["weight"].detach().cpu().numpy(), dtype=np.float64)
    std = np.asarray(weights["std"].detach().cpu().numpy(), dtype=np.float64)
    if weight.ndim != 2 or std.shape != (weight.shape[0],):
        raise ScoreError(
            f"{path}: weight must be (p, t) and std (p,); got {weight.shape} and {std.shape}",
            source=path,
        )
    return weight / std[:, None]


def load_scores(path: str | Path) -> tuple[np.ndarray, str]:
    """The attribution matrix in ``path`` and what it was read as (``"npy"``: a memory map of
    the ``.npy`` array, or ``"datamodels.pt"``: float64 ``weight / std[:, None]``). Shape and
    values are checked by :func:`predict_from_scores`."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(
            f"no scores file {path}: pass a .npy of shape (p training examples, t targets) "
            "or a datamodels.pt",
            source=path,
        )
    try:
        with path.open("rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise ScoreError(f"cannot read {path}: {exc.strerror}", source=path) from exc
    if magic.startswith(_ZIP_MAGIC):
        return _datamodels_scores(path), "datamodels.pt"
    if magic != _NPY_MAGIC:
        raise ScoreError(
            f"{path} is neither a .npy array (np.save) nor a datamodels.pt (torch.save); save "
            "the scores with np.save(path, scores) where scores is (p, t) float",
            source=path,
        )
    try:
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ScoreError(f"cannot read {path} as a .npy array: {exc}", source=path) from exc
    if scores.dtype.kind not in "fiub":
        raise ScoreError(
            f"{path} holds dtype {scores.dtype}; scores must be numbers (float)", source=path
        )
    return scores, "npy"


def check_shape(shape: tuple[int, ...], *, p: int, t: int, source: str | Path) -> None:
    """Raise :class:`ScoreError` unless ``shape == (p, t)``, saying how to fix the common
    mistakes (a transposed matrix, one target saved as a vector)."""
    if shape == (p, t):
        return
    expected = (
        f"expected shape (p, t) = ({p}, {t}): p = {p} training examples (the masks' length), "
        f"t = {t} targets, row j column i = the score of training example j for target i; "
        f"got {shape}"
    )
    if shape == (t, p):
        fix = "it is transposed: save scores.T (np.save(path, scores.T))"
    elif shape == (p,) and t == 1:
        fix = "one target: save scores.reshape(-1, 1)"
    elif len(shape) != 2:
        fix = f"a {len(shape)}-dimensional array: save one (p, t) matrix"
    else:
        fix = "score every training example for every target of the held-out models"
    raise ScoreError(f"{expected}; {fix}", source=source)


def predict_from_scores(
    masks: np.ndarray, scores: np.ndarray, *, t: int, source: str | Path = "scores"
) -> np.ndarray:
    """Predictions float64 ``(n, t)``: ``masks @ scores`` in float64 (``masks`` ``(n, p)``,
    ``scores`` ``(p, t)``), summed over blocks of rows of ``scores`` so that a memory map is
    never loaded whole. Raises :class:`ScoreError` for a shape other than ``(p, t)`` or
    NaN/infinite scores (counted, with the first one's place); ``source`` names the file."""
    n, p = masks.shape
    check_shape(tuple(scores.shape), p=p, t=t, source=source)
    out = np.zeros((n, t), dtype=np.float64)
    # each block converts rows x t scores and n x rows masks to float64
    rows = max(1, _BLOCK_VALUES // max(t, n, 1))
    nan = inf = 0
    first: tuple[int, int] | None = None
    for lo in range(0, p, rows):
        block = np.asarray(scores[lo : lo + rows], dtype=np.float64)
        bad = ~np.isfinite(block)
        if bad.any():
            nan += int(np.isnan(block).sum())
            inf += int(np.isinf(block).sum())
            if first is None:
                j, i = np.argwhere(bad)[0]
                first = (lo + int(j), int(i))
            continue
        out += np.asarray(masks[:, lo : lo + rows], dtype=np.float64) @ block
    if first is not None:
        raise ScoreError(
            f"the scores hold {nan} NaN and {inf} infinite value(s) of {p * t} (the first at "
            f"row {first[0]}, column {first[1]}): every score must be finite; fix or replace "
            "them (e.g. np.nan_to_num(scores, nan=0.0) if a missing score means no effect)",
            source=source,
        )
    return out


@dataclass(frozen=True, eq=False)
class AttributionScore:
    """An attribution matrix judged on held-out models: ``scores`` the results, ``models`` the
    held-out models, ``scores_file`` / ``scores_sha256`` / ``scores_kind`` (``"npy"`` or
    ``"datamodels.pt"``) what was judged."""

    scores: HeldOutScores
    models: HeldOutModels
    scores_file: str
    scores_sha256: str
    scores_kind: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: :meth:`HeldOutScores.to_dict` (``lds``, ``ci``, ``noise_ceiling``,
        ``held_out_models``, ``targets`` ...) plus ``scores_file``, ``scores_sha256``,
        ``scores_kind``, ``experiment``, ``source``, ``target_columns`` ([start, end)),
        ``held_out_indices`` and ``excluded_same_mask``; NaN written as null."""
        out = dict(self.scores.to_dict())
        out.update(
            {
                "experiment": self.models.experiment,
                "scores_file": self.scores_file,
                "scores_sha256": self.scores_sha256,
                "scores_kind": self.scores_kind,
                "source": dict(self.models.source),
                "target_columns": list(self.models.targets),
                "held_out_indices": [int(i) for i in self.models.indices],
                "excluded_same_mask": [int(i) for i in self.models.excluded_same_mask],
            }
        )
        return _json_safe(out)

    def render(self) -> str:
        """The results as text, one fact a line."""
        s, m = self.scores, self.models
        pct = f"{s.level:.0%}"
        lines = [
            f"LDS of {self.scores_file} on the held-out models of experiment {m.experiment!r}",
            *_truth_lines(s.single, pct),
        ]
        if s.mean_of_seeds is not None:
            lines.append(f"  against the {s.mean_of_seeds.ground_truth}:")
            lines += ["  " + line for line in _truth_lines(s.mean_of_seeds, pct)]
        boot = (
            f"{s.resamples} resamples of held-out masks, seed {s.seed}"
            if s.resamples
            else "no bootstrap (--bootstrap 0)"
        )
        start, end = m.targets
        lines += [
            f"  intervals        {pct}, {boot}",
            f"  held-out models  {s.single.models} on {s.single.masks} distinct masks"
            + (f" ({s.seeds} seeds per replicated mask)" if s.seeds else "")
            + f": {ranges_text(m.indices, max_runs=20)}",
        ]
        if len(m.excluded_same_mask):
            lines.append(
                f"  left out         {len(m.excluded_same_mask)} with a fitted model's mask: "
                f"{ranges_text(m.excluded_same_mask, max_runs=20)}"
            )
        lines += [
            f"  chosen by        {m.source_text()}",
            f"  store            {m.source['store']} ({m.x_name} -> {m.y_name})",
            f"  targets          {s.targets} ({m.y_name} columns {start}..{end - 1})",
            f"  scores           {self.scores_file} ({self.scores_kind}, ({m.p}, {m.t}))",
            f"  sha256           {self.scores_sha256.removeprefix('sha256:')}",
        ]
        return "\n".join(lines)


def _interval(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"  [{ci[0]:.3f}, {ci[1]:.3f}]"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _truth_lines(truth: TruthScores, pct: str) -> list[str]:
    lines = [f"  LDS              {_number(truth.lds)}{_interval(truth.lds_ci)}"]
    if truth.noise_ceiling is None:
        lines.append("  noise ceiling    n/a (no mask trained on several seeds)")
    else:
        lines.append(
            f"  noise ceiling    {_number(truth.noise_ceiling)}{_interval(truth.noise_ceiling_ci)}"
        )
        lines.append(
            f"  LDS / ceiling    {_number(truth.lds_over_ceiling)}"
            f"{_interval(truth.lds_over_ceiling_ci)}"
        )
    return lines


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def score_attributions(
    experiment: Experiment,
    scores_file: str | Path,
    *,
    fit_dir: str | Path | None = None,
    home: str | Path | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> AttributionScore:
    """Judge the attribution matrix in ``scores_file`` (a ``.npy`` ``(p, t)`` or a
    ``datamodels.pt``) on ``experiment``'s held-out models (:func:`held_out_models`):
    prediction ``masks @ scores``, scored by
    :func:`~dm_assets.evaluation.uncertainty.score_held_out` with the held-out masks as
    bootstrap clusters (``resamples`` of them, ``seed``; 0: no intervals).

    Raises
    ------
    ScoreError
        A missing, unreadable, misshapen or non-finite scores file (the message names the
        expected ``(p, t)``), or fewer than 3 held-out models; and the errors of
        :func:`held_out_models`.
    """
    if resamples < 0:
        raise ScoreError(f"resamples={resamples}: use 0 (no intervals) or more")
    path = Path(scores_file)
    scores, kind = load_scores(path)  # a missing file is reported before reading the store
    models = held_out_models(experiment, fit_dir=fit_dir, home=home)
    predicted = predict_from_scores(models.masks, scores, t=models.t, source=path)
    from dm_assets.evaluation.ceiling import group_identical_masks
    from dm_assets.evaluation.uncertainty import score_held_out

    try:
        result = score_held_out(
            predicted,
            models.actual,
            groups=group_identical_masks(models.masks),
            resamples=resamples,
            seed=seed,
        )
    except ValueError as exc:  # e.g. non-finite outputs stored for a held-out model
        raise ScoreError(
            f"cannot score the held-out models {ranges_text(models.indices, max_runs=5)} of "
            f"{experiment.name!r}: {exc}",
            source=models.source["store"],
        ) from exc
    return AttributionScore(
        scores=result,
        models=models,
        scores_file=str(path),
        scores_sha256=sha256_of(path),
        scores_kind=kind,
    )
