"""The Python API (geoseg/api.py): the README's notebook example runs as written, results open lazily, and
settings by name are checked."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio

import geoseg
from geoseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCENE = "sentinel2_strzegom/scenes/strzegom_20230530_33u.tif"


def readme_example() -> str:
    """The first Python block of the README's "Using it" section."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text[text.index("## Using it"):], re.S)[0]


@pytest.mark.usefixtures("ray_session")
def test_the_readme_example_runs_and_its_results_match_the_outputs(tmp_path: Path, data_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEOSEG_DATA", str(data_dir))
    printed = io.StringIO()
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md", "exec"), namespace)
    result = namespace["r"]
    assert isinstance(result, geoseg.Result) and result.complete and result.failed_tiles == ()
    with rasterio.open(tmp_path / "runs" / "notebook" / "classes.tif") as src:
        on_disk, crs, transform = src.read(1), src.crs, src.transform
    classes = result.classes
    assert classes.dims == ("y", "x") and np.array_equal(classes.values, on_disk)
    assert classes.rio.crs == crs and classes.rio.transform() == transform
    polygons = result.polygons
    assert set(polygons.columns) >= {"class_id", "class_name", "area_m2", "mean_confidence", "geometry"}
    assert polygons["area_m2"].min() >= 500  # min_area_m2=500 reached the vectoriser by name
    assert "tiles done, 0 failed" in printed.getvalue() and "0 pending" in printed.getvalue()
    reopened = geoseg.open_run(str(tmp_path / "runs" / "notebook"))
    assert reopened.report == result.report


def test_settings_by_name_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) tile_sise: the settings are .*tile_size"):
        geoseg.run(scenes=["x.tif"], out="o", tile_sise=256)
    with pytest.raises(ConfigError, match="--tile-size must be positive"):
        geoseg.run(scenes=["x.tif"], out="o", tile_size=-1)
    with pytest.raises(ConfigError, match="either as config= or by name"):
        geoseg.run(config=geoseg.RunConfig(scenes=("x.tif",), out="o"), tile_size=256)


def test_import_geoseg_stays_light() -> None:
    """No torch, planner or Ray for ``import geoseg`` or touching the API's names."""
    code = "import sys, geoseg; geoseg.run; geoseg.Result; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_vectorise_and_evaluate_are_the_api_functions_whatever_was_imported(
        tmp_path: Path, write_raster: Callable[..., Path]) -> None:
    """The stages' own modules are ``geoseg.polygonise`` and ``geoseg.accuracy``, so importing them never turns
    ``geoseg.vectorise`` or ``geoseg.evaluate`` into a module."""
    import geoseg.accuracy
    import geoseg.polygonise  # noqa: F401

    classes = np.zeros((1, 20, 30), np.uint8)
    classes[0, 5:15, 5:25] = 2
    raster = write_raster(tmp_path / "classes.tif", classes, nodata=0)
    areas = geoseg.vectorise(str(raster), str(tmp_path / "out.gpkg"), legend={2: "water"}, connectivity=8)
    assert areas == {"water": 200 * 100.0}  # 200 px of 10 m x 10 m
    assert callable(geoseg.evaluate) and geoseg.evaluate.__module__ == "geoseg.api"
