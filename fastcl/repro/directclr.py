"""Dimensional collapse and DirectCLR (Jing, Vincent, LeCun & Tian, ICLR 2022).

Toys on 16-dimensional Gaussian data, trained with fastcl's InfoNCE on unnormalized embeddings
(z1 . z2^T / 0.1). (1) Augmentation noise stronger than the data along 8 directions shrinks a single
linear layer's map there by an order of magnitude; weak noise does not. (2) With weak augmentation, the
same starting map factored into 1, 2 or 3 balanced linear layers: the small singular values grow more
slowly the deeper the factorisation (the paper's implicit-regularisation mechanism), and two layers
started independently align their singular subspaces. Then, on an image task with a residual last block
(the path DirectCLR relies on), SimCLR without a projector, with an MLP projector, and DirectCLR (InfoNCE
on a fixed prefix of the representation) are compared by the spectrum of h and a few-label probe.
"""

from __future__ import annotations

import math

import torch

from fastcl.repro.common import (
    Claim,
    build_encoder,
    chance_loss,
    few_label_probe,
    gate,
    image_source,
    loss_gate,
    markdown_table,
    mean_std,
    probe_gate,
    save_figure,
)

NAME = "directclr"
TITLE = "Dimensional collapse and DirectCLR (Jing et al., ICLR 2022)"
SUMMARY = "strong augmentation / depth collapse toy embeddings; no projector collapses, DirectCLR does not"

_IMAGE_QUICK = dict(
    dataset="digits",
    image_size=16,
    encoder="convnet",
    residual=True,
    dim=128,
    width=32,
    proj_dim=128,
    epochs=8,
    batch_size=128,
    lr=0.1,
    temperature=0.1,
    strength=0.5,
    labels_per_class=5,
    label_draws=5,
)
CONFIGS = {
    # The paper trains the toys 10k steps at lr 1e-3 (one layer) / 1e-2 (deeper); --quick takes 2k steps at
    # 1e-2 / 3e-2 (at 1e-1 a two-layer seed diverges).
    "smoke": dict(
        seeds=[0],
        toy_steps=30,
        early_step=10,
        toy_lr=(1e-2, 3e-2),
        toy_depths=(1, 2),
        **dict(_IMAGE_QUICK, epochs=1, dim=16, width=8, proj_dim=16, batch_size=32, train_size=64, test_size=32),
    ),
    "quick": dict(
        seeds=[0, 1, 2, 3, 4],
        toy_steps=2000,
        early_step=100,
        toy_lr=(1e-2, 3e-2),
        toy_depths=(1, 2, 3),
        **_IMAGE_QUICK,
        image_seeds=[0, 1, 2],
    ),
    "full": dict(
        seeds=[0, 1, 2, 3, 4],
        toy_steps=10_000,
        early_step=500,
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
        labels_per_class=10,
        label_draws=5,
    ),
}
TOY_DIM, TOY_BATCH, TOY_TEMPERATURE = 16, 128, 0.1
TOY_NOISY, TOY_CLEAN = slice(8, 16), slice(0, 8)
STRONG, WEAK, DEPTH_NOISE = 1.5, 0.01, 1e-3
SMALL = 4  # the small singular values whose growth toy 2 follows: the last SMALL of 16
ALIGN_TOP = 4  # toy 2 alignment: overlap of the two layers' top-ALIGN_TOP singular subspaces
# Stated margins: toy 1 needs an order-of-magnitude cliff; toy 2 a quarter decade of slower growth;
# alignment must reach ALIGNED; the image task a 10 % effective-rank ratio and 1 probe point; the probe
# gate 2 points over chance and random init.
CLIFF_MARGIN, GROWTH_MARGIN, ALIGNED, RANK_MARGIN, PROBE_MARGIN, PROBE_GATE = 1.0, 0.25, 0.8, 0.1, 0.01, 0.02
METHODS = {
    "SimCLR, no projector": ("simclr", "none"),
    "SimCLR + MLP projector": ("simclr", "mlp"),
    "DirectCLR": ("directclr", "none"),
}
LOSS_KIND = {"simclr": "ntxent", "directclr": "infonce"}


