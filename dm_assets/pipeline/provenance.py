"""The lineage of a fit, from its evaluation back to code: what ``python -m dm_assets.lineage``
prints (:func:`lineage_facts` gathers it, :func:`render_lineage` writes it as text).

The chain, each link read from the files that recorded it (never from the current settings):

    evaluation   evaluation.json beside the fit: scores, the held-out models and when
    fit          the fit folder and its manifest.json: when, solver, targets, Dagster and
                 MLflow run ids
    dataset      the .beton the fit read: path, bytes, sha256, rows
    models       the exact model indices that fitted and chose lambda (as ranges), the rows'
                 digest, the store they live in
    configurations  the training configuration of those models (id, fingerprint, trainer
                 module, arguments, code hash or version, training library versions)
    code         dm_assets version and git commit of the fit, library versions

An experiment name is looked up with :func:`dm_assets.pipeline.finished.find_experiment` and
its latest fit (``$DM_HOME/<name>/datamodels``) is followed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dm_assets.errors import DmError
from dm_assets.regression.fit import FitFolder, FitFolderError, ManifestMissingError
from dm_assets.regression.manifest import ManifestError
from dm_assets.store.store import ranges_text


class LineageError(DmError, LookupError):
    """Nothing to trace: an unknown experiment, no fit yet, or a fit without a manifest."""


def resolve_fit(target: str, home: str | os.PathLike[str] | None = None) -> tuple[FitFolder, str]:
    """The fit folder ``target`` names (a folder, or an experiment whose latest fit is
    followed) and what it was asked as. Raises :class:`LineageError` with the remedy."""
    path = Path(target)
    if path.is_dir():
        try:
            return FitFolder.open(path), str(path)
        except FitFolderError as exc:
            raise LineageError(str(exc), source=path) from exc
    from dm_assets.pipeline.experiment import load_experiments

    experiments = {e.name: e for e in load_experiments()}
    if target not in experiments:
        raise LineageError(
            f"{target!r} is neither a fit folder nor an experiment; the experiments are "
            f"{sorted(experiments)} (add yours with DM_EXPERIMENTS)"
        )
    link = experiments[target].paths(None if home is None else Path(home)).datamodels
    try:
        return FitFolder.open(link), target
    except FitFolderError as exc:
        raise LineageError(
            f"experiment {target!r} has no fit at {link}: run `python -m dm_assets.launch "
            f"{target}_all` first",
            source=link,
        ) from exc


def lineage_facts(target: str, home: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The lineage of ``target`` (a fit folder or an experiment name) as one JSON-ready
    mapping: ``asked``, ``evaluation`` (or null), ``fit``, ``dataset``, ``store``, ``models``,
    ``configurations`` (a list), ``code``, ``versions`` and, for merged fits, ``slices``."""
    fit, asked = resolve_fit(target, home)
    try:
        manifest = fit.manifest()
    except (ManifestMissingError, ManifestError) as exc:
        raise LineageError(str(exc), source=fit.path) from exc
    summary = fit.summary()
    evaluation = fit.evaluation()
    eval_facts = None
    if evaluation is not None:
        held = evaluation.get("held_out_indices")
        eval_facts = {
            "path": str(fit.file("evaluation.json")),
            "evaluated": evaluation.get("evaluated"),
            "lds": evaluation.get("lds"),
            "pearson": evaluation.get("pearson"),
            "r2": evaluation.get("r2"),
            "held_out_models": evaluation.get("held_out_models"),
            "held_out": None if held is None else ranges_text(held),
            "excluded_same_mask": evaluation.get("excluded_same_mask"),
            "rows_digest_checked": evaluation.get("rows_digest"),
        }
    counts = manifest.configuration_ids.get("counts", {})
    configurations = []
    for config_id, entry in sorted(manifest.configurations.items()):
        config = entry.get("configuration", {})
        configurations.append(
            {
                "id": config_id,
                "fingerprint": entry.get("fingerprint"),
                "models": counts.get(str(config_id), 0),
                "main_import": config.get("main_import"),
                "args": config.get("args", {}),
                "code": config.get("code"),
                "versions": config.get("versions", {}),
            }
        )
    return {
        "asked": asked,
        "evaluation": eval_facts,
        "fit": {
            "path": str(fit.path),
            "manifest": str(fit.file("manifest.json")),
            "created": manifest.created,
            "solver": summary.get("solver"),
            "device": summary.get("device"),
            "targets": list(manifest.targets),
            "mean_val_r2": summary.get("mean_val_r2"),
            "dagster_run_id": manifest.dagster_run_id,
            "mlflow_run_id": manifest.mlflow_run_id,
        },
        "dataset": manifest.dataset,
        "store": manifest.store,
        "models": {
            "train": ranges_text(manifest.train_indices),
            "train_count": len(manifest.train_indices),
            "validation": ranges_text(manifest.val_indices),
            "validation_count": len(manifest.val_indices),
            "rows_digest": manifest.rows.get("digest"),
            "rows_digest_source": manifest.rows.get("source"),
            "unknown_configuration": manifest.configuration_ids.get("unknown"),
            "mixed": manifest.mixed,
        },
        "configurations": configurations,
        "code": manifest.code,
        "versions": manifest.versions,
        "slices": manifest.slices,
    }


