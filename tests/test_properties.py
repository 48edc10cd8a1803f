"""Property tests: hypothesis draws shapes and options, each loss must equal the float64 formulas.

Odd row counts (M = N for InfoNCE, N·V for SupCon with V = 1), D ∈ {1, 3, 17, 128, 2048}, any sub_dim,
V ∈ {1, 2, 4}, τ ∈ [0.01, 1], and sometimes a forced small block size so the multi-block paths are drawn.
"""

from __future__ import annotations

import contextlib

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from loss_cases import assert_matches_reference, make_batch

from fastcl.torch_backend import chunk_size

DIMS = [1, 3, 17, 128, 2048]
SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def common(draw, smallest_n: int):
    """Options every loss takes: odd N ≥ smallest_n, D, sub_dim, normalize, τ (float or tensor), block size, seed."""
    n = draw(st.integers(smallest_n // 2, 6)) * 2 + 1
    dim = draw(st.sampled_from(DIMS))
    sub_dim = draw(st.one_of(st.none(), st.integers(1, dim)))
    tau = draw(st.floats(0.01, 1.0))
    return {
        "n": n,
        "dim": dim,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "rows_per_block": draw(st.sampled_from([None, 1, 2, 5])),
        "temperature": torch.tensor(tau) if draw(st.booleans()) else tau,
        "options": {"sub_dim": sub_dim, "normalize": draw(st.booleans())},
    }


def _check(loss: str, case: dict, views: int = 2, targets=None, **extra_options) -> None:
    """One drawn case vs the float64 formulas (1e-10). SupCon's dL/dτ = L/τ − Σ G·s/τ is measured against
    |L|/τ, raw rows' input gradients against the size of their terms: for well-separated rows (raw rows,
    small τ) both cancel to values far below the size of what they sum."""
    batch = make_batch(loss, case["n"], case["dim"], views=views, targets=targets, seed=case["seed"])
    options = {**case["options"], **extra_options}
    used_dim = options["sub_dim"] or case["dim"]
    # A normalized single feature is ±1: the exact input gradient is 0, so measure errors against 1.
    grad_floor = 1.0 if used_dim == 1 and options["normalize"] else 0.0
    if not options["normalize"]:
        # Raw rows: the input gradient sums terms G·z/τ of size up to max|z|/(τ·M), which cancel to far less
        # when the rows are well separated (a one-hot softmax on the positive); measure against that size.
        rows = torch.cat([t.reshape(-1, t.shape[-1])[:, :used_dim] for t in batch.tensors])
        grad_floor = rows.abs().max().item() / (float(case["temperature"]) * rows.shape[0])
    blocks = chunk_size(case["rows_per_block"]) if case["rows_per_block"] else contextlib.nullcontext()
    with blocks:
        assert_matches_reference(
            loss,
            batch,
            case["temperature"],
            torch.float64,
            1e-10,
            grad_floor=grad_floor,
            tau_grad_against_loss=loss == "supcon",
            **options,
        )


@SETTINGS
@given(case=common(smallest_n=3))
def test_nt_xent_property(case):
    _check("nt_xent", case)


@SETTINGS
@given(case=common(smallest_n=1), symmetric=st.booleans())
def test_info_nce_property(case, symmetric):
    _check("info_nce", case, symmetric=symmetric)


@SETTINGS
@given(
    case=common(smallest_n=1),
    views=st.sampled_from([1, 2, 4]),
    targets=st.sampled_from(["labels", "mask", None]),
    contrast_mode=st.sampled_from(["all", "one"]),
    base_temperature=st.floats(0.05, 1.0),
)
def test_supcon_property(case, views, targets, contrast_mode, base_temperature):
    assume(case["n"] * views > 1)  # a single row is its own test (test_parity: single-row)
    _check("supcon", case, views=views, targets=targets, contrast_mode=contrast_mode, base_temperature=base_temperature)
