"""Encoders and heads of the reference trainer."""

import numpy as np
import pytest
import torch

from fastcl.models import ContrastiveModel, ConvNet, ReweightHead, build_encoder, build_head, resnet18, resnet50


@pytest.mark.parametrize("name, dim, params", [("resnet18", 512, 11_168_832), ("resnet50", 2048, 23_500_352)])
def test_cifar_resnet_dims_and_size(name, dim, params):
    # Parameter counts of the CIFAR ResNets without the classifier (torchvision's minus fc, 3x3 stem).
    net = build_encoder(name)
    assert net.dim == dim
    assert sum(p.numel() for p in net.parameters()) == params
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, dim)


def test_resnet_stem_keeps_resolution():
    # 3x3 stride-1 stem and no max-pool: the first stage still sees 32x32.
    net = resnet18()
    seen = {}
    net.stages[0].register_forward_hook(lambda module, inputs, output: seen.update(shape=output.shape))
    net(torch.randn(2, 3, 32, 32))
    assert seen["shape"][-2:] == (32, 32)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in resnet50().modules())


def test_convnet_dim_and_odd_input():
    net = ConvNet(dim=48, width=8)
    assert net(torch.randn(5, 3, 27, 31)).shape == (5, 48)


def test_reweight_head_matches_kappa_powers_and_is_fixed():
    h = torch.randn(7, 13, dtype=torch.float64)
    head = ReweightHead(13, kappa=1.3)
    expected = h.numpy() * (1.3 ** -np.arange(13))[None]
    np.testing.assert_allclose(head(h.float()).numpy(), expected, rtol=1e-5)
    assert list(head.parameters()) == []  # not trainable
    assert "weights" in head.state_dict()


@pytest.mark.parametrize("kind, out_dim", [("mlp", 32), ("linear", 32), ("none", 20), ("reweight", 20)])
def test_heads_shapes(kind, out_dim):
    head = build_head(kind, 20, 32)
    assert head(torch.randn(6, 20)).shape == (6, out_dim)


def test_mlp_head_layers():
    head = build_head("mlp", 16, 8)
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_none_head_is_identity_and_model_returns_both():
    model = ContrastiveModel(build_encoder("convnet"), "none")
    h, z = model(torch.randn(4, 3, 32, 32))
    assert torch.equal(h, z)
    assert model.proj_dim == model.dim == 128


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_head("deep", 4), "head must be one of"),
        (lambda: build_encoder("vit"), "encoder must be one of"),
        (lambda: ReweightHead(4, kappa=0.0), "kappa must be > 0"),
    ],
)
def test_bad_model_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
