"""Reference trainer: SimCLR / SupCon / DirectCLR with a collapse monitor, exact resume and DDP.

Run ``fastcl train --help`` (or ``python -m fastcl.train --help``). A quick CPU run:

    python -m fastcl.train --dataset spirograph --encoder convnet --train-size 8192 --test-size 1024 \
        --epochs 3 --batch-size 128 --lr 0.5 --eval-every 0 --out runs/spiro

Outputs in ``--out``: ``metrics.jsonl`` (one JSON object per evaluation), ``checkpoint.pt`` (written
atomically at the end of every epoch), ``spectrum.png`` (collapse monitor); a summary table and the
outputs' paths on stdout. An ``--out`` that holds a previous run is refused unless ``--resume`` continues
it or ``--overwrite`` replaces it.
Under ``torchrun`` the run is data-parallel (DDP, SyncBatchNorm, DistributedSampler); ``--batch-size`` is
the global batch, and the losses draw negatives from all ranks (``--distributed-loss``, default "auto").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from fastcl._extras import MissingExtraError, require

try:
    for _module in ("numpy", "tqdm", "sklearn", "matplotlib", "kornia"):
        require(_module, "train", "fastcl train")
except MissingExtraError as _missing:
    if __name__ == "__main__":  # python -m fastcl.train / torchrun: one line naming the extra, as `fastcl train`
        sys.exit(f"fastcl train: {_missing}")
    raise

from fastcl import dispatch, registry  # noqa: E402
from fastcl.augment import PRESETS  # noqa: E402
from fastcl.checkpoint import rng_state, save_atomic, set_rng_state  # noqa: E402
from fastcl.data import DATASETS, build_source  # noqa: E402
from fastcl.distributed import MODES  # noqa: E402
from fastcl.evaluation import evaluate, plot_spectra  # noqa: E402
from fastcl.gradcache import GradCache  # noqa: E402
from fastcl.models import ENCODERS, HEADS, ContrastiveModel, build_encoder  # noqa: E402
from fastcl.optim import LARS, parameter_groups, penalty_ramp, warmup_cosine  # noqa: E402

# --method names come from the loss registry: each names the registered loss it trains with.
METHODS = tuple(registry.METHODS)
DEFAULT_TEMPERATURE = {method: registry.get(name).default_temperature for method, name in registry.METHODS.items()}
# What a run leaves in --out: a folder holding any of them holds a previous run.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "spectrum.png", "timing.json")
# Arguments that define the model, data or schedule: a checkpoint only resumes a run that agrees on them.
RESUME_MUST_MATCH = (
    "method",
    "dataset",
    "encoder",
    "head",
    "proj_dim",
    "kappa",
    "sub_dim",
    "batch_size",
    "optimizer",
    "train_size",
    "seed",
    "aug_preset",
    "aug_strength",
    "temperature",
    "gp_lambda",
    "gp_warmup_epochs",
    "gp_ramp_epochs",
)


def _device_name(text: str) -> str:
    """``--device``: "auto" or a name torch.device accepts (cpu, cuda, cuda:1, mps, ...)."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(
                f"expected auto or a torch device (cpu, cuda, cuda:1, mps), got {text!r}"
            ) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastcl train", description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--method", choices=METHODS, default="simclr")
    p.add_argument("--dataset", choices=DATASETS, default="spirograph")
    p.add_argument(
        "--data-dir", default=None, help="cifar10/cifar100: python-pickle archive dir; folder: ROOT/<class>/"
    )
    p.add_argument("--encoder", choices=ENCODERS, default="convnet")
    p.add_argument("--head", choices=HEADS, default=None, help="default: none for directclr, else mlp")
    p.add_argument("--proj-dim", type=int, default=128, help="output size of the mlp/linear heads")
    p.add_argument("--kappa", type=float, default=1.05, help="reweight head: z_i = h_i * kappa^-i")
    p.add_argument(
        "--sub-dim",
        type=int,
        default=None,
        help="loss on the first SUB_DIM features (directclr default: round(dim * 360 / 2048))",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="default: (0.3 lars | 0.06 sgd) * batch_size / 256")
    p.add_argument("--optimizer", choices=("sgd", "lars"), default="sgd")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=None, help="default: 1e-6 lars, 5e-4 sgd")
    p.add_argument("--warmup-epochs", type=float, default=None, help="default: min(10, epochs / 10)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="default: " + ", ".join(f"{m} {t}" for m, t in DEFAULT_TEMPERATURE.items()),
    )
    p.add_argument(
        "--aug-preset", choices=tuple(PRESETS), default="simclr", help="fastcl.augment preset (image datasets)"
    )
    p.add_argument("--aug-strength", type=float, default=1.0)
    p.add_argument("--backend", choices=("auto", *dispatch.BACKENDS), default="auto", help="loss backend")
    p.add_argument("--distributed-loss", choices=MODES, default="auto", help="negatives across ranks")
    p.add_argument(
        "--device", type=_device_name, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ..."
    )
    p.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        default="off",
        choices=("off", "bf16", "fp16"),
        help="autocast; bare --amp means bf16",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument(
        "--grad-cache",
        type=int,
        default=None,
        metavar="CHUNK",
        help="gradient caching: encode CHUNK rows at a time, so the encoder's memory no longer grows with the "
        "batch (one extra forward; BatchNorm normalizes per chunk; docs/gradcache.md)",
    )
    p.add_argument("--gp-lambda", type=float, default=0.0, help="Foster et al. gradient penalty weight (0 = off)")
    p.add_argument(
        "--gp-warmup-epochs", type=float, default=0.0, help="epochs without the penalty before its ramp starts"
    )
    p.add_argument(
        "--gp-ramp-epochs", type=float, default=0.0, help="epochs over which the penalty weight rises 0 -> gp-lambda"
    )
    p.add_argument("--gp-draws", type=int, default=100, help="alpha' draws per example for the penalty")
    p.add_argument(
        "--gp-clamp", type=float, default=None, help="clamp on the penalty (default 1000 spirograph, else 1)"
    )
    p.add_argument(
        "--feature-averaging",
        type=int,
        default=1,
        metavar="M",
        help="evaluate on features averaged over M random transformations",
    )
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at init and end)")
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--train-size", type=int, default=None, help="use a fixed subset of N training items")
    p.add_argument("--test-size", type=int, default=None, help="use a fixed subset of N test items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fastcl", help="output directory")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", nargs="?", const="auto", default=None, help="resume from OUT/checkpoint.pt (or from the given path)"
    )
    resume.add_argument(
        "--overwrite", action="store_true", help="replace the previous run in --out (refused without it or --resume)"
    )
    p.add_argument(
        "--time-epoch",
        action="store_true",
        help="timing run: no evaluation, no checkpoints; prints seconds per epoch, writes timing.json",
    )
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="exit after this many steps in total without saving the unfinished epoch (simulates a kill)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill method/optimizer-dependent defaults and reject inconsistent flags with a ValueError."""
    if args.head is None:
        args.head = "none" if args.method == "directclr" else "mlp"
    if args.method == "directclr" and args.head != "none":
        raise ValueError(f"--head must be none for --method directclr (DirectCLR has no projector), got {args.head}")
    if args.temperature is None:
        args.temperature = DEFAULT_TEMPERATURE[args.method]
    if args.weight_decay is None:
        args.weight_decay = 1e-6 if args.optimizer == "lars" else 5e-4
    if args.lr is None:
        args.lr = (0.3 if args.optimizer == "lars" else 0.06) * args.batch_size / 256
    if args.warmup_epochs is None:
        args.warmup_epochs = min(10.0, args.epochs / 10)
    if args.gp_clamp is None:
        args.gp_clamp = 1000.0 if args.dataset == "spirograph" else 1.0
    positive = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "temperature": args.temperature,
        "proj_dim": args.proj_dim,
        "feature_averaging": args.feature_averaging,
        "gp_draws": args.gp_draws,
        "eval_batch_size": args.eval_batch_size,
        "kappa": args.kappa,
        "gp_clamp": args.gp_clamp,
    }
    for name in ("train_size", "test_size", "stop_after_steps"):  # optional: None means "all" / "never"
        if getattr(args, name) is not None:
            positive[name] = getattr(args, name)
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in (
        "gp_lambda",
        "gp_warmup_epochs",
        "gp_ramp_epochs",
        "eval_every",
        "weight_decay",
        "warmup_epochs",
        "momentum",
        "aug_strength",
    ):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 (contrastive losses need negatives), got {args.batch_size}")
    if args.grad_cache is not None and args.grad_cache < 1:
        raise ValueError(f"--grad-cache must be >= 1 (rows per chunk), got {args.grad_cache}")
    if args.method == "supcon" and args.dataset == "spirograph":
        raise ValueError("--method supcon needs class labels, but --dataset spirograph has regression targets")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_loss(args: argparse.Namespace, dim: int):
    """The contrastive loss for ``args.method``; ``dim`` is the width of the vectors it receives.

    Under torchrun the losses gather negatives across ranks themselves (``distributed=``)."""
    sub_dim = args.sub_dim
    if args.method == "directclr" and sub_dim is None:
        sub_dim = max(1, round(dim * 360 / 2048))  # the paper's prefix 360 of 2048
    if sub_dim is not None and not 1 <= sub_dim <= dim:
        raise ValueError(f"--sub-dim must be in [1, {dim}] (the width the {args.method} loss sees), got {sub_dim}")
    common = {"backend": args.backend, "distributed": args.distributed_loss}
    # directclr trains InfoNCE on a prefix of h: DirectCLRLoss is InfoNCELoss with sub_dim.
    return registry.get(registry.METHODS[args.method]).module(temperature=args.temperature, sub_dim=sub_dim, **common)


