"""The test STAC API (tests/_stac_api.py) as pystac-client sees it, and ``geoseg run --stac`` searching it: the
catalogue's items found by bbox, intersects, datetime and collection over several pages, by GET and by POST."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _http import serve
from _stac import COLLECTION, item_dir, item_id, make_catalogue
from _stac_api import serve_api
from pystac_client import Client
from shapely.geometry import box

from geoseg.catalog import find_items
from geoseg.cli import main
from geoseg.errors import CatalogueError

DATES = ("20220619", "20220719")
OTHER = "sentinel-2-copy"  # a second collection holding the same items, for the collections filter
BBOX = (16.2, 50.97, 16.3, 51.02)  # inside the scenes
FAR = {"type": "Polygon", "coordinates": [[[10.0, 45.0], [10.1, 45.0], [10.1, 45.1], [10.0, 45.1], [10.0, 45.0]]]}


def _copy_collection(root: Path) -> None:
    """``OTHER``: the JSON of ``COLLECTION`` again under another id (its assets the same files)."""
    collection = json.loads((root / COLLECTION / "collection.json").read_text())
    (root / OTHER).mkdir()
    (root / OTHER / "collection.json").write_text(json.dumps({**collection, "id": OTHER}))
    for date in DATES:
        item = json.loads((item_dir(root, date) / f"{item_id(date)}.json").read_text())
        (root / OTHER / f"{item_id(date)}.json").write_text(json.dumps({**item, "collection": OTHER}))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[tuple[str, Path]]:
    """The API's root URL over two dates in two collections, the assets on a static file server; and the root."""
    root = tmp_path_factory.mktemp("stac")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("NO_PROXY", "no_proxy"):  # 127.0.0.1 straight, whatever proxy the environment names
            mp.setenv(name, "127.0.0.1,localhost")
        with serve(root) as files:
            make_catalogue(root, data_dir, files, dates=DATES)
            _copy_collection(root)
            with serve_api(root, files) as url:
                yield url, root


def ids(search: Any) -> list[tuple[str, str]]:
    """(collection, id) of every item a search finds, sorted."""
    return sorted((i.collection_id, i.id) for i in search.items())


def everything(*dates: str) -> list[tuple[str, str]]:
    """(collection, id) of ``dates`` in both collections, sorted."""
    return sorted((c, item_id(d)) for c in (COLLECTION, OTHER) for d in dates)


