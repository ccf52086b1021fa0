"""Experiments: one YAML file says what to train, how to partition it, and how to fit it.

An experiment file holds::

    name: minimal                       # letters, digits, _; asset keys are prefixed with it
    description: ...                    # optional, shown in the Dagster UI
    spec: ../examples/minimal/spec.json # the seed's spec: a path (relative to this file) or inline
    trainer:
      main_import: my_package.train     # module with main(index, logdir) -> {key: value}
      args: [--trainer.lr=0.1]          # pass-through arguments the script reads (list or mapping)
      job_timeout: 600                  # seconds per model (default: none)
      retries: 1                        # extra rounds for models that failed
      commit_every: 1.0                 # seconds a trained row may wait to be stored with others
      version: null                     # the training code's version (a tag, a commit); default:
                                        # the hash of main_import's source file. Part of the
                                        # training configuration with the spec's schema, the
                                        # args and the versions of dm_assets/torch/numpy
      on_change: refuse                 # the store holds models of another configuration:
                                        # refuse (the run fails before training, naming what
                                        # changed), retrain (the selected partitions' rows of
                                        # other configurations are trained again and replaced)
                                        # or mix (train what is missing; recorded as mixed)
    models_per_partition: 50            # consecutive model indices per partition (1: per model)
    max_partitions_per_run: 20          # a backfill groups this many partitions into one run
    devices:
      gpus: auto                        # auto (every visible GPU), none, a count, or a list
      cpu_workers: 1                    # worker processes per run where there is no GPU
      max_workers: null                 # at most this many worker processes per run
      threads_per_worker: null          # OMP/MKL threads of each worker (default: untouched)
    regression:                         # optional: without it the graph stops at model_outputs
      x_name: masks                     # the store keys holding the masks and the outputs
      y_name: margins
      data: {num_train: 200, num_val: 50}   # the seed's compute_datamodels sections;
      cfg: {k: 20, batch_size: 100}         # data.data_path and cfg.out_dir are filled in
      early_stopping: {}
      targets_per_slice: null           # fit slices of this many targets in parallel (one
                                        # partition of <name>/datamodel_slices each), merged
    evaluation:                         # optional (needs regression): <name>/datamodel_eval
      curve_sizes: [500, 1000, 2000]    # LDS against the total number N of trained models:
                                        # lambda by K-fold inside the first N fitted models,
                                        # refit on all N, scored on the same held-out models
      folds: 5                          # K of that K-fold
      replicates: 4                     # each held-out mask trained this many times (the
                                        # trainer makes them): noise ceiling, mean-of-seeds truth
      bootstrap: 1000                   # resamples of held-out masks for 95% intervals (0: none)
      min_lds: 0.5                      # floor on the held-out LDS (an asset check)
    attributions:                       # optional (needs evaluation): <name>/attributions,
      methods: [influence_cg, trak, tracin]  # baselines by the dattri library, scored alike
      targets: null                     # the first n targets of the fit (default: all)
    checks:
      min_completed_fraction: 1.0       # store completeness the training must reach
      min_mean_val_r2: 0.0              # floor on the datamodels' mean validation R^2

Shipped experiments are the ``*.yaml`` files in ``dm_assets/experiments/``; users add theirs with
``DM_EXPERIMENTS``, a list of files or folders separated by ``os.pathsep`` (``:``).
``DM_SHIPPED_EXPERIMENTS=0`` (or ``false``, ``no``, ``off``) leaves the shipped examples out, so
a deployment's definitions hold only the experiments of ``DM_EXPERIMENTS``; unset, empty, ``1``,
``true``, ``yes`` or ``on`` keep them (the default); any other value is an error. Data goes to
``$DM_HOME/<name>/`` (see :class:`ExperimentPaths`).

A file is checked as a whole: the fields of every section, the spec, the regression section
against the spec (keys, shapes, ``num_train + num_val`` at most ``num_models``), the evaluation
against the regression; :class:`ExperimentError` lists every problem found, not the first layer's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dm_assets.errors import DmError
from dm_assets.home import dm_home
from dm_assets.regression.config import ConfigError, RegressionConfig, load_config
from dm_assets.store.spec import Spec, SpecError

if TYPE_CHECKING:
    from dm_assets.regression.merge import TargetSlice

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "experiments"
ENV_VAR = "DM_EXPERIMENTS"
SHIPPED_ENV_VAR = "DM_SHIPPED_EXPERIMENTS"
_SHIPPED_ON = ("", "1", "true", "yes", "on")
_SHIPPED_OFF = ("0", "false", "no", "off")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# filled in by the pipeline: the dataset it wrote, and a fresh output folder per fit
_PLACEHOLDER_PATH = "<filled in by the pipeline>"


class ExperimentError(DmError, ValueError):
    """An experiment file that cannot be used; the message names the file and every field."""

    def __init__(self, source: str | Path, problems: Sequence[str]) -> None:
        super().__init__(problems, source)

    def headline(self) -> str:
        return f"experiment file {self.source}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainerSettings(_Strict):
    main_import: str = Field(description="module whose main(index, logdir) trains one model")
    args: list[str] | dict[str, Any] = Field(
        default_factory=list,
        description="pass-through arguments for the script: a list (--trainer.lr=0.1) or a "
        "mapping {trainer.lr: 0.1}",
    )
    job_timeout: float | None = Field(default=None, gt=0, description="seconds per model")
    retries: int = Field(default=1, ge=0, description="extra rounds for models that failed")
    commit_every: float = Field(
        default=1.0, ge=0, description="seconds a trained row may wait to be stored with others"
    )
    version: str | None = Field(
        default=None,
        min_length=1,
        description="the training code's version (a tag, a commit), declared instead of the "
        "hash of main_import's source file (for code that lives in many files)",
    )
    on_change: Literal["refuse", "retrain", "mix"] = Field(
        default="refuse",
        description="when the store holds models of another training configuration: refuse "
        "(fail before training), retrain (replace the selected partitions' rows of other "
        "configurations) or mix (train what is missing, recorded as mixed)",
    )

    @field_validator("main_import")
    @classmethod
    def _module_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", value):
            raise ValueError(f"{value!r} is not a module path like my_package.train")
        return value

    def script_args(self) -> list[str]:
        """The pass-through arguments as command-line words."""
        if isinstance(self.args, list):
            return [str(a) for a in self.args]
        out = []
        for key, value in self.args.items():
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            text = text.removesuffix("\n...").strip()
            out.append(f"--{key}={text}")
        return out


class DeviceSettings(_Strict):
    gpus: str | int | list[int] = Field(
        default="auto", description="auto, none, a number of GPUs, or a list of GPU ordinals"
    )
    cpu_workers: int = Field(default=1, ge=1, description="worker processes where no GPU is used")
    max_workers: int | None = Field(default=None, ge=1, description="worker processes per run")
    threads_per_worker: int | None = Field(
        default=None, ge=1, description="OMP/MKL threads per worker process"
    )

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: str | int | list[int]) -> str | int | list[int]:
        if isinstance(value, str) and value not in ("auto", "none"):
            raise ValueError(f"{value!r}: use auto, none, a count, or a list of GPU ordinals")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value}: a GPU count is 0 or more")
        return value


class RegressionSettings(_Strict):
    x_name: str = Field(default="masks", description="store key of the masks")
    y_name: str = Field(default="margins", description="store key of the outputs to predict")
    data: dict[str, Any] = Field(default_factory=dict)
    cfg: dict[str, Any] = Field(default_factory=dict)
    early_stopping: dict[str, Any] = Field(default_factory=dict)
    targets_per_slice: int | None = Field(
        default=None,
        ge=1,
        description="fit the targets in slices of this many, each slice a partition of "
        "<name>/datamodel_slices on its own device, merged into <name>/datamodels (default: "
        "one fit of every target)",
    )

    def config(self, *, data_path: str | Path, out_dir: str | Path) -> RegressionConfig:
        """The seed's compute_datamodels config with the pipeline's paths filled in."""
        sections = {
            "data": {**self.data, "data_path": str(data_path)},
            "cfg": {**self.cfg, "out_dir": str(out_dir)},
            "early_stopping": dict(self.early_stopping),
        }
        return load_config(None, sections)


class EvaluationSettings(_Strict):
    curve_sizes: list[int] = Field(
        default_factory=list,
        description="total numbers of trained models N for the LDS curve: each point chooses "
        "lambda by K-fold inside its first N fitted models, refits on all N and is scored on "
        "the held-out models (each N at most data.num_train + data.num_val; empty: no curve)",
    )
    folds: int = Field(
        default=5, ge=2, description="folds of the K-fold lambda choice of each curve point"
    )
    replicates: int | None = Field(
        default=None,
        ge=2,
        description="each held-out mask is trained this many times (seeds): the noise ceiling "
        "and the mean-of-seeds ground truth. The trainer produces them (digits: "
        "digits.repeat_start and digits.repeats); the evaluation checks the held-out models "
        "form such groups. Default: none expected",
    )
    bootstrap: int = Field(
        default=1000,
        ge=0,
        description="resamples of the held-out masks for the 95% intervals (0: no intervals)",
    )
    min_lds: float | None = Field(
        default=None, ge=-1, le=1, description="floor on the held-out LDS (asset check)"
    )

    @field_validator("curve_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(n < 2 for n in value):
            raise ValueError(f"{value}: every size must be at least 2 models")
        if value != sorted(set(value)):
            raise ValueError(f"{value}: list the sizes in increasing order, each once")
        return value


ATTRIBUTION_METHODS = ("influence_cg", "trak", "tracin")
"""Baseline attribution methods ``<name>/attributions`` can compute (dm_assets.attribution)."""


class AttributionSettings(_Strict):
    methods: list[str] = Field(
        default_factory=lambda: list(ATTRIBUTION_METHODS),
        description="baseline attribution methods, each scored like the datamodels: "
        + ", ".join(ATTRIBUTION_METHODS),
    )
    targets: int | None = Field(
        default=None,
        ge=1,
        description="attribute the first this many targets of the fit (default: every target)",
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in ATTRIBUTION_METHODS]
        if unknown:
            raise ValueError(
                f"unknown method(s) {unknown}: choose from {', '.join(ATTRIBUTION_METHODS)}"
            )
        if not value:
            raise ValueError("list at least one method (or drop the attributions section)")
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: list each method once")
        return value


class LauncherSettings(_Strict):
    """Where the training runs: ``local`` (worker processes on this machine's device slots) or
    ``slurm`` (job arrays; the other fields override the ``slurm_trainer`` resource's
    defaults for this experiment)."""

    kind: Literal["local", "slurm"] = Field(default="local", description="local or slurm")
    indices_per_task: int | None = Field(default=None, ge=1, description="models per array task")
    partition: str | None = Field(default=None, description="sbatch --partition")
    account: str | None = Field(default=None, description="sbatch --account")
    time_limit: str | None = Field(default=None, description="sbatch --time per task")
    cpus_per_task: int | None = Field(default=None, ge=1, description="sbatch --cpus-per-task")
    gpus_per_task: int | None = Field(default=None, ge=1, description="sbatch --gpus-per-task")
    mem: str | None = Field(default=None, description="sbatch --mem per task, e.g. 8G")
    max_concurrent: int | None = Field(default=None, ge=1, description="array tasks at once")
    extra_sbatch_args: list[str] | None = Field(default=None, description="verbatim sbatch args")
    poll_seconds: float | None = Field(default=None, gt=0, description="seconds between polls")

    def overrides(self) -> dict[str, Any]:
        """The fields this experiment sets, by the ``SlurmTrainer`` resource's field names."""
        return {k: v for k, v in self.model_dump().items() if k != "kind" and v is not None}


class CheckSettings(_Strict):
    min_completed_fraction: float = Field(
        default=1.0, ge=0, le=1, description="fraction of the store's models that must be done"
    )
    min_mean_val_r2: float | None = Field(
        default=0.0, description="floor on the mean validation R^2 of the datamodels"
    )


class _ExperimentFile(_Strict):
    name: str
    description: str = ""
    spec: str | dict[str, Any]
    trainer: TrainerSettings
    models_per_partition: int = Field(default=1, ge=1)
    max_partitions_per_run: int = Field(default=20, ge=1)
    devices: DeviceSettings = Field(default_factory=DeviceSettings)
    regression: RegressionSettings | None = None
    evaluation: EvaluationSettings | None = None
    attributions: AttributionSettings | None = None
    launcher: LauncherSettings = Field(default_factory=LauncherSettings)
    checks: CheckSettings = Field(default_factory=CheckSettings)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                f"{value!r}: use letters, digits and _ (starting with a letter); it prefixes "
                "asset keys and job names"
            )
        return value


