"""The settings of a run, as frozen dataclasses with every field documented.

Each validates itself when it is made, so a bad setting fails at the door (CLI, job script or notebook) with
the flag to change, before any tile is read: never after hours of inference.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from geoseg.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
COMPOSITES = ("first", "latest", "least-cloudy", "median")  # composite.py says what each does
CLOUD_MASKS = ("auto", "scl", "model", "none")
DEVICES = ("cuda", "cpu")
MAX_TILES = 10_000_000  # default --max-tiles: ~10^13 px of 1024 px tiles, far above any sane run


def absolute(path: str) -> str:
    """A local path as an absolute one (a URL as it is): every node must find the same file."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(value: float | None, name: str, unit: str = "") -> None:
    _require(value is None or (math.isfinite(value) and value > 0), f"{name} must be positive{unit}, got {value}")


@dataclass(frozen=True)
class VectoriseSettings:
    """How the class raster becomes polygons; the defaults keep the map exact."""

    connectivity: int = 4
    """4 or 8: which neighbouring pixels of one class join into one polygon."""
    min_area_m2: float = 0.0
    """Patches smaller than this merge into their neighbour; 0 keeps every pixel."""
    simplify_m: float = 0.0
    """Coverage-preserving simplification tolerance in metres; 0 keeps the pixel edges."""
    block_size: int = 1024
    """Side in pixels of the blocks polygonised in parallel."""

    def __post_init__(self) -> None:
        _require(self.connectivity in (4, 8), f"--connectivity must be 4 or 8, got {self.connectivity}")
        _require(math.isfinite(self.min_area_m2) and self.min_area_m2 >= 0,
                 f"--min-area must be 0 (keep every patch) or a positive area in m2, got {self.min_area_m2}")
        _require(math.isfinite(self.simplify_m) and self.simplify_m >= 0,
                 f"--simplify must be 0 (keep pixel edges) or a positive tolerance in metres, got {self.simplify_m}")
        _positive(self.block_size, "--block-size", " (pixels)")


