"""The minimum mapping unit: a sieve over the graph of whole patches, decided before the blocks are polygonised.

A first pass over the blocks (:func:`graph_task`) describes each block's patches: class, pixel count, first
pixel and adjacencies, no geometry. :func:`sieve` joins the pieces across borders into whole patches (the
seams' grouping), merges the patches below the unit into their largest edge neighbour, smallest first, and
returns each block's new class per label; the blocks are then polygonised with those classes, so the result
is exactly the polygonisation of the sieved raster.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from geoseg.polygonise.blocks import (
    BlockKey,
    BlockTask,
    BlockWindow,
    ClassBlock,
    Int64s,
    LabelImage,
    Labels,
    Strip,
    Strips,
    border_strips,
    label_block,
)
from geoseg.polygonise.raster import read_window
from geoseg.polygonise.seams import facing_strips, join_groups
from geoseg.polygonise.unionfind import UnionFind

Edges = Int64s
"""(m, 3) label, label, shared edge length in pixels (0 = diagonal contact only)."""


@dataclass
class PatchGraph:
    """Per-block pass-1 output for the minimum mapping unit: every region with its neighbours."""

    win: BlockWindow
    labels: Labels  # 1..n
    classes: Int64s
    counts: Int64s
    keys: Int64s  # first pixel of the region in raster order (row * width + col): a layout-free tie-break
    edges: Edges
    strips: Strips


def patch_graph_block(classes: ClassBlock, win: BlockWindow, connectivity: int, raster_width: int) -> PatchGraph:
    """Regions of one block with their sizes and adjacencies: what the sieve needs, no geometry."""
    lab = label_block(classes, win.row_off, win.col_off, connectivity)
    n = len(lab.geoms)
    lb = lab.labels
    flat = lb.ravel()
    rows, cols = np.divmod(np.arange(flat.size), win.width)
    gkey = (rows + win.row_off) * raster_width + cols + win.col_off
    keys = np.full(n + 1, np.iinfo(np.int64).max)
    np.minimum.at(keys, flat, gkey)
    pairs = [(lb[:, :-1], lb[:, 1:]), (lb[:-1], lb[1:])]
    diag = [(lb[:-1, :-1], lb[1:, 1:]), (lb[:-1, 1:], lb[1:, :-1])] if connectivity == 8 else []
    edges = [_pair_counts(a, b, 1) for a, b in pairs] + [_pair_counts(a, b, 0) for a, b in diag]
    return PatchGraph(win, np.arange(1, n + 1), lab.classes, lab.counts, keys[1:],
                      np.concatenate(edges) if edges else np.zeros((0, 3), np.int64), border_strips(lb, win))


def graph_task(task: BlockTask) -> PatchGraph:
    """Read one block and describe its patches for the minimum mapping unit (a Ray task, or a plain call)."""
    return patch_graph_block(read_window(task.classes_path, task.win.window()), task.win, task.connectivity,
                             task.raster_width)


def _pair_counts(a: LabelImage, b: LabelImage, weight: int) -> Edges:
    """Distinct unordered label pairs of facing pixels with their counts (times ``weight``)."""
    a, b = a.ravel(), b.ravel()
    keep = (a > 0) & (b > 0) & (a != b)
    lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    u, n = np.unique(np.stack([lo, hi], axis=1).astype(np.int64), axis=0, return_counts=True)
    if len(u) == 0:
        return np.zeros((0, 3), np.int64)
    return np.column_stack([u, n * weight])


def sieve(graphs: Sequence[PatchGraph], connectivity: int, min_pixels: float) -> dict[BlockKey, Int64s]:
    """Decide the class of every region after merging patches smaller than ``min_pixels``.

    Patches are whole (joined across block borders). The smallest patch goes first (ties: the one
    whose first pixel comes first) and takes the class of its largest edge neighbour (ties: longest
    shared boundary, then first pixel); it then forms one patch with every neighbour of that class,
    as it would in the sieved raster. A patch with no edge neighbour (an island in nodata) is kept.
    Returns, per block, the new class of every label (index = label; index 0 unused).
    """
    patches, offset = join_groups([(g.win, g.strips, g.labels, g.classes) for g in graphs], connectivity)
    total = len(patches)
    roots = [patches.find(i) for i in range(total)]
    counts = np.concatenate([g.counts for g in graphs]) if graphs else np.zeros(0, np.int64)
    classes = np.concatenate([g.classes for g in graphs]) if graphs else np.zeros(0, np.int64)
    keys = np.concatenate([g.keys for g in graphs]) if graphs else np.zeros(0, np.int64)
    area: dict[int, int] = {}
    key: dict[int, int] = {}
    cls: dict[int, int] = {}
    for i in range(total):
        r = roots[i]
        area[r] = area.get(r, 0) + int(counts[i])
        key[r] = min(key.get(r, keys[i]), int(keys[i]))
        cls[r] = int(classes[i])
    adj: dict[int, dict[int, int]] = {r: {} for r in area}

    def add_edge(x: int, y: int, w: int) -> None:
        rx, ry = roots[x], roots[y]
        if rx != ry:
            adj[rx][ry] = adj[rx].get(ry, 0) + w
            adj[ry][rx] = adj[ry].get(rx, 0) + w

    for g in graphs:
        base = offset[g.win.key] - 1
        for a, b, w in g.edges:
            add_edge(base + int(a), base + int(b), int(w))
    for ka, mine, kb, theirs, corner in facing_strips({g.win.key: g.strips for g in graphs}, connectivity):
        _link_different(offset[ka] - 1, mine, offset[kb] - 1, theirs, add_edge, corner, connectivity)

    heap = [(a, key[r], r) for r, a in area.items() if a < min_pixels]
    heapq.heapify(heap)
    while heap:
        a, _, r = heapq.heappop(heap)
        if patches.find(r) != r or area[r] != a:
            continue
        edge_nbrs = [n for n, w in adj[r].items() if w > 0]
        if not edge_nbrs:
            continue
        target = max(edge_nbrs, key=lambda n: (area[n], adj[r][n], -key[n]))
        new_cls = cls[target]
        merging = [n for n in adj[r] if cls[n] == new_cls]
        root = r
        for n in merging:
            root = _merge(patches, root, n, area, key, cls, adj)
        cls[root] = new_cls
        if area[root] < min_pixels:
            heapq.heappush(heap, (area[root], key[root], root))
    out: dict[BlockKey, Int64s] = {}
    for g in graphs:
        base = offset[g.win.key]
        lut = np.zeros(len(g.labels) + 1, dtype=np.int64)
        lut[1:] = [cls[patches.find(base + i)] for i in range(len(g.labels))]
        out[g.win.key] = lut
    return out


def _link_different(base_a: int, mine: Strip, base_b: int, theirs: Strip,
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


def _cross_counts(a: Strip, b: Strip) -> Edges:
    if len(a) == 0:
        return np.zeros((0, 3), np.int64)
    u, n = np.unique(np.stack([a, b], axis=1).astype(np.int64), axis=0, return_counts=True)
    return np.column_stack([u, n])


def _merge(patches: UnionFind, a: int, b: int, area: dict[int, int], key: dict[int, int], cls: dict[int, int],
           adj: dict[int, dict[int, int]]) -> int:
    """Join patches ``a`` and ``b`` on the graph: areas add, neighbour lists merge."""
    root, gone = patches.union(a, b)
    if root == gone:
        return root
    area[root] = area[root] + area[gone]
    key[root] = min(key[root], key[gone])
    nb = adj.pop(gone)
    nb.pop(root, None)
    adj[root].pop(gone, None)
    for n, w in nb.items():
        adj[n].pop(gone, None)
        adj[root][n] = adj[root].get(n, 0) + w
        adj[n][root] = adj[n].get(root, 0) + w
    del area[gone], key[gone], cls[gone]
    return root
