"""Augmentation strength vs projector invariance (Cosentino et al., arXiv 2205.06926).

SimCLR with an MLP projector is trained at several values of fastcl's augmentation-strength knob s (one
number that scales the whole ``simclr`` policy: crop scale, jitter, grayscale, flip). For the encoder output
h and the projector output z it measures, at one fixed evaluation augmentation for every model, the
invariance ratio (conditional variance over augmentations of one test image divided by the variance
between images, on L2-normalized features: lower = more invariant; a collapsed space cannot win it), the
effective rank, and a few-label linear probe; the random-init encoder and projector are measured the same
way. The claims: as s grows the projector's invariance rises and its rank falls faster than the encoder's,
and the encoder transfers better than the projector.
"""

from __future__ import annotations

import math

from fastcl.repro.common import (
    Claim,
    build_encoder,
    chance_loss,
    few_label_probe,
    gate,
    image_source,
    loss_gate,
    markdown_table,
    mean,
    mean_std,
    probe_gate,
    save_figure,
    slope,
    transformation_spread,
)

NAME = "cosentino"
TITLE = "Augmentation strength vs projector invariance (Cosentino et al., 2022)"
SUMMARY = "with stronger augmentation the projector's invariance rises and its rank falls faster than the encoder's"

_QUICK = dict(
    seeds=[0, 1, 2],
    strengths=(0.25, 0.5, 0.7),
    eval_strength=0.7,
    dataset="digits",
    image_size=16,
    encoder="convnet",
    dim=128,
    width=32,
    proj_dim=128,
    epochs=6,
    batch_size=128,
    lr=0.1,
    temperature=0.2,
    draws=8,
    labels_per_class=5,
    label_draws=5,
)
CONFIGS = {
    "smoke": dict(
        _QUICK,
        seeds=[0],
        strengths=(0.25, 0.7),
        dim=16,
        width=8,
        proj_dim=16,
        epochs=1,
        batch_size=32,
        train_size=64,
        test_size=32,
        draws=2,
        label_draws=1,
        labels_per_class=1,
    ),
    "quick": _QUICK,
    "full": dict(
        _QUICK,
        strengths=(0.1, 0.25, 0.5, 0.75, 1.0),
        eval_strength=1.0,
        dataset="cifar10",
        image_size=32,
        encoder="resnet18",
        epochs=100,
        batch_size=512,
        lr=None,
        optimizer="lars",
        amp="bf16",
        labels_per_class=10,
    ),
}
# Stated margins: invariance-ratio slopes (ln units per unit of s) and the rank slopes 0.1; at the
# strongest s the projector 10 % more invariant (ln 1.1); the encoder's probe 1 point above the
# projector's; the probe gate 2 points over chance and random init.
SLOPE_MARGIN, RATIO_MARGIN, PROBE_MARGIN, PROBE_GATE = 0.1, math.log(1.1), 0.01, 0.02
SPACES = {"h": "repr", "z": "proj"}


def units(config: dict) -> int:
    return len(config["seeds"]) * (len(config["strengths"]) + 1)


def _measure(model, config: dict, ctx, seed: int) -> dict:
    """Invariance at the fixed evaluation strength, effective rank on the test images, few-label probe;
    for h and z."""
    from fastcl.evaluation import effective_rank, encode, singular_values

    eval_source = image_source(config, ctx, seed, config["eval_strength"])
    features = dict(
        zip(
            SPACES,
            encode(
                model.eval(),
                lambda idx: eval_source.eval_images("test", idx.to(eval_source.device)),
                eval_source.size["test"],
            ),
        )
    )
    spread = transformation_spread(model, eval_source, eval_source.size["test"], config["draws"], seed)
    probe = few_label_probe(model, eval_source, config["labels_per_class"], config["label_draws"], seed)
    out = {}
    for space, key in SPACES.items():
        out[f"ratio_{space}"] = spread[f"ratio_{key}"]
        out[f"condvar_{space}"] = spread[f"condvar_{key}"]
        out[f"between_{space}"] = spread[f"between_{key}"]
        out[f"probe_{space}"] = probe[key]
        out[f"effective_rank_{space}"] = effective_rank(singular_values(features[space]))
    return out


def run(config: dict, ctx) -> dict:
    from fastcl.models import ContrastiveModel

    runs, init = {}, []
    for seed in config["seeds"]:
        model = ContrastiveModel(build_encoder(config, seed), "mlp", config["proj_dim"]).to(ctx.device)
        init.append(_measure(model, config, ctx, seed))
        ctx.progress.step(f"random init, seed {seed}")
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
                temperature=config["temperature"],
                seed=seed,
                optimizer=config.get("optimizer", "sgd"),
                amp=config.get("amp", "off"),
            )
            if config["lr"] is not None:
                flags["lr"] = config["lr"]
            model, history = ctx.train(f"s{strength}-seed{seed}", source, build_encoder(config, seed), **flags)
            runs[str(strength)].append(
                {
                    **_measure(model, config, ctx, seed),
                    "loss": history[-1]["loss"],
                    "chance": chance_loss("ntxent", config["batch_size"]),
                }
            )
    return {"runs": runs, "init": init}


def _per_seed_slopes(results: dict, config: dict, key: str) -> list[float]:
    strengths = list(config["strengths"])
    return [
        slope(strengths, [math.log(results["runs"][str(s)][i][key]) for s in strengths])
        for i in range(len(config["seeds"]))
    ]


