"""What every reproduction shares: sizes, trainer runs, measurements, gates, verdicts and the files it writes.

An experiment (one module per paper) defines ``TITLE``, ``CONFIGS`` (one dict per size), ``units(config)``
(how many steps its progress bar has), ``run(config, ctx)`` (train and measure; returns every number as
plain JSON data), ``claims(results, config)`` (``Claim`` objects whose verdicts are computed from those
numbers), ``tables(results, config)`` (markdown) and ``figures(results, config, out)`` (PNG files).

A claim is judged from its effect per seed (positive = the paper's direction), a stated margin and a gate
(did the arms train; can the probe see anything):

>>> judge([0.3, 0.2, 0.4], margin=0.1, gate_ok=True)
'holds'
>>> judge([0.3, 0.2, 0.4], margin=0.1, gate_ok=False)
'untestable'
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

SIZES = ("smoke", "quick", "full")
HOLDS, FAILS, INCONCLUSIVE, UNTESTABLE = "holds", "does not hold", "inconclusive", "untestable"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, UNTESTABLE)
# An arm counts as trained when its final loss is at most this fraction of the loss at chance.
LOSS_GATE = 0.9
FEW_LABEL_L2 = 1e-3


def chance_loss(loss: str, batch: int) -> float:
    """The loss of an untrained (or collapsed) model: uniform logits over the candidates of each row.

    ``"ntxent"``: 2N-way rows with 2N - 1 candidates, ln(2N - 1); ``"infonce"``: cross-view, N candidates,
    ln N. ``batch`` is N, the number of inputs per step (two views each).

    Example:
        >>> round(chance_loss("ntxent", 128), 3), round(chance_loss("infonce", 128), 3)
        (5.541, 4.852)
    """
    if batch < 2:
        raise ValueError(f"batch must be >= 2, got {batch}")
    if loss == "ntxent":
        return math.log(2 * batch - 1)
    if loss == "infonce":
        return math.log(batch)
    raise ValueError(f"loss must be 'ntxent' or 'infonce', got {loss!r}")


def loss_gate(arms: dict[str, tuple[Sequence[float], float]]) -> dict:
    """Did every arm train? ``arms`` maps a label to (final loss per seed, chance level).

    An arm passes when every seed's final loss is at most ``LOSS_GATE`` (0.9) times its chance level.

    Example:
        >>> loss_gate({"a": ([3.0, 3.1], 5.54)})["passed"], loss_gate({"a": ([3.0, 5.5], 5.54)})["passed"]
        (True, False)
    """
    out = {}
    for label, (losses, chance) in arms.items():
        limit = LOSS_GATE * chance
        out[label] = {
            "losses": [float(v) for v in losses],
            "chance": chance,
            "limit": limit,
            "passed": all(v <= limit for v in losses),
        }
    return {"passed": all(arm["passed"] for arm in out.values()), "arms": out}


def probe_gate(
    arms: dict[str, tuple[Sequence[float], Sequence[float]]], chance: float, margin: float, higher_is_better: bool
) -> dict:
    """Can the probe show anything? ``arms`` maps a label to (probe per seed, random-init probe per seed).
    At least one arm's seed mean must beat both ``chance`` and the random-init mean by ``margin``
    (accuracy: higher is better; MSE: lower).

    Example:
        >>> probe_gate({"a": ([0.80, 0.82], [0.60, 0.61])}, chance=0.1, margin=0.05, higher_is_better=True)["passed"]
        True
        >>> probe_gate({"a": ([0.97, 0.97], [0.96, 0.96])}, chance=0.1, margin=0.05, higher_is_better=True)["passed"]
        False
    """
    sign = 1.0 if higher_is_better else -1.0
    out = {}
    for label, (trained, init) in arms.items():
        over_chance, over_init = sign * (mean(trained) - chance), sign * (mean(trained) - mean(init))
        out[label] = {
            "probe": [float(v) for v in trained],
            "probe_init": [float(v) for v in init],
            "over_chance": over_chance,
            "over_init": over_init,
            "passed": over_chance >= margin and over_init >= margin,
        }
    return {
        "passed": any(arm["passed"] for arm in out.values()),
        "chance": chance,
        "margin": margin,
        "higher_is_better": higher_is_better,
        "arms": out,
    }


def gate(losses: dict, probe: dict | None = None) -> dict:
    """One claim's gate: the loss gate of the arms it compares and, for a probe claim, the probe gate;
    ``passed`` when every part passed."""
    out = {"passed": losses["passed"] and (probe is None or probe["passed"]), "loss": losses}
    if probe is not None:
        out["probe"] = probe
    return out


def gate_passed(stored: dict) -> bool:
    """Recompute a stored gate's ``passed`` from its numbers alone (what CI checks on every results.json)."""
    ok = all(all(v <= LOSS_GATE * arm["chance"] for v in arm["losses"]) for arm in stored["loss"]["arms"].values())
    if "probe" in stored:
        probe = stored["probe"]
        sign = 1.0 if probe["higher_is_better"] else -1.0
        ok = ok and any(
            sign * (mean(arm["probe"]) - probe["chance"]) >= probe["margin"]
            and sign * (mean(arm["probe"]) - mean(arm["probe_init"])) >= probe["margin"]
            for arm in probe["arms"].values()
        )
    return ok


