"""The mosaic against GDAL's own COG driver: same pixels, overviews, tags and colours, from real model output.

The reference is what the mosaic used to do, kept here only: the store copied into a tiled GeoTIFF, then
``rasterio.shutil.copy`` to a COG (DEFLATE, 512 px blocks, NEAREST overviews for classes, AVERAGE for
confidence). The rasters are the shipped Sentinel-2 model's predictions over real Strzegom dates, mirrored
to sizes that are not multiples of 512, plus a synthetic one with random patches and no-data holes.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.shutil
import zarr
from rasterio.crs import CRS
from rasterio.io import MemoryFile

from geoseg import cog, store
from geoseg.accuracy import evaluate_rasters
from geoseg.grid import Grid
from geoseg.model.card import ModelCard
from geoseg.mosaic import CLASSES_TIF, CLASSES_VRT, MosaicResult, class_raster, colormap, mosaic
from geoseg.overviews import downsample, level_shapes
from geoseg.polygonise import vectorise

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from mosaic import mirrored, real_predictions, write_predictions  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_session")

TAGS = {"GEOSEG_RUN_ID": "test", "GEOSEG_MODEL": "sentinel2-lulc test"}
DATES = 3


@pytest.fixture(scope="module")
def real(data_dir: Path) -> tuple[ModelCard, list[tuple[np.ndarray, np.ndarray]]]:
    return real_predictions(data_dir, DATES)


def reference(run_dir: Path, grid: Grid, card: ModelCard) -> dict[str, Path]:
    """The former mosaic: a tiled GeoTIFF of the store, then GDAL's COG driver."""
    pred = zarr.open_group(str(run_dir / store.PREDICTIONS), mode="r")
    out = run_dir / "reference"
    out.mkdir()
    paths = {}
    for name in ("classes", "confidence"):
        plain = out / f"{name}.plain.tif"
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=1, dtype="uint8",
                       crs=CRS.from_user_input(grid.crs), transform=grid.transform, nodata=0, tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate")
        with rasterio.open(plain, "w", **profile) as dst:
            dst.write(pred[name][:], 1)
            if name == "classes":
                dst.write_colormap(1, colormap(card))
                dst.update_tags(CLASS_NAMES=json.dumps({str(c.id): c.name for c in card.classes}), **TAGS)
            else:
                dst.update_tags(SCALE="1/255", DESCRIPTION="max softmax probability x 255; 0 = no data", **TAGS)
        paths[name] = out / f"{name}.tif"
        rasterio.shutil.copy(plain, paths[name], driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512,
                             OVERVIEW_RESAMPLING="NEAREST" if name == "classes" else "AVERAGE")
    return paths


def assert_same_raster(expected: Path, actual: Path) -> None:
    """Pixels, georeferencing, no-data, tags, colours and every overview (count, size, pixels) are equal."""
    with rasterio.open(expected) as a, rasterio.open(actual) as b:
        assert (b.width, b.height, b.dtypes, b.nodata) == (a.width, a.height, a.dtypes, a.nodata)
        assert b.crs == a.crs and b.transform == a.transform
        assert b.tags() == a.tags()
        assert b.colorinterp == a.colorinterp
        if a.colorinterp[0].name == "palette":
            assert b.colormap(1) == a.colormap(1)
        assert b.overviews(1) == a.overviews(1)
        assert np.array_equal(b.read(1), a.read(1))
        n = len(a.overviews(1))
    for i in range(n):
        with rasterio.open(expected, overview_level=i) as a, rasterio.open(actual, overview_level=i) as b:
            assert b.shape == a.shape
            assert np.array_equal(b.read(1), a.read(1)), f"overview {i}"


