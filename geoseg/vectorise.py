"""Vectorising a class raster block by block, exactly equal to one whole-raster polygonisation.

Every block is polygonised on its own (``rasterio.features.shapes``) in integer *pixel* coordinates,
so that pieces cut by a block border share their edges exactly. A polygon that touches no internal
block border is final as it is. The pieces that touch one carry a label; the 1-pixel strips on both
sides of every border tell which labels are the same region (equal class and adjacent under the
chosen connectivity, diagonals across borders and block corners included for 8-connectivity), a
union-find groups them, and each group's pieces are unioned into one polygon. Only the strips, the
crossing pieces and the finished polygons of a block ever leave the block's task.

Options that change the polygons are off by default:

* ``min_area_m2`` (minimum mapping unit): a first pass collects the patch graph (whole patches, joined
  across borders, with their areas and shared boundary lengths); patches below the unit are merged
  into their largest edge neighbour, smallest first, on the driver; a second pass polygonises the
  blocks with the changed classes, so the result is the exact polygonisation of the sieved raster.
* ``simplify_m``: coverage simplification (``shapely.coverage_simplify``) over all polygons, so that
  neighbours keep sharing exactly the same edges; it holds the whole vector coverage in memory.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window

from geoseg import storage
from geoseg.errors import ConfigError
from geoseg.gpkg import GpkgWriter

LAYER = "landcover"
FIELDS = {"class_id": "int64", "class_name": "str", "area_m2": "float64", "mean_confidence": "float64"}
CLASS_NAMES_TAG = "CLASS_NAMES"
T = TypeVar("T")
BlockKey = tuple[int, int]

# ---------------------------------------------------------------------------------------------------------------
# Pure core: arrays in, geometries out; coordinates are global pixel (col, row) so shared edges are exact.


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
class Labelled:
    """A block's regions: label image (0 = nodata, region ``k`` has label ``k + 1``) and per-region values."""

    labels: np.ndarray | None  # int32, block shape; None unless asked for (``full``)
    geoms: np.ndarray  # valid (Multi)Polygons in global pixel coordinates
    classes: np.ndarray  # int64 class id per region
    counts: np.ndarray  # int64 pixels per region


def label_block(classes: np.ndarray, row_off: int, col_off: int, connectivity: int, full: bool = True) -> Labelled:
    """Polygonise one block, and (``full``) rasterise the polygons back to a label image.

    GDAL's own polygoniser defines the regions (so they are exactly its regions); the label image
    lets per-region sums be read without a second labelling code. Self-touching rings (8-connectivity)
    are made valid here, each still one region; with 4-connectivity GDAL writes such contacts as a
    hole touching its shell, which is valid.
    """
    to_pixels = Affine.translation(col_off, row_off)
    with _gc_paused():
        found = list(rasterio.features.shapes(classes, mask=classes != 0, connectivity=connectivity,
                                              transform=to_pixels))
        geo = polygons_from_geojson([g for g, _ in found])
        values = np.fromiter((v for _, v in found), dtype=np.float64, count=len(found)).astype(np.int64)
        labels = None
        if full:
            labels = np.zeros(classes.shape, dtype=np.int32)
            if found:
                labels = rasterio.features.rasterize(((g, i + 1) for i, (g, _) in enumerate(found)),
                                                     out_shape=classes.shape, transform=to_pixels, fill=0,
                                                     dtype="int32")
    if connectivity == 8:
        bad = ~shapely.is_valid(geo)
        geo[bad] = shapely.make_valid(geo[bad], method="structure", keep_collapsed=False)
    counts = np.rint(shapely.area(geo)).astype(np.int64)  # pixel polygons: area in px2 is the pixel count
    return Labelled(labels, geo, values, counts)


