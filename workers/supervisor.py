"""Process supervisor: keeps N worker processes running and stops them together.

Children are started with the multiprocessing `spawn` context (forking a process that has
imported torch is unsafe). A child that exits non-zero or is killed by a signal is restarted
after `restart_backoff_s`; one that exits 0 on its own is not. SIGTERM or SIGINT to the
supervisor is forwarded to every child as SIGTERM; stragglers are killed after
`shutdown_timeout_s`, and a second signal kills them at once. Children ignore SIGINT, since a
terminal's Ctrl-C reaches the whole process group and the supervisor already forwards it.
SIGHUP is passed on to every child, which then scans its model repository (hot reload).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

EXIT_OK = 0
"""`Supervisor.run` result when every child's last run exited 0 (or, stopped while still
starting, died by the stop signal)."""
EXIT_FAILURE = 1
"""`Supervisor.run` result after a crash loop, or when a child's last run did not exit 0."""

_CLEAN_STOP_EXITS = frozenset({0, -signal.SIGTERM, -signal.SIGINT})
"""How children may end a stop cleanly: exit 0, or die by the stop signal itself, which only
a child still starting (its handlers not yet installed, nothing consumed) can do."""

_RESTART_WINDOW_S = 60.0
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RELOAD_SIGNAL = signal.SIGHUP
"""Passed on to every child: each scans its model repository at once."""

