"""Opening scenes (local paths or URLs): what they hold, which bands feed the model, windowed reads.

Band naming, in order of precedence: ``--bands`` given by the user; the scene's own band
descriptions (Sentinel-2 stacks carry ``B02``...); the common convention for 8-bit imagery with
3 or 4 bands (red, green, blue, then alpha when the colour interpretation says so, else NIR).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geoseg import storage
from geoseg.arrays import Image, Mask
from geoseg.errors import SceneChangedError, SceneError, SceneReadError

log = logging.getLogger(__name__)

_ALIASES = {"r": "red", "g": "green", "b": "blue", "n": "nir", "nir": "nir", "a": "alpha"}


@dataclass(frozen=True)
class Scene:
    """What the planner needs to know of one scene; small, picklable, with no open handles."""

    url: str
    crs: str
    transform: tuple[float, ...]
    width: int
    height: int
    dtype: str
    band_names: tuple[str, ...]
    alpha: int | None
    nodata: float | None
    data_offset: float | None = None
    """What its values add to reflectance x 10000, as its band offset and scale say (GDAL metadata: offset -0.1
    at scale 0.0001 is +1000); None when they say nothing (offset 0, scale 1)."""
    stamp: str | None = field(default=None, compare=False)
    """The file's version when planned ("size:mtime_ns" locally, the ETag on a store; None in plans written before
    it was recorded): a rerun tells a repaired scene from an untouched one. Not compared: a repaired scene with the
    same grid, bands and dtype is the same work."""

    @property
    def res(self) -> float:
        """Pixel size along the scene's rows in its CRS units (a rotated pixel's side, not its x extent)."""
        return math.hypot(self.transform[0], self.transform[3])

    @property
    def corners(self) -> tuple[tuple[float, float], ...]:
        """The four corners of the scene in its CRS, in ring order: a rotated or sheared scene's true outline."""
        t = Affine(*self.transform)
        return tuple(t * xy for xy in ((0, 0), (self.width, 0), (self.width, self.height), (0, self.height)))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the scene's CRS, over all four corners (rotated scenes included)."""
        xs, ys = zip(*self.corners, strict=True)
        return min(xs), min(ys), max(xs), max(ys)


