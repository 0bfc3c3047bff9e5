"""The job end to end on a real local Ray: real scenes → zarr → inference actors → classes.tif → GeoPackage.

Also the failure paths: a truncated scene whose tiles fail and are rerun after repair, an inference
actor killed mid-run, and a RUN_DIR holding a different plan.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from _kill import Killer
from pyproj import CRS
from shapely import union_all

from geoseg import runtime
from geoseg.cli import EXIT_TILES_FAILED, main
from geoseg.cluster import uses_gpu
from geoseg.config import CPU_BATCH_PX, GPU_BATCH_PX, ExecutionSettings, RunConfig, default_batch_size
from geoseg.errors import PlanMismatchError
from geoseg.model.checkpoint import load_card
from geoseg.mosaic import mosaic
from geoseg.plan import load_plan
from geoseg.planner import make_plan

pytestmark = pytest.mark.usefixtures("ray_session")

S2_DATE = "20230530"


def s2_path(data_dir: Path) -> Path:
    return data_dir / "sentinel2_strzegom" / "scenes" / f"strzegom_{S2_DATE}_33u.tif"


def read_classes(run_dir: Path) -> np.ndarray:
    with rasterio.open(run_dir / "classes.tif") as src:
        return src.read(1)


def check_outputs(run_dir: Path, class_json: Path | None = None) -> dict:
    """Every output of a finished run, checked against each other: the contract of issue 2."""
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("tiles_total", "tiles_done", "tiles_failed", "failed_tiles", "class_area_m2", "stage_s"):
        assert key in report
    plan = load_plan(str(run_dir))
    with rasterio.open(run_dir / "classes.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.dtypes[0] == "uint8" and src.nodata == 0
        assert CRS.from_user_input(src.crs) == CRS.from_user_input(plan.grid.crs)
        classes = src.read(1)
        cmap = src.colormap(1)
        res = src.res[0]
    ids = set(np.unique(classes).tolist()) - {0}
    assert ids, "the model predicted nothing"
    if class_json is not None:
        legend = json.loads(class_json.read_text())["classes"]
        assert ids <= {c["id"] for c in legend}
        for c in legend:
            rgb = tuple(int(c["color"][i:i + 2], 16) for i in (1, 3, 5))
            assert cmap[c["id"]][:3] == rgb

    # predictions zarr is georeferenced and equals the mosaic
    pred = zarr.open_group(str(run_dir / "predictions.zarr"), mode="r")
    assert CRS.from_user_input(pred.attrs["crs"]) == CRS.from_user_input(plan.grid.crs)
    assert pred.attrs["transform"][0] == res
    assert np.array_equal(pred["classes"][:], classes)
    da = xr.open_zarr(run_dir / "predictions.zarr", consolidated=False)["classes"]  # as xarray users open it
    assert CRS.from_user_input(da.rio.crs) == CRS.from_user_input(plan.grid.crs)
    assert tuple(da.rio.transform())[:6] == tuple(plan.grid.transform)[:6]
    assert np.array_equal(da.values, classes)
    tiles = zarr.open_group(str(run_dir / "tiles.zarr"), mode="r")
    assert tiles["image"].shape[0] == plan.tile_count and "crs" in tiles.attrs

    # the GeoPackage: valid polygons, exact class areas, no overlaps, a spatial index
    gdf = gpd.read_file(run_dir / "landcover.gpkg", layer="landcover")
    assert {"class_id", "class_name", "area_m2"} <= set(gdf.columns)
    assert gdf.geometry.is_valid.all()
    assert CRS.from_user_input(gdf.crs) == CRS.from_user_input(plan.grid.crs)
    pixel_area = res * res
    for cid in ids:
        sub = gdf[gdf.class_id == cid]
        assert sub.geometry.area.sum() == pytest.approx((classes == cid).sum() * pixel_area, rel=1e-9)
        assert sub.area_m2.sum() == pytest.approx((classes == cid).sum() * pixel_area, rel=1e-9)
    assert union_all(gdf.geometry.values).area == pytest.approx((classes > 0).sum() * pixel_area, rel=1e-9)
    with sqlite3.connect(run_dir / "landcover.gpkg") as db:
        rtree = "select count(*) from gpkg_extensions where extension_name='gpkg_rtree_index'"
        assert db.execute(rtree).fetchone()[0] >= 1
    names = dict(zip(gdf.class_id, gdf.class_name, strict=True))
    for cid in ids:
        assert report["class_area_m2"][names[cid]] == pytest.approx((classes == cid).sum() * pixel_area, rel=1e-9)
    return report


@pytest.fixture(scope="module")
def s2_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("s2") / "run"
    code = main(["run", "--scenes", str(s2_path(data_dir)), "--out", str(out)])
    assert code == 0
    return out


def test_sentinel2_scene_end_to_end(s2_run: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = check_outputs(s2_run, data_dir / "sentinel2_strzegom" / "classes.json")
    assert report["tiles_done"] == report["tiles_total"] > 0 and report["tiles_failed"] == 0
    # a real trained model: its map agrees with the labelled fields of this (held-out) date
    classes = read_classes(s2_run)
    with rasterio.open(data_dir / "sentinel2_strzegom" / "labels" / f"strzegom_{S2_DATE}_33u.tif") as src:
        labels = src.read(1).astype(np.uint8)
    labelled = labels > 0
    assert (classes[labelled] == labels[labelled]).mean() > 0.7
    assert main(["status", str(s2_run)]) == 0
    assert f"{report['tiles_total']} done, 0 failed, 0 pending" in capsys.readouterr().out


def test_mosaic_of_the_same_predictions_writes_the_same_files(s2_run: Path, tmp_path: Path) -> None:
    """The mosaic is a function of predictions.zarr: from a copy of it, the run's two COGs come out byte for
    byte, with the class counts of the class raster."""
    plan = load_plan(str(s2_run))
    shutil.copytree(s2_run / "predictions.zarr", tmp_path / "predictions.zarr")
    tags = {"GEOSEG_RUN_ID": plan.run_id, "GEOSEG_MODEL": f"{plan.model_name} {plan.model_version}"}
    result = mosaic(str(tmp_path), plan.grid, load_card(plan.model), tags)
    for name in (result.classes, result.confidence):
        assert (tmp_path / name).read_bytes() == (s2_run / name).read_bytes()
    classes = read_classes(s2_run)
    ids, counts = np.unique(classes[classes > 0], return_counts=True)
    assert result.counts == {int(c): int(n) for c, n in zip(ids, counts, strict=True)}


def test_naip_scene_reprojected_with_the_rgb_model(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "naip"
    scene = data_dir / "scenes" / "naip_m_4709963_se_14_1_20200831.tif"
    assert main(["run", "--scenes", str(scene), "--out", str(out)]) == 0
    report = check_outputs(out)
    assert report["model"]["name"] == "aerial-rgb"
    with rasterio.open(out / "classes.tif") as dst:
        assert dst.crs.to_epsg() == 32614  # UTM zone of the centre; the scene itself is NAD83 (EPSG:26914)


def test_drone_orthophoto_alpha_is_no_data(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "drone"
    scene = data_dir / "scenes" / "drone_webodm_orthophoto.tif"
    assert main(["run", "--scenes", str(scene), "--out", str(out)]) == 0
    check_outputs(out)
    with rasterio.open(scene) as src:
        alpha = src.read(4)
    classes = read_classes(out)
    assert classes.shape == alpha.shape  # same CRS and native resolution: the scene's own grid
    assert np.array_equal(classes > 0, alpha > 0)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, data_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dry"
    assert main(["run", "--scenes", str(s2_path(data_dir)), "--out", str(out), "--dry-run",
                 "--bbox", "16.27,50.97,16.31,50.99"]) == 0
    text = capsys.readouterr().out
    assert "EPSG:32633" in text and "tiles" in text and "items per tile" in text
    assert not out.exists()


def test_existing_run_dir_with_another_plan_is_refused(s2_run: Path, data_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = (s2_run / "classes.tif").read_bytes()
    other = RunConfig(scenes=(str(s2_path(data_dir)),), out=str(s2_run), resolution=20.0)
    with pytest.raises(PlanMismatchError, match="--overwrite"):
        runtime.run(other, ExecutionSettings())
    assert main(["run", "--scenes", str(s2_path(data_dir)), "--out", str(s2_run), "--resolution", "20"]) == 2
    assert "PlanMismatchError" in capsys.readouterr().err
    assert (s2_run / "classes.tif").read_bytes() == before  # nothing already done is lost


def test_precision_is_the_plans_and_every_later_run_keeps_it(s2_run: Path, data_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 and fp32 make different maps, so the precision is part of the plan: asking another one of an existing
    run is refused, and a run on other hardware uses the plan's (here bf16 on CPU actors)."""
    scene = str(s2_path(data_dir))
    assert main(["run", "--scenes", scene, "--out", str(s2_run), "--precision", "bf16"]) == 2
    assert "PlanMismatchError" in capsys.readouterr().err
    out = tmp_path / "bf16"
    code = main(["run", "--scenes", scene, "--out", str(out), "--precision", "bf16"])
    assert code == 0, capsys.readouterr()
    assert main(["run", "--scenes", scene, "--out", str(out)]) == 0  # no --precision: the plan's, not fp32
    report = json.loads((out / "report.json").read_text())
    assert load_plan(str(out)).precision == "bf16" and report["execution"] is None  # nothing left to redo
    bf16, fp32 = read_classes(out), read_classes(s2_run)
    assert (bf16 == fp32).mean() > 0.97 and not np.array_equal(bf16, fp32)


