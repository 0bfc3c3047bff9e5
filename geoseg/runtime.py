"""The Ray driver: plan once, dispatch tiles to readers and inference actors, retry, record, finish.

Only tile ids and small results travel through the driver; pixels go through the zarr stores. A
driver-managed pool of Ray Core actors is used rather than Ray Data: the tiles already live in zarr
and only ids need to move, and the design notes measured a Ray Core actor pool at 0.5-1.5 ms per
tile on a 2-core machine against 7-10 ms for Ray Data's actor pools.

Tile readers are Ray tasks, each reading a run of neighbouring tiles; the tiles they finish are queued
for the inference actors, so reading and inference overlap. Each actor works on ``prefetch`` calls at
once (reading, predicting, writing) and has one more queued, so it never waits for the driver. Actors
and readers are sized to fit one node (``cluster.py``). A tile whose task fails is retried up to
``max_attempts`` times, then recorded as failed with its error; an actor that dies is replaced once
and its calls are redone. The outputs (mosaic, polygons, report) are always written for the tiles
that finished.
"""

from __future__ import annotations

import heapq
import logging
import os
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from shapely import wkt as shapely_wkt

from geoseg import storage, store
from geoseg.cluster import ActorShape, alive_nodes, connect, cpu_actors, gpu_actors, uses_gpu
from geoseg.config import ExecutionSettings, RunConfig, default_batch_size
from geoseg.errors import ExecutionError, PlanMismatchError
from geoseg.faults import (
    BACKSTOP_GRACE_S,
    NOT_STARTED_S,
    Deadlines,
    backoff_s,
    forget_call,
    is_infrastructure,
    started_calls,
)
from geoseg.infer import Predictor
from geoseg.lease import LEASE_FILE, Lease
from geoseg.lease import acquire as acquire_lease
from geoseg.ledger import Ledger, flush_ledger, load_ledger, save_ledger
from geoseg.masks import make_masks
from geoseg.model.card import ModelCard
from geoseg.model.checkpoint import load_card
from geoseg.mosaic import MosaicResult, mosaic, output_bytes
from geoseg.plan import RunPlan, load_plan, save_plan
from geoseg.planner import make_plan, region_in
from geoseg.polygonise import vectorise
from geoseg.probabilities import write_probabilities
from geoseg.progress import advance, bar
from geoseg.provenance import write_provenance
from geoseg.report import write_views
from geoseg.results import (
    Execution,
    ItemUsed,
    ModelUsed,
    Outputs,
    RunReport,
    RunStatus,
    TileError,
    TileOutcome,
)
from geoseg.scenes import check_unchanged
from geoseg.tile import TileJob, run_tiles

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
GPKG_FILE = "landcover.gpkg"
LEDGER_FLUSH_S = 2.0
BACKSTOP_EVERY_S = 5.0  # how often the driver looks for calls overrunning their deadline (frozen workers)
RUN_PX = 4 * 1024**2  # core pixels per reader task: 4 tiles of 1024 px, 64 of 256 px
REFRESH_S = 5.0  # how often a CPU pool looks for nodes that joined


class Observer:
    """Hooks into a run as it goes, for benchmarks and notebooks: subclass it and override what you need.

    Called on the driver, between its other work: keep them cheap."""

    def tiles_done(self, tile_ids: list[int]) -> None:
        """Tiles whose predictions are completely written."""

    def stage_done(self, stage: str) -> None:
        """A stage ended: "tiles", "mosaic" (the class raster is written) or "vectorise"."""


def run(config: RunConfig, execution: ExecutionSettings, overwrite: bool = False,
        observer: Observer | None = None) -> RunReport:
    """Plan (or reuse the identical plan already in RUN_DIR) and execute a run."""
    t0 = time.perf_counter()
    connect(execution.ray_address)
    use_gpu = uses_gpu(execution)
    execution = replace(execution, use_gpu=use_gpu)  # decided once: the plan's precision and the actors agree
    plan = make_plan(config, use_gpu=use_gpu)
    if _existing_plan(config.out) is None and not _empty_but_lease(config.out):
        raise _not_a_run(config.out)  # checked before a lease is written into a folder that holds no run
    with acquire_lease(config.out) as held:  # one writer per RUN_DIR, from before --overwrite removes anything
        return _run_held(config, execution, overwrite, plan, held, t0, observer)


