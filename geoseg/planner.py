"""The planner: open every scene's header, check it against the model card, lay the grid and tiles.

Reads no pixels and fails fast with a named error on anything no tile could use. Runs on the driver only.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import NoReturn

import numpy as np
import numpy.typing as npt
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from rasterio.warp import calculate_default_transform
from shapely import wkt as shapely_wkt
from shapely.geometry import Point, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.ops import transform as shapely_transform
from shapely.ops import unary_union

from geoseg import storage
from geoseg.composite import order
from geoseg.config import RunConfig, default_tile_size
from geoseg.errors import ConfigError, RegionError, SceneError
from geoseg.grid import Grid, snap_grid, tiles_covering, utm_epsg
from geoseg.model import SHIPPED
from geoseg.model.card import ModelCard
from geoseg.plan import MASKS_DIR, Item, RunPlan, Source, touches
from geoseg.scenes import Scene, band_indexes, open_scene

log = logging.getLogger(__name__)

RESOLUTION_WARN_FACTOR = 4.0
EXACT_COUNT_CELLS = 10**8  # tile-grid cells rasterised to count tiles exactly (100 MB); past that, from the area
_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16"}


def default_model(scene: Scene) -> str:
    """The shipped model for a scene's kind of imagery: 16-bit multispectral → Sentinel-2, 8-bit → RGB."""
    if scene.dtype.startswith("float"):
        raise SceneError(
            f"scene {scene.url} holds {scene.dtype} values, which no shipped model reads (there is no --scale "
            "for float input): convert reflectance in 0..1 to uint16 at scale 0.0001 for sentinel2-lulc, e.g. "
            "gdal_translate -ot UInt16 -scale 0 1 0 10000 IN.tif OUT.tif, or 8-bit imagery to uint8 for aerial-rgb"
        )
    if scene.dtype == "uint16" and len(scene.band_names) >= 10:
        return "sentinel2-lulc"
    if scene.dtype == "uint8" and len(scene.band_names) in (3, 4):
        return "aerial-rgb"
    raise SceneError(
        f"no shipped model fits scene {scene.url} ({len(scene.band_names)} bands, {scene.dtype}): "
        f"pass --model with one of {sorted(SHIPPED)} or a checkpoint path"
    )


def check_scene(scene: Scene, card: ModelCard, bands: bool = True) -> tuple[int, ...]:
    """The contract check: the scene's pixel type (and, with ``bands``, its bands) must fit the model card;
    the 1-based indexes of the card's bands in it."""
    if scene.dtype.startswith("float"):
        top = int(np.iinfo(card.input_dtype).max)
        raise SceneError(
            f"scene {scene.url} holds {scene.dtype} values but model {card.name!r} reads raw {card.input_dtype} "
            f"values (raw x {card.scale:g} = its input unit) and geoseg has no --scale for float input: convert the "
            f"scene to {card.input_dtype} at that scale, e.g. gdal_translate -ot {_GDAL_TYPES[card.input_dtype]} "
            f"-scale 0 {card.scale * top:g} 0 {top} IN.tif OUT.tif for values in 0..1, and pass OUT.tif"
        )
    if scene.dtype != card.input_dtype:
        raise SceneError(
            f"scene {scene.url} is {scene.dtype} but model {card.name!r} expects {card.input_dtype} "
            f"({', '.join(card.bands)}): choose a model for this imagery with --model"
        )
    return band_indexes(scene, card.bands) if bands else ()


@dataclass(frozen=True)
class _Draft:
    """An item before the grid exists: its band files and what is known of it."""

    id: str
    files: tuple[tuple[Scene, tuple[int, ...], tuple[int, ...]], ...]  # (scene, bands, slots)
    datetime: str | None = None
    cloud_cover: float | None = None
    data_offset: float | None = None
    scl: Scene | None = None
    href: str | None = None
    from_catalogue: bool = False