def _args_text(args: dict[str, str]) -> str:
    return " ".join(f"--{k}={v}" for k, v in sorted(args.items())) or "(none)"


def render_lineage(facts: dict[str, Any]) -> str:
    """The text of :func:`lineage_facts`, one link of the chain per block."""
    lines = [f"lineage of {facts['asked']}"]
    e = facts["evaluation"]
    if e is None:
        lines.append("evaluation      none yet (materialize <experiment>/datamodel_eval)")
    else:
        lines.append(
            f"evaluation      {e['path']} ({e['evaluated'] or 'time not recorded'}): LDS "
            f"{e['lds']:.3f}, Pearson {e['pearson']:.3f}, R^2 {e['r2']:.3f} on "
            f"{e['held_out_models']} held-out models: {e['held_out'] or '(not recorded)'}"
        )
        if e["excluded_same_mask"]:
            lines.append(
                f"                left out (mask of a fitted model): "
                f"{ranges_text(e['excluded_same_mask'])}"
            )
    f = facts["fit"]
    lines += [
        f"fit             {f['path']} (created {f['created']}; {f['solver']} on {f['device']}; "
        f"targets [{f['targets'][0]}, {f['targets'][1]}))",
        f"  manifest      {f['manifest']}",
        f"  dagster run   {f['dagster_run_id'] or 'none'}",
        f"  mlflow run    {f['mlflow_run_id'] or 'none'}",
    ]
    d = facts["dataset"]
    lines.append(
        f"dataset         {d['path']}: {d['rows']} rows, {d['bytes']:,} bytes, {d['digest']}"
    )
    m = facts["models"]
    store = facts["store"]
    lines += [
        f"models          train {m['train_count']}: {m['train']}",
        f"                validation {m['validation_count']}: {m['validation']}",
        f"                rows digest {m['rows_digest']} (from the {m['rows_digest_source']})",
        "                store "
        + (
            "not recorded"
            if store is None
            else f"{store['path']} ({store['x_name']}, {store['y_name']})"
        ),
    ]
    mixed = " MIXED" if m["mixed"] else ""
    unknown = m["unknown_configuration"] or 0
    lines.append(
        f"configurations{mixed}: {len(facts['configurations'])} known"
        + (f", {unknown} models of unknown configuration" if unknown else "")
    )
    for c in facts["configurations"]:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(c["versions"].items()))
        lines += [
            f"  {c['id']}  {c['fingerprint']} ({c['models']} models)",
            f"      trainer {c['main_import']} {_args_text(c['args'])}",
            f"      code {c['code']}; {versions}",
        ]
    code, versions = facts["code"], facts["versions"]
    commit = code.get("git_commit") or "unknown"
    if code.get("git_dirty"):
        commit += " (with uncommitted changes)"
    lines.append(
        f"code            dm_assets {code.get('dm_assets')} at git {commit}; "
        + ", ".join(f"{k} {v or '-'}" for k, v in versions.items())
    )
    for s in facts.get("slices") or []:
        lines.append(
            f"  slice         targets [{s['targets'][0]}, {s['targets'][1]}) {s['fit_dir']} "
            f"(dagster run {s['dagster_run_id'] or 'none'}, mlflow run "
            f"{s['mlflow_run_id'] or 'none'})"
        )
    return "\n".join(lines)
