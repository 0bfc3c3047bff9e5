"""A small STAC API (Core, Collections, Item Search 1.0.0) over a static catalogue made by ``tests/_stac.py``.

geoseg searches a STAC API with pystac-client (``geoseg/catalog.py``); this server lets the tests exercise that path
for real: a landing page that conforms to item search, ``/collections``, and ``/search`` by GET and POST with
``collections``, ``ids``, ``bbox``, ``intersects``, ``datetime`` and ``limit``, paged by a token in a ``next`` link
(the default page is small, so pystac-client's paging runs). Items are served as stored, their links pointing at
the API; their assets stay where ``make_catalogue`` wrote them (a file server, local paths), relative hrefs resolved
against ``--files-base``.

Run as ``python tests/_stac_api.py ROOT [--files-base URL]``: it prints its port (chosen free) on its first stdout
line, then serves until stopped. :func:`serve_api` starts it so and stops it by its own pid.
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from _http import HOST, Server
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

DEFAULT_LIMIT = 2  # small, so that a search of a few items takes several pages
MAX_LIMIT = 10000
CONFORMS_TO = ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/collections",
               "https://api.stacspec.org/v1.0.0/item-search",
               "http://www.opengis.net/spec/ogcapi-features-1/conf/core"]
GEOJSON, JSON, OPENAPI = "application/geo+json", "application/json", "application/vnd.oai.openapi+json;version=3.0"
UNSUPPORTED = ("query", "filter", "sortby", "fields")  # extensions not served: refused rather than ignored


class BadRequest(ValueError):
    """A search parameter the API cannot honour: answered with 400."""


def _link(rel: str, href: str, media: str = JSON, **extra: Any) -> dict[str, Any]:
    """A STAC link; every one has a media type, as pystac-client picks links by it."""
    return {"rel": rel, "href": href, "type": media, **extra}


def _instant(text: str, end: bool) -> datetime:
    """An RFC 3339 datetime as an aware one; a bare date (lenient) is its day's start, or its end when ``end``."""
    try:
        value = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError as exc:
        raise BadRequest(f"datetime {text!r} is not RFC 3339") from exc
    if end and len(text.strip()) == 10:
        value = value.replace(hour=23, minute=59, second=59, microsecond=999999)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_datetime(text: Any) -> tuple[datetime | None, datetime | None]:
    """``datetime``: one instant, or ``START/END`` with ``..`` (or nothing) for an open end."""
    if not isinstance(text, str):
        raise BadRequest(f"datetime {text!r} is not a string")
    parts = text.split("/")
    if len(parts) == 1:
        return _instant(parts[0], end=False), _instant(parts[0], end=True)
    if len(parts) != 2 or all(p in ("", "..") for p in parts):
        raise BadRequest(f"datetime {text!r} is neither an instant nor an interval with one closed end")
    start = None if parts[0] in ("", "..") else _instant(parts[0], end=False)
    end = None if parts[1] in ("", "..") else _instant(parts[1], end=True)
    if start and end and start > end:
        raise BadRequest(f"datetime {text!r} ends before it starts")
    return start, end


def parse_bbox(values: list[Any]) -> BaseGeometry:
    """A 2D or 3D ``bbox`` as a lon/lat region; west > east crosses the antimeridian."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"bbox {values!r} is not numbers") from exc
    if len(numbers) not in (4, 6):
        raise BadRequest(f"bbox has {len(numbers)} numbers, not 4 or 6")
    west, south, east, north = numbers if len(numbers) == 4 else [numbers[i] for i in (0, 1, 3, 4)]
    if south > north:
        raise BadRequest("bbox: its south is north of its north")
    return box(west, south, east, north) if west <= east else box(west, south, 180, north).union(
        box(-180, south, east, north))


def parse_region(params: dict[str, Any]) -> BaseGeometry | None:
    """The region of ``bbox`` or ``intersects`` (a GeoJSON geometry), None when neither is given."""
    if params.get("bbox") and params.get("intersects"):
        raise BadRequest("give bbox or intersects, not both")
    if params.get("bbox"):
        return parse_bbox(params["bbox"])
    if not params.get("intersects"):
        return None
    try:
        return shape(params["intersects"])
    except Exception as exc:  # shapely raises many kinds on a malformed geometry
        raise BadRequest(f"intersects is not a GeoJSON geometry: {exc}") from exc


def _listed(value: Any) -> set[str]:
    """``collections`` or ``ids`` as a set, from a list or a comma-separated string."""
    values = value.split(",") if isinstance(value, str) else value or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(f"collections and ids are lists of strings, not {value!r}")
    return set(values) - {""}


def _meets(item: dict[str, Any], region: BaseGeometry | None, start: datetime | None, end: datetime | None) -> bool:
    """Whether an item's footprint meets ``region`` and its time (instant or range) meets [start, end]."""
    if region is not None and (item.get("geometry") is None or not shape(item["geometry"]).intersects(region)):
        return False
    props = item["properties"]
    first, last = props.get("datetime") or props.get("start_datetime"), props.get("datetime") or props.get(
        "end_datetime")
    if start and (not last or _instant(last, end=True) < start):
        return False
    return not (end and (not first or _instant(first, end=False) > end))


