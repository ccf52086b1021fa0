"""Experiment files: loading, validation errors that name the file and the field, discovery."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dm_assets.errors import DmError
from dm_assets.pipeline.experiment import (
    SHIPPED_ENV_VAR,
    Experiment,
    ExperimentError,
    experiment_files,
    load_experiment,
    load_experiments,
)
from dm_assets_tests.helpers import REPO_ROOT, cli_env

GOOD = """
name: small
spec:
  num_models: 30
  schema:
    masks: {shape: [8], dtype: bool_}
    margins: {shape: [3], dtype: float32}
trainer:
  main_import: dm_assets.examples.synthetic.train_synthetic
  args: {trainer.lr: 0.5, trainer.name: abc}
models_per_partition: 7
regression:
  data: {num_train: 20, num_val: 5}
  cfg: {k: 5, batch_size: 10}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_experiments_load() -> None:
    experiments = {e.name: e for e in load_experiments(extra="")}
    assert {"minimal", "seed_minimal", "synthetic"} <= set(experiments)
    minimal = experiments["minimal"]
    assert minimal.num_models == 300
    assert minimal.partition_keys() == [f"{i:03d}-{i + 49:03d}" for i in range(0, 300, 50)]
    assert experiments["seed_minimal"].regression is None
    assert experiments["seed_minimal"].trainer.script_args() == ["--trainer.multiple=2"]


def test_partition_keys_cover_every_index_once_and_sort(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, GOOD))
    keys = experiment.partition_keys()
    assert keys == sorted(keys)
    assert keys[-1] == "28-29"  # the last block is short
    covered = [i for key in keys for i in Experiment.partition_indices(key)]
    assert covered == list(range(30))


def test_blocks_of_one_give_one_key_per_model(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, GOOD.replace("models_per_partition: 7", "")))
    keys = experiment.partition_keys()
    assert keys[:3] == ["00", "01", "02"] and len(keys) == 30
    assert list(Experiment.partition_indices("07")) == [7]


def test_mapping_args_become_command_line_words(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, GOOD))
    assert experiment.trainer.script_args() == ["--trainer.lr=0.5", "--trainer.name=abc"]


def test_trainer_version_and_on_change(tmp_path: Path) -> None:
    default = load_experiment(write(tmp_path, textwrap.dedent(GOOD)))
    assert default.trainer.version is None and default.trainer.on_change == "refuse"
    text = textwrap.dedent(GOOD).replace(
        "  main_import: dm_assets.examples",
        "  version: v1.2\n  on_change: retrain\n  main_import: dm_assets.examples",
    )
    changed = load_experiment(write(tmp_path, text, "changed.yaml"))
    assert changed.trainer.version == "v1.2" and changed.trainer.on_change == "retrain"


def test_regression_config_gets_the_pipeline_paths(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, GOOD))
    assert experiment.regression is not None
    config = experiment.regression.config(data_path="/d.beton", out_dir="/out")
    assert config["data"]["data_path"] == "/d.beton"
    assert config["cfg"]["out_dir"] == "/out"
    assert config["cfg"]["k"] == 5


def test_spec_path_is_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "s.json").write_text(
        '{"num_models": 4, "schema": {"x": {"shape": [2], "dtype": "float32"}}}'
    )
    text = "name: rel\nspec: specs/s.json\ntrainer: {main_import: a.b}\n"
    assert load_experiment(write(tmp_path, text)).num_models == 4


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda t: t.replace(
                "  main_import: dm_assets.examples.synthetic.train_synthetic\n", ""
            ),
            "field trainer.main_import: required field missing",
        ),
        (
            lambda t: t.replace("models_per_partition: 7", "models_per_partiton: 7"),
            "field models_per_partiton: unknown field",
        ),
        (
            lambda t: t.replace("models_per_partition: 7", "models_per_partition: 0"),
            "field models_per_partition",
        ),
        (lambda t: t.replace("name: small", "name: 2-bad"), "field name: '2-bad'"),
        (
            lambda t: t.replace("num_val: 5", "num_val: 50"),
            "num_train + num_val = 20 + 50 = 70 is more than the spec's num_models = 30",
        ),
        (
            lambda t: t.replace(
                "cfg: {k: 5, batch_size: 10}", "cfg: {k: 5, batch_size: 10, kk: 1}"
            ),
            "unknown key cfg.kk",
        ),
        (
            lambda t: t.replace("  data: {num_train", "  y_name: logits\n  data: {num_train"),
            "field regression.y_name: 'logits' is not a key of the spec",
        ),
        (lambda t: t.replace("dtype: float32", "dtype: floaty"), "field spec:"),
        (
            lambda t: t.replace("main_import: dm_assets", "main_import: dm assets"),
            "field trainer.main_import",
        ),
        (lambda t: t + "devices: {gpus: many}\n", "field devices.gpus"),
        (
            lambda t: t.replace(
                "  main_import: dm_assets.examples",
                "  on_change: keep\n  main_import: dm_assets.examples",
            ),
            "field trainer.on_change",
        ),
        (
            lambda t: t.replace(
                "  main_import: dm_assets.examples",
                "  version: ''\n  main_import: dm_assets.examples",
            ),
            "field trainer.version",
        ),
    ],
)
def test_broken_files_name_the_file_and_the_field(tmp_path: Path, change, expected: str) -> None:
    path = write(tmp_path, change(textwrap.dedent(GOOD)))
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message, message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "name: 9x\nspec: {}\ntrainer: {}\nextra: 1\n")
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    problems = info.value.problems
    assert any("field name" in p for p in problems)
    assert any("trainer.main_import" in p for p in problems)
    assert any("field extra" in p for p in problems)


