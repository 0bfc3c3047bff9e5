"""Fine-tuning: a trained model adapted to a new area from a few of its user's labels.

A model trained on one place knows that place's fields, not land cover at large; a few hundred to a few
thousand labelled pixels of the new place teach it the rest. The user's labels are put on each scene's grid
(`geoseg.labels`), their classes mapped onto the parent's (or added to them), a spatial slice of them held
apart to choose the epoch and stop on, and the parent's whole network trained at a low learning rate through
the same Ray Train job as `geoseg train`. Only the windows around the labels are read, so a scene of any size
fits in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

from geoseg.arrays import ClassMap
from geoseg.datasets import LabelledImage
from geoseg.errors import ConfigError, LabelError
from geoseg.labels import Grid, match_class, paste, read_labels, to_ids
from geoseg.model.card import ClassInfo, ModelCard
from geoseg.model.checkpoint import card_of, read_checkpoint
from geoseg.planner import check_scene, reflectance_shift
from geoseg.scenes import SceneReader, open_scene
from geoseg.tile import shift_reflectance
from geoseg.train import TrainConfig, TrainingData, check_loss, train

Legend = Mapping[str, str | int | None]  # the user's class (name or id) -> the parent's class (name or id), or None
_NEW_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c")
MIN_LABELLED = 50  # pixels: fewer cannot train anything, nor say which epoch is best


@dataclass(frozen=True)
class FinetuneSettings:
    """The schedule: defaults are for a few hundred to a few thousand labelled pixels.

    A tenth of a from-scratch learning rate, the parent's batch-norm statistics and its answers kept where it
    sees a class the labels lack keep what the parent knows (without the last two, a block of a few classes
    taught the model those classes everywhere: docs/models.md); short epochs on small chips see the few labels
    often; `patience` epochs without a better mIoU on the held-apart slice end the run.
    """

    epochs: int = 20
    steps_per_epoch: int = 25
    batch_size: int = 8
    chip: int = 128
    lr: float = 3e-4
    patience: int = 5
    held_apart: float = 0.2  # the fraction of labelled pixels, a spatial slice of them, that picks the epoch
    balance: float = 0.5
    loss: str = "cross-entropy"  # or "cross-entropy+dice" (geoseg.train.LOSSES)
    distill: float = 1.0  # weight of keeping the parent's answers where it sees a class the labels lack
    freeze_norm: bool = True  # keep the parent's batch-norm statistics
    seed: int = 0
    cpus_per_worker: int = 0  # 0: every CPU of this machine (the job runs one worker)

    def __post_init__(self) -> None:
        if not 0 < self.held_apart < 1:
            raise ConfigError(f"held_apart must be within (0, 1), got {self.held_apart}")
        check_loss(self.loss)


def load_legend(path: str | Path) -> dict[str, str | int | None]:
    """`--classes LEGEND.json`: a JSON object from the user's class names or ids to the parent's (null: ignore)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read --classes {path}: {exc}") from exc
    if not isinstance(doc, dict) or not all(v is None or isinstance(v, str | int) for v in doc.values()):
        raise ConfigError(f"--classes {path} must be a JSON object mapping your class names or ids to the "
                          'model\'s class names or ids, e.g. {"wheat": "crops in vegetation stage", "7": 3, '
                          '"shade": null}; a name the model lacks adds a class')
    return {str(k).strip(): v for k, v in doc.items()}


def map_classes(keys: set[str], parent: tuple[ClassInfo, ...], legend: Legend | None = None
                ) -> tuple[tuple[ClassInfo, ...], dict[str, int]]:
    """The child's classes (the parent's, then any added) and the class id of each user class (0: ignored).

    A user class goes through the legend when it is there, else it must already be a parent class id or name.
    A legend target that is no parent class id or name is a new class.
    """
    names = {c.id: c.name for c in parent}
    classes = list(parent)
    out: dict[str, int] = {}
    unknown = []
    for key in sorted(keys):
        if legend is None or key not in legend:
            found = match_class(key, names)
            if found is None:
                unknown.append(key)
            else:
                out[key] = found
            continue
        target = legend[key]
        if target is None:
            out[key] = 0
            continue
        text = str(target).strip()
        found = match_class(text, names)
        if found is None and text.isdigit():
            raise LabelError(f"--classes maps {key!r} to class id {text}, which the model does not have (its ids: "
                             f"{', '.join(str(i) for i in names)}): map it to one of them, or to a new class by name")
        if found is None:
            new = ClassInfo(id=max(names) + 1, name=text,
                            color=_NEW_COLOURS[(len(classes) - len(parent)) % len(_NEW_COLOURS)])
            if new.id > 255:
                raise LabelError("a model has at most 255 classes: map some of yours onto existing ones")
            classes.append(new)
            names[new.id] = text
            found = new.id
        out[key] = found
    if unknown:
        known = "; ".join(f"{c.id} {c.name}" for c in parent)
        raise LabelError(f"label classes {unknown} are not classes of the model ({known}): map them with "
                         "--classes LEGEND.json (to a class of the model, to a new class name, or to null to "
                         "leave them out)")
    return tuple(classes), out


