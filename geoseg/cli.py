"""``geoseg``: thin commands over the library. Loose input is normalised here, once."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from shapely.affinity import translate
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union
from shapely.validation import explain_validity

from geoseg.config import (
    CLOUD_MASKS,
    COMPOSITES,
    MAX_TILES,
    PRECISIONS,
    ExecutionSettings,
    RunConfig,
    VectoriseSettings,
)
from geoseg.errors import ConfigError, ExecutionError, GeosegError, RegionError
from geoseg.results import RunReport, RunStatus

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a setting, scene or RUN_DIR that cannot be used: nothing was changed
EXIT_TILES_FAILED = 3  # the run finished but some tiles failed (or are pending): `geoseg rerun` them
EXIT_STOPPED = 4  # the cluster or store kept failing: the run stopped, its ledger and report saved; `geoseg rerun`


def parse_region(region: str | None, bbox: str | None) -> str | None:
    """``--region FILE.geojson`` or ``--bbox W,S,E,N`` (lon/lat) → WKT in EPSG:4326.

    A region across the antimeridian (``--bbox`` with W > E, or GeoJSON split at 180° as RFC 7946 asks) comes
    back as one piece with longitudes past 180°, so the planner lays one grid in one CRS over it."""
    if region and bbox:
        raise ConfigError("give either --region or --bbox, not both")
    if bbox:
        try:
            w, s, e, n = (float(v) for v in bbox.split(","))
        except ValueError as exc:
            raise RegionError(f"--bbox {bbox!r} is not W,S,E,N in degrees, "
                              "e.g. --bbox 16.30,50.98,16.36,51.01") from exc
        if not (-180 <= w <= 180 and -180 <= e <= 180 and w != e and -90 <= s < n <= 90):
            raise RegionError(f"--bbox {bbox!r} must be W,S,E,N in lon/lat with S < N and W != E "
                              "(W > E crosses the antimeridian)")
        if w > e and e + 360 - w >= 180:
            raise RegionError(f"--bbox {bbox!r} has W > E, which reads as a box {e + 360 - w:g}° wide across the "
                              "antimeridian: give W,S,E,N with W < E (W > E only for a box across 180°)")
        return box(w, s, e + 360 if w > e else e, n).wkt
    if region:
        try:
            data = json.loads(Path(region).read_text())
        except (OSError, ValueError) as exc:
            raise RegionError(f"cannot read region {region}: {exc}; pass a GeoJSON file in lon/lat") from exc
        features = data.get("features", [data]) if data.get("type") == "FeatureCollection" else [data]
        geoms = [shape(f.get("geometry", f)) for f in features]
        for geom in geoms:
            if not geom.is_valid:
                raise RegionError(f"region {region} has an invalid polygon ({explain_validity(geom)}), e.g. edges "
                                  "that cross themselves: repair it (QGIS 'Fix geometries', shapely.make_valid or "
                                  "ogr2ogr -makevalid) and pass the repaired file")
        merged = _across_antimeridian(unary_union(geoms))
        if merged.is_empty or merged.geom_type not in ("Polygon", "MultiPolygon"):
            raise RegionError(f"region {region} holds no polygon: give a GeoJSON Polygon or MultiPolygon in lon/lat")
        return merged.wkt
    return None


def _across_antimeridian(geom: BaseGeometry) -> BaseGeometry:
    """A region split at 180° (pieces touching both -180° and 180°) joined again, its western pieces moved east by
    360°: one piece, whose centre is at the antimeridian and not on the other side of the Earth."""
    if geom.is_empty or geom.bounds[0] > -180 or geom.bounds[2] < 180:
        return geom
    parts = list(getattr(geom, "geoms", [geom]))
    return unary_union([translate(g, xoff=360) if g.centroid.x < 0 else g for g in parts])


def _run_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scenes", nargs="+", metavar="FILE", help="scene GeoTIFFs (paths or s3:// URLs)")
    src.add_argument("--stac", metavar="URL", help="STAC API, or static catalogue/collection JSON, to find items in")
    p.add_argument("--collection", metavar="ID", help="catalogue collection, e.g. sentinel-2-l2a")
    p.add_argument("--datetime", metavar="START/END", help="time window of catalogue items, e.g. 2023-05-01/2023-08-31")
    p.add_argument("--max-cloud", type=float, metavar="PCT", help="skip catalogue items cloudier than this")
    p.add_argument("--composite", choices=COMPOSITES, default="first",
                   help="how dates that see one pixel combine (default first: the first listed / earliest)")
    p.add_argument("--cloud-mask", choices=CLOUD_MASKS, default="auto",
                   help="cloud and shadow masks (default auto: an item's SCL band, else the cloud model for "
                        "catalogue items; none for --scenes)")
    p.add_argument("--cloud-buffer", type=float, default=100.0, metavar="METRES",
                   help="grow cloud and shadow masks by this much (default 100 m): their hazy rims are not clear")
    p.add_argument("--reflectance-offset", type=float, metavar="DN",
                   help="what --scenes values add to reflectance x 10000: 1000 for Sentinel-2 baseline 04.00 on, "
                        "0 before (default: the files' band offset/scale, else the model's convention)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (path or s3:// URL)")
    p.add_argument("--model", help="shipped model name (sentinel2-lulc, aerial-rgb) or checkpoint path")
    p.add_argument("--region", metavar="REGION.geojson", help="area to map, lon/lat GeoJSON")
    p.add_argument("--bbox", metavar="W,S,E,N", help="area to map, lon/lat box")
    p.add_argument("--crs", help="output CRS (default: UTM zone of the region's centre)")
    p.add_argument("--resolution", type=float, metavar="METRES", help="output pixel size (default: finest scene's)")
    p.add_argument("--bands", help="comma-separated names of every scene band, e.g. red,green,blue,nir")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--overwrite", action="store_true", help="replace a RUN_DIR made from a different plan")
    p.add_argument("--tile-size", type=int, help="tile core side in px (default 1024, less for a smaller grid)")
    p.add_argument("--halo", type=int, help="context px on each side of a tile (default: the model card's)")
    p.add_argument("--max-tiles", type=int, default=MAX_TILES, metavar="N",
                   help=f"refuse a plan of more tiles: likely a typo in the region or --resolution "
                        f"(default {MAX_TILES:,})")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="forward-pass arithmetic, kept by reruns (default: bf16 on GPU actors, fp32 on CPU actors)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each tile's 8 flips and quarter turns, kept by reruns "
                        "(default off: 6-7x the inference time for +0.002 mIoU on sentinel2-lulc, +0.007 on "
                        "aerial-rgb; docs/models.md)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write probabilities.tif: every class's probability x 255, one band per class")
    _execution_options(p)
    _vectorise_options(p)


def _execution_options(p: argparse.ArgumentParser) -> None:
    """How the work is spread: no effect on outputs, so `rerun` takes them too."""
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--batch-size", type=int,
                   help="tiles per forward pass (default: ~0.6 Mpx of input on CPU actors, ~9.4 Mpx on GPU actors)")
    p.add_argument("--actors", type=int, help="inference actors (default: one per GPU, else one per node with CPUs)")
    p.add_argument("--readers-per-actor", type=int, metavar="N",
                   help="tile-reading tasks in flight per inference actor (default: one per 8 CPUs of a CPU actor's "
                        "node, 16 for a GPU actor)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="use GPU actors (default: when the cluster has or its autoscaler can start GPU nodes)")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="where the actors' forward pass runs (default: cuda on GPU actors, else cpu)")


def _vectorise_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connectivity", type=int, choices=(4, 8), default=4, help="pixel connectivity (default 4)")
    p.add_argument("--min-area", type=float, default=0.0, metavar="M2", help="minimum mapping unit (default: none)")
    p.add_argument("--simplify", type=float, default=0.0, metavar="TOLERANCE_M", help="simplification (default: none)")
    p.add_argument("--block-size", type=int, default=1024, metavar="PX", help="vectorising block size (default 1024)")


def build_parser() -> argparse.ArgumentParser:
    """The ``geoseg`` argument parser (also used by ``jobs/segment_region.py``)."""
    parser = argparse.ArgumentParser(prog="geoseg", description="Distributed land-cover mapping on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub.add_parser("run", help="map a region: scenes → tiles → model → classes.tif + landcover.gpkg"))
    p = sub.add_parser("rerun", help="redo only the tiles that failed or never finished")
    p.add_argument("run_dir", metavar="RUN_DIR")
    _execution_options(p)
    p = sub.add_parser("status", help="tiles done / failed / pending of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p = sub.add_parser("report", help="write a run's report.html: maps, tile status, areas, timings, model card")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE", help="where to write it (default RUN_DIR/report.html)")
    p = sub.add_parser("vectorise", help="polygonise a class raster into a GeoPackage")
    p.add_argument("classes", metavar="CLASSES.tif")
    p.add_argument("--out", required=True, metavar="OUT.gpkg")
    p.add_argument("--classes", dest="legend", metavar="LEGEND.json", help="class names")
    p.add_argument("--ray-address", help="Ray cluster to join (default: run in this process)")
    _vectorise_options(p)
    p = sub.add_parser("train", help="train a model from a config file")
    p.add_argument("--config", required=True, metavar="CONFIG.toml")
    p.add_argument("--gpus", type=int, default=0, metavar="N",
                   help="train on N GPU workers (bf16) instead of the config's workers")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (TOML value), e.g. --set loss=cross-entropy+dice --set width=48")
    p = sub.add_parser("evaluate", help="compare a run's class raster (classes.tif or .vrt) with reference labels")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--reference", required=True, metavar="LABELS",
                   help="a label raster (class ids) or polygons (GeoPackage, GeoJSON, ...) with a class column")
    p.add_argument("--class-field", default="class", metavar="NAME",
                   help="the polygons' column of class ids or names (default: class)")
    p.add_argument("--ignore", type=int, default=0, help="reference value to ignore (default 0)")
    p = sub.add_parser("finetune", help="adapt a model to your area from your labelled scenes")
    p.add_argument("--from", dest="parent", required=True, metavar="MODEL",
                   help="a shipped model's name or a geoseg checkpoint")
    p.add_argument("--scenes", nargs="+", required=True, metavar="FILE")
    p.add_argument("--labels", nargs="+", required=True, metavar="FILE",
                   help="one label raster (class ids, 0 unlabelled) or vector file per scene, in order, "
                        "or one vector file for all")
    p.add_argument("--out", required=True, metavar="CHECKPOINT", help="where to write the new model (.pt)")
    p.add_argument("--class-field", default="class", metavar="NAME",
                   help="vector labels' column of class ids or names (default: class)")
    p.add_argument("--classes", dest="legend", metavar="LEGEND.json",
                   help="JSON object from your class names or ids to the model's (null: leave out); "
                        "a name the model lacks adds a class")
    p.add_argument("--epochs", type=int, metavar="N",
                   help="at most N epochs (default 20); it stops earlier when a held-apart slice of the labels "
                        "stops improving")
    p.add_argument("--licence", default="licence not stated", metavar="TEXT",
                   help="the new labels' and scenes' licence, for the model card")
    return parser


def run_config(args: argparse.Namespace) -> tuple[RunConfig, ExecutionSettings]:
    """Arguments of ``geoseg run`` → the run's typed settings."""
    config = RunConfig(
        scenes=tuple(args.scenes or ()), out=args.out.rstrip("/"), model=args.model,
        stac=args.stac, collection=args.collection, datetime=args.datetime, max_cloud=args.max_cloud,
        composite=args.composite, cloud_mask=args.cloud_mask, cloud_buffer=args.cloud_buffer,
        reflectance_offset=args.reflectance_offset,
        region_wkt=parse_region(args.region, args.bbox), crs=args.crs, resolution=args.resolution,
        bands=tuple(b.strip() for b in args.bands.split(",")) if args.bands else None,
        tile_size=args.tile_size, halo=args.halo, precision=args.precision, tta=args.tta,
        probabilities=args.probabilities, max_tiles=args.max_tiles,
        vectorise=VectoriseSettings(args.connectivity, args.min_area, args.simplify, args.block_size),
    )
    return config, execution_settings(args)


