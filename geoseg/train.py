"""Training job: a U-Net trained data-parallel on Ray Train from image/label pairs, validated by mean IoU each epoch.

The driver reads the pairs once and puts them in Ray's object store; each worker draws its own chips from
them. Each epoch every worker reports its metrics; rank 0 reports a checkpoint (weights, optimizer, epoch),
Ray keeps the best ones by validation mean IoU, and a rerun with `resume = true` continues from the latest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import tomllib
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoseg.accuracy import confusion_matrix, format_table, summarise
from geoseg.arrays import ClassMap, Counts, Image
from geoseg.datasets import (
    ChipSampler,
    LabelledImage,
    augment,
    band_statistics,
    block_slices,
    crop,
    find_pairs,
    read_pair,
)
from geoseg.errors import CheckpointError, ConfigError
from geoseg.model.card import ClassInfo, ModelCard
from geoseg.model.checkpoint import build_model, read_checkpoint, resolve, save_checkpoint
from geoseg.model.pretrained import load_encoder
from geoseg.progress import Follow, publish

# settings a resumed run may change: how it runs, and what only the card says (the network learns the same)
_RESUMABLE = ("epochs", "resume", "use_gpu", "cpus_per_worker", "training_data", "reflectance_offset")
LOSSES = ("cross-entropy", "cross-entropy+dice")
NODATA = "invalid pixels are zero-filled after normalisation; the job writes class 0 (nodata) there"


def check_loss(kind: str) -> None:
    """Refuse an unknown loss where the settings are made, before any data is read."""
    if kind not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; every field has a default but the data patterns and items.

    Paths inside the data (images, labels, classes_json) are relative to `data_root`, which defaults to
    $GEOSEG_DATA or ../shared/data; `out` is relative to the working directory.
    """

    name: str = "model"  # model card name, and the run's name
    version: str = "1"
    data_root: str = ""  # "" -> $GEOSEG_DATA or ../shared/data
    images: str = ""  # glob pattern formatted with {item}, e.g. "scenes/strzegom_{item}_33u.tif"
    labels: str = ""  # formatted with {item} and {stem} (the image's file stem)
    classes_json: str = ""  # classes (id, name, color or mask_rgb), bands, scale, gsd_m
    train: tuple[str, ...] = ()  # items (dates, tiles) to train on
    validate: tuple[str, ...] = ()  # items that pick the best epoch (outside the hold-out block when one is set)
    report: tuple[str, ...] = ()  # items scored once by the chosen epoch and never used to choose it
    holdout: str = ""  # "" or east/west/north/south: that block is never trained or selected on; report scores it
    holdout_fraction: float = 0.25
    bands: tuple[str, ...] = ()  # () -> classes_json "bands"
    scale: float = 0.0  # 0 -> classes_json "scale", else 1/255 for uint8 and 1e-4 for uint16
    gsd_m: float = 0.0  # 0 -> classes_json "gsd_m" (times downsample)
    downsample: int = 1  # integer reduction of JPEG/PNG images (box filter) and masks (nearest)
    encoder: str = "resnet18"
    width: int = 16  # base channel width: 64 is torchvision's ResNet; 16 trains fast on a CPU
    chip: int = 128
    batch_size: int = 16  # per worker
    epochs: int = 10
    steps_per_epoch: int = 50  # per worker; an epoch is steps_per_epoch * batch_size * num_workers chips
    lr: float = 2e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    weight_decay: float = 1e-4
    loss: str = "cross-entropy"  # or "cross-entropy+dice": adds a soft Dice term that weighs every class alike
    balance: float = 0.5  # 0: natural class frequencies; 1: every class drawn equally often
    zoom: float = 1.0  # chips cut at up to zoom times (or 1/zoom) the chip size and resampled: scale augmentation
    brightness: float = 0.0  # gain augmentation range (+-), for RGB illumination changes
    band_jitter: float = 0.0  # per-band gain augmentation range (+-), for spectra that shift between dates
    offset: float = 0.0  # additive augmentation range (+-) in raw units, for baselines that differ by a constant
    pretrained: str = ""  # shipped model name, geoseg checkpoint or torchvision/timm ResNet state dict
    freeze_encoder_epochs: int = 0  # keep the (pretrained) encoder fixed for this many epochs first
    tile_size: int = 256  # written into the card for inference
    halo: int = 32
    num_workers: int = 1
    cpus_per_worker: int = 2  # also torch's thread count per worker
    use_gpu: bool | None = None  # None: GPU workers when the cluster has a GPU for each, else CPU
    out: str = ""  # "" -> runs/<name>; the model is written to <out>/<name>.pt
    resume: bool = True  # continue from the latest checkpoint of a previous run in <out>
    seed: int = 0
    patience: int = 0  # stop when validation mIoU has not improved for this many epochs (0: run every epoch)
    distill: float = 0.0  # fine-tunes: weight of keeping the starting network's softmax on unlabelled pixels
    freeze_norm: bool = False  # keep batch-norm statistics as they start: a few labels' chips are no sample of a scene
    training_data: tuple[str, ...] = ()  # names, sources and licence status of the data, for the card
    reflectance_offset: float | None = None
    """The raw-value offset of the training scenes (Sentinel-2 baseline 04.00: 1000), for the card: a run converts
    scenes of another convention to it (``planner.reflectance_shift``)."""

    def __post_init__(self) -> None:
        if min(self.epochs, self.steps_per_epoch, self.batch_size, self.num_workers, self.cpus_per_worker) < 1:
            raise ConfigError("epochs, steps_per_epoch, batch_size, num_workers and cpus_per_worker must be >= 1")
        check_loss(self.loss)
        if self.chip % 32:
            raise ConfigError(f"chip must be a multiple of 32 (the encoder's stride), got {self.chip}")

    @property
    def root(self) -> Path:
        """The data folder, normalised once."""
        return Path(self.data_root or os.environ.get("GEOSEG_DATA", "../shared/data")).resolve()

    @property
    def out_dir(self) -> Path:
        """Where the run's Ray storage and the final model go."""
        return Path(self.out or f"runs/{self.name}").resolve()


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a flat TOML file into a TrainConfig; unknown keys are refused with the list of valid ones.

    `overrides` are "key=value" lines in TOML (a bare word is taken as a string), applied after the file, so a
    variant of a recipe (another loss, width or name) needs no copy of its file."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read training config {path}: {exc}") from exc
    for line in overrides:
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {line!r}")
        try:
            raw[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raw[key.strip()] = value.strip()
    valid = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"unknown keys {unknown} in {path}; valid keys are {sorted(valid)}")
    values: dict[str, Any] = {k: tuple(str(x) for x in v) if isinstance(v, list) else v for k, v in raw.items()}
    return TrainConfig(**values)


