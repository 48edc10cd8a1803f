"""Hard negatives (docs/spec.md, "Hard negatives"): HCL's β-reweighting and the debiased τ⁺ estimator.

``authors_criterion`` re-states in float64 the loss of the authors' published code — joshr17/HCL
(image/main.py, ``criterion``, estimator "hard") and chingyaoc/DCL (main.py, the ``debiased`` branch of
``train``, which is HCL's with β = 0): exp of the 2N×2N similarities, the negatives selected by the mask
that removes each row's self and positive column, the positive exp(⟨out_1, out_2⟩/T) repeated for both
views, importance weights neg^β, the reweighted sum Σ imp·neg / mean(imp), Ng = (−τ⁺·N·pos + that)/(1 − τ⁺)
clamped below at N·e^{−1/T} (N = 2B − 2), and the mean of −log(pos / (pos + Ng)). fastcl's NT-Xent with
``beta`` / ``tau_plus`` must equal it (values and input gradients) on every backend that runs here;
InfoNCE's options and every reduction are checked against fastcl.reference, which shares no code with
the engine path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_cases import relative_error

import fastcl
from fastcl import dispatch, reference

BACKENDS = [b for b in ("torch", "triton") if dispatch.unavailable_reason(b, torch.device("cpu")) is None]
RTOL = 1e-10


def authors_criterion(out_1, out_2, temperature, beta, tau_plus):
    """The HCL / DCL authors' NT-Xent-form loss (rows already L2-normalized, as their model returns)."""
    batch = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(out @ out.T / temperature)
    keep = torch.ones(batch, 2 * batch, dtype=torch.bool)
    for i in range(batch):
        keep[i, i] = keep[i, i + batch] = False
    keep = torch.cat([keep, keep], dim=0)
    neg = neg.masked_select(keep).view(2 * batch, -1)
    pos = torch.exp((out_1 * out_2).sum(dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    count = 2 * batch - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    ng = (-tau_plus * count * pos + reweight_neg) / (1 - tau_plus)
    ng = torch.clamp(ng, min=count * math.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + ng))).mean()


# (β, τ⁺, T): HCL's defaults (β = 1, τ⁺ = 0.1, T = 0.5), DCL's debiased (β = 0), pure reweighting, and
# τ = 0.01, where the clamp is active for rows whose negatives are all far (N·e^{−100} floor).
SETTINGS = [(1.0, 0.1, 0.5), (0.0, 0.1, 0.5), (0.5, 0.0, 0.2), (2.0, 0.2, 0.1), (1.0, 0.1, 0.01), (0.0, 0.3, 0.01)]