def _run_held(config: RunConfig, execution: ExecutionSettings, overwrite: bool, plan: RunPlan, held: Lease,
              t0: float, observer: Observer | None) -> RunReport:
    """The rest of :func:`run`, under RUN_DIR's lease: reuse the identical plan there, or replace it, then execute."""
    existing = _existing_plan(config.out)
    if existing is not None and not overwrite:
        if config.precision is None:  # a plan's precision holds for all its runs, whatever hardware they find
            plan = replace(plan, precision=existing.precision)
        if not existing.same_work(plan):
            raise PlanMismatchError(
                f"{config.out} already holds a run with a different plan: pass --overwrite to replace it, "
                f"`geoseg rerun {config.out}` to finish it, or another --out")
        plan = existing
    elif existing is not None:
        storage.remove_run_outputs(config.out)  # geoseg's own files only: a user's others stay
    elif not _empty_but_lease(config.out):
        raise _not_a_run(config.out)
    storage.makedirs(config.out)
    save_plan(config.out, plan)
    return execute(config.out, plan, execution, plan_s=time.perf_counter() - t0, observer=observer, lease=held)


def _not_a_run(run_dir: str) -> PlanMismatchError:
    return PlanMismatchError(f"{run_dir} exists and holds no geoseg run: choose an empty or new --out "
                             "(--overwrite only replaces a geoseg run)")


def _empty_but_lease(run_dir: str) -> bool:
    """Nothing in RUN_DIR but (maybe) its lease."""
    return all(url.rstrip("/").rsplit("/", 1)[-1] == LEASE_FILE for url in storage.list_files(run_dir))


def rerun(run_dir: str, execution: ExecutionSettings, observer: Observer | None = None) -> RunReport:
    """Process only the tiles not done (failed or never finished), re-reading the scenes, then rebuild outputs.

    The plan's precision is kept whatever the hardware, so the rerun's tiles match the first run's."""
    t0 = time.perf_counter()
    plan = load_plan(run_dir)
    _check_scenes(plan)
    return execute(run_dir, plan, execution, plan_s=time.perf_counter() - t0, observer=observer)


def _check_scenes(plan: RunPlan) -> None:
    """Every scene's header against the plan's, before any tile runs: a scene whose grid, bands or dtype changed is
    refused (``SceneChangedError``); one repaired in place is re-read by the tiles still to do."""
    for item in plan.items:
        checked = (*item.sources, *((item.mask,) if item.mask and item.mask_kind == "scl" else ()))
        for source in checked:
            if check_unchanged(source.scene):
                log.warning("scene %s changed since the run was planned, with the same grid, bands and dtype: the "
                            "tiles still to do read it as it is now", source.scene.url)


def status(run_dir: str) -> RunStatus:
    """Tiles done / failed / pending, with the outcome of each failed tile."""
    plan = load_plan(run_dir)
    ledger = load_ledger(run_dir, plan.tile_count)
    return RunStatus(tiles_total=plan.tile_count, tiles_done=len(ledger.done), tiles_failed=len(ledger.failed),
                     tiles_pending=ledger.pending_count(), failed_tiles=_failed(ledger))


def load_report(run_dir: str) -> RunReport:
    """The report a finished run wrote."""
    return RunReport.from_json(storage.read_bytes(storage.join(run_dir, REPORT_FILE)).decode())


def _existing_plan(run_dir: str) -> RunPlan | None:
    try:
        return load_plan(run_dir)
    except FileNotFoundError:
        return None


def _failed(ledger: Ledger) -> tuple[TileOutcome, ...]:
    return tuple(outcome for _, outcome in sorted(ledger.failed.items()))


