"""The mosaic stage: predictions.zarr → ``classes``, ``confidence`` and ``margin`` Cloud Optimized GeoTIFFs, built
by Ray tasks.

A COG is cut into parts of ``BLOCK * 2**K`` px square, so that every tile of levels 0..K (full resolution
and the first K overviews) falls inside one part. A Ray task per part reads its window of the store (plus
the few pixels beyond it that odd-sized overviews reach), computes those levels (``overviews.py``: the
pixels GDAL's COG driver computes), deflates every tile of every raster and counts the classes. Then one
assembly task per raster computes the coarsest levels from the parts' level K, writes the header and IFDs
and then the tiles in COG order (``cog.py``), and publishes the file with one rename or upload, so a reader
never sees a half-written mosaic. Tasks get only a handle on the store (``store.Predictions``: its URL and
chunk shape; ``store.py`` alone knows how its chunks are laid out) and a window; the compressed tiles pass
from part to assembly through Ray's object store, and only the class counts reach the driver.

A raster of more than ``grid_above`` pixels (default ``GRID_ABOVE_PX``) becomes a grid of COGs of ``cell``
px (``classes/ROW_COL.tif``, ``confidence/ROW_COL.tif``, ...) and a GDAL VRT over each grid (``classes.vrt``,
``confidence.vrt``, ``margin.vrt``, relative paths, with the colour table and tags), which GDAL and QGIS open as one
raster: no single file grows past what one task writes, and the cells are assembled in parallel.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import ray
from affine import Affine
from rasterio.crs import CRS
from rasterio.io import MemoryFile

from geoseg import cog, storage
from geoseg.arrays import Band, ClassMap, Counts
from geoseg.grid import Grid
from geoseg.model.card import ModelCard
from geoseg.overviews import ceil_div, downsample, level_shapes, source_level, source_span
from geoseg.progress import bar
from geoseg.store import PredictionArray, Predictions, open_predictions

CLASSES_TIF = "classes.tif"
CONFIDENCE_TIF = "confidence.tif"
CLASSES_VRT = "classes.vrt"
CONFIDENCE_VRT = "confidence.vrt"
MARGIN_DESCRIPTION = ("margin between the two most likely classes' probabilities x 255, at least 1: high = sure, "
                      "1 = a tie; 0 = no data")
BLOCK = cog.BLOCK
GRID_ABOVE_PX = 2**30  # larger rasters become a grid of COGs: a single COG of 1 Gpx stays well under 4 GiB
GRID_CELL = 16384  # px per side of a grid cell (268 Mpx): 16 parts of 4096 px
ASSEMBLY_PX = 2**22  # parts compute levels until one holds at most this many px; assembly computes the rest
ONE_TASK_PX = 2**26  # up to 67 Mpx, one task (0.4 s of CPU at 26 Mpx here) beats starting workers for parts
MAX_PART_LEVELS = 3  # a part is at most BLOCK * 2**3 = 4096 px square (16.7 Mpx of each raster)


@dataclass(frozen=True)
class MosaicResult:
    """What the mosaic wrote in RUN_DIR: the class, confidence and margin rasters (``classes.tif``,
    ``confidence.tif`` and ``margin.tif``, or ``.vrt`` files over grids of COGs), and the pixel count of each
    class id > 0."""

    classes: str
    confidence: str
    counts: dict[int, int]
    margin: str = "margin.tif"


@dataclass(frozen=True)
class _Raster:
    """One of the rasters: its array in the store (also its file name), overview resampling, tags, colours."""

    name: PredictionArray
    average: bool
    tags: tuple[tuple[str, str], ...]
    colormap: tuple[tuple[int, tuple[int, int, int, int]], ...] | None


@dataclass(frozen=True)
class _Window:
    """One COG to write: a window of the store, its georeferencing and the levels its parts compute."""

    predictions: Predictions
    row: int
    col: int
    height: int
    width: int
    crs: str
    transform: tuple[float, ...]
    part_levels: int

    @property
    def parts(self) -> tuple[int, int]:
        """Rows and columns of parts."""
        side = BLOCK << self.part_levels
        return ceil_div(self.height, side), ceil_div(self.width, side)


@dataclass(frozen=True)
class _Part:
    """A part's result: tile sizes per raster and level (0..K), class counts, and level K of each raster (its
    tiles' bytes are the part task's other results, one per raster)."""

    sizes: dict[str, list[cog.Sizes]]
    counts: Counts
    coarse: dict[str, Band]


def colormap(card: ModelCard) -> dict[int, tuple[int, int, int, int]]:
    """The classes' colours as a GDAL colour table (0, no data, transparent)."""
    table = {0: (0, 0, 0, 0)}
    for c in card.classes:
        table[c.id] = (int(c.color[1:3], 16), int(c.color[3:5], 16), int(c.color[5:7], 16), 255)
    return table


