"""The plan: scenes, model, grid, tiles and settings, decided once and saved before any work starts.

A rerun loads the plan instead of recomputing it, so it processes exactly the same tiles on exactly
the same grid with the same model and settings.
"""

from __future__ import annotations

import json
import logging
import uuid
from functools import lru_cache
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from rasterio.warp import calculate_default_transform
from shapely import wkt as shapely_wkt
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry
from shapely.ops import transform as shapely_transform
from shapely.ops import unary_union

from geoseg import storage
from geoseg.config import RunConfig, VectoriseSettings, default_batch_size, default_tile_size
from geoseg.errors import ConfigError, RegionError, RunDirError, SceneError
from geoseg.grid import Grid, snap_grid, tiles_covering, utm_epsg
from geoseg.model import SHIPPED
from geoseg.model.card import ModelCard
from geoseg.scenes import Scene, band_indexes, open_scene

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
RESOLUTION_WARN_FACTOR = 4.0


@dataclass(frozen=True)
class SceneUse:
    """A scene as the run uses it: which bands feed the model and where it lies on the grid."""

    scene: Scene
    bands: tuple[int, ...]
    grid_bounds: tuple[float, float, float, float]
    aligned: bool


@dataclass(frozen=True)
class RunPlan:
    """Everything that decides a run's outputs; saved as ``plan.json`` in RUN_DIR."""

    run_id: str
    model: str
    model_name: str
    model_version: str
    scenes: tuple[SceneUse, ...]
    grid: Grid
    tiles: np.ndarray = field(compare=False)
    region_wkt: str | None
    batch_size: int
    vectorise: VectoriseSettings
    warnings: tuple[str, ...]

    @property
    def tile_count(self) -> int:
        """Number of tiles to process."""
        return int(self.tiles.shape[0])

    def to_json(self) -> str:
        """The plan as JSON (tiles as two compact integer lists)."""
        d = asdict(replace(self, tiles=np.empty((0, 2), np.int32)))
        d["tiles"] = {"row": self.tiles[:, 0].tolist(), "col": self.tiles[:, 1].tolist()}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        """Inverse of ``to_json``."""
        d = json.loads(text)
        return cls(
            run_id=d["run_id"],
            model=d["model"],
            model_name=d["model_name"],
            model_version=d["model_version"],
            scenes=tuple(
                SceneUse(
                    scene=Scene(**{**s["scene"], "transform": tuple(s["scene"]["transform"]),
                                   "band_names": tuple(s["scene"]["band_names"])}),
                    bands=tuple(s["bands"]),
                    grid_bounds=tuple(s["grid_bounds"]),
                    aligned=s["aligned"],
                )
                for s in d["scenes"]
            ),
            grid=Grid(**d["grid"]),
            tiles=np.column_stack([d["tiles"]["row"], d["tiles"]["col"]]).astype(np.int32).reshape(-1, 2),
            region_wkt=d["region_wkt"],
            batch_size=d["batch_size"],
            vectorise=VectoriseSettings(**d["vectorise"]),
            warnings=tuple(d["warnings"]),
        )

    def same_work(self, other: RunPlan) -> bool:
        """Whether two plans would produce the same outputs (run ids aside)."""
        return replace(self, run_id="") == replace(other, run_id="") and np.array_equal(self.tiles, other.tiles)


def default_model(scene: Scene) -> str:
    """The shipped model for a scene's kind of imagery: 16-bit multispectral → Sentinel-2, 8-bit → RGB."""
    if scene.dtype == "uint16" and len(scene.band_names) >= 10:
        return "sentinel2-lulc"
    if scene.dtype == "uint8" and len(scene.band_names) in (3, 4):
        return "aerial-rgb"
    raise SceneError(
        f"no shipped model fits scene {scene.url} ({len(scene.band_names)} bands, {scene.dtype}): "
        f"pass --model with one of {sorted(SHIPPED)} or a checkpoint path"
    )