def test_settings_the_cluster_cannot_hold_are_named_errors_and_rerun_recovers(
        tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Actors that would take every CPU, or GPUs the cluster lacks, are refused at once (not a hang); the
    saved plan stays, so `geoseg rerun` then maps the scene."""
    out = tmp_path / "run"
    assert main(["run", "--scenes", str(s2_path(data_dir)), "--out", str(out), "--actors", "3"]) == 2
    assert "leave no room for a tile reader" in capsys.readouterr().err
    assert main(["run", "--scenes", str(s2_path(data_dir)), "--out", str(out), "--gpu"]) == 2
    assert "no GPUs" in capsys.readouterr().err
    assert (out / "plan.json").exists() and not (out / "classes.tif").exists()
    assert main(["rerun", str(out)]) == 0
    assert read_classes(out).max() > 0


def test_default_batch_fills_a_gpu_when_the_cluster_has_one(data_dir: Path) -> None:
    """Without --batch-size a plan for GPU actors takes ~9.4 Mpx of input per forward pass, for CPU actors ~0.6
    Mpx; a cluster with a GPU is used by default. A separate local Ray that declares one GPU (Ray's own
    resource accounting; no GPU is used)."""
    root = Path(tempfile.mkdtemp(prefix="gs-gpu-", dir="/tmp"))  # Ray's socket paths must stay short
    code = ("import ray; from geoseg.cluster import uses_gpu; from geoseg.config import ExecutionSettings as E; "
            f"ray.init('local', num_cpus=1, num_gpus=1, include_dashboard=False, _temp_dir={str(root / 'r')!r}); "
            "print(uses_gpu(E()), uses_gpu(E(use_gpu=False)))")
    env = {**os.environ, "HOME": str(root)}  # token auth on: Ray makes the token in root/.ray
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "False"]
    assert not uses_gpu(ExecutionSettings())  # this session's Ray has no GPU
    assert default_batch_size(True, 384) == GPU_BATCH_PX // 384**2 == 64
    assert default_batch_size(False, 384) == CPU_BATCH_PX // 384**2 == 4
    assert default_batch_size(False, 416 + 2 * 64) == 1
    config = RunConfig(scenes=(str(s2_path(data_dir)),), out="unused", tile_size=256)
    # the batch is an execution setting; what changes the map, the precision, is the plan's
    assert make_plan(config, use_gpu=True).precision == "bf16" and make_plan(config).precision == "fp32"
    assert make_plan(replace(config, precision="bf16")).precision == "bf16"


# --- failures and reruns: 64 px tiles so the 401 px scene makes 49 tiles -------------------------------

SMALL_TILES = ["--tile-size", "64", "--batch-size", "4"]  # the card's halo


def plain_copy(src: Path, dst: Path) -> Path:
    """A GDAL-written, uncompressed, striped copy: its header comes first, so a truncated copy still opens."""
    with rasterio.open(src) as s:
        profile = {**s.profile, "tiled": False, "compress": None}
        with rasterio.open(dst, "w", **profile) as d:
            d.descriptions = s.descriptions  # set before the pixels, so GDAL keeps the header in front
            d.write(s.read())
    return dst


@pytest.fixture(scope="module")
def clean_small_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("clean")
    scene = plain_copy(s2_path(data_dir), root / "scene.tif")
    out = root / "run"
    assert main(["run", "--scenes", str(scene), "--out", str(out), *SMALL_TILES]) == 0
    return out


def test_truncated_scene_fails_its_tiles_and_rerun_redoes_only_them(
        tmp_path: Path, data_dir: Path, clean_small_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = plain_copy(s2_path(data_dir), tmp_path / "good.tif")
    scene = tmp_path / "scene.tif"
    data = good.read_bytes()
    scene.write_bytes(data[: int(len(data) * 0.75)])  # the bottom quarter of the rows is gone
    out = tmp_path / "run"

    code = main(["run", "--scenes", str(scene), "--out", str(out), *SMALL_TILES])
    assert code == EXIT_TILES_FAILED
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["tiles_failed"] < report["tiles_total"]
    assert report["tiles_done"] + report["tiles_failed"] == report["tiles_total"]
    assert all("truncated" in t["message"] and t["error_type"] == "SceneReadError" and t["stage"] == "tile"
               for t in report["failed_tiles"])
    assert min(t["row"] for t in report["failed_tiles"]) >= 3  # only tiles reading the lost rows
    assert (out / "classes.tif").exists() and (out / "landcover.gpkg").exists()  # outputs for the rest
    capsys.readouterr()
    assert main(["status", str(out)]) == EXIT_TILES_FAILED
    status_text = capsys.readouterr().out
    assert f"{report['tiles_failed']} failed" in status_text and "truncated" in status_text

    shutil.copyfile(good, scene)  # the scene is repaired (downloaded again)
    failed = report["tiles_failed"]
    # execution flags are the rerun's own: another batch size changes no pixel (batches are padded)
    assert main(["rerun", str(out), "--batch-size", "3", "--actors", "1"]) == 0
    rerun = check_outputs(out, data_dir / "sentinel2_strzegom" / "classes.json")
    assert rerun["tiles_processed"] == failed and rerun["tiles_failed"] == 0
    assert rerun["execution"]["batch_size"] == 3 and rerun["execution"]["actors"] == 1
    assert np.array_equal(read_classes(out), read_classes(clean_small_run))


def test_killed_inference_actor_is_replaced_and_output_is_identical(
        tmp_path: Path, data_dir: Path, clean_small_run: Path) -> None:
    scene = plain_copy(s2_path(data_dir), tmp_path / "scene.tif")
    out = tmp_path / "run"
    with Killer("Predictor.__call__", times=1) as killer:
        code = main(["run", "--scenes", str(scene), "--out", str(out), *SMALL_TILES])
    assert killer.killed, "the actor was not killed while the run was going"
    assert code == 0
    report = check_outputs(out)
    assert report["tiles_done"] == report["tiles_total"]
    assert np.array_equal(read_classes(out), read_classes(clean_small_run))


def test_no_seams_at_tile_borders(s2_run: Path, clean_small_run: Path) -> None:
    """The same scene cut into 64 px and 256 px tiles gives the same map, along tile borders as inside them."""
    small, large = read_classes(clean_small_run), read_classes(s2_run)
    assert small.shape == large.shape
    border = np.zeros(small.shape, bool)
    for k in range(64, small.shape[0], 64):
        border[k - 2:k + 2, :] = True
        border[:, k - 2:k + 2] = True
    agree = small == large
    assert agree.mean() > 0.95  # the rest is the model seeing more or less context, everywhere alike
    assert agree[border].mean() > agree[~border].mean() - 0.01


def test_rerun_at_the_default_geometry_gives_the_clean_run(tmp_path: Path, data_dir: Path) -> None:
    """At the default 1024 px tiles (four on a 1100 px scene mirrored from the real one) a run whose last
    rows are lost fails only their tiles, and its rerun after repair equals a clean run exactly."""
    with rasterio.open(s2_path(data_dir)) as src:
        profile, pixels, names = src.profile, src.read(), src.descriptions
    big = np.pad(pixels, ((0, 0), (0, 699), (0, 699)), mode="symmetric")
    good = tmp_path / "good.tif"
    with rasterio.open(good, "w", **{**profile, "width": 1100, "height": 1100}) as dst:
        dst.descriptions = names
        dst.write(big)
    clean, out, scene = tmp_path / "clean", tmp_path / "run", tmp_path / "scene.tif"
    assert main(["run", "--scenes", str(good), "--out", str(clean)]) == 0
    data = good.read_bytes()
    scene.write_bytes(data[: int(len(data) * 0.995)])  # rows past ~1094 lost: row 0 reads up to 1088
    assert main(["run", "--scenes", str(scene), "--out", str(out)]) == EXIT_TILES_FAILED
    plan = load_plan(str(out))
    report = json.loads((out / "report.json").read_text())
    assert plan.grid.tile_size == 1024 and plan.tile_count == 4
    assert {t["row"] for t in report["failed_tiles"]} == {1} and report["tiles_done"] == 2
    shutil.copyfile(good, scene)
    assert main(["rerun", str(out)]) == 0
    assert np.array_equal(read_classes(out), read_classes(clean))
