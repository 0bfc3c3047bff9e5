"""One writer per RUN_DIR: the lease (a file created with O_EXCL locally, an object created with If-None-Match on a real
SeaweedFS), its renewal, its takeover (expired, or naming a dead process on this host), a second run refused, and
ledger writes on a store conditional on the version the driver last wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _weed import Weed

from geoseg import runtime, storage
from geoseg.cli import main
from geoseg.config import ExecutionSettings, RunConfig
from geoseg.errors import RunDirBusyError
from geoseg.lease import LEASE_FILE, Lease, acquire, read_holder
from geoseg.ledger import LEDGER_FILE, Ledger, flush_ledger, load_ledger, save_ledger
from geoseg.plan import save_plan
from geoseg.planner import make_plan

ROOT = Path(__file__).resolve().parents[1]
KEY, SECRET = "geoseg-lease", "lease-s3cr3t"

HOLD = """
import sys
from geoseg.lease import acquire
lease = acquire(sys.argv[1], "held-by-child")
print("held", flush=True)
sys.stdin.readline()
"""


def s2_scene(data_dir: Path) -> str:
    return str(data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif")


@pytest.fixture
def holder_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Another driver, a real process, holding the lease on tmp_path/run until the test kills it by its pid."""
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        yield proc, run_dir
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def other_host_lease(run_dir: str, expires: float) -> bytes:
    """A lease as a driver on another node writes it (its pid means nothing here)."""
    return json.dumps({"host": "other-node", "pid": 1, "execution_id": "from-other-node", "since": 1.0e9,
                       "expires": expires}).encode()


