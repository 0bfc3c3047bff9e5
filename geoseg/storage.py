"""Paths that are local folders or object-store URLs, behind one small API.

Every path of a run (scenes, RUN_DIR, zarr stores) may be an ``s3://`` URL so that every node of a
cluster sees the same files. Credentials and endpoints come only from the usual environment
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``...);
each node reads them from its own environment (a local Ray's workers inherit the driver's), an instance role or a
credentials file. Only non-secret settings (the endpoint, the region, GDAL options) travel in Ray's runtime
environment, which Ray shows on its dashboard and state API; credentials are never written to disk by geoseg.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlparse

import fsspec
import numpy as np
import numpy.typing as npt

from geoseg.errors import DiskSpaceError

if TYPE_CHECKING:  # GDAL loads where a stage reads rasters, not wherever a cluster is joined (training)
    import rasterio

# what may travel to workers in runtime_env: the store's non-secret AWS settings by name, GDAL's options by prefix
# less any whose name marks a secret (GDAL_HTTP_USERPWD, GDAL_HTTP_HEADERS with a bearer token ...)
_FORWARDED_AWS = frozenset({"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                            "AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING", "AWS_NO_SIGN_REQUEST",
                            "AWS_REQUEST_PAYER"})
_FORWARDED_PREFIXES = ("GDAL_", "CPL_", "VSI_")
_SECRET_MARKS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "USERPWD", "BEARER", "HEADER", "CREDENTIAL",
                 "AUTH", "COOKIE")
# what geoseg writes in a RUN_DIR, and all that --overwrite removes from it: a user's other files stay
RUN_OUTPUTS = ("plan.json", "ledger.json", "ledger.d", "tiles.zarr", "predictions.zarr", "classes.tif",
               "classes.vrt", "classes", "confidence.tif", "confidence.vrt", "confidence", "landcover.gpkg",
               "margin.tif", "margin.vrt", "margin", "probabilities.tif", "report.json", "evaluation.json",
               "provenance.tif", "masks", "report.html", "quicklook.png")


def is_remote(url: str) -> bool:
    """True for object-store URLs (``s3://...``), False for local paths."""
    return "://" in url and not url.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the S3 endpoint from ``AWS_ENDPOINT_URL`` when one is set."""
    if not url.startswith("s3://"):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``url`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def exists(url: str) -> bool:
    """Whether a file or folder exists at ``url``."""
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def is_empty(url: str) -> bool:
    """True when nothing exists at ``url``, or it is an empty folder."""
    fs, path = filesystem(url)
    return not fs.exists(path) or (fs.isdir(path) and not fs.ls(path))


def version(url: str) -> str | None:
    """A file's version, to tell a replaced file from the one seen before: "size:mtime_ns" locally, the ETag (with
    the size) on a store; None when it cannot be had (a GDAL virtual path): then no change is detected."""
    try:
        if is_remote(url):
            fs, path = filesystem(url)
            fs.invalidate_cache(path)  # a listing cached earlier holds the ETag of that time
            info = fs.info(path)
            etag = info.get("ETag") or info.get("etag")
            return f"{info.get('size')}:{etag}" if etag else None
        st = os.stat(url)
    except (OSError, ValueError, ImportError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def etag(url: str) -> str | None:
    """An object's ETag as a conditional write names it, or None when there is no such object."""
    stamp = version(url) if is_remote(url) else None
    return stamp.split(":", 1)[1] if stamp else None


def write_if(url: str, data: bytes, match: str | None) -> str | None:
    """One PUT to an object store that happens only if the object is still at version ``match`` (``If-Match``),
    or, with ``match`` None, does not exist yet (``If-None-Match: *``): how two drivers that both write one object
    find out. Returns the new ETag, or None when the condition failed (someone else wrote it)."""
    fs, path = filesystem(url)
    try:
        out = fs.pipe_file(path, data, mode="create") if match is None else fs.pipe_file(path, data, IfMatch=match)
    except OSError as exc:
        if _precondition_failed(exc):
            return None
        raise
    return str(out["ETag"])


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs error is the store's 412 (or 409 for a conditional write that raced another)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
        seen = seen.__cause__ or seen.__context__
    return False


def read_bytes(url: str) -> bytes:
    """The whole content of a (small) file."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return bytes(f.read())


def write_bytes(url: str, data: bytes) -> None:
    """Write a small file atomically: a reader sees the old content or the new, never a mix.

    Locally through :func:`publishing` (a synced temporary file renamed over the target); an object-store PUT is
    atomic already.
    """
    if is_remote(url):
        fs, path = filesystem(url)
        fs.pipe_file(path, data)
        return
    with publishing(url) as f:
        f.write(data)


@contextmanager
def publishing(url: str) -> Iterator[BinaryIO]:
    """A file to write that appears at ``url`` whole or not at all, whatever kills the writer.

    Locally a hidden temporary file beside the target (same file system, so no copy), synced, then renamed over
    it with ``os.replace`` and the folder synced; for a URL a local temporary file uploaded by :func:`put_file`
    (one PUT, or a multipart upload that exists only once completed). A failure leaves the old file as it was.
    """
    if is_remote(url):
        with tempfile.TemporaryDirectory(prefix="geoseg-publish-") as tmp:
            local = Path(tmp, url.rsplit("/", 1)[-1])
            with open(local, "wb") as out:
                yield out
            put_file(local, url)
        return
    target = Path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # readable like any published file (mkstemp makes it private)
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)
        fsync_dir(target.parent)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (its entry is written with the folder, not the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_chunk(url: str, data: npt.NDArray[Any]) -> None:
    """Write an array's bytes as one file, whole or not at all (a rename locally, one PUT on a store); no fsync:
    a chunk lost in a crash belongs to a tile not yet recorded done, which the rerun rewrites."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.pipe_file(path, data.tobytes())
        return
    target = Path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.data.cast("B"))
    os.replace(tmp, target)


