"""The compile-only report's cost MODEL: what the shipped kernels would cost per loss at M = 65 536 on an
H100 or an A100, from the whole-pass counts of their SASS — a model, never a measurement.

Per kernel pass (a row of the compile-only report, ``fastcl.kernels.compile_only.whole_pass``) four bounds,
each = work per similarity element × M² elements × visits / a stated rate (``ARCHITECTURES``):

- tensor: ``mma_flops_per_element`` (the SASS MMA FLOPs; tf32x3 counts its three products) / the dense
  tensor-core peak of the dtype;
- MUFU: ``dynamic_mufu_per_element`` (every MUFU op of the loop: ex2, and the rcp / lg2 some epilogues
  add) / 16 per clock per SM;
- issue: ``dynamic_instructions_per_element`` / 4 warp instructions (128 lanes) per clock per SM;
- L2: ``l2_bytes_per_element`` / the L2 bandwidth — an ASSUMPTION (a per-clock peak; no vendor figure
  exists for H100); ``predicted_ms_at_half_l2`` repeats the prediction at half of it.

A pass is predicted at the largest of its bounds (``predicted_ms``: the bounds overlap perfectly, nothing
else costs time — an optimistic model); a loss is the sum of its passes (``LOSSES``: which kernels, how many
visits of each M² element). Per kernel the config with the smallest predicted time among those that compile
without spills and fit is the one modelled (what an ideal autotuner would pick). O(M·D') passes (inverse
norms, row epilogues, the torch glue) are left out: about M·D'·a few bytes, microseconds.

The naive loss (``NAIVE``) is modelled the same way: each of its kernels (the GEMMs and the elementwise
passes over the M×M matrix it keeps in HBM, named one by one) at max(FLOPs / tensor peak, bytes / HBM
bandwidth), summed — generous to it: every elementwise pass reads and writes its matrix once, its GEMMs run
at the dense tensor peak, fp32 GEMMs at the TF32 peak (PyTorch's default fp32 matmul is slower).
"""

from __future__ import annotations

import math

M = 65536
MODEL_LABEL = "MODEL (predicted from compile-time counts and stated rates; nothing ran)"

# Rates, each with its source. Tensor peaks: NVIDIA datasheets (dense, no sparsity). MUFU: CUDA C++
# Programming Guide, "Arithmetic Instructions" throughput table (exp2 / log2 / rcp: 16 per clock per SM on
# compute capability 8.0 and 9.0). Issue: 4 warp schedulers per SM, one instruction each per clock.
ARCHITECTURES = {
    "sm90": dict(
        gpu="H100 SXM5",
        sms=132,
        clock_ghz=1.83,
        tensor_tflops={"ieee16": 989.4, "tf32": 494.7},
        hbm_tbs=3.35,
        l2_tbs=9.37,
        sources=dict(
            tensor="NVIDIA H100 datasheet: bf16/fp16 989.4, tf32 494.7 TFLOP/s dense (SXM5)",
            clock="1.83 GHz: 989.4 TFLOP/s / (132 SMs x 4096 dense bf16 FLOP/clock/SM)",
            hbm="NVIDIA H100 datasheet: 3.35 TB/s (SXM5, HBM3)",
            l2="ASSUMPTION: 9.37 TB/s = A100's 5120 B/clock (A100 whitepaper) x 1.83 GHz; NVIDIA publishes no "
            "H100 L2 bandwidth. A peak: achieved L2 bandwidth is lower (see predicted_ms_at_half_l2)",
        ),
    ),
    "sm80": dict(
        gpu="A100 SXM4 80GB",
        sms=108,
        clock_ghz=1.41,
        tensor_tflops={"ieee16": 312.0, "tf32": 156.0},
        hbm_tbs=2.039,
        l2_tbs=7.22,
        sources=dict(
            tensor="NVIDIA A100 datasheet: bf16/fp16 312, tf32 156 TFLOP/s dense",
            clock="1.41 GHz boost (A100 datasheet / whitepaper)",
            hbm="NVIDIA A100 80GB SXM datasheet: 2.039 TB/s",
            l2="ASSUMPTION: 7.22 TB/s = 5120 B/clock (A100 whitepaper, L2 read bandwidth) x 1.41 GHz; a peak: "
            "achieved L2 bandwidth is lower (see predicted_ms_at_half_l2)",
        ),
    ),
}
MUFU_PER_CLOCK_PER_SM = 16
ISSUE_LANES_PER_CLOCK_PER_SM = 4 * 32
# Report dtype → (the tensor-peak key, bytes per element of the naive loss's M×M matrices).
DTYPE_MODEL = {"bf16": ("ieee16", 2), "fp16": ("ieee16", 2), "fp32": ("tf32", 4), "fp32-tf32": ("tf32", 4)}

