"""No atomics and no host syncs, mechanically: every aten op of every loss × mode × backend, forward and
backward, is logged (tests/oplog.py) and none may be one PyTorch lists as nondeterministic on CUDA or
one that synchronizes the host.

Losses: SupCon (labels, bool mask, soft mask, no labels, contrast_mode="one", positives_missing="zero"),
NT-Xent, InfoNCE (symmetric, one-way, explicit targets), DCL, DCLW and SigLIP, with sub_dim where the loss
takes it and a learnable temperature, fp32 and (local) bf16 rows. Backends: torch; triton (kernel launches through
``TRITON_INTERPRET=1`` are opaque, as a GPU launch is); cuda (its host code — argument conversion and the
reduction of the kernels' per-anchor sums — around a stand-in for the compiled ops, which need a GPU).
Modes: local in this process; gather and ring on a 2-rank gloo group, with equal batches declared
(``fastcl.distributed.set_equal_batches``: no exchange at all) and with uneven batches (exactly one size
exchange per step, in the forward; the backward reads the sizes from the host).

``check_finite=False`` everywhere: the finiteness check is an explicit, documented sync (on by default
on the torch backend only); its default is issue 24's business, not what this test audits. SupCon's
no-positive warning, which reads the labels only for CPU tensors or with ``check_finite``, is left out
for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oplog import NONDETERMINISTIC_ON_CUDA, OpLog

import fastcl.distributed as fdist
from fastcl import dispatch, functional
from fastcl import torch_backend as reference_primitive
from fastcl.contract import Layout
from fastcl.cuda_backend import block as cuda_block

D, SUB_DIM = 8, 5


def _has_triton() -> bool:
    return dispatch.unavailable_reason("triton") is None


BACKENDS = ["torch", "cuda"] + (["triton"] if _has_triton() else [])


def _inputs(n: int, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).to(dtype).requires_grad_()  # noqa: E731
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 1, 0])[:n]
    return {
        "z1": leaf(n, D),
        "z2": leaf(n, D),
        "features": leaf(n, 2, D),
        "labels": labels,
        "tau": torch.tensor(0.1).requires_grad_(),
        "bias": torch.tensor(-2.0).requires_grad_(),
        "mask": labels[:, None] == labels[None, :],
    }


def _losses(local: bool) -> dict:
    """name -> fn(inputs, **common) -> loss."""
    f = functional
    cases = {
        "nt_xent": lambda x, **c: f.nt_xent(x["z1"], x["z2"], x["tau"], sub_dim=SUB_DIM, **c),
        "nt_xent-raw": lambda x, **c: f.nt_xent(x["z1"], x["z2"], x["tau"], normalize=False, **c),
        "info_nce": lambda x, **c: f.info_nce(x["z1"], x["z2"], x["tau"], sub_dim=SUB_DIM, **c),
        "info_nce-oneway": lambda x, **c: f.info_nce(x["z1"], x["z2"], x["tau"], symmetric=False, **c),
        "info_nce-targets": lambda x, **c: f.info_nce(
            x["z1"], x["z2"], x["tau"], targets=torch.arange(x["z1"].shape[0]).flip(0), symmetric=False, **c
        ),
        "supcon-labels": lambda x, **c: f.supcon(
            x["features"], x["labels"], temperature=x["tau"], sub_dim=SUB_DIM, **c
        ),
        "supcon-unlabeled": lambda x, **c: f.supcon(x["features"], temperature=x["tau"], **c),
        "supcon-one": lambda x, **c: f.supcon(
            x["features"], x["labels"], temperature=x["tau"], contrast_mode="one", base_temperature=0.2, **c
        ),
        "supcon-zero": lambda x, **c: f.supcon(
            x["features"], x["labels"], temperature=x["tau"], positives_missing="zero", **c
        ),
        "dcl": lambda x, **c: f.dcl(x["z1"], x["z2"], x["tau"], sub_dim=SUB_DIM, **c),
        "dclw": lambda x, **c: f.dcl(x["z1"], x["z2"], x["tau"], weight_sigma=0.5, **c),
        "siglip": lambda x, **c: f.siglip(x["z1"], x["z2"], 1.0 / x["tau"], x["bias"], sub_dim=SUB_DIM, **c),
    }
    if local:  # a per-rank mask is rejected under gather/ring
        cases["supcon-mask"] = lambda x, **c: f.supcon(x["features"], mask=x["mask"], temperature=x["tau"], **c)
        cases["supcon-soft-mask"] = lambda x, **c: f.supcon(
            x["features"], mask=x["mask"].double() * 0.5, temperature=x["tau"], **c
        )
    return cases


# --- the cuda backend's host code around a stand-in for its compiled ops ---------------------------------

_POSITIVES = {code: name for name, code in cuda_block._POSITIVES.items()}
_EPILOGUES = {code: name for name, code in cuda_block._EPILOGUES.items()}


def _stand_in_layout(has_self, self_offset, positives, exclude_positives, epilogue, bias, pos_index, a_labels,
                     k_labels, mask) -> Layout:  # fmt: skip
    return Layout(
        positives=_POSITIVES[positives],
        self_offset=self_offset if has_self else None,
        pos_index=pos_index,
        a_labels=a_labels,
        k_labels=k_labels,
        mask=mask,
        exclude_positives=exclude_positives,
        epilogue=_EPILOGUES[epilogue],
        bias=bias,
    )


class _CompiledOpsStandIn:
    """torch.ops.fastcl_cuda's two ops as the torch backend's primitive (the log treats them as opaque)."""

    @staticmethod
    def block_forward(a, a_inv, k, k_inv, tau, sub_dim, *layout):
        return reference_primitive.block_forward(a, a_inv, k, k_inv, tau, sub_dim, _stand_in_layout(*layout))

    @staticmethod
    def block_backward(a, a_inv, k, k_inv, tau, sub_dim, *rest):
        *layout, lse, alpha, beta = rest
        d_a, d_k, gs = reference_primitive.block_backward(
            a, a_inv, k, k_inv, tau, sub_dim, _stand_in_layout(*layout), lse, alpha, beta
        )
        grad_sums = torch.zeros(max(a.shape[0], 1), 2, dtype=d_a.dtype)
        grad_sums[0, : gs.numel()] = gs.reshape(-1)
        return d_a, d_k, grad_sums


@contextlib.contextmanager
def _cuda_backend_on_cpu(log: OpLog):
    """backend="cuda" runs here: dispatch accepts it, and its compiled ops are the opaque stand-in."""
    stand_in = _CompiledOpsStandIn()
    original_reason, original_ops = dispatch.unavailable_reason, cuda_block._ops
    dispatch.unavailable_reason = lambda backend, device=None: (
        None if backend == "cuda" else original_reason(backend, device)
    )
    cuda_block._ops = lambda: stand_in
    try:
        with log.opaque(stand_in, "block_forward"), log.opaque(stand_in, "block_backward"):
            yield
    finally:
        dispatch.unavailable_reason, cuda_block._ops = original_reason, original_ops


@contextlib.contextmanager
def _logging(log: OpLog, backend: str):
    with contextlib.ExitStack() as stack:
        stack.enter_context(log.patched_methods())
        if _has_triton():
            from triton.runtime import interpreter

            stack.enter_context(log.opaque(interpreter.GridExecutor, "__call__"))
        stack.enter_context(log.opaque(fdist, "exchange_part_sizes", record="size exchange"))
        stack.enter_context(log.opaque(fdist, "read_host_sizes", record="host read"))
        # SupCon's no-positive warning reads labels / the mask only for CPU tensors or with check_finite
        # (functional.supcon): on CUDA with check_finite=False it does not run, so it is not logged here.
        stack.enter_context(log.opaque(functional, "_warn_if_no_positive"))
        if backend == "cuda":
            stack.enter_context(_cuda_backend_on_cpu(log))
        yield


def run_logged(
    loss: str, backend: str, mode: str, n: int, seed: int = 0, local: bool = True, dtype: torch.dtype = torch.float32
) -> OpLog:
    """One forward and backward of ``loss`` under the op log; ``log.result``: the loss and the gradients."""
    inputs = _inputs(n, seed, dtype)
    log = OpLog()
    with _logging(log, backend):
        with log:
            value = _losses(local)[loss](inputs, backend=backend, distributed=mode, check_finite=False)
        log.phase = "backward"
        with log:
            value.backward()
    assert inputs["tau"].grad is not None, "the temperature got no gradient"
    log.result = [value.detach()] + [t.grad for t in inputs.values() if t.grad is not None]
    return log


# --- local ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(_losses(local=True)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_local_has_no_nondeterministic_op_and_no_sync(loss, backend, dtype):
    log = run_logged(loss, backend, "local", n=6, dtype=dtype)
    assert len(log.ops) > 20, "the log saw too few ops: the custom ops' insides were not logged"
    assert log.flagged == []
    assert log.sanctioned == []


class _PrefixCopyLog(OpLog):
    """The op log, also listing every op that copies (cat, stack, clone — what ``.contiguous()`` calls —
    or copy_) a tensor sharing storage with the user's embeddings: a copy of the rows' prefix."""

    COPIES = ("cat", "stack", "clone", "copy_")

    def __init__(self, embeddings: list[torch.Tensor]):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in embeddings}
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.COPIES:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages for t in leaves):
                self.copies.append((self.phase, func.__name__))
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_prefix_copy_log_fires_on_deliberate_copies():
    z = torch.randn(4, 8)
    log = _PrefixCopyLog([z])
    with log:
        torch.cat([z[:, :3], z[:, :3]])
        z[:, :3].contiguous()
        torch.randn(4, 3).copy_(z[:, :3])
    assert [name.split(".")[0] for _, name in log.copies] == ["cat", "clone", "copy_"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(_losses(local=True)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_local_losses_never_copy_the_rows_prefix(loss, backend, dtype):
    """One route for sub_dim (issue 23): every loss hands the engine the user's tensors as they are and the
    primitive reads the first sub_dim features through strides: no cat/stack/clone/copy_ of the embeddings
    in the forward or the backward (the torch backend's own working set is a multiply by the inverse norms,
    or a cast to float32 for 16-bit rows, not a copy of the rows)."""
    inputs = _inputs(6, 0, dtype)
    log = _PrefixCopyLog([inputs["z1"], inputs["z2"], inputs["features"]])
    with _logging(log, backend):
        with log:
            value = _losses(True)[loss](inputs, backend=backend, distributed="local", check_finite=False)
        log.phase = "backward"
        with log:
            value.backward()
    assert len(log.ops) > 20, "the log saw too few ops"
    assert log.copies == []


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_the_log_sees_inside_the_custom_ops(backend):
    """The losses are the engine's custom ops: the ops inside them are logged, e.g. the merge of the
    blocks' log-sum-exps in the forward and the per-anchor coefficients in the backward."""
    log = run_logged("supcon-labels", backend, "local", n=6)
    assert ("forward", "logaddexp.default") in log.ops and ("backward", "where.ScalarOther") in log.ops


