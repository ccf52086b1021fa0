"""The FFCV dataset: seeded round trips through real FFCV on CPU, input checks, failures.

Reading compiles a numba pipeline per batch size and source (about a second each), so the
read tests share one module-scoped dataset and source.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dm_assets.regression import beton_plan, beton_writer
from dm_assets.regression.beton import BetonError
from dm_assets.regression.beton_reader import BetonSource, beton_info
from dm_assets.regression.beton_writer import write_beton
from dm_assets.regression.data import Batch, RowSource
from dm_assets.regression.ffcv_glue import ffcv_classes
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store

CPU = torch.device("cpu")
NUM_MODELS = 45
N_FEATURES = 17
N_TARGETS = 5
# every third model is left incomplete: 30 completed rows, which 4 and 7 do not divide
COMPLETED = np.array([i for i in range(NUM_MODELS) if i % 3 != 1], dtype=np.int64)


def make_store(
    path: Path,
    *,
    seed: int = 0,
    num_models: int = NUM_MODELS,
    completed: np.ndarray = COMPLETED,
    mask_dtype: str = "bool_",
    y_dtype: str = "float16",
    y_shape: tuple[int, ...] = (N_TARGETS,),
) -> dict[str, np.ndarray]:
    """A store at ``path`` whose ``completed`` models hold seeded rows; returns every row
    (``masks`` ``(num_models, N_FEATURES)``, ``margins`` ``(num_models, *y_shape)``), zeros
    for the models not completed."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((num_models, N_FEATURES)) < 0.5).astype(mask_dtype)
    margins = (4 * rng.standard_normal((num_models, *y_shape))).astype(y_dtype)
    spec = Spec.from_dict(
        {
            "num_models": num_models,
            "schema": {
                "masks": {"shape": [N_FEATURES], "dtype": mask_dtype},
                "margins": {"shape": list(y_shape), "dtype": y_dtype},
            },
        }
    )
    with Store.initialize(path, spec) as store:
        for i in completed:
            store.write_row(int(i), {"masks": masks[i], "margins": margins[i]})
    done = np.zeros(num_models, dtype=bool)
    done[completed] = True
    masks[~done] = 0
    margins[~done] = 0
    return {"masks": masks, "margins": margins}