# Which kernels a loss runs (forward, then backward), each with the visits of every M² element it makes;
# the first plan whose kernels all appear in the report is used (the kernel family in the tree decides).
LOSSES = {
    "ntxent": dict(
        title="NT-Xent",
        plans=[
            # The block primitive with an own block (keys = anchors): one backward pass yields G + Gᵀ.
            dict(forward=[("block_index_forward", 1)], backward=[("block_own_index_backward", 1)]),
            # The fused local kernels (before #22).
            dict(forward=[("ntxent_forward", 1)], backward=[("ntxent_backward", 1)]),
        ],
    ),
    "supcon": dict(
        title="SupCon (labels)",
        plans=[
            dict(forward=[("block_labels_forward", 1)], backward=[("block_own_labels_backward", 1)]),
            dict(forward=[("supcon_labels_forward", 1)], backward=[("supcon_labels_backward", 1)]),
        ],
    ),
    "infonce": dict(
        title="symmetric InfoNCE",
        plans=[
            dict(forward=[("infonce_forward", 1)], backward=[("infonce_dq", 1), ("infonce_dk", 1)]),
            # On the block primitive: one block per direction (q→k, k→q), each an anchor and a key pass.
            dict(forward=[("block_index_forward", 2)], backward=[("block_index_anchor", 2), ("block_index_key", 2)]),
        ],
    ),
}

# The naive losses' kernels: (what, GEMM FLOPs per element in units of D', M×M matrices read, written).
# Matrices are of the input dtype (PyTorch keeps logits, softmax and gradients in it); O(M) and O(M·D')
# kernels (norms, gathers of the positives, the loss mean) are left out.
_CROSS_ENTROPY_FORWARD = [("log_softmax over rows", 0, 1, 1)]
_CROSS_ENTROPY_BACKWARD = [
    ("nll_loss backward: dense zero gradient, scatter of -1/M", 0, 0, 1),
    ("log_softmax backward: reads gradient and output", 0, 2, 1),
]
NAIVE = {
    "ntxent": dict(
        forward=[
            ("S = Z·Zᵀ (GEMM, writes S)", 2, 0, 1),
            ("S / τ", 0, 1, 1),
            # The diagonal is filled in place (O(M)), not counted.
            *_CROSS_ENTROPY_FORWARD,
        ],
        backward=[
            *_CROSS_ENTROPY_BACKWARD,
            ("/ τ backward", 0, 1, 1),
            ("dZ = G·Z + Gᵀ·Z (2 GEMMs, each reads G)", 4, 2, 0),
        ],
    ),
    "supcon": dict(
        forward=[
            ("S = Z·Zᵀ (GEMM, writes S)", 2, 0, 1),
            ("S / τ", 0, 1, 1),
            ("positive mask = labels == labelsᵀ (written as the dtype)", 0, 0, 1),
            *_CROSS_ENTROPY_FORWARD,
            ("Σ_c mask·log_prob per row (reads both)", 0, 2, 0),
        ],
        backward=[
            ("mask·log_prob backward: gradient = mask·g", 0, 1, 1),
            ("log_softmax backward: reads gradient and output", 0, 2, 1),
            ("/ τ backward", 0, 1, 1),
            ("dZ = G·Z + Gᵀ·Z (2 GEMMs, each reads G)", 4, 2, 0),
        ],
    ),
    "infonce": dict(
        forward=[
            ("S = Q·Kᵀ (GEMM, writes S)", 2, 0, 1),
            ("S / τ", 0, 1, 1),
            ("log_softmax over rows", 0, 1, 1),
            ("log_softmax over columns (Sᵀ)", 0, 1, 1),
        ],
        backward=[
            *_CROSS_ENTROPY_BACKWARD,
            *_CROSS_ENTROPY_BACKWARD,
            ("sum of the two directions' gradients", 0, 2, 1),
            ("/ τ backward", 0, 1, 1),
            ("dQ = G·K, dK = Gᵀ·Q (2 GEMMs, each reads G)", 4, 2, 0),
        ],
    ),
}


