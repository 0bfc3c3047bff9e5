"""Polygonising one block: its regions in global pixel coordinates, split into finished polygons and the pieces
that cross an internal block border (with the 1-pixel strips along those borders that joining needs).

Coordinates are global pixel (col, row) so that pieces cut by a block border share their edges exactly.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window

from geoseg.errors import ConfigError
from geoseg.polygonise.raster import read_window

ClassBlock = npt.NDArray[np.integer[Any]]
"""(y, x) class ids of one block, 0 = nodata: any integer dtype of up to 4 bytes (geoseg writes uint8)."""
ConfidenceBlock = npt.NDArray[np.number[Any]]
"""(y, x) confidence of one block on the class raster's grid, 0..255."""
LabelImage = npt.NDArray[np.int32]
"""(y, x) region per pixel of one block: region ``k`` has label ``k + 1``, 0 = nodata."""
Strip = npt.NDArray[np.int32]
"""Labels along one side of a block, pixel by pixel (0 = nodata)."""
Labels = npt.NDArray[np.integer[Any]]
"""Sorted labels of some of a block's regions (those crossing its borders, or all of them)."""
Geoms = npt.NDArray[np.object_]
"""Shapely geometries, one per region."""
Wkb = npt.NDArray[np.object_]
"""WKB bytes, one per region: compact to ship from a task, and written to the GeoPackage as is."""
Int64s = npt.NDArray[np.int64]
"""One integer per region: class id, pixel count."""
Float64s = npt.NDArray[np.float64]
"""One float per region: the sum of its confidence (NaN when there is no confidence raster)."""
BlockKey = tuple[int, int]
"""A block's (row, column) in the block grid."""
Side = Literal["top", "bottom", "left", "right"]


@dataclass(frozen=True)
class BlockWindow:
    """One block of the raster: its place in the block grid and which of its sides are internal."""

    bi: int
    bj: int
    row_off: int
    col_off: int
    height: int
    width: int
    top: bool  # an internal border on this side (a neighbouring block exists)
    bottom: bool
    left: bool
    right: bool

    @property
    def key(self) -> BlockKey:
        """The block's place in the grid, as the seam joiner and the sieve key their per-block data."""
        return self.bi, self.bj

    def window(self) -> Window:
        """The rasterio window to read the block with."""
        return Window(self.col_off, self.row_off, self.width, self.height)


def block_grid(height: int, width: int, block_size: int) -> list[BlockWindow]:
    """Blocks of ``block_size`` pixels covering the raster in row-major order."""
    if block_size < 1:
        raise ConfigError(f"block size must be >= 1 pixel, got {block_size}")
    rows = range(0, height, block_size)
    cols = range(0, width, block_size)
    return [BlockWindow(bi, bj, r, c, min(block_size, height - r), min(block_size, width - c),
                        top=r > 0, bottom=r + block_size < height, left=c > 0, right=c + block_size < width)
            for bi, r in enumerate(rows) for bj, c in enumerate(cols)]


@dataclass
class Regions:
    """A block's regions as GDAL's polygoniser found them (region ``k`` has label ``k + 1``)."""

    geoms: Geoms  # valid (Multi)Polygons in global pixel coordinates
    classes: Int64s  # class id per region
    counts: Int64s  # pixels per region


@dataclass
class Labelled(Regions):
    """A block's regions and its label image, for per-region sums over pixels and the full border strips."""

    labels: LabelImage


def block_regions(classes: ClassBlock, row_off: int, col_off: int, connectivity: int) -> Regions:
    """Polygonise one block (GDAL's own polygoniser defines the regions, so they are exactly its regions).

    Self-touching rings (8-connectivity) are made valid here, each still one region; with 4-connectivity
    GDAL writes such contacts as a hole touching its shell, which is valid.
    """
    with _gc_paused():
        found = _shapes(classes, row_off, col_off, connectivity)
        geoms, values = _geometries(found)
    return _valid_regions(geoms, values, connectivity)


def label_block(classes: ClassBlock, row_off: int, col_off: int, connectivity: int) -> Labelled:
    """Polygonise one block and rasterise the polygons back to a label image, which lets per-region sums
    be read without a second labelling code."""
    with _gc_paused():
        found = _shapes(classes, row_off, col_off, connectivity)
        geoms, values = _geometries(found)
        labels = np.zeros(classes.shape, dtype=np.int32)
        if found:
            labels = rasterio.features.rasterize(((g, i + 1) for i, (g, _) in enumerate(found)),
                                                 out_shape=classes.shape, transform=_to_pixels(row_off, col_off),
                                                 fill=0, dtype="int32")
    regions = _valid_regions(geoms, values, connectivity)
    return Labelled(regions.geoms, regions.classes, regions.counts, labels)


