"""Transformation invariance: gradient penalty and feature averaging (Foster, Pukdee & Rainforth, ICLR 2021).

On Spirograph (generated; 4 targets, 6 nuisance parameters that every view redraws), SimCLR is trained
with and without Foster et al.'s gradient penalty (``fastcl train --gp-lambda``). Measured: the
conditional variance of the normalized representation over nuisance draws (the penalty should lower it),
and the linear probe's MSE on features averaged over M transformations (it should fall as M grows).
"""

from __future__ import annotations

from fastcl.repro.common import (
    Claim,
    build_encoder,
    compare_seeds,
    markdown_table,
    mean,
    mean_std,
    save_figure,
    transformation_spread,
)

NAME = "foster"
TITLE = "Gradient penalty and feature averaging on Spirograph (Foster et al., ICLR 2021)"
SUMMARY = "the penalty lowers the conditional variance; averaging over M transformations lowers the probe MSE"

_QUICK = dict(
    seeds=[0, 1],
    train_size=2048,
    test_size=512,
    encoder="convnet",
    dim=64,
    width=16,
    proj_dim=128,
    epochs=4,
    batch_size=128,
    lr=0.5,
    gp_lambda=0.01,
    gp_draws=100,
    averaging=(1, 2, 4, 8),
    probe_train=512,
    probe_test=256,
    spread_items=128,
    spread_draws=8,
)
CONFIGS = {
    "smoke": dict(
        _QUICK,
        seeds=[0],
        train_size=64,
        test_size=32,
        dim=16,
        width=8,
        proj_dim=16,
        epochs=1,
        batch_size=32,
        gp_draws=4,
        averaging=(1, 2),
        probe_train=64,
        probe_test=32,
        spread_items=16,
        spread_draws=2,
    ),
    "quick": _QUICK,
    # Foster et al.: 100 000 / 20 000 Spirograph items, M up to 30, lambda 0.01 with the clamp at 1000.
    "full": dict(
        _QUICK,
        seeds=[0, 1, 2],
        train_size=100_000,
        test_size=20_000,
        encoder="resnet18",
        epochs=50,
        batch_size=512,
        lr=None,
        averaging=(1, 2, 5, 10, 20, 30),
        probe_train=20_000,
        probe_test=5_000,
        spread_items=2_000,
        spread_draws=30,
    ),
}
TEMPERATURE = 0.5  # Foster et al.'s NT-Xent temperature


def _arms(config: dict) -> dict[str, float]:
    return {"no penalty": 0.0, f"penalty λ = {config['gp_lambda']}": config["gp_lambda"]}


def units(config: dict) -> int:
    return 2 * len(config["seeds"]) * len(_arms(config))


def run(config: dict, ctx) -> dict:
    from fastcl.data import SpirographSource
    from fastcl.evaluation import evaluate

    arms = {}
    for label, gp_lambda in _arms(config).items():
        arms[label] = []
        for seed in config["seeds"]:
            source = SpirographSource(config["train_size"], config["test_size"], ctx.device, seed)
            flags = dict(
                method="simclr",
                dataset="spirograph",
                proj_dim=config["proj_dim"],
                epochs=config["epochs"],
                batch_size=config["batch_size"],
                temperature=TEMPERATURE,
                gp_lambda=gp_lambda,
                gp_draws=config["gp_draws"],
                seed=seed,
                train_size=config["train_size"],
                test_size=config["test_size"],
            )
            if config["lr"] is not None:
                flags["lr"] = config["lr"]
            model, history = ctx.train(f"gp{gp_lambda}-seed{seed}", source, build_encoder(config, seed), **flags)
            probe_source = SpirographSource(config["probe_train"], config["probe_test"], ctx.device, seed)
            mse = {
                str(m): evaluate(model, probe_source, feature_averaging=m, eval_seed=seed)["probe"]
                for m in config["averaging"]
            }
            spread = transformation_spread(model, probe_source, config["spread_items"], config["spread_draws"], seed)
            ctx.progress.step(f"feature averaging, {label}, seed {seed}")
            arms[label].append(
                {
                    "probe_mse": mse,
                    "loss": history[-1]["loss"],
                    "probe_mse_init": history[0]["probe"],
                    "probe_mse_trainer": history[-1]["probe"],
                    **spread,
                }
            )
    return {"arms": arms}


