"""Small helpers every benchmark shares: a results table, JSON output, peak memory (of this process
or of its whole process tree)."""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(name: str, rows: list[dict], title: str) -> Path:
    """Print `rows` as a table and write them to benchmarks/results/<name>.json."""
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*(f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()))
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))
    return out


class TreeMonitor:
    """Peak RSS (bytes) of this process (`driver`) and of its whole tree (`tree`: raylet, Ray
    workers), and the tree's CPU seconds (`cpu_s`), sampled in a thread every `interval` seconds.

    CPU seconds are the load-independent cost: on a shared machine wall time measures the
    neighbours as much as the pipeline. The sampling thread's own CPU time is not counted (it runs
    in this process, but it is the measurement, not the work). A process that exits between two
    samples loses its last interval: keep `interval` short where processes come and go (Ray actors
    are killed at the end of a job, idle by then).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.driver = self.tree = 0
        self._cpu: dict[int, float] = {}
        self._cpu0: dict[int, float] = {}
        self.names: dict[int, str] = {}  # pid -> command line (first seen), to split `cpu_by_pid`
        self._own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        try:
            procs = [me, *me.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    self._cpu[p.pid] = t.user + t.system
                    self._cpu0.setdefault(p.pid, self._cpu[p.pid])
                    if p.pid not in self.names:
                        self.names[p.pid] = " ".join(p.cmdline()) or p.name()
                except psutil.Error:
                    pass
            self.driver = max(self.driver, me.memory_info().rss)
            self.tree = max(self.tree, total)
        except psutil.Error:
            pass

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.is_set():
            self._sample()
            self._own_cpu = time.thread_time() - start
            self._stop.wait(self.interval)

    @property
    def cpu_by_pid(self) -> dict[int, float]:
        """CPU seconds of each process of the tree while monitored, this one's without the sampling."""
        me = os.getpid()
        return {p: self._cpu[p] - self._cpu0[p] - (self._own_cpu if p == me else 0.0) for p in self._cpu}

    @property
    def cpu_s(self) -> float:
        """CPU seconds used by the tree while monitored (processes already running count from start)."""
        return sum(self.cpu_by_pid.values())

    def __enter__(self) -> "TreeMonitor":
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self._cpu0[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the last interval too


def wait_for_actor_exit(title: str, timeout: float = 20.0) -> None:
    """Wait until no process of this tree has `title` (e.g. `ray::MapWorker`, an actor of a Ray Data stage) in its command line:
    a job's killed actors take a moment to exit, and their exit must not be counted in the next
    measured job (each job pays its own actors' start and exit, the same in every run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not any(title in " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)):
                return
        except psutil.Error:
            pass
        time.sleep(0.2)
