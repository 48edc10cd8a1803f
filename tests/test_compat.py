"""fastcl.compat: every peer swap gives the peer's loss and gradients (float64, ≤ 1e-9 relative).

The peers are pytorch-metric-learning itself (installed), open_clip 3.3.0's own ``loss.py`` (kept in
``tests/peers``: the package cannot be imported next to this torch) and, for the others,
transcriptions of the peer's own code below, each naming its file: they
follow the peer line by line (its N×N logits, its masks, its reductions) and share nothing with fastcl.
SupContrast's transcription is the one in ``test_parity.py``. The DDP behaviour of the lightly and
open_clip flags is tested in ``test_compat_ddp.py`` with these same peers.
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from loss_cases import Result, assert_no_worse_than_naive, relative_error
from peers import open_clip_loss as open_clip_peer
from pytorch_metric_learning import losses as pml_losses
from test_parity import supcontrast as supcontrast_reference
from torch import Tensor, nn

import fastcl
from fastcl.compat import directclr, inf_cl, lightly, open_clip, pml, solo_learn, supcontrast

RTOL = 1e-9
TAUS = (0.01, 0.1, 1.0)


def rows(*shape, seed: int, scale: bool = True) -> Tensor:
    """Float64 random rows with varied norms (the peers that normalize must do it themselves)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x * (torch.rand(*shape[:-1], 1, generator=gen, dtype=torch.float64) * 3 + 0.1) if scale else x


def evaluate(fn, inputs):
    leaves = [
        x.detach().clone().requires_grad_() if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs
    ]
    loss = fn(*leaves)
    wrt = [x for x in leaves if isinstance(x, Tensor) and x.requires_grad]
    if not loss.requires_grad:
        return loss.detach(), [torch.zeros_like(x) for x in wrt]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]


def assert_same(ours, theirs, *inputs, rtol: float = RTOL) -> Tensor:
    """Loss and the gradient of every floating input agree; returns the loss."""
    (loss, grads), (expected, expected_grads) = evaluate(ours, inputs), evaluate(theirs, inputs)
    assert loss.dtype == expected.dtype
    assert relative_error(loss, expected) <= rtol, (loss.item(), expected.item())
    for g, h in zip(grads, expected_grads):
        assert torch.isfinite(g).all() and relative_error(g, h) <= rtol
    return loss


# --- transcriptions of the peers' code ----------------------------------------------------------------


class _LightlyGatherLayer(torch.autograd.Function):
    """lightly/utils/dist.py ``GatherLayer`` (lightly 1.6.0)."""

    @staticmethod
    def forward(ctx, x):
        output = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(output, x)
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads):
        all_gradients = torch.stack(grads)
        dist.all_reduce(all_gradients)
        return all_gradients[dist.get_rank()]


def lightly_reference(out0, out1, temperature=0.5, gather_distributed=False):
    """lightly ``NTXentLoss.forward`` with ``memory_bank_size=0`` (lightly 1.6.0, lightly/loss/ntx_ent_loss.py)."""
    batch_size, _ = out0.shape
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if gather_distributed and world > 1:
        out0_large = torch.cat(_LightlyGatherLayer.apply(out0), 0)
        out1_large = torch.cat(_LightlyGatherLayer.apply(out1), 0)
        rank = dist.get_rank()
        diag_mask = torch.zeros(batch_size, batch_size * world, dtype=torch.bool)
        diag_mask[:, rank * batch_size : (rank + 1) * batch_size] = torch.eye(batch_size, dtype=torch.bool)
    else:
        out0_large, out1_large = out0, out1
        diag_mask = torch.eye(batch_size, dtype=torch.bool)
    logits_00 = torch.einsum("nc,mc->nm", out0, out0_large) / temperature
    logits_01 = torch.einsum("nc,mc->nm", out0, out1_large) / temperature
    logits_10 = torch.einsum("nc,mc->nm", out1, out0_large) / temperature
    logits_11 = torch.einsum("nc,mc->nm", out1, out1_large) / temperature
    logits_00 = logits_00[~diag_mask].view(batch_size, -1)
    logits_11 = logits_11[~diag_mask].view(batch_size, -1)
    logits = torch.cat([torch.cat([logits_01, logits_00], dim=1), torch.cat([logits_10, logits_11], dim=1)], dim=0)
    labels = torch.arange(batch_size, dtype=torch.long)
    if gather_distributed:
        labels = labels + (dist.get_rank() if dist.is_initialized() else 0) * batch_size
    return nn.CrossEntropyLoss(reduction="mean")(logits, labels.repeat(2))


