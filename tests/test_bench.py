"""The throughput benchmark's building blocks (not its timings): the assembled scene, the naive loop and the
polygons glued on after it, the steady-state rate, CPU by role from /proc, the halo overhead, the stand-in
network of ``--driver``, the memory sampler and the header-only granules of the million-tile plan."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _procs import CLK_TCK, PeakSampler, actor_cpu_ms_per_output_mpx, cpu_at, parse_stat, read_cpu, reader_cpu_s  # noqa: E402
from _scene import assemble_scene, naive_polygons, naive_segment, strzegom_scenes  # noqa: E402
from _standin import ARCHITECTURE, PixelLinear, install, write_checkpoint  # noqa: E402
from throughput import (  # noqa: E402
    CARD_TILE,
    driver_cpu_ms_per_tile,
    gdal_polygonize,
    halo_overhead,
    header_only_scenes,
    steady_rate,
)

BURN_S = 0.3

# A stand-in Ray worker: argv[0] is its title, as Ray sets it. An inference actor ("ray::Predictor") burns
# BURN_S of CPU on a thread named gs-forward and on a thread that thread starts (which inherits the name,
# like torch's OpenMP workers); a reader ("ray::run_tiles") on one thread. When all have burnt it writes
# DIR/done-PID, and every thread idles until DIR/stop exists.
WORKER = f"""
import ctypes, os, sys, threading, time
folder, role = sys.argv[1], sys.argv[2]
burnt = threading.Semaphore(0)
def idle():
    while not os.path.exists(os.path.join(folder, "stop")):
        time.sleep(0.02)
def burn():
    while time.thread_time() < {BURN_S}:
        pass
    burnt.release()
    idle()
def forward():
    ctypes.CDLL(None).prctl(15, b"gs-forward", 0, 0, 0)  # PR_SET_NAME, as the inference actor names its thread
    threading.Thread(target=burn).start()
    burn()
threading.Thread(target=forward if role == "actor" else burn).start()
for _ in range(2 if role == "actor" else 1):
    burnt.acquire()
