"""Fine-tuning (geoseg/finetune.py) and user labels (geoseg/labels.py): labels onto a scene's grid, classes mapped
onto the parent's, a spatial slice held apart, and a real short fine-tune from the shipped model through Ray Train
whose checkpoint `geoseg run` takes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.features import shapes
from shapely.geometry import shape

from geoseg import api
from geoseg.bench_model import label_block, nearest_centroid
from geoseg.cli import main
from geoseg.datasets import LabelledImage
from geoseg.errors import ConfigError, LabelError
from geoseg.finetune import FinetuneSettings, fit, hold_apart, map_classes, read_examples, widen_head
from geoseg.labels import Grid, class_raster, read_labels
from geoseg.model.card import ClassInfo
from geoseg.model.checkpoint import load_card, load_model

SCENE = "sentinel2_strzegom/scenes/strzegom_20230530_33u.tif"
LABELS = "sentinel2_strzegom/labels/strzegom_20230530_33u.tif"
BANDS = "B02,B03,B04,B05,B06,B07,B08,B8A,B11,B12"
PARENT = (ClassInfo(1, "forest", "#00aa00"), ClassInfo(2, "urban", "#ff0000"), ClassInfo(3, "water", "#0000ff"))


def polygonise(label_tif: Path, out: Path, names: dict[int, str] | None = None, rows: slice = slice(None),
               cols: slice = slice(None)) -> Path:
    """A label raster's labelled pixels (within rows, cols) as polygons with a `class` column: ids, or names."""
    with rasterio.open(label_tif) as src:
        ids = np.rint(src.read(1)).astype(np.int32)
        transform, crs = src.transform, src.crs
    keep = np.zeros_like(ids, bool)
    keep[rows, cols] = True
    ids[~keep] = 0
    found = [(shape(g), int(v)) for g, v in shapes(ids, mask=ids > 0, transform=transform)]
    frame = gpd.GeoDataFrame({"class": [names[v] if names else v for _, v in found]},
                             geometry=[g for g, _ in found], crs=crs)
    frame.to_file(out)
    return out


def test_vector_labels_rasterise_to_the_raster_labels_they_came_from(tmp_path: Path, data_dir: Path) -> None:
    with rasterio.open(data_dir / LABELS) as src:
        raster = np.rint(src.read(1)).astype(np.int32)
        grid = Grid(src.crs.to_wkt(), src.transform, src.shape)
    names = {i: f"class {i}" for i in range(1, 11)}
    for column in (None, names):  # a column of ids, then one of names
        labels = read_labels(polygonise(data_dir / LABELS, tmp_path / f"{bool(column)}.gpkg", column), grid)
        ids = np.zeros_like(raster)
        r, c = int(labels.window.row_off), int(labels.window.col_off)
        ids[r:r + labels.codes.shape[0], c:c + labels.codes.shape[1]] = class_raster(labels, names, "labels")
        assert np.array_equal(ids, raster)
    raster_read = read_labels(data_dir / LABELS, grid)  # the raster itself, through the same door
    assert np.array_equal(class_raster(raster_read, names, "labels"), raster)


def test_labels_are_reprojected_onto_the_scene_grid_by_nearest_neighbour(tmp_path: Path, write_raster) -> None:
    ids = np.zeros((1, 40, 40), np.uint8)
    ids[0, 10:20, 10:30] = 3
    path = write_raster(tmp_path / "l.tif", ids, transform=Affine(10, 0, 500000, 0, -10, 5000000))
    grid = Grid("EPSG:32633", Affine(20, 0, 499800, 0, -20, 5000200), (40, 40))  # coarser, shifted
    labels = read_labels(path, grid)
    on_grid = class_raster(labels, {3: "water"}, path)
    assert set(np.unique(on_grid)) == {0, 3} and np.count_nonzero(on_grid) == 5 * 10  # 10x20 px at 10 m -> 5x10


def test_classes_map_by_id_name_legend_and_a_new_name_adds_a_class() -> None:
    classes, of = map_classes({"1", "Urban", "lake", "mine", "shade"}, PARENT,
                              {"lake": "water", "mine": "open-pit mine", "shade": None})
    assert of == {"1": 1, "Urban": 2, "lake": 3, "mine": 4, "shade": 0}
    assert classes[:3] == PARENT and (classes[3].id, classes[3].name) == (4, "open-pit mine")
    with pytest.raises(LabelError, match="--classes LEGEND.json"):
        map_classes({"wheat"}, PARENT)
    with pytest.raises(LabelError, match="class id 9"):
        map_classes({"wheat"}, PARENT, {"wheat": 9})


