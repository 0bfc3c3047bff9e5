"""Settings are checked when they are made: a bad value is a named error naming the flag, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from geoseg.cli import EXIT_BAD_INPUT, main
from geoseg.config import ExecutionSettings, RunConfig, VectoriseSettings
from geoseg.errors import ConfigError


@pytest.mark.parametrize(("make", "flag"), [
    (lambda: VectoriseSettings(min_area_m2=-1), "--min-area"),
    (lambda: VectoriseSettings(block_size=0), "--block-size"),
    (lambda: VectoriseSettings(connectivity=6), "--connectivity"),
    (lambda: VectoriseSettings(simplify_m=float("nan")), "--simplify"),
    (lambda: ExecutionSettings(actors=0), "--actors"),
    (lambda: ExecutionSettings(batch_size=0), "--batch-size"),
    (lambda: ExecutionSettings(readers_per_actor=-2), "--readers-per-actor"),
    (lambda: ExecutionSettings(device="tpu"), "--device"),
    (lambda: ExecutionSettings(max_attempts=0), "max_attempts"),
    (lambda: RunConfig(scenes=(), out="run"), "--scenes"),
    (lambda: RunConfig(scenes=("a.tif",), out="run", tile_size=0), "--tile-size"),
    (lambda: RunConfig(scenes=("a.tif",), out="run", halo=-1), "--halo"),
    (lambda: RunConfig(scenes=("a.tif",), out="run", resolution=-10.0), "--resolution"),
    (lambda: RunConfig(scenes=("a.tif",), out="run", precision="fp16"), "--precision"),
])
def test_a_bad_setting_is_refused_when_made(make: object, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        make()  # type: ignore[operator]


def test_defaults_are_valid() -> None:
    assert ExecutionSettings().actors is None and VectoriseSettings().min_area_m2 == 0.0
    assert RunConfig(scenes=("a.tif",), out="run").precision is None


@pytest.mark.parametrize("args", [["--min-area", "-1"], ["--block-size", "0"], ["--actors", "0"],
                                  ["--batch-size", "0"], ["--tile-size", "-64"]])
def test_the_cli_refuses_bad_settings_before_reading_any_scene(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """The scene does not even exist: the setting is refused first, and no RUN_DIR is made."""
    out = tmp_path / "run"
    assert main(["run", "--scenes", str(tmp_path / "missing.tif"), "--out", str(out), *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "ConfigError" in err and args[0] in err and "missing.tif" not in err
    assert not out.exists()


def test_rerun_takes_the_execution_flags_and_checks_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rerun", str(tmp_path), "--actors", "0"]) == EXIT_BAD_INPUT
    assert "--actors" in capsys.readouterr().err
    assert main(["rerun", str(tmp_path), "--batch-size", "2", "--readers-per-actor", "1"]) == EXIT_BAD_INPUT
    assert "RunDirError" in capsys.readouterr().err  # the flags were accepted; the folder holds no run
