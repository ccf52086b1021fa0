"""Judging fitted datamodels on held-out models: ``metrics`` (predictions; LDS, Pearson, R^2),
``ceiling`` (the noise ceiling), ``curve`` (LDS against models used), ``held_out`` (which models
a fit never saw, their rows, and :func:`~dm_assets.evaluation.held_out.evaluate_fit`, which
writes a fit's evaluation files), ``figures`` (every figure, one implementation each) and
``analysis`` (what the notebooks read)."""
