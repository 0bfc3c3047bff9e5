"""The ledger: done, failed and pending tiles survive a save and load; a done tile clears its failure."""

from __future__ import annotations

from pathlib import Path

from geoseg.ledger import Failure, load_ledger, save_ledger


def test_ledger_round_trip_and_rerun_selection(tmp_path: Path) -> None:
    ledger = load_ledger(str(tmp_path), 6)
    assert ledger.not_done() == [0, 1, 2, 3, 4, 5]
    ledger.mark_done(0)
    ledger.mark_done(3)
    ledger.mark_failed(4, Failure("tile", "SceneReadError: truncated", 2))
    ledger.mark_failed(5, Failure("infer", "boom", 2))
    ledger.mark_done(5)  # a later success clears the failure
    save_ledger(str(tmp_path), ledger)
    again = load_ledger(str(tmp_path), 6)
    assert again.done == {0, 3, 5}
    assert again.failed == {4: Failure("tile", "SceneReadError: truncated", 2)}
    assert again.not_done() == [1, 2, 4]
    assert again.pending_count() == 2