def test_every_layer_is_reported_at_once(tmp_path: Path) -> None:
    # a field error, a bad spec, a bad regression section and a bad evaluation, all in one file
    text = textwrap.dedent(GOOD)
    text = text.replace("models_per_partition: 7", "models_per_partition: 0")
    text = text.replace("dtype: float32", "dtype: floaty")
    text = text.replace("cfg: {k: 5, batch_size: 10}", "cfg: {k: 5, batch_size: 10, kk: 1}")
    text += "evaluation: {curve_sizes: [6, 30]}\n"
    with pytest.raises(ExperimentError) as info:
        load_experiment(write(tmp_path, text))
    message = str(info.value)
    for expected in (
        "field models_per_partition",
        "field spec:",
        "unknown key cfg.kk",
        "[30] exceed the 25 fitted models",
        "[6] are below 2 x folds = 10",
    ):
        assert expected in message, (expected, message)


def test_too_few_models_for_train_and_val_is_reported_with_the_other_problems(
    tmp_path: Path,
) -> None:
    # the case: 100 + 50 models out of a spec of 10, beside a field and a config error
    text = textwrap.dedent(GOOD).replace("num_models: 30", "num_models: 10")
    text = text.replace("num_train: 20, num_val: 5", "num_train: 100, num_val: 50")
    text = text.replace("cfg: {k: 5, batch_size: 10}", "cfg: {k: 0, batch_size: 10}")
    text = text.replace("models_per_partition: 7", "models_per_partition: -1")
    with pytest.raises(ExperimentError) as info:
        load_experiment(write(tmp_path, text))
    message = str(info.value)
    assert "num_train + num_val = 100 + 50 = 150 is more than the spec's num_models = 10" in (
        message
    )
    assert "cfg.k=0" in message and "field models_per_partition" in message, message


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ExperimentError, match="must be a mapping"):
        load_experiment(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ExperimentError, match="cannot read"):
        load_experiment(tmp_path / "missing.yaml")


def test_dm_experiments_adds_files_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "more"
    folder.mkdir()
    write(folder, GOOD.replace("name: small", "name: from_folder"), "a.yaml")
    single = write(tmp_path, GOOD.replace("name: small", "name: single"), "single.yml")
    listed = os.pathsep.join([str(folder), str(single)])
    names = [e.name for e in load_experiments(extra=listed)]
    assert names[-2:] == ["from_folder", "single"]
    assert "minimal" in names


def test_dm_experiments_missing_entry_and_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="no such file or folder"):
        experiment_files(str(tmp_path / "nope"))
    clash = write(tmp_path, GOOD.replace("name: small", "name: minimal"))
    with pytest.raises(ExperimentError, match="already the name of the experiment in"):
        load_experiments(extra=str(clash))


@pytest.mark.parametrize("off", ["0", "false", "no", "off", " OFF "])
def test_shipped_experiments_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, off: str
) -> None:
    own = write(tmp_path, GOOD.replace("name: small", "name: only_mine"))
    monkeypatch.setenv("DM_EXPERIMENTS", str(own))
    monkeypatch.setenv(SHIPPED_ENV_VAR, off)
    assert experiment_files() == [own]
    assert [e.name for e in load_experiments()] == ["only_mine"]
    # the argument overrides the environment both ways
    assert len(experiment_files(shipped=True)) > 1
    monkeypatch.setenv(SHIPPED_ENV_VAR, "1")
    assert [e.name for e in load_experiments(shipped=False)] == ["only_mine"]


@pytest.mark.parametrize("on", ["", "1", "true", "yes", "on"])
def test_shipped_experiments_load_by_default(monkeypatch: pytest.MonkeyPatch, on: str) -> None:
    monkeypatch.setenv(SHIPPED_ENV_VAR, on)
    names = {e.name for e in load_experiments(extra="")}
    assert {"minimal", "seed_minimal", "synthetic"} <= names


def test_a_bad_shipped_setting_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHIPPED_ENV_VAR, "maybe")
    with pytest.raises(DmError) as info:
        load_experiments(extra="")
    message = str(info.value)
    assert f"{SHIPPED_ENV_VAR}='maybe'" in message
    assert "0" in message and "1" in message and "DM_EXPERIMENTS" in message, message