def _scene_drafts(config: RunConfig) -> tuple[str, ModelCard, list[_Draft]]:
    """--scenes: each file one item holding every band."""
    from geoseg.model.checkpoint import load_card  # torch: only when a plan is made

    scenes = [open_scene(url, config.bands) for url in config.scenes]
    model = resolve_model(config.model) if config.model else default_model(scenes[0])
    card = load_card(model)
    drafts = []
    for s in scenes:
        bands = check_scene(s, card)
        offset = s.data_offset if config.reflectance_offset is None else config.reflectance_offset
        drafts.append(_Draft(s.url.rsplit("/", 1)[-1], ((s, bands, tuple(range(len(bands)))),), data_offset=offset))
    return model, card, drafts


def _catalogue_drafts(config: RunConfig, region: BaseGeometry) -> tuple[str, ModelCard, list[_Draft]]:
    """--stac: the catalogue's items over the region and window, each band found among their assets."""
    from geoseg.catalog import find_items
    from geoseg.model.checkpoint import load_card

    model = resolve_model(config.model or "sentinel2-lulc")
    card = load_card(model)
    drafts = []
    for found in find_items(str(config.stac), region, card.bands, config.collection, config.datetime,
                            config.max_cloud):
        for f in found.files:
            check_scene(f.scene, card, bands=False)
        drafts.append(_Draft(found.id, tuple((f.scene, f.bands, f.slots) for f in found.files), found.datetime,
                             found.cloud_cover, found.data_offset, found.scl, found.href, from_catalogue=True))
    return model, card, drafts


def reflectance_shift(card: ModelCard, data_offset: float | None) -> float:
    """What to add to an item's raw values to reach the card's reflectance convention (0: read as it is)."""
    if card.reflectance_offset is None or data_offset is None:
        return 0.0
    return card.reflectance_offset - data_offset


@lru_cache(maxsize=256)
def parse_crs(crs: str) -> ProjCRS:
    """A CRS parsed once: a continental plan has hundreds of scenes in a handful of CRSs."""
    return ProjCRS.from_user_input(crs)


@lru_cache(maxsize=256)
def transformer(src: str, dst: str) -> Transformer:
    """A coordinate transformer built once per pair of CRSs (building one costs milliseconds)."""
    return Transformer.from_crs(parse_crs(src), parse_crs(dst), always_xy=True)


def _footprint(scene: Scene, crs: str) -> BaseGeometry:
    """The scene's true outline (its four corners: rotated and sheared scenes too) in ``crs``, densified so
    curved edges survive reprojection."""
    outline = Polygon(scene.corners).segmentize(max(scene.res * scene.width, scene.res * scene.height) / 64)
    return shapely_transform(transformer(scene.crs, crs).transform, outline)


def region_in(region: BaseGeometry, crs: str) -> BaseGeometry:
    """A lon/lat region in the grid's CRS, densified so its edges follow the projection."""
    return shapely_transform(transformer("EPSG:4326", crs).transform, region.segmentize(0.01))


def _native_res(scene: Scene, crs: str) -> float:
    """The scene's pixel size expressed in the grid CRS's units."""
    if parse_crs(scene.crs) == parse_crs(crs):
        return scene.res
    transform, _, _ = calculate_default_transform(scene.crs, crs, scene.width, scene.height, *scene.bounds)
    return abs(float(transform.a))


def _is_aligned(scene: Scene, grid: Grid) -> bool:
    """Same CRS, same pixel size and pixel corners on the grid's lattice: read without resampling."""
    if parse_crs(scene.crs) != parse_crs(grid.crs):
        return False
    a, b, c, d, e, f = scene.transform
    if b != 0 or d != 0:  # rotated or sheared: only the warper puts its pixels on the grid
        return False
    if not np.isclose(a, grid.res, rtol=1e-9) or not np.isclose(-e, grid.res, rtol=1e-9):
        return False
    dx, dy = (c - grid.left) / grid.res, (grid.top - f) / grid.res
    return bool(np.isclose(dx, round(dx), atol=1e-6) and np.isclose(dy, round(dy), atol=1e-6))


