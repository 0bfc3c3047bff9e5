"""The ledger: done, failed and pending tiles survive a save and load; a done tile clears its failure."""

from __future__ import annotations

import json
from pathlib import Path

from geoseg.ledger import JOURNAL_DIR, LEDGER_FILE, flush_ledger, load_ledger, save_ledger
from geoseg.results import TileOutcome

TRUNCATED = TileOutcome(4, 0, 4, "tile", "SceneReadError", "truncated", 2)
BOOM = TileOutcome(601, 6, 1, "tile", "ValueError", "boom", 2)


def test_ledger_round_trip_and_rerun_selection(tmp_path: Path) -> None:
    ledger = load_ledger(str(tmp_path), 6)
    assert ledger.not_done() == [0, 1, 2, 3, 4, 5]
    ledger.mark_done(0)
    ledger.mark_done(3)
    ledger.mark_failed(TRUNCATED)
    ledger.mark_failed(TileOutcome(5, 0, 5, "infer", "RuntimeError", "boom", 2))
    ledger.mark_done(5)  # a later success clears the failure
    save_ledger(str(tmp_path), ledger)
    again = load_ledger(str(tmp_path), 6)
    assert again.done == {0, 3, 5}
    assert again.failed == {4: TRUNCATED}
    assert again.not_done() == [1, 2, 4]
    assert again.pending_count() == 2


def test_periodic_saves_write_only_the_tiles_changed_and_load_replays_them(tmp_path: Path) -> None:
    run_dir = str(tmp_path)
    ledger = load_ledger(run_dir, 1000)
    for i in range(600):
        ledger.mark_done(i)
    flush_ledger(run_dir, ledger)
    ledger.mark_done(600)
    ledger.mark_failed(BOOM)
    flush_ledger(run_dir, ledger)
    flush_ledger(run_dir, ledger)  # nothing changed: nothing written
    parts = sorted((tmp_path / JOURNAL_DIR).iterdir())
    assert len(parts) == 2 and not (tmp_path / LEDGER_FILE).exists()
    assert json.loads(parts[1].read_text()) == {"done": [600], "failed": {"601": vars(BOOM)}}
    again = load_ledger(run_dir, 1000)  # as after a crash: the journal alone
    assert again.done == set(range(601)) and again.failed == {601: BOOM}
    again.mark_done(601)
    flush_ledger(run_dir, again)  # continues the journal's numbering
    assert load_ledger(run_dir, 1000).done == set(range(602))
    save_ledger(run_dir, again)  # the end of a run folds the journal into ledger.json
    assert not (tmp_path / JOURNAL_DIR).exists()
    assert load_ledger(run_dir, 1000) == again
