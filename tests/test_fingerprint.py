"""Scenes fingerprinted in the plan: a rerun re-reads a repaired scene with the same grid, bands and dtype, and refuses
one whose grid, bands or dtype changed before any tile runs. Plans written before the fingerprint still load."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from geoseg import runtime
from geoseg.config import ExecutionSettings, RunConfig
from geoseg.errors import SceneChangedError, SceneReadError
from geoseg.plan import load_plan, save_plan
from geoseg.planner import make_plan
from geoseg.scenes import check_unchanged, open_scene

S2 = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")


def scene_copy(data_dir: Path, dst: Path) -> Path:
    shutil.copyfile(data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif", dst)
    return dst


def rewrite(path: Path, **changes: object) -> None:
    """The scene written again by GDAL, with some of its profile changed (or none: a repaired copy)."""
    with rasterio.open(path) as src:
        data, profile, names = src.read(), src.profile, src.descriptions
    profile.update(changes)
    count = int(profile["count"])  # type: ignore[call-overload]
    data = np.resize(data, (count, *data.shape[1:])).astype(profile["dtype"])
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = (names * 2)[:count]


def test_open_scene_records_the_files_version_and_plans_keep_it(tmp_path: Path, data_dir: Path) -> None:
    path = scene_copy(data_dir, tmp_path / "s2.tif")
    scene = open_scene(str(path))
    st = path.stat()
    assert scene.stamp == f"{st.st_size}:{st.st_mtime_ns}"
    plan = make_plan(RunConfig(scenes=(str(path),), out=str(tmp_path / "run")))
    save_plan(str(tmp_path / "run"), plan)
    assert load_plan(str(tmp_path / "run")).items[0].sources[0].scene.stamp == scene.stamp
    assert not check_unchanged(scene)  # untouched
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: a new version, the same grid
    assert check_unchanged(scene)


def test_plans_written_before_the_fingerprint_still_load(tmp_path: Path, data_dir: Path) -> None:
    path = scene_copy(data_dir, tmp_path / "s2.tif")
    plan = make_plan(RunConfig(scenes=(str(path),), out=str(tmp_path / "run")))
    old = json.loads(plan.to_json())  # as plans were written before fingerprints and items
    old["scenes"] = [{"scene": {k: v for k, v in i["sources"][0]["scene"].items() if k not in ("stamp", "data_offset")},
                      "bands": i["sources"][0]["bands"], "grid_bounds": i["grid_bounds"],
                      "aligned": i["sources"][0]["aligned"]} for i in old.pop("items")]
    del old["composite"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plan.json").write_text(json.dumps(old))
    loaded = load_plan(str(tmp_path / "run"))
    assert loaded.items[0].sources[0].scene.stamp is None and loaded.same_work(plan)
    assert not check_unchanged(loaded.items[0].sources[0].scene)  # no version recorded: only the grid is checked


def test_a_repaired_scene_with_the_same_grid_is_accepted(tmp_path: Path, data_dir: Path) -> None:
    path = scene_copy(data_dir, tmp_path / "s2.tif")
    scene = open_scene(str(path))
    rewrite(path)  # written again: a new size and time, the same grid, bands and dtype
    assert check_unchanged(scene)


@pytest.mark.parametrize(("changes", "named"), [
    ({"transform": Affine(20, 0, 585420, 0, -20, 5652250)}, "transform"),
    ({"width": 400}, "width 401 -> 400"),
    ({"count": 4}, "band count 10 -> 4"),
    ({"dtype": "float32"}, "dtype uint16 -> float32"),
    ({"crs": "EPSG:32634"}, "CRS"),
])
def test_a_scene_whose_grid_bands_or_dtype_changed_is_refused(tmp_path: Path, data_dir: Path,
                                                              changes: dict[str, object], named: str) -> None:
    path = scene_copy(data_dir, tmp_path / "s2.tif")
    scene = open_scene(str(path))
    rewrite(path, **changes)
    with pytest.raises(SceneChangedError, match=named) as info:
        check_unchanged(scene)
    assert "--overwrite" in str(info.value) and "original scene back" in str(info.value)


def test_rerun_refuses_a_changed_scene_before_any_tile_runs(tmp_path: Path, data_dir: Path,
                                                            write_raster: Callable[..., Path]) -> None:
    path = scene_copy(data_dir, tmp_path / "s2.tif")
    out = tmp_path / "run"
    save_plan(str(out), make_plan(RunConfig(scenes=(str(path),), out=str(out))))
    rewrite(path, dtype="float32")
    with pytest.raises(SceneChangedError, match="dtype"):
        runtime.rerun(str(out), ExecutionSettings())
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]  # no ledger, no stores: nothing ran
    path.unlink()
    with pytest.raises(SceneReadError, match="Put the scene back"):
        runtime.rerun(str(out), ExecutionSettings())
