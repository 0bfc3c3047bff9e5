"""Training: config parsing, the ignore value in the loss, and a short real run through Ray Train."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from geoseg.errors import ConfigError
from geoseg.model.card import ClassInfo
from geoseg.model.checkpoint import load_card, load_model, read_checkpoint
from geoseg.train import (
    TrainConfig,
    class_lookup,
    kept_loss,
    load_config,
    lr_at,
    masked_loss,
    predict_ids,
    prepare_data,
    train,
    train_from_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["sentinel2-lulc", "aerial-rgb"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.toml")
    assert config.name == name and config.validate and config.train and config.training_data


def test_unknown_config_keys_list_the_valid_ones(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('name = "x"\nepochz = 3\n')
    with pytest.raises(ConfigError, match="epochz.*valid keys.*epochs"):
        load_config(tmp_path / "c.toml")


def test_a_holdout_block_is_neither_trained_nor_chosen_on_and_is_what_is_reported(data_dir: Path) -> None:
    config = TrainConfig(
        data_root=str(data_dir), images="sentinel2_strzegom/scenes/strzegom_{item}_33u.tif",
        labels="sentinel2_strzegom/labels/{stem}.tif", classes_json="sentinel2_strzegom/classes.json",
        train=("20220719",), validate=("20230530",), report=("20230530",), holdout="east")
    data = prepare_data(config)
    assert [i.image.shape[1:] for i in (*data.train, *data.validate)] == [(401, 301)] * 2
    import rasterio

    with rasterio.open(data_dir / "sentinel2_strzegom/scenes/strzegom_20230530_33u.tif") as src:
        scene = src.read()
    assert np.array_equal(data.report[0].image, scene[:, :, 301:])
    assert np.array_equal(data.validate[0].image, scene[:, :, :301])


def test_set_overrides_a_recipe_key_by_key() -> None:
    config = load_config(CONFIGS / "aerial-rgb.toml",
                         ["loss=cross-entropy+dice", "width = 48", 'name="aerial-wide"', "balance=1", "out=runs/x"])
    assert (config.loss, config.width, config.name, config.balance, config.out) == (
        "cross-entropy+dice", 48, "aerial-wide", 1, "runs/x")
    assert config.train == load_config(CONFIGS / "aerial-rgb.toml").train
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(CONFIGS / "aerial-rgb.toml", ["width"])
    with pytest.raises(ConfigError, match="loss must be one of cross-entropy, cross-entropy\\+dice"):
        load_config(CONFIGS / "aerial-rgb.toml", ["loss=focal"])


def test_dice_adds_one_minus_the_mean_soft_dice_of_the_labelled_classes() -> None:
    card = replace(load_card("sentinel2-lulc"),
                   classes=(ClassInfo(1, "a", "#ff0000"), ClassInfo(3, "b", "#00ff00"), ClassInfo(5, "c", "#0000ff")))
    lookup = class_lookup(card)
    labels = torch.tensor([[[1, 1, 1, 3], [0, 0, 0, 0]]])  # class 5 is not in the batch
    logits = torch.randn(1, 3, 2, 4)
    p = logits.softmax(1)[0, :, 0]  # (3 classes, 4 labelled pixels)
    truth = torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    dice = 2 * (p * truth).sum(1) / (p.sum(1) + truth.sum(1))
    expected = masked_loss(logits, labels, lookup) + 1 - dice[:2].mean()
    assert torch.allclose(masked_loss(logits, labels, lookup, "cross-entropy+dice"), expected)
    other = logits.clone()
    other[..., 1, :] = 100 * torch.randn(3, 4)  # unlabelled pixels change neither term
    assert torch.allclose(masked_loss(other, labels, lookup, "cross-entropy+dice"), expected)


def test_ignored_pixels_do_not_affect_the_loss() -> None:
    card = replace(load_card("sentinel2-lulc"), classes=(ClassInfo(1, "a", "#ff0000"), ClassInfo(3, "b", "#00ff00")))
    lookup = class_lookup(card)
    labels = torch.tensor([[[1, 3], [0, 0]]])
    logits = torch.randn(1, 2, 2, 2)
    other = logits.clone()
    other[..., 1, :] = 100 * torch.randn(2, 2)  # change only the unlabelled row
    loss = masked_loss(logits, labels, lookup)
    assert torch.equal(loss, masked_loss(other, labels, lookup))
    expected = torch.nn.functional.cross_entropy(logits[0, :, 0].T, torch.tensor([0, 1]))
    assert torch.allclose(loss, expected)


def test_learning_rate_warms_up_then_decays() -> None:
    lrs = [lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] < lrs[4] == 1.0 and lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_short_real_training_run_learns_resumes_loads_and_fine_tunes(data_dir: Path, ray_session: None,
                                                                      tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """Two epochs on real Strzegom chips through Ray Train, east quarter held out; then one more epoch resumed.
    The driver shows the workers' progress (a bar, plain lines off a terminal, and each epoch's summary)."""
    base = dict(
        name="tiny", data_root=str(data_dir), images="sentinel2_strzegom/scenes/strzegom_{item}_33u.tif",
        labels="sentinel2_strzegom/labels/{stem}.tif", classes_json="sentinel2_strzegom/classes.json",
        train=("20220719",), validate=("20220719",), report=("20230530",), holdout="east", width=8, chip=64,
        batch_size=8,
        steps_per_epoch=12, lr=0.01, out=str(tmp_path / "run"),
        training_data=("Strzegom test chips (licence not stated)",), reflectance_offset=1000.0,
    )
    path = train(TrainConfig(**base, epochs=2))  # type: ignore[arg-type]
    shown = capfd.readouterr().err
    assert "[tiny] epoch 1/2 loss" in shown and "[tiny] epoch 2/2 loss" in shown and "24/24" in shown, shown
    runs = sorted((tmp_path / "run" / "ray" / "tiny").glob("checkpoint_*/model.pt"))
    metrics = sorted((json.loads(read_checkpoint(p)["extra"]["metrics"]) for p in runs), key=lambda m: m["epoch"])
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    assert 0 < metrics[1]["val_miou"] <= 1
    per_epoch = [v for k, v in metrics[1].items() if k.startswith("val_iou_")]  # the classes the mean counts
    assert len(per_epoch) > 1 and np.mean(per_epoch) == pytest.approx(metrics[1]["val_miou"])
    chosen = json.loads(read_checkpoint(path)["extra"]["metrics"])  # the report set scored once, by the chosen epoch
    assert chosen["epoch"] in (0, 1) and 0 < chosen["report_miou"] <= 1 and "report_miou" not in metrics[1]
    per_class = [v for k, v in chosen.items() if k.startswith("report_iou_")]  # what bench/tries.py tabulates
    assert len(per_class) > 1 and np.mean(per_class) == pytest.approx(chosen["report_miou"])

    card, model = load_model(path)
    assert card.bands[2] == "B04" and len(card.classes) == 10 and card.width == 8 and card.reflectance_offset == 1000
    raw = np.random.default_rng(0).integers(0, 3000, (10, 70, 90)).astype(np.uint16)
    ids = predict_ids(model, card, raw, tile_size=32, halo=8)
    assert ids.shape == (70, 90) and set(np.unique(ids)) <= set(range(1, 11))

    # what only the card says may change on resuming: the network learns the same
    train(TrainConfig(**{**base, "training_data": ("Strzegom test chips, relicensed",)}, epochs=3))  # type: ignore[arg-type]
    last = max((json.loads(read_checkpoint(p)["extra"]["metrics"])
                for p in runs[0].parent.parent.glob("checkpoint_*/model.pt")), key=lambda m: m["epoch"])
    assert (last["epoch"], last["first_epoch"]) == (2, 2)  # continued with the third epoch rather than starting over
    with pytest.raises(ConfigError, match="other settings \\(width\\)"):
        train(TrainConfig(**{**base, "width": 4}, epochs=4))  # type: ignore[arg-type]

    # fine-tune from that model: the encoder stays exactly as loaded while frozen, then moves
    tuned = {**base, "name": "tuned", "out": str(tmp_path / "tuned"), "pretrained": str(path),
             "freeze_encoder_epochs": 1, "steps_per_epoch": 4}
    train(TrainConfig(**tuned, epochs=2))  # type: ignore[arg-type]
    source = {k: v for k, v in read_checkpoint(path)["state_dict"].items() if k.startswith("encoder.")}
    tuned_checkpoints = (tmp_path / "tuned" / "ray" / "tuned").glob("checkpoint_*/model.pt")
    by_epoch = {json.loads(raw["extra"]["metrics"])["epoch"]: raw["state_dict"]
                for raw in map(read_checkpoint, tuned_checkpoints)}
    assert all(torch.equal(by_epoch[0][k], v) for k, v in source.items())
    assert not torch.equal(by_epoch[1]["encoder.layer1.0.conv1.weight"], source["encoder.layer1.0.conv1.weight"])
    assert not torch.equal(by_epoch[0]["head.weight"], read_checkpoint(path)["state_dict"]["head.weight"])


def test_gpus_on_a_cluster_without_gpus_is_a_named_error(data_dir: Path, ray_session: None, tmp_path: Path) -> None:
    """`geoseg train --gpus 1` on a CPU-only cluster says so instead of waiting forever for a GPU."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'name = "tiny"\ndata_root = "{data_dir}"\nimages = "sentinel2_strzegom/scenes/strzegom_{{item}}_33u.tif"\n'
        'labels = "sentinel2_strzegom/labels/{stem}.tif"\nclasses_json = "sentinel2_strzegom/classes.json"\n'
        f'train = ["20220719"]\nvalidate = ["20220719"]\nwidth = 8\nchip = 64\nout = "{tmp_path / "run"}"\n'
    )
    with pytest.raises(ConfigError, match="1 GPU worker.*0 GPU"):
        train_from_config(config, gpus=1)
    assert not (tmp_path / "run" / "tiny.pt").exists()


