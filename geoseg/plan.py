"""The plan as data: scenes, model, grid, tiles and the settings that change outputs, saved before any work.

A rerun loads the plan instead of recomputing it, so it processes exactly the same tiles on exactly
the same grid with the same model, precision and settings. ``planner`` decides a plan; this module only
holds, saves and loads one, so tile workers import it without the planner's machinery.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import numpy.typing as npt

from geoseg import storage
from geoseg.config import VectoriseSettings
from geoseg.errors import RunDirError
from geoseg.grid import Grid
from geoseg.scenes import Scene

PLAN_FILE = "plan.json"


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
    """Shipped model name, absolute checkpoint path or URL: every node resolves it the same way."""
    model_name: str
    model_version: str
    scenes: tuple[SceneUse, ...]
    grid: Grid
    tiles: npt.NDArray[np.int32] = field(compare=False)
    region_wkt: str | None
    precision: str
    """"fp32" or "bf16": the forward pass's arithmetic, which changes the map in its last bits."""
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
            precision=d.get("precision", "fp32"),  # plans written before precision was recorded ran fp32 on CPUs
            vectorise=VectoriseSettings(**d["vectorise"]),
            warnings=tuple(d["warnings"]),
        )

    def same_work(self, other: RunPlan) -> bool:
        """Whether two plans would produce the same outputs (run ids aside)."""
        return replace(self, run_id="") == replace(other, run_id="") and np.array_equal(self.tiles, other.tiles)


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
