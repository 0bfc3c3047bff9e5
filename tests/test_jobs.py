"""`jobs/segment_region.py` submitted through the Jobs API of a real `ray start --head` cluster on 127.0.0.1, token
authentication on (its token in the cluster's temp dir, which is HOME for the head and the submitting client)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import pytest
from _clusters import BIN, free_port, head_command, ray_start, stop_processes_under, token_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    root = Path(tempfile.mkdtemp(prefix="geoseg-head-", dir="/tmp"))
    dashboard = free_port()
    env = token_env(root)
    ray_start(head_command(root, free_port(), dashboard, 2), env)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_processes_under(root)


def submit(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`ray job submit` with ``env``, again while the head's job agent is still coming up (a few seconds after
    `ray start` returns)."""
    for _ in range(30):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stderr:
            break
        time.sleep(2)
    return done


@pytest.mark.slow
def test_submitted_job_writes_the_geopackage(ray_head: tuple[str, dict[str, str]], tmp_path: Path,
                                             data_dir: Path) -> None:
    address, env = ray_head
    out = tmp_path / "job-run"
    scene = data_dir / "scenes" / "drone_webodm_orthophoto.tif"
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
               "python", "jobs/segment_region.py", "--scenes", str(scene), "--out", str(out)]
    done = submit(command, env)  # with the cluster's token: the job's driver joins with it too
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    gdf = gpd.read_file(out / "landcover.gpkg", layer="landcover")
    assert len(gdf) > 0 and gdf.geometry.is_valid.all()
    assert set(gdf.class_name) <= {"building", "land (unpaved)", "road", "vegetation", "water"}


@pytest.mark.slow
def test_job_submission_without_the_token_is_refused(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """A client with no token (none in its HOME, none in its environment) cannot submit: the head answers 401, and
    no job is created. The job listing with the token shows none of the intruder's entrypoint."""
    address, env = ray_head
    (tmp_path / "home").mkdir()
    intruder = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path / "home")}
    marker = f"intruder-{os.getpid()}"
    done = submit([str(BIN / "ray"), "job", "submit", "--address", address, "--", "echo", marker], intruder)
    assert done.returncode != 0
    assert "Unauthorized" in done.stderr and "Missing authentication token" in done.stderr
    jobs = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True,
                          text=True, timeout=120)
    assert jobs.returncode == 0, jobs.stderr[-2000:]
    assert marker not in jobs.stdout
