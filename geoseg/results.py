"""What a run tells its caller, typed: a tile's outcome, a run's status, and the run's report.

The runtime returns these and writes them as JSON (``report.json``); the CLI alone turns them into text and
exit codes. Workers import only :class:`TileError`, so this module stays free of heavy imports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TileError:
    """Why one tile failed in a worker: the exception's type and first line, without Ray's traceback."""

    error_type: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> TileError:
        """The error of an exception (Ray's wrapped task errors are unwrapped to their cause)."""
        cause = getattr(exc, "cause", None) or exc
        lines = str(cause).strip().splitlines()
        return cls(type(cause).__name__, lines[0] if lines else "")


@dataclass(frozen=True)
class TileOutcome:
    """A tile that failed for good in a run: where it is, in which stage, with what error, after how many tries."""

    id: int
    row: int
    col: int
    stage: str
    error_type: str
    message: str
    attempts: int

    @property
    def error(self) -> str:
        """``Type: message``, as a person reads it."""
        return f"{self.error_type}: {self.message}"


@dataclass(frozen=True)
class RunStatus:
    """Tiles done / failed / pending of a run, with each failed tile's outcome."""

    tiles_total: int
    tiles_done: int
    tiles_failed: int
    tiles_pending: int
    failed_tiles: tuple[TileOutcome, ...]

    @property
    def complete(self) -> bool:
        """Every tile is done."""
        return self.tiles_done == self.tiles_total


@dataclass(frozen=True)
class ModelUsed:
    """The model a run used: card name and version, and where it was loaded from."""

    name: str
    version: str
    source: str


@dataclass(frozen=True)
class Execution:
    """How the tiles were spread over the cluster in this run (no effect on any output)."""

    actors: int
    actor_cpus: float | None
    threads: int | None
    use_gpu: bool
    device: str | None
    precision: str
    batch_size: int
    prefetch: int
    tile_cpus: float
    readers_per_actor: int | None
    tiles_per_read: int
    tiles_per_call: int
    nodes: dict[str, list[str]] = field(default_factory=dict)
    """Ray node ids that ran each role ("tile" readers, "infer" actors)."""
    infra_retries: int = 0
    """Infrastructure faults met (dead workers, nodes or actors; store outages; a failed task or call counts
    once): their tiles were retried, and none was charged to a tile's attempts."""
    tile_attempts_failed: int = 0
    """Attempts charged to tiles: failures that were the tiles' own (0 on a run where only the cluster
    failed)."""


@dataclass(frozen=True)
class Outputs:
    """Files the run wrote, relative to RUN_DIR."""

    classes: str
    confidence: str
    polygons: str
    tiles_store: str
    predictions_store: str
    provenance: str | None = None
    """``provenance.tif``: where each pixel came from (``composite.py``); None in reports made before it."""
    margin: str | None = None
    """``margin.tif`` (or ``.vrt``): the two most likely classes' probability difference; None before it."""
    probabilities: str | None = None
    """``probabilities.tif``: every class's probability, in runs with ``--probabilities``; else None."""


@dataclass(frozen=True)
class ItemUsed:
    """An item (date) the run read, in the composite rule's order: provenance value k is item k - 1 here."""

    id: str
    datetime: str | None
    cloud_cover: float | None
    offset: float
    """What was added to its raw values to reach the model card's reflectance convention."""
    mask: str | None
    """Its cloud and shadow mask: "scl", "geoseg" (the cloud model), or None."""
    href: str | None
    files: tuple[str, ...]


@dataclass(frozen=True)
class RunReport:
    """A run's result, also written as ``report.json`` in RUN_DIR."""

    run_id: str
    model: ModelUsed
    tiles_total: int
    tiles_done: int
    tiles_failed: int
    tiles_processed: int
    """Tiles this run (or rerun) tried; the others were already done."""
    failed_tiles: tuple[TileOutcome, ...]
    class_area_m2: dict[str, float]
    """Area of each class's polygons in the GeoPackage."""
    class_pixel_area_m2: dict[str, float]
    """Area of each class's pixels in the class raster."""
    stage_s: dict[str, float]
    """Seconds per stage: plan, clouds (the cloud model's masks), tile_and_infer, mosaic, vectorise, total."""
    tiles_per_s: float | None
    execution: Execution | None
    """None when no tile needed work."""
    warnings: tuple[str, ...]
    outputs: Outputs | None
    """None when the run stopped before writing them (``error`` says why)."""
    error: str | None = None
    """Why the run stopped before its outputs (an ``ExecutionError``); None for a run that finished."""
    composite: str = "first"
    """How the items were combined (``composite.py``)."""
    items: tuple[ItemUsed, ...] = ()
    """The items read, in the composite rule's order."""

    @property
    def complete(self) -> bool:
        """Every tile is done, so the outputs cover the whole plan."""
        return self.tiles_done == self.tiles_total

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunReport:
        """Inverse of :meth:`to_json`."""
        d: dict[str, Any] = json.loads(text)
        return cls(**{
            **d, "model": ModelUsed(**d["model"]), "outputs": Outputs(**d["outputs"]) if d["outputs"] else None,
            "failed_tiles": tuple(TileOutcome(**t) for t in d["failed_tiles"]),
            "execution": Execution(**d["execution"]) if d["execution"] else None,
            "warnings": tuple(d["warnings"]),
            "items": tuple(ItemUsed(**{**i, "files": tuple(i["files"])}) for i in d.get("items", ())),
        })
