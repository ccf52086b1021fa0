"""Training configuration identity: normalized arguments, the code's hash or declared version,
the fingerprint, differences, and the round trip through JSON."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from dm_assets.training.configuration import (
    UNKNOWN_CONFIGURATION,
    ConfigurationError,
    TrainingConfiguration,
    configuration_for,
    installed_versions,
    normalize_args,
)

SCHEMA = {"margins": {"shape": [10], "dtype": "float16"}}
MODULE = "dm_assets_tests.scripts.outputs"


def test_unknown_is_minus_one() -> None:
    assert UNKNOWN_CONFIGURATION == -1


def test_arguments_are_normalized() -> None:
    assert normalize_args(["--digits.lr=0.1"]) == normalize_args(["--digits.lr", "0.1"])
    assert normalize_args(["--b=2", "--a", "1", "--flag"]) == {"a": "1", "b": "2", "flag": "true"}
    assert list(normalize_args(["--z=1", "--a=2"])) == ["a", "z"]  # sorted by name
    assert normalize_args(["--x=1", "--x", "2"]) == {"x": '["1", "2"]'}
    assert normalize_args(["data.csv", "--k=v", "--", "--not-an-option"]) == {
        "#0": "data.csv",
        "#1": "--not-an-option",
        "k": "v",
    }
    assert normalize_args(["--a=b=c"]) == {"a": "b=c"}
    assert normalize_args([]) == {}


def test_code_is_the_source_hash_or_the_declared_version() -> None:
    config = configuration_for(SCHEMA, MODULE, ["--digits.lr=0.1"])
    source = Path(sys.modules["dm_assets_tests"].__file__ or "").parent / "scripts/outputs.py"
    assert config.code == "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    assert configuration_for(SCHEMA, MODULE, [], version="v1.2").code == "version:v1.2"
    # a declared version needs no module at all
    assert configuration_for(SCHEMA, "no.such.module", [], version="3").code == "version:3"
    with pytest.raises(ConfigurationError, match="cannot find the trainer module"):
        configuration_for(SCHEMA, "no_such_module_xyz", [])
    with pytest.raises(ConfigurationError, match="non-empty string"):
        configuration_for(SCHEMA, MODULE, [], version=" ")
    with pytest.raises(ConfigurationError, match="no source file"):
        configuration_for(SCHEMA, "sys", [])  # a built-in module


def test_hashing_does_not_import_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "trainer_not_imported_xyz.py").write_text("raise SystemExit('imported!')\n")
    monkeypatch.chdir(tmp_path)  # the current directory is searched, as the worker does
    config = configuration_for(SCHEMA, "trainer_not_imported_xyz", [])
    assert config.code.startswith("sha256:")
    assert "trainer_not_imported_xyz" not in sys.modules
    assert str(tmp_path) not in sys.path


def test_versions_are_the_installed_ones() -> None:
    versions = installed_versions()
    assert set(versions) == {"dm_assets", "torch", "numpy"}
    import numpy

    assert versions["numpy"] == numpy.__version__
    assert configuration_for(SCHEMA, MODULE, []).versions == versions


def test_fingerprint_is_the_sha256_of_the_canonical_json() -> None:
    a = configuration_for(SCHEMA, MODULE, ["--digits.lr=0.1", "--digits.epochs", "3"])
    b = configuration_for(SCHEMA, MODULE, ["--digits.epochs=3", "--digits.lr", "0.1"])
    assert a == b and a.fingerprint() == b.fingerprint()
    canonical = json.dumps(a.to_dict(), sort_keys=True, separators=(",", ":"))
    assert a.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    assert len(a.fingerprint()) == 64
    c = configuration_for(SCHEMA, MODULE, ["--digits.lr=2.0", "--digits.epochs=3"])
    assert c.fingerprint() != a.fingerprint()
    # num_models is not part of it: a grown store keeps its configuration
    assert "num_models" not in json.dumps(a.to_dict())


def test_round_trip_and_validation() -> None:
    config = configuration_for(SCHEMA, MODULE, ["--a=1"], version="7")
    again = TrainingConfiguration.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.fingerprint() == config.fingerprint()
    with pytest.raises(ConfigurationError) as info:
        TrainingConfiguration.from_dict({"schema": [], "main_import": 3, "args": {"a": 1}})
    message = str(info.value)
    assert "missing field(s) ['code', 'versions']" in message
    with pytest.raises(ConfigurationError, match="must be a JSON object"):
        TrainingConfiguration.from_dict([1])


def test_differences_name_each_change_old_to_new() -> None:
    old = TrainingConfiguration(
        schema=SCHEMA,
        main_import="a.b",
        args={"digits.lr": "0.1", "seed": "1"},
        code="sha256:" + "1a2b3c4d" + "0" * 56,
        versions={"dm_assets": "0.1.0", "numpy": "2.4.6", "torch": "2.13.0"},
    )
    new = TrainingConfiguration(
        schema={"margins": {"shape": [20], "dtype": "float16"}},
        main_import="a.c",
        args={"digits.lr": "2.0", "digits.epochs": "5"},
        code="sha256:" + "5e6f7a8b" + "f" * 56,
        versions={"dm_assets": "0.1.0", "numpy": "2.4.6", "torch": "2.14.0"},
    )
    assert old.differences(new) == [
        "schema.margins: shape [10] dtype float16 -> shape [20] dtype float16",
        "main_import: a.b -> a.c",
        "digits.epochs: (absent) -> 5",
        "digits.lr: 0.1 -> 2.0",
        "seed: 1 -> (absent)",
        "code: sha256:1a2b3c4d -> sha256:5e6f7a8b",
        "torch: 2.13.0 -> 2.14.0",
    ]
    assert old.differences(old) == []
    versioned = TrainingConfiguration(SCHEMA, "a.b", {}, "version:1", {})
    assert versioned.differences(TrainingConfiguration(SCHEMA, "a.b", {}, "version:2", {})) == [
        "code: version:1 -> version:2"
    ]
