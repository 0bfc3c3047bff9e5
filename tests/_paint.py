"""Painted clouds for tests: a bright cumulus field and its displaced shadow on a real Sentinel-2 stack.

Real cloudy dates with a trusted mask are not in ../shared/data, so the tests paint one: three cumulus cells,
each a cluster of overlapping Gaussian blobs with a ragged edge, opaque in the core and translucent at the rim,
with a lumpy top as real ones have, bright in every band with a real cloud's spectrum (SWIR included), and their
shadow, the same shape displaced some tens of pixels, darkening the land under it. The masks returned say which
pixels are meant as cloud and as shadow, so a cloud detector can be scored against them.

The spectrum and the texture were measured on the one real Sentinel-2 scene with a cloud reference at hand:
ukis-csmask's own test image (github.com/dlr-eoc/ukis-csmask, tests/testfiles/sentinel2.npz, 512 x 512 px at
30 m, top of atmosphere, a cumulus field; csmask's L2A model finds 97.5 % of its cloud there).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

STRZEGOM_BANDS = ("b02", "b03", "b04", "b05", "b06", "b07", "b08", "b8a", "b11", "b12")
"""The band order of the Strzegom stacks in ../shared/data, as geoseg names them."""

# A thick cloud's reflectance per Sentinel-2 band: the medians over the test image's cloud pixels with blue 0.6-0.8
# (blue .66, green .645, red .69, nir .81, swir16 .61, swir22 .47), the red-edge bands interpolated, B01 as blue,
# B09 (water vapour) and B10 (cirrus) guessed; the painter scales them by the cloud's local thickness (0.4-1.25)
CLOUD_REFLECTANCE = {"b01": 0.66, "b02": 0.66, "b03": 0.645, "b04": 0.69, "b05": 0.72, "b06": 0.75, "b07": 0.78,
                     "b08": 0.81, "b8a": 0.80, "b09": 0.45, "b10": 0.05, "b11": 0.61, "b12": 0.47}
TEXTURE = 0.25
"""Standard deviation of the cloud top's brightness about its mean, relative: painted at 10 m and averaged to 30 m
it gives a local coefficient of variation of blue (9 x 9 px) of 0.12 / 0.14 / 0.18 (quartiles) inside the cloud,
against 0.12 / 0.16 / 0.22 inside the test image's clouds. Flat painted clouds (0.04) were largely missed by csmask
at 30 m (see tests/test_clouds.py)."""
SHADOW_TRANSMISSION = 0.4
"""What a shadow's core leaves of the land's reflectance (real cumulus shadows: about 0.3 to 0.5)."""


def strzegom_offset(date: str) -> int:
    """The offset to add to a Strzegom stack's DN before x 1e-4 gives reflectance: -1000 from 2022 on
    (processing baseline 04.00 adds 1000), 0 for 2021."""
    return -1000 if date >= "2022" else 0


def paint_cloud(image: np.ndarray, band_names: tuple[str, ...], seed: int = 0, *, offset: int,
                coverage: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(painted image, cloud mask, shadow mask) for a uint16 stack [B, H, W] whose reflectance is
    (DN + offset) / 10000; the painted image keeps the stack's convention (its offset, its dtype).

    Cloud pixels are those more than half opaque (about ``coverage`` of the scene, 12-18 % by default, drawn
    from the seed); shadow pixels are those more than half shadowed and not under the cloud. Deterministic
    given the seed.
    """
    if image.ndim != 3 or image.shape[0] != len(band_names):
        raise ValueError(f"need [bands, y, x] with one name per band, got {image.shape} and {len(band_names)} names")
    rng = np.random.default_rng(seed)
    height, width = image.shape[1:]
    share = float(rng.uniform(0.12, 0.18)) if coverage is None else coverage
    shift = _shadow_shift(rng, height, width)
    field = _cumulus_field(rng, height, width, shift)
    middle = float(np.quantile(field, 1.0 - share))
    edge = 0.2 * middle  # the translucent rim: opacity goes 0 -> 1 across field values middle -/+ edge
    opacity = _smoothstep((field - (middle - edge)) / (2 * edge))
    shade = _shifted(opacity, shift)
    cloud = opacity > 0.5
    shadow = (shade > 0.5) & ~cloud

    reflectance = (image.astype(np.float32) + offset) / 10000.0
    depth = np.clip((field - middle) / (float(field.max()) - middle), 0.0, 1.0)
    # turrets and gaps: real cumulus tops vary by about 15 % within 270 m x 270 m (the test image; see TEXTURE)
    lumps = 0.5 * _unit_noise(rng, height, width, 3.0) + 0.5 * _unit_noise(rng, height, width, 9.0)
    thickness = np.clip(0.8 + 0.15 * depth + TEXTURE * lumps, 0.4, 1.25)  # brighter where the cloud is deeper
    land = reflectance * (1.0 - shade * (1.0 - SHADOW_TRANSMISSION))[None]
    tops = np.array([CLOUD_REFLECTANCE[b.lower()] for b in band_names], np.float32)[:, None, None] * thickness
    painted = (1.0 - opacity)[None] * land + opacity[None] * tops
    dn = np.rint(painted * 10000.0 - offset)
    info = np.iinfo(image.dtype)
    return np.clip(dn, max(info.min, 1), info.max).astype(image.dtype), cloud, shadow


def _shadow_shift(rng: np.random.Generator, height: int, width: int) -> tuple[int, int]:
    """The displacement from a cloud to its shadow (sun azimuth from the seed, 14-19 % of the scene's size)."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    length = rng.uniform(0.14, 0.19) * min(height, width)
    return int(round(length * np.sin(angle))), int(round(length * np.cos(angle)))


def _cumulus_field(rng: np.random.Generator, height: int, width: int, shift: tuple[int, int]) -> np.ndarray:
    """A smooth field peaking on 3 cumulus cells of 4-6 blobs each, cells placed so that their shadows fall in
    the scene, with low-frequency noise that makes the edges ragged."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = min(height, width)
    margin = 0.16 * scale
    lo_y, hi_y = margin + max(0, -shift[0]), height - margin - max(0, shift[0])
    lo_x, hi_x = margin + max(0, -shift[1]), width - margin - max(0, shift[1])
    field = np.zeros((height, width), np.float32)
    for _ in range(3):
        cy, cx = rng.uniform(lo_y, hi_y), rng.uniform(lo_x, hi_x)
        for _ in range(int(rng.integers(4, 7))):
            by, bx = cy + rng.normal(0, 0.05 * scale), cx + rng.normal(0, 0.05 * scale)
            sigma = rng.uniform(0.03, 0.06) * scale
            field += rng.uniform(0.6, 1.0) * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * sigma**2))
    ragged = 0.6 * _unit_noise(rng, height, width, 0.01 * scale) + 0.4 * _unit_noise(rng, height, width, 0.03 * scale)
    return field * (1.0 + 0.08 * ragged)


def _unit_noise(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _shifted(a: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """``a`` moved by (dy, dx) pixels, zeros where nothing moved in."""
    out = np.zeros_like(a)
    (dy, dx), (h, w) = shift, a.shape
    out[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = a[max(0, -dy) : h - max(0, dy),
                                                                      max(0, -dx) : w - max(0, dx)]
    return out
