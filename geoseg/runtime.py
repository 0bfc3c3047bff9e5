"""The Ray driver: plan once, dispatch tiles to readers and inference actors, retry, record, finish.

Only tile ids and small results travel through the driver; pixels go through the zarr stores. A
driver-managed pool of Ray Core actors is used rather than Ray Data: the tiles already live in zarr
and only ids need to move, and the design notes measured a Ray Core actor pool at 0.5-1.5 ms per
tile on a 2-core machine against 7-10 ms for Ray Data's actor pools.

Tile readers are Ray tasks; each finished tile is queued for the inference actors, so reading and
inference overlap. Each actor works on ``prefetch`` batches at once (reading, predicting, writing)
and has one more queued, so it never waits for the driver. A tile
whose task fails is retried up to ``max_attempts`` times, then recorded as failed with its error;
an actor that dies is replaced and its batch is redone. The outputs (mosaic, polygons, report)
are always written for the tiles that finished.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError
from shapely import wkt as shapely_wkt

from geoseg import storage, store
from geoseg.config import ExecutionSettings, RunConfig, default_batch_size
from geoseg.errors import ConfigError, PlanMismatchError
from geoseg.infer import Predictor
from geoseg.ledger import Failure, Ledger, load_ledger, save_ledger
from geoseg.model.card import ModelCard
from geoseg.model.checkpoint import load_card
from geoseg.mosaic import CLASSES_TIF, CONFIDENCE_TIF, mosaic
from geoseg.plan import RunPlan, load_plan, make_plan, region_in, save_plan
from geoseg.tile import GDAL_CACHE_MB, TileJob, run_tile
from geoseg.vectorise import vectorise

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_TILES_FAILED = 3
REPORT_FILE = "report.json"
GPKG_FILE = "landcover.gpkg"
LEDGER_FLUSH_S = 2.0


@dataclass(frozen=True)
class RunResult:
    """What a run leaves: its report (also in RUN_DIR/report.json) and the process exit status."""

    report: dict[str, Any]
    exit_code: int


def run(config: RunConfig, execution: ExecutionSettings, overwrite: bool = False) -> RunResult:
    """Plan (or reuse the identical plan already in RUN_DIR) and execute a run."""
    t0 = time.perf_counter()
    if config.batch_size is None:
        connect(execution.ray_address)
        config = replace(config, batch_size=batch_size_for(execution))
    plan = make_plan(config)
    existing = _existing_plan(config.out)
    if existing is not None and not overwrite:
        if not existing.same_work(plan):
            raise PlanMismatchError(
                f"{config.out} already holds a run with a different plan: pass --overwrite to replace it, "
                f"`geoseg rerun {config.out}` to finish it, or another --out")
        plan = existing
    elif existing is not None:
        storage.remove(config.out)
    elif not storage.is_empty(config.out):
        raise PlanMismatchError(f"{config.out} exists and holds no geoseg run: choose an empty or new --out "
                                "(--overwrite only replaces a geoseg run)")
    storage.makedirs(config.out)
    save_plan(config.out, plan)
    return execute(config.out, plan, execution, plan_s=time.perf_counter() - t0)


def rerun(run_dir: str, execution: ExecutionSettings) -> RunResult:
    """Process only the tiles not done (failed or never finished), re-reading the scenes, then rebuild outputs."""
    t0 = time.perf_counter()
    plan = load_plan(run_dir)
    return execute(run_dir, plan, execution, plan_s=time.perf_counter() - t0)


def status(run_dir: str) -> dict[str, Any]:
    """Tiles done / failed / pending, with the error of each failed tile."""
    plan = load_plan(run_dir)
    ledger = load_ledger(run_dir, plan.tile_count)
    return {
        "tiles_total": plan.tile_count,
        "tiles_done": len(ledger.done),
        "tiles_failed": len(ledger.failed),
        "tiles_pending": ledger.pending_count(),
        "failed_tiles": _failed_list(plan, ledger),
    }


def _existing_plan(run_dir: str) -> RunPlan | None:
    try:
        return load_plan(run_dir)
    except FileNotFoundError:
        return None


def _failed_list(plan: RunPlan, ledger: Ledger) -> list[dict[str, Any]]:
    return [{"id": i, "row": int(plan.tiles[i, 0]), "col": int(plan.tiles[i, 1]), "stage": f.stage,
             "error": f.error, "attempts": f.attempts} for i, f in sorted(ledger.failed.items())]


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local Ray; forwards store credentials to workers."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": storage.forwarded_env()}
    if address is None and "RAY_ADDRESS" not in os.environ:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)


def uses_gpu(execution: ExecutionSettings) -> bool:
    """Whether inference runs on GPUs: as asked, else when the connected cluster has any."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if execution.use_gpu and gpus == 0:
        raise ConfigError("use_gpu is set but the Ray cluster has no GPUs: drop it or add GPU workers")
    return gpus > 0 if execution.use_gpu is None else execution.use_gpu