def judge(effects: Sequence[float], margin: float, gate_ok: bool) -> str:
    """The verdict on a claim from its effect per seed (positive = the paper's direction).

    - ``untestable``: the gate failed (an arm did not train, or the probe cannot see anything);
    - ``holds``: the effect is positive in every seed and its mean is at least ``margin``;
    - ``does not hold``: the mean effect is zero or goes the other way;
    - ``inconclusive``: anything between (a seed disagrees, or the mean is below the margin).

    Examples:
        >>> judge([0.3, 0.2, 0.4], 0.1, True), judge([0.3, -0.1, 0.4], 0.1, True)
        ('holds', 'inconclusive')
        >>> judge([-0.3, 0.1, -0.1], 0.1, True), judge([0.05, 0.06, 0.04], 0.1, True)
        ('does not hold', 'inconclusive')

    Raises:
        ValueError: no effects, or a negative margin.
    """
    if not effects:
        raise ValueError("effects must have one value per seed, got none")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not gate_ok:
        return UNTESTABLE
    m = mean(effects)
    if all(e > 0 for e in effects) and m >= margin:
        return HOLDS
    if m <= 0:
        return FAILS
    return INCONCLUSIVE


def _gate_text(stored: dict) -> str:
    """Why a gate failed, in words (empty when it passed)."""
    reasons = [
        f"{label}: final loss {rounded(arm['losses'])} > {LOSS_GATE} × chance {arm['chance']:.3f}"
        for label, arm in stored["loss"]["arms"].items()
        if not arm["passed"]
    ]
    probe = stored.get("probe")
    if probe is not None and not probe["passed"]:
        reasons.append(
            f"no arm's probe beats chance ({probe['chance']:.3g}) and random init by {probe['margin']} "
            + ", ".join(
                f"{label}: {mean(arm['probe']):.3f} vs init {mean(arm['probe_init']):.3f}"
                for label, arm in probe["arms"].items()
            )
        )
    return "; ".join(reasons)