def lightly_dcl_reference(out0, out1, temperature=0.1, weight_fn=None, gather_distributed=False):
    """lightly ``DCLLoss.forward`` and ``_loss`` (lightly 1.6.0, lightly/loss/dcl_loss.py)."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if gather_distributed and world > 1:
        out0_all = torch.cat(_LightlyGatherLayer.apply(out0), 0)
        out1_all = torch.cat(_LightlyGatherLayer.apply(out1), 0)
    else:
        out0_all, out1_all = out0, out1

    def one_way(out0, out1, out0_all, out1_all):
        batch_size = out0.shape[0]
        if gather_distributed and world > 1:
            rank = dist.get_rank()
            diag_mask = torch.zeros(batch_size, batch_size * world, dtype=torch.bool)
            diag_mask[:, rank * batch_size : (rank + 1) * batch_size] = torch.eye(batch_size, dtype=torch.bool)
        else:
            diag_mask = torch.eye(batch_size, dtype=torch.bool)
        sim_00 = torch.einsum("nc,mc->nm", out0, out0_all) / temperature
        sim_01 = torch.einsum("nc,mc->nm", out0, out1_all) / temperature
        positive_loss = -sim_01[diag_mask]
        if weight_fn:
            positive_loss = positive_loss * weight_fn(out0, out1)
        sim_00 = sim_00[~diag_mask].view(batch_size, -1)
        sim_01 = sim_01[~diag_mask].view(batch_size, -1)
        negative_loss = torch.logsumexp(torch.cat([sim_00, sim_01], dim=1), dim=1)
        return (positive_loss + negative_loss).mean()

    return 0.5 * (one_way(out0, out1, out0_all, out1_all) + one_way(out1, out0, out1_all, out0_all))


def lightly_mises_fisher_weights(out0, out1, sigma=0.5):
    """lightly ``negative_mises_fisher_weights`` (lightly/loss/dcl_loss.py)."""
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return (2 - out0.shape[0] * nn.functional.softmax(similarity, dim=0)).clone().detach()


class LightlyMemoryBank(nn.Module):
    """lightly ``MemoryBankModule`` with ``size=(num_features, dim)`` (lightly 1.6.0,
    lightly/models/modules/memory_bank.py, ``feature_dim_first=True``; under ``gather_distributed`` the
    batch is enqueued through lightly.models.utils ``concat_all_gather``)."""

    def __init__(self, size, gather_distributed=False):
        super().__init__()
        self.size, self.gather_distributed = size, gather_distributed
        self.register_buffer("bank", torch.empty(size=size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        self.bank = torch.randn(size).type_as(self.bank)
        self.bank = torch.nn.functional.normalize(self.bank, dim=-1)
        self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    def forward(self, output, update=False):
        bank = self.bank.clone().detach().transpose(0, -1)
        if update:
            with torch.no_grad():
                batch = output
                if self.gather_distributed and dist.is_initialized() and dist.get_world_size() > 1:
                    gathered = [torch.ones_like(batch) for _ in range(dist.get_world_size())]  # concat_all_gather
                    dist.all_gather(gathered, batch, async_op=False)
                    batch = torch.cat(gathered, dim=0)
                batch_size, ptr = batch.shape[0], int(self.bank_ptr)
                if ptr + batch_size >= self.size[0]:
                    self.bank[ptr:] = batch[: self.size[0] - ptr].detach()
                    self.bank_ptr.zero_()
                else:
                    self.bank[ptr : ptr + batch_size] = batch.detach()
                    self.bank_ptr[0] = ptr + batch_size
        return output, bank


def lightly_bank_reference(memory_bank, out0, out1, temperature):
    """lightly ``NTXentLoss.forward`` with a memory bank (lightly 1.6.0, lightly/loss/ntx_ent_loss.py)."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    out1, negatives = memory_bank(out1, update=out0.requires_grad)
    sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
    sim_neg = torch.einsum("nc,ck->nk", out0, negatives)
    logits = torch.cat([sim_pos, sim_neg], dim=1) / temperature
    return nn.CrossEntropyLoss(reduction="mean")(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def solo_reference(z, indexes, temperature=0.1, gather=lambda x: x, rank=0):
    """solo-learn ``simclr_loss_func`` on its main branch (vturrisi/solo-learn, solo/losses/simclr.py):
    this rank's rows against ``gather(z)`` of every rank (solo/utils/misc.py ``gather``, the identity on
    one process), the mean over this rank's rows."""
    z = F.normalize(z, dim=-1)
    gathered_z = gather(z)
    sim = torch.exp(torch.einsum("if, jf -> ij", z, gathered_z) / temperature)
    gathered_indexes = gather(indexes)
    indexes = indexes.unsqueeze(0)
    gathered_indexes = gathered_indexes.unsqueeze(0)
    pos_mask = indexes.t() == gathered_indexes
    pos_mask[:, z.size(0) * rank :].fill_diagonal_(0)
    neg_mask = indexes.t() != gathered_indexes
    pos = torch.sum(sim * pos_mask, 1)
    neg = torch.sum(sim * neg_mask, 1)
    return -(torch.mean(torch.log(pos / (pos + neg))))


def inf_cl_reference(q, k, labels=None, scale=None):
    """Inf-CL ``cal_flash_loss`` / ``_cal_flash_loss`` (inf_cl 1.2.1, inf_cl/flash.py): its Triton
    log-sum-exp is ``log Σ_j exp(q_i · k_j)``; returns the per-row losses."""
    if labels is None:
        labels = torch.arange(q.shape[0])
    q = (1.0 if scale is None else scale) * q
    lse = torch.logsumexp(q @ k.T, dim=1)
    numerator = torch.einsum("md,md->m", q, k[labels])
    return -numerator + lse


def directclr_reference(nn_, p, temperature=0.1):
    """DirectCLR ``infoNCE`` (facebookresearch/directclr, directclr/main.py), one process."""
    nn_, p = F.normalize(nn_, dim=1), F.normalize(p, dim=1)
    logits = nn_ @ p.T
    logits /= temperature
    return F.cross_entropy(logits, torch.arange(0, p.shape[0], dtype=torch.long))


# --- SupContrast ------------------------------------------------------------------------------------


def _supcontrast_theirs(contrast_mode, tau, base, **targets):
    def theirs(features):
        flat = features.reshape(features.shape[0], features.shape[1], -1)  # SupContrast's view(bsz, n_views, -1)
        return supcontrast_reference(
            flat, **targets, temperature=tau, contrast_mode=contrast_mode, base_temperature=base
        )

    return theirs


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize(
    "n, views, targets, mode",
    [
        (7, 2, "labels", "all"),
        (13, 3, "labels", "one"),
        (9, 1, "labels", "all"),
        (11, 1, "mask", "all"),
        (8, 2, "soft", "all"),
        (10, 3, "soft", "one"),
        (6, 2, None, "all"),
        (5, 1, None, "all"),
    ],
)
def test_supcontrast_values_and_gradients(n, views, targets, mode, tau):
    """Raw (unnormalized) features; V = 1 with singleton labels and masks with empty rows give anchors
    without positives (averaged in as 0); soft masks weight the positives."""
    gen = torch.Generator().manual_seed(n * 7 + views)
    features = rows(n, views, 17, seed=n + views)
    features = features / features.norm(dim=-1).max()  # norms ≤ 1: SupContrast's max shift stays finite in float64
    kw = {}
    if targets == "labels":
        kw["labels"] = torch.randint(0, max(2, n // 2), (n,), generator=gen)
    elif targets == "mask":
        mask = (torch.rand(n, n, generator=gen) < 0.3).double()
        mask[0] = 0  # an anchor without positives
        kw["mask"] = mask
    elif targets == "soft":
        # Weights in multiples of 1/8: SupContrast sums them in float32, exactly for these.
        kw["mask"] = torch.randint(0, 9, (n, n), generator=gen).double() / 8 * (torch.rand(n, n, generator=gen) < 0.6)
    base = 0.07 if tau != 1.0 else 0.5
    loss_fn = supcontrast.SupConLoss(tau, mode, base)
    assert_same(lambda f: loss_fn(f, **kw), _supcontrast_theirs(mode, tau, base, **kw), features)


def test_supcontrast_anchors_without_positives_count_zero():
    """The issue's case: V = 1 with singleton classes; fastcl's core drops those anchors, SupContrast
    (and the compat class) average their zeros in."""
    features = F.normalize(rows(4, 1, 6, seed=8), dim=2)
    labels = torch.tensor([0, 1, 1, 2])
    ours = supcontrast.SupConLoss(0.1)(features, labels)
    assert relative_error(ours, supcontrast_reference(features, labels, temperature=0.1)) <= RTOL
    core = fastcl.SupConLoss(temperature=0.1, base_temperature=0.07)(features, labels)
    assert relative_error(ours, core / 2) <= RTOL  # 2 of 4 anchors have a positive


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([[0], [1], [0], [2], [1], [2], [0]]),  # [N, 1]
        torch.tensor([0.5, 1.5, 0.5, -2.0, 1.5, -2.0, 0.5]),  # float
    ],
)
def test_supcontrast_label_shapes_and_dtypes(labels):
    features = rows(7, 2, 2, 3, seed=3)  # [N, V, 2, 3]: flattened to D = 6
    loss_fn = supcontrast.SupConLoss(0.2, "all", 0.07)
    assert_same(lambda f: loss_fn(f, labels), _supcontrast_theirs("all", 0.2, 0.07, labels=labels), features)


def test_supcontrast_signature_and_errors():
    params = list(inspect.signature(supcontrast.SupConLoss).parameters)
    assert params == ["temperature", "contrast_mode", "base_temperature"]
    assert [p.default for p in inspect.signature(supcontrast.SupConLoss).parameters.values()] == [0.07, "all", 0.07]
    assert list(inspect.signature(supcontrast.SupConLoss.forward).parameters) == ["self", "features", "labels", "mask"]
    loss_fn = supcontrast.SupConLoss(0.1, "one", 0.2)  # positional, SupContrast's order
    assert (loss_fn.temperature, loss_fn.contrast_mode, loss_fn.base_temperature) == (0.1, "one", 0.2)
    with pytest.raises(ValueError, match="features"):
        loss_fn(torch.randn(4, 8))
    with pytest.raises(ValueError, match="labels, mask"):
        loss_fn(torch.randn(4, 2, 8), torch.arange(4), torch.eye(4))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(4, 2, 8), torch.arange(5))
    with pytest.raises(ValueError, match="contrast_mode"):
        supcontrast.SupConLoss(0.1, "both")(torch.randn(4, 2, 8), torch.arange(4))


