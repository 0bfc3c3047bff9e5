"""Real multi-node Ray clusters on this one machine, for tests, each in a temp dir of its own.

Every node is a `ray start` process tree of its own (or, with the fake autoscaler, one its monitor
launches). Other people's Ray may run on the same machine, so no `ray stop`: every port is chosen
free, every process gets HOME set to the cluster's temp dir, and teardown stops exactly the
processes whose environment or command line names that dir, by pid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

BIN = Path(sys.executable).parent
NODE_OBJECT_STORE = 150 * 1024**2  # bytes per node (Ray's minimum is 75 MiB): several nodes fit in 24 GiB
HOST = "127.0.0.1"  # where clients reach the head (its GCS listens on every interface, its dashboard here only)


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on now and never handed out before in this process: the kernel may
    offer a just-closed port again, and `ray start` refuses two components on one port."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def head_command(root: Path, port: int, dashboard_port: int, num_cpus: int, *extra: str) -> list[str]:
    """`ray start --head` with its temp dir under ``root`` and every port it opens chosen free, so that
    another Ray on this machine cannot collide with it."""
    return [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
            f"--temp-dir={root / 'r'}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}", "--disable-usage-stats", *extra]


def ray_start(args: list[str], env: dict[str, str]) -> None:
    """Run a `ray start` command; its own output when it fails (it starts daemons and returns)."""
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args[:3])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"


def token_env(root: Path) -> dict[str, str]:
    """This process's environment for a cluster under ``root`` with token authentication on: a fresh
    token in ``root/.ray/auth_token`` (HOME is ``root``), read by every node, driver and client."""
    token = root / ".ray" / "auth_token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "HOME": str(root), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    return env


def _belongs_to(p: psutil.Process, root: str) -> bool:
    """A process of the cluster under ``root``: started with HOME there (Ray's workers and agents rename
    themselves, and the client server's command line names no dir), or naming the dir in its command line."""
    try:
        return p.environ().get("HOME") == root or any(root in part for part in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def processes_under(root: Path) -> list[psutil.Process]:
    """Every live process of the cluster under ``root``, with their children."""
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        if p.pid not in me and _belongs_to(p, str(root)):
            for q in (p, *p.children(recursive=True)):
                if q.pid not in me:
                    found[q.pid] = q
    return list(found.values())


def kill_all(procs: list[psutil.Process], timeout: float) -> None:
    """SIGKILL each process by its pid (one that already ended is skipped) and wait for them all."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def s2_scene(data_dir: Path) -> Path:
    """The real Sentinel-2 scene the end-to-end cluster tests map."""
    return data_dir / "sentinel2_strzegom" / "scenes" / "strzegom_20230530_33u.tif"


def stop_processes_under(root: Path) -> None:
    """Kill the cluster's processes by pid until none is left (a raylet may start a worker, or the
    autoscaler a node, while the others are being stopped); raise if any survives."""
    for _ in range(5):
        procs = processes_under(root)
        if not procs:
            return
        kill_all(procs, timeout=10)
    left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in processes_under(root)]
    if left:
        raise RuntimeError(f"processes of the cluster under {root} survived teardown: {left}")


@dataclass(frozen=True)
class LocalCluster:
    """A running cluster: its temp dir, the environment that reaches it, its GCS address."""

    root: Path
    env: dict[str, str]
    address: str

    def add_node(self, num_cpus: int) -> None:
        """Another node (its own raylet, object store and agents) joining the head."""
        ray_start([str(BIN / "ray"), "start", f"--address={self.address}", f"--num-cpus={num_cpus}",
                   f"--object-store-memory={NODE_OBJECT_STORE}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"], self.env)

    def query(self, code: str, timeout: float = 120) -> Any:
        """Run ``code`` in a driver connected to the cluster (``ray`` imported and initialised) and return
        what it prints as its last line, read as JSON: the state API is asked from outside this pytest
        process, which stays on its own session Ray."""
        script = f"import json, ray\nray.init(log_to_driver=False)\n{code}"
        # RAY_ADDRESS, not only ray.init's argument: the state API looks for the cluster again, and another
        # Ray on this machine would make that ambiguous
        done = subprocess.run([sys.executable, "-c", script], env={**self.env, "RAY_ADDRESS": self.address},
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


NODES = """
from ray.util.state import list_nodes
print(json.dumps([{"id": n.node_id, "head": n.is_head_node, "state": n.state, "resources": n.resources_total}
                  for n in list_nodes(detail=True, limit=1000)]))
"""
"""Every node the cluster has had, alive or dead, with its resources."""


def fake_autoscaler_config(port: int, worker_types: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A cluster-launcher config for Ray's fake multi-node provider (what its own autoscaler tests use): the
    autoscaler launches each node as local processes joining the GCS at ``port``. The head offers no CPUs."""
    return {
        "cluster_name": "geoseg-test", "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0, "idle_timeout_minutes": 5,  # launched nodes stay up until teardown
        "provider": {"type": "fake_multinode", "gcs_address": f"{HOST}:{port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, **t,
                      "resources": {"object_store_memory": NODE_OBJECT_STORE, **t["resources"]}}
               for name, t in worker_types.items()}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextmanager
def local_cluster(prefix: str, worker_types: dict[str, dict[str, Any]] | None = None) -> Iterator[LocalCluster]:
    """A head that offers no CPUs to tasks (the driver's node, as on cluster.yaml's head), token auth on;
    with ``worker_types``, Ray's fake autoscaler launches worker nodes of those types on demand. Stopped
    and removed on exit, checked to leave no process behind."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # Ray's socket paths must stay short
    env = token_env(root)
    port = free_port()
    extra: list[str] = []
    if worker_types is not None:
        config = root / "autoscaler.yaml"
        config.write_text(json.dumps(fake_autoscaler_config(port, worker_types)))  # JSON is YAML
        extra.append(f"--autoscaling-config={config}")
        env |= {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    try:
        ray_start(head_command(root, port, free_port(), 0, f"--object-store-memory={NODE_OBJECT_STORE}", *extra), env)
        yield LocalCluster(root, env, f"{HOST}:{port}")
    finally:
        stop_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)
