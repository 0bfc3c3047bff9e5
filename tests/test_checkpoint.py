"""Checkpoints are a contract: round trip, refusal of foreign files without running their code, pretrained encoders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from geoseg.errors import CheckpointError
from geoseg.model import SHIPPED
from geoseg.model.card import ClassInfo, ModelCard
from geoseg.model.checkpoint import load_card, load_model, save_checkpoint
from geoseg.model.pretrained import adapt_first_conv, load_encoder
from geoseg.model.unet import build_unet

S2 = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")


def make_card(bands: tuple[str, ...] = ("red", "green", "blue"), width: int = 4, **kw: object) -> ModelCard:
    values: dict[str, object] = dict(
        name="test", version="0", architecture="unet-resnet18", encoder="resnet18", width=width, bands=bands,
        input_dtype="uint8", scale=1 / 255, mean=(0.5,) * len(bands), std=(0.25,) * len(bands), gsd_m=1.0,
        tile_size=256, halo=32, classes=(ClassInfo(1, "a", "#ff0000"), ClassInfo(3, "b", "#00ff00")),
        nodata="zero-filled", training_data=("made in a test",),
    )
    values.update(kw)
    return ModelCard(**values)  # type: ignore[arg-type]


def test_round_trip_keeps_card_weights_and_outputs(tmp_path: Path) -> None:
    card = make_card()
    model = build_unet(3, 2, "resnet18", 4).eval()
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        expected = model(x)
    save_checkpoint(tmp_path / "m.pt", card, model, {"epoch": 3})
    assert load_card(tmp_path / "m.pt") == card
    card2, model2 = load_model(tmp_path / "m.pt")
    assert card2 == card and not model2.training
    with torch.no_grad():
        assert torch.equal(model2(x), expected)


def test_card_dict_round_trip_and_normalise() -> None:
    card = make_card()
    assert ModelCard.from_dict(card.to_dict()) == card
    raw = np.full((3, 2, 2), 255, np.uint8)
    assert np.allclose(card.normalise(raw), (1.0 - 0.5) / 0.25)
    assert card.normalise(raw).dtype == np.float32
    assert list(card.class_ids) == [1, 3]


def test_malformed_cards_are_refused_with_the_reason() -> None:
    with pytest.raises(CheckpointError, match="missing fields"):
        ModelCard.from_dict({"name": "x"})
    with pytest.raises(CheckpointError, match="one value per band"):
        make_card(mean=(0.1,))
    with pytest.raises(CheckpointError, match="0 is nodata"):
        make_card(classes=(ClassInfo(0, "a", "#000000"),))
    with pytest.raises(CheckpointError, match="rrggbb"):
        make_card(classes=(ClassInfo(1, "a", "red"),))


def test_foreign_files_raise_checkpoint_error_saying_what_to_pass(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="sentinel2-lulc"):
        load_model(text)
    with pytest.raises(CheckpointError, match="shipped models"):
        load_card(tmp_path / "missing.pt")
    plain = tmp_path / "resnet.pt"
    torch.save(build_unet(3, 2, width=4).encoder.state_dict(), plain)
    with pytest.raises(CheckpointError, match="pretrained"):
        load_card(plain)


class _Payload:
    """A pickle that would create a file when unpickled: loading a checkpoint must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_loading_never_unpickles_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "geoseg-checkpoint", "x": _Payload(marker)}, f)
    with pytest.raises(CheckpointError):
        load_model(evil)
    with pytest.raises(CheckpointError):
        load_card(evil)
    assert not marker.exists()


@pytest.mark.parametrize(("name", "bands", "n_classes"),
                         [("sentinel2-lulc", S2, 10), ("aerial-rgb", ("red", "green", "blue"), 5)])
def test_shipped_models_load_and_predict(name: str, bands: tuple[str, ...], n_classes: int) -> None:
    assert SHIPPED[name].is_file()
    card, model = load_model(name)
    assert card.name == name and card.bands == bands and len(card.classes) == n_classes
    assert [c.id for c in card.classes] == list(range(1, n_classes + 1))
    assert card.training_data and "licen" in " ".join(card.training_data)
    with torch.no_grad():
        assert model(torch.zeros(1, len(bands), 45, 37)).shape == (1, n_classes, 45, 37)


def test_first_conv_adaptation_matches_bands_by_meaning() -> None:
    rgb = torch.randn(8, 3, 7, 7)
    s2 = adapt_first_conv(rgb, ("red", "green", "blue"), S2)
    assert s2.shape == (8, 10, 7, 7)
    k = 3 / 10
    assert torch.allclose(s2[:, 2], rgb[:, 0] * k)  # B04 = red
    assert torch.allclose(s2[:, 1], rgb[:, 1] * k)  # B03 = green
    assert torch.allclose(s2[:, 0], rgb[:, 2] * k)  # B02 = blue
    assert torch.allclose(s2[:, 9], rgb.mean(1) * k)  # B12 has no RGB counterpart
    # a flat input gives the same first-layer response as before
    assert torch.allclose(s2.sum(1), rgb.sum(1), atol=1e-5)


def test_torchvision_style_state_dict_loads_into_a_ten_band_encoder(tmp_path: Path) -> None:
    source = build_unet(3, 2, "resnet18", 8).encoder
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 64)
    torch.save({"state_dict": state}, tmp_path / "resnet18.pth")
    target = build_unet(10, 10, "resnet18", 8)
    assert load_encoder(target, tmp_path / "resnet18.pth", S2) == 120
    assert torch.equal(target.encoder.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.allclose(target.encoder.conv1.weight[:, 2], source.conv1.weight[:, 0] * 0.3)
    with pytest.raises(CheckpointError, match="width = 8"):
        load_encoder(build_unet(10, 10, "resnet18", 16), tmp_path / "resnet18.pth", S2)


def test_geoseg_checkpoint_encoder_transfers_across_sensors(tmp_path: Path) -> None:
    rgb_model = build_unet(3, 2, "resnet18", 4)
    save_checkpoint(tmp_path / "rgb.pt", make_card(), rgb_model)
    s2_model = build_unet(10, 10, "resnet18", 4)
    load_encoder(s2_model, tmp_path / "rgb.pt", S2)
    assert torch.equal(s2_model.encoder.layer2[0].bn1.running_mean, rgb_model.encoder.layer2[0].bn1.running_mean)
    assert torch.allclose(s2_model.encoder.conv1.weight[:, 1], rgb_model.encoder.conv1.weight[:, 1] * 0.3)
