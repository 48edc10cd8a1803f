"""fastcl.GradCache against the step it replaces, single process (DDP: test_gradcache_ddp.py).

The reference step encodes the same inputs chunk by chunk WITH a graph, from the same RNG state, and calls
``loss.backward()`` once: the memory-hungry computation GradCache must reproduce. Without dropout or
batch statistics it is also compared with one literal full-batch forward. Every registered loss, two
towers where the loss pairs different modalities (InfoNCE, SigLIP), a learnable temperature (SigLIP: a
learnable logit scale and bias), ``sub_dim``, dropout on, an uneven last chunk, gradients accumulated onto
existing ``.grad``: float64 ≤ 1e-10 and float32 ≤ 1e-5 relative (∞-norm, docs/testing.md).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from loss_cases import relative_error
from torch import nn

import fastcl
from fastcl import registry

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
N, CHUNK = 13, 5  # chunks of 5, 5, 3 rows
D_IN = {0: 6, 1: 5}  # the second tower of a two-tower loss reads another modality
D_OUT = 9
TWO_TOWERS = ("info_nce", "siglip")  # CLIP-style pairs: one encoder per input


class Tower(nn.Module):
    def __init__(self, d_in: int, dropout: float, batchnorm: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, 16),
            nn.BatchNorm1d(16) if batchnorm else nn.Identity(),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(16, D_OUT),
        )

    def forward(self, x):
        return self.net(x)


def make_step(name: str, dtype: torch.dtype, sub_dim=None, dropout: float = 0.25, batchnorm: bool = False, seed=0):
    """Fresh, identical (encoders, loss module, loss_fn, inputs, loss kwargs) for each call with the same seed."""
    torch.manual_seed(seed)
    entry = registry.get(name)
    n_towers = 2 if name in TWO_TOWERS else 1
    towers = [Tower(D_IN[t], dropout, batchnorm).to(dtype) for t in range(n_towers)]
    if name == "siglip":
        loss_module = entry.module(
            nn.Parameter(torch.tensor(10.0, dtype=dtype)),
            nn.Parameter(torch.tensor(-10.0, dtype=dtype)),
            sub_dim=sub_dim,
        )
    else:
        tau = nn.Parameter(torch.tensor(entry.default_temperature, dtype=dtype))
        loss_module = entry.module(temperature=tau, sub_dim=sub_dim)
    inputs = [torch.randn(N, D_IN[t if n_towers == 2 else 0], dtype=dtype) for t in range(2)]
    kwargs = {"labels": torch.randint(0, 3, (N,))} if entry.views_input else {}
    if entry.views_input:  # SupCon takes [N, V, D]

        def loss_fn(z1, z2, labels):
            return loss_module(torch.stack([z1, z2], 1), labels)
    else:
        loss_fn = loss_module
    encoders = towers if n_towers == 2 else towers[0]
    return encoders, loss_module, loss_fn, inputs, kwargs


def parameters(encoders, loss_module) -> list[nn.Parameter]:
    modules = encoders if isinstance(encoders, list) else [encoders]
    return [p for m in [*modules, loss_module] for p in m.parameters()]


def reference_step(encoders, loss_fn, inputs, kwargs, chunk=CHUNK, scale=None):
    """Encode chunk by chunk with a graph (chunk=None: the whole batch at once), one backward."""
    towers = encoders if isinstance(encoders, list) else [encoders] * len(inputs)
    embeddings = [torch.cat([tower(c) for c in x.split(chunk or x.shape[0])]) for tower, x in zip(towers, inputs)]
    loss = loss_fn(*embeddings, **kwargs)
    (loss if scale is None else loss * scale).backward()
    return loss.detach()


def assert_same_gradients(actual: list, expected: list, rtol: float) -> None:
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert (a.grad is None) == (b.grad is None), i
        assert relative_error(a.grad, b.grad) <= rtol, (i, tuple(a.shape), relative_error(a.grad, b.grad))


@pytest.mark.parametrize("sub_dim", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_matches_the_chunked_full_step_with_dropout(name, dtype, sub_dim):
    enc_ref, loss_ref, fn_ref, inputs, kwargs = make_step(name, dtype, sub_dim)
    enc_gc, loss_gc, fn_gc, _, _ = make_step(name, dtype, sub_dim)
    params_ref, params_gc = parameters(enc_ref, loss_ref), parameters(enc_gc, loss_gc)
    for p, q in zip(params_ref, params_gc):  # gradients already there: both steps accumulate onto them
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()

    torch.manual_seed(123)
    expected = reference_step(enc_ref, fn_ref, inputs, kwargs)
    rng_after_reference = torch.get_rng_state()
    torch.manual_seed(123)
    actual = fastcl.GradCache(enc_gc, fn_gc, CHUNK)(*inputs, **kwargs)

    assert not actual.requires_grad and actual.dtype == expected.dtype
    assert relative_error(actual, expected, floor=1.0) <= RTOL[dtype]
    assert_same_gradients(params_gc, params_ref, RTOL[dtype])
    assert loss_gc.parameters().__next__().grad is not None  # the loss's own parameter got its gradient
    # The replays leave the RNG where one pass over the chunks leaves it.
    assert torch.equal(torch.get_rng_state(), rng_after_reference)


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_without_randomness_equals_one_full_batch_forward(name):
    enc_ref, loss_ref, fn_ref, inputs, kwargs = make_step(name, torch.float64, dropout=0.0)
    enc_gc, loss_gc, fn_gc, _, _ = make_step(name, torch.float64, dropout=0.0)
    expected = reference_step(enc_ref, fn_ref, inputs, kwargs, chunk=None)
    actual = fastcl.GradCache(enc_gc, fn_gc, CHUNK)(*inputs, **kwargs)
    assert relative_error(actual, expected, floor=1.0) <= 1e-10
    assert_same_gradients(parameters(enc_gc, loss_gc), parameters(enc_ref, loss_ref), 1e-10)


def test_dropout_without_replay_would_differ():
    """The check above is sharp: re-encoding with fresh dropout masks gives other gradients."""
    enc_ref, loss_ref, fn_ref, inputs, kwargs = make_step("nt_xent", torch.float64)
    enc_gc, loss_gc, fn_gc, _, _ = make_step("nt_xent", torch.float64)
    torch.manual_seed(123)
    reference_step(enc_ref, fn_ref, inputs, kwargs)
    torch.manual_seed(123)
    gc = fastcl.GradCache(enc_gc, fn_gc, CHUNK)
    from fastcl import gradcache

    original = gradcache._set_rng_state
    gradcache._set_rng_state = lambda state, devices: None
    try:
        gc(*inputs, **kwargs)
    finally:
        gradcache._set_rng_state = original
    errors = [
        relative_error(a.grad, b.grad) for a, b in zip(parameters(enc_gc, loss_gc), parameters(enc_ref, loss_ref))
    ]
    assert max(errors) > 1e-3


def test_inputs_that_require_grad_get_the_full_step_gradient():
    enc_ref, _, fn_ref, inputs, kwargs = make_step("nt_xent", torch.float64, dropout=0.0)
    enc_gc, _, fn_gc, _, _ = make_step("nt_xent", torch.float64, dropout=0.0)
    x_ref = [x.clone().requires_grad_() for x in inputs]
    x_gc = [x.clone().requires_grad_() for x in inputs]
    reference_step(enc_ref, fn_ref, x_ref, kwargs, chunk=None)
    fastcl.GradCache(enc_gc, fn_gc, CHUNK)(*x_gc, **kwargs)
    assert_same_gradients(x_gc, x_ref, 1e-10)


@pytest.mark.parametrize("chunk", [1, 4, N, 100])
def test_any_chunk_size(chunk):
    enc_ref, loss_ref, fn_ref, inputs, kwargs = make_step("supcon", torch.float64)
    enc_gc, loss_gc, fn_gc, _, _ = make_step("supcon", torch.float64)
    torch.manual_seed(5)
    reference_step(enc_ref, fn_ref, inputs, kwargs, chunk=chunk)
    torch.manual_seed(5)
    fastcl.GradCache(enc_gc, fn_gc, chunk)(*inputs, **kwargs)
    assert_same_gradients(parameters(enc_gc, loss_gc), parameters(enc_ref, loss_ref), 1e-10)


def test_inputs_of_different_sizes_and_a_frozen_tower():
    """One-way InfoNCE with more keys than queries; a locked text tower (LiT) is encoded once, not twice."""
    torch.manual_seed(0)
    image, text = Tower(6, 0.25), Tower(5, 0.0).double()
    image = image.double()
    text.requires_grad_(False)
    calls = []
    text.register_forward_hook(lambda *_: calls.append(1))
    loss_fn = fastcl.InfoNCELoss(temperature=0.1, symmetric=False)
    q, k = torch.randn(7, 6, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    image_ref = copy.deepcopy(image)
    torch.manual_seed(1)
    reference_step([image_ref, text], loss_fn, [q, k], {}, chunk=3)
    calls.clear()
    torch.manual_seed(1)
    fastcl.GradCache([image, text], loss_fn, 3)(q, k)
    assert len(calls) == 4  # ceil(11 / 3) chunks, first pass only
    assert_same_gradients(list(image.parameters()), list(image_ref.parameters()), 1e-10)
    assert all(p.grad is None for p in text.parameters())


def test_progress_reports_every_chunk():
    enc, _, fn, inputs, kwargs = make_step("nt_xent", torch.float64)
    seen = []
    fastcl.GradCache(enc, fn, CHUNK, progress=lambda done, total: seen.append((done, total)))(*inputs, **kwargs)
    assert seen == [(i, 6) for i in range(1, 7)]  # two inputs × 3 chunks


# --------------------------------------------------------------------- BatchNorm


def test_batchnorm_accept_is_per_chunk_statistics_and_warns_once():
    enc_ref, loss_ref, fn_ref, inputs, kwargs = make_step("nt_xent", torch.float64, batchnorm=True)
    enc_gc, loss_gc, fn_gc, _, _ = make_step("nt_xent", torch.float64, batchnorm=True)
    torch.manual_seed(3)
    reference_step(enc_ref, fn_ref, inputs, kwargs)
    gc = fastcl.GradCache(enc_gc, fn_gc, CHUNK)
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="BatchNorm layer"):
        gc(*inputs, **kwargs)
    assert_same_gradients(parameters(enc_gc, loss_gc), parameters(enc_ref, loss_ref), 1e-10)
    bn_ref, bn_gc = enc_ref.net[1], enc_gc.net[1]
    # running statistics updated once per chunk (6 chunks), as the chunked forward with a graph does
    assert int(bn_gc.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 6
    assert relative_error(bn_gc.running_mean, bn_ref.running_mean) <= 1e-12
    assert relative_error(bn_gc.running_var, bn_ref.running_var) <= 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gc(*inputs, **kwargs)  # once per GradCache
        fastcl.GradCache(enc_gc, fn_gc, CHUNK, batchnorm="accept")(*inputs, **kwargs)  # chosen: silent
    # The statistics per chunk are really not the full batch's: the full-batch forward differs.
    enc_full, loss_full, fn_full, _, _ = make_step("nt_xent", torch.float64, batchnorm=True)
    torch.manual_seed(3)
    reference_step(enc_full, fn_full, inputs, kwargs, chunk=None)
    full, chunked = parameters(enc_full, loss_full), parameters(enc_ref, loss_ref)
    assert max(relative_error(a.grad, b.grad) for a, b in zip(full, chunked)) > 1e-3


def test_batchnorm_freeze_uses_running_statistics_and_restores_train_mode():
    enc_ref, loss_ref, fn_ref, inputs, kwargs = make_step("nt_xent", torch.float64, batchnorm=True)
    enc_gc, loss_gc, fn_gc, _, _ = make_step("nt_xent", torch.float64, batchnorm=True)
    enc_ref.net[1].running_mean.uniform_(-1, 1)  # statistics a previous phase of training left
    enc_ref.net[1].running_var.uniform_(0.5, 2)
    enc_gc.net[1].load_state_dict(enc_ref.net[1].state_dict())
    enc_ref.net[1].eval()
    torch.manual_seed(3)
    reference_step(enc_ref, fn_ref, inputs, kwargs)
    before = {k: v.clone() for k, v in enc_gc.net[1].state_dict().items()}
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastcl.GradCache(enc_gc, fn_gc, CHUNK, batchnorm="freeze")(*inputs, **kwargs)
    assert_same_gradients(parameters(enc_gc, loss_gc), parameters(enc_ref, loss_ref), 1e-10)
    assert enc_gc.net[1].training and enc_gc.training
    assert all(torch.equal(v, enc_gc.net[1].state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------- AMP and torch.compile


def test_amp_bf16_with_a_grad_scaler():
    """The step under bf16 autocast with a GradScaler-scaled loss. Each chunk's backward converts its
    bf16 weight gradient to fp32 before it is accumulated, as the reference does with autocast's weight
    cache off (one cast per chunk); with the cache on the reference sums the chunks' weight gradients in
    bf16 instead, which GradCache matches to bf16 resolution."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    steps = {}
    for kind in ("reference", "reference_cached", "gc", "gc_unscaled"):
        encoders, loss_module, loss_fn, inputs, kwargs = make_step("nt_xent", torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=kind != "reference"):
            torch.manual_seed(7)
            if kind.startswith("reference"):
                loss = reference_step(encoders, loss_fn, inputs, kwargs, scale=scaler.get_scale())
            else:
                gc = fastcl.GradCache(encoders, loss_fn, CHUNK, scaler=scaler if kind == "gc" else None)
                loss = gc(*inputs, **kwargs)
        steps[kind] = loss, parameters(encoders, loss_module)
    loss, params = steps["gc"]
    assert loss.dtype == torch.float32 and relative_error(loss, steps["reference"][0], floor=1.0) <= 1e-6
    assert_same_gradients(params, steps["reference"][1], 1e-6)
    assert_same_gradients(params, steps["reference_cached"][1], 2.0**-7)
    # the gradients are scaled: unscaling them gives the unscaled step's
    scaler.unscale_(torch.optim.SGD(params, lr=0.0))
    assert_same_gradients(params, steps["gc_unscaled"][1], 1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_encoder_with_dropout(backend):
    """A compiled encoder: the first pass runs its inference graph, the re-encode its training graph;
    both must draw the same dropout masks from the replayed RNG state."""
    torch._dynamo.reset()
    enc_ref, loss_ref, fn_ref, inputs, kwargs = make_step("nt_xent", torch.float32)
    enc_gc, loss_gc, fn_gc, _, _ = make_step("nt_xent", torch.float32)
    compiled_ref, compiled_gc = torch.compile(enc_ref, backend=backend), torch.compile(enc_gc, backend=backend)
    torch.manual_seed(11)
    expected = reference_step(compiled_ref, fn_ref, inputs, kwargs)
    torch.manual_seed(11)
    actual = fastcl.GradCache(compiled_gc, fn_gc, CHUNK)(*inputs, **kwargs)
    assert relative_error(actual, expected, floor=1.0) <= 1e-5
    assert_same_gradients(parameters(enc_gc, loss_gc), parameters(enc_ref, loss_ref), 1e-5)


# --------------------------------------------------------------------- bad input


def _bad_steps():
    def tuple_encoder(x):
        return (x, x)

    def wrong_rows(x):
        return x[:1]

    def scalar_loss(z1, z2):
        return torch.stack([z1.sum(), z2.sum()])

    return [
        # (encoders, loss_fn, inputs, error, message)
        (tuple_encoder, "ntxent", "xx", TypeError, "encoders: expected the encoder to return a tensor, got tuple"),
        (wrong_rows, "ntxent", "xx", ValueError, "encoders: expected one output row per input row (5"),
        ("two_widths", "ntxent", "xx", ValueError, "loss_fn: rejected the embeddings of shapes (13, 9), (13, 3)"),
        ("tower", lambda z1, z2: (z1**2).sum(), "xx", ValueError, "the embedding of inputs[1]"),
        ("tower", lambda z1, z2: fastcl.NTXentLoss()(z1, z2.detach()), "xx", ValueError, "inputs[1]"),
        ("tower", scalar_loss, "xx", ValueError, "loss_fn: expected a scalar loss, got shape (2,)"),
        ("tower", lambda z1, z2: 1.0, "xx", TypeError, "loss_fn: expected it to return a scalar tensor, got float"),
        ("towers3", "ntxent", "xx", ValueError, "encoders: got 3 encoders for 2 inputs"),
        ("tower", "ntxent", "x", TypeError, "loss_fn: rejected the embeddings of shapes (13, 9): "),
        ("tower", "ntxent", "xs", TypeError, "inputs[1]: expected a torch.Tensor, got list"),
        ("tower", "ntxent", "x0", ValueError, "inputs[1]: expected a tensor with at least one row, got shape (0, 6)"),
    ]


@pytest.mark.parametrize("case", _bad_steps(), ids=lambda c: c[4][:40])
def test_bad_input_is_a_clear_error_and_leaves_gradients_untouched(case):
    encoder_kind, loss_kind, input_kind, error, message = case
    torch.manual_seed(0)
    tower, narrow = Tower(6, 0.25, batchnorm=True).double(), Tower(6, 0.0).double()
    narrow.net[-1] = nn.Linear(16, 3).double()
    encoders = {"tower": tower, "two_widths": [tower, narrow], "towers3": [tower, tower, tower]}.get(
        encoder_kind, encoder_kind
    )
    tau = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    loss_fn = fastcl.NTXentLoss(temperature=tau) if loss_kind == "ntxent" else loss_kind
    x = torch.randn(N, 6, dtype=torch.float64)
    second = {"x": (), "xx": (x.clone(),), "xs": ([1.0],), "x0": (x[:0],)}[input_kind]
    params = [*tower.parameters(), *narrow.parameters(), tau]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params] + [b.clone() for b in tower.buffers()]
    with pytest.raises(error) as raised:
        fastcl.GradCache(encoders, loss_fn, CHUNK, batchnorm="accept")(x, *second)
    assert message in str(raised.value)
    after = [p.grad for p in params] + list(tower.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"chunk_size": 0}, ValueError, "chunk_size: expected a positive int, got 0"),
        ({"chunk_size": -3}, ValueError, "chunk_size: expected a positive int, got -3"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size: expected a positive int, got float 2.5"),
        ({"chunk_size": True}, TypeError, "chunk_size: expected a positive int, got bool True"),
        ({"batchnorm": "sync"}, ValueError, "batchnorm: expected None or one of ['accept', 'freeze'], got 'sync'"),
        ({"loss_fn": 3}, TypeError, "loss_fn: expected a callable, got int"),
        ({"encoders": [nn.Identity(), 2]}, TypeError, "encoders[1]: expected a callable"),
        ({"encoders": []}, ValueError, "encoders: expected one encoder or a non-empty sequence"),
    ],
)
def test_bad_construction_is_a_clear_error(kwargs, error, message):
    arguments = {"encoders": nn.Identity(), "loss_fn": fastcl.NTXentLoss(), "chunk_size": 4, **kwargs}
    with pytest.raises(error) as raised:
        fastcl.GradCache(arguments.pop("encoders"), arguments.pop("loss_fn"), arguments.pop("chunk_size"), **arguments)
    assert message in str(raised.value)


