"""The vectoriser's entry point, :func:`vectorise`, and the driver loop that streams blocks through the stages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Never, TypeAlias

import numpy as np
from affine import Affine
from tqdm import tqdm

from geoseg.config import VectoriseSettings
from geoseg.errors import ExecutionError
from geoseg.gpkg import GpkgWriter
from geoseg.polygonise.blocks import BlockPieces, BlockTask, Finished, Wkb, block_grid, polygonise_task
from geoseg.polygonise.executor import Handle, Jobs, map_in_order
from geoseg.polygonise.layer import FIELDS, LAYER, LandcoverLayer
from geoseg.polygonise.raster import read_info
from geoseg.polygonise.seams import MERGE_BATCH, SeamJoiner, merge_task
from geoseg.polygonise.sieve import graph_task, sieve
from geoseg.progress import bar

StreamResult: TypeAlias = "Finished | tuple[BlockPieces, Handle[Wkb]]"
"""What the driver loop takes from its jobs: a merge job's regions, or a block's pieces and a handle on their WKB."""


def vectorise(
    classes_path: str,
    out_gpkg: str | Path,
    class_names: Mapping[int, str] | None = None,
    *,
    confidence_path: str | None = None,
    block_size: int = 1024,
    connectivity: int = 4,
    min_area_m2: float = 0.0,
    simplify_m: float = 0.0,
    metadata: Mapping[str, str] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Polygonise a class raster into the ``landcover`` layer of a GeoPackage, block by block.

    With the defaults the polygons are exactly those of one ``rasterio.features.shapes`` call over the
    whole raster (made valid), whatever the block size; the driver only ever holds the strips and open
    border pieces along the front of arrived blocks, a few block results in flight and one batch of
    finished polygons (as WKB). Returns class name -> area (m2).
    """
    VectoriseSettings(connectivity, min_area_m2, simplify_m, block_size)  # checked as the CLI's settings are
    info = read_info(str(classes_path), confidence_path)
    names = dict(class_names) if class_names is not None else info.class_names
    grid = block_grid(info.height, info.width, block_size)
    tasks = [BlockTask(str(classes_path), confidence_path, w, connectivity, info.width) for w in grid]
    if min_area_m2 > 0:
        graphs = list(map_in_order(graph_task, tasks))
        luts = sieve(graphs, connectivity, min_area_m2 / info.pixel_m2)
        tasks = [replace(t, remap=luts[t.win.key]) for t in tasks]
    # regions go to CRS coordinates in the tasks, unless the coverage is simplified (in pixels) at the end
    transform = info.transform if simplify_m == 0 else None
    tasks = [replace(t, transform=transform) for t in tasks]
    pixel_size = float(np.sqrt(info.pixel_m2))
    with GpkgWriter(out_gpkg, LAYER, info.crs_wkt, FIELDS, metadata) as writer:
        layer = LandcoverLayer(writer, info, names, simplify_m / pixel_size)
        blocks = bar(len(tasks), "polygons", "block", progress)
        _stream(tasks, SeamJoiner(grid, connectivity), layer, transform, blocks)
        blocks.close()
        layer.finish()
    return layer.areas


def _stream(tasks: Sequence[BlockTask], joiner: SeamJoiner, layer: LandcoverLayer, transform: Affine | None,
            blocks: tqdm[Never]) -> None:
    """Polygonise the blocks, write finished regions as they arrive, and merge regions cut by borders in
    jobs of their own as soon as all their pieces are in."""
    jobs: Jobs[StreamResult] = Jobs()
    todo = iter(tasks)
    batch: list[list[int]] = []
    in_batch = 0
    jobs.fill(polygonise_task, todo, returns=2)
    while jobs:
        result = jobs.take()
        if isinstance(result, Finished):
            layer.add(result)
        else:
            block, wkb = result
            blocks.update()
            layer.add(block.final)
            for group in joiner.add(block, wkb):
                batch.append(group)
                in_batch += len(group)
            if batch and (in_batch >= MERGE_BATCH or joiner.all_arrived):
                job, sources = joiner.take(batch, transform)
                jobs.submit(merge_task, job, *sources)
                batch, in_batch = [], 0
        jobs.fill(polygonise_task, todo, returns=2)
    if len(joiner):
        raise ExecutionError(f"{len(joiner)} border pieces left unjoined: a block result is missing")