open(os.path.join(folder, f"done-{{os.getpid()}}"), "w").close()
idle()
"""


def _worker(title: str, folder: Path, role: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([title, "-c", WORKER, str(folder), role], executable=sys.executable)


def _wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def test_assembled_scene_is_real_pixels_on_the_first_scene_grid(tmp_path: Path, data_dir: Path) -> None:
    first = strzegom_scenes(data_dir)[0]
    path = assemble_scene(tmp_path / "big.tif", 1000, data_dir)
    with rasterio.open(first) as src, rasterio.open(path) as big:
        assert (big.width, big.height, big.count, big.dtypes[0]) == (1000, 1000, 10, "uint16")
        assert big.crs == src.crs and big.transform == src.transform
        assert big.descriptions == src.descriptions
        t = src.width
        assert np.array_equal(big.read(window=((0, t), (0, t))), src.read())
        # the next copy along a row is mirrored left-right, so the seam joins like pixels
        right = big.read(1, window=((0, t), (t, 2 * t)))
        assert right.shape == (t, t) and (right > 0).mean() > 0.99


@pytest.mark.usefixtures("ray_session")
def test_naive_loop_equals_geoseg_classes(tmp_path: Path, data_dir: Path) -> None:
    from geoseg import runtime
    from geoseg.config import ExecutionSettings, RunConfig
    from geoseg.plan import load_plan

    scene = strzegom_scenes(data_dir)[-1]
    report = runtime.run(RunConfig(scenes=(str(scene),), out=str(tmp_path / "run")), ExecutionSettings(progress=False))
    plan = load_plan(str(tmp_path / "run"))
    assert report.execution is not None
    # at the run's own geometry, as the benchmark's "naive @ geoseg geometry" row runs it
    stats = naive_segment(scene, tmp_path / "naive.tif", batch_size=report.execution.batch_size,
                          tile_size=plan.grid.tile_size,
                          halo=plan.grid.halo)
    with rasterio.open(tmp_path / "run" / "classes.tif") as a, rasterio.open(tmp_path / "naive.tif") as b:
        ours, naive = a.read(1), b.read(1)
        assert a.transform == b.transform and a.crs == b.crs
    assert stats["tiles"] == plan.tile_count
    assert (stats["tile_size"], stats["halo"]) == (plan.grid.tile_size, plan.grid.halo)
    assert (naive > 0).all()
    with rasterio.open(scene) as src:  # the scene's grid is the run's (an aligned read)
        empty = (src.read() == 0).all(axis=0)  # zero in every band: nodata for geoseg, classed by the loop
    assert ours.shape == empty.shape and 0 < empty.sum() < 10 and (ours[empty] == 0).all()
    # the same computation: the maps differ only through those few pixels, which geoseg feeds the network as
    # nodata and the loop as reflectance; their effect reaches across the receptive field, on very few pixels
    assert (ours[~empty] != naive[~empty]).mean() < 1e-3


def test_naive_polygons_cover_every_classed_pixel_once(tmp_path: Path) -> None:
    classes = np.array([[1, 1, 2, 0],
                        [1, 2, 2, 0],
                        [3, 3, 1, 1],
                        [3, 0, 1, 1]], np.uint8)
    raster = tmp_path / "classes.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=rasterio.Affine(10, 0, 500000, 0, -10, 5650000)) as dst:
        dst.write(classes, 1)
    assert naive_polygons(raster, tmp_path / "naive.gpkg") == {"features": 4}

    import geopandas as gpd

    frame = gpd.read_file(tmp_path / "naive.gpkg", layer="landcover")
    areas = frame.assign(area=frame.area).groupby("class_id")["area"].sum().to_dict()
    assert areas == {1: 700.0, 2: 300.0, 3: 300.0}  # 100 m2 pixels; class 0 is no data
    gdal = gdal_polygonize(raster, tmp_path / "gdal.gpkg")
    if shutil.which("gdal_polygonize.py") is None:
        assert isinstance(gdal, str) and "not installed" in gdal and "gdal-bin" in gdal
    else:
        assert isinstance(gdal, dict) and gdal["features"] == 4


def test_steady_rate_skips_the_first_completion() -> None:
    ends = [5.0, 5.0, 6.0, 6.0, 7.0, 7.0]  # the ceiling's batches of 2: a batch's tiles end together
    assert steady_rate(ends) == pytest.approx(4 / 2)
    # an actor call of 3 tiles, recorded done microseconds apart, then one tile a second
    assert steady_rate([5.0, 5.000004, 5.000009, 6.0, 7.0]) == pytest.approx(2 / (7.0 - 5.000009))
    with pytest.raises(ValueError):
        steady_rate(ends[:2])


def test_driver_cpu_per_tile_is_counted_after_the_first_completion() -> None:
    stamps = [(1.0, 0.5), (1.00001, 0.50001), (2.0, 0.502), (2.0, 0.503), (3.0, 0.505), (3.0, 0.506)]
    assert driver_cpu_ms_per_tile(stamps) == pytest.approx(1000 * (0.506 - 0.50001) / 4)
    with pytest.raises(ValueError):
        driver_cpu_ms_per_tile(stamps[:2])


def test_halo_overhead_counts_every_computed_square_against_the_output() -> None:
    assert halo_overhead(tiles=16, input_size=256 + 2 * 64, output_px=16 * 256**2) == pytest.approx(2.25)
    assert halo_overhead(tiles=1, input_size=1024 + 2 * 64, output_px=1024**2) == pytest.approx(1.265625)
    # a 300 px scene in four 256 px tiles: the edge tiles' cores are cut, their squares are not
    assert halo_overhead(tiles=4, input_size=384, output_px=300 * 300) == pytest.approx(4 * 384**2 / 300**2)


def test_parse_stat_reads_comm_and_cpu_past_awkward_names() -> None:
    fields = ["S"] + ["0"] * 10 + [str(3 * CLK_TCK), str(CLK_TCK)] + ["0"] * 30  # fields 3.. ; 14 utime, 15 stime
    assert parse_stat(f"4242 (gs-forward) {' '.join(fields)}") == ("gs-forward", 4.0)
    assert parse_stat(f"4242 (a) b (c)) {' '.join(fields)}") == ("a) b (c)", 4.0)


def test_cpu_snapshot_keeps_ended_threads_and_the_steady_window_divides_by_output() -> None:
    rounds = [
        (1.0, {(7,): ("actor", 1.0), (7, 70): ("forward", 0.5), (8,): ("reader", 0.2)}),
        (2.0, {(7,): ("actor", 3.0), (7, 70): ("forward", 2.0), (8,): ("reader", 0.6)}),
        # the forward thread ended and a new one runs; the reader process was replaced by another
        (3.0, {(7,): ("actor", 5.0), (7, 71): ("forward", 1.0), (9,): ("reader", 0.3)}),
        (4.0, {(7,): ("actor", 6.0), (7, 71): ("forward", 1.5), (9,): ("reader", 0.8)}),
    ]
    assert cpu_at(rounds, 0.5) == {"reader": 0.0, "actor": 0.0, "forward": 0.0}
    assert cpu_at(rounds, 1.5) == {"reader": 0.2, "actor": 1.0, "forward": 0.5}
    end = cpu_at(rounds, 3.0)
    assert end == pytest.approx({"reader": 0.9, "actor": 5.0, "forward": 3.0})
    # between t=1 and t=3, over 2 output Mpx: forward 2.5 s, the actor's host work 4.0 - 2.5 s
    assert actor_cpu_ms_per_output_mpx(cpu_at(rounds, 1.0), end, 2.0) == pytest.approx(
        {"actor_host": 750.0, "forward": 1250.0})
    # readers from each one's first reading: what process 9 spent before it was first read is left out
    assert reader_cpu_s(rounds, 3.0) == pytest.approx(0.4)
    assert reader_cpu_s(rounds, 4.0) == pytest.approx(0.4 + 0.5)


def test_forward_threads_and_readers_are_told_apart_in_real_processes(tmp_path: Path) -> None:
    """A stand-in actor and reader burn known CPU: the sampler's snapshots split it by role."""
    root = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                             "ps = [subprocess.Popen([t, '-c', sys.argv[1], sys.argv[2], r], "
                             "executable=sys.executable) "
                             "for t, r in (('ray::Predictor', 'actor'), ('ray::run_tiles', 'reader'))]; "
                             "[p.wait() for p in ps]", WORKER, str(tmp_path)])
    try:
        with PeakSampler(root.pid, interval_s=0.05) as sampler:
            _wait_for(lambda: len(list(tmp_path.glob("done-*"))) == 2, "the stand-in workers to burn their CPU")
            burnt = time.monotonic()
            _wait_for(lambda: sampler.rounds and sampler.rounds[-1][0] > burnt + 0.05, "a sample after the burn")
            (tmp_path / "stop").touch()
            root.wait(timeout=60)
    finally:
        (tmp_path / "stop").touch()
        root.wait(timeout=60)
    start, end = cpu_at(sampler.rounds, -math.inf), cpu_at(sampler.rounds, math.inf)
    tick = 1 / CLK_TCK
    assert end["forward"] >= 2 * (BURN_S - tick)  # the named thread and the thread it started
    assert end["reader"] >= BURN_S - tick
    assert 0 < reader_cpu_s(sampler.rounds, math.inf) <= end["reader"]  # less what it spent before its first reading
    per = actor_cpu_ms_per_output_mpx(start, end, 1.0)
    assert per["forward"] >= 2000 * (BURN_S - tick)
    assert 0 <= per["actor_host"] < per["forward"]  # the actor's main thread only waited
    assert set(sampler.role_of.values()) == {"Predictor", "run_tile"}


