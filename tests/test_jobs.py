"""`jobs/segment_region.py` submitted through the Jobs API of a real `ray start --head` cluster on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import pytest
from _clusters import BIN, free_port, head_command, ray_start, stop_processes_under

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    root = Path(tempfile.mkdtemp(prefix="geoseg-head-", dir="/tmp"))
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(root), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_start(head_command(root, free_port(), dashboard, 2), env)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_processes_under(root)


@pytest.mark.slow
def test_submitted_job_writes_the_geopackage(ray_head: tuple[str, dict[str, str]], tmp_path: Path,
                                             data_dir: Path) -> None:
    address, env = ray_head
    out = tmp_path / "job-run"
    scene = data_dir / "scenes" / "drone_webodm_orthophoto.tif"
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
              "python", "jobs/segment_region.py", "--scenes", str(scene), "--out", str(out)]
    for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    gdf = gpd.read_file(out / "landcover.gpkg", layer="landcover")
    assert len(gdf) > 0 and gdf.geometry.is_valid.all()
    assert set(gdf.class_name) <= {"building", "land (unpaved)", "road", "vegetation", "water"}
