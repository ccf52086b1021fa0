"""Seeded masks and planted targets (the formulas, reproducibility, their statistics), and the
int8 sufficient statistics against the float32 ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dm_assets.regression.bit_stats import int8_gram
from dm_assets.regression.data import ArraySource, RowSource
from dm_assets.regression.device_masks import (
    SeededMasks,
    accumulate_mask_stats,
    mix32,
)
from dm_assets.regression.gram import fit_gram
from dm_assets.regression.stats import accumulate_stats

CPU = torch.device("cpu")


def reference_mix32(x: int) -> int:
    """The module doc's hash in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    return x ^ (x >> 15)


def test_mix32_is_the_documented_bijection() -> None:
    values = torch.tensor([0, 1, 2, 12345, 2**31, 2**32 - 1], dtype=torch.int64)
    assert mix32(values).tolist() == [reference_mix32(int(v)) for v in values]
    # a bijection on 32-bit values: no two of 2^16 inputs collide, outputs stay in range
    out = mix32(torch.arange(2**16, dtype=torch.int64) * 65_537)
    assert len(torch.unique(out)) == 2**16
    assert int(out.min()) >= 0 and int(out.max()) < 2**32


def test_masks_depend_on_seed_and_row_only() -> None:
    source = SeededMasks(5_000, 300, 3, seed=7)
    rows = np.array([4_999, 3, 1_000, 3])
    whole = source.masks(np.arange(5_000))
    # any batch, any order: row i is the same
    assert torch.equal(source.masks(rows), whole[rows])
    batched = torch.cat([x for x, _, _ in source.batches(np.arange(5_000), 777, device=CPU)])
    assert torch.equal(batched, whole)
    assert isinstance(source, RowSource)
    assert not torch.equal(SeededMasks(5_000, 300, 3, seed=8).masks(rows), whole[rows])
    assert set(torch.unique(whole).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("alpha", [0.5, 0.1])
def test_masks_are_independent_bernoulli_draws(alpha: float) -> None:
    n, p = 4_000, 200
    x = SeededMasks(n, p, 1, alpha=alpha, seed=1).masks(np.arange(n)).numpy()
    # the overall mean within 5 standard errors of alpha, every column's within 5.5
    assert abs(x.mean() - alpha) < 5 * math.sqrt(alpha * (1 - alpha) / x.size)
    assert np.abs(x.mean(0) - alpha).max() < 5.5 * math.sqrt(alpha * (1 - alpha) / n)
    # no correlation between columns or between rows beyond sampling noise (sd 1/sqrt(n))
    cols = np.corrcoef(x.T)[np.triu_indices(p, 1)]
    rows = np.corrcoef(x[:300])[np.triu_indices(300, 1)]
    assert np.abs(cols).max() < 5.5 / math.sqrt(n)
    assert np.abs(rows).max() < 5.5 / math.sqrt(p)
    assert abs(cols.mean()) < 1 / math.sqrt(n) and abs(rows.mean()) < 1 / math.sqrt(p)


def test_planted_targets_follow_the_formula() -> None:
    n, p, t, support, r2 = 6_000, 120, 5, 6, 0.6
    source = SeededMasks(n, p, t, support=support, r2=r2, seed=3)
    w = source.planted_weights().numpy()
    assert ((w != 0).sum(0) == support).all()
    np.testing.assert_allclose(np.abs(w[w != 0]), math.sqrt(r2 / support), rtol=1e-6)
    assert len({tuple(np.flatnonzero(w[:, k])) for k in range(t)}) == t  # its own per target
    x = source.masks(np.arange(n)).numpy().astype(np.float64)
    y = source.targets(np.arange(n)).numpy().astype(np.float64)
    signal = (x - 0.5) / 0.5 @ w
    noise = y - signal
    # the noise: mean 0, variance 1 - r2, normal tails, independent of the masks
    assert np.abs(noise.mean(0)).max() < 5 * math.sqrt((1 - r2) / n)
    np.testing.assert_allclose(noise.var(0), 1 - r2, rtol=0.1)
    z = noise / math.sqrt(1 - r2)
    assert 0.002 < (np.abs(z) > 3).mean() < 0.005  # normal: 0.0027
    assert np.abs(np.corrcoef(x.T, noise.T)[:p, p:]).max() < 5.5 / math.sqrt(n)
    # rows asked for alone get the same targets
    np.testing.assert_allclose(source.targets([17, 5]).numpy(), y[[17, 5]], rtol=1e-5)


def test_bad_arguments_are_all_named() -> None:
    with pytest.raises(ValueError) as info:
        SeededMasks(0, 10, 0, alpha=1.0, support=11, r2=2.0, seed=-1)
    for needle in ["n_rows=0", "n_targets=0", "alpha=1.0", "support=11", "r2=2.0", "seed=-1"]:
        assert needle in str(info.value)
    with pytest.raises(ValueError, match=r"positions in \[0, 10\)"):
        SeededMasks(10, 5, 1, support=2).masks([10])


@pytest.mark.parametrize(("b", "p"), [(40, 24), (37, 13), (3, 30)])
def test_int8_gram_is_exact_at_any_shape(b: int, p: int) -> None:
    x = torch.from_numpy(np.random.default_rng(b).random((b, p)) < 0.5).float()
    assert torch.equal(int8_gram(x), (x.T @ x).to(torch.int32))


@pytest.mark.parametrize("batch_size", [64, 1_000])
def test_int8_statistics_equal_the_float32_ones(batch_size: int) -> None:
    source = SeededMasks(3_000, 45, 4, support=3, seed=5)
    rows = np.random.default_rng(0).choice(3_000, 900, replace=False)
    ours = accumulate_mask_stats(source, rows, batch_size=batch_size, device=CPU)
    ref = accumulate_stats(source, rows, batch_size=batch_size, device=CPU)
    assert ours.n == ref.n == 900
    # the same products of the same batches: identical, bit for bit
    for name in ["xtx", "sum_x", "sum_x2", "xty", "sum_y", "sum_y2"]:
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert ours.xtx is not None and ours.xtx.dtype == torch.float64
    no_gram = accumulate_mask_stats(source, rows, batch_size=batch_size, device=CPU, gram=False)
    assert no_gram.xtx is None and torch.equal(no_gram.xty, ref.xty)


def test_int8_statistics_of_an_array_source_and_their_refusals() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.random((500, 19)) < 0.3, rng.normal(size=(500, 2))
    ours = accumulate_mask_stats(ArraySource(x, y), np.arange(500), batch_size=128, device=CPU)
    assert ours.xtx is not None
    np.testing.assert_array_equal(ours.xtx.numpy(), x.T.astype(np.int64) @ x)
    with pytest.raises(ValueError, match="0/1 masks"):
        accumulate_mask_stats(ArraySource(x * 2.0, y), [0, 1], batch_size=2, device=CPU)
    with pytest.raises(ValueError, match="between 1 and 2\\^31"):
        accumulate_mask_stats(ArraySource(x, y), [], batch_size=2, device=CPU)


def test_fit_on_seeded_rows_equals_the_fit_on_their_arrays_and_finds_the_plant() -> None:
    n, p, t, support = 3_000, 60, 4, 4
    source = SeededMasks(n, p, t, support=support, r2=0.7, seed=11)
    x = source.masks(np.arange(n)).numpy().astype(bool)
    y = source.targets(np.arange(n)).numpy()
    train, val = np.arange(2_400), np.arange(2_400, n)
    kwargs = {"k": 15, "eps": 1e-2, "batch_size": 512, "engine": "fista", "tol": 1e-8}
    seeded = fit_gram(source, train, val, **kwargs)
    arrays = fit_gram(ArraySource(x, y), train, val, **kwargs)
    torch.testing.assert_close(seeded.weight, arrays.weight, atol=1e-6, rtol=1e-5)
    assert torch.equal(seeded.best_step, arrays.best_step)
    planted = source.planted_weights()
    for k in range(t):
        top = set(seeded.weight[:, k].abs().topk(support).indices.tolist())
        assert top == set(torch.nonzero(planted[:, k])[:, 0].tolist())
    # standardized by the sample's statistics, the weights come back near the planted ones
    assert float(torch.corrcoef(torch.stack([seeded.weight.ravel(), planted.ravel()]))[0, 1]) > 0.98


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_makes_the_same_rows_and_exact_statistics() -> None:
    source = SeededMasks(20_000, 1_000, 6, seed=4)
    rows = np.arange(0, 20_000, 7)
    cuda = torch.device("cuda")
    assert torch.equal(source.masks(rows, device=cuda).cpu(), source.masks(rows))
    torch.testing.assert_close(
        source.targets(rows, source.masks(rows, device=cuda)).cpu(),
        source.targets(rows),
        rtol=1e-5,
        atol=1e-5,
    )
    ours = accumulate_mask_stats(source, rows, batch_size=1_024, device=cuda)
    ref = accumulate_stats(source, rows, batch_size=1_024, device=cuda)
    assert ours.xtx is not None and ref.xtx is not None
    assert torch.equal(ours.xtx, ref.xtx) and torch.equal(ours.sum_x, ref.sum_x)
    torch.testing.assert_close(ours.xty, ref.xty, rtol=1e-6, atol=1e-6)
