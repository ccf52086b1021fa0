"""What every solver shares: the lambda grid, early stopping along the path, and the result.

Shapes: ``p`` features (training examples the masks range over), ``t`` targets, ``k`` lambdas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dm_assets.regression.config import MIN_LAMBDAS, PATIENCE


def lambda_grid(lam_max: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """Each target's ``k`` lambdas, geometric from ``lam_max`` down to ``eps * lam_max``.

    Parameters
    ----------
    lam_max : float tensor, shape (t,)
        Each target's ``lambda_max``, the smallest lambda at which all its weights are zero.
    k : int
        Lambdas per target, at least 1 (``k == 1`` gives ``eps * lam_max`` alone).
    eps : float
        The smallest lambda over ``lam_max``, in ``(0, 1]``.

    Returns
    -------
    float64 tensor, shape (t, k)
        Decreasing along each row, on ``lam_max``'s device.
    """
    if k < 1:
        raise ValueError(f"k (the number of lambdas) must be at least 1; got {k}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps (smallest lambda / lambda_max) must be in (0, 1]; got {eps}")
    if k == 1:
        return (lam_max * eps)[:, None]
    exponents = torch.arange(k, dtype=torch.float64, device=lam_max.device) / (k - 1)
    factors = torch.pow(torch.tensor(eps, dtype=torch.float64, device=lam_max.device), exponents)
    return lam_max.to(torch.float64)[:, None] * factors[None, :]


@dataclass(frozen=True)
class Standardization:
    """Column statistics of the training models' masks: ``x_std = (x - mean) / std``.

    ``mean`` and ``std`` float64 ``(p,)``. A column that never varies across the training
    models (an example in every mask, or in none) has ``std`` set to 1: its weight stays 0.
    """

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_sums(cls, n: int, sum_x: torch.Tensor, sum_x2: torch.Tensor) -> Standardization:
        """The statistics of ``n`` rows from their column sums ``sum_x`` and sums of squares
        ``sum_x2`` (float ``(p,)``)."""
        mean = sum_x.to(torch.float64) / n
        var = (sum_x2.to(torch.float64) / n - mean * mean).clamp_min(0)
        std = var.sqrt()
        # a constant column: relative to the mean's scale so rounding is not taken for variance
        std = torch.where(std > 1e-7 * (1 + mean.abs()), std, torch.ones_like(std))
        return cls(mean=mean, std=std)


@dataclass
class PathTracker:
    """Per-target bookkeeping along the path, and the early-stopping rule.

    A target leaves the path when its validation MSE has not improved on its best for
    ``patience`` consecutive lambdas, once at least ``min_lambdas`` are done, or at the grid's
    end. The chosen lambda is the one with the lowest validation MSE. Tables are ``(t, k)``
    float64 on the CPU, NaN (``nonzeros``: -1) at steps a target never reached.

    The defaults (:data:`MIN_LAMBDAS`, :data:`PATIENCE`) are the reference's rule: ``fast_l1``
    stops a target at the first lambda whose validation MSE is worse, once 10 are done.
    """

    lambdas: torch.Tensor
    min_lambdas: int = MIN_LAMBDAS
    patience: int = PATIENCE
    train_mse: torch.Tensor = field(init=False)
    val_mse: torch.Tensor = field(init=False)
    nonzeros: torch.Tensor = field(init=False)
    active: torch.Tensor = field(init=False)
    best_step: torch.Tensor = field(init=False)
    best_val: torch.Tensor = field(init=False)
    since_best: torch.Tensor = field(init=False)
    steps_done: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.lambdas = self.lambdas.detach().to("cpu", torch.float64)
        t, _ = self.lambdas.shape
        nan = torch.full_like(self.lambdas, float("nan"))
        self.train_mse, self.val_mse = nan.clone(), nan.clone()
        self.nonzeros = torch.full(self.lambdas.shape, -1, dtype=torch.int64)
        self.active = torch.ones(t, dtype=torch.bool)
        self.best_step = torch.zeros(t, dtype=torch.int64)
        self.best_val = torch.full((t,), float("inf"), dtype=torch.float64)
        self.since_best = torch.zeros(t, dtype=torch.int64)
        self.steps_done = torch.zeros(t, dtype=torch.int64)

    @property
    def k(self) -> int:
        return int(self.lambdas.shape[1])

    def record(
        self,
        step: int,
        targets: torch.Tensor,
        train_mse: torch.Tensor,
        val_mse: torch.Tensor,
        nonzeros: torch.Tensor,
    ) -> torch.Tensor:
        """Record one lambda step for some targets; updates :attr:`active`.

        Parameters
        ----------
        step : int
            The index of the lambda on the targets' grids.
        targets : int64 tensor, shape (a,)
            Original target ids.
        train_mse, val_mse : float tensors, shape (a,)
            Each target's mean squared error on the training and validation rows at its
            weights for that lambda.
        nonzeros : int tensor, shape (a,)
            Each target's number of nonzero weights.

        Returns
        -------
        bool tensor, shape (a,)
            Which targets improved their best validation MSE.
        """
        targets = targets.cpu()
        val = val_mse.detach().to("cpu", torch.float64)
        self.train_mse[targets, step] = train_mse.detach().to("cpu", torch.float64)
        self.val_mse[targets, step] = val
        self.nonzeros[targets, step] = nonzeros.detach().to("cpu", torch.int64)
        self.steps_done[targets] = step + 1
        improved = val < self.best_val[targets]
        better = targets[improved]
        self.best_val[better] = val[improved]
        self.best_step[better] = step
        self.since_best[targets] = torch.where(improved, 0, self.since_best[targets] + 1)
        stop = (self.since_best[targets] >= self.patience) & (step + 1 >= self.min_lambdas)
        if step + 1 >= self.k:
            stop[:] = True
        self.active[targets[stop]] = False
        return improved

    @property
    def chosen_lambda(self) -> torch.Tensor:
        """float64 ``(t,)``: each target's validation-selected lambda."""
        return self.lambdas.gather(1, self.best_step[:, None])[:, 0]


