"""Whose fault is a failure (faults.py), and faults of the infrastructure never charged to a tile.

The runs use ``max_attempts=1``: a fault charged to a tile would fail it at once, so a run that ends with
every tile done, after workers or actors were killed by their process ids, shows none was charged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio
import torch
from _kill import Background, Killer

from geoseg import runtime
from geoseg.config import ExecutionSettings, RunConfig
from geoseg.errors import ExecutionError
from geoseg.faults import (
    DEADLINE_FIRST_S,
    DEADLINE_MIN_S,
    Deadlines,
    backoff_s,
    is_infrastructure,
    started_calls,
)
from geoseg.model.checkpoint import resolve
from geoseg.plan import save_plan
from geoseg.planner import make_plan
from geoseg.results import TileError

SCENE = "sentinel2_strzegom/scenes/strzegom_20230530_33u.tif"


@pytest.mark.parametrize(("error", "infra"), [
    (TileError("ConnectionResetError", "[Errno 104] Connection reset by peer"), True),
    (TileError("EndpointConnectionError", 'Could not connect to the endpoint URL: "http://127.0.0.1:8333/b"'), True),
    (TileError("RasterioIOError", "HTTP response code: 503"), True),
    (TileError("OSError", "Temporary failure in name resolution"), True),
    (TileError("WorkerCrashedError", "The worker died unexpectedly while executing this task."), True),
    (TileError("SceneReadError", "scene.tif is truncated or unreadable: Read failed at block 3"), False),
    (TileError("RasterioIOError", "scene.tif: TIFFReadEncodedTile() failed."), False),
    (TileError("ValueError", "operands could not be broadcast together"), False),
])
def test_errors_are_classified_by_whose_fault_they_are(error: TileError, infra: bool) -> None:
    assert is_infrastructure(error) is infra


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_s(50) == 30.0


def config(data_dir: Path, out: Path) -> RunConfig:
    return RunConfig(scenes=(str(data_dir / SCENE),), out=str(out), tile_size=64, resolution=5.0)


def classes(run_dir: Path) -> np.ndarray:
    with rasterio.open(run_dir / "classes.tif") as src:
        return src.read(1)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ray_session: None) -> Path:
    out = tmp_path_factory.mktemp("clean") / "run"
    assert runtime.run(config(data_dir, out), ExecutionSettings(progress=False)).complete
    return out


def test_killed_readers_are_not_charged_to_their_tiles(tmp_path: Path, data_dir: Path, clean: Path) -> None:
    with Killer("run_tiles", times=2) as killer:
        report = runtime.run(config(data_dir, tmp_path / "run"), ExecutionSettings(max_attempts=1, progress=False))
    assert killer.killed, "no reader was killed while the run was going"
    assert report.complete and report.tiles_failed == 0
    # each kill of a busy reader is one or more infrastructure retries (a kill may also land between tasks)
    assert report.execution is not None and report.execution.infra_retries >= 1
    assert report.execution.tile_attempts_failed == 0
    assert np.array_equal(classes(tmp_path / "run"), classes(clean))


def test_an_actor_killed_again_and_again_costs_no_tile(tmp_path: Path, data_dir: Path, clean: Path) -> None:
    with Killer("Predictor.__call__", times=3) as killer:
        report = runtime.run(config(data_dir, tmp_path / "run"),
                             ExecutionSettings(actors=1, max_attempts=1, progress=False))
    # each kill is of a new actor, in a call: the replacement of the one killed before (a single actor, whose killed
    # call must be done again). Up to three, as long as the run lasts: at least two happen
    assert len(killer.killed) >= 2, f"actors killed while the run was going: {killer.killed}"
    assert report.complete and report.execution is not None and report.execution.infra_retries >= 1
    assert report.execution.tile_attempts_failed == 0
    assert np.array_equal(classes(tmp_path / "run"), classes(clean))


def test_deadlines_come_from_measured_rates() -> None:
    d = Deadlines()
    assert d.seconds("tile", 4) == DEADLINE_FIRST_S  # nothing measured yet: generous
    d.record("tile", 2.0, 4)  # 0.5 s per tile
    assert d.seconds("tile", 4) == DEADLINE_MIN_S  # 10 x 0.5 x 4 = 20 s, under the floor
    d.record("tile", 40.0, 4)  # a slow run of tiles: 10 s per tile
    assert d.seconds("tile", 4) == 400.0 and d.seconds("infer", 1) == DEADLINE_FIRST_S
    assert Deadlines(fixed_s=5.0).seconds("tile", 100) == 5.0


def test_a_hung_read_is_ended_at_its_deadline_and_not_charged(tmp_path: Path, data_dir: Path, clean: Path) -> None:
    """The scene becomes a FIFO nobody writes to after the plan is made: opening it blocks in C for ever. Each
    reader is ended at its deadline (the kernel's SIGALRM: no Python thread could run), the faults are the
    infrastructure's, and once the budget is spent the run stops with its ledger and a report saying why;
    repaired, the rerun equals a clean run."""
    scene = tmp_path / "scene.tif"
    shutil.copyfile(data_dir / SCENE, scene)
    out = tmp_path / "run"
    run_config = replace(config(data_dir, out), scenes=(str(scene),))
    plan = make_plan(run_config)
    out.mkdir()
    save_plan(str(out), plan)
    scene.unlink()
    os.mkfifo(scene)
    with pytest.raises(ExecutionError, match="infra_retries=1"):
        runtime.execute(str(out), plan, ExecutionSettings(deadline_s=3.0, infra_retries=1, progress=False))
    report = json.loads((out / "report.json").read_text())
    assert report["tiles_failed"] == 0 and report["tiles_done"] == 0 and report["outputs"] is None
    assert "infrastructure faults" in report["error"] and (out / "ledger.json").exists()
    scene.unlink()
    shutil.copyfile(data_dir / SCENE, scene)
    assert runtime.rerun(str(out), ExecutionSettings(progress=False)).complete
    assert np.array_equal(classes(out), classes(clean))


def test_actors_that_cannot_start_stop_the_run_with_its_ledger_and_report(tmp_path: Path, data_dir: Path,
                                                                         clean: Path) -> None:
    """The model's checkpoint is replaced after the plan is made by one whose card still reads (the driver's check
    passes) but whose weights do not fit the network it describes: every inference actor dies loading it.
    Deaths before an actor could work, in a row, end the run with a named error, its ledger and a report saying
    why (killed working actors do not count: see the kill tests); repaired, the rerun equals a clean run."""
    model = tmp_path / "model.pt"
    shutil.copyfile(resolve("sentinel2-lulc"), model)
    out = tmp_path / "run"
    plan = make_plan(replace(config(data_dir, out), model=str(model)))
    out.mkdir()
    save_plan(str(out), plan)
    good = model.read_bytes()
    raw = torch.load(model, weights_only=True)
    raw["card"] = json.dumps({**json.loads(raw["card"]), "width": 8})  # a narrower network than the weights
    torch.save(raw, model)
    with pytest.raises(ExecutionError, match="keep dying before they can work"):
        runtime.execute(str(out), plan, ExecutionSettings(progress=False))
    report = json.loads((out / "report.json").read_text())
    assert "keep dying" in report["error"] and report["outputs"] is None and (out / "ledger.json").exists()
    model.write_bytes(good)
    assert runtime.rerun(str(out), ExecutionSettings(progress=False)).complete
    assert np.array_equal(classes(out), classes(clean))


class Freezer(Background):
    """Freezes (SIGSTOP), by process id, the first worker that records a call running ``marker`` (its start
    record, ``faults.started_calls``): a process that runs no alarm or watchdog. Killed by its pid at the end."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.frozen: list[int] = []

    def _run(self) -> None:
        while not self.stop.is_set() and not self.frozen:
            for record in started_calls().values():
                try:
                    running = self.marker in " ".join(psutil.Process(record.pid).cmdline())
                except psutil.Error:
                    continue
                if running:
                    os.kill(record.pid, signal.SIGSTOP)
                    self.frozen.append(record.pid)
                    break
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for pid in self.frozen:
                if psutil.pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("marker", ["run_tiles", "Predictor"])
