"""What every reproduction shares: sizes, trainer runs, measurements, verdicts and the files it writes.

An experiment (one module per paper) defines ``TITLE``, ``CONFIGS`` (one dict per size), ``units(config)``
(how many steps its progress bar has), ``run(config, ctx)`` (train and measure; returns every number as
plain JSON data), ``claims(results, config)`` (``Claim`` objects whose verdicts are computed from those
numbers), ``tables(results, config)`` (markdown) and ``figures(results, config, out)`` (PNG files).

A verdict compares numbers measured once per seed:

>>> compare_seeds([0.1, 0.2], [0.3, 0.4], "<")
'holds'
>>> compare_seeds([0.1, 0.5], [0.3, 0.4], "<")
'inconclusive'
>>> compare_seeds([0.5, 0.6], [0.3, 0.4], "<")
'does not hold'
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

SIZES = ("smoke", "quick", "full")
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
# Singular values below this fraction of the largest count as collapsed dimensions (the cliff of Jing et al.).
COLLAPSE_THRESHOLD = 1e-4


@dataclasses.dataclass
class Claim:
    """One finding of a paper, the comparison that tests it, and the verdict computed from the numbers.

    Args:
        key: short identifier, e.g. ``"no_projector_collapses"``.
        statement: the paper's finding, in one sentence.
        comparison: the comparison made, with the measured numbers.
        verdict: ``"holds"``, ``"does not hold"`` or ``"inconclusive"``.
    """

    key: str
    statement: str
    comparison: str
    verdict: str


def compare_seeds(lhs: Sequence[float], rhs: Sequence[float], relation: str) -> str:
    """Verdict on ``lhs <relation> rhs`` for values measured with the same seeds, pairwise.

    Args:
        lhs, rhs: one number per seed (equal lengths, at least one).
        relation: ``"<"`` or ``">"``.

    Returns:
        ``"holds"`` if the relation holds for every seed, ``"does not hold"`` if it fails for the seed
        means, else ``"inconclusive"`` (the means agree but some seed does not).

    Raises:
        ValueError: empty or unequal lengths, or an unknown relation.

    Example:
        >>> compare_seeds([2.0], [1.0], ">")
        'holds'
    """
    if relation not in ("<", ">"):
        raise ValueError(f"relation must be '<' or '>', got {relation!r}")
    if not lhs or len(lhs) != len(rhs):
        raise ValueError(f"lhs and rhs must be non-empty and of equal length, got {len(lhs)} and {len(rhs)}")

    def test(a: float, b: float) -> bool:
        return a < b if relation == "<" else a > b

    if all(test(a, b) for a, b in zip(lhs, rhs)):
        return HOLDS
    if not test(mean(lhs), mean(rhs)):
        return FAILS
    return INCONCLUSIVE


def compare_close(values: Sequence[float], reference: Sequence[float], tolerance: float) -> str:
    """Verdict on "``values`` is at least ``reference - tolerance``" (higher is better), per seed.

    Returns ``"holds"`` if true for every seed, ``"does not hold"`` if false for the seed means, else
    ``"inconclusive"``.

    Example:
        >>> compare_close([0.90, 0.91], [0.92, 0.92], tolerance=0.03)
        'holds'
        >>> compare_close([0.80, 0.81], [0.92, 0.92], tolerance=0.03)
        'does not hold'
    """
    return compare_seeds(list(values), [r - tolerance for r in reference], ">")


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"m ± s"`` over seeds (sample standard deviation; just ``"m"`` for one seed).

    Example:
        >>> mean_std([1.0, 2.0], 2)
        '1.50 ± 0.71'
    """
    m = mean(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``.

    Example:
        >>> slope([0, 1, 2], [1, 3, 5])
        2.0
    """
    mx, my = mean(xs), mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def collapsed_dimensions(spectrum: Sequence[float], threshold: float = COLLAPSE_THRESHOLD) -> int:
    """How many singular values are below ``threshold`` times the largest.

    Example:
        >>> collapsed_dimensions([1.0, 0.1, 1e-6, 0.0])
        2
    """
    return sum(1 for s in spectrum if s < threshold * spectrum[0])


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
    """How much h and z move over random transformations of the same test input.

    For each of the first ``n`` test items, ``draws`` transformations (``source.random_images``: the
    training augmentation, or redrawn Spirograph nuisances) are encoded and L2-normalized. Returns, for
    ``repr`` (h) and ``proj`` (z): ``cosine_*``, the mean cosine similarity over pairs of distinct
    transformations (Cosentino et al.'s invariance), and ``condvar_*``, the unbiased conditional variance
    E_x[sum_k Var(hhat_k | x)] (Foster et al.). For unit vectors the two are tied: condvar = 1 - cosine.

    Raises:
        ValueError: ``draws < 2``.
    """
    if draws < 2:
        raise ValueError(f"draws must be >= 2, got {draws}")
    was_training = model.training
    model.eval()
    source.eval_generator.manual_seed(seed)
    sums = {"repr": 0.0, "proj": 0.0}
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n), device=source.device)
        total = {"repr": 0, "proj": 0}
        for _ in range(draws):
            h, z = model(source.random_images("test", idx))
            total["repr"] = total["repr"] + torch.nn.functional.normalize(h.float(), dim=1)
            total["proj"] = total["proj"] + torch.nn.functional.normalize(z.float(), dim=1)
        for space, t in total.items():
            # mean pairwise cosine of item i = (||sum_d hhat_d||^2 - draws) / (draws (draws - 1))
            sums[space] += float(((t.pow(2).sum(1) - draws) / (draws * (draws - 1))).sum())
    model.train(was_training)
    out = {}
    for space, s in sums.items():
        out[f"cosine_{space}"] = s / n
        out[f"condvar_{space}"] = 1 - s / n
    return out


def environment(device: torch.device) -> dict:
    """Versions, machine and date for results.json."""
    import fastcl

    versions = {"python": platform.python_version(), "torch": torch.__version__, "fastcl": fastcl.__version__}
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
    """``config["encoder"]``, seeded: ``convnet`` at ``config["dim"]`` / ``config["width"]``, else a named
    encoder of :func:`fastcl.models.build_encoder` (``resnet18``, ``resnet50``)."""
    from fastcl.models import ConvNet
    from fastcl.models import build_encoder as build_named

    torch.manual_seed(seed)
    if config["encoder"] == "convnet":
        return ConvNet(dim=config["dim"], width=config["width"])
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
    ``wall_s`` / ``cpu_s``: elapsed and process CPU seconds (all threads) of the run."""
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
        "config": config,
        "environment": env,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "claims": [dataclasses.asdict(c) for c in claims],
        "figures": figures,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    md = [
        f"# {experiment.TITLE}: `--{size}` run",
        "",
        f"{env['date']} on {env['machine']} ({env['device']}), "
        f"{wall_s / 60:.1f} min wall / {cpu_s / 60:.1f} min CPU, "
        f"seeds {config['seeds']}; torch {env['versions']['torch']}, fastcl {env['versions']['fastcl']}.",
        "",
        experiment.tables(results, config),
        "",
        "## Claims",
        "",
    ]
    md += [f"- **{c.verdict}** — {c.statement}  \n  {c.comparison}" for c in claims]
    md += [""] + [f"![{name}]({name})" for name in figures]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return figures


def save_figure(fig, out: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name
