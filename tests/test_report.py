"""report.html and quicklook.png: written by every run, rendered by a real headless Chromium (Debian's
``chromium``, installed by ``make system-deps``), which must decode every picture and show the tables; a run with
failed tiles shows them on its map and in its table; a grid of COGs gives the single COG's picture, cell by cell.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import rasterio
from _weed import Weed
from PIL import Image

from geoseg import report as rep
from geoseg import runtime, storage
from geoseg.cli import EXIT_TILES_FAILED, main
from geoseg.config import ExecutionSettings, RunConfig
from geoseg.errors import ExecutionError
from geoseg.grid import Grid
from geoseg.ledger import Ledger, load_ledger
from geoseg.model.checkpoint import load_card
from geoseg.mosaic import mosaic
from geoseg.plan import load_plan, save_plan
from geoseg.planner import make_plan
from geoseg.results import TileOutcome

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from mosaic import empty_predictions  # noqa: E402

SCENE = "strzegom_20230530_33u.tif"  # the demo's scene (make demo)
TILES = ["--tile-size", "128"]  # 401 px: 16 tiles
PROBE = ('<script>addEventListener("load",()=>{for(const i of document.images)'
         'i.dataset.naturalWidth=i.naturalWidth})</script>')


class _Dom(HTMLParser):
    """What a test reads from a rendered page: its images, the rows of each table by id, failed-tile boxes, text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.rows: dict[str, int] = {}
        self.boxes = 0
        self.titles: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("id") or ""
            self.rows[self._table] = 0
        elif tag == "tr" and self._table is not None:
            self.rows[self._table] += 1
        elif tag == "rect" and "failed" in (a.get("class") or ""):
            self.boxes += 1
        elif tag == "title":
            self._title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "title":
            self._title = False

    def handle_data(self, data: str) -> None:
        (self.titles if self._title else self.text).append(data)


def chromium() -> str:
    """The browser; missing is a failure, never a skip: `make system-deps` installs it (CI does)."""
    path = shutil.which("chromium")
    if path is None:
        raise FileNotFoundError("chromium is not installed: run `make system-deps` (Debian's chromium)")
    return path


