"""``provenance.tif``: where each pixel of the map came from (``composite.py`` says what its values mean).

The tile readers write each tile core's provenance into ``predictions.zarr``; this stage copies it into a
Cloud Optimized GeoTIFF (uint16, deflate, nearest overviews, so a zoomed-out view still holds item
indexes, never averages of them), window by window so memory stays bounded, and publishes it whole.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg import storage
from geoseg.composite import ALL_CLOUDY
from geoseg.grid import Grid
from geoseg.store import read_provenance

PROVENANCE_TIF = "provenance.tif"
WINDOW = 4096  # px per side read from the store at a time: 32 MiB of uint16


def write_provenance(run_dir: str, grid: Grid, rule: str, tags: dict[str, str]) -> str:
    """Publish RUN_DIR/provenance.tif from the store's provenance raster; its file name."""
    meaning = ("number of clear observations" if rule == "median"
               else "1 + index of the item each pixel came from (report.json lists the items)")
    description = f"{meaning}; 0 = no data; {ALL_CLOUDY} = every item that saw it was masked (cloud, shadow)"
    with tempfile.TemporaryDirectory(prefix="geoseg-provenance-") as tmp:
        plain, cog = Path(tmp, "plain.tif"), Path(tmp, PROVENANCE_TIF)
        profile = {"driver": "GTiff", "width": grid.width, "height": grid.height, "count": 1, "dtype": "uint16",
                   "crs": CRS.from_wkt(grid.crs), "transform": grid.transform, "tiled": True, "blockxsize": 512,
                   "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        with rasterio.open(plain, "w", **profile) as dst:
            for r0 in range(0, grid.height, WINDOW):
                for c0 in range(0, grid.width, WINDOW):
                    r1, c1 = min(r0 + WINDOW, grid.height), min(c0 + WINDOW, grid.width)
                    dst.write(read_provenance(run_dir, (r0, r1), (c0, c1)), 1,
                              window=Window(c0, r0, c1 - c0, r1 - r0))
            dst.update_tags(COMPOSITE=rule, DESCRIPTION=description, **tags)
        rasterio.shutil.copy(plain, cog, driver="COG", COMPRESS="DEFLATE", RESAMPLING="NEAREST",
                             BIGTIFF="IF_SAFER")
        storage.put_file(cog, storage.join(run_dir, PROVENANCE_TIF))
    return PROVENANCE_TIF
