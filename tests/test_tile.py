"""Compositing overlapping scenes: the first scene listed wins, later ones only fill its gaps."""

from __future__ import annotations

import numpy as np

from geoseg.tile import composite


def test_first_valid_scene_wins_and_later_scenes_fill_gaps() -> None:
    a = np.full((2, 4, 4), 10, np.uint16)
    b = np.full((2, 4, 4), 20, np.uint16)
    va = np.zeros((4, 4), bool)
    va[:, :2] = True
    vb = np.zeros((4, 4), bool)
    vb[:2, :] = True
    image, valid = composite([(a, va), (b, vb)], 2, 4, "uint16")
    assert (image[:, :, :2] == 10).all()
    assert (image[:, :2, 2:] == 20).all()
    assert (image[:, 2:, 2:] == 0).all()
    assert np.array_equal(valid, va | vb)
