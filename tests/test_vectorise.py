"""The blockwise vectoriser equals one whole-raster rasterio.features.shapes call, block size regardless."""

from __future__ import annotations

import functools
import json
import weakref
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import shape

from geoseg.errors import ConfigError
from geoseg.polygonise import (
    CLASS_NAMES_TAG,
    Held,
    SeamJoiner,
    block_grid,
    load_legend,
    merge_task,
    polygonise_block,
    vectorise,
)

TRANSFORM = Affine(10, 0, 500000, 0, -10, 5650000)
PIXEL_M2 = 100.0


def write_band(path: Path, a: np.ndarray, transform: Affine = TRANSFORM, crs: str = "EPSG:32633") -> Path:
    """One band as a GeoTIFF (this module's rasters are all single-band)."""
    with rasterio.open(path, "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype=str(a.dtype),
                       crs=crs, transform=transform) as dst:
        dst.write(a, 1)
    return path


def write_classes(path: Path, a: np.ndarray, names: dict[int, str] | None = None,
                  transform: Affine = TRANSFORM) -> str:
    write_band(path, a.astype(np.uint8), transform=transform)
    if names is not None:
        with rasterio.open(path, "r+") as dst:
            dst.update_tags(**{CLASS_NAMES_TAG: json.dumps({str(k): v for k, v in names.items()})})
    return str(path)


def reference(a: np.ndarray, connectivity: int, transform: Affine = TRANSFORM) -> tuple[np.ndarray, np.ndarray]:
    """The whole-raster polygons (made valid) and their classes: what the blockwise result must equal."""
    geoms, values = [], []
    for g, v in rasterio.features.shapes(a, mask=a > 0, connectivity=connectivity, transform=transform):
        geoms.append(shapely.make_valid(shape(g)))
        values.append(int(v))
    return np.array(geoms, dtype=object), np.array(values, dtype=np.int64)


def assert_equal_to_whole(gdf: gpd.GeoDataFrame, a: np.ndarray, connectivity: int,
                          transform: Affine = TRANSFORM) -> None:
    """Same count per class, each reference polygon matched one-to-one by an identical geometry."""
    ref, ref_cls = reference(a, connectivity, transform)
    assert gdf.geometry.is_valid.all()
    assert len(gdf) == len(ref)
    got = np.asarray(gdf.geometry.values, dtype=object)
    got_cls = gdf.class_id.to_numpy()
    pixel = abs(transform.determinant)
    for c in np.unique(a[a > 0]):
        assert (got_cls == c).sum() == (ref_cls == c).sum()
        assert gdf.area_m2[got_cls == c].sum() == pytest.approx((a == c).sum() * pixel, rel=1e-12)
    tree = shapely.STRtree(got)
    used = np.zeros(len(got), dtype=bool)
    for g, c in zip(ref, ref_cls, strict=True):
        hits = [i for i in tree.query(shapely.point_on_surface(g), predicate="intersects")
                if got_cls[i] == c and not used[i]]
        match = [i for i in hits if shapely.symmetric_difference(got[i], g).area < 1e-6 * pixel]
        assert len(match) == 1, f"no unique match for a class {c} polygon of area {g.area}"
        used[match[0]] = True
        assert gdf.area_m2.iloc[match[0]] == pytest.approx(g.area, rel=1e-9)


def run(tmp_path: Path, a: np.ndarray, **kw: object) -> tuple[gpd.GeoDataFrame, dict[str, float]]:
    src = write_classes(tmp_path / "classes.tif", a)
    out = tmp_path / "out.gpkg"
    areas = vectorise(src, out, **kw)  # type: ignore[arg-type]
    return gpd.read_file(out, layer="landcover"), areas


# --- hand-made cases at block borders -------------------------------------------------------------------------