def _classes_from_json(doc: dict[str, Any]) -> tuple[ClassInfo, ...]:
    out = []
    for c in doc["classes"]:
        color = c.get("color") or "#{:02x}{:02x}{:02x}".format(*c["mask_rgb"])
        out.append(ClassInfo(id=int(c["id"]), name=str(c["name"]), color=color))
    return tuple(out)


def _mask_colours(doc: dict[str, Any]) -> dict[tuple[int, int, int], int]:
    colours = {tuple(c["mask_rgb"]): int(c["id"]) for c in doc["classes"] if "mask_rgb" in c}
    colours.update({tuple(rgb): 0 for rgb in doc.get("ignore_rgb", [])})
    return colours


@dataclass(frozen=True)
class TrainingData:
    """What a run reads: the card it derives, the images it trains on, picks its epoch on, and reports on."""

    card: ModelCard
    train: list[LabelledImage]
    validate: list[LabelledImage]
    report: list[LabelledImage]


def prepare_data(config: TrainConfig) -> TrainingData:
    """Read the training, validation and report pairs and derive the card (normalisation from the training pixels).

    With a hold-out block, training and validation images lose the block and report images keep only it, so
    the reported figure is on ground that neither trained the model nor chose its epoch.
    """
    if not config.images or not config.labels or not config.classes_json or not config.train or not config.validate:
        raise ConfigError("a training config needs images, labels, classes_json, train and validate; "
                          "see configs/*.toml")
    root = config.root
    try:
        doc = json.loads((root / config.classes_json).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read classes_json {root / config.classes_json}: {exc}; "
                          "set data_root or GEOSEG_DATA") from exc
    colours = _mask_colours(doc)

    def read(items: tuple[str, ...]) -> list[LabelledImage]:
        return [read_pair(i, lab, colours, config.downsample)
                for i, lab in find_pairs(root, config.images, config.labels, items)]

    train, val, report = read(config.train), read(config.validate), read(config.report)
    if config.holdout:
        def cut(items: list[LabelledImage], block: bool) -> list[LabelledImage]:
            name = config.holdout if block else "rest"
            return [crop(t, block_slices(t.label.shape, config.holdout, config.holdout_fraction)[0 if block else 1],
                         name) for t in items]
        train, val, report = cut(train, False), cut(val, False), cut(report, True)
    dtype = train[0].image.dtype
    if dtype not in (np.uint8, np.uint16):
        raise ConfigError(f"training images are {dtype}; geoseg models take uint8 or uint16 raw values")
    scale = config.scale or float(doc.get("scale", 1 / 255 if dtype == np.uint8 else 1e-4))
    bands = config.bands or tuple(doc["bands"])
    if len(bands) != train[0].image.shape[0]:
        raise ConfigError(f"images have {train[0].image.shape[0]} bands but {len(bands)} band names are given: "
                          "set bands")
    mean, std = band_statistics(train, scale)
    card = ModelCard(
        name=config.name, version=config.version, architecture=f"unet-{config.encoder}", encoder=config.encoder,
        width=config.width, bands=bands, input_dtype=str(dtype), scale=scale, mean=mean, std=std,
        gsd_m=(config.gsd_m or float(doc.get("gsd_m", 1.0))) * config.downsample, tile_size=config.tile_size,
        halo=config.halo, classes=_classes_from_json(doc), nodata=NODATA,
        training_data=config.training_data or (str(root / config.classes_json),),
        reflectance_offset=config.reflectance_offset,
    )
    return TrainingData(card, train, val, report)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 1% of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, lookup: torch.Tensor, kind: str = "cross-entropy"
                ) -> torch.Tensor:
    """Cross-entropy over labelled pixels only: `lookup` maps class id -> logits channel, and 0 (ignore) -> -1.

    "cross-entropy+dice" adds 1 - soft Dice, averaged over the classes the batch labels: cross-entropy counts
    pixels, so a rare class's errors weigh little in it; Dice, like the IoU it is scored by, weighs each class
    alike."""
    target = lookup[labels.long()]
    ce = F.cross_entropy(logits, target, ignore_index=-1)
    if kind == "cross-entropy":
        return ce
    labelled = target >= 0
    p = logits.float().softmax(1).permute(0, 2, 3, 1)[labelled]  # (N, C) over labelled pixels
    one_hot = F.one_hot(target[labelled], logits.shape[1]).float()
    present = one_hot.sum(0) > 0
    dice = 2 * (p * one_hot).sum(0) / (p.sum(0) + one_hot.sum(0)).clamp_min(1e-6)
    return ce + (1 - dice[present].mean()) if bool(present.any()) else ce


