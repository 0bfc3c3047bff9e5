"""Screen variants of one training recipe on one short schedule: which change earns a full retrain.

    GEOSEG_DATA=../shared/data python bench/tries.py configs/aerial-rgb.toml --set epochs=8 --set steps_per_epoch=100 \
        --try base --try colour band_jitter=0.1 --try balance balance=1.0 \
        --try dice loss=cross-entropy+dice --try width width=48

Each try is a real `geoseg train --config FILE --set ...` run (its own process and Ray session, output in
runs/tries/<name>, resumed when rerun), so the epoch is picked on the recipe's validation items as always, and its
figures on the report items, per class, are the ones training stored in the checkpoint. Prints a table, then one
JSON object as the last line. A short schedule ranks changes; it does not give the figures of a full one, and one
seed per try puts differences of a few hundredths within the noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from geoseg.model.checkpoint import card_of, read_checkpoint
from geoseg.train import load_config


@dataclass
class Try:
    """One variant's outcome: the epoch its validation picked, and that epoch on the report items."""

    name: str
    changes: list[str]
    minutes: float
    epoch: int
    val_miou: float
    report_miou: float
    report_oa: float
    iou: dict[str, float]


def _score(name: str, changes: list[str], minutes: float, checkpoint: Path) -> Try:
    """The try's chosen epoch and its figures on the report items, per class, as training stored them."""
    raw = read_checkpoint(checkpoint)
    metrics = json.loads(raw["extra"]["metrics"])
    iou = {c.name: metrics[f"report_iou_{c.id}"] for c in card_of(raw, checkpoint).classes
           if f"report_iou_{c.id}" in metrics}
    return Try(name, changes, minutes, metrics["epoch"] + 1, metrics["val_miou"], metrics["report_miou"],
               metrics["report_oa"], iou)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                   help="settings every try shares (the short schedule)")
    p.add_argument("--try", dest="tries", action="append", nargs="+", required=True, metavar="NAME [KEY=VALUE ...]",
                   help="one variant: a name, then the keys it changes")
    args = p.parse_args()
    geoseg = Path(sys.executable).with_name("geoseg")
    rows = []
    for name, *changes in args.tries:
        out = Path("runs/tries") / name
        overrides = [*args.common, *changes, f'out="{out}"']
        t0 = time.perf_counter()
        cmd = [str(geoseg), "train", "--config", args.config, *(a for o in overrides for a in ("--set", o))]
        print(f"[tries] {name}: {' '.join(cmd)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "a") as log:
            subprocess.run(cmd, check=True, stdout=log)
        checkpoint = out / f"{load_config(args.config, overrides).name}.pt"
        row = _score(name, changes, (time.perf_counter() - t0) / 60, checkpoint)
        print(f"[tries] {json.dumps(asdict(row))}", flush=True)
        rows.append(row)
    classes = list(rows[0].iou)
    print(f"| try | changes | epoch | validation mIoU | report mIoU | report OA | {' | '.join(classes)} | minutes |")
    print("|---" * (7 + len(classes)) + "|")
    for r in rows:
        print(f"| {r.name} | {' '.join(r.changes) or '-'} | {r.epoch} | {r.val_miou:.3f} | {r.report_miou:.3f} | "
              f"{r.report_oa:.3f} | " + " | ".join(f"{r.iou.get(c, float('nan')):.3f}" for c in classes)
              + f" | {r.minutes:.1f} |")
    print(json.dumps([asdict(r) for r in rows]))


if __name__ == "__main__":
    main()
