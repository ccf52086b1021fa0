"""MLflow tracking of regression fits: one MLflow experiment per dm experiment, one run per fit.

Plain ``mlflow`` (its ``MlflowClient`` with an explicit tracking URI; the global ``mlflow``
state is never touched), imported only when something is logged, so importing this module (and
the Dagster definitions) stays cheap. By default the store lives in ``DM_HOME``::

    $DM_HOME/mlflow.db                                 runs, params, metrics, tags (SQLite)
    $DM_HOME/mlflow.db.init-lock                       empty; serializes creating the database
    $DM_HOME/mlflow-artifacts/<experiment>/<run id>/artifacts/
        regularization_path.csv, summary.json,         the fit directory's small files
        config.yaml
        manifest.json                                  the fit's lineage, when it has one
        regularization_path.png                        ``plot_path`` of the path table
        datamodels.pt                                  only with ``log_weights=True``

The weights (``datamodels.pt``, 2 GB per fit at CIFAR-10 scale) stay in the fit folder, which
the run references (tag and param ``dm_assets.fit_dir``, tag ``dm_assets.weights``: the
weights' path); ``MlflowTracking(log_weights=True)`` copies them into the run as well.

What one run records, for a fit directory written by ``write_outputs``:

- params: ``config.yaml`` flattened as ``section.key`` (``cfg.k``, ``data.num_train``...), the
  text values of ``summary.json`` as ``summary.<key>`` (``summary.solver``...), and the
  caller's ``params``; values longer than MLflow's limit are cut, ending in ``...``;
- metrics per lambda step (``step`` = path index): ``path/<column>`` for every column of
  ``step_metrics`` (``path/mean_val_mse``, ``path/fraction_on_path``...);
- final metrics: the numbers in ``summary.json`` as ``final/<key>`` (``final/mean_val_r2``...);
- tags: the caller's (Dagster run id, asset key, partition; an empty one is left out),
  ``dm_assets.fit_dir`` (also a param), ``dm_assets.weights`` (the fit's ``datamodels.pt``)
  and ``mlflow.note.content``, the run's description in the UI (experiment, models, targets,
  fit folder);
- times: the run starts when the fit started (``started_at``, else the fit folder's
  ``summary.json`` time less the fit's ``seconds``) and ends once logged, so its duration in
  the UI is the fit's (plus the logging);
- from the fit's ``manifest.json``, when it has one: params ``manifest.train_models``,
  ``manifest.val_models`` (models fitted on and choosing lambda), ``manifest.dataset_digest``,
  ``manifest.rows_digest``, ``manifest.configuration_ids`` (``0,1``; ``-1`` unknown),
  ``manifest.configuration_fingerprints`` (``id:fingerprint`` pairs), ``manifest.mixed``,
  ``manifest.git_commit``; the same digests, ids and fingerprints as tags
  ``dm_assets.dataset_digest``, ``dm_assets.rows_digest``, ``dm_assets.configuration_ids``,
  ``dm_assets.configuration_fingerprints``; the run's id is recorded into the manifest
  (:meth:`FitFolder.record_runs <dm_assets.regression.fit.FitFolder.record_runs>`) before it
  is logged as an artifact.

``MlflowTracking(...).ui_command()`` is the shell command that opens the MLflow UI on the store;
``run_links(run_id)`` the Dagster metadata linking to the run in the UI that
``python -m dm_assets.ui mlflow`` serves (:func:`dm_assets.ui.mlflow_ui_url`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from dm_assets.home import mlflow_artifact_root, mlflow_tracking_uri
from dm_assets.regression.fit import FIT_FILES, MANIFEST_FILE, FitFolder
from dm_assets.regression.manifest import FitManifest
from dm_assets.ui import mlflow_ui_url

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

FIT_DIR_TAG = "dm_assets.fit_dir"
WEIGHTS_TAG = "dm_assets.weights"
WEIGHTS_FILE = "datamodels.pt"
PLOT_NAME = "regularization_path.png"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI

# MLflow's own limits (mlflow.utils.validation), repeated here so that this module imports
# without mlflow; a value over them makes the whole log_batch call fail.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_KEY = 250
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000

# loggers that announce MLflow's migrations of a fresh SQLite store at INFO
_NOISY_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic")


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"cfg": {"k": 10}}`` as ``{"cfg.k": 10}`` (nested mappings joined with dots)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def manifest_params(manifest: FitManifest) -> dict[str, str]:
    """The MLflow params of a fit's manifest (see the module docstring)."""
    ids = ",".join(str(i) for i in sorted(int(k) for k in manifest.configuration_ids["counts"]))
    fingerprints = ",".join(
        f"{i}:{entry['fingerprint']}" for i, entry in sorted(manifest.configurations.items())
    )
    return {
        "manifest.train_models": str(len(manifest.train_indices)),
        "manifest.val_models": str(len(manifest.val_indices)),
        "manifest.dataset_digest": str(manifest.dataset.get("digest")),
        "manifest.rows_digest": str(manifest.rows.get("digest")),
        "manifest.configuration_ids": ids or "none",
        "manifest.configuration_fingerprints": fingerprints or "none",
        "manifest.mixed": str(manifest.mixed).lower(),
        "manifest.git_commit": str(manifest.code.get("git_commit")),
    }


