"""fastcl.augment on the kornia (reference) backend: shapes, replay, determinism, independent references
for every op, parameter distributions, the strength knob, differentiable colour ops and bad input."""

from __future__ import annotations

import colorsys
import doctest
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl.augment import MultiViewAugment, colour, resolve, sample_colour_factors, sample_params
from fastcl.augment.colour import RGB_TO_YIQ
from fastcl.augment.pipeline import jitter
from fastcl.augment.presets import CIFAR10_MEAN, CIFAR10_STD, PRESETS

PRESET_NAMES = sorted(PRESETS)


def smooth_images(batch: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Natural-ish images in [0, 1]: upsampled low-resolution noise, so crops and colour ops change them."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, channels, 5, 5, generator=g)
    return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)


def unnormalize(views: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return views * std + mean


# ---------------------------------------------------------------- shapes, dtypes, replay, determinism


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("channels", [3, 1])
def test_every_preset_shapes_replay_and_determinism(preset, channels):
    x = (smooth_images(5, channels, 23, 19, seed=1) * 255).round().to(torch.uint8)
    aug = MultiViewAugment(preset, size=16, views=3, backend="kornia", generator=torch.Generator().manual_seed(7))
    views, params = aug(x, return_params=True)
    assert views.shape == (5, 3, channels, 16, 16) and views.dtype == torch.float32
    assert torch.isfinite(views).all()
    assert torch.equal(aug.replay(x, params), views)
    again = MultiViewAugment(preset, size=16, views=3, backend="kornia", generator=torch.Generator().manual_seed(7))
    views2, params2 = again(x, return_params=True)
    assert torch.equal(views2, views) and torch.equal(params2.box, params.box)
    other = MultiViewAugment(preset, size=16, views=3, backend="kornia", generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other(x), views)


def test_blurred_views_replay_exactly():
    x = smooth_images(4, 3, 70, 66, seed=2)
    aug = MultiViewAugment(
        "simclr", size=64, views=2, backend="kornia", generator=torch.Generator().manual_seed(0), blur_p=1.0
    )
    views, params = aug(x, return_params=True)
    assert bool(params.blur_apply.all())
    assert torch.equal(aug.replay(x, params), views)


def test_uint8_and_float_inputs_agree_and_bf16_output():
    x8 = torch.randint(0, 256, (4, 3, 21, 25), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    a = MultiViewAugment("byol", size=12, backend="kornia", generator=torch.Generator().manual_seed(0))
    views, params = a(x8, return_params=True)
    torch.testing.assert_close(a.replay(x8.double() / 255, params), views, atol=1e-5, rtol=0)
    bf16 = MultiViewAugment("byol", size=12, backend="kornia", output_dtype=torch.bfloat16)
    out = bf16.replay(x8, params)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), views, atol=0.05, rtol=0.01)


def test_auto_backend_is_kornia_on_cpu():
    assert MultiViewAugment(backend="auto").resolved_backend(torch.device("cpu")) == "kornia"


# ---------------------------------------------------------------- each op against an independent reference


def test_crop_resize_flip_match_plain_interpolate():
    x = torch.rand(6, 3, 27, 31, generator=torch.Generator().manual_seed(4))
    aug = MultiViewAugment(
        "simclr",
        size=11,
        views=2,
        backend="kornia",
        generator=torch.Generator().manual_seed(1),
        jitter_p=0.0,
        gray_p=0.0,
        normalize=False,
    )
    views, params = aug(x, return_params=True)
    for b in range(6):
        for v in range(2):
            x0, y0, w, h = params.box[b, v].tolist()
            crop = F.interpolate(
                x[b : b + 1, :, y0 : y0 + h, x0 : x0 + w], size=(11, 11), mode="bilinear", align_corners=False
            )[0]
            expected = crop.flip(-1) if params.flip[b, v] else crop
            torch.testing.assert_close(views[b, v], expected, atol=1e-6, rtol=0)


