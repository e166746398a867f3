"""The process supervisor: restarts crashed children, forwards shutdown, gives up on crash loops.

Child targets are top-level functions of this module so that `spawn` can import them; they
coordinate with the test through marker files in `tmp_path`.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pytest

from workers.supervisor import EXIT_FAILURE, EXIT_OK, Supervisor

SAFETY_EXIT_S = 20.0
"""A waiting child exits on its own after this long, so a broken test cannot hang."""


# --- child targets (run in spawned processes) ---------------------------------------------


def record_start(directory: str, index: int) -> int:
    """Append a line to the child's start log; return how many starts it has now."""
    path = Path(directory, f"starts-{index}")
    with path.open("a") as starts:
        starts.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


def finish_at_once(directory: str, index: int) -> None:
    record_start(directory, index)


def crash_once(directory: str, index: int) -> None:
    if record_start(directory, index) == 1:
        os._exit(3)


def killed_once(directory: str, index: int) -> None:
    if record_start(directory, index) == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def wait_for_sigterm(directory: str, index: int) -> None:
    """Run until SIGTERM, then exit 0 after leaving a `terminated-<index>` marker."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        Path(directory, f"terminated-{index}").touch()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    record_start(directory, index)
    Path(directory, f"started-{index}").touch()
    deadline = time.monotonic() + SAFETY_EXIT_S
    while time.monotonic() < deadline:
        time.sleep(0.02)
    sys.exit(5)


def starting_without_handlers(directory: str, index: int) -> None:
    """Like a child still importing torch: SIGTERM's default action, death by the signal."""
    record_start(directory, index)
    Path(directory, f"started-{index}").touch()
    time.sleep(SAFETY_EXIT_S)
    sys.exit(5)


def first_always_crashes(directory: str, index: int) -> None:
    if index == 0:
        record_start(directory, index)
        sys.exit(2)
    wait_for_sigterm(directory, index)


