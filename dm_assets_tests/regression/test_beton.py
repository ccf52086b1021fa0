"""The FFCV dataset: seeded round trips (our reader, and FFCV's own Reader and Loader), the file
format against FFCV's own writer, input checks, failures.

The read tests share one module-scoped dataset and source.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dm_assets.regression import beton_format, beton_reader, beton_writer
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
    original = beton_reader._FieldReader.gather
    calls = []

    def broken(self: object, data: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        calls.append(len(rows))
        if len(calls) > 3:  # a batch gathered by a reading thread, after the first ones
            raise OSError("disk went away")
        original(self, data, rows, out)  # type: ignore[arg-type]

    monkeypatch.setattr(beton_reader._FieldReader, "gather", broken)
    with pytest.raises(OSError, match="disk went away"):
        list(source.batches(np.arange(30), 4, device=CPU))


def test_target_slice(written: tuple[Path, dict[str, np.ndarray]]) -> None:
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
    with pytest.raises(BetonError, match=r"needs 4,266 bytes but .* has 1,000 bytes free"):
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
# 150 rows of 37 bytes (17 mask values, 5 float32 targets): pages of 4 KiB hold 110, so two
SMALL_MODELS = 300
SMALL_COMPLETED = np.arange(0, SMALL_MODELS, 2)


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    make_store(tmp_path / "store", num_models=SMALL_MODELS, completed=SMALL_COMPLETED)
    return tmp_path / "store"


def assert_only_old_file(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.beton", "store"]
    assert (tmp_path / "out.beton").read_bytes() == b"the previous dataset"


def test_failure_after_the_pages_leaves_no_partial_file(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "out.beton").write_bytes(b"the previous dataset")

    def broken(self: object) -> np.ndarray:
        raise OSError("no space left on device")

    monkeypatch.setattr(beton_format.RowLayout, "alloc_table", broken)
    with pytest.raises(OSError, match="no space left"):
        write_beton(small_store, tmp_path / "out.beton", num_workers=2)
    assert_only_old_file(tmp_path)


@pytest.mark.timeout(60)
def test_a_failing_writer_thread_fails_the_write(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "out.beton").write_bytes(b"the previous dataset")
    monkeypatch.setattr(beton_writer, "_BLOCK_BYTES", 1)  # one row per unit of work
    original = beton_writer._read_rows

    def broken(fd: int, ref: object, models: np.ndarray, dest: np.ndarray) -> None:
        if models[0] >= 2 * 110:  # the second page's rows
            raise OSError("input/output error")
        original(fd, ref, models, dest)  # type: ignore[arg-type]

    monkeypatch.setattr(beton_writer, "_read_rows", broken)
    with pytest.raises(OSError, match="input/output error"):
        write_beton(small_store, tmp_path / "out.beton", num_workers=2)
    assert_only_old_file(tmp_path)


# ------------------------------------------------------------------------------ the format
def ffcv_loader_rows(path: Path, *, os_cache: bool) -> tuple[np.ndarray, ...]:
    """Every row of ``path`` through FFCV's own Loader (its decoders), in order."""
    ffcv = ffcv_classes()
    threads = torch.get_num_threads()
    loader = ffcv.Loader(
        str(path),
        batch_size=16,
        num_workers=1,
        order=ffcv.OrderOption.SEQUENTIAL,
        os_cache=os_cache,
        drop_last=False,
        pipelines={
            "mask": [ffcv.RowDecoder(), ffcv.ToTensor()],
            "targets": [ffcv.RowDecoder(), ffcv.ToTensor()],
            "idx": [ffcv.IntDecoder(), ffcv.ToTensor()],
        },
    )
    batches = [tuple(t.clone() for t in batch) for batch in loader]
    torch.set_num_threads(threads)  # FFCV's Loader sets it to its num_workers
    return tuple(torch.cat([b[k] for b in batches]).numpy() for k in range(3))


@pytest.mark.parametrize("os_cache", [True, False])
def test_ffcvs_reader_and_loader_read_our_pages(
    tmp_path: Path, small_store: Path, os_cache: bool
) -> None:
    # both of FFCV's memory managers: mapping the file, and reading it page by page (the last
    # page is shorter than a page, as we write it)
    rows = make_store(tmp_path / "again", num_models=SMALL_MODELS, completed=SMALL_COMPLETED)
    summary = write_beton(small_store, tmp_path / "data.beton")
    models = SMALL_COMPLETED
    ffcv = ffcv_classes()
    reader = ffcv.Reader(str(tmp_path / "data.beton"))
    assert reader.num_samples == 150 and list(reader.handlers) == ["mask", "targets", "idx"]
    assert int(reader.page_size) == 4096 and len(reader.alloc_table) == 2 * 150
    mask, targets, idx = ffcv_loader_rows(tmp_path / "data.beton", os_cache=os_cache)
    np.testing.assert_array_equal(mask, rows["masks"][models])
    np.testing.assert_array_equal(targets, rows["margins"][models].astype(np.float32))
    np.testing.assert_array_equal(idx.reshape(-1), models)
    assert summary.nbytes == (tmp_path / "data.beton").stat().st_size