# --------------------------------------------------------------------- CUDA (skipped without a GPU)


def _to(step, device):
    encoders, loss_module, loss_fn, inputs, kwargs = step
    for module in encoders if isinstance(encoders, list) else [encoders]:
        module.to(device)
    loss_module.to(device)
    return encoders, loss_module, loss_fn, [x.to(device) for x in inputs], {k: v.to(device) for k, v in kwargs.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_cuda_dropout_replay_with_the_fused_loss(name):
    """CUDA's generator replayed per chunk (dropout on the GPU), the default (Triton) backend, float32."""
    enc_ref, loss_ref, fn_ref, inputs, kwargs = _to(make_step(name, torch.float32), "cuda")
    enc_gc, loss_gc, fn_gc, _, _ = _to(make_step(name, torch.float32), "cuda")
    torch.manual_seed(123)
    expected = reference_step(enc_ref, fn_ref, inputs, kwargs)
    cuda_after_reference = torch.cuda.get_rng_state()
    torch.manual_seed(123)
    actual = fastcl.GradCache(enc_gc, fn_gc, CHUNK)(*inputs, **kwargs)
    assert relative_error(actual, expected, floor=1.0) <= 1e-5
    assert_same_gradients(parameters(enc_gc, loss_gc), parameters(enc_ref, loss_ref), 1e-5)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_after_reference)


@pytest.mark.gpu
def test_cuda_fp16_autocast_with_a_grad_scaler():
    steps = {}
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for kind in ("reference", "gc"):
        encoders, loss_module, loss_fn, inputs, kwargs = _to(make_step("nt_xent", torch.float32), "cuda")
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=kind != "reference"):
            torch.manual_seed(7)
            if kind == "reference":
                reference_step(encoders, loss_fn, inputs, kwargs, scale=scaler.get_scale())
            else:
                fastcl.GradCache(encoders, loss_fn, CHUNK, scaler=scaler)(*inputs, **kwargs)
        steps[kind] = parameters(encoders, loss_module)
    assert_same_gradients(steps["gc"], steps["reference"], 1e-3)
