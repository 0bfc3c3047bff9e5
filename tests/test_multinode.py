"""`geoseg run --ray-address` on real multi-node Ray clusters on this machine, token authentication on.

A head that offers no CPUs (the driver's node) and worker nodes that do the work: either nodes joined
up front, or nodes Ray's fake autoscaler launches because of the run's own demand, one type of them
declaring a GPU (no GPU exists: the run passes ``--device cpu``). Where the work ran is read from
Ray's state API, outside geoseg; the map must equal a single-node run of the same command.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from _clusters import BIN, NODES, LocalCluster, local_cluster, s2_scene

from geoseg.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")  # the single-node reference runs on the session's Ray

RUN_ARGS = ["--tile-size", "128", "--batch-size", "4"]  # 16 tiles of the 401 px scene; one batch size everywhere
RUN_TIMEOUT_S = 300  # a healthy run takes well under a minute here; a run whose actors fit no node waits forever

WORK = """
from ray.util.state import list_actors, list_tasks
print(json.dumps({
    "tasks": [{"name": t.name, "type": t.type, "state": t.state, "node": t.node_id}
              for t in list_tasks(detail=True, limit=10000) if t.type != "DRIVER_TASK"],
    "actors": [{"class": a.class_name, "node": a.node_id} for a in list_actors(detail=True, limit=10000)]}))
"""
"""Every task and actor the cluster ran, with its node, as Ray recorded it."""

FAKE_AUTOSCALER_TYPES = {"cpu_worker": {"resources": {"CPU": 1}, "max_workers": 2},
                         "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 1}}


@pytest.fixture(scope="module")
def single_node_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["run", "--scenes", str(s2_scene(data_dir)), "--out", str(out), *RUN_ARGS]) == 0
    return out


def geoseg_run(cluster: LocalCluster, data_dir: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """The `geoseg` command joining ``cluster`` as a client would: its own process, the cluster's token."""
    return subprocess.run([str(BIN / "geoseg"), "run", "--ray-address", cluster.address, "--scenes",
                           str(s2_scene(data_dir)), "--out", str(out), *RUN_ARGS, *flags],
                          env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def assert_same_map(run: Path, reference: Path) -> None:
    """Same class pixels, grid and tags (the run id tag aside: each plan draws its own, so the files' bytes cannot
    be equal), and the same confidence but for a last step of rounding at a few pixels: an actor on a 1-CPU
    worker node runs torch on one thread, the single node's on two, and the kernels sum in a thread-dependent
    order (sentinel2-lulc v3 puts one pixel's probability on a 1/255 rounding edge)."""
    for name in ("classes.tif", "confidence.tif"):
        with rasterio.open(run / name) as a, rasterio.open(reference / name) as b:
            assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, b.shape)
            ours, theirs = a.read(1).astype(np.int16), b.read(1).astype(np.int16)
            if name == "classes.tif":
                assert np.array_equal(ours, theirs), f"{name} differs from the single-node run's"
            else:
                off = np.abs(ours - theirs)
                assert off.max() <= 1 and (off > 0).sum() <= 10, f"{name}: {(off > 0).sum()} px off, up to {off.max()}"
            assert {**a.tags(), "GEOSEG_RUN_ID": ""} == {**b.tags(), "GEOSEG_RUN_ID": ""}


def check_run(done: subprocess.CompletedProcess[str], out: Path, reference: Path) -> dict[str, Any]:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["tiles_done"] == report["tiles_total"] == 16 and report["tiles_failed"] == 0
    assert_same_map(out, reference)
    return report


def where(work: dict[str, Any], workers: set[str]) -> tuple[set[str], set[str]]:
    """Nodes that ran the run's tasks and its inference actors, each checked to be a worker node."""
    tasks = [t for t in work["tasks"] if t["type"] == "NORMAL_TASK"]
    predictors = [a for a in work["actors"] if a["class"] == "Predictor"]
    assert tasks and all(t["state"] == "FINISHED" for t in tasks), tasks
    assert predictors, work["actors"]
    task_nodes, actor_nodes = {t["node"] for t in tasks}, {a["node"] for a in predictors}
    assert task_nodes | actor_nodes <= workers, "work ran on the head, which offers no CPUs"
    return task_nodes, actor_nodes


def check_reported_nodes(report: dict[str, Any], task_nodes: set[str], actor_nodes: set[str]) -> None:
    """The report's nodes by role agree with Ray's own record."""
    nodes = report["execution"]["nodes"]
    assert nodes["tile"] and set(nodes["tile"]) <= task_nodes
    assert nodes["infer"] and set(nodes["infer"]) <= actor_nodes


