"""Benchmark of the shipped models on this machine: training s/epoch, inference Mpx/s, validation mIoU and OA.

    python -m geoseg.bench_model [--tta] [sentinel2-lulc aerial-rgb]
    python -m geoseg.bench_model --finetune configs/finetune-east.toml
    python -m geoseg.bench_model --scales 1,2,3,4 aerial-rgb

Each model's training config travels inside its checkpoint, so the benchmark re-reads the same data,
times real training steps (one worker, in process) and tiled inference over the validation images, and
scores that inference. It also prints the halo the trained network needs (the radius holding 99% of a
pixel's input gradient) and the accuracy along tile borders versus tile interiors and versus the same
band predicted with the whole image in one window (no tiles). ``--tta`` instead compares validation mIoU,
OA and inference Mpx/s without and with test-time augmentation, the two timed in turn on each image;
``--scales`` scores a JPEG-trained model with its images reduced by other factors than its training one.
``--finetune`` runs the new-area experiment its config describes (docs/models.md): the parent as is, a model
trained from scratch, the parent fine-tuned and a per-pixel nearest-centroid classifier, on the same small block
of labels, scored on the rest of the area.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.accuracy import confusion_matrix, summarise
from geoseg.arrays import ClassMap, Image, Mask
from geoseg.datasets import ChipSampler, augment, block_slices, read_pair
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
    val_items = prepare_data(saved_config(name)).validate
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


def bench_scales(name: str, factors: list[int]) -> dict[int, dict[str, float]]:
    """mIoU and OA of a JPEG-trained model with its scored images reduced by each factor instead of the training
    one, the maps enlarged back (nearest) and scored on the training factor's labels: does the model see those
    images at the wrong scale?"""
    card, model = load_model(name)
    config = saved_config(name)
    names = config.report or config.validate
    scored = replace(config, train=names, validate=names, report=())  # the card comes from the checkpoint
    reference = prepare_data(scored).validate
    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for factor in factors:
        same = factor == config.downsample  # the training factor's images are the reference's: not read again
        items = reference if same else prepare_data(replace(scored, downsample=factor)).validate
        cm = np.zeros((256, 256), np.int64)
        for item, ref in zip(items, reference, strict=True):
            ids = predict_ids(model, card, item.image)
            h, w = ref.label.shape
            rows = np.minimum(np.arange(h) * config.downsample // factor, ids.shape[0] - 1)
            cols = np.minimum(np.arange(w) * config.downsample // factor, ids.shape[1] - 1)
            cm += confusion_matrix(ids[rows][:, cols], ref.label)
        val = summarise(cm)
        out[factor] = {"miou": val["miou"], "oa": val["overall_accuracy"]}
    return out


def bench(name: str) -> dict[str, Any]:
    """One row of the benchmark for a shipped model (or a checkpoint path), scored on the set its training reports:
    the `report` set, which chose nothing, or for a model trained before that rule its `validate` set."""
    card, model = load_model(name)
    config = saved_config(name)
    data = prepare_data(config)
    train_items, val_items = data.train, data.report or data.validate
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
        "scored_on": "report" if data.report else "validate",
        "needed_halo": effective_halo(model, len(card.bands)),
        "card_halo": card.halo,
    }


@dataclass(frozen=True)
class NewArea:
    """The fine-tuning experiment: a parent that never saw `area` of `scene`, and blocks of that area's labels."""

    parent: str  # a checkpoint trained without the area (configs/sentinel2-lulc-noeast.toml)
    scene: str  # relative to the data root
    labels: str
    area: str = "east"  # the hold-out block the parent never saw
    area_fraction: float = 0.25
    budgets: tuple[float, ...] = (0.10, 0.25)  # fractions of the area's labelled pixels given to training
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds; the k-th also places the block (north, middle, south)
    buffer: int = 10  # px of rows between the block and what is scored: fields straddle the block's edge
    scratch_lr: float = 3e-3  # the from-scratch baseline's learning rate: the shipped recipe's
    scratch: bool = True  # also train the from-scratch baseline
    more_scenes: tuple[str, ...] = ()  # other dates of the area: their labels in the same band also train
    more_labels: tuple[str, ...] = ()  # one label raster per scene of more_scenes, in order
    finetune: tuple[tuple[str, Any], ...] = ()  # settings other than `geoseg finetune`'s defaults (a [finetune] table)


