"""Throughput benchmark: how fast `geoseg run` maps against what users run without it and against the
model's own speed on the node, and what it costs in CPU by role and in memory.

    .venv/bin/python bench/throughput.py [--quick] [--size PX] [--batch-size N] [--workdir DIR] [--driver]
    .venv/bin/python bench/throughput.py --sweep          # driver/worker peaks at 1x, 4x, 16x the area
    .venv/bin/python bench/throughput.py --million-tiles  # plan ~1,000,000 tiles from footprints only
    .venv/bin/python bench/throughput.py --ray-address ADDR --gpu --workdir SHARED_DIR_OR_S3_URL

Default: a scene of at least 25 Mpx mirrored from the real Sentinel-2 stacks (``_scene.assemble_scene``),
then, each in its own process so that every peak and every start-up is its own:

* geoseg: ``geoseg.runtime.run`` in-process on a local Ray with geoseg's own defaults (tile size, halo,
  batch, actors). Every tile's completion is stamped where the driver records it (``Ledger.mark_done``);
  steady state is the rate after the first completion (an actor call returns several batches at once:
  tiles recorded within ``COMPLETION_S`` of the first count as one completion). Time to the class raster
  (mosaic written) and to the GeoPackage (run returned) count from launching the process. The geometry is
  read from the run's plan.json, the actors' settings from its report ("execution").
* ceiling: right after, on the same Ray, the model alone with all of a node's CPUs (``num_cpus`` = the
  node's; torch's thread count as Ray starts it, one per CPU, printed) or its GPU with ``--gpu``, on
  tensors prepared from the run's own tiles (same tile, halo and batch) and held in memory, for as many
  tiles. Efficiency = geoseg end to end / ceiling, both steady state. The halo overhead (px computed per
  px output) is printed apart: the ceiling pays it too, and only a larger tile lowers it.
* naive: the single-process rasterio sliding-window loop users write today (``_scene.naive_segment``),
  as they run it: torch's default thread count (all cores), the model card's tile size and halo. Whole
  process from launch: to its class raster, then to a GeoPackage by what users glue on after it,
  ``_scene.naive_polygons`` (rasterio.features.shapes + geopandas) or ``gdal_polygonize.py``; both are
  timed (gdal when installed) and the faster counts.
* extra rows, for information: the naive loop at geoseg's own geometry (the run's tile, halo and batch);
  the model alone with the inference actor's own CPUs and thread count; the naive loop pinned to that
  thread count.
* ``--driver``: the driver's CPU per tile, measured with a stand-in network in place of the U-Net (a 1x1
  convolution with zero weights, installed in this run's Ray workers by ``_standin.install``; benchmark
  only, never on geoseg's path), so that the real tile readers and the driver set the pace, on >= 1000
  tiles of 256 px. The workers import it from this folder (local Ray, or a cluster that sees this path).
  It is the driver process's CPU time
  (``time.process_time``: all its threads, Ray's core-worker threads included, less the benchmark's own
  memory-sampling thread) from the first completion to the last tile recorded done, per tile; driver
  tiles/s = 1 / that, the tiles one driver core could hand out. Part of it is paid per second, not per
  tile (Ray's background threads): the driver's CPU per second while idle, just before the run, is
  printed beside it, so that the share per tile at the measured rate can be told apart.

CPU by role (local Ray only): a thread of this process reads /proc every 0.1 s (``_procs.PeakSampler``):
tile readers (``ray::run_tile`` / ``ray::run_tiles`` processes), the inference actor's forward pass (its
threads named ``gs-forward``) and its host work (the rest of the ``ray::Predictor`` process). The actor's
figures are the difference of the snapshots at the first completion and at the last tile recorded done
(process start-up and model loading left out), per output Mpx done between them. Readers run ahead of the
actors by the driver's queue of read tiles, so theirs is each reader process's CPU from its first reading
to the last tile recorded done (its start-up left out), per output Mpx of the run. Peak memory is each process's
VmHWM. Mpx are counted over tile cores (the pixels a run outputs). A table is printed, then one JSON
object as the last line. Ray workers run at nice 0 here (Ray's default is 15), like the naive loop, so a
shared, busy machine treats all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import PeakSampler, actor_cpu_ms_per_output_mpx, cpu_at, reader_cpu_s, status_mib  # noqa: E402
from _scene import assemble_scene, naive_polygons, naive_segment, strzegom_scenes  # noqa: E402

MIB = 2**20
MODEL_BATCHES_HELD = 8
COMPLETION_S = 0.01  # tiles recorded done within this of the first count as one completion (one actor call)
NAIVE_BATCH = {"cpu": 4, "cuda": 64}  # what a user of the naive loop picks for the card's 384 px input
CARD_TILE = 256  # sentinel2-lulc's card tile: --driver and --million-tiles count tiles of this size
DRIVER_SCENE_PX = 32 * CARD_TILE  # 1024 tiles
DRIVER_IDLE_PROBE_S = 3.0
DRIVER_TARGET_MS = 0.3  # driver CPU per tile the runtime must reach: 3,000+ tiles/s from one driver core


def in_child(role: str, params: dict[str, Any], workdir: Path) -> tuple[dict[str, Any], PeakSampler, float]:
    """Run one measurement in a fresh process of this script; its result, its sampler, its wall time."""
    result = workdir / f"{role}-{os.getpid()}-{time.monotonic_ns()}.json"
    params = {**params, "t_launch": time.time()}
    cmd = [sys.executable, __file__, "--child", role, "--params", json.dumps(params), "--result", str(result)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    with PeakSampler(proc.pid) as sampler:
        code = proc.wait()
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"the {role} measurement failed with exit status {code}")
    out = json.loads(result.read_text())
    result.unlink()
    return out, sampler, wall


class _ModelOnly:
    """Ray actor: the model alone on prepared tensors already in memory (on the GPU when it runs on one)."""

    def __init__(self, model: str, run_dir: str, batch_size: int, device: str, threads: int | None) -> None:
        import torch

        from geoseg.infer import prepare
        from geoseg.model.checkpoint import load_model
        from geoseg.store import Stores

        self.threads = threads
        self.device = torch.device(device)
        card, model_ = load_model(model, device=device)
        self.model = model_.to(memory_format=torch.channels_last)
        self.class_ids = torch.as_tensor(card.class_ids, device=self.device)
        stores = Stores(run_dir)
        n = stores.image.shape[0]
        self.batches = []
        for b in range(min(MODEL_BATCHES_HELD, -(-n // batch_size))):
            ids = [(b * batch_size + k) % n for k in range(batch_size)]
            image, valid = stores.read_tiles(ids)
            self.batches.append(torch.from_numpy(prepare(card, image, valid, batch_size)).to(self.device))
        self.batch_size = batch_size

    def measure(self, tiles: int) -> tuple[list[float], int]:
        """Seconds from the start at which each tile finished (a batch's tiles all finish at its end), per
        tile like the run's own completion stamps, so both go through the same steady-rate sum; and the
        torch thread count the passes ran with (``threads``, else what torch starts with in this actor)."""
        import torch

        from geoseg.infer import predict

        if self.threads:
            torch.set_num_threads(self.threads)  # on the thread that runs the model, as the inference actor does
        ends = []
        t0 = time.perf_counter()
        for b in range(-(-tiles // self.batch_size)):
            predict(self.model, self.batches[b % len(self.batches)], self.class_ids, self.device.type == "cuda")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            ends += [time.perf_counter() - t0] * self.batch_size
        return ends[:tiles], torch.get_num_threads()


def _node_cpus(gpu: bool) -> float:
    """CPUs of the largest live node (with a GPU when ``gpu``): what the ceiling actor may use."""
    import ray

    return max(n["Resources"].get("CPU", 0.0) for n in ray.nodes()
               if n["Alive"] and (not gpu or n["Resources"].get("GPU")))


def child_geoseg(p: dict[str, Any]) -> dict[str, Any]:
    """Inside the driver process: a geoseg run with per-tile completion stamps, then (``measure_model``) the
    model alone: the ceiling with the whole node, and with the inference actor's own CPUs."""
    t_start = time.time()
    local = p["ray_address"] is None
    if local:
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    from geoseg import runtime
    from geoseg.cluster import connect
    from geoseg.config import ExecutionSettings, RunConfig
    from geoseg.plan import load_plan

    private = _PrivatePeak()

    def driver_cpu_s() -> float:
        """This process's CPU seconds, all threads (Ray's core worker's too) but the benchmark's sampler."""
        return time.process_time() - private.cpu_s

    class Stamps(runtime.Observer):
        """Per tile recorded done: (monotonic s, driver CPU s); per stage: the driver's own peak private memory
        when it ended (which stage grows), and the wall clock when the class raster was written."""

        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []
            self.peak_after: dict[str, float] = {}
            self.raster_at: list[float] = []

        def tiles_done(self, tile_ids: list[int]) -> None:
            stamp = (time.monotonic(), driver_cpu_s())
            self.stamps += [stamp] * len(tile_ids)

        def stage_done(self, stage: str) -> None:
            self.peak_after[stage] = private.peak
            if stage == "mosaic":
                self.raster_at.append(time.time())

    observer = Stamps()
    t_imported = time.time()
    env_vars: dict[str, str] = {}
    hook = None
    if p.get("standin"):  # --driver: every worker of this run builds the stand-in for its card (bench/_standin.py)
        here = str(Path(__file__).resolve().parent)
        env_vars["PYTHONPATH"] = os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))
        hook = "_standin.install"
    # as geoseg starts or joins Ray, with this run's files in a temp dir of its own
    connect(p["ray_address"], num_cpus=os.cpu_count() if local else None, env_vars=env_vars, setup_hook=hook,
            temp_dir=tempfile.mkdtemp(prefix="gsb-ray-", dir="/tmp") if local else None)
    t_ray = time.time()
    idle_from = driver_cpu_s()
    time.sleep(p.get("idle_probe_s", 0.0))  # the driver's CPU while it waits: Ray's per-second background
    idle_cpu_s = driver_cpu_s() - idle_from
    launched_mono = time.monotonic() - (time.time() - p["t_launch"])
    load_before = os.getloadavg()
    report = runtime.run(RunConfig(scenes=(p["scene"],), out=p["run_dir"], model=p.get("model"),
                                   tile_size=p.get("tile_size"), halo=p.get("halo")),
                         ExecutionSettings(ray_address=p["ray_address"], use_gpu=True if p["gpu"] else None,
                                           actor_cpus=p.get("actor_cpus"), batch_size=p["batch_size"],
                                           progress=False), overwrite=True, observer=observer)
    t_done = time.time()
    plan = load_plan(p["run_dir"])
    g = plan.grid
    windows = (g.core_window(int(a), int(b)) for a, b in plan.tiles)
    core_px = sum((r.stop - r.start) * (c.stop - c.start) for r, c in windows)
    ex = asdict(report)["execution"]
    out: dict[str, Any] = {
        "report": asdict(report), "complete": report.complete, "tiles": plan.tile_count, "core_px": core_px,
        "grid": {"width": g.width, "height": g.height, "tile_size": g.tile_size, "halo": g.halo},
        "stamps": sorted(observer.stamps), "launched_mono": launched_mono,
        "imports_s": t_imported - t_start, "ray_start_s": t_ray - t_imported, "idle_cpu_s": idle_cpu_s,
        "to_raster_s": observer.raster_at[0] - p["t_launch"], "whole_run_s": t_done - p["t_launch"],
        "loadavg_run": [load_before, os.getloadavg()], "driver_peak_mib_own": _peak_rss_mib(),
        "driver_private_peak_after_stage_mib": {k: round(v, 1) for k, v in observer.peak_after.items()},
    }
    if p["measure_model"]:
        device, gpus = ("cuda", 1) if ex["use_gpu"] else ("cpu", 0)
        for key, options, threads in (("ceiling", {"num_cpus": _node_cpus(ex["use_gpu"]), "num_gpus": gpus}, None),
                                      ("actor_threads",
                                       {"num_cpus": ex["actor_cpus"], "num_gpus": gpus}, ex["threads"])):
            actor = ray.remote(_ModelOnly).options(**options).remote(plan.model, p["run_dir"], ex["batch_size"],
                                                                     device, threads)
            load_before = os.getloadavg()
            ends, used = ray.get(actor.measure.remote(plan.tile_count))
            out[key] = {"ends": ends, "threads": used, "options": options, "loadavg": [load_before, os.getloadavg()]}
            ray.kill(actor)  # frees its CPUs for the next
    ray.shutdown()
    return out


