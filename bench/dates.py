"""What several dates cost the tile readers: reader CPU per output Mpx for 1..N catalogue items over one region.

    GEOSEG_DATA=../shared/data python bench/dates.py [--dates 1 2 4 7] [--composite first median] [--repeats 3]

A static catalogue of the real Strzegom dates (``tests/_stac.py``: per-band COGs, 20 m bands at 20 m, an SCL
band) is planned with ``geoseg.planner.make_plan`` for each number of dates, and the tile stage's own function
(``geoseg.tile.make_tile``: read every item band file by band file, resample the 20 m bands, convert offsets,
mask by SCL, composite, write the tile and its provenance) runs over every tile in this process on one thread,
timed by the process's CPU clock; the best of ``--repeats``. The reference is the same region read from one
10-band stack file per date (``--scenes``), which is what geoseg read before catalogues. Prints a table, then
one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _stac import ALL_DATES, make_catalogue, scene_path  # noqa: E402

from geoseg import store  # noqa: E402
from geoseg.config import RunConfig  # noqa: E402
from geoseg.model.checkpoint import load_card  # noqa: E402
from geoseg.planner import make_plan  # noqa: E402
from geoseg.tile import TileJob, make_tile, open_reader  # noqa: E402

DATA = Path(os.environ.get("GEOSEG_DATA", ROOT.parent / "shared" / "data"))
BBOX = "POLYGON ((16.2 50.97, 16.3 50.97, 16.3 51.02, 16.2 51.02, 16.2 50.97))"


def reader_cpu(config: RunConfig, work: Path, repeats: int) -> tuple[float, float, int]:
    """(best CPU seconds, output Mpx, items) of making every tile of the plan ``config`` gives."""
    plan = make_plan(config)
    card = load_card(plan.model)
    run_dir = str(work / f"run-{time.monotonic_ns()}")
    store.create(run_dir, plan.grid, plan.tiles, card.bands, card.input_dtype)
    stores = store.Stores(run_dir)
    best = float("inf")
    for k in range(repeats):
        job = TileJob(run_dir, plan.run_id, f"bench-{k}", plan.grid, plan.items, plan.composite, None,
                      card.input_dtype, len(card.bands), card.zero_is_nodata,
                      round(plan.mask_buffer_m / plan.grid.res))
        open_reader.cache_clear()
        t0 = time.process_time()
        for tile_id, (row, col) in enumerate(plan.tiles):
            make_tile(job, stores, tile_id, int(row), int(col))
        best = min(best, time.process_time() - t0)
    return best, plan.grid.width * plan.grid.height / 1e6, len(plan.items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dates", type=int, nargs="+", default=[1, 2, 4, 7])
    parser.add_argument("--composite", nargs="+", default=["first", "median"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="geoseg-dates-") as tmp:
        work = Path(tmp)
        dates = ALL_DATES[-max(args.dates):]
        url = make_catalogue(work / "stac", DATA, str(work / "stac"), dates=dates)
        for n in args.dates:
            stacks = tuple(str(scene_path(DATA, d)) for d in dates[-n:])
            base = RunConfig(scenes=stacks, out="unused", region_wkt=BBOX, tile_size=args.tile_size)
            cpu, mpx, items = reader_cpu(base, work, args.repeats)
            rows.append({"dates": n, "source": "stack files", "composite": "first", "items": items,
                         "cpu_s_per_mpx": round(cpu / mpx, 3)})
            window = f"{dates[-n][:4]}-{dates[-n][4:6]}-{dates[-n][6:]}/.."
            for rule in args.composite:
                config = RunConfig(scenes=(), stac=url, out="unused", region_wkt=BBOX, datetime=window,
                                   composite=rule, tile_size=args.tile_size)
                cpu, mpx, items = reader_cpu(config, work, args.repeats)
                rows.append({"dates": n, "source": "catalogue (per-band COGs + SCL)", "composite": rule,
                             "items": items, "cpu_s_per_mpx": round(cpu / mpx, 3)})
    print(f"{'dates':>5}  {'source':<32} {'composite':<9} {'reader CPU s / output Mpx':>25}")
    for r in rows:
        print(f"{r['dates']:>5}  {r['source']:<32} {r['composite']:<9} {r['cpu_s_per_mpx']:>25}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
