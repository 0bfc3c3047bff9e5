"""Benchmark: the mosaic stage (predictions.zarr → classes.tif + confidence.tif) in Mpx/s of both rasters.

Builds a ``--size`` x ``--size`` predictions.zarr from real model output (the shipped Sentinel-2 model's class
ids and confidence over the seven Strzegom dates, mirrored tile by tile so that fields run on across the
seams, with a no-data corner as outside a mapped region), starts Ray with every core, runs the mosaic once
untimed (it starts Ray's workers, which in a run the tile tasks have started), then times
``geoseg.mosaic.mosaic`` ``--repeat`` times. Prints each time and, last, one JSON line with ``mosaic_mpx_s``
(the median run; pixels of one raster per second, both rasters written) and ``best_mpx_s``. Usage::

    .venv/bin/python bench/mosaic.py [--size 5120] [--repeat 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _scene import DATA, strzegom_scenes  # noqa: E402

from geoseg import store  # noqa: E402
from geoseg.grid import Grid  # noqa: E402
from geoseg.model.card import ModelCard  # noqa: E402

MODEL = "sentinel2-lulc"


def real_predictions(data_dir: Path = DATA, dates: int = 7) -> tuple[ModelCard, list[tuple[np.ndarray, np.ndarray]]]:
    """The shipped Sentinel-2 model's (class ids, confidence) over the first ``dates`` real Strzegom scenes."""
    import rasterio
    import torch

    from geoseg.infer import predict
    from geoseg.model.checkpoint import load_model

    card, model = load_model(MODEL)
    out = []
    for scene in strzegom_scenes(data_dir)[:dates]:
        with rasterio.open(scene) as src:
            x = torch.from_numpy(card.normalise(src.read())[None])
        classes, confidence = predict(model, x, torch.from_numpy(card.class_ids))
        out.append((classes[0].numpy(), confidence[0].numpy()))
    return card, out


def mirrored(tiles: list[np.ndarray], height: int, width: int, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Rows ``r0:r1`` of a ``height`` x ``width`` raster tiled with ``tiles``, neighbours flipped so edges meet."""
    t = tiles[0].shape[0]
    r1 = height if r1 is None else r1
    rows = []
    for i in range(r0 // t, (r1 - 1) // t + 1):
        row = [tiles[(3 * i + j) % len(tiles)][:: -1 if i % 2 else 1, :: -1 if j % 2 else 1]
               for j in range(width // t + 1)]
        rows.append(np.concatenate(row, axis=1)[:, :width])
    band = np.concatenate(rows, axis=0)
    return band[r0 - (r0 // t) * t: r1 - (r0 // t) * t]


def empty_predictions(run_dir: str, grid: Grid, card: ModelCard) -> zarr.Group:
    """A run's stores over every tile of ``grid``, as the planner makes them; its predictions group, to fill."""
    tiles = np.array([(r, c) for r in range(grid.tile_rows) for c in range(grid.tile_cols)], dtype=np.int32)
    store.create(run_dir, grid, tiles, card.bands, card.input_dtype)
    return zarr.open_group(os.path.join(run_dir, store.PREDICTIONS), mode="r+")


def write_predictions(run_dir: str, card: ModelCard, predictions: list[tuple[np.ndarray, np.ndarray]],
                      height: int, width: int, crs: str = "EPSG:32633") -> Grid:
    """A run's predictions.zarr of ``height`` x ``width`` px from real predictions, with a no-data corner
    (the triangle above the anti-diagonal's first fifth), as a run over a region leaves outside it."""
    grid = Grid(crs=crs, res=10.0, left=500000.0, top=5700000.0, width=width, height=height,
                tile_size=card.tile_size, halo=card.halo)
    g = empty_predictions(run_dir, grid, card)
    cut = (height + width) // 5
    for r0 in range(0, height, grid.tile_size):
        r1 = min(r0 + grid.tile_size, height)
        outside = (np.arange(r0, r1)[:, None] + np.arange(width)[None, :]) < cut
        for k, name in enumerate(("classes", "confidence")):
            band = mirrored([p[k] for p in predictions], height, width, r0, r1)
            g[name][r0:r1] = np.where(outside, 0, band)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    import ray

    from geoseg.cluster import connect
    from geoseg.mosaic import mosaic

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="geoseg-bench-mosaic-"))
    card, predictions = real_predictions()
    run_dir = str(workdir / "run")
    grid = write_predictions(run_dir, card, predictions, args.size, args.size)
    connect(num_cpus=os.cpu_count(), temp_dir=tempfile.mkdtemp(prefix="gsb-ray-", dir="/tmp"))
    tags = {"GEOSEG_RUN_ID": "bench", "GEOSEG_MODEL": f"{card.name} {card.version}"}
    mosaic(run_dir, grid, card, tags)
    seconds = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        mosaic(run_dir, grid, card, tags)
        seconds.append(time.perf_counter() - t0)
        print(f"mosaic of {args.size} x {args.size} px, both rasters: {seconds[-1]:.3f} s "
              f"({grid.width * grid.height / seconds[-1] / 1e6:.1f} Mpx/s)", flush=True)
    ray.shutdown()
    mpx = grid.width * grid.height / 1e6
    print(json.dumps({"size": args.size, "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
                      "seconds": [round(s, 3) for s in seconds],
                      "mosaic_mpx_s": round(mpx / statistics.median(seconds), 1),
                      "best_mpx_s": round(mpx / min(seconds), 1)}))


if __name__ == "__main__":
    main()
