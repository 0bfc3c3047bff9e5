"""Labelled training data: image/label pairs (GeoTIFF pairs or JPEG + colour-coded PNG masks), chips, augmentation.

Reading is at the edge (`find_pairs`, `read_pair`); chip sampling, colour mapping, hold-out blocks and
augmentation are pure array functions on `LabelledImage` values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from geoseg.arrays import ClassMap, Counts, Image
from geoseg.errors import ConfigError, SceneReadError

HOLDOUT_BLOCKS = ("east", "west", "north", "south")
Chips = npt.NDArray[np.float32]  # (n, bands, chip, chip) raw values as float, before normalisation
ChipLabels = npt.NDArray[np.uint8]  # (n, chip, chip) class ids, 0 unlabelled


@dataclass(frozen=True)
class LabelledImage:
    """One training image: raw values (B, H, W) and class ids (H, W) where 0 means unlabelled (ignored)."""

    name: str
    image: Image
    label: ClassMap


def find_pairs(root: Path, images: str, labels: str, items: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """Image/label paths from two patterns relative to `root`.

    `images` is formatted with {item} and then globbed; `labels` is formatted with {item} and the image's
    {stem}, e.g. images "tile_{item}/images/*.jpg", labels "tile_{item}/masks/{stem}.png".
    """
    pairs = []
    for item in items:
        found = sorted(root.glob(images.format(item=item)))
        if not found:
            raise ConfigError(f"no images match {images.format(item=item)!r} under {root}: "
                              f"check the data root and the item {item!r}")
        for image in found:
            label = root / labels.format(item=item, stem=image.stem)
            if not label.is_file():
                raise ConfigError(f"image {image} has no label file {label}: check the labels pattern")
            pairs.append((image, label))
    return pairs


def rgb_to_ids(mask: npt.NDArray[np.uint8], colours: dict[tuple[int, int, int], int]) -> ClassMap:
    """Colour-coded mask (H, W, 3) -> class ids (H, W) uint8; colours not in the table become 0 (ignored)."""
    codes = (mask[..., 0].astype(np.int32) << 16) | (mask[..., 1].astype(np.int32) << 8) | mask[..., 2].astype(np.int32)
    keys = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in colours), np.int32)
    values = np.array([colours[((k >> 16) & 255, (k >> 8) & 255, k & 255)] for k in keys], np.uint8)
    pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    return np.where(keys[pos] == codes, values[pos], 0).astype(np.uint8)


def _read_geotiff_pair(image: Path, label: Path) -> tuple[Image, ClassMap]:
    import rasterio

    with rasterio.open(image) as src:
        raw = src.read()
    with rasterio.open(label) as src:
        lab = src.read(1)
    if raw.shape[1:] != lab.shape:
        raise SceneReadError(f"{image} is {raw.shape[1:]} but its labels {label} are {lab.shape}: "
                             "they must share a grid")
    lab = np.nan_to_num(lab.astype(np.float64), nan=0.0)
    return raw, np.clip(np.rint(lab), 0, 255).astype(np.uint8)


def _read_png_pair(image: Path, label: Path, colours: dict[tuple[int, int, int], int], downsample: int
                   ) -> tuple[Image, ClassMap]:
    from PIL import Image

    with Image.open(image) as im:
        rgb = im.convert("RGB")
    with Image.open(label) as lm:
        if lm.mode in ("L", "I", "I;16"):  # already class ids
            ids = np.asarray(lm, dtype=np.int64).clip(0, 255).astype(np.uint8)
        else:  # RGB, RGBA or paletted: colour-coded
            ids = rgb_to_ids(np.asarray(lm.convert("RGB")), colours)
    if ids.shape != (rgb.height, rgb.width):
        raise SceneReadError(f"{image} is {rgb.height}x{rgb.width} but its mask {label} is {ids.shape}")
    if downsample > 1:
        size = (max(rgb.width // downsample, 1), max(rgb.height // downsample, 1))
        rgb = rgb.resize(size, Image.Resampling.BOX)
        ids = np.asarray(Image.fromarray(ids).resize(size, Image.Resampling.NEAREST))
    return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1)), ids


def read_pair(image: Path, label: Path, colours: dict[tuple[int, int, int], int] | None = None,
              downsample: int = 1) -> LabelledImage:
    """Read one pair: GeoTIFF image + GeoTIFF labels, or JPEG/PNG image + colour-coded (or id) PNG mask."""
    try:
        if image.suffix.lower() in (".tif", ".tiff"):
            if downsample != 1:
                raise ConfigError("downsample applies to JPEG/PNG images only; "
                                  "GeoTIFF scenes are read at their own resolution")
            raw, ids = _read_geotiff_pair(image, label)
        else:
            raw, ids = _read_png_pair(image, label, colours or {}, downsample)
    except OSError as exc:
        raise SceneReadError(f"cannot read training pair {image} / {label}: {exc}") from exc
    return LabelledImage(name=f"{image.parent.parent.name}/{image.stem}", image=raw, label=ids)


def block_slices(shape: tuple[int, int], block: str, fraction: float
                 ) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(held-out block, the rest) as 2-D slices; e.g. "east", 0.25 -> the eastern quarter and the western three."""
    if block not in HOLDOUT_BLOCKS or not 0 < fraction < 1:
        raise ConfigError(f"hold-out block must be one of {HOLDOUT_BLOCKS} with 0 < fraction < 1, "
                          f"got {block!r}, {fraction}")
    h, w = shape
    all_ = slice(None)
    if block in ("east", "west"):
        cut = round(w * (1 - fraction)) if block == "east" else round(w * fraction)
        east, west = (slice(cut, None), slice(None, cut))
        return ((all_, east), (all_, west)) if block == "east" else ((all_, west), (all_, east))
    cut = round(h * (1 - fraction)) if block == "south" else round(h * fraction)
    south, north = (slice(cut, None), slice(None, cut))
    return ((south, all_), (north, all_)) if block == "south" else ((north, all_), (south, all_))