def _rates(arch: str, dtype: str) -> dict:
    spec = ARCHITECTURES[arch]
    clock = spec["clock_ghz"] * 1e9
    return dict(
        tensor=spec["tensor_tflops"][DTYPE_MODEL[dtype][0]] * 1e12,
        mufu=spec["sms"] * MUFU_PER_CLOCK_PER_SM * clock,
        issue=spec["sms"] * ISSUE_LANES_PER_CLOCK_PER_SM * clock,
        l2=spec["l2_tbs"] * 1e12,
        hbm=spec["hbm_tbs"] * 1e12,
    )


def pass_bounds(row: dict, rates: dict, visits: int, m: int = M) -> dict:
    """The four bounds (ms) of ``visits`` walks over an m×m matrix by the kernel of ``row``, the prediction
    (their max) and the prediction at half the assumed L2 bandwidth."""
    elements = m * m * visits
    bounds = dict(
        tensor_ms=row["mma_flops_per_element"] * elements / rates["tensor"] * 1e3,
        mufu_ms=row["dynamic_mufu_per_element"] * elements / rates["mufu"] * 1e3,
        issue_ms=row["dynamic_instructions_per_element"] * elements / rates["issue"] * 1e3,
        l2_ms=row["l2_bytes_per_element"] * elements / rates["l2"] * 1e3,
    )
    bound = max(bounds, key=bounds.get)
    half_l2 = max(bounds["tensor_ms"], bounds["mufu_ms"], bounds["issue_ms"], 2 * bounds["l2_ms"])
    return dict(bounds, bound=bound.removesuffix("_ms"), predicted_ms=bounds[bound], predicted_ms_at_half_l2=half_l2)


def naive_model(loss: str, arch: str, dtype: str, dim: int, m: int = M) -> dict:
    """The naive loss's kernels, each at max(GEMM FLOPs / tensor peak, M×M bytes / HBM bandwidth), summed."""
    rates = _rates(arch, dtype)
    size = DTYPE_MODEL[dtype][1]
    kernels = []
    for phase in ("forward", "backward"):
        for what, flops, reads, writes in NAIVE[loss][phase]:
            compute = flops * dim * m * m / rates["tensor"] * 1e3
            memory = (reads + writes) * size * m * m / rates["hbm"] * 1e3
            kernels.append(
                dict(
                    phase=phase,
                    kernel=what,
                    gemm_ms=compute,
                    hbm_gb=(reads + writes) * size * m * m / 1e9,
                    hbm_ms=memory,
                    ms=max(compute, memory),
                )
            )
    return dict(naive_predicted_ms=sum(k["ms"] for k in kernels), naive_kernels=kernels)


def _usable(row: dict) -> bool:
    return (
        "error" not in row
        and row.get("fits")
        and not row.get("spill_stores")
        and not row.get("spill_loads")
        and row.get("mma_flops_per_element") is not None
    )


def plan(loss: str, names: set) -> dict | None:
    """The first plan of ``loss`` (``LOSSES``) whose kernels are all among ``names``, or None."""
    return next((p for p in LOSSES[loss]["plans"] if all(k in names for k, _ in p["forward"] + p["backward"])), None)


