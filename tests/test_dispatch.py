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
    """Every loss needs block_forward/block_backward: a backend whose module lacks them is a RuntimeError
    that says so; "auto" falls back to torch."""
    monkeypatch.setattr(
        dispatch, "block_primitive_error", lambda backend: None if backend == "torch" else "no primitive"
    )
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device=None: None)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run the losses.*no primitive"):
        dispatch.resolve_block("triton", torch.device("cpu"))
    assert dispatch.resolve_block("auto", torch.device("cuda")) == "torch"


def test_block_primitives_are_found_through_dispatch():
    forward, backward = dispatch.block_primitive("torch")
    assert (forward, backward) == (fastcl.torch_backend.block_forward, fastcl.torch_backend.block_backward)
    assert dispatch.block_primitive_error("torch") is None


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "supcon"])
def test_every_single_process_loss_runs_the_chosen_backends_block_primitive(monkeypatch, loss):
    """One route: a local call runs the block primitive, one sweep per part pair of each pass (NT-Xent and
    SupCon with 2 views: 2 × 2; symmetric InfoNCE: its two directions)."""
    calls = []
    forward = fastcl.torch_backend.block_forward
    monkeypatch.setattr(fastcl.torch_backend, "block_forward", lambda *args: calls.append(1) or forward(*args))
    g = torch.Generator().manual_seed(3)
    if loss == "supcon":
        args = (torch.randn(5, 2, 7, generator=g), torch.tensor([0, 1, 0, 2, 1]))
    else:
        args = (torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g))
    getattr(fastcl.functional, loss)(*args, backend="torch")
    assert len(calls) == {"nt_xent": 4, "info_nce": 2, "supcon": 4}[loss]


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "supcon", "dcl"])
def test_a_backend_without_own_blocks_gets_the_same_gradients(monkeypatch, loss):
    """A backend without SUPPORTS_OWN_BLOCK (the engine then takes d_a and d_k of the own block apart)
    gives the values and gradients of one with it (the own block's whole gradient as d_a), and the engine
    asks for own blocks only where the backend has them."""
    g = torch.Generator().manual_seed(5)
    if loss == "supcon":
        inputs = [torch.randn(6, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)]
        extra = (torch.tensor([0, 1, 0, 2, 1, 2]),)
    else:
        inputs = [torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        extra = ()
    tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    layouts = []
    backward = fastcl.torch_backend.block_backward

    def recording_backward(*args):
        layouts.append(args[6])
        return backward(*args)

    monkeypatch.setattr(fastcl.torch_backend, "block_backward", recording_backward)
    results = {}
    for supported in (True, False):
        monkeypatch.setattr(fastcl.torch_backend, "SUPPORTS_OWN_BLOCK", supported)
        layouts.clear()
        value = getattr(fastcl.functional, loss)(*inputs, *extra, temperature=tau, sub_dim=7, backend="torch")
        results[supported] = [value, *torch.autograd.grad(value, [*inputs, tau])]
        own = [layout.own_block for layout in layouts]
        assert any(own) == (supported and loss != "info_nce")  # InfoNCE's passes have no part against itself
    for with_own, without in zip(results[True], results[False]):
        torch.testing.assert_close(with_own, without, rtol=1e-12, atol=1e-12)


def test_dispatch_decisions_are_constants_for_torch_compile_without_importing_dynamo():
    import subprocess
    import sys

    code = (
        "import sys, fastcl; "
        "print('torch._dynamo' in sys.modules, fastcl.dispatch.block_primitive_error._dynamo_marked_constant)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
