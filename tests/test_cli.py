"""The command line: region parsing, `geoseg vectorise` on a class raster, errors as exit status 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from shapely import wkt

from geoseg.cli import main, parse_region
from geoseg.errors import ConfigError, RegionError


def test_region_from_geojson_and_bbox(tmp_path: Path) -> None:
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
            [[16.26, 50.97], [16.30, 50.97], [16.30, 50.99], [16.26, 50.99], [16.26, 50.97]]]}}]}
    path = tmp_path / "region.geojson"
    path.write_text(json.dumps(fc))
    region = wkt.loads(parse_region(str(path), None))
    assert region.bounds == pytest.approx((16.26, 50.97, 16.30, 50.99))
    assert wkt.loads(parse_region(None, "16.26,50.97,16.30,50.99")).equals(region)
    assert parse_region(None, None) is None
    with pytest.raises(RegionError, match="W,S,E,N"):
        parse_region(None, "16.30,50.97,16.26")
    with pytest.raises(RegionError, match="W < E"):
        parse_region(None, "16.30,50.97,16.26,50.99")
    with pytest.raises(ConfigError, match="not both"):
        parse_region(str(path), "16.26,50.97,16.30,50.99")
    point = tmp_path / "point.geojson"
    point.write_text(json.dumps({"type": "Point", "coordinates": [16.3, 50.98]}))
    with pytest.raises(RegionError, match="no polygon"):
        parse_region(str(point), None)


def test_vectorise_command_writes_the_landcover_layer(tmp_path: Path, write_raster: Callable[..., Path]) -> None:
    classes = np.zeros((1, 40, 60), np.uint8)
    classes[0, 5:20, 5:30] = 1
    classes[0, 20:35, 10:50] = 2
    raster = write_raster(tmp_path / "classes.tif", classes, transform=Affine(2, 0, 500000, 0, -2, 5650000))
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps({"1": "forest", "2": "water"}))
    out = tmp_path / "out.gpkg"
    assert main(["vectorise", str(raster), "--out", str(out), "--classes", str(legend), "--block-size", "16"]) == 0
    gdf = gpd.read_file(out, layer="landcover").sort_values("class_id")
    assert gdf.class_name.tolist() == ["forest", "water"]
    assert gdf.area_m2.tolist() == pytest.approx([15 * 25 * 4.0, 15 * 40 * 4.0])


@pytest.mark.usefixtures("ray_session")  # `run` starts Ray first: the session's, its token in a temp HOME
def test_errors_exit_with_status_2_and_a_named_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(tmp_path / "nothing-here")]) == 2
    assert "RunDirError" in capsys.readouterr().err
    assert main(["run", "--scenes", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "SceneReadError" in err and "missing.tif" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("ray_session")  # `run` starts Ray first: the session's, its token in a temp HOME
def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path: Path, data_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "thesis.txt").write_text("do not delete")
    scene = data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"
    assert main(["run", "--scenes", str(scene), "--out", str(keep), "--overwrite"]) == 2
    assert "holds no geoseg run" in capsys.readouterr().err
    assert (keep / "thesis.txt").read_text() == "do not delete"


@pytest.mark.usefixtures("ray_session")
def test_overwrite_replaces_only_geosegs_own_files(tmp_path: Path, data_dir: Path) -> None:
    """--overwrite on a run made from another plan removes geoseg's outputs, then runs the new plan; a user's
    files kept in RUN_DIR (even named like an output) stay as they were."""
    scene = data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"
    out = tmp_path / "run"
    small = ["--scenes", str(scene), "--out", str(out), "--bbox", "16.27,50.97,16.29,50.98"]
    assert main(["run", *small, "--tile-size", "128"]) == 0
    (out / "notes.md").write_text("mine")
    (out / "classes_backup.tif").write_bytes((out / "classes.tif").read_bytes())
    first_plan = json.loads((out / "plan.json").read_text())
    assert main(["run", *small, "--tile-size", "256", "--overwrite"]) == 0
    assert (out / "notes.md").read_text() == "mine" and (out / "classes_backup.tif").exists()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["run_id"] != first_plan["run_id"] and plan["grid"]["tile_size"] == 256
    report = json.loads((out / "report.json").read_text())
    assert report["tiles_done"] == report["tiles_total"] > 0