def execute(run_dir: str, plan: RunPlan, execution: ExecutionSettings, plan_s: float = 0.0,
            observer: Observer | None = None, lease: Lease | None = None) -> RunReport:
    """Run every tile not yet done, then mosaic, vectorise and report, holding RUN_DIR's ``lease`` (taken here
    when not given: a rerun, or a caller of its own)."""
    if lease is None:
        with acquire_lease(run_dir) as held:
            return execute(run_dir, plan, execution, plan_s, observer, held)
    t_start = time.perf_counter()
    observer = observer or Observer()
    card = load_card(plan.model)
    ledger = load_ledger(run_dir, plan.tile_count)
    ledger.execution_id = lease.execution_id
    store.create(run_dir, plan.grid, plan.tiles, card.bands, card.input_dtype,
                 len(card.classes) if plan.probabilities else 0)
    connect(execution.ray_address)
    todo = ledger.not_done()
    ledger.failed.clear()  # every tile not done is tried again
    save_ledger(run_dir, ledger)
    t0 = time.perf_counter()
    if todo:
        make_masks(run_dir, plan, card)  # the cloud model's masks, for items without SCL, before their tiles
    t_clouds = time.perf_counter() - t0

    t0 = time.perf_counter()
    settings: Execution | None = None
    if todo:
        dispatcher = _Dispatcher(run_dir, plan, card, ledger, execution, observer, lease)
        try:
            settings = dispatcher.run(todo)
        except ExecutionError as exc:  # the cluster or store keeps failing: say so in report.json, then stop
            _report_stopped(run_dir, plan, ledger, len(todo), plan_s + time.perf_counter() - t_start, exc)
            if lease.lost is None:  # report.html maps the ledger: saved up to now first
                flush_ledger(run_dir, ledger)
                write_views(run_dir)
            raise
        finally:
            if lease.lost is None:  # a driver whose lease was taken over leaves the ledger to the new holder
                save_ledger(run_dir, ledger)
    t_tiles = time.perf_counter() - t0
    observer.stage_done("tiles")

    t0 = time.perf_counter()
    lease.check()  # outputs are published only by the driver that still holds RUN_DIR
    _check_space(run_dir, plan)
    tags = {"GEOSEG_RUN_ID": plan.run_id, "GEOSEG_MODEL": f"{plan.model_name} {plan.model_version}"}
    task = {"num_cpus": 1, "runtime_env": {"env_vars": storage.task_env()}}
    provenance = ray.remote(write_provenance).options(**task).remote(run_dir, plan.grid, plan.composite, tags)
    probabilities = (ray.remote(write_probabilities).options(**task).remote(run_dir, plan.grid, card, tags)
                     if plan.probabilities else None)
    rasters = mosaic(run_dir, plan.grid, card, tags, progress=execution.progress)
    provenance_file: str = ray.get(provenance)  # beside the mosaic's tasks: one COG copy of the store's raster
    probabilities_file: str | None = None if probabilities is None else ray.get(probabilities)  # likewise
    t_mosaic = time.perf_counter() - t0
    observer.stage_done("mosaic")

    t0 = time.perf_counter()
    areas = _vectorise(run_dir, plan, card, rasters, execution.progress)
    t_vector = time.perf_counter() - t0
    observer.stage_done("vectorise")

    names = {c.id: c.name for c in card.classes}
    warnings = plan.warnings
    if not rasters.counts and len(ledger.done) == plan.tile_count:
        msg = (f"the region holds no valid pixel: all {plan.tile_count} tiles are done, but every pixel is outside "
               "the scenes or masked (nodata tag, alpha, or zero in every band of a reflectance scene), so "
               "classes.tif is all nodata and the GeoPackage empty; check the region and scenes")
        log.warning(msg)
        warnings = (*warnings, msg)
    report = RunReport(
        run_id=plan.run_id,
        model=ModelUsed(plan.model_name, plan.model_version, plan.model),
        tiles_total=plan.tile_count,
        tiles_done=len(ledger.done),
        tiles_failed=len(ledger.failed),
        tiles_processed=len(todo),
        failed_tiles=_failed(ledger),
        class_area_m2=areas,
        class_pixel_area_m2={names[k]: plan.grid.area_m2(v) for k, v in sorted(rasters.counts.items())},
        stage_s={"plan": round(plan_s, 3), "clouds": round(t_clouds, 3), "tile_and_infer": round(t_tiles, 3),
                 "mosaic": round(t_mosaic, 3), "vectorise": round(t_vector, 3),
                 "total": round(plan_s + time.perf_counter() - t_start, 3)},
        tiles_per_s=round(len(todo) / t_tiles, 3) if todo and t_tiles > 0 else None,
        execution=settings,
        warnings=warnings,
        outputs=Outputs(classes=rasters.classes, confidence=rasters.confidence, polygons=GPKG_FILE,
                        tiles_store=store.TILES, predictions_store=store.PREDICTIONS, provenance=provenance_file,
                        margin=rasters.margin, probabilities=probabilities_file),
        composite=plan.composite,
        items=_items_used(plan),
    )
    lease.check()
    storage.write_bytes(storage.join(run_dir, REPORT_FILE), report.to_json().encode())
    write_views(run_dir)  # report.html and quicklook.png
    return report


