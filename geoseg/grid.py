"""Grid math, pure: an output grid (CRS, pixel size, extent) and the tiles laid over it.

A tile is a square core of ``tile_size`` pixels; the model sees the core plus ``halo`` pixels on
every side and only the core of its prediction is kept, so every kept pixel was predicted with at
least ``halo`` pixels of context and tile borders do not show as seams. Tile cores are aligned with
the prediction store's chunks: one tile writes exactly one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from affine import Affine
from rasterio.features import rasterize
from shapely.geometry.base import BaseGeometry

from geoseg.arrays import TileIndex


@dataclass(frozen=True)
class Grid:
    """The run's output raster grid and its tiling."""

    crs: str
    res: float
    left: float
    top: float
    width: int
    height: int
    tile_size: int
    halo: int

    @property
    def transform(self) -> Affine:
        """Pixel → map coordinates of the whole grid."""
        return Affine(self.res, 0.0, self.left, 0.0, -self.res, self.top)

    @property
    def tile_rows(self) -> int:
        """Tiles along y."""
        return math.ceil(self.height / self.tile_size)

    @property
    def tile_cols(self) -> int:
        """Tiles along x."""
        return math.ceil(self.width / self.tile_size)

    @property
    def input_size(self) -> int:
        """Side of the square the model sees for one tile (core plus halo)."""
        return self.tile_size + 2 * self.halo

    def core_window(self, row: int, col: int) -> tuple[slice, slice]:
        """Rows and columns of the grid a tile's core covers (clipped at the grid's edge)."""
        t = self.tile_size
        return (
            slice(row * t, min((row + 1) * t, self.height)),
            slice(col * t, min((col + 1) * t, self.width)),
        )

    def input_transform(self, row: int, col: int) -> Affine:
        """Georeferencing of a tile's haloed input square, which may reach past the grid's edge."""
        t = self.tile_size
        return self.transform @ Affine.translation(col * t - self.halo, row * t - self.halo)

    def input_boxes(self, tiles: TileIndex) -> npt.NDArray[np.float64]:
        """(left, bottom, right, top) of the haloed input squares of (row, col) tiles, as an (N, 4) array."""
        step, reach = self.tile_size * self.res, self.halo * self.res
        left = self.left + tiles[:, 1] * step - reach
        top = self.top - tiles[:, 0] * step + reach
        side = self.input_size * self.res
        return np.stack([left, top - side, left + side, top], axis=1)

    def area_m2(self, pixels: int) -> float:
        """Area of ``pixels`` grid cells (the grid's CRS is projected in metres)."""
        return float(pixels) * self.res * self.res


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 UTM zone containing (lon, lat)."""
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


def snap_grid(
    bounds: tuple[float, float, float, float],
    res: float,
    anchor: tuple[float, float],
    crs: str,
    tile_size: int,
    halo: int,
) -> Grid:
    """The smallest grid of pixel size ``res`` on the lattice through ``anchor`` that covers ``bounds``.

    Anchoring on a scene's own pixel corner lets a scene already in the grid's CRS and resolution be
    read without resampling.
    """
    left, bottom, right, top = bounds
    ax, ay = anchor
    eps = 1e-6
    x0 = ax + math.floor((left - ax) / res + eps) * res
    y0 = ay + math.ceil((top - ay) / res - eps) * res
    width = max(1, math.ceil((right - x0) / res - eps))
    height = max(1, math.ceil((y0 - bottom) / res - eps))
    return Grid(crs=crs, res=res, left=x0, top=y0, width=width, height=height, tile_size=tile_size, halo=halo)


def tiles_covering(grid: Grid, area: BaseGeometry) -> TileIndex:
    """(row, col) of every tile whose core touches ``area`` (in the grid's CRS), as an int32 (N, 2) array.

    Rasterising the area at tile resolution keeps this linear in the tile count, so a million-tile
    region plans in seconds.
    """
    t = grid.tile_size * grid.res
    tile_transform = Affine(t, 0.0, grid.left, 0.0, -t, grid.top)
    mask = rasterize(
        [(area, 1)],
        out_shape=(grid.tile_rows, grid.tile_cols),
        transform=tile_transform,
        all_touched=True,
        dtype="uint8",
    )
    rows, cols = np.nonzero(mask)
    return np.stack([rows, cols], axis=1).astype(np.int32)