def claims(results: dict, config: dict) -> list[Claim]:
    arms = results["arms"]
    (plain_label, plain), (gp_label, gp) = arms.items()
    first, last = str(config["averaging"][0]), str(config["averaging"][-1])
    out = [
        Claim(
            "penalty_lowers_conditional_variance",
            "The gradient penalty lowers the conditional variance of the normalized representation over "
            "nuisance transformations.",
            f"E[Var(ĥ | x)] per seed: {gp_label} {[round(r['condvar_repr'], 4) for r in gp]} vs {plain_label} "
            f"{[round(r['condvar_repr'], 4) for r in plain]}; test penalty < none",
            compare_seeds([r["condvar_repr"] for r in gp], [r["condvar_repr"] for r in plain], "<"),
        )
    ]
    for label, runs in arms.items():
        at_last, at_first = [r["probe_mse"][last] for r in runs], [r["probe_mse"][first] for r in runs]
        out.append(
            Claim(
                f"averaging_lowers_mse_{'penalty' if runs is gp else 'no_penalty'}",
                f"Averaging features over M transformations lowers the linear probe's MSE ({label}).",
                f"probe MSE per seed: M = {last} {[round(v, 5) for v in at_last]} vs M = {first} "
                f"{[round(v, 5) for v in at_first]}; test M = {last} < M = {first}",
                compare_seeds(at_last, at_first, "<"),
            )
        )
    with_gp, without = [r["probe_mse"][last] for r in gp], [r["probe_mse"][last] for r in plain]
    out.append(
        Claim(
            "penalty_improves_averaged_probe",
            "With feature averaging, the penalty's representation gives a lower probe MSE than training without it.",
            f"probe MSE at M = {last} per seed: {gp_label} {[round(v, 5) for v in with_gp]} vs {plain_label} "
            f"{[round(v, 5) for v in without]}; test penalty < none",
            compare_seeds(with_gp, without, "<"),
        )
    )
    return out


def tables(results: dict, config: dict) -> str:
    arms = results["arms"]
    headers = ["training", "cond. variance of ĥ", "cond. variance of ẑ", "probe MSE at init"]
    headers += [f"probe MSE, M = {m}" for m in config["averaging"]]
    rows = []
    for label, runs in arms.items():
        row = [
            label,
            mean_std([r["condvar_repr"] for r in runs], 4),
            mean_std([r["condvar_proj"] for r in runs], 4),
            mean_std([r["probe_mse_init"] for r in runs], 4),
        ]
        row += [mean_std([r["probe_mse"][str(m)] for r in runs], 4) for m in config["averaging"]]
        rows.append(row)
    return (
        f"Spirograph, {config['train_size']} training items, {config['encoder']} (dim {config['dim']}), SimCLR "
        f"τ = {TEMPERATURE}, {config['epochs']} epochs, batch {config['batch_size']}; penalty with "
        f"{config['gp_draws']} α′ draws, clamp 1000. Conditional variance over {config['spread_draws']} "
        f"nuisance draws of {config['spread_items']} test items. Probe: ridge on {config['probe_train']} / "
        f"{config['probe_test']} items, MSE of the four targets scaled to [0, 1] (a constant predictor scores "
        f"1/12 ≈ 0.083), features averaged over M transformations (M = 1: one fixed draw). Mean ± std over "
        f"seeds {config['seeds']}.\n\n" + markdown_table(headers, rows)
    )


def figures(results: dict, config: dict, out) -> list[str]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ms = list(config["averaging"])
    for label, runs in results["arms"].items():
        values = [[r["probe_mse"][str(m)] for r in runs] for m in ms]
        axes[0].errorbar(
            ms,
            [mean(v) for v in values],
            yerr=[(max(v) - min(v)) / 2 for v in values],
            marker="o",
            capsize=3,
            label=label,
        )
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("M (transformations averaged)")
    axes[0].set_ylabel("linear probe MSE (mean over seeds; bars: range)")
    axes[0].set_title("feature averaging")
    axes[0].legend()
    labels = list(results["arms"])
    for offset, space in ((-0.2, "repr"), (0.2, "proj")):
        axes[1].bar(
            [i + offset for i in range(len(labels))],
            [mean([r[f"condvar_{space}"] for r in results["arms"][label]]) for label in labels],
            width=0.4,
            label={"repr": "h (encoder)", "proj": "z (projection)"}[space],
        )
    axes[1].set_xticks(range(len(labels)), labels)
    axes[1].set_ylabel("E[Var(normalized features | x)]")
    axes[1].set_title("conditional variance over nuisances")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    return [save_figure(fig, out, "foster.png")]