@dataclass(frozen=True)
class RunConfig:
    """What the user asked for; normalised once at the boundary (CLI or job script)."""

    scenes: tuple[str, ...]
    """Scene GeoTIFFs, local paths or s3:// URLs (or none, with ``stac``); how overlapping scenes combine is
    ``composite``'s (by default the first listed wins)."""
    out: str
    """RUN_DIR: local folder or URL that receives plan, ledger, stores and outputs."""
    model: str | None = None
    """Shipped model name or checkpoint path; None picks one from the scenes' bands."""
    region_wkt: str | None = None
    """Area to map as WKT in lon/lat (EPSG:4326); None maps the union of the scene footprints."""
    crs: str | None = None
    """Output CRS (projected, metres); None takes the UTM zone of the region's centre."""
    resolution: float | None = None
    """Output pixel size in metres; None takes the finest scene's native pixel size."""
    bands: tuple[str, ...] | None = None
    """Names of every scene band in order, for scenes that do not name their own."""
    tile_size: int | None = None
    """Tile core side in pixels; None: :func:`default_tile_size` (larger than the card's, so less halo is
    recomputed; the network is fully convolutional)."""
    halo: int | None = None
    """Context pixels added on each side of a tile; None takes the model card's."""
    precision: str | None = None
    """Arithmetic of the forward pass, "fp32" or "bf16": they give slightly different maps, so the plan records
    it and a rerun keeps it. None: bf16 on GPU actors, fp32 on CPU actors (or the existing plan's)."""
    tta: bool = False
    """Test-time augmentation: average the softmax over each tile's 8 flips and quarter turns. Off by default: it
    costs 6-7x the inference time and adds less than the 0.01 mIoU on both shipped models that would earn it
    (docs/models.md, "Test-time augmentation"). It changes the map, so the plan records it and a rerun keeps it."""
    probabilities: bool = False
    """Also write every class's probability (``probabilities.tif``, uint8, one band per class): an output, so the
    plan records it."""
    vectorise: VectoriseSettings = VectoriseSettings()
    """Polygonising options."""
    max_tiles: int = MAX_TILES
    """Most tiles a plan may have: a typo in --resolution or the region should fail at planning, not after
    hours; raise it for a truly larger map."""
    stac: str | None = None
    """A STAC API or static catalogue/collection URL to find the items (dates) over the region in."""
    collection: str | None = None
    """The catalogue's collection to take items from (None: any)."""
    datetime: str | None = None
    """Time window START/END (ISO dates, '..' open) of the catalogue items."""
    max_cloud: float | None = None
    """Skip catalogue items whose ``eo:cloud_cover`` is above this percentage."""
    composite: str = "first"
    """How items (dates) that see one pixel combine: first, latest, least-cloudy or median (``composite.py``)."""
    cloud_mask: str = "auto"
    """Cloud and shadow masks: the item's SCL band (``scl``), the cloud model (``model``), none, or ``auto``:
    SCL where an item has it, else the model for catalogue items and none for --scenes files."""
    cloud_buffer: float = 100.0
    """Metres by which cloud and shadow masks grow: the hazy rim around a cloud, brighter than the ground but
    not flagged, would otherwise be composited as clear."""
    reflectance_offset: float | None = None
    """For --scenes files: what their values add to reflectance x 10000 (1000 for Sentinel-2 baseline 04.00
    and later, 0 before); None: read it from the files' band offset and scale, else take the model card's."""

    def __post_init__(self) -> None:
        # local paths made absolute here, once: workers resolve them in their own working directories
        object.__setattr__(self, "scenes", tuple(absolute(s) for s in self.scenes))
        object.__setattr__(self, "out", absolute(self.out) if self.out else self.out)
        object.__setattr__(self, "stac", absolute(self.stac) if self.stac else self.stac)
        _require(bool(self.scenes) != bool(self.stac),
                 "give the scenes with --scenes FILE [FILE ...] or a catalogue with --stac URL (one of the two)")
        _require(not self.stac or self.region_wkt is not None,
                 "--stac needs the area to map: pass --region REGION.geojson or --bbox W,S,E,N")
        _require(self.composite in COMPOSITES,
                 f"--composite must be one of {', '.join(COMPOSITES)}, got {self.composite!r}")
        _require(self.cloud_mask in CLOUD_MASKS,
                 f"--cloud-mask must be one of {', '.join(CLOUD_MASKS)}, got {self.cloud_mask!r}")
        _require(math.isfinite(self.cloud_buffer) and self.cloud_buffer >= 0,
                 f"--cloud-buffer must be 0 or more metres, got {self.cloud_buffer}")
        _require(self.max_cloud is None or 0 <= self.max_cloud <= 100,
                 f"--max-cloud must be a percentage 0..100, got {self.max_cloud}")
        _require(bool(self.out), "no RUN_DIR given: pass --out RUN_DIR")
        _positive(self.resolution, "--resolution", " (metres)")
        _positive(self.tile_size, "--tile-size", " (pixels)")
        _require(self.halo is None or self.halo >= 0, f"--halo must be 0 or more pixels, got {self.halo}")
        _require(self.precision is None or self.precision in PRECISIONS,
                 f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.bands is None or len(self.bands) > 0, "--bands names no band: give them comma-separated")
        _require(isinstance(self.max_tiles, int) and self.max_tiles > 0,
                 f"--max-tiles must be a positive number of tiles, got {self.max_tiles}")


