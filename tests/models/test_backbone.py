"""ResNet backbones: stages cut, strides, norm layers, freezing, and loading torchvision weight files."""
from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from kddetr.errors import UserError
from kddetr.models.backbone import Backbone


def _norm_types(backbone: Backbone) -> set[type]:
    return {type(m) for m in backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}


@pytest.mark.parametrize("name,channels", [("resnet10", 512), ("resnet18", 512), ("resnet34", 512),
                                           ("resnet50", 2048), ("resnet101", 2048)])
def test_output_shape_and_mask(name: str, channels: int) -> None:
    backbone = Backbone(name, num_stages=4).eval()
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 48:] = True
    with torch.no_grad():
        features, small_mask = backbone(torch.randn(2, 3, 64, 96), mask)
    assert backbone.num_channels == channels
    assert features.shape == (2, channels, 2, 3)  # stride 32
    assert small_mask.tolist() == [[[False] * 3] * 2, [[False, False, True]] * 2]


def test_unused_stages_are_not_built() -> None:
    backbone = Backbone("resnet18", num_stages=3)
    assert [name for name, _ in backbone.body.named_children()][-1] == "layer3"
    assert backbone.num_channels == 256
    features, _ = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert features.shape == (1, 256, 4, 4)  # stride 16


def test_dilation_halves_the_stride_of_bottleneck_resnets_only() -> None:
    backbone = Backbone("resnet50", num_stages=4, dilation=True)
    features, _ = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert features.shape[-2:] == (4, 4)
    with pytest.raises(UserError, match="dilation"):
        Backbone("resnet18", dilation=True)


def test_random_init_trains_everything_with_batch_norm() -> None:
    backbone = Backbone("resnet10", num_stages=3)
    assert _norm_types(backbone) == {nn.BatchNorm2d}
    assert all(p.requires_grad for p in backbone.parameters())


def test_train_false_freezes_parameters_and_statistics() -> None:
    backbone = Backbone("resnet10", num_stages=2, train=False).train()
    assert not any(p.requires_grad for p in backbone.parameters())
    before = backbone.body.bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 32, 32) + 3, torch.zeros(2, 32, 32, dtype=torch.bool))
    assert torch.equal(backbone.body.bn1.running_mean, before)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_torchvision_weights(tmp_path, suffix: str) -> None:
    reference = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial statistics, so that a frozen BN is not an identity
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    path = tmp_path / f"r18{suffix}"
    state = reference.state_dict()
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))

    backbone = Backbone("resnet18", num_stages=4, weights=str(path)).eval()
    assert _norm_types(backbone) == {FrozenBatchNorm2d}
    trainable = {k.split(".")[0] for k, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # stem and stage 1 frozen, as in DETR
    images = torch.randn(2, 3, 64, 64)
    expected = nn.Sequential(*list(reference.children())[:-2]).eval()(images)
    features, _ = backbone(images, torch.zeros(2, 64, 64, dtype=torch.bool))
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)

    cut = Backbone("resnet18", num_stages=3, weights=str(path), frozen_bn=False)  # layer4 and fc skipped
    assert _norm_types(cut) == {nn.BatchNorm2d}
    torch.testing.assert_close(cut.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_mismatched_weights_name_the_file_and_tensors(tmp_path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UserError) as err:
        Backbone("resnet18", weights=str(path))
    assert str(path) in str(err.value) and "unexpected: layer1.2.bn1.bias" in str(err.value)

    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del state["layer2.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(UserError, match=r"missing: layer2\.0\.conv1\.weight.*wrong shape: conv1\.weight"):
        Backbone("resnet18", weights=str(path))


def test_unreadable_weights_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        Backbone("resnet18", weights=str(tmp_path / "absent.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        Backbone("resnet18", weights=str(bad))
