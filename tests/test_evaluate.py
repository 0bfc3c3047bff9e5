"""Metrics on hand-made cases with known answers, and rasters on the same and on different grids."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.accuracy import confusion_matrix, evaluate_arrays, evaluate_rasters, format_table
from geoseg.cli import main
from geoseg.config import RunConfig
from geoseg.model.checkpoint import load_card
from geoseg.plan import save_plan
from geoseg.planner import make_plan


def from_origin(west: float, north: float, xsize: float, ysize: float) -> rasterio.Affine:
    """North-up transform (rasterio's own helper warns under affine 3)."""
    return rasterio.Affine(xsize, 0, west, 0, -ysize, north)


REF = np.array([[1, 1, 2], [2, 0, 3]])
PRED = np.array([[1, 2, 2], [2, 3, 3]])


def test_hand_made_case_has_the_known_answer() -> None:
    r = evaluate_arrays(PRED, REF, ignore=0)
    # reference 1: one right, one called 2; reference 2: both right; the ignored pixel (called 3) does not count
    assert r["class_ids"] == [1, 2, 3]
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert r["iou"] == {"1": 0.5, "2": pytest.approx(2 / 3), "3": 1.0}
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert r["overall_accuracy"] == pytest.approx(4 / 5)
    assert r["pixels"] == 5


def test_without_ignore_the_unlabelled_pixel_counts() -> None:
    r = evaluate_arrays(PRED, REF, ignore=None)
    assert r["pixels"] == 6
    assert r["overall_accuracy"] == pytest.approx(4 / 6)
    assert r["iou"]["3"] == 0.5


def test_classes_absent_from_the_reference_do_not_enter_the_mean() -> None:
    r = evaluate_arrays(np.array([1, 4, 1, 1]), np.array([1, 1, 1, 1]))
    assert r["present"] == [1]
    assert r["iou"]["4"] == 0.0
    assert r["miou"] == pytest.approx(0.75)


def test_nodata_predictions_count_as_errors() -> None:
    cm = confusion_matrix(np.array([0, 1]), np.array([1, 1]))
    assert cm[1, 0] == 1 and cm[1, 1] == 1


def _write(path: Path, data: np.ndarray, transform: rasterio.Affine, crs: str = "EPSG:32633") -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype,
                       crs=crs, transform=transform) as dst:
        dst.write(data, 1)
    return path


def test_rasters_on_the_same_grid(tmp_path: Path) -> None:
    t = from_origin(500000, 5600000, 10, 10)
    r = evaluate_rasters(_write(tmp_path / "classes.tif", PRED.astype(np.uint8), t),
                         _write(tmp_path / "ref.tif", REF.astype(np.float32), t))
    assert not r["reprojected"]
    assert r["overall_accuracy"] == pytest.approx(0.8)
    table = format_table(r)
    assert "mean IoU over 3 classes present: 0.722" in table and "overall accuracy: 0.800" in table


def test_reference_on_a_coarser_grid_is_reprojected_with_nearest(tmp_path: Path) -> None:
    """A 2 x 3 reference at 20 m against a 4 x 6 class map at 10 m: each reference pixel covers a 2 x 2 block."""
    pred = np.kron(PRED, np.ones((2, 2), int)).astype(np.uint8)
    pred[0, 0] = 2  # one more error, inside the block of reference class 1
    classes = _write(tmp_path / "classes.tif", pred, from_origin(500000, 5600000, 10, 10))
    ref = _write(tmp_path / "ref.tif", REF.astype(np.uint8), from_origin(500000, 5600000, 20, 20))
    r = evaluate_rasters(classes, ref)
    assert r["reprojected"]
    assert r["pixels"] == 20
    assert r["overall_accuracy"] == pytest.approx(15 / 20)
    assert r["confusion"][0] == [3, 5, 0]


def test_reference_smaller_than_the_class_map_leaves_the_rest_out(tmp_path: Path) -> None:
    classes = _write(tmp_path / "classes.tif", np.ones((4, 4), np.uint8), from_origin(0, 40, 10, 10))
    ref = _write(tmp_path / "ref.tif", np.ones((2, 2), np.uint8), from_origin(0, 40, 10, 10))
    r = evaluate_rasters(classes, ref)
    assert r["pixels"] == 4 and r["overall_accuracy"] == 1.0


def test_table_columns_stay_apart_for_large_counts() -> None:
    r = evaluate_arrays(np.repeat(np.array([1, 2]), [1_234_567, 5]), np.repeat(np.array([1, 1]), [1_234_567, 5]))
    row = format_table(r).splitlines()[2].split()
    assert row == ["1", "1234567", "5"]


def test_the_evaluate_command_scores_a_run_against_real_labels(
        tmp_path: Path, data_dir: Path, write_raster: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`geoseg evaluate RUN_DIR --reference LABELS` on a run folder (its plan and class raster): a map equal to the
    labels scores 1.0; one class painted over with another loses exactly that class's pixels; the result is
    printed and saved as evaluation.json. No Ray needed: the command reads rasters only."""
    labels = data_dir / "sentinel2_strzegom" / "labels" / "strzegom_20230530_33u.tif"
    scene = data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_plan(str(run_dir), make_plan(RunConfig(scenes=(str(scene),), out=str(run_dir))))
    with rasterio.open(labels) as src:
        ref, crs, transform = src.read(1), src.crs, src.transform
    write_raster(run_dir / "classes.tif", ref[None].astype(np.uint8), crs=crs, transform=transform)
    assert main(["evaluate", str(run_dir), "--reference", str(labels)]) == 0
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved["miou"] == 1.0 and saved["overall_accuracy"] == 1.0 and saved["pixels"] == int((ref > 0).sum())
    assert "miou" in capsys.readouterr().out

    ids, counts = np.unique(ref[ref > 0], return_counts=True)
    gone, into = int(ids[np.argmin(counts)]), int(ids[np.argmax(counts)])  # the rarest class painted as the commonest
    wrong = np.where(ref == gone, into, ref).astype(np.uint8)
    write_raster(run_dir / "classes.tif", wrong[None], crs=crs, transform=transform)
    assert main(["evaluate", str(run_dir), "--reference", str(labels)]) == 0
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved["iou"][str(gone)] == 0.0
    assert saved["iou"][str(into)] == pytest.approx(counts.max() / (counts.max() + counts.min()))
    assert saved["overall_accuracy"] == pytest.approx(1 - counts.min() / counts.sum())
    names = {c.id: c.name for c in load_card("sentinel2-lulc").classes}
    assert saved["names"][str(into)] == names[into]

    assert main(["evaluate", str(tmp_path / "no-run"), "--reference", str(labels)]) == 2
    assert "RunDirError" in capsys.readouterr().err