def gradient_penalty(encoder, source, idx, draws: int, clamp: float, autocast) -> torch.Tensor:
    """Foster et al.'s estimate of the conditional variance of h/|h| over transformations (Foster et al. 2021):
    GP = mean_{m,i} (g_i . (alpha'_{m,i} - alpha_i))^2 with g_i = d/d alpha_i sum_k v_ik hhat_ik."""
    alpha, render, alpha_prime = source.gp_inputs(idx, draws)
    with autocast:
        h = encoder(render(alpha))
    h_hat = torch.nn.functional.normalize(h.float(), dim=1)
    signs = torch.randint(0, 2, h_hat.shape, generator=source.generator, device=h_hat.device) * 2 - 1
    (grad,) = torch.autograd.grad((signs * h_hat).sum(), alpha, create_graph=True)
    penalty = ((grad[None] * (alpha_prime - alpha.detach()[None])).sum(-1) ** 2).mean()
    return penalty.clamp(max=clamp)


def _contrastive_loss(loss_fn, method: str, embeddings, labels):
    """The method's loss on ``embeddings`` = [view 1; view 2] (view-major) of what it reads (h for directclr,
    else z); float32 so AMP outputs are accepted."""
    e1, e2 = embeddings.float().chunk(2)
    if registry.get(registry.METHODS[method]).views_input:
        return loss_fn(torch.stack([e1, e2], 1), labels)
    return loss_fn(e1, e2)