def manifest_tags(manifest: FitManifest) -> dict[str, str]:
    """The MLflow tags of a fit's manifest (see the module docstring)."""
    params = manifest_params(manifest)
    return {
        "dm_assets.dataset_digest": params["manifest.dataset_digest"],
        "dm_assets.rows_digest": params["manifest.rows_digest"],
        "dm_assets.configuration_ids": params["manifest.configuration_ids"],
        "dm_assets.configuration_fingerprints": params["manifest.configuration_fingerprints"],
    }


def fit_started(folder: FitFolder, summary: Mapping[str, Any]) -> float | None:
    """When the fit in ``folder`` started, in seconds since the epoch, as the folder records
    it: ``summary.json`` is written as the fit ends, so its modification time less the
    summary's ``seconds``; None without a numeric ``seconds``."""
    seconds = summary.get("seconds")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return None
    return folder.file("summary.json").stat().st_mtime - float(seconds)


def run_description(
    experiment: str,
    fit_dir: Path,
    summary: Mapping[str, Any],
    manifest: FitManifest | None,
    n_targets: int,
) -> str:
    """The run's description (markdown, tag ``mlflow.note.content``): the experiment, the
    models fitted on and choosing lambda, the targets, the fit folder."""
    if manifest is not None:
        train, val = len(manifest.train_indices), len(manifest.val_indices)
    else:
        train, val = summary.get("n_train", "?"), summary.get("n_val", "?")
    return (
        f"Datamodels of experiment `{experiment}`: {n_targets} targets, each a LASSO path "
        f"fitted on {train} training models with lambda chosen on {val} validation models. "
        f"Fit folder: `{fit_dir}`."
    )


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def _quiet_migrations() -> Iterator[None]:
    """MLflow logs each schema migration of a new SQLite file at INFO: show warnings only."""
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI; None for other stores and in-memory."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _template_cache() -> Path:
    """Where migrated empty MLflow databases are kept, one per MLflow version:
    ``$DM_CACHE`` if set, else ``$XDG_CACHE_HOME/dm_assets`` (default ``~/.cache/dm_assets``)."""
    if os.environ.get("DM_CACHE"):
        return Path(os.environ["DM_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dm_assets"


def _migrated_template() -> Path:
    """A migrated, empty MLflow SQLite database of the installed MLflow version, made once per
    machine: MLflow migrates a new file through its whole schema history (about 10 s on 2
    cores), the larger part of a first fit's logging into a fresh ``DM_HOME``."""
    import mlflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    cache = _template_cache()
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if template.exists():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / (template.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        if not template.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                building = Path(tmp) / "empty.db"
                SqlAlchemyStore(f"sqlite:///{building}", Path(tmp).as_uri()).engine.dispose()
                os.replace(building, template)
    return template


def _create_sqlite_store(db: Path, artifact_root: Path) -> None:
    """A new MLflow database at ``db``: a copy of :func:`_migrated_template` whose ``Default``
    experiment keeps its artifacts in ``artifact_root / "0"``, renamed into place when
    complete. Where the template cannot be made or copied (an unwritable cache), MLflow
    creates and migrates the file itself, with the same result."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(_migrated_template(), tmp)
        with sqlite3.connect(tmp) as connection:
            connection.execute(
                "UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                "last_update_time = ? WHERE experiment_id = 0",
                ((artifact_root / "0").as_uri(), *[int(time.time() * 1000)] * 2),
            )
        connection.close()
        os.replace(tmp, db)
    except (OSError, sqlite3.Error) as error:
        tmp.unlink(missing_ok=True)
        logger.info("no migrated MLflow template (%s): MLflow creates %s itself", error, db)
        SqlAlchemyStore(f"sqlite:///{db}", artifact_root.as_uri()).engine.dispose()


@contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Serialize opening a SQLite store across processes: MLflow creates and migrates a new file
    on first use, and two processes doing so at once fail (alembic: "expected to match one row
    when updating ... in 'alembic_version'"). Other stores need no lock."""
    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init-lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


def _check_experiment_name(experiment: str) -> None:
    if (
        not isinstance(experiment, str)
        or not experiment.strip()
        or experiment in (".", "..")
        or "/" in experiment
        or "\\" in experiment
    ):
        raise ValueError(
            f"experiment={experiment!r} cannot name an MLflow experiment and its artifact "
            f"folder: pass the dm experiment's name, a non-empty string without '/' or '\\'"
        )


class MlflowTracking(dg.ConfigurableResource):
    """Logs regression fits to MLflow (plain ``mlflow``, a SQLite store in ``DM_HOME`` by
    default); see the module docstring for what a run holds."""

    tracking_uri: str = Field(
        default="",
        description=(
            "MLflow tracking URI; empty uses sqlite:///$DM_HOME/mlflow.db "
            "(dm_assets.home.mlflow_tracking_uri)."
        ),
    )
    home: str = Field(
        default="",
        description=(
            "DM_HOME override for the default store and the artifact root "
            "($DM_HOME/mlflow-artifacts); empty uses $DM_HOME, else .dm in the working directory."
        ),
    )
    enabled: bool = Field(
        default=True, description="Log to MLflow; false makes log_regression a no-op."
    )
    log_weights: bool = Field(
        default=False,
        description=(
            "Copy each fit's weights (datamodels.pt, 2 GB per fit at CIFAR-10 scale) into its "
            "MLflow run too; by default a run references them (tags dm_assets.fit_dir and "
            "dm_assets.weights) and holds only the fit's small files."
        ),
    )

    def find_fit_run(self, experiment: str, fit_dir: Path) -> str | None:
        """The id of the MLflow run that logged ``fit_dir`` (tag ``dm_assets.fit_dir``), if any."""
        if not self.enabled:
            return None
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        value = str(Path(fit_dir).resolve()).replace("'", "\\'")
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{FIT_DIR_TAG}` = '{value}'",
            max_results=1,
        )
        return str(runs[0].info.run_id) if runs else None

    def log_evaluation(
        self,
        *,
        experiment: str,
        fit_dir: Path,
        metrics: Mapping[str, float],
        curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
        artifacts: Sequence[Path] = (),
    ) -> str | None:
        """Add an evaluation of the fit in ``fit_dir`` to the MLflow run that logged the fit:
        ``metrics`` as ``eval/<name>``, each curve as metric ``eval/<name>`` with one point per
        ``(step, value)`` (e.g. step = models used in the fit), ``artifacts`` under
        ``evaluation/``. Returns the run id; None when disabled or no run logged that fit."""
        if not self.enabled:
            return None
        from mlflow.entities import Metric

        run_id = self.find_fit_run(experiment, fit_dir)
        if run_id is None:
            logger.warning(
                "no MLflow run of experiment %r logged %s; its evaluation is not tracked",
                experiment,
                fit_dir,
            )
            return None
        now_ms = int(time.time() * 1000)
        points = [
            Metric(_truncate(f"eval/{k}", _MAX_KEY), float(v), now_ms, 0)
            for k, v in metrics.items()
        ]
        for name, curve in (curves or {}).items():
            points += [
                Metric(_truncate(f"eval/{name}", _MAX_KEY), float(v), now_ms, int(step))
                for step, v in curve
            ]
        client = self.client()
        for chunk in _chunks(points, _MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk)
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
        return run_id

    def run_links(self, run_id: str) -> dict[str, dg.MetadataValue]:
        """Dagster metadata linking to run ``run_id`` in the MLflow UI that
        ``python -m dm_assets.ui mlflow`` serves (:func:`~dm_assets.ui.mlflow_ui_url`):
        ``mlflow_run_id`` (text), ``mlflow_run`` (URL of the run's page) and ``mlflow_ui`` (URL
        of its experiment's runs, to compare them); empty when disabled."""
        if not self.enabled:
            return {}
        experiment_id = self.client().get_run(run_id).info.experiment_id
        experiment_url = f"{mlflow_ui_url()}/#/experiments/{experiment_id}"
        return {
            "mlflow_run_id": dg.MetadataValue.text(run_id),
            "mlflow_run": dg.MetadataValue.url(f"{experiment_url}/runs/{run_id}"),
            "mlflow_ui": dg.MetadataValue.url(experiment_url),
        }

    def resolved_tracking_uri(self) -> str:
        """The tracking URI in use: ``tracking_uri``, else the SQLite file in ``DM_HOME``."""
        return self.tracking_uri or mlflow_tracking_uri(self.home or None)

    def artifact_root(self) -> Path:
        """Where experiments keep artifacts: ``$DM_HOME/mlflow-artifacts`` (absolute)."""
        return mlflow_artifact_root(self.home or None)

    def ui_command(self) -> str:
        """The shell command that opens the MLflow UI on this store."""
        return (
            f"mlflow ui --backend-store-uri {shlex.quote(self.resolved_tracking_uri())} "
            f"--artifacts-destination {shlex.quote(self.artifact_root().as_uri())} "
            f"--host 127.0.0.1 --port 5000"
        )

    def client(self) -> MlflowClient:
        """An ``MlflowClient`` on this store. A fresh SQLite file is created here, migrated (a
        copy of a migrated empty database kept per MLflow version, :func:`_migrated_template`),
        with MLflow's ``Default`` experiment keeping its artifacts in ``artifact_root() / "0"``
        (not ``./mlruns`` in whatever folder the first process happened to run in)."""
        from mlflow import MlflowClient

        uri = self.resolved_tracking_uri()
        db = _sqlite_file(uri)
        with _store_init_lock(uri), _quiet_migrations():
            if db is not None and not db.exists():
                _create_sqlite_store(db, self.artifact_root())
            return MlflowClient(tracking_uri=uri)

    def experiment_id(self, client: MlflowClient, experiment: str) -> str:
        """The id of MLflow experiment ``experiment``, created if missing with its artifacts in
        ``artifact_root() / experiment``."""
        from mlflow.exceptions import MlflowException

        _check_experiment_name(experiment)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = (self.artifact_root() / experiment).as_uri()
            try:
                return str(client.create_experiment(experiment, artifact_location=location))
            except MlflowException:
                # another process may have created it meanwhile
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise ValueError(
                f"experiment={experiment!r} exists in {self.resolved_tracking_uri()} but is "
                f"deleted (MLflow id {found.experiment_id}): restore it with `mlflow experiments "
                f"restore --experiment-id {found.experiment_id}` (MLFLOW_TRACKING_URI set to "
                f"this store) or delete it for good with `mlflow gc`"
            )
        return str(found.experiment_id)

    def log_regression(
        self,
        *,
        experiment: str,
        fit_dir: Path,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        started_at: float | None = None,
    ) -> str | None:
        """Log the fit in ``fit_dir`` (written by ``write_outputs``) as one new MLflow run in the
        experiment named ``experiment``; returns the run id, or None when ``enabled`` is false.

        ``params`` are logged beside the flattened config; one naming a config key with another
        value is an error. ``tags`` with an empty value are left out. ``started_at`` (seconds
        since the epoch, ``time.time()``) is when the fit started, the run's start time; None
        takes it from the fit folder (:func:`fit_started`). A failure after the run was
        created marks it FAILED and re-raises.
        """
        if not self.enabled:
            return None
        from mlflow.entities import Metric, Param, RunStatus, RunTag

        from dm_assets.evaluation.figures import plot_path
        from dm_assets.regression.path_metrics import step_metrics

        started = time.perf_counter()
        fit_dir = Path(fit_dir).resolve()
        _check_experiment_name(experiment)
        folder = FitFolder.open(fit_dir)
        config, summary, table = folder.config(), folder.summary(), folder.path_table()
        manifest = folder.manifest() if folder.has_manifest() else None

        all_params: dict[str, Any] = {**_flatten(config), FIT_DIR_TAG: str(fit_dir)}
        if manifest is not None:
            all_params.update(manifest_params(manifest))
        for key, value in summary.items():
            if isinstance(value, str | bool) or value is None:
                all_params[f"summary.{key}"] = value
        for key, value in (params or {}).items():
            if key in all_params and str(all_params[key]) != str(value):
                raise ValueError(
                    f"params[{key!r}]={value!r} contradicts the fit's {key}={all_params[key]!r} "
                    f"(from {fit_dir}): rename the parameter or drop it"
                )
            all_params[key] = value
        param_list = [
            Param(_truncate(str(k), _MAX_KEY), _truncate(str(v), _MAX_PARAM_VALUE))
            for k, v in all_params.items()
        ]

        n_targets = summary.get("n_targets")
        if not isinstance(n_targets, int) or isinstance(n_targets, bool):
            n_targets = int(table["target"].nunique()) if len(table) else 1
        per_step = step_metrics(table, n_targets)
        now_ms = int(time.time() * 1000)
        metric_list = [
            Metric(f"path/{column}", float(value), now_ms, int(step))
            for column in per_step.columns
            if column != "step"
            for step, value in zip(per_step["step"], per_step[column], strict=True)
        ]
        metric_list += [
            Metric(f"final/{key}", float(value), now_ms, 0)
            for key, value in summary.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        tag_list = [
            RunTag(_truncate(str(k), _MAX_KEY), _truncate(str(v), _MAX_TAG_VALUE))
            for k, v in {
                **(manifest_tags(manifest) if manifest is not None else {}),
                **tags,
                FIT_DIR_TAG: str(fit_dir),
                WEIGHTS_TAG: str(folder.file(WEIGHTS_FILE)),
                NOTE_TAG: run_description(experiment, fit_dir, summary, manifest, n_targets),
            }.items()
            if v is not None and str(v) != ""
        ]
        if started_at is None:
            started_at = fit_started(folder, summary)

        client = self.client()
        experiment_id = self.experiment_id(client, experiment)
        run = client.create_run(
            experiment_id,
            run_name=run_name,
            start_time=None if started_at is None else int(started_at * 1000),
        )
        run_id = run.info.run_id
        try:
            client.log_batch(run_id, tags=tag_list)
            for chunk in _chunks(param_list, _MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=chunk)
            for chunk in _chunks(metric_list, _MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=chunk)
            for name in FIT_FILES:
                if name != WEIGHTS_FILE or self.log_weights:
                    client.log_artifact(run_id, str(folder.file(name)))
            if manifest is not None:
                # the run's own id first, so the logged copy names the run that holds it
                folder.record_runs(mlflow_run_id=run_id)
                client.log_artifact(run_id, str(folder.file(MANIFEST_FILE)))
            with tempfile.TemporaryDirectory(prefix="dm-mlflow-") as tmp:
                png = plot_path(
                    table,
                    Path(tmp) / PLOT_NAME,
                    title=f"{experiment}: {run_name}",
                )
                client.log_artifact(run_id, str(png))
        except BaseException:
            try:
                client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            except Exception:
                logger.exception("could not mark MLflow run %s FAILED", run_id)
            raise
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        logger.info(
            "logged %s to MLflow experiment %r run %s (%d params, %d metric points) in %.1f s; "
            "open the UI with: %s",
            fit_dir,
            experiment,
            run_id,
            len(param_list),
            len(metric_list),
            time.perf_counter() - started,
            self.ui_command(),
        )
        return str(run_id)
