"""The store: seed-compatible files, sparse creation, reinitialization, the write protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dm_assets.store import store as store_module
from dm_assets.store.rows import RowError
from dm_assets.store.spec import Spec
from dm_assets.store.store import (
    Store,
    StoreError,
    StoreMismatchError,
    StoreStatus,
    index_ranges,
)
from dm_assets.training.configuration import UNKNOWN_CONFIGURATION, TrainingConfiguration

SPEC = Spec.from_dict(
    {
        "num_models": 12,
        "schema": {
            "masks": {"shape": [5], "dtype": "bool_"},
            "margins": {"shape": [3], "dtype": "float16"},
            "loss": {"shape": [], "dtype": "float32"},
        },
    }
)


def row(i: int) -> dict[str, np.ndarray]:
    return {
        "masks": (np.arange(5) + i) % 2 == 0,
        "margins": np.array([i, -i, 0.5 * i], dtype=np.float16),
        "loss": np.float32(i / 8),
    }


def file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_files_are_seed_compatible(tmp_path: Path) -> None:
    with Store.initialize(tmp_path / "s", SPEC) as store:
        store.write_row(3, row(3))
    s = tmp_path / "s"
    assert {p.name for p in s.iterdir()} >= {
        "masks.npy",
        "margins.npy",
        "loss.npy",
        "_completed.npy",
        "spec.json",
        "workers",
    }
    masks = np.load(s / "masks.npy", mmap_mode="r")
    assert masks.shape == (12, 5) and masks.dtype == np.bool_
    margins = np.load(s / "margins.npy", mmap_mode="r")
    assert margins.shape == (12, 3) and margins.dtype == np.float16
    loss = np.load(s / "loss.npy", mmap_mode="r")
    assert loss.shape == (12,) and loss.dtype == np.float32
    completed = np.load(s / "_completed.npy", mmap_mode="r")
    assert completed.shape == (12,) and completed.dtype == np.bool_
    assert completed.tolist() == [i == 3 for i in range(12)]
    np.testing.assert_array_equal(margins[3], row(3)["margins"])
    assert not margins[[0, 1, 2, 4]].any()  # neighbours untouched
    assert json.loads((s / "spec.json").read_text()) == SPEC.to_dict()


def test_round_trip_every_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    order = rng.permutation(12)[:9]
    with Store.initialize(tmp_path, SPEC) as store:
        for i in order:
            store.write_row(int(i), row(int(i)))
    with Store.open(tmp_path) as store:
        indices, margins = store.completed_rows("margins")
        assert indices.tolist() == sorted(order.tolist())
        for i, m in zip(indices, margins, strict=True):
            np.testing.assert_array_equal(m, row(int(i))["margins"])
        _, masks = store.completed_rows("masks")
        assert masks.dtype == np.bool_ and masks.shape == (9, 5)
        status = store.status()
        missing = sorted(set(range(12)) - set(order.tolist()))
        assert status.completed == 9
        assert [i for a, b in status.missing_ranges for i in range(a, b + 1)] == missing
        assert store.read("loss").flags.writeable is False


def test_reinitialize_same_spec_keeps_rows(tmp_path: Path) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        store.write_row(0, row(0))
        store.write_row(11, row(11))
    before = file_bytes(tmp_path)
    with Store.initialize(tmp_path, Spec.from_dict(SPEC.to_dict())) as store:
        assert store.completed_indices().tolist() == [0, 11]
    assert file_bytes(tmp_path) == before


def test_different_spec_refused_and_nothing_changed(tmp_path: Path) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        store.write_row(4, row(4))
    before = file_bytes(tmp_path)
    changed = SPEC.to_dict()
    changed["num_models"] = 13
    changed["schema"]["margins"]["dtype"] = "float32"
    changed["schema"]["extra"] = {"shape": [1], "dtype": "uint8"}
    with pytest.raises(StoreMismatchError) as info:
        Store.initialize(tmp_path, Spec.from_dict(changed))
    text = str(info.value)
    assert "num_models: store has 12, new spec has 13" in text
    assert "'margins'" in text and "float32" in text
    assert "'extra'" in text
    assert "nothing was changed" in text
    assert len(info.value.differences) == 3
    assert file_bytes(tmp_path) == before
    assert not (tmp_path / "extra.npy").exists()


def _make_seed_store(path: Path, spec: Spec) -> None:
    """A store as the seed's initialize_store makes it: open_memmap, no spec.json."""
    path.mkdir()
    for key, entry in spec.schema.items():
        m = np.lib.format.open_memmap(
            path / f"{key}.npy", mode="w+", dtype=entry.dtype, shape=(spec.num_models, *entry.shape)
        )
        m.flush()
        del m
    m = np.lib.format.open_memmap(
        path / "_completed.npy", mode="w+", dtype=bool, shape=(spec.num_models,)
    )
    m.flush()
    del m