def _get(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Status and JSON of a GET (a POST with ``body``), an error status included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_pystac_client_opens_it_as_an_item_search_api(api: tuple[str, Path]) -> None:
    client = Client.open(api[0])
    assert all(client.conforms_to(c) for c in ("CORE", "ITEM_SEARCH", "COLLECTIONS"))
    assert sorted(c.id for c in client.get_collections()) == sorted([COLLECTION, OTHER])
    collection = client.get_collection(COLLECTION)
    assert collection is not None and collection.get_self_href() == f"{api[0]}/collections/{COLLECTION}"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_bbox_and_datetime_search_pages_through_every_item(api: tuple[str, Path], method: str) -> None:
    client = Client.open(api[0])
    search = client.search(bbox=BBOX, datetime="2022-06-01/2022-07-31", method=method)
    pages = list(search.pages_as_dicts())
    assert [len(p["features"]) for p in pages] == [2, 2]  # the default limit, 2
    assert ids(search) == everything(*DATES)
    one_by_one = client.search(bbox=BBOX, datetime="2022-06-01/2022-07-31", method=method, limit=1)
    assert len(list(one_by_one.pages_as_dicts())) == 4 and ids(one_by_one) == everything(*DATES)
    assert ids(client.search(bbox=[16.2, 50.97, 16.3, 51.02], datetime="2021-01-01/2021-12-31", method=method)) == []


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_intersects_meets_the_footprints(api: tuple[str, Path], method: str) -> None:
    client = Client.open(api[0])
    near = {"type": "Point", "coordinates": [16.2459, 50.9971]}
    assert ids(client.search(intersects=near, method=method)) == everything(*DATES)
    assert ids(client.search(intersects=FAR, method=method)) == []


def test_a_datetime_window_excludes_the_items_outside_it(api: tuple[str, Path]) -> None:
    client = Client.open(api[0])
    assert ids(client.search(datetime="2022-07-01/..")) == everything("20220719")
    assert ids(client.search(datetime="../2022-06-30T23:59:59Z")) == everything("20220619")
    assert ids(client.search(datetime="2022-06-19T10:00:00Z")) == everything("20220619")
    assert ids(client.search(datetime="2022-06-20/2022-07-18")) == []


def test_the_collections_filter(api: tuple[str, Path]) -> None:
    client = Client.open(api[0])
    assert ids(client.search(collections=[COLLECTION], bbox=BBOX)) == [(COLLECTION, item_id(d)) for d in DATES]
    assert ids(client.search(collections=[OTHER], method="GET")) == [(OTHER, item_id(d)) for d in DATES]
    assert ids(client.search(collections=[COLLECTION, OTHER])) == everything(*DATES)
    assert ids(client.search(collections=["no-such-collection"])) == []


def test_an_item_is_served_at_its_api_path_with_its_assets_as_written(api: tuple[str, Path]) -> None:
    url, root = api
    ident = item_id(DATES[1])
    self_href = f"{url}/collections/{COLLECTION}/items/{ident}"
    status, item = _get(self_href)
    stored = json.loads((item_dir(root, DATES[1]) / f"{ident}.json").read_text())
    assert status == 200 and item["id"] == ident and item["assets"] == stored["assets"]
    links = {link["rel"]: link["href"] for link in item["links"]}
    assert links == {"self": self_href, "root": f"{url}/", "parent": f"{url}/collections/{COLLECTION}",
                     "collection": f"{url}/collections/{COLLECTION}"}
    found = next(iter(Client.open(url).search(ids=[ident], collections=[COLLECTION]).items()))
    assert found.get_self_href() == self_href


def test_unknown_paths_are_404_and_bad_parameters_400(api: tuple[str, Path]) -> None:
    url = api[0]
    for path in ("/nothing", f"/collections/{COLLECTION}/items/S2_nothing", "/collections/nothing"):
        status, body = _get(url + path)
        assert status == 404 and body["code"] == "NotFound", path
    for query in ("bbox=1,2,3", "bbox=a,b,c,d", "datetime=yesterday", "datetime=../..", "limit=0", "limit=x",
                  "intersects=%7B", "token=-2", "datetime=2022-07-01/2022-06-01"):
        status, body = _get(f"{url}/search?{query}")
        assert status == 400 and body["code"] == "BadRequest", query
    for body in ({"bbox": [16.2, 50.97, 16.3, 51.02], "intersects": FAR}, {"intersects": {"type": "Polygon"}},
                 {"sortby": [{"field": "id", "direction": "asc"}]}, {"limit": 0}, {"collections": 3},
                 {"datetime": 2022}):
        assert _get(f"{url}/search", body)[0] == 400, body


def test_geoseg_finds_the_items_through_the_api(api: tuple[str, Path]) -> None:
    """geoseg's own search (catalog.py) over several pages, with and without a collection, and none found."""
    url, bands = api[0], ("B02", "B8A", "B11")
    assert sorted((i.id, i.href) for i in find_items(url, box(*BBOX), bands, window="2022-06-01/2022-07-31")) \
        == sorted((i, f"{url}/collections/{c}/items/{i}") for c, i in everything(*DATES))
    found = find_items(url, box(*BBOX), bands, collection=COLLECTION, window="2022-07-01/..")
    assert [i.id for i in found] == [item_id("20220719")]
    with pytest.raises(CatalogueError, match="no item"):
        find_items(url, box(*BBOX), bands, collection=COLLECTION, window="2021-01-01/2021-12-31")


@pytest.mark.usefixtures("ray_session")
def test_geoseg_run_searches_the_api(api: tuple[str, Path], tmp_path: Path) -> None:
    url = api[0]
    out = tmp_path / "run"
    assert main(["run", "--stac", url, "--collection", COLLECTION, "--bbox", ",".join(map(str, BBOX)),
                 "--datetime", "2022-07-19", "--out", str(out), "--tile-size", "128"]) == 0
    items = json.loads((out / "report.json").read_text())["items"]
    ident = item_id("20220719")
    assert [(i["id"], i["href"]) for i in items] == [(ident, f"{url}/collections/{COLLECTION}/items/{ident}")]
    assert all(f.startswith("http://127.0.0.1") for f in items[0]["files"]), items[0]  # the file server's

