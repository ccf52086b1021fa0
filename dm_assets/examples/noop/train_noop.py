"""A training script that does no work, for measuring orchestration overhead.

``main(index, logdir)`` returns ``{"masks": bool (P,), "margins": float16 (T,)}`` derived from
the index at once; ``P`` and ``T`` come from the store the worker writes to (any spec with those
two keys works: see ``spec.json``).
"""

from __future__ import annotations

import numpy as np

P, T = 16, 2


def main(index: int, logdir: str) -> dict[str, np.ndarray]:
    bits = np.unpackbits(np.array([index & 0xFF, (index >> 8) & 0xFF], dtype=np.uint8))
    return {"masks": bits.astype(bool)[:P], "margins": np.full(T, index % 7, dtype=np.float16)}
