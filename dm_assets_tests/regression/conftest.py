"""Datamodels-shaped regression problems for the solver tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Problem:
    """Masks ``x`` bool ``(n, p)``, targets ``y`` float32 ``(n, t)``, planted ``w`` ``(p, t)``."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def planted_problem(
    *,
    n: int = 3000,
    p: int = 150,
    t: int = 4,
    density: float = 0.05,
    noise: float = 0.5,
    seed: int = 0,
    alpha: float = 0.5,
) -> Problem:
    """Masks with inclusion probability ``alpha``; targets from ``density``-sparse weights plus
    Gaussian noise of ``noise`` times the signal's standard deviation. 70/15/15 split."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, p)) < alpha
    w = np.zeros((p, t))
    k = max(1, round(density * p))
    for j in range(t):
        support = rng.choice(p, k, replace=False)
        w[support, j] = rng.normal(size=k) + np.sign(rng.normal(size=k))
    signal = x @ w
    y = (signal + noise * signal.std(0) * rng.normal(size=signal.shape) + 3.0).astype(np.float32)
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    rows = np.arange(n)
    return Problem(
        x, y, w, rows[:n_train], rows[n_train : n_train + n_val], rows[n_train + n_val :]
    )


def standardize(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x_std, mean, std)`` with the column statistics of ``rows`` (constant columns: std 1)."""
    xf = x.astype(np.float64)
    mean = xf[rows].mean(0)
    std = xf[rows].std(0)
    std[std < 1e-12] = 1.0
    return (xf - mean) / std, mean, std
