"""``python -m dm_assets.score``: any attribution matrix judged by LDS on the held-out models
of a real small experiment (store, dataset, fit and evaluation in ``tmp_path``, found by name
through ``DM_EXPERIMENTS`` and ``DM_HOME``). Our own datamodels scored this way must reproduce
the fit's evaluation; random scores score near 0; negated scores score exactly negated; bad
files exit 2 with the expected shape named."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dm_assets.evaluation import score as score_module
from dm_assets.evaluation.held_out import FitRows, evaluate_fit
from dm_assets.regression.beton_writer import write_beton
from dm_assets.regression.config import load_config
from dm_assets.regression.fit import FitFolder
from dm_assets.regression.fit_run import fit_into_folder
from dm_assets.score import main
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets_tests.helpers import REPO_ROOT, cli_env, planted_problem

N_MODELS, P, T = 260, 20, 16
NUM_TRAIN, NUM_VAL = 100, 40
SEEDS = 3  # held-out models 140..259: 40 masks, each trained on 3 seeds
SCHEMA = {"masks": {"shape": [P], "dtype": "bool_"}, "margins": {"shape": [T], "dtype": "float32"}}
EXPERIMENT = f"""
name: scored
spec:
  num_models: {N_MODELS}
  schema:
    masks: {{shape: [{P}], dtype: bool_}}
    margins: {{shape: [{T}], dtype: float32}}
trainer:
  main_import: dm_assets.examples.minimal.train_minimal
models_per_partition: 100
regression:
  data: {{num_train: {NUM_TRAIN}, num_val: {NUM_VAL}}}
  cfg: {{k: 6, batch_size: 50, num_workers: 1, solver: gram, device: cpu}}