def execution_settings(args: argparse.Namespace) -> ExecutionSettings:
    """Execution flags of ``geoseg run`` or ``rerun`` → settings (checked as they are made)."""
    return ExecutionSettings(ray_address=args.ray_address, actors=args.actors, use_gpu=args.gpu,
                             device=args.device, readers_per_actor=args.readers_per_actor,
                             batch_size=args.batch_size)


def report_text(report: RunReport) -> str:
    """A run's report as the terminal shows it."""
    lines = [f"tiles: {report.tiles_done}/{report.tiles_total} done, {report.tiles_failed} failed "
             f"({report.tiles_processed} processed in this run)"]
    lines += [f"  failed tile {t.id} (row {t.row}, col {t.col}, {t.stage}): {t.error}" for t in report.failed_tiles]
    lines += [f"  {name}: {area / 1e6:.4f} km2" for name, area in report.class_area_m2.items()]
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in report.stage_s.items()))
    if not report.complete:
        lines.append(f"{report.tiles_total - report.tiles_done} tiles not done: "
                     "`geoseg rerun RUN_DIR` processes only those")
    return "\n".join(lines)


def status_text(status: RunStatus) -> str:
    """A run's status as the terminal shows it."""
    lines = [f"tiles: {status.tiles_done} done, {status.tiles_failed} failed, {status.tiles_pending} pending "
             f"of {status.tiles_total}"]
    lines += [f"  failed tile {t.id} (row {t.row}, col {t.col}, {t.stage}, {t.attempts} attempts): {t.error}"
              for t in status.failed_tiles]
    return "\n".join(lines)


