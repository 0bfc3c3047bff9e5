"""Shared fixtures: the real data folder, one local Ray cluster for the whole session, small rasters made in code.

Tiers: a test that needs a Ray cluster is marked ``slow`` here (explicitly marked ones too); ``pytest -m "not
slow"`` (``make quick``) is the edit-test loop, CI runs everything.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from affine import Affine

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# before any test: a Ray that some test starts on its own (a run refused after Ray came up) keeps its token
# and files in this temp dir too, never in the machine's home or /tmp/ray
TEST_ROOT = Path(tempfile.mkdtemp(prefix="geoseg-tests-", dir="/tmp"))
os.environ["HOME"] = str(TEST_ROOT)
os.environ["RAY_TMPDIR"] = str(TEST_ROOT / "ray")

DATA = Path(os.environ.get("GEOSEG_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data beside the project; CI fails loudly (never skips) when it is missing."""
    if not (DATA / "README.md").exists():
        raise FileNotFoundError(f"real data not found at {DATA}: set GEOSEG_DATA to the shared data folder")
    return DATA


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the session, with its temp dir and HOME-based files kept in a temp dir: token
    authentication on (Ray's default), its token made by Ray in ``root/.ray/auth_token``, never the user's home."""
    import ray

    from geoseg.cluster import connect

    root = Path(tempfile.mkdtemp(prefix="geoseg-ray-", dir="/tmp"))
    os.environ["HOME"] = str(root)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # Ray's default mode, a token of its own
        os.environ.pop(name, None)
    connect(num_cpus=2, temp_dir=str(root / "r"))  # as geoseg starts its own local Ray
    try:
        yield None
    finally:
        ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the session's Ray cluster is slow (a cluster start, then real runs)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def write_raster() -> Callable[..., Path]:
    """A maker of small GeoTIFFs from arrays: ``write_raster(path, data[bands, y, x], crs=..., transform=...)``."""
    return _write_raster


def _write_raster(path: Path, data: np.ndarray, crs: str | None = "EPSG:32633", transform: Affine | None = None,
                 nodata: float | None = None, descriptions: tuple[str, ...] | None = None,
                 alpha_last: bool = False) -> Path:
    """A small GeoTIFF made in code (bands, y, x), for fixtures that need an exact known raster."""
    import rasterio
    from affine import Affine
    from rasterio.enums import ColorInterp

    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=str(data.dtype), transform=transform or Affine(10, 0, 500000, 0, -10, 5650000), nodata=nodata)
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = descriptions
        if alpha_last:
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    return path
