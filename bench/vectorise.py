"""Benchmark: the blockwise vectoriser (1 and 2 Ray workers) against whole-raster polygonising.

Builds a class raster of at least 10000 x 10000 px from real class rasters (the shipped Sentinel-2 model's
predictions over the Strzegom scenes, or their real label rasters when no model is shipped), mirrored tile
by tile so that regions run on across the tiles' seams, then runs each method in its own process:

* ``blockwise-1`` / ``blockwise-2``: ``geoseg.polygonise.vectorise`` with Ray started with 1 / 2 CPUs,
* ``rasterio-whole``: one ``rasterio.features.shapes`` call over the whole raster, written with pyogrio,
* ``gdal_polygonize``: GDAL's ``gdal_polygonize.py`` (Debian's gdal-bin), or "not installed".

Each method's peak memory is sampled from its whole process tree (Ray's GCS, raylet and workers included;
proportional set size, so that shared pages such as Ray's object store count once) and from its main process
alone (unique set size: the pages it holds privately). Usage::

    .venv/bin/python bench/vectorise.py [--size 10000] [--block-size 1024] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyogrio
import pyogrio.raw
import rasterio
import rasterio.features
import shapely
from shapely.geometry import shape

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _scene import strzegom_scenes  # noqa: E402

METHODS = ("blockwise-1", "blockwise-2", "rasterio-whole", "gdal_polygonize")


def real_tiles() -> tuple[list[np.ndarray], str]:
    """One real class raster per Strzegom date: the shipped Sentinel-2 model's predictions."""
    import torch

    from geoseg.infer import predict
    from geoseg.model.checkpoint import load_model

    card, model = load_model("sentinel2-lulc")
    scenes = strzegom_scenes()
    tiles = []
    for scene in scenes:
        with rasterio.open(scene) as src:
            x = torch.from_numpy(card.normalise(src.read())[None])
        tiles.append(predict(model, x, torch.from_numpy(card.class_ids))[0][0].numpy())
    return tiles, f"predictions of {card.name} v{card.version} over {len(scenes)} scenes"


