"""QGIS-ready outputs (issue 14, point 4), checked with what QGIS reads them through: GDAL/OGR's command-line tools
on a real run's GeoPackage and class raster, and xarray + rioxarray on its zarr stores.

The GeoPackage's default style is QGIS's ``layer_styles`` row (QML with a categorised renderer on ``class_id``, in
the model card's colours, labelled with its names; the same as SLD), the class raster keeps its colour table and
names, and predictions.zarr carries CF (``spatial_ref``) and GeoZarr (``proj:``, ``spatial:``) georeferencing. GDAL's
own Zarr driver is not checked: the GDAL here (3.6, and rasterio's 3.10) reads none of zarr-python 3's v3 stores
(its "bytes" codec came in GDAL 3.11; the ``spatial:``/``proj:`` conventions in 3.13).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from affine import Affine
from rasterio.crs import CRS

from geoseg.cli import main
from geoseg.plan import load_plan
from geoseg.polygonise import vectorise
from geoseg.polygonise.style import fallback_colour

SE = "{http://www.opengis.net/se}"
OGC = "{http://www.opengis.net/ogc}"
PROJ_UUID = "f17cb550-5864-4468-aeb7-f3180cfb622f"
SPATIAL_UUID = "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4"


def card_classes(data_dir: Path) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """The model card's classes as the sentinel2-lulc card has them: id -> (name, RGB)."""
    doc = json.loads((data_dir / "sentinel2_strzegom" / "classes.json").read_text())
    return {c["id"]: (c["name"], tuple(int(c["color"][i:i + 2], 16) for i in (1, 3, 5))) for c in doc["classes"]}


def gdal(*args: str) -> str:
    """A GDAL/OGR command's standard output (the tools QGIS's data providers are built on)."""
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def style_row(gpkg: Path) -> dict[str, object]:
    """The one row of the GeoPackage's layer_styles table, as OGR reads it (ogr2ogr to GeoJSON)."""
    doc = json.loads(gdal("ogr2ogr", "-f", "GeoJSON", "/vsistdout/", str(gpkg), "layer_styles"))
    assert len(doc["features"]) == 1
    row: dict[str, object] = doc["features"][0]["properties"]
    return row


def qml_categories(qml: str) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """The categorised renderer of a QML document: class id -> (label, fill RGB)."""
    renderer = ET.fromstring(qml).find("renderer-v2")
    assert renderer is not None
    assert (renderer.get("type"), renderer.get("attr")) == ("categorizedSymbol", "class_id")
    fills = {}
    for symbol in renderer.iter("symbol"):
        props = {o.get("name"): o.get("value") for o in symbol.iter("Option") if o.get("name")}
        assert props["style"] == "solid"
        r, g, b, a = (int(v) for v in str(props["color"]).split(","))
        fills[symbol.get("name")] = (r, g, b)
    return {int(str(c.get("value"))): (str(c.get("label")), fills[c.get("symbol")])
            for c in renderer.iter("category")}


def sld_rules(sld: str) -> dict[int, tuple[str, str]]:
    """The rules of an SLD document: class id (its filter's literal) -> (rule name, fill colour)."""
    rules = {}
    for rule in ET.fromstring(sld).iter(f"{SE}Rule"):
        equal = rule.find(f"{OGC}Filter/{OGC}PropertyIsEqualTo")
        assert equal is not None and equal.findtext(f"{OGC}PropertyName") == "class_id"
        fill = rule.find(f"{SE}PolygonSymbolizer/{SE}Fill/{SE}SvgParameter[@name='fill']")
        assert fill is not None
        rules[int(str(equal.findtext(f"{OGC}Literal")))] = (str(rule.findtext(f"{SE}Name")), str(fill.text))
    return rules


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ray_session: None) -> Path:
    """A real small run: one Sentinel-2 date of Strzegom in 128 px tiles."""
    out = tmp_path_factory.mktemp("qgis") / "run"
    scene = data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"
    assert main(["run", "--scenes", str(scene), "--out", str(out), "--tile-size", "128"]) == 0
    return out


def test_geopackage_has_a_default_qgis_style_in_the_card_colours(run_dir: Path, data_dir: Path) -> None:
    gpkg = run_dir / "landcover.gpkg"
    listing = gdal("ogrinfo", "-ro", "-so", str(gpkg))
    assert "1: landcover (Multi Polygon)" in listing and "2: layer_styles (None)" in listing
    schema = gdal("ogrinfo", "-ro", "-so", str(gpkg), "layer_styles")  # the schema QGIS creates, as OGR sees it
    for line in ("Feature Count: 1", "FID Column = id", "f_table_name: String (256.0)", "styleName: String (30.0)",
                 "styleQML: String (0.0)", "styleSLD: String (0.0)", "useAsDefault: Integer(Boolean)",
                 "update_time: DateTime (0.0) DEFAULT CURRENT_TIMESTAMP"):
        assert line in schema
    with sqlite3.connect(gpkg) as db:
        assert db.execute("select data_type, identifier from gpkg_contents where table_name = 'layer_styles'"
                          ).fetchall() == [("attributes", "layer_styles")]

    row = style_row(gpkg)  # what QGIS's loadStoredStyle selects: this layer, its geometry column, the default
    assert (row["f_table_catalog"], row["f_table_schema"], row["f_table_name"], row["f_geometry_column"]) == \
        ("", "", "landcover", "geom")
    assert row["useAsDefault"] is True and row["styleName"] == "landcover"
    card = card_classes(data_dir)
    assert qml_categories(str(row["styleQML"])) == card  # one category per class: its name, its colour
    assert sld_rules(str(row["styleSLD"])) == {i: (name, hex_colour(rgb)) for i, (name, rgb) in card.items()}
    written = pyogrio.read_dataframe(gpkg, layer="landcover", read_geometry=False)
    assert set(written.class_id) <= set(card)
    assert {card[i][0] for i in written.class_id} == set(written.class_name)


