"""Ray job entry point for training, e.g. `ray job submit --working-dir . -- python jobs/train.py --config configs/sentinel2-lulc.toml`.

Inside a Ray job RAY_ADDRESS points at the cluster and training joins it; run directly, it starts a local Ray.
"""

from __future__ import annotations

import argparse

from geoseg.train import train_from_config


def main(argv: list[str] | None = None) -> None:
    """Parse --config and train; prints the path of the written model."""
    parser = argparse.ArgumentParser(description="Train a geoseg land-cover model on Ray Train.")
    parser.add_argument("--config", required=True, help="training config TOML, e.g. configs/sentinel2-lulc.toml")
    parser.add_argument("--gpus", type=int, default=0, help="train on this many GPU workers instead of the config's CPU workers")
    args = parser.parse_args(argv)
    print(train_from_config(args.config, args.gpus))


if __name__ == "__main__":
    main()
