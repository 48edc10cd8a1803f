"""Evaluation: probe, kNN, spectrum, effective rank, feature averaging -- against independent numpy code."""

import numpy as np
import pytest
import torch

from fastcl.evaluation import (
    effective_rank,
    encode,
    knn_accuracy,
    knn_k,
    linear_probe,
    plot_spectra,
    singular_values,
)


def test_singular_values_match_numpy():
    x = torch.randn(57, 11) * torch.linspace(0.1, 3, 11) + 2.0
    xn = x.double().numpy()
    xn = xn / np.linalg.norm(xn, axis=1, keepdims=True)
    expected = np.linalg.svd(np.cov(xn, rowvar=False), compute_uv=False)
    np.testing.assert_allclose(singular_values(x).numpy(), expected, rtol=1e-8, atol=1e-12)


def test_effective_rank_formula_and_bounds():
    s = torch.rand(23, dtype=torch.float64) + 0.01
    p = s.numpy() / s.numpy().sum()
    assert effective_rank(s) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert effective_rank(torch.ones(9)) == pytest.approx(9.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_collapsed_features_have_low_effective_rank():
    full = torch.randn(400, 16)
    collapsed = full.clone()
    collapsed[:, 4:] = 1e-4 * torch.randn(400, 12)  # only 4 live directions
    assert effective_rank(singular_values(collapsed)) < 4.5 < effective_rank(singular_values(full))


def _knn_reference(train, train_y, test, test_y, classes, k, t):
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    correct = 0
    for q, y in zip(test, test_y):
        sims = a @ (q / np.linalg.norm(q))
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(classes)
        for j in nearest:
            votes[train_y[j]] += np.exp(sims[j] / t)
        correct += int(np.argmax(votes) == y)
    return correct / len(test)


@pytest.mark.parametrize("k", [1, 7, 200])
def test_knn_matches_reference(k):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(83, 9, generator=g), torch.randn(31, 9, generator=g)
    train_y, test_y = torch.randint(0, 4, (83,), generator=g), torch.randint(0, 4, (31,), generator=g)
    train[train_y == 2] += 1.5  # some structure, so accuracy is not trivial
    if k > 83 // 4:  # more neighbours than the mean class size: the result is computed, and warned about
        with pytest.warns(UserWarning, match="mean class size"):
            ours = knn_accuracy(train, train_y, test, test_y, 4, k=k, temperature=0.1, chunk=8)
    else:
        ours = knn_accuracy(train, train_y, test, test_y, 4, k=k, temperature=0.1, chunk=8)
    ref = _knn_reference(
        train.double().numpy(), train_y.numpy(), test.double().numpy(), test_y.numpy(), 4, min(k, 83), 0.1
    )
    assert ours == pytest.approx(ref)


def test_default_knn_k_is_capped_at_the_mean_class_size():
    assert knn_k(50_000, 10) == 200  # Wu et al.'s setting keeps k = 200
    assert knn_k(256, 10) == 25 and knn_k(5, 10) == 1
    g = torch.Generator().manual_seed(0)
    train, train_y = torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g)
    default = knn_accuracy(train, train_y, train[:9], train_y[:9], 4)
    assert default == knn_accuracy(train, train_y, train[:9], train_y[:9], 4, k=10)


def test_linear_probe_classification_separable():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=g) * 5
    y = torch.randint(0, 3, (300,), generator=g)
    x = centers[y] + 0.3 * torch.randn(300, 10, generator=g)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:], "classification")["probe"] == 1.0


def test_linear_probe_regression_matches_least_squares():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(150, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        150, 2, generator=g, dtype=torch.float64
    )
    out = linear_probe(x[:100], y[:100], x[100:], y[100:], "regression", l2=0.0, target_names=("a", "b"))
    design = np.c_[x[:100].numpy(), np.ones(100)]
    coef = np.linalg.lstsq(design, y[:100].numpy(), rcond=None)[0]
    mse = ((np.c_[x[100:].numpy(), np.ones(50)] @ coef - y[100:].numpy()) ** 2).mean(0)
    assert out["probe_mse_a"] == pytest.approx(mse[0], rel=1e-6)
    assert out["probe_mse_b"] == pytest.approx(mse[1], rel=1e-6)
    assert out["probe"] == pytest.approx(mse.mean(), rel=1e-6)


def test_linear_probe_bad_task():
    with pytest.raises(ValueError, match="task must be"):
        linear_probe(torch.zeros(4, 2), torch.zeros(4), torch.zeros(4, 2), torch.zeros(4), "ranking")


def test_encode_feature_averaging_is_mean_over_draws():
    model = torch.nn.Linear(5, 3)
    wrapped = lambda x: (model(x), 2 * model(x))  # noqa: E731 -- (h, z) pair
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(4, 11, 5, generator=g)
    calls = iter(range(100))

    def images(idx):  # a different "transformation" on every call: draw number c
        return draws[next(calls) % 4][idx]

    h, z = encode(wrapped, images, 11, batch_size=11, averaging=4)
    expected = model(draws).mean(0)
    torch.testing.assert_close(h, expected)
    torch.testing.assert_close(z, 2 * expected)


def test_plot_spectra_writes_png(tmp_path):
    history = [
        {
            "epoch": e,
            "spectrum_repr": list(np.logspace(0, -6, 8)),
            "spectrum_proj": [1.0, 0.1, 0.0],
            "effective_rank_repr": 2.0,
            "effective_rank_proj": 1.5,
        }
        for e in (0, 5)
    ]
    plot_spectra(history, tmp_path / "spectrum.png")
    assert (tmp_path / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