def test_strength_zero_is_identity_resize():
    x = torch.rand(5, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    for preset in PRESET_NAMES:
        aug = MultiViewAugment(
            preset, size=16, views=2, strength=0.0, backend="kornia", generator=torch.Generator().manual_seed(0)
        )
        expected = aug.normalize(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
        views = aug(x)
        for v in range(2):
            torch.testing.assert_close(views[:, v], expected, atol=1e-5, rtol=0)


def _hsv_hue_reference(pixel, turns):
    h, s, v = colorsys.rgb_to_hsv(*pixel)
    return colorsys.hsv_to_rgb((h + turns) % 1.0, s, v)


def _jitter_reference(img: np.ndarray, factors, order) -> np.ndarray:
    """float64 numpy reference of one sample's jitter (torchvision formulas, colorsys HSV hue)."""
    out = img.copy()
    weights = np.array(RGB_TO_YIQ[0]).reshape(3, 1, 1)
    for op in order:
        f = factors[op]
        if op == 0:
            out = np.clip(out * f, 0, 1)
        elif op == 1:
            out = np.clip(out * f + (out * weights).sum(0).mean() * (1 - f), 0, 1)
        elif op == 2:
            out = np.clip(out * f + (out * weights).sum(0, keepdims=True) * (1 - f), 0, 1)
        else:
            flat = out.reshape(3, -1).T
            out = np.array([_hsv_hue_reference(p, f) for p in flat]).T.reshape(out.shape)
    return out


def test_jitter_with_per_sample_order_matches_numpy_colorsys_reference():
    g = torch.Generator().manual_seed(6)
    img = torch.rand(7, 3, 5, 4, generator=g)
    factors = torch.stack(
        [0.3 + 1.4 * torch.rand(7, generator=g) for _ in range(3)] + [torch.rand(7, generator=g) - 0.5], dim=1
    )
    order = torch.rand(7, 4, generator=g).argsort(dim=1)
    apply = torch.tensor([True, True, False, True, True, True, True])
    out = jitter(img, factors, order, apply, hue_mode="hsv")
    for b in range(7):
        if apply[b]:
            expected = _jitter_reference(img[b].double().numpy(), factors[b].double().tolist(), order[b].tolist())
        else:
            expected = img[b].double().numpy()
        np.testing.assert_allclose(out[b].double().numpy(), expected, atol=2e-5)


def test_grayscale_solarize_and_blur_match_formulas():
    x = smooth_images(6, 3, 20, 20, seed=7)
    aug = MultiViewAugment(
        "byol",
        size=20,
        views=2,
        strength=1.0,
        backend="kornia",
        generator=torch.Generator().manual_seed(2),
        jitter_p=0.0,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        gray_p=0.5,
        blur_p=(0.5, 0.5),
        solarize_p=(0.5, 0.5),
        blur_kernel=5,
        normalize=False,
    )
    views, params = aug(x, return_params=True)
    weights = torch.tensor(RGB_TO_YIQ[0], dtype=torch.float64).view(3, 1, 1)
    offsets = torch.arange(5, dtype=torch.float64) - 2
    for b in range(6):
        for v in range(2):
            img = x[b].double()
            if params.gray[b, v]:
                img = (img * weights).sum(0, keepdim=True).expand(3, -1, -1)
            if params.blur_apply[b, v]:
                sigma = float(params.blur_sigma[b, v])
                k1 = torch.exp(-(offsets**2) / (2 * sigma**2))
                k1 = k1 / k1.sum()
                padded = F.pad(img[None], (2, 2, 2, 2), mode="reflect")
                img = F.conv2d(padded, (k1[:, None] * k1[None, :]).expand(3, 1, 5, 5), groups=3)[0]
            if params.solarize_apply[b, v]:
                img = torch.where(img >= float(params.solarize_threshold[b, v]), 1 - img, img)
            torch.testing.assert_close(views[b, v].double(), img, atol=1e-5, rtol=0)
    assert params.gray.any() and params.blur_apply.any() and params.solarize_apply.any()


# ---------------------------------------------------------------- Foster's differentiable colour ops


def _colour_reference(x: np.ndarray, f) -> np.ndarray:
    """float64 numpy: brightness, contrast, saturation (clamped), then YIQ hue rotation (not clamped)."""
    out = _jitter_reference(x, list(f[:3]) + [0.0], [0, 1, 2])
    forward = np.array(RGB_TO_YIQ)
    angle = 2 * math.pi * f[3]
    rotation = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    matrix = np.linalg.inv(forward) @ rotation @ forward
    return np.einsum("ij,jhw->ihw", matrix, out)


def test_colour_matches_numpy_reference_and_zero_hue_keeps_luma():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(5, 3, 6, 7, generator=g)
    factors = sample_colour_factors(5, strength=1.0, generator=g)
    out = colour(x, factors)
    for b in range(5):
        np.testing.assert_allclose(
            out[b].double().numpy(), _colour_reference(x[b].double().numpy(), factors[b].double().tolist()), atol=1e-5
        )
    luma = torch.tensor(RGB_TO_YIQ[0]).view(1, 3, 1, 1)
    rotated_only = colour(x, torch.tensor([[1.0, 1.0, 1.0, 0.3]]).expand(5, 4))
    torch.testing.assert_close((rotated_only * luma).sum(1), (x * luma).sum(1), atol=1e-5, rtol=0)


def test_colour_gradients_and_double_backward():
    g = torch.Generator().manual_seed(9)
    # Mid-range pixels and factors near 1: no clamp is active, so the function is smooth at the check point.
    x = (0.35 + 0.3 * torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    factors = torch.tensor(
        [[1.1, 0.9, 1.05, 0.05], [0.95, 1.08, 0.9, -0.07], [1.0, 1.0, 1.0, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    assert torch.autograd.gradcheck(colour, (x, factors))
    assert torch.autograd.gradgradcheck(colour, (x, factors))
    # Foster's gradient penalty shape: grad w.r.t. per-sample factors with create_graph, then backprop again.
    (grad,) = torch.autograd.grad((colour(x, factors) ** 2).sum(), factors, create_graph=True)
    penalty = (grad**2).sum()
    penalty.backward()
    assert factors.grad is not None and torch.isfinite(factors.grad).all() and factors.grad.abs().sum() > 0


def test_unnormalized_views_and_foster_gradient_penalty_recipe():
    x = (smooth_images(6, 3, 22, 22, seed=12) * 255).round().to(torch.uint8)
    overrides = dict(jitter_p=0.0, gray_p=0.0)
    raw_aug = MultiViewAugment(
        "colour",
        size=16,
        views=1,
        backend="kornia",
        normalize=False,
        generator=torch.Generator().manual_seed(0),
        **overrides,
    )
    raw, params = raw_aug(x, return_params=True)
    assert raw.min() >= 0 and raw.max() <= 1
    normalized = MultiViewAugment("colour", size=16, views=1, backend="kornia", **overrides).replay(x, params)
    torch.testing.assert_close(raw_aug.normalize(raw), normalized, atol=1e-6, rtol=0)
    # Foster et al.'s penalty: leaf factors, encode, grad w.r.t. factors (create_graph), penalty, backprop.
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8), torch.nn.Tanh())
    alpha = sample_colour_factors(6, 0.5, generator=g).requires_grad_()
    h = F.normalize(encoder(raw_aug.normalize(colour(raw[:, 0], alpha))), dim=1)
    signs = torch.randint(0, 2, h.shape, generator=g).float() * 2 - 1
    (grad_alpha,) = torch.autograd.grad((h * signs).sum(), alpha, create_graph=True)
    other = torch.stack([sample_colour_factors(6, 0.5, generator=g) for _ in range(10)])
    penalty = ((grad_alpha[None] * (other - alpha.detach()[None])).sum(-1) ** 2).mean().clamp(max=1)
    penalty.backward()
    weight_grad = encoder[1].weight.grad
    assert penalty > 0 and torch.isfinite(weight_grad).all() and weight_grad.abs().sum() > 0


def test_sample_colour_factors_ranges():
    f = sample_colour_factors(20000, strength=0.5, generator=torch.Generator().manual_seed(0))
    assert f.shape == (20000, 4) and f.dtype == torch.float32
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    assert f[:, :3].min() < 0.61 and f[:, :3].max() > 1.39  # fills the range
    torch.testing.assert_close(f.mean(0), torch.tensor([1.0, 1.0, 1.0, 0.0]), atol=0.01, rtol=0)


# ---------------------------------------------------------------- parameter distributions (statistical)

N_STAT = 20000  # samples x views; binomial std of a rate <= 0.0036, tolerances are >= 5 std


def _params(preset, size=32, height=64, width=64, strength=1.0, **overrides):
    policy = resolve(preset, size, strength, overrides)
    return sample_params(policy, N_STAT // 2, 2, height, width, torch.Generator().manual_seed(123))


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_probabilities_and_factor_ranges(preset):
    spec = PRESETS[preset]
    p = _params(preset, size=64)
    assert abs(p.flip.float().mean() - 0.5) < 0.02
    assert abs(p.jitter_apply.float().mean() - spec["jitter_p"]) < 0.02
    assert abs(p.gray.float().mean() - spec["gray_p"]) < 0.02
    blur = spec["blur_p"] if isinstance(spec["blur_p"], tuple) else (spec["blur_p"],) * 2
    solar = spec["solarize_p"] if isinstance(spec["solarize_p"], tuple) else (spec["solarize_p"],) * 2
    for v in range(2):
        assert abs(p.blur_apply[:, v].float().mean() - blur[v]) < 0.02
        assert abs(p.solarize_apply[:, v].float().mean() - solar[v]) < 0.02
    magnitudes = torch.tensor(spec["jitter"])
    low = torch.tensor([1.0, 1.0, 1.0, 0.0]) - magnitudes
    high = torch.tensor([1.0, 1.0, 1.0, 0.0]) + magnitudes
    factors = p.jitter.reshape(-1, 4)
    assert (factors >= low - 1e-6).all() and (factors <= high + 1e-6).all()
    # Uniform: the observed extremes come within 1 % of the range ends, the mean sits at the centre.
    assert ((factors.min(0).values - low) < 0.02 * (high - low)).all()
    assert ((high - factors.max(0).values) < 0.02 * (high - low)).all()
    torch.testing.assert_close(factors.mean(0), (low + high) / 2, atol=0.02, rtol=0)
    assert abs(p.blur_sigma.min() - 0.1) < 0.01 and abs(p.blur_sigma.max() - 2.0) < 0.01


def test_order_is_a_permutation_uniform_or_fixed():
    order = _params("simclr").order.reshape(-1, 4)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand_as(order))
    first = torch.bincount(order[:, 0], minlength=4).float() / order.shape[0]
    assert (first - 0.25).abs().max() < 0.02
    fixed = _params("colour").order.reshape(-1, 4)
    assert torch.equal(fixed, torch.arange(4).expand_as(fixed))


def test_simclr_blur_off_below_64_pixels():
    assert not _params("simclr", size=32).blur_apply.any()


@pytest.mark.parametrize("preset,scale_low", [("simclr", 0.08), ("supcon", 0.2)])
def test_crop_box_distribution(preset, scale_low):
    height, width = 64, 80
    box = _params(preset, height=height, width=width).box.reshape(-1, 4)
    x0, y0, w, h = box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width).all() and (y0 + h <= height).all()
    area = (w * h).double() / (height * width)
    aspect = w.double() / h.double()
    # Rounding to whole pixels moves area and aspect by at most about one pixel per side.
    assert area.min() >= scale_low * 0.9 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.9 and aspect.max() <= 4 / 3 * 1.1
    assert area.quantile(0.05) < scale_low + 0.1 and area.quantile(0.95) > 0.8  # the whole range is used
    # Offsets are uniform over the free room: the mean relative position is 1/2.
    room = (width - w).double()
    rel = x0[room > 0].double() / room[room > 0]
    assert abs(rel.mean() - 0.5) < 0.02


def test_strength_mapping_table():
    base = resolve("byol", 64, 1.0, {})
    zero = resolve("byol", 64, 0.0, {})
    double = resolve("byol", 64, 2.0, {})
    assert base.scale == (0.08, 1.0) and base.jitter == (0.4, 0.4, 0.2, 0.1) and base.blur_p == (1.0, 0.1)
    assert zero.scale == (1.0, 1.0) and zero.ratio == (1.0, 1.0) and zero.jitter == (0.0, 0.0, 0.0, 0.0)
    assert zero.flip_p == zero.jitter_p == zero.gray_p == 0 and zero.blur_p == (0, 0) and zero.solarize_p == (0, 0)
    assert double.scale[0] == pytest.approx(0.08**2) and double.jitter == pytest.approx((0.8, 0.8, 0.4, 0.2))
    assert double.jitter_p == 1.0 and double.gray_p == pytest.approx(0.4) and double.blur_p == pytest.approx((1, 0.2))
    assert double.solarize_p == pytest.approx((0.0, 0.4)) and double.blur_sigma == pytest.approx((0.1, 3.9))
    assert double.flip_p == 0.5 and resolve("simclr", 32, 9.0, {}).jitter[3] == 0.5


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_mean_pixel_change_grows_with_strength(preset):
    x = smooth_images(48, 3, 32, 32, seed=11)
    identity = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    changes = []
    for s in (0.0, 0.25, 0.5, 1.0, 1.5):
        aug = MultiViewAugment(
            preset,
            size=32,
            views=2,
            strength=s,
            backend="kornia",
            generator=torch.Generator().manual_seed(0),
            normalize=False,
        )
        changes.append(float((aug(x) - identity[:, None]).abs().mean()))
    assert changes[0] < 1e-5
    assert all(b > a for a, b in zip(changes, changes[1:])), changes


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(size=0), "size"),
        (dict(size=-3), "size"),
        (dict(size=2.5), "size"),
        (dict(views=0), "views"),
        (dict(preset="moco"), "preset"),
        (dict(strength=-0.1), "strength"),
        (dict(strength=float("nan")), "strength"),
        (dict(backend="cuda"), "backend"),
        (dict(output_dtype=torch.int8), "output_dtype"),
        (dict(jitter_p=1.5), "jitter_p"),
        (dict(scale=(0.5, 0.2)), "scale"),
        (dict(blur_kernel=4), "blur_kernel"),
        (dict(jitter=(0.1, 0.1)), "jitter"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(std=(0.0, 1.0, 1.0)), "std"),
        (dict(colour_jitter=0.5), "overrides"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MultiViewAugment(**kwargs)


@pytest.mark.parametrize(
    "x,error,name",
    [
        (torch.rand(3, 32, 32), ValueError, "4-D"),
        (torch.rand(2, 2, 8, 8), ValueError, "C = 1 or 3"),
        (torch.rand(2, 4, 8, 8), ValueError, "C = 1 or 3"),
        (torch.rand(0, 3, 8, 8), ValueError, "non-empty"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), TypeError, "uint8"),
        (np.zeros((2, 3, 8, 8)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_tensor(x, error, name):
    with pytest.raises(error, match=name):
        MultiViewAugment(backend="kornia")(x)


def test_replay_rejects_mismatched_params():
    aug = MultiViewAugment(backend="kornia", generator=torch.Generator().manual_seed(0))
    _, params = aug(torch.rand(4, 3, 40, 40), return_params=True)
    with pytest.raises(ValueError, match="batch"):
        aug.replay(torch.rand(3, 3, 40, 40), params)
    with pytest.raises(ValueError, match="inside"):
        aug.replay(torch.rand(4, 3, 10, 10), params)
    with pytest.raises(TypeError, match="AugmentParams"):
        aug.replay(torch.rand(4, 3, 40, 40), {"box": params.box})


def test_triton_backend_without_cuda_or_interpreter_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the triton backend can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        MultiViewAugment(backend="triton")(torch.rand(2, 3, 8, 8))


def test_colour_bad_input():
    with pytest.raises(ValueError, match="factors"):
        colour(torch.rand(2, 3, 4, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="x"):
        colour(torch.rand(2, 1, 4, 4), torch.ones(2, 4))
    with pytest.raises(TypeError, match="x"):
        colour(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.ones(2, 4))
    with pytest.raises(ValueError, match="strength"):
        sample_colour_factors(4, strength=2.0)


@pytest.mark.parametrize("name", ["pipeline", "params", "colour"])
def test_docstring_examples_run(name):
    # "fastcl.augment.colour" the attribute is the function; the module is looked up by name.
    module = importlib.import_module(f"fastcl.augment.{name}")
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
