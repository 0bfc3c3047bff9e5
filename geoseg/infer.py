"""The infer stage: batch prediction (pure) and the predictor that loads a model once and serves many tiles.

The predictor is plain Python; ``runtime`` makes Ray actors of it (``num_gpus`` on GPU clusters).
It runs the plan's precision wherever it is: bf16 autocast by default on a GPU (with pinned host memory
and non-blocking copies), fp32 by default on a CPU (bf16 is several times slower on common CPUs), so a
rerun on other hardware still makes the same map. Both use channels_last. A plan with ``tta`` averages
the softmax over the tile's flips and quarter turns (:func:`probabilities`). From that one softmax come the
class, the confidence, the margin (:func:`margin`) and, in a plan with ``probabilities``, every class's
probability as uint8.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import torch

from geoseg.cluster import this_node
from geoseg.faults import started, thread_deadline
from geoseg.grid import Grid
from geoseg.model.card import ModelCard
from geoseg.model.checkpoint import load_model
from geoseg.results import TileError
from geoseg.store import Stores

DIHEDRAL = tuple((turns, flip) for flip in (False, True) for turns in range(4))
"""Test-time augmentation's transforms as (quarter turns, left-right flip first): the square's 8 symmetries."""


def _transform(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """Flip left-right (if ``flip``), then turn ``turns`` quarter turns, over the last two axes."""
    return torch.rot90(x.flip(-1) if flip else x, turns, (-2, -1))


def _untransform(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """The inverse of :func:`_transform`: back onto the input's pixels."""
    x = torch.rot90(x, -turns, (-2, -1))
    return x.flip(-1) if flip else x


@torch.inference_mode()
def probabilities(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False, tta: bool = False) -> torch.Tensor:
    """Softmax per pixel (float32, N x classes x H x W) of a normalised batch.

    With ``tta`` it is the mean of the softmax over the 8 :data:`DIHEDRAL` transforms of the input, each
    undone on its output: a transformed input's result is the same transform of the input's result (so no
    map depends on which way the scene is oriented), at 8 forward passes' cost. One transform at a time, so
    memory stays that of one forward pass."""
    def softmax(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(t.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(t.contiguous(memory_format=torch.channels_last))
        return torch.softmax(logits.float(), dim=1)

    if not tta:
        return softmax(x)
    total = torch.zeros((), device=x.device)
    for turns, flip in DIHEDRAL:
        total = total + _untransform(softmax(_transform(x, turns, flip)), turns, flip)
    return total / len(DIHEDRAL)


def to_uint8(p: torch.Tensor) -> torch.Tensor:
    """Probabilities 0..1 as uint8 0..255 (rounded): how confidence and probabilities are stored."""
    return (p * 255.0).round().to(torch.uint8)


def classify(p: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids (uint8) and confidence (the max probability, uint8 0..255) of a softmax (N x classes x H x W)."""
    conf, k = p.max(dim=1)
    return class_ids[k], to_uint8(conf)


def margin(p: torch.Tensor) -> torch.Tensor:
    """The two most likely classes' probability difference per pixel, uint8 at least 1 (so 0 stays no data):
    high where the model is sure, near 1 where two classes tie."""
    top = p.topk(2, dim=1).values
    return to_uint8(top[:, 0] - top[:, 1]).clamp_(min=1)


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, class_ids: torch.Tensor, bf16: bool = False,
            tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids (uint8) and confidence (max softmax probability scaled to 0..255, uint8) per pixel; with
    ``tta``, of the softmax averaged over flips and turns (:func:`probabilities`)."""
    return classify(probabilities(model, x, bf16, tta), class_ids)


def prepare(card: ModelCard, image: np.ndarray, valid: np.ndarray, batch_size: int) -> np.ndarray:
    """Normalise raw tiles and pad the batch to ``batch_size``.

    Invalid pixels become 0 after normalisation (the training mean); the fixed batch shape makes
    each tile's prediction independent of which, and how many, tiles share its batch.
    """
    x = card.normalise(image)
    x[~np.broadcast_to(valid[:, None], x.shape)] = 0.0
    if x.shape[0] < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - x.shape[0], *x.shape[1:]), np.float32)])
    return x


FORWARD_THREAD = "gs-forward"  # OS name of the forward thread; torch's OpenMP workers inherit it


def _start_forward_thread(threads: int) -> None:
    """Set the forward thread's torch thread count and OS name (so per-thread CPU shows the forward pass)."""
    torch.set_num_threads(threads)
    try:
        ctypes.CDLL(None).prctl(15, FORWARD_THREAD.encode(), 0, 0, 0)  # PR_SET_NAME; Linux only
    except (OSError, AttributeError):
        pass


