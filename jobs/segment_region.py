"""Ray job entry: map a region. Takes the same arguments as `geoseg run`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/segment_region.py --scenes SCENE.tif --out RUN_DIR
"""

from __future__ import annotations

import sys

from geoseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
