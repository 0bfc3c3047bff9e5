"""Throughput benchmark: does `geoseg run` keep its inference workers busy, and what does it cost in memory?

    .venv/bin/python bench/throughput.py [--quick] [--size PX] [--batch-size N] [--workdir DIR]
    .venv/bin/python bench/throughput.py --sweep          # driver/worker peaks at 1x, 4x, 16x the area
    .venv/bin/python bench/throughput.py --million-tiles  # plan ~1,000,000 tiles from footprints only
    .venv/bin/python bench/throughput.py --ray-address ADDR --gpu --workdir SHARED_DIR_OR_S3_URL

Default: a scene of at least 25 Mpx mirrored from the real Sentinel-2 stacks (``_scene.assemble_scene``),
then, each in its own process so that every peak is its own:

* end to end: ``geoseg.runtime.run`` in-process on a local Ray (one driver, the default inference actor,
  tile-reading tasks); every tile's completion time is taken where the driver records it
  (``Ledger.mark_done``), and steady state is the rate after the first batch;
* model only: right after, on the same cluster, an actor with the inference actor's own resources,
  concurrency, torch thread count and batch size runs ``geoseg.infer.predict`` over as many tiles, prepared from the run's
  own tiles and held in memory (on the GPU with ``--gpu``);
* naive: the single-process rasterio sliding-window loop users write today (``_scene.naive_segment``).

The driver's and every Ray worker's resident memory is sampled from this process every 0.2 s. Mpx are
counted over tile cores (the pixels a run outputs). A short table is printed, then one JSON object as the
last line. Ray workers run at nice 0 here (Ray's default is 15), like the naive loop, so that a shared,
busy machine treats the three measurements alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _scene import assemble_scene, naive_segment, strzegom_scenes  # noqa: E402

from geoseg.config import default_batch_size  # noqa: E402

MIB = 2**20
ROLES = ("Predictor", "run_tile", "_ModelOnly")
MODEL_BATCHES_HELD = 8


class PeakSampler:
    """Peak RSS of one process and of its Ray worker descendants by role, read in a background thread.

    A Ray worker's process title names what it runs (``ray::Predictor``, ``ray::run_tile``); a worker
    keeps its role while it idles between tasks. Peaks are the kernel-kept peak RSS (VmHWM) of each
    process as last read, so they do not depend on a sample landing on a short peak; the driver's private
    memory has no such counter and is sampled. CPU seconds are summed by role from each worker's last
    sample.
    """

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.driver = 0.0
        self.driver_private = 0.0
        self.role_of: dict[int, str] = {}
        self.worker: dict[str, float] = {}
        self.cpu_s: dict[int, float] = {}  # worker pid -> CPU seconds (user + system) when last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, _status_mib(self.root.pid, "VmHWM") * MIB)
                self.driver_private = max(self.driver_private, _status_mib(self.root.pid, "RssAnon"))
                children = self.root.children(recursive=True)
            except psutil.Error:
                return
            for p in children:
                try:
                    title = (p.cmdline() or [""])[0]
                    peak = _status_mib(p.pid, "VmHWM") * MIB  # the process's own exact peak, not a sample
                    cpu = p.cpu_times()
                except psutil.Error:
                    continue
                role = next((r for r in ROLES if title.startswith(f"ray::{r}")), None)
                if role is None and title == "ray::IDLE":
                    role = self.role_of.get(p.pid)
                if role is not None:
                    self.role_of[p.pid] = role
                    self.worker[role] = max(self.worker.get(role, 0), peak)
                    self.cpu_s[p.pid] = cpu.user + cpu.system
            self._stop.wait(self.interval_s)

    def peaks_mib(self) -> dict[str, Any]:
        """Driver peak (resident, and private: its anonymous pages) and each worker role's peak (the largest
        process of that role), in MiB."""
        cpu: dict[str, float] = {}
        for pid, seconds in self.cpu_s.items():
            cpu[self.role_of[pid]] = cpu.get(self.role_of[pid], 0.0) + seconds
        return {"driver": round(self.driver / MIB, 1), "driver_private": round(self.driver_private, 1),
                "workers": {r: round(v / MIB, 1) for r, v in sorted(self.worker.items())},
                "worker_cpu_s": {r: round(v, 2) for r, v in sorted(cpu.items())}}


def in_child(role: str, params: dict[str, Any], workdir: Path) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Run one measurement in a fresh process of this script; its result, its memory peaks, its wall time."""
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
    return out, sampler.peaks_mib(), wall