def test_the_kept_loss_counts_only_unlabelled_pixels_and_vanishes_where_the_start_is_kept() -> None:
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unlabelled = torch.zeros(2, 8, 8, dtype=torch.bool)
    unlabelled[:, :4] = True
    assert kept_loss(start, start, unlabelled).item() < 1e-6
    moved = start.clone()
    moved[:, :, 4:] += 5 * torch.randn(2, 4, 4, 8)  # changed only where pixels are labelled
    assert kept_loss(moved, start, unlabelled).item() < 1e-6
    moved[:, :, :4] = -start[:, :, :4]
    assert kept_loss(moved, start, unlabelled).item() > 0.1


def test_training_scores_the_map_a_run_makes(tmp_path: Path, data_dir: Path, ray_session: None) -> None:
    """The training job's scoring (`predict_ids`) gives exactly the class raster `geoseg run` writes with the card's
    tile and halo, nodata included: the epoch is picked by the maps users get (windows cut at the image edge
    instead differed on 8% of the pixels)."""
    import rasterio

    from geoseg.cli import main
    from geoseg.datasets import read_pair

    scenes = data_dir / "sentinel2_strzegom"
    pair = read_pair(scenes / "scenes" / "strzegom_20230530_33u.tif", scenes / "labels" / "strzegom_20230530_33u.tif")
    card, model = load_model("sentinel2-lulc")
    assert main(["run", "--scenes", str(scenes / "scenes" / "strzegom_20230530_33u.tif"), "--out",
                 str(tmp_path / "run"), "--tile-size", str(card.tile_size)]) == 0
    with rasterio.open(tmp_path / "run" / "classes.tif") as src:
        written = src.read(1)
    assert np.array_equal(predict_ids(model, card, pair.image), written)
