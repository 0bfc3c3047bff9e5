"""A region from a catalogue (issue 13): a static STAC catalogue of the real Strzegom dates (per-band COGs, 20 m
bands at 20 m, SCL; ``tests/_stac.py``) read by ``geoseg run --stac``, locally and over HTTP with range requests;
clouds masked and filled from another date, the composite rules and ``provenance.tif``, the processing-baseline
offset converted, and the named errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from _http import serve
from _stac import item_id, load_truth, make_catalogue, scene_path
from scipy import ndimage
from shapely.geometry import box

from geoseg.cli import main
from geoseg.composite import ALL_CLOUDY
from geoseg.config import RunConfig
from geoseg.errors import CatalogueError
from geoseg.masks import mask_item
from geoseg.model.checkpoint import load_card
from geoseg.planner import make_plan
from geoseg.tile import open_reader

pytestmark = pytest.mark.usefixtures("ray_session")

BBOX = "16.2,50.97,16.3,51.02"  # around the whole Strzegom scene
CLEAR, CLOUDY = "20220719", "20220619"  # a clear date, and the date a month before painted with a cloud and shadow


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def far_from(painted: np.ndarray) -> np.ndarray:
    """Pixels beyond the reach of a painted cloud's mask: the default 100 m buffer plus a 20 m SCL block."""
    return ~ndimage.binary_dilation(painted, structure=np.ones((27, 27), bool))


def geoseg(out: Path, url: str, *args: str) -> dict:
    """``geoseg run --stac URL`` over the scene with small tiles (several tiles, so tile borders are crossed)."""
    code = main(["run", "--stac", url, "--bbox", BBOX, "--out", str(out), "--tile-size", "128", *args])
    assert code == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, str]:
    """The clear date and the painted one, on local paths."""
    root = tmp_path_factory.mktemp("stac")
    return root, make_catalogue(root, data_dir, str(root), dates=(CLEAR, CLOUDY), cloudy={CLOUDY: 0})


@pytest.fixture(scope="module")
def clear_map(tmp_path_factory: pytest.TempPathFactory, catalogue: tuple[Path, str]) -> Path:
    """The clear date alone, mapped from the catalogue."""
    out = tmp_path_factory.mktemp("clear") / "run"
    report = geoseg(out, catalogue[1], "--datetime", "2022-07-19")
    assert [i["id"] for i in report["items"]] == [item_id(CLEAR)]
    return out


def test_per_band_assets_over_http_give_the_local_map(tmp_path: Path, data_dir: Path, clear_map: Path) -> None:
    """The same catalogue served over HTTP (GDAL's /vsicurl/ with range requests) maps exactly as on local
    paths; and the per-band catalogue, whose 20 m bands are resampled onto the 10 m grid, agrees with the
    10-band stack of the same date on most pixels (the stack's 20 m bands were already at 10 m)."""
    root = tmp_path / "served"
    root.mkdir()
    with serve(root, log=tmp_path / "requests.log") as base:
        url = make_catalogue(root, data_dir, base, dates=(CLEAR,))
        report = geoseg(tmp_path / "run", url)
    assert report["items"][0]["files"][0].startswith("http://127.0.0.1")
    assert np.array_equal(read(tmp_path / "run" / "classes.tif"), read(clear_map / "classes.tif"))
    assert "\tbytes=" in (tmp_path / "requests.log").read_text()  # GDAL read by ranges, not whole files

    assert main(["run", "--scenes", str(scene_path(data_dir, CLEAR)), "--bbox", BBOX, "--out", str(tmp_path / "stack"),
                 "--tile-size", "128"]) == 0
    stack, per_band = read(tmp_path / "stack" / "classes.tif"), read(clear_map / "classes.tif")
    agree = float((stack == per_band)[stack > 0].mean())
    assert agree > 0.9, agree  # 0.956 seen: bilinear 20 m -> 10 m against the stack's own resampling


def test_clouds_are_masked_and_filled_from_another_date(tmp_path: Path, catalogue: tuple[Path, str],
                                                        clear_map: Path) -> None:
    """``--composite first`` takes the painted (earlier) date first; its SCL masks the cloud and the shadow
    (grown by the default 100 m), which are filled from the clear date a month later: the map there agrees with
    the clear date's own map (0.961 seen; the model's context around the hole is still the other date's), and
    provenance says which date each pixel came from."""
    root, url = catalogue
    report = geoseg(tmp_path / "run", url, "--composite", "first")
    assert [i["id"] for i in report["items"]] == [item_id(CLOUDY), item_id(CLEAR)] and report["composite"] == "first"
    assert [i["mask"] for i in report["items"]] == ["scl", "scl"]
    cloud, shadow = load_truth(root, CLOUDY)
    painted = cloud | shadow
    classes, clear = read(tmp_path / "run" / "classes.tif"), read(clear_map / "classes.tif")
    provenance = read(tmp_path / "run" / "provenance.tif")
    under = painted & (clear > 0)
    agreement = float((classes[under] == clear[under]).mean())
    assert agreement >= 0.95, agreement
    assert (provenance[painted] == 2).mean() > 0.99  # the clear date, item 2 in the report
    assert (provenance[far_from(painted) & (classes > 0)] == 1).all()  # away from them, the first date