@pytest.mark.parametrize("mode, views, tau", [("all", 2, 0.1), ("one", 3, 0.01), ("all", 1, 1.0)])
def test_supcontrast_mask_gets_the_peers_gradient(mode, views, tau):
    """A learnable (soft) mask: SupContrast differentiates its loss with respect to it; so does the
    compat loss. SupContrast's ``mask.float()`` rounds that gradient to float32 and sums the weights in
    float32 (module docstring), hence the 1e-6; an anchor whose weights sum to 0 (row 0) takes
    SupContrast's guard."""
    n = 7
    features = rows(n, views, 9, seed=views)
    features = features / features.norm(dim=-1).max()
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(n, n, generator=gen, dtype=torch.float64) * (torch.rand(n, n, generator=gen) < 0.7)
    mask[0] = 0
    grads = []
    for loss_fn in (
        lambda f, m: supcontrast.SupConLoss(tau, mode, 0.07)(f, mask=m),
        lambda f, m: supcontrast_reference(f, mask=m, temperature=tau, contrast_mode=mode),
    ):
        f, m = features.clone().requires_grad_(), mask.clone().requires_grad_()
        loss = loss_fn(f, m)
        loss.backward()
        grads.append((loss.detach(), f.grad, m.grad))
    (loss, d_features, d_mask), (expected, expected_features, expected_mask) = grads
    assert relative_error(loss, expected) <= 1e-6 and relative_error(d_features, expected_features) <= 1e-6
    assert d_mask.dtype == torch.float64 and relative_error(d_mask, expected_mask) <= 1e-6


def test_supcontrast_float32_small_temperature_stays_finite():
    """SupContrast's row-max shift includes the self logit: with four rows at pairwise cos −1/3 and
    τ = 0.01, every other exp underflows in float32 and its loss is NaN. The compat loss is finite and
    equals SupContrast's float64 value."""
    tetrahedron = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float32) / math.sqrt(3)
    features = tetrahedron.view(2, 2, 3)
    assert not torch.isfinite(supcontrast_reference(features, temperature=0.01))
    ours = supcontrast.SupConLoss(0.01)(features)
    exact = supcontrast_reference(features.double(), temperature=0.01)
    assert torch.isfinite(ours) and relative_error(ours, exact) <= 1e-5


# --- open_clip --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_shape", [(), (1,), None], ids=["0-dim", "[1]", "float"])
@pytest.mark.parametrize("n, d, tau", [(7, 17, 0.01), (16, 3, 0.07), (5, 32, 1.0)])
def test_open_clip_values_and_gradients(n, d, tau, scale_shape):
    img, txt = F.normalize(rows(n, d, seed=n), dim=1), F.normalize(rows(n, d, seed=n + 1), dim=1)
    scale = 1 / tau if scale_shape is None else torch.full(scale_shape, 1 / tau, dtype=torch.float64)
    loss_fn = open_clip.ClipLoss()
    ours = assert_same(loss_fn, open_clip_peer.ClipLoss(), img, txt, scale)
    assert torch.equal(loss_fn(img, txt, scale, output_dict=True)["contrastive_loss"], ours)


@pytest.mark.parametrize("shape", [(), (1,), None], ids=["0-dim", "[1]", "float"])
@pytest.mark.parametrize("n, d, scale, bias", [(7, 17, 10.0, -10.0), (16, 3, 100.0, 0.5), (5, 32, 1.0, None)])
def test_open_clip_siglip(n, d, scale, bias, shape):
    """Logit scale and bias at call time (their gradients flow), no bias, odd shapes."""
    img, txt = F.normalize(rows(n, d, seed=n), dim=1), F.normalize(rows(n, d, seed=n + 1), dim=1)

    def as_input(v):
        return v if shape is None or v is None else torch.full(shape, v, dtype=torch.float64)

    inputs = [img, txt, as_input(scale), as_input(bias)]
    ours = assert_same(open_clip.SigLipLoss(), open_clip_peer.SigLipLoss(), *inputs)
    assert torch.equal(open_clip.SigLipLoss()(*inputs, output_dict=True)["contrastive_loss"], ours)
    with pytest.raises(ValueError, match="dist_impl"):
        open_clip.SigLipLoss(dist_impl="ring")


def test_open_clip_logit_scale_at_call_time_every_step():
    """CLIP training: one loss module, a logit-scale parameter exponentiated at every step."""
    logit_scale = nn.Parameter(torch.ones([1], dtype=torch.float64) * math.log(1 / 0.07))
    loss_fn = open_clip.ClipLoss()
    for step in range(3):
        img, txt = F.normalize(rows(6, 8, seed=step), dim=1), F.normalize(rows(6, 8, seed=step + 9), dim=1)
        logit_scale.grad = None
        loss_fn(img, txt, logit_scale.exp()).backward()
        ours = logit_scale.grad.clone()
        logit_scale.grad = None
        open_clip_peer.ClipLoss()(img, txt, logit_scale.exp()).backward()
        assert relative_error(ours, logit_scale.grad) <= RTOL


# open_clip's signatures, recorded from src/open_clip/loss.py of every open_clip_torch release since 2.20
# (2.20.0, 2.22.0–2.29.0, 2.30.0–2.31.0, 2.32.0, 3.0.0–3.3.0; the wheels' own files) and, for the head,
# from open_clip PR #1145 (``chunk_size`` appended to SigLipLoss.__init__, default 0).
_CLIP_INIT = "local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1, use_horovod=False"
OPEN_CLIP_SIGNATURES = {
    "2.20": {"ClipLoss.forward": "image_features, text_features, logit_scale, output_dict=False"},
    "2.22": {
        "ClipLoss.forward": "image_features, text_features, logit_scale, output_dict=False",
        "SigLipLoss": "cache_labels=False, rank=0, world_size=1, bidir=True, use_horovod=False",
    },
    "2.30": {"SigLipLoss": "cache_labels=False, rank=0, world_size=1, dist_impl=None"},
    "2.32": {"ClipLoss.forward": "image_features, text_features, logit_scale, logit_bias=None, output_dict=False"},
    "3.3": {
        "ClipLoss": _CLIP_INIT,
        "ClipLoss.forward": "image_features, text_features, logit_scale, logit_bias=None, output_dict=False",
        "SigLipLoss": "cache_labels=False, rank=0, world_size=1, dist_impl=None",
        "SigLipLoss.forward": "image_features, text_features, logit_scale, logit_bias, output_dict=False",
    },
    "head": {"SigLipLoss": "cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=0"},
}


def _parameters(text: str) -> list[tuple[str, object]]:
    """("name", default or inspect.Parameter.empty) of a recorded parameter list."""
    out = []
    for item in text.split(", "):
        name, _, default = item.partition("=")
        out.append((name, eval(default) if default else inspect.Parameter.empty))
    return out


def _ours(name: str) -> list[tuple[str, object, object]]:
    cls, _, method = name.partition(".")
    fn = getattr(getattr(open_clip, cls), method) if method else getattr(open_clip, cls)
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    return [(p.name, p.default, p.kind) for p in params]