def test_our_file_is_ffcvs_single_writer_file(tmp_path: Path, small_store: Path) -> None:
    # With FFCV's smallest page (2 MiB) and one writer process, FFCV writes the same bytes,
    # except that it pads the last page to a whole page (so its allocation table starts later)
    rows = make_store(tmp_path / "again", num_models=SMALL_MODELS, completed=SMALL_COMPLETED)
    models = SMALL_COMPLETED
    ffcv = ffcv_classes()
    fields = {
        "mask": ffcv.NDArrayField(dtype=np.dtype(np.bool_), shape=(N_FEATURES,)),
        "targets": ffcv.NDArrayField(dtype=np.dtype(np.float32), shape=(N_TARGETS,)),
        "idx": ffcv.IntField(),
    }
    dataset = [(rows["masks"][m], rows["margins"][m].astype(np.float32), int(m)) for m in models]
    threads = torch.get_num_threads()
    writer = ffcv.GuardedWriter(
        str(tmp_path / "ffcv.beton"), fields, page_size=1 << 21, num_workers=1
    )
    writer.from_indexed_dataset(dataset, chunksize=100)
    torch.set_num_threads(threads)
    with Store.open(small_store) as store:
        plan = beton_writer.plan_write(
            store,
            tmp_path / "ours.beton",
            x_name="masks",
            y_name="margins",
            y_slice=None,
            completed_name="_completed",
            ignore_completed=False,
        )
    layout = beton_format.RowLayout(150, np.dtype(np.bool_), N_FEATURES, N_TARGETS, 1 << 21)
    beton_writer._write_file(beton_writer._PageWriter(plan, layout), tmp_path / "ours.beton", 1)
    theirs = (tmp_path / "ffcv.beton").read_bytes()
    ours = (tmp_path / "ours.beton").read_bytes()
    end = layout.data_end
    assert (
        len(theirs) == layout.data_start + (1 << 21) + 2 * 150 * 24
        and len(ours) == layout.file_size
    )
    header = beton_format.HEADER_TYPE.itemsize
    ptr = np.frombuffer(theirs[:header], dtype=beton_format.HEADER_TYPE)[0]["alloc_table_ptr"]
    assert int(ptr) == layout.data_start + (1 << 21)
    assert ours[8:16] == theirs[8:16]  # number of rows (and, before it, version, fields, page)
    assert ours[:8] == theirs[:8] and ours[header:end] == theirs[header:end]
    assert theirs[end : int(ptr)] == bytes(int(ptr) - end)  # FFCV's padding: zeros
    assert ours[end:] == theirs[int(ptr) :]  # the same allocation table


def test_our_format_types_are_ffcvs() -> None:
    import ffcv.fields.ndarray
    import ffcv.types

    assert ffcv.types.HeaderType == beton_format.HEADER_TYPE
    assert ffcv.types.FieldDescType == beton_format.FIELD_DESC_TYPE
    assert beton_format.ALLOC_TABLE_TYPE == ffcv.types.ALLOC_TABLE_TYPE
    assert ffcv.fields.ndarray.NDArrayArgsType == beton_format.NDARRAY_ARGS_TYPE
    assert beton_format.FORMAT_VERSION == ffcv.types.CURRENT_VERSION
    ids = {cls.__name__: i for i, cls in ffcv.types.TYPE_ID_HANDLER.items() if cls is not None}
    assert ids["IntField"] == beton_format.INT_FIELD_ID
    assert ids["NDArrayField"] == beton_format.NDARRAY_FIELD_ID
    assert ids["FloatField"] == beton_format.FLOAT_FIELD_ID
    for dtype, shape in [(np.dtype(np.bool_), (60,)), (np.dtype(np.float32), (797,))]:
        field = ffcv.fields.NDArrayField(dtype=dtype, shape=shape)
        theirs = field.to_binary().tobytes()
        assert beton_format.ndarray_arguments(dtype, shape).tobytes() == theirs