@dataclasses.dataclass
class Claim:
    """One finding of a paper, the effect that tests it, its gate, and the verdict computed from them.

    Args:
        key: short identifier, e.g. ``"no_projector_collapses"``.
        statement: the paper's finding, in one sentence.
        measure: what the effect is (positive = the paper's direction), with its unit.
        effect: the effect, one value per seed.
        margin: the mean effect "holds" needs (in the unit of ``measure``).
        gate: from :func:`gate`.
        numbers: the per-seed numbers the effect is computed from, by label.

    ``verdict`` (:func:`judge`) and ``comparison`` (the numbers in words) are computed.
    """

    key: str
    statement: str
    measure: str
    effect: list[float]
    margin: float
    gate: dict
    numbers: dict[str, list[float]]
    verdict: str = ""
    comparison: str = ""

    def __post_init__(self):
        self.effect = [float(e) for e in self.effect]
        self.verdict = judge(self.effect, self.margin, self.gate["passed"])
        numbers = "; ".join(f"{label} {rounded(values, 4)}" for label, values in self.numbers.items())
        text = (
            f"{self.measure}: {mean_std(self.effect)} (per seed {rounded(self.effect)}; margin {self.margin:.3g}). "
            f"Per seed: {numbers}."
        )
        if not self.gate["passed"]:
            text += f" Gate failed: {_gate_text(self.gate)}."
        self.comparison = text


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"m ± s"`` over seeds (sample standard deviation; just ``"m"`` for one seed).

    Example:
        >>> mean_std([1.0, 2.0], 2)
        '1.50 ± 0.71'
    """
    if len(values) < 2:
        return f"{mean(values):.{digits}f}"
    return f"{mean(values):.{digits}f} ± {std(values):.{digits}f}"


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``.

    Example:
        >>> slope([0, 1, 2], [1, 3, 5])
        2.0
    """
    mx, my = mean(xs), mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def rounded(values: Sequence[float], digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x"]]))
        | a | b |
        |---|---|
        | 1 | x |
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@torch.no_grad()
def transformation_spread(model, source, n: int, draws: int, seed: int, batch_size: int = 256) -> dict:
    """How much h and z move over random transformations of one input, relative to how much they differ
    between inputs.

    For each of the first ``n`` test items, ``draws`` transformations (``source.random_images``: the
    source's augmentation, or redrawn Spirograph nuisances) are encoded and L2-normalized. For ``repr``
    (h) and ``proj`` (z) it returns ``condvar_*``, Foster et al.'s conditional variance
    E_x[sum_k Var(f_k | x)] (unbiased over draws); ``between_*``, the variance between items of the
    per-item means sum_k Var_x(E[f_k | x]) (with the draws' share of noise removed); and ``ratio_*`` =
    condvar / between, the invariance measure a collapsed space cannot win (a constant output has
    condvar ~ 0 but also between ~ 0). Lower ratio = more invariant.

    Raises:
        ValueError: ``draws < 2`` or ``n < 2``.
    """
    if draws < 2 or n < 2:
        raise ValueError(f"draws and n must be >= 2, got draws={draws}, n={n}")
    was_training = model.training
    model.eval()
    source.eval_generator.manual_seed(seed)
    feats = {"repr": [], "proj": []}
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n), device=source.device)
        per_draw = {"repr": [], "proj": []}
        for _ in range(draws):
            h, z = model(source.random_images("test", idx))
            per_draw["repr"].append(torch.nn.functional.normalize(h.double(), dim=1))
            per_draw["proj"].append(torch.nn.functional.normalize(z.double(), dim=1))
        for space, values in per_draw.items():
            feats[space].append(torch.stack(values, 1))  # [batch, draws, dim]
    model.train(was_training)
    out = {}
    for space, chunks in feats.items():
        f = torch.cat(chunks)
        item_mean = f.mean(1)
        condvar = float(((f - item_mean[:, None]) ** 2).sum(2).mean() * draws / (draws - 1))
        between = float(((item_mean - item_mean.mean(0)) ** 2).sum(1).mean() * n / (n - 1)) - condvar / draws
        out[f"condvar_{space}"] = condvar
        out[f"between_{space}"] = between
        out[f"ratio_{space}"] = condvar / max(between, 1e-12)
    return out


