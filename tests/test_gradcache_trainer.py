"""``fastcl train --grad-cache CHUNK``: the same step as without it, every method from the CLI, exact resume,
chunk progress, DDP under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from loss_cases import relative_error
from torch import nn

from fastcl.train import Trainer, build_parser, main

TINY = ["--train-size", "64", "--test-size", "24", "--batch-size", "32", "--epochs", "1", "--no-progress"]


class FlatEncoder(nn.Module):
    """No BatchNorm: GradCache's step then equals the uncached one for any chunk size."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.dim = dim

    def forward(self, x):
        return self.net(x)


def _one_step(tmp_path, method: str, head: str, grad_cache, batchnorm: bool):
    flags = [*TINY, "--dataset", "digits", "--method", method, "--head", head, "--out", str(tmp_path / "x")]
    if grad_cache is not None:
        flags += ["--grad-cache", str(grad_cache)]
    torch.manual_seed(0)
    trainer = Trainer(build_parser().parse_args(flags), encoder=None if batchnorm else FlatEncoder())
    idx = torch.arange(trainer.local_batch)
    labels = trainer.source.targets["train"] if trainer.source.task.kind == "classification" else None
    loss = trainer._train_step(idx, labels)
    return loss, dict(trainer.model.named_parameters())


@pytest.mark.parametrize(
    "method, head, chunk, batchnorm",
    [
        ("simclr", "linear", 24, False),  # 64 rows (two views of 32): chunks of 24, 24, 16
        ("supcon", "linear", 7, False),
        ("directclr", "none", 10, False),
        ("simclr", "mlp", 64, True),  # the ConvNet with BatchNorm: one chunk holds the batch
    ],
)
def test_a_cached_step_equals_the_uncached_step(tmp_path, method, head, chunk, batchnorm):
    loss_a, params_a = _one_step(tmp_path, method, head, None, batchnorm)
    loss_b, params_b = _one_step(tmp_path, method, head, chunk, batchnorm)
    assert relative_error(loss_b, loss_a, floor=1.0) <= 1e-5
    for name, p in params_a.items():  # after one SGD step with momentum and weight decay
        assert relative_error(params_b[name], p) <= 1e-5, name


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "simclr", "--dataset", "spirograph"],
        ["--method", "supcon", "--dataset", "digits"],
        ["--method", "directclr", "--dataset", "spirograph", "--sub-dim", "20"],
        ["--method", "simclr", "--dataset", "digits", "--gp-lambda", "0.1", "--gp-draws", "3", "--amp"],
    ],
)
def test_cli_trains_with_grad_cache(tmp_path, flags):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out), "--grad-cache", "24", *flags]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [0, 1] and lines[-1]["loss"] > 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["global_step"] == 2


def test_resume_with_grad_cache_matches_uninterrupted_run(tmp_path):
    common = [*TINY, "--train-size", "96", "--epochs", "2", "--test-size", "16", "--eval-every", "0"]
    common += ["--grad-cache", "20"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    main([*common, "--out", str(full)])
    main([*common, "--out", str(cut), "--stop-after-steps", "4"])  # killed in epoch 2 (3 steps/epoch)
    main([*common, "--out", str(cut), "--resume"])
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def test_progress_shows_chunks(tmp_path):
    trainer = Trainer(build_parser().parse_args([*TINY, "--out", str(tmp_path / "p"), "--grad-cache", "24"]))

    class Bar:
        postfixes = []

        def set_postfix(self, postfix):
            self.postfixes.append(dict(postfix))

    trainer._bar, trainer._postfix = Bar(), {"loss": "1.0"}
    trainer._train_step(torch.arange(trainer.local_batch), None)
    assert Bar.postfixes == [{"loss": "1.0", "chunk": f"{i}/3"} for i in (1, 2, 3)]  # 64 rows in chunks of 24


@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_chunk_is_a_clear_cli_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(tmp_path / "bad"), "--grad-cache", value])
    assert exc.value.code == 2
    assert f"--grad-cache must be >= 1 (rows per chunk), got {value}" in capsys.readouterr().err


def test_ddp_under_torchrun_with_grad_cache(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "fastcl.train", *TINY, "--train-size", "128", "--eval-every", "0", "--grad-cache", "12"]
    result = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[:3000] + "\n...\n" + result.stderr[-1500:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [0, 1] and lines[-1]["loss"] > 0
