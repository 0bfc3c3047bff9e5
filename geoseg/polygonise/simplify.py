"""Coverage-preserving simplification (``simplify_m``): all polygons simplified together, so that neighbours keep
sharing exactly the same edges. It holds the whole vector coverage in memory, hence off by default."""

from __future__ import annotations

import shapely

from geoseg.polygonise.blocks import Geoms


def simplify_coverage(geoms: Geoms, tolerance_px: float) -> Geoms:
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
    result: Geoms = shapely.simplify(simple, 0.0)  # drop the densifying vertices left on the kept outer boundary
    return result