def crop(item: LabelledImage, window: tuple[slice, slice], suffix: str) -> LabelledImage:
    """The part of an image inside a window: hold-out training never sees the block's pixels, not only its labels."""
    rows, cols = window
    return LabelledImage(f"{item.name}[{suffix}]", np.ascontiguousarray(item.image[:, rows, cols]),
                         np.ascontiguousarray(item.label[rows, cols]))


def class_frequencies(items: list[LabelledImage], class_ids: npt.NDArray[np.uint8]) -> Counts:
    """Labelled pixel count per class, in logits-channel order."""
    counts = np.zeros(256, np.int64)
    for item in items:
        counts += np.bincount(item.label.ravel(), minlength=256)
    per_class: Counts = counts[class_ids]
    return per_class


class ChipSampler:
    """Draws square chips centred near labelled pixels, with rare classes drawn more often.

    Labels are sparse (a quarter of the pixels in Strzegom), so chips are anchored on a labelled pixel of a
    class drawn with probability proportional to frequency ** (1 - balance): 0 keeps natural frequencies,
    1 draws every class equally often.
    """

    def __init__(self, items: list[LabelledImage], class_ids: npt.NDArray[np.uint8], chip: int, balance: float = 0.5,
                 zoom: float = 1.0) -> None:
        if not items:
            raise ConfigError("no training images: check the train items in the config")
        if not 0 <= balance <= 1 or zoom < 1:
            raise ConfigError(f"balance must be within [0, 1] and zoom >= 1, got {balance} and {zoom}")
        self.items = [_pad_to(item, math.ceil(chip * zoom)) for item in items]
        self.chip = chip
        self.zoom = zoom
        lookup = np.full(256, -1, np.int64)
        lookup[class_ids] = np.arange(len(class_ids))
        self.where: list[npt.NDArray[np.int64]] = []  # per class: (k, 2) of (item index, flat pixel index)
        for k in range(len(class_ids)):
            parts = [np.stack([np.full(len(flat), i), flat], 1) for i, it in enumerate(self.items)
                     if len(flat := np.flatnonzero(lookup[it.label.ravel()] == k))]
            self.where.append(np.concatenate(parts) if parts else np.zeros((0, 2), np.int64))
        freq = np.array([len(w) for w in self.where], np.float64)
        if freq.sum() == 0:
            raise ConfigError("the training labels hold none of the model's classes: check labels and class ids")
        weights = np.where(freq > 0, np.power(np.maximum(freq, 1), 1 - balance), 0)
        self.class_p = weights / weights.sum()

    def sample(self, rng: np.random.Generator, n: int) -> tuple[Chips, ChipLabels]:
        """n chips: images (n, B, chip, chip) float32 in raw units and labels (n, chip, chip) uint8.

        With zoom > 1 each chip is cut at a size log-uniform in [chip / zoom, chip * zoom] and resampled to
        chip (images bilinear with antialiasing, labels nearest), so the model sees each place at several
        ground sampling distances.
        """
        classes = rng.choice(len(self.class_p), size=n, p=self.class_p)
        images, labels = [], []
        for k in classes:
            i, flat = self.where[k][rng.integers(len(self.where[k]))]
            item = self.items[i]
            h, w = item.label.shape
            size = self.chip if self.zoom == 1 else round(self.chip * self.zoom ** rng.uniform(-1, 1))
            r, c = divmod(int(flat), w)
            top = int(np.clip(r - rng.integers(size), 0, h - size))
            left = int(np.clip(c - rng.integers(size), 0, w - size))
            image = item.image[:, top : top + size, left : left + size].astype(np.float32)
            label = item.label[top : top + size, left : left + size]
            if size != self.chip:
                image, label = _resample(image, label, self.chip)
            images.append(image)
            labels.append(label)
        return np.stack(images), np.stack(labels)


