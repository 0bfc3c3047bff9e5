"""The output: regions become rows of the GeoPackage's ``landcover`` layer, the class areas are added up, and the
layer gets its default QGIS style (``style``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import shapely

from geoseg.gpkg import GpkgWriter
from geoseg.polygonise.blocks import Finished, Float64s, Geoms, Int64s, Wkb, to_crs, wkb_of
from geoseg.polygonise.raster import RasterInfo
from geoseg.polygonise.simplify import simplify_coverage
from geoseg.polygonise.style import StyleClass, fallback_colour, layer_style

LAYER = "landcover"
FIELDS = {"class_id": "int64", "class_name": "str", "area_m2": "float64", "mean_confidence": "float64"}


class LandcoverLayer:
    """Turns regions into rows of the ``landcover`` layer, adds up the class areas, and styles the layer."""

    def __init__(self, writer: GpkgWriter, info: RasterInfo, names: Mapping[int, str], simplify_px: float) -> None:
        self.writer = writer
        self.info = info
        self.names = names
        self.simplify_px = simplify_px
        self.pixel_m2 = info.pixel_m2
        self.areas: dict[str, float] = {}
        self._ids: set[int] = set()
        self._held: list[tuple[Geoms, Int64s, Int64s, Float64s]] = []

    def add(self, regions: Finished) -> None:
        """Write regions now (their WKB is already in CRS coordinates), or, when the whole coverage is
        simplified together, hold them (then they are in pixel coordinates)."""
        if self.simplify_px > 0:
            self._held.append((shapely.from_wkb(regions.wkb), regions.classes, regions.counts, regions.conf))
            return
        self._write(regions.wkb, regions.classes, regions.counts.astype(np.float64) * self.pixel_m2,
                    regions.conf / regions.counts / 255.0)

    def finish(self) -> None:
        """Simplify the held coverage (if any) and write it; give the layer its style."""
        if self._held:
            geoms, classes, counts, conf = (np.concatenate(x) for x in zip(*self._held, strict=True))
            self._held.clear()
            simple = simplify_coverage(geoms, self.simplify_px)
            self._write(wkb_of(to_crs(simple, self.info.transform)), classes, shapely.area(simple) * self.pixel_m2,
                        conf / counts / 255.0)
        self.writer.style = layer_style(self.writer.layer, self._style_classes())

    def _style_classes(self) -> list[StyleClass]:
        """A category for every named class and every class written (0 is no data, never a region), in the
        colours of the class raster's colour table (the model card's, for a run's classes.tif)."""
        ids = sorted((set(self.names) | self._ids) - {0})
        return [StyleClass(i, self.names.get(i, f"class_{i}"), self.info.colours.get(i) or fallback_colour(i))
                for i in ids]

    def _write(self, wkb: Wkb, classes: Int64s, area_m2: Float64s, conf: Float64s) -> None:
        ids, inverse = np.unique(classes, return_inverse=True)
        self._ids.update(int(c) for c in ids)
        id_names = np.array([self.names.get(int(c), f"class_{int(c)}") for c in ids], dtype=object)
        names = id_names[inverse]
        for n, a in zip(id_names, np.bincount(inverse, weights=area_m2, minlength=len(ids)), strict=True):
            self.areas[n] = self.areas.get(n, 0.0) + float(a)
        self.writer.write_wkb(wkb, {"class_id": classes, "class_name": names, "area_m2": area_m2,
                                    "mean_confidence": conf})
