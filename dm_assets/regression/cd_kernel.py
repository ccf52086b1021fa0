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
    """The duality gap of ``w`` (``p,``) with ``r = c - G w`` kept current (module doc): the
    working-set gap over every feature."""
    return _ws_gap(w, r, c, w.shape[0], yy, lam, 0.0)


@numba.njit(cache=True, nogil=True)
def _mse(w: np.ndarray, r: np.ndarray, c: np.ndarray, yy: float) -> float:
    """``||y - X w||^2 / n = yy - w.c - w.r`` (with ``r = c - G w``)."""
    total = yy
    for i in range(w.shape[0]):
        total -= w[i] * (c[i] + r[i])
    return max(total, 0.0)


@numba.njit(cache=True, nogil=True)
def _update(g: np.ndarray, w: np.ndarray, r: np.ndarray, i: int, lam: float, n: int) -> float:
    """Exact minimization over coordinate ``i`` of the first ``n`` coordinates (``n`` below the
    arrays' length: a working set in arrays of larger capacity); returns the weight's change."""
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
        for j in range(n):
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
            _update(g, w, r, i, lam, p)
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
                change = abs(_update(g, w, r, i, lam, p)) * np.sqrt(g[i, i])
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


# --- working sets: coordinate descent on a compact Gram matrix, with KKT checks
#
# Per target the solver keeps a working set ``W`` of features (every nonzero weight, every
# feature a KKT check admitted) and a compact copy ``G[W, W]`` of the Gram
# matrix, so a coordinate update costs ``|W|`` instead of ``p`` and touches a matrix that
# stays in cache. The full residual gradient ``r = c - G w`` is brought up to date only at a
# KKT check: ``O(p)`` per weight that changed since the last one. A feature outside ``W``
# whose ``|r_j|`` exceeds ``lam`` violates the optimality conditions and is admitted; the
# solve ends when none does and the duality gap (the same one as the full solver's, with
# ``max |r|`` over all ``p``) is at most ``tol * yy``. Along a path, each new lambda starts by
# admitting the features that violate its KKT conditions at the previous lambda's solution
# (``|r_j| > lam``). The sequential strong rule (Tibshirani et al., 2012), which also admits
# ``|r_j| >= 2 lam - lam_prev``, saves KKT rounds but admits features that stay at zero: late
# on the benchmark's paths the working sets were 40-80% larger than the nonzeros, and the
# paths took 12% longer (4% on digits) than with KKT admission alone. ``strong`` keeps the
# threshold a parameter. The working set only grows along a path (its compact matrix is
# reused from one lambda to the next) and starts from the warm start's nonzeros.


@numba.njit(cache=True, nogil=True)
def _dot(x: np.ndarray, y: np.ndarray, n: int) -> float:
    """``x[:n] . y[:n]`` in float64 (``x`` float32 or float64) with four partial sums, so the
    loop pipelines without reassociating one running sum."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    n4 = n - n % 4
    for e in range(0, n4, 4):
        s0 += np.float64(x[e]) * y[e]
        s1 += np.float64(x[e + 1]) * y[e + 1]
        s2 += np.float64(x[e + 2]) * y[e + 2]
        s3 += np.float64(x[e + 3]) * y[e + 3]
    for e in range(n4, n):
        s0 += np.float64(x[e]) * y[e]
    return (s0 + s1) + (s2 + s3)


# elements added to each row of a compact matrix: rows whose length is a power of two map to
# the same cache sets, and the tiled copy in _fill_block then misses on every write
ROW_PAD = 16


@numba.njit(cache=True, nogil=True)
def _compact(cap: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialized ``cap x cap`` compact matrix (rows padded by :data:`ROW_PAD`;
    ``(0, 0)`` for ``cap`` 0)."""
    if cap == 0:
        return np.empty((0, 0), dtype=dtype)
    return np.empty((cap, cap + ROW_PAD), dtype=dtype)


