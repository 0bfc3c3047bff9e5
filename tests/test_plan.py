"""Planning: scene inspection, the model-card contract, grid choice, and the named errors on bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from pyproj import CRS

from geoseg.config import RunConfig
from geoseg.errors import CheckpointError, ConfigError, RegionError, SceneError, SceneReadError
from geoseg.plan import RunPlan
from geoseg.planner import describe, make_plan
from geoseg.scenes import SceneReader, open_scene

S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")


def s2_scene(data_dir: Path, date: str = "20230530") -> str:
    return str(data_dir / "sentinel2_strzegom" / "scenes" / f"strzegom_{date}_33u.tif")


def test_sentinel2_scene_plans_on_its_own_grid(data_dir: Path) -> None:
    plan = make_plan(RunConfig(scenes=(s2_scene(data_dir),), out="unused"))
    assert plan.model == "sentinel2-lulc"  # chosen from the scene's 10 uint16 bands
    assert CRS.from_user_input(plan.grid.crs).to_epsg() == 32633  # UTM zone of the scene's centre
    assert (plan.grid.res, plan.grid.left, plan.grid.top, plan.grid.width, plan.grid.height) == \
        (10.0, 585420.0, 5652250.0, 401, 401)
    assert plan.items[0].sources[0].aligned and plan.items[0].sources[0].bands == tuple(range(1, 11))
    assert plan.tile_count == plan.grid.tile_rows * plan.grid.tile_cols
    again = RunPlan.from_json(plan.to_json())
    assert again.same_work(plan) and np.array_equal(again.tiles, plan.tiles)
    assert "tiles" in describe(plan)


def test_rgb_scenes_get_the_aerial_model_and_a_utm_grid(data_dir: Path) -> None:
    naip = str(data_dir / "scenes" / "naip_m_4709963_se_14_1_20200831.tif")
    plan = make_plan(RunConfig(scenes=(naip,), out="unused"))
    assert plan.model == "aerial-rgb"
    assert CRS.from_user_input(plan.grid.crs).to_epsg() == 32614  # NAD83 scene, WGS 84 UTM grid: reprojected
    assert not plan.items[0].sources[0].aligned
    assert plan.items[0].sources[0].scene.band_names == ("red", "green", "blue", "nir")  # 8-bit 4-band convention
    assert plan.items[0].sources[0].bands == (1, 2, 3)
    drone = open_scene(str(data_dir / "scenes" / "drone_webodm_orthophoto.tif"))
    assert drone.band_names == ("red", "green", "blue", "alpha") and drone.alpha == 4


def test_region_and_overrides(data_dir: Path) -> None:
    plan = make_plan(RunConfig(scenes=(s2_scene(data_dir),), out="unused",
                               region_wkt="POLYGON ((16.26 50.97, 16.30 50.97, 16.30 50.99, 16.26 50.99, 16.26 50.97))",
                               resolution=20.0, crs="EPSG:3035"))
    assert plan.grid.res == 20.0 and CRS.from_user_input(plan.grid.crs).to_epsg() == 3035
    assert plan.grid.width < 401 // 2 + 2
    assert not plan.items[0].sources[0].aligned


def test_region_outside_every_scene_is_refused(data_dir: Path) -> None:
    with pytest.raises(RegionError, match="intersects none"):
        make_plan(RunConfig(scenes=(s2_scene(data_dir),), out="unused",
                            region_wkt="POLYGON ((2 48, 3 48, 3 49, 2 49, 2 48))"))


def test_geographic_output_crs_is_refused(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="projected"):
        make_plan(RunConfig(scenes=(s2_scene(data_dir),), out="unused", crs="EPSG:4326"))


def test_scene_without_crs_is_refused(tmp_path: Path, write_raster: Callable[..., Path]) -> None:
    path = write_raster(tmp_path / "nocrs.tif", np.ones((3, 8, 8), np.uint8), crs=None)
    with pytest.raises(SceneError, match="no CRS"):
        make_plan(RunConfig(scenes=(str(path),), out="unused"))


def test_missing_and_unreadable_scenes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SceneReadError, match="cannot read scene"):
        make_plan(RunConfig(scenes=(str(tmp_path / "missing.tif"),), out="unused"))
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(SceneReadError):
        make_plan(RunConfig(scenes=(str(junk),), out="unused"))


def test_bands_that_do_not_fit_the_model_are_refused(tmp_path: Path, data_dir: Path,
                                                     write_raster: Callable[..., Path]) -> None:
    rgb = write_raster(tmp_path / "rgb.tif", np.ones((3, 8, 8), np.uint8))
    with pytest.raises(SceneError, match="expects uint16"):
        make_plan(RunConfig(scenes=(str(rgb),), out="unused", model="sentinel2-lulc"))
    six = write_raster(tmp_path / "six.tif", np.ones((6, 8, 8), np.uint16), descriptions=S2_BANDS[:6])
    with pytest.raises(SceneError, match="missing B08,B8A,B11,B12"):
        make_plan(RunConfig(scenes=(str(six),), out="unused", model="sentinel2-lulc"))
    unnamed = write_raster(tmp_path / "unnamed.tif", np.ones((5, 8, 8), np.uint16))
    with pytest.raises(SceneError, match="--bands"):
        make_plan(RunConfig(scenes=(str(unnamed),), out="unused"))
    with pytest.raises(SceneError, match="--bands names 2 bands"):
        make_plan(RunConfig(scenes=(str(rgb),), out="unused", bands=("red", "green")))


def test_explicit_band_names_reorder_the_scene(tmp_path: Path, write_raster: Callable[..., Path]) -> None:
    bgr = write_raster(tmp_path / "bgr.tif", np.stack([np.full((8, 8), v, np.uint8) for v in (1, 2, 3)]))
    plan = make_plan(RunConfig(scenes=(str(bgr),), out="unused", bands=("blue", "green", "red")))
    assert plan.items[0].sources[0].bands == (3, 2, 1)


def test_non_geoseg_checkpoint_is_refused(tmp_path: Path, data_dir: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match="not a geoseg checkpoint"):
        make_plan(RunConfig(scenes=(s2_scene(data_dir),), out="unused", model=str(bogus)))


def test_far_resolution_gives_a_warning_not_a_refusal(tmp_path: Path, write_raster: Callable[..., Path]) -> None:
    fine = write_raster(tmp_path / "fine.tif", np.ones((3, 16, 16), np.uint8),
                        transform=Affine(0.01, 0, 500000, 0, -0.01, 5650000))
    plan = make_plan(RunConfig(scenes=(str(fine),), out="unused", model="aerial-rgb"))
    assert any("off the" in w for w in plan.warnings)


def test_reprojected_read_marks_outside_pixels_invalid(data_dir: Path) -> None:
    scene = open_scene(s2_scene(data_dir))
    # a window in EPSG:3035 straddling the scene's western edge
    plan = make_plan(RunConfig(scenes=(scene.url,), out="unused", crs="EPSG:3035"))
    g = plan.grid
    data, valid = SceneReader(scene.url).read((1, 2, 3), g.crs, g.input_transform(0, 0), (g.input_size, g.input_size),
                                              False)
    assert data.shape == (3, g.input_size, g.input_size)
    assert 0 < valid.mean() < 1  # the halo reaches outside the scene
    assert (data[:, valid] > 0).mean() > 0.99  # the scene itself has a few zero pixels
    assert (data[:, ~valid] == 0).all()


def test_a_local_model_path_is_stored_absolute(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node resolves the plan's model the same way, whatever directory the user typed it from."""
    import shutil

    from geoseg.model import SHIPPED

    shutil.copyfile(SHIPPED["sentinel2-lulc"], tmp_path / "mine.pt")
    monkeypatch.chdir(tmp_path)
    plan = make_plan(RunConfig(scenes=(s2_scene(data_dir),), out="unused", model="mine.pt"))
    assert plan.model == str(tmp_path / "mine.pt")
    assert make_plan(RunConfig(scenes=(s2_scene(data_dir),), out="unused", model="sentinel2-lulc")).model \
        == "sentinel2-lulc"
