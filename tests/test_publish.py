"""Published files appear whole or not at all: a process SIGKILLed (by its own pid) in the middle of publishing a
raster, a GeoPackage or a file moved across file systems leaves the old file (or none), never a truncated one;
and the free space is checked before the mosaic and the GeoPackage are built."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from geoseg import runtime, storage
from geoseg.config import RunConfig
from geoseg.errors import DiskSpaceError
from geoseg.mosaic import output_bytes
from geoseg.planner import make_plan

ROOT = Path(__file__).resolve().parents[1]
OLD = b"the previous, complete file\n"
SIZE = 8 * 2**20

# each child starts publishing, prints "mid" once part of the new file is written, then waits to be killed
PUBLISHING = f"""
import sys
from geoseg import storage
with storage.publishing(sys.argv[1]) as out:
    out.write(b"n" * {SIZE // 2})
    out.flush()
    print("mid", flush=True)
    sys.stdin.readline()
    out.write(b"n" * {SIZE // 2})
"""

GPKG = """
import sys
import numpy as np
import shapely
from geoseg.gpkg import GpkgWriter
writer = GpkgWriter(sys.argv[1], "landcover", "EPSG:32633", {"class_id": "int64"}, batch_size=10)
boxes = np.array([shapely.box(i, 0, i + 1, 1) for i in range(100)], dtype=object)
writer.write(boxes, {"class_id": np.arange(100)})
print("mid", flush=True)
sys.stdin.readline()
writer.commit()
"""

PUT_FILE = """
import sys
from geoseg import storage
storage.put_file(sys.argv[2], sys.argv[1])
"""


def child(code: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env)


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def partial_temps(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}") and p.name != name]


@pytest.mark.parametrize("existing", [True, False])
@pytest.mark.parametrize(("code", "name"), [(PUBLISHING, "classes.tif"), (GPKG, "landcover.gpkg")])
def test_killed_while_publishing_leaves_the_old_file_or_none(tmp_path: Path, code: str, name: str,
                                                             existing: bool) -> None:
    """The COGs (and report, plan, ledger, VRTs: every ``write_bytes``) go through ``storage.publishing``, the
    GeoPackage through ``GpkgWriter``: both write a hidden file beside the target, so a kill mid-write never
    touches the target."""
    target = tmp_path / name
    if existing:
        target.write_bytes(OLD)
    proc = child(code, str(target))
    assert proc.stdout is not None and proc.stdout.readline() == b"mid\n"
    assert any(p.stat().st_size > 0 for p in partial_temps(tmp_path, Path(name).stem))  # killed mid-publish
    kill(proc)
    if existing:
        assert target.read_bytes() == OLD
    else:
        assert not target.exists()


def test_killed_while_moving_across_file_systems_leaves_the_old_file(tmp_path: Path) -> None:
    """``put_file`` from another file system (the temp dir on tmpfs, RUN_DIR on disk) copies into a hidden file
    beside the target, not onto it as ``shutil.move`` does. The source is a pipe that the test fills, so the kill
    lands after the child has copied most of what was sent and before the file is complete."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's temp dir")
    target = tmp_path / "landcover.gpkg"
    target.write_bytes(OLD)
    fifo = shm / f"geoseg-publish-{os.getpid()}-{tmp_path.name}"
    os.mkfifo(fifo)
    try:
        proc = child(PUT_FILE, str(target), str(fifo))
        with open(fifo, "wb") as pipe:  # opens once the child reads it; a write returns once the child has most
            pipe.write(b"n" * SIZE)
            pipe.flush()
            copied = partial_temps(tmp_path, "landcover.gpkg")
            kill(proc)
    finally:
        fifo.unlink(missing_ok=True)
    assert target.read_bytes() == OLD
    assert copied and 0 < max(p.stat().st_size for p in copied) < SIZE + len(OLD)


def test_put_file_across_file_systems_publishes_the_whole_file(tmp_path: Path) -> None:
    source = Path("/dev/shm") / f"geoseg-put-{os.getpid()}-{tmp_path.name}"
    data = os.urandom(3 * 2**20 + 7)
    source.write_bytes(data)
    try:
        storage.put_file(source, str(tmp_path / "sub" / "classes.tif"))
    finally:
        leftover = source.exists()
        source.unlink(missing_ok=True)
    assert (tmp_path / "sub" / "classes.tif").read_bytes() == data
    assert not leftover and not partial_temps(tmp_path / "sub", "classes")
    assert oct((tmp_path / "sub" / "classes.tif").stat().st_mode & 0o777) == oct(0o644)


def test_free_space_is_checked_with_a_named_error(tmp_path: Path, data_dir: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    storage.check_free_space(str(tmp_path / "new" / "run"), 1, "the mosaic")  # a folder not made yet: its parent
    with pytest.raises(DiskSpaceError, match=r"the mosaic needs about .* MiB .* free some space"):
        storage.check_free_space(str(tmp_path), 2 * free + 2**30, "the mosaic")
    storage.check_free_space("s3://bucket/run", 2 * free + 2**30, "the mosaic")  # no local disk to check

    scene = data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"
    plan = make_plan(RunConfig(scenes=(str(scene),), out=str(tmp_path / "run")))
    runtime._check_space(str(tmp_path / "run"), plan)  # a small grid fits
    huge = replace(plan, grid=replace(plan.grid, width=10**7, height=10**7))  # 10^14 px: no disk holds it
    assert output_bytes(huge.grid) > free
    with pytest.raises(DiskSpaceError, match="mosaic and GeoPackage"):
        runtime._check_space(str(tmp_path / "run"), huge)
    with pytest.raises(DiskSpaceError, match="GeoPackage"):
        runtime._check_space("s3://geoseg/runs/huge", huge)  # built in the local temp dir first
