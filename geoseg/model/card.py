"""The model card: everything a scene must match before a model may see it, stored inside every checkpoint."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from geoseg.arrays import Image
from geoseg.errors import CheckpointError

_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
INPUT_DTYPES = ("uint8", "uint16")
ENCODERS = ("resnet18", "resnet34")
OPTIONAL = {"reflectance_offset", "parent"}  # fields added since the first checkpoints: absent means the default


@dataclass(frozen=True)
class ClassInfo:
    """One output class: logits channel k of a model maps to the card's classes[k]."""

    id: int  # the class id written into classes.tif (1..N; 0 is reserved for nodata)
    name: str
    color: str  # "#rrggbb"


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint's weights expect and produce; the job checks every scene against it."""

    name: str  # "sentinel2-lulc" | "aerial-rgb" | user models
    version: str
    architecture: str  # e.g. "unet-resnet18"
    encoder: str  # "resnet18" | "resnet34"
    width: int  # base channel width of the encoder
    bands: tuple[str, ...]  # input band names in model order
    input_dtype: str  # "uint16" | "uint8": what raw scene values are
    scale: float  # raw * scale -> physical unit
    mean: tuple[float, ...]  # per band, after scale
    std: tuple[float, ...]  # per band, after scale
    gsd_m: float  # ground sampling distance trained for
    tile_size: int  # recommended core tile size for inference
    halo: int  # recommended halo in px each side
    classes: tuple[ClassInfo, ...]  # logits channel k <-> classes[k]
    nodata: str  # prose: how invalid pixels are handled
    training_data: tuple[str, ...]  # names/sources of training data and their licence status
    reflectance_offset: float | None = None
    """Reflectance cards: the value added to reflectance x 10000 in the data the model was trained on (1000 for
    Sentinel-2 L2A from processing baseline 04.00 on, 0 before), so every scene is converted to it; None: the
    input is not reflectance (8-bit imagery) and is read as it is."""
    parent: str | None = None
    """Fine-tuned models: the model whose weights this one started from ("sentinel2-lulc v3"); None: trained from
    a random or encoder-only start."""

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise CheckpointError(
                f"model card {self.name!r} is malformed: {'; '.join(problems)}; "
                "save checkpoints with geoseg.model.checkpoint.save_checkpoint (or `geoseg train`)"
            )

    def normalise(self, raw: Image) -> npt.NDArray[np.float32]:
        """Raw scene values (..., B, H, W) -> float32 model input, so every caller scales exactly as training did."""
        if raw.ndim < 3 or raw.shape[-3] != len(self.bands):
            raise CheckpointError(
                f"model {self.name!r} expects {len(self.bands)} bands {self.bands} on axis -3, got shape {raw.shape}"
            )
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return ((raw.astype(np.float32) * np.float32(self.scale)) - mean) / std

    @property
    def zero_is_nodata(self) -> bool:
        """Reflectance cards (16-bit input): a pixel zero in every band of a scene without a nodata tag or alpha
        band is fill, not a measurement (Sentinel-2 products zero-fill their edges), so it is nodata."""
        return self.input_dtype == "uint16"

    @property
    def nodata_rule(self) -> str:
        """How this card's invalid pixels are found and handled, in full: the card's prose and geoseg's rule."""
        if not self.zero_is_nodata:
            return self.nodata
        return (f"{self.nodata}; pixels zero in every band of a scene with no nodata tag or alpha band are "
                "nodata too (reflectance input: 0 is the fill value, never a measurement)")

    @property
    def class_ids(self) -> npt.NDArray[np.uint8]:
        """Lookup table: logits channel k -> class id written to classes.tif."""
        return np.array([c.id for c in self.classes], np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, the form stored inside a checkpoint."""
        d = asdict(self)
        for key in ("bands", "mean", "std", "training_data"):
            d[key] = list(d[key])
        d["classes"] = [dict(c) for c in d["classes"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        """Rebuild a card from `to_dict` output; anything missing or mistyped is a CheckpointError."""
        if not isinstance(d, dict):
            raise CheckpointError(f"a model card must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - d.keys() - OPTIONAL), sorted(d.keys() - names)
        if missing or unknown:
            raise CheckpointError(
                f"model card has missing fields {missing} and unknown fields {unknown}; "
                "re-save the checkpoint with geoseg.model.checkpoint.save_checkpoint"
            )
        try:
            classes = tuple(ClassInfo(id=int(c["id"]), name=str(c["name"]), color=str(c["color"]))
                            for c in d["classes"])
            return cls(
                name=str(d["name"]),
                version=str(d["version"]),
                architecture=str(d["architecture"]),
                encoder=str(d["encoder"]),
                width=int(d["width"]),
                bands=tuple(str(b) for b in d["bands"]),
                input_dtype=str(d["input_dtype"]),
                scale=float(d["scale"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                gsd_m=float(d["gsd_m"]),
                tile_size=int(d["tile_size"]),
                halo=int(d["halo"]),
                classes=classes,
                nodata=str(d["nodata"]),
                training_data=tuple(str(t) for t in d["training_data"]),
                reflectance_offset=None if d.get("reflectance_offset") is None else float(d["reflectance_offset"]),
                parent=None if d.get("parent") is None else str(d["parent"]),
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"model card has a field of the wrong type ({exc!r}); "
                                  "re-save it with geoseg train") from exc


def _problems(card: ModelCard) -> list[str]:
    """Every way a card breaks the contract, so one error lists them all."""
    out: list[str] = []
    n = len(card.bands)
    if n == 0:
        out.append("no bands")
    if len(card.mean) != n or len(card.std) != n:
        out.append(f"mean/std need one value per band ({n}), got {len(card.mean)}/{len(card.std)}")
    if any(s <= 0 for s in card.std):
        out.append("std must be positive")
    if card.input_dtype not in INPUT_DTYPES:
        out.append(f"input_dtype must be one of {INPUT_DTYPES}, got {card.input_dtype!r}")
    if card.encoder not in ENCODERS:
        out.append(f"encoder must be one of {ENCODERS}, got {card.encoder!r}")
    if card.width < 1 or card.tile_size < 1 or card.halo < 0:
        out.append("width and tile_size must be positive and halo non-negative")
    if not card.classes:
        out.append("no classes")
    ids = [c.id for c in card.classes]
    if len(set(ids)) != len(ids) or any(not 1 <= i <= 255 for i in ids):
        out.append(f"class ids must be distinct and in 1..255 (0 is nodata), got {ids}")
    bad = [c.color for c in card.classes if not _COLOR.match(c.color)]
    if bad:
        out.append(f"class colours must be '#rrggbb', got {bad}")
    if card.scale <= 0 or card.gsd_m <= 0:
        out.append("scale and gsd_m must be positive")
    return out
