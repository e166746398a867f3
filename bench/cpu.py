"""Where a benchmark's CPU goes: per process (and its children) and for the whole machine.

On a machine with a few cores, the broker, Redis and the load generator share them with the
workers; a throughput target is reachable only if every process's CPU per request, summed,
fits in the cores. `CpuMeter` takes two snapshots of /proc and says, per request, how much
CPU each named part spent between them and how busy the machine was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_cpu_s(path: Path) -> float:
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the command: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` and its threads; 0 once it is gone."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``'s main thread alone (a worker's event loop runs there)."""
    return _stat_cpu_s(Path(f"/proc/{pid}/task/{pid}/stat"))


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found = [pid]
    for parent in found:
        path = Path(f"/proc/{parent}/task/{parent}/children")
        try:
            found.extend(int(child) for child in path.read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def machine_busy_s() -> float:
    """CPU seconds all cores spent on anything but idle and I/O wait since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS_PER_S


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    parts: dict[str, float]
    machine_s: float
    main_threads: dict[str, float] = field(default_factory=dict)
    """Per tree part, its processes' main threads (within the part's figure)."""


@dataclass(frozen=True)
class CpuUse:
    """CPU between two snapshots, per request: microseconds by part and in all."""

    requests: int
    seconds: float
    us_per_request: dict[str, float]
    machine_us_per_request: float
    machine_busy: float
    """Busy fraction of all the machine's cores over the interval."""
    main_threads_us_per_request: dict[str, float] = field(default_factory=dict)
    """Of each tree part's figure, what its processes' main threads spent."""

    def as_dict(self) -> dict[str, object]:
        """For the benchmark's JSON."""
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "us_per_request": {k: round(v, 1) for k, v in self.us_per_request.items()},
            "machine_us_per_request": round(self.machine_us_per_request, 1),
            "machine_busy": round(self.machine_busy, 3),
            "main_threads_us_per_request": {
                k: round(v, 1) for k, v in self.main_threads_us_per_request.items()
            },
            "cores": os.cpu_count(),
        }


class CpuMeter:
    """Snapshots of named parts of a benchmark, each a process tree given by its root pid."""

    def __init__(
        self, trees: Mapping[str, int | None], processes: Mapping[str, int] | None = None
    ) -> None:
        """trees: parts measured with every process below them; processes: alone."""
        self._trees = {name: pid for name, pid in trees.items() if pid is not None}
        self._processes = dict(processes or {})

    def snapshot(self) -> CpuSnapshot:
        """Each part's CPU seconds so far, and the machine's."""
        # One walk per tree: both figures must be of the same processes.
        trees = {name: tree(root) for name, root in self._trees.items()}
        parts = {name: sum(map(process_cpu_s, pids)) for name, pids in trees.items()}
        parts.update({name: process_cpu_s(pid) for name, pid in self._processes.items()})
        main_threads = {name: sum(map(main_thread_cpu_s, pids)) for name, pids in trees.items()}
        return CpuSnapshot(
            at=time.perf_counter(), parts=parts, machine_s=machine_busy_s(),
            main_threads=main_threads,
        )  # fmt: skip

    @staticmethod
    def between(first: CpuSnapshot, last: CpuSnapshot, requests: int) -> CpuUse:
        """What each part spent from ``first`` to ``last``, per one of ``requests``.

        A process tree's children are summed as they are at each snapshot, so a part must
        have started all its processes before ``first``.
        """
        per = 1e6 / max(requests, 1)
        seconds = last.at - first.at
        spent = {name: (last.parts[name] - first.parts.get(name, 0.0)) * per for name in last.parts}
        machine = last.machine_s - first.machine_s
        spent["other"] = max(machine * per - sum(spent.values()), 0.0)
        main_threads = {
            name: (last.main_threads[name] - first.main_threads.get(name, 0.0)) * per
            for name in last.main_threads
        }
        return CpuUse(
            requests=requests,
            seconds=seconds,
            us_per_request=spent,
            machine_us_per_request=machine * per,
            machine_busy=machine / (seconds * (os.cpu_count() or 1)) if seconds > 0 else 0.0,
            main_threads_us_per_request=main_threads,
        )
