"""Killing processes by their pid, found by what their command line shows them running (Ray names a worker after
its task or actor call: ``ray::run_tiles``, ``ray::Predictor.__call__``). Never by name across the machine
(pkill), never this process or its parents."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _procs import Background  # noqa: E402  (the base of the killers here and in the tests)


def cmdline(p: psutil.Process) -> str:
    """A process's command line, empty once it has ended (processes die under the tests all the time)."""
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def matching(marker: str, among: Iterable[psutil.Process] | None = None,
             exclude: Collection[int] = ()) -> list[psutil.Process]:
    """The live processes (of ``among``, else of the machine) whose command line contains ``marker``, but for
    the pids in ``exclude``, this process and its parents."""
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    return [p for p in (psutil.process_iter() if among is None else among)
            if p.pid not in me and p.pid not in exclude and marker in cmdline(p)]


def kill_matching(marker: str, among: Iterable[psutil.Process] | None = None, exclude: Collection[int] = (),
                  pick: Callable[[list[psutil.Process]], psutil.Process] = lambda found: found[0]) -> int | None:
    """SIGKILL, by its pid, one process that :func:`matching` finds (the first, or the one ``pick`` chooses);
    its pid, or None where none was found (or it ended first)."""
    found = matching(marker, among, exclude)
    if not found:
        return None
    pid: int = pick(found).pid
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return pid


class Killer(Background):
    """In a thread, kills by pid up to ``times`` processes whose command line shows them running ``marker``, each
    a new one (a replacement of one killed before), ``pause`` seconds apart at least (the driver sees each death
    before the next)."""

    def __init__(self, marker: str, times: int, pause: float = 0.3) -> None:
        super().__init__()
        self.marker, self.times, self.pause = marker, times, pause
        self.killed: list[int] = []

    def _run(self) -> None:
        while not self.stop.is_set() and len(self.killed) < self.times:
            pid = kill_matching(self.marker, exclude=self.killed)
            if pid is None:
                time.sleep(0.005)
            else:
                self.killed.append(pid)
                self.stop.wait(self.pause)