@dataclass(frozen=True)
class ExperimentPaths:
    """Where an experiment's data lives: ``$DM_HOME/<name>/``.

    ``store/`` the store (``<key>.npy``, ``_completed.npy``, ``spec.json``, ``workers/``);
    ``data.beton`` the FFCV dataset of completed rows; ``fits/<id>/`` one folder per fit
    (``datamodels.pt``, ``regularization_path.csv``, ``summary.json``, ``config.yaml``);
    ``datamodels`` a link to the latest fit; ``slices/<key>/`` the fits of one slice of the
    targets when the regression is fitted by slices; ``launcher_logs/`` the worker processes'
    logs.
    """

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def beton(self) -> Path:
        return self.root / "data.beton"

    @property
    def fits(self) -> Path:
        return self.root / "fits"

    @property
    def datamodels(self) -> Path:
        return self.root / "datamodels"

    @property
    def slices(self) -> Path:
        """``slices/<key>/``: the fits of one slice of the targets, ``<key>/latest`` a link to
        the latest (experiments fitted by slices of targets only)."""
        return self.root / "slices"

    @property
    def launcher_logs(self) -> Path:
        return self.root / "launcher_logs"


@dataclass(frozen=True)
class Experiment:
    """A validated experiment file."""

    name: str
    description: str
    spec: Spec
    trainer: TrainerSettings
    models_per_partition: int
    max_partitions_per_run: int
    devices: DeviceSettings
    regression: RegressionSettings | None
    evaluation: EvaluationSettings | None
    launcher: LauncherSettings
    checks: CheckSettings
    source: Path
    attributions: AttributionSettings | None = None

    def paths(self, home: str | Path | None = None) -> ExperimentPaths:
        return ExperimentPaths(dm_home(home) / self.name)

    @property
    def num_models(self) -> int:
        return self.spec.num_models

    def partition_keys(self) -> list[str]:
        """One key per block of ``models_per_partition`` consecutive indices, zero-padded so
        they sort: ``"0000-0049"`` (``"0007"`` with blocks of one)."""
        n, size = self.num_models, self.models_per_partition
        width = len(str(n - 1))
        keys = []
        for first in range(0, n, size):
            last = min(first + size, n) - 1
            keys.append(
                f"{first:0{width}d}" if size == 1 else f"{first:0{width}d}-{last:0{width}d}"
            )
        return keys

    def target_slices(self) -> list[TargetSlice]:
        """The regression's targets (``data.target_start_ind`` to ``data.target_end_ind``, -1:
        the last of the spec's ``y_name`` outputs, a scalar output being one target) in slices
        of ``regression.targets_per_slice``; empty when the regression is not sliced."""
        reg = self.regression
        if reg is None or reg.targets_per_slice is None:
            return []
        from dm_assets.regression.merge import target_slices

        shape = self.spec.schema[reg.y_name].shape
        data = reg.config(data_path=_PLACEHOLDER_PATH, out_dir=_PLACEHOLDER_PATH)["data"]
        end = (shape[0] if shape else 1) if data["target_end_ind"] == -1 else data["target_end_ind"]
        return target_slices(data["target_start_ind"], end, reg.targets_per_slice)

    def slice_keys(self) -> list[str]:
        """The keys of :meth:`target_slices`, in target order."""
        return [s.key for s in self.target_slices()]

    @staticmethod
    def partition_indices(key: str) -> range:
        """The model indices of a partition key (``"0050-0099"`` -> ``range(50, 100)``)."""
        first, _, last = key.partition("-")
        return range(int(first), int(last or first) + 1)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: Iterable[object]) -> str:
    # a union's alternatives appear in the location as type tags (``list[str]``): drop them
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or "(top level)"