def normalise_band_name(name: str) -> str:
    """One spelling per band: case-insensitive, with R/G/B/N shorthands."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def open_scene(url: str, band_names: tuple[str, ...] | None = None) -> Scene:
    """Inspect a scene once at planning time; fail fast on what no tile could read."""
    try:
        with storage.gdal_env(), rasterio.open(url) as src:
            if src.crs is None and src.gcps[0]:
                raise SceneError(f"scene {url} is georeferenced only by {len(src.gcps[0])} ground control points, "
                                 "which geoseg does not warp: warp it onto a map grid first, e.g. "
                                 "gdalwarp -r bilinear -t_srs EPSG:XXXX IN.tif OUT.tif, and pass OUT.tif")
            if src.crs is None:
                raise SceneError(f"scene {url} has no CRS: assign one (e.g. gdal_edit.py -a_srs EPSG:XXXX) "
                                 "and run again")
            names = _band_names(src, url, band_names)
            alpha = next((i + 1 for i, ci in enumerate(src.colorinterp) if ci == ColorInterp.alpha), None)
            return Scene(
                url=url,
                crs=src.crs.to_wkt(),
                transform=tuple(src.transform)[:6],
                width=src.width,
                height=src.height,
                dtype=src.dtypes[0],
                band_names=names,
                alpha=alpha,
                nodata=src.nodata,
                data_offset=_data_offset(src.offsets[0], src.scales[0]),
                stamp=storage.version(url),
            )
    except RasterioIOError as exc:
        raise SceneReadError(f"cannot read scene {url}: {exc}. "
                             "Check the path (and AWS_* variables for s3:// URLs)") from exc


def check_unchanged(planned: Scene) -> bool:
    """Re-read a planned scene's header before a rerun dispatches tiles: True when the file changed (a repaired
    or re-downloaded scene, re-read by the tiles still to do) but kept its grid, band count and dtype; refused
    with :class:`SceneChangedError` when any of those changed, since its pixels would no longer fit the plan."""
    url = planned.url
    try:
        with storage.gdal_env(), rasterio.open(url) as src:
            now = {"CRS": src.crs.to_wkt() if src.crs else None, "transform": tuple(src.transform)[:6],
                   "width": src.width, "height": src.height, "band count": src.count, "dtype": src.dtypes[0]}
    except RasterioIOError as exc:
        raise SceneReadError(f"cannot read scene {url} of this run: {exc}. Put the scene back at that path "
                             "(and check AWS_* variables for s3:// URLs), then rerun") from exc
    then = {"CRS": planned.crs, "transform": tuple(planned.transform), "width": planned.width,
            "height": planned.height, "band count": len(planned.band_names), "dtype": planned.dtype}
    same_crs = now["CRS"] is not None and CRS.from_wkt(str(now["CRS"])) == CRS.from_wkt(planned.crs)
    changed = [k for k in then if (not same_crs if k == "CRS" else now[k] != then[k])]
    if changed:
        what = "; ".join(f"{k} {then[k]} -> {now[k]}" for k in changed if k != "CRS") or "CRS"
        if "CRS" in changed and what != "CRS":
            what = f"CRS; {what}"
        raise SceneChangedError(f"scene {url} changed since this run was planned ({what}): its pixels no longer "
                                "fit the plan. Put the original scene back to finish this run, or start a new run "
                                "with it (`geoseg run --overwrite` or another --out)")
    return planned.stamp is not None and storage.version(url) != planned.stamp


def _data_offset(offset: float, scale: float) -> float | None:
    """A band's offset and scale (physical = raw * scale + offset) as what raw values add to reflectance x
    10000, or None when they are the identity (the file says nothing)."""
    if scale in (0.0, 1.0) and offset == 0.0:
        return None
    return round(-offset / scale, 6) + 0.0 if scale else None


def _band_names(src: rasterio.DatasetReader, url: str, given: tuple[str, ...] | None) -> tuple[str, ...]:
    if given:
        if len(given) != src.count:
            raise SceneError(f"--bands names {len(given)} bands but scene {url} has {src.count}: "
                             "name every band in order")
        return tuple(normalise_band_name(b) for b in given)
    if all(src.descriptions):
        return tuple(normalise_band_name(d) for d in src.descriptions)
    if src.dtypes[0] == "uint8" and src.count in (3, 4):
        fourth = "alpha" if src.count == 4 and src.colorinterp[3] == ColorInterp.alpha else "nir"
        names = ("red", "green", "blue", fourth)[: src.count]
        log.warning("scene %s names no bands: assuming %s (8-bit convention); pass --bands to override",
                    url, ",".join(names))
        return names
    raise SceneError(
        f"scene {url} ({src.count} bands, {src.dtypes[0]}) does not name its bands: "
        "pass --bands NAME,NAME,... in band order"
    )


def band_indexes(scene: Scene, wanted: tuple[str, ...]) -> tuple[int, ...]:
    """1-based indexes of the model's bands in the scene, in the model's order."""
    names = list(scene.band_names)
    missing = [b for b in wanted if normalise_band_name(b) not in names]
    if missing:
        raise SceneError(
            f"scene {scene.url} has bands {','.join(names)} but the model needs {','.join(wanted)} "
            f"(missing {','.join(missing)}): choose a model for this imagery with --model, "
            "or name the bands with --bands"
        )
    return tuple(names.index(normalise_band_name(b)) + 1 for b in wanted)


class SceneReader:
    """Windowed reads from one scene through one open dataset.

    A tile worker keeps one per scene while it makes a run's tiles: GDAL's block cache lives with the
    open dataset, so a compressed block that neighbouring tiles share (with a 64 px halo a 384 px window
    spans 3 x 3 blocks of 256 px) is decoded once for all of them, not once per tile.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        with self._gdal_errors(), storage.gdal_env():
            self.src = rasterio.open(url)
        self.has_mask = self.src.nodata is not None or any(ci == ColorInterp.alpha for ci in self.src.colorinterp)
        self._crs_match: dict[str, bool] = {}

    def read(self, bands: tuple[int, ...], crs: str, transform: Affine, shape: tuple[int, int], aligned: bool,
             zero_nodata: bool = False, resampling: Resampling = Resampling.bilinear) -> tuple[Image, Mask]:
        """Read ``bands`` onto a target window of the run's grid: (data[B,H,W], valid[H,W]).

        ``aligned`` (same CRS, same pixel size, pixel edges on the grid's) reads the scene's own pixels
        directly; otherwise GDAL's warper resamples them (bilinear; ``nearest`` for class codes). Pixels outside
        the scene or masked (nodata, alpha) are invalid. ``zero_nodata`` (reflectance cards): in a scene with no
        nodata tag or alpha band, pixels zero in every band are fill, not data (zero-filled edges of Sentinel-2
        products), so they are invalid and the warper leaves them out of its bilinear kernel.
        """
        zero = zero_nodata and not self.has_mask
        if aligned:
            data, valid = self._read_aligned(bands, transform, shape)
            if zero:
                valid &= data.any(axis=0)
            return data, valid
        if not zero:
            nested = self._nested(crs, transform, shape)
            if nested is not None:
                return self._read_nested(bands, nested, shape, resampling)
        height, width = shape
        fill: dict[str, Any] = {"src_nodata": 0, "nodata": 0, "UNIFIED_SRC_NODATA": "YES"} if zero else {}
        with self._gdal_errors(), storage.gdal_env(), WarpedVRT(
            self.src,
            crs=CRS.from_user_input(crs),
            transform=transform,
            width=width,
            height=height,
            resampling=resampling,
            add_alpha=not (self.has_mask or zero),
            **fill,
        ) as vrt:
            data = vrt.read(list(bands))
            valid = (vrt.dataset_mask() if self.has_mask or zero else vrt.read(vrt.count)) > 0
        return data, valid

    def _nested(self, crs: str, transform: Affine, shape: tuple[int, int]
                ) -> tuple[tuple[int, int, int, int], Window] | None:
        """For a scene on a coarser lattice nested in the grid's (same CRS, north-up, its pixel a whole number of
        grid pixels, its pixel edges on grid pixel edges: Sentinel-2's 20 and 60 m bands on a 10 m grid), the
        output rows and columns (r0, r1, c0, c1) the scene covers and the scene window they span; else None."""
        t, res = self.src.transform, transform.a
        if t.b or t.d or transform.b or transform.d or t.a <= 0 or t.e >= 0 or transform.e != -res:
            return None
        k = t.a / res
        if not (np.isclose(k, round(k)) and k >= 1 and np.isclose(-t.e, t.a)):
            return None
        c_edge, r_edge = (t.c - transform.c) / res, (transform.f - t.f) / res  # scene's corner in output px
        if not (np.isclose(c_edge, round(c_edge)) and np.isclose(r_edge, round(r_edge))):
            return None
        if not self._same_crs(crs):
            return None
        k, c_edge, r_edge = round(k), round(c_edge), round(r_edge)
        height, width = shape
        c0, c1 = max(0, c_edge), min(width, c_edge + self.src.width * k)
        r0, r1 = max(0, r_edge), min(height, r_edge + self.src.height * k)
        window = Window((c0 - c_edge) / k, (r0 - r_edge) / k, (c1 - c0) / k, (r1 - r0) / k)
        return (r0, r1, c0, c1), window

    def _same_crs(self, crs: str) -> bool:
        known = self._crs_match.get(crs)
        if known is None:
            known = self._crs_match[crs] = self.src.crs == CRS.from_user_input(crs)
        return known

    def _read_nested(self, bands: tuple[int, ...], nested: tuple[tuple[int, int, int, int], Window],
                     shape: tuple[int, int], resampling: Resampling) -> tuple[Image, Mask]:
        """GDAL's resampling read of the scene window straight onto the output pixels it covers (several times
        cheaper than building a warper per tile; the same values inside the scene, its mask taken into
        account); the rest is invalid."""
        (r0, r1, c0, c1), window = nested
        data = np.zeros((len(bands), *shape), self.src.dtypes[0])
        valid = np.zeros(shape, bool)
        if r0 >= r1 or c0 >= c1:
            return data, valid
        out = (r1 - r0, c1 - c0)
        with self._gdal_errors(), storage.gdal_env():
            data[:, r0:r1, c0:c1] = self.src.read(list(bands), window=window, out_shape=(len(bands), *out),
                                                   resampling=resampling)
            if self.has_mask:
                valid[r0:r1, c0:c1] = self.src.dataset_mask(window=window, out_shape=out,
                                                            resampling=Resampling.nearest) > 0
            else:
                valid[r0:r1, c0:c1] = True
        return data, valid

    def _read_aligned(self, bands: tuple[int, ...], transform: Affine, shape: tuple[int, int]
                      ) -> tuple[Image, Mask]:
        """The window's part inside the scene read as it is stored (no warper: the pixels are the scene's own);
        the rest is invalid."""
        height, width = shape
        t = self.src.transform
        row, col = round((transform.f - t.f) / t.e), round((transform.c - t.c) / t.a)
        r0, r1 = max(row, 0), min(row + height, self.src.height)
        c0, c1 = max(col, 0), min(col + width, self.src.width)
        data = np.zeros((len(bands), height, width), self.src.dtypes[0])
        valid = np.zeros(shape, bool)
        if r0 >= r1 or c0 >= c1:
            return data, valid
        window = Window(c0, r0, c1 - c0, r1 - r0)
        inside = (slice(r0 - row, r1 - row), slice(c0 - col, c1 - col))
        with self._gdal_errors(), storage.gdal_env():
            if (r1 - r0, c1 - c0) == shape:
                self.src.read(list(bands), window=window, out=data)
            else:
                data[(slice(None), *inside)] = self.src.read(list(bands), window=window)
            valid[inside] = self.src.dataset_mask(window=window) > 0 if self.has_mask else True
        return data, valid

    @contextmanager
    def _gdal_errors(self) -> Iterator[None]:
        try:
            yield
        except RasterioIOError as exc:
            raise SceneReadError(f"reading {self.url} failed: the file may be truncated or corrupt; repair or "
                                 f"download it again, then `geoseg rerun RUN_DIR` (GDAL: {exc})") from exc
