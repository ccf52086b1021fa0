"""Device slots: which GPU (or CPU share) each training process gets, shared by every run on
one machine through file locks.

A slot is one device. Runs that want devices lease slots from :class:`DeviceSlots`; a slot is
held while its lock file, ``<lock_dir>/<slot name>.lock`` (e.g. ``cuda:3.lock``), is locked
with ``flock``. The kernel drops the lock when the last process holding the open file ends, so a
killed run never leaves a slot taken, and a child process given the descriptor (``pass_fds``)
keeps the slot taken while it runs even after its parent died. Each lock file holds one line of
JSON naming its latest holder (``{"pid": ..., "host": ..., "since": ...}``), read only to tell
a waiting run whom it waits for; the lock alone decides who holds a slot.

``flock`` locks are local to a machine (on NFS they may be emulated across machines), so keep
``lock_dir`` on a local filesystem: :func:`dm_assets.home.lock_dir` by default.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

from dm_assets.errors import DmError

logger = logging.getLogger(__name__)

DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class Device:
    """One device slot.

    ``name`` is ``"cuda:<ordinal>"`` or ``"cpu:<ordinal>"``; for a GPU, ``ordinal`` is its
    index on the machine (as ``nvidia-smi`` and an unset ``CUDA_VISIBLE_DEVICES`` number them),
    for a CPU slot just its number. ``visible_id`` is what a child's ``CUDA_VISIBLE_DEVICES``
    must hold to see this GPU when that is not the ordinal (a GPU or MIG UUID); then ``name`` is
    ``"cuda:<visible_id>"``.
    """

    name: str
    kind: DeviceKind
    ordinal: int
    visible_id: str | None = None

    @classmethod
    def cuda(cls, ordinal: int, visible_id: str | None = None) -> Device:
        return cls(f"cuda:{visible_id or ordinal}", "cuda", ordinal, visible_id)

    @classmethod
    def cpu(cls, ordinal: int) -> Device:
        return cls(f"cpu:{ordinal}", "cpu", ordinal)

    def env(self, threads: int | None = None) -> dict[str, str]:
        """Environment variables for a process that should use this device (and only it).

        ``CUDA_VISIBLE_DEVICES`` shows it the one GPU (which it sees as ``cuda:0``) or none;
        ``DM_DEVICE`` is ``"cuda"`` or ``"cpu"`` for the training script to pick its device;
        ``DM_DEVICE_SLOT`` is this slot's name; ``threads`` (when given) bounds the process's
        OpenMP and MKL thread pools (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``).
        """
        env = {"DM_DEVICE_SLOT": self.name}
        if self.kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = self.visible_id or str(self.ordinal)
            env["DM_DEVICE"] = "cuda"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["DM_DEVICE"] = "cpu"
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive integer or None; got {threads!r}")
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        return env


def _cuda_device_count() -> int:
    """How many GPUs this process can see (torch's count, which honours CUDA_VISIBLE_DEVICES);
    0 when torch is not installed. Without an NVIDIA driver (no ``/dev/nvidiactl``) the answer
    is 0 without importing torch, which costs a second or more per process."""
    if not os.path.exists("/dev/nvidiactl") and not os.environ.get("DM_FORCE_CUDA_PROBE"):
        return 0
    try:
        import torch  # lazily: importing torch costs seconds and this module must not need it
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def _visible_gpus(count: int) -> list[Device]:
    """The ``count`` GPUs this process sees, as machine-wide devices: ``CUDA_VISIBLE_DEVICES``
    (when set) maps torch's numbering to the machine's."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [Device.cuda(i) for i in range(count)]
    entries = [e.strip() for e in visible.split(",") if e.strip()][:count]
    devices = []
    for position, entry in enumerate(entries):
        if re.fullmatch(r"\d+", entry):
            devices.append(Device.cuda(int(entry)))
        else:  # a GPU-/MIG- UUID: the only name that identifies it machine-wide
            devices.append(Device.cuda(position, visible_id=entry))
    return devices


class DeviceNotVisibleError(DmError, ValueError):
    """A leased GPU is not among the GPUs this process sees (``CUDA_VISIBLE_DEVICES``)."""


def torch_device(device: Device) -> str:
    """The torch device string under which this process reaches ``device``: ``"cpu"`` for a
    CPU slot; for a GPU ``"cuda:<i>"``, ``i`` its position among the GPUs this process sees.

    torch numbers the visible GPUs ``0 .. n-1`` in the order ``CUDA_VISIBLE_DEVICES`` lists
    them, so machine GPU 3 under ``CUDA_VISIBLE_DEVICES=2,3`` is ``cuda:1`` (and machine GPU 0
    under ``1,0`` is ``cuda:1`` too); the machine-wide ordinal names another GPU, or none.
    Raises :class:`DeviceNotVisibleError` when this process does not see ``device``.
    """
    if device.kind != "cuda":
        return "cpu"
    visible = _visible_gpus(_cuda_device_count())
    for position, candidate in enumerate(visible):
        if candidate.name == device.name:
            return f"cuda:{position}"
    seen = ", ".join(d.name for d in visible) or "none"
    raise DeviceNotVisibleError(
        f"device slot {device.name} is not among the GPUs this process sees ({seen}; "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): start the process "
        "with CUDA_VISIBLE_DEVICES unset or listing that GPU, or restrict the experiment's "
        "devices.gpus to the GPUs it lists"
    )