def test_detector_fires_on_a_deliberate_index_add(monkeypatch):
    """The positive weights of a tile summed the atomic way: the log must flag index_add_."""
    from fastcl.torch_backend import block

    real = block._positive_weights

    def atomic_positive_weights(layout, anchors, keys, like):
        p = real(layout, anchors, keys, like)
        return None if p is None else p.new_zeros(p.shape).index_add_(0, torch.arange(p.shape[0]), p)

    monkeypatch.setattr(block, "_positive_weights", atomic_positive_weights)
    log = run_logged("supcon-labels", "torch", "local", n=6)
    assert ("forward", "nondeterministic on CUDA", "index_add_.default") in log.flagged


def test_detector_fires_on_deliberate_syncs(monkeypatch):
    """An .item(), a tensor built from a list on the device, a boolean-mask index and a .tolist()."""
    from fastcl import engine

    original = engine._pass_coefficients

    def syncing(plan, counts, reduction):
        weights = torch.tensor([p.weight for p in plan.passes], device=counts.device)  # the old code
        float(counts.sum().item())
        counts[counts > 0].tolist()
        return original(plan, counts, reduction) + 0 * weights.sum()

    monkeypatch.setattr(engine, "_pass_coefficients", syncing)
    log = run_logged("dcl", "torch", "local", n=6)
    kinds = {op for phase, kind, op in log.flagged if phase == "forward" and kind == "host sync"}
    assert {"lift_fresh.default", "Tensor.item", "index.Tensor", "Tensor.tolist"} <= kinds


