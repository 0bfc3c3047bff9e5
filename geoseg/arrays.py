"""Names for the arrays that flow between geoseg's stages, so a signature says dtype and axes at a glance.

Aliases only (no runtime checks): numpy's typing carries the dtype, the comment the axes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

ClassMap = npt.NDArray[np.uint8]
"""(y, x) class ids as written to classes.tif; 0 is no data."""

Confidence = npt.NDArray[np.uint8]
"""(y, x) max softmax probability x 255; 0 is no data."""

Band = npt.NDArray[np.uint8]
"""(y, x) one 8-bit raster band of any meaning: a class map, a confidence raster, or an overview level of one."""

Mask = npt.NDArray[np.bool_]
"""(y, x) True where a pixel is valid (or selected)."""

TileIndex = npt.NDArray[np.int32]
"""(N, 2) tile (row, col) on a grid's tiling."""

Image = npt.NDArray[Any]
"""(bands, y, x) raw scene values in the scene's own dtype (uint8 or uint16 for the shipped models)."""

Counts = npt.NDArray[np.int64]
"""Pixel counts, one per value or per class id (a histogram, or a 256 x 256 confusion matrix)."""
