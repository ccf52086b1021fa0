"""Checking returned values against the schema: every fault named, nothing silently cast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dm_assets.store.rows import RowError, coerce_row, coerce_value
from dm_assets.store.spec import ArraySpec, Spec

SCHEMA = Spec.from_dict(
    {
        "num_models": 5,
        "schema": {
            "masks": {"shape": [6], "dtype": "bool_"},
            "margins": {"shape": [3], "dtype": "float16"},
            "counts": {"shape": [2], "dtype": "uint8"},
            "loss": {"shape": [], "dtype": "float32"},
        },
    }
).schema


def good() -> dict[str, object]:
    return {
        "masks": np.array([1, 0, 1, 1, 0, 0], dtype=bool),
        "margins": np.array([0.5, -1.25, 3.0]),
        "counts": [3, 4],
        "loss": 0.25,
    }


def test_good_row_is_cast_exactly() -> None:
    row = coerce_row(good(), SCHEMA)
    assert row["masks"].dtype == np.bool_ and row["masks"].tolist() == [1, 0, 1, 1, 0, 0]
    assert row["margins"].dtype == np.float16 and row["margins"].tolist() == [0.5, -1.25, 3.0]
    assert row["counts"].dtype == np.uint8 and row["counts"].tolist() == [3, 4]
    assert row["loss"].shape == () and float(row["loss"]) == 0.25
    assert all(a.flags.c_contiguous for a in row.values())


def test_seed_style_values_accepted() -> None:
    # the seed's minimal example returns float64 ones * 2 for a uint8 key
    arr, problem = coerce_value("x", np.ones(4) * 2, ArraySpec((4,), np.dtype(np.uint8)))
    assert problem is None and arr is not None and arr.tolist() == [2, 2, 2, 2]
    # 0/1 integer masks go into bool keys
    row = good()
    row["masks"] = np.array([1, 0, 1, 1, 0, 0], dtype=np.uint8)
    assert coerce_row(row, SCHEMA)["masks"].dtype == np.bool_


def test_torch_tensors_accepted() -> None:
    row = good()
    row["margins"] = torch.tensor([0.5, -1.25, 3.0], requires_grad=True) * 1
    row["masks"] = torch.tensor([True, False, True, True, False, False])
    out = coerce_row(row, SCHEMA)
    assert out["margins"].tolist() == [0.5, -1.25, 3.0]


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("masks", np.array([0.5, 1, 0, 0, 1, 1]), "floats do not go into a bool array"),
        ("masks", np.array([2, 1, 0, 0, 1, 1]), "values other than 0 and 1"),
        ("masks", np.ones(5, dtype=bool), "expected shape [6] dtype bool_, received shape [5]"),
        ("margins", np.array([[0.5, 1.0, 2.0]]), "received shape [1, 3] dtype float64"),
        ("margins", np.array([np.nan, 1.0, np.inf]), "2 non-finite value(s) (1 NaN)"),
        ("margins", np.array([1e6, 1.0, 2.0]), "overflow float16"),
        ("margins", np.array([70000, 1, 2]), "overflow float16"),
        ("margins", np.array([1 + 2j, 1.0, 2.0]), "complex values do not go into a float array"),
        ("counts", np.array([1.5, 2.0]), "non-integral values"),
        ("counts", np.array([256, 2]), "outside uint8's range [0, 255]"),
        ("counts", np.array([-1, 2]), "outside uint8's range"),
        ("counts", np.array(["a", "b"]), "non-numeric"),
        ("loss", [1.0, 2.0], "expected shape [] dtype float32, received shape [2]"),
        ("loss", None, "non-numeric"),
        ("loss", [[1.0], [2.0, 3.0]], "numpy cannot convert"),
    ],
)
def test_each_fault_named(key: str, value: object, needle: str) -> None:
    row = good()
    row[key] = value
    with pytest.raises(RowError) as info:
        coerce_row(row, SCHEMA, index=7)
    text = str(info.value)
    assert f"key {key!r}" in text
    assert needle in text, text
    assert "model index 7" in text and "nothing written" in text


def test_key_set_faults_all_reported() -> None:
    row = good()
    del row["loss"]
    row["bonus"] = 1
    row["_completed"] = True
    row["margins"] = np.zeros(4)
    with pytest.raises(RowError) as info:
        coerce_row(row, SCHEMA)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    assert "'_completed' is reserved" in text
    assert "unexpected key(s) ['bonus']" in text
    assert "missing key(s) ['loss']" in text
    assert "key 'margins'" in text


def test_not_a_mapping() -> None:
    with pytest.raises(RowError, match="must return a dict"):
        coerce_row([1, 2], SCHEMA)