def class_raster(run_dir: str) -> str:
    """The class raster a run left: ``classes.vrt`` where it wrote a grid of COGs, else ``classes.tif``."""
    vrt = storage.join(run_dir, CLASSES_VRT)
    return vrt if storage.exists(vrt) else storage.join(run_dir, CLASSES_TIF)


def default_part_levels(height: int, width: int) -> int:
    """Overview levels the parts compute: the fewest (at least one, when there are overviews) that leave the
    assembly a level of at most ``ASSEMBLY_PX``, and never parts larger than ``MAX_PART_LEVELS`` allows."""
    shapes = level_shapes(height, width, BLOCK)
    k = min(1, len(shapes) - 1)
    while k < min(len(shapes) - 1, MAX_PART_LEVELS) and shapes[k][0] * shapes[k][1] > ASSEMBLY_PX:
        k += 1
    return k


def _part_levels(shapes: list[tuple[int, int]], wanted: int) -> int:
    """``wanted``, within the levels there are, and at least up to the last level GDAL makes from full
    resolution (1 px wide rasters): the assembly has only level K to work from."""
    from_full = [lv for lv in range(2, len(shapes)) if source_level(shapes, lv) == 0]
    return min(max(wanted, *from_full, 0), len(shapes) - 1)


def output_bytes(grid: Grid) -> int:
    """An upper estimate of the three rasters' size, checked against the free space before the mosaic starts: one
    byte per pixel each, uncompressed, plus a third for the overviews (deflate only makes them smaller)."""
    return 3 * grid.width * grid.height * 4 // 3 + 2**20


def mosaic(run_dir: str, grid: Grid, card: ModelCard, tags: dict[str, str], *, grid_above: int = GRID_ABOVE_PX,
           cell: int = GRID_CELL, part_levels: int | None = None, progress: bool = False) -> MosaicResult:
    """Write the class, confidence and margin rasters into RUN_DIR from its predictions.zarr (Ray must be up).

    ``part_levels`` overrides :func:`default_part_levels` (the output is the same; tests use it to make many
    small parts). ``cell`` must be a multiple of ``BLOCK``.
    """
    if cell % BLOCK:
        raise ValueError(f"cell must be a multiple of {BLOCK}, got {cell}")
    names = json.dumps({str(c.id): c.name for c in card.classes})
    rasters = (
        _Raster("classes", False, tuple({"CLASS_NAMES": names, **tags}.items()), tuple(colormap(card).items())),
        _Raster("confidence", True, tuple({"SCALE": "1/255",
                                           "DESCRIPTION": "max softmax probability x 255; 0 = no data",
                                           **tags}.items()), None),
        _Raster("margin", True, tuple({"SCALE": "1/255", "DESCRIPTION": MARGIN_DESCRIPTION, **tags}.items()), None),
    )
    predictions = open_predictions(run_dir)
    if grid.width * grid.height <= grid_above:
        counts = _run([(_window(predictions, grid, 0, 0, grid.height, grid.width, part_levels),
                        [storage.join(run_dir, f"{r.name}.tif") for r in rasters])], rasters)
        return MosaicResult(CLASSES_TIF, CONFIDENCE_TIF, counts, "margin.tif")
    cells = [(_window(predictions, grid, r0, c0, min(cell, grid.height - r0), min(cell, grid.width - c0), part_levels),
              f"{r0 // cell}_{c0 // cell}.tif")
             for r0 in range(0, grid.height, cell) for c0 in range(0, grid.width, cell)]
    counts = _run([(w, [storage.join(run_dir, r.name, name) for r in rasters]) for w, name in cells], rasters,
                  progress)
    for r in rasters:
        storage.write_bytes(storage.join(run_dir, f"{r.name}.vrt"), _vrt(grid, r, cells))
    return MosaicResult(CLASSES_VRT, CONFIDENCE_VRT, counts, "margin.vrt")