def _items_used(plan: RunPlan) -> tuple[ItemUsed, ...]:
    return tuple(ItemUsed(i.id, i.datetime, i.cloud_cover, i.offset, i.mask_kind, i.href,
                          tuple(s.scene.url for s in i.sources)) for i in plan.items)


def _report_stopped(run_dir: str, plan: RunPlan, ledger: Ledger, processed: int, seconds: float,
                    exc: ExecutionError) -> None:
    """The report of a run that stopped before its outputs: what is done and failed, and why it stopped."""
    report = RunReport(
        run_id=plan.run_id, model=ModelUsed(plan.model_name, plan.model_version, plan.model),
        tiles_total=plan.tile_count, tiles_done=len(ledger.done), tiles_failed=len(ledger.failed),
        tiles_processed=processed, failed_tiles=_failed(ledger), class_area_m2={}, class_pixel_area_m2={},
        stage_s={"total": round(seconds, 3)}, tiles_per_s=None, execution=None, warnings=plan.warnings,
        outputs=None, error=f"{type(exc).__name__}: {exc}", composite=plan.composite, items=_items_used(plan))
    storage.write_bytes(storage.join(run_dir, REPORT_FILE), report.to_json().encode())


GPKG_BYTES_PER_PX = 1.0  # an estimate of the GeoPackage's size per grid pixel, for the free-space check


def gpkg_bytes(plan: RunPlan) -> int:
    """The GeoPackage's estimated size, from the grid's size, checked against the free space before it is built."""
    return int(plan.grid.width * plan.grid.height * GPKG_BYTES_PER_PX) + 2**20


def _check_space(run_dir: str, plan: RunPlan) -> None:
    """Refuse, before the mosaic, outputs the local disks cannot hold: the rasters and the GeoPackage in a local
    RUN_DIR (each built beside its target), or the GeoPackage in the local temp dir for a store's RUN_DIR."""
    if storage.is_remote(run_dir):
        storage.check_free_space(tempfile.gettempdir(), gpkg_bytes(plan), "building the GeoPackage")
    else:
        storage.check_free_space(run_dir, output_bytes(plan.grid) + gpkg_bytes(plan), "the mosaic and GeoPackage")


def _vectorise(run_dir: str, plan: RunPlan, card: ModelCard, rasters: MosaicResult, progress: bool
               ) -> dict[str, float]:
    """Polygonise the class raster (classes.tif or classes.vrt) into landcover.gpkg, published whole: built beside
    the target and renamed over it in a local RUN_DIR, built in the local temp dir and uploaded for a store's."""
    v = plan.vectorise
    with tempfile.TemporaryDirectory(prefix="geoseg-gpkg-") as tmp:
        target = storage.join(run_dir, GPKG_FILE)
        local = os.path.join(tmp, GPKG_FILE) if storage.is_remote(run_dir) else target
        areas = vectorise(
            storage.join(run_dir, rasters.classes), local, {c.id: c.name for c in card.classes},
            confidence_path=storage.join(run_dir, rasters.confidence), block_size=v.block_size,
            connectivity=v.connectivity, min_area_m2=v.min_area_m2, simplify_m=v.simplify_m,
            metadata={"run_id": plan.run_id, "model_name": plan.model_name, "model_version": plan.model_version},
            progress=progress,
        )
        if local != target:
            storage.put_file(local, target)
    return areas