def loss_model(loss: str, arch: str, dtype: str, dim: int, rows: list[dict], m: int = M) -> dict | None:
    """The MODEL record of a loss (forward + backward) on ``arch`` for ``dtype`` rows of width ``dim`` from the
    report's rows, or None when the report lacks a kernel of every plan."""
    candidates = [r for r in rows if r["arch"] == arch and r["dtype"] == dtype and r["D"] == dim and _usable(r)]
    chosen = plan(loss, {r["kernel"] for r in candidates})
    if chosen is None:
        return None
    rates = _rates(arch, dtype)
    passes = []
    for phase in ("forward", "backward"):
        for kernel, visits in chosen[phase]:
            scored = [(pass_bounds(r, rates, visits, m), r) for r in candidates if r["kernel"] == kernel]
            bounds, row = min(scored, key=lambda pair: pair[0]["predicted_ms"])
            passes.append(
                dict(
                    phase=phase,
                    kernel=kernel,
                    visits=visits,
                    config=row["config"],
                    **{key: row[key] for key in PER_ELEMENT},
                    **bounds,
                )
            )
    record = dict(
        kind=MODEL_LABEL,
        loss=loss,
        title=LOSSES[loss]["title"],
        arch=arch,
        gpu=ARCHITECTURES[arch]["gpu"],
        dtype=dtype,
        D=dim,
        M=m,
        passes=passes,
    )
    for key in PER_ELEMENT:
        per_phase = {
            phase: sum(p[key] * p["visits"] for p in passes if p["phase"] == phase) for phase in ("forward", "backward")
        }
        record[key] = {**{k: round(v, 3) for k, v in per_phase.items()}, "total": round(sum(per_phase.values()), 3)}
    for bound in ("tensor_ms", "mufu_ms", "issue_ms", "l2_ms"):
        record[bound.replace("_ms", "_bound_ms")] = sum(p[bound] for p in passes)
    record["predicted_ms"] = sum(p["predicted_ms"] for p in passes)
    record["predicted_ms_at_half_l2"] = sum(p["predicted_ms_at_half_l2"] for p in passes)
    record.update(naive_model(loss, arch, dtype, dim, m))
    record["predicted_ratio_vs_naive"] = record["naive_predicted_ms"] / record["predicted_ms"]
    record["fraction_of_tensor_bound"] = record["tensor_bound_ms"] / record["predicted_ms"]
    return _rounded(record)


PER_ELEMENT = (
    "dynamic_instructions_per_element",
    "dynamic_ex2_per_element",
    "dynamic_mufu_per_element",
    "l2_bytes_per_element",
    "mma_flops_per_element",
)


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def models(rows: list[dict], m: int = M) -> list[dict]:
    """Every loss × arch × dtype × D the report's rows cover (see :func:`loss_model`)."""
    keys = sorted({(r["arch"], r["dtype"], r["D"]) for r in rows if "error" not in r})
    records = [loss_model(loss, *key, rows, m) for key in keys for loss in LOSSES]
    return [r for r in records if r is not None]


def assumptions() -> dict:
    """The rates and rules the model stands on, for the report's metadata."""
    return dict(
        label=MODEL_LABEL,
        M=M,
        architectures=ARCHITECTURES,
        mufu_per_clock_per_sm=MUFU_PER_CLOCK_PER_SM,
        issue_lanes_per_clock_per_sm=ISSUE_LANES_PER_CLOCK_PER_SM,
        combination="per pass: max of the four bounds; per loss: sum of its passes",
        naive="per kernel: max(GEMM FLOPs / tensor peak, M×M bytes / HBM bandwidth); fp32 GEMMs at the TF32 peak",
    )


# Issue #22's targets, as data: the report states each one with its number (holds or not), and CI checks
# them (tests/test_compile_report.py). Read at sm90, bf16, D' = 128 (dynamic, whole passes), except the
# architecture and dtype comparisons. L2_BASELINE: the L2 bytes per element of NT-Xent's and SupCon's
# fwd + bwd before #22's restructuring (this model on the kernels of main at 8393fbe, 2026-12-08).
L2_BASELINE = {"ntxent": 24.0, "supcon": 24.0}
TARGET_AT = ("sm90", "bf16", 128)


def _total(key):
    return lambda find, loss: find(*TARGET_AT, loss)[key]["total"]


def _phase(key, phase):
    return lambda find, loss: find(*TARGET_AT, loss)[key][phase]


def _ratio(key, arch, dtype):
    return lambda find, loss: find(arch, dtype, 128, loss)[key]["total"] / find(*TARGET_AT, loss)[key]["total"]


