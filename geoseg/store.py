"""The run's zarr stores: scene tiles (with halo) and predictions, at a local path or URL.

``tiles.zarr`` holds one chunk per tile and array: ``image`` (tile, band, y, x) in the scene's raw
dtype and ``valid`` (tile, y, x), each tile's square already including its halo, so a tile is
predicted from its own chunk alone. ``predictions.zarr`` is a georeferenced raster (``classes``,
``confidence`` and ``margin``, y, x) chunked exactly by tile core, so every tile writes one chunk and no two
tiles write the same one; a run with ``probabilities`` also has ``probabilities`` (class, y, x), one chunk of
every class's band per tile core. Both carry CRS and transform in their attributes (GeoZarr's ``proj:`` convention in
both, its ``spatial:`` one for ``predictions.zarr``'s rasters); ``predictions.zarr`` also has ``x``/``y``
coordinates and a CF ``spatial_ref`` so xarray/rioxarray open it georeferenced, and the ``provenance`` raster
(uint16, ``composite.py``), written by the tile readers through zarr.

This module is the one place that knows the stores' layout on disk (chunk keys, codecs, fill values):
workers write chunk files directly (:class:`Stores`) and the mosaic reads them back directly
(:func:`open_predictions`), both faster than zarr's own per-chunk path, while zarr and xarray still read
the stores as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import numpy.typing as npt
import zarr
from numcodecs import Zstd
from pyproj import CRS
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.core.common import JSON
from zarr.core.metadata import ArrayV3Metadata

from geoseg import storage
from geoseg.arrays import ClassMap, Confidence, Image, Mask, TileIndex
from geoseg.errors import RunDirError
from geoseg.grid import Grid
from geoseg.overviews import ceil_div

TILES = "tiles.zarr"
PREDICTIONS = "predictions.zarr"
# tiles.zarr is scratch written once and read once per tile: stored raw, it costs the reader and the actor
# a copy each instead of an LZ4 encode and decode (docs/performance.md)
TILE_CODEC = None
PREDICTION_CODEC = ZstdCodec(level=0, checksum=False)  # zarr's default, written here by PREDICTION_ZSTD
PREDICTION_ZSTD = Zstd(level=0)
PredictionArray = Literal["classes", "confidence", "margin"]
PREDICTION_ARRAYS: tuple[PredictionArray, ...] = ("classes", "confidence", "margin")
PROVENANCE = "provenance"
PROBABILITIES = "probabilities"
# GeoZarr's conventions for georeferencing (zarr-conventions geo-proj and spatial), registered as they ask
_PROJ: dict[str, JSON] = {
    "schema_url": "https://raw.githubusercontent.com/zarr-experimental/geo-proj/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-experimental/geo-proj/blob/v1/README.md",
    "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f", "name": "proj:",
    "description": "Coordinate reference system information for geospatial data"}
_SPATIAL: dict[str, JSON] = {
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
    "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
    "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4", "name": "spatial",
    "description": "Spatial coordinate information"}


def _open(url: str, mode: Literal["r", "r+", "w"]) -> zarr.Group:
    return zarr.open_group(url, mode=mode, storage_options=storage.storage_options(url) or None)


def _array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array ``name`` of a store's group; a group by that name means the store is not one geoseg wrote."""
    member = group[name]
    if not isinstance(member, zarr.Array):
        raise RunDirError(f"{group.store_path} holds a group {name!r} where geoseg writes an array: "
                          "this RUN_DIR was not written by geoseg; choose another, or run again with --overwrite")
    return member


def _open_array(url: str, name: str) -> zarr.Array[Any]:
    return zarr.open_array(url, path=name, mode="r", storage_options=storage.storage_options(url) or None)


def _georef(grid: Grid) -> dict[str, JSON]:
    t = grid.transform
    return {"crs": grid.crs, "transform": [t.a, t.b, t.c, t.d, t.e, t.f]}


def _proj(grid: Grid) -> dict[str, JSON]:
    """The grid's CRS in GeoZarr's ``proj:`` convention: its EPSG code where it has one, else its WKT2."""
    code = CRS.from_user_input(grid.crs).to_epsg()
    return {"proj:code": f"EPSG:{code}"} if code else {"proj:wkt2": grid.crs}


