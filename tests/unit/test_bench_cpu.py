"""bench/cpu.py: CPU per request, per process tree and for the machine, from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from bench.cpu import CpuMeter, CpuSnapshot, process_cpu_s, tree


def spin(seconds: float) -> None:
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_a_process_cpu_grows_by_what_it_spent() -> None:
    before = process_cpu_s(os.getpid())
    spin(0.2)
    assert process_cpu_s(os.getpid()) - before >= 0.15


def test_a_tree_holds_the_children_and_a_gone_process_spent_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in tree(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert child.pid not in tree(os.getpid())
    assert process_cpu_s(child.pid) == 0.0


def test_between_gives_microseconds_per_request_and_the_rest_of_the_machine() -> None:
    first = CpuSnapshot(at=10.0, parts={"worker": 1.0, "kafka": 2.0}, machine_s=100.0)
    last = CpuSnapshot(at=12.0, parts={"worker": 1.5, "kafka": 2.1}, machine_s=101.0)
    use = CpuMeter.between(first, last, requests=10_000)
    assert use.us_per_request["worker"] == 50.0
    assert round(use.us_per_request["kafka"], 6) == 10.0
    assert round(use.us_per_request["other"], 6) == 40.0  # 100 in all, less the parts
    assert use.machine_us_per_request == 100.0
    assert use.machine_busy == 1.0 / (2.0 * (os.cpu_count() or 1))


def test_a_meter_measures_a_tree_and_a_lone_process() -> None:
    meter = CpuMeter({"me": os.getpid(), "absent": None}, {"alone": os.getpid()})
    first = meter.snapshot()
    spin(0.1)
    use = CpuMeter.between(first, meter.snapshot(), requests=1)
    assert set(use.us_per_request) == {"me", "alone", "other"}
    assert use.us_per_request["me"] >= 0.08e6
    assert use.us_per_request["alone"] >= 0.08e6


def test_the_main_thread_is_told_apart_from_the_others() -> None:
    worker = threading.Thread(target=spin, args=(0.2,))
    meter = CpuMeter({"me": os.getpid()})
    first = meter.snapshot()
    worker.start()
    worker.join()
    use = CpuMeter.between(first, meter.snapshot(), requests=1)
    assert use.us_per_request["me"] >= 0.15e6
    assert use.main_threads_us_per_request["me"] < use.us_per_request["me"] - 0.1e6
