"""fit_on_a_device_slot: the fit runs on the leased GPU as torch numbers it in this process
(its position among CUDA_VISIBLE_DEVICES), never on another run's GPU. No GPU is needed: the
visible list and the slot are faked, and the fit itself is replaced by a recorder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest

from dm_assets.pipeline.assets import fit_steps
from dm_assets.regression import fit_run
from dm_assets.regression.config import RegressionConfig
from dm_assets.training import devices
from dm_assets.training.devices import Device


class OneSlot:
    """A DeviceSlotsResource stand-in whose every lease is ``device``."""

    def __init__(self, device: Device) -> None:
        self.device = device

    @contextmanager
    def acquire(self, settings: object, **kwargs: object) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(devices=[self.device])


def fit_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: Device) -> str:
    """The ``cfg.device`` the fit was started with when the slot leased is ``device``."""
    seen: list[str] = []

    def fake_fit(config: RegressionConfig, out_dir: Path, **kwargs: Any) -> SimpleNamespace:
        seen.append(config["cfg"]["device"])
        return SimpleNamespace(folder=SimpleNamespace(point_link=lambda link: None))

    monkeypatch.setattr(fit_run, "fit_into_folder", fake_fit)
    context = SimpleNamespace(
        log=SimpleNamespace(info=lambda *a: None), run=SimpleNamespace(run_id="r" * 32)
    )
    experiment = SimpleNamespace(devices=None, regression=None)
    config = RegressionConfig({"cfg": {"device": "auto"}, "data": {}})
    fit_steps.fit_on_a_device_slot(
        context,  # type: ignore[arg-type]
        experiment,  # type: ignore[arg-type]
        OneSlot(device),  # type: ignore[arg-type]
        config,
        tmp_path / "fit",
        tmp_path / "link",
        store=tmp_path / "store",
    )
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    ("visible", "ordinal", "expected"), [("2,3", 3, "cuda:1"), ("1,0", 0, "cuda:1")]
)
def test_fit_uses_the_leased_gpu_as_this_process_numbers_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, visible: str, ordinal: int, expected: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(devices, "_cuda_device_count", lambda: 2)
    assert fit_device(monkeypatch, tmp_path, Device.cuda(ordinal)) == expected


def test_fit_on_a_cpu_slot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert fit_device(monkeypatch, tmp_path, Device.cpu(1)) == "cpu"


def test_fit_on_a_gpu_this_process_cannot_see_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(devices, "_cuda_device_count", lambda: 2)
    with pytest.raises(dg.Failure) as info:
        fit_device(monkeypatch, tmp_path, Device.cuda(0))
    assert "cuda:0" in str(info.value.description)
    assert "CUDA_VISIBLE_DEVICES='2,3'" in str(info.value.description)