def check_scene(scene: Scene, card: ModelCard) -> tuple[int, ...]:
    """The contract check: the scene's pixel type and bands must fit the model card."""
    if scene.dtype != card.input_dtype:
        raise SceneError(
            f"scene {scene.url} is {scene.dtype} but model {card.name!r} expects {card.input_dtype} "
            f"({', '.join(card.bands)}): choose a model for this imagery with --model"
        )
    return band_indexes(scene, card.bands)


@lru_cache(maxsize=256)
def parse_crs(crs: str) -> ProjCRS:
    """A CRS parsed once: a continental plan has hundreds of scenes in a handful of CRSs."""
    return ProjCRS.from_user_input(crs)


@lru_cache(maxsize=256)
def transformer(src: str, dst: str) -> Transformer:
    """A coordinate transformer built once per pair of CRSs (building one costs milliseconds)."""
    return Transformer.from_crs(parse_crs(src), parse_crs(dst), always_xy=True)


def _footprint(scene: Scene, crs: str) -> BaseGeometry:
    """The scene's extent in ``crs``, densified so curved edges survive reprojection."""
    outline = box(*scene.bounds).segmentize(max(scene.res * scene.width, scene.res * scene.height) / 64)
    return shapely_transform(transformer(scene.crs, crs).transform, outline)


def region_in(region: BaseGeometry, crs: str) -> BaseGeometry:
    """A lon/lat region in the grid's CRS, densified so its edges follow the projection."""
    return shapely_transform(transformer("EPSG:4326", crs).transform, region.segmentize(0.01))


def _native_res(scene: Scene, crs: str) -> float:
    """The scene's pixel size expressed in the grid CRS's units."""
    if parse_crs(scene.crs) == parse_crs(crs):
        return scene.res
    transform, _, _ = calculate_default_transform(scene.crs, crs, scene.width, scene.height, *scene.bounds)
    return abs(transform.a)


def _is_aligned(scene: Scene, grid: Grid) -> bool:
    """Same CRS, same pixel size and pixel corners on the grid's lattice: read without resampling."""
    if parse_crs(scene.crs) != parse_crs(grid.crs):
        return False
    a, _, c, _, e, f = scene.transform
    if not np.isclose(a, grid.res, rtol=1e-9) or not np.isclose(-e, grid.res, rtol=1e-9):
        return False
    dx, dy = (c - grid.left) / grid.res, (grid.top - f) / grid.res
    return bool(np.isclose(dx, round(dx), atol=1e-6) and np.isclose(dy, round(dy), atol=1e-6))


def make_plan(config: RunConfig, use_gpu: bool = False) -> RunPlan:
    """Open every scene, check it against the model card, and lay the grid and tiles.

    Reads only scene headers: no pixels. Fails fast with a named error on anything no tile could use.
    ``use_gpu`` only picks the default batch size (more tiles per forward pass on a GPU).
    """
    if not config.scenes:
        raise ConfigError("no scenes given: pass --scenes FILE [FILE ...]")
    from geoseg.model.checkpoint import load_card  # here, not at the top: tile workers import this module without torch

    scenes = [open_scene(url, config.bands) for url in config.scenes]
    model = config.model or default_model(scenes[0])
    card = load_card(model)
    band_map = [check_scene(s, card) for s in scenes]

    region = shapely_wkt.loads(config.region_wkt) if config.region_wkt else None
    if config.crs:
        crs = parse_crs(config.crs)
        if not crs.is_projected:
            raise ConfigError(f"--crs {config.crs} is not a projected CRS: name one in metres, e.g. a UTM zone")
        crs_text = crs.to_wkt()
    else:
        centre = region.centroid if region is not None else _lonlat_centre(scenes)
        crs_text = ProjCRS.from_epsg(utm_epsg(centre.x, centre.y)).to_wkt()

    footprints = [_footprint(s, crs_text) for s in scenes]
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
    tiles = tiles_covering(grid, area)

    warnings = []
    for s, r in zip(scenes, resolutions):
        if max(r, card.gsd_m) / min(r, card.gsd_m) > RESOLUTION_WARN_FACTOR:
            msg = (f"scene {s.url} has {r:.3g} m pixels, more than {RESOLUTION_WARN_FACTOR:g}x off the "
                   f"{card.gsd_m:g} m model {card.name!r} was trained for: expect weaker predictions")
            log.warning(msg)
            warnings.append(msg)
    uses = tuple(
        SceneUse(scene=s, bands=b, grid_bounds=tuple(fp.bounds), aligned=_is_aligned(s, grid))
        for s, b, fp in zip(scenes, band_map, footprints)
    )
    return RunPlan(
        run_id=uuid.uuid4().hex[:12],
        model=model,
        model_name=card.name,
        model_version=card.version,
        scenes=uses,
        grid=grid,
        tiles=tiles,
        region_wkt=config.region_wkt,
        batch_size=config.batch_size or default_batch_size(use_gpu, grid.input_size),
        vectorise=config.vectorise,
        warnings=tuple(warnings),
    )


