"""geoseg's one Ray bootstrap: its own local Ray whatever records of other clusters the machine holds, or the
cluster named, which must answer within seconds; token authentication on, credentials out of Ray's state."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _clusters import BIN, free_port, stop_processes_under

from geoseg.cluster import wait_for_cluster
from geoseg.errors import ClusterError, GeosegError

SECRET = "s3cr3t-only-in-the-environment"

STALE = """
import json, os, ray
from ray._private.services import canonicalize_bootstrap_address
recorded = canonicalize_bootstrap_address(None)  # the cluster a bare ray.init() would join: the stale record's
from geoseg.cluster import connect
connect(num_cpus=1)
@ray.remote
def worker_env():
    return os.environ.get("AWS_SECRET_ACCESS_KEY")
print(json.dumps({"recorded": recorded, "gcs": ray.get_runtime_context().gcs_address,
                  "worker_secret": ray.get(worker_env.remote()), "auth": os.environ.get("RAY_AUTH_MODE"),
                  "runtime_env": ray.get_runtime_context().runtime_env}))
"""


def clean_env(root: Path) -> dict[str, str]:
    """This process's environment with HOME and Ray's temp dir (RAY_TMPDIR) in ``root``, no cluster named, Ray's
    default authentication mode and no token but the one Ray makes in ``root``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    return env | {"HOME": str(root), "RAY_TMPDIR": str(root), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
def test_own_local_ray_despite_a_stale_cluster_record() -> None:
    """Ray's record of the last cluster (``ray_current_cluster``, ``session_latest``) names a dead one: a bare
    ``ray.init()`` would wait for it for minutes; geoseg starts a local Ray of its own, with token auth on (the
    token in HOME, here the test's dir), and its workers have the driver's credentials from their inherited
    environment while the runtime_env carries none."""
    root = Path(tempfile.mkdtemp(prefix="gs-stale-", dir="/tmp"))  # Ray's socket paths must stay short
    dead = free_port()
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
    (root / "ray" / "session_latest").symlink_to(root / "ray" / "session_of_a_dead_cluster")
    env = clean_env(root) | {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "eu-central-1"}
    try:
        done = subprocess.run([sys.executable, "-c", STALE], env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop_processes_under(root)
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen["recorded"].rsplit(":", 1)[1] == str(dead), "Ray did not read the record placed in RAY_TMPDIR"
        assert seen["gcs"].rsplit(":", 1)[1] != str(dead)
        assert len(list((root / "ray").glob("session_2*"))) == 1  # the new session, in the test's dir
        assert seen["auth"] == "token" and (root / ".ray" / "auth_token").is_file()
        assert seen["worker_secret"] == SECRET
        env_vars = seen["runtime_env"]["env_vars"]
        assert env_vars["AWS_REGION"] == "eu-central-1" and SECRET not in json.dumps(seen["runtime_env"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_an_address_that_does_not_answer_is_a_named_error() -> None:
    """Nothing listens on the port: a ClusterError naming the address, the wait and what to change."""
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=r"no Ray cluster answers at 127\.0\.0\.1:\d+ .*within 1 s") as info:
        wait_for_cluster(dead, wait_s=1)
    assert "--ray-address" in str(info.value) and isinstance(info.value, ConnectionError)
    with pytest.raises(ClusterError, match="not host:port"):
        wait_for_cluster("head-node-without-port")
    with socket.socket() as listening:  # an address that answers passes at once
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        wait_for_cluster(f"127.0.0.1:{listening.getsockname()[1]}", wait_s=1)
        wait_for_cluster(f"ray://127.0.0.1:{listening.getsockname()[1]}", wait_s=1)


@pytest.mark.slow
def test_run_against_a_dead_ray_address_fails_with_cluster_error(tmp_path: Path, data_dir: Path) -> None:
    """`geoseg run` with RAY_ADDRESS (as inside a Ray job) or --ray-address naming a dead cluster exits with the
    named error instead of hanging, and writes nothing."""
    scene = data_dir / "scenes" / "drone_webodm_orthophoto.tif"
    dead = f"127.0.0.1:{free_port()}"
    for flags, env in (([], {"RAY_ADDRESS": dead}), (["--ray-address", dead], {})):
        out = tmp_path / f"run{len(flags)}"
        done = subprocess.run([str(BIN / "geoseg"), "run", "--scenes", str(scene), "--out", str(out), *flags],
                              env=clean_env(tmp_path) | env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "ClusterError" in done.stderr and f"no Ray cluster answers at {dead}" in done.stderr
        assert not out.exists()
    assert issubclass(ClusterError, GeosegError)