def test_seed_store_opens_and_is_adopted(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    _make_seed_store(seed, SPEC)
    # the seed's worker writes through a writable memmap
    m = np.load(seed / "margins.npy", mmap_mode="r+")
    m[2] = row(2)["margins"]
    m.flush()
    for key in ("masks", "loss"):
        m = np.load(seed / f"{key}.npy", mmap_mode="r+")
        m[2] = row(2)[key]
        m.flush()
    c = np.load(seed / "_completed.npy", mmap_mode="r+")
    c[2] = True
    c.flush()
    del m, c
    with Store.open(seed) as store:  # no spec.json: inferred from the arrays
        assert store.spec.differences(SPEC) == []
        assert store.completed_indices().tolist() == [2]
        store.write_row(5, row(5))
    with Store.initialize(seed, SPEC) as store:  # adopting writes spec.json, keeps rows
        assert store.completed_indices().tolist() == [2, 5]
        np.testing.assert_array_equal(store.read("margins")[2], row(2)["margins"])
    assert (seed / "spec.json").exists()


def test_seed_store_with_other_spec_refused(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    _make_seed_store(seed, SPEC)
    other = SPEC.to_dict()
    other["schema"]["masks"]["shape"] = [6]
    del other["schema"]["loss"]
    with pytest.raises(StoreMismatchError) as info:
        Store.initialize(seed, Spec.from_dict(other))
    assert any("masks.npy" in d for d in info.value.differences)
    assert any("['loss']" in d for d in info.value.differences)
    assert not (seed / "spec.json").exists()


def test_interrupted_initialization_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store_module._create_sparse_npy
    calls = []

    def crash_on_second(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-initialization")
        real(path, dtype, shape)

    monkeypatch.setattr(store_module, "_create_sparse_npy", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        Store.initialize(tmp_path, SPEC)
    assert not (tmp_path / "spec.json").exists()
    assert not list(tmp_path.glob(".*.tmp-*"))
    with pytest.raises(StoreError, match=r"no store at"):
        Store.open(tmp_path)
    monkeypatch.setattr(store_module, "_create_sparse_npy", real)
    with Store.initialize(tmp_path, SPEC) as store:
        assert store.status().completed == 0


def test_paper_scale_store_is_sparse(tmp_path: Path) -> None:
    spec = Spec.from_dict(
        {
            "num_models": 300_000,
            "schema": {
                "masks": {"shape": [50_000], "dtype": "bool_"},
                "margins": {"shape": [10_000], "dtype": "float16"},
            },
        }
    )
    with Store.initialize(tmp_path, spec) as store:
        masks = tmp_path / "masks.npy"
        assert masks.stat().st_size > 15e9
        allocated = sum(p.stat().st_blocks * 512 for p in tmp_path.glob("*.npy"))
        assert allocated < 10e6, f"{allocated} bytes allocated: creation wrote zeros"
        store.write_row(
            299_999, {"masks": np.ones(50_000, bool), "margins": np.full(10_000, 1.5, np.float16)}
        )
        assert store.status().missing_ranges == ((0, 299_998),)
    m = np.load(tmp_path / "margins.npy", mmap_mode="r")
    assert m.shape == (300_000, 10_000) and float(m[299_999, -1]) == 1.5


def test_bad_rows_write_nothing(tmp_path: Path) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        before = file_bytes(tmp_path)
        bad = row(1)
        bad["masks"] = np.full(5, 0.5)
        with pytest.raises(RowError, match="key 'masks'"):
            store.write_row(1, bad)
        assert file_bytes(tmp_path) == before
        with pytest.raises(StoreError, match=r"outside this store's range \[0, 12\)"):
            store.write_row(12, row(1))
        with pytest.raises(StoreError, match="must be an integer"):
            store.write_row(True, row(1))  # type: ignore[arg-type]
        with pytest.raises(StoreError, match="no key 'nope'"):
            store.read("nope")


def test_completed_rows_need_overwrite(tmp_path: Path) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        store.write_row(6, row(6))
        with pytest.raises(StoreError, match="already completed"):
            store.write_row(6, row(7))
        np.testing.assert_array_equal(store.read("margins")[6], row(6)["margins"])
        store.write_row(6, row(7), overwrite=True)
        np.testing.assert_array_equal(store.read("margins")[6], row(7)["margins"])
        assert store.is_completed(6)


class _Recorder:
    """Records the order of pwrite and fsync calls, naming files by their paths."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str, int]] = []
        real_pwrite, real_fsync = os.pwrite, os.fsync

        def name(fd: int) -> str:
            return Path(os.readlink(f"/proc/self/fd/{fd}")).name

        def pwrite(fd: int, data: object, offset: int) -> int:
            self.events.append(("pwrite", name(fd), offset))
            return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

        def fsync(fd: int) -> None:
            self.events.append(("fsync", name(fd), -1))
            real_fsync(fd)

        monkeypatch.setattr(store_module.os, "pwrite", pwrite)
        monkeypatch.setattr(store_module.os, "fsync", fsync)


def test_flag_written_only_after_data_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        rec = _Recorder(monkeypatch)
        store.write_row(5, row(5))
        kinds = [(e[0], e[1]) for e in rec.events]
        flag_write = kinds.index(("pwrite", "_completed.npy"))
        assert flag_write == len(kinds) - 2 and kinds[-1] == ("fsync", "_completed.npy")
        for key in SPEC.schema:
            assert ("pwrite", f"{key}.npy") in kinds[:flag_write]
            assert ("fsync", f"{key}.npy") in kinds[:flag_write]
        # each row goes to its exact byte range
        offsets = {e[1]: e[2] for e in rec.events if e[0] == "pwrite"}
        _, _, data_offset = store_module.read_npy_layout(tmp_path / "margins.npy")
        assert offsets["margins.npy"] == data_offset + 5 * 3 * 2

        rec.events.clear()
        store.write_row(5, row(8), overwrite=True)
        kinds = [(e[0], e[1]) for e in rec.events]
        # an overwrite first clears the flag durably, then writes, then sets it
        assert kinds[:2] == [("pwrite", "_completed.npy"), ("fsync", "_completed.npy")]
        assert kinds[-2:] == [("pwrite", "_completed.npy"), ("fsync", "_completed.npy")]


def test_crash_before_flag_leaves_index_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        store.write_row(2, row(2))
        real_fsync = os.fsync
        calls = []

        def dying_fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 3:  # after the flag was cleared, during the data fsyncs
                raise OSError(5, "simulated crash")
            real_fsync(fd)

        monkeypatch.setattr(store_module.os, "fsync", dying_fsync)
        with pytest.raises(OSError, match="simulated crash"):
            store.write_row(2, row(9), overwrite=True)
        with pytest.raises(OSError, match="simulated crash"):
            calls.clear()
            calls.append(-1)  # die at the second data fsync of a fresh index
            store.write_row(3, row(3))
        assert not store.is_completed(2)
        assert not store.is_completed(3)


def test_corrupt_or_missing_files_are_reported(tmp_path: Path) -> None:
    Store.initialize(tmp_path, SPEC).close()
    with open(tmp_path / "margins.npy", "r+b") as f:
        f.truncate(150)
    with pytest.raises(StoreError, match="truncated or corrupt"):
        Store.open(tmp_path)
    (tmp_path / "margins.npy").unlink()
    with pytest.raises(StoreError, match=r"margins\.npy is missing"):
        Store.open(tmp_path)
    with pytest.raises(StoreError, match="no store at"):
        Store.open(tmp_path / "elsewhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store.initialize(tmp_path / "file", SPEC)


def test_status_and_ranges() -> None:
    assert index_ranges(np.array([5, 1, 2, 3, 9, 10, 7])) == ((1, 3), (5, 5), (7, 7), (9, 10))
    assert index_ranges(np.array([], dtype=int)) == ()
    status = StoreStatus(
        num_models=100, completed=80, missing_ranges=tuple((i, i) for i in range(0, 40, 2))
    )
    assert status.fraction_completed == 0.8
    assert status.format_missing(limit=3) == "0, 2, 4, ... (17 more ranges)"
    assert "80/100 models completed (80.0%)" in str(status)


def test_group_commit_fsyncs_once_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        store.write_row(3, row(3))
        rec = _Recorder(monkeypatch)
        store.write_rows([(i, row(i + 1)) for i in (1, 3, 7, 8)], overwrite=True)
        kinds = [(e[0], e[1]) for e in rec.events]
        fsyncs = [k for k in kinds if k[0] == "fsync"]
        # the overwritten index's flag cleared (1), every data file (3), the flags (1)
        assert len(fsyncs) == 5
        assert kinds[:2] == [("pwrite", "_completed.npy"), ("fsync", "_completed.npy")]
        first_flag_set = kinds.index(("pwrite", "_completed.npy"), 2)
        assert all(k[1] != "_completed.npy" for k in kinds[2:first_flag_set])
        assert kinds[-1] == ("fsync", "_completed.npy")
        assert store.completed_indices().tolist() == [1, 3, 7, 8]
        for i in (1, 3, 7, 8):
            np.testing.assert_array_equal(store.read("margins")[i], row(i + 1)["margins"])
        bad = [(2, row(2)), (4, {"masks": np.zeros(5)})]
        with pytest.raises(RowError, match="model index 4"):
            store.write_rows(bad)
        assert not store.is_completed(2)  # checked before anything is written
        with pytest.raises(StoreError, match="appears twice"):
            store.write_rows([(5, row(5)), (5, row(5))])
        with pytest.raises(StoreError, match=r"already completed"):
            store.write_rows([(5, row(5)), (7, row(7))])
        assert not store.is_completed(5)


# ---------------------------------------------------------------- configuration ids
def config(lr: str) -> TrainingConfiguration:
    return TrainingConfiguration(
        schema=SPEC.to_dict()["schema"],
        main_import="trainer",
        args={"lr": lr},
        code="version:1",
        versions={"numpy": np.__version__},
    )


def test_configuration_files_and_ids(tmp_path: Path) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        store.write_row(0, row(0))
        # no configuration registered: no file, everything unknown
        assert not (tmp_path / "_configuration.npy").exists()
        assert store.configurations() == {}
        assert store.configuration_ids().tolist() == [UNKNOWN_CONFIGURATION] * 12
        assert store.configuration_ids([0, 3]).dtype == np.int32
        a = store.register_configuration(config("0.1"))
        b = store.register_configuration(config("2.0"))
        assert (a, b) == (0, 1)
        assert store.register_configuration(config("0.1")) == a  # same fingerprint, same id
        store.write_row(1, row(1), configuration_id=a)
        store.write_rows([(2, row(2)), (3, row(3))], configuration_id=b)
        ids = np.load(tmp_path / "_configuration.npy")
        assert ids.dtype == np.int32 and ids.shape == (12,)
        assert ids.tolist() == [-1, 0, 1, 1] + [-1] * 8
        assert store.configuration_ids([3, 1, 0]).tolist() == [1, 0, -1]
        # an overwrite without an id: the row's configuration is unknown again
        store.write_row(2, row(2), overwrite=True)
        assert store.configuration_ids([2]).tolist() == [-1]
        assert store.configurations() == {0: config("0.1"), 1: config("2.0")}
        with pytest.raises(StoreError, match="configuration id 7 is not registered"):
            store.write_row(5, row(5), configuration_id=7)
        assert not store.is_completed(5)
        with pytest.raises(StoreError, match="outside this store's range"):
            store.configuration_ids([12])
        with pytest.raises(StoreError, match="no key '_configuration'"):
            store.read("_configuration")
    table = json.loads((tmp_path / "configurations.json").read_text())["configurations"]
    assert sorted(table) == ["0", "1"]
    assert table["1"]["fingerprint"] == config("2.0").fingerprint()
    assert table["1"]["configuration"] == config("2.0").to_dict()
    assert table["0"]["registered"].endswith("+00:00")
    # reopening keeps it all; the spec is unchanged (no reserved array becomes a key)
    with Store.open(tmp_path) as store:
        assert list(store.spec.schema) == list(SPEC.schema)
        assert store.configuration_ids().tolist()[:4] == [-1, 0, -1, 1]
    Store.initialize(tmp_path, SPEC).close()


def test_seed_store_reads_unknown_and_keeps_working(tmp_path: Path) -> None:
    Store.initialize(tmp_path, SPEC).close()
    (tmp_path / "spec.json").unlink()  # as the seed made it
    with Store.open(tmp_path) as store:
        assert list(store.spec.schema) == sorted(SPEC.schema)
        store.write_row(4, row(4))
        assert store.configuration_ids([4]).tolist() == [UNKNOWN_CONFIGURATION]
        cid = store.register_configuration(config("0.1"))
        store.write_row(5, row(5), configuration_id=cid)
    # a seed store with _configuration.npy: the reserved array is not taken for a schema key
    with Store.open(tmp_path) as store:
        assert sorted(store.spec.schema) == sorted(SPEC.schema)
        assert store.configuration_ids([4, 5]).tolist() == [-1, 0]
    Store.initialize(tmp_path, SPEC).close()  # adopted, reserved arrays are not strays


def test_configuration_id_is_in_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        a = store.register_configuration(config("0.1"))
        b = store.register_configuration(config("2.0"))
        rec = _Recorder(monkeypatch)
        store.write_row(5, row(5), configuration_id=a)
        kinds = [(e[0], e[1]) for e in rec.events]
        id_write = kinds.index(("pwrite", "_configuration.npy"))
        id_sync = kinds.index(("fsync", "_configuration.npy"))
        flag_write = kinds.index(("pwrite", "_completed.npy"))
        for key in SPEC.schema:  # data written and fsynced, then the id, then the flag
            assert kinds.index(("fsync", f"{key}.npy")) < id_write
        assert id_write < id_sync < flag_write
        assert kinds[-2:] == [("pwrite", "_completed.npy"), ("fsync", "_completed.npy")]
        offsets = {e[1]: e[2] for e in rec.events if e[0] == "pwrite"}
        _, _, data_offset = store_module.read_npy_layout(tmp_path / "_configuration.npy")
        assert offsets["_configuration.npy"] == data_offset + 5 * 4

        rec.events.clear()
        store.write_row(5, row(8), overwrite=True, configuration_id=b)
        kinds = [(e[0], e[1]) for e in rec.events]
        # another configuration's overwrite: the flag is cleared durably before the new id
        assert kinds[:2] == [("pwrite", "_completed.npy"), ("fsync", "_completed.npy")]
        assert kinds.index(("pwrite", "_configuration.npy")) > 1
        assert store.configuration_ids([5]).tolist() == [b]


# the fsyncs of an overwrite: 1 the cleared flag, 2-4 the 3 data files, 5 the id, 6 the flag
@pytest.mark.parametrize("die_at", [2, 4, 5, 6])
def test_crash_mid_overwrite_by_another_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, die_at: int
) -> None:
    with Store.initialize(tmp_path, SPEC) as store:
        a = store.register_configuration(config("0.1"))
        b = store.register_configuration(config("2.0"))
        store.write_row(2, row(2), configuration_id=a)
        real_fsync = os.fsync
        calls = []

        def dying_fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == die_at:
                raise OSError(5, "simulated crash")
            real_fsync(fd)

        monkeypatch.setattr(store_module.os, "fsync", dying_fsync)
        with pytest.raises(OSError, match="simulated crash"):
            store.write_row(2, row(9), overwrite=True, configuration_id=b)
        monkeypatch.undo()
        # never completed with the old id and new data, or the new id and old data: before
        # the flag's own write, not completed; after it, completed with the new data and id
        if die_at < 6:
            assert not store.is_completed(2)
        else:
            assert store.is_completed(2) and store.configuration_ids([2]).tolist() == [b]
            np.testing.assert_array_equal(store.read("margins")[2], row(9)["margins"])
        store.write_row(2, row(9), overwrite=True, configuration_id=b)
        assert store.configuration_ids([2]).tolist() == [b]
        np.testing.assert_array_equal(store.read("margins")[2], row(9)["margins"])


def test_concurrent_registration_gives_one_id_per_configuration(tmp_path: Path) -> None:
    Store.initialize(tmp_path, SPEC).close()
    out = tmp_path / "ids"
    out.mkdir()
    pids = []
    for k in range(6):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                with Store.open(tmp_path) as store:
                    got = [store.register_configuration(config(str(j))) for j in (k % 3, 9, 5)]
                (out / str(k)).write_text(json.dumps(got))
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids] == [0] * 6
    with Store.open(tmp_path) as store:
        table = store.configurations()
    assert sorted(table) == list(range(len(table))) and len(table) == 5  # 0, 1, 2, 9, 5
    by_lr = {c.args["lr"]: cid for cid, c in table.items()}
    for k in range(6):
        assert json.loads((out / str(k)).read_text()) == [by_lr[str(k % 3)], by_lr["9"], by_lr["5"]]
