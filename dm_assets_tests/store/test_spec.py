"""The spec: the seed's JSON format, validated with every problem reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dm_assets.store.spec import COMPLETED_KEY, Spec, SpecError, key_problem, parse_dtype

SEED_MINIMAL = {"schema": {"random_numbers": {"dtype": "uint8", "shape": [256]}}, "num_models": 10}


def test_seed_spec_parses() -> None:
    spec = Spec.from_dict(SEED_MINIMAL)
    assert spec.num_models == 10
    entry = spec.schema["random_numbers"]
    assert entry.shape == (256,)
    assert entry.dtype == np.dtype(np.uint8)
    assert entry.row_nbytes == 256


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bool_", np.bool_),
        ("bool", np.bool_),
        ("uint8", np.uint8),
        ("float16", np.float16),
        ("float32", np.float32),
        ("int64", np.int64),
        ("complex64", np.complex64),
    ],
)
def test_seed_dtype_names(name: str, expected: type) -> None:
    assert parse_dtype(name) == np.dtype(expected)


@pytest.mark.parametrize(
    "name", ["object_", "str_", "bytes_", "void", "float128x", "", "ndarray", "sum", 3]
)
def test_bad_dtypes_rejected(name: object) -> None:
    with pytest.raises(ValueError, match="numpy type name"):
        parse_dtype(name)


def test_scalar_and_empty_shapes_allowed() -> None:
    spec = Spec.from_dict(
        {
            "num_models": 3,
            "schema": {
                "loss": {"shape": [], "dtype": "float32"},
                "none": {"shape": [0], "dtype": "uint8"},
            },
        }
    )
    assert spec.schema["loss"].shape == ()
    assert spec.schema["none"].row_nbytes == 0


def test_every_problem_reported_at_once() -> None:
    bad = {
        "num_models": -3,
        "schema": {
            "ok": {"shape": [2], "dtype": "float32"},
            "../escape": {"shape": [2], "dtype": "float32"},
            "a/b": {"shape": [2], "dtype": "float32"},
            "": {"shape": [1], "dtype": "uint8"},
            "_completed": {"shape": [], "dtype": "bool_"},
            "_private": {"shape": [], "dtype": "bool_"},
            "shape_str": {"shape": "10", "dtype": "float32"},
            "shape_neg": {"shape": [3, -1], "dtype": "float32"},
            "shape_float": {"shape": [2.5], "dtype": "float32"},
            "no_shape": {"dtype": "float32"},
            "no_dtype": {"shape": [1]},
            "obj": {"shape": [1], "dtype": "object_"},
            "typo": {"shape": [1], "dtype": "float32", "dtpye": "x"},
        },
    }
    with pytest.raises(SpecError) as info:
        Spec.from_dict(bad, source="my_spec.json")
    problems = info.value.problems
    text = str(info.value)
    assert "my_spec.json" in text
    assert len(problems) == 13, problems
    for needle in [
        "'num_models' must be a positive integer",
        "'../escape'",
        "'a/b'",
        "schema key '' is empty",
        "reserved for the store's completion flags",
        "'_private' starts with '_'",
        "'shape_str'",
        "'shape_neg'",
        "'shape_float'",
        "'no_shape': missing 'shape'",
        "'no_dtype': missing 'dtype'",
        "'obj'",
        "unknown field(s) ['dtpye']",
    ]:
        assert needle in text, needle


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"schema": {"x": {"shape": [], "dtype": "uint8"}}}, "missing 'num_models'"),
        ({"num_models": 3}, "missing 'schema'"),
        ({}, "missing 'num_models'"),
        (
            {"num_models": True, "schema": {"x": {"shape": [], "dtype": "uint8"}}},
            "positive integer",
        ),
        ({"num_models": 2.0, "schema": {"x": {"shape": [], "dtype": "uint8"}}}, "positive integer"),
        ({"num_models": 0, "schema": {"x": {"shape": [], "dtype": "uint8"}}}, "positive integer"),
        ({"num_models": 2, "schema": {}}, "'schema' is empty"),
        ({"num_models": 2, "schema": []}, "'schema' must be an object"),
        ({"num_models": 2, "schema": {"x": [1]}}, "key 'x': must be an object"),
        ({"num_models": 2, "schema": {"x": {"shape": [True], "dtype": "uint8"}}}, "non-negative"),
        ([1, 2], "must be a JSON object"),
        (
            {"num_models": 2, "schema": {"x": {"shape": [], "dtype": "uint8"}}, "extra": 1},
            "unknown top-level field",
        ),
    ],
)
def test_single_problems(doc: object, needle: str) -> None:
    with pytest.raises(SpecError, match="invalid spec") as info:
        Spec.from_dict(doc)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "key", ["..", ".", ".hidden", "a\\b", "a\x00b", "x..y", "tab\there", "k" * 300]
)
def test_unsafe_keys(key: str) -> None:
    assert key_problem(key) is not None


@pytest.mark.parametrize("key", ["masks", "margins", "logits-v2", "a.b", "Margins_10"])
def test_safe_keys(key: str) -> None:
    assert key_problem(key) is None


def test_load_reports_file_problems(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        Spec.load(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"num_models": 3,')
    with pytest.raises(SpecError, match=r"not valid JSON \(line 1"):
        Spec.load(broken)


def test_round_trip_and_differences(tmp_path: Path) -> None:
    spec = Spec.from_dict(SEED_MINIMAL)
    path = tmp_path / "spec.json"
    path.write_text(spec.dumps())
    again = Spec.load(path)
    assert again == spec
    assert json.loads(path.read_text()) == SEED_MINIMAL
    other = Spec.from_dict(
        {
            "num_models": 11,
            "schema": {
                "random_numbers": {"dtype": "uint16", "shape": [256]},
                "extra": {"dtype": "bool_", "shape": []},
            },
        }
    )
    diffs = spec.differences(other)
    assert len(diffs) == 3
    assert any("num_models: store has 10, new spec has 11" in d for d in diffs)
    assert any("'random_numbers'" in d and "uint16" in d for d in diffs)
    assert any("'extra'" in d for d in diffs)
    assert spec.differences(again) == []


def test_bool_spellings_are_the_same_spec() -> None:
    a = Spec.from_dict({"num_models": 2, "schema": {"m": {"shape": [3], "dtype": "bool_"}}})
    b = Spec.from_dict({"num_models": 2, "schema": {"m": {"shape": [3], "dtype": "bool"}}})
    assert a.differences(b) == []
    assert COMPLETED_KEY == "_completed"