def hold_apart(item: LabelledImage, fraction: float, margin: int) -> tuple[LabelledImage, LabelledImage | None]:
    """(training part, held-apart part) of one labelled image: the last `fraction` of its labelled pixels along
    the labels' longer side form the held-apart slice.

    A slice, not a random sample: neighbouring pixels of one field are nearly the same example, so a random
    sample would choose the epoch on what it trained on. The held-apart part keeps `margin` px of context
    around its labels; the training part keeps the whole image with the slice's labels removed.
    """
    rows, cols = np.nonzero(item.label)
    if len(rows) == 0:
        return item, None
    along = rows if np.ptp(rows) >= np.ptp(cols) else cols
    held = along >= np.quantile(along, 1 - fraction, method="higher")
    if held.all() or not held.any():
        return item, None
    train_label = item.label.copy()
    train_label[rows[held], cols[held]] = 0
    r0, r1 = max(rows[held].min() - margin, 0), rows[held].max() + 1 + margin
    c0, c1 = max(cols[held].min() - margin, 0), cols[held].max() + 1 + margin
    val_label = np.zeros_like(item.label)
    val_label[rows[held], cols[held]] = item.label[rows[held], cols[held]]
    val = LabelledImage(f"{item.name}[held apart]", np.ascontiguousarray(item.image[:, r0:r1, c0:c1]),
                        np.ascontiguousarray(val_label[r0:r1, c0:c1]))
    return LabelledImage(item.name, item.image, train_label), val


def widen_head(state: dict[str, torch.Tensor], classes: int) -> dict[str, torch.Tensor]:
    """The parent's weights with a classifier for `classes` outputs: new classes start at zero weight and the
    parent's mean bias, so they begin as likely as an average class and learn from there."""
    weight, bias = state["head.weight"], state["head.bias"]
    extra = classes - len(bias)
    if extra <= 0:
        return state
    return {**state, "head.weight": torch.cat([weight, weight.new_zeros((extra, *weight.shape[1:]))]),
            "head.bias": torch.cat([bias, bias.mean().repeat(extra)])}


def read_examples(scenes: Sequence[str], labels: Sequence[str], card: ModelCard, class_field: str,
                  legend: Legend | None, margin: int) -> tuple[tuple[ClassInfo, ...], list[LabelledImage]]:
    """Each scene's labelled window (plus `margin` px of context) in the card's bands and reflectance convention,
    with its labels as the child's class ids; and the child's classes."""
    if len(labels) not in (1, len(scenes)):
        raise ConfigError(f"{len(scenes)} scenes and {len(labels)} label files: pass one label file per scene, "
                          "in the same order, or one vector file for all")
    pairs = list(zip(scenes, labels if len(labels) == len(scenes) else list(labels) * len(scenes), strict=True))
    found = []
    for url, path in pairs:
        scene = open_scene(url)
        bands = check_scene(scene, card)
        grid = Grid(scene.crs, Affine(*scene.transform), (scene.height, scene.width))
        found.append((scene, bands, grid, read_labels(path, grid, class_field), path))
    keys = {k for *_, lab, _ in found for k in lab.keys.values()}
    classes, class_of = map_classes(keys, card.classes, legend)
    items = []
    for scene, bands, grid, lab, path in found:
        ids = to_ids(lab, class_of)
        rows, cols = np.nonzero(ids)
        if len(rows) == 0:
            continue
        h, w = grid.shape
        r0 = max(int(lab.window.row_off) + rows.min() - margin, 0)
        c0 = max(int(lab.window.col_off) + cols.min() - margin, 0)
        r1 = min(int(lab.window.row_off) + rows.max() + 1 + margin, h)
        c1 = min(int(lab.window.col_off) + cols.max() + 1 + margin, w)
        win = Window(c0, r0, c1 - c0, r1 - r0)
        data, valid = SceneReader(scene.url).read(bands, scene.crs, rasterio.windows.transform(win, grid.transform),
                                                  (r1 - r0, c1 - c0), True, card.zero_is_nodata)
        shift = reflectance_shift(card, scene.data_offset)
        if shift:
            data = shift_reflectance(data, valid, shift)
        label: ClassMap = paste(ids, lab.window, win, 0).astype(np.uint8)
        label[~valid] = 0  # no label where the scene has no data
        items.append(LabelledImage(f"{Path(scene.url).stem}+{Path(path).stem}", data, label))
    labelled = sum(int(np.count_nonzero(i.label)) for i in items)
    if labelled < MIN_LABELLED:
        raise LabelError(f"{labelled} labelled pixels fall on the scenes' data; fine-tuning needs at least "
                         f"{MIN_LABELLED}: check that the labels cover the scenes and use the classes' ids or names")
    return classes, items


