"""geoseg: distributed land-cover mapping from satellite and drone imagery on Ray.

The public API is named in ``__all__`` and imported on first use, so ``import geoseg`` stays light: tile
workers import this package and never pay for torch, and neither does a notebook until it runs a model.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from geoseg.api import Result, evaluate, open_run, rerun, run, status, vectorise
    from geoseg.config import ExecutionSettings, RunConfig, VectoriseSettings
    from geoseg.errors import ConfigError, GeosegError, PlanMismatchError, RunDirError, SceneError
    from geoseg.results import RunReport, RunStatus, TileOutcome
    from geoseg.runtime import Observer

_EXPORTS = {
    "run": "geoseg.api", "rerun": "geoseg.api", "status": "geoseg.api", "open_run": "geoseg.api",
    "vectorise": "geoseg.api", "evaluate": "geoseg.api", "Result": "geoseg.api", "Observer": "geoseg.runtime",
    "RunConfig": "geoseg.config", "ExecutionSettings": "geoseg.config", "VectoriseSettings": "geoseg.config",
    "RunReport": "geoseg.results", "RunStatus": "geoseg.results", "TileOutcome": "geoseg.results",
    "GeosegError": "geoseg.errors", "ConfigError": "geoseg.errors", "SceneError": "geoseg.errors",
    "PlanMismatchError": "geoseg.errors", "RunDirError": "geoseg.errors",
}
__all__ = [
    "__version__", "run", "rerun", "status", "open_run", "vectorise", "evaluate", "Result", "Observer", "RunConfig",
    "ExecutionSettings", "VectoriseSettings",
    "RunReport", "RunStatus", "TileOutcome", "GeosegError", "ConfigError", "SceneError", "PlanMismatchError",
    "RunDirError",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    if name == "__version__":
        try:
            return version("geoseg")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
