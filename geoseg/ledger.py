"""Which tiles are done, which failed (with their error), which are still pending.

Only the driver writes the ledger, from the (tile id, ok | error) results its workers return; a
tile is reported ok only after its prediction chunk is completely written, so a tile marked done
never has partial output. While tiles run, the driver appends what changed since its last save as a
small journal part (``ledger.d/``): a save costs the tiles changed, not all tiles. At the end of a run
the parts are folded into ``ledger.json`` (rewritten atomically). Losing the last few updates in a
crash only means those tiles are redone, which writes the same bytes again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geoseg import storage
from geoseg.errors import RunDirBusyError
from geoseg.results import TileOutcome

LEDGER_FILE = "ledger.json"
JOURNAL_DIR = "ledger.d"


@dataclass
class Ledger:
    """Status of every tile of a run, keyed by tile id (the index into the plan's tile list)."""

    tile_count: int
    done: set[int] = field(default_factory=set)
    failed: dict[int, TileOutcome] = field(default_factory=dict)
    changed: set[int] = field(default_factory=set, compare=False)  # since the last save
    journal_parts: int = field(default=0, compare=False)  # parts written since ledger.json
    execution_id: str | None = field(default=None, compare=False)
    """The execution (lease holder, ``lease.py``) that wrote it last; None in ledgers written before it was kept."""
    etag: str | None = field(default=None, compare=False)  # on a store: the ledger.json version this driver knows

    def mark_done(self, tile_id: int) -> None:
        """Record a tile whose output is completely written."""
        self.done.add(tile_id)
        self.failed.pop(tile_id, None)
        self.changed.add(tile_id)

    def mark_failed(self, outcome: TileOutcome) -> None:
        """Record a tile that failed for good in this run."""
        self.failed[outcome.id] = outcome
        self.changed.add(outcome.id)

    def apply(self, part: dict[str, Any]) -> None:
        """Replay one journal part (failures first: a tile done later in the same part is done)."""
        for k, v in part["failed"].items():
            self.failed[int(k)] = TileOutcome(**v)
        for i in part["done"]:
            self.done.add(i)
            self.failed.pop(i, None)

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
            "execution_id": self.execution_id,
            "done": sorted(self.done),
            "failed": {str(k): vars(v) for k, v in sorted(self.failed.items())},
        })

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        """Inverse of ``to_json``."""
        d = json.loads(text)
        return cls(d["tile_count"], set(d["done"]), {int(k): TileOutcome(**v) for k, v in d["failed"].items()},
                   execution_id=d.get("execution_id"))


def load_ledger(run_dir: str, tile_count: int) -> Ledger:
    """The run's ledger, or an empty one for a run not started yet."""
    url = storage.join(run_dir, LEDGER_FILE)
    etag = storage.etag(url)  # before the read: a write in between fails the next save's condition, as it should
    ledger = Ledger.from_json(storage.read_bytes(url).decode()) if storage.exists(url) else Ledger(tile_count)
    ledger.etag = etag
    parts = storage.list_files(storage.join(run_dir, JOURNAL_DIR))
    for part in parts:
        ledger.apply(json.loads(storage.read_bytes(part)))
    ledger.journal_parts = len(parts)
    return ledger


def flush_ledger(run_dir: str, ledger: Ledger) -> None:
    """Append the tiles changed since the last save as one journal part: O(changed), not O(all tiles)."""
    if not ledger.changed:
        return
    part = {"done": sorted(i for i in ledger.changed if i in ledger.done),
            "failed": {str(i): vars(ledger.failed[i]) for i in sorted(ledger.changed) if i in ledger.failed}}
    name = storage.join(run_dir, JOURNAL_DIR, f"{ledger.journal_parts:08d}.json")
    if storage.is_remote(name):  # create-only: a part another driver wrote is never replaced
        if storage.write_if(name, json.dumps(part).encode(), None) is None:
            raise _conflict(run_dir, ledger, name)
    else:
        storage.write_bytes(name, json.dumps(part).encode())
    ledger.journal_parts += 1
    ledger.changed.clear()


def save_ledger(run_dir: str, ledger: Ledger) -> None:
    """Rewrite the whole ledger atomically, then drop the journal parts it now holds. On a store the write is
    conditional on the version this driver last read or wrote (``If-Match``; ``If-None-Match: *`` for a new one),
    so a ledger another driver wrote meanwhile is never overwritten: that is a :class:`RunDirBusyError`."""
    url = storage.join(run_dir, LEDGER_FILE)
    if storage.is_remote(url):
        etag = storage.write_if(url, ledger.to_json().encode(), ledger.etag)
        if etag is None:
            raise _conflict(run_dir, ledger, url)
        ledger.etag = etag
    else:
        storage.write_bytes(url, ledger.to_json().encode())
    storage.remove(storage.join(run_dir, JOURNAL_DIR))
    ledger.changed.clear()
    ledger.journal_parts = 0


def _conflict(run_dir: str, ledger: Ledger, url: str) -> RunDirBusyError:
    return RunDirBusyError(f"{url} was written by another driver since execution {ledger.execution_id} last read or "
                           f"wrote it: two runs are writing {run_dir}. Stop one, then `geoseg rerun {run_dir}`")
