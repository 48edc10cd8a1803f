"""Dimensional collapse and DirectCLR (Jing, Vincent, LeCun & Tian, ICLR 2022).

Two toy mechanisms on 16-dimensional Gaussian data, trained with fastcl's InfoNCE on unnormalized
embeddings (z1 . z2^T / 0.1): (1) augmentation noise stronger than the data along 8 directions collapses
a single linear layer's embedding there; (2) with two or more linear layers even weak augmentation
collapses the embedding, as the layers' singular vectors align. Then, on an image task, SimCLR without a
projector collapses the representation while SimCLR with an MLP projector and DirectCLR (InfoNCE on a
fixed prefix of the representation, no projector) do not.
"""

from __future__ import annotations

import torch

from fastcl.repro.common import (
    Claim,
    build_encoder,
    collapsed_dimensions,
    compare_seeds,
    image_source,
    markdown_table,
    mean_std,
    save_figure,
)

NAME = "directclr"
TITLE = "Dimensional collapse and DirectCLR (Jing et al., ICLR 2022)"
SUMMARY = "strong augmentation / depth collapse toy embeddings; no projector collapses, DirectCLR does not"

_IMAGE_QUICK = dict(
    dataset="digits",
    image_size=16,
    encoder="convnet",
    dim=128,
    width=32,
    proj_dim=128,
    epochs=6,
    batch_size=128,
    lr=0.5,
    temperature=0.1,
    strength=1.0,
)
CONFIGS = {
    # The paper trains the toys 10k steps at lr 1e-3 (one layer) / 1e-2 (deeper); --quick takes 2k steps at
    # 1e-2 / 3e-2 (at 1e-1 a two-layer seed diverges).
    "smoke": dict(
        seeds=[0],
        toy_steps=30,
        toy_lr=(1e-2, 3e-2),
        toy_depths=(1, 2),
        **dict(_IMAGE_QUICK, epochs=1, dim=16, width=8, proj_dim=16, batch_size=32, train_size=64, test_size=32),
    ),
    "quick": dict(
        seeds=[0, 1, 2], toy_steps=2000, toy_lr=(1e-2, 3e-2), toy_depths=(1, 2, 3), **_IMAGE_QUICK, image_seeds=[0, 1]
    ),
    "full": dict(
        seeds=[0, 1, 2],
        toy_steps=10_000,
        toy_lr=(1e-3, 1e-2),
        toy_depths=(1, 2, 3, 4),
        dataset="cifar10",
        image_size=32,
        encoder="resnet18",
        epochs=100,
        batch_size=512,
        lr=None,
        optimizer="lars",
        amp="bf16",
        temperature=0.1,
        strength=1.0,
    ),
}
TOY_DIM, TOY_BATCH, TOY_NOISY = 16, 128, slice(8, 16)
STRONG, WEAK, DEPTH_NOISE = 1.5, 0.01, 1e-3
METHODS = {
    "SimCLR, no projector": ("simclr", "none"),
    "SimCLR + MLP projector": ("simclr", "mlp"),
    "DirectCLR": ("directclr", "none"),
}


def _image_seeds(config: dict) -> list[int]:
    return config.get("image_seeds", config["seeds"])


def units(config: dict) -> int:
    return len(config["seeds"]) * (2 + len(config["toy_depths"])) + len(_image_seeds(config)) * len(METHODS)