def test_the_held_apart_slice_is_a_spatial_block_of_the_labels() -> None:
    label = np.zeros((60, 100), np.uint8)
    label[10:50, 5:95] = np.random.default_rng(0).integers(1, 4, (40, 90))
    item = LabelledImage("x", np.zeros((3, 60, 100), np.uint16), label)
    train, held = hold_apart(item, 0.2, margin=4)
    assert held is not None
    rows, cols = np.nonzero(train.label)
    assert cols.max() < 95 - 90 * 0.2 + 1  # along the longer side (columns): the east fifth is held apart
    assert np.count_nonzero(held.label) == np.count_nonzero(label) - np.count_nonzero(train.label)
    assert 0.18 < np.count_nonzero(held.label) / np.count_nonzero(label) < 0.25
    assert held.image.shape[1:] == held.label.shape and held.label.shape[1] <= 90 * 0.2 + 2 * 4 + 1


def test_a_widened_head_keeps_the_parents_outputs_and_starts_new_classes_neutral() -> None:
    state = {"head.weight": torch.randn(3, 8, 1, 1), "head.bias": torch.randn(3), "other": torch.ones(2)}
    wide = widen_head(state, 5)
    assert wide["head.weight"].shape == (5, 8, 1, 1) and torch.equal(wide["head.weight"][:3], state["head.weight"])
    assert torch.all(wide["head.weight"][3:] == 0) and torch.allclose(wide["head.bias"][3:], state["head.bias"].mean())
    assert wide["other"] is state["other"]