def test_read_cpu_of_one_actor_process_lists_its_forward_threads(tmp_path: Path) -> None:
    proc = _worker("ray::Predictor", tmp_path, "actor")
    try:
        _wait_for(lambda: (tmp_path / f"done-{proc.pid}").exists(), "the stand-in actor to burn its CPU")
        reading = read_cpu(proc.pid, "Predictor")
    finally:
        (tmp_path / "stop").touch()
        proc.wait(timeout=60)
    forward = [seconds for kind, seconds in reading.values() if kind == "forward"]
    assert reading[(proc.pid,)][0] == "actor"
    assert len(forward) == 2 and min(forward) >= BURN_S - 1 / CLK_TCK  # the named thread and the one it started
    assert reading[(proc.pid,)][1] >= sum(forward)


def test_standin_network_is_built_only_for_its_card_and_predicts_one_class(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import torch

    from geoseg.errors import CheckpointError
    from geoseg.infer import predict, prepare
    from geoseg.model import checkpoint

    monkeypatch.setattr(checkpoint, "build_model", checkpoint.build_model)  # undone after the test
    path, halo = write_checkpoint(tmp_path / "standin.pt")
    shipped = checkpoint.load_card("sentinel2-lulc")
    with pytest.raises(CheckpointError):
        checkpoint.load_model(path)  # without the hook geoseg builds its U-Net, which the weights do not fit
    install()
    card, net = checkpoint.load_model(path)
    assert isinstance(net, PixelLinear) and card.architecture == ARCHITECTURE and halo == shipped.halo
    assert dataclasses.replace(card, name=shipped.name, architecture=shipped.architecture) == shipped
    assert not isinstance(checkpoint.load_model("sentinel2-lulc")[1], PixelLinear)
    with rasterio.open(strzegom_scenes(data_dir)[0]) as src:
        image = src.read(window=((0, 128), (0, 128)))
    x = torch.from_numpy(prepare(card, image[None], np.ones((1, 128, 128), bool), 1))
    classes, _ = predict(net, x, torch.as_tensor(card.class_ids))
    assert classes.unique().numel() == 1  # one polygon's worth: the vectoriser stays cheap at 1000+ tiles


def test_peak_sampler_sees_a_child_process_grow(tmp_path: Path) -> None:
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with PeakSampler(proc.pid, interval_s=0.05) as sampler:
        proc.wait()
    assert sampler.peaks_mib()["driver"] > 200


def test_header_only_granules_plan_without_pixels(tmp_path: Path) -> None:
    from geoseg.config import RunConfig
    from geoseg.planner import make_plan

    n = header_only_scenes(tmp_path / "g", (14.0, 16.8), (50.0, 50.9), (1.4, 0.9))
    files = sorted((tmp_path / "g").glob("*.tif"))
    assert n == len(files) == 2
    assert sum(f.stat().st_size for f in files) < 2**20  # headers only: a real granule is ~2.4 GB
    plan = make_plan(RunConfig(scenes=tuple(str(f) for f in files), out=str(tmp_path / "run"), crs="EPSG:3035",
                               tile_size=CARD_TILE))
    # two overlapping 109.8 km granules: more than one granule's 43 x 43 tiles of 2.56 km, at most two's
    assert 43 * 43 < plan.tile_count <= 2 * 45 * 45