def _format_validation(exc: ValidationError) -> list[str]:
    messages: dict[str, list[str]] = {}
    for error in exc.errors():
        field = _field_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check its spelling and indentation)"
        elif error["type"] == "missing":
            message = "required field missing"
        if message not in messages.setdefault(field, []):
            messages[field].append(message)
    # a union reports once per alternative: one line per field, alternatives joined
    return [f"field {field}: {' or '.join(found)}" for field, found in messages.items()]


def _resolve_spec(value: str | dict[str, Any], source: Path) -> Spec:
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = source.parent / path
        return Spec.load(path)
    return Spec.from_dict(value, source=f"{source} (field spec)")


def _data_counts(reg: RegressionSettings) -> tuple[int, int] | None:
    """``(num_train, num_val)`` of the regression's data section when both are whole numbers,
    whether or not the rest of the section is valid (None: one is missing or not a number)."""
    num_train, num_val = reg.data.get("num_train"), reg.data.get("num_val")
    if isinstance(num_train, bool) or isinstance(num_val, bool):
        return None
    if isinstance(num_train, int) and isinstance(num_val, int):
        return num_train, num_val
    return None


def _check_regression(reg: RegressionSettings, spec: Spec | None) -> list[str]:
    """The regression section's problems: its compute_datamodels config, and against the spec
    (``None``: the spec is itself broken, so only the config is checked)."""
    problems = []
    schema = spec.schema if spec is not None else None
    if schema is not None:
        for field, key in (("x_name", reg.x_name), ("y_name", reg.y_name)):
            if key not in schema:
                problems.append(
                    f"field regression.{field}: {key!r} is not a key of the spec; "
                    f"the keys are {sorted(schema)}"
                )
        if reg.x_name in schema and len(schema[reg.x_name].shape) != 1:
            problems.append(
                f"field regression.x_name: {reg.x_name!r} has shape "
                f"{schema[reg.x_name].shape}; masks must be one vector per model"
            )
        if reg.y_name in schema and len(schema[reg.y_name].shape) > 1:
            problems.append(
                f"field regression.y_name: {reg.y_name!r} has shape "
                f"{schema[reg.y_name].shape}; outputs must be a vector or a scalar per model"
            )
    counts = _data_counts(reg)
    if spec is not None and counts is not None and sum(counts) > spec.num_models:
        num_train, num_val = counts
        problems.append(
            f"field regression.data: num_train + num_val = {num_train} + {num_val} = "
            f"{num_train + num_val} is more than the spec's num_models = {spec.num_models}: "
            "lower num_train / num_val or train more models"
        )
    try:
        config = reg.config(data_path=_PLACEHOLDER_PATH, out_dir=_PLACEHOLDER_PATH)
    except ConfigError as exc:
        problems.extend(f"field regression: {p}" for p in exc.problems)
        return problems
    d = config["data"]
    if reg.targets_per_slice is not None and schema is not None and reg.y_name in schema:
        shape = schema[reg.y_name].shape
        n_targets = shape[0] if shape else 1
        start, end = d["target_start_ind"], d["target_end_ind"]
        if start >= n_targets or end > n_targets:
            problems.append(
                f"field regression.data: targets [{start}, {end}) are not within the "
                f"{n_targets} target(s) of {reg.y_name!r} (shape {list(shape)}), which "
                "regression.targets_per_slice cuts into slices: fix target_start_ind / "
                "target_end_ind (-1: to the last target)"
            )
    return problems