def claims(results: dict, config: dict) -> list[Claim]:
    runs = results["runs"]
    losses = gate(loss_gate({f"s = {s}": ([r["loss"] for r in arm], arm[0]["chance"]) for s, arm in runs.items()}))
    ratio_h, ratio_z = (_per_seed_slopes(results, config, f"ratio_{space}") for space in SPACES)
    rank_h, rank_z = (_per_seed_slopes(results, config, f"effective_rank_{space}") for space in SPACES)
    s_max = str(config["strengths"][-1])
    at_max_h, at_max_z = ([r[f"ratio_{space}"] for r in runs[s_max]] for space in SPACES)
    seeds = range(len(config["seeds"]))
    probe_h = [mean([runs[s][i]["probe_h"] for s in runs]) for i in seeds]
    probe_z = [mean([runs[s][i]["probe_z"] for s in runs]) for i in seeds]
    init = results["init"]
    probe_check = probe_gate(
        {
            f"{name}, s = {s}": ([r[f"probe_{space}"] for r in arm], [r[f"probe_{space}"] for r in init])
            for s, arm in runs.items()
            for space, name in (("h", "encoder"), ("z", "projector"))
        },
        chance=0.1,
        margin=PROBE_GATE,
        higher_is_better=True,
    )
    return [
        Claim(
            "projector_invariance_rises_faster",
            "As augmentation strength s grows, the projector's invariance rises faster than the encoder's.",
            "slope of ln(invariance ratio) against s, encoder h minus projector z (ratio = conditional over "
            "between-image variance at the fixed evaluation augmentation; lower = more invariant)",
            [a - b for a, b in zip(ratio_h, ratio_z)],
            SLOPE_MARGIN,
            losses,
            {"slope h": ratio_h, "slope z": ratio_z},
        ),
        Claim(
            "projector_more_invariant",
            "At the strongest augmentation the projector is more invariant than the encoder.",
            f"ln(ratio of h / ratio of z) at s = {s_max}",
            [math.log(a / b) for a, b in zip(at_max_h, at_max_z)],
            RATIO_MARGIN,
            losses,
            {"ratio h": at_max_h, "ratio z": at_max_z},
        ),
        Claim(
            "projector_rank_falls_faster",
            "As augmentation strength s grows, the projector's effective rank falls faster than the encoder's.",
            "slope of ln(effective rank) against s, encoder h minus projector z",
            [a - b for a, b in zip(rank_h, rank_z)],
            SLOPE_MARGIN,
            losses,
            {"slope h": rank_h, "slope z": rank_z},
        ),
        Claim(
            "encoder_transfers_better",
            "The encoder's representation transfers better than the projector's.",
            f"{config['labels_per_class']}-labels-per-class probe accuracy, h minus z, mean over the strengths",
            [a - b for a, b in zip(probe_h, probe_z)],
            PROBE_MARGIN,
            gate(losses["loss"], probe_check),
            {"probe h": probe_h, "probe z": probe_z},
        ),
    ]


_COLUMNS = (
    ("loss", "final loss", 3),
    ("ratio_h", "invariance ratio h", 3),
    ("ratio_z", "invariance ratio z", 3),
    ("effective_rank_h", "eff. rank h", 1),
    ("effective_rank_z", "eff. rank z", 1),
    ("probe_h", "probe h", 3),
    ("probe_z", "probe z", 3),
)


def tables(results: dict, config: dict) -> str:
    chance = chance_loss("ntxent", config["batch_size"])
    rows = [["random init"] + ["-"] + [mean_std([r[key] for r in results["init"]], d) for key, _, d in _COLUMNS[1:]]]
    rows += [
        [f"s = {s}"] + [mean_std([r[key] for r in runs], digits) for key, _, digits in _COLUMNS]
        for s, runs in results["runs"].items()
    ]
    return (
        f"{config['dataset']} ({config['image_size']} px), {config['encoder']} (h: {config['dim']} dims) + MLP "
        f"projector (z: {config['proj_dim']} dims), SimCLR τ = {config['temperature']}, lr {config['lr']}, "
        f"{config['epochs']} epochs per strength, batch {config['batch_size']} (chance loss {chance:.3f}). "
        f"Invariance ratio: conditional variance over {config['draws']} augmentations of each test image at "
        f"the fixed evaluation strength {config['eval_strength']}, divided by the variance between images "
        f"(L2-normalized features; lower = more invariant). Probe: logistic regression on "
        f"{config['labels_per_class']} labelled images per class (mean of {config['label_draws']} draws). "
        f"Mean ± std over seeds {config['seeds']}.\n\n"
        + markdown_table(["training"] + [title for _, title, _ in _COLUMNS], rows)
    )


def figures(results: dict, config: dict, out) -> list[str]:
    import matplotlib.pyplot as plt

    strengths = list(config["strengths"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, stem, title in zip(
        axes,
        ("ratio", "effective_rank", "probe"),
        ("invariance ratio (lower = more invariant)", "effective rank", "few-label probe accuracy"),
    ):
        for space, name, colour in (("h", "encoder h", "C0"), ("z", "projector z", "C1")):
            values = [[r[f"{stem}_{space}"] for r in results["runs"][str(s)]] for s in strengths]
            ax.errorbar(
                strengths,
                [mean(v) for v in values],
                yerr=[(max(v) - min(v)) / 2 for v in values],
                marker="o",
                capsize=3,
                color=colour,
                label=name,
            )
            ax.axhline(mean([r[f"{stem}_{space}"] for r in results["init"]]), color=colour, ls=":", lw=1)
        ax.set_title(title + " (dotted: random init)")
        ax.set_xlabel("training augmentation strength s")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    return [save_figure(fig, out, "cosentino.png")]
