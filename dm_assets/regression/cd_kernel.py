"""Compiled coordinate descent on Gram statistics, the CPU engine of the ``gram`` solver.

FISTA (:func:`dm_assets.regression.gram.solve_fixed_lambda`) costs a dense ``p x p x t``
product per iteration, which is what a GPU is for. On a CPU, coordinate descent with covariance
updates touches only what changes: updating weight ``i`` of a target costs one column of ``G``,
and sweeps mostly run over the target's few nonzero weights (an active set), with a full sweep
to admit new ones. Every target is independent, so targets run in parallel threads.

Per target, with ``r = c - G w`` (the negative gradient) kept current, the duality gap costs
``O(p)``: ``mse = yy - w.c - w.r``, ``s = min(1, lam / max|r|)``,
``gap = (1 + s^2) mse / 2 + lam |w|_1 - s (yy - w.c)``.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _gap(w: np.ndarray, r: np.ndarray, c: np.ndarray, yy: float, lam: float) -> float:
    """The duality gap of ``w`` (``p,``) with ``r = c - G w`` kept current (module doc)."""
    wc = 0.0
    wr = 0.0
    l1 = 0.0
    rmax = 0.0
    for i in range(w.shape[0]):
        wc += w[i] * c[i]
        wr += w[i] * r[i]
        l1 += abs(w[i])
        if abs(r[i]) > rmax:
            rmax = abs(r[i])
    mse = max(yy - wc - wr, 0.0)
    s = 1.0 if rmax <= lam else lam / rmax
    return max(0.5 * (1.0 + s * s) * mse + lam * l1 - s * (yy - wc), 0.0)


@numba.njit(cache=True, nogil=True)
def _mse(w: np.ndarray, r: np.ndarray, c: np.ndarray, yy: float) -> float:
    """``||y - X w||^2 / n = yy - w.c - w.r`` (with ``r = c - G w``)."""
    total = yy
    for i in range(w.shape[0]):
        total -= w[i] * (c[i] + r[i])
    return max(total, 0.0)


@numba.njit(cache=True, nogil=True)
def _update(g: np.ndarray, w: np.ndarray, r: np.ndarray, i: int, lam: float) -> float:
    """Exact minimization over coordinate ``i``; returns the weight's change."""
    gii = g[i, i]
    if gii <= 0.0:
        return 0.0
    old = w[i]
    z = r[i] + gii * old
    if z > lam:
        new = (z - lam) / gii
    elif z < -lam:
        new = (z + lam) / gii
    else:
        new = 0.0
    delta = new - old
    if delta != 0.0:
        w[i] = new
        col = g[i]  # G is symmetric: row i is column i, and contiguous
        for j in range(r.shape[0]):
            r[j] -= delta * col[j]
    return delta


@numba.njit(cache=True, nogil=True)
def _solve_one(
    g: np.ndarray,
    c: np.ndarray,
    yy: float,
    lam: float,
    w: np.ndarray,
    tol: float,
    max_sweeps: int,
) -> tuple[bool, int, float]:
    """One target, ``w`` ``(p,)`` in place: full sweeps to admit new weights, each followed
    by sweeps over the nonzero weights until they settle, until the gap is at most
    ``tol * yy`` or ``max_sweeps`` ran. Returns ``(converged, sweeps, training MSE)``."""
    p = w.shape[0]
    r = c.copy()
    for i in range(p):
        if w[i] != 0.0:
            col = g[i]
            for j in range(p):
                r[j] -= w[i] * col[j]
    target = tol * max(yy, 1e-30)
    active = np.empty(p, dtype=np.int64)
    sweeps = 0
    while sweeps < max_sweeps:
        # a full sweep admits new weights
        n_active = 0
        for i in range(p):
            _update(g, w, r, i, lam)
            if w[i] != 0.0:
                active[n_active] = i
                n_active += 1
        sweeps += 1
        if _gap(w, r, c, yy, lam) <= target:
            return True, sweeps, _mse(w, r, c, yy)
        # then sweeps over the active set until its weights settle
        for _ in range(1000):
            if sweeps >= max_sweeps:
                break
            biggest = 0.0
            for a in range(n_active):
                i = active[a]
                change = abs(_update(g, w, r, i, lam)) * np.sqrt(g[i, i])
                if change > biggest:
                    biggest = change
            sweeps += 1
            if biggest * biggest <= 0.1 * target:
                break
        if _gap(w, r, c, yy, lam) <= target:
            return True, sweeps, _mse(w, r, c, yy)
    return False, sweeps, _mse(w, r, c, yy)


@numba.njit(parallel=True, cache=True)
def solve_columns(
    g: np.ndarray,
    c: np.ndarray,
    yy: np.ndarray,
    lam: np.ndarray,
    w: np.ndarray,
    tol: float,
    max_sweeps: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve ``min_w (1/2) w^T G w - c^T w + lam ||w||_1`` for every column, in place.

    Per column this is ``(1/(2n)) ||y - X_std w - b||^2 + lam ||w||_1`` at the best intercept.
    Columns run in parallel threads.

    Parameters
    ----------
    g : float64 array, shape (p, p)
        ``X_std^T X_std / n``, C-ordered and symmetric.
    c : float64 array, shape (p, a)
        ``X_std^T (y - y_bar) / n`` per column.
    yy : float64 array, shape (a,)
        ``||y - y_bar||^2 / n`` per column.
    lam : float64 array, shape (a,)
        Each column's lambda.
    w : float64 array, shape (a, p)
        C-ordered, one target a row: the warm start, overwritten with the solutions.
    tol : float
        A column has converged when its duality gap is at most ``tol * yy``.
    max_sweeps : int
        Coordinate sweeps per column before giving up.

    Returns
    -------
    converged : bool array, shape (a,)
        Which columns met ``tol``.
    sweeps : int64 array, shape (a,)
        Sweeps run per column.
    mse : float64 array, shape (a,)
        The training mean squared error ``||y - X_std w - b||^2 / n`` of each column.
    """
    a = c.shape[1]
    converged = np.zeros(a, dtype=np.bool_)
    sweeps = np.zeros(a, dtype=np.int64)
    mse = np.zeros(a)
    for k in numba.prange(a):
        ok, n, m = _solve_one(
            g, np.ascontiguousarray(c[:, k]), yy[k], lam[k], w[k], tol, max_sweeps
        )
        converged[k] = ok
        sweeps[k] = n
        mse[k] = m
    return converged, sweeps, mse


@numba.njit(parallel=True, cache=True)
def sparse_quadratic_forms(m: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``w_k^T M w_k`` for every row ``w_k`` of ``w`` ``(a, p)``, over its nonzeros only."""
    a = w.shape[0]
    out = np.zeros(a)
    for k in numba.prange(a):
        nz = np.nonzero(w[k])[0]
        total = 0.0
        for x in range(nz.shape[0]):
            i = nz[x]
            row = 0.0
            for y in range(nz.shape[0]):
                row += m[i, nz[y]] * w[k, nz[y]]
            total += w[k, i] * row
        out[k] = total
    return out
