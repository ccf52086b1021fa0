"""The seed's ``write_dataset`` command line: end to end in a subprocess, options in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dm_assets.regression.beton import SEED_BETON_NAME
from dm_assets.regression.beton_reader import beton_info
from dm_assets.regression.write_dataset import main
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets_tests.helpers import run_module

MODULE = "dm_assets.regression.write_dataset"
COMPLETED = [0, 2, 3, 7, 8]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """10 models, 5 completed: masks bool (6,), margins float16 (4,)."""
    spec = Spec.from_dict(
        {
            "num_models": 10,
            "schema": {
                "masks": {"shape": [6], "dtype": "bool_"},
                "margins": {"shape": [4], "dtype": "float16"},
            },
        }
    )
    rng = np.random.default_rng(0)
    with Store.initialize(tmp_path / "store", spec) as store:
        for i in COMPLETED:
            store.write_row(i, {"masks": rng.random(6) < 0.5, "margins": rng.standard_normal(4)})
    return tmp_path / "store"


def test_writes_the_completed_rows(tmp_path: Path, store_dir: Path) -> None:
    out = tmp_path / "data.beton"
    proc = run_module(
        MODULE,
        f"--cfg.data_dir={store_dir}",
        f"--cfg.out_path={out}",
        "--cfg.x_name=masks",
        "--cfg.y_name=margins",
        "--cfg.y_slice=3",
        check=True,
    )
    assert "wrote 5 rows (model indices 0-8)" in proc.stderr
    info = beton_info(out)
    assert (info.n_rows, info.n_features, info.n_targets) == (5, 6, 1)
    np.testing.assert_array_equal(info.model_indices, COMPLETED)


def test_bad_input_exits_1_with_the_reason(tmp_path: Path, store_dir: Path) -> None:
    out = tmp_path / "data.beton"
    proc = run_module(
        MODULE, f"--cfg.data_dir={store_dir}", f"--cfg.out_path={out}", "--cfg.y_name=logits"
    )
    assert proc.returncode == 1
    assert "error: y_name='logits' is not a key" in proc.stderr
    assert "['masks', 'margins']" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_out_dir_writes_the_seeds_file_name(tmp_path: Path, store_dir: Path) -> None:
    assert main([f"--cfg.data_dir={store_dir}", f"--cfg.out_dir={tmp_path}"]) == 0
    assert beton_info(tmp_path / SEED_BETON_NAME).n_targets == 4


def test_ignore_completed_and_missing_store(
    tmp_path: Path, store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.beton"
    args = [f"--cfg.data_dir={store_dir}", f"--cfg.out_path={out}", "--cfg.num_workers=1"]
    assert main([*args, "--cfg.ignore_completed"]) == 0
    np.testing.assert_array_equal(beton_info(out).model_indices, np.arange(10))
    assert main([f"--cfg.data_dir={tmp_path / 'nope'}", f"--cfg.out_path={out}"]) == 1
    assert "error: cannot read the store at" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        [],  # neither out_path nor out_dir
        ["--cfg.out_path=a.beton", "--cfg.out_dir=."],
        ["--cfg.out_path=a.beton", "--cfg.y_slice=-1"],
        ["--cfg.out_path=a.beton", "--cfg.num_workers=0"],
    ],
)
def test_usage_errors_exit_2(store_dir: Path, extra: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([f"--cfg.data_dir={store_dir}", *extra])
    assert exc.value.code == 2
