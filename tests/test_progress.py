"""Progress bars (progress.py): plain lines off a terminal, the counts and the note on the last."""

from __future__ import annotations

import io

from geoseg.progress import advance, bar


def test_off_a_terminal_progress_is_plain_lines_ending_with_the_counts() -> None:
    stream = io.StringIO()
    progress = bar(40, "tiles", "tile", stream=stream)
    for done in range(0, 41, 4):
        advance(progress, done, f"{done // 20} failed")
    progress.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) >= 2  # the first and the last line at least, never redrawn in place
    assert lines[-1].startswith("tiles: 100%") and "40/40" in lines[-1] and "2 failed" in lines[-1]


def test_disabled_progress_prints_nothing() -> None:
    stream = io.StringIO()
    progress = bar(5, "tiles", "tile", enabled=False, stream=stream)
    advance(progress, 5)
    progress.close()
    assert stream.getvalue() == ""
