"""The configuration of one fit, without Dagster: the device slot's device and the target slice
(fit_into_folder itself runs in dm_assets_tests/evaluation/test_held_out.py)."""

from __future__ import annotations

from dm_assets.regression.config import RegressionConfig, load_config
from dm_assets.regression.fit_run import configure_fit
from dm_assets.regression.merge import TargetSlice


def config_on(device: str) -> RegressionConfig:
    return load_config(
        None,
        {
            "data": {"data_path": "d.beton", "num_train": 10, "num_val": 5},
            "cfg": {"k": 4, "batch_size": 5, "out_dir": "fit", "device": device},
        },
    )


def test_configure_fit_sets_auto_devices_and_target_slices() -> None:
    config = config_on("auto")
    sliced = configure_fit(config, device="cuda:1", targets=TargetSlice(2, 5, "t2-4"))
    assert sliced["cfg"]["device"] == "cuda:1"
    assert (sliced["data"]["target_start_ind"], sliced["data"]["target_end_ind"]) == (2, 5)
    assert config["cfg"]["device"] == "auto"  # the input is left as it was
    assert configure_fit(config_on("cpu"), device="cuda:0")["cfg"]["device"] == "cpu"
