"""Augmentation strength vs projector invariance (Cosentino et al., arXiv 2205.06926).

SimCLR with an MLP projector is trained at several values of fastcl's augmentation-strength knob s (one
number that scales the whole ``simclr`` policy: crop scale, jitter, grayscale, flip). For the encoder output
h and the projector output z it measures the invariance (mean cosine similarity between two augmentations
of the same test image, at the strength the model was trained with), the effective rank, and the linear
probe. The claim: as s grows, the projector's invariance rises and its effective rank falls faster than the
encoder's -- the projector, not the encoder, absorbs the invariance.
"""

from __future__ import annotations

import math

from fastcl.repro.common import (
    Claim,
    build_encoder,
    compare_seeds,
    image_source,
    markdown_table,
    mean,
    mean_std,
    save_figure,
    slope,
    transformation_spread,
)

NAME = "cosentino"
TITLE = "Augmentation strength vs projector invariance (Cosentino et al., 2022)"
SUMMARY = "with stronger augmentation the projector's invariance rises and its rank falls faster than the encoder's"

_QUICK = dict(
    seeds=[0, 1],
    strengths=(0.25, 0.75, 1.5),
    dataset="digits",
    image_size=16,
    encoder="convnet",
    dim=128,
    width=32,
    proj_dim=128,
    epochs=4,
    batch_size=128,
    lr=0.5,
    draws=4,
)
CONFIGS = {
    "smoke": dict(
        _QUICK,
        seeds=[0],
        strengths=(0.25, 1.0),
        dim=16,
        width=8,
        proj_dim=16,
        epochs=1,
        batch_size=32,
        train_size=64,
        test_size=32,
        draws=2,
    ),
    "quick": _QUICK,
    "full": dict(
        _QUICK,
        seeds=[0, 1, 2],
        strengths=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5),
        dataset="cifar10",
        image_size=32,
        encoder="resnet18",
        epochs=100,
        batch_size=512,
        lr=None,
        optimizer="lars",
        amp="bf16",
        draws=8,
    ),
}
TEMPERATURE = 0.5


def units(config: dict) -> int:
    return len(config["seeds"]) * len(config["strengths"])


def run(config: dict, ctx) -> dict:
    runs = {}
    for strength in config["strengths"]:
        runs[str(strength)] = []
        for seed in config["seeds"]:
            source = image_source(config, ctx, seed, strength)
            flags = dict(
                method="simclr",
                head="mlp",
                proj_dim=config["proj_dim"],
                dataset=config["dataset"],
                aug_strength=strength,
                epochs=config["epochs"],
                batch_size=config["batch_size"],
                temperature=TEMPERATURE,
                seed=seed,
                optimizer=config.get("optimizer", "sgd"),
                amp=config.get("amp", "off"),
            )
            if config["lr"] is not None:
                flags["lr"] = config["lr"]
            model, history = ctx.train(f"s{strength}-seed{seed}", source, build_encoder(config, seed), **flags)
            spread = transformation_spread(model, source, source.size["test"], config["draws"], seed)
            end = history[-1]
            runs[str(strength)].append(
                {
                    "cosine_h": spread["cosine_repr"],
                    "cosine_z": spread["cosine_proj"],
                    "effective_rank_h": end["effective_rank_repr"],
                    "effective_rank_z": end["effective_rank_proj"],
                    "probe_h": end["probe"],
                    "probe_z": end["probe_proj"],
                    "loss": end["loss"],
                }
            )
    return {"runs": runs}


def _per_seed_slopes(results: dict, config: dict, key: str, transform=lambda v: v) -> list[float]:
    strengths = list(config["strengths"])
    return [
        slope(strengths, [transform(results["runs"][str(s)][i][key]) for s in strengths])
        for i in range(len(config["seeds"]))
    ]


def claims(results: dict, config: dict) -> list[Claim]:
    cos_h, cos_z = (_per_seed_slopes(results, config, k) for k in ("cosine_h", "cosine_z"))
    rank_h, rank_z = (_per_seed_slopes(results, config, k, math.log) for k in ("effective_rank_h", "effective_rank_z"))
    strongest = results["runs"][str(config["strengths"][-1])]
    at_max_h, at_max_z = [r["cosine_h"] for r in strongest], [r["cosine_z"] for r in strongest]

    def r4(values):
        return [round(v, 4) for v in values]

    return [
        Claim(
            "projector_invariance_rises_faster",
            "As augmentation strength s grows, the projector's invariance rises faster than the encoder's.",
            f"slope of mean view cosine vs s per seed: z {r4(cos_z)} vs h {r4(cos_h)}; test z > h",
            compare_seeds(cos_z, cos_h, ">"),
        ),
        Claim(
            "projector_rank_falls_faster",
            "As augmentation strength s grows, the projector's effective rank falls faster than the encoder's.",
            f"slope of log effective rank vs s per seed: z {r4(rank_z)} vs h {r4(rank_h)}; test z < h",
            compare_seeds(rank_z, rank_h, "<"),
        ),
        Claim(
            "projector_more_invariant",
            "At the strongest augmentation the projector is more invariant than the encoder.",
            f"mean view cosine at s = {config['strengths'][-1]} per seed: z {r4(at_max_z)} vs h {r4(at_max_h)}; "
            "test z > h",
            compare_seeds(at_max_z, at_max_h, ">"),
        ),
    ]


_COLUMNS = (
    ("cosine_h", "view cosine h", 3),
    ("cosine_z", "view cosine z", 3),
    ("effective_rank_h", "eff. rank h", 1),
    ("effective_rank_z", "eff. rank z", 1),
    ("probe_h", "probe acc h", 3),
    ("probe_z", "probe acc z", 3),
)


def tables(results: dict, config: dict) -> str:
    rows = [
        [s] + [mean_std([r[key] for r in runs], digits) for key, _, digits in _COLUMNS]
        for s, runs in results["runs"].items()
    ]
    return (
        f"{config['dataset']} ({config['image_size']} px), {config['encoder']} (h: {config['dim']} dims) + MLP "
        f"projector (z: {config.get('proj_dim', 128)} dims), SimCLR τ = {TEMPERATURE}, {config['epochs']} epochs "
        f"per strength. View cosine: "
        f"mean cosine similarity between {config['draws']} augmentations of each test image at the model's "
        f"training strength. Mean ± std over seeds {config['seeds']}.\n\n"
        + markdown_table(["strength s"] + [title for _, title, _ in _COLUMNS], rows)
    )


def figures(results: dict, config: dict, out) -> list[str]:
    import matplotlib.pyplot as plt

    strengths = list(config["strengths"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, stem, title in zip(
        axes,
        ("cosine", "effective_rank", "probe"),
        ("invariance (mean view cosine)", "effective rank", "linear probe accuracy"),
    ):
        for space, name in (("h", "encoder h"), ("z", "projector z")):
            values = [[r[f"{stem}_{space}"] for r in results["runs"][str(s)]] for s in strengths]
            ax.errorbar(
                strengths,
                [mean(v) for v in values],
                yerr=[(max(v) - min(v)) / 2 for v in values],
                marker="o",
                capsize=3,
                label=name,
            )
        ax.set_title(title)
        ax.set_xlabel("augmentation strength s")
        ax.grid(alpha=0.3)
        ax.legend()
    return [save_figure(fig, out, "cosentino.png")]
