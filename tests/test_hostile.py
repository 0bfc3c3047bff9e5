"""Hostile and awkward input (issue 12, point 6): each gets a correct result or a named error saying what to change.

Rasters are made in the test (``write_raster``) or derived from the real Sentinel-2 scene; planning reads headers
only, so most of these are plan-level tests. Only the run whose region holds no valid pixel needs Ray.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.control import GroundControlPoint
from shapely import wkt
from shapely.geometry import Polygon

from geoseg.cli import main, parse_region
from geoseg.config import MAX_TILES, RunConfig
from geoseg.errors import ConfigError, RegionError, SceneError
from geoseg.model.checkpoint import load_card
from geoseg.planner import make_plan
from geoseg.scenes import SceneReader

S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
ZERO_COLS = 100  # the derived scene's zero-filled western edge, in pixels (1 km)


def s2_scene(data_dir: Path) -> Path:
    return data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"


def zero_edged(data_dir: Path, tmp_path: Path, write_raster: Callable[..., Path]) -> Path:
    """The real scene with its western 1 km and southern 200 m zero in every band, and no nodata tag (as
    Sentinel-2 products at the edge of a swath come)."""
    with rasterio.open(s2_scene(data_dir)) as src:
        data, transform, crs = src.read(), src.transform, src.crs.to_string()
    data[:, :, :ZERO_COLS] = 0
    data[:, -20:, :] = 0
    return write_raster(tmp_path / "edged.tif", data, crs=crs, transform=transform, descriptions=S2_BANDS)


@pytest.mark.parametrize("skew", [Affine.rotation(30), Affine.shear(20, 0)], ids=["rotated", "sheared"])
def test_rotated_and_sheared_scenes_are_warped_whole(tmp_path: Path, write_raster: Callable[..., Path],
                                                     skew: Affine) -> None:
    """The footprint is the scene's four corners, not its unrotated box: every scene pixel lands on the grid."""
    data = np.full((3, 60, 60), 90, np.uint8)
    transform = Affine(2, 0, 500000, 0, -2, 5650000) * skew
    path = write_raster(tmp_path / "skewed.tif", data, transform=transform)
    plan = make_plan(RunConfig(scenes=(str(path),), out="unused", model="aerial-rgb"))
    g, use = plan.grid, plan.items[0].sources[0]
    assert not use.aligned
    corners = [transform * xy for xy in ((0, 0), (60, 0), (60, 60), (0, 60))]
    xs, ys = zip(*corners, strict=True)
    assert g.left <= min(xs) and g.left + g.width * g.res >= max(xs)
    assert g.top >= max(ys) and g.top - g.height * g.res <= min(ys)
    read, valid = SceneReader(str(path)).read((1, 2, 3), g.crs, g.transform, (g.height, g.width), False)
    # the warped area is the scene's own: 3600 pixels of 4 m2 (less a fraction of the edge pixels)
    assert valid.sum() == pytest.approx(Polygon(corners).area / g.res**2, rel=0.03)
    assert (read[:, valid] == 90).all()


def test_gcp_only_scene_is_refused_with_a_hint_for_gcps(tmp_path: Path, write_raster: Callable[..., Path]) -> None:
    path = write_raster(tmp_path / "gcps.tif", np.ones((3, 16, 16), np.uint8), crs=None)
    gcps = [GroundControlPoint(row, col, 500000 + 2 * col, 5650000 - 2 * row) for row, col in
            ((0, 0), (0, 16), (16, 16), (16, 0))]
    with rasterio.open(path, "r+") as dst:
        dst.gcps = (gcps, CRS.from_epsg(32633))
    with rasterio.open(path) as src:
        assert src.crs is None and len(src.gcps[0]) == 4
    with pytest.raises(SceneError, match="4 ground control points") as err:
        make_plan(RunConfig(scenes=(str(path),), out="unused", model="aerial-rgb"))
    assert "gdalwarp" in str(err.value) and "-a_srs" not in str(err.value)  # not the hint for a missing CRS