@numba.njit(cache=True, nogil=True)
def _fill_block(src: np.ndarray, dst: np.ndarray, ws: np.ndarray, size: int, m: int) -> None:
    """``dst[W, W] = src[W, W]`` for the working set ``ws[:size + m]`` whose first ``size``
    rows and columns are already there: the ``m`` new rows gathered from ``src``'s rows (each
    row of ``src`` read once, in order), then the new columns of the old rows copied from
    them (``src`` is symmetric) in tiles of rows that stay in cache (rows padded by
    :data:`ROW_PAD`, so a tile's rows do not compete for the same cache sets). Writing the
    new columns straight from ``src`` instead costs a cache miss per entry, and was most of
    the path's time."""
    total = size + m
    buf = np.empty(src.shape[1], dtype=src.dtype)
    for b in range(size, total):
        # the row copied in order first (the hardware prefetches it), then gathered from
        # cache: gathering straight from memory in working-set order took twice as long
        srow = src[ws[b]]
        for e in range(srow.shape[0]):
            buf[e] = srow[e]
        drow = dst[b]
        for e in range(total):
            drow[e] = buf[ws[e]]
    tile = 32
    for b0 in range(0, size, tile):
        b1 = min(b0 + tile, size)
        for e in range(size, total):
            erow = dst[e]
            for b in range(b0, b1):
                dst[b, e] = erow[b]


@numba.njit(cache=True, nogil=True)
def _admit_many(
    g: np.ndarray,
    vg: np.ndarray,
    new: np.ndarray,
    m: int,
    ws: np.ndarray,
    size: int,
    ws_g: np.ndarray,
    ws_vg: np.ndarray,
    in_ws: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Append the features ``new[:m]`` to the working set ``ws[:size]`` at once: their rows
    and columns of ``G[W, W]`` (and of the validation matrix ``vg[W, W]`` when ``vg`` has
    rows), the compact matrices grown (at least doubled) when full. Returns them and the new
    size."""
    if m == 0:
        return ws_g, ws_vg, size
    with_val = vg.shape[0] > 0
    total = size + m
    if total > ws_g.shape[0]:
        new_cap = min(max(2 * ws_g.shape[0], total, 16), g.shape[0])
        grown = _compact(new_cap, ws_g.dtype)
        grown[:size, :size] = ws_g[:size, :size]
        ws_g = grown
        if with_val:
            grown_v = _compact(new_cap, ws_vg.dtype)
            grown_v[:size, :size] = ws_vg[:size, :size]
            ws_vg = grown_v
    for x in range(m):
        ws[size + x] = new[x]
        in_ws[new[x]] = True
    _fill_block(g, ws_g, ws, size, m)
    if with_val:
        _fill_block(vg, ws_vg, ws, size, m)
    return ws_g, ws_vg, total


@numba.njit(cache=True, nogil=True)
def _ws_gap(
    w: np.ndarray, r: np.ndarray, c: np.ndarray, size: int, yy: float, lam: float, rmax: float
) -> float:
    """The duality gap (module doc) from the working set's ``w``, ``r``, ``c`` (first ``size``
    entries); ``rmax`` is a lower bound of ``max |r|`` from outside the set (0 for none)."""
    wc = 0.0
    wr = 0.0
    l1 = 0.0
    for a in range(size):
        wc += w[a] * c[a]
        wr += w[a] * r[a]
        l1 += abs(w[a])
        if abs(r[a]) > rmax:
            rmax = abs(r[a])
    mse = max(yy - wc - wr, 0.0)
    s = 1.0 if rmax <= lam else lam / rmax
    return max(0.5 * (1.0 + s * s) * mse + lam * l1 - s * (yy - wc), 0.0)


@numba.njit(cache=True, nogil=True)
def _enter(
    g: np.ndarray,
    vg: np.ndarray,
    c: np.ndarray,
    r: np.ndarray,
    new: np.ndarray,
    m: int,
    ws: np.ndarray,
    size: int,
    ws_g: np.ndarray,
    ws_vg: np.ndarray,
    in_ws: np.ndarray,
    w_ws: np.ndarray,
    w_synced: np.ndarray,
    r_ws: np.ndarray,
    c_ws: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`_admit_many` of ``new[:m]`` at weight 0, their ``r`` and ``c`` copied into the
    working set's."""
    old = size
    ws_g, ws_vg, size = _admit_many(g, vg, new, m, ws, size, ws_g, ws_vg, in_ws)
    for b in range(old, size):
        w_ws[b] = 0.0
        w_synced[b] = 0.0
        r_ws[b] = r[ws[b]]
        c_ws[b] = c[ws[b]]
    return ws_g, ws_vg, size