def make_plan(config: RunConfig, use_gpu: bool = False) -> RunPlan:
    """Find the items (files given, or a catalogue's), check them against the model card, lay the grid and tiles.

    Reads only headers: no pixels. Fails fast with a named error on anything no tile could use.
    ``use_gpu`` only picks the default precision (bf16 on GPU actors, fp32 on CPU ones).
    """
    region = shapely_wkt.loads(config.region_wkt) if config.region_wkt else None
    if config.stac:
        assert region is not None  # RunConfig requires a region with --stac
        model, card, drafts = _catalogue_drafts(config, region)
    else:
        model, card, drafts = _scene_drafts(config)
    scenes = [f[0] for d in drafts for f in d.files]
    if config.crs:
        crs = parse_crs(config.crs)
        if not crs.is_projected:
            raise ConfigError(f"--crs {config.crs} is not a projected CRS: name one in metres, e.g. a UTM zone")
        crs_text = crs.to_wkt()
    else:
        centre = region.centroid if region is not None else _lonlat_centre(scenes)
        lon = (centre.x + 180.0) % 360.0 - 180.0  # a region across the antimeridian is given past 180°
        crs_text = ProjCRS.from_epsg(utm_epsg(lon, centre.y)).to_wkt()

    footprints = [_footprint(d.files[0][0], crs_text) for d in drafts]
    area = unary_union(footprints)
    if region is not None:
        area = area.intersection(region_in(region, crs_text))
        if area.is_empty:
            raise RegionError("the region intersects none of the scenes: check its coordinates are lon/lat (EPSG:4326)")

    resolutions = [_native_res(s, crs_text) for s in scenes]
    res = config.resolution or min(resolutions)
    if res <= 0:
        raise ConfigError(f"--resolution must be positive, got {res}")
    finest = scenes[int(np.argmin(resolutions))]
    anchor = (finest.transform[2], finest.transform[5]) if np.isclose(_native_res(finest, crs_text), res) and \
        parse_crs(finest.crs) == parse_crs(crs_text) else (0.0, 0.0)
    grid = snap_grid(area.bounds, res, anchor, crs_text, 1, card.halo if config.halo is None else config.halo)
    grid = replace(grid, tile_size=config.tile_size or default_tile_size(grid.width, grid.height))
    tile_area = (grid.tile_size * grid.res) ** 2
    if grid.tile_rows * grid.tile_cols > max(config.max_tiles, EXACT_COUNT_CELLS) and \
            area.area / tile_area > config.max_tiles:  # too many to count exactly (a typo): estimated from the area
        _too_many_tiles(f"about {math.ceil(area.area / tile_area):,}", config.max_tiles)
    tiles = tiles_covering(grid, area)
    if len(tiles) > config.max_tiles:
        _too_many_tiles(f"{len(tiles):,}", config.max_tiles)

    warnings = _resolution_warnings(config, card, scenes, resolutions, res)
    items = [_item(d, fp, grid, card, config) for d, fp in zip(drafts, footprints, strict=True)]
    if config.cloud_mask == "model" or config.stac and config.cloud_mask == "auto":
        items = [_with_model_mask(i, grid, config.out, config.cloud_buffer) if i.mask is None else i for i in items]
    items = [items[k] for k in order(items, config.composite)]
    return RunPlan(
        run_id=uuid.uuid4().hex[:12],
        model=model,
        model_name=card.name,
        model_version=card.version,
        items=tuple(items),
        composite=config.composite,
        mask_buffer_m=config.cloud_buffer,
        grid=grid,
        tiles=tiles,
        region_wkt=config.region_wkt,
        precision=config.precision or ("bf16" if use_gpu else "fp32"),
        vectorise=config.vectorise,
        warnings=tuple(warnings),
        tta=config.tta,
        probabilities=config.probabilities,
    )


