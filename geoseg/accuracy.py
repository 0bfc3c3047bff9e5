"""Accuracy of a class map against reference labels: confusion matrix, per-class IoU, mean IoU, overall accuracy,
and the calibration of its confidence (expected calibration error).

The metrics are pure array functions; `evaluate_rasters` is the I/O edge that puts a reference raster onto
the class map's grid first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from geoseg.arrays import Counts
from geoseg.errors import SceneError, SceneReadError

Ids = npt.NDArray[np.integer[Any]]  # (y, x) class ids; a reference may hold -1 where it has no label


def confusion_matrix(pred: Ids, ref: Ids, ignore: int | None = 0, size: int = 256) -> Counts:
    """Counts[ref id, predicted id] over pixels whose reference is not `ignore` (nor negative / >= size)."""
    if pred.shape != ref.shape:
        raise SceneError(f"prediction {pred.shape} and reference {ref.shape} differ in shape: "
                         "put them on one grid first")
    p, r = pred.astype(np.int64).ravel(), ref.astype(np.int64).ravel()
    keep = (r >= 0) & (r < size) & (p >= 0) & (p < size)
    if ignore is not None:
        keep &= r != ignore
    return np.bincount(r[keep] * size + p[keep], minlength=size * size).reshape(size, size)


def iou_per_class(cm: Counts) -> npt.NDArray[np.float64]:
    """TP / (TP + FP + FN) per id; NaN where an id is neither in the reference nor predicted."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def summarise(cm: Counts, ignore: int | None = 0, names: dict[int, str] | None = None) -> dict[str, Any]:
    """JSON-able metrics; mean IoU is over the classes present in the reference, so absent classes neither help
    nor hurt."""
    iou = iou_per_class(cm)
    in_ref = cm.sum(1) > 0
    ids = [i for i in range(len(cm)) if in_ref[i] or cm[:, i].sum() > 0]
    present = [i for i in ids if in_ref[i]]
    total = int(cm.sum())
    return {
        "class_ids": ids,
        "names": {str(i): (names or {}).get(i, "nodata" if i == 0 else f"class {i}") for i in ids},
        "confusion": cm[np.ix_(ids, ids)].tolist(),
        "iou": {str(i): (None if np.isnan(iou[i]) else float(iou[i])) for i in ids},
        "present": present,
        "miou": float(np.mean(iou[present])) if present else float("nan"),
        "overall_accuracy": float(np.trace(cm) / total) if total else float("nan"),
        "pixels": total,
        "ignore": ignore,
    }


