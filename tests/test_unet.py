"""The U-Net: any band and class count, any input size, channels_last, torchvision-compatible encoder names."""

from __future__ import annotations

import pytest
import torch

from geoseg.errors import ConfigError
from geoseg.model.unet import build_unet


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
@pytest.mark.parametrize(("bands", "classes", "h", "w"),
                         [(10, 10, 131, 77), (3, 5, 64, 64), (1, 2, 33, 1), (4, 7, 5, 200)])
def test_logits_have_the_input_size_for_odd_sizes(encoder: str, bands: int, classes: int, h: int, w: int) -> None:
    model = build_unet(bands, classes, encoder, width=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, bands, h, w))
    assert out.shape == (2, classes, h, w)
    assert torch.isfinite(out).all()


def test_padding_does_not_change_the_interior() -> None:
    """Cropping back must return the pixels of the real input, not of the padding: a shifted input shifts the output."""
    torch.manual_seed(0)
    model = build_unet(3, 4, width=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        odd = model(x[..., :63, :63])
    assert odd.shape[-2:] == (63, 63)
    # far from the padded edge the receptive field sees the same pixels, so results agree closely
    assert torch.allclose(full[..., :16, :16], odd[..., :16, :16], atol=1e-4)


def test_parameters_are_channels_last() -> None:
    model = build_unet(10, 10, width=8)
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.up1.block[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_encoder_matches_torchvision_resnet_names_and_shapes() -> None:
    """Width 64 with 3 bands gives torchvision's ResNet-18/34 tensors, so their state dicts load key for key."""
    enc18 = build_unet(3, 2, "resnet18", 64).encoder.state_dict()
    assert enc18["conv1.weight"].shape == (64, 3, 7, 7)
    assert enc18["layer3.0.downsample.0.weight"].shape == (256, 128, 1, 1)
    assert enc18["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert "layer1.0.downsample.0.weight" not in enc18
    assert len(enc18) == 120  # torchvision resnet18's 122 entries less fc.weight and fc.bias
    enc34 = build_unet(3, 2, "resnet34", 64).encoder.state_dict()
    assert "layer3.5.bn2.running_var" in enc34 and "layer3.6.conv1.weight" not in enc34
    assert len(enc34) == 216  # torchvision resnet34's 218 less fc


def test_unknown_encoder_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        build_unet(3, 2, "resnet50")


def test_gradients_reach_the_first_layer() -> None:
    model = build_unet(10, 3, width=4)
    model(torch.randn(2, 10, 40, 40)).sum().backward()
    assert model.encoder.conv1.weight.grad is not None and model.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.full[0].weight.grad.abs().sum() > 0
