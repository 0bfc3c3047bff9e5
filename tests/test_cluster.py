"""Actor sizing against the nodes a cluster has: every request fits on one node and leaves its readers room."""

from __future__ import annotations

import pytest

from geoseg.cluster import Node, cpu_actors, gpu_actors
from geoseg.config import ExecutionSettings
from geoseg.errors import ConfigError


def test_one_cpu_actor_per_node_sized_from_that_node() -> None:
    """A head without CPUs gets none; each worker's actor takes its CPUs less one reader's share, never the
    cluster's total (two 1-CPU workers: 0.75 each, where 1.5 from the total fitted on no node)."""
    nodes = [Node("head", 0.0, 0.0), Node("a", 1.0, 0.0), Node("b", 1.0, 0.0), Node("big", 16.0, 0.0)]
    shapes = cpu_actors(ExecutionSettings(), nodes)
    assert [(s.node_id, s.num_cpus, s.threads, s.readers) for s in shapes] == [
        ("a", 0.75, 1, 1), ("b", 0.75, 1, 1), ("big", 15.5, 16, 2)]
    for s in shapes:
        node = next(n for n in nodes if n.node_id == s.node_id)
        assert s.num_cpus + s.readers * ExecutionSettings().tile_cpus <= node.cpus and s.device == "cpu"


def test_explicit_actors_that_leave_no_reader_room_are_refused() -> None:
    nodes = [Node("n", 2.0, 0.0)]
    assert len(cpu_actors(ExecutionSettings(actors=1), nodes)) == 1
    with pytest.raises(ConfigError, match="leave no room for a tile reader"):
        cpu_actors(ExecutionSettings(actors=3), nodes)


def test_gpu_actors_take_one_gpu_and_one_cpu_and_bring_reader_demand() -> None:
    shapes = gpu_actors(ExecutionSettings(actors=2, device="cpu"), batches=10)
    assert [(s.num_gpus, s.num_cpus, s.device, s.readers) for s in shapes] == [(1, 1.0, "cpu", 16)] * 2
