"""A U-Net with a ResNet-18/34 encoder in plain PyTorch: any band count, any class count, any input size.

Encoder parameter names follow torchvision's ResNet (conv1, bn1, layer1..layer4, downsample.0/1), so a
torchvision or timm ResNet state dict loads into `UNet.encoder` key for key when the width is 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ConfigError

BLOCKS: dict[str, tuple[int, int, int, int]] = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
STRIDE = 32  # total downsampling of the encoder: inputs are padded to a multiple of it


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and an identity (or 1x1 projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual update of x."""
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        out: torch.Tensor = self.relu(self.bn2(self.conv2(y)) + identity)
        return out


class ResNetEncoder(nn.Module):
    """ResNet trunk returning the features at strides 2, 4, 8, 16 and 32 for the decoder's skips."""

    def __init__(self, in_channels: int, encoder: str = "resnet18", width: int = 64) -> None:
        super().__init__()
        if encoder not in BLOCKS:
            raise ConfigError(f"unknown encoder {encoder!r}; valid encoders are {sorted(BLOCKS)}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.channels = (width, width, 2 * width, 4 * width, 8 * width)
        stages = []
        cin = width
        for i, n in enumerate(BLOCKS[encoder]):
            cout = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features from fine to coarse."""
        f1 = self.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(self.maxpool(f1))
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        f5 = self.layer4(f4)
        return [f1, f2, f3, f4, f5]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip from the encoder, and mix with two 3x3 convolutions."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv_bn_relu(cin + cskip, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Merge coarse context with the finer skip."""
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        out: torch.Tensor = self.block(torch.cat([x, skip], dim=1))
        return out


class UNet(nn.Module):
    """Per-pixel classifier: float32 (N, bands, H, W) -> logits (N, classes, H, W) for any H, W.

    Inputs whose sides are not multiples of 32 are padded by edge replication and the logits cropped back,
    so callers never have to know the encoder's stride.
    """

    def __init__(self, in_channels: int, num_classes: int, encoder: str = "resnet18", width: int = 64) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or width < 2:
            raise ConfigError(f"need in_channels, num_classes >= 1 and width >= 2, "
                              f"got {in_channels}, {num_classes}, {width}")
        self.encoder = ResNetEncoder(in_channels, encoder, width)
        c1, c2, c3, c4, c5 = self.encoder.channels
        self.full = _conv_bn_relu(in_channels, max(width // 2, 1))  # a full-resolution skip keeps edges sharp
        self.up4 = DecoderBlock(c5, c4, c4)
        self.up3 = DecoderBlock(c4, c3, c3)
        self.up2 = DecoderBlock(c3, c2, c2)
        self.up1 = DecoderBlock(c2, c1, c1)
        self.up0 = DecoderBlock(c1, max(width // 2, 1), width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's own height and width."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % STRIDE, (-w) % STRIDE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = x.contiguous(memory_format=torch.channels_last)
        f1, f2, f3, f4, f5 = self.encoder(x)
        y = self.up4(f5, f4)
        y = self.up3(y, f3)
        y = self.up2(y, f2)
        y = self.up1(y, f1)
        y = self.up0(y, self.full(x))
        logits: torch.Tensor = self.head(y)[..., :h, :w]
        return logits


def build_unet(in_channels: int, num_classes: int, encoder: str = "resnet18", width: int = 64) -> UNet:
    """A fresh U-Net in channels_last layout, the layout oneDNN convolutions are fastest in on CPU."""
    model = UNet(in_channels, num_classes, encoder, width)
    # in place; Module.to takes memory_format at run time, but torch's overloads of it leave that out
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model