def kept_loss(logits: torch.Tensor, start: torch.Tensor, unlabelled: torch.Tensor) -> torch.Tensor:
    """KL divergence from the starting network's softmax to the network's, over the `unlabelled` pixels.

    A few labels of a new area teach the classes they hold and, through the softmax, push every other class
    down everywhere. Fine-tunes keep the start's answers where it sees a class the labels lack (learning
    without forgetting), and leave its answers free where it sees a labelled class, which the labels correct."""
    target = start.float().softmax(1)
    kl = (target * (target.clamp_min(1e-8).log() - logits.float().log_softmax(1))).sum(1)
    return kl[unlabelled].mean() if bool(unlabelled.any()) else kl.sum() * 0


def class_lookup(card: ModelCard) -> torch.Tensor:
    """Class id (0..255) -> logits channel, -1 for ids the model does not predict (0 = unlabelled among them)."""
    lookup = torch.full((256,), -1, dtype=torch.long)
    lookup[torch.as_tensor(card.class_ids.astype(np.int64))] = torch.arange(len(card.classes))
    return lookup


@torch.no_grad()
def predict_ids(model: nn.Module, card: ModelCard, raw: Image, tile_size: int | None = None, halo: int | None = None
                ) -> ClassMap:
    """Class ids (H, W) for a raw image (B, H, W), tiled as a run tiles it, so that training picks its epoch by
    the maps users get: windows of tile + 2 x halo px on the tile lattice, each keeping its core, with the
    image's outside and its nodata pixels at 0 after normalisation (the training mean), as the tile stage fills
    them, and class 0 on nodata. (Windows cut at the image's edge instead scored sentinel2-lulc v3 0.07 mIoU
    below its runs.)"""
    tile, halo = tile_size or card.tile_size, card.halo if halo is None else halo
    model.eval()
    device = next(model.parameters()).device
    h, w = raw.shape[-2:]
    rows, cols = -(-h // tile) * tile, -(-w // tile) * tile
    x = np.zeros((len(card.bands), rows + 2 * halo, cols + 2 * halo), np.float32)
    nodata = (raw == 0).all(axis=0) if card.zero_is_nodata else np.zeros((h, w), bool)
    x[:, halo : halo + h, halo : halo + w] = np.where(nodata, np.float32(0), card.normalise(raw))
    out = np.zeros((rows, cols), np.uint8)
    ids, size = card.class_ids, tile + 2 * halo
    for top in range(0, rows, tile):
        for left in range(0, cols, tile):
            window = torch.from_numpy(np.ascontiguousarray(x[None, :, top : top + size, left : left + size]))
            k = model(window.to(device)).argmax(1)[0].cpu().numpy()
            out[top : top + tile, left : left + tile] = ids[k[halo : halo + tile, halo : halo + tile]]
    return np.where(nodata, np.uint8(0), out[:h, :w])


def validate(model: nn.Module, card: ModelCard, items: list[LabelledImage]) -> Counts:
    """Confusion matrix (256 x 256, by class id) of tiled predictions on these labelled images."""
    cm = np.zeros((256, 256), np.int64)
    for item in items:
        cm += confusion_matrix(predict_ids(model, card, item.image), item.label, ignore=0)
    return cm


def _train_loop(cfg: dict[str, Any]) -> None:
    """One Ray Train worker: draw chips, step, validate its share, report metrics (+ checkpoint on rank 0)."""
    import ray
    import ray.train
    import ray.train.torch

    config = TrainConfig(**cfg["config"])
    card = ModelCard.from_dict(cfg["card"])
    train_items: list[LabelledImage] = ray.get(cfg["train"])
    val_items: list[LabelledImage] = ray.get(cfg["val"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.cpus_per_worker)
    torch.manual_seed(config.seed + rank)

    model = build_model(card)
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in encoder_ids]},
        {"params": [p for p in model.parameters() if id(p) not in encoder_ids]},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    start_epoch, step, best, best_epoch = 0, 0, -1.0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None or cfg["resume_dir"]:
        with checkpoint.as_directory() if checkpoint is not None else nullcontext(cfg["resume_dir"]) as d:
            raw = read_checkpoint(Path(d) / "model.pt")
        model.load_state_dict(raw["state_dict"])
        optimizer.load_state_dict(raw["extra"]["optimizer"])
        start_epoch, step, best = raw["extra"]["epoch"] + 1, raw["extra"]["step"], raw["extra"]["best"]
        best_epoch = raw["extra"].get("best_epoch", raw["extra"]["epoch"])
    elif cfg["init"] is not None:
        model.load_state_dict(ray.get(cfg["init"]))  # a fine-tune: the parent's whole network
    elif config.pretrained:
        n = load_encoder(model, resolve(config.pretrained), card.bands)
        if rank == 0:
            print(f"[{config.name}] encoder started from {config.pretrained} ({n} tensors, first conv adapted to "
                  f"{len(card.bands)} bands)", flush=True)
    teacher = None
    if config.distill and cfg["init"] is not None:  # the start, frozen: what unlabelled pixels should keep saying
        teacher = build_model(card)
        teacher.load_state_dict(ray.get(cfg["init"]))
        teacher.eval().requires_grad_(False)
    wrapped = ray.train.torch.prepare_model(model)  # DistributedDataParallel with several workers
    device = ray.train.torch.get_device()
    bf16 = device.type == "cuda"  # mixed precision on GPUs; fp32 on CPUs, where bf16 is slower
    torch.backends.cudnn.benchmark = bf16
    core = model  # the network itself: prepare_model moved it to the device in place, and wraps it or returns it
    if teacher is not None:
        teacher.to(device)
    lookup = class_lookup(card).to(device)
    sampler = ChipSampler(train_items, card.class_ids, config.chip, config.balance, config.zoom)
    taught = torch.tensor([len(w) > 0 for w in sampler.where], device=device)  # channels the labels hold
    total = config.epochs * config.steps_per_epoch

    line = ""  # the last finished epoch's summary, shown by the driver above its progress bar
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        frozen = epoch < config.freeze_encoder_epochs
        rng = np.random.default_rng([config.seed, rank, epoch])
        wrapped.train()
        if frozen:
            core.encoder.eval()  # keep pretrained batch-norm statistics while the encoder is fixed
        if config.freeze_norm:
            for m in core.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        losses = []
        for i in range(config.steps_per_epoch):
            lr = lr_at(step, total, config.lr)
            optimizer.param_groups[0]["lr"] = 0.0 if frozen else lr
            optimizer.param_groups[1]["lr"] = lr
            raw_chips, labels = sampler.sample(rng, config.batch_size)
            chips, labels = augment(raw_chips, labels, rng, config.brightness, config.band_jitter, config.offset)
            x = torch.from_numpy(card.normalise(chips)).to(device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(labels).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = wrapped(x)
                loss = masked_loss(logits, y, lookup, config.loss)
                if teacher is not None:
                    start = teacher(x)
                    keep = (y == 0) & ~taught[start.argmax(1)]  # pixels the start gives to a class nobody labelled
                    loss = loss + config.distill * kept_loss(logits, start, keep)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)  # loss.backward(), which torch leaves unannotated
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if rank == 0 and (i + 1) % max(1, config.steps_per_epoch // 10) == 0:
                publish(config.name, {"done": step - start_epoch * config.steps_per_epoch, "line": line,
                                      "note": f"epoch {epoch + 1}/{config.epochs} loss {np.mean(losses[-10:]):.4f}"})
        train_s = time.perf_counter() - t0
        cm = validate(core, card, val_items[rank::world])
        if world > 1:
            t = torch.from_numpy(cm).to(device)
            torch.distributed.all_reduce(t)
            cm = t.cpu().numpy()
        val = summarise(cm, 0)
        if val["miou"] > best:
            best, best_epoch = val["miou"], epoch
        stop = bool(config.patience) and epoch - best_epoch >= config.patience  # all workers see the same mIoU
        metrics = {
            "epoch": epoch, "first_epoch": start_epoch, "step": step, "train_loss": float(np.mean(losses)),
            "train_s": train_s, "stopped": stop,
            "val_miou": val["miou"], "val_oa": val["overall_accuracy"], "best_val_miou": best,
            **{f"val_iou_{k}": val["iou"][str(k)] for k in val["present"]},  # the classes its mean counts
        }
        if rank == 0:
            line = (f"[{config.name}] epoch {epoch + 1}/{config.epochs} loss {metrics['train_loss']:.4f} "
                    f"val mIoU {val['miou']:.4f} OA {val['overall_accuracy']:.4f} (best {best:.4f}) "
                    f"train {train_s:.0f}s val {time.perf_counter() - t0 - train_s:.0f}s"
                    + (" [encoder frozen]" if frozen else ""))
            publish(config.name, {"done": step - start_epoch * config.steps_per_epoch, "line": line,
                                  "note": f"epoch {epoch + 1}/{config.epochs} val mIoU {val['miou']:.4f}"})
            with tempfile.TemporaryDirectory() as d:
                extra = {
                    "epoch": epoch, "step": step, "best": best, "best_epoch": best_epoch,
                    "optimizer": optimizer.state_dict(),
                    "metrics": json.dumps(metrics), "config": json.dumps(cfg["config"]),
                }
                save_checkpoint(Path(d) / "model.pt", card, wrapped, extra)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)
        if stop:
            break


