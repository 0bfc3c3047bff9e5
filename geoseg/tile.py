"""The tile stage: read one tile's haloed square from every item (date) covering it, composite and store it.

Each item is read onto the square band by band from its files (one multi-band scene, or a catalogue item's
per-band assets at their own resolutions), converted to the model card's reflectance convention (its
``offset``), and masked by its cloud and shadow mask where it has one. ``composite.py`` then combines the
items by the run's rule and says where each pixel came from. Pixels outside the region, or usable in no item,
are stored as invalid and come out as class 0 (no data).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.features import geometry_mask
from shapely import wkt as shapely_wkt

from geoseg.arrays import Image, Mask
from geoseg.clouds import CLEAR, CLOUD, NODATA, SHADOW, CloudMask, scl_mask
from geoseg.cluster import this_node
from geoseg.composite import Observation, composite
from geoseg.faults import process_deadline, started
from geoseg.grid import Grid
from geoseg.plan import Item, touches
from geoseg.results import TileError
from geoseg.scenes import SceneReader
from geoseg.store import Stores

OPEN_FILES = 128  # files a worker keeps open: a tile of a catalogue reads 11 per date (10 bands and SCL)


@dataclass(frozen=True)
class TileJob:
    """What every tile task of a run shares: small, shipped once to the cluster."""

    run_dir: str
    run_id: str
    execution_id: str  # new for every run or rerun: scenes a worker holds open are not reused across them
    grid: Grid
    items: tuple[Item, ...]
    rule: str
    """The composite rule (``composite.RULES``); ``items`` are in its order."""
    region_grid_wkt: str | None
    dtype: str
    band_count: int
    zero_nodata: bool = False
    """The card's rule: pixels zero in every band of an unmasked scene are nodata (reflectance input)."""
    mask_buffer: int = 0
    """Pixels by which cloud and shadow masks grow (``RunPlan.mask_buffer_m`` on the grid)."""

    def items_for(self, row: int, col: int) -> list[int]:
        """Indexes of the items whose footprint box touches the tile's input square, in the rule's order."""
        box = self.grid.input_boxes(np.array([[row, col]]))
        return [k for k, item in enumerate(self.items) if touches(box, item.grid_bounds)[0]]


def read_item(job: TileJob, k: int, transform: Affine, shape: tuple[int, int]) -> Observation:
    """Item ``k`` on a tile's input square: its bands in the model's order and card's convention, usable where
    every band has data and its mask (if any) says clear."""
    item, g = job.items[k], job.grid
    seen = np.ones(shape, bool)
    sources = item.sources
    if len(sources) == 1 and sources[0].slots == tuple(range(job.band_count)):
        src = sources[0]
        data, seen = open_reader(src.scene.url, job.execution_id).read(src.bands, g.crs, transform, shape,
                                                                       src.aligned, job.zero_nodata)
    else:
        data = np.zeros((job.band_count, *shape), job.dtype)
        for src in sources:
            part, ok = open_reader(src.scene.url, job.execution_id).read(src.bands, g.crs, transform, shape,
                                                                         src.aligned, job.zero_nodata)
            data[list(src.slots)] = part
            seen &= ok
    if item.offset:
        data = shift_reflectance(data, seen, item.offset)
    usable = seen
    if item.mask is not None:
        codes = read_mask(job, item, transform, shape)
        seen = seen & (codes != NODATA)
        usable = seen & (codes == CLEAR)
    return Observation(k, data, usable, seen)


def read_mask(job: TileJob, item: Item, transform: Affine, shape: tuple[int, int]) -> CloudMask:
    """An item's cloud and shadow mask on a tile's input square, in geoseg's codes, with clouds and shadows
    grown by ``job.mask_buffer`` px (hazy rims around them are not clear ground). The square is read
    ``mask_buffer`` px wider on each side and cut back after growing, so every tile sees the same mask."""
    assert item.mask is not None
    b = job.mask_buffer
    wide = (shape[0] + 2 * b, shape[1] + 2 * b)
    codes, ok = open_reader(item.mask.scene.url, job.execution_id).read(
        item.mask.bands, job.grid.crs, transform * Affine.translation(-b, -b), wide, item.mask.aligned,
        resampling=Resampling.nearest)
    codes = scl_mask(codes[0]) if item.mask_kind == "scl" else codes[0].astype(np.uint8)
    codes[~ok] = NODATA
    return _grow(codes, b)[b:b + shape[0], b:b + shape[1]]


def _grow(codes: CloudMask, n: int) -> CloudMask:
    """Clouds, then shadows, grown over clear ground by ``n`` px (a square of side 2n + 1)."""
    if n == 0:
        return codes
    out = codes.copy()
    for code in (SHADOW, CLOUD):  # cloud last: where both reach, it is cloud
        out[_dilate(codes == code, n) & (codes == CLEAR)] = code
    return out