def _item(draft: _Draft, footprint: BaseGeometry, grid: Grid, card: ModelCard, config: RunConfig) -> Item:
    """A draft on the grid: its files as sources, its conversion to the card's convention, its mask."""
    sources = tuple(Source(s, b, slots, _is_aligned(s, grid)) for s, b, slots in draft.files)
    use_scl = draft.scl is not None and config.cloud_mask in ("auto", "scl")
    if config.cloud_mask == "scl" and draft.scl is None:
        raise ConfigError(f"--cloud-mask scl: item {draft.id} has no SCL band; use --cloud-mask auto (the cloud "
                          "model where there is none) or none")
    mask = Source(draft.scl, (1,), (), _is_aligned(draft.scl, grid)) if use_scl and draft.scl else None
    return Item(id=draft.id, sources=sources, grid_bounds=_bounds(footprint), datetime=draft.datetime,
                cloud_cover=draft.cloud_cover, offset=reflectance_shift(card, draft.data_offset), mask=mask,
                mask_kind="scl" if mask else None, href=draft.href)


def _with_model_mask(item: Item, grid: Grid, run_dir: str, buffer_m: float) -> Item:
    """The item with a cloud mask the cloud stage will compute (``clouds.py``) on the run's grid, over the
    item's footprint padded by the halo and the mask's buffer (every tile's read of it lies inside), as
    ``RUN_DIR/masks/ITEM.tif``."""
    pad = grid.halo + math.ceil(buffer_m / grid.res) + 1
    left, bottom, right, top = item.grid_bounds
    c0 = max(math.floor((left - grid.left) / grid.res), 0) - pad
    c1 = min(math.ceil((right - grid.left) / grid.res), grid.width) + pad
    r0 = max(math.floor((grid.top - top) / grid.res), 0) - pad
    r1 = min(math.ceil((grid.top - bottom) / grid.res), grid.height) + pad
    t = grid.transform * Affine.translation(c0, r0)
    url = storage.join(run_dir, MASKS_DIR, f"{_file_name(item.id)}.tif")
    scene = Scene(url, grid.crs, tuple(t)[:6], c1 - c0, r1 - r0, "uint8", ("mask",), None, None)
    return replace(item, mask=Source(scene, (1,), (), True), mask_kind="geoseg")