def _lonlat_centre(scenes: list[Scene]) -> Any:
    """Centre of the scenes' union in lon/lat: where the default UTM zone is taken."""
    return unary_union([_footprint(s, "EPSG:4326") for s in scenes]).centroid


def save_plan(run_dir: str, plan: RunPlan) -> None:
    """Write ``plan.json`` in RUN_DIR (atomically)."""
    storage.write_bytes(storage.join(run_dir, PLAN_FILE), plan.to_json().encode())


def load_plan(run_dir: str) -> RunPlan:
    """Read the plan a run was made with."""
    url = storage.join(run_dir, PLAN_FILE)
    if not storage.exists(url):
        raise RunDirError(f"{run_dir} holds no geoseg run (no {PLAN_FILE}): start one with `geoseg run --out {run_dir}`")
    return RunPlan.from_json(storage.read_bytes(url).decode())


def describe(plan: RunPlan) -> str:
    """A human summary of the plan, what ``--dry-run`` prints."""
    g = plan.grid
    crs = parse_crs(g.crs)
    name = f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else crs.name
    per_tile = _scenes_per_tile(plan)
    lines = [
        f"model     {plan.model_name} {plan.model_version} ({plan.model})",
        f"grid      {name}, {g.res:g} m pixels, {g.width} x {g.height} px, origin ({g.left:.2f}, {g.top:.2f})",
        f"tiles     {plan.tile_count} of {g.tile_size} px + {g.halo} px halo (input {g.input_size} px), "
        f"{g.tile_rows} x {g.tile_cols} tile grid",
        f"area      {plan.tile_count * (g.tile_size * g.res) ** 2 / 1e6:.3f} km2 covered by tiles",
        f"scenes    {len(plan.scenes)}; scenes per tile: min {per_tile.min()}, mean {per_tile.mean():.2f}, "
        f"max {per_tile.max()}",
    ]
    lines += [f"  {u.scene.url}  bands {u.bands}  {'aligned' if u.aligned else 'reprojected'}" for u in plan.scenes]
    lines += [f"warning   {w}" for w in plan.warnings]
    return "\n".join(lines)


def _scenes_per_tile(plan: RunPlan) -> np.ndarray:
    """How many scenes' footprint boxes touch each tile's input square."""
    boxes = plan.grid.input_boxes(plan.tiles)
    return sum((touches(boxes, u.grid_bounds) for u in plan.scenes), np.zeros(plan.tile_count, np.int64))


def touches(boxes: np.ndarray, bounds: tuple[float, float, float, float]) -> np.ndarray:
    """Which (N, 4) boxes overlap ``bounds`` (left, bottom, right, top) with a positive area."""
    left, bottom, right, top = bounds
    return (boxes[:, 0] < right) & (boxes[:, 2] > left) & (boxes[:, 1] < top) & (boxes[:, 3] > bottom)