def _window(predictions: Predictions, grid: Grid, row: int, col: int, height: int, width: int,
            part_levels: int | None) -> _Window:
    t = grid.transform * Affine.translation(col, row)
    k = default_part_levels(height, width) if part_levels is None else part_levels
    return _Window(predictions, row, col, height, width, grid.crs, tuple(t)[:6],
                   _part_levels(level_shapes(height, width, BLOCK), k))


def _run(windows: Sequence[tuple[_Window, list[str]]], rasters: Sequence[_Raster], progress: bool = False
         ) -> dict[int, int]:
    """Parts then assembly of every window, a few windows at a time (bounded memory in the object store)."""
    env = {"env_vars": storage.task_env()}
    part = ray.remote(_part_task).options(num_returns=1 + len(rasters), num_cpus=1, max_retries=2, runtime_env=env)
    assemble = ray.remote(_assemble_task).options(num_cpus=1, max_retries=2, runtime_env=env)
    if len(windows) == 1 and windows[0][0].height * windows[0][0].width <= ONE_TASK_PX:
        whole = ray.remote(_whole_task).options(num_cpus=1, max_retries=2, runtime_env=env)
        total = ray.get(whole.remote(windows[0][0], rasters, windows[0][1]))
        return {int(c): int(total[c]) for c in np.flatnonzero(total) if c > 0}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    in_flight: deque[list[ray.ObjectRef[Counts]]] = deque()
    total = np.zeros(256, np.int64)
    cells = bar(len(windows), "mosaic", "cell", progress)
    for window, urls in windows:
        rows, cols = window.parts
        side = BLOCK << window.part_levels
        refs: list[list[ray.ObjectRef[Any]]] = [[] for _ in range(rows * cols)]
        # largest parts first, so that the last to finish are small; a result per raster and one more each: the
        # part's sizes and counts, then each raster's tiles
        for k in sorted(range(rows * cols), key=lambda k: -min(side, window.height - k // cols * side)
                        * min(side, window.width - k % cols * side)):
            # num_returns > 1: a list of refs, which ray's annotations cannot express
            refs[k] = cast(list[ray.ObjectRef[Any]], part.remote(window, rasters, *divmod(k, cols)))
        metas = [r[0] for r in refs]
        in_flight.append([assemble.remote(window, raster, url, len(refs), *metas, *[r[1 + k] for r in refs])
                          for k, (raster, url) in enumerate(zip(rasters, urls, strict=True))])
        while len(in_flight) > max(1, cpus // (rows * cols)):
            total += ray.get(in_flight.popleft())[0]
            cells.update()
    while in_flight:
        total += ray.get(in_flight.popleft())[0]
        cells.update()
    cells.close()
    return {int(c): int(total[c]) for c in np.flatnonzero(total) if c > 0}


def _whole_task(window: _Window, rasters: Sequence[_Raster], urls: Sequence[str]) -> Counts:
    """Parts and assembly of a small raster in one task: in a warm worker (the tile readers'), which costs
    less than starting the workers that parallel parts would need; its class counts."""
    rows, cols = window.parts
    parts = [_part_task(window, rasters, *divmod(k, cols)) for k in range(rows * cols)]
    metas = [p[0] for p in parts]
    counts = [_assemble_task(window, raster, url, len(parts), *metas, *[p[1 + k] for p in parts])
              for k, (raster, url) in enumerate(zip(rasters, urls, strict=True))]
    return counts[0]


def _owned(shapes: Sequence[tuple[int, int]], levels: int, row: int, col: int) -> list[tuple[int, int, int, int]]:
    """Rows and columns (r0, r1, c0, c1) of each level 0..``levels`` whose tiles belong to part (row, col)."""
    out = []
    for lv in range(levels + 1):
        side = BLOCK << (levels - lv)
        h, w = shapes[lv]
        out.append((min(row * side, h), min((row + 1) * side, h), min(col * side, w), min((col + 1) * side, w)))
    return out


def _needed(shapes: list[tuple[int, int]], owned: Sequence[tuple[int, int, int, int]]
            ) -> list[tuple[int, int, int, int]]:
    """What each level must be computed over: its own tiles, and the pixels the levels below are made from
    (a few beyond its own where a side is odd), for NEAREST and AVERAGE alike."""
    need = list(owned)
    for lv in range(len(owned) - 1, 0, -1):
        r0, r1, c0, c1 = need[lv]
        if r1 <= r0 or c1 <= c0:
            continue
        src = source_level(shapes, lv)
        (hs, ws), (hd, wd) = shapes[src], shapes[lv]
        s0, s1, t0, t1 = need[src]
        for average in (False, True):
            s1 = max(s1, source_span(hs, hd, r0, r1, average)[1])
            t1 = max(t1, source_span(ws, wd, c0, c1, average)[1])
        need[src] = (s0, s1, t0, t1)
    return need


def pyramid_part(band: Band, shapes: list[tuple[int, int]], owned: Sequence[tuple[int, int, int, int]],
                 need: Sequence[tuple[int, int, int, int]], average: bool) -> list[Band]:
    """Each level's own pixels of a part, from ``band`` (level 0 over ``need[0]``)."""
    levels = [band]
    for lv in range(1, len(owned)):
        r0, r1, c0, c1 = need[lv]
        src = source_level(shapes, lv)
        levels.append(downsample(levels[src], (need[src][0], need[src][2]), shapes[src], shapes[lv], (r0, r1), (c0, c1),
                                 average))
    return [lvl[o[0] - n[0]:o[1] - n[0], o[2] - n[2]:o[3] - n[2]]
            for lvl, o, n in zip(levels, owned, need, strict=True)]


def class_counts(classes: ClassMap) -> Counts:
    """Pixels of each value 0..255 of a uint8 array.

    Counted as pairs of pixels (one uint16 each, 65536 bins) in slices of 512 Ki pairs: bincount widens every
    element to 8 bytes first, so half as many elements in cache-sized slices take half the time.
    """
    flat = np.ascontiguousarray(classes).ravel()
    pairs = flat[:len(flat) // 2 * 2].view(np.uint16)
    table = np.zeros(65536, np.int64)
    for i in range(0, len(pairs), 1 << 19):
        table += np.bincount(pairs[i:i + (1 << 19)], minlength=65536)
    by_byte = table.reshape(256, 256)
    counts: Counts = by_byte.sum(0) + by_byte.sum(1)
    if len(flat) % 2:
        counts[flat[-1]] += 1
    return counts


def _part_task(window: _Window, rasters: Sequence[_Raster], row: int, col: int
               ) -> tuple[_Part, *tuple[npt.NDArray[np.uint8], ...]]:
    """Read one part of the store, compute its levels and deflate their tiles (a Ray task)."""
    shapes = level_shapes(window.height, window.width, BLOCK)
    owned = _owned(shapes, window.part_levels, row, col)
    need = _needed(shapes, owned)
    r0, r1, c0, c1 = need[0]
    sizes: dict[str, list[cog.Sizes]] = {}
    blobs: list[npt.NDArray[np.uint8]] = []  # each raster's deflated tiles, end to end
    coarse: dict[str, Band] = {}
    counts = np.zeros(256, np.int64)
    for raster in rasters:
        name, average = raster.name, raster.average
        band = window.predictions.read(name, (window.row + r0, window.row + r1), (window.col + c0, window.col + c1))
        levels = pyramid_part(band, shapes, owned, need, average)
        if name == "classes":
            counts = class_counts(levels[0])
        pieces = [cog.deflate_tiles(lvl) for lvl in levels]
        sizes[name] = [s.reshape(ceil_div(lvl.shape[0], BLOCK), ceil_div(lvl.shape[1], BLOCK))
                       for lvl, (_, s) in zip(levels, pieces, strict=True)]
        blobs.append(np.concatenate([b for b, _ in pieces]))
        coarse[name] = levels[-1] if window.part_levels < len(shapes) - 1 else np.zeros((0, 0), np.uint8)
    return _Part(sizes, counts, coarse), *blobs


def _tile_order(window: _Window, parts: Sequence[_Part], name: str, lv: int) -> Iterator[tuple[int, int, int]]:
    """(part, byte offset in its blob, size) of each tile of level ``lv`` <= K, in the level's row-major order."""
    span = 1 << (window.part_levels - lv)  # tile rows of this level per part
    _, part_cols = window.parts
    height = level_shapes(window.height, window.width, BLOCK)[lv][0]
    for ty in range(ceil_div(height, BLOCK)):
        prow, local = divmod(ty, span)
        for i in range(prow * part_cols, (prow + 1) * part_cols):
            sizes = parts[i].sizes[name]
            row = sizes[lv][local]
            start = sum(int(s.sum()) for s in sizes[:lv]) + int(sizes[lv][:local].sum())
            for offset, size in zip((start + np.cumsum(row) - row).tolist(), row.tolist(), strict=True):
                yield i, offset, size


def _assemble_task(window: _Window, raster: _Raster, url: str, n: int, *results: object) -> Counts:
    """Write one raster's COG from its parts' tiles and publish it at ``url``; return the parts' class counts.

    ``results`` are the ``n`` parts' :class:`_Part` then their tiles' bytes, flat: Ray resolves the refs of
    a task's arguments only when they are passed one by one."""
    parts = cast(list[_Part], list(results[:n]))
    blobs = cast(list[npt.NDArray[np.uint8]], list(results[n:]))
    shapes = level_shapes(window.height, window.width, BLOCK)
    k = window.part_levels
    coarse = np.zeros(shapes[k], np.uint8)
    _, part_cols = window.parts
    for i, p in enumerate(parts):
        prow, pcol = divmod(i, part_cols)
        block = p.coarse[raster.name]
        coarse[prow * BLOCK:prow * BLOCK + block.shape[0], pcol * BLOCK:pcol * BLOCK + block.shape[1]] = block
    extra = []  # levels K+1.. from level K, here
    above = coarse
    for lv in range(k + 1, len(shapes)):  # each from the one above: parts compute any level made from level 0
        (hs, ws), (hd, wd) = shapes[lv - 1], shapes[lv]
        above = downsample(above, (0, 0), (hs, ws), (hd, wd), (0, hd), (0, wd), raster.average)
        extra.append(cog.deflate_tiles(above))
    orders = [list(_tile_order(window, parts, raster.name, lv)) for lv in range(k + 1)]
    levels = [cog.Level(*shapes[lv], np.array([s for _, _, s in orders[lv]], np.int64)) for lv in range(k + 1)]
    levels += [cog.Level(*shapes[lv], sizes) for lv, (_, sizes) in zip(range(k + 1, len(shapes)), extra, strict=True)]

    def tiles(lv: int) -> Iterator[memoryview]:
        if lv <= k:
            for i, start, size in orders[lv]:
                yield blobs[i].data[start:start + size]
            return
        yield from cog.split(*extra[lv - k - 1])

    template = cog.template_tags(_template(window.crs, window.transform, raster))
    with storage.publishing(url) as out:  # whole or not at all, even if the worker is killed
        cog.write(out, levels, template, tiles)
    return sum((p.counts for p in parts), np.zeros(256, np.int64))


def _template(crs: str, transform: Sequence[float], raster: _Raster) -> bytes:
    """A 1 x 1 px GeoTIFF written by GDAL with the raster's georeferencing, no-data, colours and tags."""
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=1, height=1, count=1, dtype="uint8", crs=CRS.from_user_input(crs),
                      transform=Affine(*transform), nodata=0) as dst:
            if raster.colormap is not None:
                dst.write_colormap(1, dict(raster.colormap))
            dst.update_tags(**dict(raster.tags))
        return bytes(mem.read())


def _vrt(grid: Grid, raster: _Raster, cells: Sequence[tuple[_Window, str]]) -> bytes:
    """A GDAL VRT over the raster's grid of COGs (paths relative to the VRT), with the COGs' tags and colours.

    Its overviews are virtual: GDAL reads a cell's own overview where the factor matches one (cells are
    multiples of 512 px, so all but the coarsest factors do) and resamples the nearest finer one otherwise, so
    they equal a single COG's overviews only where the cells' levels line up.
    """
    with MemoryFile(_template(grid.crs, tuple(grid.transform)[:6], raster)) as mem, mem.open() as src:
        tags, wkt = src.tags(), src.crs.to_wkt()
        table = src.colormap(1) if raster.colormap is not None else None
    root = ET.Element("VRTDataset", rasterXSize=str(grid.width), rasterYSize=str(grid.height))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = wkt
    t = grid.transform
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    meta = ET.SubElement(root, "Metadata")
    for key, value in tags.items():
        ET.SubElement(meta, "MDI", key=key).text = value
    # virtual overviews, read from each cell's own overviews, at the factors a single COG would have
    factors = [str(2**i) for i in range(1, len(level_shapes(grid.height, grid.width, BLOCK)))]
    if factors:
        resampling = "average" if raster.average else "nearest"
        ET.SubElement(root, "OverviewList", resampling=resampling).text = " ".join(factors)
    band = ET.SubElement(root, "VRTRasterBand", dataType="Byte", band="1")
    ET.SubElement(band, "NoDataValue").text = "0"
    if table is not None:
        ET.SubElement(band, "ColorInterp").text = "Palette"
        colours = ET.SubElement(band, "ColorTable")
        for i in range(len(table)):
            c1, c2, c3, c4 = table[i]
            ET.SubElement(colours, "Entry", c1=str(c1), c2=str(c2), c3=str(c3), c4=str(c4))
    for w, name in cells:
        source = ET.SubElement(band, "SimpleSource")
        ET.SubElement(source, "SourceFilename", relativeToVRT="1").text = f"{raster.name}/{name}"
        ET.SubElement(source, "SourceBand").text = "1"
        ET.SubElement(source, "SourceProperties", RasterXSize=str(w.width), RasterYSize=str(w.height), DataType="Byte",
                      BlockXSize=str(BLOCK), BlockYSize=str(BLOCK))
        ET.SubElement(source, "SrcRect", xOff="0", yOff="0", xSize=str(w.width), ySize=str(w.height))
        ET.SubElement(source, "DstRect", xOff=str(w.col), yOff=str(w.row), xSize=str(w.width), ySize=str(w.height))
    ET.indent(root)
    return ET.tostring(root)
