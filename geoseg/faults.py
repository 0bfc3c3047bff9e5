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
infrastructure fault, and retries elsewhere. A worker that cannot end itself (frozen: stopped by a signal, or
its host swapping) is ended by the driver's backstop: each call records when it started running in Ray's
key-value store (:func:`started`), and a call still running ``BACKSTOP_GRACE_S`` past its deadline is
cancelled (``ray.cancel(force=True)``, a reader) or its actor killed (``ray.kill``). A call that never
recorded a start is left to wait (an autoscaler may be starting its node) up to ``NOT_STARTED_S``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray.experimental import internal_kv

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


BACKSTOP_GRACE_S = 30.0  # the driver ends a call still running this long past its deadline (a frozen worker)
NOT_STARTED_S = 1800.0  # ... and one that has not started this long after submission (its worker froze first)
STARTED_NS = "geoseg-started"  # Ray key-value namespace of the start records of calls running now


@dataclass(frozen=True)
class Started:
    """A call's start record: when (Unix seconds), and the process and node running it."""

    at: float
    pid: int
    node_id: str


@contextmanager
def started() -> Iterator[None]:
    """In a worker: record, for the driver's backstop, that this task or actor call runs now (two small writes
    to Ray's GCS key-value store per call). Outside a Ray task (a worker function called directly), nothing."""
    context = ray.get_runtime_context() if ray.is_initialized() else None
    key = context.get_task_id() if context is not None else None
    if context is None or key is None:
        yield
        return
    record = {"at": time.time(), "pid": os.getpid(), "node_id": context.get_node_id()}
    internal_kv._internal_kv_put(key, json.dumps(record), namespace=STARTED_NS)
    try:
        yield
    finally:
        internal_kv._internal_kv_del(key, namespace=STARTED_NS)


def started_calls() -> dict[str, Started]:
    """On the driver: the start record of every call running now, by task id (hex)."""
    out = {}
    for key in internal_kv._internal_kv_list("", namespace=STARTED_NS):
        raw = internal_kv._internal_kv_get(key, namespace=STARTED_NS)
        if raw:  # it may have ended between the list and the get
            out[key.decode()] = Started(**json.loads(raw))
    return out


def forget_call(task_id: str) -> None:
    """On the driver: drop the start record of a call it ended (a frozen worker never drops its own)."""
    internal_kv._internal_kv_del(task_id, namespace=STARTED_NS)


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