def test_zero_filled_sentinel2_edges_are_nodata(tmp_path: Path, data_dir: Path,
                                                write_raster: Callable[..., Path]) -> None:
    """Pixels zero in every band of a uint16 scene with no nodata tag are nodata for reflectance cards."""
    path = zero_edged(data_dir, tmp_path, write_raster)
    card = load_card("sentinel2-lulc")
    assert card.zero_is_nodata and "zero in every band" in card.nodata_rule
    assert not load_card("aerial-rgb").zero_is_nodata
    plan = make_plan(RunConfig(scenes=(str(path),), out="unused"))
    g, use = plan.grid, plan.items[0].sources[0]
    assert use.aligned and use.scene.nodata is None
    reader = SceneReader(str(path))
    data, valid = reader.read(use.bands, g.crs, g.transform, (g.height, g.width), True, zero_nodata=True)
    filled = (data == 0).all(axis=0)
    assert not valid[:, :ZERO_COLS].any() and not valid[-20:].any()
    assert np.array_equal(valid, ~filled) and valid.sum() > 0.7 * valid.size
    assert reader.read(use.bands, g.crs, g.transform, (g.height, g.width), True)[1].all()  # without the rule
    # warped onto another CRS: the fill is left out of the bilinear kernel, so no edge pixel is darkened
    other = make_plan(RunConfig(scenes=(str(path),), out="unused", crs="EPSG:3035"))
    h = other.grid
    warped, ok = reader.read(use.bands, h.crs, h.transform, (h.height, h.width), False, zero_nodata=True)
    assert ok.sum() * h.res**2 == pytest.approx(valid.sum() * g.res**2, rel=0.01)  # the same valid area
    clean, _ = SceneReader(str(s2_scene(data_dir))).read(use.bands, h.crs, h.transform, (h.height, h.width), False)
    assert (warped[:, ok] > 0).any(axis=0).all()
    low = (warped[:, ok].astype(float) < 0.5 * clean[:, ok]).all(axis=0)
    assert low.mean() < 0.001  # blending with the zero fill would halve the edge's values


def test_float_reflectance_is_refused_naming_the_conversion(tmp_path: Path, write_raster: Callable[..., Path]) -> None:
    path = write_raster(tmp_path / "float.tif", np.full((10, 8, 8), 0.12, np.float32), descriptions=S2_BANDS)
    with pytest.raises(SceneError, match="no --scale") as err:
        make_plan(RunConfig(scenes=(str(path),), out="unused"))
    assert "gdal_translate -ot UInt16 -scale 0 1 0 10000" in str(err.value)
    with pytest.raises(SceneError, match="no --scale") as err:
        make_plan(RunConfig(scenes=(str(path),), out="unused", model="sentinel2-lulc"))
    assert "gdal_translate -ot UInt16 -scale 0 6.5535 0 65535" in str(err.value)  # raw = reflectance / 0.0001


