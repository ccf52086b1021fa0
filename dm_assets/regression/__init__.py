"""The regression half: the store's completed rows as an FFCV dataset, and LASSO path solvers.

Objective per target ``t`` (``n`` fitting models, ``X_std`` the masks standardized by the
training models' column means and standard deviations)::

    (1 / (2 n)) * ||y_t - X_std w_t - b_t||^2 + lambda_t * ||w_t||_1

Two solvers return the same :class:`~dm_assets.regression.path.LassoPathResult`: ``gram``
(sufficient statistics, exact, the default; ``gram.py`` with ``stats.py`` and ``cd_kernel.py``)
and ``saga`` (the fast_l1 algorithm, streaming; ``saga.py``, its entry points, with its parts in
``saga_rows.py``, ``saga_kernel.py``, ``saga_driver.py`` and ``saga_path.py``). Both read rows
through ``data.py`` (arrays) or ``beton_reader.py`` (the FFCV dataset: ``beton.py``) and share
``path.py`` (the lambda grid, early stopping, the result).
"""
