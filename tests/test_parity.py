"""Parity with the code people use today: pytorch-metric-learning and SupContrast.

Where conventions meet, fastcl must give the same loss and gradients (float64, ≤ 1e-10 relative):

- pml ``NTXentLoss(τ)`` on ``cat(z1, z2)`` with instance labels ``cat(arange N, arange N)`` (and pml's
  ``SelfSupervisedLoss`` wrapper) is NT-Xent (docs/spec.md); ``SelfSupervisedLoss(..., symmetric=False)`` is the
  one-way cross-view InfoNCE.
- pml ``SupConLoss(τ)`` on the view-major rows with labels repeated per view is L_out with
  τ/τ_b = 1 (pml has no base temperature), ``contrast_mode="all"``; its ``AvgNonZeroReducer`` leaves
  anchors without positives out of the mean, as fastcl's SupCon does, so those cases match too.
- SupContrast's ``SupConLoss`` (transcribed below) wherever every anchor has a positive; where one has
  none, SupContrast counts a 0 in its mean and fastcl leaves the anchor out (``fastcl.compat.supcontrast``
  keeps SupContrast's convention: tests/test_compat.py).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from loss_cases import OURS, Batch, make_batch, relative_error, run
from pytorch_metric_learning import losses as pml_losses

import fastcl

RTOL = 1e-10


def _assert_same(a, b, rtol=RTOL):
    assert relative_error(a.loss, b.loss) <= rtol, (a.loss.item(), b.loss.item())
    for g, h in zip(a.grads, b.grads):
        assert relative_error(g, h) <= rtol


# --- pytorch-metric-learning ------------------------------------------------------------------------


def _pml_nt_xent(z1, z2, temperature):
    n = z1.shape[0]
    labels = torch.cat([torch.arange(n), torch.arange(n)])
    return pml_losses.NTXentLoss(temperature=temperature)(torch.cat([z1, z2]), labels)


@pytest.mark.parametrize("n, dim, tau", [(7, 5, 0.07), (16, 32, 0.5), (33, 3, 1.0)])
def test_nt_xent_equals_pml_ntxent_with_instance_labels(n, dim, tau):
    batch = make_batch("nt_xent", n, dim, seed=n)
    _assert_same(run(OURS["nt_xent"], batch, tau, torch.float64), run(_pml_nt_xent, batch, tau, torch.float64))


@pytest.mark.parametrize("symmetric", [True, False])
def test_pml_self_supervised_wrapper(symmetric):
    """SelfSupervisedLoss(NTXentLoss) is NT-Xent (symmetric) or one-way cross-view InfoNCE (not)."""
    batch = make_batch("nt_xent", 11, 9, seed=4)
    tau = 0.2

    def pml(z1, z2, temperature):
        return pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature), symmetric=symmetric)(z1, z2)

    ours = (
        run(OURS["nt_xent"], batch, tau, torch.float64)
        if symmetric
        else run(OURS["info_nce"], batch, tau, torch.float64, symmetric=False)
    )
    _assert_same(ours, run(pml, batch, tau, torch.float64))


def _pml_supcon(features, temperature, labels):
    views = features.shape[1]
    rows = torch.cat(torch.unbind(features, dim=1))
    return pml_losses.SupConLoss(temperature=temperature)(rows, labels.repeat(views))


@pytest.mark.parametrize(
    "n, views, n_classes, tau",
    [(12, 2, 3, 0.07), (9, 3, 4, 0.5), (15, 1, 5, 0.1), (10, 1, 8, 0.2)],
    ids=["2views", "3views", "1view", "1view-some-anchors-without-positives"],
)
def test_supcon_equals_pml_supcon(n, views, n_classes, tau):
    batch = make_batch("supcon", n, 16, views=views, n_classes=n_classes, seed=n + views)
    if views == 1 and n_classes == 8:
        assert torch.unique(batch.targets["labels"], return_counts=True)[1].min() == 1  # a lone sample exists
    ours = run(OURS["supcon"], batch, tau, torch.float64, base_temperature=tau)
    _assert_same(ours, run(_pml_supcon, batch, tau, torch.float64))


# --- SupContrast ------------------------------------------------------------------------------------


def supcontrast_per_anchor(
    features, labels=None, mask=None, temperature=0.07, contrast_mode="all", base_temperature=0.07
):
    """SupContrast's ``SupConLoss.forward`` (github.com/HobbitLong/SupContrast, losses.py, master, with
    its no-positive fix), step by step, stopping before the final ``loss.view(anchor_count, N).mean()``:
    returns the per-anchor losses (0 for an anchor without positives). Features as given (SupContrast's
    model normalizes them before the loss)."""
    batch_size = features.shape[0]
    if labels is not None and mask is not None:
        raise ValueError("Cannot define both `labels` and `mask`")
    if labels is None and mask is None:
        mask = torch.eye(batch_size, dtype=torch.float32)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).float()
    else:
        mask = mask.float()
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    elif contrast_mode == "all":
        anchor_feature, anchor_count = contrast_feature, contrast_count
    else:
        raise ValueError(f"Unknown mode: {contrast_mode}")
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    return -(temperature / base_temperature) * mean_log_prob_pos, mask.sum(1) > 0


def supcontrast(features, labels=None, mask=None, temperature=0.07, contrast_mode="all", base_temperature=0.07):
    """SupContrast's loss value: the mean over all anchors."""
    per_anchor, _ = supcontrast_per_anchor(features, labels, mask, temperature, contrast_mode, base_temperature)
    return per_anchor.mean()