def test_a_pixel_cloudy_on_every_date_is_no_data_and_marked_so(tmp_path: Path, catalogue: tuple[Path, str]) -> None:
    root, url = catalogue
    geoseg(tmp_path / "run", url, "--datetime", "2022-06-19")
    cloud, shadow = load_truth(root, CLOUDY)
    classes, provenance = read(tmp_path / "run" / "classes.tif"), read(tmp_path / "run" / "provenance.tif")
    assert (classes[cloud] == 0).all() and (provenance[cloud] == ALL_CLOUDY).all()
    away = far_from(cloud | shadow) & (classes > 0)
    assert (provenance[away] == 1).all() and away.mean() > 0.4


def test_median_composite_counts_clear_observations(tmp_path: Path, catalogue: tuple[Path, str]) -> None:
    root, url = catalogue
    geoseg(tmp_path / "run", url, "--composite", "median")
    cloud, shadow = load_truth(root, CLOUDY)
    provenance = read(tmp_path / "run" / "provenance.tif")
    assert (provenance[cloud | shadow] == 1).mean() > 0.99  # only the clear date there
    away = far_from(cloud | shadow) & (provenance > 0)
    assert (provenance[away] == 2).mean() > 0.97 and away.mean() > 0.4  # both dates away from them (the clear
    # date's zero-filled edge rows are no data: 1.8 % of those pixels)
    with rasterio.open(tmp_path / "run" / "provenance.tif") as src:
        assert src.tags()["COMPOSITE"] == "median" and "clear observations" in src.tags()["DESCRIPTION"]


def test_the_processing_baseline_is_converted_to_the_models(tmp_path: Path, data_dir: Path) -> None:
    """A real date carrying the +1000 offset of baseline 04.00, and the same date with the offset taken off and
    declared as the older baseline, give the same class map: as catalogue items (their properties say so) and as
    --scenes files (``--reflectance-offset``)."""
    original = make_catalogue(tmp_path / "a", data_dir, str(tmp_path / "a"), dates=(CLEAR,), scl=False)
    stripped = make_catalogue(tmp_path / "b", data_dir, str(tmp_path / "b"), dates=(CLEAR,), scl=False,
                              strip_offset=(CLEAR,))
    a = geoseg(tmp_path / "ra", original, "--cloud-mask", "none")
    b = geoseg(tmp_path / "rb", stripped, "--cloud-mask", "none")
    assert a["items"][0]["offset"] == 0 and b["items"][0]["offset"] == 1000
    ca, cb = read(tmp_path / "ra" / "classes.tif"), read(tmp_path / "rb" / "classes.tif")
    same = float((ca == cb).mean())
    assert same > 0.999, same  # pixels darker than the offset clip at 1 when it is taken off

    old = tmp_path / "old_baseline.tif"
    with rasterio.open(scene_path(data_dir, CLEAR)) as src, rasterio.open(old, "w", **src.profile) as dst:
        pixels = src.read()
        dst.write(np.where(pixels > 0, np.clip(pixels.astype(np.int32) - 1000, 1, None), 0).astype(np.uint16))
        dst.descriptions = src.descriptions
    for name, scene, offset in (("sa", scene_path(data_dir, CLEAR), "1000"), ("sb", old, "0")):
        assert main(["run", "--scenes", str(scene), "--out", str(tmp_path / name), "--tile-size", "128",
                     "--reflectance-offset", offset]) == 0
    sa, sb = read(tmp_path / "sa" / "classes.tif"), read(tmp_path / "sb" / "classes.tif")
    assert float((sa == sb).mean()) > 0.999