def test_we_read_a_file_ffcvs_writer_scattered(tmp_path: Path) -> None:
    # FFCV's writer with two processes puts rows in pages in any order (the seed's files)
    rows = make_store(tmp_path / "store", num_models=300, completed=np.arange(300))
    ffcv = ffcv_classes()
    fields = {
        "mask": ffcv.NDArrayField(dtype=np.dtype(np.bool_), shape=(N_FEATURES,)),
        "targets": ffcv.NDArrayField(dtype=np.dtype(np.float32), shape=(N_TARGETS,)),
        "idx": ffcv.IntField(),
    }
    dataset = [(rows["masks"][m], rows["margins"][m].astype(np.float32), m) for m in range(300)]
    threads = torch.get_num_threads()
    writer = ffcv.GuardedWriter(
        str(tmp_path / "seed.beton"), fields, page_size=1 << 21, num_workers=2
    )
    writer.from_indexed_dataset(dataset, chunksize=10)
    torch.set_num_threads(threads)
    source = BetonSource(tmp_path / "seed.beton")
    np.testing.assert_array_equal(source.model_indices(), np.arange(300))
    for shuffle in (False, True):
        x, y, got, _ = collect(source.batches(np.arange(300), 64, device=CPU, shuffle=shuffle))
        np.testing.assert_array_equal(x.numpy(), rows["masks"][got.numpy()].astype(np.float32))
        np.testing.assert_array_equal(y.numpy(), rows["margins"][got.numpy()].astype(np.float32))


def test_threads_write_the_bytes_one_thread_writes(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_beton(small_store, tmp_path / "one.beton", num_workers=1)  # one unit: every row
    # one row per unit of work, across the pages' ends, by three threads in any order
    monkeypatch.setattr(beton_writer, "_BLOCK_BYTES", 1)
    write_beton(small_store, tmp_path / "three.beton", num_workers=3)
    assert (tmp_path / "one.beton").read_bytes() == (tmp_path / "three.beton").read_bytes()


@pytest.mark.parametrize(
    ("row_bytes", "page_size"),
    [
        (1, 4096),
        (76, 8192),
        (4188, 1 << 19),
        (90_000, 1 << 23),
        (40 << 20, 1 << 31),
        (1 << 31, 1 << 31),
    ],
)
def test_page_size_holds_64_rows(row_bytes: int, page_size: int) -> None:
    assert beton_format.choose_page_size(row_bytes) == page_size
    assert page_size // row_bytes >= 1


def test_page_size_of_a_row_too_large() -> None:
    with pytest.raises(beton_format.FormatError, match="more than a page can hold"):
        beton_format.choose_page_size((1 << 31) + 1)


def test_a_small_store_gives_a_small_file(tmp_path: Path) -> None:
    # minimal's shape: 300 models of 60 bool mask values and 4 float16 targets; 76 bytes a
    # row written, plus FFCV's 24 of metadata and 48 of allocation table per row
    spec = Spec.from_dict(
        {
            "num_models": 300,
            "schema": {
                "masks": {"shape": [60], "dtype": "bool_"},
                "margins": {"shape": [4], "dtype": "float16"},
            },
        }
    )
    with Store.initialize(tmp_path / "store", spec) as store:
        store.write_rows(
            [(i, {"masks": np.ones(60, bool), "margins": np.zeros(4)}) for i in range(300)]
        )
    summary = write_beton(tmp_path / "store", tmp_path / "data.beton")
    assert summary.nbytes < 60_000  # 16.8 MB with FFCV's writer's pages
    assert summary.nbytes >= 300 * (76 + 24 + 48)


def test_large_rows_in_any_order(tmp_path: Path) -> None:
    # rows of 5,000 mask values are copied one by one when scattered, as runs when in order
    spec = Spec.from_dict(
        {
            "num_models": 40,
            "schema": {
                "masks": {"shape": [5000], "dtype": "bool_"},
                "margins": {"shape": [3], "dtype": "float32"},
            },
        }
    )
    rng = np.random.default_rng(4)
    masks = rng.random((40, 5000)) < 0.5
    margins = rng.standard_normal((40, 3)).astype(np.float32)
    with Store.initialize(tmp_path / "store", spec) as store:
        store.write_rows([(i, {"masks": masks[i], "margins": margins[i]}) for i in range(40)])
    write_beton(tmp_path / "store", tmp_path / "data.beton")
    source = BetonSource(tmp_path / "data.beton", target_start=1)
    for shuffle in (False, True):
        x, y, got, _ = collect(source.batches(np.arange(40), 16, device=CPU, shuffle=shuffle))
        order = got.numpy()
        np.testing.assert_array_equal(x.numpy(), masks[order].astype(np.float32))
        np.testing.assert_array_equal(y.numpy(), margins[order, 1:])
