"""A static STAC catalogue made from the real Strzegom dates, laid out as Earth Search's ``sentinel-2-l2a`` is.

Each date becomes one Item of a Collection ``sentinel-2-l2a`` under a root Catalog: one single-band COG per band
(the 10 m bands at 10 m, the 20 m bands averaged 2x2 to 20 m on the same origin), an SCL band at 20 m, and the
properties a reader needs to convert reflectance conventions (``raster:bands`` scale and offset,
``s2:processing_baseline``, ``earthsearch:boa_offset_applied``) and to choose items (``eo:cloud_cover``). The files
are written under a local folder; every href in the JSON is absolute, built from a base that may be that folder,
the URL of a server of it (``tests/_http.py``) or an ``s3://`` prefix it is uploaded to (:func:`upload`).

A date may carry a painted cloud and shadow (``tests/_paint.py``): the SCL band marks them, and the painted masks are
kept beside the item in ``cloud_truth.tif`` (band 1 cloud, band 2 shadow, 10 m) for tests to score against
(:func:`load_truth`). A date may have the baseline 04.00 offset taken off and be declared as the older baseline
(``strip_offset``), to show that both conventions give the same input.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import pystac
import rasterio
from affine import Affine
from pyproj import Transformer

from geoseg import storage

ALL_DATES = ("20210619", "20220619", "20220719", "20221012", "20230209", "20230301", "20230530")
"""The Strzegom dates in ``sentinel2_strzegom/scenes``."""
BAND_NAMES = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
"""The bands of each scene file, in its order."""
COLLECTION = "sentinel-2-l2a"
MGRS = "33UWS"  # the grid square the scenes lie in (UTM 33U, easting 5xx km -> W, northing 5650 km -> S)
BOA_OFFSET = 1000  # what processing baseline 04.00 (from 2022-01-25) adds to every L2A reflectance value
CLEAR_COVER = 0.5
"""``eo:cloud_cover`` (percent) of a date without a painted cloud: real scenes chosen clear, never exactly 0."""
NDVI_VEGETATION = 0.4  # SCL 4 (vegetation) above, 5 (not vegetated) below
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
EXTENSIONS = ["https://stac-extensions.github.io/eo/v1.1.0/schema.json",
              "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
              "https://stac-extensions.github.io/projection/v1.1.0/schema.json"]

# SCL codes of the Sentinel-2 L2A scene classification
SCL_NODATA, SCL_SHADOW, SCL_VEGETATION, SCL_NOT_VEGETATED, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH = 0, 3, 4, 5, 8, 9


@dataclass(frozen=True)
class Band:
    """One Sentinel-2 band as Earth Search's items describe it."""

    name: str  # B02 ...
    key: str  # the asset's key
    common_name: str  # per the eo extension
    resolution: int  # metres
    center: float  # centre wavelength, micrometres
    fwhm: float  # full width at half maximum, micrometres
    title: str


BANDS = (
    Band("B02", "blue", "blue", 10, 0.49, 0.098, "Blue (band 2) - 10m"),
    Band("B03", "green", "green", 10, 0.56, 0.045, "Green (band 3) - 10m"),
    Band("B04", "red", "red", 10, 0.665, 0.038, "Red (band 4) - 10m"),
    Band("B05", "rededge1", "rededge", 20, 0.704, 0.019, "Red Edge 1 (band 5) - 20m"),
    Band("B06", "rededge2", "rededge", 20, 0.74, 0.018, "Red Edge 2 (band 6) - 20m"),
    Band("B07", "rededge3", "rededge", 20, 0.783, 0.028, "Red Edge 3 (band 7) - 20m"),
    Band("B08", "nir", "nir", 10, 0.842, 0.145, "NIR 1 (band 8) - 10m"),
    Band("B8A", "nir08", "nir08", 20, 0.865, 0.033, "NIR 2 (band 8A) - 20m"),
    Band("B11", "swir16", "swir16", 20, 1.61, 0.143, "SWIR 1 (band 11) - 20m"),
    Band("B12", "swir22", "swir22", 20, 2.19, 0.242, "SWIR 2 (band 12) - 20m"),
)
"""The scene's bands in file order, with their Earth Search asset keys."""

