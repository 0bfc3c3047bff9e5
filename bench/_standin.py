"""The stand-in network of ``throughput.py --driver``: benchmark only, never on geoseg's path.

To measure the driver's CPU per tile, the forward pass must cost next to nothing, so that the driver (and
the real tile readers) set the pace. Even the narrowest U-Net geoseg builds (width 2) costs about half the
real model per tile on a CPU (BatchNorm, ReLU and upsampling at full resolution), so the stand-in is a
per-pixel linear map instead (a 1x1 convolution with zero weights: every pixel gets the first class, so
the polygons stay few). geoseg builds networks only from a card (``geoseg.model.checkpoint.build_model``),
so :func:`install`, run in every Ray worker of the benchmark's run as its worker setup hook, makes
``build_model`` return the stand-in for a card whose architecture names it, and geoseg's own network for
any other card.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import Tensor, nn

ARCHITECTURE = "benchmark-standin-1x1"


class PixelLinear(nn.Module):
    """Class logits as a linear map of each pixel's bands."""

    def __init__(self, bands: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(bands, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


def install() -> None:
    """Ray worker setup hook: cards naming :data:`ARCHITECTURE` build the stand-in (imports geoseg's model
    module, and so torch, in every worker of the run, tile readers included: their start-up only)."""
    from geoseg.model import checkpoint

    build = checkpoint.build_model

    def build_model(card):  # type: ignore[no-untyped-def]
        return PixelLinear(len(card.bands), len(card.classes)) if card.architecture == ARCHITECTURE else build(card)

    checkpoint.build_model = build_model


def write_checkpoint(path: Path) -> tuple[Path, int]:
    """The stand-in as a geoseg checkpoint: the sentinel2-lulc card (bands, scaling, classes, tile size,
    halo) naming the stand-in's architecture, zero weights. Returns its path and the card's halo."""
    import torch

    from geoseg.model.checkpoint import load_card, save_checkpoint

    card = load_card("sentinel2-lulc")
    card = replace(card, name=f"{card.name}-benchmark-standin", architecture=ARCHITECTURE)
    net = PixelLinear(len(card.bands), len(card.classes))
    with torch.no_grad():
        for weight in net.parameters():
            weight.zero_()
    save_checkpoint(path, card, net)
    return path, card.halo
