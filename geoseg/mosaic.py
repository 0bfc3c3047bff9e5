"""The mosaic stage: the predictions store → ``classes.tif`` and ``confidence.tif``, Cloud Optimized GeoTIFFs.

Copies the store window by window (one row of tiles by ``WINDOW`` pixels, so memory does not grow with
the raster's width or height) into a tiled GeoTIFF, then lets
GDAL's COG driver add overviews and reorder it; the finished file is published with one rename or
upload, so a reader never sees a half-written mosaic.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import zarr
from rasterio.crs import CRS

from geoseg import storage
from geoseg.grid import Grid
from geoseg.model.card import ModelCard
from geoseg.store import PREDICTIONS

CLASSES_TIF = "classes.tif"
CONFIDENCE_TIF = "confidence.tif"
MOSAIC_CACHE_MB = 64  # GDAL's block cache defaults to 5% of RAM, which would grow with the mosaic
WINDOW = 2048  # columns copied at a time


def colormap(card: ModelCard) -> dict[int, tuple[int, int, int, int]]:
    """The classes' colours as a GDAL colour table (0, no data, transparent)."""
    table = {0: (0, 0, 0, 0)}
    for c in card.classes:
        table[c.id] = (int(c.color[1:3], 16), int(c.color[3:5], 16), int(c.color[5:7], 16), 255)
    return table


def mosaic(run_dir: str, grid: Grid, card: ModelCard, tags: dict[str, str], window: int = WINDOW) -> dict[int, int]:
    """Write both COGs into RUN_DIR, copying ``window`` columns at a time; return the pixel count of each class id."""
    store = zarr.open_group(storage.join(run_dir, PREDICTIONS), mode="r",
                            storage_options=storage.storage_options(run_dir) or None)  # type: ignore[arg-type]
    counts: dict[int, int] = {}
    names = json.dumps({str(c.id): c.name for c in card.classes})
    with tempfile.TemporaryDirectory(prefix="geoseg-mosaic-") as tmp, rasterio.Env(GDAL_CACHEMAX=MOSAIC_CACHE_MB):
        for name, out in (("classes", CLASSES_TIF), ("confidence", CONFIDENCE_TIF)):
            plain, cog = Path(tmp, f"{name}.plain.tif"), Path(tmp, out)
            profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=1, dtype="uint8",
                           crs=CRS.from_user_input(grid.crs), transform=grid.transform, nodata=0, tiled=True,
                           blockxsize=256, blockysize=256, compress="deflate", BIGTIFF="IF_SAFER")
            with rasterio.open(plain, "w", **profile) as dst:
                for r0 in range(0, grid.height, grid.tile_size):
                    r1 = min(r0 + grid.tile_size, grid.height)
                    for c0 in range(0, grid.width, window):
                        c1 = min(c0 + window, grid.width)
                        block = store[name][r0:r1, c0:c1]
                        dst.write(block, 1, window=((r0, r1), (c0, c1)))
                        if name == "classes":
                            for value, n in zip(*_bincount(block)):
                                counts[value] = counts.get(value, 0) + n
                if name == "classes":
                    dst.write_colormap(1, colormap(card))
                    dst.update_tags(CLASS_NAMES=names, **tags)
                else:
                    dst.update_tags(SCALE="1/255", DESCRIPTION="max softmax probability x 255; 0 = no data", **tags)
            rasterio.shutil.copy(plain, cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512,
                                 OVERVIEW_RESAMPLING="NEAREST" if name == "classes" else "AVERAGE", BIGTIFF="IF_SAFER")
            storage.put_file(cog, storage.join(run_dir, out))
    counts.pop(0, None)
    return counts


def _bincount(block: np.ndarray) -> tuple[list[int], list[int]]:
    c = np.bincount(block.ravel(), minlength=256)
    nz = np.flatnonzero(c)
    return nz.tolist(), c[nz].tolist()
