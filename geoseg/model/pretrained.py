"""Start an encoder from local pretrained weights: a torchvision/timm ResNet state dict or a geoseg checkpoint.

When the band counts differ, the first convolution is adapted rather than dropped: bands that share a
spectral meaning (S2 B04 = red, ...) take the matching pretrained filter, the others the mean filter, and
all are rescaled so the first layer's response to a flat input keeps its magnitude.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from geoseg.errors import CheckpointError
from geoseg.model.card import ModelCard
from geoseg.model.unet import UNet

RGB = ("red", "green", "blue")
# spectral meaning of band names, so weights can move between sensors
_ALIASES = {
    "red": "red", "r": "red", "b04": "red",
    "green": "green", "g": "green", "b03": "green",
    "blue": "blue", "b": "blue", "b02": "blue",
    "nir": "nir", "n": "nir", "b08": "nir",
}


def adapt_first_conv(weight: torch.Tensor, src_bands: tuple[str, ...], dst_bands: tuple[str, ...]) -> torch.Tensor:
    """Pretrained first-conv weight (out, len(src), k, k) -> (out, len(dst), k, k), matching bands by meaning."""
    if weight.shape[1] != len(src_bands):
        raise CheckpointError(f"first conv has {weight.shape[1]} input channels but {len(src_bands)} source band "
                              "names were given")
    if tuple(src_bands) == tuple(dst_bands):
        return weight.clone()
    src = {_ALIASES.get(b.lower(), b.lower()): i for i, b in enumerate(src_bands)}
    mean = weight.mean(dim=1)
    cols = []
    for band in dst_bands:
        i = src.get(_ALIASES.get(band.lower(), band.lower()))
        cols.append(weight[:, i] if i is not None else mean)
    return torch.stack(cols, dim=1) * (len(src_bands) / len(dst_bands))


def read_encoder_state(path: str | Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Encoder tensors keyed like `UNet.encoder` and the band names of their first conv.

    A geoseg checkpoint brings its own band names; a plain ResNet state dict (torchvision or timm, optionally
    wrapped in {"state_dict": ...} or {"model": ...}) is taken to be RGB, which is what such weights are.
    """
    try:
        raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # foreign files raise many types
        raise CheckpointError(f"cannot read pretrained weights from {path} ({exc.__class__.__name__}); pass a ResNet "
                              "state dict saved with torch.save or a geoseg checkpoint") from exc
    if isinstance(raw, dict) and raw.get("format") == "geoseg-checkpoint":
        card = ModelCard.from_dict(json.loads(raw["card"]))
        prefix = "encoder."
        state = {k[len(prefix):]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
        return state, card.bands
    if isinstance(raw, dict):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in raw.items()
                 if isinstance(v, torch.Tensor)}
        if "conv1.weight" in state:
            return {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}, RGB
    raise CheckpointError(f"{path} holds neither a geoseg checkpoint nor a ResNet state dict with 'conv1.weight'")


def load_encoder(model: UNet, path: str | Path, bands: tuple[str, ...]) -> int:
    """Copy pretrained encoder weights into `model` in place; returns how many tensors were loaded.

    Every encoder tensor must fit (same encoder depth and width) except the first conv's input channels,
    which are adapted; a mismatch raises with the width or encoder to choose instead.
    """
    state, src_bands = read_encoder_state(path)
    target = model.encoder.state_dict()
    state["conv1.weight"] = adapt_first_conv(state["conv1.weight"], src_bands, bands)
    missing = sorted(set(target) - set(state))
    wrong = sorted(k for k in target if k in state and state[k].shape != target[k].shape)
    if missing or wrong:
        width = state["conv1.weight"].shape[0]
        raise CheckpointError(
            f"pretrained encoder in {path} does not fit this model (missing {missing[:3]}..., "
            f"wrong shapes {wrong[:3]}...); "
            f"it has width {width}: set width = {width} and the same encoder depth in the training config"
        )
    model.encoder.load_state_dict({k: state[k] for k in target})
    return len(target)
