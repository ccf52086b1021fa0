"""The regression's configuration: the seed's YAML sections, typed and validated.

A config file has the seed's sections (``data``, ``cfg``, ``early_stopping``); any key can be
overridden on the command line as ``--section.key=value``. Every problem is reported at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dm_assets.errors import DmError

# The early-stopping rule's defaults: the reference's (fast_l1's train_saga stops a target at the
# first lambda whose validation MSE got worse, after min_lams_to_try=10). Measured against the
# whole path (benchmarks/README.md, "Early stopping"): the same lambdas on all 797 targets of
# digits_mlp (500 validation models) and on the regression benchmark, held-out MSE within 0.1%
# of the whole path's with 60 or 120 validation models; the steps it saves are the costliest.
MIN_LAMBDAS = 10
PATIENCE = 1


class ConfigError(DmError, ValueError):
    """A configuration that cannot be used; ``problems`` lists each problem with its fix."""

    def headline(self) -> str:
        where = f" in {self.source}" if self.source else ""
        return f"invalid regression config{where}"


def _bool(value: object) -> bool:
    """A YAML or command-line boolean: a bool, 0/1, or true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _int(value: object) -> int:
    """An integer, from an int, an integral float or a string (never a bool)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]


def _float(value: object) -> float:
    """A number, from an int, a float or a string (never a bool)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)  # type: ignore[arg-type]  # "1e-4" strings (YAML 1.1) included


def _optional_float(value: object) -> float | None:
    """A number, or None for nothing, ``""``, ``none`` or ``null``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return _float(value)


def _optional_int(value: object) -> int | None:
    """An integer, or None for nothing, ``""``, ``none`` or ``null``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return _int(value)


def _str(value: object) -> str:
    """Any value but nothing (None), as a string."""
    if value is None:
        raise ValueError("expected a string, got nothing")
    return str(value)


@dataclass(frozen=True)
class _Param:
    """One key of a section: its converter, its default (``_MISSING``: none), its help line,
    and whether the config must set it."""

    convert: Callable[[object], Any]
    default: Any
    help: str
    required: bool = False


_MISSING = object()

PARAMS: dict[str, dict[str, _Param]] = {
    "data": {
        "data_path": _Param(_str, _MISSING, "the FFCV dataset (.beton) to fit", required=True),
        "num_train": _Param(_int, _MISSING, "rows [0, num_train) fit the models", required=True),
        "num_val": _Param(_int, _MISSING, "the next num_val rows choose lambda", required=True),
        "seed": _Param(_int, 0, "random seed (SAGA's minibatch order)"),
        "target_start_ind": _Param(_int, 0, "first target column fitted"),
        "target_end_ind": _Param(_int, -1, "end of the target columns fitted (-1: all)"),
    },
    "cfg": {
        "k": _Param(_int, _MISSING, "number of lambdas on each path", required=True),
        "batch_size": _Param(_int, _MISSING, "rows per batch", required=True),
        "lr": _Param(_optional_float, None, "SAGA step size (default: derived from the data)"),
        "eps": _Param(_float, 1e-2, "smallest lambda / lambda_max"),
        "out_dir": _Param(_str, _MISSING, "output directory (must not exist)", required=True),
        "num_workers": _Param(_int, 2, "threads reading the dataset"),
        "use_bias": _Param(_bool, True, "fit an unpenalized intercept per target"),
        "solver": _Param(_str, "auto", "gram, saga, or auto (gram where p x p fits)"),
        "device": _Param(_str, "auto", "cpu, cuda, cuda:N, or auto (cuda when available)"),
        "tol": _Param(
            _optional_float,
            None,
            "convergence tolerance per lambda: relative duality gap "
            "(default 1e-6 for gram, 1e-4 for saga)",
        ),
        "max_iter": _Param(
            _optional_int,
            None,
            "iterations (gram, default 5000) or epochs (saga, default 200) per lambda",
        ),
        "refit": _Param(_bool, True, "refit at the chosen lambda on train + validation"),
        "cache_bytes": _Param(
            _int,
            2**30,
            "saga keeps the training (and validation) rows, standardized, in memory on the "
            "device when they take at most this many bytes (default 1 GiB; 0: always stream)",
        ),
        "train_mode": _Param(_int, 0, "the seed's train_mode; only 0 is supported"),
    },
    "early_stopping": {
        "check_every": _Param(_int, 1, "epochs between convergence checks (saga)"),
        "eps": _Param(
            _optional_float, None, "the seed's weight-change tolerance: not used (see cfg.tol)"
        ),
        "min_lambdas": _Param(_int, MIN_LAMBDAS, "lambdas every target tries before it may stop"),
        "patience": _Param(
            _int,
            PATIENCE,
            "a target stops after this many lambdas without a better validation MSE",
        ),
    },
}


@dataclass(frozen=True)
class RegressionConfig:
    """A validated config: ``values[section][key]``, every key present."""

    values: Mapping[str, Mapping[str, Any]]
    source: str | None = None

    def __getitem__(self, section: str) -> Mapping[str, Any]:
        return self.values[section]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dict(v) for s, v in self.values.items()}


