"""Streaming, atomic GeoPackage writer.

Features arrive in batches and are appended to a temporary GeoPackage beside the target; ``commit``
flushes it, syncs it to disk and renames it over the target in one ``os.replace``. A crash at any
moment therefore leaves the previous file (or none) or the complete new one, never a truncated one.
The sink follows the usual lifecycle: open, write, commit, or abort on failure.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import pyogrio.raw
import shapely

from geoseg.errors import ConfigError

FIELD_TYPES = ("int64", "float64", "str")
Geometries = npt.NDArray[np.object_]  # shapely geometries
# WKB, one bytes object per geometry: object arrays at run time, though shapely annotates to_wkb as bytes_
WKB = npt.NDArray[np.object_] | npt.NDArray[np.bytes_]
Column = npt.NDArray[Any]  # one field's values, one per geometry
GEOMETRY_COLUMN = "geom"

# QGIS's own table of layer styles, as QGIS creates it through GDAL when it saves a style into a GeoPackage
# (QgsOgrUtils::saveStyle): QGIS applies a layer's row with useAsDefault when the layer is opened
_LAYER_STYLES = """CREATE TABLE "layer_styles" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "f_table_catalog" TEXT(256), "f_table_schema" TEXT(256), "f_table_name" TEXT(256),
    "f_geometry_column" TEXT(256), "styleName" TEXT(30), "styleQML" TEXT, "styleSLD" TEXT,
    "useAsDefault" BOOLEAN, "description" TEXT, "owner" TEXT(30), "ui" TEXT(30),
    "update_time" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"""


@dataclass(frozen=True)
class LayerStyle:
    """A layer's default style for QGIS: QML (what QGIS applies) and an equivalent SLD (for other clients)."""

    name: str
    qml: str
    sld: str
    description: str


class GpkgWriter:
    """Appends polygon batches to one GeoPackage layer and publishes the file whole on commit.

    ``fields`` maps column name to one of ``FIELD_TYPES``; ``metadata`` lands in the GeoPackage's
    metadata table (``gpkg_metadata``), where GDAL and QGIS show it as the dataset's metadata.
    Memory is bounded by ``batch_size`` features: the buffer is flushed whenever it reaches it. A ``style``
    set before commit becomes the layer's default QGIS style.
    """

    def __init__(self, path: str | Path, layer: str, crs_wkt: str, fields: Mapping[str, str],
                 metadata: Mapping[str, str] | None = None, batch_size: int = 20_000) -> None:
        unknown = {k: v for k, v in fields.items() if v not in FIELD_TYPES}
        if unknown:
            raise ConfigError(f"unsupported GeoPackage field types {unknown}: use one of {FIELD_TYPES}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigError(f"output folder {self.path.parent} does not exist: create it or choose another --out")
        self.layer = layer
        self.crs_wkt = crs_wkt
        self.fields = dict(fields)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.batch_size = batch_size
        self.tmp_path = self.path.with_name(f".{self.path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.gpkg")
        self.count = 0
        self.style: LayerStyle | None = None
        self._created = False
        self._closed = False
        self._wkb: list[npt.NDArray[np.object_]] = []
        self._cols: dict[str, list[Column]] = {k: [] for k in self.fields}
        self._buffered = 0

    def __enter__(self) -> GpkgWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, geometries: Geometries, columns: Mapping[str, Column]) -> None:
        """Buffer one batch of (Multi)Polygons with their columns; flush when the buffer is full."""
        self.write_wkb(shapely.to_wkb(np.asarray(geometries, dtype=object)), columns)

    def write_wkb(self, wkb: WKB, columns: Mapping[str, Column]) -> None:
        """Like :meth:`write`, for geometries already encoded as WKB (as they come back from workers):
        the driver then never builds geometry objects for them."""
        if self._closed:
            raise ConfigError("GpkgWriter already committed or aborted: open a new writer")
        objects: npt.NDArray[np.object_] = np.asarray(wkb, dtype=object)
        if set(columns) != set(self.fields):
            raise ConfigError(f"columns {sorted(columns)} do not match the layer's fields {sorted(self.fields)}")
        for name, values in columns.items():
            if len(values) != len(objects):
                raise ConfigError(f"column {name} has {len(values)} values for {len(objects)} geometries")
        if len(objects) == 0:
            return
        self._wkb.append(objects)
        for name, values in columns.items():
            self._cols[name].append(np.asarray(values))
        self._buffered += len(objects)
        if self._buffered >= self.batch_size:
            self._flush()

    def commit(self) -> None:
        """Write what is buffered, make sure the layer exists, add the style, sync, and rename over the target."""
        if self._closed:
            raise ConfigError("GpkgWriter already committed or aborted")
        try:
            self._flush()
            if not self._created:
                self._append(np.empty(0, dtype=object), {k: _empty(v) for k, v in self.fields.items()})
            if self.style is not None:
                _write_style(self.tmp_path, self.layer, self.style)
            with open(self.tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp_path, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop the temporary file; the target is left as it was."""
        self._closed = True
        self._wkb.clear()
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(str(self.tmp_path) + suffix).unlink(missing_ok=True)

    def _flush(self) -> None:
        if not self._buffered:
            return
        wkb: npt.NDArray[np.object_] = np.concatenate(self._wkb)
        cols = {k: np.concatenate(v) for k, v in self._cols.items()}
        self._wkb.clear()
        for v in self._cols.values():
            v.clear()
        self._buffered = 0
        self._append(wkb, cols)

    def _append(self, wkb: npt.NDArray[np.object_], cols: Mapping[str, Column]) -> None:
        names = list(self.fields)
        data = [_column(cols[k], self.fields[k]) for k in names]
        kwargs: dict[str, object] = {}
        if not self._created:
            kwargs = {"dataset_metadata": self.metadata or None,
                      "layer_options": {"SPATIAL_INDEX": "YES", "GEOMETRY_NAME": GEOMETRY_COLUMN}}
        pyogrio.raw.write(str(self.tmp_path), wkb, data, names, layer=self.layer, driver="GPKG",
                          geometry_type="MultiPolygon", promote_to_multi=True, crs=self.crs_wkt,
                          append=self._created, **kwargs)
        self._created = True
        self.count += len(wkb)


def _write_style(path: Path, layer: str, style: LayerStyle) -> None:
    """Add QGIS's ``layer_styles`` table with ``style`` as the layer's default, registered in gpkg_contents as an
    attributes table (as GDAL registers it for QGIS), so OGR lists it and QGIS finds it."""
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(_LAYER_STYLES)
        db.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                   "styleName, styleQML, styleSLD, useAsDefault, description, owner) VALUES ('', '', ?, ?, ?, ?, ?, 1, "
                   "?, '')", (layer, GEOMETRY_COLUMN, style.name, style.qml, style.sld, style.description))
        db.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, description, last_change, srs_id) "
                   "VALUES ('layer_styles', 'attributes', 'layer_styles', '', "
                   "strftime('%Y-%m-%dT%H:%M:%fZ','now'), 0)")


def _column(values: Column, kind: str) -> Column:
    if kind == "int64":
        return np.asarray(values, dtype=np.int64)
    if kind == "float64":
        return np.asarray(values, dtype=np.float64)
    return np.asarray(values, dtype=object)


def _empty(kind: str) -> Column:
    return np.empty(0, dtype=object if kind == "str" else kind)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