def _geozarr(grid: Grid) -> dict[str, JSON]:
    """A (y, x) raster on the grid in GeoZarr's ``proj:`` and ``spatial:`` conventions (GDAL 3.13 reads them)."""
    t = grid.transform
    xs, ys = (t.c, t.c + grid.width * t.a), (t.f, t.f + grid.height * t.e)
    return {"zarr_conventions": [_PROJ, _SPATIAL], **_proj(grid), "spatial:dimensions": ["y", "x"],
            "spatial:transform": [t.a, t.b, t.c, t.d, t.e, t.f], "spatial:shape": [grid.height, grid.width],
            "spatial:bbox": [min(xs), min(ys), max(xs), max(ys)], "spatial:registration": "pixel"}


def create(run_dir: str, grid: Grid, tiles: TileIndex, bands: tuple[str, ...], dtype: str,
           probabilities: int = 0) -> None:
    """Create both stores' metadata before any tile is written (idempotent for an existing run); with
    ``probabilities`` classes, also the per-class probabilities raster."""
    s = grid.input_size
    n = int(tiles.shape[0])
    tiles_url = storage.join(run_dir, TILES)
    if not storage.exists(storage.join(tiles_url, "zarr.json")):
        g = _open(tiles_url, "w")
        attrs: dict[str, JSON] = {
            **_georef(grid), "zarr_conventions": [_PROJ], **_proj(grid),  # the tiles' grids differ: no spatial:
            "tile_size": grid.tile_size, "halo": grid.halo, "bands": list(bands),
            "note": "tile i covers input_transform = transform * translation(col*tile_size - halo, "
                    "row*tile_size - halo), with (row, col) = (tile_row[i], tile_col[i])"}
        g.attrs.update(attrs)
        g.create_array("image", shape=(n, len(bands), s, s), chunks=(1, len(bands), s, s), dtype=dtype,
                       fill_value=0, dimension_names=("tile", "band", "y", "x"), compressors=TILE_CODEC)
        g.create_array("valid", shape=(n, s, s), chunks=(1, s, s), dtype="uint8", fill_value=0,
                       dimension_names=("tile", "y", "x"), compressors=TILE_CODEC)
        g.create_array("tile_row", shape=(n,), dtype="int32", dimension_names=("tile",))[:] = tiles[:, 0]
        g.create_array("tile_col", shape=(n,), dtype="int32", dimension_names=("tile",))[:] = tiles[:, 1]

    pred_url = storage.join(run_dir, PREDICTIONS)
    if not storage.exists(storage.join(pred_url, "zarr.json")):
        g = _open(pred_url, "w")
        g.attrs.update({**_georef(grid), **_geozarr(grid)})
        t = grid.transform
        for name in PREDICTION_ARRAYS[:2]:
            _raster(g, grid, name)
        g.create_array("x", shape=(grid.width,), dtype="float64", dimension_names=("x",))[:] = \
            t.c + (np.arange(grid.width) + 0.5) * t.a
        g.create_array("y", shape=(grid.height,), dtype="float64", dimension_names=("y",))[:] = \
            t.f + (np.arange(grid.height) + 0.5) * t.e
        ref = g.create_array("spatial_ref", shape=(), dtype="int32", dimension_names=())
        ref.attrs.update({"crs_wkt": grid.crs, "spatial_ref": grid.crs,
                          "GeoTransform": " ".join(str(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e))})
    # also added to runs made before them
    if not storage.exists(storage.join(pred_url, "margin", "zarr.json")):
        _raster(_open(pred_url, "r+"), grid, "margin")
    if not storage.exists(storage.join(pred_url, PROVENANCE, "zarr.json")):
        _raster(_open(pred_url, "r+"), grid, PROVENANCE, "uint16")
    if probabilities and not storage.exists(storage.join(pred_url, PROBABILITIES, "zarr.json")):
        side = grid.tile_size
        _open(pred_url, "r+").create_array(
            PROBABILITIES, shape=(probabilities, grid.height, grid.width), chunks=(probabilities, side, side),
            dtype="uint8", fill_value=0, dimension_names=("class", "y", "x"), compressors=PREDICTION_CODEC,
            attributes={"grid_mapping": "spatial_ref", "coordinates": "spatial_ref", **_geozarr(grid),
                        "spatial:dimensions": ["class", "y", "x"]})


def _raster(group: zarr.Group, grid: Grid, name: str, dtype: str = "uint8") -> None:
    """A (y, x) raster of ``predictions.zarr`` chunked by tile core, georeferenced (no data 0)."""
    group.create_array(name, shape=(grid.height, grid.width), chunks=(grid.tile_size, grid.tile_size), dtype=dtype,
                       fill_value=0, dimension_names=("y", "x"), compressors=PREDICTION_CODEC,
                       attributes={"grid_mapping": "spatial_ref", "coordinates": "spatial_ref", **_geozarr(grid)})