def ignore_sigterm(directory: str, index: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record_start(directory, index)
    Path(directory, f"started-{index}").touch()
    time.sleep(SAFETY_EXIT_S)


def exit_zero_if_sigint_ignored(directory: str, index: int) -> None:
    record_start(directory, index)
    sys.exit(0 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 4)


# --- helpers ------------------------------------------------------------------------------


def starts(directory: Path, index: int) -> int:
    path = directory / f"starts-{index}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def signal_when_started(
    directory: Path, indexes: range, signum: int, sent: threading.Event
) -> threading.Thread:
    """Send `signum` to this process once every child has left its `started-` marker."""

    def send() -> None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if all((directory / f"started-{index}").exists() for index in indexes):
                sent.set()
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)
        # Never signal after run() may have returned: the children's safety exit ends it.

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"procs": 0}, "procs"),
        ({"procs": True}, "procs"),
        ({"procs": 1, "restart_backoff_s": -1.0}, "restart_backoff_s"),
        ({"procs": 1, "restart_backoff_s": float("nan")}, "restart_backoff_s"),
        ({"procs": 1, "max_restarts_per_minute": -1}, "max_restarts_per_minute"),
        ({"procs": 1, "shutdown_timeout_s": float("inf")}, "shutdown_timeout_s"),
    ],
)
def test_constructor_rejects_bad_settings(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Supervisor(target=finish_at_once, **arguments)  # type: ignore[arg-type]


def test_constructor_rejects_a_target_spawn_cannot_pickle() -> None:
    def local_target(index: int) -> None:
        del index

    with pytest.raises(TypeError, match="picklable"):
        Supervisor(target=local_target, procs=1)


def test_run_refuses_to_start_outside_the_main_thread(tmp_path: Path) -> None:
    supervisor = Supervisor(target=functools.partial(finish_at_once, str(tmp_path)), procs=1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            supervisor.run()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "main thread" in str(errors[0])
    assert starts(tmp_path, 0) == 0


# --- behaviour ----------------------------------------------------------------------------


def test_children_that_finish_cleanly_are_not_restarted(tmp_path: Path) -> None:
    supervisor = Supervisor(target=functools.partial(finish_at_once, str(tmp_path)), procs=3)
    assert supervisor.run() == EXIT_OK
    assert [starts(tmp_path, index) for index in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("target", [crash_once, killed_once])
def test_a_crashed_child_is_restarted_after_the_backoff(
    tmp_path: Path, target: Callable[[str, int], None]
) -> None:
    supervisor = Supervisor(
        target=functools.partial(target, str(tmp_path)),
        procs=2,
        restart_backoff_s=0.2,
    )
    started = time.monotonic()
    assert supervisor.run() == EXIT_OK
    assert time.monotonic() - started >= 0.2
    assert [starts(tmp_path, index) for index in range(2)] == [2, 2]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_every_child_gracefully(tmp_path: Path, signum: int) -> None:
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    supervisor = Supervisor(
        target=functools.partial(wait_for_sigterm, str(tmp_path)),
        procs=3,
        shutdown_timeout_s=10.0,
    )
    sent = threading.Event()
    sender = signal_when_started(tmp_path, range(3), signum, sent)
    assert supervisor.run() == EXIT_OK
    stopped = time.monotonic()
    sender.join()
    assert sent.is_set()
    assert all((tmp_path / f"terminated-{index}").exists() for index in range(3))
    assert [starts(tmp_path, index) for index in range(3)] == [1, 1, 1]
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before
    assert time.monotonic() - stopped < 1.0


def test_children_leave_ctrl_c_to_the_supervisor(tmp_path: Path) -> None:
    # Ctrl-C reaches the whole process group; only the supervisor turns it into SIGTERM.
    supervisor = Supervisor(
        target=functools.partial(exit_zero_if_sigint_ignored, str(tmp_path)),
        procs=1,
        max_restarts_per_minute=0,
    )
    assert supervisor.run() == EXIT_OK


def test_stragglers_are_killed_after_the_shutdown_timeout(tmp_path: Path) -> None:
    supervisor = Supervisor(
        target=functools.partial(ignore_sigterm, str(tmp_path)),
        procs=2,
        shutdown_timeout_s=0.3,
    )
    sent = threading.Event()
    signal_when_started(tmp_path, range(2), signal.SIGTERM, sent)
    started = time.monotonic()
    assert supervisor.run() == EXIT_FAILURE  # killed children did not exit 0
    assert sent.is_set()
    assert time.monotonic() - started < SAFETY_EXIT_S / 2


def test_children_stopped_while_still_starting_are_a_clean_stop(tmp_path: Path) -> None:
    supervisor = Supervisor(
        target=functools.partial(starting_without_handlers, str(tmp_path)),
        procs=2,
        shutdown_timeout_s=10.0,
    )
    sent = threading.Event()
    signal_when_started(tmp_path, range(2), signal.SIGTERM, sent)
    assert supervisor.run() == EXIT_OK
    assert sent.is_set()
    assert starts(tmp_path, 0) == starts(tmp_path, 1) == 1


def test_a_child_that_always_crashes_makes_run_give_up(tmp_path: Path) -> None:
    supervisor = Supervisor(
        target=functools.partial(first_always_crashes, str(tmp_path)),
        procs=2,
        restart_backoff_s=0.01,
        max_restarts_per_minute=2,
        shutdown_timeout_s=10.0,
    )
    assert supervisor.run() == EXIT_FAILURE
    assert starts(tmp_path, 0) == 3  # the first run and two restarts
    assert (tmp_path / "terminated-1").exists()  # the healthy child was stopped gracefully
    assert starts(tmp_path, 1) == 1


def test_zero_restarts_allowed_gives_up_on_the_first_crash(tmp_path: Path) -> None:
    supervisor = Supervisor(
        target=functools.partial(crash_once, str(tmp_path)),
        procs=1,
        max_restarts_per_minute=0,
    )
    assert supervisor.run() == EXIT_FAILURE
    assert starts(tmp_path, 0) == 1