Mask: TypeAlias = npt.NDArray[np.bool_]
Painted: TypeAlias = tuple[npt.NDArray[np.uint16], Mask, Mask]
"""A painted scene (bands, y, x), its cloud mask and its shadow mask (y, x)."""
Painter: TypeAlias = Callable[..., Painted]
"""Called as ``painter(image, band_names, offset=...)``, as ``tests/_paint.py``'s ``paint_cloud`` is: ``offset`` is
what makes the scene's DN reflectance, ``(DN + offset) / 10000`` (-1000 for a date with the baseline 04.00 offset)."""
CloudSpec: TypeAlias = int | Painter | Painted
"""How a date is clouded: a seed for ``paint_cloud``, a painter, or a scene already painted with its masks."""


def item_id(date: str) -> str:
    """The Item id of a date: ``S2_33UWS_YYYYMMDD``."""
    return f"S2_{MGRS}_{date}"


def item_dir(root: Path, date: str) -> Path:
    """The folder of a date's Item JSON, its COGs and (when painted) its ``cloud_truth.tif``."""
    return root / COLLECTION / item_id(date)


def scene_path(data_dir: Path, date: str) -> Path:
    """The real 10-band stack of a date."""
    return data_dir / "sentinel2_strzegom" / "scenes" / f"strzegom_{date}_33u.tif"


def has_offset(date: str) -> bool:
    """Whether the real scene of ``date`` carries the +1000 of baseline 04.00 (all of 2022 on, here)."""
    return date[:4] >= "2022"


def load_truth(root: Path, date: str) -> tuple[Mask, Mask]:
    """The painted cloud and shadow masks of a clouded date (10 m, the scene's grid)."""
    with rasterio.open(item_dir(root, date) / "cloud_truth.tif") as src:
        truth = src.read()
    return truth[0].astype(bool), truth[1].astype(bool)


def _href(base: str, *parts: str) -> str:
    """An absolute href under ``base`` (a local folder, an http(s) URL or an s3:// prefix)."""
    if "://" not in base:
        base = str(Path(base).resolve())
    return "/".join([base.rstrip("/"), *parts])


def _paint(image: npt.NDArray[np.uint16], spec: CloudSpec, offset: int) -> Painted:
    """A cloud and shadow painted on ``image`` (whose reflectance is ``(DN + offset) / 10000``) as ``spec`` says."""
    if isinstance(spec, tuple):
        painted, cloud, shadow = spec
    elif isinstance(spec, int):
        from _paint import paint_cloud  # another module of the tests: imported only when a date is clouded

        painted, cloud, shadow = paint_cloud(image, BAND_NAMES, seed=spec, offset=offset)
    else:
        painted, cloud, shadow = spec(image, BAND_NAMES, offset=offset)
    assert painted.shape == image.shape and painted.dtype == np.uint16, "a painted scene keeps its shape and dtype"
    assert cloud.shape == shadow.shape == image.shape[1:], "masks are (y, x) on the scene's grid"
    return painted, np.asarray(cloud, bool), np.asarray(shadow, bool)