def _prediction_key(name: str, row: int, col: int) -> str:
    """Where chunk (row, col) of a predictions.zarr raster lies inside the store (zarr v3's default chunk keys)."""
    return f"{name}/c/{row}/{col}"


class Stores:
    """Open handles on a run's arrays, held by a worker across many tiles."""

    def __init__(self, run_dir: str) -> None:
        self.tiles_url = storage.join(run_dir, TILES)
        self.predictions_url = storage.join(run_dir, PREDICTIONS)
        tiles = _open(self.tiles_url, "r+")
        pred = _open(storage.join(run_dir, PREDICTIONS), "r+")
        self.image = _array(tiles, "image")
        self.valid = _array(tiles, "valid")
        self.classes = _array(pred, "classes")
        self.provenance = _array(pred, PROVENANCE)

    def _chunk(self, name: Literal["image", "valid"], tile_id: int) -> str:
        """The file of a tile's chunk in tiles.zarr (zarr v3's default keys: ``c/tile/0/0...``)."""
        ndim = len((self.image if name == "image" else self.valid).shape)
        return storage.join(self.tiles_url, name, "c", str(tile_id), *["0"] * (ndim - 1))

    def write_tile(self, tile_id: int, image: Image, valid: Mask) -> None:
        """Write one tile's haloed input square (its own chunks only).

        The chunks are raw little-endian bytes, so they are written as such: zarr's write path costs several
        times the copy itself on these 26 MB chunks. zarr (and xarray) read them as usual."""
        storage.write_chunk(self._chunk("image", tile_id),
                            np.ascontiguousarray(image, self.image.dtype.newbyteorder("<")))
        storage.write_chunk(self._chunk("valid", tile_id), np.ascontiguousarray(valid, np.uint8))

    def read_tiles(self, tile_ids: list[int]) -> tuple[Image, Mask]:
        """Read tiles' input squares: (image[N,B,S,S], valid[N,S,S] bool), straight from their raw chunks."""
        image = [storage.read_chunk(self._chunk("image", i), self.image.dtype.newbyteorder("<"), self.image.shape[1:])
                 for i in tile_ids]
        valid = [storage.read_chunk(self._chunk("valid", i), np.dtype(np.uint8), self.valid.shape[1:])
                 for i in tile_ids]
        if len(tile_ids) == 1:
            return image[0][None], valid[0][None].view(np.bool_)
        return np.stack(image), np.stack(valid).view(np.bool_)

    def write_provenance(self, rows: slice, cols: slice, provenance: npt.NDArray[np.uint16]) -> None:
        """Write one tile core's provenance (exactly one chunk), from the tile reader that composited it."""
        self.provenance[rows, cols] = provenance

    def write_prediction(self, rows: slice, cols: slice, classes: ClassMap, confidence: Confidence, margin: Confidence,
                         probabilities: npt.NDArray[np.uint8] | None = None) -> None:
        """Write one tile core's class ids, confidence, margin and (class, y, x) probabilities where given
        (exactly one chunk of each array), encoded here as zarr would (zstd of the chunk padded to full size
        with 0) without its per-call overhead."""
        side = self.classes.chunks[0]
        planes: list[tuple[str, npt.NDArray[np.uint8]]] = [
            ("classes", classes[None]), ("confidence", confidence[None]), ("margin", margin[None])]
        if probabilities is not None:
            planes.append((PROBABILITIES, probabilities))
        row, col = rows.start // side, cols.start // side
        for name, values in planes:
            chunk = np.zeros((values.shape[0], side, side), np.uint8)
            chunk[:, :values.shape[1], :values.shape[2]] = values
            encoded = np.frombuffer(PREDICTION_ZSTD.encode(chunk), np.uint8)  # 1 x side x side: a 2-D chunk's bytes
            key = f"{name}/c/0/{row}/{col}" if name == PROBABILITIES else _prediction_key(name, row, col)
            storage.write_chunk(storage.join(self.predictions_url, key), encoded)


