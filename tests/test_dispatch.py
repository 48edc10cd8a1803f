"""Backend selection: available_backends(), backend=, the FASTCL_BACKEND override, "auto" on CPU."""

from __future__ import annotations

import pytest
import torch

import fastcl
from fastcl import dispatch

CPU = torch.device("cpu")


@pytest.fixture
def backend_calls(monkeypatch):
    """Records which backend module each loss call is routed to (the ops look it up per call)."""
    calls = []
    real_module = dispatch.module

    def recording_module(backend):
        calls.append(backend)
        return real_module(backend)

    monkeypatch.setattr(dispatch, "module", recording_module)
    return calls


def test_available_backends_lists_runnable_names():
    available = fastcl.available_backends()
    assert isinstance(available, list)
    assert available[0] == "torch"
    assert set(available) <= {"torch", "triton", "cuda"}
    for name in available:
        assert dispatch.unavailable_reason(name) is None
    for name in {"triton", "cuda"} - set(available):
        assert isinstance(dispatch.unavailable_reason(name), str)


def test_triton_available_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in fastcl.available_backends()
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "triton" not in fastcl.available_backends()


def test_cuda_backend_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "cuda" not in fastcl.available_backends()


def test_auto_picks_torch_for_cpu_tensors(monkeypatch, backend_calls):
    monkeypatch.delenv("FASTCL_BACKEND", raising=False)
    assert dispatch.resolve("auto", CPU) == "torch"
    z = torch.randn(6, 8, requires_grad=True)
    fastcl.functional.nt_xent(z, z.flip(0)).backward()
    assert backend_calls and set(backend_calls) == {"torch"}  # the forward, the backward and the routing


def test_fastcl_backend_env_overrides_auto(monkeypatch, backend_calls):
    monkeypatch.setenv("FASTCL_BACKEND", "torch")
    assert dispatch.resolve("auto", CPU) == "torch"
    q = torch.randn(5, 4, requires_grad=True)
    fastcl.InfoNCELoss()(q, torch.randn(5, 4)).backward()
    assert backend_calls and set(backend_calls) == {"torch"}  # the forward, the backward and the routing


def test_fastcl_backend_env_does_not_override_an_explicit_backend(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "cuda")
    assert dispatch.resolve("torch", CPU) == "torch"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            dispatch.resolve("auto", CPU)


def test_fastcl_backend_env_with_an_unknown_name(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "numpy")
    with pytest.raises(ValueError, match="FASTCL_BACKEND.*'numpy'"):
        fastcl.functional.nt_xent(torch.randn(4, 3), torch.randn(4, 3))


def test_empty_fastcl_backend_means_auto(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "")
    assert dispatch.resolve("auto", CPU) == "torch"


def test_every_backend_name_resolves_or_explains():
    """Each valid name either resolves to itself here or raises RuntimeError listing what is available."""
    for name in dispatch.BACKENDS:
        reason = dispatch.unavailable_reason(name, CPU)
        if reason is None:
            assert dispatch.resolve(name, CPU) == name
        else:
            with pytest.raises(RuntimeError) as info:
                dispatch.resolve(name, CPU)
            assert reason in str(info.value) and "Available for cpu" in str(info.value)


def test_block_engine_honours_an_explicit_backend_without_the_primitive(monkeypatch):
    """gather/ring and block-only options need block_forward/block_backward: a backend whose module lacks
    them is a RuntimeError that says so; "auto" falls back to torch."""
    monkeypatch.setattr(
        dispatch, "block_primitive_error", lambda backend: None if backend == "torch" else "no primitive"
    )
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device=None: None)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this loss as blocks.*no primitive"):
        dispatch.resolve_block("triton", torch.device("cpu"))
    assert dispatch.resolve_block("auto", torch.device("cuda")) == "torch"


def test_block_primitives_are_found_through_dispatch():
    forward, backward = dispatch.block_primitive("torch")
    assert (forward, backward) == (fastcl.torch_backend.block_forward, fastcl.torch_backend.block_backward)
    assert dispatch.block_primitive_error("torch") is None


def test_block_only_options_run_the_chosen_backend(monkeypatch):
    """A single-process call with a block-only option (soft mask) runs the block primitive of the backend."""
    calls = []
    forward = fastcl.torch_backend.block_forward
    monkeypatch.setattr(fastcl.torch_backend, "block_forward", lambda *args: calls.append(1) or forward(*args))
    features = torch.randn(5, 2, 4)
    fastcl.functional.supcon(features, mask=torch.rand(5, 5), backend="torch")
    assert calls == [1]


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "supcon"])
def test_a_backend_with_only_the_block_primitive_runs_single_process_losses_on_the_engine(monkeypatch, loss):
    # The cuda backend ships only block_forward / block_backward; stand the torch backend in for it.
    import fastcl.torch_backend as torch_backend

    calls = []
    real_forward = torch_backend.block_forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return real_forward(*args, **kwargs)

    g = torch.Generator().manual_seed(3)
    if loss == "supcon":
        args = (torch.randn(5, 2, 7, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 2, 1]))
    else:
        args = (
            torch.randn(5, 7, generator=g, dtype=torch.float64),
            torch.randn(5, 7, generator=g, dtype=torch.float64),
        )
    fused = getattr(fastcl.functional, loss)(*args, backend="torch")
    monkeypatch.setattr(dispatch, "has_fused_losses", lambda backend: False)
    monkeypatch.setattr(torch_backend, "block_forward", counting_forward)
    on_engine = getattr(fastcl.functional, loss)(*args, backend="torch")
    assert calls, "the block primitive did not run"
    torch.testing.assert_close(on_engine, fused, rtol=1e-12, atol=1e-12)


def test_dispatch_decisions_are_constants_for_torch_compile_without_importing_dynamo():
    import subprocess
    import sys

    code = (
        "import sys, fastcl; "
        "print('torch._dynamo' in sys.modules, fastcl.dispatch.has_fused_losses._dynamo_marked_constant)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
