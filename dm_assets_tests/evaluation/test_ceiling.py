"""The noise ceiling against its analytic value and Monte Carlo simulation; groups of identical
masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from dm_assets.evaluation.ceiling import estimate_noise_ceiling, group_identical_masks
from dm_assets.evaluation.metrics import evaluate


def spearman_ceiling(rho: float) -> float:
    """Spearman(s, s + e) for Gaussian s, e with reliability rho = var s / (var s + var e)."""
    return 6 / math.pi * math.asin(math.sqrt(rho) / 2)


def test_group_identical_masks_numbers_by_first_appearance() -> None:
    rng = np.random.default_rng(8)
    distinct = rng.random((5, 19)) < 0.5
    order = np.array([3, 0, 3, 1, 4, 0, 2, 3])
    groups = group_identical_masks(distinct[order])
    np.testing.assert_array_equal(groups, [0, 1, 0, 2, 3, 1, 4, 0])
    np.testing.assert_array_equal(group_identical_masks(distinct[order].astype(np.uint8)), groups)
    with pytest.raises(ValueError, match=r"masks must be \(n, p\)"):
        group_identical_masks(distinct[0])


def gaussian_replicates(
    rho: float, sizes: np.ndarray, t: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(signal, outputs, groups)``: per group a signal s ~ N(0, rho), per model output
    s + e with e ~ N(0, 1 - rho); ``sizes`` models per group; t independent targets."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    signal = (rng.normal(size=(len(sizes), t)) * math.sqrt(rho))[groups]
    outputs = signal + rng.normal(size=signal.shape) * math.sqrt(1 - rho)
    return signal, outputs, groups


def test_analytic_spearman_ceiling_matches_monte_carlo() -> None:
    rng = np.random.default_rng(9)
    for rho in (0.2, 0.6, 0.9):
        s = rng.normal(size=200_000) * math.sqrt(rho)
        y = s + rng.normal(size=s.size) * math.sqrt(1 - rho)
        simulated = scipy.stats.spearmanr(s, y)[0]
        # standard error of a Spearman correlation at n = 2e5 is below 0.0025
        assert simulated == pytest.approx(spearman_ceiling(rho), abs=0.005)


@pytest.mark.parametrize("rho", [0.2, 0.6, 0.9])
@pytest.mark.parametrize("design", ["pairs", "mixed"])
def test_noise_ceiling_recovers_the_analytic_value(rho: float, design: str) -> None:
    rng = np.random.default_rng(10)
    # pairs, or unequal groups with singletons
    sizes = np.full(1000, 2) if design == "pairs" else rng.choice([1, 2, 3, 5], size=700)
    signal, outputs, groups = gaussian_replicates(rho, sizes, t=100, seed=int(rho * 10))
    result = evaluate(signal, outputs, groups=groups)
    ceiling = result.ceiling
    assert ceiling is not None
    assert ceiling.n_groups == len(sizes)
    assert ceiling.n_replicated_groups == int((sizes >= 2).sum())
    assert ceiling.n_replicated_models == int(sizes[sizes >= 2].sum())
    # per target the estimate's sd is at most ~0.04 (rho = 0.2, pairs); the mean over 100
    # independent targets has sd <= 0.004, and the bias (sqrt of a noisy rho) is below 0.002
    assert ceiling.lds == pytest.approx(spearman_ceiling(rho), abs=0.012)
    assert ceiling.pearson == pytest.approx(math.sqrt(rho), abs=0.012)
    assert np.nanmean(ceiling.reliability_per_target) == pytest.approx(rho, abs=0.012)
    # the ceiling is what the perfect predictor (the signal itself) actually scores
    assert result.lds == pytest.approx(ceiling.lds, abs=0.012)
    assert result.pearson == pytest.approx(ceiling.pearson, abs=0.012)
    standalone = estimate_noise_ceiling(outputs, groups)
    assert standalone is not None
    np.testing.assert_array_equal(standalone.lds_per_target, ceiling.lds_per_target)


def test_noise_ceiling_ignores_increasing_transforms_of_the_output() -> None:
    _, outputs, groups = gaussian_replicates(0.5, np.full(300, 3), t=20, seed=11)
    plain = estimate_noise_ceiling(outputs, groups)
    bent = estimate_noise_ceiling(np.exp(2 * outputs) + outputs**3, groups)
    assert plain is not None and bent is not None
    np.testing.assert_allclose(bent.lds_per_target, plain.lds_per_target, rtol=0, atol=1e-12)
    assert abs(bent.pearson - plain.pearson) > 0.02  # the Pearson ceiling is not rank-based


def test_noise_ceiling_on_planted_datamodels_matches_monte_carlo() -> None:
    """Bernoulli masks, a linear datamodel of 50 of 200 examples, Gaussian training noise with
    the signal's variance, outputs bent by exp: the estimate from 600 masks x 3 seeds against
    the Spearman of the true signal and one output on 50,000 fresh models."""
    rng = np.random.default_rng(12)
    p, t, k = 200, 16, 3
    weight = np.zeros((p, t))
    for j in range(t):
        weight[rng.choice(p, 50, replace=False), j] = rng.normal(size=50)
    scale = np.sqrt(0.25 * (weight**2).sum(0))  # sd of the signal over masks

    def models(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        signal = (masks @ weight) / scale
        return signal, np.exp(0.5 * (signal + rng.normal(size=signal.shape)))

    masks = np.repeat(rng.random((600, p)) < 0.5, k, axis=0)
    _, outputs = models(masks)
    ceiling = estimate_noise_ceiling(outputs, group_identical_masks(masks))
    assert ceiling is not None and ceiling.n_replicated_groups == 600
    signal, fresh = models(rng.random((50_000, p)) < 0.5)
    simulated = evaluate(signal, fresh).lds  # Spearman(E[y | mask], y), per target, averaged
    assert simulated == pytest.approx(spearman_ceiling(0.5), abs=0.01)
    # 16 targets x 600 groups of 3: sd of the mean estimate ~0.005; the signal's departure
    # from Gaussian (50 terms) costs at most ~0.004 (simulated): 0.015 is about 3 sd
    assert ceiling.lds == pytest.approx(simulated, abs=0.015)


def test_noise_ceiling_extremes_and_absence() -> None:
    _, noiseless, groups = gaussian_replicates(1.0, np.full(100, 2), t=3, seed=13)
    top = estimate_noise_ceiling(noiseless, groups)
    assert top is not None
    np.testing.assert_allclose(top.lds_per_target, 1.0, atol=1e-12)
    _, noise, groups = gaussian_replicates(0.0, np.full(1000, 2), t=50, seed=14)
    bottom = estimate_noise_ceiling(noise, groups)
    assert bottom is not None and bottom.lds < 0.15  # sqrt of a rho clipped at 0: small, >= 0
    distinct = np.arange(len(noise))
    assert estimate_noise_ceiling(noise, distinct) is None
    assert estimate_noise_ceiling(noise, np.zeros(len(noise), dtype=int)) is None
    assert evaluate(noise, noise, groups=distinct).ceiling is None
    noise[0, 0] = np.inf
    with pytest.raises(ValueError, match="actual has NaN or infinite"):
        estimate_noise_ceiling(noise, groups)
