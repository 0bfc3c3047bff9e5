"""Benchmark of the shipped models on this machine: training s/epoch, inference Mpx/s, validation mIoU and OA.

    python -m geoseg.bench_model [--tta] [sentinel2-lulc aerial-rgb]

Each model's training config travels inside its checkpoint, so the benchmark re-reads the same data,
times real training steps (one worker, in process) and tiled inference over the validation images, and
scores that inference. It also prints the halo the trained network needs (the radius holding 99% of a
pixel's input gradient) and the accuracy along tile borders versus tile interiors and versus the same
band predicted with the whole image in one window (no tiles). ``--tta`` instead compares validation mIoU,
OA and inference Mpx/s without and with test-time augmentation, the two timed in turn on each image.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from geoseg.accuracy import confusion_matrix, summarise
from geoseg.arrays import Mask
from geoseg.datasets import ChipSampler, augment
from geoseg.infer import probabilities
from geoseg.model import SHIPPED
from geoseg.model.card import ModelCard
from geoseg.model.checkpoint import build_model, load_model, read_checkpoint
from geoseg.train import TrainConfig, class_lookup, masked_loss, predict_ids, prepare_data


def effective_halo(model: torch.nn.Module, bands: int, size: int = 193, mass: float = 0.99) -> int:
    """Smallest radius around a pixel that holds `mass` of |d logits / d input|: the halo a tile needs."""
    model.eval()
    x = torch.randn(1, bands, size, size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    c = size // 2
    torch.autograd.backward(model(x)[0, :, c, c].abs().sum())  # .backward(), which torch leaves unannotated
    if x.grad is None:
        raise RuntimeError("the model's output does not depend on its input: no gradient reached it")
    g = x.grad.abs().sum((0, 1)).numpy()
    yy, xx = np.mgrid[:size, :size]
    radius = np.maximum(abs(yy - c), abs(xx - c))
    per_ring = np.bincount(radius.ravel(), weights=g.ravel())
    return int(np.searchsorted(np.cumsum(per_ring) / per_ring.sum(), mass))


def border_mask(shape: tuple[int, int], tile: int, band: int) -> Mask:
    """Pixels within `band` px of an inner tile border of a grid of `tile`-sized tiles."""
    h, w = shape
    rows = np.arange(h) % tile
    cols = np.arange(w) % tile
    near_r = ((rows < band) | (rows >= tile - band)) & (np.arange(h) >= band) & (np.arange(h) < h - band)
    near_c = ((cols < band) | (cols >= tile - band)) & (np.arange(w) >= band) & (np.arange(w) < w - band)
    return near_r[:, None] | near_c[None, :]


def time_training(card: ModelCard, config: TrainConfig, sampler: ChipSampler, steps: int = 5) -> float:
    """Seconds per training step at the config's batch and chip size (after one warm-up step)."""
    torch.set_num_threads(config.cpus_per_worker)
    model = build_model(card).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    lookup = class_lookup(card)
    rng = np.random.default_rng(0)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        raw, labels = sampler.sample(rng, config.batch_size)
        chips, labels = augment(raw, labels, rng, config.brightness, config.band_jitter, config.offset)
        loss = masked_loss(model(torch.from_numpy(card.normalise(chips))), torch.from_numpy(labels), lookup)
        optimizer.zero_grad()
        torch.autograd.backward(loss)  # loss.backward(), which torch leaves unannotated
        optimizer.step()
    return (time.perf_counter() - t0) / steps


def saved_config(name: str) -> TrainConfig:
    """The training config a checkpoint carries, reading the data from the default data root."""
    extra = read_checkpoint(name)["extra"]
    saved: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(extra["config"]).items()}
    return replace(TrainConfig(**saved), data_root="")


class _Softmax(torch.nn.Module):
    """The network as the inference actor runs it: softmax, with or without test-time augmentation."""

    def __init__(self, net: torch.nn.Module, tta: bool) -> None:
        super().__init__()
        self.net, self.tta = net, tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probabilities(self.net, x, tta=self.tta)


