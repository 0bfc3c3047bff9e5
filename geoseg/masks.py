"""The cloud stage: a cloud and shadow mask for every item without an SCL band, before any tile is read.

The planner gives such an item a mask on the run's own grid, over the item's footprint padded by the halo and
the mask buffer, at ``RUN_DIR/masks/ITEM.tif`` (``planner._with_model_mask``). Here a Ray task per item reads
the bands the cloud model takes over that whole window, as the tile readers would (``tile.read_item``: band
files resampled onto the grid, converted to the card's reflectance convention), runs the cloud model once over
it (``clouds.cloud_mask``) and publishes the mask as a COG. One window per item means no tile borders in the
mask, so it cannot make seams; the tiles then read it like an SCL band. A rerun finds the masks made.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import rasterio
import ray
from affine import Affine
from rasterio.crs import CRS
from ray.exceptions import RayError

from geoseg import storage
from geoseg.clouds import NODATA, cloud_mask, model_bands
from geoseg.grid import Grid
from geoseg.model.card import ModelCard
from geoseg.plan import Item, RunPlan, Source
from geoseg.scenes import normalise_band_name
from geoseg.tile import TileJob, read_item

log = logging.getLogger(__name__)

MASK_CPUS = 1  # a mask task's CPUs: the cloud model runs on one onnxruntime thread (deterministic output)


def make_masks(run_dir: str, plan: RunPlan, card: ModelCard) -> list[str]:
    """Compute, as Ray tasks, the cloud masks the plan's items need and RUN_DIR does not hold yet; the ids of
    the items whose mask could not be made (their tiles then fail, listed, and a rerun tries again)."""
    todo = [item for item in plan.items
            if item.mask_kind == "geoseg" and item.mask is not None and not storage.exists(item.mask.scene.url)]
    if not todo:
        return []
    task = ray.remote(mask_item).options(num_cpus=MASK_CPUS, max_retries=2,
                                         runtime_env={"env_vars": storage.task_env()})
    refs = {item.id: task.remote(run_dir, plan.run_id, plan.grid, item, card) for item in todo}
    failed = []
    for item_id, ref in refs.items():
        try:
            ray.get(ref)
        except RayError as exc:
            log.warning("the cloud mask of item %s could not be made (%s): its tiles fail, and `geoseg rerun` "
                        "tries again", item_id, exc)
            failed.append(item_id)
    return failed


def mask_item(run_dir: str, run_id: str, grid: Grid, item: Item, card: ModelCard) -> None:
    """Read an item over its mask's window, run the cloud model once over all of it and publish the mask."""
    assert item.mask is not None
    mask = item.mask.scene
    transform, shape = Affine(*mask.transform), (mask.height, mask.width)
    names = tuple(normalise_band_name(b) for b in card.bands)
    job = TileJob(run_dir, run_id, f"mask-{item.id}", grid, (replace(item, sources=_cloud_sources(item, names),
                  mask=None),), "first", None, card.input_dtype, len(card.bands), card.zero_is_nodata)
    observed = read_item(job, 0, transform, shape)
    codes = cloud_mask(observed.data, names, scale=card.scale, offset=-(card.reflectance_offset or 0.0),
                       res_m=grid.res)
    codes[~observed.seen] = NODATA
    with tempfile.TemporaryDirectory(prefix="geoseg-mask-") as tmp:
        local = Path(tmp, "mask.tif")
        with rasterio.open(local, "w", driver="COG", width=shape[1], height=shape[0], count=1, dtype="uint8",
                           crs=CRS.from_wkt(mask.crs), transform=transform, compress="deflate",
                           overview_resampling="nearest") as dst:
            dst.write(codes.astype(np.uint8), 1)
            dst.update_tags(GEOSEG_ITEM=item.id, CODES="0 no data, 1 clear, 2 cloud, 3 shadow")
        storage.put_file(local, mask.url)


def _cloud_sources(item: Item, band_names: tuple[str, ...]) -> tuple[Source, ...]:
    """The item's files cut to the bands the cloud model takes (six of Sentinel-2's ten): a whole item is read
    at once, so every band left out saves a full-scene read; the other slots stay zero and unread."""
    wanted = set(model_bands(band_names).values())
    cut = (replace(s, bands=tuple(b for b, slot in zip(s.bands, s.slots, strict=True) if slot in wanted),
                   slots=tuple(slot for slot in s.slots if slot in wanted)) for s in item.sources)
    return tuple(s for s in cut if s.slots)
