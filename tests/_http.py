"""A static file server on 127.0.0.1 that answers HTTP Range requests, for catalogues and COGs read over HTTP.

GDAL's /vsicurl/ reads a COG by byte ranges (its header, then only the tiles a window needs) and refuses a server
that answers a Range request with the whole file; Python's plain ``http.server`` does exactly that. This one
answers one range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) with 206 and Content-Range, an unsatisfiable one with
416, several ranges (or a malformed header) with the whole file (which RFC 9110 allows), and HEAD with the headers
alone. Threaded: Ray's workers read the same files at once.

Run as ``python tests/_http.py ROOT [--log FILE]``: it prints its port (chosen free) on its first stdout line, then
serves until stopped. :func:`serve` starts it so and stops it by its own pid.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

HOST = "127.0.0.1"
CHUNK = 1 << 16
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """The one byte range ``header`` asks of a file of ``size`` bytes as (first, last) inclusive; None when the whole
    file is to be sent (no header, several ranges, or one that is malformed: a server may ignore those); False when
    it cannot be satisfied (416)."""
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:  # several ranges, another unit, or garbage: answered with the whole file
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return False
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:  # an invalid range is ignored
        return None
    if start >= size:
        return False
    end = min(int(last), size - 1) if last else size - 1
    return start, end


class RangeHandler(SimpleHTTPRequestHandler):
    """Files under the server's directory with Range support; no directory listings (a catalogue needs none)."""

    protocol_version = "HTTP/1.1"  # keep-alive: GDAL reuses its connection for the ranges of one file
    log_file: BinaryIO | None = None
    log_lock = threading.Lock()

    def do_GET(self) -> None:
        """Send a file, or the range of it asked for."""
        self._answer(body=True)

    def do_HEAD(self) -> None:
        """Send a file's headers alone."""
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        """The one place a request is answered, for GET and HEAD alike."""
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self._record(404, "")
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        try:
            f = open(path, "rb")
        except OSError:
            self._record(404, "")
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        with f:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            asked = self.headers.get("Range")
            wanted = parse_range(asked, size)
            if wanted is False:
                self._record(416, asked or "")
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                return
            if wanted is None:
                start, end, status = 0, size - 1, HTTPStatus.OK
            else:
                assert isinstance(wanted, tuple)
                start, end = wanted
                status = HTTPStatus.PARTIAL_CONTENT
            length = max(0, end - start + 1)
            self._record(int(status), asked or "")
            self.send_response(status)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            self.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body:
                return
            f.seek(start)
            left = length
            try:
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):  # the client read what it needed and hung up
                self.close_connection = True

    def _record(self, status: int, asked: str) -> None:
        """One line per request in the log file, when there is one: tests count whole-file reads and ranges."""
        if self.log_file is None:
            return
        line = f"{self.command}\t{self.path}\t{asked or '-'}\t{status}\n".encode()
        with self.log_lock:
            self.log_file.write(line)
            self.log_file.flush()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test's output is no place for one line per range request."""


class Server(ThreadingHTTPServer):
    """A thread per connection, daemon threads, quiet about clients that hang up mid-answer."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closed its connection is normal (GDAL does it after reading a range); others are shown."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def make_server(root: Path, port: int = 0, log: Path | None = None) -> Server:
    """A server of ``root``'s files on 127.0.0.1 (``port`` 0: a free one, read back from ``server_address``)."""
    handler = type("Handler", (RangeHandler,), {"log_file": open(log, "ab") if log else None})
    return Server((HOST, port), partial(handler, directory=str(root)))


@contextmanager
def serve(root: Path, log: Path | None = None, timeout: float = 30) -> Iterator[str]:
    """Serve ``root`` from a subprocess (as a separate host would: its own GIL, its own sockets) for the block;
    yields its base URL ``http://127.0.0.1:PORT``; stopped by its own pid at the end. ``log``: a file that gets one
    line per request (method, path, Range header, status)."""
    command = [sys.executable, str(Path(__file__).resolve()), str(root)] + (["--log", str(log)] if log else [])
    err = tempfile.TemporaryFile()  # a file: a full pipe would stall the server
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        end = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                break
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                break
            line += byte
        if not line.strip().isdigit():
            proc.kill()
            proc.wait()
            err.seek(0)
            said = err.read().decode(errors="replace")
            raise RuntimeError(f"the HTTP server did not start (printed {line!r}):\n{said}")
        yield f"http://{HOST}:{int(line)}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        err.close()


def main(argv: list[str] | None = None) -> None:
    """Serve a folder until stopped; the port goes to the first line of stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", type=Path)
    args = parser.parse_args(argv)
    server = make_server(args.root, args.port, args.log)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
