"""The report stage: what a run did, for people who look at maps, as one self-contained HTML page and a PNG.

``report.html`` holds the class map with its legend, the confidence map, a map of tile status (done / failed /
pending, each failed tile's error on hover and the first ``MAX_FAILED_ROWS`` in a table), the area per class as
a table and a bar chart, seconds per stage, the model card's summary, the warnings and the items read. Images are
embedded PNGs and charts inline SVG, so the page can be mailed or attached as it is. ``quicklook.png`` is the class
map with its legend drawn in.

Pictures are at most ``MAX_PX`` on their long side and are read from the class raster's overviews (rasterio at a
decimated ``out_shape``, so GDAL reads the overview level that fits): the pictures of a continent cost about what a
field's do. A grid of COGs (``classes.vrt``) is read cell by cell from each cell's own overviews in
parallel (Ray tasks when Ray is up, else threads), never in one pass over the VRT.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import ray
from PIL import Image, ImageDraw, ImageFont
from rasterio.enums import Resampling

from geoseg import storage
from geoseg.arrays import Band
from geoseg.grid import Grid
from geoseg.ledger import Ledger, load_ledger
from geoseg.model.card import ModelCard
from geoseg.model.checkpoint import load_card
from geoseg.mosaic import class_raster, colormap
from geoseg.plan import RunPlan, load_plan
from geoseg.results import Outputs, RunReport

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
QUICKLOOK_PNG = "quicklook.png"
REPORT_JSON = "report.json"  # runtime.REPORT_FILE (runtime imports this module, so the name is repeated here)
MAX_PX = 1024  # long side of every picture
MAX_FAILED_ROWS = 100  # failed tiles listed in the table (all are on the map)
MAX_FAILED_HOVER = 2000  # failed tiles given a hover box with their error on the map (the page stays small)
READ_THREADS = 8  # cells of a grid of COGs read at once without Ray (GDAL releases the GIL while it reads)

Picture = npt.NDArray[np.uint8]
"""(y, x, 4) RGBA pixels of a picture."""

OUTSIDE, DONE, PENDING, FAILED = 0, 1, 2, 3  # tile status codes, in the order a coarse pixel keeps the worst
_STATUS_RGBA = np.array([(0, 0, 0, 0), (44, 160, 44, 70), (150, 150, 150, 170), (214, 39, 40, 255)], np.uint8)
_STATUS_NAMES = {DONE: "done", PENDING: "pending", FAILED: "failed"}
# viridis at 5 stops: confidence 0 (dark) to 1 (yellow), for the confidence map and its legend
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


@dataclass(frozen=True)
class Pictures:
    """The maps of a run that wrote its outputs, at one picture size."""

    classes: Picture
    confidence: Picture


# --- pure: pictures from arrays ---------------------------------------------------------------------------------

def picture_shape(height: int, width: int, max_px: int = MAX_PX) -> tuple[int, int]:
    """A raster's picture size: its own, or shrunk to ``max_px`` on the long side (pictures are never enlarged)."""
    scale = min(1.0, max_px / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def colour_classes(classes: Band, card: ModelCard) -> Picture:
    """Class ids in the card's colours; no data (0) transparent."""
    lut = np.zeros((256, 4), np.uint8)
    for class_id, rgba in colormap(card).items():
        lut[class_id] = rgba
    picture: Picture = lut[classes]
    return picture


def ramp(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """Values in 0..1 → (..., 3) colours of the confidence ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.minimum(x.astype(np.int64), len(_RAMP) - 2)
    t = (x - lo)[..., None]
    colours: npt.NDArray[np.uint8] = np.rint(_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)
    return colours


def colour_confidence(confidence: Band, classes: Band) -> Picture:
    """Confidence (max probability × 255) on the ramp; transparent where the class map has no data."""
    out = np.empty((*confidence.shape, 4), np.uint8)
    out[..., :3] = ramp(confidence / 255.0)
    out[..., 3] = np.where(classes > 0, 255, 0)
    return out


def tile_status(grid: Grid, tiles: npt.NDArray[np.int32], ledger: Ledger) -> Band:
    """(tile rows, tile cols) status of every tile of the grid: outside the plan, done, pending or failed."""
    status = np.full((grid.tile_rows, grid.tile_cols), OUTSIDE, np.uint8)
    status[tiles[:, 0], tiles[:, 1]] = PENDING
    for ids, code in ((ledger.done, DONE), (ledger.failed.keys(), FAILED)):
        at = tiles[np.fromiter(ids, np.int64, len(ids))]
        status[at[:, 0], at[:, 1]] = code
    return status


def status_picture(status: Band, grid: Grid, shape: tuple[int, int], base: Picture | None = None) -> Picture:
    """The tile status over ``base`` (the class map, faded), at the picture's ``shape``: a picture pixel over
    several tiles shows the worst of them, so one failed tile among thousands stays visible; tile borders are
    drawn where tiles are at least 6 px wide."""
    h, w = shape
    rows = np.arange(h, dtype=np.int64) * grid.height // h // grid.tile_size  # the first tile under each pixel
    cols = np.arange(w, dtype=np.int64) * grid.width // w // grid.tile_size
    codes = np.maximum.reduceat(np.maximum.reduceat(status, rows, axis=0), cols, axis=1)
    under = np.full((h, w, 3), 255.0)
    if base is not None:
        alpha = base[..., 3:] / 255.0
        grey = base[..., :3].mean(axis=2, keepdims=True) * alpha + 255.0 * (1 - alpha)
        under = 255.0 - (255.0 - grey) * 0.45  # faded: the status colours read first
    colour = _STATUS_RGBA[codes]
    a = colour[..., 3:] / 255.0
    out = np.empty((h, w, 4), np.uint8)
    out[..., :3] = np.rint(under * (1 - a) + colour[..., :3] * a).astype(np.uint8)
    out[..., 3] = 255
    if h / grid.height * grid.tile_size >= 6:
        out[1:][rows[1:] != rows[:-1], :, :3] //= 2
    if w / grid.width * grid.tile_size >= 6:
        out[:, 1:][:, cols[1:] != cols[:-1], :3] //= 2
    return out


def png(picture: Picture) -> bytes:
    """A picture as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(picture, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def quicklook(classes: Picture, card: ModelCard) -> Picture:
    """The class map on white with its legend (the card's classes, colour and name) drawn on its right."""
    font = ImageFont.load_default()
    row, pad, swatch = 18, 10, 12
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(c.name, font=font)) for c in card.classes)
    h, w = classes.shape[:2]
    legend_h = 2 * pad + row * (len(card.classes) + 1)
    canvas = Image.new("RGB", (w + 3 * pad + swatch + 6 + text_w, max(h, legend_h)), "white")
    canvas.paste(Image.fromarray(classes, "RGBA"), (0, 0), Image.fromarray(classes[..., 3], "L"))
    draw = ImageDraw.Draw(canvas)
    x = w + pad
    draw.text((x, pad), f"{card.name} v{card.version}", fill="black", font=font)
    for k, c in enumerate(card.classes, start=1):
        y = pad + row * k
        draw.rectangle((x, y, x + swatch, y + swatch), fill=c.color, outline="black")
        draw.text((x + swatch + 6, y), c.name, fill="black", font=font)
    return np.asarray(canvas.convert("RGBA"))


def bar_chart(bars: Sequence[tuple[str, str, float]], unit: str) -> str:
    """An inline SVG of horizontal bars: (label, colour, value) each, values written after the bars."""
    row, label_w, bar_w = 22, 210, 190
    top = max((v for _, _, v in bars), default=0.0) or 1.0
    parts = [f'<svg class="chart" width="{label_w + bar_w + 80}" height="{row * len(bars) + 4}" '
             f'role="img" aria-label="bar chart">']
    for k, (label, colour, value) in enumerate(bars):
        y = k * row + 2
        short = label if len(label) <= 30 else label[:29] + "…"
        parts.append(f'<g><title>{_e(label)}: {value:,.3f} {unit}</title>'
                     f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(short)}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{bar_w * value / top:.1f}" height="{row - 6}" '
                     f'fill="{_e(colour)}"/>'
                     f'<text x="{label_w + bar_w * value / top + 6:.1f}" y="{y + 15}">{value:,.3f}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


# --- pure: the page --------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;padding:0 16px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:4px 0}
.sub{color:#555;margin:0}.row{display:flex;flex-wrap:wrap;gap:12px 32px;align-items:flex-start}
.map{flex:1 1 340px;max-width:560px}.row>section{flex:1 1 460px}
.map img{width:100%;image-rendering:pixelated;border:1px solid #ccc;display:block}
.frame{position:relative}.frame svg{position:absolute;left:0;top:0;width:100%;height:100%}
.frame rect.failed{fill:#d62728;fill-opacity:0;stroke:#fff;stroke-width:1;vector-effect:non-scaling-stroke}
.frame rect.failed:hover{fill-opacity:.5}
table{border-collapse:collapse;margin:6px 0}td,th{padding:1px 10px;text-align:left;border-bottom:1px solid #eee}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #555;vertical-align:-1px;margin-right:6px}
.bar{background:#4c78a8;height:10px;display:inline-block}.error{background:#fde2e1;padding:8px 12px}
.ramp{height:12px;width:260px;display:inline-block;vertical-align:middle;margin:0 6px}
.chart text{font:12px system-ui,sans-serif}.muted{color:#777}
"""


def report_html(run_dir: str, plan: RunPlan, card: ModelCard, ledger: Ledger, report: RunReport | None,
                pictures: Pictures | None, status: Picture) -> str:
    """The whole page, from the run's plan, card, ledger and report (None before a run ends) and its pictures
    (None when the run wrote no maps: it stopped, or has not finished)."""
    total, done, failed = plan.tile_count, len(ledger.done), len(ledger.failed)
    head = (f"<h1>geoseg run {_e(plan.run_id)}</h1><p class=sub>{_e(run_dir)} · {_e(card.name)} "
            f"v{_e(card.version)} · {total:,} tiles: {done:,} done, {failed:,} failed, "
            f"{ledger.pending_count():,} pending · composite {_e(plan.composite)}</p>")
    if report is None:
        head += "<p class=error>No report.json yet: the run has not finished. Tile status as the ledger has it.</p>"
    elif report.error:
        head += f"<p class=error>The run stopped before writing its maps: {_e(report.error)}</p>"
    status_map, failed_list = _status_parts(plan, ledger, status)
    maps = _map_parts(card, pictures) if pictures is not None else ""
    body = [head, f"<h2>Maps</h2><div class=row>{maps}{status_map}</div>", failed_list]
    if report is not None and report.class_pixel_area_m2:
        body.append(_areas_section(card, report))
    body.append(f"<div class=row><section>{_stages_section(report) if report is not None else ''}</section>"
                f"<section>{_card_section(card)}</section></div>")
    warnings = report.warnings if report is not None else plan.warnings
    body.append("<h2>Warnings</h2>" + (_list(warnings) if warnings else "<p class=muted>none</p>"))
    if report is not None and report.items:
        body.append(_items_section(report))
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>geoseg run {_e(plan.run_id)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def _map_parts(card: ModelCard, pictures: Pictures) -> str:
    legend = "".join(f"<tr><td><span class=sw style='background:{_e(c.color)}'></span>{_e(c.name)}</td></tr>"
                     for c in card.classes)
    ramp_css = ",".join(f"rgb{tuple(int(v) for v in rgb)}" for rgb in _RAMP)
    return (f"<div class=map><h3>Classes</h3>{_img('class-map', pictures.classes, 'class map')}"
            f"<table id=legend>{legend}</table></div>"
            f"<div class=map><h3>Confidence</h3>{_img('confidence-map', pictures.confidence, 'confidence map')}"
            f"<p>0<span class=ramp style='background:linear-gradient(to right,{ramp_css})'></span>1 "
            "<span class=muted>(most likely class's probability; blank: no data)</span></p></div>")


def _status_parts(plan: RunPlan, ledger: Ledger, status: Picture) -> tuple[str, str]:
    """The tile status map, and the list of failed tiles."""
    grid = plan.grid
    failed = sorted(ledger.failed.values(), key=lambda t: t.id)
    boxes = []
    for t in failed[:MAX_FAILED_HOVER]:
        x, y = t.col * grid.tile_size, t.row * grid.tile_size
        boxes.append(f'<rect class=failed x="{x}" y="{y}" width="{min(grid.tile_size, grid.width - x)}" '
                     f'height="{min(grid.tile_size, grid.height - y)}"><title>tile {t.id} (row {t.row}, col {t.col})'
                     f", {_e(t.stage)}: {_e(t.error)}</title></rect>")
    overlay = (f'<svg viewBox="0 0 {grid.width} {grid.height}" preserveAspectRatio="none">{"".join(boxes)}</svg>'
               if boxes else "")
    key = "".join(f"<span class=sw style='background:rgb{tuple(int(v) for v in _STATUS_RGBA[code][:3])}'></span>"
                  f"{name} " for code, name in _STATUS_NAMES.items())
    hover = (f" (the first {MAX_FAILED_HOVER:,} show their error on hover)" if len(failed) > MAX_FAILED_HOVER
             else " (hover a failed tile for its error)" if failed else "")
    rows = "".join(f"<tr><td class=n>{t.id}</td><td class=n>{t.row}</td><td class=n>{t.col}</td><td>{_e(t.stage)}"
                   f"</td><td class=n>{t.attempts}</td><td>{_e(t.error)}</td></tr>" for t in failed[:MAX_FAILED_ROWS])
    listed = (f"<h2>Failed tiles</h2><p id=failed-count>{len(failed):,} failed tiles" +
              (f", the first {MAX_FAILED_ROWS} listed" if len(failed) > MAX_FAILED_ROWS else "") + ":</p>"
              "<table id=failed-tiles><tr><th class=n>tile</th><th class=n>row</th><th class=n>col</th><th>stage</th>"
              f"<th class=n>attempts</th><th>error</th></tr>{rows}</table>" if failed
              else "<p id=failed-count>No failed tiles.</p>")
    return (f"<div class=map><h3>Tiles</h3><div class=frame>{_img('status-map', status, 'tile status')}{overlay}"
            f"</div><p>{key}<span class=muted>{grid.tile_size} px tiles{hover}</span></p></div>", listed)


def _areas_section(card: ModelCard, report: RunReport) -> str:
    pixels, polygons = report.class_pixel_area_m2, report.class_area_m2
    whole = sum(pixels.values()) or 1.0
    rows = "".join(f"<tr><td><span class=sw style='background:{_e(c.color)}'></span>{_e(c.name)}</td>"
                   f"<td class=n>{pixels.get(c.name, 0.0) / 1e6:,.4f}</td>"
                   f"<td class=n>{polygons.get(c.name, 0.0) / 1e6:,.4f}</td>"
                   f"<td class=n>{100 * pixels.get(c.name, 0.0) / whole:.1f} %</td></tr>" for c in card.classes)
    chart = bar_chart([(c.name, c.color, pixels.get(c.name, 0.0) / 1e6) for c in card.classes], "km²")
    return ("<h2>Area per class</h2><div class=row><table id=class-areas><tr><th>class</th><th class=n>pixels, km²"
            f"</th><th class=n>polygons, km²</th><th class=n>share</th></tr>{rows}</table>{chart}</div>")


def _stages_section(report: RunReport) -> str:
    longest = max((v for k, v in report.stage_s.items() if k != "total"), default=0.0) or 1.0
    rows = "".join(f"<tr><td>{_e(k)}</td><td class=n>{v:,.2f}</td><td>" +
                   (f"<span class=bar style='width:{200 * v / longest:.0f}px'></span>" if k != "total" else "") +
                   "</td></tr>" for k, v in report.stage_s.items())
    ex = report.execution
    how = (f"<p>{ex.actors} inference actor(s) on {_e(ex.device or 'cpu')}, {_e(ex.precision)}, batches of "
           f"{ex.batch_size}; {report.tiles_processed:,} tiles processed in this run"
           + (f" at {report.tiles_per_s:,.2f} tiles/s" if report.tiles_per_s else "") + "</p>") if ex else ""
    return ("<h2>Stages</h2><table id=stages><tr><th>stage</th><th class=n>seconds</th><th></th></tr>"
            f"{rows}</table>{how}")


def _card_section(card: ModelCard) -> str:
    facts = [("model", f"{card.name} v{card.version}"), ("architecture", card.architecture),
             ("bands", ", ".join(card.bands)), ("pixel size", f"{card.gsd_m:g} m"),
             ("classes", str(len(card.classes))), ("no data", card.nodata_rule)]
    if card.parent:
        facts.insert(1, ("fine-tuned from", card.parent))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    return (f"<h2>Model card</h2><table id=model-card>{rows}</table>"
            f"<p>Training data and licence status:</p>{_list(card.training_data)}")


def _items_section(report: RunReport) -> str:
    rows = "".join(
        f"<tr><td class=n>{k}</td><td>{_e(i.id)}</td><td>{_e(i.datetime or '')}</td>"
        f"<td class=n>{'' if i.cloud_cover is None else f'{i.cloud_cover:.1f}'}</td><td class=n>{i.offset:g}</td>"
        f"<td>{_e(i.mask or '')}</td><td title='{_e(' '.join(i.files))}'>{len(i.files)}</td></tr>"
        for k, i in enumerate(report.items, start=1))
    return ("<h2>Items</h2><table id=items><tr><th class=n>#</th><th>id</th><th>datetime</th><th class=n>cloud %</th>"
            f"<th class=n>offset</th><th>mask</th><th>files</th></tr>{rows}</table>")


def _img(element_id: str, picture: Picture, alt: str) -> str:
    data = base64.b64encode(png(picture)).decode()
    return f"<img id={element_id} alt='{alt}' src='data:image/png;base64,{data}'>"


def _list(lines: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


# --- I/O: rasters, the run's files ------------------------------------------------------------------------------

def read_picture(url: str, shape: tuple[int, int], resampling: Resampling = Resampling.nearest) -> Band:
    """Band 1 of a raster at ``shape``, from the overview level that fits; a VRT over COGs (geoseg's grid of COGs)
    from each cell's own overviews, the cells in parallel."""
    cells = _vrt_cells(url) if url.endswith(".vrt") else []
    if len(cells) <= 1:
        return _read(url, shape, resampling)
    h, w = shape
    height, width = _size(url)
    jobs, places = [], []
    for path, x, y, cw, ch in cells:
        top, bottom = round(y * h / height), round((y + ch) * h / height)
        left, right = round(x * w / width), round((x + cw) * w / width)
        if bottom > top and right > left:
            jobs.append((path, (bottom - top, right - left), resampling))
            places.append((slice(top, bottom), slice(left, right)))
    out = np.zeros(shape, np.uint8)
    for place, part in zip(places, _parallel(_read, jobs), strict=True):
        out[place] = part
    return out


def _read(url: str, shape: tuple[int, int], resampling: Resampling) -> Band:
    """Band 1 decimated to ``shape``: GDAL reads the overview level closest above it, not the full resolution."""
    with storage.gdal_env(), rasterio.open(url) as src:
        band: Band = src.read(1, out_shape=shape, resampling=resampling)
    return band


def _size(url: str) -> tuple[int, int]:
    with storage.gdal_env(), rasterio.open(url) as src:
        return int(src.height), int(src.width)


def _vrt_cells(url: str) -> list[tuple[str, int, int, int, int]]:
    """A VRT's sources, each whole at its place: (path, x, y, width, height) in the VRT's pixels."""
    root = ET.fromstring(storage.read_bytes(url))
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    cells = []
    for source in root.iter("SimpleSource"):
        name, dst = source.find("SourceFilename"), source.find("DstRect")
        if name is None or dst is None or name.text is None:
            continue
        path = storage.join(folder, name.text) if name.get("relativeToVRT") == "1" else name.text
        x, y, w, h = (int(float(dst.get(k, "0"))) for k in ("xOff", "yOff", "xSize", "ySize"))
        cells.append((path, x, y, w, h))
    return cells


def _parallel(fn: Callable[..., Band], jobs: Sequence[tuple[Any, ...]]) -> list[Band]:
    """``fn(*job)`` for every job at once: Ray tasks when Ray is up (cells spread over the cluster), else threads."""
    if ray.is_initialized():
        task = ray.remote(fn).options(num_cpus=1, runtime_env={"env_vars": storage.task_env()})
        return list(ray.get([task.remote(*job) for job in jobs]))
    with ThreadPoolExecutor(min(READ_THREADS, len(jobs))) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


def _load_report(run_dir: str) -> RunReport | None:
    url = storage.join(run_dir, REPORT_JSON)
    return RunReport.from_json(storage.read_bytes(url).decode()) if storage.exists(url) else None


def _pictures(run_dir: str, plan: RunPlan, card: ModelCard, outputs: Outputs) -> Pictures:
    shape = picture_shape(plan.grid.height, plan.grid.width)
    classes = read_picture(class_raster(run_dir), shape)
    confidence = read_picture(storage.join(run_dir, outputs.confidence), shape, Resampling.average)
    return Pictures(colour_classes(classes, card), colour_confidence(confidence, classes))


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write the run's HTML report (default ``RUN_DIR/report.html``, a local path or URL); returns where."""
    plan = load_plan(run_dir)
    card = load_card(plan.model)
    ledger = load_ledger(run_dir, plan.tile_count)
    report = _load_report(run_dir)
    outputs = report.outputs if report is not None else None
    pictures = _pictures(run_dir, plan, card, outputs) if outputs is not None else None
    status = status_picture(tile_status(plan.grid, plan.tiles, ledger), plan.grid,
                            picture_shape(plan.grid.height, plan.grid.width),
                            pictures.classes if pictures is not None else None)
    out = out or storage.join(run_dir, REPORT_HTML)
    storage.write_bytes(out, report_html(run_dir, plan, card, ledger, report, pictures, status).encode())
    return out


def write_quicklook(run_dir: str) -> str:
    """Write ``RUN_DIR/quicklook.png``, the class map with its legend, published whole; returns where."""
    plan = load_plan(run_dir)
    card = load_card(plan.model)
    classes = read_picture(class_raster(run_dir), picture_shape(plan.grid.height, plan.grid.width))
    out = storage.join(run_dir, QUICKLOOK_PNG)
    storage.write_bytes(out, png(quicklook(colour_classes(classes, card), card)))
    return out


def write_views(run_dir: str) -> None:
    """What every run leaves for people at its end: ``report.html``, and ``quicklook.png`` when it wrote maps. The
    outputs are published already, so a report that cannot be made is logged, never a failed run."""
    try:
        write_report(run_dir)
        report = _load_report(run_dir)
        if report is not None and report.outputs is not None:
            write_quicklook(run_dir)
    except Exception as exc:  # a view of finished work: any failure here must not lose the run
        log.warning("report.html or quicklook.png of %s not written: %s: %s", run_dir, type(exc).__name__, exc)