def calibration(confidence: npt.NDArray[np.floating[Any]], correct: npt.NDArray[np.bool_], bins: int = 10
                ) -> dict[str, Any]:
    """Expected calibration error of confidences (0..1) against whether each prediction was right, over ``bins``
    equal-width bins (1.0 falls in the last): the pixel-weighted mean gap between a bin's accuracy and its mean
    confidence, 0 for a model whose confidence is its accuracy. Per bin: pixels, accuracy, mean confidence."""
    c, ok = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, bool).ravel()
    k = np.clip((c * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(k, minlength=bins)
    hits = np.bincount(k, weights=ok, minlength=bins)
    conf = np.bincount(k, weights=c, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc, mean = hits / count, conf / count
    used = count > 0
    ece = float(np.sum(count[used] * np.abs(acc[used] - mean[used])) / count.sum()) if used.any() else float("nan")
    return {"ece": ece, "bins": {"count": count.tolist(),
                                 "accuracy": [float(a) if u else None for a, u in zip(acc, used, strict=True)],
                                 "confidence": [float(m) if u else None for m, u in zip(mean, used, strict=True)]}}


def evaluate_arrays(pred: Ids, ref: Ids, ignore: int | None = 0, names: dict[int, str] | None = None
                    ) -> dict[str, Any]:
    """Metrics of a class map against a reference already on the same grid."""
    return summarise(confusion_matrix(pred, ref, ignore), ignore, names)


def evaluate_rasters(classes_tif: str | Path, reference_tif: str | Path, ignore: int | None = 0,
                     names: dict[int, str] | None = None, confidence_tif: str | Path | None = None,
                     class_field: str = "class") -> dict[str, Any]:
    """Compare a run's class raster (``classes.tif``, or ``classes.vrt`` over a grid of COGs) with reference
    labels; with the run's confidence raster (on the class raster's grid), also the calibration
    (:func:`calibration`, as ``ece`` and ``calibration``) over the labelled pixels the run predicted.

    A reference raster on another grid is reprojected onto the class map's with nearest neighbour (labels are
    categories, never averaged); pixels the reference does not cover are left out. A vector reference (polygons
    whose ``class_field`` holds class ids or names) is rasterised onto the class map's grid, as fine-tuning does.
    """
    import rasterio
    from rasterio.errors import RasterioIOError
    from rasterio.warp import Resampling, reproject

    from geoseg.labels import is_vector

    if is_vector(reference_tif):
        return _evaluate_vector(classes_tif, reference_tif, ignore, names or {}, confidence_tif, class_field)
    try:
        with rasterio.open(classes_tif) as cls, rasterio.open(reference_tif) as rf:
            pred = cls.read(1)
            same = cls.crs == rf.crs and cls.transform == rf.transform and cls.shape == rf.shape
            if same:
                ref = rf.read(1).astype(np.float64)
                if rf.nodata is not None:
                    ref[ref == rf.nodata] = np.nan
            else:
                if rf.crs is None or cls.crs is None:
                    raise SceneError(f"{classes_tif} and {reference_tif} are on different grids and one has no CRS: "
                                     "georeference both")
                ref = np.full(cls.shape, np.nan)
                reproject(
                    rf.read(1).astype(np.float64), ref,
                    src_transform=rf.transform, src_crs=rf.crs, src_nodata=rf.nodata,
                    dst_transform=cls.transform, dst_crs=cls.crs, dst_nodata=np.nan,
                    resampling=Resampling.nearest,
                )
    except RasterioIOError as exc:
        raise SceneReadError(f"cannot read {exc}: pass a run's classes.tif or classes.vrt and a label GeoTIFF") from exc
    valid = np.isfinite(ref)
    ref_ids = np.where(valid, np.rint(np.nan_to_num(ref)), -1).astype(np.int64)
    return _scored(pred, ref_ids, ignore, names, confidence_tif, reprojected=not same)


def _evaluate_vector(classes_tif: str | Path, reference: str | Path, ignore: int | None, names: dict[int, str],
                     confidence_tif: str | Path | None, class_field: str) -> dict[str, Any]:
    import rasterio
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window

    from geoseg.labels import Grid, class_raster, paste, read_labels

    try:
        with rasterio.open(classes_tif) as cls:
            pred = cls.read(1)
            grid = Grid(cls.crs.to_wkt(), cls.transform, cls.shape)
    except RasterioIOError as exc:
        raise SceneReadError(f"cannot read {exc}: pass a run's classes.tif or classes.vrt") from exc
    labels = read_labels(reference, grid, class_field)
    ids = paste(class_raster(labels, names, reference), labels.window, Window(0, 0, pred.shape[1], pred.shape[0]), -1)
    ref_ids = ids.astype(np.int64)  # -1: not covered
    return _scored(pred, ref_ids, ignore, names, confidence_tif, reprojected=True)


def _scored(pred: Ids, ref_ids: npt.NDArray[np.int64], ignore: int | None, names: dict[int, str] | None,
            confidence_tif: str | Path | None, reprojected: bool) -> dict[str, Any]:
    """The metrics of a class map against reference ids on its grid (-1 where the reference says nothing)."""
    import rasterio
    from rasterio.errors import RasterioIOError

    result = evaluate_arrays(pred, ref_ids, ignore, names)
    result["reprojected"] = reprojected
    if confidence_tif is not None:
        try:
            with rasterio.open(confidence_tif) as src:
                conf = src.read(1)
        except RasterioIOError as exc:
            raise SceneReadError(f"cannot read {exc}: pass a run's confidence.tif or confidence.vrt") from exc
        labelled = (ref_ids >= 0) & (conf > 0) & (ref_ids != (-1 if ignore is None else ignore))
        cal = calibration(conf[labelled] / 255.0, pred[labelled] == ref_ids[labelled])
        result["ece"], result["calibration"] = cal["ece"], cal["bins"]
    return result


def format_table(result: dict[str, Any]) -> str:
    """The confusion matrix (rows reference, columns predicted), per-class IoU, mean IoU and OA as text."""
    ids = result["class_ids"]
    names = result["names"]
    width = 2 + max(6, *(len(str(v)) for row in result["confusion"] for v in row))
    lines = ["confusion (rows: reference, columns: predicted)", " " * 6 + "".join(f"{i:>{width}}" for i in ids)]
    for i, row in zip(ids, result["confusion"], strict=True):
        lines.append(f"{i:>5} " + "".join(f"{v:>{width}}" for v in row))
    lines.append("")
    lines.append(f"{'id':>5}  {'class':<44} {'IoU':>6}")
    for i in ids:
        iou = result["iou"][str(i)]
        mark = "" if i in result["present"] else "  (not in reference)"
        lines.append(f"{i:>5}  {names[str(i)][:44]:<44} {'-' if iou is None else f'{iou:.3f}':>6}{mark}")
    lines.append("")
    lines.append(f"mean IoU over {len(result['present'])} classes present: {result['miou']:.3f}")
    lines.append(f"overall accuracy: {result['overall_accuracy']:.3f}  "
                 f"({result['pixels']} labelled pixels, ignore={result['ignore']})")
    if "ece" in result:
        bins = result["calibration"]
        lines += ["", f"calibration: expected calibration error {result['ece']:.3f} over {len(bins['count'])} bins",
                  f"{'confidence':>12} {'pixels':>10} {'accuracy':>9} {'mean conf':>9}"]
        n = len(bins["count"])
        for i, (count, acc, conf) in enumerate(zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)):
            shown = "-" if acc is None else f"{acc:.3f}", "-" if conf is None else f"{conf:.3f}"
            lines.append(f"{f'{i / n:.1f}-{(i + 1) / n:.1f}':>12} {count:>10} {shown[0]:>9} {shown[1]:>9}")
    return "\n".join(lines)