def _check_launcher(launcher: LauncherSettings) -> list[str]:
    from dm_assets.training.slurm import SbatchOptions

    fields = {
        k: v
        for k, v in launcher.overrides().items()
        if k in ("partition", "account", "time_limit", "mem")
    }
    return [
        f"field launcher.{p.removeprefix('sbatch.')}" for p in SbatchOptions(**fields).problems()
    ]


def _check_evaluation(
    evaluation: EvaluationSettings, regression: RegressionSettings | None, spec: Spec | None
) -> list[str]:
    """The evaluation section against the regression's ``num_train + num_val`` (the fitted
    models) and the spec's ``num_models`` (``spec`` None: broken, those checks are skipped)."""
    problems = []
    too_small = [n for n in evaluation.curve_sizes if n < 2 * evaluation.folds]
    if too_small:
        problems.append(
            f"field evaluation.curve_sizes: {too_small} are below 2 x folds = "
            f"{2 * evaluation.folds}: each of the {evaluation.folds} folds needs 2 models"
        )
    counts = _data_counts(regression) if regression is not None else None
    if counts is None:
        return problems  # no regression section, or its counts are reported by the regression
    fitted = sum(counts)
    too_big = [n for n in evaluation.curve_sizes if n > fitted]
    if too_big:
        problems.append(
            f"field evaluation.curve_sizes: {too_big} exceed the {fitted} fitted models "
            "(data.num_train + data.num_val): each point is a total number of trained models"
        )
    if spec is None:
        return problems
    if spec.num_models <= fitted:
        problems.append(
            f"field evaluation: no held-out models: num_models = {spec.num_models} but "
            f"num_train + num_val = {fitted}; the models after them are the held-out ones"
        )
    if evaluation.replicates is not None and spec.num_models - fitted < evaluation.replicates:
        problems.append(
            f"field evaluation.replicates: {evaluation.replicates} seeds per held-out mask but "
            f"only {max(spec.num_models - fitted, 0)} held-out models"
        )
    return problems


