"""geoseg's errors: one root, each leaf also subclasses the matching builtin, messages say the fix."""

from __future__ import annotations


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose."""


class SceneError(GeosegError, ValueError):
    """A scene cannot be used as given (no CRS, bands that do not fit the model, ...)."""


class SceneReadError(GeosegError, OSError):
    """A scene file is missing, unreadable or truncated."""


class SceneChangedError(GeosegError, ValueError):
    """A scene of a run changed its grid, band count or dtype since the run was planned."""


class RegionError(GeosegError, ValueError):
    """The region is malformed or intersects no scene."""


class CheckpointError(GeosegError, ValueError):
    """A file is not a geoseg checkpoint, or its model card is incomplete."""


class PlanMismatchError(GeosegError, FileExistsError):
    """RUN_DIR already holds a run made from a different plan."""


class RunDirError(GeosegError, FileNotFoundError):
    """RUN_DIR does not hold a geoseg run."""


class ConfigError(GeosegError, ValueError):
    """A setting has a value geoseg cannot use."""


class MissingExtraError(GeosegError, ImportError):
    """An optional dependency (an extra such as ``geoseg[clouds]``) is missing; the message says what to install."""

class CatalogueError(GeosegError, ValueError):
    """A STAC catalogue cannot be read, holds no item over the region and window, or an item lacks a band."""


class ExecutionError(GeosegError, RuntimeError):
    """The cluster could not finish the work (inference actors keep dying, a block's result went missing)."""


class DiskSpaceError(GeosegError, OSError):
    """A local folder has too little free space for an output about to be written."""


class ClusterError(GeosegError, ConnectionError):
    """The Ray cluster named by --ray-address or RAY_ADDRESS does not answer."""


class RunDirBusyError(GeosegError, FileExistsError):
    """Another driver holds RUN_DIR's lease (or wrote its ledger since this one did): one writer per RUN_DIR."""


class LabelError(GeosegError, ValueError):
    """Labels cannot be used as given: no class column, classes the model lacks, no overlap with the scene."""
