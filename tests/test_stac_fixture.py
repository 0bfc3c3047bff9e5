"""The test catalogue itself (tests/_stac.py) and its server (tests/_http.py): valid STAC that pystac walks, real
COGs that GDAL reads through /vsicurl/ by byte ranges, a server that answers ranges as RFC 9110 says, and the same
catalogue on a real S3 server (SeaweedFS) read with the store's settings."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from _http import parse_range, serve
from _stac import (
    ALL_DATES,
    BAND_NAMES,
    BANDS,
    COLLECTION,
    SCL_CLOUD_HIGH,
    SCL_CLOUD_MEDIUM,
    SCL_SHADOW,
    downsample,
    item_dir,
    item_id,
    load_truth,
    make_catalogue,
    open_catalogue,
    scene_path,
    upload,
)
from _weed import Weed
from rasterio.windows import Window

from geoseg import storage

STRZEGOM = (16.2459, 50.9971)  # lon, lat of the scenes' centre
CLOUDY, STRIPPED = "20230530", "20220719"


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, str]:
    """All seven dates as a local catalogue (hrefs are paths), one of them clouded, one with its offset taken off."""
    root = tmp_path_factory.mktemp("stac")
    return root, make_catalogue(root, data_dir, str(root), cloudy={CLOUDY: 0}, strip_offset=(STRIPPED,))


@pytest.fixture()
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Requests to 127.0.0.1 go straight there, whatever proxy the machine's environment names."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    yield None


def _get(url: str, method: str = "GET", range_: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one request, an HTTP error status included."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, method=method, headers={"Range": range_} if range_ else {})
    try:
        with opener.open(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def test_catalogue_is_valid_stac(catalogue: tuple[Path, str], data_dir: Path) -> None:
    """pystac loads the root, walking reaches every date's item, and each item is described as Earth Search's are."""
    root, url = catalogue
    cat = pystac.Catalog.from_file(url)
    assert [c.id for c in cat.get_children()] == [COLLECTION]
    items = {item.id: item for item in cat.get_items(recursive=True)}
    assert sorted(items) == [item_id(d) for d in ALL_DATES]
    for date in ALL_DATES:
        item = items[item_id(date)]
        assert item.collection_id == COLLECTION
        assert item.datetime is not None
        assert item.datetime.isoformat() == f"{date[:4]}-{date[4:6]}-{date[6:]}T10:00:00+00:00"
        west, south, east, north = item.bbox
        assert west < STRZEGOM[0] < east and south < STRZEGOM[1] < north
        raw = json.loads((item_dir(root, date) / f"{item_id(date)}.json").read_text())
        assert raw["properties"]["proj:epsg"] == 32633  # pystac shows it as proj:code (projection v2) once loaded
        offset = date[:4] >= "2022" and date != STRIPPED
        assert item.properties["earthsearch:boa_offset_applied"] is offset
        assert item.properties["s2:processing_baseline"] == (
            "05.09" if offset else "03.01" if date == STRIPPED else "02.14")
        assert 0 < item.properties["eo:cloud_cover"] < (30 if date == CLOUDY else 1)
        assert set(item.assets) == {b.key for b in BANDS} | {"scl"}
        for band in BANDS:
            asset = item.assets[band.key]
            assert asset.href == str(item_dir(root, date) / f"{band.name}.tif")
            assert asset.media_type == pystac.MediaType.COG and "data" in asset.roles
            assert asset.extra_fields["eo:bands"] == [{"name": band.name, "common_name": band.common_name,
                                                       "center_wavelength": band.center,
                                                       "full_width_half_max": band.fwhm}]
            assert asset.extra_fields["raster:bands"] == [{
                "nodata": 0, "data_type": "uint16", "bits_per_sample": 15, "spatial_resolution": band.resolution,
                "scale": 0.0001, "offset": -0.1 if offset else 0.0}]
        scl = item.assets["scl"]
        assert scl.roles == ["data"] and "eo:bands" not in scl.extra_fields


def test_assets_are_the_scene_bands(catalogue: tuple[Path, str], data_dir: Path) -> None:
    """10 m bands are the scene's own pixels, 20 m bands its 2x2 means on the same origin, all COGs with nodata 0;
    the stripped date is the scene less 1000; the SCL marks the painted cloud and shadow."""
    root, _ = catalogue
    for date in (STRIPPED, "20210619"):
        with rasterio.open(scene_path(data_dir, date)) as src:
            scene, transform = src.read(), src.transform
        if date == STRIPPED:
            scene = np.where(scene > 0, np.clip(scene.astype(np.int32) - 1000, 1, None), 0).astype(np.uint16)
        for index, band in enumerate(BANDS):
            with rasterio.open(item_dir(root, date) / f"{band.name}.tif") as cog:
                assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and cog.nodata == 0
                assert cog.block_shapes == [(256, 256)] and cog.crs.to_epsg() == 32633
                assert (cog.transform.a, cog.transform.c, cog.transform.f) == (
                    band.resolution, transform.c, transform.f)
                want = scene[index] if band.resolution == 10 else downsample(scene[index])
                assert cog.shape == want.shape == ((401, 401) if band.resolution == 10 else (201, 201))
                np.testing.assert_array_equal(cog.read(1), want)
        assert BAND_NAMES == tuple(b.name for b in BANDS)

    cloud, shadow = load_truth(root, CLOUDY)
    assert 0.05 < cloud.mean() < 0.3 and shadow.any()
    with rasterio.open(item_dir(root, CLOUDY) / "SCL.tif") as src:
        codes = src.read(1)
    scl = codes.repeat(2, 0).repeat(2, 1)[:401, :401]  # each 20 m code over its 10 m pixels
    assert np.isin(scl[cloud], [SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH]).all()
    assert np.isin(scl[shadow], [SCL_SHADOW, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH]).all()
    assert (scl[~cloud & ~shadow] != SCL_SHADOW).mean() > 0.97  # codes spill only across the blocks of an edge
    with rasterio.open(item_dir(root, CLOUDY) / "B12.tif") as src:
        swir = src.read(1)
    with rasterio.open(scene_path(data_dir, CLOUDY)) as src:
        clear = downsample(src.read(BAND_NAMES.index("B12") + 1))
    high = codes == SCL_CLOUD_HIGH
    assert high.any() and swir[high].mean() > clear[high].mean() + 1000  # bright in the SWIR, as real clouds are


def test_range_requests(tmp_path: Path, no_proxy: None) -> None:
    """206 with Content-Range and exactly the bytes asked; the whole file for no or several ranges; 416 with
    ``bytes */size`` past the end; HEAD with the headers alone; 404 for what is not a file."""
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob.bin").write_bytes(data)
    with serve(tmp_path) as base:
        url = f"{base}/sub/blob.bin"
        for asked, (first, last) in {"bytes=0-99": (0, 99), "bytes=4990-": (4990, 4999), "bytes=-7": (4993, 4999),
                                     "bytes=100-99999": (100, 4999), "bytes=-99999": (0, 4999)}.items():
            status, headers, body = _get(url, range_=asked)
            assert status == 206, asked
            assert headers["Content-Range"] == f"bytes {first}-{last}/5000"
            assert int(headers["Content-Length"]) == last - first + 1 == len(body)
            assert body == data[first:last + 1] and headers["Accept-Ranges"] == "bytes"
        for asked in (None, "bytes=0-1,5-6", "bytes=9-3", "items=0-3"):
            status, headers, body = _get(url, range_=asked)
            assert (status, body, headers["Content-Length"]) == (200, data, "5000"), asked
        for asked in ("bytes=5000-", "bytes=6000-7000", "bytes=-0"):
            status, headers, body = _get(url, range_=asked)
            assert (status, headers["Content-Range"], body) == (416, "bytes */5000", b""), asked
        status, headers, body = _get(url, method="HEAD")
        assert (status, headers["Content-Length"], headers["Accept-Ranges"], body) == (200, "5000", "bytes", b"")
        status, headers, body = _get(url, method="HEAD", range_="bytes=10-19")
        assert (status, headers["Content-Range"], headers["Content-Length"], body) == (206, "bytes 10-19/5000",
                                                                                        "10", b"")
        assert _get(f"{base}/sub")[0] == 404 and _get(f"{base}/nothing.tif")[0] == 404
    assert parse_range("bytes=0-0", 0) is False and parse_range("bytes=0-", 1) == (0, 0)


def test_vsicurl_reads_served_catalogue(tmp_path: Path, data_dir: Path, no_proxy: None) -> None:
    """Over HTTP: pystac walks the served catalogue, and GDAL reads a window of a 20 m band through /vsicurl/ by
    byte ranges (never the whole file), equal to the same window of the file on disk."""
    log = tmp_path / "requests.log"
    with serve(tmp_path, log=log) as base:
        url = make_catalogue(tmp_path, data_dir, base, dates=("20210619", "20230530"))
        assert url == f"{base}/catalog.json"
        items = {item.id: item for item in pystac.Catalog.from_file(url).get_items(recursive=True)}
        assert sorted(items) == [item_id("20210619"), item_id("20230530")]
        asset = items[item_id("20230530")].assets["nir08"]
        assert asset.href == f"{base}/{COLLECTION}/{item_id('20230530')}/B8A.tif"
        window = Window(37, 150, 120, 45)  # across tile columns of the 256 px tiles
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(asset.href) as remote:
            assert remote.shape == (201, 201) and remote.res == (20.0, 20.0)
            served = remote.read(1, window=window)
        with rasterio.open(item_dir(tmp_path, "20230530") / "B8A.tif") as local:
            np.testing.assert_array_equal(served, local.read(1, window=window))
    lines = [line.split("\t") for line in log.read_text().splitlines()]
    cog = [(method, asked, status) for method, path, asked, status in lines if path.endswith("/B8A.tif")]
    assert cog and all(status in ("200", "206") for _, _, status in cog)
    assert all(asked != "-" for method, asked, _ in cog if method == "GET"), "GDAL read the whole file"


@pytest.mark.slow
def test_catalogue_on_object_store(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same catalogue with s3:// hrefs, uploaded to a real SeaweedFS: walked with pystac through
    geoseg.storage, and a band read by rasterio in geoseg's GDAL environment equals the file it was made from."""
    with Weed(tmp_path / "weed") as weed:
        for name, value in weed.env().items():
            monkeypatch.setenv(name, value)
        prefix = f"s3://{weed.bucket}/stac"
        root = tmp_path / "stac"
        url = make_catalogue(root, data_dir, prefix, dates=("20220619",), scl=False)
        assert url == f"{prefix}/catalog.json"
        written = upload(root, prefix)
        assert f"{prefix}/{COLLECTION}/{item_id('20220619')}/B11.tif" in written
        items = list(open_catalogue(url).get_items(recursive=True))
        assert [i.id for i in items] == [item_id("20220619")] and "scl" not in items[0].assets
        href = items[0].assets["swir16"].href
        assert href == f"{prefix}/{COLLECTION}/{item_id('20220619')}/B11.tif"
        window = Window(100, 10, 90, 150)
        with storage.gdal_env(), rasterio.open(href) as remote:
            stored = remote.read(1, window=window)
        with rasterio.open(root / COLLECTION / item_id("20220619") / "B11.tif") as local:
            np.testing.assert_array_equal(stored, local.read(1, window=window))
