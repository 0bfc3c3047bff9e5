"""Overview levels as GDAL's COG driver computes them, in numpy, for any band of rows and columns of a level.

GDAL halves each level (rounding down, at least 1 px) until both sides fit in one block, and computes
each level from the one above it when that one is wider, else (a raster 1 px wide by then) from the full
resolution, with a source/destination ratio ``r = n_src / n_dst`` per axis:

* NEAREST takes source pixel ``int(0.5 + i * r)``;
* AVERAGE averages the valid (non-zero) source pixels of ``[int(i*r + 1e-8), ceil((i+1)*r - 1e-8))``, the end
  pixels weighted by the fraction of them inside ``[i*r, (i+1)*r)`` (a row's sum first, then the rows'),
  rounded half up; no valid pixel gives 0.

The same formulas in the same double-precision order give the same pixels as GDAL 3.10 (the tests compare
both at even and odd sizes). Indices are global to the level, so a part of a level is computed from the
part of the level above that its pixels come from (:func:`source_span`); a ratio of exactly 2 takes a fast
integer path that gives the same result.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from geoseg.arrays import Band

_Index = npt.NDArray[np.int64]
_Float = npt.NDArray[np.float64]

EPS = 1e-8  # GDAL's tolerance when it turns a window's ends into pixel indices
AVERAGE_ROWS = 256  # destination rows averaged at a time at ratios other than 2


def level_shapes(height: int, width: int, block: int) -> list[tuple[int, int]]:
    """(height, width) of the full resolution and of every overview, as GDAL's COG driver chooses them."""
    shapes = [(height, width)]
    while shapes[-1][0] > block or shapes[-1][1] > block:
        h, w = shapes[-1]
        shapes.append((max(1, h // 2), max(1, w // 2)))
    return shapes


def source_level(shapes: list[tuple[int, int]], level: int) -> int:
    """The level GDAL computes ``level`` from: the one above it if that is wider, else the full resolution."""
    return level - 1 if shapes[level - 1][1] > shapes[level][1] else 0


def nearest_index(n_src: int, n_dst: int, start: int, stop: int) -> _Index:
    """Source pixel of destination pixels ``start:stop`` along one axis (NEAREST)."""
    return np.floor(0.5 + np.arange(start, stop, dtype=np.float64) * (n_src / n_dst)).astype(np.int64)


def average_window(n_src: int, n_dst: int, start: int, stop: int
                   ) -> tuple[_Index, _Index, _Float, _Float]:
    """First and end (exclusive) source pixel and the first and last pixel's weights of destination pixels
    ``start:stop`` along one axis (AVERAGE); a one-pixel window weighs 1."""
    r = n_src / n_dst
    i = np.arange(start, stop, dtype=np.float64)
    f0, f1 = i * r, (i + 1) * r
    a = np.floor(f0 + EPS).astype(np.int64)
    b = np.ceil(f1 - EPS).astype(np.int64)
    b = np.minimum(np.where(b == a, b + 1, b), n_src)
    first = np.where(b == a + 1, 1.0, 1 - (f0 - a))
    last = 1 - (b - f1)
    return a, b, first, last


def source_span(n_src: int, n_dst: int, start: int, stop: int, average: bool) -> tuple[int, int]:
    """The source pixels ``[first, end)`` that destination pixels ``start:stop`` are computed from."""
    if stop <= start:
        return 0, 0
    if average:
        a, b, _, _ = average_window(n_src, n_dst, start, stop)
        return int(a[0]), int(b[-1])
    idx = nearest_index(n_src, n_dst, start, stop)
    return int(idx[0]), int(idx[-1]) + 1


def downsample(src: Band, origin: tuple[int, int], n_src: tuple[int, int], n_dst: tuple[int, int],
               rows: tuple[int, int], cols: tuple[int, int], average: bool) -> Band:
    """Destination pixels ``rows`` x ``cols`` of the level of shape ``n_dst`` below a level of shape ``n_src``.

    ``src`` holds that level's pixels from ``origin`` (row, column) on, at least the :func:`source_span` of
    ``rows`` and ``cols``.
    """
    (r0, r1), (c0, c1) = rows, cols
    if (r1 - r0) * (c1 - c0) == 0:
        return np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)), src.dtype)
    if n_src[0] == 2 * n_dst[0] and n_src[1] == 2 * n_dst[1]:
        y, x = 2 * r0 - origin[0], 2 * c0 - origin[1]
        quads = src[y:y + 2 * (r1 - r0), x:x + 2 * (c1 - c0)]
        return _average_by_two(quads) if average else quads[::2, ::2].copy()
    if not average:
        iy = nearest_index(n_src[0], n_dst[0], r0, r1) - origin[0]
        ix = nearest_index(n_src[1], n_dst[1], c0, c1) - origin[1]
        picked: Band = src[np.ix_(iy, ix)]
        return picked
    # in bands of rows: the weighted sums hold a few float64 copies of their source rows
    return np.concatenate([_average(src, origin, n_src, n_dst, (r, min(r + AVERAGE_ROWS, r1)), cols)
                           for r in range(r0, r1, AVERAGE_ROWS)])