@torch.no_grad()
def few_label_probe(model, source, per_class: int, draws: int, seed: int) -> dict:
    """Linear probe (logistic regression) on h and z trained on ``per_class`` labelled training items per
    class, tested on the whole test split; mean accuracy over ``draws`` random label draws. With few labels
    a random-init encoder's features no longer saturate the probe on an easy data set. The L2 penalty is
    ``FEW_LABEL_L2`` per sample (with ~10 items per class the features separate them, and the
    near-unpenalized fit the full probe uses would not converge).

    Returns ``{"repr": accuracy, "proj": accuracy}``."""
    from fastcl.evaluation import encode, linear_probe

    was_training = model.training
    model.eval()
    features = {
        split: encode(
            model, lambda idx, split=split: source.eval_images(split, idx.to(source.device)), source.size[split]
        )
        for split in ("train", "test")
    }
    model.train(was_training)
    labels = source.targets["train"].cpu()
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for space, column in (("repr", 0), ("proj", 1)):
        accuracies = []
        for _ in range(draws):
            pick = torch.cat(
                [
                    members[torch.randperm(len(members), generator=generator)[:per_class]]
                    for members in (torch.nonzero(labels == c).flatten() for c in labels.unique())
                ]
            )
            result = linear_probe(
                features["train"][column][pick],
                labels[pick],
                features["test"][column],
                source.targets["test"],
                "classification",
                l2=FEW_LABEL_L2,
            )
            accuracies.append(result["probe"])
        out[space] = mean(accuracies)
    return out


def environment(device: torch.device) -> dict:
    """Versions, machine and date for results.json."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastcl": importlib.metadata.version("fastcl"),
    }
    for module in ("numpy", "sklearn", "kornia", "matplotlib"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    )
    return {
        "versions": versions,
        "machine": machine,
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "nice": os.nice(0),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


class Progress:
    """A tqdm bar over an experiment's units of work; plain lines on stderr without tqdm (or when off)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.done, self.desc, self.bar = total, 0, desc, None
        if enabled:
            with contextlib.suppress(ImportError):
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc)
        self.enabled = enabled

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.desc} {self.done}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Context:
    """What ``run`` gets: the device, the data directory, a scratch directory for trainer runs, progress."""

    def __init__(self, device: torch.device, work: Path, progress: Progress, data_dir: str | None = None):
        self.device, self.work, self.progress, self.data_dir = device, Path(work), progress, data_dir

    def train(self, name: str, source=None, encoder=None, **flags) -> tuple[torch.nn.Module, list[dict]]:
        """Train with ``fastcl.train.Trainer`` (flags as ``fastcl train`` options, underscores for dashes).

        Evaluates at init and at the end (``history[0]`` / ``history[-1]``); the trainer's own output goes
        to ``work/train.log``. Returns ``(model, history)``."""
        from fastcl.train import Trainer, build_parser

        args = build_parser().parse_args([])
        for key, value in flags.items():
            if not hasattr(args, key):
                raise ValueError(f"unknown trainer flag {key!r}")
            setattr(args, key, value)
        args.out, args.device = str(self.work / name), str(self.device)
        args.eval_every, args.no_progress = 0, True
        with open(self.work / "train.log", "a") as log, contextlib.redirect_stdout(log):
            print(f"== {name}: {flags}")
            trainer = Trainer(args, source=source, encoder=encoder)
            history = trainer.fit()
        self.progress.step(name)
        return trainer.model, history


def build_encoder(config: dict, seed: int) -> torch.nn.Module:
    """``config["encoder"]``, seeded: ``convnet`` at ``config["dim"]`` / ``config["width"]`` (with a
    residual last block if ``config["residual"]``), else a named encoder of
    :func:`fastcl.models.build_encoder` (``resnet18``, ``resnet50``)."""
    from fastcl.models import ConvNet
    from fastcl.models import build_encoder as build_named

    torch.manual_seed(seed)
    if config["encoder"] == "convnet":
        return ConvNet(dim=config["dim"], width=config["width"], residual=config.get("residual", False))
    return build_named(config["encoder"])


def image_source(config: dict, ctx: Context, seed: int, strength: float):
    """The image dataset of ``config``: ``digits`` at ``config["image_size"]`` pixels (shipped with
    scikit-learn), or a dataset of :func:`fastcl.data.build_source` read from ``--data-dir``; optional
    ``config["train_size"]`` / ``config["test_size"]`` take subsets."""
    from fastcl.data import ImageSource, build_source, load_digits

    train_size, test_size = config.get("train_size"), config.get("test_size")
    if config["dataset"] == "digits":  # the split is already shuffled: the first items are a random subset
        x_train, y_train, x_test, y_test = load_digits(size=config["image_size"])
        return ImageSource(
            x_train[:train_size],
            y_train[:train_size],
            x_test[:test_size],
            y_test[:test_size],
            10,
            ctx.device,
            "simclr",
            strength,
            seed,
        )
    return build_source(config["dataset"], ctx.data_dir, train_size, test_size, ctx.device, seed, "simclr", strength)


