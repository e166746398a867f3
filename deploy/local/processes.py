"""Processes of the local stack: spawning, stopping, probing; shared by its services."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar


class StackError(RuntimeError):
    """The local stack could not be installed, started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports on ``host`` that nothing listens on right now."""
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))  # held open until all are chosen: no port twice
            ports.append(int(sock.getsockname()[1]))
        return ports


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    if not path.exists():
        return f"({path} does not exist)"
    content = path.read_text(errors="replace").splitlines()
    return "\n".join(content[-lines:])


def log(message: str) -> None:
    """A line of the stack's progress on stderr."""
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` while that process lives; None otherwise."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def spawn(command: list[str], log_file: Path, pid_file: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session, output appended to ``log_file``, pid written."""
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the caller's terminal must not reach it
        )
    pid_file.write_text(str(process.pid))
    return process


def terminate(pid_file: Path, timeout_s: float) -> None:
    """SIGTERM the process of ``pid_file``, SIGKILL it after ``timeout_s``; remove the file."""
    pid = read_pid(pid_file)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            log(f"pid {pid} ignored SIGTERM for {timeout_s:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


# --- readiness probes ---------------------------------------------------------------------


def redis_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether redis-server at host:port answers PING: PONG, or NOAUTH where ACLs are on."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def kafka_answers(bootstrap_servers: str, timeout_s: float = 5.0) -> bool:
    """Whether the broker answers a metadata request (through aiokafka's client)."""
    from aiokafka.client import AIOKafkaClient  # the project's venv has it
    from aiokafka.errors import KafkaError

    # Refused connections are the expected answer while the broker starts: keep them quiet.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    async def probe() -> bool:
        client = AIOKafkaClient(
            bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000)
        )
        try:
            await asyncio.wait_for(client.bootstrap(), timeout_s)
            return True
        except (KafkaError, OSError, TimeoutError):
            return False
        finally:
            await client.close()

    # A thread of its own, so that callers inside a running event loop can probe too.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, probe()).result()


class Startable(Protocol):
    """Something of the local stack that starts with `up` and stops with `down`."""

    def up(self) -> None: ...

    def down(self) -> None: ...


StartableT = TypeVar("StartableT", bound=Startable)


@contextlib.contextmanager
def running(stack: StartableT) -> Iterator[StartableT]:
    """``stack`` started, and stopped on exit whatever happens inside."""
    stack.up()
    try:
        yield stack
    finally:
        stack.down()
