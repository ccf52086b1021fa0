"""Device slots: exclusive across processes through flock, freed when the holder dies, kept by a
child that inherited the lock, and device detection without a GPU."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dm_assets.training import devices
from dm_assets.training.devices import Device, DeviceSlots, detect_devices
from dm_assets_tests.helpers import REPO_ROOT, cli_env, wait_dead

# Takes slot cpu:0 in lock_dir (argv[1]), then either holds it ("hold") or hands it to a child
# `sleep` process and exits at once ("child"); prints a line once the slot is held.
HOLDER = """
import os, subprocess, sys, time
from dm_assets.training.devices import Device, DeviceSlots
lease = DeviceSlots(sys.argv[1], [Device.cpu(0)]).acquire(1)
if sys.argv[2] == "child":
    child = subprocess.Popen(["sleep", "60"], pass_fds=lease.fds)
    print(child.pid, flush=True)
    os._exit(0)
print("held", flush=True)
time.sleep(60)
"""


def start_holder(lock_dir: Path, mode: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir), mode],
        cwd=REPO_ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the holder process ended before taking the slot"
    return proc, line


def test_slot_exclusive_across_processes_and_freed_when_holder_killed(tmp_path: Path) -> None:
    slots = DeviceSlots(tmp_path, [Device.cpu(0)])
    proc, _ = start_holder(tmp_path, "hold")
    try:
        with pytest.raises(TimeoutError) as info:
            slots.acquire(1, timeout=0.3, poll=0.05)
        message = str(info.value)
        assert f"cpu:0 held by pid {proc.pid} on " in message
        assert "0 of 1 device slot(s) free, 1 needed" in message and "timeout 0.3 s" in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with slots.acquire(1, timeout=5) as lease:  # the kernel dropped the dead holder's lock
        assert [d.name for d in lease.devices] == ["cpu:0"]
        assert f'"pid": {os.getpid()}' in (tmp_path / "cpu:0.lock").read_text()


def test_child_with_the_inherited_lock_keeps_the_slot_after_its_parent_died(
    tmp_path: Path,
) -> None:
    slots = DeviceSlots(tmp_path, [Device.cpu(0)])
    parent, line = start_holder(tmp_path, "child")
    child = int(line)
    try:
        parent.wait(timeout=10)
        with pytest.raises(TimeoutError, match="cpu:0 held by pid"):
            slots.acquire(1, timeout=0.3, poll=0.05)
    finally:
        os.kill(child, signal.SIGKILL)
    wait_dead(child)
    slots.acquire(1, timeout=5).release()


def test_acquire_takes_what_is_free_up_to_max_count(tmp_path: Path) -> None:
    slots = DeviceSlots(tmp_path / "locks", [Device.cpu(i) for i in range(3)])
    first = slots.acquire(2)
    assert [d.name for d in first.devices] == ["cpu:0", "cpu:1"] and len(first.fds) == 2
    assert first.fd_for(Device.cpu(1)) == first.fds[1]
    second = slots.acquire(5)  # more than there are: whatever is free
    assert [d.name for d in second.devices] == ["cpu:2"]
    with pytest.raises(TimeoutError):
        slots.acquire(1, timeout=0)
    first.release()
    first.release()  # twice is harmless
    assert first.released
    with slots.acquire(3, min_count=2) as third:
        assert [d.name for d in third.devices] == ["cpu:0", "cpu:1"]
    second.release()


def test_waits_for_min_count_and_says_whom_it_waits_for(tmp_path: Path) -> None:
    slots = DeviceSlots(tmp_path, [Device.cpu(0), Device.cpu(1)])
    held = slots.acquire(1)  # cpu:0 taken: one free, two needed
    messages: list[str] = []
    timer = threading.Timer(0.3, held.release)
    timer.start()
    start = time.monotonic()
    with slots.acquire(2, min_count=2, timeout=10, poll=0.02, on_wait=messages.append) as lease:
        assert time.monotonic() - start >= 0.25
        assert len(lease.devices) == 2
    timer.join()
    assert len(messages) == 1  # once, not at every poll
    assert "1 of 2 device slot(s) free, 2 needed" in messages[0]
    assert f"cpu:0 held by pid {os.getpid()}" in messages[0]


def test_bad_acquire_arguments(tmp_path: Path) -> None:
    slots = DeviceSlots(tmp_path, [Device.cpu(0)])
    with pytest.raises(ValueError, match="min_count=2 can never be met: there are 1"):
        slots.acquire(2, min_count=2)
    with pytest.raises(ValueError, match="max_count must be a positive integer; got 0"):
        slots.acquire(0)
    with pytest.raises(ValueError, match="must not exceed max_count"):
        slots.acquire(1, min_count=2)
    with pytest.raises(ValueError, match="at least one device"):
        DeviceSlots(tmp_path, [])
    with pytest.raises(ValueError, match="distinct"):
        DeviceSlots(tmp_path, [Device.cpu(0), Device.cpu(0)])


def test_device_env() -> None:
    assert Device.cuda(3).env(threads=4) == {
        "DM_DEVICE_SLOT": "cuda:3",
        "CUDA_VISIBLE_DEVICES": "3",
        "DM_DEVICE": "cuda",
        "OMP_NUM_THREADS": "4",
        "MKL_NUM_THREADS": "4",
    }
    assert Device.cpu(1).env(None) == {
        "DM_DEVICE_SLOT": "cpu:1",
        "CUDA_VISIBLE_DEVICES": "",
        "DM_DEVICE": "cpu",
    }
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Device.cpu(0).env(0)


@pytest.fixture
def gpu_count(monkeypatch: pytest.MonkeyPatch):
    """Pretend this process sees ``n`` GPUs (no torch import)."""

    def set_count(n: int, visible: str | None = None) -> None:
        monkeypatch.setattr(devices, "_cuda_device_count", lambda: n)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    return set_count


def names(found: list[Device]) -> list[str]:
    return [d.name for d in found]


def test_detect_devices_falls_back_to_cpu(gpu_count) -> None:
    gpu_count(0)
    assert names(detect_devices()) == ["cpu:0"]
    assert names(detect_devices("auto", cpu_slots=3)) == ["cpu:0", "cpu:1", "cpu:2"]
    assert detect_devices(0, cpu_slots=2)[1] == Device("cpu:1", "cpu", 1)
    gpu_count(2)
    assert names(detect_devices("none")) == names(detect_devices(0)) == ["cpu:0"]


def test_detect_devices_maps_visible_gpus_to_the_machine(gpu_count) -> None:
    gpu_count(2)
    assert names(detect_devices()) == ["cuda:0", "cuda:1"]
    gpu_count(2, visible="3,5")
    assert names(detect_devices()) == ["cuda:3", "cuda:5"]
    assert names(detect_devices(1)) == ["cuda:3"]
    [gpu] = detect_devices([1])
    assert gpu == Device("cuda:5", "cuda", 5) and gpu.env()["CUDA_VISIBLE_DEVICES"] == "5"
    gpu_count(1, visible="MIG-4f2a")
    [mig] = detect_devices()
    assert mig.name == "cuda:MIG-4f2a" and mig.env()["CUDA_VISIBLE_DEVICES"] == "MIG-4f2a"


@pytest.mark.parametrize(
    ("gpus", "cpu_slots", "needle"),
    [
        (-1, 1, "count >= 0"),
        ("two", 1, "got 'two'"),
        ("0,1", 1, "pass [0, 1]"),
        (True, 1, "got True"),
        ([0, 0], 1, "distinct GPU indices"),
        ([0, -1], 1, "bad entries [-1]"),
        ([], 1, "distinct GPU indices"),
        (3, 1, "asks for more GPUs than the 2 this process sees"),
        ([1, 4], 1, "GPU(s) [4] do not exist: this process sees 2 GPU(s)"),
        ("auto", 0, "cpu_slots must be a positive integer"),
        (0, 1.5, "cpu_slots must be a positive integer"),
    ],
)
def test_detect_devices_bad_values(gpu_count, gpus, cpu_slots, needle: str) -> None:
    gpu_count(2)
    with pytest.raises(ValueError) as info:
        detect_devices(gpus, cpu_slots=cpu_slots)
    assert needle in str(info.value)


def test_detect_devices_asking_for_gpus_without_any(gpu_count) -> None:
    gpu_count(0)
    with pytest.raises(ValueError, match=r"no CUDA GPU is visible .*pass gpus=0"):
        detect_devices([0])
    with pytest.raises(ValueError, match="more GPUs than the 0"):
        detect_devices(1)


@pytest.mark.cuda
def test_detect_devices_finds_the_real_gpus() -> None:
    if not glob.glob("/dev/nvidia[0-9]*"):
        pytest.skip("needs a CUDA GPU")
    torch = pytest.importorskip("torch")
    found = detect_devices()
    assert len(found) == torch.cuda.device_count() > 0
    assert all(d.kind == "cuda" for d in found)
    # a process given a slot's environment sees exactly that one GPU, as cuda:0
    probe = "import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0))"
    for device in found:
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env={**os.environ, **device.env(threads=1)},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.split(maxsplit=1)
        assert out[0] == "1"
        assert out[1].strip() == torch.cuda.get_device_name(found.index(device))


# ---------------------------------------------------------------- torch device of a slot
@pytest.mark.parametrize(
    ("visible", "ordinal", "expected"),
    [("2,3", 3, "cuda:1"), ("2,3", 2, "cuda:0"), ("1,0", 0, "cuda:1"), ("1,0", 1, "cuda:0")],
)
def test_torch_device_is_the_position_among_visible_gpus(
    monkeypatch: pytest.MonkeyPatch, visible: str, ordinal: int, expected: str
) -> None:
    """A GPU's machine-wide ordinal is not torch's index when CUDA_VISIBLE_DEVICES is set."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(devices, "_cuda_device_count", lambda: 2)
    assert devices.torch_device(Device.cuda(ordinal)) == expected


def test_torch_device_without_cuda_visible_devices_and_of_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "_cuda_device_count", lambda: 4)
    assert devices.torch_device(Device.cuda(3)) == "cuda:3"
    assert devices.torch_device(Device.cpu(3)) == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    monkeypatch.setattr(devices, "_cuda_device_count", lambda: 2)
    assert devices.torch_device(Device.cuda(1, visible_id="GPU-bbbb")) == "cuda:1"


def test_torch_device_of_a_gpu_this_process_cannot_see(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(devices, "_cuda_device_count", lambda: 2)
    with pytest.raises(devices.DeviceNotVisibleError) as info:
        devices.torch_device(Device.cuda(0))
    message = str(info.value)
    assert "cuda:0" in message and "CUDA_VISIBLE_DEVICES='2,3'" in message
    assert "cuda:2, cuda:3" in message
