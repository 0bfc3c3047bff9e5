"""The run's zarr stores: scene tiles (with halo) and predictions, at a local path or URL.

``tiles.zarr`` holds one chunk per tile and array: ``image`` (tile, band, y, x) in the scene's raw
dtype and ``valid`` (tile, y, x), each tile's square already including its halo, so a tile is
predicted from its own chunk alone. ``predictions.zarr`` is a georeferenced raster (``classes`` and
``confidence``, y, x) chunked exactly by tile core, so every tile writes one chunk and no two tiles
write the same one. Both carry CRS and transform in their attributes; ``predictions.zarr`` also has
``x``/``y`` coordinates and a CF ``spatial_ref`` so xarray/rioxarray open it georeferenced.
"""

from __future__ import annotations

import numpy as np
import zarr

from geoseg import storage
from geoseg.grid import Grid

TILES = "tiles.zarr"
PREDICTIONS = "predictions.zarr"
# tiles.zarr is scratch written once and read once per tile: stored raw, it costs the reader and the actor
# a copy each instead of an LZ4 encode and decode (docs/performance.md)
TILE_CODEC = None
# every chunk is written whole: skip zarr's scan for all-fill-value chunks (a pass over each; a runtime setting)
WHOLE_CHUNKS: dict[str, bool] = {"write_empty_chunks": True}


def _open(url: str, mode: str) -> zarr.Group:
    return zarr.open_group(url, mode=mode, storage_options=storage.storage_options(url) or None)  # type: ignore[arg-type]


def _georef(grid: Grid) -> dict[str, object]:
    t = grid.transform
    return {"crs": grid.crs, "transform": [t.a, t.b, t.c, t.d, t.e, t.f]}


def create(run_dir: str, grid: Grid, tiles: np.ndarray, bands: tuple[str, ...], dtype: str) -> None:
    """Create both stores' metadata before any tile is written (idempotent for an existing run)."""
    s = grid.input_size
    n = int(tiles.shape[0])
    tiles_url = storage.join(run_dir, TILES)
    if not storage.exists(storage.join(tiles_url, "zarr.json")):
        g = _open(tiles_url, "w")
        g.attrs.update({**_georef(grid), "tile_size": grid.tile_size, "halo": grid.halo, "bands": list(bands),
                        "note": "tile i covers input_transform = transform * translation(col*tile_size - halo, "
                                "row*tile_size - halo), with (row, col) = (tile_row[i], tile_col[i])"})
        g.create_array("image", shape=(n, len(bands), s, s), chunks=(1, len(bands), s, s), dtype=dtype,
                       fill_value=0, dimension_names=("tile", "band", "y", "x"), compressors=TILE_CODEC)
        g.create_array("valid", shape=(n, s, s), chunks=(1, s, s), dtype="uint8", fill_value=0,
                       dimension_names=("tile", "y", "x"), compressors=TILE_CODEC)
        g.create_array("tile_row", shape=(n,), dtype="int32", dimension_names=("tile",))[:] = tiles[:, 0]
        g.create_array("tile_col", shape=(n,), dtype="int32", dimension_names=("tile",))[:] = tiles[:, 1]

    pred_url = storage.join(run_dir, PREDICTIONS)
    if not storage.exists(storage.join(pred_url, "zarr.json")):
        g = _open(pred_url, "w")
        g.attrs.update(_georef(grid))
        t = grid.transform
        for name in ("classes", "confidence"):
            g.create_array(name, shape=(grid.height, grid.width), chunks=(grid.tile_size, grid.tile_size),
                           dtype="uint8", fill_value=0, dimension_names=("y", "x"),
                           attributes={"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"})
        g.create_array("x", shape=(grid.width,), dtype="float64", dimension_names=("x",))[:] = \
            t.c + (np.arange(grid.width) + 0.5) * t.a
        g.create_array("y", shape=(grid.height,), dtype="float64", dimension_names=("y",))[:] = \
            t.f + (np.arange(grid.height) + 0.5) * t.e
        ref = g.create_array("spatial_ref", shape=(), dtype="int32", dimension_names=())
        ref.attrs.update({"crs_wkt": grid.crs, "spatial_ref": grid.crs,
                          "GeoTransform": " ".join(str(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e))})


class Stores:
    """Open handles on a run's arrays, held by a worker across many tiles."""

    def __init__(self, run_dir: str) -> None:
        tiles = _open(storage.join(run_dir, TILES), "r+")
        pred = _open(storage.join(run_dir, PREDICTIONS), "r+")
        self.image = tiles["image"].with_config(WHOLE_CHUNKS)
        self.valid = tiles["valid"].with_config(WHOLE_CHUNKS)
        self.classes = pred["classes"].with_config(WHOLE_CHUNKS)
        self.confidence = pred["confidence"].with_config(WHOLE_CHUNKS)

    def write_tile(self, tile_id: int, image: np.ndarray, valid: np.ndarray) -> None:
        """Write one tile's haloed input square (its own chunks only)."""
        self.image[tile_id] = image
        self.valid[tile_id] = valid.astype(np.uint8)

    def read_tiles(self, tile_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Read tiles' input squares: (image[N,B,S,S], valid[N,S,S] bool)."""
        image = np.stack([self.image[i] for i in tile_ids])
        valid = np.stack([self.valid[i] for i in tile_ids]) > 0
        return image, valid

    def write_prediction(self, rows: slice, cols: slice, classes: np.ndarray, confidence: np.ndarray) -> None:
        """Write one tile core's class ids and confidence (exactly one chunk of each array)."""
        self.classes[rows, cols] = classes
        self.confidence[rows, cols] = confidence