SUPCONTRAST_CASES = [
    # (views, targets, contrast_mode, temperature, base_temperature); with V ≥ 2 every anchor has a
    # positive (its other views), and for masks the diagonal is set so that holds too.
    (2, "labels", "all", 0.07, 0.07),
    (2, "labels", "one", 0.1, 0.07),
    (3, "mask", "all", 0.5, 0.07),
    (3, "mask", "one", 0.2, 1.0),
    (2, None, "all", 0.07, 0.07),
    (4, None, "one", 0.3, 0.1),
]


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("views, targets, contrast_mode, tau, base", SUPCONTRAST_CASES)
def test_supcon_equals_supcontrast(views, targets, contrast_mode, tau, base, normalize):
    batch = make_batch("supcon", 10, 12, views=views, targets=targets, seed=views)
    if targets == "mask":
        batch.targets["mask"].fill_diagonal_(1.0)
    if not normalize:
        # SupContrast shifts by a row max that includes the self logit, so raw rows of large norm
        # underflow every other exp to 0 there (log 0 = −inf); keep the raw norms ≤ 1.
        (features,) = batch.tensors
        batch = Batch((features / features.norm(dim=-1).max(),), batch.targets)
    _, has_positive = supcontrast_per_anchor(batch.tensors[0], **batch.targets, contrast_mode=contrast_mode)
    assert has_positive.all()

    def theirs(features, temperature, **targets):
        # SupContrast expects normalized features (its model normalizes); fastcl's normalize=True does it inside.
        features = F.normalize(features, dim=2) if normalize else features
        return supcontrast(
            features, **targets, temperature=temperature, contrast_mode=contrast_mode, base_temperature=base
        )

    ours = run(
        OURS["supcon"],
        batch,
        tau,
        torch.float64,
        base_temperature=base,
        contrast_mode=contrast_mode,
        normalize=normalize,
    )
    _assert_same(ours, run(theirs, batch, tau, torch.float64))


def test_supcon_module_is_a_keyword_drop_in_for_supcontrast():
    """SupContrast's constructor keywords and forward(features, labels=None, mask=None) work unchanged."""
    init = inspect.signature(fastcl.SupConLoss.__init__).parameters
    assert {"temperature", "contrast_mode", "base_temperature"} <= set(init)
    assert (init["temperature"].default, init["contrast_mode"].default, init["base_temperature"].default) == (
        0.07,
        "all",
        0.07,
    )
    forward = list(inspect.signature(fastcl.SupConLoss.forward).parameters.values())
    assert [p.name for p in forward][:4] == ["self", "features", "labels", "mask"]  # then the per-call temperature
    assert forward[2].default is None and forward[3].default is None

    batch = make_batch("supcon", 8, 10, seed=21)
    features, labels = F.normalize(batch.tensors[0], dim=2), batch.targets["labels"]
    ours = fastcl.SupConLoss(temperature=0.1, contrast_mode="one", base_temperature=0.07, backend="torch")(
        features, labels
    )
    assert relative_error(ours, supcontrast(features, labels, temperature=0.1, contrast_mode="one")) <= RTOL


def test_anchors_without_positives_are_left_out_of_the_mean():
    """SupContrast's own edge case: one view, labels [0, 1, 1, 2] → anchors 0 and 3 have no positive."""
    gen = torch.Generator().manual_seed(8)
    features = torch.randn(4, 1, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2])
    loss = fastcl.functional.supcon(features, labels, temperature=0.1, backend="torch")
    per_anchor, has_positive = supcontrast_per_anchor(F.normalize(features, dim=2), labels, temperature=0.1)
    assert has_positive.tolist() == [False, True, True, False]
    expected = per_anchor[has_positive].mean()
    assert torch.isfinite(loss) and relative_error(loss, expected) <= RTOL
    # SupContrast itself averages over all 4 anchors (zeros included): half of fastcl's value here.
    assert relative_error(per_anchor.mean(), expected / 2) <= RTOL
    (grad,) = torch.autograd.grad(loss, features)
    (expected_grad,) = torch.autograd.grad(expected, features)
    assert torch.isfinite(grad).all() and relative_error(grad, expected_grad) <= RTOL
    assert torch.count_nonzero(grad[[0, 3]]) > 0  # lone samples still act as negatives


@pytest.mark.parametrize(
    "n, targets",
    [
        (6, {"labels": torch.arange(6)}),
        (6, {"mask": torch.zeros(6, 6)}),
        (6, {"mask": torch.eye(6)}),
        (1, {}),
    ],
    ids=["unique-labels", "empty-mask", "identity-mask", "single-row"],
)
def test_no_anchor_with_a_positive_gives_zero_loss_and_zero_gradients(n, targets):
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(n, 1, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = fastcl.functional.supcon(features, **targets, temperature=tau, backend="torch")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(features.grad) == 0
    assert tau.grad.item() == 0.0