def test_run_on_worker_nodes_maps_like_a_single_node(single_node_run: Path, data_dir: Path, tmp_path: Path) -> None:
    """Two 1-CPU worker nodes and a head without CPUs: the run finishes, both workers do its work, and the
    map is the single-node run's."""
    with local_cluster("gs-mn-") as cluster:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        workers = {n["id"] for n in cluster.query(NODES) if not n["head"]}
        assert len(workers) == 2
        done = geoseg_run(cluster, data_dir, tmp_path / "run")
        work = cluster.query(WORK)
    report = check_run(done, tmp_path / "run", single_node_run)
    task_nodes, actor_nodes = where(work, workers)
    assert task_nodes | actor_nodes == workers, "a worker node did none of the run's work"
    check_reported_nodes(report, task_nodes, actor_nodes)


def test_fake_autoscaler_launches_nodes_for_pending_demand() -> None:
    """The harness itself, without geoseg: nothing but the head at first, then a GPU actor and a 1-CPU task
    make the autoscaler launch a node of each type; a client with another token is refused, and so is geoseg
    joining without any token (none in its HOME or environment), with a ClusterError that says where tokens go."""
    with local_cluster("gs-as-", FAKE_AUTOSCALER_TYPES) as cluster:
        assert [n["head"] for n in cluster.query(NODES)] == [True]
        intruder = subprocess.Popen([str(BIN / "python"), "-c", f"import ray; ray.init(address={cluster.address!r})"],
                                    env={**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)  # refused after ~20 s of retries
        (cluster.root / "stranger").mkdir()
        stranger_env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
        stranger = subprocess.Popen(
            [str(BIN / "python"), "-c", f"from geoseg.cluster import connect; connect({cluster.address!r})"],
            env={**stranger_env, "HOME": str(cluster.root / "stranger")}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        ran_on = cluster.query("""
@ray.remote(num_cpus=1, num_gpus=1)
class OnGpu:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()
@ray.remote(num_cpus=1)
def on_cpu() -> str:
    return ray.get_runtime_context().get_node_id()
gpu_user = OnGpu.remote()  # kept alive: it holds the GPU node's CPU, so the task needs a node of its own
print(json.dumps(ray.get([gpu_user.node.remote(), on_cpu.remote()])))
""", timeout=300)
        nodes = {n["id"]: n for n in cluster.query(NODES)}
        _, refusal = intruder.communicate(timeout=120)
        _, stranger_refusal = stranger.communicate(timeout=120)
    gpu_node, cpu_node = (nodes[i] for i in ran_on)
    assert not gpu_node["head"] and gpu_node["resources"]["GPU"] == 1
    assert not cpu_node["head"] and cpu_node["resources"]["CPU"] == 1 and "GPU" not in cpu_node["resources"]
    assert intruder.returncode != 0 and "InvalidAuthToken" in refusal
    assert stranger.returncode != 0 and "InvalidAuthToken" in stranger_refusal
    assert "ClusterError" in stranger_refusal and "RAY_AUTH_TOKEN_PATH" in stranger_refusal


def test_autoscaler_starts_gpu_and_cpu_nodes_for_the_run(single_node_run: Path, data_dir: Path,
                                                         tmp_path: Path) -> None:
    """The run starts on a head alone; its GPU actors and reader tasks are the demand that makes the autoscaler
    launch a GPU node and CPU nodes, and the run finishes on them with the single-node run's map."""
    with local_cluster("gs-as-", FAKE_AUTOSCALER_TYPES) as cluster:
        assert [n["head"] for n in cluster.query(NODES)] == [True]
        # fp32 as the single-node CPU run (GPU actors default to bf16, which makes another map by design)
        done = geoseg_run(cluster, data_dir, tmp_path / "run", "--gpu", "--device", "cpu", "--precision", "fp32")
        nodes = cluster.query(NODES)
        work = cluster.query(WORK)
    report = check_run(done, tmp_path / "run", single_node_run)
    gpu_nodes = {n["id"] for n in nodes if not n["head"] and n["resources"].get("GPU")}
    cpu_nodes = {n["id"] for n in nodes if not n["head"] and not n["resources"].get("GPU")}
    assert gpu_nodes and cpu_nodes, nodes
    task_nodes, actor_nodes = where(work, gpu_nodes | cpu_nodes)
    assert actor_nodes <= gpu_nodes, "an inference actor ran on a node without a GPU"
    check_reported_nodes(report, task_nodes, actor_nodes)