@pytest.mark.parametrize("version", list(OPEN_CLIP_SIGNATURES))
def test_open_clip_signatures_of_every_release(version):
    """Today's (3.3 and head) signatures are ours exactly, positional order included; an older
    release's call forms bind to ours: its positional prefix where today's agrees, every keyword."""
    for name, text in OPEN_CLIP_SIGNATURES[version].items():
        theirs = _parameters(text)
        ours = {p: (default, kind) for p, default, kind in _ours(name)}
        for param, default in theirs:
            assert param in ours, (version, name, param)
            # 2.2x's SigLipLoss(bidir=True) is ours with bidir=None: dist_impl's default, "bidir".
            assert ours[param][0] == default or (param, ours[param][0]) == ("bidir", None), (version, name, param)
        if version in ("3.3", "head"):
            positional = [(p, d) for p, d, kind in _ours(name) if kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
            assert positional[: len(theirs)] == theirs, (version, name)
            if version == "head" or name != "SigLipLoss":
                assert len(positional) == len(theirs), (version, name)


def test_open_clip_call_forms():
    """open_clip's own calls: ``loss(**model_out, output_dict=True)`` with and without a bias, the
    five-argument call, ``logit_bias=`` as a keyword; SigLIP's 2.2x ``bidir`` positionally and as a
    keyword, ``chunk_size`` (any value, the same loss)."""
    img, txt = F.normalize(rows(6, 8, seed=1), dim=1), F.normalize(rows(6, 8, seed=2), dim=1)
    scale, bias = torch.tensor(14.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    expected = open_clip_peer.ClipLoss()(img, txt, scale)
    model_out = {"image_features": img, "text_features": txt, "logit_scale": scale}
    for call in (
        lambda loss: loss(**model_out, output_dict=True)["contrastive_loss"],
        lambda loss: loss(**model_out, logit_bias=bias, output_dict=True)["contrastive_loss"],
        lambda loss: loss(img, txt, scale, bias, True)["contrastive_loss"],
        lambda loss: loss(img, txt, scale, logit_bias=bias),
        lambda loss: loss(img, txt, scale, None, False),
    ):
        assert relative_error(call(open_clip.ClipLoss()), expected) <= RTOL
        assert relative_error(call(open_clip_peer.ClipLoss()), expected) <= RTOL
    siglip = open_clip_peer.SigLipLoss()(img, txt, scale, bias)
    for loss_fn in (
        open_clip.SigLipLoss(False, 0, 1, True),
        open_clip.SigLipLoss(bidir=False),
        open_clip.SigLipLoss(chunk_size=4),
        open_clip.SigLipLoss(False, 0, 1, "gather", 512),
    ):
        assert relative_error(loss_fn(img, txt, scale, bias), siglip) <= RTOL
    assert open_clip.SigLipLoss(bidir=False).dist_impl == "shift"
    with pytest.raises(ValueError, match="chunk_size"):
        open_clip.SigLipLoss(chunk_size=-1)
    with pytest.raises(NotImplementedError, match="use_horovod"):
        open_clip.SigLipLoss(use_horovod=True)


@pytest.mark.parametrize("scale", [0.0, -3.0], ids=["zero", "negative"])
def test_open_clip_any_logit_scale(scale):
    """open_clip multiplies the logits by whatever scale it is given: 0 (loss log N) and negative
    scales work there, so they work here, with the scale's gradient."""
    img, txt = F.normalize(rows(5, 4, seed=3), dim=1), F.normalize(rows(5, 4, seed=4), dim=1)
    s, b = torch.tensor(scale, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    assert_same(open_clip.ClipLoss(), open_clip_peer.ClipLoss(), img, txt, s)
    assert_same(open_clip.SigLipLoss(), open_clip_peer.SigLipLoss(), img, txt, s, b)
    assert relative_error(open_clip.ClipLoss()(img, txt, scale), open_clip_peer.ClipLoss()(img, txt, scale)) <= RTOL


def test_open_clip_logit_bias_gradient_is_exactly_zero():
    """A bias on every logit of a softmax: the same loss, an exact zero gradient (open_clip's is
    rounding noise around 0), the other gradients unchanged."""
    img, txt = F.normalize(rows(7, 5, seed=5), dim=1), F.normalize(rows(7, 5, seed=6), dim=1)
    scale = torch.tensor(20.0, dtype=torch.float64)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    loss = open_clip.ClipLoss()(img, txt, scale, bias)
    loss.backward()
    assert bias.grad is not None and bias.grad.item() == 0.0
    theirs = open_clip_peer.ClipLoss()(img, txt, scale, bias.detach())
    assert relative_error(loss.detach(), theirs) <= RTOL


def test_key_logsumexp_on_the_block_primitive():
    """The per-anchor log-sum-exp the compat layer takes from the block primitive (lightly's bank,
    Inf-CL's per-row losses): values and gradients in the anchors, the keys and τ against float64
    autograd of ``logsumexp(a kᵀ / τ)``, with per-anchor upstream gradients, odd shapes, τ = 0.01."""
    from fastcl.compat._common import key_logsumexp

    a, k = rows(7, 5, seed=1, scale=False) / 3, rows(13, 5, seed=2, scale=False) / 3
    upstream = rows(7, 1, seed=3).squeeze(1)

    def ours(a, k, tau):
        return (key_logsumexp(a, k, tau) * upstream).sum()

    def theirs(a, k, tau):
        return (torch.logsumexp(a @ k.T / tau, dim=1) * upstream).sum()

    assert_same(ours, theirs, a, k, torch.tensor(0.01, dtype=torch.float64))


# --- lightly ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d, tau", [(1, 5, 0.5), (2, 3, 0.01), (9, 17, 0.1), (16, 64, 1.0)])
def test_lightly_values_and_gradients(n, d, tau):
    """Raw rows (lightly normalizes inside); N = 1 is lightly's exact 0 with zero gradients."""
    loss_fn = lightly.NTXentLoss(tau)
    ours = assert_same(loss_fn, lambda a, b: lightly_reference(a, b, tau), rows(n, d, seed=n), rows(n, d, seed=n + 3))
    if n == 1:
        assert ours.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lightly_one_pair_has_exactly_zero_gradients(dtype):
    """One pair at τ = 0.01: lightly's cross-entropy over a single logit is exactly 0 with exactly zero
    gradients in any dtype; so is the compat loss (not rounding noise)."""
    out0, out1 = (rows(1, 16, seed=s).to(dtype).requires_grad_() for s in (1, 2))
    loss = lightly.NTXentLoss(0.01)(out0, out1)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == dtype
    assert torch.count_nonzero(out0.grad) == 0 and torch.count_nonzero(out1.grad) == 0
    theirs0, theirs1 = (x.detach().clone().requires_grad_() for x in (out0, out1))
    lightly_reference(theirs0, theirs1, 0.01).backward()
    assert torch.count_nonzero(theirs0.grad) == 0 and torch.count_nonzero(theirs1.grad) == 0


@pytest.mark.parametrize("weights", [None, "mises-fisher", "with-grad"])
@pytest.mark.parametrize("n, d, tau", [(2, 3, 0.01), (9, 17, 0.1), (16, 8, 1.0)])
def test_lightly_dcl(n, d, tau, weights):
    """DCL and DCLW; a weight_fn with gradients (lightly's docstring example) differentiates through it."""
    weight_fn = {
        None: None,
        "mises-fisher": lightly_mises_fisher_weights,
        "with-grad": lambda a, b: torch.sum((a - b) ** 2, dim=1),
    }[weights]
    ours = lightly.DCLWLoss(tau, sigma=0.5) if weights == "mises-fisher" else lightly.DCLLoss(tau, weight_fn)
    a, b = rows(n, d, seed=n), rows(n, d, seed=n + 1)
    assert_same(ours, lambda a, b: lightly_dcl_reference(a, b, tau, weight_fn), a, b)
    with pytest.raises(ValueError, match="out0"):
        ours(rows(1, d, seed=0), rows(1, d, seed=1))  # lightly: −inf (no negatives)


@pytest.mark.parametrize("tau", [0.01, 0.2])
def test_lightly_memory_bank(tau):
    """MoCo-style negatives: the same bank from the same seed, the same loss and gradients at every
    step, the same queue after each (wrapping around at 23 entries with batches of 5), no update
    when out0 does not require grad."""
    torch.manual_seed(7)
    theirs = LightlyMemoryBank((23, 6)).double()
    torch.manual_seed(7)
    ours = lightly.NTXentLoss(tau, (23, 6)).double()
    assert torch.equal(ours.bank, theirs.bank)
    for step in range(6):
        out0, out1 = rows(5, 6, seed=step), rows(5, 6, seed=step + 10)
        assert_same(ours, lambda a, b: lightly_bank_reference(theirs, a, b, tau), out0, out1)
        assert torch.equal(ours.bank, theirs.bank) and int(ours.bank_ptr) == int(theirs.bank_ptr)
    frozen = ours.bank.clone()
    loss = ours(out0, out1)  # out0 does not require grad: evaluation, the bank stays
    assert torch.equal(ours.bank, frozen)
    assert relative_error(loss, lightly_bank_reference(theirs, out0, out1, tau)) <= RTOL


def test_lightly_signature_and_options():
    params = inspect.signature(lightly.NTXentLoss).parameters
    assert list(params) == ["temperature", "memory_bank_size", "gather_distributed"]
    assert [p.default for p in params.values()] == [0.5, 0, False]
    with pytest.raises(ValueError, match="memory_bank_size"):
        lightly.NTXentLoss(0.1, 4096)  # lightly 1.6 needs (num_features, dim)
    with pytest.raises(ValueError, match="memory_bank_size"):
        lightly.NTXentLoss(memory_bank_size=(4096, 128, 2))
    a, b = rows(5, 7, seed=1), rows(5, 7, seed=2)
    no_bank = lightly.NTXentLoss(0.2, memory_bank_size=(0, 7))  # size 0: no bank
    assert relative_error(no_bank(a, b), lightly_reference(a, b, 0.2)) <= RTOL
    with pytest.raises(ValueError, match="Illegal temperature"):
        lightly.NTXentLoss(temperature=0.0)
    # gather_distributed=True in one process is lightly's single-process loss.
    assert relative_error(lightly.NTXentLoss(0.2, gather_distributed=True)(a, b), lightly_reference(a, b, 0.2)) <= RTOL


# --- pytorch-metric-learning ------------------------------------------------------------------------


def _labels(n: int, classes: int, seed: int) -> Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
@pytest.mark.parametrize(
    "labels",
    [
        torch.arange(7).repeat(2),
        _labels(13, 4, 1),
        _labels(9, 9, 2),
        torch.zeros(6, dtype=torch.long),
        torch.arange(5),
        torch.tensor([0.5, 0.5, 2.0, 3.0, 3.0, 3.0, -1.0]),
    ],
    ids=["instance-2-views", "classes", "some-singletons", "all-equal", "no-positive", "float-labels"],
)
def test_pml_ntxent_and_supcon_with_labels(labels, tau):
    """The issue's cases: labels instead of two views (several positives per anchor), all labels equal
    (no negatives: pml returns 0), no positives at all."""
    emb = rows(labels.shape[0], 17, seed=labels.shape[0])
    for name in ("NTXentLoss", "SupConLoss"):
        ours, theirs = getattr(pml, name)(tau), getattr(pml_losses, name)(tau)
        assert_same(lambda e, ours=ours: ours(e, labels), lambda e, theirs=theirs: theirs(e, labels), emb)


@pytest.mark.parametrize("ref", ["permutation", "classes", "identity"])
def test_pml_ref_emb(ref):
    emb, ref_emb = rows(8, 5, seed=4), rows(11 if ref == "classes" else 8, 5, seed=5)
    labels = {"permutation": torch.arange(8), "classes": _labels(8, 3, 6), "identity": torch.arange(8)}[ref]
    ref_labels = {
        "permutation": torch.randperm(8, generator=torch.Generator().manual_seed(1)),
        "classes": _labels(11, 3, 7),
        "identity": torch.arange(8),
    }[ref]
    for name in ("NTXentLoss", "SupConLoss"):
        ours, theirs = getattr(pml, name)(0.1), getattr(pml_losses, name)(0.1)
        assert_same(
            lambda e, r, ours=ours: ours(e, labels, ref_emb=r, ref_labels=ref_labels),
            lambda e, r, theirs=theirs: theirs(e, labels, ref_emb=r, ref_labels=ref_labels),
            emb,
            ref_emb,
        )


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("loss", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("n", [1, 9])
def test_pml_self_supervised_wrapper(loss, symmetric, n):
    ours = pml.SelfSupervisedLoss(getattr(pml, loss)(0.2), symmetric=symmetric)
    theirs = pml_losses.SelfSupervisedLoss(getattr(pml_losses, loss)(0.2), symmetric=symmetric)
    assert_same(ours, theirs, rows(n, 6, seed=n), rows(n, 6, seed=n + 1))


def test_pml_signatures_and_unsupported_options():
    assert inspect.signature(pml.NTXentLoss).parameters["temperature"].default == 0.07
    assert inspect.signature(pml.SupConLoss).parameters["temperature"].default == 0.1
    assert list(inspect.signature(pml.NTXentLoss.forward).parameters)[1:] == [
        "embeddings",
        "labels",
        "indices_tuple",
        "ref_emb",
        "ref_labels",
    ]
    from pytorch_metric_learning import distances, reducers, regularizers

    emb, labels = rows(10, 6, seed=3), _labels(10, 3, 5)
    defaults = {
        "NTXentLoss": dict(distance=distances.CosineSimilarity(), reducer=reducers.MeanReducer()),
        "SupConLoss": dict(distance=distances.CosineSimilarity(), reducer=reducers.AvgNonZeroReducer()),
    }
    for name, options in defaults.items():  # pml's defaults, spelled out: accepted, pml's value
        options = dict(options, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=False)
        ours, theirs = getattr(pml, name)(0.1, **options), getattr(pml_losses, name)(0.1, **options)
        assert relative_error(ours(emb, labels), theirs(emb, labels)) <= RTOL
    for option, value in (
        ("distance", distances.LpDistance()),
        ("distance", distances.CosineSimilarity(power=2)),
        ("reducer", reducers.SumReducer()),
        ("embedding_regularizer", regularizers.LpRegularizer()),
    ):
        with pytest.raises(NotImplementedError, match=option):
            pml.NTXentLoss(0.1, **{option: value})
    with pytest.raises(NotImplementedError, match="reducer"):
        pml.SupConLoss(0.1, reducer=reducers.MeanReducer())  # NT-Xent's default, not SupCon's
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        pml.NTXentLoss()(torch.randn(4, 3), torch.arange(4), indices_tuple=(torch.arange(2),) * 4)


# --- solo-learn -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
@pytest.mark.parametrize(
    "indexes",
    [torch.arange(7).repeat(2), torch.arange(5).repeat(4), _labels(9, 3, 3).repeat(2)],
    ids=["2-crops", "multi-crop", "supervised"],
)
def test_solo_learn_values_and_gradients(indexes, tau):
    assert_same(
        lambda z: solo_learn.simclr_loss_func(z, indexes, tau),
        lambda z: solo_reference(z, indexes, tau),
        rows(indexes.shape[0], 17, seed=indexes.shape[0]),
    )


def test_solo_learn_lone_crop_is_left_out_not_inf():
    z, indexes = rows(7, 5, seed=2), torch.tensor([0, 1, 2, 0, 1, 2, 3])  # crop 6 has no positive
    assert torch.isinf(solo_reference(z, indexes, 0.1))
    ours = solo_learn.simclr_loss_func(z, indexes, 0.1)
    assert relative_error(ours, solo_reference(z[:6], indexes[:6], 0.1) * 6 / 6) > 0  # z[6] still a negative
    per_row = []
    for i in range(6):  # the mean of solo's per-row terms over the rows that have a positive
        zn = F.normalize(z, dim=-1)
        s = zn[i] @ zn.T / 0.1
        others = torch.arange(7) != i
        pos = others & (indexes == indexes[i])
        per_row.append(torch.logsumexp(s[others], 0) - torch.logsumexp(s[pos], 0))
    assert relative_error(ours, torch.stack(per_row).mean()) <= RTOL


# --- Inf-CL -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nq, nk, labels, scale",
    [
        (8, 8, None, None),
        (7, 7, None, 1 / 0.01),
        (6, 11, "random", 1 / 0.07),
        (6, 11, "shared", 1 / 0.07),
        (5, 5, "permutation", (1,)),
    ],
    ids=["default", "tau-0.01", "more-keys", "shared-positives", "permutation-[1]-scale"],
)
def test_inf_cl_values_and_gradients(nq, nk, labels, scale):
    q, k = F.normalize(rows(nq, 16, seed=nq), dim=1), F.normalize(rows(nk, 16, seed=nk + 1), dim=1)
    gen = torch.Generator().manual_seed(0)
    idx = {
        None: None,
        "random": torch.randint(0, nk, (nq,), generator=gen),
        "permutation": torch.randperm(nq, generator=gen),
        "shared": torch.tensor([10, 0, 3, 3, 10, 3]),  # queries sharing a positive key: its gradient sums
    }[labels]
    if isinstance(scale, tuple):
        scale = torch.full(scale, 12.5, dtype=torch.float64)
    inputs = (q, k) if scale is None else (q, k, scale)

    def theirs(*x):
        return inf_cl_reference(*x[:2], idx, *x[2:])

    for ours in (inf_cl.cal_inf_loss, inf_cl.cal_ring_loss):
        assert_same(lambda *x, ours=ours: ours(*x[:2], idx, *x[2:], head_dim=16), lambda *x: theirs(*x).mean(), *inputs)
    assert_same(
        lambda *x: inf_cl.cal_flash_loss(*x[:2], idx, *x[2:], head_dim=16).sum(), lambda *x: theirs(*x).sum(), *inputs
    )


@pytest.mark.parametrize("fn", [inf_cl.cal_inf_loss, inf_cl.cal_ring_loss, inf_cl.cal_flash_loss])
def test_inf_cl_head_dim_must_divide_d(fn):
    """Inf-CL views each row as [D / head_dim, head_dim] (``q.view(B, -1, head_dim)``): a head_dim that
    does not divide D fails there (its default 256 with D = 48 included), and here with a ValueError
    naming it; one that divides D gives the same loss whatever it is."""
    q, k = rows(4, 48, seed=1), rows(4, 48, seed=2)
    for bad in (256, 32, 0):
        with pytest.raises(ValueError, match="head_dim"):
            fn(q, k, head_dim=bad)
    assert torch.allclose(fn(q, k, head_dim=16), fn(q, k, head_dim=48), rtol=RTOL, atol=0)


# --- DirectCLR --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d, tau", [(7, 17, 0.01), (12, 40, 0.1), (5, 3, 1.0)])
def test_directclr_infonce_and_prefix(n, d, tau):
    a, b = rows(n, d, seed=n), rows(n, d, seed=n + 2)
    assert_same(lambda x, y: directclr.infoNCE(x, y, tau), lambda x, y: directclr_reference(x, y, tau), a, b)
    dim = max(2, d // 3)
    assert_same(
        lambda x, y: directclr.directclr_loss(x, y, dim, tau),
        lambda x, y: (
            (directclr_reference(x[:, :dim], y[:, :dim], tau) + directclr_reference(y[:, :dim], x[:, :dim], tau)) / 2
        ),
        a,
        b,
    )


def test_directclr_group_mode_draws_directclrs_permutation():
    r1, r2 = rows(6, 64, seed=1), rows(6, 64, seed=2)

    def theirs(r1, r2):  # directclr/main.py, --mode group, with 64 features in 8 groups of 8
        idx = np.arange(64)
        np.random.shuffle(idx)
        loss = 0
        for i in range(8):
            z1, z2 = r1[:, idx[i * 8 : i * 8 + 8]], r2[:, idx[i * 8 : i * 8 + 8]]
            loss = loss + directclr_reference(z1, z2) / 2 + directclr_reference(z2, z1) / 2
        return loss

    def ours(r1, r2):
        return directclr.group_loss(r1, r2, groups=8)

    np.random.seed(5)
    expected = evaluate(theirs, (r1, r2))
    np.random.seed(5)
    loss, grads = evaluate(ours, (r1, r2))
    assert relative_error(loss, expected[0]) <= RTOL
    assert all(relative_error(g, h) <= RTOL for g, h in zip(grads, expected[1]))


# --- fastcl's own modules: per-call temperature, tensor temperatures, check_finite ------------------


@pytest.mark.parametrize(
    "module, inputs",
    [
        (fastcl.NTXentLoss, lambda: (rows(6, 5, seed=1), rows(6, 5, seed=2))),
        (fastcl.InfoNCELoss, lambda: (rows(6, 5, seed=1), rows(6, 5, seed=2))),
        (fastcl.SupConLoss, lambda: (rows(6, 2, 5, seed=3), _labels(6, 3, 0))),
    ],
)
def test_modules_per_call_temperature(module, inputs):
    args = inputs()
    logit_scale = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64, requires_grad=True)  # [1]-shaped
    per_call = module()(*args, temperature=1 / logit_scale.exp())
    per_call.backward()
    tau = (1 / logit_scale.exp()).detach().reshape(()).requires_grad_()
    fixed = module(temperature=tau)(*args)
    fixed.backward()
    assert relative_error(per_call.detach(), fixed.detach()) <= RTOL
    # dL/d(log scale) = dL/dτ · dτ/d(log scale) = −τ dL/dτ
    assert relative_error(logit_scale.grad.reshape(()), -tau.detach() * tau.grad) <= RTOL


def test_modules_tensor_temperature_built_once():
    tau = nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    loss_fn = fastcl.InfoNCELoss(temperature=tau)
    assert [name for name, _ in loss_fn.named_parameters()] == ["temperature"]
    for step in range(3):
        loss_fn(rows(5, 4, seed=step), rows(5, 4, seed=step + 5)).backward()
    assert tau.grad is not None and torch.isfinite(tau.grad)
    buffer_tau = fastcl.NTXentLoss(temperature=torch.tensor(0.3))
    assert "temperature" in dict(buffer_tau.named_buffers())
    logit_scale = nn.Parameter(torch.tensor(2.0))
    with pytest.raises(ValueError, match="temperature.*per call"):
        fastcl.InfoNCELoss(temperature=1 / logit_scale.exp())


@pytest.mark.parametrize(
    "module, make",
    [
        (fastcl.NTXentLoss, lambda x: (x, x.clone())),
        (fastcl.InfoNCELoss, lambda x: (x, x.clone())),
        (fastcl.DirectCLRLoss, lambda x: (x, x.clone())),
        (fastcl.SupConLoss, lambda x: (x.view(2, 2, 400),)),
    ],
)
def test_modules_check_finite(module, make):
    x = torch.randn(4, 400)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        module(check_finite=True)(*make(x))
    assert not torch.isfinite(module(check_finite=False, backend="torch")(*make(x)))


# --- float32 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer", ["supcontrast", "open_clip", "lightly", "pml-multi-positive", "solo-multi-crop", "inf_cl-more-keys"]
)
def test_float32_and_bfloat16_against_the_float64_peer(peer):
    """float32 inputs: the loss (float32) and gradients within 1e-5 of the peer run in float64;
    bfloat16 inputs: a float32 loss, bfloat16 gradients, no worse than the peer in bfloat16."""
    a, b = rows(9, 24, seed=31), rows(9, 24, seed=32)
    labels = _labels(9, 3, 4)

    def views(x, y):
        return F.normalize(torch.stack([x, y], 1), dim=2)

    cases = {
        "supcontrast": (
            lambda x, y: supcontrast.SupConLoss(0.1)(views(x, y), labels),
            lambda x, y: supcontrast_reference(views(x, y), labels, temperature=0.1),
        ),
        "open_clip": (
            lambda x, y: open_clip.ClipLoss()(F.normalize(x, dim=1), F.normalize(y, dim=1), 10.0),
            lambda x, y: open_clip_peer.ClipLoss()(F.normalize(x, dim=1), F.normalize(y, dim=1), 10.0),
        ),
        "lightly": (lightly.NTXentLoss(0.1), lambda x, y: lightly_reference(x, y, 0.1)),
        "pml-multi-positive": (
            lambda x, y: pml.NTXentLoss(0.1)(torch.cat([x, y]), labels.repeat(2)),
            lambda x, y: pml_losses.NTXentLoss(0.1)(torch.cat([x, y]), labels.repeat(2)),
        ),
        "solo-multi-crop": (
            lambda x, y: solo_learn.simclr_loss_func(torch.cat([x, y]), labels.repeat(2)),
            lambda x, y: solo_reference(torch.cat([x, y]), labels.repeat(2)),
        ),
        "inf_cl-more-keys": (
            lambda x, y: inf_cl.cal_inf_loss(x[:5], y, labels[:5] * 2, 10.0, head_dim=8),
            lambda x, y: inf_cl_reference(x[:5], y, labels[:5] * 2, 10.0).mean(),
        ),
    }
    ours, theirs = cases[peer]
    loss, grads = evaluate(ours, (a.float(), b.float()))
    expected, expected_grads = evaluate(theirs, (a.float().double(), b.float().double()))
    assert loss.dtype == torch.float32 and relative_error(loss, expected) <= 1e-5
    for g, h in zip(grads, expected_grads):
        assert g.dtype == torch.float32 and relative_error(g, h) <= 1e-5
    # bfloat16 inputs: no further from the float64 peer than the peer itself run in bfloat16.
    rounded = (a.bfloat16(), b.bfloat16())
    truth = Result(*evaluate(theirs, tuple(x.double() for x in rounded)), None)
    assert_no_worse_than_naive(
        Result(*evaluate(ours, rounded), None), Result(*evaluate(theirs, rounded), None), truth, torch.bfloat16
    )


def _non_finite_cases():
    """peer → (ours, theirs) on two [9, 24] views; every compat loss and call path."""
    labels = _labels(9, 3, 4)
    pairs = torch.arange(9).repeat(2)

    def views(x, y):
        return torch.stack([x, y], 1)

    return {
        "supcontrast": (
            lambda x, y: supcontrast.SupConLoss(0.1)(views(x, y), labels),
            lambda x, y: supcontrast_reference(views(x, y), labels, temperature=0.1),
        ),
        "supcontrast-mask": (
            lambda x, y: supcontrast.SupConLoss(0.1)(views(x, y), mask=torch.eye(9)),
            lambda x, y: supcontrast_reference(views(x, y), mask=torch.eye(9).double(), temperature=0.1),
        ),
        "open_clip": (
            lambda x, y: open_clip.ClipLoss()(x, y, 10.0, -1.0),
            lambda x, y: open_clip_peer.ClipLoss()(x, y, 10.0, -1.0),
        ),
        "open_clip-siglip": (
            lambda x, y: open_clip.SigLipLoss()(x, y, 10.0, -3.0),
            lambda x, y: open_clip_peer.SigLipLoss()(x, y, 10.0, -3.0),
        ),
        "lightly": (lightly.NTXentLoss(0.1), lambda x, y: lightly_reference(x, y, 0.1)),
        "lightly-dcl": (lightly.DCLLoss(0.1), lambda x, y: lightly_dcl_reference(x, y, 0.1)),
        "lightly-dclw": (
            lightly.DCLWLoss(0.1),
            lambda x, y: lightly_dcl_reference(x, y, 0.1, lightly_mises_fisher_weights),
        ),
        "pml-ntxent-classes": (
            lambda x, y: pml.NTXentLoss(0.1)(torch.cat([x, y]), labels.repeat(2)),
            lambda x, y: pml_losses.NTXentLoss(0.1)(torch.cat([x, y]), labels.repeat(2)),
        ),
        "pml-ntxent-pairs": (
            lambda x, y: pml.NTXentLoss(0.1)(torch.cat([x, y]), pairs),
            lambda x, y: pml_losses.NTXentLoss(0.1)(torch.cat([x, y]), pairs),
        ),
        "pml-supcon": (
            lambda x, y: pml.SupConLoss(0.1)(torch.cat([x, y]), labels.repeat(2)),
            lambda x, y: pml_losses.SupConLoss(0.1)(torch.cat([x, y]), labels.repeat(2)),
        ),
        "pml-self-supervised": (
            pml.SelfSupervisedLoss(pml.NTXentLoss(0.1), symmetric=False),
            pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(0.1), symmetric=False),
        ),
        "solo-2-crops": (
            lambda x, y: solo_learn.simclr_loss_func(torch.cat([x, y]), pairs),
            lambda x, y: solo_reference(torch.cat([x, y]), pairs),
        ),
        "solo-supervised": (
            lambda x, y: solo_learn.simclr_loss_func(torch.cat([x, y]), labels.repeat(2)),
            lambda x, y: solo_reference(torch.cat([x, y]), labels.repeat(2)),
        ),
        "inf_cl": (
            lambda x, y: inf_cl.cal_inf_loss(x, y, None, 10.0, head_dim=8),
            lambda x, y: inf_cl_reference(x, y, None, 10.0).mean(),
        ),
        "inf_cl-flash": (
            lambda x, y: inf_cl.cal_flash_loss(x, y, None, 10.0, head_dim=8),
            lambda x, y: inf_cl_reference(x, y, None, 10.0),
        ),
        "directclr": (directclr.infoNCE, directclr_reference),
        "directclr-prefix": (
            lambda x, y: directclr.directclr_loss(x, y, 8),
            lambda x, y: (directclr_reference(x[:, :8], y[:, :8]) + directclr_reference(y[:, :8], x[:, :8])) / 2,
        ),
    }


# Where the peer's loss is +Inf, fastcl's is NaN: none left on one process (open_clip's SigLipLoss and
# Inf-CL compute each pair's / row's own term there; docs/migration.md).
_INF_BECOMES_NAN: set = set()


def _finiteness(t: Tensor) -> Tensor:
    """Per element: 0 finite, 1 NaN, 2 +Inf, 3 −Inf."""
    return torch.isnan(t) * 1 + torch.isposinf(t) * 2 + torch.isneginf(t) * 3


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("peer", list(_non_finite_cases()))
def test_non_finite_input_gives_what_the_peer_gives(peer, bad):
    """One NaN or ±Inf entry in the features: no raise (and no finite check: nothing reads the data
    for it), and the loss is NaN / ±Inf / finite exactly where the peer's is (element-wise for
    Inf-CL's per-row losses), so AMP's GradScaler sees what it sees with the peer."""
    ours, theirs = _non_finite_cases()[peer]
    x, y = F.normalize(rows(9, 24, seed=31), dim=1), F.normalize(rows(9, 24, seed=32), dim=1)
    x[2, 3] = float(bad)
    with torch.no_grad():
        loss, expected = ours(x, y), theirs(x, y)
    if (peer, bad) in _INF_BECOMES_NAN:
        assert torch.isposinf(expected).any() and torch.isnan(loss).any()
        return
    assert torch.equal(_finiteness(loss), _finiteness(expected)), (loss, expected)
    assert not torch.isfinite(loss).all()
    finite = torch.isfinite(expected)
    if finite.any():
        assert relative_error(loss[finite], expected[finite]) <= RTOL


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: pml.NTXentLoss(0.1)(torch.randn(4, 3, 2), torch.arange(4)), "embeddings"),
        (
            lambda: pml.NTXentLoss(0.1)(
                torch.randn(4, 3), torch.arange(4), ref_emb=torch.randn(5, 2), ref_labels=torch.arange(5)
            ),
            "ref_emb",
        ),
        (lambda: pml.NTXentLoss(-1.0)(torch.randn(4, 3), torch.arange(4) % 2), "temperature"),
        (lambda: solo_learn.simclr_loss_func(torch.randn(6, 3), torch.arange(5)), "indexes"),
        (lambda: solo_learn.simclr_loss_func(torch.randn(6, 3).long(), torch.arange(6)), "z"),
        (lambda: inf_cl.cal_flash_loss(torch.randn(4, 3), torch.randn(6, 5), head_dim=3), "k"),
        (
            lambda: inf_cl.cal_inf_loss(torch.randn(4, 3), torch.randn(6, 3), labels=torch.arange(3), head_dim=3),
            "labels",
        ),
        (lambda: open_clip.ClipLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.ones(2)), "logit_scale"),
        (lambda: open_clip.ClipLoss()(torch.randn(4, 3), torch.randn(5, 3), 10.0), "text_features"),
        (lambda: lightly.NTXentLoss()(torch.randn(4, 3), torch.randn(4, 2)), "out1"),
        (lambda: directclr.group_loss(torch.randn(4, 64), torch.randn(4, 64), groups=7), "groups"),
        (lambda: directclr.directclr_loss(torch.randn(4, 8), torch.randn(4, 8), dim=0), "dim"),
        (lambda: directclr.infoNCE(torch.randn(4, 8), torch.randn(4, 8), -1.0), "temperature"),
        (lambda: supcontrast.SupConLoss(0.1, "all", -1)(torch.randn(4, 2, 8), torch.arange(4)), "base_temperature"),
        (lambda: supcontrast.SupConLoss()(torch.randn(4, 2, 8), mask=torch.ones(3, 3)), "mask"),
        (lambda: pml.SelfSupervisedLoss(pml.NTXentLoss())(torch.randn(4, 8), torch.randn(5, 8)), "ref_emb"),
        (lambda: inf_cl.cal_inf_loss(torch.randn(4, 8), torch.randn(4, 8), scale=torch.ones(2), head_dim=8), "scale"),
        (lambda: open_clip.SigLipLoss()(torch.randn(4, 8), torch.randn(4, 8), 1.0, torch.ones(3)), "logit_bias"),
        (lambda: open_clip.ClipLoss()(torch.randn(4, 8), torch.randn(4, 8), "10"), "logit_scale"),
    ],
)
def test_bad_input_names_the_argument(call, argument):
    """Each error names an argument of the peer's own signature (never fastcl's internal q, z1, x)."""
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    assert str(error.value).startswith(argument + ":"), str(error.value)


