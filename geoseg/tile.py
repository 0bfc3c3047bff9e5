"""The tile stage: read one tile's haloed square from every scene covering it and store it.

Compositing rule: scenes are taken in the order the user listed them, and each pixel takes its
value from the first scene that has valid data there (later scenes only fill gaps). Pixels outside
the region, or valid in no scene, are stored as invalid and come out as class 0 (no data).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from rasterio.features import geometry_mask
from shapely import wkt as shapely_wkt

from geoseg.cluster import this_node
from geoseg.faults import process_deadline, started
from geoseg.grid import Grid
from geoseg.plan import SceneUse, touches
from geoseg.results import TileError
from geoseg.scenes import SceneReader
from geoseg.store import Stores


@dataclass(frozen=True)
class TileJob:
    """What every tile task of a run shares: small, shipped once to the cluster."""

    run_dir: str
    run_id: str
    execution_id: str  # new for every run or rerun: scenes a worker holds open are not reused across them
    grid: Grid
    scenes: tuple[SceneUse, ...]
    region_grid_wkt: str | None
    dtype: str
    band_count: int
    zero_nodata: bool = False
    """The card's rule: pixels zero in every band of an unmasked scene are nodata (reflectance input)."""

    def scenes_for(self, row: int, col: int) -> list[SceneUse]:
        """Scenes whose footprint box touches the tile's input square, in priority order."""
        box = self.grid.input_boxes(np.array([[row, col]]))
        return [u for u in self.scenes if touches(box, u.grid_bounds)[0]]


def composite(layers: list[tuple[np.ndarray, np.ndarray]], band_count: int, size: int, dtype: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """First-valid-wins composite of (data[B,H,W], valid[H,W]) layers in priority order."""
    if len(layers) == 1 and layers[0][0].dtype == np.dtype(dtype):
        return layers[0]  # one scene: its pixels as read (the forward pass masks the invalid ones)
    image = np.zeros((band_count, size, size), dtype)
    valid = np.zeros((size, size), bool)
    for data, ok in layers:
        take = ok & ~valid
        np.copyto(image, data, where=take[None], casting="unsafe")
        valid |= take
    return image, valid


def make_tile(job: TileJob, stores: Stores, tile_id: int, row: int, col: int) -> None:
    """Read, composite and store one tile; raises on any read or write error (the caller records it)."""
    g = job.grid
    transform = g.input_transform(row, col)
    shape = (g.input_size, g.input_size)
    layers = [open_reader(u.scene.url, job.execution_id).read(u.bands, g.crs, transform, shape, u.aligned,
                                                              job.zero_nodata)
              for u in job.scenes_for(row, col)]
    image, valid = composite(layers, job.band_count, g.input_size, job.dtype)
    if job.region_grid_wkt is not None:
        region = shapely_wkt.loads(job.region_grid_wkt)
        valid &= geometry_mask([region], out_shape=shape, transform=transform, invert=True)
    stores.write_tile(tile_id, image, valid)


@lru_cache(maxsize=8)
def open_reader(url: str, execution_id: str) -> SceneReader:
    """A scene kept open by a reused worker process for the tiles of one execution: the blocks it decoded
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
