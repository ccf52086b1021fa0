"""A training script whose models take ``$SLEEPY_SECONDS`` (default 0.5) each; it records the
pid of the process that trained each model in ``<logdir>/pid``.

Outputs ``masks`` bool ``(4,)`` and ``margins`` float32 ``(1,)``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def main(index: int, logdir: str) -> dict[str, np.ndarray]:
    Path(logdir, "pid").write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("SLEEPY_SECONDS", "0.5")))
    mask = np.array([index & 1, index & 2, index & 4, index & 8], dtype=bool)
    return {"masks": mask, "margins": np.array([index], dtype=np.float32)}
