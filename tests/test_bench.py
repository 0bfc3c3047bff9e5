"""The throughput benchmark's building blocks (not its timings): the assembled scene, the naive loop, the
steady-state rate, the memory sampler and the header-only granules of the million-tile plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _scene import assemble_scene, naive_segment, strzegom_scenes  # noqa: E402
from throughput import PeakSampler, header_only_scenes, steady_rate  # noqa: E402


def test_assembled_scene_is_real_pixels_on_the_first_scene_grid(tmp_path: Path, data_dir: Path) -> None:
    first = strzegom_scenes(data_dir)[0]
    path = assemble_scene(tmp_path / "big.tif", 1000, data_dir)
    with rasterio.open(first) as src, rasterio.open(path) as big:
        assert (big.width, big.height, big.count, big.dtypes[0]) == (1000, 1000, 10, "uint16")
        assert big.crs == src.crs and big.transform == src.transform
        assert big.descriptions == src.descriptions
        t = src.width
        assert np.array_equal(big.read(window=((0, t), (0, t))), src.read())
        # the next copy along a row is mirrored left-right, so the seam joins like pixels
        right = big.read(1, window=((0, t), (t, 2 * t)))
        assert right.shape == (t, t) and (right > 0).mean() > 0.99


@pytest.mark.usefixtures("ray_session")
def test_naive_loop_equals_geoseg_classes(tmp_path: Path, data_dir: Path) -> None:
    from geoseg import runtime
    from geoseg.config import ExecutionSettings, RunConfig

    scene = strzegom_scenes(data_dir)[-1]
    runtime.run(RunConfig(scenes=(str(scene),), out=str(tmp_path / "run")), ExecutionSettings(progress=False))
    stats = naive_segment(scene, tmp_path / "naive.tif")
    with rasterio.open(tmp_path / "run" / "classes.tif") as a, rasterio.open(tmp_path / "naive.tif") as b:
        ours, naive = a.read(1), b.read(1)
        assert a.transform == b.transform and a.crs == b.crs
    assert stats["tiles"] == 4 and (naive > 0).all()
    assert np.array_equal(ours, naive)


def test_steady_rate_skips_the_first_batch() -> None:
    ends = [5.0, 5.0, 6.0, 6.0, 7.0, 7.0]
    assert steady_rate(ends, 2) == pytest.approx(4 / 2)
    with pytest.raises(ValueError):
        steady_rate(ends[:2], 2)


def test_peak_sampler_sees_a_child_process_grow(tmp_path: Path) -> None:
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with PeakSampler(proc.pid, interval_s=0.05) as sampler:
        proc.wait()
    assert sampler.peaks_mib()["driver"] > 200


def test_header_only_granules_plan_without_pixels(tmp_path: Path) -> None:
    from geoseg.config import RunConfig
    from geoseg.plan import make_plan

    n = header_only_scenes(tmp_path / "g", (14.0, 16.8), (50.0, 50.9), (1.4, 0.9))
    files = sorted((tmp_path / "g").glob("*.tif"))
    assert n == len(files) == 2
    assert sum(f.stat().st_size for f in files) < 2**20  # headers only: a real granule is ~2.4 GB
    plan = make_plan(RunConfig(scenes=tuple(str(f) for f in files), out=str(tmp_path / "run"), crs="EPSG:3035"))
    # two overlapping 109.8 km granules: more than one granule's 43 x 43 tiles of 2.56 km, at most two's
    assert 43 * 43 < plan.tile_count <= 2 * 45 * 45
