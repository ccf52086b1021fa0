"""Exact ``X^T X`` of 0/1 masks from bit-packed columns and from int8 products.

Every count is an integer, so the packed and int8 results must equal float64 ``X^T X``
exactly, for row counts that are not multiples of 64, batches that straddle words and chunks,
and any number of columns (including fewer than the four the kernel counts at once).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dm_assets.regression.bit_stats import PackedGram, int8_gram, is_binary, pack_rows
from dm_assets.regression.data import ArraySource
from dm_assets.regression.stats import accumulate_stats

CPU = torch.device("cpu")


def masks(n: int, p: int, seed: int, alpha: float = 0.5) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, p)) < alpha).astype(np.float32)


@pytest.mark.parametrize(
    ("n", "p", "batch", "chunk_words"),
    [
        (1, 1, 1, 1),
        (63, 3, 63, 1),
        (64, 5, 64, 1),
        (65, 7, 10, 1),  # batches straddle words and the one-word chunk
        (1000, 70, 37, 2),  # 128-row chunks flushed mid-batch
        (1337, 9, 1337, 512),  # one chunk, partly filled
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_gram_equals_float_gram(
    n: int, p: int, batch: int, chunk_words: int, seed: int
) -> None:
    x = masks(n, p, seed, alpha=0.3 + 0.2 * seed)
    gram = PackedGram(p, chunk_words=chunk_words)
    sums = np.zeros(p, dtype=np.int64)
    for start in range(0, n, batch):
        sums += gram.add(x[start : start + batch])
    xd = x.astype(np.float64)
    np.testing.assert_array_equal(gram.result(), xd.T @ xd)
    np.testing.assert_array_equal(sums, xd.sum(0))


def test_pack_rows_bit_layout() -> None:
    x = np.zeros((70, 2), dtype=np.float32)
    x[[0, 5, 63], 0] = 1
    x[[64, 69], 1] = 1
    packed = np.zeros((2, 2), dtype=np.uint64)
    counts = np.zeros(2, dtype=np.int64)
    assert pack_rows(x, packed, 0, counts)
    assert counts.tolist() == [3, 2]
    assert packed[0, 0] == (1 << 0) | (1 << 5) | (1 << 63) and packed[0, 1] == 0
    assert packed[1, 0] == 0 and packed[1, 1] == (1 << 0) | (1 << 5)
    # at an offset inside a word: row r goes to bit (offset + r) % 64
    shifted = np.zeros((2, 3), dtype=np.uint64)
    assert pack_rows(x, shifted, 60, counts)
    assert counts.tolist() == [6, 4]
    assert shifted[0, 0] == 1 << 60 and shifted[0, 1] == (1 << 1) | (1 << 59)
    assert shifted[1, 0] == 0 and shifted[1, 1] == 1 << 60 and shifted[1, 2] == 1 << 1


def test_non_binary_batches_are_refused_and_fall_back() -> None:
    x = masks(300, 12, 3)
    gram = PackedGram(12)
    with pytest.raises(ValueError, match="0s and 1s"):
        gram.add(np.where(x > 0, 0.5, 0.0).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(rows, 12\)"):
        gram.add(x[:, :5])
    assert is_binary(torch.from_numpy(x)) and is_binary(torch.from_numpy(x.astype(np.float64)))
    # a refused batch is not added, wherever it falls in the buffer: the counts stay exact
    gram = PackedGram(12, chunk_words=2)  # 128-row buffer
    bad = x[:50].copy()
    bad[49, 7] = 0.5
    total = np.zeros(12, dtype=np.int64)
    for start, stop in [(0, 100), (100, 110), (110, 300)]:  # 300 rows: a multi-buffer batch
        total += gram.add(x[start:stop])
        assert gram.try_add(bad) is None
        big_bad = np.concatenate([x[:200], bad])
        assert gram.try_add(big_bad) is None
    xd = x.astype(np.float64)
    np.testing.assert_array_equal(gram.result(), xd.T @ xd)
    np.testing.assert_array_equal(total, xd.sum(0))
    assert is_binary(torch.from_numpy(x).to(torch.int64))
    # a late batch with a 2: the counts so far are kept and the rest is summed in floats
    x[250, 3] = 2.0
    stats = accumulate_stats(ArraySource(x, np.ones((300, 1))), np.arange(300), batch_size=64,
                             device=CPU)  # fmt: skip
    assert not is_binary(torch.from_numpy(x))
    xd = x.astype(np.float64)
    np.testing.assert_array_equal(stats.xtx.numpy(), xd.T @ xd)  # type: ignore[union-attr]
    np.testing.assert_array_equal(stats.sum_x2.numpy(), (xd * xd).sum(0))
    np.testing.assert_array_equal(stats.sum_x.numpy(), xd.sum(0))


@pytest.mark.parametrize(("n", "p"), [(13, 5), (64, 24), (130, 33)])
def test_int8_gram_is_exact(n: int, p: int) -> None:
    x = masks(n, p, 4)
    counts = int8_gram(torch.from_numpy(x))
    assert counts.dtype == torch.int32 and counts.shape == (p, p)
    xd = x.astype(np.float64)
    np.testing.assert_array_equal(counts.numpy(), xd.T @ xd)


def test_statistics_from_bits_equal_float_statistics() -> None:
    x = masks(777, 41, 5)
    y = np.random.default_rng(5).normal(size=(777, 3)).astype(np.float32)
    rows = np.random.default_rng(6).permutation(777)[:701]  # unsorted, not a multiple of 64
    stats = accumulate_stats(ArraySource(x, y), rows, batch_size=100, device=CPU)
    xd, yd = x[rows].astype(np.float64), y[rows].astype(np.float64)
    assert stats.n == 701
    np.testing.assert_array_equal(stats.xtx.numpy(), xd.T @ xd)  # type: ignore[union-attr]
    np.testing.assert_array_equal(stats.sum_x.numpy(), xd.sum(0))
    np.testing.assert_array_equal(stats.sum_x2.numpy(), xd.sum(0))
    # float32 sums of at most 100 products: error within 100 * 2^-24 of the sum of |terms|
    bound = 100 * 2.0**-24 * (np.abs(xd).T @ np.abs(yd))
    assert np.all(np.abs(stats.xty.numpy() - xd.T @ yd) <= bound)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_statistics_equal_cpu_statistics() -> None:
    x = masks(3001, 203, 7)
    y = np.random.default_rng(7).normal(size=(3001, 4)).astype(np.float32)
    src = ArraySource(x, y)
    cpu = accumulate_stats(src, np.arange(3001), batch_size=1000, device=CPU)
    gpu = accumulate_stats(src, np.arange(3001), batch_size=1000, device=torch.device("cuda"))
    torch.testing.assert_close(gpu.xtx.cpu(), cpu.xtx, rtol=0, atol=0)  # type: ignore[union-attr]
    torch.testing.assert_close(gpu.xty.cpu(), cpu.xty, rtol=1e-6, atol=1e-6)
