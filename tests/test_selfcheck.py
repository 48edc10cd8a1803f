"""The self-check before trust (fastcl/selfcheck.py): "auto" uses a fused backend only after it matched the
torch backend once per (device, dtype, loss), remembered in the process and on disk.

The check applies to CUDA tensors; here `selfcheck.applies` is widened to the CPU and the "triton" backend
is a stand-in module (the torch backend with one function made wrong or raising), so each case costs
milliseconds. One test runs the real Triton kernels (the interpreter on CPU, the GPU where there is one).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import types
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastcl
import fastcl.torch_backend as torch_backend
from fastcl import dispatch, selfcheck

CPU = torch.device("cpu")


@pytest.fixture
def on_cpu(monkeypatch, tmp_path):
    """The self-check applies to CPU tensors, with its cache in a fresh folder and no decisions yet."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTCL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # dispatch: triton "runs" on CPU tensors
    for name in ("FASTCL_SELFCHECK", "FASTCL_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(selfcheck, "applies", lambda device: True)
    selfcheck.forget()
    yield tmp_path
    selfcheck.forget()


def stand_in_triton(monkeypatch, **overrides):
    """Routes backend "triton" to the torch backend's functions with ``overrides``; returns the list of
    backend names each op looked up (the routing, the forwards and the backwards)."""
    fake = types.SimpleNamespace(**{k: v for k, v in vars(torch_backend).items() if not k.startswith("__")})
    for name, fn in overrides.items():
        setattr(fake, name, fn)
    calls = []
    real_module = dispatch.module

    def module(backend):
        calls.append(backend)
        return fake if backend == "triton" else real_module(backend)

    monkeypatch.setattr(dispatch, "module", module)
    return calls


def wrong_ntxent_forward(*args):
    """The block forward, off by 1 in the log-sum-exp of NT-Xent's same-view blocks only (a self entry,
    no positive, no exclusion: no other loss has that layout)."""
    lse, pos_sum, pos_weight = torch_backend.block_forward(*args)
    layout = args[6]
    if layout.self_offset is not None and layout.positives == "none" and not layout.exclude_positives:
        lse = lse + 1.0
    return lse, pos_sum, pos_weight


def raising_block_backward(*args):
    raise RuntimeError("illegal memory access (planted)")


def views(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(6, 5, generator=g, dtype=dtype), torch.randn(6, 5, generator=g, dtype=dtype))


def selfcheck_warnings(record):
    return [w for w in record if issubclass(w.category, selfcheck.SelfCheckWarning)]


def test_a_wrong_backend_warns_once_and_auto_falls_back_to_torch(on_cpu, monkeypatch):
    calls = stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward)
    z1, z2 = views()
    expected = fastcl.functional.nt_xent(z1, z2, backend="torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = fastcl.functional.nt_xent(z1, z2)
        calls.clear()
        second = fastcl.functional.nt_xent(z1, z2)
    assert "triton" not in calls  # the real call ran on torch
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    [warning] = selfcheck_warnings(record)
    message = str(warning.message)
    assert "backend='triton' failed its self-check for nt_xent with float32" in message
    assert re.search(r"loss relative error [0-9.]+ > 0\.002", message) and "torch backend" in message
    [cache] = on_cpu.glob("selfcheck-*.json")
    case = json.loads(cache.read_text())["cases"]["triton/float32/nt_xent"]
    assert case["passed"] is False and case["errors"]["loss"] > 0.01


def test_a_raising_backend_is_a_failed_check(on_cpu, monkeypatch):
    stand_in_triton(monkeypatch, block_backward=raising_block_backward)
    z1, z2 = (t.requires_grad_() for t in views())
    with pytest.warns(selfcheck.SelfCheckWarning, match="raised RuntimeError: illegal memory access"):
        loss = fastcl.functional.nt_xent(z1, z2)
    loss.backward()  # the real call runs the torch backend's backward
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


def test_the_check_is_per_loss_and_dtype(on_cpu, monkeypatch):
    """A wrong NT-Xent leaves the other losses, and NT-Xent in another dtype, on the fused backend."""
    stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward)
    with pytest.warns(selfcheck.SelfCheckWarning):
        fastcl.functional.nt_xent(*views())
    assert dispatch.resolve("auto", CPU, torch.float32, "nt_xent") == "torch"
    assert dispatch.resolve("auto", CPU, torch.float32, "info_nce") == "triton"
    assert dispatch.resolve_block("auto", CPU, torch.float32, "dcl") == "triton"
    with pytest.warns(selfcheck.SelfCheckWarning, match="nt_xent with float64"):
        assert dispatch.resolve("auto", CPU, torch.float64, "nt_xent") == "torch"