@pytest.mark.parametrize(
    ("evaluation", "expected"),
    [
        ("{curve_sizes: [10, 5]}", "increasing order"),
        ("{curve_sizes: [10, 30]}", "[30] exceed the 25 fitted models"),
        ("{curve_sizes: [6, 20]}", "[6] are below 2 x folds = 10"),
        ("{curve_sizes: [10], folds: 1}", "field evaluation.folds"),
        ("{replicates: 1}", "field evaluation.replicates"),
        ("{bootstrap: -1}", "field evaluation.bootstrap"),
        ("{min_lds: 2}", "field evaluation.min_lds"),
        ("{curve_sizes: [1]}", "at least 2 models"),
    ],
)
def test_evaluation_section_is_checked(tmp_path: Path, evaluation: str, expected: str) -> None:
    path = write(tmp_path, textwrap.dedent(GOOD) + f"evaluation: {evaluation}\n")
    with pytest.raises(ExperimentError, match=re.escape(expected)):
        load_experiment(path)


def test_evaluation_needs_held_out_models_and_a_regression(tmp_path: Path) -> None:
    text = textwrap.dedent(GOOD).replace("num_train: 20, num_val: 5", "num_train: 20, num_val: 10")
    with pytest.raises(ExperimentError, match="no held-out models"):
        load_experiment(write(tmp_path, text + "evaluation: {min_lds: 0.5}\n"))
    bare = "name: bare\nspec: {num_models: 3, schema: {x: {shape: [1], dtype: float32}}}\n"
    bare += "trainer: {main_import: a.b}\nevaluation: {}\n"
    with pytest.raises(ExperimentError, match="needs a regression section"):
        load_experiment(write(tmp_path, bare, "bare.yaml"))
    fine = load_experiment(write(tmp_path, textwrap.dedent(GOOD) + "evaluation: {}\n", "ok.yaml"))
    assert fine.evaluation is not None and fine.evaluation.curve_sizes == []
    assert (fine.evaluation.folds, fine.evaluation.replicates) == (5, None)
    assert fine.evaluation.bootstrap == 1000 and fine.attributions is None


@pytest.mark.parametrize(
    ("attributions", "expected"),
    [
        ("{methods: [trak, shap]}", "unknown method(s) ['shap']"),
        ("{methods: []}", "list at least one method"),
        ("{methods: [trak, trak]}", "list each method once"),
        ("{targets: 0}", "field attributions.targets"),
    ],
)
def test_attributions_section_is_checked(tmp_path: Path, attributions: str, expected: str) -> None:
    text = textwrap.dedent(GOOD) + "evaluation: {}\n"
    with pytest.raises(ExperimentError, match=re.escape(expected)):
        load_experiment(write(tmp_path, text + f"attributions: {attributions}\n"))
    with pytest.raises(ExperimentError, match="add an evaluation section"):
        load_experiment(write(tmp_path, textwrap.dedent(GOOD) + "attributions: {}\n", "a.yaml"))
    fine = load_experiment(write(tmp_path, text + "attributions: {}\n", "ok.yaml"))
    assert fine.attributions is not None
    assert fine.attributions.methods == ["influence_cg", "trak", "tracin"]


def test_a_broken_user_experiment_stops_the_definitions_loading(tmp_path: Path) -> None:
    broken = write(tmp_path, GOOD.replace("models_per_partition: 7", "models_per_partition: -1"))
    env = {**cli_env(), "DM_EXPERIMENTS": str(broken), "DM_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-c", "import dm_assets.pipeline.definitions"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"experiment file {broken}" in proc.stderr
    assert "field models_per_partition" in proc.stderr


def test_targets_per_slice_is_optional_and_checked(tmp_path: Path) -> None:
    plain = load_experiment(write(tmp_path, GOOD)).regression
    assert plain is not None and plain.targets_per_slice is None
    sliced = GOOD.replace(
        "cfg: {k: 5, batch_size: 10}", "cfg: {k: 5, batch_size: 10}\n  targets_per_slice: 2"
    )
    experiment = load_experiment(write(tmp_path, sliced))
    assert experiment.regression is not None and experiment.regression.targets_per_slice == 2
    with pytest.raises(ExperimentError, match=r"field regression\.targets_per_slice: "):
        load_experiment(
            write(tmp_path, sliced.replace("targets_per_slice: 2", "targets_per_slice: 0"))
        )
    beyond = sliced.replace(
        "data: {num_train: 20, num_val: 5}",
        "data: {num_train: 20, num_val: 5, target_start_ind: 1, target_end_ind: 5}",
    )
    with pytest.raises(ExperimentError, match=r"targets \[1, 5\) are not within the 3 target"):
        load_experiment(write(tmp_path, beyond))