def child_naive(p: dict[str, Any]) -> dict[str, Any]:
    """Inside a plain process: the naive loop (torch's default thread count unless ``threads``), then the
    polygons users glue on after it when ``gpkg`` is given; seconds from launch to each output."""
    import torch

    if p["threads"]:
        torch.set_num_threads(p["threads"])
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    stats = naive_segment(Path(p["scene"]), Path(p["out"]), batch_size=p["batch_size"], tile_size=p["tile_size"],
                          halo=p["halo"], device=p["device"])
    stats.update(loop_s=time.perf_counter() - t0, to_raster_s=time.time() - p["t_launch"],
                 threads=torch.get_num_threads())
    if p["gpkg"]:
        stats["polygons"] = naive_polygons(Path(p["out"]), Path(p["gpkg"]))
        stats["to_gpkg_s"] = time.time() - p["t_launch"]
    stats["loadavg"] = [load_before, os.getloadavg()]
    return stats


def child_plan(p: dict[str, Any]) -> dict[str, Any]:
    """Inside a plain process: plan a continental region from header-only scenes, then a ledger of that size."""
    from geoseg.config import RunConfig
    from geoseg.ledger import Ledger
    from geoseg.plan import save_plan
    from geoseg.planner import make_plan

    scenes = [str(s) for s in sorted(Path(p["scene_dir"]).glob("*.tif"))]
    base = _peak_rss_mib()
    t0 = time.perf_counter()
    plan = make_plan(RunConfig(scenes=tuple(scenes), out=p["run_dir"], crs=p["crs"], tile_size=CARD_TILE))
    t1 = time.perf_counter()
    peak_plan = _peak_rss_mib()
    save_plan(p["run_dir"], plan)
    t2 = time.perf_counter()
    peak_save = _peak_rss_mib()
    ledger = Ledger(plan.tile_count)
    todo = ledger.not_done()
    for i in todo:
        ledger.mark_done(i)
    text = ledger.to_json()
    t3 = time.perf_counter()
    return {"scenes": len(scenes), "tiles": plan.tile_count, "grid": [plan.grid.width, plan.grid.height],
            "tile_size": plan.grid.tile_size, "res": plan.grid.res, "plan_s": t1 - t0, "save_plan_s": t2 - t1,
            "ledger_s": t3 - t2, "plan_json_mib": len(plan.to_json()) / MIB, "ledger_json_mib": len(text) / MIB,
            "rss_after_imports_mib": base, "peak_after_plan_mib": peak_plan, "peak_after_save_mib": peak_save,
            "peak_after_ledger_mib": _peak_rss_mib(), "cpu_s": round(time.process_time(), 1)}