def batch_size_for(execution: ExecutionSettings) -> int:
    """The default batch for the inference device the connected cluster will use."""
    return default_batch_size(uses_gpu(execution))


def execute(run_dir: str, plan: RunPlan, execution: ExecutionSettings, plan_s: float = 0.0) -> RunResult:
    """Run every tile not yet done, then mosaic, vectorise and report."""
    t_start = time.perf_counter()
    card = load_card(plan.model)
    ledger = load_ledger(run_dir, plan.tile_count)
    store.create(run_dir, plan.grid, plan.tiles, card.bands, card.input_dtype)
    connect(execution.ray_address)
    todo = ledger.not_done()
    ledger.failed.clear()  # every tile not done is tried again
    save_ledger(run_dir, ledger)

    t0 = time.perf_counter()
    settings: dict[str, Any] = {}
    if todo:
        dispatcher = _Dispatcher(run_dir, plan, card, ledger, execution)
        settings = dispatcher.settings
        dispatcher.run(todo)
    t_tiles = time.perf_counter() - t0
    save_ledger(run_dir, ledger)

    t0 = time.perf_counter()
    tags = {"GEOSEG_RUN_ID": plan.run_id, "GEOSEG_MODEL": f"{plan.model_name} {plan.model_version}"}
    pixels = mosaic(run_dir, plan.grid, card, tags)
    t_mosaic = time.perf_counter() - t0

    t0 = time.perf_counter()
    areas = _vectorise(run_dir, plan, card)
    t_vector = time.perf_counter() - t0

    names = {c.id: c.name for c in card.classes}
    report = {
        "run_id": plan.run_id,
        "model": {"name": plan.model_name, "version": plan.model_version, "source": plan.model},
        "tiles_total": plan.tile_count,
        "tiles_done": len(ledger.done),
        "tiles_failed": len(ledger.failed),
        "tiles_processed": len(todo),
        "failed_tiles": _failed_list(plan, ledger),
        "class_area_m2": areas,
        "class_pixel_area_m2": {names[k]: plan.grid.area_m2(v) for k, v in sorted(pixels.items())},
        "stage_s": {"plan": round(plan_s, 3), "tile_and_infer": round(t_tiles, 3), "mosaic": round(t_mosaic, 3),
                    "vectorise": round(t_vector, 3), "total": round(plan_s + time.perf_counter() - t_start, 3)},
        "tiles_per_s": round(len(todo) / t_tiles, 3) if todo and t_tiles > 0 else None,
        "execution": settings,
        "warnings": list(plan.warnings),
        "outputs": {"classes": CLASSES_TIF, "confidence": CONFIDENCE_TIF, "polygons": GPKG_FILE,
                    "tiles_store": store.TILES, "predictions_store": store.PREDICTIONS},
    }
    storage.write_bytes(storage.join(run_dir, REPORT_FILE), json.dumps(report, indent=2).encode())
    return RunResult(report, EXIT_OK if not ledger.failed else EXIT_TILES_FAILED)


