"""Reading real pairs (GeoTIFF and JPEG + colour-coded PNG), colour mapping, hold-out blocks, chips, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from geoseg.datasets import (
    ChipSampler,
    LabelledImage,
    augment,
    block_slices,
    class_frequencies,
    find_pairs,
    read_pair,
    rgb_to_ids,
)
from geoseg.errors import ConfigError

COLOURS = {(60, 16, 152): 1, (132, 41, 246): 2, (110, 193, 228): 3, (254, 221, 58): 4, (226, 169, 41): 5,
           (155, 155, 155): 0, (0, 0, 0): 0}


def test_rgb_to_ids_maps_known_colours_and_ignores_the_rest() -> None:
    mask = np.array([[[60, 16, 152], [226, 169, 41], [1, 2, 3]],
                     [[155, 155, 155], [132, 41, 246], [254, 221, 58]]], np.uint8)
    assert rgb_to_ids(mask, COLOURS).tolist() == [[1, 5, 0], [0, 2, 4]]


def test_sentinel2_pairs_are_found_and_read(data_dir: Path) -> None:
    pairs = find_pairs(data_dir, "sentinel2_strzegom/scenes/strzegom_{item}_33u.tif",
                       "sentinel2_strzegom/labels/{stem}.tif", ("20230530",))
    item = read_pair(*pairs[0])
    assert item.image.shape == (10, 401, 401) and item.image.dtype == np.uint16
    assert item.label.dtype == np.uint8 and set(np.unique(item.label)) <= set(range(11))
    labelled = (item.label > 0).mean()
    assert 0.15 < labelled < 0.4  # about a quarter labelled
    assert not (item.label == 6).any()  # permanent grassland does not occur in this area


def test_missing_items_say_what_to_check(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="item '19990101'"):
        find_pairs(data_dir, "sentinel2_strzegom/scenes/strzegom_{item}_33u.tif",
                   "sentinel2_strzegom/labels/{stem}.tif", ("19990101",))


def test_paletted_masks_are_converted_to_rgb_before_mapping(data_dir: Path) -> None:
    """Tile 2's masks are paletted; read as indices they would map to nothing."""
    pairs = find_pairs(data_dir, "aerial_dubai/tile_{item}/images/*.jpg", "aerial_dubai/tile_{item}/masks/{stem}.png",
                       ("2",))
    assert len(pairs) == 9
    item = read_pair(*pairs[0], colours=COLOURS)
    assert item.image.shape[0] == 3 and item.image.dtype == np.uint8
    assert (item.label > 0).mean() > 0.9
    assert set(np.unique(item.label)) - {0} <= {1, 2, 3, 4, 5} and (item.label == 1).any()


