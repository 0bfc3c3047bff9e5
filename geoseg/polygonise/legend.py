"""Class names: from a JSON legend file, or from the class raster's own ``CLASS_NAMES`` tag."""

from __future__ import annotations

import json
from pathlib import Path

from geoseg.errors import ConfigError

CLASS_NAMES_TAG = "CLASS_NAMES"
"""The GeoTIFF tag in which geoseg's class rasters carry their legend (JSON, as :func:`load_legend` reads)."""


def load_legend(path: str | Path) -> dict[int, str]:
    """Class names from a JSON legend: ``{"classes": [{"id": 1, "name": ...}, ...]}`` or ``{"1": "name"}``."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read legend {path}: {exc}; pass a JSON file with class ids and names") from exc
    return parse_legend(doc, str(path))


def parse_legend(doc: object, where: str) -> dict[int, str]:
    """Class names from a parsed legend document; ``where`` names its source in the error."""
    try:
        if isinstance(doc, dict) and "classes" in doc:
            return {int(c["id"]): str(c["name"]) for c in doc["classes"]}
        if isinstance(doc, dict):
            return {int(k): str(v) for k, v in doc.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"legend {where} is malformed ({exc}): use {{\"classes\": [{{\"id\": 1, \"name\": "
                          f"\"...\"}}]}} or {{\"1\": \"name\"}}") from exc
    raise ConfigError(f"legend {where} must be a JSON object: {{\"classes\": [...]}} or {{\"1\": \"name\"}}")
