"""No host sync and no op PyTorch lists as nondeterministic on CUDA in any compat loss, mechanically: every
aten op of a forward and backward is logged (tests/oplog.py, as tests/test_oplog.py does for the core
losses) on the default path of each drop-in, on one process.

Two calls read the device once by design, and the log must show exactly that one read: pml's
``NTXentLoss`` with labels and solo-learn's ``simclr_loss_func`` read the largest class size to pick the
algorithm of their per-pair / summed-positives formula (fused with at most one positive per anchor, row
blocks otherwise; docs/migration.md). SupCon's no-positive warning, which reads labels only for CPU
tensors, is left out as in tests/test_oplog.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from oplog import OpLog

from fastcl import functional
from fastcl.compat import directclr, inf_cl, lightly, open_clip, pml, solo_learn, supcontrast

N, D, TAU = 6, 8, 0.1
ONE_READ = [("forward", "host sync", "_local_scalar_dense.default")]


def _rows(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _cases() -> dict:
    """name -> (fn() -> (loss, leaves), the host reads allowed)."""
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    float_labels = labels.double() / 3

    def two(fn):
        x, y = _rows(N, D, seed=1), _rows(N, D, seed=2)
        return lambda: (fn(x, y), [x, y])

    def views(fn):
        feats = F.normalize(_rows(N, 2, D, seed=3), dim=2).detach().requires_grad_()
        return lambda: (fn(feats), [feats])

    soft_mask = torch.rand(N, N, generator=torch.Generator().manual_seed(4)).requires_grad_()
    scale, bias = torch.tensor(10.0).requires_grad_(), torch.tensor(-5.0).requires_grad_()
    bank_loss = lightly.NTXentLoss(TAU, memory_bank_size=(16, D))
    cases = {
        "supcontrast-labels": views(lambda f: supcontrast.SupConLoss(TAU)(f, labels)),
        "supcontrast-float-labels": views(lambda f: supcontrast.SupConLoss(TAU)(f, float_labels)),
        "supcontrast-unlabeled": views(lambda f: supcontrast.SupConLoss(TAU, "one")(f)),
        "supcontrast-soft-mask-grad": views(lambda f: supcontrast.SupConLoss(TAU)(f, mask=soft_mask)),
        "open_clip-ClipLoss": two(lambda x, y: open_clip.ClipLoss()(x, y, scale, bias)),
        "open_clip-ClipLoss-dict": two(
            lambda x, y: open_clip.ClipLoss()(x, y, scale, output_dict=True)["contrastive_loss"]
        ),
        "open_clip-SigLipLoss": two(lambda x, y: open_clip.SigLipLoss()(x, y, scale, bias)),
        "lightly-NTXentLoss": two(lambda x, y: lightly.NTXentLoss(TAU)(x, y)),
        "lightly-NTXentLoss-bank": two(lambda x, y: bank_loss(x, y)),
        "lightly-DCLLoss": two(lambda x, y: lightly.DCLLoss(TAU)(x, y)),
        "lightly-DCLWLoss": two(lambda x, y: lightly.DCLWLoss(TAU)(x, y)),
        "lightly-DCLLoss-weight_fn": two(
            lambda x, y: lightly.DCLLoss(TAU, weight_fn=lambda a, b: (a * b).sum(dim=1).detach())(x, y)
        ),
        "pml-SupConLoss": two(lambda x, y: pml.SupConLoss(TAU)(torch.cat([x, y]), labels.repeat(2))),
        "pml-SupConLoss-ref_emb": two(lambda x, y: pml.SupConLoss(TAU)(x, labels, ref_emb=y, ref_labels=labels)),
        "pml-SelfSupervisedLoss": two(lambda x, y: pml.SelfSupervisedLoss(pml.NTXentLoss(TAU))(x, y)),
        "pml-SelfSupervisedLoss-one-way": two(
            lambda x, y: pml.SelfSupervisedLoss(pml.SupConLoss(TAU), symmetric=False)(x, y)
        ),
        "inf_cl-cal_inf_loss": two(lambda x, y: inf_cl.cal_inf_loss(x, y, scale=scale, head_dim=4)),
        "inf_cl-cal_inf_loss-labels": two(
            lambda x, y: inf_cl.cal_inf_loss(x, y, labels=torch.arange(N).flip(0), head_dim=4)
        ),
        "inf_cl-cal_flash_loss": two(lambda x, y: inf_cl.cal_flash_loss(x, y, scale=scale, head_dim=4).sum()),
        "directclr-infoNCE": two(lambda x, y: directclr.infoNCE(x, y)),
        "directclr-directclr_loss": two(lambda x, y: directclr.directclr_loss(x, y, dim=5)),
        "directclr-group_loss": two(lambda x, y: directclr.group_loss(x, y, idx=torch.randperm(D), groups=2)),
    }
    allowed = {name: [] for name in cases}
    for name, fn in {
        "pml-NTXentLoss-labels": two(lambda x, y: pml.NTXentLoss(TAU)(torch.cat([x, y]), labels.repeat(2))),
        "pml-NTXentLoss-pairs": two(lambda x, y: pml.NTXentLoss(TAU)(torch.cat([x, y]), torch.arange(N).repeat(2))),
        "solo_learn-two-crops": two(
            lambda x, y: solo_learn.simclr_loss_func(torch.cat([x, y]), torch.arange(N).repeat(2))
        ),
        "solo_learn-supervised": two(lambda x, y: solo_learn.simclr_loss_func(torch.cat([x, y]), labels.repeat(2))),
    }.items():
        cases[name], allowed[name] = fn, ONE_READ
    return {name: (fn, allowed[name]) for name, fn in cases.items()}


CASES = _cases()


def run_logged(fn) -> OpLog:
    log = OpLog()
    with contextlib.ExitStack() as stack:
        stack.enter_context(log.patched_methods())
        # Reads labels / the mask only for CPU tensors (or with check_finite): not a path a GPU run takes.
        stack.enter_context(log.opaque(functional, "_warn_if_no_positive"))
        with log:
            value, leaves = fn()
        log.phase = "backward"
        with log:
            value.backward()
    assert all(leaf.grad is not None for leaf in leaves), "an input got no gradient"
    return log


@pytest.mark.parametrize("name", sorted(CASES))
def test_compat_forward_backward_has_no_host_sync(name):
    fn, allowed = CASES[name]
    log = run_logged(fn)
    assert len(log.ops) > 20, "the log saw too few ops"
    assert log.flagged == allowed


def test_the_log_flags_a_torch_unique_label_map(monkeypatch):
    """The label map compat used before (``torch.unique(..., return_inverse=True)``) is flagged."""
    from fastcl.compat import _common

    monkeypatch.setattr(_common, "class_ids", lambda labels: torch.unique(labels, return_inverse=True)[1])
    monkeypatch.setattr(supcontrast, "class_ids", _common.class_ids)
    log = run_logged(CASES["supcontrast-labels"][0])
    assert ("forward", "host sync", "_unique2.default") in log.flagged


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([3, -1, 3, 7, -1, 0]),
        torch.tensor([0.5, float("nan"), 0.5, float("nan"), -0.0, 0.0]),
        torch.tensor([True, False, True, True, False, False]),
        torch.tensor([2**40, 5, 2**40, 5, 5, 1]),
    ],
    ids=["int", "float-nan", "bool", "int64-large"],
)
def test_class_ids_equal_exactly_where_labels_are(labels):
    from fastcl.compat._common import class_ids, matches

    ids = class_ids(labels)
    assert ids.dtype == torch.int64
    off_diagonal = ~torch.eye(labels.shape[0], dtype=torch.bool)  # a row is never its own positive
    same = labels[:, None] == labels[None, :]
    assert torch.equal((ids[:, None] == ids[None, :]) & off_diagonal, same & off_diagonal)
    assert torch.equal(matches(ids, ids), (ids[:, None] == ids[None, :]).sum(dim=1))