@dataclass(frozen=True)
class ExecutionSettings:
    """How the work is spread over the cluster; does not change any output."""

    ray_address: str | None = None
    """Ray cluster to join; None starts (or reuses) a local Ray."""
    actors: int | None = None
    """Inference actors; None: one per GPU the cluster has or can have (autoscaling), else one per
    node offering CPUs."""
    actor_cpus: float | None = None
    """CPUs reserved per inference actor; None: 1 with a GPU, else its node's CPUs less the share
    reserved for tile readers there."""
    use_gpu: bool | None = None
    """Run inference on GPU actors; None: when the cluster has GPUs or its autoscaler can start GPU
    nodes. With True on an autoscaling cluster the actors wait for GPU nodes to arrive."""
    device: str | None = None
    """Where an actor's forward pass runs: "cuda" or "cpu"; None: "cuda" on GPU actors, else "cpu".
    "cpu" on GPU actors is for clusters that declare GPUs without having them (tests)."""
    prefetch: int = 2
    """Batches an inference actor works on at once: one in the forward pass while the others are
    read from or written to the store."""
    readers_per_actor: int | None = None
    """Tile-reading tasks (each a run of neighbouring tiles) in flight per inference actor; None: one
    per 8 CPUs of a CPU actor's node (at least 1), :data:`GPU_READERS` for a GPU actor: enough
    demand for CPU nodes that an autoscaler starts them."""
    tile_cpus: float = 0.25
    """CPUs reserved per tile-reading task (mostly I/O and GDAL warping)."""
    batch_size: int | None = None
    """Tiles per forward pass; every batch is padded to this size, so a tile's prediction never depends on
    which other tiles share its batch, nor on this setting. None: :func:`default_batch_size`."""
    max_attempts: int = 2
    """Tries per tile within one run before it is recorded as failed, counting only failures that are the
    tile's own (``faults.py``): infrastructure faults are retried without using them up."""
    deadline_s: float | None = None
    """Seconds every reader task and actor call may run (from its start) before its worker is ended and its
    tiles retried elsewhere; None: ``faults.Deadlines``, from the rates measured in this run."""
    infra_retries: int = 1000
    """Infrastructure faults the whole run may meet, each retried with backoff, before it ends with an
    ``ExecutionError``, its ledger saved: a cluster or store that keeps failing is not waited on forever. A
    failed reader task or actor call is one fault however many tiles it carried."""
    progress: bool = True
    """Show tiles done / failed / total while running."""

    def __post_init__(self) -> None:
        _positive(self.actors, "--actors", " (or leave it out for one per GPU or node)")
        _positive(self.actor_cpus, "actor_cpus")
        _require(self.device is None or self.device in DEVICES,
                 f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _positive(self.prefetch, "prefetch")
        _positive(self.readers_per_actor, "--readers-per-actor")
        _positive(self.tile_cpus, "tile_cpus")
        _positive(self.batch_size, "--batch-size")
        _positive(self.max_attempts, "max_attempts")
        _positive(self.deadline_s, "deadline_s", " (seconds)")
        _require(self.infra_retries >= 0, f"infra_retries must be 0 or more, got {self.infra_retries}")


TILE_SIZE = 1024  # default core: 1.27x computed px per output px at a 64 px halo, against 2.25x at 256
CPU_BATCH_PX = 4 * 384**2  # one CPU batch: larger ones gain nothing on a CPU (1 tile of 1024 + 2 x 64)
GPU_BATCH_PX = 64 * 384**2  # 90% of the rate of 4x that on an H100 for the shipped models (docs/performance.md)
GPU_READERS = 16  # tile-reading tasks in flight per GPU actor


def default_tile_size(width: int, height: int) -> int:
    """:data:`TILE_SIZE`, or less for a grid smaller than one tile (a multiple of 32, the network's stride)."""
    return min(TILE_SIZE, -(-max(width, height) // 32) * 32)


def default_batch_size(use_gpu: bool, input_size: int) -> int:
    """Tiles per forward pass that keep the device busy: few pixels on a CPU, enough to fill a GPU."""
    return max(1, (GPU_BATCH_PX if use_gpu else CPU_BATCH_PX) // input_size**2)