def ifds(data: bytes) -> tuple[list[int], list[dict[int, list[int]]]]:
    """Offsets and numeric fields of every IFD of a little-endian TIFF or BigTIFF."""
    big = data[2:4] == b"+\x00"
    entry, count_fmt, next_fmt, inline = ("<HHQ", "<Q", "<Q", 8) if big else ("<HHI", "<H", "<I", 4)
    sizes = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}
    (offset,) = struct.unpack_from(next_fmt, data, 8 if big else 4)
    offsets, fields = [], []
    while offset:
        offsets.append(offset)
        (n,) = struct.unpack_from(count_fmt, data, offset)
        pos = offset + struct.calcsize(count_fmt)
        found = {}
        for _ in range(n):
            tag, typ, count = struct.unpack_from(entry, data, pos)
            raw = data[pos + struct.calcsize(entry):pos + struct.calcsize(entry) + inline]
            if typ in sizes:
                fmt, size = sizes[typ]
                if size * count > inline:
                    (at,) = struct.unpack(next_fmt, raw)
                    raw = data[at:at + size * count]
                found[tag] = list(struct.unpack(f"<{count}{fmt}", raw[:size * count]))
            pos += struct.calcsize(entry) + inline
        fields.append(found)
        (offset,) = struct.unpack_from(next_fmt, data, pos)
    return offsets, fields


def assert_cog_layout(path: Path) -> None:
    """The rules of GDAL's validate_cloud_optimized_geotiff.py, full check: ghost header, main IFD right after
    it, IFDs before any tile data, overviews' data before the larger levels', tiles in row-major order, each
    with its size before and its last 4 bytes after."""
    data = path.read_bytes()
    start = 16 if data[2:4] == b"+\x00" else 8
    first = data[start:start + 60].decode("latin1")
    assert first.startswith("GDAL_STRUCTURAL_METADATA_SIZE=")
    size = int(first[30:36])
    ghost = data[start:start + 43 + size].decode()
    for line in ("LAYOUT=IFDS_BEFORE_DATA", "BLOCK_ORDER=ROW_MAJOR", "BLOCK_LEADER=SIZE_AS_UINT4",
                 "BLOCK_TRAILER=LAST_4_BYTES_REPEATED", "KNOWN_INCOMPATIBLE_EDITION=NO"):
        assert line in ghost
    offsets, fields = ifds(data)
    assert offsets[0] == start + 43 + size + (43 + size) % 2
    assert offsets == sorted(offsets)
    first_data = []
    for f in fields:
        tiles, counts = f[324], f[325]
        assert tiles == sorted(tiles) and min(tiles) > offsets[-1]
        for o, n in zip(tiles, counts, strict=True):
            assert struct.unpack_from("<I", data, o - 4)[0] == n
            assert data[o + n:o + n + 4] == data[o + n - 4:o + n]
        first_data.append(tiles[0])
    assert first_data == sorted(first_data, reverse=True)  # the coarsest level's tiles come first
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"


def build(tmp_path: Path, real: tuple[ModelCard, list], height: int, width: int) -> tuple[Path, Grid, ModelCard]:
    card, predictions = real
    run_dir = tmp_path / "run"
    grid = write_predictions(str(run_dir), card, predictions, height, width)
    return run_dir, grid, card


@pytest.mark.parametrize(("height", "width", "part_levels"), [(401, 401, None), (1100, 1537, None), (2049, 1030, 1)])
def test_mosaic_equals_gdal_cog_of_real_predictions(tmp_path: Path, real: tuple, height: int, width: int,
                                                     part_levels: int | None) -> None:
    """401 px (no overviews, the real scene's size), odd sizes with overviews from ratios above 2, and many
    parts whose overview levels reach past their own rows (and a last row of parts with no overview tile)."""
    run_dir, grid, card = build(tmp_path, real, height, width)
    result = mosaic(str(run_dir), grid, card, TAGS, part_levels=part_levels)
    assert result == MosaicResult(CLASSES_TIF, "confidence.tif", result.counts)
    classes = zarr.open_group(str(run_dir / store.PREDICTIONS), mode="r")["classes"][:]
    ids, n = np.unique(classes[classes > 0], return_counts=True)
    assert result.counts == dict(zip(ids.tolist(), n.tolist(), strict=True))
    expected = reference(run_dir, grid, card)
    for name in ("classes", "confidence"):
        assert_same_raster(expected[name], run_dir / f"{name}.tif")
        assert_cog_layout(run_dir / f"{name}.tif")
        assert (run_dir / f"{name}.tif").stat().st_mode & 0o044 == 0o044  # readable by all, as GDAL's were