def _region_in_grid(plan: RunPlan) -> str | None:
    if plan.region_wkt is None:
        return None
    return str(region_in(shapely_wkt.loads(plan.region_wkt), plan.grid.crs).wkt)


@dataclass
class _Actor:
    """One inference actor of the pool: its shape, its handle and its calls in flight."""

    key: int
    shape: ActorShape
    handle: Any  # a Ray actor handle (untyped in Ray)
    ready: Any  # the ref of its first call, __ray_ready__: resolved once its model is loaded
    in_flight: int = 0

    def started(self) -> bool:
        """Whether it got past loading its model (a death after that says nothing about whether it can start)."""
        done, _ = ray.wait([self.ready], timeout=0)
        if not done:
            return False
        try:
            ray.get(done[0])
        except RayError:
            return False
        return True


class _Dispatcher:
    """Feeds runs of neighbouring tiles through reader tasks and actors, keeping both busy and the ledger current.

    Per run of tiles the driver handles one reader task and one actor call, so its own cost per tile falls
    with the run length. CPU actors follow the nodes: a node that joins (an autoscaler started it) gets one.
    """

    def __init__(self, run_dir: str, plan: RunPlan, card: ModelCard, ledger: Ledger,
                 execution: ExecutionSettings, observer: Observer, lease: Lease) -> None:
        self.run_dir, self.plan, self.ledger, self.ex, self.observer = run_dir, plan, ledger, execution, observer
        self.lease = lease
        self.use_gpu = uses_gpu(execution)
        self.batch_size = execution.batch_size or default_batch_size(self.use_gpu, plan.grid.input_size)
        batches = -(-plan.tile_count // self.batch_size)
        shapes = gpu_actors(execution, batches) if self.use_gpu else cpu_actors(execution, alive_nodes())
        self.tiles_ref = ray.put(plan.tiles)
        self.job_ref = ray.put(TileJob(run_dir, plan.run_id, uuid.uuid4().hex, plan.grid, plan.items,
                                       plan.composite, _region_in_grid(plan), card.input_dtype, len(card.bands),
                                       card.zero_is_nodata, round(plan.mask_buffer_m / plan.grid.res)))
        self.tile_remote = ray.remote(run_tiles).options(
            num_cpus=execution.tile_cpus, max_retries=0,
            runtime_env={"env_vars": storage.task_env()})
        self.actor_class = ray.remote(Predictor)
        self.actors: dict[int, _Actor] = {}
        self.started = 0
        for shape in shapes:
            self._start(shape)
        self.last_refresh = time.monotonic()
        self.run_len = max(1, RUN_PX // plan.grid.tile_size**2)
        self.call_tiles = self.batch_size * max(1, self.run_len // self.batch_size)
        self.first = shapes[0] if shapes else None
        self.initial_actors = len(shapes)
        self.nodes: dict[str, set[str]] = {"tile": set(), "infer": set()}
        self.replacements = 0
        self.attempts: dict[int, int] = {}  # the tile's own failures
        self.infra: dict[int, int] = {}  # infrastructure faults met by each tile (never charged to it)
        self.infra_total = 0
        self.waiting: list[tuple[float, int, str]] = []  # heap of (due, tile id, stage): backoff after a fault
        self.fresh: set[int] = set()  # tiles to read with their scenes opened afresh (after an error of their own)
        self.deadlines = Deadlines(execution.deadline_s)
        self.submitted: dict[Any, tuple[float, float]] = {}  # each call in flight: when submitted, its deadline
        self.backstopped: set[Any] = set()  # calls the driver ended (frozen workers), until their error arrives
        self.last_backstop = time.monotonic()
        self.progress = bar(plan.tile_count, "tiles", "tile", execution.progress)

    def _start(self, shape: ActorShape) -> None:
        env = {**storage.forwarded_env(), "OMP_NUM_THREADS": str(shape.threads)}
        options: dict[str, Any] = {"num_cpus": shape.num_cpus, "num_gpus": shape.num_gpus, "max_restarts": 0,
                                   "max_concurrency": self.ex.prefetch, "runtime_env": {"env_vars": env}}
        if shape.node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(shape.node_id, soft=True)
        handle = self.actor_class.options(**options).remote(
            self.plan.model, self.run_dir, self.plan.grid, self.tiles_ref, self.batch_size, self.plan.precision,
            shape.device, shape.threads, self.plan.tta, self.plan.probabilities)
        ready = handle.__ray_ready__.remote()  # type: ignore[union-attr]  # Ray's stub misses actor built-ins
        self.actors[self.started] = _Actor(self.started, shape, handle, ready)
        self.started += 1

    def _refresh(self) -> None:
        """Give every node that joined since the start (and offers CPUs) its CPU actor, every few seconds."""
        if self.use_gpu or self.ex.actors or time.monotonic() - self.last_refresh < REFRESH_S:
            return
        self.last_refresh = time.monotonic()
        served = {a.shape.node_id for a in self.actors.values()}
        for shape in cpu_actors(self.ex, [n for n in alive_nodes() if n.node_id not in served]):
            log.info("node %s joined: starting an inference actor of %g CPUs on it", shape.node_id, shape.num_cpus)
            self._start(shape)

    def _fault(self, tile_id: int, stage: str, error: TileError, retry: deque[int], infra: bool = False,
               counted: bool = True) -> None:
        """A tile that did not get through ``stage``: retried after backoff when the fault is the infrastructure's
        (never charged to the tile; the run's budget is, once per fault: the tiles of one failed task or call
        after the first are not ``counted``), else charged to the tile (``faults.py``)."""
        if not (infra or is_infrastructure(error)):
            self._failed_attempt(tile_id, stage, error, retry)
            return
        self.infra_total += counted
        if self.infra_total > self.ex.infra_retries:
            raise ExecutionError(
                f"{self.infra_total} infrastructure faults in this run (last: tile {tile_id} in {stage}: "
                f"{error.error_type}: {error.message}): more than infra_retries={self.ex.infra_retries}; the tiles "
                "done so far are kept: fix the cluster or the store, then `geoseg rerun`")
        self.infra[tile_id] = self.infra.get(tile_id, 0) + 1
        log.info("tile %d: %s in %s, retried in %.0f s", tile_id, error.error_type, stage,
                 backoff_s(self.infra[tile_id]))
        heapq.heappush(self.waiting, (time.monotonic() + backoff_s(self.infra[tile_id]), tile_id, stage))

    def _due(self, retry_read: deque[int], to_infer: deque[int]) -> None:
        """Move the tiles whose backoff is over back to their stage's queue."""
        now = time.monotonic()
        while self.waiting and self.waiting[0][0] <= now:
            _, tile_id, stage = heapq.heappop(self.waiting)
            (retry_read if stage == "tile" else to_infer).append(tile_id)

    def _failed_attempt(self, tile_id: int, stage: str, error: TileError, retry: deque[int]) -> None:
        self.attempts[tile_id] = self.attempts.get(tile_id, 0) + 1
        if self.attempts[tile_id] < self.ex.max_attempts:
            self.fresh.add(tile_id)
            retry.append(tile_id)
        else:
            log.info("tile %d failed in %s: %s: %s", tile_id, stage, error.error_type, error.message)
            row, col = (int(v) for v in self.plan.tiles[tile_id])
            self.ledger.mark_failed(TileOutcome(tile_id, row, col, stage, error.error_type, error.message,
                                                self.attempts[tile_id]))

    def run(self, todo: list[int]) -> Execution:
        """Process ``todo`` tile ids until each is done or failed for good; how the work was spread. The actors
        are ended on every exit path: a run stopped by an ``ExecutionError`` must not leave them holding CPUs."""
        try:
            return self._run(todo)
        finally:
            for actor in self.actors.values():
                ray.kill(actor.handle)

    def _run(self, todo: list[int]) -> Execution:
        runs = _runs(todo, self.run_len)
        retry_read: deque[int] = deque()
        to_infer: deque[int] = deque()
        reading: dict[Any, list[int]] = {}
        inferring: dict[Any, tuple[_Actor, list[int]]] = {}
        last_flush = time.monotonic()
        tiles = self.plan.tiles
        while runs or retry_read or to_infer or reading or inferring or self.waiting:
            self.lease.check()  # another driver took RUN_DIR over (this one's renewals failed): stop at once
            self._refresh()
            self._due(retry_read, to_infer)
            runs.extend([retry_read.popleft()] for _ in range(len(retry_read)))
            max_reading = max(1, sum(a.shape.readers for a in self.actors.values()))
            max_ready = 2 * self.call_tiles * max(1, len(self.actors))
            while runs and len(reading) < max_reading and len(to_infer) < max_ready:
                ids = runs.popleft()
                work = [(i, int(tiles[i, 0]), int(tiles[i, 1])) for i in ids]
                fresh = bool(self.fresh.intersection(ids))
                self.fresh.difference_update(ids)
                deadline = self.deadlines.seconds("tile", len(ids))
                ref = self.tile_remote.remote(self.job_ref, work, fresh, deadline)
                reading[ref] = ids
                self.submitted[ref] = (time.monotonic(), deadline)
            last_tiles = not runs and not reading
            for actor in self.actors.values():
                # a full call, or whatever is ready for an idle actor (or at the end): calls grow while it is busy
                while actor.in_flight <= self.ex.prefetch and (len(to_infer) >= self.call_tiles or (
                        to_infer and (last_tiles or actor.in_flight == 0))):
                    ids = [to_infer.popleft() for _ in range(min(self.call_tiles, len(to_infer)))]
                    deadline = self.deadlines.seconds("infer", len(ids))
                    ref = actor.handle.__call__.remote(ids, deadline)
                    inferring[ref] = (actor, ids)
                    self.submitted[ref] = (time.monotonic(), deadline)
                    actor.in_flight += 1
            self._backstop(reading, inferring)
            refs = [*reading, *inferring]
            wait_s = min(1.0, max(0.0, self.waiting[0][0] - time.monotonic())) if self.waiting else 1.0
            if not refs:
                time.sleep(wait_s)  # only tiles in backoff
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                if ref in reading:
                    self._read_done(ref, reading.pop(ref), to_infer, retry_read)
                else:
                    actor, ids = inferring.pop(ref)
                    self._infer_done(ref, actor, ids, to_infer)
            advance(self.progress, len(self.ledger.done) + len(self.ledger.failed), f"{len(self.ledger.failed)} failed")
            if time.monotonic() - last_flush > LEDGER_FLUSH_S:
                flush_ledger(self.run_dir, self.ledger)
                last_flush = time.monotonic()
        advance(self.progress, len(self.ledger.done) + len(self.ledger.failed), f"{len(self.ledger.failed)} failed")
        self.progress.close()
        actors = len(self.actors)
        first = self.first
        return Execution(
            actors=actors, actor_cpus=first.num_cpus if first else None, threads=first.threads if first else None,
            use_gpu=self.use_gpu, device=first.device if first else None, precision=self.plan.precision,
            batch_size=self.batch_size, prefetch=self.ex.prefetch, tile_cpus=self.ex.tile_cpus,
            readers_per_actor=first.readers if first else None, tiles_per_read=self.run_len,
            tiles_per_call=self.call_tiles, nodes={role: sorted(ids) for role, ids in self.nodes.items()},
            infra_retries=self.infra_total, tile_attempts_failed=sum(self.attempts.values()))

    def _backstop(self, reading: dict[Any, list[int]], inferring: dict[Any, tuple[_Actor, list[int]]]) -> None:
        """End the calls whose workers did not end themselves at their deadline (a frozen process runs no alarm
        or watchdog), every ``BACKSTOP_EVERY_S``: a reader task is cancelled by force, an actor killed. Their
        errors then come back as infrastructure faults. Counted from the call's own start record (``faults``)."""
        now = time.monotonic()
        if now - self.last_backstop < BACKSTOP_EVERY_S:
            return
        self.last_backstop = now
        late = [ref for ref, (t, deadline) in self.submitted.items()
                if now - t > deadline + BACKSTOP_GRACE_S and ref not in self.backstopped]
        if not late:
            return
        running, wall = started_calls(), time.time()
        for ref in late:
            task_id = ref.task_id().hex()
            record = running.get(task_id)
            submitted, deadline = self.submitted[ref]
            if record is None and now - submitted < NOT_STARTED_S:
                continue  # not started yet: waiting for a worker or a node
            if record is not None and wall - record.at < deadline + BACKSTOP_GRACE_S:
                continue
            where = f"pid {record.pid} on node {record.node_id}" if record else "never started"
            self.backstopped.add(ref)
            forget_call(task_id)
            if ref in reading:
                log.warning("a tile reader (%s) overran its deadline of %.0f s and did not end: cancelling it",
                            where, deadline)
                ray.cancel(ref, force=True)
            else:
                actor = inferring[ref][0]
                log.warning("inference actor %d (%s) overran its deadline of %.0f s and did not end: killing it",
                            actor.key, where, deadline)
                ray.kill(actor.handle)

    def _read_done(self, ref: Any, ids: list[int], to_infer: deque[int], retry: deque[int]) -> None:
        submitted, _ = self.submitted.pop(ref)
        self.backstopped.discard(ref)
        try:
            node, results = ray.get(ref)
        except RayError as exc:  # the task's worker or node died: the infrastructure's fault, for every tile
            for k, i in enumerate(ids):
                self._fault(i, "tile", TileError.of(exc), retry, infra=True, counted=k == 0)
            return
        self.nodes["tile"].add(node)
        self.deadlines.record("tile", time.monotonic() - submitted, len(ids))
        for i, err in results:
            if err is None:
                to_infer.append(i)
            else:
                self._fault(i, "tile", err, retry)

    def _infer_done(self, ref: Any, actor: _Actor, ids: list[int], to_infer: deque[int]) -> None:
        actor.in_flight -= 1
        submitted, _ = self.submitted.pop(ref)
        self.backstopped.discard(ref)
        try:
            node, results = ray.get(ref)
        except RayError as exc:  # the actor (or its node) died: the infrastructure's fault
            if isinstance(exc, RayActorError):
                self._replace(actor, exc)
            died = TileError.of(exc)
            for k, i in enumerate(ids):
                self._fault(i, "infer", replace(died, message=f"inference actor died: {died.message}"), to_infer,
                            infra=True, counted=k == 0)
            return
        self.nodes["infer"].add(node)
        self.replacements = 0  # an actor finished a call: the pool is healthy, deaths so far were passing faults
        self.deadlines.record("infer", time.monotonic() - submitted, len(ids))
        done = [i for i, err in results if err is None]
        for i in done:
            self.ledger.mark_done(i)
        self.observer.tiles_done(done)
        for i, err in results:
            if err is not None:
                self._fault(i, "infer", err, to_infer)

    def _replace(self, actor: _Actor, exc: Exception) -> None:
        """Replace a dead actor once (its other calls in flight fail too and must not replace it again);
        a CPU actor whose node left is not replaced (the node's readers left with it)."""
        if self.actors.get(actor.key) is not actor:
            return
        del self.actors[actor.key]
        ray.kill(actor.handle)  # a hung or half-dead actor must not hold its CPUs or GPU
        if actor.shape.node_id is not None and actor.shape.node_id not in {n.node_id for n in alive_nodes()}:
            log.warning("node %s left with inference actor %d", actor.shape.node_id, actor.key)
            return
        # an actor that loaded its model and was then killed is a passing fault (retried within infra_retries);
        # only deaths before that, in a row, say the actors cannot start (a bad model, too little memory)
        self.replacements = 0 if actor.started() else self.replacements + 1
        if self.replacements > 3 * self.initial_actors + 3:
            raise ExecutionError(f"inference actors keep dying before they can work ({self.replacements} in a row "
                                 f"died while starting); last error: {exc}; "
                                 "the tiles done so far are kept: fix the cause, then `geoseg rerun`") from exc
        log.warning("inference actor %d died (%s); starting a replacement", actor.key, type(exc).__name__)
        self._start(actor.shape)


def _runs(todo: list[int], run_len: int) -> deque[list[int]]:
    """Consecutive tile ids (row-major neighbours) in runs growing 1, 2, 4 ... to ``run_len``: the first
    tiles reach the actors at once, the rest in runs long enough to make the driver's cost per tile small."""
    runs: deque[list[int]] = deque()
    k, n = 0, 1
    while k < len(todo):
        runs.append(todo[k:k + n])
        k, n = k + n, min(2 * n, run_len)
    return runs
