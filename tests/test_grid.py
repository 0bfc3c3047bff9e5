"""Grid math: snapping, tile windows, tile selection (property tests over random grids)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import box

from geoseg.grid import Grid, snap_grid, tiles_covering, utm_epsg

coords = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(left=coords, bottom=coords, w=st.floats(1, 1e4), h=st.floats(1, 1e4),
       res=st.sampled_from([0.5, 1.0, 5.0, 10.0, 30.0]), ax=coords, ay=coords)
def test_snapped_grid_covers_bounds_on_the_anchor_lattice(left: float, bottom: float, w: float, h: float, res: float,
                                                          ax: float, ay: float) -> None:
    g = snap_grid((left, bottom, left + w, bottom + h), res, (ax, ay), "EPSG:32633", 256, 32)
    right, top = g.left + g.width * res, g.top
    bottom_edge = g.top - g.height * res
    assert g.left <= left + 1e-6 * res and right >= left + w - 1e-6 * res
    assert bottom_edge <= bottom + 1e-6 * res and top >= bottom + h - 1e-6 * res
    # no more than one pixel of slack on each side
    assert left - g.left < res + 1e-6 and right - (left + w) < res + 1e-6
    for edge, a in ((g.left, ax), (g.top, ay)):
        steps = (edge - a) / res
        assert abs(steps - round(steps)) < 1e-6


@settings(max_examples=100, deadline=None)
@given(width=st.integers(1, 2000), height=st.integers(1, 2000), tile=st.integers(16, 512), halo=st.integers(0, 64))
def test_tile_cores_partition_the_grid(width: int, height: int, tile: int, halo: int) -> None:
    g = Grid("EPSG:32633", 10.0, 0.0, 0.0, width, height, tile, halo)
    covered = np.zeros((height, width), np.int32)
    for r in range(g.tile_rows):
        for c in range(g.tile_cols):
            rows, cols = g.core_window(r, c)
            covered[rows, cols] += 1
            t = g.input_transform(r, c)
            # the input square starts `halo` pixels before the core, in map units
            assert np.isclose(t.c, g.left + (cols.start - halo) * g.res)
            assert np.isclose(t.f, g.top - (rows.start - halo) * g.res)
    assert (covered == 1).all()
    assert g.input_size == tile + 2 * halo


def test_tiles_covering_selects_only_touched_tiles() -> None:
    g = Grid("EPSG:32633", 10.0, 0.0, 10240.0, 1024, 1024, 256, 16)  # 4 x 4 tiles of 2560 m
    tiles = tiles_covering(g, box(100.0, 10240.0 - 2000.0, 2600.0, 10240.0 - 100.0))
    assert sorted(map(tuple, tiles.tolist())) == [(0, 0), (0, 1)]
    everything = tiles_covering(g, box(0.0, 0.0, 10240.0, 10240.0))
    assert len(everything) == 16


def test_utm_zone() -> None:
    assert utm_epsg(16.3, 50.9) == 32633
    assert utm_epsg(-93.4, 46.8) == 32615
    assert utm_epsg(151.2, -33.9) == 32756


def test_input_boxes_match_input_transforms() -> None:
    g = Grid("EPSG:32633", 10.0, 1000.0, 9000.0, 700, 500, 128, 16)
    tiles = np.array([[0, 0], [2, 3], [3, 5]])
    boxes = g.input_boxes(tiles)
    for (row, col), (left, bottom, right, top) in zip(tiles, boxes, strict=True):
        t = g.input_transform(int(row), int(col))
        assert (left, top) == pytest.approx((t.c, t.f))
        assert (right - left, top - bottom) == pytest.approx((g.input_size * g.res,) * 2)