def _orthogonal(generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(TOY_DIM, TOY_DIM, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def _alignment(weights: list[torch.Tensor]) -> float:
    """Mean |diagonal| of V2^T U1 for W1 = U1 S1 V1^T, W2 = U2 S2 V2^T (1 when the layers are aligned)."""
    u1 = torch.linalg.svd(weights[0])[0]
    v2t = torch.linalg.svd(weights[1])[2]
    return float((v2t @ u1).diagonal().abs().mean())


def toy(layers: int, noise: float, noise_dims: slice, lr: float, steps: int, decaying_init: bool, seed: int) -> dict:
    """Train ``layers`` bias-free 16x16 linear layers with InfoNCE on x + noise views of x ~ N(0, I).

    ``decaying_init``: each layer starts as U diag(exp(-0.35 k)) V^T (random orthogonal U, V), else
    PyTorch's default Linear init. Returns the embedding covariance spectrum (relative to its largest
    value) at init and after training, the collapsed counts, and for two or more layers the alignment of
    the first two layers and the drift of W1 W1^T - W2^T W2 (constant under gradient flow)."""
    from fastcl.functional import info_nce

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if decaying_init:
        decay = torch.diag(torch.exp(-0.35 * torch.arange(TOY_DIM, dtype=torch.float32)))
        weights = [_orthogonal(generator) @ decay @ _orthogonal(generator).T for _ in range(layers)]
    else:
        weights = [torch.nn.Linear(TOY_DIM, TOY_DIM, bias=False).weight.detach().clone() for _ in range(layers)]
    weights = [w.requires_grad_() for w in weights]
    optimizer = torch.optim.SGD(weights, lr=lr)
    mask = torch.zeros(TOY_DIM)
    mask[noise_dims] = 1

    def embed(x: torch.Tensor) -> torch.Tensor:
        for w in weights:
            x = x @ w.T
        return x

    def spectrum() -> list[float]:
        with torch.no_grad():
            z = embed(torch.randn(4096, TOY_DIM, generator=torch.Generator().manual_seed(10_000 + seed)))
            s = torch.linalg.svdvals(torch.cov(z.double().T))
        return (s / s[0]).tolist()

    def balance() -> torch.Tensor:
        return (weights[0] @ weights[0].T - weights[1].T @ weights[1]).detach().clone()

    initial = spectrum()
    if layers >= 2:
        balance_0, alignment_0 = balance(), _alignment([w.detach() for w in weights])
    for _ in range(steps):
        x = torch.randn(TOY_BATCH, TOY_DIM, generator=generator)
        x1 = x + noise * mask * torch.randn(TOY_BATCH, TOY_DIM, generator=generator)
        x2 = x + noise * mask * torch.randn(TOY_BATCH, TOY_DIM, generator=generator)
        loss = info_nce(embed(x1), embed(x2), 0.1, normalize=False, symmetric=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = spectrum()
    out = {
        "spectrum_init": initial,
        "spectrum": final,
        "collapsed_init": collapsed_dimensions(initial),
        "collapsed": collapsed_dimensions(final),
        "loss": float(loss.detach()),
    }
    if layers >= 2:
        out.update(
            alignment_init=alignment_0,
            alignment=_alignment([w.detach() for w in weights]),
            balance_drift=float((balance() - balance_0).norm() / balance_0.norm()),
        )
    return out


def run(config: dict, ctx) -> dict:
    lr_linear, lr_deep = config["toy_lr"]
    steps = config["toy_steps"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 16 x 128 matrices: one thread is faster than two
    try:
        toys = {"strong": [], "weak": [], "depth": {str(d): [] for d in config["toy_depths"]}}
        for seed in config["seeds"]:
            for key, noise in (("strong", STRONG), ("weak", WEAK)):
                toys[key].append(toy(1, noise, TOY_NOISY, lr_linear, steps, False, seed))
                ctx.progress.step(f"toy 1, noise {noise}, seed {seed}")
            for depth in config["toy_depths"]:
                toys["depth"][str(depth)].append(toy(depth, DEPTH_NOISE, slice(0, TOY_DIM), lr_deep, steps, True, seed))
                ctx.progress.step(f"toy 2, {depth} layers, seed {seed}")
    finally:
        torch.set_num_threads(threads)

    image = {}
    for label, (method, head) in METHODS.items():
        image[label] = []
        for seed in _image_seeds(config):
            source = image_source(config, ctx, seed, config["strength"])
            flags = dict(
                method=method,
                head=head,
                proj_dim=config["proj_dim"],
                epochs=config["epochs"],
                batch_size=config["batch_size"],
                temperature=config["temperature"],
                seed=seed,
                dataset=config["dataset"],
                optimizer=config.get("optimizer", "sgd"),
                amp=config.get("amp", "off"),
            )
            if config["lr"] is not None:
                flags["lr"] = config["lr"]
            _, history = ctx.train(f"{method}-{head}-seed{seed}", source, build_encoder(config, seed), **flags)
            init, end = history[0], history[-1]
            image[label].append(
                {
                    "probe": end["probe"],
                    "probe_init": init["probe"],
                    "effective_rank": end["effective_rank_repr"],
                    "effective_rank_init": init["effective_rank_repr"],
                    "spectrum": end["spectrum_repr"],
                    "collapsed": collapsed_dimensions(end["spectrum_repr"]),
                    "loss": end["loss"],
                }
            )
    return {"toys": toys, "image": image}


def _values(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs]


def claims(results: dict, config: dict) -> list[Claim]:
    toys, image = results["toys"], results["image"]
    out = []
    strong, weak = _values(toys["strong"], "collapsed"), _values(toys["weak"], "collapsed")
    out.append(
        Claim(
            "strong_augmentation_collapses",
            f"Augmentation noise stronger than the data ({STRONG} vs 1 on 8 of 16 dims) collapses a single linear "
            f"layer's embedding; weak noise ({WEAK}) does not.",
            f"collapsed dims (σ_k < 1e-4·σ₁) per seed: strong {strong} vs weak {weak}; test strong > weak",
            compare_seeds(strong, weak, ">"),
        )
    )
    depths = sorted(int(d) for d in toys["depth"])
    collapsed = {d: _values(toys["depth"][str(d)], "collapsed") for d in depths}
    for shallow, deep in zip(depths, depths[1:]):
        out.append(
            Claim(
                f"depth_{deep}_collapses_more_than_{shallow}",
                f"With weak augmentation ({DEPTH_NOISE}), {deep} linear layers collapse more than {shallow}.",
                f"collapsed dims per seed: {deep} layers {collapsed[deep]} vs {shallow} {collapsed[shallow]}; "
                f"test {deep} > {shallow}",
                compare_seeds(collapsed[deep], collapsed[shallow], ">"),
            )
        )
    if 2 in depths:
        runs = toys["depth"]["2"]
        after, before = _values(runs, "alignment"), _values(runs, "alignment_init")
        out.append(
            Claim(
                "layers_align",
                "Training two linear layers aligns them: V2ᵀU1 tends to the identity.",
                f"mean |diag(V2ᵀU1)| per seed: after {[round(a, 3) for a in after]} vs at init "
                f"{[round(b, 3) for b in before]}; test after > before",
                compare_seeds(after, before, ">"),
            )
        )
    ranks = {label: _values(runs, "effective_rank") for label, runs in image.items()}
    probes = {label: _values(runs, "probe") for label, runs in image.items()}
    none, mlp, direct = "SimCLR, no projector", "SimCLR + MLP projector", "DirectCLR"
    for other in (mlp, direct):
        out.append(
            Claim(
                f"no_projector_collapses_vs_{METHODS[other][0]}_{METHODS[other][1]}",
                f"SimCLR without a projector collapses the representation more than {other}.",
                f"effective rank of h per seed: no projector {[round(r, 1) for r in ranks[none]]} vs {other} "
                f"{[round(r, 1) for r in ranks[other]]}; test no projector < {other}",
                compare_seeds(ranks[none], ranks[other], "<"),
            )
        )
        out.append(
            Claim(
                f"{METHODS[other][0]}_{METHODS[other][1]}_probe_beats_no_projector",
                f"{other} gives a better linear probe on h than SimCLR without a projector.",
                f"probe accuracy per seed: {other} {[round(p, 4) for p in probes[other]]} vs no projector "
                f"{[round(p, 4) for p in probes[none]]}; test {other} > no projector",
                compare_seeds(probes[other], probes[none], ">"),
            )
        )
    return out


def tables(results: dict, config: dict) -> str:
    toys, image = results["toys"], results["image"]
    rows = [
        [
            f"1 layer, noise {STRONG} on dims 8-15",
            mean_std(_values(toys["strong"], "collapsed_init"), 1),
            mean_std(_values(toys["strong"], "collapsed"), 1),
            "-",
            "-",
        ],
        [
            f"1 layer, noise {WEAK} on dims 8-15",
            mean_std(_values(toys["weak"], "collapsed_init"), 1),
            mean_std(_values(toys["weak"], "collapsed"), 1),
            "-",
            "-",
        ],
    ]
    for depth, runs in toys["depth"].items():
        aligned = (
            f"{mean_std(_values(runs, 'alignment_init'))} → {mean_std(_values(runs, 'alignment'))}"
            if int(depth) >= 2
            else "-"
        )
        drift = mean_std(_values(runs, "balance_drift")) if int(depth) >= 2 else "-"
        rows.append(
            [
                f"{depth} layer(s), noise {DEPTH_NOISE}, decaying init",
                mean_std(_values(runs, "collapsed_init"), 1),
                mean_std(_values(runs, "collapsed"), 1),
                aligned,
                drift,
            ]
        )
    toy_table = markdown_table(
        [
            "toy (16 dims, InfoNCE τ = 0.1, unnormalized)",
            "collapsed dims at init",
            "collapsed dims after",
            "alignment: mean abs diag(V2ᵀU1)",
            "drift of W1W1ᵀ−W2ᵀW2",
        ],
        rows,
    )
    dims = len(next(iter(image.values()))[0]["spectrum"])
    image_rows = [
        [
            label,
            mean_std(_values(runs, "probe_init")),
            mean_std(_values(runs, "probe")),
            mean_std(_values(runs, "effective_rank"), 1),
            mean_std(_values(runs, "collapsed"), 1),
        ]
        for label, runs in image.items()
    ]
    image_table = markdown_table(
        [
            "method (h = encoder output)",
            "probe acc at init",
            "probe acc",
            "effective rank of h",
            f"collapsed dims of h (of {dims})",
        ],
        image_rows,
    )
    return (
        f"Toys: {config['toy_steps']} SGD steps, batch {TOY_BATCH}; collapsed = singular values of the "
        f"embedding covariance below 1e-4·σ₁; mean ± std over seeds {config['seeds']}.\n\n{toy_table}\n\n"
        f"Image task: {config['dataset']} ({config['image_size']} px), {config['encoder']}, "
        f"{config['epochs']} epochs, batch {config['batch_size']}, τ = {config['temperature']}, augmentation "
        f"strength {config['strength']}; seeds {_image_seeds(config)}.\n\n{image_table}"
    )


def figures(results: dict, config: dict, out) -> list[str]:
    import matplotlib.pyplot as plt

    toys, image = results["toys"], results["image"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, noise in (("strong", STRONG), ("weak", WEAK)):
        spectrum = torch.tensor(toys[key][0]["spectrum"]).clamp_min(1e-30)
        axes[0].plot(spectrum.log10(), marker="o", label=f"noise {noise}")
    axes[0].set_title("toy 1: one linear layer")
    for depth, runs in toys["depth"].items():
        axes[1].plot(torch.tensor(runs[0]["spectrum"]).clamp_min(1e-30).log10(), marker="o", label=f"{depth} layer(s)")
    axes[1].set_title(f"toy 2: weak noise {DEPTH_NOISE}")
    for label, runs in image.items():
        spectrum = torch.tensor(runs[0]["spectrum"])
        axes[2].plot((spectrum / spectrum[0]).clamp_min(1e-30).log10(), label=label)
    axes[2].set_title(f"{config['dataset']}: spectrum of h")
    for ax in axes:
        ax.set_xlabel("singular value rank k")
        ax.axhline(-4, color="gray", lw=0.5, ls="--")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log10 σ_k / σ_1 (first seed; dashed: collapse threshold)")
    return [save_figure(fig, out, "spectra.png")]
