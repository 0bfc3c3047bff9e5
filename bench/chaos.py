"""Chaos benchmark: a run on a multi-node local Ray over scenes on SeaweedFS while the infrastructure fails.

Issue 12, point 5, after Ray's own chaos tests. A head without CPUs and two 1-CPU worker nodes (``ray start``
processes, token authentication on) run ``geoseg run`` with scenes and RUN_DIR on a real SeaweedFS (``weed mini``
on 127.0.0.1). First a clean run, then the same run while:

- an inference actor at work (in a call) is killed by its pid every ``--kill-every`` seconds,
- a tile-reader worker is killed by its pid every ``--kill-every`` seconds (offset by half),
- once a quarter of the tiles are done, one worker node (its raylet and everything under it) is killed and
  another node is added,
- once half of the tiles are done, SeaweedFS is stopped by its pid and started again on the same data;

then once more with the driver SIGKILLed mid-run, followed by ``geoseg rerun``. Printed for each: tiles lost
(must be 0), attempts charged to tiles (``tile_attempts_failed``, must be 0), infrastructure retries, and whether
``classes.tif`` and the GeoPackage's features equal the clean run's (must be identical); then one JSON line.
The exit status is 1 when any of those promises is broken. Faults are set off by the run's progress where it
matters (journal parts in ``ledger.d/``), kills by a clock: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import psutil  # noqa: E402
from _clusters import LocalCluster, kill_all, local_cluster, processes_under  # noqa: E402
from _kill import Background, kill_matching  # noqa: E402
from _scene import DATA, assemble_scene  # noqa: E402
from _weed import Weed  # noqa: E402
from botocore.exceptions import BotoCoreError  # noqa: E402

from geoseg import storage  # noqa: E402
from geoseg.ledger import JOURNAL_DIR  # noqa: E402

BIN = Path(sys.executable).parent
KEY, SECRET = "geoseg-chaos", "chaos-s3cr3t"
BUCKET = "geoseg"


def journal_parts(run_dir: str) -> int:
    """Journal parts the driver has saved (each holds the tiles done since the last): the run's progress."""
    try:
        return len(storage.list_files(storage.join(run_dir, JOURNAL_DIR)))
    except (OSError, BotoCoreError):  # none yet, or the store is restarting
        return 0


def raylet_of_new_node(cluster: LocalCluster, num_cpus: int) -> psutil.Process:
    """Add a worker node; its raylet, under which its workers, store and agents run."""
    before = {p.pid for p in processes_under(cluster.root)}
    cluster.add_node(num_cpus=num_cpus)
    raylets = [p for p in processes_under(cluster.root) if p.pid not in before and p.name() == "raylet"]
    assert len(raylets) == 1, raylets
    return raylets[0]


def remove_node(raylet: psutil.Process) -> None:
    """Kill a node by its pids: its raylet and every process under it."""
    kill_all([raylet, *raylet.children(recursive=True)], timeout=30)


