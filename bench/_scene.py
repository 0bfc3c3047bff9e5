"""Benchmark inputs made from the real data: a large Sentinel-2 scene and the naive sliding-window loop.

The real Strzegom stacks are 401 x 401 px, far below the 25 Mpx a throughput figure needs, so
``assemble_scene`` mirrors the seven dates tile by tile into one large GeoTIFF (every pixel real
reflectance, neighbouring copies flipped so fields run on across the seams). ``naive_segment`` is
what users write today without geoseg: one process, rasterio windows, the model, a full-scene array,
one GeoTIFF at the end; it is the baseline geoseg is compared with. It makes no polygons, so
``naive_polygons`` is what users glue on after it to get a GeoPackage.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOSEG_DATA", ROOT.parent / "shared" / "data"))


def strzegom_scenes(data_dir: Path = DATA) -> list[Path]:
    """The real Sentinel-2 stacks, in date order; fails loudly when the shared data is missing."""
    scenes = sorted((data_dir / "sentinel2_strzegom" / "scenes").glob("strzegom_*_33u.tif"))
    if not scenes:
        raise FileNotFoundError(f"no Sentinel-2 scenes under {data_dir}: set GEOSEG_DATA to the shared data folder")
    return scenes


def assemble_scene(path: Path, size: int, data_dir: Path = DATA) -> Path:
    """Write a ``size`` x ``size`` px, 10-band uint16 GeoTIFF mirrored from the real scenes.

    Georeferenced like the first real scene (its CRS, 10 m pixels, its top-left corner), tiled and
    deflate-compressed like a delivered scene, with the band names the model card asks for. Written
    one row of source tiles at a time, so memory stays at one such row whatever the size.
    """
    sources = strzegom_scenes(data_dir)
    stacks = []
    for p in sources:
        with rasterio.open(p) as src:
            stacks.append(src.read())
            profile, names = src.profile, src.descriptions
    t = stacks[0].shape[1]
    profile.update(width=size, height=size, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                   BIGTIFF="IF_SAFER")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        for i, r0 in enumerate(range(0, size, t)):
            row = [stacks[(3 * i + j) % len(stacks)][:, :: -1 if i % 2 else 1, :: -1 if j % 2 else 1]
                   for j in range(size // t + 1)]
            band = np.concatenate(row, axis=2)[:, : min(t, size - r0), :size]
            dst.write(band, window=Window(0, r0, size, band.shape[1]))
        dst.descriptions = names
    return path


def naive_segment(scene: Path, out: Path, model: str = "sentinel2-lulc", batch_size: int = 4,
                  tile_size: int | None = None, halo: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """The single-process sliding-window loop: the baseline geoseg must beat.

    Reads each tile's haloed window with rasterio (boundless, so edge tiles get context padding),
    predicts with the same model and the same forward pass as geoseg's actors (``geoseg.infer``; bf16
    on a GPU, as they do), keeps the core in a full-scene uint8 array and writes one GeoTIFF at the
    end. Tile size and halo default to the model card's, what a user reads off it. Returns the tile
    count, the tile size and halo used, and the seconds spent in reading, predicting and writing.
    """
    import torch

    from geoseg.infer import predict, prepare
    from geoseg.model.checkpoint import load_model

    card, net = load_model(model, device=device)
    net = net.to(memory_format=torch.channels_last)
    class_ids = torch.as_tensor(card.class_ids, device=device)
    t, h = tile_size or card.tile_size, card.halo if halo is None else halo
    seconds = {"read": 0.0, "predict": 0.0, "write": 0.0}
    with rasterio.open(scene) as src:
        classes = np.zeros((src.height, src.width), np.uint8)
        cores = [(r, c) for r in range(0, src.height, t) for c in range(0, src.width, t)]
        for b in range(0, len(cores), batch_size):
            batch = cores[b:b + batch_size]
            t0 = time.perf_counter()
            windows = [Window(c - h, r - h, t + 2 * h, t + 2 * h) for r, c in batch]
            image = np.stack([src.read(window=w, boundless=True, fill_value=0) for w in windows])
            valid = np.stack([src.read_masks(1, window=w, boundless=True) > 0 for w in windows])
            t1 = time.perf_counter()
            x = torch.from_numpy(prepare(card, image, valid, batch_size)).to(device)
            ids, _ = predict(net, x, class_ids, device == "cuda")
            ids = ids.cpu().numpy()
            t2 = time.perf_counter()
            for k, (r, c) in enumerate(batch):
                rows, cols = min(t, src.height - r), min(t, src.width - c)
                core = np.where(valid[k, h:h + rows, h:h + cols], ids[k, h:h + rows, h:h + cols], 0)
                classes[r:r + rows, c:c + cols] = core
            seconds["read"] += t1 - t0
            seconds["predict"] += t2 - t1
            seconds["write"] += time.perf_counter() - t2
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, nodata=0, tiled=True, compress="deflate")
    t0 = time.perf_counter()
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(classes, 1)
    seconds["write"] += time.perf_counter() - t0
    return {"tiles": len(cores), "tile_size": t, "halo": h, "seconds": seconds}


def naive_polygons(classes: Path, out: Path) -> dict[str, Any]:
    """Polygons by class from a class raster, as users glue them on by hand: ``rasterio.features.shapes``
    over the whole raster (4-connected, class 0 = no data left out), written with geopandas ``to_file``.

    The throughput benchmark also times ``gdal_polygonize.py`` (when installed) and counts the faster of
    the two; on a 100 Mpx class raster this was 2.7x faster (docs/vectorise.md). Returns the feature count."""
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape

    with rasterio.open(classes) as src:
        a, transform, crs = src.read(1), src.transform, src.crs
    pairs = [(shape(g), int(v)) for g, v in shapes(a, mask=a > 0, connectivity=4, transform=transform)]
    frame = gpd.GeoDataFrame({"class_id": [v for _, v in pairs]}, geometry=[g for g, _ in pairs], crs=crs)
    frame.to_file(out, layer="landcover", driver="GPKG")
    return {"features": len(frame)}