def label_block(label: ClassMap, area: tuple[slice, slice], budget: float, position: float, buffer: int
                ) -> tuple[Mask, Mask]:
    """(block, scored): a band of rows of `area` holding about `budget` of its labelled pixels, placed at `position`
    (0 north .. 1 south) among them, and the area's other labelled pixels more than `buffer` rows away from it.

    A band of rows, not a pixel sample: fields repeat across the area's pixels, so pixels drawn at random
    would put parts of every scored field into training."""
    inside = np.zeros(label.shape, bool)
    inside[area] = True
    rows = np.sort(np.nonzero(inside & (label > 0))[0])
    k = max(int(round(budget * len(rows))), 1)
    start = int(round(position * (len(rows) - k)))
    top, bottom = rows[start], rows[start + k - 1]
    band = (np.arange(label.shape[0]) >= top) & (np.arange(label.shape[0]) <= bottom)
    near = (np.arange(label.shape[0]) >= top - buffer) & (np.arange(label.shape[0]) <= bottom + buffer)
    labelled = inside & (label > 0)
    return labelled & band[:, None], labelled & ~near[:, None]


def bench_new_area(config_path: str) -> list[dict[str, Any]]:
    """One row per budget and seed: mIoU and OA on the scored pixels of (a) the parent as is, (b) a model trained
    from scratch on the block and (c) the parent fine-tuned on it, both with `geoseg finetune`'s defaults."""
    import rasterio

    from geoseg.finetune import FinetuneSettings, finetune, fit, parent_augmentation, read_examples

    with open(config_path, "rb") as f:
        doc = tomllib.load(f)
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()}
    values["finetune"] = tuple(doc.get("finetune", {}).items())
    exp = NewArea(**values)
    root = Path(os.environ.get("GEOSEG_DATA", "../shared/data")).resolve()
    scene, labels = str(root / exp.scene), str(root / exp.labels)
    pair = read_pair(Path(scene), Path(labels))
    raw, label = pair.image, pair.label
    with rasterio.open(labels) as src:
        profile = src.profile  # the block rasters are written on the labels' grid
    more = [(str(root / s), read_pair(root / s, root / lab).label)
            for s, lab in zip(exp.more_scenes, exp.more_labels, strict=True)]
    area = block_slices(label.shape, exp.area, exp.area_fraction)[0]
    parent_raw = read_checkpoint(exp.parent)
    card, parent = load_model(exp.parent)
    torch.set_num_threads(os.cpu_count() or 1)
    parent_ids = predict_ids(parent, card, raw)
    rows = []
    with tempfile.TemporaryDirectory(prefix="geoseg-new-area-") as tmp:
        for budget in exp.budgets:
            for k, seed in enumerate(exp.seeds):  # the k-th seed's block lies k/(n-1) of the way north to south
                block, scored = label_block(label, area, budget, k / max(len(exp.seeds) - 1, 1), exp.buffer)
                top, bottom = np.nonzero(block.any(axis=1))[0][[0, -1]]
                band = np.zeros(label.shape, bool)
                band[area] = True
                band[:top] = band[bottom + 1:] = False  # the block's rows of the area, on every date
                scenes, blocks = [scene], [Path(tmp) / f"block-{budget}-{seed}.tif"]
                with rasterio.open(blocks[0], "w", **profile) as dst:
                    dst.write(np.where(block, label, 0).astype(profile["dtype"]), 1)
                for i, (other, other_label) in enumerate(more):
                    scenes.append(other)
                    blocks.append(Path(tmp) / f"block-{budget}-{seed}-{i}.tif")
                    with rasterio.open(blocks[-1], "w", **profile) as dst:
                        dst.write(np.where(band, other_label, 0).astype(profile["dtype"]), 1)
                settings = FinetuneSettings(**{"seed": seed, **dict(exp.finetune)})
                paths = [str(b) for b in blocks]
                tuned = finetune(exp.parent, scenes, paths, Path(tmp) / "tuned.pt", settings=settings)
                scratch = None
                if exp.scratch:
                    classes, items = read_examples(scenes, paths, card, "class", None, max(settings.chip, card.halo))
                    scratch = fit(replace(card, name="scratch", version="1", classes=classes), None, items,
                                  replace(settings, lr=exp.scratch_lr, freeze_norm=False), Path(tmp) / "scratch.pt",
                                  parent_augmentation(parent_raw))
                row: dict[str, Any] = {"budget": budget, "seed": seed, "dates": len(scenes),
                                       "block_px": int(block.sum()), "scored_px": int(scored.sum())}
                models = [("parent", parent_ids), ("finetuned", _predict(tuned, raw)),
                          ("centroid", nearest_centroid(raw, np.where(block, label, 0)))]
                for key, ids in models + ([("scratch", _predict(scratch, raw))] if scratch else []):
                    val = summarise(confusion_matrix(np.where(scored, ids, 0), np.where(scored, label, 0)))
                    row |= {f"{key}_miou": val["miou"], f"{key}_oa": val["overall_accuracy"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def nearest_centroid(image: Image, label: ClassMap) -> ClassMap:
    """Each pixel's class by the nearest class mean of the labelled pixels' bands, standardised: the per-pixel
    reference that sees spectra and no context, from the same labels the networks get."""
    seen = label > 0
    pixels = image.reshape(len(image), -1).T.astype(np.float64)
    mean, std = pixels[seen.ravel()].mean(0), pixels[seen.ravel()].std(0) + 1e-9
    z = (pixels - mean) / std
    ids = np.unique(label[seen])
    centres = np.stack([z[(label == c).ravel()].mean(0) for c in ids])
    distance = (z**2).sum(1)[:, None] - 2 * z @ centres.T + (centres**2).sum(1)[None, :]
    nearest: ClassMap = ids[distance.argmin(1)].astype(np.uint8).reshape(label.shape)
    return nearest


def _predict(checkpoint: Path, raw: Image) -> ClassMap:
    card, model = load_model(checkpoint)
    return predict_ids(model, card, raw)


def print_new_area(rows: list[dict[str, Any]]) -> None:
    """Mean and spread (sample standard deviation) over the seeds, per budget and model."""
    print("| budget | labelled px in the block | scored px | (a) parent | (b) from scratch | (c) fine-tuned "
          "| (d) pixel centroids |")
    print("|---|---|---|---|---|---|---|")
    for budget in sorted({r["budget"] for r in rows}):
        runs = [r for r in rows if r["budget"] == budget]

        def cell(key: str, runs: list[dict[str, Any]] = runs) -> str:
            if f"{key}_miou" not in runs[0]:
                return "-"
            m = np.array([r[f"{key}_miou"] for r in runs])
            o = np.array([r[f"{key}_oa"] for r in runs])
            spread = f" +- {m.std(ddof=1):.3f}" if len(m) > 1 else ""
            return f"mIoU {m.mean():.3f}{spread}, OA {o.mean():.3f}"

        px, scored = [r["block_px"] for r in runs], [r["scored_px"] for r in runs]
        print(f"| {budget:.0%} | {min(px)}-{max(px)} | {min(scored)}-{max(scored)} | {cell('parent')} | "
              f"{cell('scratch')} | {cell('finetuned')} | {cell('centroid')} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Print one line per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=sorted(SHIPPED))
    parser.add_argument("--tta", action="store_true", help="compare validation without and with test-time augmentation")
    parser.add_argument("--finetune", metavar="CONFIG.toml", help="run the new-area fine-tuning experiment")
    parser.add_argument("--scales", type=lambda v: [int(f) for f in v.split(",")], metavar="F,F,...",
                        help="score JPEG-trained models with their images reduced by these factors instead")
    args = parser.parse_args(argv)
    if args.finetune:
        print_new_area(bench_new_area(args.finetune))
        return
    for name in args.models:
        if args.scales:
            for factor, m in bench_scales(name, args.scales).items():
                print(f"{name}: images reduced {factor}x: mIoU {m['miou']:.3f}, OA {m['oa']:.3f}", flush=True)
            continue
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
            f"{r['scored_on']} mIoU {r['val_miou']:.3f}, OA {r['val_oa']:.3f}; "
            f"OA at tile borders (+-8 px) {r['oa_tile_border']:.3f} ({r['border_pixels']} px) "
            f"vs interiors {r['oa_tile_interior']:.3f}, same band in one window {r['oa_tile_border_one_window']:.3f} "
            f"({r['border_differs_from_one_window']:.1%} of the band's pixels differ); "
            f"99% receptive radius {r['needed_halo']} px (card halo {r['card_halo']})",
            flush=True,
        )


if __name__ == "__main__":
    main()