def test_a_correct_backend_is_used_and_the_pass_cached(on_cpu, monkeypatch):
    calls = stand_in_triton(monkeypatch)
    z1, z2 = views()
    with warnings.catch_warnings():
        warnings.simplefilter("error", selfcheck.SelfCheckWarning)
        fastcl.functional.nt_xent(z1, z2)
        calls.clear()
        fastcl.functional.nt_xent(z1, z2)
    assert calls and set(calls) == {"triton"}
    [cache] = on_cpu.glob("selfcheck-*.json")
    data = json.loads(cache.read_text())
    assert data["cases"]["triton/float32/nt_xent"]["passed"] is True
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["fastcl"] == fastcl.__version__


def test_a_decision_is_reused_without_checking_again(on_cpu, monkeypatch):
    """After the first call the hot path is a dictionary lookup (no check, no cache read, no sync); a new
    process (forget()) reads the disk cache instead of checking; a cached failure still warns once."""
    stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward)
    with pytest.warns(selfcheck.SelfCheckWarning):
        fastcl.functional.nt_xent(*views())

    def must_not_run(*args, **kwargs):
        raise AssertionError("checked again")

    monkeypatch.setattr(selfcheck, "check", must_not_run)
    monkeypatch.setattr(selfcheck, "_read_cache", must_not_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", selfcheck.SelfCheckWarning)
        assert dispatch.resolve("auto", CPU, torch.float32, "nt_xent") == "torch"
    monkeypatch.undo()  # the real check and cache again, under the same fixture settings
    monkeypatch.setenv("FASTCL_CACHE_DIR", str(on_cpu))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(selfcheck, "applies", lambda device: True)
    monkeypatch.setattr(selfcheck, "check", must_not_run)
    selfcheck.forget()
    with pytest.warns(selfcheck.SelfCheckWarning, match=r"self-check \(cached result\) for nt_xent"):
        assert dispatch.resolve("auto", CPU, torch.float32, "nt_xent") == "torch"


def test_a_corrupt_cache_file_is_ignored_and_rewritten(on_cpu, monkeypatch):
    stand_in_triton(monkeypatch)
    path = selfcheck.cache_path(CPU)
    path.write_text('{"format": 1, "cases": {"triton/float32/nt_xent": {"passed": tr')
    assert dispatch.resolve("auto", CPU, torch.float32, "nt_xent") == "triton"
    assert json.loads(path.read_text())["cases"]["triton/float32/nt_xent"]["passed"] is True
    path.write_text('{"format": 1, "cases": {"triton/float32/nt_xent": {"passed": false}}}')  # fields missing
    selfcheck.forget()
    assert dispatch.resolve("auto", CPU, torch.float32, "nt_xent") == "triton"
    assert not list(on_cpu.glob("*.tmp"))


def test_the_cache_file_depends_on_the_versions(on_cpu, monkeypatch):
    before = selfcheck.cache_path(CPU)
    installed = importlib.metadata.version  # the installed fastcl's version, as the cache reads it
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.0.0-other" if name == "fastcl" else installed(name)
    )
    assert selfcheck.cache_path(CPU) != before
    monkeypatch.setattr(importlib.metadata, "version", installed)
    monkeypatch.setattr(torch, "__version__", "0.0-other")
    assert selfcheck.cache_path(CPU) != before


def test_an_unwritable_cache_folder_only_loses_the_cache(on_cpu, monkeypatch):
    blocker = on_cpu / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTCL_CACHE_DIR", str(blocker / "below"))  # a folder inside a file: mkdir fails
    stand_in_triton(monkeypatch)
    assert dispatch.resolve("auto", CPU, torch.float32, "nt_xent") == "triton"


def test_fastcl_selfcheck_0_skips_the_check(on_cpu, monkeypatch):
    calls = stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward)
    monkeypatch.setenv("FASTCL_SELFCHECK", "0")
    monkeypatch.setattr(selfcheck, "check", lambda *a: pytest.fail("checked although FASTCL_SELFCHECK=0"))
    fastcl.functional.nt_xent(*views())
    assert "triton" in calls and not list(on_cpu.glob("selfcheck-*"))