@dataclass
class LassoPathResult:
    """Fitted datamodels and the regularization path that chose them.

    ``weight`` float32 ``(p, t)`` and ``bias`` float32 ``(t,)`` act on standardized masks:
    ``((x - mean) / std) @ weight + bias`` predicts each target's output for a mask ``x``.
    ``lam`` is each target's chosen lambda, ``lam_max`` the smallest lambda at which all its
    weights are zero. ``lambdas``, ``train_mse``, ``val_mse`` and ``nonzeros`` are ``(t, k)``
    tables of the path (NaN / -1 where a target stopped early); ``best_step`` indexes the chosen
    lambda. ``refit`` says whether ``weight`` was refitted on train + validation models.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    lam: torch.Tensor
    lam_max: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    lambdas: torch.Tensor
    train_mse: torch.Tensor
    val_mse: torch.Tensor
    nonzeros: torch.Tensor
    best_step: torch.Tensor
    n_train: int
    n_val: int
    solver: str
    refit: bool
    seconds: float = 0.0
    info: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_tracker(
        cls,
        tracker: PathTracker,
        *,
        weight: torch.Tensor,
        bias: torch.Tensor,
        lam_max: torch.Tensor,
        standardization: Standardization,
        n_train: int,
        n_val: int,
        solver: str,
        refit: bool,
    ) -> LassoPathResult:
        """The result of a path walked with ``tracker``: its tables and chosen lambdas, and the
        keyword arguments as the fields of the same names (tensors float32 on the CPU)."""
        return cls(
            weight=weight.detach().to("cpu", torch.float32),
            bias=bias.detach().to("cpu", torch.float32),
            lam=tracker.chosen_lambda.to(torch.float32),
            lam_max=lam_max.detach().to("cpu", torch.float32),
            mean=standardization.mean.detach().to("cpu", torch.float32),
            std=standardization.std.detach().to("cpu", torch.float32),
            lambdas=tracker.lambdas,
            train_mse=tracker.train_mse,
            val_mse=tracker.val_mse,
            nonzeros=tracker.nonzeros,
            best_step=tracker.best_step.clone(),
            n_train=n_train,
            n_val=n_val,
            solver=solver,
            refit=refit,
        )

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.weight.shape[1])

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Predicted outputs float32 ``(n, t)`` for masks ``x`` ``(n, p)`` (0/1 or bool)."""
        xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        xs = (xt.to(torch.float32) - self.mean) / self.std
        return xs @ self.weight + self.bias

    def seed_dict(self) -> dict[str, torch.Tensor]:
        """What ``datamodels.pt`` holds: the seed's ``weight``, ``bias``, ``lam``, plus the
        ``mean``, ``std`` that ``weight`` expects and each target's ``lam_max``."""
        return {
            "weight": self.weight,
            "bias": self.bias,
            "lam": self.lam,
            "lam_max": self.lam_max,
            "mean": self.mean,
            "std": self.std,
        }