def _to_pixels(row_off: int, col_off: int) -> Affine:
    return Affine.translation(col_off, row_off)


def _shapes(classes: ClassBlock, row_off: int, col_off: int, connectivity: int) -> list[tuple[dict[str, Any], float]]:
    return list(rasterio.features.shapes(classes, mask=classes != 0, connectivity=connectivity,
                                         transform=_to_pixels(row_off, col_off)))


def _geometries(found: Sequence[tuple[dict[str, Any], float]]) -> tuple[Geoms, Int64s]:
    geoms = polygons_from_geojson([g for g, _ in found])
    values = np.fromiter((v for _, v in found), dtype=np.float64, count=len(found)).astype(np.int64)
    return geoms, values


def _valid_regions(geoms: Geoms, values: Int64s, connectivity: int) -> Regions:
    """Make 8-connected self-touching regions valid (still one region each) and count their pixels."""
    if connectivity == 8:
        bad = ~shapely.is_valid(geoms)
        geoms[bad] = shapely.make_valid(geoms[bad], method="structure", keep_collapsed=False)
    counts = np.rint(shapely.area(geoms)).astype(np.int64)  # pixel polygons: area in px2 is the pixel count
    return Regions(geoms, values, counts)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: GeoJSON is millions of small lists and tuples, none of them in a
    cycle, and the collector rescanning them took about half of the polygonising time (measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def polygons_from_geojson(polys: Sequence[Mapping[str, Any]]) -> Geoms:
    """GeoJSON-like polygons to shapely in a few vectorised calls (per-ring Python objects are the slow part)."""
    if not polys:
        return np.zeros(0, dtype=object)
    rings = [r for p in polys for r in p["coordinates"]]
    ring_len = np.fromiter((len(r) for r in rings), dtype=np.int64, count=len(rings))
    ring_of = np.repeat(np.arange(len(rings)), ring_len)
    poly_of = np.repeat(np.arange(len(polys)), [len(p["coordinates"]) for p in polys])
    chain = itertools.chain.from_iterable
    xy = np.fromiter(chain(chain(rings)), dtype=np.float64, count=2 * int(ring_len.sum())).reshape(-1, 2)
    # with ``indices`` both always return arrays (the stubs also allow a single geometry)
    linear_rings = cast(Geoms, shapely.linearrings(xy, indices=ring_of))
    return cast(Geoms, shapely.polygons(linear_rings, indices=poly_of))


def region_sums(labels: LabelImage, n: int, values: ConfidenceBlock) -> Float64s:
    """Sum of ``values`` over each region's pixels."""
    sums = np.bincount(labels.ravel(), weights=values.ravel().astype(np.float64), minlength=n + 1)[1:]
    return cast(Float64s, sums)  # float64 with weights (the stubs say integers)


@dataclass
class Strips:
    """Labels along a block's internal sides (0 where nodata); None on a side at the raster's edge."""

    top: Strip | None
    bottom: Strip | None
    left: Strip | None
    right: Strip | None

    def side(self, side: Side) -> Strip | None:
        """The strip along one side, by name (as the seams name them)."""
        strip: Strip | None = getattr(self, side)
        return strip


def border_strips(labels: LabelImage, win: BlockWindow) -> Strips:
    """The 1-pixel strips of a block along its internal sides: all that joining needs of the pixels."""
    return Strips(labels[0].copy() if win.top else None, labels[-1].copy() if win.bottom else None,
                  labels[:, 0].copy() if win.left else None, labels[:, -1].copy() if win.right else None)


def edge_strips(classes: ClassBlock, geoms: Geoms, win: BlockWindow) -> Strips:
    """The labels along a block's internal sides without rasterising the block.

    A run of equal class along a side is connected, so it lies in one region: the region holding the
    centre of the run's first pixel (never on a polygon edge, which lie on the pixel grid) labels it.
    """
    tree = shapely.STRtree(geoms)

    def side(values: ClassBlock, rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]) -> Strip:
        start = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        run_label = np.zeros(len(start), dtype=np.int32)
        inside = np.flatnonzero(values[start] != 0)
        centres = shapely.points(cols[start[inside]] + win.col_off + 0.5, rows[start[inside]] + win.row_off + 0.5)
        point, region = tree.query(centres, predicate="within")
        run_label[inside[point]] = region + 1
        return np.repeat(run_label, np.diff(np.r_[start, len(values)]))

    h, w = classes.shape
    across, down = np.arange(w), np.arange(h)
    return Strips(side(classes[0], np.zeros(w, int), across) if win.top else None,
                  side(classes[-1], np.full(w, h - 1), across) if win.bottom else None,
                  side(classes[:, 0], down, np.zeros(h, int)) if win.left else None,
                  side(classes[:, -1], down, np.full(h, w - 1)) if win.right else None)