def test_a_frozen_worker_is_ended_by_the_drivers_backstop_and_not_charged(
        marker: str, tmp_path: Path, data_dir: Path, clean: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker stopped by SIGSTOP mid-call cannot end itself at its deadline (its alarm or watchdog never
    runs): the driver cancels the reader by force, or kills the actor, once the call's start record is older
    than its deadline plus the grace; its tiles are retried, none charged, and the map is the clean one."""
    monkeypatch.setattr(runtime, "BACKSTOP_GRACE_S", 5.0)
    monkeypatch.setattr(runtime, "BACKSTOP_EVERY_S", 1.0)
    with Freezer(marker) as freezer:
        report = runtime.run(config(data_dir, tmp_path / "run"),
                             ExecutionSettings(max_attempts=1, deadline_s=20.0, progress=False))
        still_there = [pid for pid in freezer.frozen if psutil.pid_exists(pid)
                       and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert freezer.frozen, f"no {marker} worker was frozen while the run was going"
    assert not still_there, "the frozen worker was still there when the run ended"
    assert "overran its deadline" in caplog.text and "did not end" in caplog.text  # the backstop ended it
    assert report.complete and report.execution is not None and report.execution.infra_retries >= 1
    assert report.execution.tile_attempts_failed == 0
    assert np.array_equal(classes(tmp_path / "run"), classes(clean))
