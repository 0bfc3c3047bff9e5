"""The cloud stage's array core: one cloud and shadow mask per item, in geoseg's own codes.

An item with an SCL band gets its mask from SCL (`scl_mask`); one without gets it from ukis-csmask's pretrained
ONNX U-Nets (`cloud_mask`, the optional extra ``geoseg[clouds]``, imported only here). Either way the mask holds:

- ``NODATA`` (0): no measurement (fill, saturated or defective pixels);
- ``CLEAR`` (1): a usable observation of the ground;
- ``CLOUD`` (2): cloud, thick or thin (cirrus);
- ``SHADOW`` (3): cloud shadow.

Masked pixels (anything but ``CLEAR``) are invalid for that date. A run computes the mask once per item, over the
item's whole window, so it has no tile borders and makes no seams between tiles (``origin`` keeps windows of one
item consistent where a caller does split it).

What csmask costs and does (ukis-csmask 1.0, measured on Strzegom scenes and tests/_paint.py's clouds, see
tests/test_clouds.py): one thread runs a 256 px tile in about 0.2 s, 6-7 s per Mpx at 30 m, about 1 s per Mpx
of 10 m input with the averaging; a whole Sentinel-2 item (3660 x 3660 px at 30 m) took 81 s and 4.3 GB at peak;
importing csmask and onnxruntime takes 3-4 s once per process. Without the SWIR bands (the 4-band model) it found
as little as 6 % of a painted cloud and flagged up to 25 % of clear land, so give it B11 and B12 where there are.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from geoseg.arrays import Image
from geoseg.errors import MissingExtraError, SceneError

CloudMask = npt.NDArray[np.uint8]
"""(y, x) one of NODATA, CLEAR, CLOUD, SHADOW per pixel."""

NODATA = 0
CLEAR = 1
CLOUD = 2
SHADOW = 3

MODEL_RES_M = 30.0
"""The resolution ukis-csmask asks for ("approximately 30 m"; its models serve Landsat and Sentinel-2 alike)."""

MODEL_TILE_PX = 256
"""ukis-csmask's internal tile: a smaller image is padded to it here (by mirroring), as csmask would do itself."""

MODEL_TILE_STEP = 204
"""The stride of csmask's tiles (256 px with 20 % overlap, ukis-csmask 1.0): a window's tiles are put on this
lattice of the item's grid, so that windows of one item see the same tiles where they overlap."""

INSTALL_HINT = "pip install 'geoseg[clouds]'"

# csmask's band name -> the names geoseg may give that band (lower-case, normalised), preferred first
_MODEL_BANDS: dict[str, tuple[str, ...]] = {
    "blue": ("b02", "blue"),
    "green": ("b03", "green"),
    "red": ("b04", "red"),
    "nir": ("b08", "nir", "b8a", "nir08"),
    "swir16": ("b11", "swir16"),
    "swir22": ("b12", "swir22"),
}
_REQUIRED = ("blue", "green", "red", "nir")
_SWIR = ("swir16", "swir22")

# csmask's classes (0 background, 1 cloud, 2 cloud shadow) in geoseg's codes
_FROM_CSMASK = np.array([CLEAR, CLOUD, SHADOW], np.uint8)

# Sentinel-2 scene classification (SCL) codes 0..11 in geoseg's codes; any other value is not SCL: NODATA
_FROM_SCL = np.array([
    NODATA,  # 0 no data
    NODATA,  # 1 saturated or defective
    CLEAR,   # 2 dark area pixels (topographic shadow, dark water, burnt ground: the ground seen, not a cloud's shadow)
    SHADOW,  # 3 cloud shadows
    CLEAR,   # 4 vegetation
    CLEAR,   # 5 not vegetated
    CLEAR,   # 6 water
    CLEAR,   # 7 unclassified
    CLOUD,   # 8 cloud, medium probability
    CLOUD,   # 9 cloud, high probability
    CLOUD,   # 10 thin cirrus
    CLEAR,   # 11 snow or ice (a land cover of that date, seen through a clear sky)
], np.uint8)


def scl_mask(scl: npt.NDArray[Any]) -> CloudMask:
    """Sentinel-2 SCL codes to geoseg's: 0, 1 nodata; 3 shadow; 8, 9, 10 cloud; the rest clear.

    Dark area pixels (2) and snow or ice (11) count as clear because they are the ground as it was that day:
    SCL's dark areas are mostly terrain shadow, dark water and burnt land (cloud shadows have code 3), and
    masking snow would throw away every winter date instead of mapping what is there. Values above 11 are
    not SCL codes and come out as nodata.
    """
    codes = np.asarray(scl)
    inside = (codes >= 0) & (codes < len(_FROM_SCL))
    return np.where(inside, _FROM_SCL[np.clip(codes, 0, len(_FROM_SCL) - 1).astype(np.intp)], NODATA).astype(np.uint8)


def model_bands(band_names: tuple[str, ...]) -> dict[str, int]:
    """Which of the item's bands feed csmask, by csmask's name: the 6-band model's when both SWIR bands are there,
    else the 4-band model's; a `SceneError` naming what is missing when blue, green, red or nir is not."""
    names = [b.strip().lower() for b in band_names]
    found: dict[str, int] = {}
    for model_name, aliases in _MODEL_BANDS.items():
        hit = next((a for a in aliases if a in names), None)
        if hit is not None:
            found[model_name] = names.index(hit)
    missing = [m for m in _REQUIRED if m not in found]
    if missing:
        wanted = ", ".join(f"{m} ({_MODEL_BANDS[m][0]})" for m in missing)
        raise SceneError(
            f"the cloud model needs blue, green, red and nir (B02, B03, B04, B08 or B8A) but the item has bands "
            f"{','.join(names)} (missing {wanted}): give the item an SCL band or add the missing bands"
        )
    if not all(s in found for s in _SWIR):
        found = {m: found[m] for m in _REQUIRED}
    return found


