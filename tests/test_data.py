"""Datasets of the reference trainer: Spirograph renderer, digits, CIFAR pickles, image folders."""

import math
import pickle

import numpy as np
import pytest
import torch

from fastcl.data import (
    NUISANCE_RANGES,
    TARGET_RANGES,
    SpirographSource,
    build_source,
    load_cifar,
    load_digits,
    load_folder,
    render_spirograph,
    sample_uniform,
    unit_targets,
)


def _spirograph_reference(m, b, sigma, f_r, h, f_g, f_b, b_r, b_g, b_b, size=32):
    """The formula of Foster et al. 2021, pixel by pixel, in float64."""
    ts = [2 * math.pi * k / 39 for k in range(40)]
    xs = [(m - h) * math.cos(t) + h * math.cos((m - h) * t / b) for t in ts]
    ys = [(m - h) * math.sin(t) - h * math.sin((m - h) * t / b) for t in ts]
    grid = [-6 + 12 * j / (size - 1) for j in range(size)]
    intensity = np.zeros((size, size))
    for row, u in enumerate(grid):
        for col, v in enumerate(grid):
            intensity[row, col] = sum(math.exp(-((u - x) ** 2 + (v - y) ** 2) / sigma) for x, y in zip(xs, ys)) / 40
    intensity /= intensity.max() + 1e-8
    fg, bg = np.array([f_r, f_g, f_b]), np.array([b_r, b_g, b_b])
    return intensity[None] * fg[:, None, None] + (1 - intensity[None]) * bg[:, None, None]


@pytest.mark.parametrize(
    "params",
    [
        (3.7, 0.43, 0.61, 0.83, 1.9, 0.55, 0.97, 0.12, 0.47, 0.05),
        (2.2, 1.05, 0.27, 0.41, 0.6, 0.99, 0.44, 0.59, 0.0, 0.31),
    ],
)
def test_renderer_matches_formula(params):
    targets = torch.tensor([params[:4]], dtype=torch.float64)
    nuisances = torch.tensor([params[4:]], dtype=torch.float64)
    ours = render_spirograph(targets, nuisances)[0].numpy()
    np.testing.assert_allclose(ours, _spirograph_reference(*params), rtol=1e-10, atol=1e-12)


def test_renderer_is_differentiable_in_every_parameter():
    g = torch.Generator().manual_seed(3)
    targets = sample_uniform(TARGET_RANGES, 2, g).double().requires_grad_()
    nuisances = sample_uniform(NUISANCE_RANGES, 2, g).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, n: render_spirograph(t, n, size=6, points=7), (targets, nuisances))


def test_sample_uniform_ranges():
    x = sample_uniform(TARGET_RANGES, 5000, torch.Generator().manual_seed(0))
    for j, (low, high) in enumerate(TARGET_RANGES.values()):
        assert low <= x[:, j].min() and x[:, j].max() <= high
        assert x[:, j].mean() == pytest.approx((low + high) / 2, abs=0.03 * (high - low))
    unit = unit_targets(x)
    assert 0 <= unit.min() and unit.max() <= 1


def test_spirograph_views_share_targets_and_redraw_nuisances():
    source = SpirographSource(train_size=10, test_size=4, device=torch.device("cpu"), seed=5)
    views = source.views(torch.tensor([3, 7]))
    assert views.shape == (2, 2, 3, 32, 32)
    assert not torch.allclose(views[:, 0], views[:, 1])
    # Replaying the generator: the views are renders of the sample's targets with fresh nuisances.
    replay = SpirographSource(train_size=10, test_size=4, device=torch.device("cpu"), seed=5)
    nuisances = sample_uniform(NUISANCE_RANGES, 4, replay.generator)
    targets = replay._targets["train"][torch.tensor([3, 3, 7, 7])]
    torch.testing.assert_close(views.reshape(4, 3, 32, 32), render_spirograph(targets, nuisances))


def test_spirograph_data_is_fixed_across_seeds():
    a = SpirographSource(20, 6, torch.device("cpu"), seed=0)
    b = SpirographSource(20, 6, torch.device("cpu"), seed=1)
    idx = torch.arange(6)
    torch.testing.assert_close(a.eval_images("test", idx), b.eval_images("test", idx))
    torch.testing.assert_close(a.targets["train"], b.targets["train"])
    assert not torch.allclose(a.views(idx), b.views(idx))


def test_digits_upsampled_rgb():
    x_train, y_train, x_test, y_test = load_digits()
    assert x_train.shape == (1438, 3, 32, 32) and x_test.shape == (359, 3, 32, 32)
    assert x_train.dtype == torch.uint8 and x_train.max() == 255
    assert torch.equal(x_train[:, 0], x_train[:, 2])  # gray replicated to RGB
    assert set(y_train.tolist()) == set(range(10))
    again = load_digits()
    assert torch.equal(again[2], x_test)  # fixed split


def _write_cifar(root, name, n_train=7, n_test=5):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            b"labels",
        )
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    folder.mkdir()
    written = {}
    for f in files:
        n = n_test if "test" in f else n_train
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, n))
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": data, key: labels}, fh)
        written[f] = (data, labels)
    return folder, written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_round_trip(tmp_path, name):
    folder, written = _write_cifar(tmp_path, name)
    for data_dir in (tmp_path, folder):
        x_train, y_train, x_test, y_test, classes = load_cifar(name, data_dir)
        test_file = "test_batch" if name == "cifar10" else "test"
        data, labels = written[test_file]
        assert torch.equal(x_test, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        assert y_test.tolist() == [int(v) for v in labels]
        assert len(x_train) == (35 if name == "cifar10" else 7)
        assert classes == (10 if name == "cifar10" else 100)


def test_cifar_missing_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/data_batch_1"):
        load_cifar("cifar10", tmp_path)
    with pytest.raises(ValueError, match="--data-dir is required"):
        load_cifar("cifar100", None)


def _write_folder(root, classes=("cat", "dog", "eel"), per_class=4):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20 + i, 17, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_folder_dataset_split_and_labels(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    x_train, y_train, x_test, y_test, classes = load_folder(tmp_path, size=16)
    assert classes == ["cat", "dog", "eel"]
    assert x_train.shape[1:] == (3, 16, 16) and len(x_train) + len(x_test) == 12
    assert sorted((y_train.tolist() + y_test.tolist())) == [0] * 4 + [1] * 4 + [2] * 4


def test_folder_dataset_with_train_test_dirs(tmp_path):
    _write_folder(tmp_path / "train", per_class=3)
    _write_folder(tmp_path / "test", per_class=2)
    x_train, y_train, x_test, y_test, _ = load_folder(tmp_path)
    assert len(x_train) == 9 and len(x_test) == 6


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="at least 2 class"):
        load_folder(tmp_path)


def test_build_source_errors():
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_source("mnist")
    with pytest.raises(ValueError, match="train_size must be <= the split's size 1438"):
        build_source("digits", train_size=5000)
    with pytest.raises(ValueError, match="test_size must be >= 1"):
        build_source("spirograph", test_size=0)