def test_peer_forms_fastcl_would_refuse():
    """Values the peers compute with, so the compat losses do too: DirectCLR's ``r[:, :dim]`` with
    dim > D (all features), lightly's DCLW with σ ≤ 0 (its softmax of similarities / σ)."""
    a, b = rows(6, 8, seed=1), rows(6, 8, seed=2)
    assert_same(
        lambda x, y: directclr.directclr_loss(x, y, dim=20),
        lambda x, y: (directclr_reference(x[:, :20], y[:, :20]) + directclr_reference(y[:, :20], x[:, :20])) / 2,
        a,
        b,
    )
    weights = functools.partial(lightly_mises_fisher_weights, sigma=-0.5)
    assert_same(lightly.DCLWLoss(0.2, sigma=-0.5), lambda x, y: lightly_dcl_reference(x, y, 0.2, weights), a, b)


def test_modules_expose_the_core_options():
    """N = 1 NT-Xent is 0 with zero gradients; SupCon's positives_missing="zero" is SupContrast's mean;
    InfoNCE takes explicit targets into more keys than queries (Inf-CL's labels) per call."""
    z1 = rows(1, 5, seed=1).requires_grad_()
    loss = fastcl.NTXentLoss()(z1, rows(1, 5, seed=2))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z1.grad) == 0
    features, labels = F.normalize(rows(6, 1, 5, seed=3), dim=2), torch.tensor([0, 1, 1, 2, 3, 3])
    zero = fastcl.SupConLoss(0.1, positives_missing="zero")(features, labels)
    assert relative_error(zero, supcontrast_reference(features, labels, temperature=0.1)) <= RTOL
    q, k, targets = rows(5, 4, seed=4), rows(9, 4, seed=5), torch.tensor([8, 0, 3, 3, 7])
    one_way = fastcl.InfoNCELoss(0.1, normalize=False, symmetric=False)
    assert_same(
        lambda a, b: one_way(a, b, targets=targets), lambda a, b: inf_cl_reference(a, b, targets, 10.0).mean(), q, k
    )