def build_raster(path: Path, size: int) -> str:
    """Mirror the real tiles into a size x size GeoTIFF, one band of tiles at a time (bounded memory)."""
    tiles, source = real_tiles()
    t = tiles[0].shape[0]
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633",
                   transform=rasterio.Affine(10, 0, 500000, 0, -10, 5700000), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
    with rasterio.open(path, "w", **profile) as dst:
        for i, r in enumerate(range(0, size, t)):
            row = []
            for j in range(0, size // t + 1):
                tile = tiles[(i * 3 + j) % len(tiles)]
                row.append(tile[:: -1 if i % 2 else 1, :: -1 if j % 2 else 1])
            band = np.concatenate(row, axis=1)[: min(t, size - r), :size]
            dst.write(band, 1, window=rasterio.windows.Window(0, r, size, band.shape[0]))
    return source


def run_method(method: str, raster: str, out: Path, block_size: int, workdir: Path) -> dict[str, float]:
    """Inside the child process: run one method and return what it produced."""
    if method.startswith("blockwise"):
        import ray

        from geoseg.cluster import connect
        from geoseg.polygonise import vectorise

        t0 = time.perf_counter()
        connect(num_cpus=int(method[-1]), temp_dir=str(workdir / "ray"))  # as geoseg starts its local Ray
        # warm-up: start the workers and import geoseg in them, as in a job whose Ray has been running
        with rasterio.open(raster) as src:
            small = src.read(1, window=rasterio.windows.Window(0, 0, 256, 256))
            profile = dict(src.profile, width=256, height=256)
        with rasterio.open(workdir / "warmup.tif", "w", **profile) as dst:
            dst.write(small, 1)
        vectorise(str(workdir / "warmup.tif"), workdir / "warmup.gpkg", block_size=64)
        t1 = time.perf_counter()
        areas = vectorise(raster, out, block_size=block_size)
        t2 = time.perf_counter()
        ray.shutdown()
        return {"seconds": t2 - t1, "ray_start_s": t1 - t0,
                "features": pyogrio.read_info(out, layer="landcover")["features"],
                "area_m2": sum(areas.values())}
    if method == "rasterio-whole":
        t0 = time.perf_counter()
        with rasterio.open(raster) as src:
            a, transform, crs = src.read(1), src.transform, src.crs
        geoms, values = [], []
        for g, v in rasterio.features.shapes(a, mask=a > 0, connectivity=4, transform=transform):
            geoms.append(shape(g))
            values.append(int(v))
        t1 = time.perf_counter()
        geo = np.array(geoms, dtype=object)
        pyogrio.raw.write(str(out), shapely.to_wkb(geo), [np.array(values)], ["class_id"], layer="landcover",
                      driver="GPKG", geometry_type="Polygon", crs=crs.to_wkt())
        t2 = time.perf_counter()
        return {"seconds": t2 - t0, "shapes_s": t1 - t0, "features": len(geo), "area_m2": 0.0}
    cmd = [shutil.which("gdal_polygonize.py") or "gdal_polygonize.py", raster, "-b", "1", "-mask", raster,
           "-f", "GPKG", str(out), "landcover", "class_id"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    t1 = time.perf_counter()
    return {"seconds": t1 - t0, "features": pyogrio.read_info(out)["features"], "area_m2": 0.0}


def measure(method: str, raster: str, block_size: int, workdir: Path) -> dict[str, float] | str:
    """Run one method in a fresh process and sample the peak memory of its process tree."""
    if method == "gdal_polygonize" and shutil.which("gdal_polygonize.py") is None:
        return "not installed (apt-get install gdal-bin)"
    out = workdir / f"{method}.gpkg"
    out.unlink(missing_ok=True)
    result = workdir / f"{method}.json"
    proc = subprocess.Popen([sys.executable, __file__, "--child", method, "--raster", raster, "--out", str(out),
                             "--block-size", str(block_size), "--workdir", str(workdir), "--result", str(result)])
    main = psutil.Process(proc.pid)
    peaks = {"tree": 0, "main": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                procs = [main] + main.children(recursive=True)
                mem = {p.pid: p.memory_full_info() for p in procs if p.is_running()}
            except psutil.Error:
                continue
            # PSS shares pages mapped by several processes (Ray's object store) out among them, so the
            # tree's sum is its real footprint; the main process's own memory is its USS (private pages)
            peaks["tree"] = max(peaks["tree"], sum(m.pss for m in mem.values()))
            peaks["main"] = max(peaks["main"], mem[main.pid].uss if main.pid in mem else 0)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    done.set()
    sampler.join()
    if code != 0:
        return f"failed with exit status {code}"
    stats = json.loads(result.read_text())
    stats.update(peak_tree_mib=peaks["tree"] / 2**20, peak_main_mib=peaks["main"] / 2**20)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10000, help="raster width and height in pixels (default 10000)")
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=None, help="where the raster and outputs go (default: a temp dir)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--raster", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        stats = run_method(args.child, args.raster, args.out, args.block_size, args.workdir)
        args.result.write_text(json.dumps(stats))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="geoseg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    raster = workdir / f"classes_{args.size}.tif"
    t0 = time.perf_counter()
    source = build_raster(raster, args.size)
    mpx = args.size * args.size / 1e6
    print(f"class raster {args.size} x {args.size} ({mpx:.0f} Mpx) from {source}, built in "
          f"{time.perf_counter() - t0:.1f} s; block size {args.block_size}; {os.cpu_count()} CPUs")
    print(f"{'method':<16} {'seconds':>8} {'Mpx/s':>7} {'features':>9} {'tree PSS MiB':>14} {'main USS MiB':>14} "
          f"{'load':>5}")
    for method in args.methods:
        r = measure(method, str(raster), args.block_size, workdir)
        if isinstance(r, str):
            print(f"{method:<16} {r}")
            continue
        extra = ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k in ("ray_start_s", "shapes_s"))
        print(f"{method:<16} {r['seconds']:8.1f} {mpx / r['seconds']:7.2f} {int(r['features']):9d} "
              f"{r['peak_tree_mib']:14.0f} {r['peak_main_mib']:14.0f} {os.getloadavg()[0]:5.1f}"
              + (f"   ({extra})" if extra else ""),
              flush=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