def render(page: Path, tmp: Path) -> tuple[_Dom, Path]:
    """The page as headless Chromium renders it (with a probe writing each image's natural width into the DOM
    once the page loaded), and a screenshot of it."""
    probed = tmp / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    flags = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=5000", f"--user-data-dir={tmp / 'chromium'}"]  # the load handlers run first
    dom = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    shot = tmp / f"{page.stem}.png"
    subprocess.run([*flags, "--window-size=1200,1800", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    parsed = _Dom()
    parsed.feed(dom)
    return parsed, shot


def assert_decoded(dom: _Dom, ids: set[str], shot: Path) -> None:
    """Every image the page holds was decoded by the browser, the screenshot shows something."""
    assert {i["id"] for i in dom.images} == ids
    for img in dom.images:
        assert int(img["data-natural-width"] or 0) > 0, img["id"]
    with Image.open(shot) as im:
        assert im.size == (1200, 1800) and np.asarray(im.convert("L")).std() > 10


def picture(page: Path, element_id: str) -> np.ndarray:
    """The RGBA pixels of an image the page embeds."""
    data = re.search(rf"<img id={element_id} [^>]*src='data:image/png;base64,([^']+)'", page.read_text())
    assert data is not None, element_id
    with Image.open(io.BytesIO(base64.b64decode(data.group(1)))) as im:
        return np.asarray(im.convert("RGBA"))


def _grown(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def assert_self_contained(page: Path) -> None:
    text = page.read_text()
    assert "<script" not in text and "<link" not in text and "src='http" not in text and 'src="http' not in text
    assert text.count("src='data:image/png;base64,") == text.count("<img ")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ray_session: None) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    scene = data_dir / "sentinel2_strzegom" / "scenes" / SCENE
    assert main(["run", "--scenes", str(scene), "--out", str(out), *TILES]) == 0
    return out


def test_every_run_writes_a_report_chromium_renders(clean_run: Path, tmp_path: Path) -> None:
    page = clean_run / "report.html"
    assert_self_contained(page)
    dom, shot = render(page, tmp_path)
    assert_decoded(dom, {"class-map", "confidence-map", "status-map"}, shot)
    card = load_card(load_plan(str(clean_run)).model)
    assert dom.rows["legend"] == len(card.classes)
    assert dom.rows["class-areas"] == len(card.classes) + 1
    assert dom.rows["stages"] == 1 + 6  # plan, clouds, tile_and_infer, mosaic, vectorise, total
    assert dom.rows["model-card"] > 0 and "failed-tiles" not in dom.rows and dom.boxes == 0
    text = " ".join(dom.text)
    assert "No failed tiles." in text and "16 tiles: 16 done, 0 failed, 0 pending" in text
    assert all(t in text for t in card.training_data)  # the training data and their licence status
    assert "urban" in " ".join(dom.titles)  # the bar chart's hover text

    with Image.open(clean_run / "quicklook.png") as im:
        im.load()
        assert im.width > 401 and im.height >= 401  # the map and its legend beside it
        colours = {tuple(c) for c in np.asarray(im.convert("RGB")).reshape(-1, 3)[::7]}
    assert {tuple(int(c.color[k:k + 2], 16) for k in (1, 3, 5)) for c in card.classes} & colours


def test_report_command_writes_where_asked(clean_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(clean_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes() == (clean_run / "report.html").read_bytes()


def test_report_of_a_run_on_an_object_store(clean_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """RUN_DIR on S3 (SeaweedFS): the pages read the rasters through GDAL's /vsis3/ and are uploaded whole; the
    same page (but its RUN_DIR) and the same quicklook as the local run's."""
    with Weed(tmp_path / "weed") as weed:
        for name, value in weed.env().items():
            monkeypatch.setenv(name, value)
        run_dir = "s3://geoseg/runs/report"
        fs, path = storage.filesystem(run_dir)
        for name in ("plan.json", "ledger.json", "report.json", "classes.tif", "confidence.tif"):
            fs.put_file(str(clean_run / name), f"{path}/{name}")
        assert rep.write_report(run_dir) == f"{run_dir}/report.html"
        assert rep.write_quicklook(run_dir) == f"{run_dir}/quicklook.png"
        page = storage.read_bytes(f"{run_dir}/report.html").decode()
        assert page == (clean_run / "report.html").read_text().replace(str(clean_run), run_dir)
        assert storage.read_bytes(f"{run_dir}/quicklook.png") == (clean_run / "quicklook.png").read_bytes()


def test_a_run_with_failed_tiles_shows_them(tmp_path: Path, data_dir: Path, ray_session: None) -> None:
    """A scene truncated after planning: its lower tiles fail; the map marks them, each with its error on hover,
    and the table lists them."""
    good = tmp_path / "good.tif"
    with rasterio.open(data_dir / "sentinel2_strzegom" / "scenes" / SCENE) as s:
        with rasterio.open(good, "w", **{**s.profile, "tiled": False, "compress": None}) as d:
            d.descriptions = s.descriptions  # before the pixels: the header stays in front, so a cut file opens
            d.write(s.read())
    scene = tmp_path / "scene.tif"
    data = good.read_bytes()
    scene.write_bytes(data[: int(len(data) * 0.75)])
    out = tmp_path / "run"
    assert main(["run", "--scenes", str(scene), "--out", str(out), *TILES]) == EXIT_TILES_FAILED
    failed = load_ledger(str(out), 16).failed
    assert 0 < len(failed) < 16

    dom, shot = render(out / "report.html", tmp_path)
    assert_decoded(dom, {"class-map", "confidence-map", "status-map"}, shot)
    assert dom.rows["failed-tiles"] == 1 + len(failed) and dom.boxes == len(failed)
    hover = [t for t in dom.titles if t.startswith("tile ")]
    assert len(hover) == len(failed) and all("SceneReadError" in t and "truncated" in t for t in hover)
    assert f"{len(failed)} failed tiles:" in " ".join(dom.text)
    status = picture(out / "report.html", "status-map")  # red where tiles failed (but on tile borders), only there
    grid = load_plan(str(out)).grid
    red = np.all(status[..., :3] == (214, 39, 40), axis=2)
    expected = np.zeros(status.shape[:2], bool)
    for t in failed.values():
        rows, cols = grid.core_window(t.row, t.col)
        expected[rows.start + 1:rows.stop - 1, cols.start + 1:cols.stop - 1] = True
    assert np.array_equal(red & expected, expected) and not (red & ~_grown(expected)).any()


def test_a_stopped_run_reports_its_tiles(tmp_path: Path, data_dir: Path, ray_session: None) -> None:
    """The scene becomes a FIFO nobody writes to once planned (tests/test_faults.py): every read hangs until its
    deadline, the budget of infrastructure retries runs out and the run stops; its report.html says why and maps
    the tiles (none done), with no maps of classes it never made."""
    scene = tmp_path / "scene.tif"
    shutil.copyfile(data_dir / "sentinel2_strzegom" / "scenes" / SCENE, scene)
    out = tmp_path / "run"
    plan = make_plan(RunConfig(scenes=(str(scene),), out=str(out), tile_size=128))
    out.mkdir()
    save_plan(str(out), plan)
    scene.unlink()
    os.mkfifo(scene)
    with pytest.raises(ExecutionError):
        runtime.execute(str(out), plan, ExecutionSettings(deadline_s=3.0, infra_retries=1, progress=False))
    assert json.loads((out / "report.json").read_text())["outputs"] is None
    assert not (out / "quicklook.png").exists()
    dom, shot = render(out / "report.html", tmp_path)
    assert_decoded(dom, {"status-map"}, shot)
    text = " ".join(dom.text)
    assert "The run stopped before writing its maps: ExecutionError" in text and "16 pending" in text
    assert (picture(out / "report.html", "status-map")[..., :3] != 255).any()


def test_thousands_of_failed_tiles_on_the_map_and_the_first_hundred_listed(clean_run: Path, tmp_path: Path
                                                                         ) -> None:
    """A plan of 1.6 million tiles of which 2,500 failed: every failed tile is red on the map (a picture pixel shows
    the worst tile under it), the table lists the first 100, and the page stays small."""
    plan = load_plan(str(clean_run))
    grid = replace(plan.grid, width=160_000, height=160_000, tile_size=128)
    rows, cols = np.meshgrid(np.arange(grid.tile_rows), np.arange(grid.tile_cols), indexing="ij")
    tiles = np.column_stack([rows.ravel(), cols.ravel()]).astype(np.int32)
    big = replace(plan, grid=grid, tiles=tiles)
    rng = np.random.default_rng(4)
    failed_ids = rng.choice(len(tiles), 2500, replace=False)
    ledger = Ledger(len(tiles), done=set(range(0, len(tiles), 2)) - set(failed_ids.tolist()))
    for i in failed_ids.tolist():
        r, c = (int(v) for v in tiles[i])
        ledger.mark_failed(TileOutcome(i, r, c, "tile", "SceneReadError", f"cannot read window of tile {i}", 2))
    card = load_card(plan.model)
    shape = rep.picture_shape(grid.height, grid.width)
    status = rep.status_picture(rep.tile_status(grid, tiles, ledger), grid, shape)
    assert shape == (1024, 1024)
    red = np.all(status[..., :3] == (214, 39, 40), axis=2)
    starts = np.arange(1024) * grid.height // 1024 // grid.tile_size  # the first tile row (col) under each pixel
    for i in failed_ids.tolist():  # the pixel over each failed tile is red
        r, c = tiles[i]
        assert red[np.searchsorted(starts, r, side="right") - 1, np.searchsorted(starts, c, side="right") - 1]
    assert red.sum() <= 4 * 2500

    page = tmp_path / "big.html"
    page.write_text(rep.report_html("s3://bucket/big", big, card, ledger, None, None, status))
    assert page.stat().st_size < 2_000_000
    dom, shot = render(page, tmp_path)
    assert_decoded(dom, {"status-map"}, shot)
    assert dom.rows["failed-tiles"] == 1 + rep.MAX_FAILED_ROWS and dom.boxes == rep.MAX_FAILED_HOVER
    text = " ".join(dom.text)
    assert "2,500 failed tiles, the first 100 listed" in text and "No report.json yet" in text


def test_grid_of_cogs_is_read_cell_by_cell_from_their_overviews(tmp_path: Path, ray_session: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """classes.vrt over 3 x 3 COGs read cell by cell (Ray tasks, then threads) gives what GDAL reads from the VRT
    at that size, and the single COG's overview pixels wherever the cells have that overview level (the cells of
    1024 px; the thin last ones have none)."""
    card = load_card("sentinel2-lulc")
    run_dir = tmp_path / "run"
    grid = Grid(crs="EPSG:32633", res=10.0, left=600000.0, top=5600000.0, width=2100, height=2300, tile_size=512,
                halo=16)
    pred = empty_predictions(str(run_dir), grid, card)
    rng = np.random.default_rng(9)
    patches = rng.integers(0, 11, (grid.height // 23 + 1, grid.width // 31 + 1), dtype=np.uint8)
    classes = np.repeat(np.repeat(patches, 23, 0), 31, 1)[:grid.height, :grid.width]
    pred["classes"][:] = classes
    pred["confidence"][:] = np.where(classes > 0, rng.integers(1, 256, classes.shape), 0).astype(np.uint8)
    mosaic(str(run_dir), grid, card, {})
    shape = (1150, 1050)  # overview level 1
    single = rep.read_picture(str(run_dir / "classes.tif"), shape)
    assert np.array_equal(single, classes[::2, ::2])  # the overview itself, not a resampled full resolution
    mosaic(str(run_dir), grid, card, {}, grid_above=0, cell=1024)
    vrt = str(run_dir / "classes.vrt")
    assert len(rep._vrt_cells(vrt)) == 9
    by_ray = rep.read_picture(vrt, shape)
    monkeypatch.setattr(rep.ray, "is_initialized", lambda: False)
    by_threads = rep.read_picture(vrt, shape)
    with rasterio.open(vrt) as src:
        by_gdal = src.read(1, out_shape=shape)
    assert np.array_equal(by_ray, by_gdal) and np.array_equal(by_threads, by_gdal)
    assert np.array_equal(by_ray[:1024, :1024], single[:1024, :1024])


def test_picture_shape_caps_the_long_side() -> None:
    assert rep.picture_shape(401, 401) == (401, 401)
    assert rep.picture_shape(100_000, 50_000) == (1024, 512)
    assert rep.picture_shape(3, 90_000) == (1, 1024)