def child_card(parent: ModelCard, name: str, classes: tuple[ClassInfo, ...], data: Sequence[str], licence: str
               ) -> ModelCard:
    """The fine-tuned model's card: the parent's input contract, the child's classes, its lineage and data."""
    return replace(parent, name=name, version="1", classes=classes, parent=f"{parent.name} v{parent.version}",
                   training_data=(*parent.training_data, f"fine-tuned on {', '.join(data)}: {licence}"))


def fit(card: ModelCard, init: dict[str, torch.Tensor] | None, items: list[LabelledImage],
        settings: FinetuneSettings, out: str | Path, augment: Mapping[str, float] | None = None) -> Path:
    """Train `card`'s network from `init` (None: a random start) on these images through Ray Train, choosing the
    epoch on a held-apart slice of their labels; writes the chosen epoch's checkpoint to `out`."""
    pairs = [hold_apart(item, settings.held_apart, card.halo) for item in items]
    train_items = [t for t, _ in pairs]
    held = [v for _, v in pairs if v is not None]
    if not held:
        raise LabelError("the labels are too few or too compact to hold a slice apart for choosing the epoch: "
                         "label a larger or longer area")
    out, aug = Path(out).resolve(), augment or {}
    with tempfile.TemporaryDirectory(prefix="geoseg-finetune-") as work:
        config = TrainConfig(
            name=out.stem, version=card.version, encoder=card.encoder, width=card.width, chip=settings.chip,
            batch_size=settings.batch_size, epochs=settings.epochs, steps_per_epoch=settings.steps_per_epoch,
            lr=settings.lr, balance=settings.balance, loss=settings.loss, patience=settings.patience,
            seed=settings.seed, distill=settings.distill, freeze_norm=settings.freeze_norm,
            tile_size=card.tile_size, halo=card.halo, out=work, resume=False,
            cpus_per_worker=settings.cpus_per_worker or os.cpu_count() or 1, training_data=card.training_data,
            brightness=aug.get("brightness", 0.0), band_jitter=aug.get("band_jitter", 0.0),
            offset=aug.get("offset", 0.0),
        )
        written = train(config, TrainingData(card, train_items, held, []), init)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(written, out)
    return out


def finetune(parent: str | Path, scenes: Sequence[str], labels: Sequence[str], out: str | Path, *,
             class_field: str = "class", legend: Legend | None = None, settings: FinetuneSettings | None = None,
             licence: str = "licence not stated") -> Path:
    """`geoseg finetune`: adapt a shipped model or any geoseg checkpoint to the user's labelled scenes; returns the
    new checkpoint, whose card names its parent and the new data."""
    settings = settings or FinetuneSettings()
    raw = read_checkpoint(parent)
    card = card_of(raw, parent)
    classes, items = read_examples(scenes, labels, card, class_field, legend, max(settings.chip, card.halo))
    child = child_card(card, Path(str(out)).stem, classes, [*scenes, *labels], licence)
    init = widen_head(raw["state_dict"], len(classes))
    return fit(child, init, items, settings, out, parent_augmentation(raw))


def parent_augmentation(raw: dict[str, Any]) -> dict[str, float]:
    """The parent's own augmentation (gain, per-band gain, offset), so the child sees its data varied the same way."""
    saved = json.loads(raw.get("extra", {}).get("config", "{}"))
    return {k: float(saved[k]) for k in ("brightness", "band_jitter", "offset") if k in saved}