class Catalogue:
    """The collections and items under a folder written by ``make_catalogue``, and the searches over them."""

    def __init__(self, root: Path, files_base: str, base: str) -> None:
        self.base = base
        self.collections: dict[str, dict[str, Any]] = {}
        self.items: list[dict[str, Any]] = []
        for path in sorted(root.rglob("*.json")):
            obj = json.loads(path.read_text())
            if obj.get("type") == "Collection":
                self.collections[obj["id"]] = obj
            elif obj.get("type") == "Feature":
                folder = "/".join([files_base.rstrip("/"), *path.parent.relative_to(root).parts])
                for asset in obj.get("assets", {}).values():  # relative hrefs: beside the item's file
                    if "://" not in asset["href"] and not asset["href"].startswith("/"):
                        asset["href"] = f"{folder}/{asset['href']}"
                self.items.append(obj)
        self.items.sort(key=lambda i: (i["properties"].get("datetime") or "", i["id"]))

    def landing(self) -> dict[str, Any]:
        """The landing page: what the API conforms to and where its parts are."""
        return {"type": "Catalog", "id": "geoseg-test-api", "stac_version": "1.0.0", "conformsTo": CONFORMS_TO,
                "title": "geoseg test STAC API", "description": "Item search over geoseg's test catalogue.",
                "links": [_link("self", f"{self.base}/"), _link("root", f"{self.base}/"),
                          _link("conformance", f"{self.base}/conformance"),
                          _link("service-desc", f"{self.base}/api", OPENAPI),
                          _link("data", f"{self.base}/collections"),
                          _link("search", f"{self.base}/search", GEOJSON, method="GET"),
                          _link("search", f"{self.base}/search", GEOJSON, method="POST"),
                          *(_link("child", f"{self.base}/collections/{c}") for c in self.collections)]}

    def openapi(self) -> dict[str, Any]:
        """A minimal OpenAPI description (Core asks for a ``service-desc``)."""
        paths = ["/", "/conformance", "/collections", "/collections/{collectionId}",
                 "/collections/{collectionId}/items", "/collections/{collectionId}/items/{featureId}", "/search"]
        return {"openapi": "3.0.3", "info": {"title": "geoseg test STAC API", "version": "1.0.0"},
                "paths": {p: {"get": {"responses": {"200": {"description": "OK"}}}} for p in paths}}

    def collection(self, cid: str) -> dict[str, Any]:
        """A collection, its links on the API (its static ``item`` links left out)."""
        c = f"{self.base}/collections/{cid}"
        return {**self.collections[cid], "links": [
            _link("self", c), _link("root", f"{self.base}/"), _link("parent", f"{self.base}/"),
            _link("items", f"{c}/items", GEOJSON)]}

    def item(self, obj: dict[str, Any]) -> dict[str, Any]:
        """An item as stored, its self, root, parent and collection links on the API."""
        c = f"{self.base}/collections/{obj.get('collection')}"
        ours = {"self": f"{c}/items/{obj['id']}", "root": f"{self.base}/", "parent": c, "collection": c}
        kept = [link for link in obj.get("links", []) if link.get("rel") not in ours]
        return {**obj, "links": [_link(rel, href, GEOJSON if rel == "self" else JSON) for rel, href in ours.items()]
                + kept}

    def search(self, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """The page of items matching ``params`` (lists and a GeoJSON dict, as a POST body has them), and the
        offset of the next page (0 when this is the last)."""
        if any(params.get(name) for name in UNSUPPORTED):
            raise BadRequest(f"this API does not support {', '.join(n for n in UNSUPPORTED if params.get(n))}")
        try:
            limit = min(int(DEFAULT_LIMIT if params.get("limit") in (None, "") else params["limit"]), MAX_LIMIT)
            offset = int(params.get("token") or 0)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"limit and token are whole numbers: {exc}") from exc
        if limit < 1 or offset < 0:
            raise BadRequest("limit must be at least 1 and token one this API gave")
        region = parse_region(params)
        start, end = parse_datetime(params["datetime"]) if params.get("datetime") else (None, None)
        collections, ids = _listed(params.get("collections")), _listed(params.get("ids"))
        found = [obj for obj in self.items if (not collections or obj.get("collection") in collections)
                 and (not ids or obj["id"] in ids) and _meets(obj, region, start, end)]
        page = found[offset:offset + limit]
        return [self.item(obj) for obj in page], offset + limit if offset + limit < len(found) else 0