RING = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 2, 2, 2, 2, 2, 2, 0],
    [0, 2, 1, 1, 1, 1, 2, 0],
    [0, 2, 1, 0, 0, 1, 2, 0],
    [0, 2, 1, 0, 3, 1, 2, 0],
    [0, 2, 1, 1, 1, 1, 2, 0],
    [0, 2, 2, 2, 2, 2, 2, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
], dtype=np.uint8)

# diagonal contacts across a block corner at (2, 2): one region under 8-connectivity, four under 4
DIAGONAL = np.array([
    [1, 1, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 1, 1],
    [0, 0, 1, 1],
], dtype=np.uint8)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 8])
def test_rings_around_holes_across_blocks(tmp_path: Path, connectivity: int, block_size: int) -> None:
    gdf, _ = run(tmp_path, RING, block_size=block_size, connectivity=connectivity)
    assert_equal_to_whole(gdf, RING, connectivity)
    ring = gdf[gdf.class_id == 2].geometry.iloc[0]
    assert len(shapely.get_parts(ring)) == 1 and len(ring.geoms[0].interiors) == 1


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_diagonal_contact_across_block_corner(tmp_path: Path, block_size: int) -> None:
    gdf8, _ = run(tmp_path, DIAGONAL, block_size=block_size, connectivity=8)
    assert len(gdf8) == 1 and len(gdf8.geometry.iloc[0].geoms) == 2  # one region, a valid multipolygon
    assert_equal_to_whole(gdf8, DIAGONAL, 8)
    gdf4, _ = run(tmp_path, DIAGONAL, block_size=block_size, connectivity=4)
    assert len(gdf4) == 2
    assert_equal_to_whole(gdf4, DIAGONAL, 4)


def test_anti_diagonal_contact_across_block_corner(tmp_path: Path) -> None:
    a = DIAGONAL[:, ::-1].copy()
    gdf, _ = run(tmp_path, a, block_size=2, connectivity=8)
    assert len(gdf) == 1
    assert_equal_to_whole(gdf, a, 8)


def test_self_touching_region_is_one_valid_feature(tmp_path: Path) -> None:
    a = np.array([[0, 1, 0], [1, 2, 1], [0, 1, 0]], dtype=np.uint8)  # an 8-connected diamond around a hole
    gdf, _ = run(tmp_path, a, block_size=8, connectivity=8)
    assert (gdf.class_id == 1).sum() == 1 and gdf.geometry.is_valid.all()
    assert_equal_to_whole(gdf, a, 8)