def cloud_mask(image: Image, band_names: tuple[str, ...], scale: float, offset: float, res_m: float, *,
               origin: tuple[int, int] = (0, 0), product_level: Literal["l1c", "l2a"] = "l2a",
               model_res_m: float = MODEL_RES_M, threads: int = 1,
               providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> CloudMask:
    """Cloud and shadow mask of one item's window (raw DN, bands, y, x) from ukis-csmask, on the window's grid.

    Reflectance = (DN + offset) * scale (Sentinel-2 baseline 04.00: offset -1000, scale 1e-4), clipped to
    0..1 as csmask expects. csmask's models want about 30 m, so finer input is averaged over blocks of
    ``block_factor(res_m)`` pixels (an area mean: nearest-neighbour subsampling found less painted cloud) and
    the classes are put back on the input grid by nearest neighbour.
    ``origin`` is the window's top-left pixel on the item's grid: blocks and csmask's 256 px tiles are laid on
    the item's grid, not the window's, so overlapping windows of one item are fed the same tiles and agree away
    from their edges (one window per item, the default, needs none of this). A window smaller than a tile is
    mirrored up to it. Pixels zero in every band used are nodata. One onnxruntime thread and the CPU provider by
    default: the output is deterministic, and a cloud task uses the one core Ray gives it.
    """
    if image.ndim != 3 or image.shape[0] != len(band_names):
        raise SceneError(f"cloud_mask needs (bands, y, x) with one band per name ({len(band_names)}), "
                         f"got shape {image.shape}")
    if res_m <= 0 or model_res_m <= 0 or threads < 1 or min(origin) < 0:
        raise ValueError(f"res_m ({res_m}), model_res_m ({model_res_m}) and threads ({threads}) must be positive, "
                         f"origin {origin} not negative")
    picks = model_bands(band_names)
    csmask = _csmask()
    nodata = np.ones(image.shape[1:], bool)
    for i in picks.values():
        nodata &= image[i] == 0
    valid = ~nodata
    factor = block_factor(res_m, model_res_m)
    lead = (origin[0] % factor, origin[1] % factor)  # input pixels back to the item's block boundary
    grow = _grow(image.shape[1:], factor, lead)
    counts = np.maximum(_block_sum(np.pad(valid, grow).astype(np.float32), factor), np.float32(1))
    coarse = np.stack([  # band by band: a whole 10 m item in float32 is 0.5 GB a band
        _block_sum(np.pad(np.where(valid, reflectance(image[i], scale, offset), np.float32(0)), grow), factor) / counts
        for i in picks.values()
    ])
    rows, cols = coarse.shape[1:]
    top, left = (((o - g) // factor) % MODEL_TILE_STEP for o, g in zip(origin, lead, strict=True))
    pad = ((0, 0), (top, max(0, MODEL_TILE_PX - top - rows)), (left, max(0, MODEL_TILE_PX - left - cols)))
    model_input = np.ascontiguousarray(np.pad(coarse, pad, mode="symmetric").transpose(1, 2, 0))
    result = csmask(img=model_input, band_order=list(picks), product_level=product_level, invalid_buffer=0,
                    intra_op_num_threads=threads, inter_op_num_threads=1, providers=list(providers))
    classes = np.asarray(result.csm, np.uint8)[top : top + rows, left : left + cols, 0]
    full = np.repeat(np.repeat(_FROM_CSMASK[classes], factor, axis=0), factor, axis=1)
    full = full[lead[0] : lead[0] + image.shape[1], lead[1] : lead[1] + image.shape[2]]
    return np.where(nodata, np.uint8(NODATA), full).astype(np.uint8)


def block_factor(res_m: float, model_res_m: float = MODEL_RES_M) -> int:
    """Input pixels per model pixel along each axis: 3 for 10 m input, 2 for 20 m (40 m is nearer 30 m than
    20 m is, on a log scale), 1 for 30 m or coarser."""
    return max(1, int(np.floor(model_res_m / res_m + 0.5)))


def reflectance(band: npt.NDArray[Any], scale: float, offset: float) -> npt.NDArray[np.float32]:
    """(DN + offset) * scale, clipped to 0..1: the range csmask's models expect."""
    out = (band.astype(np.float32) + np.float32(offset)) * np.float32(scale)
    return np.clip(out, np.float32(0), np.float32(1), out=out)


def _grow(shape: tuple[int, ...], factor: int, lead: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The padding that puts ``lead`` pixels before an array of ``shape`` and fills its last block."""
    rows, cols = (-(-(g + n) // factor) for g, n in zip(lead, shape, strict=True))
    return (lead[0], rows * factor - shape[0] - lead[0]), (lead[1], cols * factor - shape[1] - lead[1])


def _block_sum(a: npt.NDArray[np.float32], factor: int) -> npt.NDArray[np.float32]:
    """Sums over factor x factor blocks of ``a`` (a whole number of blocks), by strided adds (faster than a
    reshape and sum)."""
    across: npt.NDArray[np.float32] = sum((a[:, k::factor] for k in range(1, factor)), a[:, 0::factor])
    return sum((across[k::factor] for k in range(1, factor)), across[0::factor])


def _csmask() -> Any:
    """ukis-csmask's CSmask class, imported on first use: the extra is optional."""
    try:
        from ukis_csmask.mask import CSmask  # type: ignore[import-untyped]
    except ImportError as e:  # ukis-csmask itself, or the onnxruntime it imports
        raise MissingExtraError(
            f"cloud masks for items without an SCL band need ukis-csmask and onnxruntime ({e}): {INSTALL_HINT}"
        ) from e
    return CSmask
