"""Joining the pieces of regions cut by block borders, so that the result is the whole-raster polygonisation.

The 1-pixel strips on both sides of every border tell which pieces are the same region (equal class and
adjacent under the chosen connectivity, diagonals across borders and block corners included for
8-connectivity); a union-find groups them. :class:`SeamJoiner` does this while the blocks arrive and hands
out each region as soon as all its pieces are in; :func:`merge_task` unions a batch of such regions' pieces.
:func:`join_groups` does the same grouping over all blocks at once, for the minimum mapping unit's patches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine

from geoseg.polygonise.blocks import (
    BlockKey,
    BlockPieces,
    BlockWindow,
    Finished,
    Float64s,
    Geoms,
    Int64s,
    Labels,
    Side,
    Strip,
    Strips,
    Wkb,
    to_crs,
    wkb_of,
)
from geoseg.polygonise.executor import Handle
from geoseg.polygonise.unionfind import UnionFind

MERGE_BATCH = 2000
"""Pieces per merge job: large enough to amortise a task, small enough to bound its memory."""

Seam = tuple[int, int, Side, slice, Side, slice]
"""A seam a region can continue across, seen from a block: (row step, column step, this block's strip and the
part of it, the neighbour's facing strip and its part)."""

_SIDES: tuple[Seam, ...] = ((-1, 0, "top", slice(None), "bottom", slice(None)),
                            (1, 0, "bottom", slice(None), "top", slice(None)),
                            (0, -1, "left", slice(None), "right", slice(None)),
                            (0, 1, "right", slice(None), "left", slice(None)))
_CORNERS: tuple[Seam, ...] = ((-1, -1, "top", slice(0, 1), "bottom", slice(-1, None)),
                              (-1, 1, "top", slice(-1, None), "bottom", slice(0, 1)),
                              (1, -1, "bottom", slice(0, 1), "top", slice(-1, None)),
                              (1, 1, "bottom", slice(-1, None), "top", slice(0, 1)))


def seams(connectivity: int) -> tuple[Seam, ...]:
    """The seams to look across: sides always, block corners only for 8-connectivity."""
    return _SIDES + (_CORNERS if connectivity == 8 else ())


def facing_strips(strips: Mapping[BlockKey, Strips], connectivity: int
                  ) -> Iterator[tuple[BlockKey, Strip, BlockKey, Strip, bool]]:
    """Every pair of strips that face each other across a border: (block, its strip, block, its strip, corner).

    Each border is visited once, from the block on its left or above (the seams leading right or down).
    For 8-connectivity the single pixels meeting diagonally at block corners are paired too (``corner``).
    """
    forward = [seam for seam in seams(connectivity) if seam[0] > 0 or (seam[0] == 0 and seam[1] > 0)]
    for key, s in strips.items():
        for di, dj, side, part, their_side, their_part in forward:
            nkey = (key[0] + di, key[1] + dj)
            other = strips.get(nkey)
            mine, theirs = s.side(side), other.side(their_side) if other is not None else None
            if mine is not None and theirs is not None:
                yield key, mine[part], nkey, theirs[their_part], di != 0 and dj != 0


def border_pairs(a: Strip, b: Strip, class_a: Int64s, class_b: Int64s, connectivity: int) -> tuple[Strip, Strip]:
    """Label pairs across one border: strip ``a`` faces strip ``b`` pixel by pixel.

    ``class_a`` and ``class_b`` give the class of every label (index 0 = nodata). Pairs are the
    same region when their classes are equal; for 8-connectivity the diagonal neighbours count too.
    """
    ca, cb = class_a[a], class_b[b]
    offsets = (0, 1, -1) if connectivity == 8 else (0,)
    out_a: list[Strip] = []
    out_b: list[Strip] = []
    for k in offsets:
        if k >= 0:
            sa, sb, xa, xb = a[: len(a) - k], b[k:], ca[: len(a) - k], cb[k:]
        else:
            sa, sb, xa, xb = a[-k:], b[: len(b) + k], ca[-k:], cb[: len(b) + k]
        same = (sa > 0) & (sb > 0) & (xa == xb)
        out_a.append(sa[same])
        out_b.append(sb[same])
    return np.concatenate(out_a), np.concatenate(out_b)


def _block_nodes(labels: Labels, classes: Int64s, first: int) -> tuple[Int64s, Int64s]:
    """Number a block's pieces ``first, first + 1, ...``: label -> node (-1: none) and label -> class lookups."""
    n = int(labels.max()) if len(labels) else 0
    nodes = np.full(n + 1, -1, dtype=np.int64)
    nodes[labels] = first + np.arange(len(labels))
    look = np.zeros(n + 1, dtype=np.int64)
    look[labels] = classes
    return nodes, look


def _same_region(mine: Strip, nodes: Int64s, look: Int64s, theirs: Strip, their_nodes: Int64s, their_look: Int64s,
                 connectivity: int) -> Iterator[tuple[int, int]]:
    """The distinct node pairs that facing strips make one region."""
    pa, pb = border_pairs(mine, theirs, look, their_look, connectivity)
    if len(pa):
        for x, y in np.unique(np.stack([nodes[pa], their_nodes[pb]], axis=1), axis=0):
            yield int(x), int(y)


def join_groups(blocks: Sequence[tuple[BlockWindow, Strips, Labels, Int64s]],
                connectivity: int) -> tuple[UnionFind, dict[BlockKey, int]]:
    """Group the border-touching pieces of all blocks into regions.

    ``blocks`` holds, per block, its window, strips, the sorted labels of its nodes and their classes.
    Returns the sets of nodes (nodes numbered block by block in the given order: a region is one set)
    and the node offset of each block.
    """
    offset: dict[BlockKey, int] = {}
    looks: dict[BlockKey, Int64s] = {}
    ids: dict[BlockKey, Int64s] = {}
    total = 0
    for win, _, labels, classes in blocks:
        offset[win.key] = total
        ids[win.key], looks[win.key] = _block_nodes(labels, classes, total)
        total += len(labels)
    sets = UnionFind(range(total))
    for ka, sa, kb, sb, corner in facing_strips({w.key: s for w, s, _, _ in blocks}, connectivity):
        for x, y in _same_region(sa, ids[ka], looks[ka], sb, ids[kb], looks[kb], 4 if corner else connectivity):
            sets.union(x, y)
    return sets, offset


@dataclass
class MergeJob:
    """Complete regions to assemble from their pieces: group ``k`` is pieces ``starts[k]:starts[k+1]``.

    Piece ``i`` is item ``index[i]`` of the ``source[i]``-th WKB array handed to :func:`merge_task` beside
    the job (the blocks' piece arrays, or on Ray their object references, which Ray resolves)."""

    source: Int64s
    index: Int64s
    classes: Int64s
    counts: Int64s
    conf: Float64s
    starts: Int64s
    transform: Affine | None


@dataclass(frozen=True)
class Held:
    """What a :class:`SeamJoiner` holds: bounded by the front of arrived blocks, not by the raster."""

    pieces: int  # open, or complete and not yet taken
    open_pieces: int  # in regions that still wait for a block
    strip_blocks: int  # blocks whose strips are kept (a neighbour has not arrived)
    handles: int  # blocks whose piece WKB (or its reference) is kept
    blocks_with_pieces: int  # blocks with a piece held: equal to ``handles`` when no handle is kept for nothing
    waiting_for: int  # blocks not yet arrived that held pieces wait for


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
        self._connectivity = connectivity
        self._keys = {w.key for w in grid}
        self._seams = seams(connectivity)
        self._arrived: set[BlockKey] = set()
        self._strips: dict[BlockKey, Strips] = {}
        self._looks: dict[BlockKey, Int64s] = {}  # label -> class
        self._nodes: dict[BlockKey, Int64s] = {}  # label -> node id
        self._sets = UnionFind()  # the nodes of regions not yet complete
        self._open: dict[int, int] = {}  # root -> (piece, neighbour block not yet arrived) pairs
        self._members: dict[int, list[int]] = {}  # root -> its nodes
        self._waiting: dict[BlockKey, list[int]] = {}  # block -> nodes that wait for it
        self._data: dict[int, tuple[int, int, int, int, float]] = {}  # node -> source, index, class, pixels, conf
        self._sources: dict[int, Handle[Wkb]] = {}  # source -> a block's piece WKB (or its object reference)
        self._untaken: dict[int, int] = {}  # source -> its pieces not yet taken
        self._next_node = 0

    @property
    def all_arrived(self) -> bool:
        """Whether every block of the grid has been added."""
        return len(self._arrived) == len(self._keys)

    def held(self) -> Held:
        """What the joiner holds now (its memory): for tests and diagnostics."""
        return Held(len(self._data), len(self._sets), len(self._strips), len(self._sources),
                    len({source for source, *_ in self._data.values()}), len(self._waiting))

    def _neighbours(self, key: BlockKey, strips: Strips) -> Iterator[tuple[BlockKey, Strip, Side, slice, bool]]:
        for di, dj, side, part, their_side, their_part in self._seams:
            nkey = (key[0] + di, key[1] + dj)
            mine = strips.side(side)
            if mine is not None and nkey in self._keys:
                yield nkey, mine[part], their_side, their_part, di != 0 and dj != 0

    def _union(self, a: int, b: int) -> None:
        """Join two nodes' regions; the kept root takes over the absorbed one's open count and members."""
        kept, gone = self._sets.union(a, b)
        if kept != gone:
            self._open[kept] += self._open.pop(gone)
            self._members[kept] += self._members.pop(gone)

    def add(self, block: BlockPieces, wkb: Handle[Wkb]) -> list[list[int]]:
        """Take one block's pieces and a handle on their WKB (as :func:`merge_task` will be given it);
        return the groups of nodes (one per region) that became complete."""
        key = block.win.key
        labels = block.piece_labels
        nodes, look = _block_nodes(labels, block.piece_classes, self._next_node)
        source = len(self._arrived)
        if len(labels):
            self._sources[source], self._untaken[source] = wkb, len(labels)
        for k, node in enumerate(range(self._next_node, self._next_node + len(labels))):
            self._sets.add(node)
            self._open[node] = 0
            self._members[node] = [node]
            self._data[node] = (source, k, int(block.piece_classes[k]), int(block.piece_counts[k]),
                                float(block.piece_conf[k]))
        self._next_node += len(labels)
        self._arrived.add(key)
        self._strips[key], self._looks[key], self._nodes[key] = block.strips, look, nodes
        for nkey, mine, their_side, their_part, corner in self._neighbours(key, block.strips):
            if nkey in self._arrived:
                facing = self._strips[nkey].side(their_side)
                assert facing is not None  # a neighbour that has arrived has a strip on the side facing this block
                for x, y in _same_region(mine, nodes, look, facing[their_part], self._nodes[nkey], self._looks[nkey],
                                         4 if corner else self._connectivity):
                    self._union(x, y)
            else:
                touching = np.unique(mine)
                for node in nodes[touching[touching > 0]]:
                    self._open[self._sets.find(int(node))] += 1
                    self._waiting.setdefault(nkey, []).append(int(node))
        candidates = [int(x) for x in nodes[labels]]
        for node in self._waiting.pop(key, []):
            self._open[self._sets.find(node)] -= 1
            candidates.append(node)
        done: list[list[int]] = []
        for root in dict.fromkeys(self._sets.find(c) for c in candidates):
            if self._open[root] == 0:
                group = sorted(self._members.pop(root))
                del self._open[root]
                self._sets.remove(group)
                done.append(group)
        for bk in [key] + [nkey for nkey, *_ in self._neighbours(key, block.strips)]:
            if bk in self._strips and all(nk in self._arrived for nk, *_ in self._neighbours(bk, self._strips[bk])):
                del self._strips[bk], self._looks[bk], self._nodes[bk]
        return done

    def take(self, groups: Sequence[Sequence[int]], transform: Affine | None) -> tuple[MergeJob, list[Handle[Wkb]]]:
        """The pieces of complete groups, removed from the joiner, as one job for :func:`merge_task` and
        the WKB handles to call it with."""
        rows = [self._data.pop(node) for g in groups for node in g]
        source, index, classes, counts, conf = (np.array(c) for c in zip(*rows, strict=True))
        used, source = np.unique(source, return_inverse=True)
        handles = [self._sources[s] for s in used.tolist()]
        for s, k in zip(used.tolist(), np.bincount(source).tolist(), strict=True):
            self._untaken[s] -= k
            if self._untaken[s] == 0:
                del self._untaken[s], self._sources[s]
        starts = np.r_[0, np.cumsum([len(g) for g in groups])[:-1]].astype(np.int64)
        return MergeJob(source, index, classes, counts, conf, starts, transform), handles

    def __len__(self) -> int:
        """Pieces held (open, or complete but not yet taken)."""
        return len(self._data)


def merge_task(job: MergeJob, *sources: Wkb) -> Finished:
    """Union the pieces of every group into one region (a Ray task, or a plain call without Ray)."""
    geoms: Geoms = shapely.from_wkb(np.array([sources[s][i] for s, i in zip(job.source, job.index, strict=True)],
                                             dtype=object))
    ends = np.r_[job.starts[1:], len(geoms)]
    out = np.empty(len(job.starts), dtype=object)
    for i, (s, e) in enumerate(zip(job.starts, ends, strict=True)):
        out[i] = geoms[s] if e - s == 1 else merge_pieces(geoms[s:e])
    if job.transform is not None:
        out = to_crs(out, job.transform)
    return Finished(wkb_of(out), job.classes[job.starts], np.add.reduceat(job.counts, job.starts),
                    np.add.reduceat(job.conf, job.starts))


def merge_pieces(geoms: Geoms) -> shapely.Geometry:
    """One region from pieces that share exact pixel edges; the seam's collinear vertices are dropped."""
    merged = shapely.union_all(geoms)
    return shapely.simplify(merged, 0.0, preserve_topology=True)
