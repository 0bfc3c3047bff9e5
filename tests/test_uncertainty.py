"""Probabilities and uncertainty (issue 14, point 5): every run writes margin.tif; a run with --probabilities also
writes probabilities.tif (one uint8 band per class, summing to 255 +- the classes); ``geoseg evaluate`` reports
the confidence's expected calibration error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.accuracy import calibration, format_table
from geoseg.cli import main
from geoseg.config import RunConfig
from geoseg.plan import RunPlan
from geoseg.planner import describe, make_plan


def _scene(data_dir: Path) -> Path:
    return data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_calibration_of_constructed_confidences() -> None:
    # 4 px at 0.25, 3 right (gap 0.5); 4 px at 1.0 (the last bin), all right (gap 0): ECE = 4 * 0.5 / 8
    conf = np.array([0.25] * 4 + [1.0] * 4)
    correct = np.array([True, True, True, False] + [True] * 4)
    cal = calibration(conf, correct)
    assert cal["ece"] == pytest.approx(0.25)
    assert cal["bins"]["count"] == [0, 0, 4, 0, 0, 0, 0, 0, 0, 4]
    assert cal["bins"]["accuracy"][2] == pytest.approx(0.75) and cal["bins"]["confidence"][9] == 1.0
    assert cal["bins"]["accuracy"][0] is None
    # a calibrated model: confidence 0.55 right 55 % of the time, 0.95 right 95 %
    conf = np.array([0.55] * 100 + [0.95] * 100)
    correct = np.array([True] * 55 + [False] * 45 + [True] * 95 + [False] * 5)
    assert calibration(conf, correct)["ece"] == pytest.approx(0.0, abs=1e-12)
    # always sure, right half the time
    assert calibration(np.ones(10), np.arange(10) % 2 == 0)["ece"] == pytest.approx(0.5)


def test_run_writes_probabilities_and_margin_and_evaluate_reports_ece(tmp_path: Path, data_dir: Path,
                                                                       ray_session: None) -> None:
    scene, small = str(_scene(data_dir)), ["--tile-size", "128"]
    run, plain = tmp_path / "probs", tmp_path / "plain"
    assert main(["run", "--scenes", scene, "--out", str(run), *small, "--probabilities"]) == 0
    assert main(["run", "--scenes", scene, "--out", str(plain), *small]) == 0
    assert not (plain / "probabilities.tif").exists() and (plain / "margin.tif").exists()
    report = json.loads((run / "report.json").read_text())
    assert report["outputs"]["probabilities"] == "probabilities.tif" and report["outputs"]["margin"] == "margin.tif"
    assert json.loads((plain / "report.json").read_text())["outputs"]["probabilities"] is None
    assert json.loads((run / "plan.json").read_text())["probabilities"] is True

    classes, conf, margin = (_read(run / f"{n}.tif")[0] for n in ("classes", "confidence", "margin"))
    with rasterio.open(run / "probabilities.tif") as src:
        probs = src.read()
        ids = np.array([int(src.tags(b)["CLASS_ID"]) for b in range(1, src.count + 1)])
        assert src.dtypes == ("uint8",) * src.count and src.overviews(1) == []  # 401 px: no overviews
        assert src.descriptions[0] and src.crs is not None
    with rasterio.open(run / "margin.tif") as src:
        assert "high = sure" in src.tags()["DESCRIPTION"] and src.nodata == 0
    n = len(probs)
    assert n == 10  # sentinel2-lulc's classes
    valid = classes > 0
    assert valid.mean() > 0.9
    total = probs.sum(0, dtype=np.int64)
    assert np.all(np.abs(total[valid] - 255) <= n)
    assert not probs[:, ~valid].any() and not margin[~valid].any() and margin[valid].min() >= 1

    ordered = np.sort(probs.astype(np.int64), axis=0)
    top1, top2 = ordered[-1], ordered[-2]
    assert np.array_equal(top1[valid], conf[valid].astype(np.int64))  # the same rounding of the same maximum
    unique = valid & (top1 > top2)  # ties aside
    assert np.array_equal(ids[probs.argmax(0)][unique], classes[unique])
    assert np.all(np.abs(margin[valid].astype(np.int64) - np.maximum(top1 - top2, 1)[valid]) <= 1)
    assert np.array_equal(_read(plain / "margin.tif"), margin[None])  # the same with or without probabilities

    labels = data_dir / "sentinel2_strzegom" / "labels" / "strzegom_20230530_33u.tif"
    assert main(["evaluate", str(run), "--reference", str(labels)]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert 0 < result["ece"] < 1
    assert sum(result["calibration"]["count"]) == result["pixels"]
    assert "expected calibration error" in format_table(result)


def test_plans_written_before_probabilities_load_without_them(data_dir: Path, tmp_path: Path) -> None:
    plan = make_plan(RunConfig(scenes=(str(_scene(data_dir)),), out=str(tmp_path / "r"), probabilities=True))
    assert RunPlan.from_json(plan.to_json()) == plan and "per-class probabilities" in describe(plan)
    old = {k: v for k, v in json.loads(plan.to_json()).items() if k != "probabilities"}
    assert RunPlan.from_json(json.dumps(old)).probabilities is False
