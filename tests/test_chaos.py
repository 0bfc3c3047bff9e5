"""Single faults of the infrastructure, each on its own, against real components: a worker node removed mid-run,
the store (a real SeaweedFS) restarted mid-run with RUN_DIR on s3://, the driver SIGKILLed mid-run then `geoseg
rerun`. Each run must end with every tile done, no attempt charged to a tile, and the map of a clean run.

Faults are set off by the run's own progress (journal parts in ``ledger.d/``), never by a clock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from _clusters import NODES, LocalCluster, local_cluster, s2_scene
from _kill import cmdline
from _weed import Weed

from geoseg import storage
from geoseg.cli import main
from geoseg.lease import LEASE_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from chaos import geoseg, journal_parts, raylet_of_new_node, remove_node  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_session")  # the clean reference runs on the session's Ray

RUN_ARGS = ["--tile-size", "64", "--batch-size", "4"]  # 49 tiles of the 401 px scene
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("clean") / "run"
    assert main(["run", "--scenes", str(s2_scene(data_dir)), "--out", str(out), *RUN_ARGS]) == 0
    return out


def read_classes(url: str) -> np.ndarray:
    with storage.gdal_env(), rasterio.open(url) as src:
        return src.read(1)


def when_progress(proc: subprocess.Popen[str], run_dir: str, parts: int = 1) -> None:
    """Wait until the run has saved ``parts`` journal parts (some tiles done, others still to do)."""
    while journal_parts(run_dir) < parts:
        assert proc.poll() is None, f"the run ended before any fault: {proc.communicate()}"
        time.sleep(0.1)


def finished(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, out[-4000:]
    return out


def check_report(run_dir: str, clean: Path) -> dict[str, Any]:
    """Every tile done, none charged an attempt, and the clean run's map."""
    report: dict[str, Any] = json.loads(storage.read_bytes(storage.join(run_dir, "report.json")))
    assert report["tiles_done"] == report["tiles_total"] == 49 and report["tiles_failed"] == 0
    assert report["execution"]["tile_attempts_failed"] == 0
    assert np.array_equal(read_classes(storage.join(run_dir, "classes.tif")), read_classes(str(clean / "classes.tif")))
    return report


def wait_for_dead_node(cluster: LocalCluster) -> list[str]:
    """The worker nodes' states once the cluster has declared one dead (its health checks take a while)."""
    end = time.monotonic() + 120
    while True:
        states = sorted(n["state"] for n in cluster.query(NODES) if not n["head"])
        if "DEAD" in states or time.monotonic() > end:
            return states
        time.sleep(1)


def test_a_worker_node_removed_mid_run_costs_no_tile(clean: Path, data_dir: Path, tmp_path: Path) -> None:
    """Two 1-CPU worker nodes; once tiles are done, the node running the inference actor (its raylet and everything
    under it) is killed by its pids: the run finishes on the other node."""
    with local_cluster("gs-chaos-node-") as cluster:
        raylets = [raylet_of_new_node(cluster, 1), raylet_of_new_node(cluster, 1)]
        out = str(tmp_path / "run")
        proc = geoseg(cluster, "run", "--scenes", str(s2_scene(data_dir)), "--out", out, *RUN_ARGS)
        try:
            when_progress(proc, out)
            busy = [r for r in raylets if any("Predictor" in cmdline(p) for p in r.children(recursive=True))]
            assert busy, "no node runs an inference actor"
            remove_node(busy[0])
            finished(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        states = wait_for_dead_node(cluster)
    assert states == ["ALIVE", "DEAD"]  # the node died while the run went on
    # every tile done, none charged, the clean run's map (the removed node's calls in flight, if any, retried)
    check_report(out, clean)


# --- on a real SeaweedFS ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    with Weed(tmp_path_factory.mktemp("weed")) as server, pytest.MonkeyPatch.context() as mp:
        for name, value in server.env().items():  # this process checks the store as a client
            mp.setenv(name, value)
        yield server


@pytest.fixture(scope="module")
def cluster(weed: Weed) -> Iterator[LocalCluster]:
    """A head without CPUs and one 2-CPU worker node, the store's credentials in their environment."""
    with local_cluster("gs-chaos-") as plain:
        env = plain.env | weed.env()
        c = LocalCluster(plain.root, env, plain.address)
        c.add_node(num_cpus=2)
        yield c


def s3_scene(data_dir: Path) -> str:
    url = "s3://geoseg/scenes/strzegom.tif"
    if not storage.exists(url):
        fs, path = storage.filesystem(url)
        fs.put_file(str(s2_scene(data_dir)), path)
    return url


def test_the_store_restarted_mid_run_costs_no_tile(clean: Path, data_dir: Path, weed: Weed,
                                                   cluster: LocalCluster) -> None:
    out = "s3://geoseg/runs/store-restart"
    proc = geoseg(cluster, "run", "--scenes", s3_scene(data_dir), "--out", out, *RUN_ARGS)
    try:
        when_progress(proc, out)
        weed.restart()
        finished(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_report(out, clean)


def test_a_killed_driver_is_followed_by_a_rerun_equal_to_a_clean_run(clean: Path, data_dir: Path,
                                                                      cluster: LocalCluster) -> None:
    out = "s3://geoseg/runs/driver-killed"
    proc = geoseg(cluster, "run", "--scenes", s3_scene(data_dir), "--out", out, *RUN_ARGS)
    try:
        when_progress(proc, out)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    held = json.loads(storage.read_bytes(storage.join(out, LEASE_FILE)))
    assert held["pid"] == proc.pid  # the dead driver's lease is left behind
    assert not storage.exists(storage.join(out, "report.json"))
    rerun = finished(geoseg(cluster, "rerun", out))
    check_report(out, clean)
    assert not storage.exists(storage.join(out, LEASE_FILE)), rerun[-2000:]

