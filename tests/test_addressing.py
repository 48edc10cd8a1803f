"""64-bit addressing (docs/kernels.md, "Addressing"): no pointer offset of a shipped kernel can wrap at 2³¹.

- The address check (``fastcl.kernels.compile_only.address_check``, a def-use walk over the TTIR) passes on
  every shipped Triton kernel in every input layout and flags deliberately 32-bit variants.
- The largest sizes the docs promise (M = 4 Mi rows at D' = 128; 1 Mi rows at D' = 4096, column-major):
  every launch the block primitive (every loss's kernel) makes for them goes through kernels the check
  proves 64-bit.
- The kernels themselves read and write rows past 2³¹ elements: the Triton kernels through the interpreter
  (which wraps int32 arithmetic as the GPU does) and the CUDA kernels' host build, on sparse buffers (pages
  nothing writes are never allocated), matching the same rows packed densely.
- On a GPU (``gpu``): NT-Xent forward and backward in bf16 with addresses past 2³¹, against the torch backend.

The TTIR is compiled in a spawned process (Triton compiles there instead of interpreting), for the first
config of each kernel's table: the tile sizes do not change which offsets are 32-bit. The full set, every
config × dtype × D' × architecture, is the compile-only report's ``address_check`` column
(bench/results/compile-*).
"""

from __future__ import annotations

import concurrent.futures
import math
import mmap
import multiprocessing

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastcl.contract import Layout, inverse_norms  # noqa: E402
from fastcl.kernels.compile_only import address_check, init_worker  # noqa: E402