"""


@dataclass(frozen=True)
class Scored:
    """The experiment ``scored`` under ``home`` (its latest fit evaluated) and, under
    ``bare_home``, the same store without a fit; ``experiments`` the folder of its YAML."""

    home: Path
    bare_home: Path
    experiments: Path
    fit: FitFolder


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Scored:
    root = tmp_path_factory.mktemp("score")
    prob = planted_problem(n=N_MODELS, p=P, t=T, density=0.3, seed=11)
    x = prob.x.copy()
    first = NUM_TRAIN + NUM_VAL
    x[first:] = np.repeat(x[first:N_MODELS:SEEDS], SEEDS, axis=0)  # replicated held-out masks
    rng = np.random.default_rng(3)
    signal = x @ prob.w
    y = (signal + 0.5 * signal.std(0) * rng.normal(size=signal.shape) + 3.0).astype(np.float32)
    home = root / "home"
    folder = home / "scored"
    spec = Spec.from_dict({"num_models": N_MODELS, "schema": SCHEMA})
    with Store.initialize(folder / "store", spec) as store:
        store.write_rows([(i, {"masks": x[i], "margins": y[i]}) for i in range(N_MODELS)])
    write_beton(folder / "store", folder / "data.beton", num_workers=1)
    config = load_config(
        None,
        {
            "data": {
                "data_path": str(folder / "data.beton"),
                "num_train": NUM_TRAIN,
                "num_val": NUM_VAL,
            },
            "cfg": {
                "k": 6,
                "batch_size": 50,
                "out_dir": str(folder / "fits" / "1"),
                "device": "cpu",
                "solver": "gram",
                "num_workers": 1,
            },
        },
    )
    fit = fit_into_folder(
        config, folder / "fits" / "1", store=folder / "store", x_name="masks", y_name="margins"
    ).folder
    rows = FitRows.of(config, store=folder / "store", x_name="masks", y_name="margins")
    evaluate_fit(fit, rows, experiment="scored")
    fit.point_link(folder / "datamodels")
    bare = root / "bare_home"
    (bare / "scored").mkdir(parents=True)
    (bare / "scored" / "store").symlink_to(folder / "store")
    experiments = root / "experiments"
    experiments.mkdir()
    (experiments / "scored.yaml").write_text(EXPERIMENT)
    return Scored(home=home, bare_home=bare, experiments=experiments, fit=fit)


@pytest.fixture
def env(scored: Scored, monkeypatch: pytest.MonkeyPatch) -> Scored:
    monkeypatch.setenv("DM_EXPERIMENTS", str(scored.experiments))
    monkeypatch.setenv("DM_HOME", str(scored.home))
    return scored


def score(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["scored", *args])
    out, err = capsys.readouterr()
    return code, out, err


def score_json(capsys: pytest.CaptureFixture[str], scores: Path, *args: str) -> dict:
    code, out, err = score(capsys, "--scores", str(scores), "--json", *args)
    assert code == 0, err
    return json.loads(out)


def folded_weights(fit: FitFolder) -> np.ndarray:
    weights = fit.weights()
    return (weights["weight"].double() / weights["std"].double()[:, None]).numpy()


def test_our_datamodels_score_as_the_fits_own_evaluation(
    env: Scored, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluation = env.fit.evaluation()
    assert evaluation is not None
    npy = tmp_path / "ours.npy"
    np.save(npy, folded_weights(env.fit))
    first = NUM_TRAIN + NUM_VAL
    for scores in (npy, env.fit.file("datamodels.pt")):
        got = score_json(capsys, scores, "--bootstrap", "50")
        assert got["lds"] == pytest.approx(evaluation["lds"], abs=1e-12)
        assert got["held_out_indices"] == evaluation["held_out_indices"]
        assert got["held_out_indices"] == list(range(first, N_MODELS))
        assert got["source"]["fit_dir"] == str(env.fit.path) and got["source"]["manifest"]
        assert got["noise_ceiling"] == pytest.approx(evaluation["noise_ceiling"], abs=1e-12)
        assert got["lds"] > 0.5  # planted weights: a real signal, not a degenerate match
    assert got["scores_kind"] == "datamodels.pt"
    # before any fit, the experiment's settings pick the same held-out models
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DM_HOME", str(env.bare_home))
        bare = score_json(capsys, npy, "--bootstrap", "50")
        named = score_json(capsys, npy, "--bootstrap", "50", "--fit", str(env.fit.path))
    assert bare["source"]["experiment"] == "scored" and "fit_dir" not in bare["source"]
    assert bare["held_out_indices"] == got["held_out_indices"]
    assert bare["lds"] == pytest.approx(evaluation["lds"], abs=1e-12)
    assert named["source"]["fit_dir"] == str(env.fit.path) and named["lds"] == got["lds"]


def test_blocked_predictions_are_the_matrix_product(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    masks = rng.random((7, 50)) < 0.5
    scores = rng.normal(size=(50, 3))
    monkeypatch.setattr(score_module, "_BLOCK_VALUES", 20)  # blocks of 2 rows of scores
    got = score_module.predict_from_scores(masks, scores.astype(np.float32), t=3)
    np.testing.assert_allclose(
        got, masks @ scores.astype(np.float32).astype(np.float64), atol=1e-12
    )
    scores[[3, 30, 31], [0, 2, 1]] = [np.inf, np.nan, np.nan]  # in different blocks
    with pytest.raises(score_module.ScoreError, match=r"2 NaN and 1 infinite .* row 3, column 0"):
        score_module.predict_from_scores(masks, scores, t=3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_scores_score_near_zero(
    env: Scored, tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int
) -> None:
    path = tmp_path / "random.npy"
    np.save(path, np.random.default_rng(seed).normal(size=(P, T)))
    got = score_json(capsys, path, "--bootstrap", "300", "--seed", str(seed))
    n = got["held_out_models"]
    # per target, a null Spearman over n models has sd ~ 1/sqrt(n - 1); targets' random
    # scores are independent, but the replicated masks make only n / SEEDS rankings distinct
    se = 1 / np.sqrt((n / SEEDS - 1) * T)
    assert abs(got["lds"]) < 3 * se
    lo, hi = got["ci"]
    width = hi - lo
    assert lo < got["lds"] < hi
    assert lo - 0.25 * width <= 0 <= hi + 0.25 * width


def test_negated_scores_score_exactly_negated(
    env: Scored, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores = folded_weights(env.fit)
    plus, minus = tmp_path / "plus.npy", tmp_path / "minus.npy"
    np.save(plus, scores)
    np.save(minus, -scores)
    a = score_json(capsys, plus, "--bootstrap", "200", "--seed", "4")
    b = score_json(capsys, minus, "--bootstrap", "200", "--seed", "4")
    assert b["lds"] == pytest.approx(-a["lds"], abs=1e-12)
    assert b["ci"] == pytest.approx([-a["ci"][1], -a["ci"][0]], abs=1e-9)
    assert b["noise_ceiling"] == pytest.approx(a["noise_ceiling"], abs=1e-12)
    assert a["scores_sha256"] != b["scores_sha256"]


def test_json_and_text_say_what_was_scored(
    env: Scored, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ours.npy"
    np.save(path, folded_weights(env.fit))
    got = score_json(capsys, path, "--bootstrap", "100")
    for key in ("lds", "ci", "noise_ceiling", "held_out_models", "targets"):
        assert key in got, key
    assert got["targets"] == T and got["held_out_models"] == N_MODELS - NUM_TRAIN - NUM_VAL
    assert got["masks"] == got["held_out_models"] // SEEDS and got["seeds"] == SEEDS
    assert got["mean_of_seeds"] is not None and got["bootstrap"]["resamples"] == 100
    assert got["scores_sha256"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert got["scores_file"] == str(path)
    code, out, err = score(capsys, "--scores", str(path), "--bootstrap", "100")
    assert code == 0, err
    assert f"LDS              {got['lds']:.3f}  [{got['ci'][0]:.3f}, {got['ci'][1]:.3f}]" in out
    assert f"noise ceiling    {got['noise_ceiling']:.3f}" in out and "LDS / ceiling" in out
    assert "mean of" in out  # the mean-of-seeds truth
    held = N_MODELS - NUM_TRAIN - NUM_VAL
    assert f"held-out models  {held} on {held // SEEDS} distinct masks ({SEEDS} seeds" in out
    assert f"{NUM_TRAIN + NUM_VAL}-{N_MODELS - 1}" in out and str(env.fit.path) in out
    assert got["scores_sha256"].removeprefix("sha256:") in out


def test_a_missing_file_exits_2_in_a_real_process(env: Scored, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dm_assets.score", "scored", "--scores", str(tmp_path / "no.npy")],
        cwd=REPO_ROOT,
        env={
            **cli_env(),
            "DM_EXPERIMENTS": str(env.experiments),
            "DM_HOME": str(env.home),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"no scores file {tmp_path / 'no.npy'}" in proc.stderr
    assert "(p training examples, t targets)" in proc.stderr


@pytest.mark.parametrize(
    ("array", "says"),
    [
        (np.zeros((T, P)), "it is transposed: save scores.T"),
        (np.zeros((P, T + 1)), f"got ({P}, {T + 1})"),
        (np.zeros(P * T), f"got ({P * T},)"),
        (np.zeros((P, T, 1)), "3-dimensional"),
    ],
    ids=["transposed", "wrong_t", "flat", "3d"],
)
def test_misshapen_scores_exit_2_naming_the_expected_shape(
    env: Scored,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    array: np.ndarray,
    says: str,
) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    code, out, err = score(capsys, "--scores", str(path))
    assert code == 2 and out == ""
    assert f"expected shape (p, t) = ({P}, {T})" in err and says in err
    assert "Traceback" not in err


def test_non_finite_scores_are_counted(
    env: Scored, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores = np.ones((P, T))
    scores[4, 1] = scores[7, 0] = np.nan
    scores[9, 2] = -np.inf
    path = tmp_path / "nan.npy"
    np.save(path, scores)
    code, _, err = score(capsys, "--scores", str(path))
    assert code == 2
    assert f"2 NaN and 1 infinite value(s) of {P * T} (the first at row 4, column 1)" in err


def test_unreadable_and_foreign_files_exit_2(
    env: Scored, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "scores.csv"
    text.write_text("1,2,3\n")
    code, _, err = score(capsys, "--scores", str(text))
    assert code == 2 and "neither a .npy array" in err
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.ones((P, T)))
    truncated.write_bytes(truncated.read_bytes()[:100])
    code, _, err = score(capsys, "--scores", str(truncated))
    assert code == 2 and f"cannot read {truncated} as a .npy array" in err


def test_too_few_held_out_models_exit_2(
    env: Scored, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ours.npy"
    np.save(path, np.ones((P, T)))
    late = env.experiments.parent / "late.yaml"
    late.write_text(
        EXPERIMENT.replace("name: scored", "name: late").replace(
            f"num_val: {NUM_VAL}", f"num_val: {N_MODELS - NUM_TRAIN - 2}"
        )
    )
    (env.bare_home / "late").mkdir(exist_ok=True)
    if not (env.bare_home / "late" / "store").exists():
        (env.bare_home / "late" / "store").symlink_to(env.home / "scored" / "store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DM_HOME", str(env.bare_home))
        code = main([str(late), "--scores", str(path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert "only 2 held-out model(s) of 'late'" in err and "at least 3" in err
