"""Pre- vs post-projection features and the fixed reweighting head (Xue et al., ICLR 2024).

The digit-on-image test bed, built from shipped and generated data: a scikit-learn digit (centred, half the
image side) blended into a generated background (a sinusoidal grating with random colours, orientation,
frequency and phase, drawn from a small pool). As in the paper's MNIST-on-CIFAR the digit is the strong
feature -- it tells items apart, the background does not -- so with every view showing it, contrastive
learning picks it up. Each training view drops the digit with
probability ``p_drop``, so the objective under-weights it more and more; the downstream task is the digit.
SimCLR with the usual MLP projector is trained over a sweep of ``p_drop``, and the linear probe reads the
digit from h (pre-projection) and z (post-projection): the claim is that h's advantage grows with
``p_drop``. Xue et al.'s fixed head z = h * kappa^(-i) is trained at the largest ``p_drop`` of the sweep.
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
    loss_gate,
    markdown_table,
    mean,
    mean_std,
    probe_gate,
    save_figure,
    slope,
)

NAME = "xue"
TITLE = "Projection head: pre- vs post-projection and the fixed reweighting head (Xue et al., ICLR 2024)"
SUMMARY = "h's advantage over z grows as augmentation drops a feature; the fixed kappa head comes close to the MLP head"

_QUICK = dict(
    seeds=[0, 1, 2],
    image_size=16,
    train_size=2048,
    test_size=512,
    p_drops=(0.0, 0.3, 0.6),
    blend=0.9,
    contrast=0.5,
    backgrounds=4,
    labels_per_class=10,
    label_draws=5,
    kappa=1.05,
    encoder="convnet",
    dim=128,
    width=32,
    proj_dim=128,
    epochs=8,
    batch_size=128,
    lr=0.1,
    temperature=0.2,
    strength=0.1,
)
CONFIGS = {
    "smoke": dict(
        _QUICK,
        seeds=[0],
        p_drops=(0.0, 0.9),
        train_size=64,
        test_size=32,
        dim=16,
        width=8,
        proj_dim=16,
        epochs=1,
        batch_size=32,
    ),
    "quick": _QUICK,
    "full": dict(
        _QUICK,
        p_drops=(0.0, 0.2, 0.4, 0.6, 0.8),
        image_size=32,
        train_size=50_000,
        test_size=10_000,
        encoder="resnet18",
        epochs=200,
        batch_size=512,
        lr=None,
        strength=1.0,
    ),
}
HEADS = {"MLP projector": "mlp", "fixed reweighting head": "reweight"}
# Stated margins: h's advantage over z must grow by 0.05 accuracy per unit of p_drop and be 2 points at
# the largest p_drop; "comes close": the fixed head's h probe within CLOSE of the MLP head's, or better;
# the probe gate: an arm 5 points over chance (0.1) and the random-init encoder.
SLOPE_MARGIN, GAP_MARGIN, CLOSE, PROBE_GATE = 0.05, 0.02, 0.03, 0.05


class DigitsOnBackground:
    """A view source (see :mod:`fastcl.data.sources`) of digits blended into generated gratings.

    Items are fixed (data seed 0 for train, 1 for test; test digits are scikit-learn's held-out split).
    ``contrast`` scales the background's colour range; ``backgrounds``: draw each item's background from a
    pool of that many (default: one per item).
    ``views`` composes each view separately -- the digit kept with probability ``1 - p_drop`` -- and
    augments it with the ``simclr`` preset at ``strength``; ``eval_images`` always shows the digit.

    Example:
        >>> source = DigitsOnBackground(8, 4, torch.device("cpu"), image_size=16)
        >>> tuple(source.views(torch.arange(3)).shape)
        (3, 2, 3, 16, 16)
    """

    def __init__(
        self,
        train_size: int,
        test_size: int,
        device: torch.device,
        seed: int = 0,
        image_size: int = 16,
        p_drop: float = 0.8,
        blend: float = 0.7,
        strength: float = 0.5,
        contrast: float = 1.0,
        backgrounds: int | None = None,
    ):
        from fastcl.augment import MultiViewAugment
        from fastcl.data import Task, load_digits

        if not 0 <= p_drop <= 1:
            raise ValueError(f"p_drop must be in [0, 1], got {p_drop}")
        self.task, self.device, self.p_drop, self.blend = Task("classification", num_classes=10), device, p_drop, blend
        digit_size = image_size // 2
        x_train, y_train, x_test, y_test = load_digits(size=digit_size)
        pad = (image_size - digit_size) // 2
        self._backgrounds, self._digits, self.targets = {}, {}, {}
        for split, n, digits, labels, data_seed in (
            ("train", train_size, x_train, y_train, 0),
            ("test", test_size, x_test, y_test, 1),
        ):
            g = torch.Generator().manual_seed(data_seed)
            pick = torch.randint(0, len(labels), (n,), generator=g)
            canvas = torch.zeros(n, 1, image_size, image_size)
            canvas[:, :, pad : pad + digit_size, pad : pad + digit_size] = digits[pick, :1].float() / 255
            self._digits[split] = canvas.to(device)
            if backgrounds is None:
                self._backgrounds[split] = _gratings(n, image_size, g, contrast).to(device)
            else:  # a small pool shared by many items: the background tells items apart less than the digit
                pool = _gratings(backgrounds, image_size, g, contrast)
                self._backgrounds[split] = pool[torch.randint(0, backgrounds, (n,), generator=g)].to(device)
            self.targets[split] = labels[pick].to(device)
        self.size = {"train": train_size, "test": test_size}
        self.generator = torch.Generator(device).manual_seed(seed)
        self.eval_generator = torch.Generator(device)
        self._augment = MultiViewAugment(
            "simclr", size=image_size, views=1, strength=strength, generator=self.generator
        )
        self._eval_augment = MultiViewAugment(
            "simclr", size=image_size, views=1, strength=strength, generator=self.eval_generator
        )

    def _compose(self, split: str, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        digit = self._digits[split][idx] * keep[:, None, None, None]
        return (1 - self.blend * digit) * self._backgrounds[split][idx] + self.blend * digit

    def views(self, idx: torch.Tensor) -> torch.Tensor:
        both = torch.cat([idx, idx])
        keep = (torch.rand(len(both), generator=self.generator, device=self.device) >= self.p_drop).float()
        augmented = self._augment(self._compose("train", both, keep))[:, 0]
        return augmented.view(2, len(idx), *augmented.shape[1:]).transpose(0, 1)

    def eval_images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return self._augment.normalize(self._compose(split, idx, torch.ones(len(idx), device=self.device)))

    def random_images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        return self._eval_augment(self._compose(split, idx, torch.ones(len(idx), device=self.device)))[:, 0]


def _gratings(n: int, size: int, generator: torch.Generator, contrast: float = 1.0) -> torch.Tensor:
    """``[n, 3, size, size]`` in [0, 1]: c1 + (c2 - c1) * (1 + sin(2 pi f (u cos t + v sin t) + phase)) / 2,
    colours drawn in [(1 - contrast) / 2, (1 + contrast) / 2] (``contrast`` < 1: a fainter background)."""
    low = (1 - contrast) / 2
    c1 = low + contrast * torch.rand(n, 3, 1, 1, generator=generator)
    c2 = low + contrast * torch.rand(n, 3, 1, 1, generator=generator)
    theta = torch.rand(n, 1, 1, generator=generator) * math.pi
    freq = 0.5 + 1.5 * torch.rand(n, 1, 1, generator=generator)  # cycles across the image
    phase = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
    grid = torch.linspace(-0.5, 0.5, size)
    u, v = torch.meshgrid(grid, grid, indexing="ij")
    wave = (1 + torch.sin(2 * math.pi * freq * (u * theta.cos() + v * theta.sin()) + phase)) / 2
    return c1 + (c2 - c1) * wave[:, None]


def units(config: dict) -> int:
    return len(config["seeds"]) * (len(config["p_drops"]) + 1)


def _train(config: dict, ctx, head: str, p_drop: float, seed: int) -> dict:
    source = DigitsOnBackground(
        config["train_size"],
        config["test_size"],
        ctx.device,
        seed,
        config["image_size"],
        p_drop,
        config["blend"],
        config["strength"],
        config["contrast"],
        config["backgrounds"],
    )
    flags = dict(
        method="simclr",
        head=head,
        kappa=config["kappa"],
        proj_dim=config["proj_dim"],
        dataset="digits",
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        temperature=config["temperature"],
        seed=seed,
    )
    if config["lr"] is not None:
        flags["lr"] = config["lr"]
    from fastcl.models import ContrastiveModel

    per_class, draws = config["labels_per_class"], config["label_draws"]
    untrained = ContrastiveModel(build_encoder(config, seed), head, config["proj_dim"], config["kappa"])
    probe_init = few_label_probe(untrained.to(ctx.device), source, per_class, draws, seed)
    model, history = ctx.train(f"{head}-p{p_drop}-seed{seed}", source, build_encoder(config, seed), **flags)
    probe = few_label_probe(model, source, per_class, draws, seed)
    end = history[-1]
    return {
        "probe_h": probe["repr"],
        "probe_z": probe["proj"],
        "probe_h_init": probe_init["repr"],
        "probe_z_init": probe_init["proj"],
        "probe_h_all_labels": end["probe"],
        "probe_z_all_labels": end["probe_proj"],
        "effective_rank_h": end["effective_rank_repr"],
        "effective_rank_z": end["effective_rank_proj"],
        "loss": end["loss"],
        "chance": chance_loss("ntxent", config["batch_size"]),
    }


def run(config: dict, ctx) -> dict:
    sweep = {str(p): [_train(config, ctx, "mlp", p, seed) for seed in config["seeds"]] for p in config["p_drops"]}
    p_max = config["p_drops"][-1]
    reweight = [_train(config, ctx, "reweight", p_max, seed) for seed in config["seeds"]]
    return {"sweep": sweep, "reweight": reweight}


def _arms(results: dict, config: dict) -> dict[str, list[dict]]:
    arms = {f"MLP projector, p_drop = {p}": runs for p, runs in results["sweep"].items()}
    arms[f"fixed reweighting head, p_drop = {config['p_drops'][-1]}"] = results["reweight"]
    return arms


def claims(results: dict, config: dict) -> list[Claim]:
    arms = _arms(results, config)
    losses = loss_gate({label: ([r["loss"] for r in runs], runs[0]["chance"]) for label, runs in arms.items()})

    def probes(labels: list[str]) -> dict:
        """The probe gate over the arms a claim compares."""
        return probe_gate(
            {
                label: ([r["probe_h"] for r in arms[label]], [r["probe_h_init"] for r in arms[label]])
                for label in labels
            },
            chance=0.1,
            margin=PROBE_GATE,
            higher_is_better=True,
        )

    sweep_labels = [f"MLP projector, p_drop = {p}" for p in results["sweep"]]
    p_drops = list(config["p_drops"])
    seeds = range(len(config["seeds"]))
    gaps = {p: [r["probe_h"] - r["probe_z"] for r in results["sweep"][str(p)]] for p in p_drops}
    slopes = [slope(p_drops, [gaps[p][i] for p in p_drops]) for i in seeds]
    p_max = p_drops[-1]
    mlp_h = [r["probe_h"] for r in results["sweep"][str(p_max)]]
    reweight_h = [r["probe_h"] for r in results["reweight"]]
    return [
        Claim(
            "pre_projection_advantage_grows_with_p_drop",
            "The more the augmentation drops a feature the downstream task needs (the digit, with probability "
            "p_drop), the more the pre-projection representation h beats the post-projection z on it.",
            f"slope of (digit probe on h − on z) against p_drop ∈ {p_drops}, MLP projector",
            slopes,
            SLOPE_MARGIN,
            gate(losses, probes(sweep_labels)),
            {f"h − z at p_drop = {p}": gaps[p] for p in p_drops},
        ),
        Claim(
            "pre_projection_beats_post_projection",
            f"When augmentation drops the digit (p_drop = {p_max}), the pre-projection h beats the "
            "post-projection z on it.",
            f"digit probe accuracy on h minus on z at p_drop = {p_max}, MLP projector",
            gaps[p_max],
            GAP_MARGIN,
            gate(losses, probes(sweep_labels[-1:])),
            {"h": mlp_h, "z": [r["probe_z"] for r in results["sweep"][str(p_max)]]},
        ),
        Claim(
            "reweighting_head_close_to_mlp",
            f"The fixed reweighting head (κ = {config['kappa']}) comes close to the trained MLP projector "
            f"(p_drop = {p_max}).",
            f"digit probe on h, fixed head minus MLP head, plus the tolerance {CLOSE}",
            [a - b + CLOSE for a, b in zip(reweight_h, mlp_h)],
            0.0,
            gate(losses, probes(list(arms)[-2:])),
            {"fixed head h": reweight_h, "MLP head h": mlp_h},
        ),
    ]


def tables(results: dict, config: dict) -> str:
    rows = [
        [
            label,
            f"{mean_std([r['loss'] for r in runs])} / {runs[0]['chance']:.3f}",
            mean_std([r["probe_h_init"] for r in runs]),
            mean_std([r["probe_h"] for r in runs]),
            mean_std([r["probe_z"] for r in runs]),
            mean_std([r["probe_h"] - r["probe_z"] for r in runs]),
            mean_std([r["effective_rank_h"] for r in runs], 1),
            mean_std([r["effective_rank_z"] for r in runs], 1),
        ]
        for label, runs in _arms(results, config).items()
    ]
    return (
        f"Digits blended (s = {config['blend']}) into generated gratings (colour contrast {config['contrast']}, "
        f"a pool of {config['backgrounds']} backgrounds), {config['image_size']} px, {config['train_size']} / "
        f"{config['test_size']} items; "
        f"each view drops the digit with probability p_drop; {config['encoder']}, SimCLR τ = "
        f"{config['temperature']}, lr {config['lr']}, {config['epochs']} epochs, augmentation strength "
        f"{config['strength']}. Probe: logistic regression on the digit label from "
        f"{config['labels_per_class']} labelled "
        f"images per class (mean of {config['label_draws']} draws; chance 0.1). Mean ± std over "
        f"seeds {config['seeds']}.\n\n"
        + markdown_table(
            [
                "head, p_drop",
                "final loss / chance",
                "probe h at init",
                "probe h",
                "probe z",
                "h − z",
                "eff. rank h",
                "eff. rank z",
            ],
            rows,
        )
    )


def figures(results: dict, config: dict, out) -> list[str]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    p_drops = list(config["p_drops"])
    for key, name in (("probe_h", "h (pre-projection)"), ("probe_z", "z (post-projection)")):
        values = [[r[key] for r in results["sweep"][str(p)]] for p in p_drops]
        axes[0].errorbar(
            p_drops,
            [mean(v) for v in values],
            yerr=[(max(v) - min(v)) / 2 for v in values],
            marker="o",
            capsize=3,
            label=name,
        )
    init = mean([r["probe_h_init"] for runs in results["sweep"].values() for r in runs])
    axes[0].axhline(init, color="gray", ls="--", lw=1, label="h at random init")
    axes[0].axhline(0.1, color="black", ls=":", lw=1, label="chance (10 classes)")
    axes[0].set_xlabel("p_drop (probability a view loses the digit)")
    axes[0].set_ylabel("digit probe accuracy (bars: range over seeds)")
    axes[0].set_title("MLP projector")
    axes[0].legend(fontsize=8)
    labels = ["MLP projector", "fixed reweighting head"]
    runs = [results["sweep"][str(p_drops[-1])], results["reweight"]]
    for offset, key, name in ((-0.2, "probe_h", "h"), (0.2, "probe_z", "z")):
        values = [[r[key] for r in arm] for arm in runs]
        axes[1].bar(
            [i + offset for i in range(len(labels))],
            [mean(v) for v in values],
            width=0.4,
            label=name,
            yerr=[(max(v) - min(v)) / 2 for v in values],
            capsize=3,
        )
    axes[1].set_xticks(range(len(labels)), labels)
    axes[1].set_title(f"p_drop = {p_drops[-1]}")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    return [save_figure(fig, out, "xue.png")]