def _image_seeds(config: dict) -> list[int]:
    return config.get("image_seeds", config["seeds"])


def units(config: dict) -> int:
    return len(config["seeds"]) * (3 + len(config["toy_depths"])) + len(_image_seeds(config)) * len(METHODS)


def _orthogonal(generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(TOY_DIM, TOY_DIM, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def _decay() -> torch.Tensor:
    return torch.exp(-0.35 * torch.arange(TOY_DIM, dtype=torch.float32))


def _initial_weights(layers: int, init: str, generator: torch.Generator) -> list[torch.Tensor]:
    """``"default"``: PyTorch's Linear init; ``"paper"``: each layer U diag(exp(-0.35 k)) V^T with its own
    random orthogonal U, V; ``"balanced"``: the same end-to-end map U diag(exp(-0.35 k)) V^T at every depth,
    factored as W_l = R_l diag(exp(-0.35 k / L)) R_{l-1}^T (R_0 = V, R_L = U, others random orthogonal)."""
    if init == "default":
        return [torch.nn.Linear(TOY_DIM, TOY_DIM, bias=False).weight.detach().clone() for _ in range(layers)]
    if init == "paper":
        return [_orthogonal(generator) @ torch.diag(_decay()) @ _orthogonal(generator).T for _ in range(layers)]
    bases = [_orthogonal(generator) for _ in range(layers + 1)]
    root = torch.diag(_decay() ** (1 / layers))
    return [bases[i + 1] @ root @ bases[i].T for i in range(layers)]


def _map(weights: list[torch.Tensor]) -> torch.Tensor:
    """The end-to-end linear map W_L ... W_1 (float64)."""
    product = torch.eye(TOY_DIM, dtype=torch.float64)
    for w in weights:
        product = w.detach().double() @ product
    return product


def _spectrum(weights: list[torch.Tensor]) -> list[float]:
    """Eigenvalues of the embedding covariance W W^T for x ~ N(0, I) (exact, not sampled), descending."""
    return (torch.linalg.svdvals(_map(weights)) ** 2).tolist()


def _cliff(weights: list[torch.Tensor]) -> float:
    """Decades between the noisy and the clean input directions: mean log10 of the squared singular values
    of the map restricted to dims 8-15 minus that of dims 0-7 (0 = no cliff, -1 = an order of magnitude)."""
    product = _map(weights)
    noisy, clean = torch.linalg.svdvals(product[:, TOY_NOISY]) ** 2, torch.linalg.svdvals(product[:, TOY_CLEAN]) ** 2
    return float(noisy.log10().mean() - clean.log10().mean())


def _alignment(weights: list[torch.Tensor]) -> float:
    """Overlap of W1's top-k left and W2's top-k right singular subspaces, ||V2[:, :k]^T U1[:, :k]||_F^2 / k:
    1 when aligned, about k / 16 for random subspaces (k = ALIGN_TOP)."""
    u1 = torch.linalg.svd(weights[0].detach().double())[0][:, :ALIGN_TOP]
    v2 = torch.linalg.svd(weights[1].detach().double())[2][:ALIGN_TOP].T
    return float((v2.T @ u1).pow(2).sum() / ALIGN_TOP)


def toy(
    layers: int, noise: float, noise_dims: slice, lr: float, steps: int, init: str, seed: int, early: int = 0
) -> dict:
    """Train ``layers`` bias-free 16x16 linear layers with InfoNCE on x + noise views of x ~ N(0, I).

    Returns the embedding covariance spectrum at init, at step ``early`` and at the end, the toy-1 cliff
    at init and at the end, the final-epoch loss (mean of the last 100 steps) and its chance level, and for
    two or more layers the subspace alignment of the first two layers and the relative drift of
    W1 W1^T - W2^T W2 (constant under gradient flow)."""
    from fastcl.functional import info_nce

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    weights = [w.requires_grad_() for w in _initial_weights(layers, init, generator)]
    optimizer = torch.optim.SGD(weights, lr=lr)
    mask = torch.zeros(TOY_DIM)
    mask[noise_dims] = 1

    def embed(x: torch.Tensor) -> torch.Tensor:
        for w in weights:
            x = x @ w.T
        return x

    def balance() -> torch.Tensor:
        return (weights[0] @ weights[0].T - weights[1].T @ weights[1]).detach().clone()

    out = {"spectrum_init": _spectrum(weights), "cliff_init": _cliff(weights)}
    if layers >= 2:
        balance_0, out["alignment_init"] = balance(), _alignment(weights)
    tail = min(100, steps)
    losses = []
    for step in range(1, steps + 1):
        x = torch.randn(TOY_BATCH, TOY_DIM, generator=generator)
        x1 = x + noise * mask * torch.randn(TOY_BATCH, TOY_DIM, generator=generator)
        x2 = x + noise * mask * torch.randn(TOY_BATCH, TOY_DIM, generator=generator)
        loss = info_nce(embed(x1), embed(x2), TOY_TEMPERATURE, normalize=False, symmetric=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step > steps - tail:
            losses.append(float(loss.detach()))
        if step == early:
            out["spectrum_early"] = _spectrum(weights)
    out.update(
        spectrum=_spectrum(weights),
        cliff=_cliff(weights),
        loss=sum(losses) / len(losses),
        chance=chance_loss("infonce", TOY_BATCH),
    )
    if layers >= 2:
        out.update(
            alignment=_alignment(weights),
            balance_drift=float((balance() - balance_0).norm() / balance_0.norm()),
        )
    return out


def _small(spectrum: list[float]) -> float:
    """Mean log10 of the SMALL smallest eigenvalues, relative to the largest."""
    return sum(math.log10(s / spectrum[0]) for s in spectrum[-SMALL:]) / SMALL


def _growth(run: dict) -> float:
    """Decades the SMALL smallest eigenvalues grew between init and the early step (absolute, not relative)."""
    return sum(math.log10(a / b) for a, b in zip(run["spectrum_early"][-SMALL:], run["spectrum_init"][-SMALL:])) / SMALL


def run(config: dict, ctx) -> dict:
    lr_linear, lr_deep = config["toy_lr"]
    steps, early = config["toy_steps"], config["early_step"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 16 x 128 matrices: one thread is faster than two
    try:
        toys = {"strong": [], "weak": [], "depth": {str(d): [] for d in config["toy_depths"]}, "aligned": []}
        for seed in config["seeds"]:
            for key, noise in (("strong", STRONG), ("weak", WEAK)):
                toys[key].append(toy(1, noise, TOY_NOISY, lr_linear, steps, "default", seed))
                ctx.progress.step(f"toy 1, noise {noise}, seed {seed}")
            for depth in config["toy_depths"]:
                toys["depth"][str(depth)].append(
                    toy(depth, DEPTH_NOISE, slice(0, TOY_DIM), lr_deep, steps, "balanced", seed, early)
                )
                ctx.progress.step(f"toy 2, {depth} layers, seed {seed}")
            toys["aligned"].append(toy(2, DEPTH_NOISE, slice(0, TOY_DIM), lr_deep, steps, "paper", seed))
            ctx.progress.step(f"toy 2 alignment, seed {seed}")
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
                aug_strength=config["strength"],
                seed=seed,
                dataset=config["dataset"],
                optimizer=config.get("optimizer", "sgd"),
                amp=config.get("amp", "off"),
            )
            if config["lr"] is not None:
                flags["lr"] = config["lr"]
            encoder = build_encoder(config, seed)
            from fastcl.models import ContrastiveModel

            init_probe = few_label_probe(
                ContrastiveModel(build_encoder(config, seed), head, config["proj_dim"]).to(ctx.device),
                source,
                config["labels_per_class"],
                config["label_draws"],
                seed,
            )
            model, history = ctx.train(f"{method}-{head}-seed{seed}", source, encoder, **flags)
            probe = few_label_probe(model, source, config["labels_per_class"], config["label_draws"], seed)
            init, end = history[0], history[-1]
            image[label].append(
                {
                    "probe": probe["repr"],
                    "probe_init": init_probe["repr"],
                    "probe_all_labels": end["probe"],
                    "probe_all_labels_init": init["probe"],
                    "knn": end["knn"],
                    "knn_init": init["knn"],
                    "effective_rank": end["effective_rank_repr"],
                    "effective_rank_init": init["effective_rank_repr"],
                    "spectrum": end["spectrum_repr"],
                    "loss": end["loss"],
                    "chance": chance_loss(LOSS_KIND[method], config["batch_size"]),
                }
            )
    return {"toys": toys, "image": image}


def _values(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs]


def _losses(arms: dict[str, list[dict]]) -> dict:
    return loss_gate({label: (_values(runs, "loss"), runs[0]["chance"]) for label, runs in arms.items()})


def claims(results: dict, config: dict) -> list[Claim]:
    toys, image = results["toys"], results["image"]
    out = []
    strong, weak = _values(toys["strong"], "cliff"), _values(toys["weak"], "cliff")
    out.append(
        Claim(
            "strong_augmentation_collapses",
            f"Augmentation noise stronger than the data ({STRONG} vs 1 on dims 8-15 of 16) collapses a single "
            f"linear layer's embedding along the noisy directions; weak noise ({WEAK}) does not.",
            "cliff of weak minus cliff of strong, in decades (cliff: mean log10 eigenvalue of the embedding "
            "covariance along the noisy input directions minus along the clean ones)",
            [w - s for w, s in zip(weak, strong)],
            CLIFF_MARGIN,
            gate(_losses({f"noise {STRONG}": toys["strong"], f"noise {WEAK}": toys["weak"]})),
            {f"cliff, noise {STRONG}": strong, f"cliff, noise {WEAK}": weak},
        )
    )
    depths = sorted(int(d) for d in toys["depth"])
    runs = {d: toys["depth"][str(d)] for d in depths}
    for shallow, deep in zip(depths, depths[1:]):
        pair = {f"{shallow} layer(s)": runs[shallow], f"{deep} layers": runs[deep]}
        grow_s, grow_d = [_growth(r) for r in runs[shallow]], [_growth(r) for r in runs[deep]]
        out.append(
            Claim(
                f"small_singular_values_grow_slower_{deep}_than_{shallow}",
                f"From the same starting map and weak augmentation ({DEPTH_NOISE}), the small singular values "
                f"grow more slowly with {deep} layers than with {shallow} (the implicit-regularisation mechanism).",
                f"growth of the {SMALL} smallest covariance eigenvalues over the first {config['early_step']} "
                f"steps, {shallow} minus {deep} layers, in decades",
                [a - b for a, b in zip(grow_s, grow_d)],
                GROWTH_MARGIN,
                gate(_losses(pair)),
                {f"growth, {shallow} layer(s)": grow_s, f"growth, {deep} layers": grow_d},
            )
        )
        small_s, small_d = [_small(r["spectrum"]) for r in runs[shallow]], [_small(r["spectrum"]) for r in runs[deep]]
        out.append(
            Claim(
                f"depth_{deep}_collapses_more_than_{shallow}",
                f"From the same starting map and weak augmentation, {deep} layers end more collapsed than {shallow}.",
                f"mean log10(λ_k / λ_1) of the {SMALL} smallest eigenvalues after training, {shallow} minus "
                f"{deep} layers, in decades",
                [a - b for a, b in zip(small_s, small_d)],
                GROWTH_MARGIN,
                gate(_losses(pair)),
                {f"{shallow} layer(s)": small_s, f"{deep} layers": small_d},
            )
        )
    aligned = toys["aligned"]
    after = _values(aligned, "alignment")
    out.append(
        Claim(
            "layers_align",
            f"Training two independently initialised linear layers aligns them (V2ᵀU1 tends to the identity): "
            f"the overlap of their top-{ALIGN_TOP} singular subspaces reaches {ALIGNED}.",
            f"overlap after training minus {ALIGNED} (1 = aligned, {ALIGN_TOP / TOY_DIM:.2f} = random)",
            [a - ALIGNED for a in after],
            0.0,
            gate(_losses({"2 layers, independent init": aligned})),
            {"overlap at init": _values(aligned, "alignment_init"), "overlap after": after},
        )
    )
    none, mlp, direct = "SimCLR, no projector", "SimCLR + MLP projector", "DirectCLR"
    ranks = {label: _values(runs, "effective_rank") for label, runs in image.items()}
    probes = {label: _values(runs, "probe") for label, runs in image.items()}
    for other in (mlp, direct):
        pair = {none: image[none], other: image[other]}
        probe_check = probe_gate(  # over the two arms the claim compares
            {label: (probes[label], _values(runs, "probe_init")) for label, runs in pair.items()},
            chance=0.1,
            margin=PROBE_GATE,
            higher_is_better=True,
        )
        slug = f"{METHODS[other][0]}_{METHODS[other][1]}"
        out.append(
            Claim(
                f"no_projector_collapses_vs_{slug}",
                f"SimCLR without a projector collapses the representation h more than {other}.",
                f"ln(effective rank of h) of {other} minus that of no projector",
                [math.log(a / b) for a, b in zip(ranks[other], ranks[none])],
                RANK_MARGIN,
                gate(_losses(pair)),
                {f"effective rank, {other}": ranks[other], f"effective rank, {none}": ranks[none]},
            )
        )
        out.append(
            Claim(
                f"{slug}_probe_beats_no_projector",
                f"{other} gives a better linear probe on h than SimCLR without a projector.",
                f"{config['labels_per_class']}-labels-per-class probe accuracy on h, {other} minus no projector",
                [a - b for a, b in zip(probes[other], probes[none])],
                PROBE_MARGIN,
                gate(_losses(pair), probe_check),
                {f"probe, {other}": probes[other], f"probe, {none}": probes[none]},
            )
        )
    return out


def tables(results: dict, config: dict) -> str:
    toys, image = results["toys"], results["image"]
    toy1 = markdown_table(
        ["toy 1: one layer, noise on dims 8-15", "final loss (chance 4.852)", "cliff at init", "cliff after"],
        [
            [
                f"noise {noise}",
                mean_std(_values(toys[key], "loss")),
                mean_std(_values(toys[key], "cliff_init"), 2),
                mean_std(_values(toys[key], "cliff"), 2),
            ]
            for key, noise in (("strong", STRONG), ("weak", WEAK))
        ],
    )
    depth_rows = []
    for depth, runs in toys["depth"].items():
        depth_rows.append(
            [
                f"{depth} layer(s)",
                mean_std(_values(runs, "loss")),
                mean_std([_small(r["spectrum_init"]) for r in runs], 2),
                mean_std([_small(r["spectrum_early"]) for r in runs], 2),
                mean_std([_small(r["spectrum"]) for r in runs], 2),
                mean_std([_growth(r) for r in runs], 2),
            ]
        )
    depth_table = markdown_table(
        [
            f"toy 2: same starting map, noise {DEPTH_NOISE}",
            "final loss (chance 4.852)",
            f"small eigenvalues at init (log10 λ/λ₁, last {SMALL})",
            f"at step {config['early_step']}",
            "after training",
            f"growth by step {config['early_step']} (decades)",
        ],
        depth_rows,
    )
    aligned = toys["aligned"]
    align_table = markdown_table(
        [
            "toy 2: 2 layers, independent init",
            "final loss",
            f"top-{ALIGN_TOP} overlap at init",
            "after",
            "drift of W1W1ᵀ−W2ᵀW2",
        ],
        [
            [
                f"noise {DEPTH_NOISE}",
                mean_std(_values(aligned, "loss")),
                mean_std(_values(aligned, "alignment_init")),
                mean_std(_values(aligned, "alignment")),
                mean_std(_values(aligned, "balance_drift")),
            ]
        ],
    )
    dims = len(next(iter(image.values()))[0]["spectrum"])
    image_table = markdown_table(
        [
            "method (h = encoder output)",
            "final loss / chance",
            f"{config['labels_per_class']}-label probe at init",
            f"{config['labels_per_class']}-label probe",
            "full probe at init → after",
            "kNN at init → after",
            f"effective rank of h (of {dims})",
        ],
        [
            [
                label,
                f"{mean_std(_values(runs, 'loss'))} / {runs[0]['chance']:.3f}",
                mean_std(_values(runs, "probe_init")),
                mean_std(_values(runs, "probe")),
                f"{mean_std(_values(runs, 'probe_all_labels_init'))} → {mean_std(_values(runs, 'probe_all_labels'))}",
                f"{mean_std(_values(runs, 'knn_init'))} → {mean_std(_values(runs, 'knn'))}",
                mean_std(_values(runs, "effective_rank"), 1),
            ]
            for label, runs in image.items()
        ],
    )
    return (
        f"Toys: {config['toy_steps']} SGD steps, batch {TOY_BATCH}, InfoNCE τ = {TOY_TEMPERATURE} on unnormalized "
        f"embeddings; eigenvalues of the exact embedding covariance W Wᵀ; mean ± std over seeds {config['seeds']}."
        f"\n\n{toy1}\n\n{depth_table}\n\n{align_table}\n\n"
        f"Image task: {config['dataset']} ({config['image_size']} px), {config['encoder']}"
        f"{' with a residual last block' if config.get('residual') else ''}, {config['epochs']} epochs, batch "
        f"{config['batch_size']}, lr {config['lr']}, τ = {config['temperature']}, augmentation strength "
        f"{config['strength']}; probe: logistic regression on {config['labels_per_class']} labelled training "
        f"images per class (mean of {config['label_draws']} draws), and on all labels; seeds "
        f"{_image_seeds(config)}.\n\n{image_table}"
    )


def figures(results: dict, config: dict, out) -> list[str]:
    import matplotlib.pyplot as plt

    toys, image = results["toys"], results["image"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, noise in (("strong", STRONG), ("weak", WEAK)):
        for name, field, style in (("init", "spectrum_init", ":"), ("after", "spectrum", "-")):
            spectrum = torch.tensor(toys[key][0][field])
            axes[0].plot((spectrum / spectrum[0]).log10(), style, marker="o", label=f"noise {noise}, {name}")
    axes[0].set_title("toy 1: one linear layer")
    for depth, runs in toys["depth"].items():
        for name, field, style in (
            ("init", "spectrum_init", ":"),
            (f"step {config['early_step']}", "spectrum_early", "--"),
            ("end", "spectrum", "-"),
        ):
            spectrum = torch.tensor(runs[0][field])
            axes[1].plot(spectrum.log10(), style, label=f"{depth} layer(s), {name}")
    axes[1].set_title(f"toy 2: same starting map, noise {DEPTH_NOISE} (log10 λ_k)")
    for label, runs in image.items():
        spectrum = torch.tensor(runs[0]["spectrum"])
        axes[2].plot((spectrum / spectrum[0]).clamp_min(1e-30).log10(), label=label)
    axes[2].set_title(f"{config['dataset']}: spectrum of h")
    for ax in axes:
        ax.set_xlabel("eigenvalue rank k")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log10 eigenvalue (first seed)")
    return [save_figure(fig, out, "spectra.png")]