# --- the compat layer's engine layouts on the Triton block primitive (interpreter) ---------------------

_TRITON_CASES = {
    "siglip-labels-rows": (
        lambda: open_clip.SigLipLoss(),
        lambda: open_clip_peer.SigLipLoss(),
        lambda: [F.normalize(rows(7, 17, seed=7), dim=1), F.normalize(rows(7, 17, seed=8), dim=1), 100.0, -10.0],
    ),
    "lightly-dcl-exclude-positives": (
        lambda: lightly.DCLLoss(0.01),
        lambda: functools.partial(lightly_dcl_reference, temperature=0.01),
        lambda: [rows(9, 17, seed=9), rows(9, 17, seed=10)],
    ),
    "inf-cl-key-logsumexp": (
        lambda: lambda q, k, s: inf_cl.cal_flash_loss(q, k, None, s, head_dim=17).sum(),
        lambda: lambda q, k, s: inf_cl_reference(q, k, None, s).sum(),
        lambda: [F.normalize(rows(6, 17, seed=6), dim=1), F.normalize(rows(11, 17, seed=11), dim=1), 1 / 0.01],
    ),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", list(_TRITON_CASES))
def test_compat_engine_layouts_on_the_triton_primitive(case, monkeypatch):
    """The layouts the compat layer added to the engine (per-row labels with the sigmoid epilogue, the
    positive left out under labels, the per-anchor key log-sum-exp) through the Triton block primitive
    (TRITON_INTERPRET=1, float64) against the peers' float64 code: odd shapes, τ = 0.01."""
    monkeypatch.setenv("FASTCL_BACKEND", "triton")
    asked = []
    primitive = fastcl.dispatch.block_primitive
    monkeypatch.setattr(fastcl.dispatch, "block_primitive", lambda backend: asked.append(backend) or primitive(backend))
    ours, theirs, inputs = (make() for make in _TRITON_CASES[case])
    assert_same(ours, theirs, *inputs, rtol=1e-7)
    assert asked and set(asked) == {"triton"}, asked
