"""Progress of the long stages (tiles, mosaic, polygons, training epochs), drawn by tqdm.

On a terminal a live bar; anywhere else (a log file, a Ray job's captured output) the same text as plain
lines, one every ``LOG_EVERY_S`` seconds and one at the end, so logs stay readable. Training runs in Ray Train
workers whose output may never reach the driver (a cluster's logs are not forwarded), so rank 0 publishes its
progress in Ray's key-value store (:func:`publish`) and the driver draws it (:class:`Follow`).
"""

from __future__ import annotations

import io
import json
import sys
import threading
from typing import Any, Never, TextIO

from ray.experimental import internal_kv
from tqdm import tqdm

LOG_EVERY_S = 5.0
KV_NAMESPACE = "geoseg-progress"


class _Lines(io.TextIOBase):
    """A stream for tqdm that writes each refresh as its own line instead of redrawing one with ``\\r``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, desc: str, unit: str, enabled: bool = True, stream: TextIO | None = None) -> tqdm[Never]:
    """A progress bar for a stage of ``total`` ``unit``s on ``stream`` (stderr): live on a terminal, plain
    lines elsewhere; nothing when not ``enabled``."""
    out = stream or sys.stderr
    terminal = out.isatty()
    progress: tqdm[Never] = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=terminal,
                file=out if terminal else _Lines(out), mininterval=0.2 if terminal else LOG_EVERY_S,
                ascii=not terminal, leave=True)
    return progress


def advance(progress: tqdm[Never], done: int, note: str = "") -> None:
    """Move ``progress`` to ``done`` units (counted by the caller), with a short ``note`` after the counts."""
    if note:
        progress.set_postfix_str(note, refresh=False)
    progress.update(done - progress.n)


def publish(key: str, state: dict[str, Any]) -> None:
    """In a worker: the progress of job ``key`` now (``done`` and ``total`` units, and anything to show)."""
    internal_kv._internal_kv_put(key, json.dumps(state), namespace=KV_NAMESPACE)


class Follow:
    """On the driver, while a job runs elsewhere: a bar following what its worker :func:`publish`-es under
    ``key``; each new ``line`` in the state (an epoch's summary) is printed above the bar."""

    def __init__(self, key: str, total: int, desc: str, unit: str, every_s: float = 0.5) -> None:
        self.key, self.every_s = key, every_s
        self.progress = bar(total, desc, unit)
        self.last_line = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"geoseg-follow-{key}", daemon=True)

    def __enter__(self) -> Follow:
        internal_kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.progress.close()
        internal_kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._poll()

    def _poll(self) -> None:
        raw = internal_kv._internal_kv_get(self.key, namespace=KV_NAMESPACE)
        if not raw:
            return
        state = json.loads(raw)
        line = str(state.get("line", ""))
        if line and line != self.last_line:
            self.progress.write(line, file=sys.stderr)
            self.last_line = line
        advance(self.progress, int(state["done"]), str(state.get("note", "")))