def parse_overrides(args: Sequence[str]) -> dict[str, dict[str, object]]:
    """``["--cfg.k=10", "--data.num_val", "5"]`` as ``{"cfg": {"k": "10"}, ...}``."""
    out: dict[str, dict[str, object]] = {}
    problems = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            problems.append(f"unexpected argument {arg!r}: use --section.key=value")
            i += 1
            continue
        name, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"  # a bare flag
        section, _, key = name.partition(".")
        out.setdefault(section, {})[key] = yaml.safe_load(value) if value != "" else ""
        i += 1
    if problems:
        raise ConfigError(problems, "the command line")
    return out


def load_config(
    path: str | Path | None, overrides: Mapping[str, Mapping[str, object]] | None = None
) -> RegressionConfig:
    """Read a YAML config (or none), apply ``overrides``, convert and validate every value."""
    raw: dict[str, dict[str, object]] = {}
    source = str(path) if path is not None else None
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError([f"cannot read the config file: {exc.strerror}"], source) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(["the config must be a mapping of sections"], source)
        for section, values in loaded.items():
            if values is None:
                values = {}
            if not isinstance(values, dict):
                raise ConfigError([f"section {section!r} must be a mapping of keys"], source)
            raw[str(section)] = dict(values)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return _validate(raw, source)


def _validate(raw: Mapping[str, Mapping[str, object]], source: str | None) -> RegressionConfig:
    """``raw[section][key]`` converted and checked against :data:`PARAMS`, defaults filled
    in; raises :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    for section, given in raw.items():
        if section not in PARAMS:
            problems.append(
                f"unknown section {section!r}{_suggest(section, PARAMS)}: "
                f"the sections are {sorted(PARAMS)}"
            )
            continue
        for key in given:
            if key not in PARAMS[section]:
                problems.append(f"unknown key {section}.{key}{_suggest(key, PARAMS[section])}")
    for section, params in PARAMS.items():
        values[section] = {}
        given = raw.get(section, {})
        for key, param in params.items():
            if key not in given:
                if param.required:
                    problems.append(f"missing {section}.{key}: {param.help}")
                values[section][key] = None if param.default is _MISSING else param.default
                continue
            try:
                values[section][key] = param.convert(given[key])
            except (TypeError, ValueError) as exc:
                problems.append(f"{section}.{key}={given[key]!r}: {exc} ({param.help})")
    if not problems:
        problems.extend(_check_ranges(values))
    if problems:
        raise ConfigError(problems, source)
    return RegressionConfig(values=values, source=source)


def _suggest(word: str, choices: Mapping[str, object]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_ranges(v: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The problems of converted values ``v[section][key]``: ranges and combinations."""
    d, c, e = v["data"], v["cfg"], v["early_stopping"]
    problems = []
    if d["num_train"] < 2:
        problems.append(f"data.num_train={d['num_train']}: need at least 2 training models")
    if d["num_val"] < 1:
        problems.append(
            f"data.num_val={d['num_val']}: need at least 1 validation model to choose lambda"
        )
    if d["target_start_ind"] < 0:
        problems.append(f"data.target_start_ind={d['target_start_ind']} must be >= 0")
    end = d["target_end_ind"]
    if end != -1 and end <= d["target_start_ind"]:
        problems.append(
            f"data.target_end_ind={end} must be -1 (to the end) or greater than "
            f"data.target_start_ind={d['target_start_ind']}"
        )
    if c["k"] < 1:
        problems.append(f"cfg.k={c['k']}: need at least one lambda")
    if not 0 < c["eps"] <= 1:
        problems.append(f"cfg.eps={c['eps']}: the smallest lambda / lambda_max must be in (0, 1]")
    if c["batch_size"] < 1:
        problems.append(f"cfg.batch_size={c['batch_size']} must be a positive integer")
    elif c["batch_size"] > d["num_train"]:
        problems.append(
            f"cfg.batch_size={c['batch_size']} is larger than data.num_train="
            f"{d['num_train']}: use at most num_train"
        )
    if c["lr"] is not None and not c["lr"] > 0:
        problems.append(f"cfg.lr={c['lr']} must be positive (or omitted: derived from data)")
    if c["tol"] is not None and not 0 < c["tol"] < 1:
        problems.append(f"cfg.tol={c['tol']} must be in (0, 1)")
    if c["solver"] not in ("auto", "gram", "saga"):
        problems.append(f"cfg.solver={c['solver']!r}: choose gram, saga or auto")
    if c["max_iter"] is not None and c["max_iter"] < 1:
        problems.append(f"cfg.max_iter={c['max_iter']} must be positive")
    if c["num_workers"] < 1:
        problems.append(f"cfg.num_workers={c['num_workers']} must be positive")
    if c["train_mode"] != 0:
        problems.append(
            "cfg.train_mode=1 (the seed's exclusion of models containing the "
            "target) is not supported; set it to 0"
        )
    device = c["device"]
    if not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        problems.append(f"cfg.device={device!r}: use cpu, cuda, cuda:N or auto")
    if e["check_every"] < 1:
        problems.append(f"early_stopping.check_every={e['check_every']} must be positive")
    if e["min_lambdas"] < 1:
        problems.append(f"early_stopping.min_lambdas={e['min_lambdas']} must be positive")
    if e["patience"] < 1:
        problems.append(f"early_stopping.patience={e['patience']} must be positive")
    return problems