def detect_devices(gpus: str | int | Sequence[int] = "auto", cpu_slots: int = 1) -> list[Device]:
    """The device slots a run may lease.

    ``gpus``:
      - ``"auto"``: every GPU this process sees (``torch.cuda.device_count()``, so
        ``CUDA_VISIBLE_DEVICES`` is honoured); when there is none, ``cpu_slots`` CPU slots.
      - an int ``n``: the first ``n`` of those GPUs; ``0`` means CPU slots only.
      - a list of ints: those GPUs, numbered as this process sees them (torch's ``cuda:i``).
      - ``"none"`` or ``"cpu"``: ``cpu_slots`` CPU slots, even when GPUs are present.

    Raises ``ValueError`` naming the bad value (or the GPUs asked for that do not exist).
    """
    if isinstance(cpu_slots, bool) or not isinstance(cpu_slots, int) or cpu_slots < 1:
        raise ValueError(
            f"cpu_slots must be a positive integer (the number of CPU training processes to "
            f"run at once); got {cpu_slots!r}"
        )
    cpus = [Device.cpu(i) for i in range(cpu_slots)]
    if isinstance(gpus, str):
        choice = gpus.strip().lower()
        if choice in ("none", "cpu"):
            return cpus
        if choice != "auto":
            raise ValueError(
                f"gpus must be 'auto', 'none', a number of GPUs or a list of GPU indices; got "
                f"{gpus!r} (for GPUs 0 and 1 pass [0, 1]; for two GPUs pass 2)"
            )
        count = _cuda_device_count()
        if count == 0:
            logger.info("no CUDA GPU visible; using %d CPU slot(s)", cpu_slots)
            return cpus
        return _visible_gpus(count)
    if isinstance(gpus, bool):
        raise ValueError(f"gpus must be 'auto', 'none', a count or a list of indices; got {gpus!r}")
    if isinstance(gpus, int):
        if gpus < 0:
            raise ValueError(f"gpus must be a count >= 0 (0: CPU only); got {gpus}")
        if gpus == 0:
            return cpus
        count = _cuda_device_count()
        if gpus > count:
            raise ValueError(
                f"gpus={gpus} asks for more GPUs than the {count} this process sees "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); pass at "
                f"most {count}, or 'auto'"
            )
        return _visible_gpus(count)[:gpus]
    try:
        wanted = list(gpus)
    except TypeError:
        raise ValueError(
            f"gpus must be 'auto', 'none', a count or a list of indices; got {gpus!r}"
        ) from None
    bad = [g for g in wanted if isinstance(g, bool) or not isinstance(g, int) or g < 0]
    if bad or len(set(wanted)) != len(wanted) or not wanted:
        raise ValueError(
            f"gpus must list distinct GPU indices >= 0 (e.g. [0, 2]); got {gpus!r}"
            + (f", bad entries {bad}" if bad else "")
        )
    count = _cuda_device_count()
    missing = [g for g in wanted if g >= count]
    if missing and count == 0:
        raise ValueError(
            f"GPU(s) {missing} asked for, but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); pass gpus=0 (or 'none') to train on CPU"
        )
    if missing:
        raise ValueError(
            f"GPU(s) {missing} do not exist: this process sees {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); valid indices "
            f"are 0 to {count - 1}"
        )
    visible = _visible_gpus(count)
    return [visible[g] for g in wanted]


def _holder_record() -> str:
    since = datetime.now(UTC).astimezone().isoformat(timespec="seconds")
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"