class _PrivatePeak:
    """This process's peak private memory (RssAnon), sampled every 0.05 s by a daemon thread.

    Resident size also counts the shared pages of Ray's object store that the driver has mapped while
    reading results (RssShmem; they belong to the node's object store, whose size Ray caps) and library
    code; the private pages are the driver's own memory. ``cpu_s`` is the thread's own CPU time, so the
    driver's CPU can be counted without this sampler."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.cpu_s = 0.0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, status_mib("self", "RssAnon"))
            self.cpu_s = time.thread_time()
            time.sleep(0.05)


def _peak_rss_mib() -> float:
    """This process's own peak RSS. Linux's ``ru_maxrss`` keeps the peak of the parent a child was forked
    from (the benchmark process that assembled the scene), so VmHWM is read instead, reset at child start."""
    try:
        with open("/proc/self/status") as f:
            return round(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def first_completion(ends: list[float]) -> int:
    """Tiles delivered by the first completion: those done within ``COMPLETION_S`` of the first. An actor call
    returns several batches at once (and the ceiling's batch ends together), so its tiles share one moment."""
    k = sum(1 for t in ends if t <= ends[0] + COMPLETION_S)
    if k >= len(ends):
        raise ValueError(f"steady state needs more than one completion; all {len(ends)} tiles came in the first")
    return k


def steady_rate(ends: list[float]) -> float:
    """Tiles per second after the first completion: (tiles - its tiles) / (last end - its end)."""
    k = first_completion(ends)
    return (len(ends) - k) / (ends[-1] - ends[k - 1])


def driver_cpu_ms_per_tile(stamps: list[tuple[float, float]]) -> float:
    """Driver CPU ms per tile recorded done after the first completion, from (time, driver CPU s) stamps."""
    k = first_completion([t for t, _ in stamps])
    return 1000 * (stamps[-1][1] - stamps[k - 1][1]) / (len(stamps) - k)


def halo_overhead(tiles: int, input_size: int, output_px: int) -> float:
    """Pixels the model computes per pixel a run outputs: every tile is computed with its halo."""
    return tiles * input_size**2 / output_px


def steady_cpu(sampler: PeakSampler, stamps: list[tuple[float, float]], mpx_per_tile: float) -> dict[str, float]:
    """CPU ms per output Mpx by role: the inference actor's between the first completion and the last tile
    recorded done, the readers' from their first reading task to the last tile (over every tile)."""
    k = first_completion([t for t, _ in stamps])
    end = stamps[-1][0]
    reader = 1000 * reader_cpu_s(sampler.rounds, end) / (len(stamps) * mpx_per_tile)
    return {"reader": round(reader, 1), **actor_cpu_ms_per_output_mpx(
        cpu_at(sampler.rounds, stamps[k - 1][0]), cpu_at(sampler.rounds, end), (len(stamps) - k) * mpx_per_tile)}


def gdal_polygonize(raster: Path, gpkg: Path) -> dict[str, Any] | str:
    """``gdal_polygonize.py`` on a class raster into a GeoPackage (its nodata, 0, left out), in its own
    process as a user runs it: wall seconds and features, or why it did not run."""
    exe = shutil.which("gdal_polygonize.py")
    if exe is None:
        return "gdal_polygonize.py not installed (Debian: apt-get install gdal-bin)"
    import pyogrio

    t0 = time.perf_counter()
    subprocess.run([exe, "-q", str(raster), "-b", "1", "-of", "GPKG", str(gpkg), "landcover", "class_id"], check=True)
    return {"seconds": time.perf_counter() - t0, "features": pyogrio.read_info(gpkg, layer="landcover")["features"]}

def header_only_scenes(folder: Path, lon: tuple[float, float], lat: tuple[float, float], step: tuple[float, float],
                       size: int = 10980, res: float = 10.0) -> int:
    """Sentinel-2-granule-like GeoTIFFs (10 named uint16 bands, 10980 px, their UTM zone) with no pixel written.

    Sparse files: GDAL stores only the headers, so hundreds of granules cost a few MB and the planner
    sees real scenes (footprints, CRS, bands) without any pixel existing or being read.
    """
    import rasterio
    from pyproj import Transformer

    from geoseg.grid import utm_epsg

    folder.mkdir(parents=True, exist_ok=True)
    names = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    count = 0
    x = lon[0]
    while x < lon[1]:
        y = lat[0]
        while y < lat[1]:
            epsg = utm_epsg(x + step[0] / 2, y + step[1] / 2)
            e, n = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(x, y + step[1])
            profile = dict(driver="GTiff", width=size, height=size, count=len(names), dtype="uint16",
                           crs=f"EPSG:{epsg}", transform=rasterio.Affine(res, 0, round(e, -1), 0, -res, round(n, -1)),
                           tiled=True, blockxsize=512, blockysize=512, SPARSE_OK=True)
            with rasterio.open(folder / f"granule_{count:04d}.tif", "w", **profile) as dst:
                dst.descriptions = names
            count += 1
            y += step[1]
        x += step[0]
    return count



def _geoseg_figures(geo: dict[str, Any], sampler: PeakSampler, local: bool) -> dict[str, Any]:
    """One geoseg run's steady-state figures: end to end, the ceiling, the model with the actor's CPUs, and
    (local Ray only: remote workers are not this machine's processes) CPU per output Mpx by role."""
    mpx_per_tile = geo["core_px"] / geo["tiles"] / 1e6
    e2e = steady_rate([t for t, _ in geo["stamps"]]) * mpx_per_tile
    ceiling = steady_rate(geo["ceiling"]["ends"]) * mpx_per_tile
    return {"e2e": e2e, "ceiling": ceiling, "efficiency": e2e / ceiling,
            "actor_model": steady_rate(geo["actor_threads"]["ends"]) * mpx_per_tile,
            "cpu": steady_cpu(sampler, geo["stamps"], mpx_per_tile) if local else None,
            "peaks": sampler.peaks_mib(), "geo": geo}


def main_comparison(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """geoseg, its ceiling and the naive loop on one assembled scene; prints the table, returns the JSON."""
    size = args.size or (4096 if args.quick else 5120)
    scene = workdir / f"s2_mirrored_{size}.tif"
    t0 = time.perf_counter()
    assemble_scene(scene, size)
    build_s = time.perf_counter() - t0
    local = args.ray_address is None
    runs = []  # the median-efficiency run is reported
    for _ in range(args.repeat):
        geo, sampler, _ = in_child("geoseg", {"scene": str(scene), "run_dir": args.run_dir or str(workdir / "run"),
                                              "batch_size": args.batch_size, "ray_address": args.ray_address,
                                              "gpu": args.gpu, "actor_cpus": args.actor_cpus, "measure_model": True},
                                   workdir)
        runs.append(_geoseg_figures(geo, sampler, local))
    r = sorted(runs, key=lambda f: f["efficiency"])[len(runs) // 2]
    geo, ex, grid, stage = r["geo"], r["geo"]["report"]["execution"], r["geo"]["grid"], r["geo"]["report"]["stage_s"]
    b, tile, halo = ex["batch_size"], grid["tile_size"], grid["halo"]

    device = "cuda" if args.gpu else "cpu"
    naive_batch = args.batch_size or NAIVE_BATCH[device]
    naive, naive_sampler, _ = in_child("naive", {"scene": str(scene), "out": str(workdir / "naive_classes.tif"),
                                                 "gpkg": str(workdir / "naive.gpkg"), "batch_size": naive_batch,
                                                 "tile_size": None, "halo": None, "threads": None, "device": device},
                                       workdir)
    gdal = gdal_polygonize(workdir / "naive_classes.tif", workdir / "naive_gdal.gpkg")
    glue = {"rasterio.features.shapes + geopandas to_file": naive["to_gpkg_s"]}
    if isinstance(gdal, dict):
        glue["gdal_polygonize.py"] = naive["to_raster_s"] + gdal["seconds"]
    method = min(glue, key=glue.__getitem__)
    at_geoseg = {"scene": str(scene), "out": str(workdir / "naive_geoseg_geometry.tif"), "gpkg": None,
                 "batch_size": b, "tile_size": tile, "halo": halo, "device": device}
    same_geometry = (naive["tile_size"], naive["halo"], naive_batch) == (tile, halo, b)
    naive_geo = naive if same_geometry else in_child("naive", {**at_geoseg, "threads": None}, workdir)[0]
    pinned = in_child("naive", {**at_geoseg, "threads": ex["threads"]}, workdir)[0]

    mpx = geo["core_px"] / 1e6
    overhead = halo_overhead(geo["tiles"], tile + 2 * halo, geo["core_px"])
    naive_overhead = halo_overhead(naive["tiles"], naive["tile_size"] + 2 * naive["halo"], size * size)
    speedup = naive["to_raster_s"] / geo["to_raster_s"]
    whole_speedup = glue[method] / geo["whole_run_s"]
    mosaic_mpx_s = grid["width"] * grid["height"] / 1e6 / stage["mosaic"]
    driver_ms = driver_cpu_ms_per_tile(geo["stamps"])
    ceiling_opts = geo["ceiling"]["options"]
    median_of = ", ".join(f"{f['efficiency']:.1%}" for f in runs)
    cpu = r["cpu"]
    peaks, naive_peaks = r["peaks"], naive_sampler.peaks_mib()
    first_done_s = geo["stamps"][0][0] - geo["launched_mono"]
    rows = [
        ("scene", f"{size} x {size} px = {size * size / 1e6:.1f} Mpx ({scene.name}, built in {build_s:.0f} s)"),
        ("geoseg settings", f"tile {tile} + halo {halo} (plan.json), batch {b}, {ex['actors']} actor(s) of "
                            f"{ex['actor_cpus']:g} CPUs with {ex['threads']} torch thread(s), "
                            f"{'GPU' if ex['use_gpu'] else 'CPU'} (report execution); {geo['tiles']} tiles"),
        ("ceiling", f"{r['ceiling']:8.3f} Mpx/s  the model alone with "
                    + ("1 GPU" if ceiling_opts["num_gpus"] else f"all {ceiling_opts['num_cpus']:g} CPUs of the node")
                    + f", {geo['ceiling']['threads']} torch thread(s); the run's tiles, halo and batch (steady)"),
        ("end to end", f"{r['e2e']:8.3f} Mpx/s  geoseg (steady, after the first completion); efficiency "
                       f"{r['efficiency']:.1%} of the ceiling"
                       + (f" (median of {len(runs)}: {median_of})" if len(runs) > 1 else "")),
        ("halo overhead", f"{overhead:.2f} px computed per px output (tile {tile} + 2 x {halo}); the naive loop at "
                          f"the card's tile {naive['tile_size']} + 2 x {naive['halo']}: {naive_overhead:.2f}"),
        ("naive default", f"to raster {naive['to_raster_s']:.1f} s, to GeoPackage {glue[method]:.1f} s "
                          f"({method}); torch's default {naive['threads']} thread(s), the card's tile "
                          f"{naive['tile_size']} + halo {naive['halo']}, batch {naive_batch}; "
                          "whole process from launch"),
        ("naive polygons", f"rasterio.features.shapes + geopandas to_file "
                           f"{naive['to_gpkg_s'] - naive['to_raster_s']:.1f} s ({naive['polygons']['features']:,} "
                           f"polygons); gdal_polygonize.py "
                           + (f"{gdal['seconds']:.1f} s ({gdal['features']:,} polygons)" if isinstance(gdal, dict)
                              else gdal) + f"; the faster counts: {method}"),
        ("geoseg", f"to raster {geo['to_raster_s']:.1f} s, to GeoPackage {geo['whole_run_s']:.1f} s; whole process "
                   f"from launch (imports, Ray start, plan, actors, tiles, mosaic, polygons)"),
        ("speedup", f"{speedup:.2f}x to the class raster, {whole_speedup:.2f}x to the GeoPackage, against the naive "
                    f"loop with default threads"),
        ("naive @ geoseg geom", "the same run as naive default (geoseg used the card's geometry)" if same_geometry else
         f"to raster {naive_geo['to_raster_s']:.1f} s ({mpx / naive_geo['loop_s']:.3f} Mpx/s in the loop): tile "
         f"{tile} + halo {halo}, batch {b}, {naive_geo['threads']} thread(s) [information]"),
        ("model, actor CPUs", f"{r['actor_model']:8.3f} Mpx/s  the model alone with the inference actor's "
                              f"{ex['actor_cpus']:g} CPUs and {geo['actor_threads']['threads']} torch thread(s); "
                              f"end to end is {r['e2e'] / r['actor_model']:.1%} of it [extra]"),
        ("naive, actor thr.", f"to raster {pinned['to_raster_s']:.1f} s ({mpx / pinned['loop_s']:.3f} Mpx/s in the "
                              f"loop), pinned to {pinned['threads']} torch thread(s), geoseg's geometry [extra]"),
        ("CPU per out Mpx", "remote workers: not measured" if cpu is None else
         f"reader {cpu['reader']:.0f} ms, actor host {cpu['actor_host']:.0f} ms, forward {cpu['forward']:.0f} ms "
         f"(= {', '.join(f'{v * tile * tile / 1e6:.1f}' for v in cpu.values())} ms per {tile} px tile), steady"
         + ("; forward 0: no actor thread is named gs-forward, so actor host is its whole process"
            if cpu["forward"] == 0 else "")),
        ("driver CPU", f"{driver_ms:.2f} ms per tile with the real model (steady; --driver measures it at full pace)"),
        ("mosaic", f"{mosaic_mpx_s:.1f} Mpx/s ({grid['width']} x {grid['height']} px in {stage['mosaic']:.1f} s)"),
        ("stages (s)", f"imports {geo['imports_s']:.1f}, ray start {geo['ray_start_s']:.1f}, "
         + ", ".join(f"{k} {v:.1f}" for k, v in stage.items())
         + f"; first tiles done {first_done_s:.1f} s after launch"),
        ("memory (MiB)", f"driver {peaks['driver']:.0f} ({peaks['driver_private']:.0f} private), workers "
                         f"{peaks['workers'] if local else 'remote'}, naive {naive_peaks['driver']:.0f}"),
        ("load average", f"run {_fmt_load(geo['loadavg_run'])}, ceiling {_fmt_load(geo['ceiling']['loadavg'])}, "
                         f"naive {_fmt_load(naive['loadavg'])}"),
    ]
    _print_rows(rows)
    return {
        "model_only_mpx_s": round(r["ceiling"], 4), "end_to_end_mpx_s": round(r["e2e"], 4),
        "efficiency": round(r["efficiency"], 4), "efficiency_runs": [round(f["efficiency"], 4) for f in runs],
        "naive_default_threads_s": round(naive["to_raster_s"], 2),
        "naive_default_threads_whole_s": round(glue[method], 2),
        "naive_polygons": {"method": method,
                           "rasterio_geopandas_s": round(naive["to_gpkg_s"] - naive["to_raster_s"], 2),
                           "gdal_polygonize_s": round(gdal["seconds"], 2) if isinstance(gdal, dict) else gdal},
        "geoseg_to_raster_s": round(geo["to_raster_s"], 2), "geoseg_whole_s": round(geo["whole_run_s"], 2),
        "speedup_vs_naive_default": round(speedup, 3), "whole_run_speedup_vs_naive_default": round(whole_speedup, 3),
        "halo_overhead": round(overhead, 4), "naive_halo_overhead": round(naive_overhead, 4),
        "cpu_ms_per_output_mpx": cpu, "driver_cpu_ms_per_tile_real_model": round(driver_ms, 3),
        "driver_tiles_per_s": None, "mosaic_mpx_s": round(mosaic_mpx_s, 2),
        "naive_geoseg_geometry_s": round(naive_geo["to_raster_s"], 2),
        "model_only_actor_threads_mpx_s": round(r["actor_model"], 4),
        "naive_actor_threads_s": round(pinned["to_raster_s"], 2),
        "threads": {"ceiling": geo["ceiling"]["threads"], "actor": geo["actor_threads"]["threads"],
                    "naive_default": naive["threads"]},
        "stage_s": stage,
        "startup_s": {"imports": round(geo["imports_s"], 2), "ray_start": round(geo["ray_start_s"], 2),
                      "first_done_after_launch": round(first_done_s, 2)},
        "driver_peak_mib": peaks["driver"], "driver_private_peak_mib": peaks["driver_private"],
        "worker_peak_by_role_mib": peaks["workers"] if local else None, "naive_peak_mib": naive_peaks["driver"],
        "scene": {"px": size, "mpx": round(size * size / 1e6, 2), "tiles": geo["tiles"]},
        "settings": {**ex, "tile_size": tile, "halo": halo},
        "loadavg": {"run": geo["loadavg_run"], "ceiling": geo["ceiling"]["loadavg"], "naive": naive["loadavg"]},
        "cpus": os.cpu_count(),
    }


def driver_cost(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``--driver``: the driver's CPU per tile with the stand-in network (benchmark only), real tile readers."""
    from _standin import write_checkpoint  # imports torch: only here

    size = DRIVER_SCENE_PX // 2 if args.quick else DRIVER_SCENE_PX  # --quick: 256 tiles
    scene = assemble_scene(workdir / f"s2_mirrored_{size}.tif", size)
    ckpt, halo = write_checkpoint(workdir / "standin.pt")
    geo, sampler, _ = in_child("geoseg", {"scene": str(scene), "run_dir": str(workdir / "run_driver"),
                                          "batch_size": args.batch_size, "ray_address": args.ray_address,
                                          "gpu": args.gpu, "actor_cpus": args.actor_cpus, "model": str(ckpt),
                                          "tile_size": CARD_TILE, "halo": halo, "measure_model": False,
                                          "idle_probe_s": DRIVER_IDLE_PROBE_S, "standin": True}, workdir)
    b = geo["report"]["execution"]["batch_size"]
    ms = driver_cpu_ms_per_tile(geo["stamps"])
    rate = steady_rate([t for t, _ in geo["stamps"]])
    idle_ms_per_s = 1000 * geo["idle_cpu_s"] / DRIVER_IDLE_PROBE_S
    dispatch = ms - idle_ms_per_s / rate  # what grows with the tiles: Ray's idle background does not
    mpx_per_tile = geo["core_px"] / geo["tiles"] / 1e6
    roles = ({k: v * mpx_per_tile for k, v in steady_cpu(sampler, geo["stamps"], mpx_per_tile).items()}
             if args.ray_address is None else None)
    _print_rows([
        ("driver", f"STAND-IN network (a 1x1 convolution with zero weights on the sentinel2-lulc card; benchmark "
                   f"only, bench/_standin.py) on {geo['tiles']} tiles of {CARD_TILE} px + halo {halo}, batch {b}, "
                   f"from a {size} px scene; real tile readers"
                   + (" (--quick: fewer than the 1000 tiles the figure needs)" if geo["tiles"] < 1000 else "")),
        ("driver CPU", f"{ms:.3f} ms per tile: time.process_time of the driver process (all its threads, Ray's "
                       f"core worker included, less the benchmark's sampler thread), first completion to last tile, at "
                       f"{rate:.0f} tiles/s"),
        ("driver workers", "remote: not measured" if roles is None else
         f"what sets that pace, CPU ms per tile: reader {roles['reader']:.1f}, actor host {roles['actor_host']:.1f}, "
         f"forward {roles['forward']:.1f}"),
        ("driver idle", f"{idle_ms_per_s:.1f} ms of CPU per second while it waits (Ray's background, "
                        f"{DRIVER_IDLE_PROBE_S:g} s before the run): {idle_ms_per_s / rate:.3f} ms of the figure per "
                        f"tile at this rate"),
        ("dispatch", f"{dispatch:.3f} ms per tile on dispatch and bookkeeping (driver CPU less its idle background)"),
        ("driver tiles/s", f"{1000 / dispatch:,.0f} tiles/s per driver core on dispatch and bookkeeping "
                           f"({1000 / ms:,.0f} with the idle background at this rate); target <= {DRIVER_TARGET_MS} ms "
                           f"per tile (3,000+ tiles/s): {'met' if dispatch <= DRIVER_TARGET_MS else 'NOT met'}"),
    ])
    return {"driver_tiles_per_s": round(1000 / dispatch, 1), "driver_cpu_ms_per_tile": round(ms, 4),
            "driver_dispatch_ms_per_tile": round(dispatch, 4),
            "driver_run": {"tiles": geo["tiles"], "tile_size": CARD_TILE, "halo": halo, "batch_size": b,
                           "scene_px": size, "tiles_per_s": round(rate, 1),
                           "idle_cpu_ms_per_s": round(idle_ms_per_s, 2),
                           "worker_cpu_ms_per_tile": {k: round(v, 2) for k, v in roles.items()} if roles else None}}


def sweep(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Driver and worker peaks (and the naive loop's) at 1x, 4x and 16x the area of a base scene."""
    base = args.size or (1024 if args.quick else 2048)
    device = "cuda" if args.gpu else "cpu"
    results = []
    _print_rows([("sweep", f"scenes of {base}, {2 * base}, {4 * base} px a side: 1x, 4x, 16x the area")])
    print("peak MiB: resident (private); the driver's private peak also when tiles / mosaic / polygons ended; "
          "seconds from launch: geoseg to raster / GeoPackage, naive (default threads) to raster")
    print(f"{'area':>5} {'Mpx':>6} {'tiles':>6} {'driver':>11} {'Predictor':>10} {'run_tile':>9} "
          f"{'naive':>11} {'geoseg s':>12} {'naive s':>8}   driver private after stages", flush=True)
    for k in (1, 2, 4):
        size = base * k
        scene = assemble_scene(workdir / f"s2_mirrored_{size}.tif", size)
        geo, sampler, _ = in_child("geoseg", {"scene": str(scene), "run_dir": str(workdir / f"run_{size}"),
                                              "batch_size": args.batch_size, "ray_address": args.ray_address,
                                              "gpu": args.gpu, "measure_model": False}, workdir)
        naive, naive_sampler, _ = in_child("naive", {"scene": str(scene), "out": str(workdir / f"naive_{size}.tif"),
                                                     "gpkg": None, "batch_size": args.batch_size or NAIVE_BATCH[device],
                                                     "tile_size": None, "halo": None, "threads": None,
                                                     "device": device}, workdir)
        peaks, naive_peaks = sampler.peaks_mib(), naive_sampler.peaks_mib()
        row = {"area": k * k, "mpx": round(size * size / 1e6, 1), "tiles": geo["tiles"],
               "driver_peak_mib": peaks["driver"],
               "driver_private_peak_mib": peaks["driver_private"],
               "worker_peak_by_role_mib": peaks["workers"], "naive_peak_mib": naive_peaks["driver"],
               "naive_private_peak_mib": naive_peaks["driver_private"],
               "geoseg_to_raster_s": round(geo["to_raster_s"], 1), "geoseg_whole_s": round(geo["whole_run_s"], 1),
               "naive_to_raster_s": round(naive["to_raster_s"], 1),
               "driver_private_peak_after_stage_mib": geo["driver_private_peak_after_stage_mib"],
               "loadavg": geo["loadavg_run"][1]}
        results.append(row)
        w = peaks["workers"]
        print(f"{k * k:>4}x {row['mpx']:6.1f} {row['tiles']:6d} "
              f"{row['driver_peak_mib']:5.0f} ({row['driver_private_peak_mib']:3.0f}) "
              f"{w.get('Predictor', 0):10.0f} {w.get('run_tile', 0):9.0f} "
              f"{row['naive_peak_mib']:5.0f} ({row['naive_private_peak_mib']:3.0f}) "
              f"{row['geoseg_to_raster_s']:5.1f} / {row['geoseg_whole_s']:5.1f} {row['naive_to_raster_s']:8.1f}   "
              + " / ".join(f"{v:.0f}" for v in row["driver_private_peak_after_stage_mib"].values()), flush=True)
        scene.unlink()
    first, last = results[0], results[-1]
    return {"sweep": results,
            "driver_peak_growth_mib": round(last["driver_peak_mib"] - first["driver_peak_mib"], 1),
            "driver_private_peak_growth_mib":
                round(last["driver_private_peak_mib"] - first["driver_private_peak_mib"], 1),
            "predictor_peak_growth_mib": round(last["worker_peak_by_role_mib"].get("Predictor", 0)
                                               - first["worker_peak_by_role_mib"].get("Predictor", 0), 1),
            "naive_peak_growth_mib": round(last["naive_peak_mib"] - first["naive_peak_mib"], 1)}


def million_tiles(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Plan ~1,000,000 tiles over Europe in EPSG:3035 from header-only granules; seconds and driver memory."""
    lon, lat = ((10.0, 16.0), (46.0, 52.0)) if args.quick else ((-8.0, 28.0), (38.0, 60.0))
    t0 = time.perf_counter()
    n = header_only_scenes(workdir / "granules", lon, lat, (1.4, 0.9))
    made = time.perf_counter() - t0
    r, sampler, wall = in_child("plan", {"scene_dir": str(workdir / "granules"), "run_dir": str(workdir / "plan"),
                                       "crs": "EPSG:3035"}, workdir)
    _print_rows([
        ("region", f"lon {lon[0]:g}..{lon[1]:g}, lat {lat[0]:g}..{lat[1]:g} in EPSG:3035; {n} header-only "
                   f"10980 px granules (made in {made:.0f} s)"),
        ("plan", f"{r['tiles']:,} tiles of {r['tile_size']} px at {r['res']:g} m, grid {r['grid'][0]:,} x "
                 f"{r['grid'][1]:,} px: make_plan {r['plan_s']:.1f} s, save_plan {r['save_plan_s']:.1f} s "
                 f"({r['plan_json_mib']:.1f} MiB)"),
        ("cpu", f"{r.get('cpu_s', float('nan')):.1f} CPU s in the planning process (the rest of its wall time is "
                f"waiting for a core)"),
        ("ledger", f"all tiles marked done and serialised {r['ledger_s']:.1f} s ({r['ledger_json_mib']:.1f} MiB)"),
        ("driver MiB",
            f"after imports {r['rss_after_imports_mib']:.0f}, peak after plan {r['peak_after_plan_mib']:.0f}, "
                       f"after save {r['peak_after_save_mib']:.0f}, after ledger {r['peak_after_ledger_mib']:.0f} "
                       f"(sampled peak {sampler.peaks_mib()['driver']:.0f})"),
    ])
    return {"million_tiles": {**r, "granule_files_s": round(made, 1), "process_s": round(wall, 1),
                              "driver_peak_mib": sampler.peaks_mib()["driver"]}}


def _fmt_load(pair: list[list[float]]) -> str:
    return f"{pair[0][0]:.1f}->{pair[1][0]:.1f}"




def _print_rows(rows: list[tuple[str, str]]) -> None:
    for name, text in rows:
        print(f"{name:<20} {text}", flush=True)


def main() -> None:
    """Parse the options, run the chosen sections, print the table and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a few minutes")
    ap.add_argument("--repeat", type=int, default=3,
                    help="geoseg + ceiling pairs; the median efficiency is reported (default 3)")
    ap.add_argument("--size", type=int, help="scene side in px (default 5120 = 26 Mpx, --quick 4096; sweep base 2048)")
    ap.add_argument("--batch-size", type=int, help="tiles per forward pass for geoseg and the naive loop "
                                                   "(default: geoseg's own; the naive loop 4 on CPU, 64 on GPU)")
    ap.add_argument("--driver", action="store_true", help="also the driver's CPU per tile, with a stand-in network "
                                                          "(benchmark only) on 1024 tiles of 256 px")
    ap.add_argument("--sweep", action="store_true",
                    help="the memory sweep (1x, 4x, 16x the area) instead of the comparison")
    ap.add_argument("--million-tiles", action="store_true",
                    help="the continental planning figure instead of the comparison")
    ap.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
    ap.add_argument("--gpu", action="store_true", help="inference on GPUs (the cluster must have them)")
    ap.add_argument("--actor-cpus", type=float, help="CPUs per inference actor (default: geoseg's choice)")
    ap.add_argument("--workdir", type=Path, help="scenes, runs and results (every node must see it on a cluster)")
    ap.add_argument("--run-dir", help="RUN_DIR URL for the geoseg run (e.g. s3://...; default under --workdir)")
    ap.add_argument("--child", choices=("geoseg", "naive", "plan"), help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM: the peak counted from here is this child's own
        except OSError:
            pass
        body = {"geoseg": child_geoseg, "naive": child_naive, "plan": child_plan}[args.child]
        args.result.write_text(json.dumps(body(json.loads(args.params))))
        return
    strzegom_scenes()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="geoseg-throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"geoseg throughput benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, "
          f"workdir {workdir}", flush=True)
    out: dict[str, Any] = {}
    if args.sweep:
        out.update(sweep(args, workdir))
    if args.million_tiles:
        out.update(million_tiles(args, workdir))
    if not out:
        out = main_comparison(args, workdir)
    if args.driver:
        out.update(driver_cost(args, workdir))
    out["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