def test_dry_run_lists_the_items_of_each_tile(catalogue: tuple[Path, str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--stac", catalogue[1], "--bbox", BBOX, "--out", str(tmp_path / "run"), "--tile-size", "128",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"tile     0 (0, 0)  {item_id(CLOUDY)} {item_id(CLEAR)}" in out
    assert "mask scl" in out and "B8A.tif" in out and not (tmp_path / "run").exists()


def test_named_errors(tmp_path: Path, data_dir: Path, catalogue: tuple[Path, str],
                      capsys: pytest.CaptureFixture[str]) -> None:
    """Catalogue unreachable, no item over the region and window, an item missing a band the model needs:
    each a CatalogueError naming what to change, before anything is written."""
    config = RunConfig(scenes=(), stac="http://127.0.0.1:9/catalog.json", region_wkt="POLYGON ((16.2 50.97, "
                       "16.3 50.97, 16.3 51.02, 16.2 51.02, 16.2 50.97))", out=str(tmp_path / "run"))
    with pytest.raises(CatalogueError, match="cannot read the catalogue"):
        make_plan(config)
    with pytest.raises(CatalogueError, match="no item .* covers the region in 2019-01-01/2019-12-31"):
        make_plan(RunConfig(**{**vars(config), "stac": catalogue[1], "datetime": "2019-01-01/2019-12-31"}))
    gappy = make_catalogue(tmp_path / "gappy", data_dir, str(tmp_path / "gappy"), dates=(CLEAR,),
                           drop={CLEAR: ("nir08",)})
    assert main(["run", "--stac", gappy, "--bbox", BBOX, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "CatalogueError" in err and "B8A" in err and not (tmp_path / "run").exists()


def test_an_unreadable_asset_fails_its_tiles_and_rerun_finishes_them(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "stac"
    url = make_catalogue(root, data_dir, str(root), dates=(CLEAR,))
    band = root / "sentinel-2-l2a" / item_id(CLEAR) / "B04.tif"
    good = band.read_bytes()
    out = tmp_path / "run"
    plan_only = ["run", "--stac", url, "--bbox", BBOX, "--out", str(out), "--tile-size", "128"]
    band.write_bytes(good[: len(good) // 3])  # truncated after the plan could read its header
    assert main(plan_only) == 3  # finished, some tiles failed
    report = json.loads((out / "report.json").read_text())
    assert report["tiles_failed"] > 0 and any("B04.tif" in t["message"] for t in report["failed_tiles"])
    band.write_bytes(good)
    assert main(["rerun", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["tiles_done"] == report["tiles_total"]


def test_items_without_scl_are_masked_by_the_cloud_model(tmp_path: Path, data_dir: Path, clear_map: Path) -> None:
    """Without an SCL band the cloud stage runs ukis-csmask once per item over its whole window on the run's grid
    (``RUN_DIR/masks/``; no tile borders in it, so no seams): it flags the painted cloud (>= 80 %, 99.9 % seen)
    and little clear land (<= 5 %, 3.7 % seen), and the composite fills the cloud from the other date. The
    painted shadow, a darkened copy of the land, is mostly not recognised as one (8 % seen), so the map under
    the cloud agrees a little less with the clear date's own (0.918 seen) than with an SCL band."""
    root = tmp_path / "stac"
    url = make_catalogue(root, data_dir, str(root), dates=(CLOUDY, CLEAR), cloudy={CLOUDY: 0}, scl=False)
    report = geoseg(tmp_path / "run", url, "--composite", "first")
    assert [i["mask"] for i in report["items"]] == ["geoseg", "geoseg"] and report["stage_s"]["clouds"] > 0
    cloud, shadow = load_truth(root, CLOUDY)
    with rasterio.open(tmp_path / "run" / "masks" / f"{item_id(CLOUDY)}.tif") as src, \
            rasterio.open(tmp_path / "run" / "classes.tif") as classes_tif:
        window = src.window(*classes_tif.bounds)
        codes = src.read(1, window=window)
        classes = classes_tif.read(1)
    assert codes.shape == cloud.shape
    flagged = codes > 1  # cloud or shadow
    assert flagged[cloud].mean() >= 0.8 and flagged[far_from(cloud | shadow)].mean() <= 0.05
    provenance = read(tmp_path / "run" / "provenance.tif")
    assert (provenance[cloud] == 2).mean() > 0.99  # filled from the clear date
    clear = read(clear_map / "classes.tif")
    under = cloud & (clear > 0)
    assert (classes[under] == clear[under]).mean() >= 0.9


def test_the_cloud_stage_reads_only_the_bands_the_cloud_model_takes(tmp_path: Path, data_dir: Path) -> None:
    """An item's cloud mask comes from the six bands csmask takes (B02, B03, B04, B08, B11, B12), not all ten: the
    same mask with a red-edge band's file broken as with every file whole."""
    root = tmp_path / "stac"
    url = make_catalogue(root, data_dir, str(root), dates=(CLEAR,), scl=False)
    plan = make_plan(RunConfig(scenes=(), stac=url, region_wkt=box(*map(float, BBOX.split(","))).wkt,
                               out=str(tmp_path / "run")))
    item, card = plan.items[0], load_card(plan.model)
    assert item.mask is not None and item.mask_kind == "geoseg"
    mask_item(str(tmp_path / "run"), plan.run_id, plan.grid, item, card)
    whole = read(Path(item.mask.scene.url))
    (root / "sentinel-2-l2a" / item_id(CLEAR) / "B05.tif").write_bytes(b"not a GeoTIFF")
    Path(item.mask.scene.url).unlink()
    open_reader.cache_clear()  # this process still holds the whole file open from the first mask
    mask_item(str(tmp_path / "run"), plan.run_id, plan.grid, item, card)
    assert np.array_equal(read(Path(item.mask.scene.url)), whole) and (whole > 0).sum() > 100_000
