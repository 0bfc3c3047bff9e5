"""geoseg checkpoints: a dict of tensors plus the model card as a JSON string, loaded without unpickling code.

File layout (torch.save of a plain dict, read back with torch.load(weights_only=True)):
    {"format": "geoseg-checkpoint", "format_version": 1, "card": "<json>", "state_dict": {name: tensor},
     "extra": {...}}   # extra: optional training state (epoch, optimizer), plain containers of tensors/numbers
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoseg.errors import CheckpointError
from geoseg.model import SHIPPED
from geoseg.model.card import ModelCard
from geoseg.model.unet import UNet, build_unet

FORMAT = "geoseg-checkpoint"
FORMAT_VERSION = 1
_WHAT_TO_PASS = f"pass one of the shipped models {sorted(SHIPPED)} or the path of a .pt written by `geoseg train`"


def resolve(name_or_path: str | Path) -> Path:
    """A shipped model's name or a file path -> an existing file; the one place names are normalised."""
    if isinstance(name_or_path, str) and name_or_path in SHIPPED:
        path = SHIPPED[name_or_path]
        if not path.exists():
            raise CheckpointError(f"shipped model {name_or_path!r} is missing from this install ({path}); "
                                  "reinstall geoseg")
        return path
    path = Path(name_or_path)
    if not path.is_file():
        raise CheckpointError(f"no model named or at {str(name_or_path)!r}; {_WHAT_TO_PASS}")
    return path


def read_checkpoint(name_or_path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The raw checkpoint dict after checking it is a geoseg one; weights_only so no code ever runs."""
    path = resolve(name_or_path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for foreign files; all mean the same to the caller
        raise CheckpointError(f"{path} is not a geoseg checkpoint (cannot be read as one: "
                              f"{exc.__class__.__name__}); {_WHAT_TO_PASS}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        hint = ""
        if isinstance(raw, dict) and any(k.startswith(("conv1.", "layer1.")) for k in raw):
            hint = " It looks like a plain ResNet state dict: give it as `pretrained` in a training config instead."
        raise CheckpointError(f"{path} is not a geoseg checkpoint (no '{FORMAT}' marker); {_WHAT_TO_PASS}.{hint}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {raw.get('format_version')}, "
                              f"this geoseg reads {FORMAT_VERSION}; upgrade geoseg")
    return raw


def card_of(raw: dict[str, Any], path: str | Path) -> ModelCard:
    """The card of a checkpoint already read (`read_checkpoint`), so its weights are not read twice."""
    try:
        return ModelCard.from_dict(json.loads(raw["card"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has no readable model card; {_WHAT_TO_PASS}") from exc


def load_card(name_or_path: str | Path) -> ModelCard:
    """The card alone, memory-mapped and without building a network: what the driver needs to check scenes."""
    return card_of(read_checkpoint(name_or_path, mmap=True), name_or_path)


def build_model(card: ModelCard) -> UNet:
    """An untrained network of the shape the card describes."""
    return build_unet(len(card.bands), len(card.classes), card.encoder, card.width)


def load_model(name_or_path: str | Path, device: str = "cpu") -> tuple[ModelCard, nn.Module]:
    """Card and network with its weights, in eval mode on `device`."""
    raw = read_checkpoint(name_or_path)
    card = card_of(raw, name_or_path)
    model = build_model(card)
    try:
        model.load_state_dict(raw["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{name_or_path}: weights do not fit the architecture its card describes ({exc}); "
                              f"{_WHAT_TO_PASS}") from exc
    return card, model.to(device).eval()


def save_checkpoint(path: str | Path, card: ModelCard, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Write weights + card atomically (tmp then rename), so a crash never leaves half a checkpoint."""
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "card": json.dumps(card.to_dict()),
        "state_dict": state,
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
