"""The class raster (and its confidence raster) as the vectoriser reads them: header checks, then block windows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.errors
from affine import Affine
from rasterio.windows import Window

from geoseg import storage
from geoseg.errors import ConfigError
from geoseg.polygonise.legend import CLASS_NAMES_TAG, parse_legend


@dataclass(frozen=True)
class RasterInfo:
    """What the driver needs to know of the class raster: its grid, its own class names and colours."""

    height: int
    width: int
    transform: Affine
    crs_wkt: str
    metres_per_unit: float
    class_names: dict[int, str]
    colours: dict[int, tuple[int, int, int]]  # the colour table's RGB by class id (empty without one)

    @property
    def pixel_m2(self) -> float:
        """The area of one pixel in square metres."""
        return float(abs(self.transform.determinant) * self.metres_per_unit ** 2)


def read_info(classes_path: str, confidence_path: str | None) -> RasterInfo:
    """Open the rasters' headers only, and refuse what cannot give correct polygons and areas."""
    try:
        with storage.gdal_env(), rasterio.open(classes_path) as src:
            if not np.issubdtype(np.dtype(src.dtypes[0]), np.integer) or np.dtype(src.dtypes[0]).itemsize > 4:
                raise ConfigError(f"{classes_path} has dtype {src.dtypes[0]}: vectorise needs integer class ids "
                                  "(uint8, 0 = nodata); convert it, e.g. gdal_translate -ot Byte")
            if src.crs is None:
                raise ConfigError(f"{classes_path} has no CRS: assign one (gdal_edit.py -a_srs EPSG:...)")
            if src.crs.is_geographic:
                raise ConfigError(f"{classes_path} is in a geographic CRS ({src.crs}): areas in m2 need a "
                                  "projected CRS; reproject it first (gdalwarp -t_srs EPSG:<UTM zone>)")
            tag = src.tags().get(CLASS_NAMES_TAG)
            names = parse_legend(json.loads(tag), f"{classes_path}:{CLASS_NAMES_TAG}") if tag else {}
            try:
                colours = {int(k): (v[0], v[1], v[2]) for k, v in src.colormap(1).items()}
            except ValueError:  # no colour table
                colours = {}
            info = RasterInfo(src.height, src.width, src.transform, src.crs.to_wkt(),
                              float(src.crs.linear_units_factor[1]), names, colours)
        if confidence_path is not None:
            with storage.gdal_env(), rasterio.open(confidence_path) as conf:
                if (conf.height, conf.width) != (info.height, info.width) or not conf.transform.almost_equals(
                        info.transform):
                    raise ConfigError(f"confidence raster {confidence_path} is not on the grid of {classes_path}: "
                                      "write both from the same mosaic")
    except rasterio.errors.RasterioIOError as exc:
        raise ConfigError(f"cannot open {exc}: check the path (or URL and credentials)") from exc
    return info


def read_window(path: str, window: Window) -> npt.NDArray[Any]:
    """One window of a raster's first band, in the raster's own dtype (a task's read: local path or URL)."""
    with storage.gdal_env(), rasterio.open(path) as src:
        data: npt.NDArray[Any] = src.read(1, window=window)
        return data