def test_an_explicit_backend_is_honoured_without_a_check(on_cpu, monkeypatch):
    stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward)
    monkeypatch.setattr(selfcheck, "check", lambda *a: pytest.fail("an explicit backend was checked"))
    z1, z2 = views()
    wrong = fastcl.functional.nt_xent(z1, z2, backend="triton")
    assert abs(float(wrong) - float(fastcl.functional.nt_xent(z1, z2, backend="torch"))) > 1e-3  # the planted fault ran


def test_the_check_runs_with_gradients_inside_no_grad_and_inference_mode(on_cpu, monkeypatch):
    """A first call from an evaluation loop still checks the backward."""
    stand_in_triton(monkeypatch, block_backward=raising_block_backward)
    with torch.inference_mode(), pytest.warns(selfcheck.SelfCheckWarning, match="raised RuntimeError"):
        fastcl.functional.nt_xent(*views())
    selfcheck.forget()
    with torch.no_grad(), pytest.warns(selfcheck.SelfCheckWarning, match="raised RuntimeError"):
        fastcl.functional.nt_xent(*views())


def test_the_callers_default_device_and_autocast_do_not_change_the_check(on_cpu, monkeypatch):
    stand_in_triton(monkeypatch)
    with torch.device("meta"), torch.autocast("cpu", dtype=torch.bfloat16):  # CPU generators fail on meta
        result = selfcheck.check("triton", CPU, torch.float32, "supcon")
    assert result.passed and max(result.errors.values()) < 1e-6, result.detail


def test_cpu_tensors_are_not_checked_by_default(monkeypatch):
    monkeypatch.setattr(selfcheck, "check", lambda *a: pytest.fail("checked a CPU case"))
    assert not selfcheck.applies(CPU)
    assert dispatch.resolve("auto", CPU, torch.float32, "nt_xent") == "torch"


def test_torch_compile_fullgraph_takes_the_decision_as_a_constant(on_cpu, monkeypatch):
    """Dynamo calls trusted() eagerly while tracing (the check runs outside the graph, once); the graph
    runs the backend it chose, with no graph break."""
    stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward)
    checks = []
    real_check = selfcheck.check
    monkeypatch.setattr(selfcheck, "check", lambda *a: checks.append(a) or real_check(*a))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b: fastcl.functional.nt_xent(a, b), backend=counter, fullgraph=True)
    z1, z2 = views()
    with pytest.warns(selfcheck.SelfCheckWarning):
        got = compiled(z1, z2)
    got_again = compiled(*views(1))
    torch.testing.assert_close(got, fastcl.functional.nt_xent(z1, z2, backend="torch"))
    torch.testing.assert_close(got_again, fastcl.functional.nt_xent(*views(1), backend="torch"))
    assert len(checks) == 1 and counter.frame_count == 1


def test_no_check_under_a_tracing_dispatch_mode(on_cpu, monkeypatch):
    """make_fx with fake tensors (as non-strict export traces) cannot run a check: the fused backend is
    used unchecked for that trace, nothing is cached, and the next ordinary call checks."""
    from torch.fx.experimental.proxy_tensor import make_fx

    calls = stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward)
    monkeypatch.setattr(selfcheck, "check", lambda *a: pytest.fail("checked while tracing"))
    make_fx(lambda a, b: fastcl.functional.nt_xent(a, b), tracing_mode="fake")(*views())
    assert "triton" in calls and not list(on_cpu.glob("selfcheck-*"))
    monkeypatch.undo()
    monkeypatch.setenv("FASTCL_CACHE_DIR", str(on_cpu))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(selfcheck, "applies", lambda device: True)
    stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward)
    with pytest.warns(selfcheck.SelfCheckWarning):
        assert dispatch.resolve("auto", CPU, torch.float32, "nt_xent") == "torch"


def test_the_real_triton_kernels_pass(monkeypatch, tmp_path, triton_device):
    """The shipped kernels pass their own check (through the interpreter here; on the GPU there)."""
    monkeypatch.setenv("FASTCL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(selfcheck, "applies", lambda device: True)
    result = selfcheck.check("triton", triton_device, torch.float32, "nt_xent")
    assert result.passed, result.detail
    assert set(result.errors) == {"loss", "grad0", "grad1", "dtau"}
    assert max(result.errors.values()) < selfcheck.TOLERANCE[torch.float32]
