"""What the benchmark reads from ``/proc`` about a process tree: peak memory by role and CPU time by role.

Ray names a worker process after what it runs (``ray::Predictor``, ``ray::run_tile``, ``ray::run_tiles``)
and the inference actor runs its forward pass on threads named ``gs-forward`` at the OS level (the OpenMP
workers torch starts from that thread inherit the name). So CPU can be split by role without touching the
workers: tile readers, the actor's forward pass, and the actor's host work (everything else it does).

CPU counters are cumulative, but threads and worker processes come and go, so a figure is a difference of
two *snapshots by time*: the sampler keeps every round of readings, and a snapshot at time T takes each
process's and thread's last reading at or before T (one that has ended keeps its last value). Readers are
counted per process from their first reading instead (:func:`reader_cpu_s`).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Self

import psutil

MIB = 2**20
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROLES = ("Predictor", "run_tile", "_ModelOnly")  # "run_tile" also matches the reader task "run_tiles"
FORWARD_THREAD = "gs-forward"
CPU_KINDS = ("reader", "actor", "forward")

Reading = dict[tuple[int, ...], tuple[str, float]]  # (pid,) or (pid, tid) -> (kind, CPU seconds)


def parse_stat(text: str) -> tuple[str, float]:
    """(comm, CPU seconds) from one ``/proc/PID[/task/TID]/stat`` line: utime + stime, fields 14 and 15.

    The comm (field 2) is in parentheses and may itself hold spaces or parentheses, so the fields are
    counted from the last closing parenthesis."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()  # fields[0] is field 3 (state)
    return head.partition("(")[2], (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a whole process, its ended threads included (raises OSError once it is gone)."""
    with open(f"/proc/{pid}/stat") as f:
        return parse_stat(f.read())[1]


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of a process: tid -> (comm, CPU seconds); threads that end while read are skipped."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out[int(tid)] = parse_stat(f.read())
        except OSError:
            continue
    return out


def read_cpu(pid: int, role: str) -> Reading:
    """One process's CPU readings by kind: a reader's whole process, or an actor's whole process and its
    forward-pass threads (named ``gs-forward``)."""
    if role == "run_tile":
        return {(pid,): ("reader", process_cpu_s(pid))}
    out: Reading = {(pid,): ("actor", process_cpu_s(pid))}
    for tid, (comm, seconds) in thread_cpu_s(pid).items():
        if comm.startswith(FORWARD_THREAD):
            out[(pid, tid)] = ("forward", seconds)
    return out


def cpu_at(rounds: list[tuple[float, Reading]], t: float) -> dict[str, float]:
    """CPU seconds by kind at time ``t`` (monotonic): each process's or thread's last reading at or before it."""
    last: Reading = {}
    for when, reading in rounds:
        if when > t:
            break
        last.update(reading)
    totals = dict.fromkeys(CPU_KINDS, 0.0)
    for kind, seconds in last.values():
        totals[kind] += seconds
    return totals


def actor_cpu_ms_per_output_mpx(start: dict[str, float], end: dict[str, float], output_mpx: float
                                ) -> dict[str, float]:
    """The inference actor's CPU ms per output Mpx between two snapshots: its host work (its process less its
    forward threads) and its forward pass."""
    forward = end["forward"] - start["forward"]
    host = end["actor"] - start["actor"] - forward
    return {"actor_host": round(1000 * host / output_mpx, 1), "forward": round(1000 * forward / output_mpx, 1)}


def reader_cpu_s(rounds: list[tuple[float, Reading]], until: float) -> float:
    """CPU seconds of tile readers at work until ``until``: each reader process's last reading at or before it
    less its first (what it spent starting up, before its first reading task, is left out).

    Readers run ahead of the actors by the driver's queue of read tiles, so their work does not line up with
    the tiles recorded done; it is counted over the whole tile stage instead."""
    first: dict[tuple[int, ...], float] = {}
    last: dict[tuple[int, ...], float] = {}
    for when, reading in rounds:
        if when > until:
            break
        for key, (kind, seconds) in reading.items():
            if kind == "reader":
                first.setdefault(key, seconds)
                last[key] = seconds
    return sum(last[k] - first[k] for k in last)


class Background:
    """Runs :meth:`_run` in a daemon thread while the context is open; on exit ``stop`` is set and the thread
    joined, and an error the thread met is raised there (not lost with the thread)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._guarded, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"the thread of {type(self).__name__} failed") from self.error


class PeakSampler(Background):
    """Peak memory and CPU readings of one process and of its Ray worker descendants by role, in a thread.

    A worker keeps its role while it idles between tasks (title ``ray::IDLE``). Peaks are the kernel-kept
    peak RSS (VmHWM) of each process as last read, so they do not depend on a sample landing on a short
    peak; the root's private memory has no such counter and is sampled. CPU readings of readers and
    inference actors are kept round by round (``rounds``) for :func:`cpu_at`.
    """

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.driver = 0.0
        self.driver_private = 0.0
        self.role_of: dict[int, str] = {}
        self.worker: dict[str, float] = {}
        self.rounds: list[tuple[float, Reading]] = []
        super().__init__()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.driver = max(self.driver, status_mib(self.root.pid, "VmHWM") * MIB)
                self.driver_private = max(self.driver_private, status_mib(self.root.pid, "RssAnon"))
                children = self.root.children(recursive=True)
            except psutil.Error:
                return
            reading: Reading = {}
            for p in children:
                try:
                    title = (p.cmdline() or [""])[0]
                    role = next((r for r in ROLES if title.startswith(f"ray::{r}")), None)
                    if role is None and title == "ray::IDLE":
                        role = self.role_of.get(p.pid)
                    if role is None:
                        self.role_of.pop(p.pid, None)  # a worker that ran other tasks since is no reader now
                        continue
                    peak = status_mib(p.pid, "VmHWM") * MIB  # the process's own exact peak, not a sample
                    if role != "_ModelOnly":
                        reading.update(read_cpu(p.pid, role))
                except (psutil.Error, OSError):
                    continue
                self.role_of[p.pid] = role
                self.worker[role] = max(self.worker.get(role, 0), peak)
            self.rounds.append((time.monotonic(), reading))
            self.stop.wait(self.interval_s)

    def peaks_mib(self) -> dict[str, Any]:
        """Root peak (resident, and private: its anonymous pages) and each worker role's peak (the largest
        process of that role), in MiB."""
        return {"driver": round(self.driver / MIB, 1), "driver_private": round(self.driver_private, 1),
                "workers": {r: round(v / MIB, 1) for r, v in sorted(self.worker.items())}}


def status_mib(pid: int | str, key: str) -> float:
    """One memory figure of ``/proc/PID/status`` in MiB (0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:")) / 1024
    except (OSError, StopIteration):
        return 0.0
