"""Batch prediction: normalisation and padding, class-id mapping, independence from batch-mates, and the
predictor's one forward thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import torch
import zarr

from geoseg import store
from geoseg.config import RunConfig
from geoseg.infer import Predictor, predict, prepare
from geoseg.model.checkpoint import load_model
from geoseg.planner import make_plan
from geoseg.tile import TileJob, make_tile


def real_chips(data_dir: Path, n: int, size: int = 96) -> np.ndarray:
    with rasterio.open(data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif") as src:
        scene = src.read()
    return np.stack([scene[:, 50 * i:50 * i + size, 60 * i:60 * i + size] for i in range(n)])


def test_prepare_pads_the_batch_and_zeroes_invalid_pixels(data_dir: Path) -> None:
    card, _ = load_model("sentinel2-lulc")
    image = real_chips(data_dir, 2)
    valid = np.ones((2, 96, 96), bool)
    valid[0, :10] = False
    x = prepare(card, image, valid, batch_size=4)
    assert x.shape == (4, 10, 96, 96) and x.dtype == np.float32
    assert (x[2:] == 0).all() and (x[0, :, :10] == 0).all()
    assert np.allclose(x[1], card.normalise(image[1]))


def test_prediction_does_not_depend_on_batch_mates(data_dir: Path) -> None:
    card, model = load_model("sentinel2-lulc")
    ids = torch.as_tensor(card.class_ids)
    image = real_chips(data_dir, 4)
    valid = np.ones((4, 96, 96), bool)
    together = predict(model, torch.from_numpy(prepare(card, image, valid, 4)), ids)
    for k in range(4):
        alone = predict(model, torch.from_numpy(prepare(card, image[k:k + 1], valid[k:k + 1], 4)), ids)
        assert torch.equal(alone[0][0], together[0][k])
        assert torch.equal(alone[1][0], together[1][k])
    classes = together[0].numpy()
    assert set(np.unique(classes)) <= set(card.class_ids.tolist())
    assert together[1].dtype == torch.uint8 and int(together[1].min()) >= 255 // len(card.classes)


def _predictions(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    store = zarr.open_group(str(run_dir / "predictions.zarr"), mode="r")
    return store["classes"][:], store["confidence"][:]


def test_concurrent_calls_run_every_forward_pass_on_one_thread(data_dir: Path, tmp_path: Path) -> None:
    """Two callers at once (as in the threaded actor) share one forward thread, and write what one
    caller at a time writes: the actor's activations stay in one thread's memory whatever the run length."""
    scene = data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"
    results = []
    for callers in (1, 2):
        run_dir = tmp_path / f"run{callers}"
        plan = make_plan(RunConfig(scenes=(str(scene),), out=str(run_dir), tile_size=128, halo=32))
        store.create(str(run_dir), plan.grid, plan.tiles, plan.items[0].sources[0].scene.band_names, "uint16")
        job = TileJob(str(run_dir), plan.run_id, "test", plan.grid, plan.items, plan.composite, None, "uint16", 10)
        stores = store.Stores(str(run_dir))
        for i, (row, col) in enumerate(plan.tiles):
            make_tile(job, stores, i, int(row), int(col))
        p = Predictor(plan.model, str(run_dir), plan.grid, plan.tiles, 2, threads=1)
        threads: set[int] = set()
        p.model.register_forward_hook(lambda *_, seen=threads: seen.add(threading.get_ident()))
        batches = [list(range(k, min(k + 2, plan.tile_count))) for k in range(0, plan.tile_count, 2)]
        with ThreadPoolExecutor(callers) as pool:
            outcomes = list(pool.map(p, batches, [600.0] * len(batches)))
        assert all(err is None for _, out in outcomes for _, err in out)
        assert len(threads) == 1 and threading.get_ident() not in threads
        results.append(_predictions(run_dir))
    assert plan.tile_count == 16 and (results[0][0] > 0).all()
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
