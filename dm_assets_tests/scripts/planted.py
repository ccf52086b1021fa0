"""A training script whose "model" is a planted linear datamodel, for the end-to-end tests.

Model ``i`` trains on mask ``m_i`` (each of ``P`` examples with probability 1/2, derived from the
index) and outputs ``margins = m_i @ W + noise`` on ``T`` targets, ``W`` 10%-sparse and fixed.
"""

from __future__ import annotations

import numpy as np

P, T, NUM_MODELS = 60, 4, 1500


def spec() -> dict:
    return {
        "num_models": NUM_MODELS,
        "schema": {
            "masks": {"shape": [P], "dtype": "bool_"},
            "margins": {"shape": [T], "dtype": "float16"},
        },
    }


def planted_weights() -> np.ndarray:
    rng = np.random.default_rng(1234)
    w = np.zeros((P, T))
    for j in range(T):
        support = rng.choice(P, P // 10, replace=False)
        w[support, j] = rng.normal(size=P // 10) + 2 * np.sign(rng.normal(size=P // 10))
    return w


def main(index: int, logdir: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    mask = rng.random(P) < 0.5
    margins = mask @ planted_weights() + 0.5 * rng.normal(size=T)
    return {"masks": mask, "margins": margins.astype(np.float16)}
