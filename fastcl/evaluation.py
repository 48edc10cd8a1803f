"""Evaluation of a contrastive model on pre-projection (h) and post-projection (z) features.

- ``linear_probe``: accuracy (classification, multinomial logistic regression, L-BFGS, as Foster et
  al.) or per-target MSE (regression, ridge; Spirograph) on standardized features.
- ``knn_accuracy``: k-NN (cosine, votes weighted exp(sim / 0.1), as Wu et al. 2018; k = 200 capped at the
  mean class size of the training set, see ``knn_k``; the k used is reported as ``knn_k``).
- ``singular_values`` / ``effective_rank``: the collapse monitor of Jing et al. 2022 -- singular values of
  the covariance of L2-normalized features, and exp(entropy of the normalized singular values).
- ``encode``: features of a split, optionally averaged over M random transformations (Foster et al.).
- ``evaluate``: all of the above for one model and view source; ``plot_spectra`` draws spectrum.png.

>>> import torch
>>> effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]))
4.0
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

KNN_K, KNN_TEMPERATURE = 200, 0.1


def singular_values(features: torch.Tensor) -> torch.Tensor:
    """Descending singular values of cov(features / ||features||), computed in float64 on the CPU."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {tuple(features.shape)}")
    normalized = torch.nn.functional.normalize(features.detach().double().cpu(), dim=1)
    return torch.linalg.svdvals(torch.cov(normalized.T))


