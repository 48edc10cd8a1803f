"""Pre- vs post-projection features and the fixed reweighting head (Xue et al., ICLR 2024).

The digit-on-image test bed, built from shipped and generated data: a scikit-learn digit (centred, half the
image side) blended into a generated background (a coloured sinusoidal grating with random colours,
orientation, frequency and phase). Each training view drops the digit with probability ``p_drop``, so the
contrastive objective under-weights the digit; the downstream task is the digit. SimCLR is trained with
the usual MLP projector and with Xue et al.'s fixed head z = h * kappa^(-i); the linear probe reads the
digit from h (pre-projection) and z (post-projection).
"""

from __future__ import annotations

import math

import torch

from fastcl.repro.common import (
    Claim,
    build_encoder,
    compare_close,
    compare_seeds,
    markdown_table,
    mean,
    mean_std,
    save_figure,
)

NAME = "xue"
TITLE = "Projection head: pre- vs post-projection and the fixed reweighting head (Xue et al., ICLR 2024)"
SUMMARY = "h beats z on a feature the augmentation drops; the fixed kappa head comes close to the MLP head"

_QUICK = dict(
    seeds=[0, 1],
    image_size=16,
    train_size=2048,
    test_size=512,
    p_drop=0.8,
    blend=0.7,
    kappa=1.05,
    encoder="convnet",
    dim=128,
    width=32,
    proj_dim=128,
    epochs=8,
    batch_size=128,
    lr=0.5,
    strength=0.5,
)
CONFIGS = {
    "smoke": dict(
        _QUICK, seeds=[0], train_size=64, test_size=32, dim=16, width=8, proj_dim=16, epochs=1, batch_size=32
    ),
    "quick": _QUICK,
    "full": dict(
        _QUICK,
        seeds=[0, 1, 2],
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
TEMPERATURE = 0.5
HEADS = {"MLP projector": "mlp", "fixed reweighting head": "reweight"}
CLOSE = 0.03  # "comes close": the reweighting head's h-probe accuracy within 3 points of the MLP head's, or better


class DigitsOnBackground:
    """A view source (see :mod:`fastcl.data.sources`) of digits blended into generated gratings.

    Items are fixed (data seed 0 for train, 1 for test; test digits are scikit-learn's held-out split).
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
            self._backgrounds[split] = _gratings(n, image_size, g).to(device)
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


def _gratings(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 3, size, size]`` in [0, 1]: c1 + (c2 - c1) * (1 + sin(2 pi f (u cos t + v sin t) + phase)) / 2."""
    c1, c2 = torch.rand(n, 3, 1, 1, generator=generator), torch.rand(n, 3, 1, 1, generator=generator)
    theta = torch.rand(n, 1, 1, generator=generator) * math.pi
    freq = 0.5 + 1.5 * torch.rand(n, 1, 1, generator=generator)  # cycles across the image
    phase = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
    grid = torch.linspace(-0.5, 0.5, size)
    u, v = torch.meshgrid(grid, grid, indexing="ij")
    wave = (1 + torch.sin(2 * math.pi * freq * (u * theta.cos() + v * theta.sin()) + phase)) / 2
    return c1 + (c2 - c1) * wave[:, None]


def units(config: dict) -> int:
    return len(config["seeds"]) * len(HEADS)


def run(config: dict, ctx) -> dict:
    heads = {}
    for label, head in HEADS.items():
        heads[label] = []
        for seed in config["seeds"]:
            source = DigitsOnBackground(
                config["train_size"],
                config["test_size"],
                ctx.device,
                seed,
                config["image_size"],
                config["p_drop"],
                config["blend"],
                config["strength"],
            )
            flags = dict(
                method="simclr",
                head=head,
                kappa=config["kappa"],
                proj_dim=config["proj_dim"],
                dataset="digits",
                epochs=config["epochs"],
                batch_size=config["batch_size"],
                temperature=TEMPERATURE,
                seed=seed,
            )
            if config["lr"] is not None:
                flags["lr"] = config["lr"]
            _, history = ctx.train(f"{head}-seed{seed}", source, build_encoder(config, seed), **flags)
            init, end = history[0], history[-1]
            heads[label].append(
                {
                    "probe_h": end["probe"],
                    "probe_z": end["probe_proj"],
                    "probe_h_init": init["probe"],
                    "probe_z_init": init["probe_proj"],
                    "effective_rank_h": end["effective_rank_repr"],
                    "effective_rank_z": end["effective_rank_proj"],
                    "loss": end["loss"],
                }
            )
    return {"heads": heads}


def claims(results: dict, config: dict) -> list[Claim]:
    mlp, reweight = results["heads"]["MLP projector"], results["heads"]["fixed reweighting head"]
    h, z = [r["probe_h"] for r in mlp], [r["probe_z"] for r in mlp]
    h_reweight = [r["probe_h"] for r in reweight]
    return [
        Claim(
            "pre_projection_beats_post_projection",
            f"When augmentation drops a feature the downstream task needs (the digit, p_drop = {config['p_drop']}), "
            "the pre-projection representation h beats the post-projection z.",
            f"digit probe accuracy per seed (MLP projector): h {[round(v, 4) for v in h]} vs z "
            f"{[round(v, 4) for v in z]}; test h > z",
            compare_seeds(h, z, ">"),
        ),
        Claim(
            "reweighting_head_close_to_mlp",
            f"The fixed reweighting head (κ = {config['kappa']}) comes close to the trained MLP projector.",
            f"digit probe accuracy of h per seed: reweighting {[round(v, 4) for v in h_reweight]} vs MLP "
            f"{[round(v, 4) for v in h]}; test reweighting > MLP − {CLOSE}",
            compare_close(h_reweight, h, CLOSE),
        ),
    ]


def tables(results: dict, config: dict) -> str:
    rows = [
        [
            label,
            mean_std([r["probe_h_init"] for r in runs]),
            mean_std([r["probe_h"] for r in runs]),
            mean_std([r["probe_z"] for r in runs]),
            mean_std([r["effective_rank_h"] for r in runs], 1),
            mean_std([r["effective_rank_z"] for r in runs], 1),
        ]
        for label, runs in results["heads"].items()
    ]
    return (
        f"Digits blended (s = {config['blend']}) into generated gratings, {config['image_size']} px, "
        f"{config['train_size']} / {config['test_size']} items; each view drops the digit with probability "
        f"{config['p_drop']}; {config['encoder']}, SimCLR τ = {TEMPERATURE}, {config['epochs']} epochs, "
        f"augmentation "
        f"strength {config['strength']}. Probe: logistic regression on the digit label. Mean ± std over seeds "
        f"{config['seeds']}.\n\n"
        + markdown_table(
            ["head", "probe acc h at init", "probe acc h", "probe acc z", "eff. rank h", "eff. rank z"], rows
        )
    )


def figures(results: dict, config: dict, out) -> list[str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(results["heads"])
    for offset, key, name in ((-0.2, "probe_h", "h (pre-projection)"), (0.2, "probe_z", "z (post-projection)")):
        values = [[r[key] for r in results["heads"][label]] for label in labels]
        ax.bar(
            [i + offset for i in range(len(labels))],
            [mean(v) for v in values],
            width=0.4,
            label=name,
            yerr=[(max(v) - min(v)) / 2 for v in values],
            capsize=3,
        )
    init = mean([r["probe_h_init"] for runs in results["heads"].values() for r in runs])
    ax.axhline(init, color="gray", ls="--", lw=1, label="h at random init")
    ax.axhline(0.1, color="black", ls=":", lw=1, label="chance (10 classes)")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("digit probe accuracy (bars: range over seeds)")
    ax.set_title(f"digit dropped from views with p = {config['p_drop']}")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return [save_figure(fig, out, "xue.png")]