TARGETS = [
    # (id, what, losses, value(find, loss), comparison, limit)
    (
        "forward_instructions",
        "forward dynamic instructions per element",
        ("ntxent", "supcon"),
        _phase("dynamic_instructions_per_element", "forward"),
        "<=",
        12,
    ),
    (
        "forward_ex2",
        "forward ex2 per element",
        ("ntxent", "supcon"),
        _phase("dynamic_ex2_per_element", "forward"),
        "<=",
        1.1,
    ),
    (
        "backward_instructions",
        "entire backward: dynamic instructions per element",
        ("ntxent", "supcon"),
        _phase("dynamic_instructions_per_element", "backward"),
        "<=",
        24,
    ),
    (
        "backward_ex2",
        "entire backward: ex2 per element",
        ("ntxent", "supcon"),
        _phase("dynamic_ex2_per_element", "backward"),
        "<=",
        2,
    ),
    (
        "l2_halved",
        "fwd+bwd L2 bytes per element / before #22 (L2_BASELINE)",
        ("ntxent", "supcon"),
        lambda find, loss: _total("l2_bytes_per_element")(find, loss) / L2_BASELINE[loss],
        "<=",
        0.5,
    ),
    (
        "ratio_vs_naive",
        "predicted fwd+bwd ratio to the naive model (M = 65 536)",
        ("ntxent", "supcon"),
        lambda find, loss: find(*TARGET_AT, loss)["predicted_ratio_vs_naive"],
        ">=",
        6,
    ),
    (
        "fraction_of_tensor_bound",
        "predicted fwd+bwd fraction of the tensor bound",
        ("ntxent", "supcon"),
        lambda find, loss: find(*TARGET_AT, loss)["fraction_of_tensor_bound"],
        ">=",
        0.5,
    ),
    (
        "ratio_vs_naive",
        "predicted fwd+bwd ratio to the naive model (M = 65 536)",
        ("infonce",),
        lambda find, loss: find(*TARGET_AT, loss)["predicted_ratio_vs_naive"],
        ">=",
        5,
    ),
    (
        "sm80_instructions",
        "sm80 / sm90 fwd+bwd dynamic instructions per element",
        ("ntxent", "supcon", "infonce"),
        _ratio("dynamic_instructions_per_element", "sm80", "bf16"),
        "<=",
        1.5,
    ),
    (
        "sm80_ex2",
        "sm80 / sm90 fwd+bwd ex2 per element",
        ("ntxent", "supcon", "infonce"),
        _ratio("dynamic_ex2_per_element", "sm80", "bf16"),
        "<=",
        1.5,
    ),
    (
        "fp32_instructions",
        "fp32 (tf32x3) / bf16 fwd+bwd dynamic instructions per element (sm90)",
        ("ntxent", "supcon", "infonce"),
        _ratio("dynamic_instructions_per_element", "sm90", "fp32"),
        "<=",
        3,
    ),
]


def evaluate_targets(records: list[dict], rows: list[dict]) -> list[dict]:
    """Each target of :data:`TARGETS` per loss: its value and whether it holds (None when the report lacks a
    record it needs), and the all-rows targets: no spills, shared memory within the limit."""
    index = {(r["arch"], r["dtype"], r["D"], r["loss"]): r for r in records}

    def find(arch, dtype, dim, loss):
        return index[(arch, dtype, dim, loss)]

    results = []
    for target_id, what, losses, value, comparison, limit in TARGETS:
        for loss in losses:
            try:
                number = round(value(find, loss), 3)
            except KeyError:
                number = None
            holds = None if number is None else number <= limit if comparison == "<=" else number >= limit
            results.append(
                dict(
                    id=f"{loss}_{target_id}",
                    what=f"{LOSSES[loss]['title']}: {what} {comparison} {limit}",
                    value=number,
                    holds=holds,
                )
            )
    compiled = [r for r in rows if "error" not in r]
    spilling = [r for r in compiled if r.get("spill_stores") or r.get("spill_loads")]
    over = [r for r in compiled if not r.get("fits")]
    results.append(
        dict(id="no_spills", what="no spills in any config of this report", value=len(spilling), holds=not spilling)
    )
    results.append(
        dict(
            id="shared_memory_fits",
            what="shared memory within the limit in every config of this report",
            value=len(over),
            holds=not over,
        )
    )
    return results
