"""The Python API for notebooks and scripts: ``geoseg.run(scenes=[...], out=..., **settings)`` and friends.

Settings are the fields of :class:`~geoseg.config.RunConfig`, :class:`~geoseg.config.ExecutionSettings` and
:class:`~geoseg.config.VectoriseSettings`, passed by name as keywords (``tile_size=256, actors=2,
min_area_m2=500``); each is validated where it is made, and a name none of them has is a ``ConfigError``
listing the ones there are. The CLI builds the same settings from its flags and calls these functions.
Results come back as a :class:`Result`: the typed report, and the outputs opened lazily on first use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

from geoseg import storage
from geoseg.config import ExecutionSettings, RunConfig, VectoriseSettings, absolute
from geoseg.errors import ConfigError
from geoseg.results import RunReport, RunStatus, TileOutcome

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr

    from geoseg.runtime import Observer

_RUN = {f.name for f in fields(RunConfig)} - {"vectorise"}
_EXECUTION = {f.name for f in fields(ExecutionSettings)}
_VECTORISE = {f.name for f in fields(VectoriseSettings)}


@dataclass(frozen=True)
class Result:
    """A run's outcome: ``.report`` (typed), ``.failed_tiles``, and its outputs, each opened on first use."""

    run_dir: str
    report: RunReport

    @property
    def failed_tiles(self) -> tuple[TileOutcome, ...]:
        """Each failed tile's stage and error: rerun them with :func:`rerun` once the cause is fixed."""
        return self.report.failed_tiles

    @property
    def complete(self) -> bool:
        """Every tile is done."""
        return self.report.complete

    @cached_property
    def classes(self) -> xr.DataArray:
        """The class map as a georeferenced DataArray (y, x) of class ids, read lazily (rioxarray)."""
        return self._raster(self._output("classes"))

    @cached_property
    def confidence(self) -> xr.DataArray:
        """The confidence map (max softmax x 255) as a lazy DataArray (y, x)."""
        return self._raster(self._output("confidence"))

    @cached_property
    def polygons(self) -> gpd.GeoDataFrame:
        """The GeoPackage's ``landcover`` layer: class_id, class_name, area_m2, mean_confidence, geometry."""
        import geopandas as gpd

        with storage.gdal_env():
            return gpd.read_file(self._output("polygons"), layer="landcover")

    def _output(self, name: str) -> str:
        if self.report.outputs is None:
            raise ConfigError(f"the run in {self.run_dir} stopped before writing its outputs ({self.report.error}): "
                              f"finish it with geoseg.rerun({self.run_dir!r})")
        return storage.join(self.run_dir, getattr(self.report.outputs, name))

    @staticmethod
    def _raster(url: str) -> xr.DataArray:
        import rioxarray
        import xarray as xr

        with storage.gdal_env():
            array = rioxarray.open_rasterio(url, lock=False)
        assert isinstance(array, xr.DataArray)  # one file, not a list of subdatasets
        return array.squeeze("band", drop=True)


def _split(settings: Mapping[str, Any], *groups: Iterable[str]) -> list[dict[str, Any]]:
    """Keyword settings split by the settings class that has them; an unknown name is a ConfigError."""
    known = [set(g) for g in groups]
    unknown = sorted(set(settings) - set().union(*known))
    if unknown:
        names = ", ".join(sorted(set().union(*known)))
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}: the settings are {names}")
    return [{k: v for k, v in settings.items() if k in g} for g in known]