class _LossInput(torch.nn.Module):
    """The model's output that the method's loss reads (h for directclr, else z): GradCache's encoder.
    A module, so GradCache finds the BatchNorm layers and the DDP wrapper inside."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model, self.index = model, 0 if method == "directclr" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.index]


def _setup_distributed(args) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(args.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and args.device in ("auto", "cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = resolve_device(args.device), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if args.batch_size % world:
        raise ValueError(f"--batch-size must be divisible by the world size {world}, got {args.batch_size}")
    return dist.get_rank(), world, device


def _metrics_line(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not k.startswith("spectrum_")}


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only evaluations up to the checkpoint's epoch (a killed run may have logged one more)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["epoch"] <= last_epoch]
        path.write_text("".join(line + "\n" for line in kept))


def print_summary(history: list[dict], task, file=None) -> None:
    """One row per evaluation: loss, probe on h and z (per target for regression), kNN, effective ranks."""
    probe_name = "acc" if task.kind == "classification" else "MSE"
    columns = [
        ("epoch", "epoch", "{:d}"),
        ("loss", "train loss", "{:.4f}"),
        ("probe", f"probe {probe_name} (h)", "{:.4f}"),
        ("probe_proj", f"probe {probe_name} (z)", "{:.4f}"),
    ]
    if task.kind == "classification":
        columns += [("knn", "kNN acc (h)", "{:.4f}"), ("knn_proj", "kNN acc (z)", "{:.4f}")]
    else:
        columns += [(f"probe_mse_{name}", f"MSE {name} (h)", "{:.4f}") for name in task.target_names]
    columns += [("effective_rank_repr", "eff. rank h", "{:.1f}"), ("effective_rank_proj", "eff. rank z", "{:.1f}")]
    rows = [[title for _, title, _ in columns]]
    for entry in history:
        rows.append(["-" if entry.get(key) is None else fmt.format(entry[key]) for key, _, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines), file=file or sys.stdout)  # resolved at call time: redirect_stdout applies


class Trainer:
    """Everything a run needs, built from parsed flags; ``__init__`` raises ``ValueError`` /
    ``FileNotFoundError`` for bad configurations before any training, ``fit()`` trains.

    ``source`` / ``encoder`` (optional) replace the ones ``--dataset`` / ``--encoder`` would build: a view
    source as in :mod:`fastcl.data.sources` and an encoder with attribute ``dim`` (``fastcl.repro`` uses
    them for its own data and smaller models)."""

    def __init__(self, args: argparse.Namespace, source=None, encoder: torch.nn.Module | None = None):
        self.args = args = resolve_defaults(args)
        self.rank, self.world, self.device = _setup_distributed(args)
        device = self.device
        reason = None if args.backend == "auto" else dispatch.unavailable_reason(args.backend, device)
        if reason is not None:
            raise ValueError(f"--backend {args.backend}: cannot run on {device}: {reason}")
        torch.manual_seed(args.seed + self.rank)
        self.out = Path(args.out)
        self.source = (
            source
            if source is not None
            else build_source(
                args.dataset,
                args.data_dir,
                args.train_size,
                args.test_size,
                device,
                seed=args.seed + self.rank,
                aug_preset=args.aug_preset,
                aug_strength=args.aug_strength,
            )
        )
        if args.method == "supcon" and self.source.task.kind != "classification":
            raise ValueError(f"--method supcon needs class labels; --dataset {args.dataset} has none")
        encoder = encoder if encoder is not None else build_encoder(args.encoder)
        self.model = ContrastiveModel(encoder, args.head, args.proj_dim, args.kappa).to(device)
        self.loss_fn = build_loss(args, self.model.dim if args.method == "directclr" else self.model.proj_dim)

        self.local_batch = args.batch_size // self.world
        self.sampler = DistributedSampler(
            range(self.source.size["train"]),
            num_replicas=self.world,
            rank=self.rank,
            shuffle=True,
            seed=args.seed,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--batch-size {args.batch_size} exceeds the training set ({self.source.size['train']} items)"
            )
        total_steps = self.steps_per_epoch * args.epochs
        warmup_steps = round(args.warmup_epochs * self.steps_per_epoch)
        self.gp_warmup_steps = round(args.gp_warmup_epochs * self.steps_per_epoch)
        self.gp_ramp_steps = round(args.gp_ramp_epochs * self.steps_per_epoch)

        groups = parameter_groups(self.model, args.weight_decay)
        if args.optimizer == "lars":
            self.optimizer = LARS(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
        )
        amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")

        self.train_model = self.model
        if self.world > 1:
            if device.type == "cuda":  # global BN statistics, as SimCLR; SyncBatchNorm is CUDA-only
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if args.compile:
            self.train_model = torch.compile(self.train_model)
        self.grad_cache, self._postfix = None, {}
        if args.grad_cache is not None:
            self.grad_cache = GradCache(
                _LossInput(self.train_model, args.method),
                self._uncast_loss,
                args.grad_cache,
                scaler=self.scaler,
                batchnorm="accept",  # per-chunk statistics, as per-GPU BatchNorm: docs/gradcache.md
                progress=self._chunk_progress,
            )

        self.epoch, self.global_step, self.history, self._bar = 0, 0, [], None
        self.metrics_path, self.checkpoint_path = self.out / "metrics.jsonl", self.out / "checkpoint.pt"
        if args.resume is not None:
            self._load(self.checkpoint_path if args.resume == "auto" else Path(args.resume))

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        mismatched = {
            k: (state["args"].get(k), getattr(self.args, k))
            for k in RESUME_MUST_MATCH
            if state["args"].get(k) != getattr(self.args, k)
        }
        if mismatched:
            raise ValueError(
                f"--resume: checkpoint {path} was made with different settings (checkpoint, now): {mismatched}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.source.generator)
        self.epoch, self.global_step, self.history = state["epoch"], state["global_step"], state["history"]

    def _save(self) -> None:
        save_atomic(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.source.generator),
                "epoch": self.epoch,
                "global_step": self.global_step,
                "history": self.history,
                "args": vars(self.args),
            },
            self.checkpoint_path,
        )

    def _evaluate(self, extra: dict) -> None:
        result = evaluate(
            self.model,
            self.source,
            self.args.eval_batch_size,
            self.args.feature_averaging,
            eval_seed=self.args.seed,
            autocast=self.autocast,
        )
        entry = {"epoch": self.epoch, "step": self.global_step, **extra, **result}
        self.history.append(entry)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_metrics_line(entry)) + "\n")
        plot_spectra(self.history, self.out / "spectrum.png")

    def _uncast_loss(self, embeddings: torch.Tensor, labels=None) -> torch.Tensor:
        """The contrastive loss outside autocast, as the uncached step computes it."""
        with torch.autocast(self.device.type, enabled=False):
            return _contrastive_loss(self.loss_fn, self.args.method, embeddings, labels)

    def _chunk_progress(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._postfix | {"chunk": f"{done}/{total}"})

    def _penalty_weight(self) -> float:
        """λ at this step: --gp-lambda times the ramp (optim.penalty_ramp); 0 skips the penalty's work."""
        return self.args.gp_lambda * penalty_ramp(self.global_step, self.gp_warmup_steps, self.gp_ramp_steps)

    def _penalty(self, idx: torch.Tensor, weight: float) -> torch.Tensor:
        args = self.args
        penalty = gradient_penalty(self.model.encoder, self.source, idx, args.gp_draws, args.gp_clamp, self.autocast)
        return weight * penalty

    def _train_step(self, idx: torch.Tensor, labels_all) -> torch.Tensor:
        args = self.args
        views = self.source.views(idx)
        x = views.transpose(0, 1).reshape(-1, *views.shape[2:])  # [2B, C, H, W], view-major
        labels = labels_all[idx] if labels_all is not None else None
        gp_weight = self._penalty_weight()
        if self.grad_cache is not None:
            self.optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            if gp_weight > 0:  # first: its local gradients join the all-reduce of GradCache's last chunk
                penalty = self._penalty(idx, gp_weight)
                self.scaler.scale(penalty).backward()
                loss = penalty.detach()
            with self.autocast:
                loss = loss + self.grad_cache(x, labels=labels)
            return self._optimizer_step(loss)
        with self.autocast:
            h, z = self.train_model(x)
        loss = _contrastive_loss(self.loss_fn, args.method, h if args.method == "directclr" else z, labels)
        if gp_weight > 0:
            loss = loss + self._penalty(idx, gp_weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return self._optimizer_step(loss)

    def _optimizer_step(self, loss: torch.Tensor) -> torch.Tensor:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        return loss.detach()

    def fit(self) -> list[dict]:
        """Train to ``--epochs``, evaluating and checkpointing; return the evaluation history."""
        from tqdm.auto import tqdm

        args, device, rank = self.args, self.device, self.rank
        evaluating = rank == 0 and not args.time_epoch
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if args.resume is not None:
                _truncate_metrics(self.metrics_path, self.epoch)
            elif evaluating:
                self.metrics_path.write_text("")
        if evaluating and self.epoch == 0 and not self.history:
            self._evaluate({"loss": None, "lr": None})

        timings = []
        labels_all = self.source.targets["train"] if self.source.task.kind == "classification" else None
        for epoch in range(self.epoch + 1, args.epochs + 1):
            self.sampler.set_epoch(epoch)
            order = torch.tensor(list(iter(self.sampler)), device=device)
            loss_sum = torch.zeros((), device=device)
            bar = self._bar = tqdm(
                range(self.steps_per_epoch),
                desc=f"epoch {epoch}/{args.epochs}",
                disable=rank != 0 or args.no_progress,
                leave=False,
            )
            _synchronize(device)
            start = time.perf_counter()
            for step in bar:
                loss = self._train_step(order[step * self.local_batch : (step + 1) * self.local_batch], labels_all)
                loss_sum += loss
                if step % 10 == 0:
                    self._postfix = {"loss": f"{loss.item():.4f}"}
                    bar.set_postfix(self._postfix)
                if args.stop_after_steps is not None and self.global_step >= args.stop_after_steps:
                    bar.close()
                    print(f"stopped after {self.global_step} steps (--stop-after-steps); epoch {epoch} not saved")
                    return self.history
            _synchronize(device)
            seconds = time.perf_counter() - start
            bar.close()
            self.epoch = epoch
            epoch_loss = loss_sum / self.steps_per_epoch
            if self.world > 1:
                dist.all_reduce(epoch_loss)
                epoch_loss = epoch_loss / self.world
            epoch_loss = float(epoch_loss)
            samples_per_s = self.steps_per_epoch * args.batch_size / seconds
            timings.append({"epoch": epoch, "seconds": seconds, "samples_per_s": samples_per_s})
            if rank == 0:
                print(
                    f"epoch {epoch}/{args.epochs}: loss {epoch_loss:.4f}, {seconds:.1f} s "
                    f"({samples_per_s:.0f} samples/s, {self.steps_per_epoch} steps)"
                )
            if args.time_epoch:
                continue
            if evaluating and (epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0)):
                self._evaluate(
                    {
                        "loss": epoch_loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "epoch_time_s": seconds,
                        "samples_per_s": samples_per_s,
                    }
                )
            if rank == 0:
                self._save()

        if rank == 0 and args.time_epoch:
            _write_timing(self.out / "timing.json", args, device, self.world, timings)
        if evaluating and self.history:
            print_summary(self.history, self.source.task)
        return self.history


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_timing(path: Path, args, device: torch.device, world: int, timings: list[dict]) -> None:
    import platform

    record = {
        "what": f"one training epoch, {args.dataset} ({args.train_size or 'full'} items), {args.encoder}, "
        f"{args.method}, global batch {args.batch_size}, amp {args.amp}, compile {args.compile}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "epochs": timings,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"timing written to {path}: " + ", ".join(f"epoch {t['epoch']} {t['seconds']:.2f} s" for t in timings))


def previous_run(out: Path) -> list[str]:
    """The files of a previous run in ``out`` (empty when there is none)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastcl train`` and ``python -m fastcl.train``; bad flags exit with status 2 before any
    work, and the outputs' paths are printed at the end."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    found = previous_run(out)
    if found and args.resume is None and not args.overwrite:
        parser.error(
            f"--out {out} holds a previous run ({', '.join(found)}): pass --resume to continue it, --overwrite "
            "to replace it, or another --out"
        )
    trainer = None
    try:
        try:
            trainer = Trainer(args)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        if args.overwrite and trainer.rank == 0:  # only once every flag has been accepted
            for name in found:
                (out / name).unlink()
        trainer.fit()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # rank 0 evaluates and saves last: no rank tears its connections down before that
        written = previous_run(out)
        if trainer.rank == 0 and written:
            print(f"outputs in {out}: " + ", ".join(written))
    finally:
        # DDP's reducer holds the process group: release the model first, so that its destructor never
        # runs against a destroyed group (a suspected cause of a rare gloo abort at exit).
        del trainer
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