def exit_code(done: int, total: int) -> int:
    """0 when every tile is done, else :data:`EXIT_TILES_FAILED` so scripts see a run to rerun."""
    return EXIT_OK if done == total else EXIT_TILES_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geoseg`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ExecutionError as exc:
        print(f"geoseg: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except GeosegError as exc:
        print(f"geoseg: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _dispatch(args: argparse.Namespace) -> int:
    from geoseg import api

    if args.command == "run":
        config, execution = run_config(args)
        if args.dry_run:
            from geoseg.planner import describe, make_plan

            print(describe(make_plan(config)))
            return EXIT_OK
        report = api.run(config=config, execution=execution, overwrite=args.overwrite).report
        print(report_text(report))
        return exit_code(report.tiles_done, report.tiles_total)
    if args.command == "rerun":
        report = api.rerun(args.run_dir, execution=execution_settings(args)).report
        print(report_text(report))
        return exit_code(report.tiles_done, report.tiles_total)
    if args.command == "status":
        status = api.status(args.run_dir)
        print(status_text(status))
        return exit_code(status.tiles_done, status.tiles_total)
    if args.command == "report":
        from geoseg.report import write_report

        print(write_report(args.run_dir.rstrip("/"), args.out))
        return EXIT_OK
    if args.command == "vectorise":
        areas = api.vectorise(args.classes, args.out, legend=args.legend, ray_address=args.ray_address,
                              connectivity=args.connectivity, min_area_m2=args.min_area, simplify_m=args.simplify,
                              block_size=args.block_size, progress=True)
        for name, area in areas.items():
            print(f"{name}: {area / 1e6:.4f} km2")
        return EXIT_OK
    if args.command == "train":
        from geoseg.train import train_from_config

        print(train_from_config(args.config, args.gpus, args.overrides))
        return EXIT_OK
    if args.command == "evaluate":
        from geoseg.accuracy import format_table

        result = api.evaluate(args.run_dir, args.reference, ignore=args.ignore, class_field=args.class_field)
        print(format_table(result))
        print(json.dumps(result))
        return EXIT_OK
    if args.command == "finetune":
        from geoseg.finetune import FinetuneSettings, finetune, load_legend

        legend = load_legend(args.legend) if args.legend else None
        print(finetune(args.parent, args.scenes, args.labels, args.out, class_field=args.class_field, legend=legend,
                       settings=FinetuneSettings(**({"epochs": args.epochs} if args.epochs else {})),
                       licence=args.licence))
        return EXIT_OK
    raise ConfigError(f"unknown command {args.command}")