class Predictor:
    """Holds the model and the open stores; ``__call__`` predicts and writes tiles, a batch at a time.

    Calls may run concurrently (a threaded Ray actor): reading the next batch from zarr and writing
    the last one overlap with the forward pass. Every forward pass runs on one dedicated thread: one
    batch at a time, and its activations always come from that thread's malloc arena (forward passes
    spread over the callers' threads left each arena holding a forward pass's worth of freed memory).
    Raw tiles go to the device as they are stored; normalising and masking happen there, in the
    forward pass, so the host only decodes and encodes zarr chunks.
    """

    def __init__(self, model: str, run_dir: str, grid: Grid, tiles: npt.NDArray[np.int32], batch_size: int,
                 precision: str = "fp32", device: str = "cpu", threads: int | None = None, tta: bool = False,
                 keep_probabilities: bool = False) -> None:
        self.threads = threads or torch.get_num_threads()
        self.device = torch.device(device)
        self.card, self.model = load_model(model, device=device)
        self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
        self.class_ids = torch.as_tensor(self.card.class_ids, device=self.device)
        self.scale = torch.tensor(self.card.scale, dtype=torch.float32, device=self.device)
        # per band, broadcast over pixels
        self.mean = torch.tensor(self.card.mean, dtype=torch.float32, device=self.device)[:, None, None]
        self.std = torch.tensor(self.card.std, dtype=torch.float32, device=self.device)[:, None, None]
        self.bf16 = precision == "bf16"
        self.tta = tta
        self.keep_probabilities = keep_probabilities
        self.stores = Stores(run_dir)
        self.grid = grid
        self.tiles = tiles
        self.batch_size = batch_size
        self._forward = ThreadPoolExecutor(1, "forward", initializer=_start_forward_thread, initargs=(self.threads,))

    def __call__(self, tile_ids: list[int], deadline_s: float) -> tuple[str, list[tuple[int, TileError | None]]]:
        """Predict and write tiles, ``batch_size`` at a time; this node's id and (tile id, error or None) each.
        Past ``deadline_s`` of running, the actor's process ends (``faults.thread_deadline``)."""
        b = self.batch_size
        with started(), thread_deadline(deadline_s):
            results = [r for k in range(0, len(tile_ids), b) for r in self._batch(tile_ids[k:k + b])]
        return this_node(), results

    def _batch(self, tile_ids: list[int]) -> list[tuple[int, TileError | None]]:
        """One batch; a failing batch is retried tile by tile so one bad tile cannot take its batch-mates down."""
        try:
            self._run(tile_ids)
            return [(i, None) for i in tile_ids]
        except Exception as exc:  # recorded per tile by the driver
            if len(tile_ids) == 1:
                return [(tile_ids[0], TileError.of(exc))]
        return [result for i in tile_ids for result in self._batch([i])]

    @torch.inference_mode()
    def _predict(self, image: np.ndarray, valid: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """On the forward thread: raw tiles padded to the batch size → class ids, confidence, margin and (if
        kept) per-class probabilities (N x classes x H x W), all uint8 and 0 where invalid.

        Normalised exactly as :meth:`ModelCard.normalise` and :func:`prepare` do (the same float32 operations)."""
        n = image.shape[0]
        raw = torch.zeros((self.batch_size, *image.shape[1:]), dtype=torch.from_numpy(image[:1]).dtype)
        ok = torch.zeros((self.batch_size, *valid.shape[1:]), dtype=torch.bool)
        raw[:n], ok[:n] = torch.from_numpy(image), torch.from_numpy(valid)
        if self.device.type == "cuda":
            raw = raw.pin_memory().to(self.device, non_blocking=True)
            ok = ok.pin_memory().to(self.device, non_blocking=True)
        x = raw.to(torch.float32).mul_(self.scale).sub_(self.mean).div_(self.std)
        x.masked_fill_(~ok[:, None], 0.0)
        p = probabilities(self.model, x, self.bf16, self.tta)
        classes, conf = classify(p, self.class_ids)
        rasters = [a.masked_fill_(~ok, 0)[:n].cpu().numpy() for a in (classes, conf, margin(p))]
        probs = to_uint8(p).masked_fill_(~ok[:, None], 0)[:n].cpu().numpy() if self.keep_probabilities else None
        return rasters[0], rasters[1], rasters[2], probs

    def _run(self, tile_ids: list[int]) -> None:
        image, valid = self.stores.read_tiles(tile_ids)
        classes, conf, margins, probs = self._forward.submit(self._predict, image, valid).result()
        h = self.grid.halo
        for k, tile_id in enumerate(tile_ids):
            rows, cols = self.grid.core_window(*(int(v) for v in self.tiles[tile_id]))
            core = (slice(h, h + rows.stop - rows.start), slice(h, h + cols.stop - cols.start))
            self.stores.write_prediction(rows, cols, classes[k][core], conf[k][core], margins[k][core],
                                         None if probs is None else probs[k][(slice(None), *core)])
