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
"""

from __future__ import annotations

import re

from geoseg.results import TileError

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
