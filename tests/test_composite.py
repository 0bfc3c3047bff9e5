"""Compositing items (dates) per pixel by each rule, and the provenance it reports (composite.py)."""

from __future__ import annotations

import numpy as np

from geoseg.composite import ALL_CLOUDY, NO_DATA, Observation, composite, order
from geoseg.plan import Item


def obs(item: int, value: int, usable: np.ndarray, seen: np.ndarray | None = None) -> Observation:
    return Observation(item, np.full((2, 4, 4), value, np.uint16), usable, usable if seen is None else seen)


def halves() -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros((4, 4), bool)
    left[:, :2] = True
    top = np.zeros((4, 4), bool)
    top[:2, :] = True
    return left, top


def test_first_usable_wins_and_later_items_fill_gaps() -> None:
    left, top = halves()
    image, valid, provenance = composite([obs(3, 10, left), obs(5, 20, top)], "first", 2, 4, "uint16")
    assert (image[:, :, :2] == 10).all() and (image[:, :2, 2:] == 20).all() and (image[:, 2:, 2:] == 0).all()
    assert np.array_equal(valid, left | top)
    assert (provenance[:, :2] == 4).all() and (provenance[:2, 2:] == 6).all()  # 1 + the item's plan index
    assert (provenance[2:, 2:] == NO_DATA).all()


def test_pixels_only_cloudy_are_marked_all_cloudy_not_no_data() -> None:
    left, top = halves()
    cloudy = obs(0, 10, np.zeros((4, 4), bool), seen=top)  # saw the top half, all of it masked
    image, valid, provenance = composite([cloudy, obs(1, 20, left)], "least-cloudy", 2, 4, "uint16")
    assert (image[:, :, :2] == 20).all() and (provenance[:, :2] == 2).all()
    assert (provenance[:2, 2:] == ALL_CLOUDY).all() and (provenance[2:, 2:] == NO_DATA).all()
    assert not valid[:, 2:].any()


def test_median_takes_the_clear_observations_only_and_counts_them() -> None:
    left, top = halves()
    everywhere = np.ones((4, 4), bool)
    image, valid, provenance = composite([obs(0, 10, everywhere), obs(1, 30, left), obs(2, 1000, top & ~left)],
                                         "median", 2, 4, "uint16")
    assert (image[:, :, :2] == 20).all()  # median of 10 and 30
    assert (image[:, :2, 2:] == 505).all()  # median of 10 and 1000
    assert (image[:, 2:, 2:] == 10).all()
    assert valid.all() and (provenance[:, :2] == 2).all() and (provenance[2:, 2:] == 1).all()


def item(name: str, when: str | None = None, cloud: float | None = None) -> Item:
    return Item(name, (), (0.0, 0.0, 1.0, 1.0), datetime=when, cloud_cover=cloud)


def test_rules_order_items_by_date_or_cloud_cover() -> None:
    items = [item("b", "2023-05-30", 40.0), item("a", "2021-06-19", 5.0), item("c", "2022-07-19", None)]
    assert order(items, "first") == [1, 2, 0]  # earliest first
    assert order(items, "latest") == [0, 2, 1]
    assert order(items, "least-cloudy") == [1, 0, 2]  # unknown cloud cover last
    files = [item("x"), item("y"), item("z")]  # --scenes: the order listed rules
    assert order(files, "first") == [0, 1, 2] and order(files, "latest") == [2, 1, 0]


def test_median_equals_numpys_nanmedian_of_the_usable_values() -> None:
    rng = np.random.default_rng(1)
    shape = (32, 32)
    observations = [Observation(k, rng.integers(1, 5000, (3, *shape)).astype(np.uint16), rng.random(shape) > 0.3,
                                np.ones(shape, bool)) for k in range(5)]
    image, valid, provenance = composite(observations, "median", 3, 32, "uint16")
    stack = np.stack([np.where(o.usable[None], o.data, np.nan) for o in observations])
    usable = np.stack([o.usable for o in observations]).any(axis=0)
    expected = np.zeros((3, *shape), np.uint16)
    expected[:, usable] = np.rint(np.nanmedian(stack[:, :, usable], axis=0))
    assert np.array_equal(image, expected) and np.array_equal(valid, usable)
    assert np.array_equal(provenance[usable], np.stack([o.usable for o in observations]).sum(axis=0)[usable])
