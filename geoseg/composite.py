"""Compositing: one input square from the items (dates) that see a tile, and where each pixel came from.

The planner puts the items in the order the rule takes them (:func:`order`), so three of the four rules are
one pass of "first usable observation wins" and only ``median`` looks at every date:

- ``first``: the order listed (``--scenes``) or the earliest date first (a catalogue);
- ``latest``: the latest date first (``--scenes``: the last listed first);
- ``least-cloudy``: the item with the least cloud cover first (its catalogue's ``eo:cloud_cover``; items
  without one last), so each pixel comes from the clearest date that sees it, the same choice on every tile
  (no seams);
- ``median``: the per-band median of the clear observations.

Provenance (uint16, ``provenance.tif``): for the first three rules 1 + the index of the item a pixel came
from (``report.json`` lists the items in this order), for ``median`` the number of clear observations; 0
where no item has data, :data:`ALL_CLOUDY` where every item that has data there is masked (cloud, shadow).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from geoseg.arrays import Image, Mask
from geoseg.plan import Item

RULES = ("first", "latest", "least-cloudy", "median")
NO_DATA = 0
ALL_CLOUDY = 65535
Provenance = npt.NDArray[np.uint16]


class Observation(NamedTuple):
    """One item read onto a tile's input square: which item (its index in the plan), its values, where they
    are usable (observed, clear) and where it observed the ground at all (usable or masked as cloud)."""

    item: int
    data: Image
    usable: Mask
    seen: Mask


def order(items: Sequence[Item], rule: str) -> list[int]:
    """The indexes of ``items`` in the order ``rule`` takes them (stable: ties keep the listed order)."""
    n = range(len(items))
    if rule == "latest":
        if all(i.datetime is None for i in items):
            return list(reversed(n))
        return sorted(n, key=lambda k: items[k].datetime or "", reverse=True)
    if rule == "least-cloudy":
        return sorted(n, key=lambda k: (items[k].cloud_cover is None, items[k].cloud_cover or 0.0))
    if all(i.datetime is not None for i in items):
        return sorted(n, key=lambda k: items[k].datetime or "")  # first and median: by date
    return list(n)


def composite(observations: Sequence[Observation], rule: str, band_count: int, size: int, dtype: str
              ) -> tuple[Image, Mask, Provenance]:
    """The tile's input square from its observations, given in the plan's item order (the rule's order):
    (image[B,H,W], valid[H,W], provenance[H,W])."""
    seen = np.zeros((size, size), bool)
    for obs in observations:
        seen |= obs.seen
    if rule == "median":
        image, valid, count = _median(observations, band_count, size, dtype)
        provenance = count.astype(np.uint16)
    else:
        image, valid, source = _first_usable(observations, band_count, size, dtype)
        items = np.array([obs.item for obs in observations] or [0], np.int32)
        provenance = (items[np.maximum(source, 0)] + 1).astype(np.uint16)
    provenance[~valid] = NO_DATA
    provenance[~valid & seen] = ALL_CLOUDY
    return image, valid, provenance


def _first_usable(observations: Sequence[Observation], band_count: int, size: int, dtype: str
                  ) -> tuple[Image, Mask, npt.NDArray[np.int32]]:
    """Each pixel from the first observation usable there: (image, valid, index of the observation)."""
    source = np.full((size, size), -1, np.int32)
    if len(observations) == 1 and observations[0].data.dtype == np.dtype(dtype):
        _, data, usable, _ = observations[0]  # one item: its pixels as read (the forward pass masks the rest)
        source[usable] = 0
        return data, usable, source
    image = np.zeros((band_count, size, size), dtype)
    valid = np.zeros((size, size), bool)
    for k, obs in enumerate(observations):
        take = obs.usable & ~valid
        np.copyto(image, obs.data, where=take[None], casting="unsafe")
        source[take] = k
        valid |= take
    return image, valid, source


def _median(observations: Sequence[Observation], band_count: int, size: int, dtype: str
            ) -> tuple[Image, Mask, npt.NDArray[np.int32]]:
    """The per-band median of the usable observations of each pixel (half-way values round to even):
    (image, valid, number of usable observations)."""
    count = np.zeros((size, size), np.int32)
    for obs in observations:
        count += obs.usable
    valid = count > 0
    if not observations:
        return np.zeros((band_count, size, size), dtype), valid, count
    # observations last, so each pixel's values are contiguous: the sort runs over short rows in place
    stack = np.full((band_count, size, size, len(observations)), np.nan, np.float32)
    for k, obs in enumerate(observations):
        np.copyto(stack[..., k], obs.data, where=obs.usable[None], casting="unsafe")
    stack.sort(axis=-1)  # unusable (NaN) last: each pixel's usable values come first, in order
    low = (np.maximum(count - 1, 0) // 2)[None, :, :, None]
    high = (count // 2)[None, :, :, None]
    middle = (np.take_along_axis(stack, low, axis=-1) + np.take_along_axis(stack, high, axis=-1))[..., 0] / 2
    return np.where(valid[None], np.rint(middle), 0).astype(dtype), valid, count