def test_class_raster_keeps_its_colour_table_and_names(run_dir: Path, data_dir: Path) -> None:
    info = json.loads(gdal("gdalinfo", "-json", str(run_dir / "classes.tif")))
    band = info["bands"][0]
    assert band["colorInterpretation"] == "Palette" and band["noDataValue"] == 0
    entries = band["colorTable"]["entries"]
    assert entries[0] == [0, 0, 0, 0]  # no data: transparent
    card = card_classes(data_dir)
    for i, (_, rgb) in card.items():
        assert entries[i] == [*rgb, 255]
    names = json.loads(info["metadata"][""]["CLASS_NAMES"])
    assert {int(k): v for k, v in names.items()} == {i: name for i, (name, _) in card.items()}


def test_zarr_stores_are_georeferenced_for_xarray_and_geozarr(run_dir: Path) -> None:
    grid = load_plan(str(run_dir)).grid
    t = grid.transform
    da = xr.open_zarr(run_dir / "predictions.zarr", consolidated=False)["classes"]
    assert CRS.from_user_input(da.rio.crs) == CRS.from_epsg(32633) == CRS.from_user_input(grid.crs)
    assert tuple(da.rio.transform())[:6] == tuple(t)[:6]
    with rasterio.open(run_dir / "classes.tif") as src:
        assert np.array_equal(da.values, src.read(1))

    pred = zarr.open_group(str(run_dir / "predictions.zarr"), mode="r")
    for attrs in (pred.attrs, *(pred[name].attrs for name in ("classes", "confidence", "provenance"))):
        assert {c["uuid"] for c in attrs["zarr_conventions"]} == {PROJ_UUID, SPATIAL_UUID}
        assert attrs["proj:code"] == "EPSG:32633" and attrs["spatial:dimensions"] == ["y", "x"]
        assert Affine(*attrs["spatial:transform"]) == t
        assert attrs["spatial:shape"] == [grid.height, grid.width]
        left, bottom, right, top = attrs["spatial:bbox"]
        assert (left, top, right, bottom) == (t.c, t.f, t.c + grid.width * t.a, t.f + grid.height * t.e)
    for name in ("classes", "confidence", "provenance"):
        assert pred[name].attrs["grid_mapping"] == "spatial_ref"
        assert pred[name].metadata.dimension_names == ("y", "x")
    ref = pred["spatial_ref"].attrs
    assert CRS.from_wkt(ref["crs_wkt"]) == CRS.from_epsg(32633)
    assert [float(v) for v in ref["GeoTransform"].split()] == [t.c, t.a, t.b, t.f, t.d, t.e]

    tiles = zarr.open_group(str(run_dir / "tiles.zarr"), mode="r")  # one CRS; each tile its own window of the grid
    assert [c["uuid"] for c in tiles.attrs["zarr_conventions"]] == [PROJ_UUID]
    assert tiles.attrs["proj:code"] == "EPSG:32633" and "spatial:transform" not in tiles.attrs


def test_standalone_vectorise_with_a_legend_writes_the_style(run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """Names from the legend file, colours from the class raster's colour table (the card's)."""
    legend = {str(i): f"{name} (legend)" for i, (name, _) in card_classes(data_dir).items()}
    (tmp_path / "legend.json").write_text(json.dumps(legend))
    out = tmp_path / "x.gpkg"
    assert main(["vectorise", str(run_dir / "classes.tif"), "--out", str(out),
                 "--classes", str(tmp_path / "legend.json")]) == 0
    categories = qml_categories(str(style_row(out)["styleQML"]))
    assert categories == {i: (f"{name} (legend)", rgb) for i, (name, rgb) in card_classes(data_dir).items()}


def test_a_raster_without_colours_or_names_gets_distinct_colours(tmp_path: Path) -> None:
    """Every class written gets a category, named as its rows are, in a colour of its own."""
    a = np.array([[1, 1, 2, 7]], dtype=np.uint8)
    with rasterio.open(tmp_path / "c.tif", "w", driver="GTiff", width=4, height=1, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 5650000), nodata=0) as dst:
        dst.write(a, 1)
    vectorise(str(tmp_path / "c.tif"), tmp_path / "c.gpkg")
    categories = qml_categories(str(style_row(tmp_path / "c.gpkg")["styleQML"]))
    assert categories == {i: (f"class_{i}", fallback_colour(i)) for i in (1, 2, 7)}
    assert len({rgb for _, rgb in categories.values()}) == 3