@pytest.mark.parametrize("beta, tau_plus, T", SETTINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_matches_the_authors_code(backend, beta, tau_plus, T):
    gen = torch.Generator().manual_seed(int(beta * 10 + tau_plus * 100 + 1 / T))
    z1_raw, z2_raw = (torch.randn(7, 9, generator=gen, dtype=torch.float64) for _ in range(2))
    z1, z2 = z1_raw.clone().requires_grad_(), z2_raw.clone().requires_grad_()
    loss = fastcl.functional.nt_xent(z1, z2, T, beta=beta, tau_plus=tau_plus, backend=backend)
    loss.backward()
    r1, r2 = z1_raw.clone().requires_grad_(), z2_raw.clone().requires_grad_()
    expected = authors_criterion(F.normalize(r1, dim=1), F.normalize(r2, dim=1), T, beta, tau_plus)
    expected.backward()
    assert relative_error(loss.detach(), expected.detach()) <= RTOL
    assert relative_error(z1.grad, r1.grad) <= RTOL and relative_error(z2.grad, r2.grad) <= RTOL


CASES = [
    ("nt_xent", {}, {"beta": 1.0, "tau_plus": 0.1}),
    ("nt_xent", {"reduction": "none", "sub_dim": 5}, {"tau_plus": 0.05}),
    ("info_nce", {}, {"beta": 1.0, "tau_plus": 0.1}),
    ("info_nce", {"symmetric": False, "reduction": "sum"}, {"beta": 0.5}),
    ("info_nce", {"reduction": "none"}, {"tau_plus": 0.2}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss, options, hard", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_options_match_reference_with_weights_and_tau_grad(loss, options, hard, backend):
    gen = torch.Generator().manual_seed(len(str(options)) + len(str(hard)))
    a_raw, b_raw = (torch.randn(6, 8, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    weight = torch.rand(6, generator=gen, dtype=torch.float64)
    results = []
    for fn in (getattr(fastcl.functional, loss), getattr(reference, loss)):
        a, b = a_raw.clone().requires_grad_(), b_raw.clone().requires_grad_()
        tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        extra = {"backend": backend} if fn is not getattr(reference, loss) else {}
        out = fn(a, b, tau, weight=weight, **options, **hard, **extra)
        (out * torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64).view(out.shape)).sum().backward()
        results.append((out.detach(), a.grad, b.grad, tau.grad))
    for ours, expected in zip(*results):
        assert relative_error(ours, expected) <= RTOL


def test_float32_at_small_tau_stays_finite():
    """The authors' plain exponentials overflow float32 at T = 0.01 (e^{100} > 3.4e38); the log-space
    estimate does not, and stays within float32 rounding of the float64 value."""
    gen = torch.Generator().manual_seed(9)
    z1, z2 = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    z2 = z1 + 0.01 * z2  # close positives: s_pos ≈ 100
    ours = fastcl.functional.nt_xent(z1, z2, 0.01, beta=1.0, tau_plus=0.1)
    expected = reference.nt_xent(z1.double(), z2.double(), 0.01, beta=1.0, tau_plus=0.1)
    assert not torch.isfinite(authors_criterion(F.normalize(z1, dim=1), F.normalize(z2, dim=1), 0.01, 1.0, 0.1))
    assert torch.isfinite(ours) and relative_error(ours, expected, floor=1.0) <= 1e-5


@pytest.mark.parametrize(
    "call, exception, parts",
    [
        (lambda z: fastcl.functional.nt_xent(z, z, beta=-1.0), ValueError, ["beta", "-1.0"]),
        (lambda z: fastcl.functional.nt_xent(z, z, tau_plus=1.0), ValueError, ["tau_plus", "< 1.0"]),
        (lambda z: fastcl.functional.info_nce(z, z, tau_plus="0.1"), TypeError, ["tau_plus", "str"]),
        (lambda z: fastcl.functional.nt_xent(z[:1], z[:1], beta=1.0), ValueError, ["beta, tau_plus", "N >= 2"]),
        (
            lambda z: fastcl.functional.info_nce(z, z, symmetric=False, targets=torch.arange(4), beta=1.0),
            ValueError,
            ["beta, tau_plus", "targets"],
        ),
    ],
    ids=["beta-negative", "tau_plus-one", "tau_plus-str", "one-pair", "targets"],
)
def test_bad_hard_negative_options_name_the_argument(call, exception, parts):
    with pytest.raises(exception) as info:
        call(torch.randn(4, 8))
    message = str(info.value)
    assert message.startswith(parts[0]), message
    assert all(part in message for part in parts[1:]), message


def test_modules_take_the_options():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    expected = fastcl.functional.nt_xent(z1, z2, 0.5, beta=1.0, tau_plus=0.1)
    torch.testing.assert_close(fastcl.NTXentLoss(0.5, beta=1.0, tau_plus=0.1)(z1, z2), expected)
    expected = fastcl.functional.info_nce(z1, z2, 0.2, tau_plus=0.1)
    torch.testing.assert_close(fastcl.InfoNCELoss(0.2, tau_plus=0.1)(z1, z2), expected)
    assert "beta=1.0" in repr(fastcl.NTXentLoss(beta=1.0))
