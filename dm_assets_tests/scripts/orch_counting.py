"""A training script that says when and where each model trained, for the orchestration tests.

Pass-through arguments (fastargs section ``orch``): ``--orch.record=PATH`` a file that gets one
JSON line per call of ``main``, appended when the model's "training" ends::

    {"index": 7, "slot": "cpu:1", "pid": 1234, "start": 1718..., "end": 1718...}

(``slot`` is ``$DM_DEVICE_SLOT``; ``start``/``end`` are ``time.time()``), plus a line
``{"index": 7, "begin": ...}`` when it starts, so a model killed midway is seen too;
``--orch.sleep=SECONDS`` how long each model "trains" (default 0.05); ``--orch.fail=5,7`` indices
that always raise.

Outputs ``masks`` bool ``(6,)`` and ``margins`` float32 ``(2,)``, derived from the index.
"""

from __future__ import annotations

import json
import os
import time
from argparse import ArgumentParser
from typing import Any

import numpy as np
from fastargs import Param, Section, get_current_config

Section("orch").params(
    record=Param(str, "file that gets one JSON line per model trained", default=""),
    sleep=Param(float, "seconds each model takes", default=0.05),
    fail=Param(str, "indices that always fail, comma-separated", default=""),
)


def _append(path: str, record: dict[str, Any]) -> None:
    # one write() of a short line to an O_APPEND file: lines of concurrent workers never mix
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def main(*_: Any, index: int, logdir: str) -> dict[str, np.ndarray]:
    config = get_current_config()
    parser = ArgumentParser()
    config.augment_argparse(parser)
    config.collect_argparse_args(parser)
    record = str(config["orch.record"])
    start = time.time()
    if record:
        _append(record, {"index": index, "begin": start, "pid": os.getpid()})
    time.sleep(float(config["orch.sleep"]))
    if index in {int(i) for i in str(config["orch.fail"]).split(",") if i}:
        raise RuntimeError(f"model {index} always fails")
    if record:
        _append(
            record,
            {
                "index": index,
                "slot": os.environ.get("DM_DEVICE_SLOT", ""),
                "pid": os.getpid(),
                "start": start,
                "end": time.time(),
            },
        )
    rng = np.random.default_rng(index)
    mask = rng.random(6) < 0.5
    margins = mask @ np.arange(12, dtype=np.float64).reshape(6, 2)
    return {"masks": mask, "margins": margins.astype(np.float32)}