def test_a_held_run_dir_is_refused_naming_who_holds_it_and_since_when(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    with acquire(run_dir, "first") as lease:
        held = read_holder(run_dir)
        assert held is not None and (held.execution_id, held.pid, held.host) == ("first", os.getpid(),
                                                                                 socket.gethostname())
        assert held.expires > held.since and lease._thread is not None and lease._thread.is_alive()
        with pytest.raises(RunDirBusyError, match=rf"in use by execution first \(pid {os.getpid()} on .*\) since "
                                                  r"\d{4}-\d\d-\d\d .* UTC"):
            acquire(run_dir, "second")
    assert not (tmp_path / "run" / LEASE_FILE).exists() and not lease._thread.is_alive()  # released on exit
    with acquire(run_dir, "second"):
        assert read_holder(run_dir).execution_id == "second"  # type: ignore[union-attr]


def test_the_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(
        holder_process: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, run_dir = holder_process
    with pytest.raises(RunDirBusyError, match=f"held-by-child \\(pid {proc.pid} "):
        acquire(run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with acquire(run_dir, "after-the-crash"):  # no waiting for the time to live: pid is gone from this host
        assert read_holder(run_dir).execution_id == "after-the-crash"  # type: ignore[union-attr]


def test_another_hosts_lease_is_taken_over_only_once_expired(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LEASE_FILE).write_bytes(other_host_lease(str(run_dir), time.time() + 3600))
    with pytest.raises(RunDirBusyError, match="from-other-node .*other-node"):
        acquire(str(run_dir))
    (run_dir / LEASE_FILE).write_bytes(other_host_lease(str(run_dir), time.time() - 1))  # its driver stopped renewing
    with acquire(str(run_dir), "taker"):
        assert read_holder(str(run_dir)).execution_id == "taker"  # type: ignore[union-attr]


def test_renewal_pushes_the_expiry_and_a_lost_lease_stops_publishing(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    lease = Lease(run_dir, "mine", ttl_s=3600).acquire()
    first = read_holder(run_dir)
    lease.renew()
    renewed = read_holder(run_dir)
    assert first is not None and renewed is not None
    assert renewed.expires > first.expires and renewed.since == first.since and renewed.execution_id == "mine"
    lease.check()
    # it expired unrenewed (a stalled driver), and another driver took it over
    (tmp_path / "run" / LEASE_FILE).write_bytes(other_host_lease(run_dir, time.time() + 3600))
    lease.renew()
    with pytest.raises(RunDirBusyError, match="taken over by execution from-other-node"):
        lease.check()
    lease.release()
    assert read_holder(run_dir).execution_id == "from-other-node"  # type: ignore[union-attr]  # not removed


def test_the_ledger_records_the_execution_that_wrote_it(tmp_path: Path) -> None:
    ledger = load_ledger(str(tmp_path), 4)
    ledger.execution_id = "exec-1"
    ledger.mark_done(2)
    save_ledger(str(tmp_path), ledger)
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["execution_id"] == "exec-1"
    assert load_ledger(str(tmp_path), 4).execution_id == "exec-1"
    old = {"tile_count": 4, "done": [1], "failed": {}}  # written before the execution id was kept
    (tmp_path / LEDGER_FILE).write_text(json.dumps(old))
    assert load_ledger(str(tmp_path), 4) == Ledger(4, {1}) and load_ledger(str(tmp_path), 4).execution_id is None


def test_rerun_on_a_held_run_dir_is_refused_before_writing(holder_process: tuple[subprocess.Popen[bytes], str],
                                                           data_dir: Path) -> None:
    _, run_dir = holder_process
    save_plan(run_dir, make_plan(RunConfig(scenes=(s2_scene(data_dir),), out=run_dir)))
    with pytest.raises(RunDirBusyError, match="held-by-child"):
        runtime.rerun(run_dir, ExecutionSettings())
    assert sorted(p.name for p in Path(run_dir).iterdir()) == [LEASE_FILE, "plan.json"]  # no ledger, no stores


@pytest.mark.usefixtures("ray_session")
def test_run_and_overwrite_on_a_held_run_dir_are_refused_then_run_releases(
        holder_process: tuple[subprocess.Popen[bytes], str], data_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    proc, run_dir = holder_process
    args = ["run", "--scenes", s2_scene(data_dir), "--out", run_dir, "--bbox", "16.27,50.97,16.29,50.98"]
    assert main([*args, "--overwrite"]) == 2  # --overwrite removes nothing under a live run
    err = capsys.readouterr().err
    assert "RunDirBusyError" in err and f"pid {proc.pid}" in err
    assert sorted(p.name for p in Path(run_dir).iterdir()) == [LEASE_FILE]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(args) == 0
    assert not (Path(run_dir) / LEASE_FILE).exists()  # released at the end
    ledger = json.loads((Path(run_dir) / LEDGER_FILE).read_text())
    assert ledger["execution_id"] and ledger["execution_id"] != "held-by-child"


TAKE = """
import sys
from geoseg.errors import RunDirBusyError
from geoseg.lease import acquire
try:
    lease = acquire(sys.argv[1], sys.argv[2])
except RunDirBusyError:
    print("busy", flush=True)
else:
    print("won", flush=True)
    sys.stdin.readline()
    lease.release()
"""


def test_an_expired_lease_is_taken_over_by_exactly_one_of_many_drivers(tmp_path: Path) -> None:
    """Takeover reads, judges and removes the stale lease under the folder's lock: of several drivers racing
    for an expired lease (real processes), one holds it and every other is refused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for _ in range(3):
        (run_dir / LEASE_FILE).write_bytes(other_host_lease(str(run_dir), time.time() - 1))
        procs = [subprocess.Popen([sys.executable, "-c", TAKE, str(run_dir), f"racer-{i}"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
                 for i in range(6)]
        try:
            said = [p.stdout.readline().decode().strip() for p in procs]  # type: ignore[union-attr]
            assert sorted(said) == ["busy"] * 5 + ["won"]
            holder = read_holder(str(run_dir))
            assert holder is not None and holder.execution_id == f"racer-{said.index('won')}"
        finally:
            for p in procs:
                p.communicate(b"\n", timeout=30)
        assert not (run_dir / LEASE_FILE).exists()  # the winner released it on leaving


class TakeOverWhenTilesAreDone(runtime.Observer):
    """Another driver takes the lease over (as after this one's renewals failed for a time to live) once the
    first tiles are done, and keeps what ledger.json held then."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.ledger_then = run_dir, b""

    def tiles_done(self, tile_ids: list[int]) -> None:
        if not self.ledger_then:
            self.ledger_then = (self.run_dir / LEDGER_FILE).read_bytes()
            (self.run_dir / LEASE_FILE).write_bytes(other_host_lease(str(self.run_dir), time.time() + 3600))


@pytest.mark.usefixtures("ray_session")
def test_a_run_whose_lease_is_taken_over_stops_and_leaves_the_ledger_to_the_new_holder(
        tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    plan = make_plan(RunConfig(scenes=(s2_scene(data_dir),), out=str(run_dir), tile_size=64, resolution=5.0))
    save_plan(str(run_dir), plan)
    lease = Lease(str(run_dir), "stalled", renew_s=0.2).acquire()
    observer = TakeOverWhenTilesAreDone(run_dir)
    with pytest.raises(RunDirBusyError, match="taken over by execution from-other-node"):
        runtime.execute(str(run_dir), plan, ExecutionSettings(progress=False), observer=observer, lease=lease)
    lease.release()
    assert observer.ledger_then, "no tile was done before the run ended"
    assert (run_dir / LEDGER_FILE).read_bytes() == observer.ledger_then  # the loser wrote no ledger since
    assert not (run_dir / "report.json").exists() and not (run_dir / "classes.tif").exists()
    assert read_holder(str(run_dir)).execution_id == "from-other-node"  # type: ignore[union-attr]


# --- on a real SeaweedFS ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    with Weed(tmp_path_factory.mktemp("weed"), KEY, SECRET) as server:
        yield server


@pytest.fixture
def store(weed: Weed, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    for name, value in weed.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{weed.bucket}/{request.node.name.replace('[', '-').rstrip(']')}"


def test_seaweedfs_conditional_writes(store: str) -> None:
    url = f"{store}/object"
    first = storage.write_if(url, b"one", None)
    assert first is not None
    assert storage.write_if(url, b"two", None) is None  # If-None-Match: * fails on an existing object
    assert storage.write_if(url, b"three", '"not-its-etag"') is None
    second = storage.write_if(url, b"four", first)
    assert second is not None and second != first and storage.read_bytes(url) == b"four"
    assert storage.write_if(url, b"five", first) is None and storage.read_bytes(url) == b"four"


def test_lease_on_a_store(store: str, tmp_path: Path) -> None:
    with acquire(store, "first") as lease:
        assert lease.etag is not None and read_holder(store).execution_id == "first"  # type: ignore[union-attr]
        with pytest.raises(RunDirBusyError, match="in use by execution first"):
            acquire(store, "second")
        lease.renew()
        assert lease.lost is None and read_holder(store).expires > lease.since  # type: ignore[union-attr]
    assert not storage.exists(f"{store}/{LEASE_FILE}")
    fs, path = storage.filesystem(f"{store}/{LEASE_FILE}")
    fs.pipe_file(path, other_host_lease(store, time.time() + 3600))
    with pytest.raises(RunDirBusyError, match="from-other-node"):
        acquire(store)
    fs.pipe_file(path, other_host_lease(store, time.time() - 1))
    with acquire(store, "taker") as taken:
        assert read_holder(store).execution_id == "taker"  # type: ignore[union-attr]
        fs.pipe_file(path, other_host_lease(store, time.time() + 3600))  # taken over behind its back
        taken.renew()  # If-Match on its own last version fails
        with pytest.raises(RunDirBusyError, match="taken over"):
            taken.check()
    assert read_holder(store).execution_id == "from-other-node"  # type: ignore[union-attr]


def test_ledger_writes_on_a_store_are_conditional(store: str) -> None:
    ledger = load_ledger(store, 5)
    ledger.execution_id = "mine"
    ledger.mark_done(1)
    save_ledger(store, ledger)  # created (If-None-Match)
    ledger.mark_done(2)
    flush_ledger(store, ledger)
    save_ledger(store, ledger)  # replaced (If-Match on the version it wrote)
    assert load_ledger(store, 5).done == {1, 2} and load_ledger(store, 5).execution_id == "mine"
    intruder = load_ledger(store, 5)
    intruder.execution_id = "intruder"
    intruder.mark_done(4)
    save_ledger(store, intruder)  # another driver writes the ledger
    ledger.mark_done(3)
    with pytest.raises(RunDirBusyError, match="written by another driver since execution mine"):
        save_ledger(store, ledger)
    assert load_ledger(store, 5).done == {1, 2, 4}  # the other's ledger is not overwritten
    stale = Ledger(5, execution_id="late")  # believes there is no ledger yet
    stale.mark_done(0)
    with pytest.raises(RunDirBusyError):
        save_ledger(store, stale)