def read_chunk(url: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """An array of ``dtype`` and ``shape`` from a file of its raw bytes (written by :func:`write_chunk`)."""
    if is_remote(url):
        fs, path = filesystem(url)
        return np.frombuffer(fs.cat_file(path), dtype).reshape(shape)
    return np.fromfile(url, dtype).reshape(shape)


def put_file(local: str | Path, url: str) -> None:
    """Publish a finished local file at ``url``, whole or not at all; ``local`` is consumed.

    Locally a rename when both lie on one file system; across file systems a copy into a synced temporary file
    beside the target, renamed over it (never copy-then-delete onto the target, which a crash leaves truncated).
    For a URL one upload: s3fs sends one PUT, or for a large file a multipart upload, which appears only when
    completed.
    """
    if is_remote(url):
        fs, path = filesystem(url)
        fs.put_file(str(local), path)
        Path(local).unlink(missing_ok=True)
        return
    target = Path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as src:  # opened once: the copy reads what was synced
        try:
            os.fsync(src.fileno())
        except OSError as exc:  # a pipe (or another stream) has nothing on disk to sync
            if exc.errno != errno.EINVAL:
                raise
        try:
            os.rename(local, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with publishing(url) as out:
                shutil.copyfileobj(src, out, 1 << 20)
            Path(local).unlink()
            return
    fsync_dir(target.parent)


def check_free_space(url: str, needed: int, what: str) -> None:
    """Refuse to start writing ``what`` (``needed`` bytes, estimated) into local folder ``url`` when it cannot hold
    it: a full disk found half-way costs the stage's work and leaves a temporary file behind."""
    if is_remote(url):
        return
    folder = Path(url).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(f"{what} needs about {needed / 2**20:,.0f} MiB in {folder} but only "
                             f"{free / 2**20:,.0f} MiB are free there: free some space, or choose another "
                             "--out (or TMPDIR for temporary files)")


def list_files(url: str) -> list[str]:
    """The files directly in folder ``url``, sorted by name (none when it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    names = sorted(str(p) for p in fs.ls(path, detail=False))
    # a store may list the folder's own marker ("ledger.d/", left by SeaweedFS once its files are removed): not a file
    return [join(url, n.rsplit("/", 1)[-1]) for n in names if n.rstrip("/") != path.rstrip("/")]


def remove(url: str) -> None:
    """Remove a file or folder tree if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_run_outputs(run_dir: str) -> list[str]:
    """Remove geoseg's own files and folders from ``run_dir`` (:data:`RUN_OUTPUTS`, and the hidden temporary
    files of their atomic writes), so that ``--overwrite`` never deletes a user's other files; returns them."""
    removed = []
    for url in list_files(run_dir):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name in RUN_OUTPUTS or any(name.startswith(f".{out}.") for out in RUN_OUTPUTS):
            remove(url)
            removed.append(url)
    return removed


def makedirs(url: str) -> None:
    """Create a local folder (object stores need none)."""
    if not is_remote(url):
        Path(url).mkdir(parents=True, exist_ok=True)


def gdal_options() -> dict[str, str]:
    """GDAL settings for reading ``s3://`` scenes from the endpoint named by ``AWS_ENDPOINT_URL``."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint or "AWS_S3_ENDPOINT" in os.environ:
        return {}
    parsed = urlparse(endpoint)
    return {
        "AWS_S3_ENDPOINT": parsed.netloc,
        "AWS_HTTPS": "YES" if parsed.scheme == "https" else "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


def gdal_env() -> rasterio.Env:
    """The one GDAL environment every raster read and write runs in: the store's endpoint for ``s3://``."""
    import rasterio

    return rasterio.Env(**gdal_options())


GDAL_CACHE_MB = 128  # the block cache of a CPU task's worker (GDAL's default is 5% of RAM): bounds its memory


def task_env() -> dict[str, str]:
    """The environment of geoseg's CPU tasks (tile readers, mosaic): the store's settings and a bounded GDAL
    block cache. One environment is one pool of Ray workers, so the mosaic reuses the readers' warm ones."""
    return {**forwarded_env(), "GDAL_CACHEMAX": str(GDAL_CACHE_MB)}


def forwarded_env() -> dict[str, str]:
    """The store's non-secret settings (endpoint, region, GDAL options), for workers on nodes whose environment
    lacks them. Never credentials: runtime_env is shown by Ray's dashboard and state API to anyone who can
    reach them, so workers read credentials from their own environment, an instance role or a credentials file."""
    return {k: v for k, v in os.environ.items()
            if k in _FORWARDED_AWS or (k.startswith(_FORWARDED_PREFIXES) and not any(m in k for m in _SECRET_MARKS))}
