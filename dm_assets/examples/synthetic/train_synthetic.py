"""A training script whose "model" is a planted linear datamodel, for demos and tests.

Model ``i`` trains on mask ``m_i`` (each of ``P`` training examples with probability 1/2,
derived from the index, so a rerun reproduces it) and outputs ``margins = m_i @ W + noise`` on
``T`` targets, ``W`` 10%-sparse and fixed (:func:`planted_weights`). Datamodels fitted on these
rows should recover ``W`` (on the raw masks: ``weight / std``).

Outputs: ``masks`` bool ``(P,)`` and ``margins`` float16 ``(T,)``, as in ``spec.json``.
"""

from __future__ import annotations

import numpy as np

P, T, NUM_MODELS = 60, 4, 1500
NOISE = 0.5


def spec() -> dict:
    """The spec of ``spec.json``, as a dict."""
    return {
        "num_models": NUM_MODELS,
        "schema": {
            "masks": {"shape": [P], "dtype": "bool_"},
            "margins": {"shape": [T], "dtype": "float16"},
        },
    }


def planted_weights() -> np.ndarray:
    """The true datamodels: float64 ``(P, T)``, ``P // 10`` nonzero weights per target."""
    rng = np.random.default_rng(1234)
    w = np.zeros((P, T))
    for j in range(T):
        support = rng.choice(P, P // 10, replace=False)
        w[support, j] = rng.normal(size=P // 10) + 2 * np.sign(rng.normal(size=P // 10))
    return w


def main(index: int, logdir: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    mask = rng.random(P) < 0.5
    margins = mask @ planted_weights() + NOISE * rng.normal(size=T)
    return {"masks": mask, "margins": margins.astype(np.float16)}
