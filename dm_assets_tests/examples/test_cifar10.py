"""The CIFAR-10 example on a tiny generated dataset in CIFAR-10's python format: the converter
(round trip through FFCV's loader, errors), ResNet-9, the augmentations, the mask, the margins,
and the training script in this process and through the worker command line."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dm_assets.examples.cifar10 import gpu_check, train_cifar
from dm_assets.examples.cifar10.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    augment,
    cutout,
    normalize,
    random_flip,
    random_translate,
)
from dm_assets.examples.cifar10.convert import (
    TEST_FILE,
    TRAIN_FILES,
    CifarError,
    convert,
    make_fake_cifar,
    read_cifar_python,
)
from dm_assets.examples.cifar10.convert import main as convert_main
from dm_assets.examples.cifar10.data import DatasetError, image_beton
from dm_assets.examples.cifar10.model import resnet9
from dm_assets.examples.cifar10.train import (
    TrainingSettings,
    class_margins,
    lr_multipliers,
    make_mask,
    mask_index,
    pick_device,
    train_model,
)
from dm_assets.pipeline.experiment import load_experiment
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets_tests.helpers import REPO_ROOT, cli_env, run_module

N_TRAIN, N_TEST = 64, 32
EXAMPLE = REPO_ROOT / "dm_assets" / "examples" / "cifar10"
# One epoch of 2 batches of 16 on an 8-channel ResNet-9: a fraction of a second per model.
TINY_ARGS = [
    "--training.epochs=1",
    "--training.lr_peak_epoch=0.5",
    "--training.batch_size=16",
    "--training.width=8",
    "--training.lr=0.2",
    "--data.num_workers=1",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared two-core machine, two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_cifar(tmp_path_factory.mktemp("cifar") / "batches", N_TRAIN, N_TEST, seed=0)


@pytest.fixture(scope="module")
def betons(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return convert(cifar_dir, tmp_path_factory.mktemp("betons"), num_workers=1)


def _official_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A batch decoded as CIFAR-10's page says: rows of 1024 R, 1024 G, 1024 B values."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch[b"data"]
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.array(batch[b"labels"])


def _source(cifar_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts = [_official_read(cifar_dir / name) for name in TRAIN_FILES]
    return {
        "train": (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])),
        "val": _official_read(cifar_dir / TEST_FILE),
    }


# ------------------------------------------------------------------------------- convert
def test_fake_batches_have_the_official_format(cifar_dir: Path, tmp_path: Path) -> None:
    with open(cifar_dir / TRAIN_FILES[0], "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (N_TRAIN // 5 + 1, 3072)
    assert all(isinstance(v, int) and 0 <= v < 10 for v in batch[b"labels"])
    sizes = [len(_official_read(cifar_dir / n)[1]) for n in TRAIN_FILES]
    assert sum(sizes) == N_TRAIN and max(sizes) - min(sizes) <= 1
    again = make_fake_cifar(tmp_path / "again", N_TRAIN, N_TEST, seed=0)
    for name in (*TRAIN_FILES, TEST_FILE):
        assert (again / name).read_bytes() == (cifar_dir / name).read_bytes()


def test_convert_round_trip_through_ffcv_loader(cifar_dir: Path, betons: dict[str, Path]) -> None:
    """Every pixel and label read back by FFCV's own Loader equals the source's."""
    from dm_assets.regression.ffcv_glue import ffcv_classes as _ffcv

    ffcv = _ffcv()
    from ffcv.fields.decoders import SimpleRGBImageDecoder

    for split, (images, labels) in _source(cifar_dir).items():
        loader = ffcv.Loader(
            str(betons[split]),
            batch_size=10,
            num_workers=1,
            order=ffcv.OrderOption.SEQUENTIAL,
            drop_last=False,
            pipelines={
                "image": [SimpleRGBImageDecoder(), ffcv.ToTensor()],
                "label": [ffcv.IntDecoder(), ffcv.ToTensor(), ffcv.Squeeze(1)],
            },
        )
        got_images, got_labels = [], []
        for image_batch, label_batch in loader:
            got_images.append(image_batch.numpy().copy())  # FFCV reuses its buffers
            got_labels.append(label_batch.numpy().copy())
        assert np.array_equal(np.concatenate(got_images), images), split
        assert np.array_equal(np.concatenate(got_labels), labels), split
    torch.set_num_threads(1)  # FFCV's loader set it to its worker count


def test_image_beton_batches_follow_the_order(cifar_dir: Path, betons: dict[str, Path]) -> None:
    images, labels = _source(cifar_dir)["train"]
    data = image_beton(betons["train"], batch_size=16, num_workers=1)
    assert data.n_rows == N_TRAIN and np.array_equal(data.labels, labels)
    order = np.random.default_rng(0).permutation(N_TRAIN)[:40]
    batches = list(data.batches(order, device=torch.device("cpu")))
    assert [len(b[0]) for b in batches] == [16, 16, 8]
    got = torch.cat([b[0] for b in batches]).numpy()
    assert got.dtype == np.uint8 and np.array_equal(got, images[order])
    assert np.array_equal(torch.cat([b[1] for b in batches]).numpy(), labels[order])
    dropped = list(data.batches(order, device=torch.device("cpu"), drop_last=True))
    assert [len(b[0]) for b in dropped] == [16, 16]
    assert torch.get_num_threads() == 1  # kept, though FFCV sets it to its worker count
    assert image_beton(betons["train"], batch_size=16, num_workers=1) is data  # one per process
    with pytest.raises(DatasetError, match="row positions"):
        next(data.batches(np.array([N_TRAIN]), device=torch.device("cpu")))


def test_convert_cli(cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = convert_main(
        ["--cifar-dir", str(cifar_dir), "--out-dir", str(out), "--num-workers", "1"]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.beton", "val.beton"]  # no temp files
    assert f"train: {out / 'train.beton'}" in capsys.readouterr().out
    assert convert_main(["--cifar-dir", str(tmp_path / "nowhere"), "--out-dir", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def _write_batch(path: Path, content: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def test_convert_errors_name_every_problem(cifar_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CifarError, match=r"does not exist.*cifar-10-python\.tar\.gz"):
        read_cifar_python(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CifarError) as info:
        read_cifar_python(empty)
    assert "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch" in (
        str(info.value)
    )
    parent = tmp_path / "parent"
    make_fake_cifar(parent / "cifar-10-batches-py", 10, 2)
    with pytest.raises(CifarError, match=r"pass .*cifar-10-batches-py instead"):
        read_cifar_python(parent)

    bad = make_fake_cifar(tmp_path / "bad", 10, 2)
    _write_batch(bad / "data_batch_2", {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    _write_batch(bad / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})
    _write_batch(
        bad / "data_batch_4", {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}
    )
    _write_batch(bad / "data_batch_5", {b"labels": [0]})
    (bad / TEST_FILE).write_bytes(b"not a pickle")
    with pytest.raises(CifarError) as info:
        convert(bad, tmp_path / "out")
    problems = info.value.problems
    assert len(problems) == 5, problems
    assert "data_batch_2: 'data' has shape [2, 1024]" in problems[0]
    assert "1 label(s) outside 0..9 (e.g. 12)" in problems[1]
    assert "'data' is a float32 array of shape [2, 3072]" in problems[2]
    assert "data_batch_5: has no 'data' entry" in problems[3]
    assert "test_batch: not a CIFAR-10 python batch" in problems[4]
    assert not (tmp_path / "out").exists()  # nothing written

    _write_batch(bad / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(CifarError, match="2 images but 1 labels"):
        read_cifar_python(bad)


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("ran code from a pickle",))


def test_batches_that_would_run_code_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_fake_cifar(tmp_path / "evil", 10, 2)
    _write_batch(folder / TEST_FILE, {b"data": _RunsCode(), b"labels": []})
    with pytest.raises(CifarError, match=r"refers to (__builtin__|builtins)\.print"):
        read_cifar_python(folder)
    assert "ran code" not in capsys.readouterr().out


# ------------------------------------------------------------------------------- model
def test_resnet9_shapes_and_size() -> None:
    model = resnet9().eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10) and logits.dtype == torch.float32
    conv = {(3, 64, 3), (64, 128, 5), (128, 128, 3), (128, 256, 3), (256, 256, 3), (256, 128, 3)}
    uses = {(128, 128, 3): 2, (256, 256, 3): 2}
    weights = sum(i * o * k * k * uses.get((i, o, k), 1) for i, o, k in conv)
    batch_norm = 2 * (64 + 128 + 2 * 128 + 256 + 2 * 256 + 128)
    assert sum(p.numel() for p in model.parameters()) == weights + batch_norm + 128 * 10
    narrow = resnet9(num_classes=3, width=8)
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="width=0"):
        resnet9(width=0)


# ------------------------------------------------------------------------------- augmentations
def _images(b: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 32, 32, generator=g) + 1.0  # no zeros, so cleared pixels show


def test_normalize() -> None:
    raw = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    out = normalize(raw)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    for c in range(3):
        expected = (raw[..., c].float() - CIFAR_MEAN[c]) / CIFAR_STD[c]
        assert torch.allclose(out[:, c], expected)


def test_flip_mirrors_about_half_the_images() -> None:
    x = _images()
    out = random_flip(x, torch.Generator().manual_seed(1))
    mirrored = [bool(torch.equal(o, i.flip(2))) for o, i in zip(out, x, strict=True)]
    same = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert all(m != s for m, s in zip(mirrored, same, strict=True))  # each one or the other
    assert 16 < sum(mirrored) < 48


def test_translate_shifts_each_image_within_the_padding() -> None:
    x = _images(32)
    out = random_translate(x, 2, torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for o, p in zip(out, padded, strict=True):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(o, p[:, dy : dy + 32, dx : dx + 32])
        ]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 5  # the images get different shifts
    assert torch.equal(random_translate(x, 0), x)


def test_cutout_zeroes_one_square_per_image() -> None:
    x = _images(32)
    out = cutout(x, 4, torch.Generator().manual_seed(3))
    for o, i in zip(out, x, strict=True):
        zero = (o == 0).all(0)  # (32, 32): the same pixels in every channel
        assert int((o == 0).sum()) == 3 * 16
        rows, cols = torch.nonzero(zero, as_tuple=True)
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
        assert torch.equal(o[:, ~zero], i[:, ~zero])


def test_augment_is_repeatable_with_a_seeded_generator() -> None:
    x = _images(16)
    a = augment(x, generator=torch.Generator().manual_seed(4))
    b = augment(x, generator=torch.Generator().manual_seed(4))
    c = augment(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------- the recipe
def test_mask_has_exactly_alpha_n_rows_and_depends_on_index_and_seed() -> None:
    m = make_mask(7, 50_000, 0.5)
    assert m.dtype == np.bool_ and m.shape == (50_000,) and m.sum() == 25_000
    assert np.array_equal(m, make_mask(7, 50_000, 0.5))
    assert not np.array_equal(m, make_mask(8, 50_000, 0.5))
    assert not np.array_equal(m, make_mask(7, 50_000, 0.5, seed=1))
    assert make_mask(0, 10, 0.25).sum() == 2  # round(2.5) to even
    with pytest.raises(ValueError, match=r"mask\.alpha=0"):
        make_mask(0, 10, 0)


def test_replicate_groups_share_the_mask_of_their_first_index() -> None:
    kw = {"repeat_start": 10, "repeats": 4}
    assert [mask_index(i, **kw) for i in range(8, 19)] == [8, 9] + [10] * 4 + [14] * 4 + [18]
    assert [mask_index(i) for i in range(5)] == list(range(5))  # no replicates by default
    with pytest.raises(ValueError, match=r"mask\.repeats=0"):
        mask_index(3, repeat_start=0, repeats=0)


def test_lr_schedule_is_the_seeds_triangle() -> None:
    s = lr_multipliers(24, 5, 48)
    assert s.shape == (24 * 48 + 1,)
    assert s[0] == 0 and s[5 * 48] == 1 and s[-1] == 0
    assert np.all(np.diff(s[: 5 * 48]) > 0) and np.all(np.diff(s[5 * 48 :]) < 0)


def test_class_margins() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    expected_lse = [2.0 - np.logaddexp(0.5, -1.0), 1.0 - np.logaddexp(0.0, 3.0)]
    assert np.allclose(class_margins(logits, labels).numpy(), expected_lse)
    assert np.allclose(class_margins(logits, labels, "max").numpy(), [1.5, -2.0])
    two = torch.tensor([[1.0, 3.0]])  # one other class: both definitions agree
    assert torch.allclose(class_margins(two, torch.tensor([1])), torch.tensor([2.0]))


def test_pick_device() -> None:
    assert pick_device({"DM_DEVICE": "cpu"}) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device({}).type == expected
    with pytest.raises(ValueError, match="use cuda, cuda:N or cpu"):
        pick_device({"DM_DEVICE": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            pick_device({"DM_DEVICE": "cuda"})


def test_settings_problems_are_all_reported(betons: dict[str, Path]) -> None:
    bad = replace(TrainingSettings(), epochs=2, lr_peak_epoch=3, precision="fp8", cutout=40)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as info:
        train_model(0, train_path=betons["train"], val_path=betons["val"], settings=bad)
    text = str(info.value)
    assert "lr_peak_epoch=3" in text and "precision='fp8'" in text and "cutout=40" in text
    too_big = replace(TrainingSettings(), batch_size=64, epochs=1, lr_peak_epoch=0.5)
    with pytest.raises(ValueError, match="batch_size=64 is more than the 32 rows"):
        train_model(0, train_path=betons["train"], val_path=betons["val"], settings=too_big)


# ------------------------------------------------------------------------------- the script
def _argv(betons: dict[str, Path], *extra: str) -> list[str]:
    return [
        "train_cifar",
        f"--data.train_dataset={betons['train']}",
        f"--data.val_dataset={betons['val']}",
        *TINY_ARGS,
        *extra,
    ]


def test_main_trains_a_tiny_model_on_cpu(
    betons: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DM_DEVICE", "cpu")
    monkeypatch.setattr(sys, "argv", _argv(betons))
    out = train_cifar.main(3, str(tmp_path))
    assert set(out) == {"masks", "margins"}
    masks, margins = out["masks"], out["margins"]
    assert masks.dtype == np.bool_ and masks.shape == (N_TRAIN,) and masks.sum() == N_TRAIN // 2
    assert margins.dtype == np.float16 and margins.shape == (N_TEST,)
    assert np.isfinite(margins).all()
    assert np.array_equal(masks, make_mask(3, N_TRAIN, 0.5))
    again = train_cifar.main(index=3, logdir=str(tmp_path))
    assert np.array_equal(again["masks"], masks)
    assert np.array_equal(again["margins"], margins)  # seeded: same rows, order, augmentations
    other = train_cifar.main(4, str(tmp_path))
    assert not np.array_equal(other["masks"], masks)
    assert not any(tmp_path.iterdir())  # logdir is not written to


def test_replicates_share_the_mask_and_train_with_their_own_seeds(
    betons: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DM_DEVICE", "cpu")
    monkeypatch.setattr(sys, "argv", _argv(betons, "--mask.repeat_start=2", "--mask.repeats=2"))
    first, second = train_cifar.main(2, str(tmp_path)), train_cifar.main(3, str(tmp_path))
    assert np.array_equal(first["masks"], make_mask(2, N_TRAIN, 0.5))
    assert np.array_equal(second["masks"], first["masks"])
    assert not np.array_equal(second["margins"], first["margins"])  # own weights, order, ...
    # before repeat_start every model keeps its own mask
    assert np.array_equal(train_cifar.main(1, str(tmp_path))["masks"], make_mask(1, N_TRAIN, 0.5))
    with pytest.raises(ValueError, match=r"mask.repeat_start=-2.*\n.*mask.repeats=0"):
        train_model(
            0,
            train_path=betons["train"],
            val_path=betons["val"],
            settings=replace(TrainingSettings(), epochs=1, lr_peak_epoch=0.5, batch_size=16),
            repeat_start=-2,
            repeats=0,
        )


def test_main_reports_bad_arguments_and_missing_data(
    betons: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DM_DEVICE", "cpu")
    monkeypatch.setattr(
        sys, "argv", _argv(betons, "--training.precision=fp8", "--training.nesterov=maybe")
    )
    with pytest.raises(train_cifar.ArgumentsError) as info:
        train_cifar.main(0, str(tmp_path))
    assert "--training.precision='fp8'" in str(info.value)
    assert "--training.nesterov='maybe'" in str(info.value)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            *_argv(betons, "--training.precision=fp16", "--training.nesterov=true"),
            f"--data.train_dataset={tmp_path / 'absent.beton'}",
        ],
    )
    with pytest.raises(DatasetError, match=r"no dataset at .*absent\.beton.*convert"):
        train_cifar.main(0, str(tmp_path))


def test_default_datasets_live_under_dm_home(tmp_path: Path) -> None:
    train, val = train_cifar.default_dataset_paths(tmp_path)
    assert train == tmp_path / "cifar10" / "betons" / "train.beton"
    assert val == tmp_path / "cifar10" / "betons" / "val.beton"


def test_script_through_the_worker_cli(betons: dict[str, Path], tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "num_models": 3,
                "schema": {
                    "masks": {"shape": [N_TRAIN], "dtype": "bool_"},
                    "margins": {"shape": [N_TEST], "dtype": "float16"},
                },
            }
        )
    )
    store = tmp_path / "store"
    run_module(
        "dm_assets.initialize_store",
        f"--logging.logdir={store}",
        f"--logging.spec={spec}",
        check=True,
    )
    env = {**cli_env(), "DM_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dm_assets.worker",
            "--worker.indices=0-1",
            "--worker.main_import=dm_assets.examples.cifar10.train_cifar",
            f"--worker.logdir={store}",
            *_argv(betons)[1:],
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Store.open(store) as opened:
        assert opened.status().completed == 2
    masks = np.load(store / "masks.npy")
    margins = np.load(store / "margins.npy")
    assert np.array_equal(masks[0], make_mask(0, N_TRAIN, 0.5))
    assert np.array_equal(masks[1], make_mask(1, N_TRAIN, 0.5))
    assert np.isfinite(margins[:2]).all() and (margins[:2] != 0).any()
    assert not masks[2].any()  # untouched
    assert "test accuracy" in proc.stderr  # the script's log line reaches the worker's log


def test_gpu_check_tiny_runs_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DM_DEVICE", "cpu")
    report = tmp_path / "report.json"
    code = gpu_check.main(
        [
            "--tiny",
            "--models=2",
            "--worker-models=0",
            "--num-workers=1",
            f"--work-dir={tmp_path / 'work'}",
            f"--json={report}",
        ]
    )
    assert code == 0
    result = json.loads(report.read_text())
    assert result["problems"] == [] and result["device"] == "cpu"
    assert len(result["model_seconds"]) == 2 and result["seconds_per_model"] > 0


# ------------------------------------------------------------------------------- shipped files
def test_shipped_spec_and_experiment() -> None:
    spec = Spec.load(EXAMPLE / "spec.json")
    assert spec.num_models == 300_000
    assert spec.schema["masks"].shape == (50_000,) and spec.schema["masks"].dtype == np.bool_
    assert spec.schema["margins"].shape == (10_000,)
    assert spec.schema["margins"].dtype == np.float16
    experiment = load_experiment(REPO_ROOT / "dm_assets" / "experiments" / "cifar10.yaml")
    assert experiment.name == "cifar10" and experiment.spec == spec
    assert len(experiment.partition_keys()) == 3_000
    assert experiment.trainer.main_import == "dm_assets.examples.cifar10.train_cifar"
    assert experiment.devices.gpus == "auto"
    assert experiment.regression is not None
    cfg = experiment.regression.config(data_path="x", out_dir="y")
    assert cfg["cfg"]["k"] == 100
    # its arguments are the script's own
    values = train_cifar.read_arguments(experiment.trainer.script_args())
    assert values["training.epochs"] == 24 and values["mask.alpha"] == 0.5
    # every held-out model is in a replicate group of evaluation.replicates, groups whole
    data = experiment.regression.data
    held_out_start = data["num_train"] + data["num_val"]
    assert values["mask.repeat_start"] == held_out_start
    assert experiment.evaluation is not None
    assert experiment.evaluation.replicates == values["mask.repeats"] == 4
    assert (spec.num_models - held_out_start) % values["mask.repeats"] == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_tiny_model_on_cuda(betons: dict[str, Path], precision: str) -> None:
    settings = replace(
        TrainingSettings(),
        epochs=1,
        lr_peak_epoch=0.5,
        batch_size=16,
        width=8,
        precision=precision,  # type: ignore[arg-type]
    )
    result = train_model(
        0,
        train_path=betons["train"],
        val_path=betons["val"],
        settings=settings,
        device=torch.device("cuda"),
    )
    assert result.margins.shape == (N_TEST,) and np.isfinite(result.margins).all()
