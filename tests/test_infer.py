"""Batch prediction: normalisation and padding, class-id mapping, and independence from batch-mates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch

from geoseg.infer import predict, prepare
from geoseg.model.checkpoint import load_model


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
