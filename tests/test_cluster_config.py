"""cluster.yaml is a valid Ray cluster-launcher config with the node roles, token auth and dashboard the README
describes."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema() -> None:
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on a schema violation
    nodes = raw["available_node_types"]
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in nodes["cpu_worker"]["resources"] and "GPU" not in nodes["head"]["resources"]
    # the head runs the driver only; the job's own demand starts every worker
    assert nodes["head"]["resources"]["CPU"] == 0
    assert all(node["min_workers"] == 0 for name, node in nodes.items() if name != "head")
    # the dashboard is reached through `ray dashboard`'s SSH tunnel, never on a public address
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("geoseg" in c for c in raw["setup_commands"])
