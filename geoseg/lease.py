"""One writer per RUN_DIR: a lease held by the running driver, renewed while it lives, released when it ends.

The lease is ``RUN_DIR/lease.json``: which host, process and execution hold it, since when, and until when. A
local RUN_DIR gets it as a file created atomically (``O_CREAT | O_EXCL``), and every read-then-write of it (renew,
take over, release) runs under an exclusive ``flock`` on the RUN_DIR folder itself, so each is a compare-and-swap
among drivers on one host. An ``s3://`` RUN_DIR gets it as an object created with a conditional PUT that fails
when it exists (``If-None-Match: *``), renewed and taken over with PUTs conditional on the version last seen
(``If-Match``). A daemon thread renews it every ``RENEW_S`` seconds for
``LEASE_TTL_S`` more seconds, so a driver that dies without releasing it (SIGKILL, a lost node) blocks the RUN_DIR
for at most ``LEASE_TTL_S``. A lease is taken over only once it has expired, or at once when it names a process on
this host that no longer exists. A second ``run``/``rerun`` meanwhile is refused with :class:`RunDirBusyError`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from geoseg import storage
from geoseg.errors import RunDirBusyError

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
LEASE_TTL_S = 60.0
"""How long a lease lasts without renewal: a dead driver on another host blocks its RUN_DIR at most this long."""
RENEW_S = 15.0
"""How often the holder renews it: four renewals fit in one time to live, so a slow store does not lose it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: host, process and execution, since and until when (Unix seconds)."""

    host: str
    pid: int
    execution_id: str
    since: float
    expires: float

    def describe(self) -> str:
        """Who and since when, for error messages."""
        return (f"execution {self.execution_id} (pid {self.pid} on {self.host}) since {_iso(self.since)}, "
                f"its lease expiring at {_iso(self.expires)} unless renewed")

    def stale(self, now: float) -> bool:
        """Whether the lease may be taken over: expired, or naming a process on this host that no longer exists."""
        return self.expires < now or (self.host == socket.gethostname() and not _alive(self.pid))


class Lease:
    """The lease on one RUN_DIR, as this driver holds it: ``with acquire(run_dir) as lease: ...``."""

    def __init__(self, run_dir: str, execution_id: str | None = None, ttl_s: float = LEASE_TTL_S,
                 renew_s: float = RENEW_S) -> None:
        self.run_dir = run_dir
        self.url = storage.join(run_dir, LEASE_FILE)
        self.execution_id = execution_id or uuid.uuid4().hex
        self.ttl_s, self.renew_s = ttl_s, renew_s
        self.since = time.time()
        self.etag: str | None = None  # on a store: the version this driver last wrote
        self.lost: Holder | None = None  # who took it over, when another driver did
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> Holder:
        """This driver as the holder, with the expiry a write now would give it."""
        return Holder(socket.gethostname(), os.getpid(), self.execution_id, self.since, time.time() + self.ttl_s)

    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`RunDirBusyError` naming who holds it; then renew it in the background."""
        for _ in range(3):  # a stale lease moved away, then created again: another driver may win in between
            if self._create():
                self._thread = threading.Thread(target=self._renew_loop, name=f"geoseg-lease-{self.execution_id}",
                                                daemon=True)
                self._thread.start()
                return self
            current, version = self._read()
            if current is not None and not current.stale(time.time()):
                raise RunDirBusyError(f"{self.run_dir} is in use by {current.describe()}: wait for that run to "
                                      "end, or use another --out")
            log.warning("taking over the lease on %s from %s", self.run_dir,
                        current.describe() if current else "a lease that holds nothing")
            self._remove_stale(version)
        raise RunDirBusyError(f"{self.run_dir}: other drivers keep taking its lease; wait for them to end, or use "
                              "another --out")

    def renew(self) -> None:
        """Push the expiry ``ttl_s`` ahead, if this driver still holds the lease (else mark it lost)."""
        data = json.dumps(asdict(self.holder())).encode()
        if storage.is_remote(self.url):
            etag = storage.write_if(self.url, data, self.etag)
            if etag is None:
                self.lost, _ = self._read()
                return
            self.etag = etag
            return
        with _locked(self.run_dir):
            current, _ = self._read()
            if current is None or current.execution_id != self.execution_id:
                self.lost = current or Holder("?", 0, "nobody (the lease was removed)", 0.0, 0.0)
                return
            storage.write_bytes(self.url, data)

    def check(self) -> None:
        """Raise :class:`RunDirBusyError` when another driver took the lease over: this one must not publish."""
        if self.lost is not None:
            raise RunDirBusyError(f"{self.run_dir} was taken over by {self.lost.describe()} while this run "
                                  f"(execution {self.execution_id}) held it: its renewals failed for over "
                                  f"{self.ttl_s:.0f} s. Let that run finish, then `geoseg rerun {self.run_dir}`")

    def release(self) -> None:
        """Stop renewing and remove the lease, unless another driver holds it now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if storage.is_remote(self.url):
            current, version = self._read()
            if current is not None and current.execution_id == self.execution_id and version == self.etag:
                storage.remove(self.url)
            return
        with _locked(self.run_dir):
            current, _ = self._read()
            if current is not None and current.execution_id == self.execution_id:
                Path(self.url).unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _create(self) -> bool:
        """Create the lease if none exists, atomically; False when one exists."""
        data = json.dumps(asdict(self.holder())).encode()
        if storage.is_remote(self.url):
            etag = storage.write_if(self.url, data, None)
            self.etag = etag
            return etag is not None
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        with _locked(self.run_dir):
            try:
                fd = os.open(self.url, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[Holder | None, str | None]:
        """The current holder (None when there is no lease, or it cannot be read: then it counts as stale only
        once older than a time to live) and its version (the ETag on a store, the content locally)."""
        version = storage.version(self.url)
        try:
            text = storage.read_bytes(self.url).decode()
        except FileNotFoundError:
            return None, None
        etag = version.split(":", 1)[1] if storage.is_remote(self.url) and version else text
        try:
            return Holder(**json.loads(text)), etag
        except (ValueError, TypeError):  # being written (a local create is not atomic with its content) or junk
            mtime = _mtime(self.url)
            if mtime is not None and mtime + self.ttl_s > time.time():
                return Holder("?", 0, "unknown (its lease is being written)", mtime, mtime + self.ttl_s), etag
            return None, etag

    def _remove_stale(self, version: str | None) -> None:
        """Remove the stale lease judged by its ``version``, and only it: on a store a conditional overwrite makes
        it expire at once (then it is deleted); locally it is removed under the folder's lock if unchanged."""
        if storage.is_remote(self.url):
            if version is not None and storage.write_if(self.url, b"{}", version) is not None:
                storage.remove(self.url)
            return
        with _locked(self.run_dir):
            try:
                unchanged = Path(self.url).read_text() == version
            except FileNotFoundError:
                return
            if unchanged:
                Path(self.url).unlink()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except OSError as exc:  # a store blip: the next renewal may pass, well before the lease expires
                log.warning("renewing the lease on %s failed: %s", self.run_dir, exc)
                continue
            if self.lost is not None:
                log.error("the lease on %s was taken over by %s", self.run_dir, self.lost.describe())
                return


def acquire(run_dir: str, execution_id: str | None = None) -> Lease:
    """Hold RUN_DIR's lease for a run (released on leaving the ``with`` block), or refuse a busy RUN_DIR."""
    return Lease(run_dir, execution_id).acquire()


def read_holder(run_dir: str) -> Holder | None:
    """Who holds RUN_DIR's lease now, if anyone."""
    holder, _ = Lease(run_dir)._read()
    return holder


@contextmanager
def _locked(run_dir: str) -> Iterator[None]:
    """An exclusive ``flock`` on a local RUN_DIR folder while a lease is read and written: the lease file is
    replaced by rename, so the lock is on the folder, which stays (no lock file left in the user's folder)."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie, killed and not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _mtime(url: str) -> float | None:
    if storage.is_remote(url):
        return None
    try:
        return os.stat(url).st_mtime
    except OSError:
        return None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