@pytest.mark.parametrize(("height", "width"), [(2053, 1537), (5, 1300), (1300, 3), (2901, 2)])
def test_synthetic_patches_and_holes_equal_gdal(tmp_path: Path, real: tuple, height: int, width: int) -> None:
    """Random class patches and confidence with no-data holes and isolated no-data pixels: every AVERAGE
    window mixes valid and no-data pixels with fractional weights somewhere; thin rasters reach 1 px levels,
    which GDAL makes from the full resolution once a level is 1 px wide."""
    card, _ = real
    run_dir = tmp_path / "run"
    grid = Grid(crs="EPSG:32633", res=2.0, left=600000.0, top=5600000.0, width=width, height=height, tile_size=256,
                halo=16)
    tiles = np.array([(r, c) for r in range(grid.tile_rows) for c in range(grid.tile_cols)], dtype=np.int32)
    store.create(str(run_dir), grid, tiles, card.bands, card.input_dtype)
    rng = np.random.default_rng(7)
    patches = rng.integers(1, 11, (grid.height // 37 + 1, grid.width // 29 + 1), dtype=np.uint8)
    classes = np.repeat(np.repeat(patches, 37, 0), 29, 1)[:grid.height, :grid.width]
    confidence = rng.integers(1, 256, classes.shape, dtype=np.uint8)
    stripes = np.add.outer(np.arange(grid.height), np.arange(grid.width)) % 611 < 40
    holes = (rng.random(classes.shape) < 0.05) | stripes
    classes[holes], confidence[holes] = 0, 0
    pred = zarr.open_group(str(run_dir / store.PREDICTIONS), mode="r+")
    pred["classes"][:] = classes
    pred["confidence"][:] = confidence
    mosaic(str(run_dir), grid, card, TAGS, part_levels=1)
    expected = reference(run_dir, grid, card)
    for name in ("classes", "confidence"):
        assert_same_raster(expected[name], run_dir / f"{name}.tif")


def test_part_size_changes_no_byte(tmp_path: Path, real: tuple) -> None:
    """Parts of 1024, 2048 and 4096 px write the same files, byte for byte."""
    run_dir, grid, card = build(tmp_path, real, 2100, 2700)
    seen = []
    for levels in (1, 2, 3):
        mosaic(str(run_dir), grid, card, TAGS, part_levels=levels)
        seen.append([(run_dir / f"{n}.tif").read_bytes() for n in ("classes", "confidence")])
    assert seen[0] == seen[1] == seen[2]


def test_grid_of_cogs_reads_as_the_single_cog(tmp_path: Path, real: tuple, data_dir: Path) -> None:
    """Forced into grid mode (cells of 1024 px), the VRT has the single COG's pixels, tags and colours, and
    vectorise and evaluate give the same results on it."""
    run_dir, grid, card = build(tmp_path, real, 1900, 2300)
    single = mosaic(str(run_dir), grid, card, TAGS)
    gridded = mosaic(str(run_dir), grid, card, TAGS, grid_above=0, cell=1024)
    assert (gridded.classes, gridded.confidence) == (CLASSES_VRT, "confidence.vrt")
    assert gridded.counts == single.counts
    cells = sorted(p.name for p in (run_dir / "classes").iterdir())
    assert cells == [f"{r}_{c}.tif" for r in range(2) for c in range(3)]
    for name in ("classes", "confidence"):
        with rasterio.open(run_dir / f"{name}.tif") as a, rasterio.open(run_dir / f"{name}.vrt") as b:
            assert b.driver == "VRT" and (b.width, b.height, b.nodata) == (a.width, a.height, a.nodata)
            assert b.crs == a.crs and b.transform == a.transform and b.tags() == a.tags()
            assert np.array_equal(b.read(1), a.read(1))
            assert b.overviews(1) == a.overviews(1)
            if name == "classes":
                assert b.colormap(1) == a.colormap(1)
        for cell in (run_dir / name).iterdir():
            assert_cog_layout(cell)
    assert class_raster(str(run_dir)) == str(run_dir / CLASSES_VRT)

    names = {c.id: c.name for c in card.classes}
    layers = []
    for stem in ("classes.tif", "classes.vrt"):
        conf = str(run_dir / stem.replace("classes", "confidence"))
        areas = vectorise(str(run_dir / stem), tmp_path / f"{stem}.gpkg", names, confidence_path=conf)
        table = pyogrio.read_dataframe(tmp_path / f"{stem}.gpkg", layer="landcover")
        layers.append((areas, table.to_wkb().drop(columns="fid", errors="ignore")))
    assert layers[0][0] == layers[1][0]
    assert layers[0][1].equals(layers[1][1])

    labels = []
    for scene in sorted((data_dir / "sentinel2_strzegom" / "labels").glob("strzegom_*_33u.tif"))[:DATES]:
        with rasterio.open(scene) as src:
            labels.append(src.read(1).astype(np.uint8))
    reference_path = tmp_path / "labels.tif"
    with rasterio.open(reference_path, "w", driver="GTiff", width=grid.width, height=grid.height, count=1,
                       dtype="uint8", crs=grid.crs, transform=grid.transform, nodata=0) as dst:
        dst.write(mirrored(labels, grid.height, grid.width), 1)
    on_cog = evaluate_rasters(run_dir / CLASSES_TIF, reference_path, names=names)
    on_vrt = evaluate_rasters(run_dir / CLASSES_VRT, reference_path, names=names)
    assert on_vrt == on_cog and on_cog["pixels"] > 0 and on_cog["miou"] > 0.3


def test_bigtiff_layout_reads_the_same(tmp_path: Path) -> None:
    """Past 4 GiB a file is written as BigTIFF; forced on a small raster it reads back identically."""
    rng = np.random.default_rng(3)
    band = rng.integers(0, 4, (1300, 700), dtype=np.uint8)
    shapes = level_shapes(*band.shape, cog.BLOCK)
    levels = [band]
    for i in range(1, len(shapes)):
        levels.append(downsample(levels[-1], (0, 0), shapes[i - 1], shapes[i], (0, shapes[i][0]), (0, shapes[i][1]),
                                 False))
    pieces = [cog.deflate_tiles(lvl) for lvl in levels]
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=1, height=1, count=1, dtype="uint8", crs="EPSG:32633",
                      transform=rasterio.Affine(2, 0, 600000, 0, -2, 5600000), nodata=0) as dst:
            dst.update_tags(NOTE="template")
        template = cog.template_tags(mem.read())
    meta = [cog.Level(*lvl.shape, sizes) for lvl, (_, sizes) in zip(levels, pieces, strict=True)]
    for big in (False, True):
        path = tmp_path / f"big{big}.tif"
        with open(path, "wb") as out:
            cog.write(out, meta, template, lambda i: cog.split(*pieces[i]), bigtiff=big)
        assert (path.read_bytes()[2:4] == b"+\x00") is big
        assert_cog_layout(path)
        for i, lvl in enumerate(levels):
            with rasterio.open(path, overview_level=i - 1 if i else None) as src:
                assert np.array_equal(src.read(1), lvl)
                assert src.tags()["NOTE"] == "template"