def bench_tta(name: str) -> dict[str, float]:
    """Validation mIoU, OA and tiled inference Mpx/s without and with test-time augmentation, torch on all cores;
    the two are timed in turn on each image (after a warm-up), so a changing load weighs on both alike."""
    card, model = load_model(name)
    _, _, val_items = prepare_data(saved_config(name))
    torch.set_num_threads(os.cpu_count() or 1)
    for tta in (False, True):  # untimed: a shape's first forward pass builds its kernels
        predict_ids(_Softmax(model, tta), card, val_items[0].image)
    cm = {tta: np.zeros((256, 256), np.int64) for tta in (False, True)}
    seconds = dict.fromkeys((False, True), 0.0)
    pixels = 0
    for item in val_items:
        for tta in (False, True):
            t0 = time.perf_counter()
            ids = predict_ids(_Softmax(model, tta), card, item.image)
            seconds[tta] += time.perf_counter() - t0
            cm[tta] += confusion_matrix(ids, item.label)
        pixels += ids.size
    row: dict[str, float] = {}
    for tta, key in ((False, "plain"), (True, "tta")):
        val = summarise(cm[tta])
        row |= {f"{key}_miou": val["miou"], f"{key}_oa": val["overall_accuracy"],
                f"{key}_mpx_s": pixels / seconds[tta] / 1e6}
    return row


def bench(name: str) -> dict[str, float]:
    """One row of the benchmark for a shipped model (or a checkpoint path)."""
    card, model = load_model(name)
    config = saved_config(name)
    _, train_items, val_items = prepare_data(config)
    sampler = ChipSampler(train_items, card.class_ids, config.chip, config.balance, config.zoom)
    step_s = time_training(card, config, sampler)
    torch.set_num_threads(config.cpus_per_worker)
    cm = np.zeros((256, 256), np.int64)
    border = np.zeros((256, 256), np.int64)
    border_whole = np.zeros((256, 256), np.int64)  # the same band, predicted with the image in one window
    pixels, seconds, differ, band_px = 0, 0.0, 0, 0
    for item in val_items:
        t0 = time.perf_counter()
        ids = predict_ids(model, card, item.image)
        seconds += time.perf_counter() - t0
        pixels += ids.size
        cm += confusion_matrix(ids, item.label)
        near = border_mask(ids.shape, card.tile_size, 8)
        border += confusion_matrix(np.where(near, ids, 0), np.where(near, item.label, 0))
        whole = predict_ids(model, card, item.image, tile_size=max(ids.shape), halo=0)
        border_whole += confusion_matrix(np.where(near, whole, 0), np.where(near, item.label, 0))
        differ += int((whole != ids)[near].sum())
        band_px += int(near.sum())
    val = summarise(cm)
    interior = cm - border
    return {
        "train_s_per_epoch": step_s * config.steps_per_epoch,
        "infer_mpx_s": pixels / seconds / 1e6,
        "val_miou": val["miou"],
        "val_oa": val["overall_accuracy"],
        "oa_tile_border": float(np.trace(border) / max(border.sum(), 1)),
        "oa_tile_interior": float(np.trace(interior) / max(interior.sum(), 1)),
        "oa_tile_border_one_window": float(np.trace(border_whole) / max(border_whole.sum(), 1)),
        "border_differs_from_one_window": differ / max(band_px, 1),
        "border_pixels": int(border.sum()),
        "needed_halo": effective_halo(model, len(card.bands)),
        "card_halo": card.halo,
    }


def main(argv: list[str] | None = None) -> None:
    """Print one line per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=sorted(SHIPPED))
    parser.add_argument("--tta", action="store_true", help="compare validation without and with test-time augmentation")
    args = parser.parse_args(argv)
    for name in args.models:
        if args.tta:
            t = bench_tta(name)
            print(f"{name}: val mIoU {t['plain_miou']:.4f} -> {t['tta_miou']:.4f} with TTA, "
                  f"OA {t['plain_oa']:.4f} -> {t['tta_oa']:.4f}; "
                  f"infer {t['plain_mpx_s']:.3f} -> {t['tta_mpx_s']:.3f} Mpx/s "
                  f"({t['plain_mpx_s'] / t['tta_mpx_s']:.2f}x the cost), {torch.get_num_threads()} threads", flush=True)
            continue
        r = bench(name)
        print(
            f"{name}: train {r['train_s_per_epoch']:.1f} s/epoch, infer {r['infer_mpx_s']:.2f} Mpx/s, "
            f"val mIoU {r['val_miou']:.3f}, OA {r['val_oa']:.3f}; "
            f"OA at tile borders (+-8 px) {r['oa_tile_border']:.3f} ({r['border_pixels']} px) "
            f"vs interiors {r['oa_tile_interior']:.3f}, same band in one window {r['oa_tile_border_one_window']:.3f} "
            f"({r['border_differs_from_one_window']:.1%} of the band's pixels differ); "
            f"99% receptive radius {r['needed_halo']} px (card halo {r['card_halo']})",
            flush=True,
        )


if __name__ == "__main__":
    main()
