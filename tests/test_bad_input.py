"""Bad input (docs/spec.md, "Bad input"): a ValueError / TypeError naming the argument and what was received.

Table-driven: each case is a call that must raise, the exception type, and strings its message must
contain (the argument's name first, then the received / expected value).
"""

from __future__ import annotations

import pytest
import torch

import fastcl
from fastcl.functional import info_nce, nt_xent, supcon

N, D = 4, 8


def _rows(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _with(value, index, t):
    t = t.clone()
    t[index] = value
    return t


Z = _rows(N, D)
F3 = _rows(N, 2, D)
LABELS = torch.arange(N)

# (id, call, exception, message parts)
CASES = [
    # rank
    ("nt_xent-rank3", lambda: nt_xent(_rows(N, D, 1), Z), ValueError, ["z1", "2-D", "(4, 8, 1)"]),
    ("nt_xent-rank1-z2", lambda: nt_xent(Z, _rows(D)), ValueError, ["z2", "2-D", "(8,)"]),
    ("supcon-rank1", lambda: supcon(_rows(D)), ValueError, ["features", "2-D [N, D] or 3-D [N, V, D]", "(8,)"]),
    ("supcon-rank4", lambda: supcon(_rows(N, 2, D, 1)), ValueError, ["features", "3-D"]),
    # N and D mismatches between views
    ("info_nce-N-mismatch", lambda: info_nce(Z, _rows(N + 1, D)), ValueError, ["k", "N = 4", "(5, 8)"]),
    ("nt_xent-N-mismatch", lambda: nt_xent(Z, _rows(N - 1, D)), ValueError, ["z2", "N = 4", "(3, 8)"]),
    ("nt_xent-D-mismatch", lambda: nt_xent(Z, _rows(N, D + 2)), ValueError, ["z2", "D = 8", "(4, 10)"]),
    ("info_nce-D-mismatch", lambda: info_nce(Z, _rows(N, 3)), ValueError, ["k", "D = 8", "(4, 3)"]),
    # sub_dim
    ("sub_dim-0", lambda: nt_xent(Z, Z, sub_dim=0), ValueError, ["sub_dim", "D = 8", "got 0"]),
    ("sub_dim-negative", lambda: info_nce(Z, Z, sub_dim=-3), ValueError, ["sub_dim", "got -3"]),
    ("sub_dim-above-D", lambda: supcon(F3, sub_dim=D + 1), ValueError, ["sub_dim", "D = 8", "got 9"]),
    ("sub_dim-float", lambda: nt_xent(Z, Z, sub_dim=2.0), TypeError, ["sub_dim", "float"]),
    # temperature
    ("tau-zero", lambda: nt_xent(Z, Z, 0.0), ValueError, ["temperature", "> 0", "0.0"]),
    ("tau-negative", lambda: info_nce(Z, Z, -0.1), ValueError, ["temperature", "-0.1"]),
    ("tau-nan", lambda: supcon(F3, temperature=float("nan")), ValueError, ["temperature", "nan"]),
    ("tau-inf", lambda: nt_xent(Z, Z, float("inf")), ValueError, ["temperature", "inf"]),
    (
        "tau-tensor-zero",
        lambda: nt_xent(Z, Z, torch.tensor(0.0), check_finite=True),
        ValueError,
        ["temperature", "0.0"],
    ),
    (
        "tau-tensor-nan",
        lambda: info_nce(Z, Z, torch.tensor(float("nan")), check_finite=True),
        ValueError,
        ["temperature", "nan"],
    ),
    ("tau-tensor-1d", lambda: nt_xent(Z, Z, torch.tensor([0.5])), ValueError, ["temperature", "0-dim", "(1,)"]),
    ("tau-string", lambda: nt_xent(Z, Z, "0.5"), TypeError, ["temperature", "str"]),
    ("base_temperature-zero", lambda: supcon(F3, base_temperature=0.0), ValueError, ["base_temperature", "0.0"]),
    # labels / mask
    ("labels-wrong-length", lambda: supcon(F3, torch.arange(N + 1)), ValueError, ["labels", "(4,)", "(5,)"]),
    ("labels-2d", lambda: supcon(F3, LABELS[:, None]), ValueError, ["labels", "(4,)", "(4, 1)"]),
    ("labels-float", lambda: supcon(F3, LABELS.float()), TypeError, ["labels", "torch.float32"]),
    ("labels-bool", lambda: supcon(F3, LABELS > 1), TypeError, ["labels", "torch.bool"]),
    ("labels-list", lambda: supcon(F3, [0, 1, 2, 3]), TypeError, ["labels", "list"]),
    ("mask-not-square", lambda: supcon(F3, mask=torch.ones(N, N - 1)), ValueError, ["mask", "(4, 4)", "(4, 3)"]),
    ("mask-1d", lambda: supcon(F3, mask=torch.ones(N)), ValueError, ["mask", "(4, 4)", "(4,)"]),
    ("labels-and-mask", lambda: supcon(F3, LABELS, torch.eye(N)), ValueError, ["labels", "mask", "both"]),
    # devices and dtypes (the 'meta' device stands in for a second device)
    ("views-on-two-devices", lambda: nt_xent(Z, _rows(N, D, device="meta")), ValueError, ["z2", "device", "meta"]),
    ("labels-other-device", lambda: supcon(F3, LABELS.to("meta")), ValueError, ["labels", "device", "meta"]),
    ("mask-other-device", lambda: supcon(F3, mask=torch.eye(N, device="meta")), ValueError, ["mask", "device", "meta"]),
    ("views-two-dtypes", lambda: info_nce(Z, Z.double()), ValueError, ["k", "torch.float32", "torch.float64"]),
    (
        "integer-features",
        lambda: supcon(torch.ones(N, 2, D, dtype=torch.int64)),
        TypeError,
        ["features", "torch.int64"],
    ),
    ("integer-z1", lambda: nt_xent(torch.ones(N, D, dtype=torch.int32), Z), TypeError, ["z1", "torch.int32"]),
    ("not-a-tensor", lambda: nt_xent(Z.tolist(), Z), TypeError, ["z1", "list"]),
    # empty / degenerate batches
    ("empty-batch", lambda: nt_xent(_rows(0, D), _rows(0, D)), ValueError, ["z1", "N = 0"]),
    ("empty-supcon", lambda: supcon(_rows(0, 2, D)), ValueError, ["features", "N = 0"]),
    ("zero-features", lambda: info_nce(_rows(N, 0), _rows(N, 0)), ValueError, ["q", "D = 0"]),
    ("zero-views", lambda: supcon(_rows(N, 0, D)), ValueError, ["features", "V >= 1"]),
    # option values
    ("contrast_mode-unknown", lambda: supcon(F3, contrast_mode="two"), ValueError, ["contrast_mode", "'two'"]),
    ("symmetric-not-bool", lambda: info_nce(Z, Z, symmetric="yes"), TypeError, ["symmetric", "str"]),
    ("normalize-not-bool", lambda: nt_xent(Z, Z, normalize="yes"), TypeError, ["normalize", "bool", "'yes'"]),
    ("normalize-int", lambda: supcon(F3, normalize=1), TypeError, ["normalize", "int"]),
    ("check_finite-str", lambda: info_nce(Z, Z, check_finite="no"), TypeError, ["check_finite", "'no'"]),
    ("module-normalize-str", lambda: fastcl.NTXentLoss(normalize="no")(Z, Z), TypeError, ["normalize", "'no'"]),
    ("temperature-str", lambda: nt_xent(Z, Z, "0.5"), TypeError, ["temperature", "str"]),
    ("temperature-complex", lambda: nt_xent(Z, Z, 0.5j), TypeError, ["temperature", "complex"]),
    ("backend-unknown", lambda: nt_xent(Z, Z, backend="jax"), ValueError, ["backend", "'jax'", "'torch'"]),
    ("module-backend-unknown", lambda: fastcl.SupConLoss(backend="tpu")(F3), ValueError, ["backend", "'tpu'"]),
    # non-finite inputs with the debugging check on (off by default: NaN/Inf propagate)
    ("nan-in-z1", lambda: nt_xent(_with(float("nan"), (1, 2), Z), Z, check_finite=True), ValueError, ["z1", "NaN"]),
    ("inf-in-k", lambda: info_nce(Z, _with(float("inf"), (0, 0), Z), check_finite=True), ValueError, ["k", "Inf"]),
    (
        "nan-in-features",
        lambda: supcon(_with(float("nan"), (3, 1, 7), F3), check_finite=True),
        ValueError,
        ["features", "NaN"],
    ),
    (
        "inf-in-module-input",
        lambda: fastcl.NTXentLoss(check_finite=True)(Z, _with(-float("inf"), (2, 5), Z)),
        ValueError,
        ["z2", "Inf"],
    ),
]


@pytest.mark.parametrize("call, exception, parts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(call, exception, parts):
    with pytest.raises(exception) as info:
        call()
    message = str(info.value)
    assert message.startswith(parts[0]), message
    for part in parts[1:]:
        assert part in message, f"{part!r} not in {message!r}"


def test_check_finite_is_skipped_on_meta_tensors():
    """Meta tensors have shapes but no data: the value check passes instead of failing to read them."""
    z = torch.randn(N, D, device="meta")
    loss = nt_xent(z, z + 1, torch.tensor(0.5, device="meta"), check_finite=True)
    assert loss.device.type == "meta" and loss.shape == ()


def test_backend_that_cannot_run_here_names_the_available_ones(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the cuda backend may be runnable here")
    with pytest.raises(RuntimeError) as info:
        nt_xent(Z, Z, backend="cuda")
    message = str(info.value)
    assert "backend='cuda'" in message and "CUDA" in message and "'torch'" in message


def test_triton_without_gpu_or_interpreter_names_the_available_ones(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("triton runs on this machine's GPU")
    # conftest sets TRITON_INTERPRET=1 so triton runs on the CPU interpreter; without it, it cannot run.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError) as info:
        info_nce(Z, Z, backend="triton")
    message = str(info.value)
    assert "backend='triton'" in message and "TRITON_INTERPRET" in message and "['torch']" in message


@pytest.mark.parametrize(
    "z1, z2",
    [
        (torch.zeros(N, D), torch.zeros(N, D)),  # zero rows: normalize maps them to 0 (eps), not NaN
        (Z, Z),  # identical views
        (Z[:1].expand(N, D), Z[:1].expand(N, D)),  # every row the same
        (Z * 1e-30, Z * 1e30),  # extreme norms
    ],
    ids=["zero-rows", "identical-views", "all-rows-equal", "extreme-norms"],
)
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "supcon"])
def test_defined_inputs_never_give_nan(loss, z1, z2):
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    if loss == "supcon":
        value = supcon(torch.stack([z1, z2], dim=1), LABELS % 2, temperature=0.01, backend="torch")
    else:
        value = getattr(fastcl.functional, loss)(z1, z2, 0.01, backend="torch")
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


@pytest.mark.parametrize("value", [-0.5, 0.0, -float("inf")])
def test_tensor_temperature_is_checked_on_the_device_when_value_checks_are_off(value):
    """With check_finite=False (the default) a tensor τ ≤ 0 still raises, from the device: no host sync."""
    z = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="temperature: expected a value > 0"):
        fastcl.functional.nt_xent(z, z + 1, torch.tensor(value), backend="torch")


def test_nan_tensor_temperature_propagates_by_default():
    """A learnable τ that went NaN gives a NaN loss (GradScaler skips the step), not an error."""
    z = torch.randn(6, 4)
    assert torch.isnan(fastcl.functional.nt_xent(z, z + 1, torch.tensor(float("nan")), backend="torch"))


def test_numpy_scalar_temperatures_are_accepted():
    np = pytest.importorskip("numpy")
    expected = nt_xent(Z, Z.flip(0), 0.25)
    for value in (np.float32(0.25), np.float64(0.25), np.float16(0.25)):
        torch.testing.assert_close(nt_xent(Z, Z.flip(0), value), expected)
    torch.testing.assert_close(fastcl.NTXentLoss(np.float32(0.25))(Z, Z.flip(0)), expected)


def test_modules_take_check_finite():
    bad = _with(float("nan"), (0, 0), Z)
    with pytest.raises(ValueError, match="z1"):
        fastcl.NTXentLoss(check_finite=True)(bad, Z)
    assert torch.isnan(fastcl.NTXentLoss()(bad, Z))