def _get_params(query: str) -> dict[str, Any]:
    """A GET query string as a POST body would have it: comma lists as lists, ``intersects`` as parsed JSON."""
    params: dict[str, Any] = dict(parse_qsl(query))
    if "bbox" in params:
        params["bbox"] = params["bbox"].split(",")
    if "intersects" in params:
        try:
            params["intersects"] = json.loads(params["intersects"])
        except ValueError as exc:
            raise BadRequest(f"intersects is not GeoJSON: {exc}") from exc
    return params


class ApiHandler(BaseHTTPRequestHandler):
    """Answers the API's paths from its :class:`Catalogue` (set on a subclass by :func:`make_server`)."""

    catalogue: Catalogue

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read the answers, not a log."""

    def _send(self, status: int, body: dict[str, Any], media: str = JSON) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, description: str) -> None:
        self._send(status, {"code": code, "description": description})

    def do_GET(self) -> None:  # http.server calls it by this name
        """Landing page, conformance, collections, one item, or a search."""
        url, cat = urlsplit(self.path), self.catalogue
        parts = [p for p in url.path.split("/") if p]
        try:
            if not parts:
                return self._send(200, cat.landing())
            if parts == ["conformance"]:
                return self._send(200, {"conformsTo": CONFORMS_TO})
            if parts == ["api"]:
                return self._send(200, cat.openapi(), OPENAPI)
            if parts == ["search"]:
                return self._search(_get_params(url.query))
            if parts == ["collections"]:
                return self._send(200, {"collections": [cat.collection(c) for c in cat.collections],
                                        "links": [_link("self", f"{cat.base}/collections"),
                                                  _link("root", f"{cat.base}/")]})
            if parts[0] == "collections" and len(parts) in (2, 3, 4) and parts[1] in cat.collections:
                if len(parts) == 2:
                    return self._send(200, cat.collection(parts[1]))
                if len(parts) == 3 and parts[2] == "items":
                    return self._search({**_get_params(url.query), "collections": [parts[1]]})
                hit = [i for i in cat.items if i.get("collection") == parts[1] and i["id"] == parts[-1]]
                if len(parts) == 4 and parts[2] == "items" and hit:
                    return self._send(200, cat.item(hit[0]), GEOJSON)
        except BadRequest as exc:
            return self._error(400, "BadRequest", str(exc))
        self._error(404, "NotFound", f"nothing at {url.path}")

    def do_POST(self) -> None:  # http.server calls it by this name
        """A search with a JSON body; no other path takes POST."""
        if urlsplit(self.path).path.rstrip("/") != "/search":
            return self._error(404, "NotFound", f"cannot POST to {self.path}")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except ValueError as exc:
            return self._error(400, "BadRequest", f"the search body is not JSON: {exc}")
        try:
            if not isinstance(body, dict):
                raise BadRequest("the search body is not a JSON object")
            self._search(body, post=True)
        except BadRequest as exc:
            self._error(400, "BadRequest", str(exc))

    def _search(self, params: dict[str, Any], post: bool = False) -> None:
        features, following = self.catalogue.search(params)
        base = self.catalogue.base
        links = [_link("root", f"{base}/")]
        if following and post:  # pystac-client merges the body into the one it sent
            links.append(_link("next", f"{base}/search", GEOJSON, method="POST", body={"token": str(following)},
                               merge=True))
        elif following:
            url = urlsplit(self.path)
            query = urlencode({**dict(parse_qsl(url.query)), "token": following})
            links.append(_link("next", f"{base}{url.path}?{query}", GEOJSON, method="GET"))
        self._send(200, {"type": "FeatureCollection", "features": features, "links": links,
                         "numberReturned": len(features)}, GEOJSON)


def make_server(root: Path, files_base: str, port: int = 0) -> Server:
    """The API over ``root``'s catalogue on 127.0.0.1 (``port`` 0: a free one)."""
    server = Server((HOST, port), ApiHandler)
    catalogue = Catalogue(root, files_base, f"http://{HOST}:{server.server_address[1]}")
    server.RequestHandlerClass = type("Handler", (ApiHandler,), {"catalogue": catalogue})
    return server


@contextmanager
def serve_api(catalogue_root: Path, files_base: str, timeout: float = 30) -> Iterator[str]:
    """The API over ``catalogue_root`` in a subprocess for the block; yields its root URL; stopped by its pid."""
    command = [sys.executable, str(Path(__file__).resolve()), str(catalogue_root), "--files-base", files_base]
    with tempfile.TemporaryFile() as err, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err) as proc:
        try:
            assert proc.stdout is not None
            ready = select.select([proc.stdout], [], [], timeout)[0]
            port = proc.stdout.readline().strip() if ready else b""
            if not port.isdigit():
                err.seek(0)
                raise RuntimeError(f"the STAC API did not start (printed {port!r}):\n{err.read().decode()}")
            yield f"http://{HOST}:{int(port)}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> None:
    """Serve the API until stopped; the port goes to the first line of stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--files-base", help="what relative asset hrefs are resolved against (default: ROOT)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with make_server(args.root, args.files_base or str(args.root.resolve()), args.port) as server:
        print(server.server_address[1], flush=True)
        with suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
