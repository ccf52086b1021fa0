"""Growing a store: more rows in place, sparsely, every row, flag and configuration id kept
bit for bit; never shrinking; a header without room is rewritten safely; an interrupted grow is
reported and finished."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from dm_assets.store import store as store_module
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store, StoreError, StoreMismatchError, read_npy_layout
from dm_assets.training.configuration import UNKNOWN_CONFIGURATION, configuration_for

WIDTH = 4096  # float32: 16 KiB a row, so sparseness shows in st_blocks


def spec(num_models: int) -> Spec:
    return Spec.from_dict(
        {
            "num_models": num_models,
            "schema": {
                "margins": {"shape": [WIDTH], "dtype": "float32"},
                "masks": {"shape": [37], "dtype": "bool_"},
                "loss": {"shape": [], "dtype": "float16"},
            },
        }
    )


def row(i: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {
        "margins": (rng.standard_normal(WIDTH) * scale).astype(np.float32),
        "masks": rng.random(37) < 0.5,
        "loss": np.float16(i / 7),
    }


def data_of(path: Path) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
    """Every .npy array of the store, as (shape, bytes of the data) read with numpy."""
    out = {}
    for file in sorted(path.glob("*.npy")):
        arr = np.load(file, mmap_mode="r")
        out[file.stem] = (arr.shape, np.asarray(arr))
    return out


def fill_store(path: Path, num_models: int) -> Store:
    store = Store.initialize(path, spec(num_models))
    a = store.register_configuration(
        configuration_for(spec(1).to_dict()["schema"], "x", ["--lr=0.1"], version="1")
    )
    b = store.register_configuration(
        configuration_for(spec(1).to_dict()["schema"], "x", ["--lr=2.0"], version="1")
    )
    rng = np.random.default_rng(0)
    for i in rng.choice(num_models, size=num_models // 3, replace=False):
        cid = [a, b, None][int(i) % 3]
        store.write_row(int(i), row(int(i)), configuration_id=cid)
    return store


def test_grow_300_to_600_keeps_every_row_flag_and_id(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = fill_store(path, 300)
    before = data_of(path)
    ids_before = store.configuration_ids()
    completed_before = store.completed_mask()
    assert set(ids_before[completed_before].tolist()) == {0, 1, UNKNOWN_CONFIGURATION}
    store.grow(600)
    assert store.spec.num_models == 600
    after = data_of(path)
    assert set(after) == set(before) == {"margins", "masks", "loss", "_completed", "_configuration"}
    for key, (shape, data) in before.items():
        new_shape, new_data = after[key]
        assert new_shape == (600, *shape[1:])
        # the first 300 rows, bit for bit (compared as bytes, so NaN or -0.0 cannot hide)
        assert new_data[:300].tobytes() == data.tobytes(), key
    # the new rows: not completed, configuration unknown, zeros
    assert not after["_completed"][1][300:].any()
    assert (after["_configuration"][1][300:] == UNKNOWN_CONFIGURATION).all()
    assert not after["margins"][1][300:].any()
    np.testing.assert_array_equal(store.configuration_ids()[:300], ids_before)
    assert json.loads((path / "spec.json").read_text())["num_models"] == 600
    # reopened, and usable at the new indices
    store.close()
    with Store.open(path) as store:
        assert store.spec.num_models == 600
        assert store.completed_indices().tolist() == np.flatnonzero(completed_before).tolist()
        store.write_row(599, row(599), configuration_id=1)
        assert store.configuration_ids([599]).tolist() == [1]
        np.testing.assert_array_equal(store.read("margins")[599], row(599)["margins"])


def test_grown_files_stay_sparse(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.initialize(path, spec(300)) as store:
        for i in range(3):
            store.write_row(i, row(i))
        store.grow(60_000)  # 60,000 rows of 16 KiB: about 1 GB apparent size
    st = (path / "margins.npy").stat()
    assert st.st_size > 900 * 2**20
    # allocated: the 3 rows written, and a little for the header and filesystem granularity
    assert st.st_blocks * 512 < 3 * 4 * WIDTH + 2**20, st.st_blocks


def test_shrinking_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    fill_store(path, 300).close()
    before = data_of(path)
    with Store.open(path) as store, pytest.raises(StoreError) as info:
        store.grow(200)
    message = str(info.value)
    assert "from 300 to 200 models" in message and "only grows" in message
    assert "Keep num_models at 300 or more" in message and "new store" in message
    with pytest.raises(StoreError, match="from 300 to 200 models"):
        Store.initialize(path, spec(200), grow=True)
    after = data_of(path)
    assert {k: v[1].tobytes() for k, v in after.items()} == {
        k: v[1].tobytes() for k, v in before.items()
    }


def test_initialize_grows_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "s"
    fill_store(path, 300).close()
    with pytest.raises(StoreMismatchError, match="num_models: store has 300, new spec has 600"):
        Store.initialize(path, spec(600))
    with Store.open(path) as store:
        assert store.spec.num_models == 300
    other = Spec.from_dict(
        {"num_models": 600, "schema": {"margins": {"shape": [WIDTH], "dtype": "float16"}}}
    )
    with pytest.raises(StoreMismatchError, match="margins"):
        Store.initialize(path, other, grow=True)
    with Store.initialize(path, spec(600), grow=True) as store:
        assert store.spec.num_models == 600
        assert store.status().completed == 100
    with Store.initialize(path, spec(600), grow=True) as store:  # the same size: unchanged
        assert store.spec.num_models == 600


def test_seed_store_grows_and_reads_unknown(tmp_path: Path) -> None:
    """A seed store (no spec.json, no _configuration.npy) grows through initialize(grow=True)."""
    path = tmp_path / "seed"
    path.mkdir()
    margins = np.lib.format.open_memmap(path / "margins.npy", "w+", np.float32, (300, WIDTH))
    masks = np.lib.format.open_memmap(path / "masks.npy", "w+", np.bool_, (300, 37))
    loss = np.lib.format.open_memmap(path / "loss.npy", "w+", np.float16, (300,))
    done = np.lib.format.open_memmap(path / "_completed.npy", "w+", np.bool_, (300,))
    for i in (0, 5, 299):
        r = row(i)
        margins[i], masks[i], loss[i], done[i] = r["margins"], r["masks"], r["loss"], True
    for arr in (margins, masks, loss, done):
        arr.flush()
    del margins, masks, loss, done
    before = data_of(path)
    with Store.open(path) as store:
        assert store.configurations() == {}
        assert (store.configuration_ids() == UNKNOWN_CONFIGURATION).all()
        with pytest.raises(StoreError, match="from 300 to 200 models"):
            store.grow(200)
    with Store.initialize(path, spec(600), grow=True) as store:
        assert store.completed_indices().tolist() == [0, 5, 299]
        assert (store.configuration_ids() == UNKNOWN_CONFIGURATION).all()
    after = data_of(path)
    for key, (_, data) in before.items():
        assert after[key][1][:300].tobytes() == data.tobytes()
    assert not (path / "_configuration.npy").exists()


def _tight_header_npy(path: Path, dtype: np.dtype, rows: int, data: np.ndarray) -> None:
    """A .npy file whose header is padded to 16 bytes and ends right after its '}' (numpy
    before 1.14 aligned to 16 bytes and, before 1.23, left no room to grow)."""
    text = (
        f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, "
        f"'shape': ({rows},), }}"
    )
    missing = -(10 + len(text) + 1) % 16
    text = text.replace("{", "{" + " " * missing, 1)  # inside the dict: nothing after the '}'
    body = (text + "\n").encode("latin1")
    assert (10 + len(body)) % 16 == 0
    with open(path, "wb") as f:
        f.write(np.lib.format.magic(1, 0) + len(body).to_bytes(2, "little") + body)
        f.write(np.ascontiguousarray(data, dtype=dtype).tobytes())


def test_header_room() -> None:
    """The header is rewritten in place only when the new shape fits in the old header."""
    f4 = np.dtype(np.float32)
    header = store_module._header_in_place(f4, (1000, 50), 128, (1, 0))
    assert header is not None and len(header) == 128
    buf = io.BytesIO(header)
    assert np.lib.format.read_magic(buf) == (1, 0)
    assert np.lib.format.read_array_header_1_0(buf) == ((1000, 50), False, f4)
    # numpy < 1.14 wrote e.g. 80-byte headers; (10**6, 10**5) needs 82 bytes
    assert store_module._header_in_place(f4, (10**6, 10**5), 80, (1, 0)) is None
    assert store_module._header_in_place(f4, (10**5, 10**5), 80, (1, 0)) is not None
    assert len(store_module._header_in_place(f4, (7,), 80, (2, 0)) or b"") == 80


def test_header_without_room_is_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the headers below have room for 1000 rows; a header without room (tested above) takes
    # the rewrite path, forced here
    monkeypatch.setattr(store_module, "_header_in_place", lambda *a: None)
    path = tmp_path / "seed"
    path.mkdir()
    rng = np.random.default_rng(3)
    values = rng.standard_normal(999).astype(np.float32)
    values[500:700] = 0  # a zero run: skipped by the copy, must still read back as zeros
    _tight_header_npy(path / "loss.npy", np.dtype(np.float32), 999, values)
    flags = np.zeros(999, dtype=bool)
    flags[::3] = True
    _tight_header_npy(path / "_completed.npy", np.dtype(bool), 999, flags)
    loss_spec = {"loss": {"shape": [], "dtype": "float32"}}
    _, _, old_offset = read_npy_layout(path / "loss.npy")
    inode = (path / "loss.npy").stat().st_ino
    Store.initialize(path, Spec.from_dict({"num_models": 1000, "schema": loss_spec}), grow=True)
    shape, _, new_offset = read_npy_layout(path / "loss.npy")
    assert shape == (1000,) and new_offset > old_offset
    assert (path / "loss.npy").stat().st_ino != inode  # a new file, renamed into place
    grown = np.load(path / "loss.npy")
    assert grown[:999].tobytes() == values.tobytes() and grown[999] == 0
    assert np.load(path / "_completed.npy")[:999].tobytes() == flags.tobytes()
    assert not list(path.glob(".*grow-tmp*")) and not (path / ".grow.json").exists()
    # the rewritten header has numpy's room to grow again in place
    monkeypatch.undo()
    Store.initialize(path, Spec.from_dict({"num_models": 10**6, "schema": loss_spec}), grow=True)
    _, _, offset = read_npy_layout(path / "loss.npy")
    assert offset == new_offset
    assert np.load(path / "loss.npy", mmap_mode="r")[:999].tobytes() == values.tobytes()


def test_writer_opened_before_a_rewrite_writes_to_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_header_in_place", lambda *a: None)
    path = tmp_path / "seed"
    path.mkdir()
    _tight_header_npy(path / "loss.npy", np.dtype(np.float32), 999, np.zeros(999))
    _tight_header_npy(path / "_completed.npy", np.dtype(bool), 999, np.zeros(999))
    schema = {"loss": {"shape": [], "dtype": "float32"}}
    writer = Store.open(path)
    writer.write_row(1, {"loss": 1.5})
    Store.initialize(path, Spec.from_dict({"num_models": 1000, "schema": schema}), grow=True)
    writer.write_row(2, {"loss": 2.5})  # its files were replaced: it follows them
    writer.close()
    with Store.open(path) as store:
        assert store.spec.num_models == 1000
        assert store.completed_indices().tolist() == [1, 2]
        assert store.read("loss")[[1, 2]].tolist() == [1.5, 2.5]


def test_interrupted_grow_is_reported_and_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    store = fill_store(path, 300)
    before = data_of(path)
    real = store_module._grow_npy
    calls = []

    def dying_grow(file: Path, num_models: int, fill: np.ndarray | None) -> None:
        calls.append(file.name)
        if len(calls) == 3:
            raise OSError(5, "simulated crash")
        real(file, num_models, fill)

    monkeypatch.setattr(store_module, "_grow_npy", dying_grow)
    with pytest.raises(OSError, match="simulated crash"):
        store.grow(600)
    monkeypatch.setattr(store_module, "_grow_npy", real)
    store.close()
    with pytest.raises(StoreError, match=r"grow of the store .* to 600 models was interrupted"):
        Store.open(path)
    with pytest.raises(StoreError, match="grow it to 600 or more, not 400"):
        Store.initialize(path, spec(400), grow=True)
    with Store.initialize(path, spec(600), grow=True) as store:
        assert store.spec.num_models == 600
    after = data_of(path)
    for key, (_, data) in before.items():
        assert after[key][0][0] == 600
        assert after[key][1][:300].tobytes() == data.tobytes(), key
    assert (after["_configuration"][1][300:] == UNKNOWN_CONFIGURATION).all()


def test_grow_killed_inside_a_file_is_finished(tmp_path: Path) -> None:
    """A crash after a file was extended but before its header was rewritten."""
    path = tmp_path / "s"
    fill_store(path, 300).close()
    before = data_of(path)
    ids = path / "_configuration.npy"
    _, _, offset = read_npy_layout(ids)
    with open(ids, "r+b") as f:  # extended (with a partial fill), header still for 300
        f.truncate(offset + 600 * 4)
        f.seek(offset + 300 * 4)
        f.write(b"\xff" * 40)
    (path / ".grow.json").write_text('{"num_models": 600}\n')
    with Store.initialize(path, spec(600), grow=True) as store:
        assert (store.configuration_ids()[300:] == UNKNOWN_CONFIGURATION).all()
        np.testing.assert_array_equal(store.configuration_ids()[:300], before["_configuration"][1])
    assert os.path.getsize(ids) == offset + 600 * 4
