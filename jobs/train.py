"""Ray job entry: train a model. Takes the same arguments as `geoseg train`.

    ray job submit --working-dir . -- python jobs/train.py --config configs/sentinel2-lulc.toml [--gpus N]

Inside a Ray job RAY_ADDRESS points at the cluster and training joins it; run directly, it starts a local Ray.
"""

from __future__ import annotations

import sys

from geoseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
