"""What storage.py lets out of the driver and what it deletes: settings travel to Ray workers, credentials do not;
``--overwrite`` removes geoseg's own files from RUN_DIR and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from geoseg import storage

OURS = ["plan.json", "ledger.json", "ledger.d/part-1.json", "tiles.zarr/zarr.json", "predictions.zarr/zarr.json",
        "classes.tif", "classes.vrt", "classes/0_0.tif", "confidence.tif", "confidence.vrt", "confidence/0_0.tif",
        "landcover.gpkg", "report.json", "evaluation.json", ".plan.json.k3j2.tmp"]
THEIRS = ["notes.txt", "classes_2023.tif", "my_ledger.json", "landcover.gpkg.bak", "qgis/project.qgz",
          ".plan.json", "report.json.old"]


def test_remove_run_outputs_keeps_a_users_files(tmp_path: Path) -> None:
    """Every geoseg output (and a leftover temporary file of an atomic write) goes; files a user keeps beside
    them, even with similar names, stay with their content."""
    for name in OURS + THEIRS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    removed = storage.remove_run_outputs(str(tmp_path))
    for name in OURS:
        assert not (tmp_path / name).exists(), name
    for name in THEIRS:
        assert (tmp_path / name).read_text() == name
    assert sorted(Path(r).name for r in removed) == sorted({n.split("/")[0] for n in OURS})
    assert storage.remove_run_outputs(str(tmp_path / "never-made")) == []


def test_forwarded_env_carries_settings_never_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint, region and GDAL options reach workers through runtime_env (shown by Ray's dashboard and
    state API); keys, secrets, session tokens and GDAL's HTTP credentials never do."""
    settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_REGION": "us-east-1",
                "AWS_S3_ENDPOINT": "s3:9000", "AWS_VIRTUAL_HOSTING": "FALSE",
                "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "CPL_VSIL_CURL_USE_HEAD": "NO"}
    secrets = {"AWS_ACCESS_KEY_ID": "AKIA-test", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "sess",
               "AWS_SECURITY_TOKEN": "sec", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "ct", "GDAL_HTTP_USERPWD": "u:pw",
               "GDAL_HTTP_BEARER": "bearer", "GDAL_HTTP_HEADERS": "Authorization: Bearer x",
               "AWS_SHARED_CREDENTIALS_FILE": "/home/me/.aws/credentials"}
    for name, value in {**settings, **secrets}.items():
        monkeypatch.setenv(name, value)
    for env in (storage.forwarded_env(), storage.task_env()):
        assert {k: env[k] for k in settings} == settings
        assert not set(secrets) & set(env)
        assert not any(v in str(env) for v in secrets.values())
    assert storage.task_env()["GDAL_CACHEMAX"] == str(storage.GDAL_CACHE_MB)
