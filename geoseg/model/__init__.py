"""geoseg's land-cover network (unet), its model card (card) and the checkpoint format that carries both (checkpoint).

Only the registry of shipped models lives here, without torch: tile-reading workers import the package
and must not pay for torch.
"""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
SHIPPED: dict[str, Path] = {
    "sentinel2-lulc": WEIGHTS / "sentinel2-lulc.pt",
    "aerial-rgb": WEIGHTS / "aerial-rgb.pt",
}
