"""``probabilities.tif``: every class's probability per pixel, for a run with ``probabilities``.

The inference actors write each tile core's probabilities (uint8, ``round(p x 255)``, one band per class, so a
pixel's bands sum to 255 give or take the number of classes) into ``predictions.zarr``; this stage copies them
into a multi-band Cloud Optimized GeoTIFF (deflate, averaged overviews, band descriptions the class names),
window by window so memory stays bounded, and publishes it whole, as ``provenance.py`` does its raster.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg import storage
from geoseg.grid import Grid
from geoseg.model.card import ModelCard
from geoseg.store import read_probabilities

PROBABILITIES_TIF = "probabilities.tif"
WINDOW = 2048  # px per side read from the store at a time: 4 MiB per class


def write_probabilities(run_dir: str, grid: Grid, card: ModelCard, tags: dict[str, str]) -> str:
    """Publish RUN_DIR/probabilities.tif (band k: the card's k-th class) from the store; its file name."""
    with tempfile.TemporaryDirectory(prefix="geoseg-probabilities-") as tmp:
        plain, cog = Path(tmp, "plain.tif"), Path(tmp, PROBABILITIES_TIF)
        profile = {"driver": "GTiff", "width": grid.width, "height": grid.height, "count": len(card.classes),
                   "dtype": "uint8", "crs": CRS.from_wkt(grid.crs), "transform": grid.transform, "tiled": True,
                   "blockxsize": 512, "blockysize": 512, "compress": "deflate", "interleave": "band",
                   "BIGTIFF": "IF_SAFER"}
        with rasterio.open(plain, "w", **profile) as dst:
            for r0 in range(0, grid.height, WINDOW):
                for c0 in range(0, grid.width, WINDOW):
                    r1, c1 = min(r0 + WINDOW, grid.height), min(c0 + WINDOW, grid.width)
                    dst.write(read_probabilities(run_dir, (r0, r1), (c0, c1)),
                              window=Window(c0, r0, c1 - c0, r1 - r0))
            for band, c in enumerate(card.classes, start=1):
                dst.set_band_description(band, c.name)
                dst.update_tags(band, CLASS_ID=str(c.id))
            dst.update_tags(SCALE="1/255", DESCRIPTION="probability of each band's class x 255 (rounded); "
                            "all bands 0 = no data", **tags)
        rasterio.shutil.copy(plain, cog, driver="COG", COMPRESS="DEFLATE", RESAMPLING="AVERAGE",
                             BIGTIFF="IF_SAFER")
        storage.put_file(cog, storage.join(run_dir, PROBABILITIES_TIF))
    return PROBABILITIES_TIF