def test_bad_label_input_is_refused_with_what_to_change(tmp_path: Path, data_dir: Path, write_raster) -> None:
    card = load_card("sentinel2-lulc")
    scene = str(data_dir / SCENE)
    with pytest.raises(ConfigError, match="one label file per scene"):
        read_examples([scene], [str(data_dir / LABELS)] * 2, card, "class", None, 64)
    far = write_raster(tmp_path / "far.tif", np.ones((1, 10, 10), np.uint8), transform=Affine(10, 0, 0, 0, -10, 0))
    with pytest.raises(LabelError, match="do not overlap"):
        read_examples([scene], [str(far)], card, "class", None, 64)
    gpkg = polygonise(data_dir / LABELS, tmp_path / "l.gpkg", rows=slice(0, 60), cols=slice(0, 60))
    with pytest.raises(LabelError, match="--class-field"):
        read_examples([scene], [str(gpkg)], card, "landcover", None, 64)
    with rasterio.open(data_dir / LABELS) as src:
        rows, cols = np.nonzero(src.read(1))
    r, c = rows[len(rows) // 2], cols[len(cols) // 2]  # a labelled pixel: 3 x 5 px around it are too few
    few = polygonise(data_dir / LABELS, tmp_path / "few.gpkg", rows=slice(r, r + 3), cols=slice(c, c + 5))
    with pytest.raises(LabelError, match="at least 50"):
        read_examples([scene], [str(few)], card, "class", None, 64)
    with pytest.raises(ConfigError, match="loss must be one of cross-entropy, cross-entropy"):
        FinetuneSettings(loss="dice")


@pytest.mark.usefixtures("ray_session")
def test_a_real_finetune_from_the_shipped_model_learns_names_its_parent_and_runs(
        tmp_path: Path, data_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`geoseg finetune` on polygons of one block of the eastern quarter (class names, quarries renamed through a
    legend into a new class), then `geoseg run --model` with the result and `geoseg evaluate` with vector labels."""
    card = load_card("sentinel2-lulc")
    names = {c.id: c.name for c in card.classes} | {10: "pit"}
    gpkg = polygonise(data_dir / LABELS, tmp_path / "block.gpkg", names, rows=slice(0, 200), cols=slice(301, None))
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps({"pit": "open-pit mine"}))
    child = tmp_path / "strzegom-east.pt"
    assert main(["finetune", "--from", "sentinel2-lulc", "--scenes", str(data_dir / SCENE), "--labels", str(gpkg),
                 "--out", str(child), "--classes", str(legend), "--epochs", "3", "--licence", "test labels"]) == 0
    shown = capfd.readouterr()
    losses = dict(re.findall(r"\[strzegom-east\] epoch (\d)/3 loss ([0-9.]+) val", shown.err + shown.out))
    assert len(losses) == 3 and float(losses["3"]) < float(losses["1"]), losses

    new = load_card(child)
    assert new.parent == f"sentinel2-lulc v{card.version}" and new.classes[:10] == card.classes
    assert (new.classes[10].id, new.classes[10].name) == (11, "open-pit mine")
    assert str(gpkg) in new.training_data[-1] and "test labels" in new.training_data[-1]
    assert new.mean == card.mean and new.bands == card.bands  # the parent's input contract is kept
    assert load_model(child)[1].head.out_channels == 11

    run = tmp_path / "run"
    assert main(["run", "--scenes", str(data_dir / SCENE), "--model", str(child), "--crs", "EPSG:32633",
                 "--bands", BANDS, "--out", str(run)]) == 0
    with rasterio.open(run / "classes.tif") as src:
        assert set(np.unique(src.read(1))) <= set(range(12))
    assert f"<th>fine-tuned from</th><td>sentinel2-lulc v{card.version}</td>" in (run / "report.html").read_text()
    ids_gpkg = polygonise(data_dir / LABELS, tmp_path / "reference.gpkg")
    by_vector = api.evaluate(str(run), str(ids_gpkg))
    by_raster = api.evaluate(str(run), str(data_dir / LABELS))
    assert by_vector["confusion"] == by_raster["confusion"] and by_vector["pixels"] > 50_000


@pytest.mark.usefixtures("ray_session")
def test_finetuning_stops_when_the_held_apart_labels_stop_improving(tmp_path: Path, data_dir: Path,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """Labels of a class the parent never predicts (6, absent from its area) and a learning rate of 0: the held-apart
    mIoU is 0 every epoch, so the job stops `patience` epochs after the first."""
    with rasterio.open(data_dir / SCENE) as src:
        image = src.read(window=((0, 128), (0, 128)))
    label = np.zeros((128, 128), np.uint8)
    label[20:100, 20:100] = 6
    settings = FinetuneSettings(epochs=6, steps_per_epoch=2, batch_size=2, chip=64, lr=0.0, patience=2)
    fit(load_card("sentinel2-lulc"), load_model("sentinel2-lulc")[1].state_dict(), [LabelledImage("x", image, label)],
        settings, tmp_path / "same.pt")
    shown = capfd.readouterr()
    assert "stopped early after epoch 3" in shown.out, shown.out  # from the checkpoints, not the progress display
    chosen = json.loads(torch.load(tmp_path / "same.pt", weights_only=True)["extra"]["metrics"])
    assert chosen["epoch"] < 3 and chosen["val_miou"] == 0.0


def test_the_new_area_experiment_trains_on_a_band_of_rows_and_scores_the_rest_beyond_a_buffer() -> None:
    label = np.zeros((100, 40), np.uint8)
    label[::2, 30:] = np.random.default_rng(1).integers(1, 5, (50, 10))
    area = (slice(None), slice(30, None))
    for position in (0.0, 0.5, 1.0):
        block, scored = label_block(label, area, 0.25, position, buffer=5)
        rows = np.nonzero(block)[0]
        assert 0.2 <= block.sum() / np.count_nonzero(label) <= 0.3
        assert np.all(label[block] > 0) and np.all(label[scored] > 0) and not (block & scored).any()
        far = np.nonzero(scored)[0]
        assert np.all((far < rows.min() - 5) | (far > rows.max() + 5))
        assert block.sum() + scored.sum() >= 0.6 * np.count_nonzero(label)
    north, south = label_block(label, area, 0.25, 0.0, 5)[0], label_block(label, area, 0.25, 1.0, 5)[0]
    assert north[:10].any() and south[-10:].any()


def test_the_pixel_reference_labels_pixels_by_the_nearest_class_mean_of_the_labelled_spectra() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 4, (30, 40)).astype(np.uint8)
    means = np.array([[0, 0, 0], [100, 5, 50], [0, 200, 50], [50, 0, 300]], float)  # bands per class id
    image = (means[truth].transpose(2, 0, 1) + rng.normal(0, 5, (3, 30, 40))).astype(np.float32)
    label = np.where(np.arange(30)[:, None] < 6, truth, 0).astype(np.uint8)  # the first 6 rows are labelled
    assert np.array_equal(nearest_centroid(image, label), truth)
    only_two = np.where(label == 3, 0, label).astype(np.uint8)  # a class nobody labelled is never predicted
    assert set(np.unique(nearest_centroid(image, only_two))) == {1, 2}