def _average(src: Band, origin: tuple[int, int], n_src: tuple[int, int], n_dst: tuple[int, int],
             rows: tuple[int, int], cols: tuple[int, int]) -> Band:
    """AVERAGE at any ratio: GDAL's weighted sums, in its order."""
    (r0, r1), (c0, c1) = rows, cols
    ay, by, wy0, wy1 = average_window(n_src[0], n_dst[0], r0, r1)
    ax, bx, wx0, wx1 = average_window(n_src[1], n_dst[1], c0, c1)
    sub = src[ay[0] - origin[0]:by[-1] - origin[0], ax[0] - origin[1]:bx[-1] - origin[1]]
    values = sub.astype(np.float64)
    valid = (sub != 0).astype(np.float64)
    ax, bx, ay, by = ax - ax[0], bx - ax[0], ay - ay[0], by - ay[0]
    # along x within each source row, then along y: GDAL's order of summation
    line_sum, line_weight = _weighted_taps(values, valid, ax, bx, wx0, wx1, axis=1)
    total, weight = _weighted_taps(line_sum, line_weight, ay, by, wy0, wy1, axis=0)
    out = np.zeros(total.shape, np.uint8)
    ok = weight > 0
    out[ok] = (total[ok] / weight[ok] + 0.5).astype(np.uint8)
    return out


def _weighted_taps(values: _Float, weights: _Float, a: _Index, b: _Index, first: _Float, last: _Float, axis: int
                   ) -> tuple[_Float, _Float]:
    """Window sums along ``axis``: first pixel x its weight, then the middle pixels, then the last x its weight.

    ``values`` are zero where ``weights`` are (no data is 0), so they need no mask of their own.
    """
    length = b - a
    shape = [1, 1]
    shape[axis] = len(a)

    def tap(k: _Index, w: _Float | float) -> tuple[_Float, _Float]:
        w = np.reshape(w, shape) if isinstance(w, np.ndarray) else w
        return np.take(values, k, axis=axis) * w, np.take(weights, k, axis=axis) * w

    total, weight = tap(a, first)
    longest = int(length.max())
    for k in range(1, longest - 1):
        inside = np.reshape(k < length - 1, shape).astype(np.float64)
        v, w = tap(np.minimum(a + k, b - 1), inside)
        total, weight = total + v, weight + w
    if longest > 1:
        end = np.where(length > 1, last, 0.0)
        v, w = tap(b - 1, end)
        total, weight = total + v, weight + w
    return total, weight


# indexed by sum * 5 + count; sums above 255 * count cannot occur and are clipped
_HALF_UP = np.array([min(int(s / n + 0.5), 255) if n else 0 for s in range(4 * 255 + 1) for n in range(5)], np.uint8)


def _average_by_two(quads: Band) -> Band:
    """Mean of the non-zero pixels of each 2 x 2 square, rounded half up (0 where all four are 0)."""
    h, w = quads.shape[0] // 2, quads.shape[1] // 2
    q = quads[:2 * h, :2 * w]
    tl, tr, bl, br = q[0::2, 0::2], q[0::2, 1::2], q[1::2, 0::2], q[1::2, 1::2]
    total = tl.astype(np.uint16) + tr + bl + br
    count = (tl != 0).view(np.uint8) + (tr != 0).view(np.uint8) + (bl != 0).view(np.uint8) + (br != 0).view(np.uint8)
    means: Band = _HALF_UP[total * 5 + count]
    return means


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative integers."""
    return -(-a // b)