def test_nondeterministic_list_covers_torch_docs():
    """Every op torch.use_deterministic_algorithms documents (this torch's docstring) is mapped in tests/oplog.py."""
    documented = set(re.findall(r":(?:func|class|meth):`([\w.]+)`", torch.use_deterministic_algorithms.__doc__))
    documented -= {"torch.set_deterministic_debug_mode", "torch.utils.deterministic.fill_uninitialized_memory"}
    documented = {name for name in documented if name.startswith("torch.") and not name.startswith("torch.utils.")}
    assert documented, "the docstring's format changed: update the parser"
    assert documented <= set(NONDETERMINISTIC_ON_CUDA), sorted(documented - set(NONDETERMINISTIC_ON_CUDA))


def test_no_atomics_in_the_kernels_sources():
    """No Triton atomic in kernels/ and no CUDA atomic in csrc/ (code lines; comments may say "no atomics")."""
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "kernels").glob("*.py")):
        assert "tl.atomic" not in path.read_text(), path
    for path in sorted((root / "csrc").glob("*.c*")) + sorted((root / "csrc").glob("*.h")):
        code = "\n".join(line.split("//")[0] for line in path.read_text().splitlines())
        assert not re.search(r"\batomic\w*\s*\(", code, re.IGNORECASE), path


