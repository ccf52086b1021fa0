"""A script written for the seed's worker that never parses the command line itself: it relies on
the worker to fill its fastargs sections (``--trainer.multiple``, ``--trainer.offset``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastargs import Param, Section
from fastargs.decorators import param

Section("trainer").params(
    multiple=Param(int, "multiple", required=True),
    offset=Param(float, "offset", default=0.0),
)


@param("trainer.multiple")
@param("trainer.offset")
def main(*_: Any, index: int, logdir: str, multiple: int, offset: float) -> dict[str, Any]:
    return {"random_numbers": np.ones(256, dtype=np.uint8) * multiple + int(offset)}