def _dilate(mask: Mask, n: int) -> Mask:
    """Boolean dilation by a (2n + 1)-px square, one axis at a time: window sums from prefix sums."""
    out = mask
    for axis in (0, 1):
        size = out.shape[axis]
        prefix = np.cumsum(out, axis=axis, dtype=np.int32)
        prefix = np.concatenate([np.zeros_like(np.take(prefix, [0], axis)), prefix], axis)  # prefix[k]: first k
        ahead, behind = np.minimum(np.arange(size) + n + 1, size), np.maximum(np.arange(size) - n, 0)
        out = np.take(prefix, ahead, axis) - np.take(prefix, behind, axis) > 0
    return out


def shift_reflectance(data: Image, valid: Mask, offset: float) -> Image:
    """Valid values plus ``offset``, kept inside the dtype and above 0; a 0 stays 0 (reflectance's fill value,
    also in one band of a pixel whose other bands hold data, as along Sentinel-2's 20 m band edges)."""
    top = np.iinfo(data.dtype).max if np.issubdtype(data.dtype, np.integer) else np.inf
    shifted = np.clip(data.astype(np.float64) + offset, 1, top).astype(data.dtype)
    return np.where(valid[None] & (data > 0), shifted, data)


def make_tile(job: TileJob, stores: Stores, tile_id: int, row: int, col: int) -> None:
    """Read, composite and store one tile and its provenance; raises on any read or write error (the caller
    records it)."""
    g = job.grid
    transform = g.input_transform(row, col)
    shape = (g.input_size, g.input_size)
    inside = None if job.region_grid_wkt is None else geometry_mask(
        [shapely_wkt.loads(job.region_grid_wkt)], out_shape=shape, transform=transform, invert=True)
    observations = _observations(job, transform, shape, row, col, inside)
    image, valid, provenance = composite(observations, job.rule, job.band_count, g.input_size, job.dtype)
    if inside is not None:
        valid &= inside
        provenance[~inside] = 0
    stores.write_tile(tile_id, image, valid)
    rows, cols = g.core_window(row, col)
    h = g.halo
    stores.write_provenance(rows, cols, provenance[h:h + rows.stop - rows.start, h:h + cols.stop - cols.start])


def _observations(job: TileJob, transform: Affine, shape: tuple[int, int], row: int, col: int,
                  inside: Mask | None) -> list[Observation]:
    """The items that see the tile, read in the rule's order; a first-usable rule stops reading once every pixel
    of the square (inside the region) has a usable value, as no later date can change it: a clear first date
    costs one read, not one per date."""
    observations: list[Observation] = []
    needed = np.ones(shape, bool) if inside is None else inside.copy()
    for k in job.items_for(row, col):
        observations.append(read_item(job, k, transform, shape))
        if job.rule != "median":
            needed &= ~observations[-1].usable
            if not needed.any():
                break
    return observations


@lru_cache(maxsize=OPEN_FILES)
def open_reader(url: str, execution_id: str) -> SceneReader:
    """A file kept open by a reused worker process for the tiles of one execution: the blocks it decoded
    serve the neighbouring tiles too. A later run or rerun opens it afresh (a repaired scene is read anew)."""
    return SceneReader(url)


@lru_cache(maxsize=4)
def _stores(run_dir: str, run_id: str) -> Stores:
    """The run's open stores, kept by a reused worker process: their metadata is read once, not per tile.

    Keyed on the run id too, since ``--overwrite`` recreates the stores of a RUN_DIR for a new run."""
    return Stores(run_dir)


def run_tiles(job: TileJob, tiles: list[tuple[int, int, int]], fresh: bool, deadline_s: float
              ) -> tuple[str, list[tuple[int, TileError | None]]]:
    """Task body for a run of neighbouring (id, row, col) tiles: the scene blocks they share decode once, and
    the driver handles one task per run. Returns this node's id and (id, error) per tile instead of raising,
    so one bad tile is recorded alone and its neighbours go on. ``fresh``: a retry after an error of the tile's
    own opens its scenes anew (a new GDAL handle), so an error that repeats is the tile's, not the handle's.
    Past ``deadline_s`` of running, the worker process ends (``faults.process_deadline``)."""
    with started(), process_deadline(deadline_s):
        return _run_tiles(job, tiles, fresh)


def _run_tiles(job: TileJob, tiles: list[tuple[int, int, int]], fresh: bool
               ) -> tuple[str, list[tuple[int, TileError | None]]]:
    if fresh:
        open_reader.cache_clear()
    stores = _stores(job.run_dir, job.run_id)
    results: list[tuple[int, TileError | None]] = []
    for tile_id, row, col in tiles:
        try:
            make_tile(job, stores, tile_id, row, col)
            results.append((tile_id, None))
        except Exception as exc:  # recorded per tile; the driver tells whose fault it is (faults.py)
            results.append((tile_id, TileError.of(exc)))
    return this_node(), results