_SectionT = TypeVar("_SectionT", bound=BaseModel)


def _section(raw: Mapping[str, Any], key: str, model: type[_SectionT]) -> _SectionT | None:
    """Section ``key`` of a file whose whole validation failed, validated alone so that the
    checks across sections still run; None when absent or itself invalid (its field errors
    are already reported by the whole file's validation)."""
    value = raw.get(key)
    if value is None:
        return None
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate one experiment file; :class:`ExperimentError` lists every problem:
    the fields of every section, the spec, and the checks across sections (the regression
    against the spec, the evaluation against both), each run on whatever parts are valid."""
    source = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(source.read_text())
    except OSError as exc:
        raise ExperimentError(source, [f"cannot read it: {exc.strerror}"]) from exc
    except yaml.YAMLError as exc:
        raise ExperimentError(source, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(raw, Mapping):
        raise ExperimentError(source, ["the file must be a mapping (name:, spec:, trainer: ...)"])
    problems: list[str] = []
    parsed: _ExperimentFile | None
    try:
        parsed = _ExperimentFile.model_validate(raw)
    except ValidationError as exc:
        parsed = None
        problems.extend(_format_validation(exc))
    if parsed is not None:
        spec_field: object = parsed.spec
        regression, evaluation = parsed.regression, parsed.evaluation
        launcher: LauncherSettings | None = parsed.launcher
    else:
        spec_field = raw.get("spec")
        regression = _section(raw, "regression", RegressionSettings)
        evaluation = _section(raw, "evaluation", EvaluationSettings)
        launcher = _section(raw, "launcher", LauncherSettings)
    spec: Spec | None = None
    if isinstance(spec_field, str | dict):
        try:
            spec = _resolve_spec(spec_field, source)
        except SpecError as exc:
            where = f" ({exc.source})" if isinstance(spec_field, str) and exc.source else ""
            problems.extend(f"field spec{where}: {p}" for p in exc.problems)
    if regression is not None:
        problems.extend(_check_regression(regression, spec))
    if evaluation is not None:
        if raw.get("regression") is None:
            problems.append(
                "field evaluation: evaluating needs a regression section (datamodels to evaluate)"
            )
        else:
            problems.extend(_check_evaluation(evaluation, regression, spec))
    if raw.get("attributions") is not None and raw.get("evaluation") is None:
        problems.append(
            "field attributions: the baselines are scored on the evaluation's held-out models: "
            "add an evaluation section"
        )
    if launcher is not None:
        problems.extend(_check_launcher(launcher))
    if problems:
        raise ExperimentError(source, problems)
    assert parsed is not None and spec is not None  # no problems: both were read
    return Experiment(
        name=parsed.name,
        description=parsed.description,
        spec=spec,
        trainer=parsed.trainer,
        models_per_partition=parsed.models_per_partition,
        max_partitions_per_run=parsed.max_partitions_per_run,
        devices=parsed.devices,
        regression=parsed.regression,
        evaluation=parsed.evaluation,
        launcher=parsed.launcher,
        checks=parsed.checks,
        source=source,
        attributions=parsed.attributions,
    )


def shipped_experiments_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the shipped example experiments load: ``$DM_SHIPPED_EXPERIMENTS`` (in
    ``environ``, default ``os.environ``) unset, empty, ``1``/``true``/``yes``/``on`` (any case)
    is True, ``0``/``false``/``no``/``off`` False; any other value is a :class:`DmError`."""
    env = os.environ if environ is None else environ
    value = env.get(SHIPPED_ENV_VAR, "")
    word = value.strip().lower()
    if word in _SHIPPED_ON:
        return True
    if word in _SHIPPED_OFF:
        return False
    raise DmError(
        f"${SHIPPED_ENV_VAR}={value!r} is not understood: set it to 0 (false, no, off) to load "
        f"only the experiments of ${ENV_VAR}, or to 1 (true, yes, on) or leave it unset to "
        f"load the shipped examples of {SHIPPED_DIR} too"
    )


