"""Which tiles are done, which failed (with their error), which are still pending.

Only the driver writes the ledger, from the (tile id, ok | error) results its workers return; a
tile is reported ok only after its prediction chunk is completely written, so a tile marked done
never has partial output. The file is rewritten atomically, and losing the last few updates in a
crash only means those tiles are redone, which writes the same bytes again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from geoseg import storage

LEDGER_FILE = "ledger.json"


@dataclass(frozen=True)
class Failure:
    """Why a tile failed, in which stage, after how many attempts."""

    stage: str
    error: str
    attempts: int


@dataclass
class Ledger:
    """Status of every tile of a run, keyed by tile id (the index into the plan's tile list)."""

    tile_count: int
    done: set[int] = field(default_factory=set)
    failed: dict[int, Failure] = field(default_factory=dict)

    def mark_done(self, tile_id: int) -> None:
        """Record a tile whose output is completely written."""
        self.done.add(tile_id)
        self.failed.pop(tile_id, None)

    def mark_failed(self, tile_id: int, failure: Failure) -> None:
        """Record a tile that failed for good in this run."""
        self.failed[tile_id] = failure

    def not_done(self) -> list[int]:
        """Tiles a rerun must process: failed or never finished, in id order."""
        mask = np.ones(self.tile_count, bool)
        mask[list(self.done)] = False
        return np.flatnonzero(mask).tolist()

    def pending_count(self) -> int:
        """Tiles neither done nor failed."""
        return self.tile_count - len(self.done) - len(self.failed)

    def to_json(self) -> str:
        """Compact JSON: done ids as a sorted list, failures with their error."""
        return json.dumps({
            "tile_count": self.tile_count,
            "done": sorted(self.done),
            "failed": {str(k): vars(v) for k, v in sorted(self.failed.items())},
        })

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        """Inverse of ``to_json``."""
        d = json.loads(text)
        return cls(d["tile_count"], set(d["done"]), {int(k): Failure(**v) for k, v in d["failed"].items()})


def load_ledger(run_dir: str, tile_count: int) -> Ledger:
    """The run's ledger, or an empty one for a run not started yet."""
    url = storage.join(run_dir, LEDGER_FILE)
    if not storage.exists(url):
        return Ledger(tile_count)
    return Ledger.from_json(storage.read_bytes(url).decode())


def save_ledger(run_dir: str, ledger: Ledger) -> None:
    """Rewrite the ledger atomically."""
    storage.write_bytes(storage.join(run_dir, LEDGER_FILE), ledger.to_json().encode())
