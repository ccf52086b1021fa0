"""Judging fitted datamodels on held-out models: LDS, Pearson, R^2, the noise ceiling, the LDS
curve, their figures, and the analysis helpers the notebook uses."""