def experiment_files(extra: str | None = None, *, shipped: bool | None = None) -> list[Path]:
    """The shipped experiment files, then those named by ``extra`` (default: ``$DM_EXPERIMENTS``):
    files, or folders whose ``*.yaml``/``*.yml`` files are taken in name order. ``shipped``
    False leaves the shipped files out (default: :func:`shipped_experiments_enabled`, i.e.
    ``$DM_SHIPPED_EXPERIMENTS``)."""
    if shipped is None:
        shipped = shipped_experiments_enabled()
    files = sorted(SHIPPED_DIR.glob("*.yaml")) if shipped else []
    listed = os.environ.get(ENV_VAR, "") if extra is None else extra
    for entry in filter(None, (e.strip() for e in listed.split(os.pathsep))):
        path = Path(entry).expanduser()
        if path.is_dir():
            files.extend(sorted([*path.glob("*.yaml"), *path.glob("*.yml")]))
        elif path.is_file():
            files.append(path)
        else:
            raise ExperimentError(
                path,
                [f"named in ${ENV_VAR} but no such file or folder; fix or remove the entry"],
            )
    return files


def load_experiments(extra: str | None = None, *, shipped: bool | None = None) -> list[Experiment]:
    """Every experiment (see :func:`experiment_files`); names must be unique."""
    experiments: list[Experiment] = []
    seen: dict[str, Path] = {}
    for file in experiment_files(extra, shipped=shipped):
        experiment = load_experiment(file)
        if experiment.name in seen:
            raise ExperimentError(
                file,
                [
                    f"field name: {experiment.name!r} is already the name of the experiment in "
                    f"{seen[experiment.name]}; experiment names must be unique"
                ],
            )
        seen[experiment.name] = experiment.source
        experiments.append(experiment)
    return experiments
