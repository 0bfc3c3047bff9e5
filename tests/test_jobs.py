"""`jobs/segment_region.py` submitted through the Jobs API of a real `ray start --head` cluster on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_processes_under(root: Path) -> None:
    """Stop the head's processes by their own pids: those whose command line names its temp dir, and their children."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(root) in part for part in (p.info["cmdline"] or [])):
            procs += [p, *p.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    root = Path(tempfile.mkdtemp(prefix="geoseg-head-", dir="/tmp"))
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(root), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={root / 'r'}",
                    # every port a head opens, chosen free: another Ray on this machine must not collide
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                    f"--ray-client-server-port={free_port()}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_processes_under(root)


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