def _checkpoints(run_dir: Path, config: TrainConfig) -> list[tuple[Path, dict[str, Any]]]:
    """(model.pt, metrics) of every checkpoint a run has persisted, oldest epoch first.

    A checkpoint made with other settings (anything but epochs and resume) is refused rather than resumed.
    """
    found = []
    ours = {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in _RESUMABLE}
    for pt in run_dir.glob("checkpoint_*/model.pt"):
        try:
            raw = read_checkpoint(pt, mmap=True)
        except CheckpointError:
            continue  # a checkpoint cut off by a crash; the others remain usable
        theirs = {k: v for k, v in json.loads(raw["extra"].get("config", "{}")).items() if k not in _RESUMABLE}
        if theirs != ours:
            changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise ConfigError(f"{run_dir} holds a run made with other settings ({', '.join(changed)}): "
                              "set resume = false to start over, or another out")
        found.append((pt, json.loads(raw["extra"]["metrics"])))
    return sorted(found, key=lambda pm: pm[1]["epoch"])


def _init_ray(config: TrainConfig) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one with its files in a temp dir."""
    from geoseg.cluster import connect

    # the dashboard (when ray[default] is installed) serves the state API that Ray Train's
    # placement-group cleaner polls every second
    connect(num_cpus=max(os.cpu_count() or 1, config.num_workers * config.cpus_per_worker), dashboard=True,
            temp_dir=tempfile.mkdtemp(prefix="geoseg-ray-"))  # progress comes through progress.Follow


def train(config: TrainConfig, data: TrainingData | None = None, init: dict[str, torch.Tensor] | None = None
          ) -> Path:
    """Train on Ray Train and write the best-validating model to <out>/<name>.pt; returns that path.

    `data` replaces what the config's patterns would read (a fine-tune brings its own), and `init` starts the
    whole network from these weights instead of an encoder or a random start.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = data or prepare_data(config)
    card, train_items, val_items = data.card, data.train, data.validate
    out = config.out_dir
    run_dir = out / "ray" / config.name
    if not config.resume and run_dir.exists():
        shutil.rmtree(run_dir)
    previous = _checkpoints(run_dir, config)
    print(f"[{config.name}] {len(train_items)} training and {len(val_items)} validation images; "
          f"{config.epochs} epochs x {config.steps_per_epoch} steps x {config.batch_size} chips of {config.chip} px "
          f"on {config.num_workers} worker(s)", flush=True)
    if previous:
        print(f"[{config.name}] resuming after epoch {previous[-1][1]['epoch'] + 1} from {previous[-1][0].parent}",
              flush=True)
    if not previous or (previous[-1][1]["epoch"] + 1 < config.epochs and not previous[-1][1].get("stopped")):
        _init_ray(config)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus >= config.num_workers if config.use_gpu is None else config.use_gpu
        if use_gpu and gpus < config.num_workers:
            raise ConfigError(f"training asks for {config.num_workers} GPU worker(s) but the Ray cluster has "
                              f"{gpus} GPU(s): "
                              "drop --gpus / use_gpu, or lower it to the GPUs the cluster has")
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "config": asdict(config), "card": card.to_dict(), "train": ray.put(train_items),
                "val": ray.put(val_items), "init": None if init is None else ray.put(init),
                "resume_dir": str(previous[-1][0].parent) if previous else "",
            },
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": config.cpus_per_worker}),
            run_config=RunConfig(
                name=config.name, storage_path=str(out / "ray"),
                checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_miou",
                                                   checkpoint_score_order="max"),
                failure_config=FailureConfig(max_failures=2),
            ),
        )
        first = previous[-1][1]["epoch"] + 1 if previous else 0
        with Follow(config.name, (config.epochs - first) * config.steps_per_epoch, config.name, "step"):
            trainer.fit()
    done = _checkpoints(run_dir, config)
    if done[-1][1].get("stopped"):
        print(f"[{config.name}] stopped early after epoch {done[-1][1]['epoch'] + 1}: no better validation mIoU for "
              f"{config.patience} epochs", flush=True)
    # The epochs Ray kept are scored again with this code's scoring, so the pick always agrees with the figures
    # printed below (a checkpoint scored by an older scoring is re-ranked); ties go to the earliest, as patience
    # counts them.
    names = {c.id: c.name for c in card.classes}
    ranked = []
    for pt, kept in done:
        model = build_model(card)
        model.load_state_dict(read_checkpoint(pt)["state_dict"])
        ranked.append((summarise(validate(model, card, val_items), 0, names), kept, model))
    chosen, metrics, model = max(ranked, key=lambda r: (r[0]["miou"], -r[1]["epoch"]))
    metrics = metrics | {"val_miou": chosen["miou"]}
    print(f"[{config.name}] best epoch {metrics['epoch'] + 1}, chosen on validation:", flush=True)
    print(format_table(chosen), flush=True)
    if data.report:
        scored = summarise(validate(model, card, data.report), 0, names)
        metrics |= {"report_miou": scored["miou"], "report_oa": scored["overall_accuracy"],
                    **{f"report_iou_{k}": scored["iou"][str(k)] for k in scored["present"]}}  # those the mean counts
        print(f"[{config.name}] the same epoch on the report set, which chose nothing:", flush=True)
        print(format_table(scored), flush=True)
    final = out / f"{config.name}.pt"
    save_checkpoint(final, card, model, {"metrics": json.dumps(metrics), "config": json.dumps(asdict(config))})
    return final


def train_from_config(path: str | Path, gpus: int = 0, overrides: Sequence[str] = ()) -> Path:
    """`geoseg train --config FILE [--gpus N] [--set KEY=VALUE ...]`: train the model the file describes; returns
    the written checkpoint.

    `gpus` > 0 trains on that many GPU workers instead of the file's workers, so one file serves a laptop and a GPU
    cluster.
    """
    config = load_config(path, overrides)
    if gpus:
        config = replace(config, use_gpu=True, num_workers=gpus)
    return train(config)