# --- gather and ring on a 2-rank gloo group --------------------------------------------------------------

WORLD = 2
SIZES = {"equal": [6, 6], "uneven": [5, 7]}


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        for sizes, n in SIZES.items():
            fdist.set_equal_batches(sizes == "equal")
            for mode in ("gather", "ring"):
                for backend in ["torch"] + (["triton"] if _has_triton() else []):
                    for loss in _losses(local=False):
                        log = run_logged(loss, backend, mode, n=n[rank], seed=rank, local=False)
                        same = True
                        if sizes == "equal":  # the declaration changes no bit of the result
                            fdist.set_equal_batches(False)
                            exchanged = run_logged(loss, backend, mode, n=n[rank], seed=rank, local=False)
                            fdist.set_equal_batches(True)
                            same = all(map(torch.equal, log.result, exchanged.result))
                        results[(sizes, mode, backend, loss)] = (log.flagged, log.sanctioned, len(log.ops), same)
        # A false promise: declared equal, sizes differ. Every rank raises before any row is exchanged.
        fdist.set_equal_batches(True)
        try:
            run_logged("nt_xent", "torch", "gather", n=SIZES["uneven"][rank], seed=rank, local=False)
            results["false-promise"] = "no error"
        except RuntimeError as error:
            results["false-promise"] = str(error)
    finally:
        fdist.set_equal_batches(False)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_logs() -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(port, out_dir), nprocs=WORLD, join=True, start_method="spawn")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_gather_and_ring_have_no_nondeterministic_op_and_no_sync(distributed_logs):
    for rank, results in enumerate(distributed_logs):
        cases = [key for key in results if isinstance(key, tuple)]
        assert len(cases) == 2 * 2 * len(_losses(local=False)) * (2 if _has_triton() else 1)
        for key in cases:
            flagged, sanctioned, n_ops, same = results[key]
            assert n_ops > 20, (rank, key, "the log saw too few ops")
            assert same, (rank, key, "declaring equal batches changed the result")
            assert flagged == [], (rank, key, flagged)
            if key[0] == "equal":  # declared equal: nothing exchanged, nothing read
                assert sanctioned == [], (rank, key, sanctioned)
            else:  # uneven: one size exchange per step, in the forward; the backward reads the host copy
                expected = [("forward", "size exchange"), ("forward", "host read"), ("backward", "host read")]
                assert sanctioned == expected, (rank, key, sanctioned)


def test_a_false_equal_batches_declaration_raises(distributed_logs):
    for results in distributed_logs:
        assert "set_equal_batches(True) was declared" in results["false-promise"]