@dataclass(frozen=True)
class Predictions:
    """A run's predictions.zarr, to be read by window: small and picklable (a URL and the chunk shape), so it
    travels to the tasks that read it. Made by :func:`open_predictions`."""

    url: str
    chunks: tuple[int, int] | None  # the rasters' chunk shape where :meth:`read` decodes chunk files itself

    def read(self, name: PredictionArray, rows: tuple[int, int], cols: tuple[int, int]) -> ClassMap:
        """Rows ``rows`` x columns ``cols`` (start, stop) of raster ``name`` (classes, confidence or margin,
        all uint8), any window inside the raster; unwritten chunks read as 0 (no data).

        Chunk files are fetched in one batch (concurrently from an object store) and decoded in this thread:
        zarr's own reader hands every chunk to a thread of its event loop, which on a tile-sized chunk costs
        three times the CPU of reading and decoding it (measured on predictions.zarr's 256 px zstd chunks).
        A store whose layout differs from what :func:`create` writes is read through zarr instead.
        """
        (r0, r1), (c0, c1) = rows, cols
        if self.chunks is None:
            return np.asarray(_open_array(self.url, name)[r0:r1, c0:c1])
        ch, cw = self.chunks
        i0, j0 = r0 // ch, c0 // cw
        fs, base = storage.filesystem(self.url)
        keys = {f"{base}/{_prediction_key(name, i, j)}": (i - i0, j - j0) for i in range(i0, ceil_div(r1, ch))
                for j in range(j0, ceil_div(c1, cw))}
        # chunk by chunk into one buffer (decoding into place spares an allocation per chunk), then one copy
        tiles = np.zeros((ceil_div(r1, ch) - i0, ceil_div(c1, cw) - j0, ch, cw), np.uint8)
        zstd = Zstd()
        for path, raw in _cat(fs, self.url, list(keys)).items():
            zstd.decode(raw, out=tiles[keys[path]])
        band = tiles.transpose(0, 2, 1, 3).reshape(tiles.shape[0] * ch, tiles.shape[1] * cw)
        return band[r0 - i0 * ch:r1 - i0 * ch, c0 - j0 * cw:c1 - j0 * cw]


def read_probabilities(run_dir: str, rows: tuple[int, int], cols: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """A window (class, y, x) of the run's probabilities raster (through zarr: it is read once, for
    ``probabilities.tif``)."""
    (r0, r1), (c0, c1) = rows, cols
    return np.asarray(_open_array(storage.join(run_dir, PREDICTIONS), PROBABILITIES)[:, r0:r1, c0:c1], np.uint8)


def read_provenance(run_dir: str, rows: tuple[int, int], cols: tuple[int, int]) -> npt.NDArray[np.uint16]:
    """A window of the run's provenance raster (through zarr: it is read once, for ``provenance.tif``)."""
    (r0, r1), (c0, c1) = rows, cols
    return np.asarray(_open_array(storage.join(run_dir, PREDICTIONS), PROVENANCE)[r0:r1, c0:c1], np.uint16)


def open_predictions(run_dir: str) -> Predictions:
    """RUN_DIR's predictions.zarr for reading by window, after checking once (here, in the caller) that its
    rasters are laid out as :func:`create` writes them (uint8, zstd, fill 0, default ``c/row/col`` keys, one
    chunk shape): then :meth:`Predictions.read` decodes their chunk files itself, else it goes through zarr."""
    url = storage.join(run_dir, PREDICTIONS)
    return Predictions(url, _plain_chunks(url))


def _plain_chunks(url: str) -> tuple[int, int] | None:
    """The chunk shape shared by the store's rasters when their chunks are laid out as :func:`create` writes
    them; None when zarr must read them."""
    shapes = set()
    for name in PREDICTION_ARRAYS:
        meta = _open_array(url, name).metadata
        if not isinstance(meta, ArrayV3Metadata):
            return None
        encoding, grid = meta.chunk_key_encoding, meta.chunk_grid
        if ([type(c) for c in meta.codecs] != [BytesCodec, ZstdCodec] or meta.dtype.to_native_dtype() != np.uint8
                or meta.fill_value != 0 or not isinstance(encoding, DefaultChunkKeyEncoding)
                or encoding.separator != "/" or not isinstance(grid, RegularChunkGrid) or len(grid.chunk_shape) != 2):
            return None
        shapes.add((int(grid.chunk_shape[0]), int(grid.chunk_shape[1])))
    return shapes.pop() if len(shapes) == 1 else None


def _cat(fs: fsspec.AbstractFileSystem, url: str, paths: list[str]) -> dict[str, bytes]:
    """The content of those of ``paths`` that exist (a chunk never written is absent)."""
    if storage.is_remote(url):
        found: dict[str, bytes] = fs.cat(paths, on_error="omit")
        return found
    out = {}
    for path in paths:  # plain reads: fsspec's local file objects cost more than decoding a chunk
        try:
            out[path] = Path(path).read_bytes()
        except FileNotFoundError:
            continue
    return out