# --- property tests: random rasters, tiny blocks ----------------------------------------------------------------

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def class_rasters(draw: st.DrawFn) -> np.ndarray:
    h = draw(st.integers(1, 20))
    w = draw(st.integers(1, 20))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k + 1, (h, w)).astype(np.uint8)
    if draw(st.booleans()):  # blobs: regions spanning several blocks
        cell = draw(st.integers(2, 5))
        a = np.kron(rng.integers(0, k + 1, (h // cell + 1, w // cell + 1)), np.ones((cell, cell)))[:h, :w]
    return a.astype(np.uint8)


@SETTINGS
@given(a=class_rasters(), block_size=st.integers(1, 9), connectivity=st.sampled_from([4, 8]))
def test_random_rasters_equal_whole_raster(tmp_path: Path, a: np.ndarray, block_size: int, connectivity: int) -> None:
    gdf, areas = run(tmp_path, a, block_size=block_size, connectivity=connectivity)
    assert_equal_to_whole(gdf, a, connectivity)
    assert areas == pytest.approx({f"class_{c}": (a == c).sum() * PIXEL_M2 for c in np.unique(a[a > 0])})


@st.composite
def border_lines(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """1-pixel lines on both sides of block borders, and rings around holes crossing several blocks."""
    b = draw(st.integers(2, 6))
    h = draw(st.integers(b + 1, 4 * b))
    w = draw(st.integers(b + 1, 4 * b))
    a = np.full((h, w), draw(st.integers(0, 1)), dtype=np.uint8)
    for _ in range(draw(st.integers(1, 4))):
        cls = draw(st.integers(2, 3))
        k = draw(st.integers(1, max(1, min(h, w) // b)))
        at = min(k * b - draw(st.integers(0, 1)), min(h, w) - 1)
        if draw(st.booleans()):
            a[at, draw(st.integers(0, w - 1)):] = cls
        else:
            a[draw(st.integers(0, h - 1)):, at] = cls
    if draw(st.booleans()):
        r0, c0 = draw(st.integers(0, h - 3)), draw(st.integers(0, w - 3))
        r1, c1 = draw(st.integers(r0 + 2, h - 1)), draw(st.integers(c0 + 2, w - 1))
        a[r0:r1 + 1, c0:c1 + 1] = 4
        a[r0 + 1:r1, c0 + 1:c1] = draw(st.sampled_from([0, 1, 5]))
    return a, b


@SETTINGS
@given(case=border_lines(), connectivity=st.sampled_from([4, 8]))
def test_thin_shapes_along_block_borders(tmp_path: Path, case: tuple[np.ndarray, int], connectivity: int) -> None:
    a, b = case
    gdf, _ = run(tmp_path, a, block_size=b, connectivity=connectivity)
    assert_equal_to_whole(gdf, a, connectivity)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), block_size=st.integers(1, 4), n=st.integers(2, 12))
def test_diagonal_patterns_under_8_connectivity(tmp_path: Path, seed: int, block_size: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    checker = (np.add.outer(np.arange(n), np.arange(n)) % 2).astype(np.uint8)  # pure diagonal contacts
    a = np.where(rng.random((n, n)) < 0.8, checker * rng.integers(1, 3), 0).astype(np.uint8)
    gdf, _ = run(tmp_path, a, block_size=block_size, connectivity=8)
    assert_equal_to_whole(gdf, a, 8)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_seam_joiner_holds_only_the_front_of_arrived_blocks(connectivity: int) -> None:
    """Blocks arrive row by row: a region is handed out as soon as its last block is in, and a block's strips
    are dropped once all its neighbours are in, so the joiner never holds more than about one block row."""
    rng = np.random.default_rng(7)
    a = rng.integers(0, 4, (48, 40)).astype(np.uint8)
    a[:, 17] = 3  # one region running through every block row: it stays open to the end
    grid = block_grid(*a.shape, 8)
    per_row = 5
    joiner = SeamJoiner(grid, connectivity)
    handed_out_early = 0
    regions = 0
    wkb_refs: dict[tuple[int, int], weakref.ref[np.ndarray]] = {}
    pieces_left: dict[tuple[int, int], int] = {}  # per block: pieces not yet handed to a merge job
    for w in grid:
        block, wkb = polygonise_block(a[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width], None, w,
                                      connectivity)
        regions += len(block.final.wkb)
        wkb_refs[(w.bi, w.bj)], pieces_left[(w.bi, w.bj)] = weakref.ref(wkb), len(block.piece_labels)
        groups = joiner.add(block, wkb)
        del wkb
        held = joiner.held()
        assert held.strip_blocks <= per_row + 2
        assert held.handles == held.blocks_with_pieces
        if groups:
            job, sources = joiner.take(groups, None)
            for cls in np.split(job.classes, job.starts[1:]):
                assert (cls == cls[0]).all()  # a region's pieces share their class
            for s, n in zip(*np.unique(job.source, return_counts=True), strict=True):
                (key,) = [k for k, r in wkb_refs.items() if r() is sources[s]]
                pieces_left[key] -= int(n)
            merged = merge_task(job, *sources)
            del sources
            regions += len(merged.wkb)
            handed_out_early += w.bi < grid[-1].bi
        # a block's piece geometries are kept alive (by the joiner) exactly while one of its pieces is held
        assert {k for k, r in wkb_refs.items() if r() is not None} == {k for k, n in pieces_left.items() if n}
    assert handed_out_early > 0
    assert len(joiner) == 0
    assert joiner.held() == Held(pieces=0, open_pieces=0, strip_blocks=0, handles=0, blocks_with_pieces=0,
                                 waiting_for=0)  # every block's strips and piece geometries handed on
    assert regions == len(reference(a, connectivity)[0])


# --- the layer, the attributes, the interface ---------------------------------------------------------------------

def test_layer_columns_metadata_index_and_confidence(tmp_path: Path) -> None:
    a = np.kron(np.array([[1, 2], [3, 1]], dtype=np.uint8), np.ones((5, 5), dtype=np.uint8))
    conf = np.arange(a.size, dtype=np.uint8).reshape(a.shape)
    src = write_classes(tmp_path / "c.tif", a, names={1: "forest", 2: "water", 3: "urban"})
    conf_path = write_band(tmp_path / "conf.tif", conf)
    out = tmp_path / "o.gpkg"
    meta = {"run_id": "r-42", "model_name": "sentinel2-lulc", "model_version": "3"}
    areas = vectorise(src, out, confidence_path=str(conf_path), block_size=3, metadata=meta)
    info = pyogrio.read_info(out, layer="landcover")
    assert list(info["fields"]) == ["class_id", "class_name", "area_m2", "mean_confidence"]
    assert info["dataset_metadata"] == meta
    assert rasterio.crs.CRS.from_user_input(info["crs"]) == rasterio.crs.CRS.from_epsg(32633)
    gdf = gpd.read_file(out, layer="landcover")
    assert areas == {"forest": 50 * PIXEL_M2, "water": 25 * PIXEL_M2, "urban": 25 * PIXEL_M2}
    for _, row in gdf.iterrows():
        mask = rasterio.features.geometry_mask([row.geometry], a.shape, TRANSFORM, invert=True)
        assert row.mean_confidence == pytest.approx(conf[mask].mean() / 255)
    assert dict(zip(gdf.class_id, gdf.class_name, strict=True)) == {1: "forest", 2: "water", 3: "urban"}
    import sqlite3

    with sqlite3.connect(out) as db:
        assert db.execute("select count(*) from gpkg_extensions where extension_name='gpkg_rtree_index' "
                          "and table_name='landcover'").fetchone()[0] == 1
        assert db.execute("select count(*) from rtree_landcover_geom").fetchone()[0] == len(gdf)


def test_names_from_argument_then_tag_then_default(tmp_path: Path) -> None:
    a = np.array([[1, 2]], dtype=np.uint8)
    src = write_classes(tmp_path / "c.tif", a, names={1: "tagged one"})
    assert set(vectorise(src, tmp_path / "a.gpkg")) == {"tagged one", "class_2"}
    assert set(vectorise(src, tmp_path / "b.gpkg", {1: "given", 2: "given too"})) == {"given", "given too"}
    plain = write_classes(tmp_path / "p.tif", a)
    vectorise(plain, tmp_path / "c.gpkg")
    gdf = gpd.read_file(tmp_path / "c.gpkg", layer="landcover")
    assert set(gdf.class_name) == {"class_1", "class_2"} and gdf.mean_confidence.isna().all()


def test_load_legend_both_forms(tmp_path: Path, data_dir: Path) -> None:
    assert load_legend(data_dir / "sentinel2_strzegom" / "classes.json")[1] == "conifer forest"
    (tmp_path / "l.json").write_text(json.dumps({"1": "a", "7": "b"}))
    assert load_legend(tmp_path / "l.json") == {1: "a", 7: "b"}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_legend(tmp_path / "bad.json")


def test_bad_settings_and_rasters_raise_config_error(tmp_path: Path) -> None:
    a = np.array([[1, 2]], dtype=np.uint8)
    src = write_classes(tmp_path / "c.tif", a)
    with pytest.raises(ConfigError, match="connectivity"):
        vectorise(src, tmp_path / "o.gpkg", connectivity=6)
    with pytest.raises(ConfigError, match="block.size"):
        vectorise(src, tmp_path / "o.gpkg", block_size=0)
    geo = write_band(tmp_path / "g.tif", a, crs="EPSG:4326", transform=Affine(0.1, 0, 10, 0, -0.1, 50))
    with pytest.raises(ConfigError, match="projected CRS"):
        vectorise(str(geo), tmp_path / "o.gpkg")
    floats = write_band(tmp_path / "f.tif", a.astype(np.float32))
    with pytest.raises(ConfigError, match="integer class ids"):
        vectorise(str(floats), tmp_path / "o.gpkg")
    conf = write_band(tmp_path / "conf.tif", np.zeros((2, 2), np.uint8))
    with pytest.raises(ConfigError, match="not on the grid"):
        vectorise(src, tmp_path / "o.gpkg", confidence_path=str(conf))
    assert not (tmp_path / "o.gpkg").exists()


def test_ray_tasks_give_the_same_result(tmp_path: Path, ray_session: None) -> None:
    import ray

    assert ray.is_initialized()
    rng = np.random.default_rng(7)
    a = np.kron(rng.integers(0, 4, (12, 12)), np.ones((3, 3))).astype(np.uint8)
    for connectivity in (4, 8):
        gdf, _ = run(tmp_path, a, block_size=7, connectivity=connectivity)
        assert_equal_to_whole(gdf, a, connectivity)


# --- real class rasters -------------------------------------------------------------------------------------------

@functools.cache
def predicted_classes(data_dir: Path, date: str) -> tuple[np.ndarray, np.ndarray, Affine]:
    """Real class raster and confidence of one Strzegom scene: the shipped Sentinel-2 model's prediction."""
    import torch

    from geoseg.infer import predict
    from geoseg.model.checkpoint import load_model

    card, model = load_model("sentinel2-lulc")
    with rasterio.open(data_dir / "sentinel2_strzegom" / "scenes" / f"strzegom_{date}_33u.tif") as src:
        x, transform = card.normalise(src.read())[None], src.transform
    classes, conf = predict(model, torch.from_numpy(x), torch.from_numpy(card.class_ids))
    return classes[0].numpy(), conf[0].numpy(), transform


@pytest.mark.parametrize("connectivity", [4, 8])
def test_real_predictions_equal_whole_raster(tmp_path: Path, data_dir: Path, connectivity: int) -> None:
    a, conf, transform = predicted_classes(data_dir, "20230530")
    src = write_classes(tmp_path / "c.tif", a, transform=transform)
    conf_path = write_band(tmp_path / "conf.tif", conf, transform=transform)
    areas = vectorise(src, tmp_path / "o.gpkg", load_legend(data_dir / "sentinel2_strzegom" / "classes.json"),
                      confidence_path=str(conf_path), block_size=64, connectivity=connectivity)
    gdf = gpd.read_file(tmp_path / "o.gpkg", layer="landcover")
    assert_equal_to_whole(gdf, a, connectivity, transform)
    assert sum(areas.values()) == pytest.approx((a > 0).sum() * abs(transform.determinant))
    big = gdf.loc[gdf.area_m2.idxmax()]
    mask = rasterio.features.geometry_mask([big.geometry], a.shape, transform, invert=True)
    assert big.mean_confidence == pytest.approx(conf[mask].mean() / 255)


@pytest.mark.slow
def test_larger_raster_assembled_from_real_predictions(tmp_path: Path, data_dir: Path) -> None:
    """Four dates mirrored into a 2 x 2 mosaic (802 x 802 px): regions cross the mosaic's seams and many blocks."""
    tiles = [predicted_classes(data_dir, d)[0] for d in ("20230530", "20220719", "20221012", "20210619")]
    a = np.block([[tiles[0], tiles[1][:, ::-1]], [tiles[2][::-1], tiles[3][::-1, ::-1]]])
    for connectivity in (4, 8):
        gdf, _ = run(tmp_path, a, block_size=150, connectivity=connectivity)
        assert_equal_to_whole(gdf, a, connectivity)


# --- minimum mapping unit -----------------------------------------------------------------------------------------

def naive_label(a: np.ndarray, connectivity: int) -> np.ndarray:
    """Connected regions of equal class by flood fill: an independent reference for the tests."""
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else [])
    labels = np.zeros(a.shape, dtype=np.int64)
    n = 0
    for r0, c0 in zip(*np.nonzero(a), strict=True):
        if labels[r0, c0]:
            continue
        n += 1
        labels[r0, c0] = n
        stack = [(r0, c0)]
        while stack:
            r, c = stack.pop()
            for dr, dc in steps:
                rr, cc = r + dr, c + dc
                if 0 <= rr < a.shape[0] and 0 <= cc < a.shape[1] and not labels[rr, cc] and a[rr, cc] == a[r, c]:
                    labels[rr, cc] = n
                    stack.append((rr, cc))
    return labels


def naive_sieve(a: np.ndarray, connectivity: int, min_pixels: int) -> np.ndarray:
    """The documented rule on the whole raster, one merge at a time, relabelling after every merge."""
    a = a.copy()
    while True:
        labels = naive_label(a, connectivity)
        ids, first, area = np.unique(labels, return_index=True, return_counts=True)
        info = {int(i): (int(n), int(f)) for i, f, n in zip(ids, first, area, strict=True) if i}
        shared: dict[int, dict[int, int]] = {i: {} for i in info}
        for x, y in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
            for p, q in zip(x.ravel(), y.ravel(), strict=True):
                if p and q and p != q:
                    shared[p][q] = shared[p].get(q, 0) + 1
                    shared[q][p] = shared[q].get(p, 0) + 1
        small = sorted((n, f, i) for i, (n, f) in info.items() if n < min_pixels and shared[i])
        if not small:
            return a
        _, _, i = small[0]
        target = max(shared[i], key=lambda j: (info[j][0], shared[i][j], -info[j][1]))
        a[labels == i] = a.flat[info[target][1]]


def rasterise_layer(gdf: gpd.GeoDataFrame, shape_: tuple[int, int], transform: Affine = TRANSFORM) -> np.ndarray:
    return rasterio.features.rasterize(zip(gdf.geometry, gdf.class_id, strict=True), out_shape=shape_,
                                       transform=transform, dtype="uint8")


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=class_rasters(), block_size=st.integers(1, 7), connectivity=st.sampled_from([4, 8]),
       min_pixels=st.integers(2, 9))
def test_mmu_equals_whole_raster_sieve(tmp_path: Path, a: np.ndarray, block_size: int, connectivity: int,
                                       min_pixels: int) -> None:
    gdf, _ = run(tmp_path, a, block_size=block_size, connectivity=connectivity, min_area_m2=min_pixels * PIXEL_M2)
    sieved = naive_sieve(a, connectivity, min_pixels)
    assert np.array_equal(rasterise_layer(gdf, a.shape), sieved)
    assert_equal_to_whole(gdf, sieved, connectivity)  # exactly the polygons of the sieved raster


def test_mmu_judges_whole_patches_not_pieces(tmp_path: Path) -> None:
    a = np.ones((6, 6), dtype=np.uint8)
    a[1:3, 1:4] = 2  # 6 px, cut by block borders (block 2) into pieces of 2 px
    a[4, 4] = 3  # 1 px
    gdf, areas = run(tmp_path, a, block_size=2, min_area_m2=5 * PIXEL_M2)
    assert set(gdf.class_id) == {1, 2}  # the 6 px patch stays whole, the 1 px one is merged
    assert areas == {"class_1": 30 * PIXEL_M2, "class_2": 6 * PIXEL_M2}
    assert len(gdf) == 2
    gdf7, _ = run(tmp_path, a, block_size=2, min_area_m2=7 * PIXEL_M2)
    assert set(gdf7.class_id) == {1} and len(gdf7) == 1


def test_mmu_merge_joins_the_neighbours_it_connects(tmp_path: Path) -> None:
    a = np.array([[1, 1, 3, 3, 3],
                  [1, 1, 2, 1, 1],
                  [1, 1, 3, 3, 3]], dtype=np.uint8)
    gdf, _ = run(tmp_path, a, block_size=2, min_area_m2=2 * PIXEL_M2)
    # the 1 px of class 2 takes the class of its largest neighbour (6 px of class 1 on the left), and so
    # joins that neighbour and the 2 px of class 1 on its right into one patch, as in the sieved raster
    assert (gdf.class_id == 2).sum() == 0
    assert (gdf.class_id == 1).sum() == 1 and gdf[gdf.class_id == 1].area_m2.sum() == 9 * PIXEL_M2


def test_mmu_keeps_islands_in_nodata(tmp_path: Path) -> None:
    a = np.zeros((5, 5), dtype=np.uint8)
    a[2, 2] = 4
    gdf, _ = run(tmp_path, a, block_size=2, min_area_m2=10 * PIXEL_M2)
    assert list(gdf.class_id) == [4]


# --- coverage-preserving simplification ---------------------------------------------------------------------------

def assert_coverage_after_simplify(gdf: gpd.GeoDataFrame, a: np.ndarray, tolerance_m: float,
                                   transform: Affine = TRANSFORM) -> None:
    """No gaps, no overlaps, the raster's footprint kept, each class area within the stated bound."""
    ref, ref_cls = reference(a, 4, transform)
    pixel = abs(transform.determinant)
    geoms = np.asarray(gdf.geometry.values, dtype=object)
    assert shapely.is_valid(geoms).all()
    union = shapely.union_all(geoms)
    assert shapely.symmetric_difference(union, shapely.union_all(ref)).area < 1e-6 * pixel  # footprint, no gaps
    assert shapely.area(geoms).sum() == pytest.approx(union.area, rel=1e-9)  # no overlaps
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pairs = left < right
    assert shapely.area(shapely.intersection(geoms[left[pairs]], geoms[right[pairs]])).max(initial=0) < 1e-6 * pixel
    for c in np.unique(ref_cls):
        perimeter_px = shapely.length(ref[ref_cls == c]).sum() / np.sqrt(pixel)
        bound = (tolerance_m ** 2) * perimeter_px  # the bound stated in simplify_coverage's docstring
        assert abs(gdf.area_m2[gdf.class_id == c].sum() - (a == c).sum() * pixel) <= bound
        assert gdf.area_m2[gdf.class_id == c].sum() == pytest.approx(shapely.area(geoms[gdf.class_id == c]).sum())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=class_rasters(), block_size=st.integers(2, 9), pixels=st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_simplification_keeps_the_coverage(tmp_path: Path, a: np.ndarray, block_size: int, pixels: float) -> None:
    tolerance = pixels * 10
    gdf, _ = run(tmp_path, a, block_size=block_size, simplify_m=tolerance)
    assert len(gdf) == len(reference(a, 4)[0])
    assert_coverage_after_simplify(gdf, a, tolerance)


def test_simplification_simplifies_real_predictions(tmp_path: Path, data_dir: Path) -> None:
    a, conf, transform = predicted_classes(data_dir, "20230530")
    src = write_classes(tmp_path / "c.tif", a, transform=transform)
    vectorise(src, tmp_path / "exact.gpkg", block_size=100)
    vectorise(src, tmp_path / "simple.gpkg", block_size=100, simplify_m=15.0)
    exact, simple = (gpd.read_file(tmp_path / f"{n}.gpkg", layer="landcover") for n in ("exact", "simple"))
    assert shapely.get_num_coordinates(simple.geometry.values).sum() < \
        0.6 * shapely.get_num_coordinates(exact.geometry.values).sum()
    assert_coverage_after_simplify(simple, a, 15.0, transform)
