"""Test-time augmentation: softmax averaged over the square's 8 flips and turns, with the shipped models; a run with
--tta records it in its plan, maps mostly as a plain run does, and its rerun keeps it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geoseg.cli import main
from geoseg.config import RunConfig
from geoseg.infer import predict, probabilities
from geoseg.ledger import load_ledger, save_ledger
from geoseg.model.checkpoint import load_model
from geoseg.plan import RunPlan, load_plan
from geoseg.planner import describe, make_plan

SYMMETRIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "left-right flip": lambda t: t.flip(-1),
    "up-down flip": lambda t: t.flip(-2),
    "quarter turn": lambda t: torch.rot90(t, 1, (-2, -1)),
    "transpose": lambda t: t.transpose(-2, -1),
}


def s2_scene(data_dir: Path) -> Path:
    return data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"


@pytest.fixture(scope="module")
def s2_batch(data_dir: Path) -> torch.Tensor:
    """Two normalised 160 px windows of the validation date, as the actor's forward pass gets them."""
    card, _ = load_model("sentinel2-lulc")
    with rasterio.open(s2_scene(data_dir)) as src:
        scene = src.read()
    return torch.from_numpy(card.normalise(np.stack([scene[:, 20:180, 40:200], scene[:, 200:360, 180:340]])))


def test_tta_probabilities_sum_to_one_and_confidence_is_their_max(s2_batch: torch.Tensor) -> None:
    card, model = load_model("sentinel2-lulc")
    prob = probabilities(model, s2_batch, tta=True)
    assert prob.shape == (2, len(card.classes), 160, 160) and prob.dtype == torch.float32
    assert torch.allclose(prob.sum(1), torch.ones(()), atol=1e-5)
    classes, conf = predict(model, s2_batch, torch.as_tensor(card.class_ids), tta=True)
    assert torch.equal(conf, (prob.max(1).values * 255).round().to(torch.uint8))
    assert torch.equal(classes, torch.as_tensor(card.class_ids)[prob.argmax(1)])
    plain = probabilities(model, s2_batch)
    assert not torch.allclose(prob, plain, atol=1e-3)  # the average is not the plain softmax ...
    agree = (prob.argmax(1) == plain.argmax(1)).float().mean()
    assert agree > 0.9, agree  # ... yet mostly picks the same class


@pytest.mark.parametrize("name", SYMMETRIES)
def test_tta_prediction_of_a_flipped_or_turned_input_is_the_flipped_or_turned_prediction(
        s2_batch: torch.Tensor, name: str) -> None:
    """Exact dihedral invariance: the map no longer depends on which way the scene lies (the plain forward pass
    does, which is what makes the check non-trivial)."""
    _, model = load_model("sentinel2-lulc")
    g = SYMMETRIES[name]
    prob = probabilities(model, s2_batch, tta=True)
    moved = probabilities(model, g(s2_batch), tta=True)
    assert torch.allclose(moved, g(prob), atol=1e-5), (moved - g(prob)).abs().max()
    plain = probabilities(model, s2_batch)
    assert not torch.allclose(probabilities(model, g(s2_batch)), g(plain), atol=1e-3)


def test_tta_of_a_pixelwise_network_is_that_network(s2_batch: torch.Tensor) -> None:
    """A 1x1 convolution commutes with every flip and turn, so averaging over them changes nothing: each transform
    is undone onto the pixel it came from."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(10, 6, 1).eval()
    assert torch.allclose(probabilities(net, s2_batch, tta=True), probabilities(net, s2_batch), atol=1e-6)


def test_tta_on_the_aerial_model_is_invariant_too(data_dir: Path) -> None:
    card, model = load_model("aerial-rgb")
    with rasterio.open(data_dir / "scenes" / "drone_webodm_orthophoto.tif") as src:
        x = torch.from_numpy(card.normalise(src.read((1, 2, 3))[None, :, :192, :192]))
    prob = probabilities(model, x, tta=True)
    assert torch.allclose(prob.sum(1), torch.ones(()), atol=1e-5)
    assert torch.allclose(probabilities(model, x.flip(-1), tta=True), prob.flip(-1), atol=1e-5)


def _classes(run_dir: Path) -> np.ndarray:
    with rasterio.open(run_dir / "classes.tif") as src:
        return src.read(1)


def test_run_with_tta_records_it_and_its_rerun_keeps_it(tmp_path: Path, data_dir: Path, ray_session: None) -> None:
    scene, small = str(s2_scene(data_dir)), ["--tile-size", "128"]
    plain, tta = tmp_path / "plain", tmp_path / "tta"
    assert main(["run", "--scenes", scene, "--out", str(plain), *small]) == 0
    assert main(["run", "--scenes", scene, "--out", str(tta), *small, "--tta"]) == 0
    assert json.loads((tta / "plan.json").read_text())["tta"] is True
    assert load_plan(str(plain)).tta is False
    before = _classes(tta)
    differ = float((before != _classes(plain)).mean())
    assert 0 < differ < 0.1, differ  # a few pixels change class, most do not

    plan = load_plan(str(tta))
    ledger = load_ledger(str(tta), plan.tile_count)
    ledger.done.clear()  # as if the driver had died before recording any tile: the rerun redoes them all
    save_ledger(str(tta), ledger)
    assert main(["rerun", str(tta)]) == 0
    report = json.loads((tta / "report.json").read_text())
    assert report["tiles_processed"] == plan.tile_count
    assert load_plan(str(tta)).tta is True
    assert np.array_equal(_classes(tta), before)  # the plan's TTA, not a plain forward pass


def test_plans_written_before_tta_load_without_it(data_dir: Path, tmp_path: Path) -> None:
    plan = make_plan(RunConfig(scenes=(str(s2_scene(data_dir)),), out=str(tmp_path / "r"), tta=True))
    assert RunPlan.from_json(plan.to_json()) == plan and "test-time augmentation" in describe(plan)
    old = json.loads(plan.to_json())
    del old["tta"]
    assert RunPlan.from_json(json.dumps(old)).tta is False