_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def _child_main(target: Callable[[int], None], index: int) -> None:
    """Entry point of a child process: leave Ctrl-C to the supervisor, then run the target.

    SIGHUP is ignored until the serving loop takes it over, so one that comes during start-up
    does not kill the child.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    target(index)


def _describe_exit(exitcode: int) -> str:
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        return f"signal {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"signal {-exitcode}"


@dataclass(eq=False, slots=True)
class _Slot:
    """One child index: its current process, pending restart and recent crash times."""

    index: int
    process: BaseProcess | None = None
    restart_at: float | None = None
    last_exitcode: int | None = None
    crashes: deque[float] = field(default_factory=deque)


class Supervisor:
    """Runs `procs` copies of `target` in child processes until they finish or a signal comes."""

    def __init__(
        self,
        *,
        target: Callable[[int], None],
        procs: int,
        restart_backoff_s: float = 1.0,
        max_restarts_per_minute: int = 10,
        shutdown_timeout_s: float = 30.0,
    ) -> None:
        """Configure the supervisor; nothing starts before `run`.

        target: picklable top-level function run in each child with the child's index
            (0 to procs - 1); returning (or `sys.exit(0)`) is a clean exit.
        procs: number of child processes, >= 1.
        restart_backoff_s: seconds between a child's crash and its restart.
        max_restarts_per_minute: restarts one child index may have in any 60 s; the crash
            after that makes `run` stop every child and return non-zero.
        shutdown_timeout_s: seconds children get to exit after SIGTERM before SIGKILL.
        """
        if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
            raise ValueError(f"procs must be an int >= 1, got {procs!r}")
        if not math.isfinite(restart_backoff_s) or restart_backoff_s < 0:
            raise ValueError(f"restart_backoff_s must be finite and >= 0, got {restart_backoff_s}")
        if (
            isinstance(max_restarts_per_minute, bool)
            or not isinstance(max_restarts_per_minute, int)
            or max_restarts_per_minute < 0
        ):
            raise ValueError(
                f"max_restarts_per_minute must be an int >= 0, got {max_restarts_per_minute!r}"
            )
        if not math.isfinite(shutdown_timeout_s) or shutdown_timeout_s < 0:
            raise ValueError(
                f"shutdown_timeout_s must be finite and >= 0, got {shutdown_timeout_s}"
            )
        if not callable(target):
            raise TypeError(f"target must be callable, got {target!r}")
        try:
            pickle.dumps(target)
        except Exception as exc:
            raise TypeError(
                f"target must be picklable (a top-level function) for spawn: {exc}"
            ) from exc
        self._target = target
        self._procs = procs
        self._restart_backoff_s = float(restart_backoff_s)
        self._max_restarts_per_minute = max_restarts_per_minute
        self._shutdown_timeout_s = float(shutdown_timeout_s)
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        """Start the children and block until all have exited; return the exit status.

        Must be called from the main thread: it installs SIGTERM, SIGINT and SIGHUP handlers for its
        duration and restores the previous ones before returning.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Supervisor.run must be called from the main thread")
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        received: list[int] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            del frame
            received.append(signum)
            # The main thread may sit in wait(); a byte on the pipe wakes it at once.
            with contextlib.suppress(BlockingIOError):
                os.write(wake_write, b"\0")

        previous: dict[signal.Signals, _SignalHandler] = {
            signum: signal.signal(signum, on_signal)
            for signum in (*_SHUTDOWN_SIGNALS, _RELOAD_SIGNAL)
        }
        slots = [_Slot(index=index) for index in range(self._procs)]
        try:
            return self._supervise(slots, wake_read, received)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            self._kill_all(slots)
            os.close(wake_read)
            os.close(wake_write)

    def _forward(self, slots: list[_Slot], signum: int) -> None:
        for slot in slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)

    def _supervise(self, slots: list[_Slot], wake_read: int, received: list[int]) -> int:
        stop_deadline: float | None = None
        killed = False
        gave_up = False
        for slot in slots:
            self._start(slot)
        while True:
            now = time.monotonic()
            while received:
                signum = received.pop(0)
                if signum == _RELOAD_SIGNAL:
                    self._forward(slots, signum)
                elif stop_deadline is None:
                    log.info("supervisor_stopping", signal=signal.Signals(signum).name)
                    stop_deadline = self._stop_all(slots, now)
                elif not killed:
                    log.warning("supervisor_killing_now", signal=signal.Signals(signum).name)
                    self._kill_all(slots)
                    killed = True
            for slot in slots:
                exitcode = self._reap(slot)
                if exitcode is None or stop_deadline is not None or exitcode == 0:
                    continue
                if self._crashed_too_often(slot, now):
                    log.error(
                        "worker_process_crash_loop",
                        index=slot.index,
                        max_restarts_per_minute=self._max_restarts_per_minute,
                    )
                    gave_up = True
                    stop_deadline = self._stop_all(slots, now)
                else:
                    slot.restart_at = now + self._restart_backoff_s
            if stop_deadline is None:
                for slot in slots:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        self._start(slot)
            elif not killed and now >= stop_deadline:
                stragglers = [slot.index for slot in slots if slot.process is not None]
                log.warning("worker_processes_killed", indexes=stragglers)
                self._kill_all(slots)
                killed = True
            if all(slot.process is None and slot.restart_at is None for slot in slots):
                break
            self._sleep(slots, wake_read, self._wake_at(slots, stop_deadline, killed))
        if gave_up:
            return EXIT_FAILURE
        clean = all(slot.last_exitcode in _CLEAN_STOP_EXITS for slot in slots)
        log.info("supervisor_stopped", clean=clean)
        return EXIT_OK if clean else EXIT_FAILURE

    def _start(self, slot: _Slot) -> None:
        process = self._context.Process(
            target=_child_main,
            args=(self._target, slot.index),
            name=f"inferq-worker-{slot.index}",
        )
        process.start()
        slot.process = process
        slot.restart_at = None
        log.info("worker_process_started", index=slot.index, pid=process.pid)

    def _reap(self, slot: _Slot) -> int | None:
        """Collect the slot's process if it has exited; return its exit code, else None."""
        process = slot.process
        if process is None:
            return None
        exitcode = process.exitcode
        if exitcode is None:
            return None
        process.join()
        process.close()
        slot.process = None
        slot.last_exitcode = exitcode
        if exitcode == 0:
            log.info("worker_process_finished", index=slot.index)
        else:
            log.warning(
                "worker_process_exited",
                index=slot.index,
                exitcode=exitcode,
                reason=_describe_exit(exitcode),
            )
        return exitcode

    def _crashed_too_often(self, slot: _Slot, now: float) -> bool:
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] <= now - _RESTART_WINDOW_S:
            slot.crashes.popleft()
        return len(slot.crashes) > self._max_restarts_per_minute

    def _stop_all(self, slots: list[_Slot], now: float) -> float:
        """Cancel pending restarts and SIGTERM every live child; return the kill deadline."""
        for slot in slots:
            slot.restart_at = None
            if slot.process is not None:
                slot.process.terminate()
        return now + self._shutdown_timeout_s

    def _kill_all(self, slots: list[_Slot]) -> None:
        for slot in slots:
            process = slot.process
            if process is None:
                continue
            if process.exitcode is None:
                process.kill()
            process.join()
            slot.last_exitcode = process.exitcode
            process.close()
            slot.process = None

    @staticmethod
    def _wake_at(slots: list[_Slot], stop_deadline: float | None, killed: bool) -> float | None:
        if stop_deadline is not None:
            return None if killed else stop_deadline
        restarts = [slot.restart_at for slot in slots if slot.restart_at is not None]
        return min(restarts) if restarts else None

    @staticmethod
    def _sleep(slots: list[_Slot], wake_read: int, wake_at: float | None) -> None:
        """Block until a child exits, a signal arrives or `wake_at` (monotonic) passes."""
        sentinels: list[int] = [slot.process.sentinel for slot in slots if slot.process is not None]
        timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
        wait([*sentinels, wake_read], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_read, 512):
                pass
