"""Deterministic by construction, checked: ordered class sums against float64 (CPU); bit-identical
repeats of every loss's forward and backward, and the forward and backward captured in a CUDA graph, on
the fused backends (``gpu``). tests/test_oplog.py proves the absence of atomics and host syncs op by op.
"""

from __future__ import annotations

import pytest
import torch

from fastcl import dispatch, functional
from fastcl.contract import class_segments, class_sums


def _float64_class_sums(values: torch.Tensor, classes: torch.Tensor, n_classes: int) -> tuple:
    """(Σ x, Σ |x|) per class in float64, the reference and the scale of its rounding error."""
    sums = torch.zeros(n_classes, values.shape[1], dtype=torch.float64)
    sizes = torch.zeros(n_classes, values.shape[1], dtype=torch.float64)
    for row, c in enumerate(classes.tolist()):
        sums[c] += values[row].double()
        sizes[c] += values[row].double().abs()
    return sums, sizes


# (rows K, classes, features): one class, all distinct, empty classes, one row, tile-size boundaries.
SHAPES = [(1, 1, 3), (7, 7, 2), (64, 1, 5), (65, 2, 1), (257, 40, 3), (300, 400, 2), (1024, 3, 17), (2049, 700, 4)]


@pytest.mark.parametrize("rows,n_classes,dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_sums_match_float64(rows, n_classes, dim, dtype):
    """Two levels of ≤ ~√K-term fixed-order sums: within 2√K·ε of Σ|x| per class, exact zeros for empty ones."""
    gen = torch.Generator().manual_seed(rows * 31 + n_classes)
    values = torch.randn(rows, dim, generator=gen, dtype=dtype)
    classes = torch.randint(0, n_classes, (rows,), generator=gen)
    got = class_sums(values, class_segments(classes, n_classes))
    truth, scale = _float64_class_sums(values, classes, n_classes)
    assert got.dtype == dtype and got.shape == (n_classes, dim)
    bound = 2 * rows**0.5 * torch.finfo(dtype).eps * scale + 1e-300
    assert ((got.double() - truth).abs() <= bound).all()
    empty = scale.sum(1) == 0
    assert (got[empty] == 0).all()


def test_class_sums_of_zero_rows():
    segments = class_segments(torch.empty(0, dtype=torch.int64), 3)
    assert torch.equal(class_sums(torch.empty(0, 4), segments), torch.zeros(3, 4))


# --- on a GPU ---------------------------------------------------------------------------------------------

FUSED = [b for b in ("triton", "cuda") if torch.cuda.is_available() and dispatch.unavailable_reason(b) is None]


def _inputs(n: int, dim: int, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=gen, device="cuda").to(dtype).requires_grad_()  # noqa: E731
    labels = torch.randint(0, max(2, n // 16), (n,), generator=gen, device="cuda")
    return {
        "z1": leaf(n, dim),
        "z2": leaf(n, dim),
        "features": leaf(n, 2, dim),
        "labels": labels,
        "mask": labels[:, None] == labels[None, :],
        "tau": torch.tensor(0.05, device="cuda").requires_grad_(),
        "bias": torch.tensor(-5.0, device="cuda").requires_grad_(),
    }


F = functional
LOSSES = {
    "nt_xent": lambda x, **c: F.nt_xent(x["z1"], x["z2"], x["tau"], sub_dim=100, **c),
    "info_nce": lambda x, **c: F.info_nce(x["z1"], x["z2"], x["tau"], **c),
    "info_nce-oneway": lambda x, **c: F.info_nce(x["z1"], x["z2"], x["tau"], symmetric=False, **c),
    "supcon-labels": lambda x, **c: F.supcon(x["features"], x["labels"], temperature=x["tau"], sub_dim=100, **c),
    "supcon-mask": lambda x, **c: F.supcon(x["features"], mask=x["mask"], temperature=x["tau"], **c),
    "supcon-one": lambda x, **c: F.supcon(x["features"], x["labels"], temperature=x["tau"], contrast_mode="one", **c),
    "supcon-zero": lambda x, **c: F.supcon(
        x["features"], x["labels"], temperature=x["tau"], positives_missing="zero", **c
    ),
    "dcl": lambda x, **c: F.dcl(x["z1"], x["z2"], x["tau"], **c),
    "dclw": lambda x, **c: F.dcl(x["z1"], x["z2"], x["tau"], weight_sigma=0.5, **c),
    "siglip": lambda x, **c: F.siglip(x["z1"], x["z2"], 1.0 / x["tau"], x["bias"], **c),
}
LEAVES = ("z1", "z2", "features", "tau", "bias")


def _step(loss: str, x: dict, backend: str) -> list[torch.Tensor]:
    """Forward and backward; returns the loss and every leaf's gradient (zeros where it got none)."""
    for name in LEAVES:
        x[name].grad = None
    value = LOSSES[loss](x, backend=backend, check_finite=False)
    value.backward()
    return [value.detach()] + [x[n].grad if x[n].grad is not None else torch.zeros_like(x[n]) for n in LEAVES]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED or ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_repeats_are_bit_identical(loss, dtype, backend):
    """Five runs of forward + backward on the same inputs give the same bits (many tiles, classes, views)."""
    if backend not in FUSED:
        pytest.skip(f"backend {backend!r} cannot run here")
    x = _inputs(1031, 128, dtype, seed=0)
    first = _step(loss, x, backend)
    for _ in range(4):
        again = _step(loss, x, backend)
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"{loss}: a repeat differs by {(a.double() - b.double()).abs().max().item():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED or ["triton"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_forward_and_backward_capture_in_a_cuda_graph(loss, backend):
    """torch.cuda.graph captures forward + backward (any host sync or host-to-device copy would fail the
    capture); replays on new data equal eager runs bit for bit."""
    if backend not in FUSED:
        pytest.skip(f"backend {backend!r} cannot run here")
    static = _inputs(259, 64, torch.float32, seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, allocator) outside the capture
        for _ in range(2):
            _step(loss, static, backend)
    torch.cuda.current_stream().wait_stream(side)
    for name in LEAVES:
        static[name].grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(loss, static, backend)
    for seed in (2, 3):
        fresh = _inputs(259, 64, torch.float32, seed=seed)
        with torch.no_grad():
            for name in LEAVES:
                static[name].copy_(fresh[name])
            static["labels"].copy_(fresh["labels"])
            static["mask"].copy_(fresh["mask"])
        graph.replay()
        eager = _step(loss, fresh, backend)
        for a, b in zip(captured, eager):
            assert torch.equal(a, b), f"{loss}: replay differs from eager by {(a - b).abs().max().item():.3g}"
