"""The settings of a run, as frozen dataclasses with every field documented."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class RunConfig:
    """What the user asked for; normalised once at the boundary (CLI or job script)."""

    scenes: tuple[str, ...]
    """Scene GeoTIFFs, local paths or s3:// URLs; where scenes overlap, the first listed wins."""
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
    """Tile core side in pixels; None takes the model card's."""
    halo: int | None = None
    """Context pixels added on each side of a tile; None takes the model card's."""
    batch_size: int | None = None
    """Tiles per forward pass; every batch is padded to this size so a tile's prediction never
    depends on which other tiles share its batch. None: :func:`default_batch_size`."""
    vectorise: VectoriseSettings = VectoriseSettings()
    """Polygonising options."""


@dataclass(frozen=True)
class ExecutionSettings:
    """How the work is spread over the cluster; does not change any output."""

    ray_address: str | None = None
    """Ray cluster to join; None starts (or reuses) a local Ray."""
    actors: int | None = None
    """Inference actors; None: one per GPU on a GPU cluster, else one."""
    actor_cpus: float | None = None
    """CPUs reserved per inference actor (its torch thread count); None: 1 with a GPU, else the
    cluster's CPUs less what the tile readers need."""
    use_gpu: bool | None = None
    """Run inference on GPUs; None uses them when the cluster has any."""
    prefetch: int = 2
    """Batches an inference actor works on at once: one in the forward pass while the others are
    read from or written to the store."""
    readers_per_actor: int | None = None
    """Tile-reading tasks in flight per inference actor; None: 1 for a CPU actor (more only take the
    cores its forward pass needs: measured 89% pipeline efficiency with 1 reader, 79% with 2, 69% with 8
    on 2 cores), and the CPUs the actors leave free for a GPU actor."""
    tile_cpus: float = 0.25
    """CPUs reserved per tile-reading task (mostly I/O and GDAL warping)."""
    max_attempts: int = 2
    """Tries per tile within one run before it is recorded as failed."""
    progress: bool = True
    """Show tiles done / failed / total while running."""


CPU_BATCH = 4  # one torch thread per core: larger batches gain nothing on a CPU
GPU_BATCH = 64  # 90% of batch 256's rate on an H100 for the shipped models (docs/performance.md)


def default_batch_size(use_gpu: bool) -> int:
    """The batch that keeps the inference device busy: small on a CPU, large enough to fill a GPU."""
    return GPU_BATCH if use_gpu else CPU_BATCH
