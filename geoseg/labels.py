"""User labels onto a scene's grid: label rasters (class ids, 0 unlabelled) reprojected by nearest neighbour, or
vector polygons with a class column rasterised, each read only over the window it covers.

Fine-tuning and `geoseg evaluate --reference` both take labels through here, so a polygon file and the label
raster it was drawn from give the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from geoseg.errors import LabelError, SceneReadError

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet")
Codes = npt.NDArray[np.int32]  # (H, W) label codes, 0 unlabelled


@dataclass(frozen=True)
class Grid:
    """A raster grid to put labels on: CRS, transform and shape."""

    crs: str
    transform: Affine
    shape: tuple[int, int]


@dataclass(frozen=True)
class Labels:
    """Labels on a window of a grid: codes (H, W), 0 unlabelled, and what each code stands for.

    `keys[code]` is the user's class as text: the id itself for label rasters, the class column's value for
    vectors, so "3" and "urban" both go through one legend.
    """

    window: Window
    codes: Codes
    keys: dict[int, str]


def is_vector(path: str | Path) -> bool:
    """Vector labels go by suffix: GeoPackage, GeoJSON, shapefile, FlatGeobuf, GeoParquet."""
    return Path(str(path)).suffix.lower() in VECTOR_SUFFIXES


def read_labels(path: str | Path, grid: Grid, class_field: str = "class") -> Labels:
    """The labels of `path` on the part of `grid` they cover."""
    return _read_vector(path, grid, class_field) if is_vector(path) else _read_raster(path, grid)


def _window(bounds: tuple[float, float, float, float], grid: Grid, path: str | Path) -> Window:
    """The grid's pixels a box (in the grid's CRS) covers, rounded out and cut to the grid."""
    h, w = grid.shape
    win = from_bounds(*bounds, transform=grid.transform)
    col0, row0 = max(math.floor(win.col_off + 1e-6), 0), max(math.floor(win.row_off + 1e-6), 0)
    col1 = min(math.ceil(win.col_off + win.width - 1e-6), w)
    row1 = min(math.ceil(win.row_off + win.height - 1e-6), h)
    if col1 <= col0 or row1 <= row0:
        raise LabelError(f"labels {path} do not overlap the scene they are paired with: check the pairing "
                         "(--labels pair with --scenes in order) and the labels' CRS")
    return Window(col0, row0, col1 - col0, row1 - row0)


def _read_raster(path: str | Path, grid: Grid) -> Labels:
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise LabelError(f"label raster {path} has no CRS: assign one (gdal_edit.py -a_srs EPSG:XXXX)")
            win = _window(transform_bounds(src.crs, CRS.from_user_input(grid.crs), *src.bounds), grid, path)
            out = np.full((int(win.height), int(win.width)), np.nan, np.float64)
            reproject(src.read(1).astype(np.float64), out, src_transform=src.transform, src_crs=src.crs,
                      src_nodata=src.nodata, dst_transform=rasterio.windows.transform(win, grid.transform),
                      dst_crs=grid.crs, dst_nodata=np.nan, resampling=Resampling.nearest)
    except RasterioIOError as exc:
        raise SceneReadError(f"cannot read label raster {path}: {exc}; pass a GeoTIFF of class ids "
                             f"(0 = unlabelled) or a vector file ({', '.join(VECTOR_SUFFIXES)})") from exc
    values = np.rint(np.nan_to_num(out, nan=0.0))
    if values.min() < 0 or values.max() > 255:
        raise LabelError(f"label raster {path} holds values outside 0..255: class ids are 1..255, 0 unlabelled")
    codes = values.astype(np.int32)
    return Labels(win, codes, {int(c): str(int(c)) for c in np.unique(codes) if c})


def _read_vector(path: str | Path, grid: Grid, class_field: str) -> Labels:
    import geopandas as gpd
    from rasterio.features import rasterize

    try:
        frame = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises its own DataSourceError family; every one means "cannot read"
        raise SceneReadError(f"cannot read vector labels {path}: {exc}") from exc
    if class_field not in frame.columns:
        raise LabelError(f"vector labels {path} have no column {class_field!r} (columns: "
                         f"{', '.join(str(c) for c in frame.columns if c != 'geometry')}): name the class column "
                         "with --class-field")
    if frame.crs is None:
        raise LabelError(f"vector labels {path} have no CRS: set one (ogr2ogr -a_srs EPSG:XXXX OUT IN)")
    frame = frame[frame.geometry.notna() & frame[class_field].notna()].to_crs(grid.crs)
    if frame.empty:
        raise LabelError(f"vector labels {path} hold no polygon with a {class_field!r} value")
    win = _window(tuple(frame.total_bounds), grid, path)
    values = [_key(v) for v in frame[class_field]]
    keys = sorted(set(values))
    code_of = {k: i + 1 for i, k in enumerate(keys)}
    codes = rasterize(((g, code_of[v]) for g, v in zip(frame.geometry, values, strict=True)),
                      out_shape=(int(win.height), int(win.width)),
                      transform=rasterio.windows.transform(win, grid.transform), fill=0, dtype="int32")
    return Labels(win, codes.astype(np.int32), {code_of[k]: k for k in keys})


def _key(value: object) -> str:
    """A class column's value as text: 3, 3.0 and "3" are one class."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def match_class(key: str, names: Mapping[int, str]) -> int | None:
    """A user's class (its id or its name, any case) as one of these classes' ids; None when it is neither."""
    if key.isdigit() and int(key) in names:
        return int(key)
    return next((i for i, n in names.items() if n.strip().lower() == key.strip().lower()), None)


def to_ids(labels: Labels, class_of: Mapping[str, int]) -> Codes:
    """Label codes as class ids through what each user class stands for (0 stays unlabelled)."""
    lut = np.zeros(max(labels.keys, default=0) + 1, np.int32)
    for code, key in labels.keys.items():
        lut[code] = class_of[key]
    out: Codes = lut[labels.codes]
    return out


def class_raster(labels: Labels, names: Mapping[int, str], path: str | Path) -> Codes:
    """Labels as these classes' ids (0 unlabelled); a class that is neither an id nor a name of them is refused."""
    class_of = {key: match_class(key, names) for key in labels.keys.values()}
    unknown = sorted(k for k, v in class_of.items() if v is None)
    if unknown:
        raise LabelError(f"labels {path} hold classes {unknown}, which are neither ids nor names of the "
                         f"model's classes ({'; '.join(f'{i} {n}' for i, n in names.items())}): relabel them")
    return to_ids(labels, {k: v for k, v in class_of.items() if v is not None})


def paste(values: Codes, at: Window, onto: Window, fill: int) -> Codes:
    """`values`, which lie at window `at` of a grid, on another window `onto` of it: `fill` where they do not reach."""
    out: Codes = np.full((int(onto.height), int(onto.width)), fill, values.dtype)
    r0, c0 = int(onto.row_off), int(onto.col_off)
    r1, c1 = r0 + int(onto.height), c0 + int(onto.width)
    ar, ac = int(at.row_off), int(at.col_off)
    top, bottom = max(r0, ar), min(r1, ar + values.shape[0])
    left, right = max(c0, ac), min(c1, ac + values.shape[1])
    if top < bottom and left < right:
        out[top - r0:bottom - r0, left - c0:right - c0] = values[top - ar:bottom - ar, left - ac:right - ac]
    return out
