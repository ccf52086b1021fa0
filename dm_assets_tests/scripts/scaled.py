"""A fast training script whose outputs depend on a pass-through argument, for the lineage tests.

``--case.scale=S`` (fastargs section ``case``, default 1.0) multiplies every output: changing it
changes the training configuration and the rows. Outputs ``masks`` bool ``(4,)`` (from the
index) and ``margins`` float32 ``(1,)`` = ``S * (index + 1)``.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

import numpy as np
from fastargs import Param, Section, get_current_config

Section("case").params(scale=Param(float, "factor on every output", default=1.0))


def main(*_: Any, index: int, logdir: str) -> dict[str, np.ndarray]:
    config = get_current_config()
    parser = ArgumentParser()
    config.augment_argparse(parser)
    config.collect_argparse_args(parser)
    scale = float(config["case.scale"])
    mask = np.array([(index >> bit) & 1 for bit in range(4)], dtype=bool)
    return {"masks": mask, "margins": np.array([scale * (index + 1)], dtype=np.float32)}