def collect(batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Every batch kept (no copies made here), then concatenated; and the batch sizes."""
    kept = list(batches)
    for x, y, rows in kept:
        assert x.dtype == torch.float32 and y.dtype == torch.float32 and rows.dtype == torch.int64
        assert x.ndim == 2 and y.ndim == 2 and rows.ndim == 1
        assert len(x) == len(y) == len(rows)
    sizes = [len(rows) for _, _, rows in kept]
    if not kept:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.int64), sizes
    x, y, rows = (torch.cat([b[k] for b in kept]) for k in range(3))
    return x, y, rows, sizes


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("beton")
    rows = make_store(root / "store")
    summary = write_beton(root / "store", root / "data.beton", num_workers=2)
    assert summary.path == root / "data.beton"
    return root / "data.beton", rows


@pytest.fixture(scope="module")
def source(written: tuple[Path, dict[str, np.ndarray]]) -> BetonSource:
    return BetonSource(written[0])


def expected_rows(rows: dict[str, np.ndarray], positions: np.ndarray) -> tuple[np.ndarray, ...]:
    """The store's x and y for beton row ``positions`` (row p is model COMPLETED[p])."""
    models = COMPLETED[positions]
    return rows["masks"][models].astype(np.float32), rows["margins"][models].astype(np.float32)


# ------------------------------------------------------------------------------ round trips
def test_summary_and_info_describe_the_completed_rows(
    written: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = written
    info = beton_info(path)
    assert (info.n_rows, info.n_features, info.n_targets) == (len(COMPLETED), N_FEATURES, 5)
    assert info.mask_dtype == np.bool_ and info.targets_dtype == np.float32
    np.testing.assert_array_equal(info.model_indices, COMPLETED)
    assert info.model_indices.dtype == np.int64


@pytest.mark.parametrize("batch_size", [4, 7, len(COMPLETED)])
def test_round_trip_sequential(
    written: tuple[Path, dict[str, np.ndarray]], source: BetonSource, batch_size: int
) -> None:
    _, rows = written
    threads = torch.get_num_threads()
    assert isinstance(source, RowSource)
    assert (source.n_rows, source.n_features, source.n_targets) == (30, N_FEATURES, N_TARGETS)
    np.testing.assert_array_equal(source.model_indices(), COMPLETED)
    positions = np.arange(source.n_rows)
    x, y, got, sizes = collect(source.batches(positions, batch_size, device=CPU))
    n = len(positions)
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    np.testing.assert_array_equal(got.numpy(), positions)
    want_x, want_y = expected_rows(rows, positions)
    np.testing.assert_array_equal(x.numpy(), want_x)
    np.testing.assert_array_equal(y.numpy(), want_y)
    # a subset in any order comes back in that order
    subset = np.array([17, 3, 29, 0, 11, 12, 5])
    x, y, got, _ = collect(source.batches(subset, batch_size, device=CPU))
    np.testing.assert_array_equal(got.numpy(), subset)
    want_x, want_y = expected_rows(rows, subset)
    np.testing.assert_array_equal(x.numpy(), want_x)
    np.testing.assert_array_equal(y.numpy(), want_y)
    assert torch.get_num_threads() == threads  # FFCV would set it to its num_workers


@pytest.mark.parametrize("batch_size", [4, 7])
def test_round_trip_shuffled(
    written: tuple[Path, dict[str, np.ndarray]], source: BetonSource, batch_size: int
) -> None:
    _, rows = written
    asked = np.array([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 0, 1, 4])
    x, y, got, sizes = collect(source.batches(asked, batch_size, device=CPU, shuffle=True, seed=11))
    order = got.numpy()
    assert sorted(order.tolist()) == sorted(asked.tolist())  # each row exactly once
    assert not np.array_equal(order, asked)
    assert max(sizes) == batch_size and sum(sizes) == len(asked)
    want_x, want_y = expected_rows(rows, order)
    np.testing.assert_array_equal(x.numpy(), want_x)
    np.testing.assert_array_equal(y.numpy(), want_y)
    same = collect(source.batches(asked, batch_size, device=CPU, shuffle=True, seed=11))[2]
    other = collect(source.batches(asked, batch_size, device=CPU, shuffle=True, seed=12))[2]
    np.testing.assert_array_equal(same.numpy(), order)
    assert not np.array_equal(other.numpy(), order)


def test_shuffled_order_is_ffcvs_random_order(
    written: tuple[Path, dict[str, np.ndarray]], source: BetonSource
) -> None:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    path, _ = written
    asked = np.array([29, 3, 5, 8, 13, 21, 1, 2, 0])
    threads = torch.get_num_threads()
    loader = Loader(
        str(path),
        batch_size=4,
        num_workers=1,
        order=OrderOption.RANDOM,
        seed=5,
        indices=asked,
        drop_last=False,
        pipelines={"mask": None, "targets": None, "idx": [IntDecoder(), ToTensor()]},
    )
    ffcv_models = torch.cat([idx.clone().reshape(-1) for (idx,) in loader]).numpy()
    ours = collect(source.batches(asked, 4, device=CPU, shuffle=True, seed=5))[2].numpy()
    np.testing.assert_array_equal(source.model_indices()[ours], ffcv_models)
    torch.set_num_threads(threads)  # FFCV's own Loader sets it to its num_workers


def test_kept_batches_are_not_overwritten(
    written: tuple[Path, dict[str, np.ndarray]], source: BetonSource
) -> None:
    # FFCV decodes into batches_ahead + 2 = 5 reused buffers: 8 batches of 4 cycle through them
    _, rows = written
    kept = list(source.batches(np.arange(30), 4, device=CPU, shuffle=True, seed=3))
    assert len(kept) == 8
    for x, y, got in kept:
        want_x, want_y = expected_rows(rows, got.numpy())
        np.testing.assert_array_equal(x.numpy(), want_x)
        np.testing.assert_array_equal(y.numpy(), want_y)
    pointers = {t.data_ptr() for batch in kept for t in batch}
    assert len(pointers) == 3 * len(kept)


def test_rows_are_checked(source: BetonSource) -> None:
    assert list(source.batches([], 4, device=CPU)) == []
    with pytest.raises(BetonError, match=r"outside \[0, 30\).*30, -1"):
        list(source.batches([0, 30, -1], 4, device=CPU))
    with pytest.raises(BetonError, match="batch_size=0"):
        list(source.batches([0], 0, device=CPU))
    with pytest.raises(BetonError, match="1-D sequence of integer"):
        list(source.batches(np.array([0.5]), 4, device=CPU))


@pytest.mark.timeout(60)
def test_failed_batch_raises_instead_of_hanging(
    source: BetonSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    guarded = ffcv_classes().GuardedEpochIterator

    def broken(self: object, *args: object, **kwargs: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(guarded, "run_pipeline", broken)
    with pytest.raises(BetonError, match="disk went away"):
        list(source.batches(np.arange(30), 4, device=CPU))


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_target_slice_and_no_numba_noise(written: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, rows = written
    middle = BetonSource(path, target_start=1, target_end=3, num_workers=1)
    assert middle.n_targets == 2
    _, y, got, _ = collect(middle.batches(np.arange(30), 7, device=CPU))
    np.testing.assert_array_equal(y.numpy(), rows["margins"][COMPLETED][:, 1:3].astype(np.float32))
    np.testing.assert_array_equal(got.numpy(), np.arange(30))
    rest = BetonSource(path, target_start=3)  # target_end=-1: to the last column
    assert rest.n_targets == 2
    _, y, _, _ = collect(rest.batches([4, 9], 7, device=CPU))
    np.testing.assert_array_equal(y.numpy(), rows["margins"][COMPLETED[[4, 9]], 3:])
    # freeing a Loader while a later one lives must not print numba's "Exception ignored in:
    # <finalize ...> KeyError" (it does with FFCV's own NDArrayDecoder)
    del middle
    gc.collect()
    for start, end in [(0, 6), (3, 3), (-1, 2), (5, -1)]:
        with pytest.raises(BetonError, match=f"target_start={start}, target_end={end}"):
            BetonSource(path, target_start=start, target_end=end)


# ------------------------------------------------------------------------------ writing
def test_y_slice_keeps_one_column_as_a_2d_row(
    tmp_path: Path, written: tuple[Path, dict[str, np.ndarray]]
) -> None:
    store_dir = Path(written[0]).parent / "store"
    _, rows = written
    summary = write_beton(store_dir, tmp_path / "col.beton", y_slice=2)
    assert (summary.rows, summary.n_targets, summary.idx_range) == (30, 1, (0, 44))
    source = BetonSource(tmp_path / "col.beton", num_workers=1)
    assert source.n_targets == 1
    x, y, _, _ = collect(source.batches(np.arange(30), 7, device=CPU))
    assert tuple(y.shape) == (30, 1)
    np.testing.assert_array_equal(y.numpy(), rows["margins"][COMPLETED][:, 2:3].astype(np.float32))
    np.testing.assert_array_equal(x.numpy(), rows["masks"][COMPLETED].astype(np.float32))


def test_ignore_completed_writes_every_row(tmp_path: Path) -> None:
    make_store(tmp_path / "store", num_models=12, completed=np.array([3, 4]))
    summary = write_beton(tmp_path / "store", tmp_path / "all.beton", ignore_completed=True)
    assert (summary.rows, summary.idx_range) == (12, (0, 11))
    np.testing.assert_array_equal(beton_info(tmp_path / "all.beton").model_indices, np.arange(12))
    summary = write_beton(tmp_path / "store", tmp_path / "done.beton")
    assert (summary.rows, summary.idx_range) == (2, (3, 4))


def test_uint8_masks_and_scalar_targets_round_trip(tmp_path: Path) -> None:
    rows = make_store(tmp_path / "store", mask_dtype="uint8", y_dtype="float32", y_shape=())
    summary = write_beton(tmp_path / "store", tmp_path / "u8.beton")
    assert (summary.mask_dtype, summary.n_targets) == ("uint8", 1)  # a scalar is one target
    info = beton_info(tmp_path / "u8.beton")
    assert info.mask_dtype == np.uint8
    source = BetonSource(tmp_path / "u8.beton", num_workers=1)
    x, y, _, _ = collect(source.batches(np.arange(30), 7, device=CPU))
    np.testing.assert_array_equal(x.numpy(), rows["masks"][COMPLETED].astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), rows["margins"][COMPLETED][:, None])


def poke(store_dir: Path, key: str, index: tuple[int, ...], value: float) -> None:
    """Set one value in a store array behind the store's back (as a seed-era bug could)."""
    array = np.lib.format.open_memmap(store_dir / f"{key}.npy", mode="r+")
    array[index] = value
    array.flush()
    del array


def test_mask_values_other_than_0_1_are_rejected(tmp_path: Path) -> None:
    make_store(tmp_path / "store", mask_dtype="uint8")
    poke(tmp_path / "store", "masks", (5, 3), 2)
    poke(tmp_path / "store", "masks", (7, 0), 9)  # model 7 is not completed: not written
    with pytest.raises(BetonError, match=r"'masks' \(uint8\) must hold only 0 and 1.*\b5\b.*2"):
        write_beton(tmp_path / "store", tmp_path / "out.beton")
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]


def test_float_masks_are_rejected(tmp_path: Path) -> None:
    make_store(tmp_path / "store", mask_dtype="float32", completed=np.array([0]))
    with pytest.raises(BetonError, match=r"'masks' has dtype float32.*bool_"):
        write_beton(tmp_path / "store", tmp_path / "out.beton")


def test_non_finite_targets_are_rejected_naming_the_models(tmp_path: Path) -> None:
    make_store(tmp_path / "store", y_dtype="float64")
    poke(tmp_path / "store", "margins", (8, 1), np.nan)
    poke(tmp_path / "store", "margins", (9, 4), 1e300)  # finite, but not once cast to float32
    poke(tmp_path / "store", "margins", (10, 2), np.inf)  # model 10 is not completed
    with pytest.raises(BetonError, match=r"NaN or infinite.*float32's range.*model\(s\) 8, 9:"):
        write_beton(tmp_path / "store", tmp_path / "out.beton")
    # only the written column counts
    summary = write_beton(tmp_path / "store", tmp_path / "out.beton", y_slice=0)
    assert summary.rows == 30


def test_inputs_are_checked_before_writing(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with pytest.raises(BetonError, match=f"cannot read the store at {store_dir}"):
        write_beton(store_dir, tmp_path / "out.beton")
    make_store(store_dir, completed=np.array([], dtype=np.int64))
    with pytest.raises(BetonError, match=r"no model .* is completed.*ignore_completed"):
        write_beton(store_dir, tmp_path / "out.beton")
    with pytest.raises(BetonError, match=r"x_name='mask' is not a key.*\['masks', 'margins'\]"):
        write_beton(store_dir, tmp_path / "out.beton", x_name="mask")
    with pytest.raises(BetonError, match=r"(?s)2 problems.*y_name='logits'.*out_path="):
        write_beton(store_dir, tmp_path / "nowhere" / "out.beton", y_name="logits")
    with pytest.raises(BetonError, match=r"y_slice=5 is out of range.*\[0, 4\]"):
        write_beton(store_dir, tmp_path / "out.beton", y_slice=5)
    with pytest.raises(BetonError, match=r"completed_name='done'.*no "):
        write_beton(store_dir, tmp_path / "out.beton", completed_name="done")
    with pytest.raises(BetonError, match="num_workers=0"):
        write_beton(store_dir, tmp_path / "out.beton", ignore_completed=True, num_workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_full_disk_is_reported_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_store(tmp_path / "store", completed=np.array([0, 2]))
    monkeypatch.setattr(
        beton_writer.shutil, "disk_usage", lambda path: SimpleNamespace(total=1, used=1, free=1000)
    )
    with pytest.raises(BetonError, match=r"needs about 0\.02 GiB but .* has 0\.00 GiB free"):
        write_beton(tmp_path / "store", tmp_path / "out.beton")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_multidimensional_keys_are_rejected(tmp_path: Path) -> None:
    spec = Spec.from_dict(
        {
            "num_models": 3,
            "schema": {
                "masks": {"shape": [2, 3], "dtype": "bool_"},
                "margins": {"shape": [4, 2], "dtype": "float32"},
            },
        }
    )
    Store.initialize(tmp_path / "store", spec).close()
    with pytest.raises(BetonError, match=r"(?s)'masks' has shape \[2, 3\].*'margins' has shape"):
        write_beton(tmp_path / "store", tmp_path / "out.beton", ignore_completed=True)


def test_unreadable_datasets_are_reported(tmp_path: Path, written: tuple[Path, ...]) -> None:
    with pytest.raises(BetonError, match=f"no dataset at {tmp_path / 'none.beton'}"):
        BetonSource(tmp_path / "none.beton")
    (tmp_path / "junk.beton").write_bytes(b"not a dataset")
    with pytest.raises(BetonError, match=r"junk.beton is not a readable FFCV dataset"):
        BetonSource(tmp_path / "junk.beton")
    data = Path(written[0]).read_bytes()
    (tmp_path / "cut.beton").write_bytes(data[: len(data) // 2])
    with pytest.raises(BetonError, match=r"cut.beton is not a readable.*truncated"):
        beton_info(tmp_path / "cut.beton")


# ------------------------------------------------------------------------------ failures
@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    # 105 rows: two chunks of work, so two writer processes
    make_store(tmp_path / "store", num_models=210, completed=np.arange(0, 210, 2))
    return tmp_path / "store"


def assert_only_old_file(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.beton", "store"]
    assert (tmp_path / "out.beton").read_bytes() == b"the previous dataset"


def test_failure_in_the_main_process_leaves_no_partial_file(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "out.beton").write_bytes(b"the previous dataset")

    def broken(self: object, allocations: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(ffcv_classes().GuardedWriter, "finalize", broken)
    with pytest.raises(OSError, match="no space left"):
        write_beton(small_store, tmp_path / "out.beton", num_workers=2)
    assert_only_old_file(tmp_path)


@pytest.mark.timeout(60)
def test_writer_process_death_fails_instead_of_hanging(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "out.beton").write_bytes(b"the previous dataset")
    original = beton_plan.StoreRows.__getitem__

    def broken(self: beton_plan.StoreRows, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        if i == 102:  # in a forked writer process, in the second chunk
            raise OSError("no space left on device")
        return original(self, i)

    monkeypatch.setattr(beton_plan.StoreRows, "__getitem__", broken)
    with pytest.raises(BetonError, match="writer process exited with code 1"):
        write_beton(small_store, tmp_path / "out.beton", num_workers=2)
    assert_only_old_file(tmp_path)
