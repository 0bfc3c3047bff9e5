"""Catalogue input: the items of a STAC catalogue over a region and a time window, as files the tiles can read.

``--stac URL`` is either a STAC API (searched with pystac-client: its landing page conforms to item search)
or a static catalogue or collection (walked with pystac). Items are kept when their footprint meets the
region, their datetime lies in the window and their ``eo:cloud_cover`` is at most ``--max-cloud``. Each card
band is found among an item's assets by its ``eo:bands`` (or STAC 1.1 ``bands``) name, else by asset key,
else by a common name that only one asset has; an item lacking a band is refused before anything runs.

An item's reflectance convention is read from what it says, in this order: its band assets' ``raster:bands``
offset and scale (Earth Search: offset -0.1 at scale 0.0001 means +1000 in the data), then
``earthsearch:boa_offset_applied``, then ``s2:processing_baseline`` (the +1000 offset began with 04.00).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pystac
from pystac.stac_io import DefaultStacIO
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from geoseg import storage
from geoseg.errors import CatalogueError
from geoseg.scenes import Scene, normalise_band_name, open_scene

log = logging.getLogger(__name__)

ITEM_SEARCH = "https://api.stacspec.org/v1.0.0/item-search"
BASELINE_OFFSET = 1000.0  # Sentinel-2 L2A from processing baseline 04.00 on: reflectance x 10000 + 1000
MASK_ASSETS = ("scl",)  # an item's asset holding Sentinel-2's Scene Classification, by key
COMMON_NAMES = {"b01": "coastal", "b02": "blue", "b03": "green", "b04": "red", "b05": "rededge", "b06": "rededge",
                "b07": "rededge", "b08": "nir", "b8a": "nir08", "b09": "nir09", "b10": "cirrus", "b11": "swir16",
                "b12": "swir22"}


@dataclass(frozen=True)
class BandFile:
    """A file holding some of the model's bands: its scene header, its 1-based bands and their model slots."""

    scene: Scene
    bands: tuple[int, ...]
    slots: tuple[int, ...]


@dataclass(frozen=True)
class FoundItem:
    """A catalogue item as a run reads it."""

    id: str
    href: str | None
    datetime: str
    cloud_cover: float | None
    files: tuple[BandFile, ...]
    scl: Scene | None
    data_offset: float | None
    """What its data add to reflectance x 10000 (0 or 1000); None when it says nothing about it."""


class _StorageIO(DefaultStacIO):
    """pystac reads through geoseg's storage, so catalogues on ``s3://`` (with the node's credentials) load too."""

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        href = str(source)
        if storage.is_remote(href):
            return storage.read_bytes(href).decode()
        return str(super().read_text(source, *args, **kwargs))

    def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
        raise CatalogueError("geoseg only reads catalogues")


def find_items(url: str, region: BaseGeometry, bands: Sequence[str], collection: str | None = None,
               window: str | None = None, max_cloud: float | None = None) -> list[FoundItem]:
    """The catalogue's items over ``region`` (lon/lat) in the time ``window`` ("START/END", either open as
    ".."), at most ``max_cloud`` percent cloudy, each with the files holding ``bands``; oldest first."""
    start, end = parse_window(window)
    items = _search(url, region, collection, window) if _is_api(url) else _walk(url, collection)
    kept = []
    for item in items:
        when = item.datetime or _start_datetime(item)
        if item.geometry is None or not shape(item.geometry).intersects(region):
            continue
        if (start and when and when < start) or (end and when and when > end):
            continue
        cloud = item.properties.get("eo:cloud_cover")
        if max_cloud is not None and cloud is not None and float(cloud) > max_cloud:
            continue
        kept.append(item)
    if not kept:
        where = f"{collection} in {url}" if collection else url
        raise CatalogueError(f"no item of {where} covers the region in {window or 'any time'}"
                             f"{f' with at most {max_cloud:g} % cloud' if max_cloud is not None else ''}: widen "
                             "--datetime, raise --max-cloud, or check the region")
    kept.sort(key=lambda i: (i.datetime or _start_datetime(i) or datetime.min.replace(tzinfo=UTC), i.id))
    return [_found(item, bands) for item in kept]


def parse_window(window: str | None) -> tuple[datetime | None, datetime | None]:
    """``START/END`` (ISO dates or datetimes, ``..`` for open) as aware datetimes; a bare date ends at its
    day's end."""
    if not window:
        return None, None
    parts = window.split("/")
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) != 2:
        raise CatalogueError(f"--datetime {window!r} is not START/END (e.g. 2023-05-01/2023-08-31, '..' for open)")
    try:
        start = None if parts[0] in ("", "..") else _when(parts[0], end=False)
        end = None if parts[1] in ("", "..") else _when(parts[1], end=True)
    except ValueError as exc:
        raise CatalogueError(f"--datetime {window!r}: {exc}; give ISO dates, e.g. 2023-05-01/2023-08-31") from exc
    if start and end and start > end:
        raise CatalogueError(f"--datetime {window!r} ends before it starts")
    return start, end


def _when(text: str, end: bool) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if len(text) == 10 and end:  # a date: its whole day
        value = value.replace(hour=23, minute=59, second=59, microsecond=999999)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _start_datetime(item: pystac.Item) -> datetime | None:
    text = item.properties.get("start_datetime")
    return _when(text, end=False) if text else None


