"""Whose fault is a failure: the tile's own, or the infrastructure's.

A long run meets dying workers and nodes, store outages and hung reads; none of that says anything about a
tile, so none of it may use up the tile's attempts. The rules, in order:

1. The task or actor call itself failed (Ray raised on ``ray.get``: the worker, its node or the actor died,
   its result was lost, it was cancelled): infrastructure, for every tile it carried.
2. A tile's own error whose type is a connection, timeout or Ray system error, or whose message says so
   (a refused or reset connection, a timeout, an HTTP 5xx or throttling answer from the store, a name that
   does not resolve): infrastructure.
3. Anything else (a window that cannot be decoded, a scene that is truncated or missing, a bad value) is the
   tile's own. The tile is tried again with its scenes opened afresh (a new GDAL handle: a repaired or
   briefly unreadable file is read anew), and an error that repeats there is the tile's for good.

Infrastructure faults are retried with exponential backoff, capped, and counted against one budget for the
whole run (``ExecutionSettings.infra_retries``); the run ends with a named error when it is spent.

Deadlines: every reader task and actor call runs under a deadline counted from when it starts running (not
from submission: waiting for an autoscaler takes minutes). The driver derives it from the rates it measured
(:class:`Deadlines`); an overrun kills the worker process (a hung read: the kernel's SIGALRM, which needs no
Python thread; a hung actor call: a watchdog thread), which the driver sees as a dead worker or actor, an
infrastructure fault, and retries elsewhere.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from geoseg.results import TileError

log = logging.getLogger(__name__)

INFRA_TYPES = frozenset({
    # Python and the HTTP stacks under fsspec/s3fs and GDAL
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ClientOSError", "ServerDisconnectedError", "ClientConnectorError",
    # Ray's system errors, as the worker that caught them names them
    "RaySystemError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
    "ObjectFetchTimedOutError", "ObjectStoreFullError", "OutOfMemoryError", "RayActorError", "ActorDiedError",
    "ActorUnavailableError", "TaskCancelledError", "GetTimeoutError", "LocalRayletDiedError",
})
INFRA_MESSAGE = re.compile(
    r"connection (refused|reset|aborted|closed)|timed? ?out|temporary failure|could not resolve|"
    r"name or service not known|http (response )?code:? ?5\d\d|\b50[0234]\b|slow ?down|service unavailable|"
    r"broken pipe|too many requests|\b429\b",
    re.IGNORECASE,
)
BACKOFF_S = 1.0  # first retry of an infrastructure fault waits this long, then twice as long each time ...
BACKOFF_MAX_S = 30.0  # ... up to this


def is_infrastructure(error: TileError) -> bool:
    """Whether a tile's error is the infrastructure's (rule 2 above), not the tile's own."""
    return error.error_type in INFRA_TYPES or bool(INFRA_MESSAGE.search(error.message))


def backoff_s(retries: int) -> float:
    """Seconds before the ``retries``-th retry (1, 2, ...) of a tile after infrastructure faults."""
    return float(min(BACKOFF_MAX_S, BACKOFF_S * 2 ** max(0, retries - 1)))


DEADLINE_FACTOR = 10.0  # a call may take this many times the slowest recent per-tile time for its tiles ...
DEADLINE_MIN_S = 60.0  # ... and never less than this
DEADLINE_FIRST_S = 900.0  # before any call of its stage finished: generous (first reads, cold caches)
RATE_WINDOW = 64  # recent calls a stage's rate is taken from


class Deadlines:
    """Deadlines per stage from measured rates: each finished call adds its seconds per tile (from submission
    to result, so queueing makes it an overestimate, never too tight)."""

    def __init__(self, fixed_s: float | None = None) -> None:
        self.fixed_s = fixed_s
        self.per_tile: dict[str, deque[float]] = {}

    def record(self, stage: str, seconds: float, tiles: int) -> None:
        """A call of ``stage`` over ``tiles`` tiles finished after ``seconds``."""
        self.per_tile.setdefault(stage, deque(maxlen=RATE_WINDOW)).append(seconds / max(1, tiles))

    def seconds(self, stage: str, tiles: int) -> float:
        """The deadline of a call of ``stage`` over ``tiles`` tiles."""
        if self.fixed_s is not None:
            return self.fixed_s
        recent = self.per_tile.get(stage)
        if not recent:
            return DEADLINE_FIRST_S
        return max(DEADLINE_MIN_S, DEADLINE_FACTOR * max(recent) * tiles)


@contextmanager
def process_deadline(seconds: float) -> Iterator[None]:
    """In a task's worker (one task at a time): the process dies when the block overruns. The kernel delivers
    SIGALRM with its default action, terminate, which needs no Python thread: it ends a read blocked in C
    (GDAL, a network file system) that holds the GIL."""
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None):
        with thread_deadline(seconds):  # someone handles SIGALRM here: fall back to a watchdog
            yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@contextmanager
def thread_deadline(seconds: float) -> Iterator[None]:
    """In an actor (its calls run on threads): a watchdog ends the process when the block overruns."""
    timer = threading.Timer(seconds, _overrun, args=(seconds,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _overrun(seconds: float) -> None:
    log.error("a call overran its deadline of %.0f s: ending this worker so the driver retries its tiles", seconds)
    os._exit(70)  # EX_SOFTWARE: Ray reports the worker or actor as died, and the driver retries elsewhere