def effective_rank(singular: torch.Tensor) -> float:
    """exp(H(p)) with p = s / sum(s) (Roy & Vetterli 2007); between 1 and len(s)."""
    p = singular.double().clamp_min(0)
    p = p / p.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def knn_k(n_train: int, num_classes: int) -> int:
    """The k used by default: 200 (Wu et al. 2018, on 50k images), capped at the mean class size of the
    training set. A fixed k = 200 on a few hundred training points makes every vote span several
    classes and drives the accuracy toward the majority class."""
    return max(1, min(KNN_K, n_train // max(num_classes, 1)))


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes: int,
    k: int | None = None,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN accuracy: each of the k nearest (cosine) training points votes exp(sim / T).

    ``k=None`` uses :func:`knn_k`; an explicit k larger than the mean class size warns, since the
    accuracy then falls toward chance."""
    bank = torch.nn.functional.normalize(train_features.float(), dim=1)
    if k is None:
        k = knn_k(len(bank), num_classes)
    elif k > len(bank) // max(num_classes, 1):
        warnings.warn(
            f"knn_accuracy: k = {k} exceeds the mean class size of the {len(bank)}-point training "
            f"set ({len(bank) // max(num_classes, 1)}); the accuracy tends toward chance",
            stacklevel=2,
        )
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(test_features), chunk):
        query = torch.nn.functional.normalize(test_features[start : start + chunk].float(), dim=1)
        sim, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[index], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return correct / len(test_features)


def linear_probe(
    train_features,
    train_targets,
    test_features,
    test_targets,
    task: str,
    l2: float | None = None,
    target_names: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """Fit a linear model on standardized train features; return ``{"probe": ...}`` and, for
    regression, ``{"probe_mse_<name>": ...}`` per target column (names default to column numbers).
    ``l2``: penalty per sample (Foster et al.: 1e-5 classification, 1e-8 regression)."""
    from scipy.linalg import LinAlgWarning
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features.float().cpu().numpy())
    x_train = scaler.transform(train_features.float().cpu().numpy())
    x_test = scaler.transform(test_features.float().cpu().numpy())
    y_train, y_test = train_targets.cpu().numpy(), test_targets.cpu().numpy()
    n = len(x_train)
    if task == "classification":
        l2 = 1e-5 if l2 is None else l2
        # sklearn minimizes C * sum(loss) + ||w||^2 / 2  ==  n C (mean loss + ||w||^2 / (2 n C))
        clf = LogisticRegression(C=1.0 / (2 * l2 * n), max_iter=1000).fit(x_train, y_train)
        return {"probe": float((clf.predict(x_test) == y_test).mean())}
    if task == "regression":
        l2 = 1e-8 if l2 is None else l2
        with warnings.catch_warnings():  # a tiny ridge penalty on correlated features is ill-conditioned by design
            warnings.simplefilter("ignore", LinAlgWarning)
            warnings.filterwarnings("ignore", "Singular matrix in solving dual problem")
            pred = Ridge(alpha=l2 * n).fit(x_train, y_train).predict(x_test)
        per_target = ((pred - y_test) ** 2).mean(0)
        names = target_names or tuple(str(i) for i in range(len(per_target)))
        return {"probe": float(per_target.mean()), **{f"probe_mse_{k}": float(v) for k, v in zip(names, per_target)}}
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")


@torch.no_grad()
def encode(
    model,
    images_fn,
    n: int,
    batch_size: int = 512,
    averaging: int = 1,
    autocast: contextlib.AbstractContextManager | None = None,
):
    """Return float32 ``(h, z)`` for items ``0..n-1``; ``images_fn(idx)`` gives the images of a batch.
    With ``averaging = M > 1`` each item's features are the mean over M calls of ``images_fn``."""
    hs, zs = [], []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        h_sum = z_sum = 0
        for _ in range(averaging):
            with autocast or contextlib.nullcontext():
                h, z = model(images_fn(idx))
            h_sum, z_sum = h_sum + h.float(), z_sum + z.float()
        hs.append(h_sum / averaging)
        zs.append(z_sum / averaging)
    return torch.cat(hs), torch.cat(zs)


def evaluate(
    model,
    source,
    batch_size: int = 512,
    feature_averaging: int = 1,
    eval_seed: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict:
    """Probe, k-NN (classification) and spectra on h and z; ``source`` as in :mod:`fastcl.data.sources`.

    Returns metrics (``probe``, ``probe_proj``, ``knn``, ``knn_proj``, ``effective_rank_repr``,
    ``effective_rank_proj``, ...) plus ``"spectrum_repr"``/``"spectrum_proj"`` lists."""
    was_training = model.training
    model.eval()
    source.eval_generator.manual_seed(eval_seed)
    features = {}
    for split in ("train", "test"):
        if feature_averaging > 1:

            def images(idx, split=split):
                return source.random_images(split, idx.to(source.device))
        else:

            def images(idx, split=split):
                return source.eval_images(split, idx.to(source.device))

        features[split] = encode(model, images, source.size[split], batch_size, feature_averaging, autocast)
    model.train(was_training)

    task = source.task
    out: dict = {}
    for space, column in (("", 0), ("_proj", 1)):
        train_f, test_f = features["train"][column], features["test"][column]
        probe = linear_probe(
            train_f, source.targets["train"], test_f, source.targets["test"], task.kind, target_names=task.target_names
        )
        out.update({key.replace("probe", "probe" + space, 1): value for key, value in probe.items()})
        if task.kind == "classification":
            out["knn_k"] = knn_k(len(train_f), task.num_classes)
            out["knn" + space] = knn_accuracy(
                train_f, source.targets["train"], test_f, source.targets["test"], task.num_classes
            )
    for space, column in (("repr", 0), ("proj", 1)):
        singular = singular_values(features["test"][column])
        out[f"effective_rank_{space}"] = effective_rank(singular)
        out[f"spectrum_{space}"] = singular.tolist()
    return out


def plot_spectra(history: list[dict], path: str | Path) -> None:
    """Log singular-value spectra (one line per evaluation, darker = later) for repr and proj."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, space, title in zip(axes, ("repr", "proj"), ("representation h", "projection z")):
        for i, entry in enumerate(history):
            singular = torch.tensor(entry[f"spectrum_{space}"]).clamp_min(1e-30)
            ax.plot(singular.log10().numpy(), color=cmap(i / max(1, len(history) - 1)), label=f"epoch {entry['epoch']}")
        ax.set_title(f"{title}: effective rank {history[-1][f'effective_rank_{space}']:.1f}")
        ax.set_xlabel("singular value rank k")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log10 singular value of cov(normalized features)")
    if len(history) <= 12:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