def _landing(url: str) -> dict[str, Any]:
    try:
        data = json.loads(_StorageIO().read_text(url))
    except (OSError, ValueError) as exc:
        raise CatalogueError(f"cannot read the catalogue at {url}: {exc}. Check the URL (and network access, or "
                             "AWS_* variables for s3://)") from exc
    if not isinstance(data, dict):
        raise CatalogueError(f"{url} is not a STAC catalogue, collection or API (not a JSON object)")
    return data


def _is_api(url: str) -> bool:
    """A STAC API landing page says it conforms to item search; a static catalogue does not."""
    return any(str(c).startswith(ITEM_SEARCH) for c in _landing(url).get("conformsTo", ()))


def _search(url: str, region: BaseGeometry, collection: str | None, window: str | None) -> list[pystac.Item]:
    """Item search, by POST where the API offers it (its landing page's search links say), else by GET."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from requests import RequestException

    posts = any(link.get("rel") == "search" and link.get("method") == "POST" for link in _landing(url).get("links", ()))
    try:
        search = Client.open(url).search(collections=[collection] if collection else None,
                                         intersects=region.__geo_interface__, datetime=window, max_items=10000,
                                         method="POST" if posts else "GET")
        return list(search.items())
    except (APIError, RequestException) as exc:
        raise CatalogueError(f"the STAC API at {url} failed the search ({type(exc).__name__}: {exc}): check the URL "
                             "and network access, and try again") from exc


def _walk(url: str, collection: str | None) -> list[pystac.Item]:
    landing = _landing(url)
    if landing.get("type") == "Feature":
        return [pystac.Item.from_dict(landing, href=url)]
    root = pystac.read_file(url, stac_io=_StorageIO())
    if not isinstance(root, pystac.Catalog):
        raise CatalogueError(f"{url} is a STAC {type(root).__name__}, not a catalogue or collection")
    items = list(root.get_items(recursive=True))
    if collection:
        items = [i for i in items if i.collection_id == collection]
    return items


def _asset_bands(asset: pystac.Asset) -> list[dict[str, Any]]:
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    return [b for b in bands if isinstance(b, dict)]


def _band_label(band: dict[str, Any]) -> tuple[str, str | None]:
    common = band.get("common_name") or band.get("eo:common_name")
    return normalise_band_name(str(band.get("name", ""))), (str(common).lower() if common else None)


def _locate(item: pystac.Item, wanted: str) -> tuple[str, int] | None:
    """(asset key, 1-based band) of a card band in an item: by band name, else asset key, else a common name
    only one asset has."""
    key = normalise_band_name(wanted)
    data = {k: a for k, a in item.assets.items() if not a.roles or "data" in a.roles}
    for k, asset in data.items():
        for i, band in enumerate(_asset_bands(asset), 1):
            if _band_label(band)[0] == key:
                return k, i
    if key in data:
        return key, 1
    common = COMMON_NAMES.get(key)
    hits = [(k, i) for k, asset in data.items() for i, band in enumerate(_asset_bands(asset), 1)
            if common and _band_label(band)[1] == common]
    return hits[0] if len(hits) == 1 else None


def _found(item: pystac.Item, bands: Sequence[str]) -> FoundItem:
    where = {b: _locate(item, b) for b in bands}
    missing = [b for b, w in where.items() if w is None]
    if missing:
        raise CatalogueError(f"item {item.id} has no asset for band(s) {', '.join(missing)} that the model needs "
                             f"(its assets: {', '.join(sorted(item.assets))}): choose a collection with them, or "
                             "a model for these bands with --model")
    by_asset: dict[str, list[tuple[int, int]]] = {}
    for slot, b in enumerate(bands):
        key, band = where[b]  # type: ignore[misc]
        by_asset.setdefault(key, []).append((band, slot))
    files = []
    for key, pairs in by_asset.items():
        href = item.assets[key].get_absolute_href() or item.assets[key].href
        names = tuple(_band_label(b)[0] or f"{key}_{i}" for i, b in enumerate(_asset_bands(item.assets[key]), 1))
        scene = open_scene(href, names or ((bands[pairs[0][1]],) if len(pairs) == 1 else None))
        files.append(BandFile(scene, tuple(b for b, _ in pairs), tuple(s for _, s in pairs)))
    scl = next((item.assets[k] for k in item.assets if k.lower() in MASK_ASSETS), None)
    self_href = item.get_self_href()
    return FoundItem(
        id=item.id, href=self_href,
        datetime=(item.datetime or _start_datetime(item) or datetime.min.replace(tzinfo=UTC)).isoformat(),
        cloud_cover=None if item.properties.get("eo:cloud_cover") is None else float(item.properties["eo:cloud_cover"]),
        files=tuple(files),
        scl=open_scene(scl.get_absolute_href() or scl.href, ("scl",)) if scl is not None else None,
        data_offset=data_offset(item, [k for k in by_asset]))


def data_offset(item: pystac.Item, band_assets: Sequence[str]) -> float | None:
    """What an item's data add to reflectance x 10000, from what it says (module docstring); None if silent."""
    for key in band_assets:
        for band in item.assets[key].extra_fields.get("raster:bands") or []:
            scale, offset = band.get("scale"), band.get("offset")
            if scale and offset is not None:
                return round(-float(offset) / float(scale), 6) + 0.0
    applied = item.properties.get("earthsearch:boa_offset_applied")
    if applied is not None:
        return BASELINE_OFFSET if applied else 0.0
    baseline = item.properties.get("s2:processing_baseline")
    if baseline:
        try:
            return BASELINE_OFFSET if float(baseline) >= 4.0 else 0.0
        except ValueError:
            pass
    return None