def test_downsample_halves_image_and_mask_together(data_dir: Path) -> None:
    pairs = find_pairs(data_dir, "aerial_dubai/tile_{item}/images/*.jpg", "aerial_dubai/tile_{item}/masks/{stem}.png",
                       ("1",))
    full = read_pair(*pairs[0], colours=COLOURS)
    half = read_pair(*pairs[0], colours=COLOURS, downsample=2)
    assert half.image.shape == (3, full.image.shape[1] // 2, full.image.shape[2] // 2)
    assert half.label.shape == half.image.shape[1:]
    # class proportions survive nearest-neighbour reduction of the mask
    f = np.bincount(full.label.ravel(), minlength=6) / full.label.size
    h = np.bincount(half.label.ravel(), minlength=6) / half.label.size
    assert np.abs(f - h).max() < 0.02


@pytest.mark.parametrize("block", ["east", "west", "north", "south"])
def test_hold_out_block_and_rest_partition_the_image(block: str) -> None:
    held, rest = block_slices((401, 401), block, 0.25)
    cover = np.zeros((401, 401), int)
    cover[held] += 1
    cover[rest] += 1
    assert (cover == 1).all()
    assert abs(np.zeros((401, 401))[held].size / 401**2 - 0.25) < 0.01
    if block == "east":
        assert held[1] == slice(301, None)


def _toy(h: int = 64, w: int = 64) -> LabelledImage:
    label = np.zeros((h, w), np.uint8)
    label[:4, :4] = 2  # a rare class: 16 pixels
    label[20:, :] = 1  # a common class
    return LabelledImage("toy", np.arange(3 * h * w, dtype=np.uint16).reshape(3, h, w), label)


def test_chips_always_hold_labelled_pixels_and_rare_classes_are_drawn_more() -> None:
    ids = np.array([1, 2], np.uint8)
    natural = ChipSampler([_toy()], ids, chip=32, balance=0.0)
    balanced = ChipSampler([_toy()], ids, chip=32, balance=1.0)
    assert natural.class_p[1] < 0.02 and balanced.class_p == pytest.approx([0.5, 0.5])
    images, labels = balanced.sample(np.random.default_rng(0), 40)
    assert images.shape == (40, 3, 32, 32) and labels.shape == (40, 32, 32)
    assert ((labels > 0).reshape(40, -1).any(1)).all()
    assert 10 < (labels == 2).reshape(40, -1).any(1).sum()
    assert class_frequencies([_toy()], ids).tolist() == [44 * 64, 16]


def test_chips_larger_than_the_image_are_padded_unlabelled() -> None:
    sampler = ChipSampler([_toy(24, 20)], np.array([1, 2], np.uint8), chip=32)
    images, labels = sampler.sample(np.random.default_rng(1), 3)
    assert images.shape == (3, 3, 32, 32)
    assert (labels[:, 24:, :] == 0).all() and (labels[:, :, 20:] == 0).all()


def test_augmentation_keeps_image_and_label_aligned() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(16, 8, 8)).astype(np.uint8)
    images = np.repeat(labels[:, None].astype(np.float32), 2, axis=1)
    out_i, out_l = augment(images, labels, rng)
    assert all((out_i[j, 0] == out_l[j]).all() for j in range(16))
    assert sum((out_l[j] != labels[j]).any() for j in range(16)) > 8  # most chips were turned or flipped
    bright, _ = augment(np.ones((200, 1, 2, 2), np.float32), np.zeros((200, 2, 2), np.uint8), rng, brightness=0.2)
    assert 0.8 <= bright.min() < 0.85 and 1.15 < bright.max() <= 1.2


def test_band_jitter_scales_each_band_separately() -> None:
    out, _ = augment(np.ones((50, 4, 2, 2), np.float32), np.zeros((50, 2, 2), np.uint8), np.random.default_rng(2),
                     band_jitter=0.1)
    gains = out[:, :, 0, 0]
    assert 0.9 <= gains.min() and gains.max() <= 1.1
    assert (gains.std(axis=1) > 0.01).mean() > 0.9  # bands of one chip get different gains


def test_offset_shifts_whole_chips_by_one_constant() -> None:
    out, _ = augment(np.zeros((50, 3, 2, 2), np.float32), np.zeros((50, 2, 2), np.uint8), np.random.default_rng(3),
                     offset=1000)
    per_chip = out.reshape(50, -1)
    assert (per_chip == per_chip[:, :1]).all() and np.abs(per_chip).max() <= 1000 and per_chip.std() > 300


def test_zoomed_chips_keep_image_and_label_aligned() -> None:
    """An image whose first band equals its label must still match after resampling at another scale."""
    label = np.zeros((96, 96), np.uint8)
    label[:, 48:] = 1
    label[40:56, :] = 2
    item = LabelledImage("stripes", np.stack([label, label]).astype(np.uint16) * 100, label)
    sampler = ChipSampler([item], np.array([1, 2], np.uint8), chip=32, zoom=2.0)
    images, labels = sampler.sample(np.random.default_rng(4), 30)
    assert images.shape == (30, 2, 32, 32) and images.dtype == np.float32
    agree = np.abs(images[:, 0] - labels * 100.0) < 1
    assert agree.mean() > 0.9  # bilinear blends only along class edges
    rows = [(lab == 2).all(1) for lab in labels]
    inside = [int(r.sum()) for r in rows if r.any() and not r[0] and not r[-1]]
    assert len(set(inside)) > 3  # the 16-px stripe appears at several thicknesses: several scales