def _file_name(item_id: str) -> str:
    """An item id as a file name: anything but letters, digits, '-', '_' and '.' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", item_id)


def _resolution_warnings(config: RunConfig, card: ModelCard, scenes: list[Scene], resolutions: list[float],
                         res: float) -> list[str]:
    """Warnings for an output grid, or scenes, far finer or coarser than the scenes or the model."""
    warnings = []
    if config.resolution is not None:
        finest_res, far = min(resolutions), RESOLUTION_WARN_FACTOR
        for what, r in ((f"the finest scene's {finest_res:.3g} m", finest_res),
                        (f"the {card.gsd_m:g} m model {card.name!r} was trained for", card.gsd_m)):
            if max(res, r) / min(res, r) > far:
                msg = (f"--resolution {res:g} m is more than {far:g}x {'finer' if res < r else 'coarser'} than "
                       f"{what}: expect {'blurred input and more tiles' if res < r else 'lost detail'}; "
                       "leave --resolution out to use the scenes' own pixel size")
                log.warning(msg)
                warnings.append(msg)
    for s, r in zip(scenes, resolutions, strict=True):
        if max(r, card.gsd_m) / min(r, card.gsd_m) > RESOLUTION_WARN_FACTOR:
            msg = (f"scene {s.url} has {r:.3g} m pixels, more than {RESOLUTION_WARN_FACTOR:g}x off the "
                   f"{card.gsd_m:g} m model {card.name!r} was trained for: expect weaker predictions")
            log.warning(msg)
            warnings.append(msg)
    return warnings


def _too_many_tiles(count: str, limit: int) -> NoReturn:
    """Refuse a plan past --max-tiles: it is far more often a typo (a region, --resolution) than a wish."""
    raise ConfigError(f"the plan has {count} tiles, more than --max-tiles {limit:,}: map a smaller region, a coarser "
                      "--resolution or a larger --tile-size, or raise --max-tiles if this map is meant")


def _bounds(geometry: BaseGeometry) -> tuple[float, float, float, float]:
    left, bottom, right, top = (float(v) for v in geometry.bounds)
    return left, bottom, right, top


def resolve_model(model: str) -> str:
    """A model as every node finds it: a shipped name or URL as given, a local checkpoint as an absolute path."""
    if model in SHIPPED or "://" in model:
        return model
    return str(Path(model).expanduser().resolve())


def _lonlat_centre(scenes: list[Scene]) -> Point:
    """Centre of the scenes' union in lon/lat: where the default UTM zone is taken. A scene across the
    antimeridian (its outline spans more than 180°) is unwrapped to longitudes 0..360 first."""
    outlines = [_footprint(s, "EPSG:4326") for s in scenes]
    if any(o.bounds[2] - o.bounds[0] > 180 for o in outlines):
        outlines = [shapely_transform(_east_of_0, o) for o in outlines]
    return unary_union(outlines).centroid


def _east_of_0(x: float, y: float, z: float | None = None) -> tuple[float, ...]:
    """Longitudes as 0..360: a shape across the antimeridian in one piece."""
    return np.mod(x, 360.0), y


DESCRIBE_TILES = 50  # tiles whose items --dry-run lists one by one


def describe(plan: RunPlan) -> str:
    """A human summary of the plan, what ``--dry-run`` prints: the grid, the items in the composite rule's
    order, and the items each tile reads (the first ``DESCRIBE_TILES`` tiles)."""
    g = plan.grid
    crs = parse_crs(g.crs)
    name = f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else crs.name
    per_tile = _items_per_tile(plan)
    counts = per_tile.sum(axis=1)
    lines = [
        f"model     {plan.model_name} {plan.model_version} ({plan.model})"
        + (", test-time augmentation (8 flips and turns)" if plan.tta else "")
        + (", per-class probabilities" if plan.probabilities else ""),
        f"grid      {name}, {g.res:g} m pixels, {g.width} x {g.height} px, origin ({g.left:.2f}, {g.top:.2f})",
        f"tiles     {plan.tile_count} of {g.tile_size} px + {g.halo} px halo (input {g.input_size} px), "
        f"{g.tile_rows} x {g.tile_cols} tile grid",
        f"area      {plan.tile_count * (g.tile_size * g.res) ** 2 / 1e6:.3f} km2 covered by tiles",
        f"items     {len(plan.items)}, composite {plan.composite}; items per tile: min {counts.min()}, "
        f"mean {counts.mean():.2f}, max {counts.max()}",
    ]
    for k, item in enumerate(plan.items, 1):
        when = f"  {item.datetime}" if item.datetime else ""
        cloud = f"  cloud {item.cloud_cover:g} %" if item.cloud_cover is not None else ""
        offset = f"  offset {item.offset:+g}" if item.offset else ""
        mask = f"  mask {item.mask_kind}" if item.mask_kind else ""
        lines.append(f"  {k:>3} {item.id}{when}{cloud}{offset}{mask}")
        lines += [f"        {s.scene.url}  bands {s.bands}  {'aligned' if s.aligned else 'reprojected'}"
                  for s in item.sources]
    for t in range(min(plan.tile_count, DESCRIBE_TILES)):
        row, col = (int(v) for v in plan.tiles[t])
        ids = [plan.items[k].id for k in np.flatnonzero(per_tile[t])]
        lines.append(f"tile {t:>5} ({row}, {col})  {' '.join(ids) or 'no item'}")
    if plan.tile_count > DESCRIBE_TILES:
        lines.append(f"tile  ... {plan.tile_count - DESCRIBE_TILES} more")
    lines += [f"warning   {w}" for w in plan.warnings]
    return "\n".join(lines)


def _items_per_tile(plan: RunPlan) -> npt.NDArray[np.bool_]:
    """Whether each item's footprint box touches each tile's input square: (tiles, items)."""
    boxes = plan.grid.input_boxes(plan.tiles)
    out = np.zeros((plan.tile_count, len(plan.items)), bool)
    for k, item in enumerate(plan.items):
        out[:, k] = touches(boxes, item.grid_bounds)
    return out