@numba.njit(cache=True, nogil=True)
def _solve_working_set(
    g: np.ndarray,
    vg: np.ndarray,
    c: np.ndarray,
    yy: float,
    lam: float,
    strong: float,
    ws: np.ndarray,
    size: int,
    ws_g: np.ndarray,
    ws_vg: np.ndarray,
    in_ws: np.ndarray,
    r: np.ndarray,
    w_ws: np.ndarray,
    r_ws: np.ndarray,
    c_ws: np.ndarray,
    w_synced: np.ndarray,
    pending: np.ndarray,
    tol: float,
    max_sweeps: int,
) -> tuple[np.ndarray, np.ndarray, int, bool, int]:
    """One target at one ``lam``, from the state left by the previous one (comment above).

    ``r`` ``(p,)`` is ``c - G w`` for the weights ``w_synced``; ``w_ws``, ``r_ws``, ``c_ws``
    are the working set's weights, residual gradient and ``c``; ``pending`` ``(p,)`` is
    scratch. Features with ``|r_j| >= strong`` are admitted first. Returns the compact
    matrices, the working set's size, whether the gap reached ``tol * yy``, and the sweeps over
    the working set.
    """
    p = g.shape[0]
    target = tol * max(yy, 1e-30)
    m = 0
    for j in range(p):
        if not in_ws[j] and abs(r[j]) >= strong:
            pending[m] = j
            m += 1
    ws_g, ws_vg, size = _enter(
        g, vg, c, r, pending, m, ws, size, ws_g, ws_vg, in_ws, w_ws, w_synced, r_ws, c_ws
    )
    sweeps = 0
    converged = False
    while True:
        while sweeps < max_sweeps:
            for a in range(size):
                _update(ws_g, w_ws, r_ws, a, lam, size)
            sweeps += 1
            if _ws_gap(w_ws, r_ws, c_ws, size, yy, lam, 0.0) <= target:
                break
        # the full residual gradient from the weights that changed since the last check
        for a in range(size):
            dw = w_ws[a] - w_synced[a]
            if dw != 0.0:
                row = g[ws[a]]
                for j in range(p):
                    r[j] -= dw * row[j]
                w_synced[a] = w_ws[a]
        for a in range(size):
            r_ws[a] = r[ws[a]]
        # KKT: a feature outside the working set must have |r_j| <= lam
        m = 0
        outside_max = 0.0
        for j in range(p):
            if not in_ws[j]:
                if abs(r[j]) > lam:
                    pending[m] = j
                    m += 1
                elif abs(r[j]) > outside_max:
                    outside_max = abs(r[j])
        violated = m > 0
        ws_g, ws_vg, size = _enter(
            g, vg, c, r, pending, m, ws, size, ws_g, ws_vg, in_ws, w_ws, w_synced, r_ws, c_ws
        )
        if not violated and _ws_gap(w_ws, r_ws, c_ws, size, yy, lam, outside_max) <= target:
            converged = True
            break
        if sweeps >= max_sweeps:
            break
    return ws_g, ws_vg, size, converged, sweeps


