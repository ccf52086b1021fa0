"""A planted-datamodel training script that always fails on the indices given by the
pass-through argument ``--failing.indices=5,7`` (fastargs section ``failing``).

Outputs ``masks`` bool ``(6,)`` and ``margins`` float32 ``(2,)``.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

import numpy as np
from fastargs import Param, Section, get_current_config

Section("failing").params(indices=Param(str, "indices that always fail", default=""))


def main(*_: Any, index: int, logdir: str) -> dict[str, np.ndarray]:
    config = get_current_config()
    parser = ArgumentParser()
    config.augment_argparse(parser)
    config.collect_argparse_args(parser)
    failing = {int(i) for i in str(config["failing.indices"]).split(",") if i}
    if index in failing:
        raise RuntimeError(f"model {index} always fails")
    rng = np.random.default_rng(index)
    mask = rng.random(6) < 0.5
    margins = mask @ np.arange(12, dtype=np.float64).reshape(6, 2)
    return {"masks": mask, "margins": margins.astype(np.float32)}
