"""The tile stage's reads: how a worker keeps scenes open, and aligned reads against GDAL's warper."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from _stac import downsample, scene_path, write_cog
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from scipy import ndimage

from geoseg import store
from geoseg.config import RunConfig
from geoseg.errors import SceneReadError
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


@pytest.mark.parametrize("corner", [(64, 64), (-40, -30), (300, 330), (2, 5)])
def test_a_20m_band_on_the_10m_grid_equals_the_warper(corner: tuple[int, int], tmp_path: Path, data_dir: Path) -> None:
    """A band on a coarser lattice nested in the grid's (Sentinel-2's 20 m bands on 10 m) is read by GDAL's
    resampling read, not a warper per tile: the same validity as the warper's bilinear, and the same values but
    at a few pixels diagonal to a corner of nodata, where the two weigh the masked neighbour differently (10
    pixels of 46,784 here, by at most 8 in some 5,000)."""
    with rasterio.open(scene_path(data_dir, "20220719")) as src:
        band, crs, t = downsample(src.read(9)), src.crs, src.transform
    band[40:60, 10:30] = 0  # a hole of nodata
    path = tmp_path / "B11.tif"
    write_cog(path, band, t * Affine.scale(2), crs)
    reader = SceneReader(str(path))
    target = Affine(10, 0, t.c + 10 * corner[0], 0, -10, t.f - 10 * corner[1])
    assert reader._nested(crs.to_wkt(), target, (256, 256)) is not None  # the nested path is the one taken
    data, valid = reader.read((1,), crs.to_wkt(), target, (256, 256), aligned=False)
    with WarpedVRT(reader.src, crs=crs, transform=target, width=256, height=256,
                   resampling=Resampling.bilinear) as vrt:
        expected, expected_valid = vrt.read(1), vrt.dataset_mask() > 0
    assert np.array_equal(valid, expected_valid) and valid.any()
    away = valid & ~ndimage.binary_dilation(~valid, structure=np.ones((5, 5), bool))
    assert np.array_equal(data[0][away], expected[away])
    off = np.abs(data[0].astype(np.int32) - expected)[valid]
    assert (off > 0).sum() <= 16 and off.max() <= 0.01 * expected[valid].max()


def test_a_first_usable_rule_stops_reading_dates_once_the_tile_is_covered(tmp_path: Path, data_dir: Path) -> None:
    """A tile the first date covers clear is never read from the later dates (here one whose file is gone): the
    same tile as from the first date alone. The median needs every date, so it still reads the missing one."""
    original = data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"
    first, later = tmp_path / "first.tif", tmp_path / "later.tif"
    shutil.copyfile(original, first)
    shutil.copyfile(original, later)
    run_dir = str(tmp_path / "run")
    plan = make_plan(RunConfig(scenes=(str(first), str(later)), out=run_dir, tile_size=128, halo=32))
    store.create(run_dir, plan.grid, plan.tiles, plan.items[0].sources[0].scene.band_names, "uint16")
    stores = store.Stores(run_dir)
    tile = next(i for i, (r, c) in enumerate(plan.tiles) if r == 1 and c == 1)  # its input square inside the scene
    job = TileJob(run_dir, plan.run_id, "both", plan.grid, plan.items, "first", None, "uint16", 10)
    assert len(job.items_for(1, 1)) == 2
    later.unlink()

    make_tile(job, stores, tile, 1, 1)
    image, valid = stores.image[tile], stores.valid[tile]
    make_tile(TileJob(run_dir, plan.run_id, "alone", plan.grid, plan.items[:1], "first", None, "uint16", 10),
              stores, tile, 1, 1)
    assert valid.all() and np.array_equal(image, stores.image[tile])
    with pytest.raises(SceneReadError):
        make_tile(replace(job, rule="median", execution_id="median"), stores, tile, 1, 1)
