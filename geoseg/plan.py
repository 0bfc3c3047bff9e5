"""The plan as data: scenes, model, grid, tiles and the settings that change outputs, saved before any work.

A rerun loads the plan instead of recomputing it, so it processes exactly the same tiles on exactly
the same grid with the same model, precision and settings. ``planner`` decides a plan; this module only
holds, saves and loads one, so tile workers import it without the planner's machinery.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from geoseg import storage
from geoseg.config import VectoriseSettings
from geoseg.errors import RunDirError
from geoseg.grid import Grid
from geoseg.scenes import Scene

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class Source:
    """One file of an item and the model bands it holds: a multi-band scene holds them all, a catalogue item's
    per-band asset one each (at its own resolution: the reader resamples it onto the grid)."""

    scene: Scene
    bands: tuple[int, ...]
    """1-based band indexes in the file ..."""
    slots: tuple[int, ...]
    """... and the positions in the model's band order they fill."""
    aligned: bool
    """Same CRS and pixel lattice as the grid: read as stored, without the warper."""


MASKS_DIR = "masks"
"""Where the cloud stage writes the masks it computes, in RUN_DIR (``ITEM.tif``)."""
MASK_KINDS = ("scl", "geoseg")
"""A mask source's codes: Sentinel-2's Scene Classification (SCL), or geoseg's own (``clouds.py``)."""


@dataclass(frozen=True)
class Item:
    """One observation of the ground (a date): the files holding the model's bands, what is known of it, and
    how its values convert to the model card's reflectance convention."""

    id: str
    sources: tuple[Source, ...]
    grid_bounds: tuple[float, float, float, float]
    """Its footprint's box on the grid's CRS: the tiles it may touch."""
    datetime: str | None = None
    """ISO 8601 acquisition time (catalogue items); None for files given by --scenes (their order rules)."""
    cloud_cover: float | None = None
    """The item's cloud cover in percent as its catalogue states it: ``least-cloudy`` ranks dates by it."""
    offset: float = 0.0
    """Added to every valid raw value: converts the item's reflectance convention to the card's (e.g. +1000
    for a scene before Sentinel-2 processing baseline 04.00, read by a model trained on offset data)."""
    mask: Source | None = None
    """Its cloud and shadow mask (one band), if any ..."""
    mask_kind: str | None = None
    """... and the codes it holds, one of :data:`MASK_KINDS`."""
    href: str | None = None
    """Where the item came from (its STAC item's URL), for the report."""

    @property
    def urls(self) -> tuple[str, ...]:
        """Every file the item reads."""
        return tuple(s.scene.url for s in (*self.sources, *((self.mask,) if self.mask else ())))


@dataclass(frozen=True)
class RunPlan:
    """Everything that decides a run's outputs; saved as ``plan.json`` in RUN_DIR."""

    run_id: str
    model: str
    """Shipped model name, absolute checkpoint path or URL: every node resolves it the same way."""
    model_name: str
    model_version: str
    items: tuple[Item, ...]
    """What is read, in the order the composite rule takes it (``composite.order``)."""
    composite: str
    """How items that see the same pixel are combined: one of ``composite.RULES``."""
    mask_buffer_m: float
    """How far cloud and shadow masks grow, in metres (hazy rims around clouds are not clear ground)."""
    grid: Grid
    tiles: npt.NDArray[np.int32] = field(compare=False)
    region_wkt: str | None
    precision: str
    """"fp32" or "bf16": the forward pass's arithmetic, which changes the map in its last bits."""
    vectorise: VectoriseSettings
    warnings: tuple[str, ...]
    tta: bool = False
    """Test-time augmentation: the softmax averaged over each tile's flips and quarter turns (``infer``)."""
    probabilities: bool = False
    """Whether the run also writes per-class probabilities (``probabilities.tif``)."""

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
            items=tuple(_item(i) for i in d["items"]) if "items" in d else tuple(_old_item(u) for u in d["scenes"]),
            composite=d.get("composite", "first"),
            mask_buffer_m=d.get("mask_buffer_m", 0.0),
            grid=Grid(**d["grid"]),
            tiles=np.column_stack([d["tiles"]["row"], d["tiles"]["col"]]).astype(np.int32).reshape(-1, 2),
            region_wkt=d["region_wkt"],
            precision=d.get("precision", "fp32"),  # plans written before precision was recorded ran fp32 on CPUs
            vectorise=VectoriseSettings(**d["vectorise"]),
            warnings=tuple(d["warnings"]),
            tta=d.get("tta", False),  # plans written before test-time augmentation ran without it
            probabilities=d.get("probabilities", False),  # as did those written before probabilities.tif
        )

    def same_work(self, other: RunPlan) -> bool:
        """Whether two plans would produce the same outputs (run ids aside)."""
        return replace(self, run_id="") == replace(other, run_id="") and np.array_equal(self.tiles, other.tiles)


def _scene(d: dict[str, Any]) -> Scene:
    return Scene(**{**d, "transform": tuple(d["transform"]), "band_names": tuple(d["band_names"])})


def _source(d: dict[str, Any]) -> Source:
    return Source(_scene(d["scene"]), tuple(d["bands"]), tuple(d["slots"]), d["aligned"])


def _item(d: dict[str, Any]) -> Item:
    return Item(**{**d, "sources": tuple(_source(s) for s in d["sources"]), "grid_bounds": tuple(d["grid_bounds"]),
                   "mask": _source(d["mask"]) if d["mask"] else None})


def _old_item(d: dict[str, Any]) -> Item:
    """A scene of a plan written before items (one multi-band file each, first listed wins), as an item."""
    scene = _scene(d["scene"])
    source = Source(scene, tuple(d["bands"]), tuple(range(len(d["bands"]))), d["aligned"])
    return Item(scene.url.rsplit("/", 1)[-1], (source,), tuple(d["grid_bounds"]))


def save_plan(run_dir: str, plan: RunPlan) -> None:
    """Write ``plan.json`` in RUN_DIR (atomically)."""
    storage.write_bytes(storage.join(run_dir, PLAN_FILE), plan.to_json().encode())


def load_plan(run_dir: str) -> RunPlan:
    """Read the plan a run was made with."""
    url = storage.join(run_dir, PLAN_FILE)
    if not storage.exists(url):
        raise RunDirError(f"{run_dir} holds no geoseg run (no {PLAN_FILE}): "
                          f"start one with `geoseg run --out {run_dir}`")
    return RunPlan.from_json(storage.read_bytes(url).decode())


def touches(boxes: npt.NDArray[np.float64], bounds: tuple[float, float, float, float]) -> npt.NDArray[np.bool_]:
    """Which (N, 4) boxes overlap ``bounds`` (left, bottom, right, top) with a positive area."""
    left, bottom, right, top = bounds
    return (boxes[:, 0] < right) & (boxes[:, 2] > left) & (boxes[:, 1] < top) & (boxes[:, 3] > bottom)