def write_outputs(
    out: Path,
    experiment,
    size: str,
    config: dict,
    results: dict,
    claims: list[Claim],
    env: dict,
    wall_s: float,
    cpu_s: float,
) -> list[str]:
    """Write results.json, results.md and the experiment's figures to ``out``; return the figure names.
    ``wall_s`` / ``cpu_s``: elapsed and process CPU seconds (all threads) of the run; ``env`` includes the
    load average before and after (a shared machine makes the wall time pessimistic)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        figures = experiment.figures(results, config, out)
    except ImportError:
        figures = []
        print("matplotlib is not installed: no figures (pip install 'fastcl[plot]')", file=sys.stderr)
    record = {
        "experiment": experiment.NAME,
        "title": experiment.TITLE,
        "size": size,
        "evidence": size != "smoke",
        "config": config,
        "environment": env,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "loss_gate": LOSS_GATE,
        "claims": [dataclasses.asdict(c) for c in claims],
        "figures": figures,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "results.md").write_text(
        f"# {experiment.TITLE}: `--{size}` run\n\n" + render_markdown(record, experiment, figure_prefix="") + "\n"
    )
    return figures


SMOKE_NOTE = (
    "**Smoke run: these verdicts are not evidence.** `--smoke` trains for seconds to check that the "
    "experiment runs end to end; its arms cannot train, so its verdicts say nothing about the paper."
)


def run_line(record: dict) -> str:
    """When, where and how long a run took (wall time under the load average that was measured)."""
    env = record["environment"]
    load = env.get("load_average")
    load_text = f", load average {load[0]:.1f} → {load[1]:.1f} (2-core machine)" if load else ""
    return (
        f"{env['date']} on {env['machine']} ({env['device']}), {record['wall_s'] / 60:.1f} min wall / "
        f"{record['cpu_s'] / 60:.1f} min CPU{load_text}; seeds {record['config']['seeds']}; torch "
        f"{env['versions']['torch']}, fastcl {env['versions']['fastcl']}."
    )


def claims_table(claims: list[dict]) -> str:
    """The verdicts as one markdown table: claim, effect (mean ± std, per seed), margin, gate."""
    rows = []
    for c in claims:
        gate_text = "passed" if c["gate"]["passed"] else "failed: " + _gate_text(c["gate"])
        rows.append(
            [
                f"**{c['verdict']}**",
                c["statement"],
                f"{c['measure']}: {mean_std(c['effect'])}",
                f"{c['margin']:.3g}",
                gate_text,
            ]
        )
    return markdown_table(["verdict", "claim", "effect (mean ± std over seeds)", "margin", "gate"], rows)


def render_markdown(record: dict, experiment, figure_prefix: str) -> str:
    """The body of results.md (and of docs/repro.md's measured sections): run line, tables, verdicts with
    their per-seed numbers, figures. Computed from a results.json record only."""
    parts = [] if record.get("evidence", True) else [SMOKE_NOTE, ""]
    parts += [
        run_line(record),
        "",
        experiment.tables(record["results"], record["config"]),
        "",
        f"Gate: every arm's final training loss ≤ {LOSS_GATE} × its chance level; probe claims also need an "
        "arm whose probe beats chance and the random-init encoder by the stated margin. Otherwise: untestable.",
        "",
        claims_table(record["claims"]),
        "",
        "Per-seed numbers:",
        "",
    ]
    parts += [f"- `{c['key']}` (**{c['verdict']}**): {c['comparison']}" for c in record["claims"]]
    parts += [""] + [f"![{name}]({figure_prefix}{name})" for name in record["figures"]]
    return "\n".join(parts)


def save_figure(fig, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name
