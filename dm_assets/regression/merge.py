"""Fits of slices of the targets, merged into one fit as if all targets were fitted together.

A regression over many targets can be split by targets: every target's path depends only on the
masks and its own outputs, so slices ``[a, b)`` fit on different devices (each with
``data.target_start_ind = a``, ``data.target_end_ind = b``) and :func:`merge_fits` joins their
fit folders (written by ``write_outputs``) into one folder with the same files:

========================== ====================================================================
``datamodels.pt``          ``weight`` ``(n_features, n_targets)``: the slices' columns side by
                           side in target order; ``bias``, ``lam``, ``lam_max`` ``(n_targets,)``
                           likewise; ``mean``, ``std`` ``(n_features,)``: the slices' own
                           (identical: every slice standardizes with the same training models)
``regularization_path.csv`` the slices' tables one after the other, by target then step (its
                           ``target`` column already counts from the dataset's first target)
``summary.json``           the slices' counts (``n_train``, ``n_val``, ``n_features``...),
                           ``n_targets`` and ``seconds`` summed, ``mean_*`` weighted by each
                           slice's number of targets; ``solver`` and ``device`` the distinct
                           values joined by ``", "``; ``slices``: per slice its folder, first
                           target, number of targets, solver, device and seconds
``config.yaml``            the first slice's config with the target range of the union and
                           ``cfg.out_dir`` the merged folder (``cfg.device``: the slices' common
                           device, ``auto`` where they differ)
``manifest.json``          the slices' common lineage (the same train and validation model
                           indices, dataset, rows digest and configurations: checked), the
                           merged config, the union of the targets, ``slices`` (each slice's
                           folder, targets and run ids) and the merge's Dagster run; absent
                           only when no slice has one (fits of arrays in memory)
========================== ====================================================================

The science layer: no dagster, no mlflow.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dm_assets.errors import DmError
from dm_assets.regression.fit import FitFolder, FitFolderError
from dm_assets.regression.manifest import FitManifest, ManifestError, merged_manifest

if TYPE_CHECKING:
    import pandas as pd
    import torch

# config keys that legitimately differ between slices of one regression
_PER_SLICE_KEYS = {
    ("data", "target_start_ind"),
    ("data", "target_end_ind"),
    ("cfg", "out_dir"),
    ("cfg", "device"),
}
# summary counts every slice shares when it was fitted on the same dataset
_SHARED_COUNTS = ("n_train", "n_val", "n_models_in_dataset", "n_features", "refit")
# target-weighted means of the summary
_MEANS = ("mean_lambda_over_max", "mean_nonzeros", "mean_val_r2", "mean_val_mse")
# mean and std are column statistics of the same training rows: equal up to the float32
# rounding of a reduction done in another order (another device); one training model more or
# less moves a column's mean by 1/num_train, far above this
_STATS_RTOL = 1e-6


class MergeError(DmError, ValueError):
    """Slice fits that cannot be merged; the message lists every problem with its fix."""

    def headline(self) -> str:
        return "cannot merge the slice fits"


@dataclass(frozen=True)
class TargetSlice:
    """Targets ``[start, end)`` of the dataset, fitted together; ``key`` names it, zero-padded
    to the width of the last target of the whole range so that keys sort: ``t0000-0099``
    (first and last target, inclusive, as the model partitions' keys)."""

    start: int
    end: int
    key: str


def target_slices(start: int, end: int, per_slice: int) -> list[TargetSlice]:
    """Targets ``[start, end)`` cut into consecutive slices of ``per_slice`` (the last may be
    shorter), in target order."""
    if per_slice < 1:
        raise ValueError(f"per_slice={per_slice}: a slice holds at least one target")
    if not 0 <= start < end:
        raise ValueError(f"targets [{start}, {end}): need 0 <= start < end")
    width = len(str(end - 1))
    slices = []
    for first in range(start, end, per_slice):
        stop = min(first + per_slice, end)
        slices.append(TargetSlice(first, stop, f"t{first:0{width}d}-{stop - 1:0{width}d}"))
    return slices


@dataclass
class _SliceFit:
    folder: Path
    weights: dict[str, torch.Tensor]
    path: pd.DataFrame
    summary: dict[str, Any]
    config: dict[str, dict[str, Any]]
    manifest: FitManifest | None

    @property
    def start(self) -> int:
        return int(self.config["data"]["target_start_ind"])

    @property
    def n_targets(self) -> int:
        return int(self.weights["weight"].shape[1])

    @property
    def end(self) -> int:
        return self.start + self.n_targets


def _read_all(slice_dirs: Sequence[str | Path]) -> list[_SliceFit]:
    """The slices' fits in target order; every folder that is not a complete fit folder is
    named at once."""
    fits, problems = [], []
    for d in slice_dirs:
        try:
            folder = FitFolder.open(d)
        except FitFolderError as exc:
            problems += exc.problems
            continue
        fits.append(
            _SliceFit(
                folder=folder.path,
                weights=folder.weights(),
                path=folder.path_table(),
                summary=folder.summary(),
                config=folder.config(),
                manifest=folder.manifest() if folder.has_manifest() else None,
            )
        )
    if problems:
        raise MergeError(problems)
    return sorted(fits, key=lambda f: f.start)


def _tiling_problems(fits: Sequence[_SliceFit]) -> list[str]:
    problems = []
    for before, after in itertools.pairwise(fits):
        if after.start > before.end:
            problems.append(
                f"gap: targets [{before.end}, {after.start}) are in no slice ({before.folder} "
                f"ends at {before.end}, {after.folder} starts at {after.start}); fit them "
                "or pass their slice"
            )
        elif after.start < before.end:
            problems.append(
                f"overlap: targets [{after.start}, {min(before.end, after.end)}) are in "
                f"{before.folder} and in {after.folder}; pass one fit per slice"
            )
    return problems


def _consistency_problems(fits: Sequence[_SliceFit]) -> list[str]:
    first = fits[0]
    problems = []
    for fit in fits[1:]:
        for key in _SHARED_COUNTS:
            if fit.summary.get(key) != first.summary.get(key):
                problems.append(
                    f"summary {key}: {first.summary.get(key)!r} in {first.folder} but "
                    f"{fit.summary.get(key)!r} in {fit.folder}; the slices were fitted on "
                    "different datasets: refit the older slices on the current dataset"
                )
        for section, values in first.config.items():
            other = fit.config.get(section, {})
            for key in sorted(set(values) | set(other)):
                if (section, key) in _PER_SLICE_KEYS:
                    continue
                if values.get(key) != other.get(key):
                    problems.append(
                        f"config {section}.{key}: {values.get(key)!r} in {first.folder} but "
                        f"{other.get(key)!r} in {fit.folder}; refit the slices with one config"
                    )
        import torch

        for name in ("mean", "std"):
            a, b = first.weights[name], fit.weights[name]
            if a.shape != b.shape or not torch.allclose(a, b, rtol=_STATS_RTOL, atol=0.0):
                problems.append(
                    f"{name}: the standardization of {fit.folder} differs from that of "
                    f"{first.folder}, so they were fitted on different training models; "
                    "refit the older slices on the current dataset"
                )
    return problems


def _joined(values: Sequence[object]) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def _summary(fits: Sequence[_SliceFit]) -> dict[str, Any]:
    total = sum(f.n_targets for f in fits)
    summary: dict[str, Any] = {
        "solver": _joined([f.summary["solver"] for f in fits]),
        "device": _joined([f.summary["device"] for f in fits]),
        "seconds": float(sum(f.summary["seconds"] for f in fits)),
    }
    summary.update({key: fits[0].summary[key] for key in _SHARED_COUNTS if key != "refit"})
    summary["n_targets"] = total
    summary["target_start_ind"] = fits[0].start
    for key in _MEANS:
        summary[key] = float(sum(f.summary[key] * f.n_targets for f in fits) / total)
    summary["refit"] = fits[0].summary["refit"]
    summary["slices"] = [
        {
            "fit_dir": str(f.folder),
            "target_start_ind": f.start,
            "n_targets": f.n_targets,
            "solver": f.summary["solver"],
            "device": f.summary["device"],
            "seconds": f.summary["seconds"],
        }
        for f in fits
    ]
    return summary


def _config(fits: Sequence[_SliceFit], out_dir: Path) -> dict[str, dict[str, Any]]:
    config = {section: dict(values) for section, values in fits[0].config.items()}
    config["data"]["target_start_ind"] = fits[0].start
    config["data"]["target_end_ind"] = fits[-1].end
    config["cfg"]["out_dir"] = str(out_dir)
    devices = {f.config["cfg"]["device"] for f in fits}
    config["cfg"]["device"] = devices.pop() if len(devices) == 1 else "auto"
    return config


def _manifest(
    fits: Sequence[_SliceFit], config: dict[str, Any], dagster_run_id: str | None
) -> FitManifest | None:
    without = [str(f.folder) for f in fits if f.manifest is None]
    if len(without) == len(fits):
        return None
    if without:
        raise MergeError(
            [
                f"{folder} has no manifest.json (fitted before fits recorded their lineage) "
                "while other slices have one: refit it so every slice records its models"
                for folder in without
            ]
        )
    try:
        return merged_manifest(
            [(f.folder, f.manifest) for f in fits if f.manifest is not None],
            regression=config,
            dagster_run_id=dagster_run_id,
        )
    except ManifestError as exc:
        raise MergeError(exc.problems) from exc


def merge_fits(
    slice_dirs: Sequence[str | Path], out_dir: str | Path, *, dagster_run_id: str | None = None
) -> Path:
    """Merge fit folders of slices of the targets into ``out_dir`` (see the module docstring),
    written under a temporary name and renamed when complete; an existing ``out_dir`` is
    refused.

    Parameters
    ----------
    slice_dirs
        Fit folders written by ``write_outputs`` (links are followed), in any order. Together
        their targets must tile one range with no gap and no overlap, and they must come from
        one dataset and one config (equal standardization, counts and settings but the target
        range and the device).
    out_dir
        The merged folder; must not exist.
    dagster_run_id
        The Dagster run merging, recorded in the merged manifest.

    Raises
    ------
    MergeError
        Listing every gap, overlap and mismatch, each naming the folders involved.
    """
    out_dir = Path(out_dir)
    if not slice_dirs:
        raise MergeError(["no slice fit folders given: pass at least one"])
    if out_dir.exists():
        raise FileExistsError(
            f"out_dir={out_dir} already exists; choose a new directory (nothing is overwritten)"
        )
    fits = _read_all(slice_dirs)
    problems = _tiling_problems(fits) + _consistency_problems(fits)
    if problems:
        raise MergeError(problems)
    # imported here: the definitions import this module, and every Dagster process loads them
    import pandas as pd
    import torch

    weights = {
        "weight": torch.cat([f.weights["weight"] for f in fits], dim=1),
        "bias": torch.cat([f.weights["bias"] for f in fits]),
        "lam": torch.cat([f.weights["lam"] for f in fits]),
        "lam_max": torch.cat([f.weights["lam_max"] for f in fits]),
        "mean": fits[0].weights["mean"],
        "std": fits[0].weights["std"],
    }
    path = pd.concat([f.path for f in fits], ignore_index=True)
    path = path.sort_values(["target", "step"], kind="stable").reset_index(drop=True)

    config = _config(fits, out_dir)
    FitFolder.write(
        out_dir,
        weights=weights,
        path_table=path,
        summary=_summary(fits),
        config=config,
        manifest=_manifest(fits, config, dagster_run_id),
    )
    return out_dir