def edge_strips(classes: np.ndarray, geoms: np.ndarray, win: BlockWindow) -> Strips:
    """The labels along a block's internal sides without rasterising the block.

    A run of equal class along a side is connected, so it lies in one region: the region holding the
    centre of the run's first pixel (never on a polygon edge, which lie on the pixel grid) labels it.
    """
    tree = shapely.STRtree(geoms)

    def side(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
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


def polygons_from_geojson(polys: Sequence[Mapping[str, list]]) -> np.ndarray:
    """GeoJSON-like polygons to shapely in a few vectorised calls (per-ring Python objects are the slow part)."""
    if not polys:
        return np.zeros(0, dtype=object)
    rings = [r for p in polys for r in p["coordinates"]]
    ring_len = np.fromiter((len(r) for r in rings), dtype=np.int64, count=len(rings))
    ring_of = np.repeat(np.arange(len(rings)), ring_len)
    poly_of = np.repeat(np.arange(len(polys)), [len(p["coordinates"]) for p in polys])
    chain = itertools.chain.from_iterable
    xy = np.fromiter(chain(chain(rings)), dtype=np.float64, count=2 * int(ring_len.sum())).reshape(-1, 2)
    return shapely.polygons(shapely.linearrings(xy, indices=ring_of), indices=poly_of)


def region_sums(labels: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each region's pixels."""
    return np.bincount(labels.ravel(), weights=values.ravel().astype(np.float64), minlength=n + 1)[1:]


@dataclass
class Strips:
    """Labels along a block's internal sides (0 where nodata), and the class of each label."""

    top: np.ndarray | None
    bottom: np.ndarray | None
    left: np.ndarray | None
    right: np.ndarray | None


def border_strips(labels: np.ndarray, win: BlockWindow) -> Strips:
    """The 1-pixel strips of a block along its internal sides: all that joining needs of the pixels."""
    return Strips(labels[0].copy() if win.top else None, labels[-1].copy() if win.bottom else None,
                  labels[:, 0].copy() if win.left else None, labels[:, -1].copy() if win.right else None)


def crossing_labels(strips: Strips) -> np.ndarray:
    """Labels (1-based) of the regions that touch an internal border, sorted."""
    parts = [s for s in (strips.top, strips.bottom, strips.left, strips.right) if s is not None]
    if not parts:
        return np.zeros(0, dtype=np.int32)
    u = np.unique(np.concatenate(parts))
    return u[u > 0]


@dataclass
class Finished:
    """Complete regions ready to write: WKB geometries with their class, pixel count and confidence sum."""

    wkb: np.ndarray  # object array of WKB bytes: compact to ship from a task, written as is
    classes: np.ndarray
    counts: np.ndarray
    conf: np.ndarray  # sum of confidence (0..255) per region, NaN when absent


@dataclass
class BlockPieces:
    """What the driver takes from a block: its finished regions, and what joining needs of the pieces
    crossing its borders. The pieces' geometries travel apart (see :func:`polygonise_block`)."""

    win: BlockWindow
    final: Finished  # CRS coordinates when the task was given the transform, else pixel coordinates
    piece_labels: np.ndarray  # sorted labels of the pieces touching internal borders
    piece_classes: np.ndarray
    piece_counts: np.ndarray
    piece_conf: np.ndarray
    strips: Strips


def polygonise_block(classes: np.ndarray, confidence: np.ndarray | None, win: BlockWindow,
                     connectivity: int, transform: Affine | None = None) -> tuple[BlockPieces, np.ndarray]:
    """Polygonise one block; split its regions into finished polygons and pieces crossing a border.

    Returns the block's pieces and, apart, the crossing pieces' WKB in pixel coordinates (exact shared
    edges for the union): on Ray that array stays in the object store until a merge task takes it, so the
    driver never holds the geometries of regions left open along the front. Finished polygons are put in
    CRS coordinates here when ``transform`` is given, so the driver only has to write their WKB.
    """
    lab = label_block(classes, win.row_off, win.col_off, connectivity, full=confidence is not None)
    if lab.labels is None:
        conf = np.full(len(lab.geoms), np.nan)
        strips = edge_strips(classes, lab.geoms, win)
    else:
        conf = region_sums(lab.labels, len(lab.geoms), confidence)
        strips = border_strips(lab.labels, win)
    crossing = crossing_labels(strips)
    is_final = np.ones(len(lab.geoms), dtype=bool)
    is_final[crossing - 1] = False
    final = lab.geoms[is_final]
    if transform is not None:
        final = to_crs(final, transform)
    idx = crossing - 1
    block = BlockPieces(win, Finished(shapely.to_wkb(final), lab.classes[is_final], lab.counts[is_final],
                                      conf[is_final]), crossing, lab.classes[idx], lab.counts[idx], conf[idx], strips)
    return block, shapely.to_wkb(lab.geoms[idx])


def to_crs(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Pixel (col, row) coordinates to the raster's CRS through its affine transform."""
    a, b, c, d, e, f = transform[:6]
    m = np.array([[a, d], [b, e]])
    return shapely.transform(geoms, lambda xy: xy @ m + (c, f))


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving; small and dependency-free."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return int(x)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra
        return ra

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def border_pairs(a: np.ndarray, b: np.ndarray, class_a: np.ndarray, class_b: np.ndarray,
                 connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Label pairs across one border: strip ``a`` faces strip ``b`` pixel by pixel.

    ``class_a`` and ``class_b`` give the class of every label (index 0 = nodata). Pairs are the
    same region when their classes are equal; for 8-connectivity the diagonal neighbours count too.
    """
    ca, cb = class_a[a], class_b[b]
    offsets = (0, 1, -1) if connectivity == 8 else (0,)
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    for k in offsets:
        if k >= 0:
            sa, sb, xa, xb = a[: len(a) - k], b[k:], ca[: len(a) - k], cb[k:]
        else:
            sa, sb, xa, xb = a[-k:], b[: len(b) + k], ca[-k:], cb[: len(b) + k]
        same = (sa > 0) & (sb > 0) & (xa == xb)
        out_a.append(sa[same])
        out_b.append(sb[same])
    return np.concatenate(out_a), np.concatenate(out_b)


def _class_lookup(labels: np.ndarray, classes: np.ndarray, n_labels: int) -> np.ndarray:
    look = np.zeros(n_labels + 1, dtype=np.int64)
    look[labels] = classes
    return look


# The seams a region can continue across, seen from a block: (row step, column step, this block's strip and
# the part of it, the neighbour's facing strip and its part). Corners only count for 8-connectivity.
_SEAMS = ((-1, 0, "top", slice(None), "bottom", slice(None)), (1, 0, "bottom", slice(None), "top", slice(None)),
          (0, -1, "left", slice(None), "right", slice(None)), (0, 1, "right", slice(None), "left", slice(None)))
_CORNERS = ((-1, -1, "top", slice(0, 1), "bottom", slice(-1, None)),
            (-1, 1, "top", slice(-1, None), "bottom", slice(0, 1)),
            (1, -1, "bottom", slice(0, 1), "top", slice(-1, None)),
            (1, 1, "bottom", slice(-1, None), "top", slice(0, 1)))


def seams(connectivity: int) -> tuple[tuple[int, int, str, slice, str, slice], ...]:
    """The seams to look across: sides always, block corners only for 8-connectivity."""
    return _SEAMS + (_CORNERS if connectivity == 8 else ())


def facing_strips(strips: Mapping[BlockKey, Strips], connectivity: int
                  ) -> Iterator[tuple[BlockKey, np.ndarray, BlockKey, np.ndarray, bool]]:
    """Every pair of strips that face each other across a border: (block, its strip, block, its strip, corner).

    Each border is visited once, from the block on its left or above (the seams leading right or down).
    For 8-connectivity the single pixels meeting diagonally at block corners are paired too (``corner``).
    """
    forward = [seam for seam in seams(connectivity) if seam[0] > 0 or (seam[0] == 0 and seam[1] > 0)]
    for key, s in strips.items():
        for di, dj, side, part, their_side, their_part in forward:
            nkey = (key[0] + di, key[1] + dj)
            other = strips.get(nkey)
            mine, theirs = getattr(s, side), getattr(other, their_side) if other is not None else None
            if mine is not None and theirs is not None:
                yield key, mine[part], nkey, theirs[their_part], di != 0 and dj != 0


def join_groups(blocks: Sequence[tuple[BlockWindow, Strips, np.ndarray, np.ndarray]],
                connectivity: int) -> tuple[np.ndarray, dict[BlockKey, int]]:
    """Group the border-touching pieces of all blocks into regions.

    ``blocks`` holds, per block, its window, strips, the sorted labels of its nodes and their classes.
    Returns the root of every node (nodes numbered block by block in the given order) and the
    node offset of each block.
    """
    offset: dict[BlockKey, int] = {}
    looks: dict[BlockKey, np.ndarray] = {}
    ids: dict[BlockKey, np.ndarray] = {}
    total = 0
    for win, strips, labels, classes in blocks:
        key = (win.bi, win.bj)
        offset[key] = total
        n = int(labels.max()) if len(labels) else 0
        looks[key] = _class_lookup(labels, classes, n)
        node = np.full(n + 1, -1, dtype=np.int64)
        node[labels] = total + np.arange(len(labels))
        ids[key] = node
        total += len(labels)
    uf = UnionFind(total)
    for ka, sa, kb, sb, corner in facing_strips({(w.bi, w.bj): s for w, s, _, _ in blocks}, connectivity):
        pa, pb = border_pairs(sa, sb, looks[ka], looks[kb], 4 if corner else connectivity)
        if len(pa):
            for x, y in np.unique(np.stack([ids[ka][pa], ids[kb][pb]], axis=1), axis=0):
                uf.union(int(x), int(y))
    return uf.roots(), offset


@dataclass
class MergeJob:
    """Complete regions to assemble from their pieces: group ``k`` is pieces ``starts[k]:starts[k+1]``.

    Piece ``i`` is item ``index[i]`` of the ``source[i]``-th WKB array handed to :func:`merge_task` beside
    the job (the blocks' piece arrays, or on Ray their object references, which Ray resolves)."""

    source: np.ndarray
    index: np.ndarray
    classes: np.ndarray
    counts: np.ndarray
    conf: np.ndarray
    starts: np.ndarray
    transform: Affine | None


class SeamJoiner:
    """Joins the pieces of regions cut by block borders while blocks arrive, and hands out each region as
    soon as it is complete.

    A piece stays open while a block it touches across a seam has not arrived; a group of pieces (one
    region) is complete when none of its pieces is open. So the joiner holds only the pieces and strips
    along the front of arrived blocks, not those of the whole raster; of a piece it holds a few numbers
    and a handle on its block's piece geometries (the array, or on Ray its object reference), which it
    drops once every piece of that block is taken.
    """

    def __init__(self, grid: Sequence[BlockWindow], connectivity: int) -> None:
        self.connectivity = connectivity
        self.keys = {(w.bi, w.bj) for w in grid}
        self.seams = seams(connectivity)
        self.arrived: set[BlockKey] = set()
        self.strips: dict[BlockKey, Strips] = {}
        self.looks: dict[BlockKey, np.ndarray] = {}  # label -> class
        self.nodes: dict[BlockKey, np.ndarray] = {}  # label -> node id
        self.parent: dict[int, int] = {}
        self.open: dict[int, int] = {}  # root -> (piece, neighbour block not yet arrived) pairs
        self.members: dict[int, list[int]] = {}
        self.waiting: dict[BlockKey, list[int]] = {}  # block -> nodes that wait for it
        self.data: dict[int, tuple[int, int, int, int, float]] = {}  # node -> source, index, class, pixels, conf sum
        self.sources: dict[int, object] = {}  # source -> a block's piece WKB (or its object reference)
        self.untaken: dict[int, int] = {}  # source -> its pieces not yet taken
        self.next_node = 0

    def _neighbours(self, key: BlockKey, strips: Strips) -> Iterator[tuple[BlockKey, np.ndarray, str, slice, bool]]:
        for di, dj, side, part, their_side, their_part in self.seams:
            nkey = (key[0] + di, key[1] + dj)
            mine = getattr(strips, side)
            if mine is not None and nkey in self.keys:
                yield nkey, mine[part], their_side, their_part, di != 0 and dj != 0

    def _find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.open[ra] += self.open.pop(rb)
        self.members[ra] += self.members.pop(rb)

    def add(self, block: BlockPieces, wkb: object) -> list[list[int]]:
        """Take one block's pieces and a handle on their WKB (as :func:`merge_task` will be given it);
        return the groups of nodes (one per region) that became complete."""
        key = (block.win.bi, block.win.bj)
        labels = block.piece_labels
        n = int(labels.max()) if len(labels) else 0
        nodes = np.full(n + 1, -1, dtype=np.int64)
        nodes[labels] = self.next_node + np.arange(len(labels))
        look = _class_lookup(labels, block.piece_classes, n)
        source = len(self.arrived)
        if len(labels):
            self.sources[source], self.untaken[source] = wkb, len(labels)
        for k, node in enumerate(range(self.next_node, self.next_node + len(labels))):
            self.parent[node] = node
            self.open[node] = 0
            self.members[node] = [node]
            self.data[node] = (source, k, int(block.piece_classes[k]), int(block.piece_counts[k]),
                               float(block.piece_conf[k]))
        self.next_node += len(labels)
        self.arrived.add(key)
        self.strips[key], self.looks[key], self.nodes[key] = block.strips, look, nodes
        for nkey, mine, their_side, their_part, corner in self._neighbours(key, block.strips):
            if nkey in self.arrived:
                theirs = getattr(self.strips[nkey], their_side)[their_part]
                pa, pb = border_pairs(mine, theirs, look, self.looks[nkey], 4 if corner else self.connectivity)
                if len(pa):
                    for x, y in np.unique(np.stack([nodes[pa], self.nodes[nkey][pb]], axis=1), axis=0):
                        self._union(int(x), int(y))
            else:
                touching = np.unique(mine)
                for node in nodes[touching[touching > 0]]:
                    self.open[self._find(int(node))] += 1
                    self.waiting.setdefault(nkey, []).append(int(node))
        candidates = [int(x) for x in nodes[labels]]
        for node in self.waiting.pop(key, []):
            self.open[self._find(node)] -= 1
            candidates.append(node)
        done: list[list[int]] = []
        for root in dict.fromkeys(self._find(c) for c in candidates):
            if self.open[root] == 0:
                group = sorted(self.members.pop(root))
                del self.open[root]
                for node in group:
                    del self.parent[node]
                done.append(group)
        for k in [key] + [nkey for nkey, *_ in self._neighbours(key, block.strips)]:
            if k in self.strips and all(nk in self.arrived for nk, *_ in self._neighbours(k, self.strips[k])):
                del self.strips[k], self.looks[k], self.nodes[k]
        return done

    def take(self, groups: Sequence[Sequence[int]], transform: Affine | None) -> tuple[MergeJob, list[object]]:
        """The pieces of complete groups, removed from the joiner, as one job for :func:`merge_task` and
        the WKB handles to call it with."""
        source, index, classes, counts, conf = (np.array(c) for c in zip(*(self.data.pop(node) for g in groups
                                                                           for node in g)))
        used, source = np.unique(source, return_inverse=True)
        handles = [self.sources[s] for s in used.tolist()]
        for s, k in zip(used.tolist(), np.bincount(source).tolist()):
            self.untaken[s] -= k
            if self.untaken[s] == 0:
                del self.untaken[s], self.sources[s]
        starts = np.r_[0, np.cumsum([len(g) for g in groups])[:-1]].astype(np.int64)
        return MergeJob(source, index, classes, counts, conf, starts, transform), handles

    def __len__(self) -> int:
        """Pieces held (open, or complete but not yet taken)."""
        return len(self.data)


def merge_task(job: MergeJob, *sources: np.ndarray) -> Finished:
    """Union the pieces of every group into one region (a Ray task, or a plain call without Ray)."""
    geoms = shapely.from_wkb(np.array([sources[s][i] for s, i in zip(job.source, job.index)], dtype=object))
    ends = np.r_[job.starts[1:], len(geoms)]
    out = np.empty(len(job.starts), dtype=object)
    for i, (s, e) in enumerate(zip(job.starts, ends)):
        out[i] = geoms[s] if e - s == 1 else merge_pieces(geoms[s:e])
    if job.transform is not None:
        out = to_crs(out, job.transform)
    return Finished(shapely.to_wkb(out), job.classes[job.starts], np.add.reduceat(job.counts, job.starts),
                    np.add.reduceat(job.conf, job.starts))
def merge_pieces(geoms: np.ndarray) -> shapely.Geometry:
    """One region from pieces that share exact pixel edges; the seam's collinear vertices are dropped."""
    merged = shapely.union_all(geoms)
    return shapely.simplify(merged, 0.0, preserve_topology=True)


# ---------------------------------------------------------------------------------------------------------------
# Minimum mapping unit: a sieve over the graph of whole patches.


@dataclass
class PatchGraph:
    """Per-block pass-1 output for the minimum mapping unit: every region with its neighbours."""

    win: BlockWindow
    labels: np.ndarray  # 1..n
    classes: np.ndarray
    counts: np.ndarray
    keys: np.ndarray  # first pixel of the region in raster order (row * width + col): a layout-free tie-break
    edges: np.ndarray  # (m, 3): label, label, shared edge length in pixels (0 = diagonal contact only)
    strips: Strips


def patch_graph_block(classes: np.ndarray, win: BlockWindow, connectivity: int, raster_width: int) -> PatchGraph:
    """Regions of one block with their sizes and adjacencies: what the sieve needs, no geometry."""
    lab = label_block(classes, win.row_off, win.col_off, connectivity)
    n = len(lab.geoms)
    flat = lab.labels.ravel()
    rows, cols = np.divmod(np.arange(flat.size), win.width)
    gkey = (rows + win.row_off) * raster_width + cols + win.col_off
    keys = np.full(n + 1, np.iinfo(np.int64).max)
    np.minimum.at(keys, flat, gkey)
    lb = lab.labels
    pairs = [(lb[:, :-1], lb[:, 1:]), (lb[:-1], lb[1:])]
    diag = [(lb[:-1, :-1], lb[1:, 1:]), (lb[:-1, 1:], lb[1:, :-1])] if connectivity == 8 else []
    edges = [_pair_counts(a, b, 1) for a, b in pairs] + [_pair_counts(a, b, 0) for a, b in diag]
    return PatchGraph(win, np.arange(1, n + 1), lab.classes, lab.counts, keys[1:],
                      np.concatenate(edges) if edges else np.zeros((0, 3), np.int64), border_strips(lb, win))


def _pair_counts(a: np.ndarray, b: np.ndarray, weight: int) -> np.ndarray:
    """Distinct unordered label pairs of facing pixels with their counts (times ``weight``)."""
    a, b = a.ravel(), b.ravel()
    keep = (a > 0) & (b > 0) & (a != b)
    lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    u, n = np.unique(np.stack([lo, hi], axis=1).astype(np.int64), axis=0, return_counts=True)
    if len(u) == 0:
        return np.zeros((0, 3), np.int64)
    return np.column_stack([u, n * weight])


def sieve(graphs: Sequence[PatchGraph], connectivity: int, min_pixels: float) -> dict[BlockKey, np.ndarray]:
    """Decide the class of every region after merging patches smaller than ``min_pixels``.

    Patches are whole (joined across block borders). The smallest patch goes first (ties: the one
    whose first pixel comes first) and takes the class of its largest edge neighbour (ties: longest
    shared boundary, then first pixel); it then forms one patch with every neighbour of that class,
    as it would in the sieved raster. A patch with no edge neighbour (an island in nodata) is kept.
    Returns, per block, the new class of every label (index = label; index 0 unused).
    """
    nodes: list[tuple[BlockWindow, Strips, np.ndarray, np.ndarray]] = [
        (g.win, g.strips, g.labels, g.classes) for g in graphs]
    roots, offset = join_groups(nodes, connectivity)
    total = len(roots)
    counts = np.concatenate([g.counts for g in graphs]) if graphs else np.zeros(0, np.int64)
    classes = np.concatenate([g.classes for g in graphs]) if graphs else np.zeros(0, np.int64)
    keys = np.concatenate([g.keys for g in graphs]) if graphs else np.zeros(0, np.int64)
    uf = UnionFind(total)
    for i, r in enumerate(roots):
        if r != i:
            uf.union(i, int(r))
    area: dict[int, int] = {}
    key: dict[int, int] = {}
    cls: dict[int, int] = {}
    for i in range(total):
        r = int(roots[i])
        area[r] = area.get(r, 0) + int(counts[i])
        key[r] = min(key.get(r, keys[i]), int(keys[i]))
        cls[r] = int(classes[i])
    adj: dict[int, dict[int, int]] = {r: {} for r in area}

    def add_edge(x: int, y: int, w: int) -> None:
        rx, ry = int(roots[x]), int(roots[y])
        if rx != ry:
            adj[rx][ry] = adj[rx].get(ry, 0) + w
            adj[ry][rx] = adj[ry].get(rx, 0) + w

    for g in graphs:
        base = offset[(g.win.bi, g.win.bj)] - 1
        for a, b, w in g.edges:
            add_edge(base + int(a), base + int(b), int(w))
    for ka, mine, kb, theirs, corner in facing_strips({(g.win.bi, g.win.bj): g.strips for g in graphs},
                                                      connectivity):
        _link_different(offset[ka] - 1, mine, offset[kb] - 1, theirs, add_edge, corner, connectivity)

    heap = [(a, key[r], r) for r, a in area.items() if a < min_pixels]
    heapq.heapify(heap)
    while heap:
        a, _, r = heapq.heappop(heap)
        if uf.find(r) != r or area[r] != a:
            continue
        edge_nbrs = [n for n, w in adj[r].items() if w > 0]
        if not edge_nbrs:
            continue
        target = max(edge_nbrs, key=lambda n: (area[n], adj[r][n], -key[n]))
        new_cls = cls[target]
        merging = [n for n in adj[r] if cls[n] == new_cls]
        root = r
        for n in merging:
            root = _merge(uf, root, n, area, key, cls, adj)
        cls[root] = new_cls
        if area[root] < min_pixels:
            heapq.heappush(heap, (area[root], key[root], root))
    out: dict[BlockKey, np.ndarray] = {}
    for g in graphs:
        base = offset[(g.win.bi, g.win.bj)]
        lut = np.zeros(len(g.labels) + 1, dtype=np.int64)
        lut[1:] = [cls[uf.find(base + i)] for i in range(len(g.labels))]
        out[(g.win.bi, g.win.bj)] = lut
    return out


def _link_different(base_a: int, mine: np.ndarray, base_b: int, theirs: np.ndarray,
                    add_edge: Callable[[int, int, int], None], corner: bool, connectivity: int) -> None:
    """Cross-border adjacencies: each facing pixel pair is one shared edge, diagonal pairs a contact."""
    shifts = [(0, 0)] if corner else [(0, 1)] + ([(1, 0), (-1, 0)] if connectivity == 8 else [])
    for k, weight in shifts:
        if k >= 0:
            a, b = mine[: len(mine) - k], theirs[k:]
        else:
            a, b = mine[-k:], theirs[: len(theirs) + k]
        keep = (a > 0) & (b > 0)
        for x, y, n in _cross_counts(a[keep], b[keep]):
            add_edge(base_a + int(x), base_b + int(y), int(n) * weight)


def _cross_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0:
        return np.zeros((0, 3), np.int64)
    u, n = np.unique(np.stack([a, b], axis=1).astype(np.int64), axis=0, return_counts=True)
    return np.column_stack([u, n])


def _merge(uf: UnionFind, a: int, b: int, area: dict[int, int], key: dict[int, int], cls: dict[int, int],
           adj: dict[int, dict[int, int]]) -> int:
    """Join patches ``a`` and ``b`` on the graph: areas add, neighbour lists merge."""
    ra, rb = uf.find(a), uf.find(b)
    if ra == rb:
        return ra
    root = uf.union(ra, rb)
    gone = rb if root == ra else ra
    area[root] = area[ra] + area[rb]
    key[root] = min(key[ra], key[rb])
    cls[root] = cls[ra] if root == ra else cls[rb]
    nb = adj.pop(gone)
    nb.pop(root, None)
    adj[root].pop(gone, None)
    for n, w in nb.items():
        adj[n].pop(gone, None)
        adj[root][n] = adj[root].get(n, 0) + w
        adj[n][root] = adj[n].get(root, 0) + w
    del area[gone], key[gone], cls[gone]
    return root


# ---------------------------------------------------------------------------------------------------------------
# Coverage-preserving simplification.


def simplify_coverage(geoms: np.ndarray, tolerance_px: float) -> np.ndarray:
    """Simplify pixel-coordinate polygons as one coverage: shared edges stay shared, the footprint stays.

    Pixel polygons only have vertices at their corners, so an edge shared by two polygons may have a
    vertex on one side only; densifying to every pixel corner (exact integers) makes the coverage
    edge-matched, as ``coverage_simplify`` requires. The outer boundary (raster edge, nodata) is kept.

    Stated area tolerance: each class's area changes by at most ``tolerance**2`` per pixel of its
    boundary length (every removed vertex moves a triangle smaller than ``tolerance**2`` from one
    polygon to its neighbour, and a densified boundary has one vertex per pixel edge).
    """
    if len(geoms) == 0:
        return geoms
    dense = shapely.segmentize(geoms, 1.0)
    simple = shapely.coverage_simplify(dense, tolerance_px, simplify_boundary=False)
    return shapely.simplify(simple, 0.0)  # drop the densifying vertices left on the kept outer boundary


# ---------------------------------------------------------------------------------------------------------------
# I/O edge: reading blocks, the Ray fan-out, the GeoPackage.


def load_legend(path: str | Path) -> dict[int, str]:
    """Class names from a JSON legend: ``{"classes": [{"id": 1, "name": ...}, ...]}`` or ``{"1": "name"}``."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read legend {path}: {exc}; pass a JSON file with class ids and names") from exc
    return _parse_legend(doc, str(path))


def _parse_legend(doc: object, where: str) -> dict[int, str]:
    try:
        if isinstance(doc, dict) and "classes" in doc:
            return {int(c["id"]): str(c["name"]) for c in doc["classes"]}
        if isinstance(doc, dict):
            return {int(k): str(v) for k, v in doc.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"legend {where} is malformed ({exc}): use {{\"classes\": [{{\"id\": 1, \"name\": "
                          f"\"...\"}}]}} or {{\"1\": \"name\"}}") from exc
    raise ConfigError(f"legend {where} must be a JSON object: {{\"classes\": [...]}} or {{\"1\": \"name\"}}")


@dataclass(frozen=True)
class BlockTask:
    """The unit of work shipped to a worker: where to read one block and what to do with it."""

    classes_path: str
    confidence_path: str | None
    win: BlockWindow
    connectivity: int
    raster_width: int
    remap: np.ndarray | None = None  # new class per label of this block (minimum mapping unit), or None
    transform: Affine | None = None  # when set, finished polygons come back in CRS coordinates (spares the driver)


def _read(path: str, win: BlockWindow) -> np.ndarray:
    with rasterio.Env(**storage.gdal_options()), rasterio.open(path) as src:
        return src.read(1, window=Window(win.col_off, win.row_off, win.width, win.height))


def _block_classes(task: BlockTask) -> np.ndarray:
    classes = _read(task.classes_path, task.win)
    if task.remap is not None:
        labels = label_block(classes, task.win.row_off, task.win.col_off, task.connectivity).labels
        classes = task.remap[labels].astype(classes.dtype)
    return classes


def polygonise_task(task: BlockTask) -> tuple[BlockPieces, np.ndarray]:
    """Read and polygonise one block (a Ray task, or a plain call without Ray)."""
    conf = _read(task.confidence_path, task.win) if task.confidence_path else None
    return polygonise_block(_block_classes(task), conf, task.win, task.connectivity, task.transform)


def graph_task(task: BlockTask) -> PatchGraph:
    """Read one block and describe its patches for the minimum mapping unit."""
    return patch_graph_block(_read(task.classes_path, task.win), task.win, task.connectivity, task.raster_width)


class _Jobs:
    """An ordered queue of jobs: Ray tasks when Ray is up, else plain calls made when the result is taken.

    Results are taken in submission order (the output is deterministic), and at most two jobs per
    cluster CPU are in flight, so the driver holds a bounded number of results. A job with two results
    hands the driver its first and, on Ray, only the object reference of its second.
    """

    def __init__(self) -> None:
        import ray

        self.ray = ray if ray.is_initialized() else None
        self.window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1))) if self.ray else 1
        self.remotes: dict[Callable, object] = {}
        self.pending: deque[object] = deque()

    def submit(self, fn: Callable[..., object], *args: object, returns: int = 1) -> None:
        if self.ray is None:
            self.pending.append((fn, args))
            return
        if fn not in self.remotes:
            self.remotes[fn] = self.ray.remote(num_cpus=1, max_retries=2,
                                               runtime_env={"env_vars": storage.task_env()})(fn)
        self.pending.append(self.remotes[fn].options(num_returns=returns).remote(*args))

    def fill(self, fn: Callable[[T], object], todo: Iterator[T], returns: int = 1) -> None:
        """Submit ``fn`` over the next items of ``todo`` until the window is full or ``todo`` is exhausted."""
        while len(self.pending) < self.window:
            item = next(todo, None)
            if item is None:
                return
            self.submit(fn, item, returns=returns)

    def take(self) -> object:
        """The oldest job's result (waits for it); a two-result job's as (first, second or its reference)."""
        job = self.pending.popleft()
        if self.ray is None:
            fn, args = job
            return fn(*args)
        if isinstance(job, list):
            return self.ray.get(job[0]), job[1]
        return self.ray.get(job)


def map_blocks(fn: Callable[[BlockTask], T], tasks: Sequence[BlockTask]) -> Iterator[T]:
    """Results of ``fn`` over the tasks, in task order, through :class:`_Jobs`."""
    jobs, todo = _Jobs(), iter(tasks)
    jobs.fill(fn, todo)
    while jobs.pending:
        result = jobs.take()
        jobs.fill(fn, todo)
        yield result  # type: ignore[misc]


@dataclass(frozen=True)
class RasterInfo:
    """What the driver needs to know of the class raster: its grid and its own class names."""

    height: int
    width: int
    transform: Affine
    crs_wkt: str
    metres_per_unit: float
    class_names: dict[int, str]


def read_info(classes_path: str, confidence_path: str | None) -> RasterInfo:
    """Open the rasters' headers only, and refuse what cannot give correct polygons and areas."""
    try:
        with rasterio.Env(**storage.gdal_options()), rasterio.open(classes_path) as src:
            if not np.issubdtype(np.dtype(src.dtypes[0]), np.integer) or np.dtype(src.dtypes[0]).itemsize > 4:
                raise ConfigError(f"{classes_path} has dtype {src.dtypes[0]}: vectorise needs integer class ids "
                                  "(uint8, 0 = nodata); convert it, e.g. gdal_translate -ot Byte")
            if src.crs is None:
                raise ConfigError(f"{classes_path} has no CRS: assign one (gdal_edit.py -a_srs EPSG:...)")
            if src.crs.is_geographic:
                raise ConfigError(f"{classes_path} is in a geographic CRS ({src.crs}): areas in m2 need a "
                                  "projected CRS; reproject it first (gdalwarp -t_srs EPSG:<UTM zone>)")
            tag = src.tags().get(CLASS_NAMES_TAG)
            names = _parse_legend(json.loads(tag), f"{classes_path}:{CLASS_NAMES_TAG}") if tag else {}
            info = RasterInfo(src.height, src.width, src.transform, src.crs.to_wkt(),
                              float(src.crs.linear_units_factor[1]), names)
        if confidence_path is not None:
            with rasterio.Env(**storage.gdal_options()), rasterio.open(confidence_path) as conf:
                if (conf.height, conf.width) != (info.height, info.width) or not conf.transform.almost_equals(
                        info.transform):
                    raise ConfigError(f"confidence raster {confidence_path} is not on the grid of {classes_path}: "
                                      "write both from the same mosaic")
    except rasterio.errors.RasterioIOError as exc:
        raise ConfigError(f"cannot open {exc}: check the path (or URL and credentials)") from exc
    return info


class _Sink:
    """Turns pixel-space regions into rows of the ``landcover`` layer, and adds up the class areas."""

    def __init__(self, writer: GpkgWriter, info: RasterInfo, names: Mapping[int, str], simplify_px: float) -> None:
        self.writer = writer
        self.info = info
        self.names = names
        self.simplify_px = simplify_px
        self.pixel_m2 = abs(info.transform.determinant) * info.metres_per_unit ** 2
        self.areas: dict[str, float] = {}
        self._held: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, regions: Finished) -> None:
        """Write regions now (their WKB is already in CRS coordinates), or, when the whole coverage is
        simplified together, hold them (then they are in pixel coordinates)."""
        if self.simplify_px > 0:
            self._held.append((shapely.from_wkb(regions.wkb), regions.classes, regions.counts, regions.conf))
            return
        self._write(regions.wkb, regions.classes, regions.counts.astype(np.float64) * self.pixel_m2,
                    regions.conf / regions.counts / 255.0)

    def finish(self) -> None:
        """Simplify the held coverage (if any) and write it."""
        if not self._held:
            return
        geoms, classes, counts, conf = (np.concatenate(x) for x in zip(*self._held))
        self._held.clear()
        simple = simplify_coverage(geoms, self.simplify_px)
        self._write(shapely.to_wkb(to_crs(simple, self.info.transform)), classes, shapely.area(simple) * self.pixel_m2,
                    conf / counts / 255.0)

    def _write(self, wkb: np.ndarray, classes: np.ndarray, area_m2: np.ndarray, conf: np.ndarray) -> None:
        ids, inverse = np.unique(classes, return_inverse=True)
        id_names = np.array([self.names.get(int(c), f"class_{int(c)}") for c in ids], dtype=object)
        names = id_names[inverse]
        for n, a in zip(id_names, np.bincount(inverse, weights=area_m2, minlength=len(ids))):
            self.areas[n] = self.areas.get(n, 0.0) + float(a)
        self.writer.write_wkb(wkb, {"class_id": classes, "class_name": names, "area_m2": area_m2,
                                  "mean_confidence": conf})


def vectorise(
    classes_path: str,
    out_gpkg: str | Path,
    class_names: Mapping[int, str] | None = None,
    *,
    confidence_path: str | None = None,
    block_size: int = 1024,
    connectivity: int = 4,
    min_area_m2: float = 0.0,
    simplify_m: float = 0.0,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Polygonise a class raster into the ``landcover`` layer of a GeoPackage, block by block.

    With the defaults the polygons are exactly those of one ``rasterio.features.shapes`` call over the
    whole raster (made valid), whatever the block size; the driver only ever holds the strips and open
    border pieces along the front of arrived blocks, a few block results in flight and one batch of
    finished polygons (as WKB). Returns class name -> area (m2).
    """
    if connectivity not in (4, 8):
        raise ConfigError(f"connectivity must be 4 or 8, got {connectivity}")
    if min_area_m2 < 0 or simplify_m < 0:
        raise ConfigError(f"min_area_m2 and simplify_m must be >= 0, got {min_area_m2} and {simplify_m}")
    info = read_info(str(classes_path), confidence_path)
    names = dict(class_names) if class_names is not None else info.class_names
    grid = block_grid(info.height, info.width, block_size)
    tasks = [BlockTask(str(classes_path), confidence_path, w, connectivity, info.width) for w in grid]
    pixel_m2 = abs(info.transform.determinant) * info.metres_per_unit ** 2
    if min_area_m2 > 0:
        graphs = list(map_blocks(graph_task, tasks))
        luts = sieve(graphs, connectivity, min_area_m2 / pixel_m2)
        tasks = [replace(t, remap=luts[(t.win.bi, t.win.bj)]) for t in tasks]
    # regions go to CRS coordinates in the tasks, unless the coverage is simplified (in pixels) at the end
    transform = info.transform if simplify_m == 0 else None
    tasks = [replace(t, transform=transform) for t in tasks]
    pixel_size = float(np.sqrt(pixel_m2))
    with GpkgWriter(out_gpkg, LAYER, info.crs_wkt, FIELDS, metadata) as writer:
        sink = _Sink(writer, info, names, simplify_m / pixel_size)
        _stream(tasks, SeamJoiner(grid, connectivity), sink, transform)
        sink.finish()
    return sink.areas


MERGE_BATCH = 2000  # pieces per merge job: large enough to amortise a task, small enough to bound its memory


def _stream(tasks: Sequence[BlockTask], joiner: SeamJoiner, sink: _Sink, transform: Affine | None) -> None:
    """Polygonise the blocks, write finished regions as they arrive, and merge regions cut by borders in
    jobs of their own as soon as all their pieces are in."""
    jobs, todo = _Jobs(), iter(tasks)
    batch: list[list[int]] = []
    in_batch = 0
    jobs.fill(polygonise_task, todo, returns=2)
    while jobs.pending:
        result = jobs.take()
        if isinstance(result, Finished):
            sink.add(result)
        else:
            block, wkb = result  # type: ignore[misc]
            sink.add(block.final)
            for group in joiner.add(block, wkb):
                batch.append(group)
                in_batch += len(group)
            last = len(joiner.arrived) == len(joiner.keys)
            if batch and (in_batch >= MERGE_BATCH or last):
                job, sources = joiner.take(batch, transform)
                jobs.submit(merge_task, job, *sources)
                batch, in_batch = [], 0
        jobs.fill(polygonise_task, todo, returns=2)
    if len(joiner):
        raise RuntimeError(f"{len(joiner)} border pieces left unjoined: a block result is missing")
