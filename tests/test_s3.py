"""A whole run against a real S3-compatible server (SeaweedFS) on 127.0.0.1: scenes, RUN_DIR and stores as
s3:// URLs, on a real Ray head (token authentication on) whose node has the store's credentials in its own
environment, as a node of cluster.yaml has them: none reach Ray's state, its logs or the run's files."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from _clusters import (
    BIN,
    HOST,
    NODE_OBJECT_STORE,
    LocalCluster,
    free_port,
    head_command,
    ray_start,
    stop_processes_under,
    token_env,
)
from _stac import make_catalogue, upload
from _weed import Weed

from geoseg import storage

pytestmark = pytest.mark.slow

KEY, SECRET = "geoseg-test", "s3cr3t-never-logged"

STATE = """
from ray.util.state import list_actors, list_jobs, list_tasks, list_workers
def plain(o):
    return getattr(o, "__dict__", None) or str(o)
print(json.dumps({"tasks": list_tasks(detail=True, limit=10000), "actors": list_actors(detail=True, limit=10000),
                  "jobs": list_jobs(detail=True), "workers": list_workers(detail=True, limit=10000)}, default=plain))
"""
"""The cluster's record of the run: every task, actor, job and worker with its runtime environment."""

GRIDDED = """
from geoseg.model.checkpoint import load_card
from geoseg.mosaic import mosaic
from geoseg.plan import load_plan
plan = load_plan(RUN_DIR)
print(json.dumps(mosaic(RUN_DIR, plan.grid, load_card(plan.model), {}, grid_above=0, cell=512).classes))
"""
"""The mosaic forced into a grid of COGs, its tasks on the cluster."""


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    with Weed(tmp_path_factory.mktemp("weed"), KEY, SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(weed: Weed) -> Iterator[LocalCluster]:
    """A `ray start --head` of 2 CPUs, token authentication on (the token in its temp dir, which is HOME), started
    with the store's credentials in its environment: its workers read them from there, never from runtime_env."""
    root = Path(tempfile.mkdtemp(prefix="gs-s3-", dir="/tmp"))  # Ray's socket paths must stay short
    env = token_env(root) | weed.env()
    port = free_port()
    try:
        ray_start(head_command(root, port, free_port(), 2, f"--object-store-memory={NODE_OBJECT_STORE}"), env)
        yield LocalCluster(root, env, f"{HOST}:{port}")
    finally:
        stop_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


def test_run_on_object_store(weed: Weed, cluster: LocalCluster, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
    for name, value in weed.env().items():  # this process reads and checks the store as a client
        monkeypatch.setenv(name, value)
    local_scene = data_dir / "scenes" / "drone_webodm_orthophoto.tif"
    fs, path = storage.filesystem("s3://geoseg/scenes/drone.tif")
    fs.put_file(str(local_scene), path)
    run_dir = "s3://geoseg/runs/drone"

    printed = subprocess.run([str(BIN / "geoseg"), "run", "--ray-address", cluster.address, "--scenes",
                              "s3://geoseg/scenes/drone.tif", "--out", run_dir], env=cluster.env,
                             capture_output=True, text=True, timeout=600)
    assert printed.returncode == 0, printed.stdout[-3000:] + printed.stderr[-3000:]
    for name in ("plan.json", "ledger.json", "report.json", "classes.tif", "confidence.tif", "landcover.gpkg",
                 "tiles.zarr/zarr.json", "predictions.zarr/classes/zarr.json"):
        assert storage.exists(f"{run_dir}/{name}"), name
    for name in ("plan.json", "ledger.json", "report.json"):
        text = storage.read_bytes(f"{run_dir}/{name}").decode()
        assert SECRET not in text and KEY not in text
    assert SECRET not in printed.stdout + printed.stderr

    report = json.loads(storage.read_bytes(f"{run_dir}/report.json"))
    assert report["tiles_done"] == report["tiles_total"] > 0
    fs.get_file("geoseg/runs/drone/landcover.gpkg", str(tmp_path / "landcover.gpkg"))
    gdf = gpd.read_file(tmp_path / "landcover.gpkg", layer="landcover")
    with storage.gdal_env(), rasterio.open(f"{run_dir}/classes.tif") as src:
        classes = src.read(1)
        pixel = src.res[0] * src.res[1]
    assert gdf.area.sum() == pytest.approx((classes > 0).sum() * pixel, rel=1e-9)
    with rasterio.open(local_scene) as src:
        assert np.array_equal(classes > 0, src.read(4) > 0)

    # forced into a grid of COGs: the cells are uploaded and the VRT finds them relative to itself
    gridded = cluster.query(f"RUN_DIR = {run_dir!r}\n{GRIDDED}", timeout=600)
    assert storage.exists(f"{run_dir}/classes/0_0.tif") and storage.exists(f"{run_dir}/confidence/0_0.tif")
    with storage.gdal_env(), rasterio.open(f"{run_dir}/{gridded}") as src:
        assert src.driver == "VRT" and np.array_equal(src.read(1), classes)

    # what Ray recorded and logged of the run: its tasks and actors with their runtime environment (which does
    # carry the store's settings), the jobs, the workers; the secret is in none of it
    state = json.dumps(cluster.query(STATE))
    assert "run_tiles" in state and "Predictor" in state, "the run's tasks and actors are not in Ray's state"
    assert "GDAL_CACHEMAX" in state and weed.endpoint in state, "Ray's state shows no runtime environment to check"
    assert SECRET not in state
    logs = [f for f in (cluster.root / "r" / "session_latest" / "logs").rglob("*") if f.is_file()]
    assert any(b"run_tiles" in f.read_bytes() for f in logs), "the session's logs do not cover the run"
    assert [f.name for f in logs if SECRET.encode() in f.read_bytes()] == []


def test_a_catalogue_on_the_object_store(weed: Weed, cluster: LocalCluster, data_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The test catalogue with s3:// hrefs on SeaweedFS (issue 13): walked through geoseg's storage, its per-band
    assets and SCL read by the workers with their node's credentials, and the map equal to the same catalogue's
    on local paths."""
    for name, value in weed.env().items():
        monkeypatch.setenv(name, value)
    prefix = f"s3://{weed.bucket}/stac"
    url = make_catalogue(tmp_path / "stac", data_dir, prefix, dates=("20220719",))
    upload(tmp_path / "stac", prefix)
    local = make_catalogue(tmp_path / "local", data_dir, str(tmp_path / "local"), dates=("20220719",))
    outputs = {}
    for name, catalogue, out in (("s3", url, "s3://geoseg/runs/stac"), ("local", local, str(tmp_path / "run"))):
        printed = subprocess.run([str(BIN / "geoseg"), "run", "--ray-address", cluster.address, "--stac", catalogue,
                                  "--bbox", "16.2,50.97,16.3,51.02", "--tile-size", "128", "--out", out],
                                 env=cluster.env, capture_output=True, text=True, timeout=600)
        assert printed.returncode == 0, printed.stdout[-3000:] + printed.stderr[-3000:]
        with storage.gdal_env(), rasterio.open(f"{out}/classes.tif") as src:
            outputs[name] = src.read(1)
    report = json.loads(storage.read_bytes("s3://geoseg/runs/stac/report.json"))
    assert report["items"][0]["files"][0].startswith(prefix) and report["items"][0]["mask"] == "scl"
    assert np.array_equal(outputs["s3"], outputs["local"]) and (outputs["s3"] > 0).mean() > 0.9
