"""The tile stage's reads: how a worker keeps scenes open, and aligned reads against GDAL's warper."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from geoseg import store
from geoseg.config import RunConfig
from geoseg.planner import make_plan
from geoseg.scenes import SceneReader
from geoseg.tile import TileJob, make_tile, open_reader


def test_a_worker_reads_each_scene_through_one_handle_per_execution(tmp_path: Path, data_dir: Path) -> None:
    """Tiles of one execution share the open scene (and its decoded blocks); a new execution opens it
    afresh, so a scene replaced between a run and its rerun is read as it is now."""
    original = data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"
    scene = tmp_path / "scene.tif"
    shutil.copyfile(original, scene)
    run_dir = str(tmp_path / "run")
    plan = make_plan(RunConfig(scenes=(str(scene),), out=run_dir, tile_size=128, halo=32))
    store.create(run_dir, plan.grid, plan.tiles, plan.items[0].sources[0].scene.band_names, "uint16")
    stores = store.Stores(run_dir)
    job = TileJob(run_dir, plan.run_id, "first", plan.grid, plan.items, plan.composite, None, "uint16", 10)
    opened = open_reader.cache_info().misses
    for i in range(3):
        make_tile(job, stores, i, *(int(v) for v in plan.tiles[i]))
    assert open_reader.cache_info().misses == opened + 1  # one open for three tiles
    before = stores.image[0]

    with rasterio.open(original) as src:
        profile, pixels = src.profile, src.read()
    with rasterio.open(tmp_path / "new.tif", "w", **profile) as dst:
        dst.write(pixels // 2)
    os.replace(tmp_path / "new.tif", scene)  # a new file at the same path
    make_tile(replace(job, execution_id="second"), stores, 0, *(int(v) for v in plan.tiles[0]))
    assert np.array_equal(stores.image[0], before // 2)


@pytest.mark.parametrize("name", ["drone_webodm_orthophoto.tif", "naip_m_4709963_se_14_1_20200831.tif"])
def test_aligned_reads_equal_the_warper_at_nearest(name: str, data_dir: Path) -> None:
    """An aligned scene is read directly; values and validity (alpha band or nodata, and outside the scene)
    equal GDAL's warper at nearest neighbour, which reads it the slow way, for windows inside and across edges."""
    path = data_dir / "scenes" / name
    reader = SceneReader(str(path))
    src = reader.src
    bands = tuple(range(1, 4))
    for row, col in ((-40, -30), (10, 20), (src.height - 60, src.width - 50)):
        transform = src.transform * Affine.translation(col, row)
        data, valid = reader.read(bands, src.crs.to_wkt(), transform, (100, 100), aligned=True)
        with WarpedVRT(src, transform=transform, width=100, height=100, resampling=Resampling.nearest,
                       add_alpha=not reader.has_mask) as vrt:
            expect_valid = (vrt.dataset_mask() if reader.has_mask else vrt.read(vrt.count)) > 0
            expect = vrt.read(list(bands))
        assert np.array_equal(valid, expect_valid) and 0 < valid.sum() <= valid.size
        assert np.array_equal(data[:, valid], expect[:, valid])
