"""What the Ray cluster has and can have, and inference actors sized to fit it.

Every resource request fits on one node: a CPU actor is sized from the node it is meant for, never from
the cluster's total. Whether inference runs on GPUs comes from the user, or from what the cluster can
have (its autoscaler's node types), not from what happens to be up in the first second: on an
autoscaling cluster the job's pending GPU actors and reader tasks are the demand that starts nodes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import AuthenticationError
from ray.experimental import internal_kv

from geoseg import storage
from geoseg.config import GPU_READERS, ExecutionSettings
from geoseg.errors import ClusterError, ConfigError

AUTOSCALING_STATUS = "__autoscaling_status"  # where Ray's monitor publishes its report (ray_constants)
# a local Ray as geoseg starts it: idle workers live a minute (Ray's default: 1 s beyond one per CPU), so the
# stages after the tiles find the readers' workers warm instead of starting new ones (1-2 s per stage)
IDLE_WORKER_S = 60
# how long a named cluster's address may take to accept a connection (a head that is starting opens its port
# within seconds) before geoseg gives up with a ClusterError
CONNECT_WAIT_S = 10.0


def connect(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
            log_to_driver: bool = False, env_vars: dict[str, str] | None = None,
            setup_hook: str | None = None, temp_dir: str | None = None) -> None:
    """The one way geoseg starts or joins Ray: join ``address`` (or the cluster a Ray job runs in), else start
    a local Ray of its own, never one that a record in Ray's temp dir names. A Ray already up in this process
    is kept. Token authentication is Ray's default and stays on. Workers get the store's non-secret settings;
    credentials reach them through their own environment (a local Ray's workers inherit this process's)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env: dict[str, Any] = {"env_vars": {**storage.forwarded_env(), **(env_vars or {})}}
    if setup_hook:
        runtime_env["worker_process_setup_hook"] = setup_hook
    named = address or os.environ.get("RAY_ADDRESS")
    if not named or named == "local":
        # "local", never None: ray.init() without an address joins whatever /tmp/ray/ray_current_cluster names
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=runtime_env,
                 log_to_driver=log_to_driver, _temp_dir=temp_dir,
                 _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_S * 1000})
    else:
        wait_for_cluster(named)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        except (ConnectionError, AuthenticationError) as e:  # a missing or wrong token is refused so, after ~20 s
            reason = e.__cause__ if isinstance(e.__cause__, AuthenticationError) else e
            raise ClusterError(
                f"the Ray cluster at {named} refused this client: {str(reason).split('. ')[0]} (with token "
                "authentication, Ray's default, a client needs the cluster's token in ~/.ray/auth_token, the file "
                "RAY_AUTH_TOKEN_PATH names, or RAY_AUTH_TOKEN)") from e


def wait_for_cluster(address: str, wait_s: float = CONNECT_WAIT_S) -> None:
    """Fail fast with a :class:`ClusterError` when nothing listens at a cluster's address: Ray itself waits for
    a dead address for minutes without a word. ``auto`` (Ray's own lookup) is left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        if address == "auto":
            return
        raise ClusterError(f"Ray address {address!r} is not host:port (or ray://host:port): fix --ray-address or "
                           "RAY_ADDRESS, or leave both unset to run on a local Ray of geoseg's own")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, wait_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"no Ray cluster answers at {address} (no connection within {wait_s:g} s: {e}): start the "
                    "cluster or fix --ray-address / RAY_ADDRESS; leave both unset to run on a local Ray of "
                    "geoseg's own") from e
        time.sleep(0.5)


@dataclass(frozen=True)
class Node:
    """An alive node and what it offers to tasks."""

    node_id: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ActorShape:
    """One inference actor's Ray resources, torch threads, device and the reader tasks it gets in flight."""

    num_cpus: float
    num_gpus: int
    threads: int
    device: str
    readers: int
    node_id: str | None = None  # a CPU actor's node (soft affinity); GPU actors go wherever a GPU is


def this_node() -> str:
    """The id of the node this code runs on ("" outside Ray): which nodes did the work goes in the report."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def alive_nodes() -> list[Node]:
    """Nodes up now, with the CPUs and GPUs they offer to tasks."""
    return [Node(n["NodeID"], float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
            for n in ray.nodes() if n["Alive"]]


def max_gpus() -> int:
    """GPUs the cluster has now, or more where its autoscaler's configuration names GPU node types."""
    now = int(ray.cluster_resources().get("GPU", 0))
    try:  # the autoscaler's node types, read as Ray Train and Ray Data read them (not written by every Ray)
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler, or a Ray without this record: what is up is all that is known
        limits = {}
    return max(now, int(min(limits.get("GPU", 0), sys.maxsize)))


def autoscales() -> bool:
    """Whether an autoscaler with node types of its own watches the cluster, so pending demand starts nodes.

    Read from the monitor's status record: a cluster without an autoscaling config is watched through
    Ray's read-only provider, whose only node types are its nodes (``node_<id>``)."""
    status = internal_kv._internal_kv_get(AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") or {} if status else {}
    types = (report.get("node_type_mapping") or {}).values()
    return any(not t.startswith("node_") for t in types)


def uses_gpu(execution: ExecutionSettings) -> bool:
    """Whether inference runs on GPU actors: as asked (on an autoscaling cluster, waiting for GPU nodes),
    else when the cluster has GPUs or its autoscaler's configuration says it can have them."""
    if execution.use_gpu is not None:
        if execution.use_gpu and max_gpus() == 0 and not autoscales():
            raise ConfigError("--gpu is set but the Ray cluster has no GPUs and no autoscaler to start GPU nodes: "
                              "drop --gpu or add GPU workers")
        return execution.use_gpu
    return max_gpus() > 0


def gpu_actors(execution: ExecutionSettings, batches: int) -> list[ActorShape]:
    """One actor per GPU the cluster has or can have (no more than there are batches), one CPU each.

    Actors for GPUs not up yet stay pending: that demand is what makes an autoscaler start GPU nodes."""
    n = execution.actors or max(1, min(max_gpus(), batches))
    cpus = execution.actor_cpus or 1.0
    readers = execution.readers_per_actor or GPU_READERS
    return [ActorShape(cpus, 1, max(1, round(cpus)), execution.device or "cuda", readers) for _ in range(n)]


def cpu_actors(execution: ExecutionSettings, nodes: list[Node]) -> list[ActorShape]:
    """CPU actors for the nodes offering CPUs: by default one per node, taking its CPUs less the readers' share.

    Each node keeps room for its readers (``tile_cpus`` each), so reading never waits on inference."""
    shapes = []
    nodes = [n for n in nodes if n.cpus > 0]
    per_node = -(-execution.actors // max(1, len(nodes))) if execution.actors else 1
    for node in nodes:
        readers = execution.readers_per_actor or max(1, int(node.cpus // 8))
        room = node.cpus - readers * execution.tile_cpus
        cpus = execution.actor_cpus or (1.0 if execution.actors else room)
        if per_node * cpus > room or cpus <= 0:
            raise ConfigError(f"{per_node} inference actor(s) of {cpus:g} CPUs leave no room for a tile reader of "
                              f"{execution.tile_cpus:g} CPUs on a node of {node.cpus:g} CPUs: "
                              "lower --actors or actor_cpus")
        shapes += [ActorShape(cpus, 0, max(1, round(cpus)), execution.device or "cpu", readers, node.node_id)
                   for _ in range(per_node)]
    return shapes[:execution.actors] if execution.actors else shapes
