"""Device slots as a Dagster resource: which GPU (or CPU slot) each worker process gets.

Dagster's ``gpu`` pool limits how many training and regression steps run at once; it does not
say which device a step uses. This resource does: every worker process holds one slot
exclusively (a file lock under ``$DM_HOME/locks``), across concurrent runs on this machine.
"""

import os
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from pydantic import Field

from dm_assets.home import lock_dir
from dm_assets.pipeline.experiment import DeviceSettings
from dm_assets.training.devices import Device, DeviceLease, DeviceSlots, detect_devices

# the Dagster pool every device-holding step joins (its limit is set in dagster.yaml)
GPU_POOL = "gpu"


class DeviceSlotsResource(dg.ConfigurableResource):
    """The machine's device slots: every visible GPU, else ``cpu_slots`` CPU slots."""

    lock_dir: str = Field(default="", description="lock files' folder (default $DM_HOME/locks)")
    cpu_slots: int = Field(
        default=0, ge=0, description="CPU worker slots on this machine (0: one per CPU core)"
    )
    gpus: str = Field(
        default="auto", description="auto (every visible GPU) or none (CPU slots only)"
    )
    wait_timeout: float | None = Field(
        default=None, description="seconds to wait for a free slot (default: no limit)"
    )

    def _slots_dir(self) -> str:
        return self.lock_dir or str(lock_dir())

    def machine_devices(self) -> list[Device]:
        cpu = self.cpu_slots or os.cpu_count() or 1
        return detect_devices("none" if self.gpus == "none" else "auto", cpu_slots=cpu)

    def devices_for(self, settings: DeviceSettings) -> list[Device]:
        """The slots an experiment may use: its GPUs, or CPU slots where it uses none."""
        devices = self.machine_devices()
        gpus = [d for d in devices if d.kind == "cuda"]
        cpus = [d for d in devices if d.kind == "cpu"]
        choice = settings.gpus
        if choice == "none" or choice == 0 or not gpus:
            if not cpus:
                cpus = detect_devices("none", cpu_slots=self.cpu_slots or os.cpu_count() or 1)
            return cpus
        if choice == "auto":
            return gpus
        if isinstance(choice, int):
            return gpus[:choice]
        wanted = [d for d in gpus if d.ordinal in set(choice)]
        if not wanted:
            raise ValueError(
                f"devices.gpus={choice} names no visible GPU; visible: {[d.ordinal for d in gpus]}"
            )
        return wanted

    def acquire(
        self,
        settings: DeviceSettings,
        *,
        max_count: int,
        on_wait: Callable[[str], None] | None = None,
    ) -> DeviceLease:
        """Lease up to ``max_count`` of the experiment's slots, at least one (waiting for it):
        every GPU it may use, or ``cpu_workers`` CPU slots, capped by ``max_workers``."""
        devices = self.devices_for(settings)
        cap = len(devices)
        if all(d.kind == "cpu" for d in devices):
            cap = min(cap, settings.cpu_workers)
        if settings.max_workers is not None:
            cap = min(cap, settings.max_workers)
        slots = DeviceSlots(Path(self._slots_dir()), devices)
        return slots.acquire(
            max(1, min(max_count, cap)), timeout=self.wait_timeout, on_wait=on_wait
        )