def _blocks(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``a`` (y, x) padded with zeros to even sides and cut into 2x2 blocks: (y/2, x/2, 4)."""
    h, w = a.shape
    padded = np.zeros((h + h % 2, w + w % 2), a.dtype)
    padded[:h, :w] = a
    return padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).transpose(0, 2, 1, 3).reshape(
        padded.shape[0] // 2, padded.shape[1] // 2, 4)


def downsample(band: npt.NDArray[np.uint16]) -> npt.NDArray[np.uint16]:
    """A 10 m band at 20 m on the same origin: the mean of each 2x2 block's valid (non-zero) pixels, 0 where none
    is (the edge blocks of an odd side half outside the scene average what lies inside)."""
    blocks = _blocks(band).astype(np.float64)
    count = (blocks > 0).sum(-1)
    mean = np.divide(blocks.sum(-1), count, out=np.zeros(count.shape), where=count > 0)
    return np.rint(mean).astype(np.uint16)


def scene_classification(image: npt.NDArray[np.uint16], cloud: Mask, shadow: Mask, offset: int
                         ) -> npt.NDArray[np.uint8]:
    """An SCL band at 20 m: 9 where a whole 2x2 block is painted cloud, 8 where part of it is, else 3 where any of
    it is painted shadow, else 4 or 5 by the NDVI of the block, 0 where every band is 0 in the whole block."""
    valid = _blocks(image.any(0)).sum(-1)
    inside = _blocks(np.ones(cloud.shape, bool)).sum(-1)
    clouded = _blocks(cloud).sum(-1)
    shaded = _blocks(shadow).sum(-1)
    red = downsample(image[BAND_NAMES.index("B04")]).astype(np.float64) - offset
    nir = downsample(image[BAND_NAMES.index("B08")]).astype(np.float64) - offset
    total = nir + red
    ndvi = np.divide(nir - red, total, out=np.zeros(total.shape), where=total > 0)
    scl = np.where(ndvi > NDVI_VEGETATION, SCL_VEGETATION, SCL_NOT_VEGETATED).astype(np.uint8)
    scl[shaded > 0] = SCL_SHADOW
    scl[clouded > 0] = SCL_CLOUD_MEDIUM
    scl[clouded == inside] = SCL_CLOUD_HIGH
    scl[valid == 0] = SCL_NODATA
    return scl


def write_cog(path: Path, data: npt.NDArray[Any], transform: Affine, crs: Any, nodata: int | None = 0,
              categorical: bool = False, descriptions: tuple[str, ...] | None = None) -> None:
    """A Cloud Optimized GeoTIFF (GDAL's COG driver: 256 px tiles, deflate, an overview where the raster is larger
    than a tile), as Earth Search's assets are; ``data`` (y, x) or (bands, y, x)."""
    bands = data[None] if data.ndim == 2 else data
    with rasterio.open(path, "w", driver="COG", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype=str(bands.dtype), crs=crs, transform=transform, nodata=nodata, blocksize=256,
                       compress="deflate", predictor=1 if categorical else 2,
                       overview_resampling="nearest" if categorical else "average") as dst:
        dst.write(bands)
        if descriptions:
            dst.descriptions = descriptions


def footprint(bounds: rasterio.coords.BoundingBox, crs: Any, steps: int = 10) -> dict[str, Any]:
    """The scene's outline in EPSG:4326 as a GeoJSON polygon, each edge densified (a UTM edge is curved there)."""
    to_wgs84 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    left, bottom, right, top = bounds
    t = np.linspace(0.0, 1.0, steps, endpoint=False)
    xs = np.concatenate([left + (right - left) * t, np.full(steps, right), right - (right - left) * t,
                         np.full(steps, left)])
    ys = np.concatenate([np.full(steps, top), top - (top - bottom) * t, np.full(steps, bottom),
                         bottom + (top - bottom) * t])
    lon, lat = to_wgs84.transform(xs, ys)
    ring = [[round(float(x), 7), round(float(y), 7)] for x, y in zip(lon, lat, strict=True)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


def _bbox(geometry: dict[str, Any]) -> list[float]:
    """A polygon's bounding box [west, south, east, north]."""
    ring = np.asarray(geometry["coordinates"][0])
    return [float(ring[:, 0].min()), float(ring[:, 1].min()), float(ring[:, 0].max()), float(ring[:, 1].max())]


def _links(self_href: str, root_href: str, parent_href: str | None) -> list[dict[str, str]]:
    """The self, root and parent links every object of the catalogue has."""
    links = [{"rel": "self", "href": self_href, "type": "application/json"},
             {"rel": "root", "href": root_href, "type": "application/json"}]
    if parent_href:
        links.append({"rel": "parent", "href": parent_href, "type": "application/json"})
    return links


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """One catalogue object as a JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _make_item(root: Path, data_dir: Path, base: str, date: str, spec: CloudSpec | None, scl: bool, strip: bool,
               cloud_cover: float | None, drop: tuple[str, ...]) -> dict[str, Any]:
    """One date's COGs and Item JSON (returned, for the collection's extent)."""
    if strip and not has_offset(date):
        raise ValueError(f"{date} carries no baseline 04.00 offset to strip")
    with rasterio.open(scene_path(data_dir, date)) as src:
        image = src.read()
        transform, crs, bounds = src.transform, src.crs, src.bounds
    offset = BOA_OFFSET if has_offset(date) else 0
    cloud = shadow = np.zeros(image.shape[1:], bool)
    if spec is not None:
        image, cloud, shadow = _paint(image, spec, -offset)
    if strip:  # the same ground as an older baseline would have delivered it; nodata stays 0
        image = np.where(image > 0, np.clip(image.astype(np.int32) - BOA_OFFSET, 1, None), 0).astype(np.uint16)
        offset = 0
    ident = item_id(date)
    folder = item_dir(root, date)
    folder.mkdir(parents=True, exist_ok=True)

    def href(name: str) -> str:
        return _href(base, COLLECTION, ident, name)

    coarse = transform @ Affine.scale(2)
    assets: dict[str, Any] = {}
    for index, band in enumerate(BANDS):
        data = image[index] if band.resolution == 10 else downsample(image[index])
        grid = transform if band.resolution == 10 else coarse
        if band.key in drop:
            continue
        write_cog(folder / f"{band.name}.tif", data, grid, crs, descriptions=(band.name,))
        assets[band.key] = {
            "href": href(f"{band.name}.tif"), "type": COG_TYPE, "title": band.title, "roles": ["data", "reflectance"],
            "gsd": band.resolution, "proj:shape": list(data.shape), "proj:transform": list(grid)[:6],
            "eo:bands": [{"name": band.name, "common_name": band.common_name, "center_wavelength": band.center,
                          "full_width_half_max": band.fwhm}],
            "raster:bands": [{"nodata": 0, "data_type": "uint16", "bits_per_sample": 15,
                              "spatial_resolution": band.resolution, "scale": 0.0001,
                              "offset": -offset / 10000}]}
    if scl and "scl" not in drop:
        classes = scene_classification(image, cloud, shadow, offset)
        write_cog(folder / "SCL.tif", classes, coarse, crs, categorical=True, descriptions=("SCL",))
        assets["scl"] = {
            "href": href("SCL.tif"), "type": COG_TYPE, "title": "Scene classification map (SCL)", "roles": ["data"],
            "gsd": 20, "proj:shape": list(classes.shape), "proj:transform": list(coarse)[:6],
            "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}]}
    valid = image.any(0)
    if spec is not None:
        with rasterio.open(folder / "cloud_truth.tif", "w", driver="GTiff", width=cloud.shape[1],
                           height=cloud.shape[0], count=2, dtype="uint8", crs=crs, transform=transform) as dst:
            dst.write(np.stack([cloud, shadow]).astype(np.uint8))
            dst.descriptions = ("cloud", "shadow")
    if cloud_cover is None:
        cloud_cover = round(100 * float(cloud[valid].mean()), 2) if spec is not None else CLEAR_COVER
    baseline = "05.09" if offset else ("03.01" if strip else "02.14")
    geometry = footprint(bounds, crs)
    when = datetime.strptime(date, "%Y%m%d").replace(hour=10, tzinfo=UTC)
    item = {
        "type": "Feature", "stac_version": "1.0.0", "stac_extensions": EXTENSIONS, "id": ident,
        "collection": COLLECTION, "geometry": geometry, "bbox": _bbox(geometry),
        "properties": {
            "datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "platform": "sentinel-2", "constellation": "sentinel-2",
            "instruments": ["msi"], "gsd": 10, "eo:cloud_cover": cloud_cover, "proj:epsg": crs.to_epsg(),
            "mgrs:utm_zone": 33, "mgrs:latitude_band": "U", "mgrs:grid_square": "WS",
            "s2:processing_baseline": baseline, "earthsearch:boa_offset_applied": bool(offset)},
        "links": [*_links(href(f"{ident}.json"), _href(base, "catalog.json"), _href(base, COLLECTION,
                                                                                    "collection.json")),
                  {"rel": "collection", "href": _href(base, COLLECTION, "collection.json"),
                   "type": "application/json"}],
        "assets": assets,
    }
    _write_json(folder / f"{ident}.json", item)
    return item


def make_catalogue(root: Path, data_dir: Path, href_base: str, dates: tuple[str, ...] = ALL_DATES,
                   cloudy: Mapping[str, CloudSpec] | None = None, scl: bool = True, strip_offset: tuple[str, ...] = (),
                   *, cloud_cover: Mapping[str, float] | None = None,
                   drop: Mapping[str, tuple[str, ...]] | None = None) -> str:
    """Write the catalogue of ``dates`` under ``root``, every href absolute under ``href_base`` (``root`` itself, a
    server's URL, an ``s3://`` prefix to :func:`upload` it to); returns the root catalogue's URL.

    ``cloudy``: dates to paint a cloud and shadow on (see :data:`CloudSpec`); ``scl``: give items an SCL asset;
    ``strip_offset``: dates whose +1000 is taken off, declared baseline 03.01; ``cloud_cover``: ``eo:cloud_cover``
    values to declare instead of the computed ones; ``drop``: asset keys to leave out of a date's item (its file too).
    """
    cloudy = dict(cloudy or {})
    unknown = (set(cloudy) | set(strip_offset) | set(cloud_cover or {}) | set(drop or {})) - set(dates)
    if unknown:
        raise ValueError(f"dates not in the catalogue: {sorted(unknown)}")
    catalog_href = _href(href_base, "catalog.json")
    collection_href = _href(href_base, COLLECTION, "collection.json")
    items = [_make_item(root, data_dir, href_base, d, cloudy.get(d), scl, d in strip_offset,
                        (cloud_cover or {}).get(d), (drop or {}).get(d, ())) for d in dates]
    bboxes = np.array([item["bbox"] for item in items])
    times = sorted(item["properties"]["datetime"] for item in items)
    _write_json(root / COLLECTION / "collection.json", {
        "type": "Collection", "stac_version": "1.0.0", "stac_extensions": [], "id": COLLECTION,
        "title": "Sentinel-2 Level-2A (Strzegom test dates)",
        "description": "Real Sentinel-2 L2A dates over Strzegom (PL), one COG per band as Earth Search serves them; "
                       "made by geoseg's tests (tests/_stac.py). Copernicus Sentinel-2 data.",
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [[*bboxes[:, :2].min(0).tolist(), *bboxes[:, 2:].max(0).tolist()]]},
                   "temporal": {"interval": [[times[0], times[-1]]]}},
        "links": [*_links(collection_href, catalog_href, catalog_href),
                  *({"rel": "item", "href": _href(href_base, COLLECTION, item["id"], f"{item['id']}.json"),
                     "type": "application/geo+json"} for item in items)],
    })
    _write_json(root / "catalog.json", {
        "type": "Catalog", "stac_version": "1.0.0", "id": "strzegom", "title": "geoseg test catalogue",
        "description": "A static catalogue of real Sentinel-2 dates over Strzegom, for geoseg's tests.",
        "links": [*_links(catalog_href, catalog_href, None),
                  {"rel": "child", "href": collection_href, "type": "application/json"}],
    })
    return catalog_href


def upload(root: Path, url: str) -> list[str]:
    """Put every file under ``root`` at the same place under ``url`` (an ``s3://`` prefix, the store named by the
    ``AWS_*`` environment, as geoseg.storage reads it); returns the URLs written."""
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        target = storage.join(url, *path.relative_to(root).parts)
        storage.write_bytes(target, path.read_bytes())
        written.append(target)
    return written


class StorageStacIO(pystac.StacIO):
    """pystac reading through geoseg.storage (local, s3://) and its default for http(s)."""

    def __init__(self) -> None:
        self._default = pystac.StacIO.default()

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        """The text of a catalogue file wherever it is."""
        href = str(source)
        if href.startswith("s3://"):
            return storage.read_bytes(href).decode()
        return self._default.read_text(source, *args, **kwargs)

    def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
        """Writing is not what the tests do with it."""
        raise NotImplementedError("the test catalogue is written by make_catalogue")


def open_catalogue(url: str) -> pystac.Catalog:
    """The root catalogue at ``url`` (a local path, http(s) or s3://), read with pystac."""
    return pystac.Catalog.from_file(url, stac_io=StorageStacIO())
