"""The front door: the CLI fails fast with one line naming the option or the extra, refuses to overwrite a
previous run, says where its outputs went; `import fastcl` is lean and its submodules are attributes; the
losses warn where a user would otherwise be silently surprised."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import fastcl
from fastcl import cli
from fastcl import distributed as fastcl_distributed

TINY = ["--train-size", "64", "--test-size", "24", "--batch-size", "32", "--epochs", "1", "--no-progress"]


def _no_data_loading(monkeypatch):
    """Makes loading the data fail the test: the flag must be refused before any work."""
    import fastcl.train

    def forbidden(*args, **kwargs):
        raise AssertionError("the data was loaded before the bad flag was refused")

    monkeypatch.setattr(fastcl.train, "build_source", forbidden)


# ---- fastcl train -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "foo"], "argument --backend: invalid choice: 'foo'"),
        (["--distributed-loss", "rings"], "argument --distributed-loss: invalid choice: 'rings'"),
        (["--aug-preset", "simclrr"], "argument --aug-preset: invalid choice: 'simclrr'"),
        (["--device", "gpu0"], "argument --device: expected auto or a torch device"),
        (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--train-size", "-5"], "--train-size must be > 0, got -5"),
        (["--kappa", "0"], "--kappa must be > 0"),
        (["--momentum", "-1"], "--momentum must be >= 0"),
        (["--aug-strength", "-1"], "--aug-strength must be >= 0"),
        (["--stop-after-steps", "0"], "--stop-after-steps must be > 0"),
        (["--resume", "--overwrite"], "not allowed with argument"),
    ],
)
def test_train_refuses_a_bad_flag_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    from fastcl.train import main

    _no_data_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_train_refuses_a_backend_that_cannot_run_on_the_device(tmp_path, monkeypatch, capsys):
    from fastcl.train import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_data_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--device", "cpu", "--backend", "triton", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "--backend triton: cannot run on cpu" in capsys.readouterr().err


def test_train_help_shows_the_defaults(capsys):
    from fastcl.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("(default: auto)", "(default: simclr)", "(default: runs/fastcl)", "--overwrite"):
        assert shown in help_text, shown


def test_train_refuses_a_previous_run_then_overwrites_it_and_prints_its_outputs(tmp_path, monkeypatch, capsys):
    from fastcl.train import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (out / "timing.json").write_text("{}")  # from an earlier --time-epoch run: must not survive --overwrite
    with monkeypatch.context() as patch:
        _no_data_loading(patch)
        with pytest.raises(SystemExit) as exit_info:
            main([*TINY, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds a previous run (metrics.jsonl, timing.json)" in err
    assert "--resume" in err and "--overwrite" in err

    assert main([*TINY, "--eval-every", "0", "--out", str(out), "--overwrite"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"outputs in {out}: checkpoint.pt, metrics.jsonl, spectrum.png"
    assert not (out / "timing.json").exists()
    assert '"epoch": 0, "step": 0' in (out / "metrics.jsonl").read_text()  # the new run's, not the old line


# ---- fastcl bench -------------------------------------------------------------------------------------------


def test_bench_accepts_losses_as_an_alias():
    from fastcl.profiler.cli import build_parser

    assert build_parser().parse_args(["--losses", "nt_xent,supcon"]).loss == ["nt_xent", "supcon"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--losses", "ntxent"], "argument --loss/--losses: --loss: expected a comma list of"),
        (["--timeout", "-1"], "argument --timeout: expected seconds > 0, got '-1'"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ],
)
def test_bench_refuses_a_bad_flag_in_one_line(capsys, argv, message):
    from fastcl.profiler import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_help_shows_the_defaults(capsys):
    from fastcl.profiler import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("--loss LOSS, --losses LOSS", "(default 1024,4096,8192)", "(default fp32)", "(default 600)"):
        assert shown in help_text, shown


def test_bench_exits_non_zero_when_nothing_ran(tmp_path, capsys):
    from fastcl.profiler import main

    argv = ["--loss", "nt_xent", "--impl", "cuda,infcl", "--sizes", "32", "--dim", "8", "--repeats", "1"]
    assert main([*argv, "--isolate", "none", "--no-plot", "--no-progress", "--out", str(tmp_path / "b")]) == 1
    captured = capsys.readouterr()
    assert "no implementation ran" in captured.err
    assert "skipped cuda (nt_xent): " in captured.out and "skipped infcl (nt_xent): " in captured.out
    assert max(len(line) for line in captured.out.split("side by side")[0].splitlines()) <= 120


def test_bench_refuses_an_out_holding_a_previous_run(tmp_path, capsys):
    from fastcl.profiler import main

    (tmp_path / "bench.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    assert "holds a previous run (bench.json): pass --overwrite" in capsys.readouterr().err


# ---- missing extras: one line naming the extra, --help included ---------------------------------------------


@pytest.mark.parametrize("argv", [["train", "--help"], ["train", "--epochs", "1"]])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    monkeypatch.delitem(sys.modules, "fastcl.train", raising=False)
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "fastcl train: fastcl train needs the 'scikit-learn' package, which is not installed: "
        "pip install 'fastcl[train]' (or pip install scikit-learn)"
    )
    assert captured.out == ""


def test_python_m_fastcl_train_names_a_missing_extra_in_one_line():
    code = (
        "import runpy, sys; sys.modules['sklearn'] = None; sys.argv = ['fastcl.train', '--help']; "
        "runpy.run_module('fastcl.train', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "fastcl train: fastcl train needs the 'scikit-learn' package, which is not installed: "
        "pip install 'fastcl[train]' (or pip install scikit-learn)"
    ]


def test_a_missing_extra_reached_inside_a_command_is_one_line_too(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kornia", None)
    for name in [m for m in sys.modules if m == "fastcl.augment" or m.startswith("fastcl.augment.")]:
        monkeypatch.delitem(sys.modules, name)
    assert cli.main(["bench", "--augment", "--device", "cpu"]) == 1
    assert "pip install 'fastcl[augment]'" in capsys.readouterr().err


# ---- import fastcl: lean, with its public submodules as attributes -----------------------------------------


def test_import_fastcl_imports_no_extra_and_no_submodule_up_front():
    heavy = ("kornia", "matplotlib", "sklearn", "triton", "PIL", "fastcl.augment", "fastcl.kernels", "fastcl.train")
    code = f"import sys, fastcl; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", fastcl.SUBMODULES)
def test_public_submodules_are_attributes(name):
    module = getattr(fastcl, name)
    assert module.__name__ == f"fastcl.{name}"
    assert name in dir(fastcl)


def test_the_attributes_the_docs_use():
    assert "nt_xent" in fastcl.registry.LOSSES
    with fastcl.torch_backend.chunk_size(64):
        fastcl.functional.nt_xent(torch.randn(8, 4), torch.randn(8, 4))
    assert fastcl.compat.supcontrast.SupConLoss is not None  # compat imports its peer modules
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        fastcl.nonsense  # noqa: B018


def test_a_submodule_behind_a_missing_extra_names_it(monkeypatch):
    if "augment" in vars(fastcl):  # bound by an earlier import; checked first: getattr would import it
        monkeypatch.delattr(fastcl, "augment")
    monkeypatch.delitem(sys.modules, "fastcl.augment", raising=False)
    monkeypatch.setitem(sys.modules, "kornia", None)
    with pytest.raises(ImportError, match=r"pip install 'fastcl\[augment\]'"):
        fastcl.augment  # noqa: B018


# ---- warnings where the user would be silently surprised ---------------------------------------------------


def test_ring_or_gather_without_a_process_group_warns_once_per_mode(monkeypatch):
    monkeypatch.setattr(fastcl_distributed, "_WARNED_NO_GROUP", set())
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    for mode in ("ring", "gather"):
        with pytest.warns(UserWarning, match=f"distributed='{mode}' was requested but no torch.distributed"):
            local = fastcl.functional.nt_xent(a, b, distributed=mode)
        assert torch.equal(local, fastcl.functional.nt_xent(a, b, distributed="local"))  # it ran locally
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per mode; "auto" and "local" never warn
        for mode in ("ring", "gather", "auto", "local"):
            fastcl.NTXentLoss(distributed=mode)(a, b)


@pytest.mark.parametrize(
    "views, kwargs, why",
    [
        (1, {"labels": torch.arange(6)}, "one view and no two samples share a label"),
        (1, {}, "one view and no labels"),
        (1, {"mask": torch.eye(6)}, "the mask has no positive pair"),
        (2, {"mask": torch.zeros(6, 6)}, "the mask has no positive pair"),
        (2, {"mask": torch.zeros(6, 6), "positives_missing": "zero"}, "the mask has no positive pair"),
    ],
)
def test_supcon_without_any_positive_warns_on_cpu(views, kwargs, why):
    features = torch.randn(6, views, 8)
    with pytest.warns(UserWarning, match=f"supcon: no anchor has a positive \\({why}\\), so the loss is 0"):
        loss = fastcl.functional.supcon(features, **kwargs)
    assert loss.item() == 0.0


@pytest.mark.parametrize(
    "views, kwargs",
    [
        (1, {"labels": torch.tensor([0, 0, 1, 2, 3, 4])}),
        (2, {"labels": torch.arange(6)}),
        (2, {}),
        (1, {"mask": torch.eye(6) + torch.diag(torch.ones(5), 1)}),
        (2, {"mask": torch.eye(6)}),
    ],
)
def test_supcon_with_a_positive_does_not_warn(views, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastcl.functional.supcon(torch.randn(6, views, 8), **kwargs).item() > 0