@numba.njit(cache=True, nogil=True)
def _start_state(
    g: np.ndarray, vg: np.ndarray, c: np.ndarray, w0: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    """A working set holding ``w0``'s nonzeros: ``(ws, ws_g, ws_vg, size, in_ws, r, w_ws)``
    with ``r = c - G w0``; ``w_ws`` is also the synced copy's starting value."""
    p = g.shape[0]
    ws = np.empty(p, dtype=np.int64)
    in_ws = np.zeros(p, dtype=np.bool_)
    ws_g = _compact(min(p, 64), g.dtype)
    ws_vg = _compact(min(p, 64) if vg.shape[0] > 0 else 0, vg.dtype)
    r = c.copy()
    w_ws = np.zeros(p)
    nonzero = np.nonzero(w0)[0]
    ws_g, ws_vg, size = _admit_many(g, vg, nonzero, nonzero.shape[0], ws, 0, ws_g, ws_vg, in_ws)
    for b in range(size):
        j = ws[b]
        w_ws[b] = w0[j]
        row = g[j]
        for i in range(p):
            r[i] -= w0[j] * row[i]
    return ws, ws_g, ws_vg, size, in_ws, r, w_ws


@numba.njit(parallel=True, cache=True)
def solve_columns_screened(
    g: np.ndarray,
    c: np.ndarray,
    yy: np.ndarray,
    lam: np.ndarray,
    w: np.ndarray,
    tol: float,
    max_sweeps: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`solve_columns` with working sets and KKT checks (comment above): the same
    problem, arguments, results and convergence test; the working set starts from each
    column's warm-start nonzeros (no strong rule: there is no previous lambda)."""
    a = c.shape[1]
    converged = np.zeros(a, dtype=np.bool_)
    sweeps = np.zeros(a, dtype=np.int64)
    mse = np.zeros(a)
    no_val = np.empty((0, 0))
    for k in numba.prange(a):
        ck = np.ascontiguousarray(c[:, k])
        ws, ws_g, ws_vg, size, in_ws, r, w_ws = _start_state(g, no_val, ck, w[k])
        p = g.shape[0]
        w_synced = w_ws.copy()
        r_ws = np.empty(p)
        c_ws = np.empty(p)
        for b in range(size):
            r_ws[b] = r[ws[b]]
            c_ws[b] = ck[ws[b]]
        ws_g, ws_vg, size, ok, n = _solve_working_set(
            g, no_val, ck, yy[k], lam[k], np.inf, ws, size, ws_g, ws_vg, in_ws, r, w_ws,
            r_ws, c_ws, w_synced, np.empty(p, dtype=np.int64), tol, max_sweeps,
        )  # fmt: skip
        w[k, :] = 0.0
        total = yy[k]
        for b in range(size):
            w[k, ws[b]] = w_ws[b]
            total -= w_ws[b] * (c_ws[b] + r_ws[b])
        converged[k] = ok
        sweeps[k] = n
        mse[k] = max(total, 0.0)
    return converged, sweeps, mse


@numba.njit(parallel=True, cache=True)
def solve_paths(
    g: np.ndarray,
    c: np.ndarray,
    yy: np.ndarray,
    lambdas: np.ndarray,
    intercept_x: np.ndarray,
    intercept_y: np.ndarray,
    val_xtx: np.ndarray,
    val_xty: np.ndarray,
    val_sum_x: np.ndarray,
    val_sum_y: np.ndarray,
    val_sum_y2: np.ndarray,
    val_n: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    min_lambdas: int,
    patience: int,
    tol: float,
    max_sweeps: int,
    n_workers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every target's whole lambda path with working sets, scored on validation sums.

    Per target and lambda ``lam_s`` of its row of ``lambdas``, the weights ``w`` minimize
    ``(1/2) w^T G w - c^T w + lam_s ||w||_1`` (duality gap at most ``tol * yy``), warm-started
    from the previous lambda, its KKT violators admitted first. The intercept is
    ``b = intercept_y - intercept_x . w``, and the validation MSE of ``u = w * inv_std`` (the
    weights on raw masks) and ``o = b - mean . u`` is, from the raw validation sums,
    ``(sum_y2 - 2 u.xty - 2 o sum_y + u^T X^T X u + 2 o sum_x.u + n o^2) / n``. A target stops
    when its validation MSE has not improved for ``patience`` lambdas once ``min_lambdas``
    are done (the rule of :class:`~dm_assets.regression.path.PathTracker`), or at the end.
    Targets run in parallel threads, each thread taking every ``n``-th target with one set of
    buffers.

    Parameters
    ----------
    g : float32 or float64 array, shape (p, p)
        ``X_std^T X_std / n`` centered on the training rows, C-ordered. Its working-set
        copies have its dtype; the weights, gradients and sums are float64 whatever it is
        (``fit_gram`` passes float32: half the memory traffic, rounding ``G`` by at most
        ``2^-24`` relatively).
    c : float64 array, shape (a, p)
        ``X_std^T (y - y_bar) / n`` per target, one a row.
    yy : float64 array, shape (a,)
        ``||y - y_bar||^2 / n`` per target.
    lambdas : float64 array, shape (a, k)
        Each target's decreasing grid.
    intercept_x, intercept_y : float64 arrays, shapes (p,) and (a,)
        The intercept's ``x_bar_std`` and ``y_bar`` (zeros without an intercept).
    val_xtx, val_xty, val_sum_x, val_sum_y, val_sum_y2, val_n
        The validation rows' raw sums: ``X^T X`` ``(p, p)`` (float32 or float64: mask counts
        below ``2^24`` are exact in float32), ``X^T y`` ``(a, p)`` (one target a row),
        ``X^T 1`` ``(p,)``, ``y^T 1`` and ``y^T y`` ``(a,)``, and their number.
    mean, inv_std : float64 arrays, shape (p,)
        The standardization: ``x_std = (x - mean) * inv_std``.
    min_lambdas, patience : int
        The early-stopping rule.
    tol, max_sweeps : float, int
        Convergence per lambda: gap at most ``tol * yy``, at most ``max_sweeps`` sweeps.
    n_workers : int
        Threads to run (at most one per target; ``numba.get_num_threads()`` for all). A
        parameter because a compiled function that asks numba for its thread count cannot
        be cached on disk.

    Returns
    -------
    best : float64 array, shape (a, p)
        Each target's weights at its best validation step.
    train_mse, val_mse : float64 arrays, shape (a, k)
        Per step (NaN after the target stopped).
    nonzeros, sweeps : int64 arrays, shape (a, k)
        Per step (-1 and 0 after the target stopped).
    converged : bool array, shape (a, k)
        Per step (True after the target stopped).
    """
    n_workers = max(1, min(n_workers, c.shape[0]))
    a, p = c.shape
    k = lambdas.shape[1]
    best = np.zeros((a, p))
    train_mse = np.full((a, k), np.nan)
    val_mse = np.full((a, k), np.nan)
    nonzeros = np.full((a, k), -1, dtype=np.int64)
    sweeps = np.zeros((a, k), dtype=np.int64)
    converged = np.ones((a, k), dtype=np.bool_)
    for worker in numba.prange(n_workers):
        # one set of buffers per worker, reused from target to target: the compact matrices
        # grow to the largest working set once instead of being allocated, and their fresh
        # pages faulted in, for every target (page faults were a third of the path's time);
        # each target starts from an empty working set, r = c
        ws, ws_g, ws_vg, size, in_ws, r, w_ws = _start_state(g, val_xtx, c[worker], np.zeros(p))
        pending = np.empty(p, dtype=np.int64)
        w_synced = np.zeros(p)
        r_ws = np.empty(p)
        c_ws = np.empty(p)
        u = np.empty(p)
        for t in range(worker, a, n_workers):
            ct = c[t]
            size = 0
            in_ws[:] = False
            r[:] = ct
            best_val = np.inf
            since_best = 0
            for s in range(k):
                lam = lambdas[t, s]
                strong = lam  # KKT admission only (comment above)
                ws_g, ws_vg, size, ok, n = _solve_working_set(
                    g, val_xtx, ct, yy[t], lam, strong, ws, size, ws_g, ws_vg, in_ws, r, w_ws,
                    r_ws, c_ws, w_synced, pending, tol, max_sweeps,
                )  # fmt: skip
                converged[t, s] = ok
                sweeps[t, s] = n
                # training MSE, intercept, and the validation MSE from the sums
                fit = yy[t]
                bias = intercept_y[t]
                offset = 0.0
                uxty = 0.0
                usum = 0.0
                nnz = 0
                for b in range(size):
                    j = ws[b]
                    wb = w_ws[b]
                    fit -= wb * (c_ws[b] + r_ws[b])
                    bias -= intercept_x[j] * wb
                    u[b] = wb * inv_std[j]
                    offset -= mean[j] * u[b]
                    uxty += u[b] * val_xty[t, j]
                    usum += u[b] * val_sum_x[j]
                    if wb != 0.0:
                        nnz += 1
                offset += bias
                quad = 0.0
                for b in range(size):
                    if u[b] != 0.0:
                        quad += u[b] * _dot(ws_vg[b], u, size)
                total = (
                    val_sum_y2[t]
                    - 2.0 * uxty
                    - 2.0 * offset * val_sum_y[t]
                    + quad
                    + 2.0 * offset * usum
                    + val_n * offset * offset
                )
                vm = max(total / val_n, 0.0)
                train_mse[t, s] = max(fit, 0.0)
                val_mse[t, s] = vm
                nonzeros[t, s] = nnz
                if vm < best_val:
                    best_val = vm
                    since_best = 0
                    best[t, :] = 0.0
                    for b in range(size):
                        best[t, ws[b]] = w_ws[b]
                else:
                    since_best += 1
                if since_best >= patience and s + 1 >= min_lambdas:
                    break
    return best, train_mse, val_mse, nonzeros, sweeps, converged