def run(scenes: Iterable[str] = (), out: str = "", *, config: RunConfig | None = None,
        execution: ExecutionSettings | None = None, overwrite: bool = False, observer: Observer | None = None,
        **settings: Any) -> Result:
    """Plan (or reuse the identical plan in ``out``) and run; e.g. ``geoseg.run(scenes=["a.tif"], out="runs/a")``
    or ``geoseg.run(stac=URL, region_wkt=..., datetime="2023-06-01/2023-08-31", out="runs/b")``. The settings
    come by name, or made already as ``config`` and ``execution`` (what the CLI does), not both."""
    from geoseg import runtime

    run_kw, execution_kw, vectorise_kw = _split(settings, _RUN, _EXECUTION, _VECTORISE)
    if config is None:
        config = RunConfig(scenes=tuple(scenes), out=out.rstrip("/"), vectorise=VectoriseSettings(**vectorise_kw),
                           **run_kw)
    elif run_kw or vectorise_kw or tuple(scenes) or out:
        raise ConfigError("give the run's settings either as config= or by name, not both")
    execution = _execution(execution, execution_kw)
    return Result(config.out, runtime.run(config, execution, overwrite=overwrite, observer=observer))


def rerun(run_dir: str, *, execution: ExecutionSettings | None = None, observer: Observer | None = None,
          **settings: Any) -> Result:
    """Redo only the tiles not done, with the run's own plan; execution settings by name (``actors=2``) or
    as ``execution``."""
    from geoseg import runtime

    (execution_kw,) = _split(settings, _EXECUTION)
    run_dir = absolute(run_dir.rstrip("/"))
    return Result(run_dir, runtime.rerun(run_dir, _execution(execution, execution_kw), observer=observer))


def _execution(given: ExecutionSettings | None, by_name: dict[str, Any]) -> ExecutionSettings:
    if given is None:
        return ExecutionSettings(**by_name)
    if by_name:
        raise ConfigError("give the execution settings either as execution= or by name, not both")
    return given


def status(run_dir: str) -> RunStatus:
    """Tiles done, failed and pending, with each failed tile's error."""
    from geoseg import runtime

    return runtime.status(run_dir.rstrip("/"))


def open_run(run_dir: str) -> Result:
    """A finished run's result, from its ``report.json``."""
    from geoseg import runtime

    run_dir = absolute(run_dir.rstrip("/"))
    return Result(run_dir, runtime.load_report(run_dir))


def vectorise(classes: str, out: str, *, legend: str | Mapping[int, str] | None = None,
              ray_address: str | None = None, progress: bool = False, **settings: Any) -> dict[str, float]:
    """Polygonise a class raster into a GeoPackage (``VectoriseSettings`` by name); area per class in m2."""
    from geoseg.cluster import connect
    from geoseg.polygonise import load_legend
    from geoseg.polygonise import vectorise as polygonise

    (given,) = _split(settings, _VECTORISE)
    v = VectoriseSettings(**given)
    if ray_address:
        connect(ray_address)
    names = load_legend(legend) if isinstance(legend, str) else legend
    return polygonise(classes, out, names, block_size=v.block_size, connectivity=v.connectivity,
                      min_area_m2=v.min_area_m2, simplify_m=v.simplify_m, progress=progress)


def evaluate(run_dir: str, reference: str, ignore: int | None = 0, class_field: str = "class") -> dict[str, Any]:
    """Compare a run's class map with reference labels, a label raster or polygons with a ``class_field`` column
    (confusion matrix, IoU per class, mIoU, overall accuracy, and where the run has its confidence raster, the
    calibration: ``ece``); also written as ``evaluation.json`` in RUN_DIR."""
    from geoseg.accuracy import evaluate_rasters
    from geoseg.model.checkpoint import load_card
    from geoseg.mosaic import CONFIDENCE_TIF, CONFIDENCE_VRT, class_raster
    from geoseg.plan import load_plan

    run_dir = run_dir.rstrip("/")
    card = load_card(load_plan(run_dir).model)
    classes = class_raster(run_dir)
    confidence = storage.join(run_dir, CONFIDENCE_VRT if classes.endswith(".vrt") else CONFIDENCE_TIF)
    result = evaluate_rasters(classes, reference, ignore=ignore, names={c.id: c.name for c in card.classes},
                              confidence_tif=confidence if storage.exists(confidence) else None,
                              class_field=class_field)
    storage.write_bytes(storage.join(run_dir, "evaluation.json"), json.dumps(result, indent=2).encode())
    return result