class _ModelOnly:
    """Ray actor: the model alone on prepared tensors already in memory (on the GPU when it runs on one)."""

    def __init__(self, model: str, run_dir: str, batch_size: int, device: str, threads: int) -> None:
        import torch

        from geoseg.infer import prepare
        from geoseg.model.checkpoint import load_model
        from geoseg.store import Stores

        self.threads = threads or torch.get_num_threads()
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

    def measure(self, tiles: int) -> list[float]:
        """Seconds from the start at which each tile finished (a batch's tiles all finish at its end),
        per tile like the run's own completion stamps, so both go through the same steady-rate sum."""
        import torch

        from geoseg.infer import predict

        torch.set_num_threads(self.threads)  # as the inference actor does, on the thread that runs the model
        ends = []
        t0 = time.perf_counter()
        for b in range(-(-tiles // self.batch_size)):
            classes, conf = predict(self.model, self.batches[b % len(self.batches)], self.class_ids,
                                    self.device.type == "cuda")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            ends += [time.perf_counter() - t0] * self.batch_size
        return ends[:tiles]


def child_geoseg(p: dict[str, Any]) -> dict[str, Any]:
    """Inside the driver process: a geoseg run with per-tile completion times, then the model alone."""
    t_start = time.time()
    local = p["ray_address"] is None
    if local:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from geoseg import runtime, storage
    from geoseg.config import ExecutionSettings, RunConfig
    from geoseg.ledger import Ledger
    from geoseg.plan import load_plan

    stamps: list[float] = []
    seen: dict[str, Any] = {}
    mark_done, dispatch = Ledger.mark_done, runtime._Dispatcher.run

    def timed_mark_done(self: Ledger, tile_id: int) -> None:
        stamps.append(time.perf_counter())
        mark_done(self, tile_id)

    def recorded_dispatch(self: Any, todo: list[int]) -> None:
        seen.update(threads=self.threads, actors=len(self.actors), use_gpu=self.use_gpu, start=time.perf_counter(),
                    options={k: self.actor_options[k] for k in ("num_cpus", "num_gpus", "max_concurrency")})
        dispatch(self, todo)

    Ledger.mark_done = timed_mark_done  # type: ignore[method-assign]
    runtime._Dispatcher.run = recorded_dispatch  # type: ignore[method-assign]
    private = _PrivatePeak()
    peak_after: dict[str, float] = {}  # the driver's own peak private memory when each stage ended: which stage grows

    def staged(stage: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            peak_after.setdefault("tiles", private.peak)  # the first wrapped stage starts when the tiles end
            out = fn(*a, **kw)
            peak_after[stage] = private.peak
            return out
        return wrapper

    runtime.mosaic = staged("mosaic", runtime.mosaic)  # type: ignore[attr-defined]
    runtime._vectorise = staged("vectorise", runtime._vectorise)  # type: ignore[attr-defined]

    t_imported = time.time()
    env = {"env_vars": storage.forwarded_env()}
    if local:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=env,
                 _temp_dir=tempfile.mkdtemp(prefix="gsb-ray-", dir="/tmp"))
    else:
        ray.init(address=p["ray_address"], log_to_driver=False, runtime_env=env)
    t_ray = time.time()
    load_before = os.getloadavg()
    result = runtime.run(RunConfig(scenes=(p["scene"],), out=p["run_dir"], batch_size=p["batch_size"]),
                         ExecutionSettings(ray_address=p["ray_address"], use_gpu=True if p["gpu"] else None,
                                           actor_cpus=p.get("actor_cpus"),
                                           progress=False), overwrite=True)
    t_done = time.time()
    plan = load_plan(p["run_dir"])
    core_px = sum((r.stop - r.start) * (c.stop - c.start)
                  for r, c in (plan.grid.core_window(int(a), int(b)) for a, b in plan.tiles))
    out: dict[str, Any] = {
        "report": result.report, "exit_code": result.exit_code, "tiles": plan.tile_count, "core_px": core_px,
        "stamps": [s - seen["start"] for s in sorted(stamps)], "settings": {k: v for k, v in seen.items() if k != "start"},
        "imports_s": t_imported - t_start, "ray_start_s": t_ray - t_imported, "whole_run_s": t_done - p["t_launch"],
        "loadavg_run": [load_before, os.getloadavg()], "driver_peak_mib_own": _peak_rss_mib(),
        "driver_private_peak_after_stage_mib": {k: round(v, 1) for k, v in peak_after.items()},
    }
    if p["model_only"]:
        options = seen["options"]
        # max_concurrency too: a threaded actor runs calls on pool threads, where the torch thread count
        # set in __init__ is not what the forward pass gets (docs/performance.md), so match it exactly
        actor = ray.remote(_ModelOnly).options(**options).remote(
            plan.model, p["run_dir"], plan.batch_size, "cuda" if seen["use_gpu"] else "cpu", seen["threads"])
        load_before = os.getloadavg()
        out["model_only_ends"] = ray.get(actor.measure.remote(plan.tile_count))
        out["loadavg_model_only"] = [load_before, os.getloadavg()]
    ray.shutdown()
    return out


def child_naive(p: dict[str, Any]) -> dict[str, Any]:
    """Inside a plain process: the naive loop with the inference actor's torch thread count."""
    import torch

    torch.set_num_threads(p["threads"])
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    stats = naive_segment(Path(p["scene"]), Path(p["out"]), batch_size=p["batch_size"])
    stats["loop_s"] = time.perf_counter() - t0
    stats["loadavg"] = [load_before, os.getloadavg()]
    return stats


def child_plan(p: dict[str, Any]) -> dict[str, Any]:
    """Inside a plain process: plan a continental region from header-only scenes, then a ledger of that size."""
    from geoseg.config import RunConfig
    from geoseg.ledger import Ledger
    from geoseg.plan import make_plan, save_plan

    scenes = [str(s) for s in sorted(Path(p["scene_dir"]).glob("*.tif"))]
    base = _peak_rss_mib()
    t0 = time.perf_counter()
    plan = make_plan(RunConfig(scenes=tuple(scenes), out=p["run_dir"], crs=p["crs"]))
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


def _status_mib(pid: int | str, key: str) -> float:
    """One memory figure of ``/proc/PID/status`` in MiB (0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:")) / 1024
    except (OSError, StopIteration):
        return 0.0


class _PrivatePeak:
    """This process's peak private memory (RssAnon), sampled every 0.05 s by a daemon thread.

    Resident size also counts the shared pages of Ray's object store that the driver has mapped while
    reading results (RssShmem; they belong to the node's object store, whose size Ray caps) and library
    code; the private pages are the driver's own memory."""

    def __init__(self) -> None:
        self.peak = 0.0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, _status_mib("self", "RssAnon"))
            time.sleep(0.05)


def _peak_rss_mib() -> float:
    """This process's own peak RSS. Linux's ``ru_maxrss`` keeps the peak of the parent a child was forked
    from (the benchmark process that assembled the scene), so VmHWM is read instead, reset at child start."""
    try:
        with open("/proc/self/status") as f:
            return round(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def steady_rate(ends: list[float], batch: int) -> float:
    """Tiles per second after the first batch: (tiles - first batch) / (last end - first batch's end)."""
    if len(ends) <= batch:
        raise ValueError(f"steady state needs more than one batch of {batch} tiles, got {len(ends)}")
    return (len(ends) - batch) / (ends[-1] - ends[batch - 1])


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


def main_comparison(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """End to end, model only and the naive loop on one assembled scene; prints the table, returns the JSON."""
    size = args.size or (2048 if args.quick else 5120)
    scene = workdir / f"s2_mirrored_{size}.tif"
    t0 = time.perf_counter()
    assemble_scene(scene, size)
    build_s = time.perf_counter() - t0
    run_dir = args.run_dir or str(workdir / "run")
    b = args.batch_size
    runs = []  # (efficiency, e2e, model, (geo, peaks, wall)) per repeat; the median one is reported
    for _ in range(args.repeat):
        child = in_child("geoseg", {"scene": str(scene), "run_dir": run_dir, "batch_size": b,
                                    "ray_address": args.ray_address, "gpu": args.gpu, "actor_cpus": args.actor_cpus,
                                    "model_only": True}, workdir)
        mpx_per_tile = child[0]["core_px"] / child[0]["tiles"] / 1e6
        e2e = steady_rate(child[0]["stamps"], b) * mpx_per_tile
        model = steady_rate(child[0]["model_only_ends"], b) * mpx_per_tile
        runs.append((e2e / model, e2e, model, child))
    _, e2e, model, (geo, geo_peaks, geo_wall) = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    settings = geo["settings"]
    naive, naive_peaks, naive_wall = in_child("naive", {"scene": str(scene), "out": str(workdir / "naive_classes.tif"),
                                                        "batch_size": b,
                                                        "threads": settings["threads"]}, workdir)
    naive_mpx = size * size / 1e6 / naive["loop_s"]
    stage = geo["report"]["stage_s"]
    first = geo["stamps"][b - 1]
    local = args.ray_address is None
    worker_peak = max(geo_peaks["workers"].get(r, 0.0) for r in ("Predictor", "run_tile")) if local else None
    rows = [
        ("scene", f"{size} x {size} px = {size * size / 1e6:.1f} Mpx, {geo['tiles']} tiles of "
                  f"{geo['report'].get('tiles_total')} ({scene.name}, built in {build_s:.0f} s)"),
        ("settings", f"batch {b}, {settings['actors']} actor(s), {settings['threads']} torch thread(s), "
                     f"actor {settings['options']}, {'GPU' if settings['use_gpu'] else 'CPU'}"),
        ("model only", f"{model:7.3f} Mpx/s  (steady, after the first batch)"),
        ("end to end", f"{e2e:7.3f} Mpx/s  (steady, after the first batch)  efficiency {e2e / model:.1%}"
                       + (f" (median of {len(runs)}: {', '.join(f'{r[0]:.1%}' for r in runs)})" if len(runs) > 1 else "")),
        ("naive loop", f"{naive_mpx:7.3f} Mpx/s  (read {naive['seconds']['read']:.0f} s, predict "
                       f"{naive['seconds']['predict']:.0f} s, write {naive['seconds']['write']:.1f} s)"),
        ("whole run", f"geoseg {geo['whole_run_s']:.1f} s ({size * size / 1e6 / geo['whole_run_s']:.3f} Mpx/s) vs "
                      f"naive {naive_wall:.1f} s ({size * size / 1e6 / naive_wall:.3f} Mpx/s), process start to output; "
                      f"geoseg to its class raster (before polygons, which the loop does not make) "
                      f"{geo['whole_run_s'] - stage['vectorise']:.1f} s"),
        ("worker CPU", "per tile (sampled every 0.2 s, process start-up included): "
                       + ", ".join(f"{r} {1000 * geo_peaks['worker_cpu_s'][r] / geo['tiles']:.1f} ms"
                                   for r in ("run_tile", "Predictor") if r in geo_peaks["worker_cpu_s"])),
        ("stages (s)", f"imports {geo['imports_s']:.1f}, ray start {geo['ray_start_s']:.1f}, " +
         ", ".join(f"{k} {v:.1f}" for k, v in stage.items()) + f"; first batch done {first:.1f} s into tile_and_infer"),
        ("memory (MiB)", f"driver {geo_peaks['driver']:.0f} ({geo_peaks['driver_private']:.0f} private), workers {geo_peaks['workers'] if local else 'remote'}, "
                         f"naive {naive_peaks['driver']:.0f}"),
        ("load average", f"run {_fmt_load(geo['loadavg_run'])}, model only {_fmt_load(geo['loadavg_model_only'])}, "
                         f"naive {_fmt_load(naive['loadavg'])}"),
    ]
    _print_rows(rows)
    return {
        "model_only_mpx_s": round(model, 4), "end_to_end_mpx_s": round(e2e, 4), "efficiency": round(e2e / model, 4),
        "efficiency_runs": [round(r[0], 4) for r in runs],
        "whole_run_to_raster_s": round(geo["whole_run_s"] - stage["vectorise"], 2),
        "whole_run_s": round(geo["whole_run_s"], 2), "stage_s": stage,
        "startup_s": {"imports": round(geo["imports_s"], 2), "ray_start": round(geo["ray_start_s"], 2),
                      "first_batch": round(first, 2)},
        "driver_peak_mib": geo_peaks["driver"], "driver_private_peak_mib": geo_peaks["driver_private"],
        "worker_peak_mib": worker_peak,
        "worker_peak_by_role_mib": geo_peaks["workers"] if local else None,
        "worker_cpu_ms_per_tile": {r: round(1000 * v / geo["tiles"], 2) for r, v in geo_peaks["worker_cpu_s"].items()
                                   if r != "_ModelOnly"} if local else None,
        "naive_mpx_s": round(naive_mpx, 4), "naive_peak_mib": naive_peaks["driver"], "naive_whole_s": round(naive_wall, 2),
        "naive_seconds": {k: round(v, 2) for k, v in naive["seconds"].items()},
        "speedup_vs_naive": round(e2e / naive_mpx, 3), "whole_run_speedup_vs_naive": round(naive_wall / geo["whole_run_s"], 3),
        "scene": {"px": size, "mpx": round(size * size / 1e6, 2), "tiles": geo["tiles"]},
        "settings": {"batch_size": b, **settings},
        "loadavg": {"run": geo["loadavg_run"], "model_only": geo["loadavg_model_only"], "naive": naive["loadavg"]},
        "cpus": os.cpu_count(),
    }


def sweep(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Driver and worker peaks (and the naive loop's) at 1x, 4x and 16x the area of a base scene."""
    base = args.size or (1024 if args.quick else 2048)
    results = []
    _print_rows([("sweep", f"scenes of {base}, {2 * base}, {4 * base} px a side: 1x, 4x, 16x the area")])
    print("peak MiB: resident (private); the driver's private peak also when tiles / mosaic / polygons ended")
    print(f"{'area':>5} {'Mpx':>6} {'tiles':>6} {'driver':>11} {'Predictor':>10} {'run_tile':>9} "
          f"{'naive':>11} {'geoseg s':>9} {'naive s':>8}   driver private after stages", flush=True)
    for k in (1, 2, 4):
        size = base * k
        scene = assemble_scene(workdir / f"s2_mirrored_{size}.tif", size)
        geo, peaks, wall = in_child("geoseg", {"scene": str(scene), "run_dir": str(workdir / f"run_{size}"),
                                               "batch_size": args.batch_size, "ray_address": args.ray_address,
                                               "gpu": args.gpu, "model_only": False}, workdir)
        naive, naive_peaks, naive_wall = in_child("naive", {"scene": str(scene), "out": str(workdir / f"naive_{size}.tif"),
                                                            "batch_size": args.batch_size,
                                                            "threads": geo["settings"]["threads"]}, workdir)
        row = {"area": k * k, "mpx": round(size * size / 1e6, 1), "tiles": geo["tiles"], "driver_peak_mib": peaks["driver"],
               "driver_private_peak_mib": peaks["driver_private"],
               "worker_peak_by_role_mib": peaks["workers"], "naive_peak_mib": naive_peaks["driver"],
               "naive_private_peak_mib": naive_peaks["driver_private"],
               "geoseg_whole_s": round(geo["whole_run_s"], 1), "naive_whole_s": round(naive_wall, 1),
               "driver_private_peak_after_stage_mib": geo["driver_private_peak_after_stage_mib"],
               "loadavg": geo["loadavg_run"][1]}
        results.append(row)
        w = peaks["workers"]
        print(f"{k * k:>4}x {row['mpx']:6.1f} {row['tiles']:6d} {row['driver_peak_mib']:5.0f} ({row['driver_private_peak_mib']:3.0f}) "
              f"{w.get('Predictor', 0):10.0f} {w.get('run_tile', 0):9.0f} "
              f"{row['naive_peak_mib']:5.0f} ({row['naive_private_peak_mib']:3.0f}) "
              f"{row['geoseg_whole_s']:9.1f} {row['naive_whole_s']:8.1f}   "
              + " / ".join(f"{v:.0f}" for v in row["driver_private_peak_after_stage_mib"].values()), flush=True)
        scene.unlink()
    first, last = results[0], results[-1]
    return {"sweep": results,
            "driver_peak_growth_mib": round(last["driver_peak_mib"] - first["driver_peak_mib"], 1),
            "driver_private_peak_growth_mib": round(last["driver_private_peak_mib"] - first["driver_private_peak_mib"], 1),
            "predictor_peak_growth_mib": round(last["worker_peak_by_role_mib"].get("Predictor", 0)
                                               - first["worker_peak_by_role_mib"].get("Predictor", 0), 1),
            "naive_peak_growth_mib": round(last["naive_peak_mib"] - first["naive_peak_mib"], 1)}


def million_tiles(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Plan ~1,000,000 tiles over Europe in EPSG:3035 from header-only granules; seconds and driver memory."""
    lon, lat = ((10.0, 16.0), (46.0, 52.0)) if args.quick else ((-8.0, 28.0), (38.0, 60.0))
    t0 = time.perf_counter()
    n = header_only_scenes(workdir / "granules", lon, lat, (1.4, 0.9))
    made = time.perf_counter() - t0
    r, peaks, wall = in_child("plan", {"scene_dir": str(workdir / "granules"), "run_dir": str(workdir / "plan"),
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
        ("driver MiB", f"after imports {r['rss_after_imports_mib']:.0f}, peak after plan {r['peak_after_plan_mib']:.0f}, "
                       f"after save {r['peak_after_save_mib']:.0f}, after ledger {r['peak_after_ledger_mib']:.0f} "
                       f"(sampled peak {peaks['driver']:.0f})"),
    ])
    return {"million_tiles": {**r, "granule_files_s": round(made, 1), "process_s": round(wall, 1),
                              "driver_peak_mib": peaks["driver"]}}


def _fmt_load(pair: list[list[float]]) -> str:
    return f"{pair[0][0]:.1f}->{pair[1][0]:.1f}"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    for name, text in rows:
        print(f"{name:<13} {text}", flush=True)


def main() -> None:
    """Parse the options, run the chosen sections, print the table and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a few minutes")
    ap.add_argument("--repeat", type=int, default=3, help="end-to-end + model-only pairs; the median efficiency is reported (default 3)")
    ap.add_argument("--size", type=int, help="scene side in px (default 5120 = 26 Mpx; sweep base 2048)")
    ap.add_argument("--batch-size", type=int, help="tiles per forward pass (geoseg's default: 4 on CPU, 64 with --gpu)")
    ap.add_argument("--sweep", action="store_true", help="the memory sweep (1x, 4x, 16x the area) instead of the comparison")
    ap.add_argument("--million-tiles", action="store_true", help="the continental planning figure instead of the comparison")
    ap.add_argument("--ray-address", help="join this Ray cluster instead of a local one")
    ap.add_argument("--gpu", action="store_true", help="inference on GPUs (the cluster must have them)")
    ap.add_argument("--actor-cpus", type=float, help="CPUs (and torch threads) per inference actor (default: geoseg's choice)")
    ap.add_argument("--workdir", type=Path, help="scenes, runs and results (every node must see it on a cluster)")
    ap.add_argument("--run-dir", help="RUN_DIR URL for the end-to-end run (e.g. s3://...; default under --workdir)")
    ap.add_argument("--child", choices=("geoseg", "naive", "plan"), help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch_size = args.batch_size or default_batch_size(args.gpu)
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
    out["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