def test_region_without_a_valid_pixel_warns_and_exits_0(tmp_path: Path, data_dir: Path, ray_session: None,
                                                        write_raster: Callable[..., Path],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = zero_edged(data_dir, tmp_path, write_raster)
    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    (w, e), (s, n) = to_lonlat.transform([585600, 586200], [5650000, 5651000])  # inside the zero-filled strip
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="geoseg.runtime"):
        code = main(["run", "--scenes", str(path), "--out", str(out), "--bbox", f"{w},{s},{e},{n}"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tiles_done"] == report["tiles_total"] > 0
    assert report["class_pixel_area_m2"] == {}
    assert any("no valid pixel" in m for m in report["warnings"])
    assert any("no valid pixel" in r.getMessage() for r in caplog.records)
    with rasterio.open(out / "classes.tif") as src:
        assert not src.read(1).any()


def test_output_resolution_far_from_scenes_and_model_warns(data_dir: Path) -> None:
    scene = str(s2_scene(data_dir))
    fine = make_plan(RunConfig(scenes=(scene,), out="unused", resolution=1.0))
    assert [w for w in fine.warnings if "--resolution 1 m is more than 4x finer" in w]
    assert len([w for w in fine.warnings if "--resolution" in w]) == 2  # than the scene and than the model
    coarse = make_plan(RunConfig(scenes=(scene,), out="unused", resolution=60.0))
    assert [w for w in coarse.warnings if "--resolution 60 m is more than 4x coarser" in w]
    assert not make_plan(RunConfig(scenes=(scene,), out="unused", resolution=20.0)).warnings


def test_region_across_the_antimeridian_is_planned_in_one_utm_zone(tmp_path: Path,
                                                                   write_raster: Callable[..., Path]) -> None:
    """Fiji: a scene over 180° in UTM 60S, a region given as --bbox W > E and as GeoJSON split at 180°."""
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32760", always_xy=True).transform(180, -17)
    x0, y0 = round(x) - 3000, round(y) + 3000
    path = write_raster(tmp_path / "fiji.tif", np.full((3, 300, 300), 50, np.uint8), crs="EPSG:32760",
                        transform=Affine(20, 0, x0, 0, -20, y0))
    from_bbox = parse_region(None, "179.99,-17.01,-179.99,-16.99")
    assert from_bbox is not None
    halves = [[[179.99, -17.01], [180, -17.01], [180, -16.99], [179.99, -16.99], [179.99, -17.01]],
              [[-180, -17.01], [-179.99, -17.01], [-179.99, -16.99], [-180, -16.99], [-180, -17.01]]]
    geojson = tmp_path / "fiji.geojson"
    geojson.write_text(json.dumps({"type": "MultiPolygon", "coordinates": [[h] for h in halves]}))
    from_geojson = parse_region(str(geojson), None)
    assert from_geojson is not None
    assert wkt.loads(from_geojson).geom_type == "Polygon"
    assert wkt.loads(from_geojson).symmetric_difference(wkt.loads(from_bbox)).area < 1e-12
    for region in (from_bbox, from_geojson):
        plan = make_plan(RunConfig(scenes=(str(path),), out="unused", model="aerial-rgb", region_wkt=region,
                                   resolution=20.0))
        assert CRS.from_user_input(plan.grid.crs).to_epsg() in (32760, 32701)  # a UTM zone at 180°, south
        width_m, height_m = plan.grid.width * plan.grid.res, plan.grid.height * plan.grid.res
        assert 2000 < width_m < 2300 and 2150 < height_m < 2400  # 0.02° x 0.02° at 17° S, not half the Earth
    whole = make_plan(RunConfig(scenes=(str(path),), out="unused", model="aerial-rgb", resolution=20.0))
    assert CRS.from_user_input(whole.grid.crs).to_epsg() in (32760, 32701)  # no region: the scene's centre
    assert whole.grid.width < 320 and whole.grid.height < 320  # the 300 px scene, reprojected to the next zone
    with pytest.raises(RegionError, match="W != E"):
        parse_region(None, "179.99,-17.01,179.99,-16.99")
    with pytest.raises(RegionError, match="359.96° wide across the antimeridian"):  # swapped W and E
        parse_region(None, "16.30,50.97,16.26,50.99")


def test_self_intersecting_region_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bowtie = tmp_path / "bowtie.geojson"
    bowtie.write_text(json.dumps({"type": "Polygon", "coordinates": [
        [[16.26, 50.97], [16.30, 50.99], [16.30, 50.97], [16.26, 50.99], [16.26, 50.97]]]}))
    with pytest.raises(RegionError, match="Self-intersection") as err:
        parse_region(str(bowtie), None)
    assert "make_valid" in str(err.value)
    assert main(["run", "--scenes", "unused.tif", "--out", str(tmp_path / "run"), "--region", str(bowtie)]) == 2
    assert "RegionError" in capsys.readouterr().err


def test_tile_count_above_max_tiles_is_refused_and_shown_by_dry_run(data_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    scene = str(s2_scene(data_dir))
    assert RunConfig(scenes=(scene,), out="unused").max_tiles == MAX_TILES
    with pytest.raises(ConfigError, match="--max-tiles"):
        RunConfig(scenes=(scene,), out="unused", max_tiles=0)
    with pytest.raises(ConfigError, match="the plan has 49 tiles, more than --max-tiles 48"):
        make_plan(RunConfig(scenes=(scene,), out="unused", tile_size=64, max_tiles=48))
    assert make_plan(RunConfig(scenes=(scene,), out="unused", tile_size=64, max_tiles=49)).tile_count == 49
    with pytest.raises(ConfigError, match="the plan has 160,801 tiles"):
        make_plan(RunConfig(scenes=(scene,), out="unused", resolution=0.01, tile_size=1000, max_tiles=1000))
    # a tile grid too large to lay (a typo in --resolution) is refused from its area, before its tiles are laid
    with pytest.raises(ConfigError, match="about 1,608,010,000 tiles"):
        make_plan(RunConfig(scenes=(scene,), out="unused", resolution=0.0001, tile_size=1000))
    run = ["run", "--scenes", scene, "--out", str(tmp_path / "run"), "--tile-size", "64", "--dry-run"]
    assert main([*run, "--max-tiles", "10"]) == 2
    assert "ConfigError: the plan has 49 tiles" in capsys.readouterr().err
    assert main([*run, "--max-tiles", "49"]) == 0
    assert "tiles     49 of 64 px" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