LIMIT = 2**31
# Linux's MAP_NORESERVE: a sparse buffer's address space is not charged against the commit limit.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def in_compiler_process(fn, *args):
    """``fn(*args)`` in a fresh process where Triton compiles instead of interpreting (the report's workers)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=init_worker) as pool:
        return pool.submit(fn, *args).result()


# --- the check on the shipped kernels and on 32-bit variants ------------------------------------------------


def shipped_verdicts(dtype_name: str, precision: str, sub_dim: int) -> list[tuple[str, str, str]]:
    """(kernel, layout, verdict) for every tile and auxiliary kernel in every layout (first config)."""
    from fastcl.kernels import auxiliary_specs, compile_specs
    from fastcl.kernels._common import LAYOUTS
    from fastcl.kernels.compile_only import spec_configs, ttir

    dtype = getattr(torch, dtype_name)
    verdicts = []
    for layout in LAYOUTS:
        for spec in [
            *compile_specs(dtype, precision, sub_dim, layout=layout),
            *auxiliary_specs(dtype, sub_dim, layout),
        ]:
            text = ttir(spec, spec_configs(spec, "sm90", dtype)[0])
            verdicts.append((spec.name, layout, address_check(text)))
    return verdicts


def test_address_check_passes_on_every_shipped_kernel_and_layout():
    """bf16 at D' = 128 (main tiles, even feature chunks) and fp32 tf32x3 at D' = 17 (small tiles, masked
    chunks): every kernel function of kernels/*.py, contiguous, column-major and strided inputs."""
    cases = [("bfloat16", "ieee", 128), ("float32", "tf32x3", 17)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context, initializer=init_worker) as pool:
        verdicts = sum(pool.map(shipped_verdicts, *zip(*cases)), [])
    names = {name for name, _, _ in verdicts}
    assert {
        "block_index_forward",
        "block_labels_anchor",
        "block_mask_forward",
        "block_sigmoid_key",
        "block_normalization_backward",
        "augment_view",
    } <= names
    assert len(verdicts) == 2 * 3 * len(names)
    faults = [v for v in verdicts if v[2] != "ok"]
    assert not faults, faults


@triton.jit
def _rows_times_stride(x_ptr, out_ptr, stride_m, n, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Row i of a strided column: int32 rows × stride (the fault), or int64 rows (WIDE)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if WIDE:
        offsets = rows.to(tl.int64) * stride_m
    else:
        offsets = rows * stride_m
    tl.store(out_ptr + rows, tl.load(x_ptr + offsets, mask=rows < n), mask=rows < n)


@triton.jit
def _widened_too_late(x_ptr, out_ptr, stride_m, n, BLOCK: tl.constexpr):
    """An int32 product widened after it was formed: it has already wrapped."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + rows, tl.load(x_ptr + (rows * stride_m).to(tl.int64), mask=rows < n), mask=rows < n)


@triton.jit
def _stepped_pointer(x_ptr, out_ptr, stride_d, D, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """A pointer advanced by BLOCK features per iteration: BLOCK × stride in int32 (the fault) or int64."""
    d = tl.arange(0, BLOCK)
    if WIDE:
        ptrs = x_ptr + d.to(tl.int64) * stride_d
        step = BLOCK * stride_d.to(tl.int64)
    else:
        ptrs = x_ptr + d * stride_d
        step = BLOCK * stride_d
    total = tl.zeros((BLOCK,), tl.float32)
    for d0 in range(0, D, BLOCK):
        total += tl.load(ptrs, mask=d0 + d < D, other=0.0)
        ptrs += step
    tl.store(out_ptr + d, total)


def variant_verdicts() -> dict[str, str]:
    from fastcl.kernels._common import CompileSpec
    from fastcl.kernels.compile_only import ttir

    x, out = torch.empty(64), torch.empty(64)
    variants = {
        "rows32": (_rows_times_stride, (x, out, 8, 64), dict(BLOCK=16, WIDE=False)),
        "rows64": (_rows_times_stride, (x, out, 8, 64), dict(BLOCK=16, WIDE=True)),
        "widened_late": (_widened_too_late, (x, out, 8, 64), dict(BLOCK=16)),
        "step32": (_stepped_pointer, (x, out, 8, 64), dict(BLOCK=16, WIDE=False)),
        "step64": (_stepped_pointer, (x, out, 8, 64), dict(BLOCK=16, WIDE=True)),
        "unit_stride32": (_rows_times_stride, (x, out, 1, 64), dict(BLOCK=16, WIDE=False)),
    }
    config = triton.Config({}, num_warps=4, num_stages=3)
    return {
        name: address_check(ttir(CompileSpec(name, "launch", fn, args, meta), config))
        for name, (fn, args, meta) in variants.items()
    }


def test_address_check_flags_32_bit_variants():
    """A row index × a runtime stride in int32, the same product widened only afterwards, and a pointer
    stepped by BLOCK × stride in int32 are faults (named with their op and source line); their int64
    forms pass, and so does an int32 index times a stride Triton specialized to 1 (no product remains)."""
    verdicts = in_compiler_process(variant_verdicts)
    for name in ("rows32", "widened_late", "step32"):
        assert verdicts[name].startswith("i32 product reaches tt.addptr: ") and "arith.muli" in verdicts[name]
        assert "test_addressing.py:" in verdicts[name], verdicts[name]
    assert verdicts["rows64"] == verdicts["step64"] == verdicts["unit_stride32"] == "ok", verdicts


def test_address_check_follows_loop_carried_offsets():
    """An offset carried through scf.for iter_args and an scf.if result is traced back to its product."""
    ttir = """
    tt.func public @k(%x: !tt.ptr<f32>, %stride: i32, %n: i32) {
      %c0 = arith.constant 0 : i32
      %c1 = arith.constant 1 : i32
      %pid = tt.get_program_id x : i32
      %step = arith.muli %pid, %stride : i32
      %last = scf.for %i = %c0 to %n step %c1 iter_args(%off = %c0) -> (i32)  : i32 {
        %next = arith.addi %off, %step : i32
        scf.yield %next : i32
      }
      %cond = arith.cmpi slt, %pid, %n : i32
      %pick = scf.if %cond -> (i32) {
        scf.yield %last : i32
      } else {
        scf.yield %c0 : i32
      }
      %p = tt.addptr %x, %pick : !tt.ptr<f32>, i32
      tt.return
    }
    """
    assert address_check(ttir) == "i32 product reaches tt.addptr: %step = arith.muli %pid, %stride : i32"
    assert address_check(ttir.replace("%p = tt.addptr %x, %pick", "%p = tt.addptr %x, %c0")) == "ok"


# --- the sizes the docs promise -------------------------------------------------------------------------

# (loss, rows M, D', column-major): docs/kernels.md, "Addressing".
# Every loss runs the block primitive: index positives (NT-Xent, InfoNCE, DCL, SigLIP) and labels (SupCon).
PROMISED = [
    ("index", 4 * 2**20, 128, False),
    ("index", 2**20, 4096, True),
    ("labels", 4 * 2**20, 128, False),
    ("labels", 2**20, 4096, True),
]


def _meta_rows(shape: tuple, dtype: torch.dtype, column_major: bool) -> torch.Tensor:
    """A meta tensor (no memory) of ``shape`` in the user's layout: row-major, or column-major (features last
    in memory order reversed, as a transposed view)."""
    if column_major:
        return torch.empty(shape[::-1], dtype=dtype, device="meta").permute(*range(len(shape) - 1, -1, -1))
    return torch.empty(shape, dtype=dtype, device="meta")


def _call_ops(positives: str, m: int, d: int, column_major: bool) -> None:
    """Forward and backward of the block primitive on meta tensors of M anchor and key rows, with ``positives``
    ("index" or "labels"), as the engine calls it on an own block (launches are recorded)."""
    from fastcl.kernels import block

    dtype, acc = torch.bfloat16, torch.float32
    tau = torch.tensor(0.1, device="meta")
    a, k = (_meta_rows((m, d), dtype, column_major) for _ in range(2))
    inv = torch.empty(m, dtype=acc, device="meta")
    ids = torch.empty(m, dtype=torch.int64, device="meta")
    fields = dict(pos_index=ids) if positives == "index" else dict(a_labels=ids, k_labels=ids)
    layout = Layout(positives=positives, self_offset=0, **fields)
    lse, _, _ = block.block_forward(a, inv, k, inv, tau, d, layout)
    block.block_backward(a, inv, k, inv, tau, d, layout, lse, lse, lse)


def promised_launch_verdicts() -> dict[str, list[tuple[str, str]]]:
    """Per PROMISED case, (kernel, verdict) for every launch the ops make: each launch is recorded instead of
    run, then compiled to TTIR under the JIT's specialization of its real arguments and checked."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = []

    def record(kernel, *args, grid=None, warmup=False, **kwargs):
        launches.append((kernel, args, kwargs))

    Autotuner.run, JITFunction.run = record, record  # this worker process only
    verdicts = {}
    for loss, m, d, column_major in PROMISED:
        launches.clear()
        _call_ops(loss, m, d, column_major)
        verdicts[f"{loss}-{m}x{d}"] = [_launch_verdict(m, *launch) for launch in launches]
    return verdicts


def _launch_verdict(m: int, kernel, args: tuple, kwargs: dict) -> tuple[str, str]:
    """(kernel name, address check) of one recorded launch, under its autotune table's first config."""
    from triton.runtime.autotuner import Autotuner

    from fastcl.kernels._common import LAUNCH_OPTIONS, CompileSpec
    from fastcl.kernels.compile_only import ttir

    if isinstance(kernel, Autotuner):
        fn, config = kernel.fn, kernel.configs[0]
    else:
        fn, config = kernel, triton.Config(dict(LAUNCH_OPTIONS), num_warps=4, num_stages=3)
    # Integer tensors the host passes hold row, class or positive indices: at most M < 2³¹ of them.
    assert all(x.numel() <= m < LIMIT for x in args if isinstance(x, torch.Tensor) and x.dtype == torch.int32)
    name = getattr(fn, "__name__", None) or fn.fn.__name__
    meta = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    return name, address_check(ttir(CompileSpec(name, "launch", fn, args, meta), config))


def test_promised_sizes_launch_only_64_bit_kernels():
    """The block primitive (index and label positives: every loss's blocks) at M·D' = 2²⁹ (row-major) and
    2³² (column-major) elements: its every launch (forward, both backward kernels, epilogues), compiled for
    the real strides, passes the address check."""
    verdicts = in_compiler_process(promised_launch_verdicts)
    assert len(verdicts) == len(PROMISED)
    for case, launches in verdicts.items():
        assert len(launches) >= 3, (case, launches)
        assert all(verdict == "ok" for _, verdict in launches), (case, launches)


# --- the kernels on rows past 2³¹ elements ------------------------------------------------------------------


def sparse_rows(values: torch.Tensor, strides: tuple) -> torch.Tensor:
    """``values`` written into a view with ``strides`` of a private anonymous mapping as large as the view's
    extent (gigabytes of address space; only the pages the values land on are ever allocated)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(values.shape, strides))
    buffer = mmap.mmap(-1, extent * values.element_size(), flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
    view = torch.frombuffer(buffer, dtype=values.dtype).as_strided(values.shape, strides)
    return view.copy_(values)


def _far(n: int) -> int:
    """A stride that puts index n − 1 past 2³¹ elements."""
    return math.ceil(LIMIT / (n - 1)) + 64


def far_layouts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ([n, d] or [n, V, d]) in two sparse layouts: column-major, the feature stride so large that the last
    features lie past 2³¹ elements; and rows of a buffer so wide that the last rows lie past 2³¹."""
    n, d = x.shape[0], x.shape[-1]
    if x.dim() == 2:
        return sparse_rows(x, (1, _far(d))), sparse_rows(x, (_far(n), 1))
    return sparse_rows(x, (1, n, _far(d))), sparse_rows(x, (_far(n), d, 1))


def assert_same_results(got, want):
    """Equal up to summation order (torch's reductions on strided views may order sums differently; bf16
    results to one rounding): a wrong address reads another element or zeros, and misses by O(1)."""
    for x, y in zip(got, want):
        if isinstance(x, torch.Tensor):
            tolerance = 1e-2 if x.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(x, y, rtol=tolerance, atol=tolerance * y.abs().max().item())


@pytest.fixture
def interpreted(triton_device):
    if triton_device.type != "cpu":
        pytest.skip("the interpreter runs on the CPU")


def test_interpreted_triton_kernels_address_rows_past_2_31(interpreted):
    """The block primitive (index and label positives) and, through the engine (which hands the primitive
    the user's tensors as they are), NT-Xent, InfoNCE and SupCon (labels), forward and backward on
    column-major and wide-row inputs whose last elements lie past 2³¹, bf16, sub_dim < D: the results of
    densely packed copies. The interpreter wraps int32 products like the GPU, so a 32-bit offset reads
    the wrong element or faults."""
    from fastcl import functional
    from fastcl.kernels import block

    generator = torch.Generator().manual_seed(0)
    n, d, sub_dim = 24, 20, 19
    tau = torch.tensor(0.1)
    x, y = (torch.randn(n, d, generator=generator).to(torch.bfloat16) for _ in range(2))
    far_x, far_y = far_layouts(x)[0], far_layouts(y)[1]
    assert far_x.stride(1) * (d - 1) >= LIMIT and far_y.stride(0) * (n - 1) >= LIMIT

    def loss_run(loss, *inputs, **options):
        args = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
        value = getattr(functional, loss)(*args, temperature=0.1, sub_dim=sub_dim, backend="triton", **options)
        return (value, *torch.autograd.grad(value, [t for t in args if t.requires_grad]))

    def block_run(a, k, positives):
        fields = (
            dict(pos_index=torch.arange(n).roll(3))
            if positives == "index"
            else dict(a_labels=torch.arange(n) % 5, k_labels=torch.arange(n) % 5)
        )
        layout = Layout(positives=positives, self_offset=0, **fields)
        a_inv, k_inv = inverse_norms(a, sub_dim), inverse_norms(k, sub_dim)
        stats = block.block_forward(a, a_inv, k, k_inv, tau, sub_dim, layout)
        coefficients = (stats[0], torch.full((n,), 0.5), torch.full((n,), 0.25))
        return (*stats, *block.block_backward(a, a_inv, k, k_inv, tau, sub_dim, layout, *coefficients))

    runs = (
        lambda a, k: loss_run("nt_xent", a, k),
        lambda a, k: loss_run("info_nce", a, k),
        lambda a, k: block_run(a, k, "index"),
        lambda a, k: block_run(a, k, "labels"),
    )
    for run in runs:
        assert_same_results(run(far_x, far_y), run(x, y))

    features = torch.randn(n, 2, d, generator=generator).to(torch.bfloat16)
    labels = torch.arange(n) % 7
    for far in far_layouts(features):
        assert_same_results(loss_run("supcon", far, labels), loss_run("supcon", features, labels))


def test_emulated_cuda_kernels_address_rows_past_2_31():
    """The CUDA kernels' host build (csrc/kernel_emulation.cpp) on column-major anchors and wide-row keys
    whose last elements lie past 2³¹: forward and backward match densely packed copies."""
    from test_csrc_host import kernel_primitive

    generator = torch.Generator().manual_seed(1)
    a, k = (torch.randn(70, 40, generator=generator).to(torch.bfloat16) for _ in range(2))
    far_a, far_k = far_layouts(a)[0], far_layouts(k)[1]
    sub_dim, tau = 33, 0.1
    layout = Layout(positives="labels", self_offset=0, a_labels=torch.arange(70) % 6, k_labels=torch.arange(70) % 6)

    def run(a, k):
        a_inv, k_inv = inverse_norms(a, sub_dim), inverse_norms(k, sub_dim)
        stats = kernel_primitive(a, a_inv, k, k_inv, tau, sub_dim, layout, "bfloat16")
        coefficients = (stats[0], torch.full((70,), 0.5), torch.full((70,), 0.25))
        return (*stats, *kernel_primitive(a, a_inv, k, k_inv, tau, sub_dim, layout, "bfloat16", backward=coefficients))

    assert_same_results(run(far_a, far_k), run(a, k))


# --- on a GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_ntxent_addresses_past_2_31_match_torch_backend_on_gpu():
    """bf16 NT-Xent forward and backward on the GPU with z1 column-major (feature stride ≥ 2³¹/(D − 1): the
    last features lie past 2³¹ elements) and z2 rows of a wide buffer (the last rows past 2³¹), 9 GB of
    buffers, against the torch backend on the same rows (loss and input gradients)."""
    import fastcl.functional

    n, d = 4096, 128
    generator = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(n, d, device="cuda", generator=generator).to(torch.bfloat16) for _ in range(2)]
    z1 = torch.empty(d, _far(d), device="cuda", dtype=torch.bfloat16)[:, :n].T.copy_(base[0])
    z2 = torch.empty(n, _far(n), device="cuda", dtype=torch.bfloat16)[:, :d].copy_(base[1])
    assert z1.stride(1) * (d - 1) >= LIMIT and z2.stride(0) * (n - 1) >= LIMIT
    results = []
    for backend, (u, v) in (("triton", (z1, z2)), ("torch", base)):
        u, v = u.detach().requires_grad_(), v.detach().requires_grad_()
        loss = fastcl.functional.nt_xent(u, v, temperature=0.1, backend=backend)
        loss.backward()
        results.append((loss.float(), u.grad.float(), v.grad.float()))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()), (got - want).abs().max()


@pytest.mark.gpu
def test_ntxent_forward_at_m_times_d_past_2_31_on_gpu():
    """The docs' promise at full size: M = 1 Mi rows (2 × 2¹⁹), D' = 4096, z1 column-major, bf16 (M·D' = 2³²):
    the per-anchor losses ℓ = lse − s_pos of the last 64 rows of each view (their addresses past 2³¹)
    against float32 torch on the same rows. Those rows' positives are copies of them (s = 1/τ = 20), so their
    lse (≈ 20) stands far from any other row's (≈ log M ≈ 14): rows read from a wrapped address would miss."""
    import fastcl.functional

    n, d, tau = 2**19, 4096, 0.05
    generator = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(d, n, device="cuda", generator=generator, dtype=torch.bfloat16).T
    z2 = torch.randn(n, d, device="cuda", generator=generator, dtype=torch.bfloat16)
    z2[n - 64 :] = z1[n - 64 :]
    terms = fastcl.functional.nt_xent(z1, z2, tau, backend="triton", reduction="none").reshape(-1)
    rows = torch.cat([torch.arange(n - 64, n), torch.arange(2 * n - 64, 2 * n)]).cuda()
    stacked = lambda index: torch.where(index[:, None] < n, z1[index % n], z2[index % n])  # noqa: E731
    anchors = torch.nn.functional.normalize(stacked(rows).float(), dim=1)
    positives = torch.nn.functional.normalize(stacked((rows + n) % (2 * n)).float(), dim=1)
    sums = torch.zeros(len(rows), device="cuda")
    chunk = 65536
    for start in range(0, 2 * n, chunk):
        columns = torch.arange(start, start + chunk, device="cuda")
        s = anchors @ torch.nn.functional.normalize(stacked(columns).float(), dim=1).T / tau
        s[rows[:, None] == columns[None, :]] = float("-inf")
        sums += torch.exp(s - 1 / tau).sum(1)  # s ≤ 1/τ: no overflow
    lse = torch.log(sums) + 1 / tau
    assert (lse > 19).all()
    expected = lse - (anchors * positives).sum(1) / tau
    assert torch.allclose(terms[rows], expected, rtol=0, atol=1e-3), (terms[rows] - expected).abs().max()