class DeviceLease:
    """Device slots held by this process until :meth:`release` (or the end of a ``with``).

    ``devices[i]`` is held through the locked descriptor ``fds[i]``. Give a child process the
    descriptor of its device (``subprocess.Popen(..., pass_fds=[fd])``) and the slot stays
    taken while that child runs, even if this process dies first.
    """

    def __init__(self, slots: DeviceSlots, devices: Sequence[Device], fds: Sequence[int]) -> None:
        self.slots = slots
        self.devices: tuple[Device, ...] = tuple(devices)
        self.fds: tuple[int, ...] = tuple(fds)
        self._released = False

    def fd_for(self, device: Device) -> int:
        """The locked descriptor of ``device``'s slot."""
        return self.fds[self.devices.index(device)]

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Close this process's descriptors. The slots are free once no child given one of
        them still runs (closing, not unlocking, so a running child keeps its slot)."""
        if self._released:
            return
        self._released = True
        for fd in self.fds:
            os.close(fd)
        logger.debug("released device slot(s) %s", [d.name for d in self.devices])

    def __enter__(self) -> DeviceLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"DeviceLease({[d.name for d in self.devices]}, {state})"


class DeviceSlots:
    """The device slots of one machine, shared through lock files in ``lock_dir``."""

    def __init__(self, lock_dir: str | os.PathLike[str], devices: Sequence[Device]) -> None:
        if not devices:
            raise ValueError("DeviceSlots needs at least one device; see detect_devices()")
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ValueError(f"device names must be distinct; got {names}")
        self.lock_dir = Path(lock_dir)
        self.devices: tuple[Device, ...] = tuple(devices)

    def lock_path(self, device: Device) -> Path:
        """``<lock_dir>/<device name>.lock``."""
        return self.lock_dir / f"{device.name}.lock"

    def _try_lock(self, device: Device) -> int | None:
        """The slot's locked descriptor (holder record written), or None when it is taken."""
        path = self.lock_path(device)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError:  # another user's lock file: flock works on a read-only one
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            record = _holder_record().encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError:  # the record is informative only; the lock is what counts
            logger.debug("could not write the holder of %s", path)
        return fd

    def holder(self, device: Device) -> str:
        """Who last took ``device``'s slot, as ``"pid 123 on host h since 2025-..."``, or
        ``"an unknown process"`` when its lock file says nothing readable."""
        try:
            data = json.loads(self.lock_path(device).read_text())
            return f"pid {data['pid']} on {data['host']} since {data['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown process"

    def acquire(
        self,
        max_count: int,
        *,
        min_count: int = 1,
        timeout: float | None = None,
        poll: float = 0.2,
        on_wait: Callable[[str], None] | None = None,
    ) -> DeviceLease:
        """Lease as many free slots as there are, up to ``max_count``, once at least
        ``min_count`` are free.

        Slots are tried in order without blocking; while fewer than ``min_count`` are free
        none is kept (so two waiting runs cannot each hold part of what the other needs), and
        the free ones are looked at again every ``poll`` seconds. ``on_wait`` is called once,
        when the first look finds too few, with a message naming the slots' holders.
        ``max_count`` above the number of slots means all of them. ``timeout`` (seconds; None:
        wait forever) raises ``TimeoutError`` naming the holders.
        """
        for name, value in (("max_count", max_count), ("min_count", min_count)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if min_count > max_count:
            raise ValueError(f"min_count ({min_count}) must not exceed max_count ({max_count})")
        if min_count > len(self.devices):
            raise ValueError(
                f"min_count={min_count} can never be met: there are {len(self.devices)} "
                f"device slot(s) ({', '.join(d.name for d in self.devices)})"
            )
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None; got {timeout!r}")
        if not poll > 0:
            raise ValueError(f"poll must be > 0 seconds; got {poll!r}")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        waited = False
        while True:
            devices: list[Device] = []
            fds: list[int] = []
            try:
                for device in self.devices:
                    if len(devices) == max_count:
                        break
                    fd = self._try_lock(device)
                    if fd is not None:
                        devices.append(device)
                        fds.append(fd)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            if len(devices) >= min_count:
                if waited:
                    logger.info("got device slot(s) after %.1f s", time.monotonic() - start)
                logger.debug("leased device slot(s) %s", [d.name for d in devices])
                return DeviceLease(self, devices, fds)
            for fd in fds:
                os.close(fd)
            elapsed = time.monotonic() - start
            if not waited or (timeout is not None and elapsed >= timeout):
                message = self._busy_message(devices, min_count)
                if timeout is not None and elapsed >= timeout:
                    raise TimeoutError(
                        f"gave up after {elapsed:.1f} s (timeout {timeout:g} s): {message}. "
                        "Wait for those runs to end, end them, or give this run a longer timeout "
                        "or fewer devices"
                    )
                waited = True
                logger.info("%s; waiting", message)
                if on_wait is not None:
                    on_wait(message)
            pause = poll if timeout is None else min(poll, max(0.0, timeout - elapsed))
            time.sleep(pause)

    def _busy_message(self, free: Sequence[Device], min_count: int) -> str:
        busy = [d for d in self.devices if d not in free]
        held = "; ".join(f"{d.name} held by {self.holder(d)}" for d in busy)
        return (
            f"{len(free)} of {len(self.devices)} device slot(s) free, {min_count} needed "
            f"(lock files in {self.lock_dir}): {held}"
        )

    def __repr__(self) -> str:
        return f"DeviceSlots({str(self.lock_dir)!r}, {[d.name for d in self.devices]})"


__all__ = ["Device", "DeviceLease", "DeviceSlots", "detect_devices"]
