"""Shared fixtures: the real data folder and one local Ray cluster for the whole session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

DATA = Path(os.environ.get("GEOSEG_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data beside the project; CI fails loudly (never skips) when it is missing."""
    if not (DATA / "README.md").exists():
        raise FileNotFoundError(f"real data not found at {DATA}: set GEOSEG_DATA to the shared data folder")
    return DATA


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the session, with its temp dir and HOME-based files kept in a temp dir."""
    import ray

    root = Path(tempfile.mkdtemp(prefix="geoseg-ray-", dir="/tmp"))
    os.environ["HOME"] = str(root)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(root / "r"), log_to_driver=False)
    try:
        yield None
    finally:
        ray.shutdown()