def crossing_labels(strips: Strips) -> Labels:
    """Labels (1-based) of the regions that touch an internal border, sorted."""
    parts = [s for s in (strips.top, strips.bottom, strips.left, strips.right) if s is not None]
    if not parts:
        return np.zeros(0, dtype=np.int32)
    u = np.unique(np.concatenate(parts))
    return u[u > 0]


@dataclass
class Finished:
    """Complete regions ready to write: WKB geometries with their class, pixel count and confidence sum."""

    wkb: Wkb
    classes: Int64s
    counts: Int64s
    conf: Float64s  # sum of confidence (0..255) per region, NaN when absent


@dataclass
class BlockPieces:
    """What the driver takes from a block: its finished regions, and what joining needs of the pieces
    crossing its borders. The pieces' geometries travel apart (see :func:`polygonise_block`)."""

    win: BlockWindow
    final: Finished  # CRS coordinates when the task was given the transform, else pixel coordinates
    piece_labels: Labels  # sorted labels of the pieces touching internal borders
    piece_classes: Int64s
    piece_counts: Int64s
    piece_conf: Float64s
    strips: Strips


def polygonise_block(classes: ClassBlock, confidence: ConfidenceBlock | None, win: BlockWindow,
                     connectivity: int, transform: Affine | None = None) -> tuple[BlockPieces, Wkb]:
    """Polygonise one block; split its regions into finished polygons and pieces crossing a border.

    Returns the block's pieces and, apart, the crossing pieces' WKB in pixel coordinates (exact shared
    edges for the union): on Ray that array stays in the object store until a merge task takes it, so the
    driver never holds the geometries of regions left open along the front. Finished polygons are put in
    CRS coordinates here when ``transform`` is given, so the driver only has to write their WKB.
    """
    regions: Regions
    if confidence is None:  # no per-pixel sums wanted: the strips are read off the polygons, no label image
        regions = block_regions(classes, win.row_off, win.col_off, connectivity)
        conf = np.full(len(regions.geoms), np.nan)
        strips = edge_strips(classes, regions.geoms, win)
    else:
        regions = labelled = label_block(classes, win.row_off, win.col_off, connectivity)
        conf = region_sums(labelled.labels, len(labelled.geoms), confidence)
        strips = border_strips(labelled.labels, win)
    crossing = crossing_labels(strips)
    is_final = np.ones(len(regions.geoms), dtype=bool)
    is_final[crossing - 1] = False
    final = regions.geoms[is_final]
    if transform is not None:
        final = to_crs(final, transform)
    idx = crossing - 1
    block = BlockPieces(win, Finished(wkb_of(final), regions.classes[is_final], regions.counts[is_final],
                                      conf[is_final]),
                        crossing, regions.classes[idx], regions.counts[idx], conf[idx], strips)
    return block, wkb_of(regions.geoms[idx])


def wkb_of(geoms: Geoms) -> Wkb:
    """The WKB of every geometry: an object array of ``bytes`` (the stubs say ``bytes_``)."""
    return cast(Wkb, shapely.to_wkb(geoms))


def to_crs(geoms: Geoms, transform: Affine) -> Geoms:
    """Pixel (col, row) coordinates to the raster's CRS through its affine transform."""
    a, b, c, d, e, f = transform[:6]
    m = np.array([[a, d], [b, e]])
    moved: Geoms = shapely.transform(geoms, lambda xy: xy @ m + (c, f))
    return moved


@dataclass(frozen=True)
class BlockTask:
    """The unit of work shipped to a worker: where to read one block and what to do with it."""

    classes_path: str
    confidence_path: str | None
    win: BlockWindow
    connectivity: int
    raster_width: int
    remap: Int64s | None = None  # new class per label of this block (minimum mapping unit), or None
    transform: Affine | None = None  # when set, finished polygons come back in CRS coordinates (spares the driver)


def read_classes(task: BlockTask) -> ClassBlock:
    """The block's classes, with the minimum mapping unit's new classes applied when the task has them."""
    classes: ClassBlock = read_window(task.classes_path, task.win.window())
    if task.remap is not None:
        labels = label_block(classes, task.win.row_off, task.win.col_off, task.connectivity).labels
        classes = task.remap[labels].astype(classes.dtype)
    return classes


def polygonise_task(task: BlockTask) -> tuple[BlockPieces, Wkb]:
    """Read and polygonise one block (a Ray task, or a plain call without Ray)."""
    conf = read_window(task.confidence_path, task.win.window()) if task.confidence_path else None
    return polygonise_block(read_classes(task), conf, task.win, task.connectivity, task.transform)