def _resample(image: npt.NDArray[np.float32], label: ClassMap, size: int
              ) -> tuple[npt.NDArray[np.float32], ClassMap]:
    """A square chip brought to size x size: bilinear with antialiasing for values, nearest for class ids."""
    import torch
    import torch.nn.functional as F

    im = F.interpolate(torch.from_numpy(image)[None], size=(size, size), mode="bilinear", antialias=True,
                       align_corners=False)[0].numpy()
    idx = (np.arange(size) + 0.5) * label.shape[0] / size
    idx = np.minimum(idx.astype(np.int64), label.shape[0] - 1)
    return im, label[np.ix_(idx, idx)]


def _pad_to(item: LabelledImage, size: int) -> LabelledImage:
    """Images smaller than a chip are edge-padded, their padding unlabelled."""
    h, w = item.label.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if not (ph or pw):
        return item
    return LabelledImage(item.name, np.pad(item.image, ((0, 0), (0, ph), (0, pw)), mode="edge"),
                         np.pad(item.label, ((0, ph), (0, pw))))


def augment(
    images: Chips, labels: ChipLabels, rng: np.random.Generator, brightness: float = 0.0, band_jitter: float = 0.0,
    offset: float = 0.0
) -> tuple[Chips, ChipLabels]:
    """Random dihedral transform (flips and 90-degree turns) per chip, a gain in [1-b, 1+b] per chip, one in
    [1-j, 1+j] per band, and an offset in [-o, o] (in raw units) per chip.

    Land cover has no up or north in a chip, so all eight orientations are equally valid samples. `images`
    is float (n, B, h, w) before normalisation, so a gain is a change of illumination, per-band gains mimic
    the atmosphere and season shifting one date's spectra against another's, and an offset mimics processing
    baselines that differ by a constant (Sentinel-2 L2A added 1000 to every band from baseline 04.00 on).
    """
    out_i, out_l = np.empty_like(images), np.empty_like(labels)
    for j in range(len(images)):
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        im, lab = np.rot90(images[j], k, axes=(1, 2)), np.rot90(labels[j], k)
        if flip:
            im, lab = im[:, :, ::-1], lab[:, ::-1]
        out_i[j], out_l[j] = im, lab
    if brightness > 0:
        out_i *= rng.uniform(1 - brightness, 1 + brightness, size=(len(images), 1, 1, 1)).astype(out_i.dtype)
    if band_jitter > 0:
        gains = rng.uniform(1 - band_jitter, 1 + band_jitter, size=(len(images), images.shape[1], 1, 1))
        out_i *= gains.astype(out_i.dtype)
    if offset > 0:
        out_i += rng.uniform(-offset, offset, size=(len(images), 1, 1, 1)).astype(out_i.dtype)
    return out_i, out_l


def band_statistics(items: list[LabelledImage], scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std after scaling, over all training pixels: the card's normalisation."""
    total = sum(it.image.shape[1] * it.image.shape[2] for it in items)
    s = sum(it.image.reshape(it.image.shape[0], -1).astype(np.float64).sum(1) for it in items) * scale
    s2 = sum(np.square(it.image.reshape(it.image.shape[0], -1).astype(np.float64)).sum(1) for it in items) * scale**2
    mean = s / total
    std = np.sqrt(np.maximum(s2 / total - mean**2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
