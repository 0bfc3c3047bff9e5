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
from numcodecs import Zstd
from zarr.codecs import ZstdCodec

from geoseg import storage
from geoseg.grid import Grid

TILES = "tiles.zarr"
PREDICTIONS = "predictions.zarr"
# tiles.zarr is scratch written once and read once per tile: stored raw, it costs the reader and the actor
# a copy each instead of an LZ4 encode and decode (docs/performance.md)
TILE_CODEC = None
PREDICTION_CODEC = ZstdCodec(level=0, checksum=False)  # zarr's default, written here by PREDICTION_ZSTD
PREDICTION_ZSTD = Zstd(level=0)


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
                           compressors=PREDICTION_CODEC,
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
        self.tiles_url = storage.join(run_dir, TILES)
        self.predictions_url = storage.join(run_dir, PREDICTIONS)
        tiles = _open(self.tiles_url, "r+")
        pred = _open(storage.join(run_dir, PREDICTIONS), "r+")
        self.image = tiles["image"]
        self.valid = tiles["valid"]
        self.classes = pred["classes"]

    def _chunk(self, name: str, tile_id: int) -> str:
        """The file of a tile's chunk in tiles.zarr (zarr v3's default keys: ``c/tile/0/0...``)."""
        return storage.join(self.tiles_url, name, "c", str(tile_id), *["0"] * (len(getattr(self, name).shape) - 1))

    def write_tile(self, tile_id: int, image: np.ndarray, valid: np.ndarray) -> None:
        """Write one tile's haloed input square (its own chunks only).

        The chunks are raw little-endian bytes, so they are written as such: zarr's write path costs several
        times the copy itself on these 26 MB chunks. zarr (and xarray) read them as usual."""
        storage.write_chunk(self._chunk("image", tile_id), np.ascontiguousarray(image, self.image.dtype.newbyteorder("<")))
        storage.write_chunk(self._chunk("valid", tile_id), np.ascontiguousarray(valid, np.uint8))

    def read_tiles(self, tile_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Read tiles' input squares: (image[N,B,S,S], valid[N,S,S] bool), straight from their raw chunks."""
        image = [storage.read_chunk(self._chunk("image", i), self.image.dtype.newbyteorder("<"), self.image.shape[1:])
                 for i in tile_ids]
        valid = [storage.read_chunk(self._chunk("valid", i), np.dtype(np.uint8), self.valid.shape[1:]) for i in tile_ids]
        if len(tile_ids) == 1:
            return image[0][None], valid[0][None].view(bool)
        return np.stack(image), np.stack(valid).view(bool)

    def write_prediction(self, rows: slice, cols: slice, classes: np.ndarray, confidence: np.ndarray) -> None:
        """Write one tile core's class ids and confidence (exactly one chunk of each array), encoded here as
        zarr would (zstd of the chunk padded to full size with 0) without its per-call overhead."""
        side = self.classes.chunks[0]
        key = ("c", str(rows.start // side), str(cols.start // side))
        for name, values in (("classes", classes), ("confidence", confidence)):
            chunk = np.zeros((side, side), np.uint8)
            chunk[:values.shape[0], :values.shape[1]] = values
            encoded = np.frombuffer(PREDICTION_ZSTD.encode(chunk), np.uint8)
            storage.write_chunk(storage.join(self.predictions_url, name, *key), encoded)
