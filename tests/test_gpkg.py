"""The GeoPackage sink: batches stream to a temporary file that replaces the target whole, or not at all."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely

from geoseg.errors import ConfigError
from geoseg.gpkg import GpkgWriter

FIELDS = {"class_id": "int64", "class_name": "str", "area_m2": "float64"}


def batch(n: int, start: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x = np.arange(start, start + n, dtype=float)
    geoms = shapely.box(x, 0, x + 1, 1)
    return geoms, {"class_id": np.arange(start, start + n), "class_name": np.array(["c"] * n, dtype=object),
                   "area_m2": np.ones(n)}


def test_batches_stream_into_one_layer_with_index_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "o.gpkg"
    with GpkgWriter(out, "landcover", "EPSG:32633", FIELDS, {"run_id": "r1"}, batch_size=7) as w:
        for k in range(5):
            w.write(*batch(4, 4 * k))
            on_disk = pyogrio.read_info(w.tmp_path, layer="landcover")["features"] if w.tmp_path.exists() else 0
            assert 4 * (k + 1) - on_disk < 7  # flushed whenever the buffer reaches a batch: memory stays bounded
        assert not out.exists()  # nothing published before commit
    assert [p.name for p in tmp_path.iterdir()] == ["o.gpkg"]  # no temporary file left behind
    info = pyogrio.read_info(out, layer="landcover")
    assert info["features"] == 20 and info["geometry_type"] == "MultiPolygon"
    assert info["dataset_metadata"] == {"run_id": "r1"}
    ids = pyogrio.read_dataframe(out, layer="landcover").class_id.tolist()
    assert ids == list(range(20))
    with sqlite3.connect(out) as db:
        assert db.execute("select count(*) from rtree_landcover_geom").fetchone()[0] == 20


def test_empty_output_is_an_empty_layer(tmp_path: Path) -> None:
    with GpkgWriter(tmp_path / "e.gpkg", "landcover", "EPSG:32633", FIELDS):
        pass
    assert pyogrio.read_info(tmp_path / "e.gpkg", layer="landcover")["features"] == 0


def test_failure_inside_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "o.gpkg"
    with GpkgWriter(out, "landcover", "EPSG:32633", FIELDS, batch_size=2) as w:
        w.write(*batch(3))
    before = out.read_bytes()
    with pytest.raises(RuntimeError), GpkgWriter(out, "landcover", "EPSG:32633", FIELDS, batch_size=2) as w:
        w.write(*batch(5))
        raise RuntimeError("boom")
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.gpkg"]


def test_bad_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="field types"):
        GpkgWriter(tmp_path / "o.gpkg", "l", "EPSG:32633", {"x": "complex"})
    w = GpkgWriter(tmp_path / "o.gpkg", "l", "EPSG:32633", FIELDS)
    geoms, cols = batch(2)
    with pytest.raises(ConfigError, match="do not match"):
        w.write(geoms, {"class_id": cols["class_id"]})
    w.abort()


CHILD = textwrap.dedent("""
    import sys, numpy as np, shapely
    from geoseg.gpkg import GpkgWriter
    out, n_batches = sys.argv[1], int(sys.argv[2])
    fields = {"class_id": "int64", "class_name": "str", "area_m2": "float64"}
    with GpkgWriter(out, "landcover", "EPSG:32633", fields, batch_size=500) as w:
        for k in range(n_batches):
            x = np.arange(k * 500, (k + 1) * 500, dtype=float)
            w.write(shapely.box(x, 0, x + 1, 1), {"class_id": np.full(500, k), "class_name":
                    np.array(["new"] * 500, dtype=object), "area_m2": np.ones(500)})
            print(k, flush=True)
    print("committed", flush=True)
""")


@pytest.mark.parametrize("kill_after", [0, 3, 10, "end"])
def test_killed_writer_leaves_old_file_or_complete_new_one(tmp_path: Path, kill_after: int | str) -> None:
    out = tmp_path / "o.gpkg"
    with GpkgWriter(out, "landcover", "EPSG:32633", FIELDS) as w:
        w.write(*batch(3))
    old = out.read_bytes()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    n_batches = 12
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(n_batches)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout is not None
    for line in proc.stdout:
        if kill_after != "end" and line.strip() == str(kill_after):
            proc.send_signal(signal.SIGKILL)  # part-way: some batches are already on disk in the temp file
            break
    proc.wait()
    if kill_after == "end":
        assert proc.returncode == 0
        df = pyogrio.read_dataframe(out, layer="landcover")
        assert len(df) == 500 * n_batches and set(df.class_name) == {"new"}
        return
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".o.*.tmp.gpkg"))  # killed part-way: the unfinished temporary file is left
    if out.read_bytes() != old:  # the kill may land after the rename: then the new file must be complete
        assert pyogrio.read_info(out, layer="landcover")["features"] == 500 * n_batches
    else:
        assert pyogrio.read_info(out, layer="landcover")["features"] == 3