def geoseg(cluster: LocalCluster, *args: str) -> subprocess.Popen[str]:
    """A `geoseg` command joining ``cluster`` as a client: its own process, the cluster's token and store env."""
    return subprocess.Popen([str(BIN / "geoseg"), *args, "--ray-address", cluster.address], env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Chaos(Background):
    """Kills actors and readers by pid on a clock; removes and adds a node, and restarts the store, by progress."""

    def __init__(self, cluster: LocalCluster, weed: Weed, run_dir: str, raylet: psutil.Process, parts_total: int,
                 kill_every: float) -> None:
        super().__init__()
        self.cluster, self.weed, self.run_dir, self.raylet = cluster, weed, run_dir, raylet
        self.parts_total, self.kill_every = parts_total, kill_every
        self.events: dict[str, int] = {"actors_killed": 0, "readers_killed": 0, "nodes_removed": 0,
                                       "nodes_added": 0, "store_restarts": 0}

    def _kill_one(self, marker: str) -> bool:
        """Kill one of the cluster's processes running ``marker``, chosen at random, by its pid."""
        return kill_matching(marker, processes_under(self.cluster.root), pick=random.choice) is not None

    def _run(self) -> None:
        next_actor = time.monotonic() + self.kill_every
        next_reader = next_actor + self.kill_every / 2
        seen = 0
        while not self.stop.wait(0.2):
            seen = max(seen, journal_parts(self.run_dir))
            now = time.monotonic()
            if now >= next_actor:
                self.events["actors_killed"] += self._kill_one("Predictor.__call__")  # a working actor
                next_actor = now + self.kill_every
            if now >= next_reader:
                self.events["readers_killed"] += self._kill_one("run_tiles")
                next_reader = now + self.kill_every
            if not self.events["nodes_removed"] and seen >= self.parts_total / 4:
                remove_node(self.raylet)
                self.events["nodes_removed"] += 1
                self.cluster.add_node(num_cpus=1)
                self.events["nodes_added"] += 1
            if not self.events["store_restarts"] and seen >= self.parts_total / 2:
                self.weed.restart()
                self.events["store_restarts"] += 1


def finished(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def features(run_dir: str, local: Path) -> list[tuple[Any, ...]]:
    """The GeoPackage's features, in a canonical order (class, area, confidence, geometry as WKB)."""
    import geopandas as gpd

    fs, path = storage.filesystem(storage.join(run_dir, "landcover.gpkg"))
    fs.get_file(path, str(local))
    gdf = gpd.read_file(local, layer="landcover")
    return sorted((r.class_id, r.class_name, r.area_m2, r.mean_confidence, r.geometry.wkb)
                  for r in gdf.itertuples())


def classes(run_dir: str) -> Any:
    import rasterio

    with storage.gdal_env(), rasterio.open(storage.join(run_dir, "classes.tif")) as src:
        return src.read(1)


def outcome(run_dir: str, clean_dir: str, work: Path, seconds: float) -> dict[str, Any]:
    """The figures of one run against the clean run's outputs."""
    import numpy as np

    report = json.loads(storage.read_bytes(storage.join(run_dir, "report.json")))
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    return {"seconds": round(seconds, 1), "tiles_total": report["tiles_total"],
            "tiles_lost": report["tiles_total"] - report["tiles_done"],
            "tile_attempts_failed": report["execution"]["tile_attempts_failed"],
            "infra_retries": report["execution"]["infra_retries"],
            "classes_identical": bool(np.array_equal(classes(run_dir), classes(clean_dir))),
            "features_identical": features(run_dir, work / f"{name}.gpkg") == features(clean_dir, work / "clean.gpkg")}


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Clean run, chaos run, killed-driver run with its rerun; the figures of each."""
    os.environ.update({"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"})
    weed = Weed(work / "weed", KEY, SECRET, BUCKET)
    os.environ.update(weed.env())
    weed.start()
    try:
        scene = assemble_scene(work / "scene.tif", args.size)
        url = f"s3://{BUCKET}/scenes/chaos.tif"
        fs, path = storage.filesystem(url)
        fs.put_file(str(scene), path)
        run_args = ["--scenes", url, "--tile-size", str(args.tile_size), "--batch-size", "4"]
        with local_cluster("gs-chaos-b-") as plain:
            cluster = LocalCluster(plain.root, plain.env | weed.env(), plain.address)
            cluster.add_node(num_cpus=1)
            raylet = raylet_of_new_node(cluster, 1)
            clean_dir = f"s3://{BUCKET}/runs/clean"
            t0 = time.monotonic()
            proc = geoseg(cluster, "run", *run_args, "--out", clean_dir)
            parts_total = 1  # how many journal parts a whole run saves: the yardstick of progress
            while proc.poll() is None:
                parts_total = max(parts_total, journal_parts(clean_dir))
                time.sleep(0.2)
            rc, out = finished(proc, args.timeout)
            assert rc == 0, out[-4000:]
            clean_s = time.monotonic() - t0

            chaos_dir = f"s3://{BUCKET}/runs/chaos"
            t0 = time.monotonic()
            proc = geoseg(cluster, "run", *run_args, "--out", chaos_dir)
            stops: list[str] = []  # why a run stopped (exit status 4: the cluster kept failing past a budget)
            with Chaos(cluster, weed, chaos_dir, raylet, parts_total, args.kill_every) as chaos:
                rc, out = finished(proc, args.timeout)
                while rc == 4 and len(stops) < args.max_reruns:  # the ledger is kept: `geoseg rerun` goes on
                    stops.append(next((line for line in out.splitlines() if "ExecutionError" in line), out[-300:]))
                    rc, out = finished(geoseg(cluster, "rerun", chaos_dir), args.timeout)
            chaos_s = time.monotonic() - t0
            assert rc == 0, out[-4000:]
            result = {"clean_s": round(clean_s, 1), "journal_parts_clean": parts_total,
                      "chaos": outcome(chaos_dir, clean_dir, work, chaos_s) | chaos.events | {
                          "stopped": len(stops), "stopped_by": stops}}

            driver_dir = f"s3://{BUCKET}/runs/driver-killed"
            t0 = time.monotonic()
            proc = geoseg(cluster, "run", *run_args, "--out", driver_dir)
            while journal_parts(driver_dir) < max(1, parts_total // 3):
                assert proc.poll() is None, proc.communicate()[0][-4000:]
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            done_when_killed = journal_parts(driver_dir)
            rc, out = finished(geoseg(cluster, "rerun", driver_dir), args.timeout)
            assert rc == 0, out[-4000:]
            result["driver_killed"] = outcome(driver_dir, clean_dir, work, time.monotonic() - t0) | {
                "journal_parts_when_killed": done_when_killed}
        return result
    finally:
        weed.stop()


def main() -> None:
    """Parse the size, run the benchmark, print its figures and one JSON line; exit 1 if a promise is broken."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="scene size in px, mirrored from the real scenes")
    ap.add_argument("--tile-size", type=int, default=128, help="tile core in px")
    ap.add_argument("--kill-every", type=float, default=5.0, help="seconds between actor kills (and reader kills)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one run may take before it counts as hung")
    ap.add_argument("--quick", action="store_true", help="a small size for a short check: 1024 px, 128 px tiles")
    ap.add_argument("--max-reruns", type=int, default=5,
                    help="`geoseg rerun`s after a chaos run that stops (exit status 4) before it counts as failed")
    ap.add_argument("--seed", type=int, default=12)
    args = ap.parse_args()
    if args.quick:
        args.size, args.tile_size = 1024, 128
    if not (DATA / "README.md").exists():
        raise SystemExit(f"real data not found at {DATA}: set GEOSEG_DATA")
    random.seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="gs-chaos-bench-"))
    try:
        result = bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["size_px"], result["tile_size"], result["kill_every_s"] = args.size, args.tile_size, args.kill_every
    print(f"scene {args.size} px, tiles of {args.tile_size} px; clean run {result['clean_s']} s")
    ok = True
    for name in ("chaos", "driver_killed"):
        r = result[name]
        print(f"{name}: {r['seconds']} s, tiles lost {r['tiles_lost']}/{r['tiles_total']}, attempts charged to tiles "
              f"{r['tile_attempts_failed']}, infra_retries {r['infra_retries']}, classes.tif identical "
              f"{r['classes_identical']}, GeoPackage features identical {r['features_identical']}")
        ok &= (r["tiles_lost"] == 0 and r["tile_attempts_failed"] == 0 and r["classes_identical"]
               and r["features_identical"])
    c = result["chaos"]
    print(f"chaos: {c['actors_killed']} actors and {c['readers_killed']} readers killed, {c['nodes_removed']} node "
          f"removed, {c['nodes_added']} added, {c['store_restarts']} store restart")
    print(f"chaos: the run stopped {c['stopped']} times (exit status 4) and was finished by `geoseg rerun`"
          + "".join(f"\n  stopped by: {why}" for why in c["stopped_by"]))
    ok &= c["stopped"] == 0  # a run that survives the chaos needs no rerun
    result["ok"] = ok
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