def _vectorise(run_dir: str, plan: RunPlan, card: ModelCard) -> dict[str, float]:
    """Polygonise classes.tif into landcover.gpkg (built locally, then published whole)."""
    v = plan.vectorise
    with tempfile.TemporaryDirectory(prefix="geoseg-gpkg-") as tmp:
        local = os.path.join(tmp, GPKG_FILE)
        areas = vectorise(
            storage.join(run_dir, CLASSES_TIF), local, {c.id: c.name for c in card.classes},
            confidence_path=storage.join(run_dir, CONFIDENCE_TIF), block_size=v.block_size,
            connectivity=v.connectivity, min_area_m2=v.min_area_m2, simplify_m=v.simplify_m,
            metadata={"run_id": plan.run_id, "model_name": plan.model_name, "model_version": plan.model_version},
        )
        storage.put_file(local, storage.join(run_dir, GPKG_FILE))
    return areas


def _region_in_grid(plan: RunPlan) -> str | None:
    if plan.region_wkt is None:
        return None
    return region_in(shapely_wkt.loads(plan.region_wkt), plan.grid.crs).wkt


class _Dispatcher:
    """Feeds tiles through readers and actors, keeping both busy and the ledger current."""

    def __init__(self, run_dir: str, plan: RunPlan, card: ModelCard, ledger: Ledger,
                 execution: ExecutionSettings) -> None:
        self.run_dir, self.plan, self.ledger, self.ex = run_dir, plan, ledger, execution
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.use_gpu = uses_gpu(execution)
        n_actors = execution.actors or (gpus if self.use_gpu else 1)
        cpus = float(resources.get("CPU", 1))
        actor_cpus = execution.actor_cpus or (1.0 if self.use_gpu else max(1.0, cpus / n_actors - 2 * execution.tile_cpus))
        if n_actors * actor_cpus + execution.tile_cpus > cpus:
            raise ConfigError(f"{n_actors} inference actor(s) of {actor_cpus:g} CPUs leave no room for a tile reader of "
                              f"{execution.tile_cpus:g} CPUs on a cluster of {cpus:g} CPUs: lower actors or actor_cpus")
        self.threads = max(1, int(actor_cpus))
        # one tile task in flight per spare CPU: more only adds worker processes, which Ray kills when idle
        # beyond one per CPU and restarts later (seen as 64 workers for 16 CPUs on a GPU node)
        spare = max(cpus - n_actors * actor_cpus, 1.0) / n_actors
        self.readers = execution.readers_per_actor or (max(1, int(spare)) if self.use_gpu else 1)
        runtime_env = {"env_vars": storage.forwarded_env()}
        self.actor_options = {"num_cpus": actor_cpus, "num_gpus": 1 if self.use_gpu else 0, "max_restarts": 0,
                              "max_concurrency": execution.prefetch,
                              "runtime_env": {"env_vars": {**runtime_env["env_vars"],
                                                           "OMP_NUM_THREADS": str(self.threads)}}}
        self.tiles_ref = ray.put(plan.tiles)
        self.job_ref = ray.put(TileJob(run_dir, plan.run_id, uuid.uuid4().hex, plan.grid, plan.scenes,
                                       _region_in_grid(plan), card.input_dtype, len(card.bands)))
        self.tile_remote = ray.remote(run_tile).options(
            num_cpus=execution.tile_cpus, max_retries=0,
            runtime_env={"env_vars": {**runtime_env["env_vars"], "GDAL_CACHEMAX": str(GDAL_CACHE_MB)}})
        self.actor_class = ray.remote(Predictor)
        self.actors = [self._new_actor() for _ in range(n_actors)]
        self.settings = {"actors": n_actors, "actor_cpus": actor_cpus, "threads": self.threads,
                         "use_gpu": self.use_gpu, "batch_size": plan.batch_size, "prefetch": execution.prefetch,
                         "tile_cpus": execution.tile_cpus, "readers_per_actor": self.readers}
        self.replacements = 0
        self.attempts: dict[int, int] = {}
        self.progress = _Progress(plan.tile_count, execution.progress)

    def _new_actor(self) -> Any:
        return self.actor_class.options(**self.actor_options).remote(
            self.plan.model, self.run_dir, self.plan.grid, self.tiles_ref, self.plan.batch_size,
            "cuda" if self.use_gpu else "cpu", self.threads)

    def _failed_attempt(self, tile_id: int, stage: str, error: str, retry: deque[int]) -> None:
        self.attempts[tile_id] = self.attempts.get(tile_id, 0) + 1
        if self.attempts[tile_id] < self.ex.max_attempts:
            retry.append(tile_id)
        else:
            log.info("tile %d failed in %s: %s", tile_id, stage, error)
            self.ledger.mark_failed(tile_id, Failure(stage, error, self.attempts[tile_id]))

    def run(self, todo: list[int]) -> None:
        """Process ``todo`` tile ids until each is done or failed for good."""
        batch = self.plan.batch_size
        to_read: deque[int] = deque(todo)
        to_infer: deque[int] = deque()
        reading: dict[Any, int] = {}
        inferring: dict[Any, tuple[int, list[int]]] = {}
        per_actor = [0] * len(self.actors)
        max_reading = self.readers * len(self.actors)
        max_ready = 4 * batch * len(self.actors)
        last_flush = time.monotonic()
        tiles = self.plan.tiles
        while to_read or to_infer or reading or inferring:
            while to_read and len(reading) < max_reading and len(to_infer) < max_ready:
                i = to_read.popleft()
                reading[self.tile_remote.remote(self.job_ref, i, int(tiles[i, 0]), int(tiles[i, 1]))] = i
            last_tiles = not to_read and not reading
            for a in range(len(self.actors)):
                while per_actor[a] <= self.ex.prefetch and (len(to_infer) >= batch or (to_infer and last_tiles)):
                    ids = [to_infer.popleft() for _ in range(min(batch, len(to_infer)))]
                    inferring[self.actors[a].__call__.remote(ids)] = (a, ids)
                    per_actor[a] += 1
            ready, _ = ray.wait([*reading, *inferring], num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in reading:
                    i = reading.pop(ref)
                    try:
                        _, err = ray.get(ref)
                    except RayError as exc:
                        err = _short(exc)
                    if err is None:
                        to_infer.append(i)
                    else:
                        self._failed_attempt(i, "tile", err, to_read)
                else:
                    a, ids = inferring.pop(ref)
                    per_actor[a] -= 1
                    try:
                        results = ray.get(ref)
                    except RayActorError as exc:
                        self._replace_actor(a, exc)
                        for i in ids:
                            self._failed_attempt(i, "infer", f"inference actor died: {_short(exc)}", to_infer)
                        continue
                    for i, err in results:
                        if err is None:
                            self.ledger.mark_done(i)
                        else:
                            self._failed_attempt(i, "infer", err, to_infer)
            self.progress.show(len(self.ledger.done), len(self.ledger.failed))
            if time.monotonic() - last_flush > LEDGER_FLUSH_S:
                save_ledger(self.run_dir, self.ledger)
                last_flush = time.monotonic()
        self.progress.close(len(self.ledger.done), len(self.ledger.failed))
        for actor in self.actors:
            ray.kill(actor)

    def _replace_actor(self, a: int, exc: Exception) -> None:
        self.replacements += 1
        if self.replacements > 3 * len(self.actors) + 3:
            raise RuntimeError(f"inference actors keep dying ({self.replacements} replaced); last error: {exc}") from exc
        log.warning("inference actor %d died (%s); starting a replacement", a, type(exc).__name__)
        self.actors[a] = self._new_actor()


def _short(exc: Exception) -> str:
    """One line for the ledger: the error's type and first line, without Ray's traceback."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


class _Progress:
    """Tiles done / failed / total: a bar on a terminal, a plain line every few seconds in logs."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.start = time.monotonic()

    def show(self, done: int, failed: int, force: bool = False) -> None:
        """Print the current counts (throttled)."""
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        text = f"tiles {done}/{self.total} done, {failed} failed, {rate:.2f} tiles/s"
        if self.tty:
            width = 30
            filled = int(width * (done + failed) / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self, done: int, failed: int) -> None:
        """Print the final counts."""
        self.show(done, failed, force=True)
        if self.enabled and self.tty:
            sys.stderr.write("\n")

