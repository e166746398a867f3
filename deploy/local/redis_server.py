"""The local stack's redis-server, persistent across restarts (append-only file); also a node
of a local Redis Cluster (`deploy.local.redis_cluster`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.local.processes import (
    StackError,
    log,
    read_pid,
    redis_answers,
    spawn,
    tail,
    terminate,
)


def ensure_redis_server() -> str:
    """The path of redis-server, installing Debian's package when missing and root."""
    return ensure_debian_binary("redis-server", "redis-server")


def ensure_debian_binary(binary: str, package: str) -> str:
    """The path of ``binary``, installing Debian's ``package`` when missing and root."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise StackError(
            f"{binary} is not installed and we are not root: "
            f"run `sudo apt-get install -y {package}` and try again."
        )
    log(f"installing {package} from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise StackError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    found = shutil.which(binary)
    if not found:
        raise StackError(f"apt-get installed {package} but {binary} is not on PATH")
    return found


class RedisServer:
    """One redis-server under ``run_dir`` that keeps its data in an append-only file.

    Every write reaches the file within a second (``appendfsync everysec``) and SIGTERM flushes
    it, so a restart keeps the results cached before it. Used by `LocalStack`, and alone by tests
    that restart Redis without touching anyone else's. With ``cluster_bus_port`` it is a node of
    a Redis Cluster: cluster-enabled, its bus on that port, its cluster state in ``nodes.conf``.
    """

    def __init__(
        self,
        *,
        run_dir: Path,
        host: str = "127.0.0.1",
        port: int = 6379,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 30.0,
        cluster_bus_port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.run_dir = run_dir
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.cluster_bus_port = cluster_bus_port
        self.extra_args = list(extra_args)  # more config directives (ACL users, TLS)
        self.log = run_dir / "redis.log"
        self.pid_file = run_dir / "redis.pid"
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self, redis_server: str) -> list[str]:
        """The redis-server command line: loopback only, AOF persistence, data in run_dir."""
        cluster: list[str] = []
        if self.cluster_bus_port is not None:
            cluster = [
                "--cluster-enabled", "yes",
                "--cluster-port", str(self.cluster_bus_port),  # not port + 10000: may be taken
                "--cluster-config-file", "nodes.conf",  # in --dir
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
        return [
            redis_server,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.run_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",  # the append-only file is the persistence; no RDB snapshots
            "--protected-mode", "yes",
            "--daemonize", "no",
            *cluster,
            *self.extra_args,
        ]  # fmt: skip

    def spawn(self) -> None:
        """Start redis-server unless it already runs; does not wait for it to answer."""
        if self.process_id() is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        command = self.command(ensure_redis_server())
        self._processes.append(spawn(command, self.log, self.pid_file))

    def start(self) -> None:
        """Start redis-server unless it already runs, and wait until it answers PING.

        It answers once it has loaded its append-only file: everything written before a stop
        is there again.
        """
        self.spawn()
        deadline = time.monotonic() + self.start_timeout_s
        while not redis_answers(self.host, self.port):
            if self.process_id() is None:
                raise StackError(f"redis-server exited during start-up:\n{tail(self.log)}")
            if time.monotonic() >= deadline:
                raise StackError(
                    f"redis-server did not answer within {self.start_timeout_s:.0f}s:\n"
                    f"{tail(self.log)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (redis-server flushes its append-only file and exits), SIGKILL if it hangs."""
        terminate(self.pid_file, self.stop_timeout_s)
        for process in self._processes:
            process.wait()
        self._processes.clear()

    def restart(self) -> None:
        """Stop and start again, on the same port and data."""
        self.stop()
        self.start()

    def process_id(self) -> int | None:
        """redis-server's pid while it runs."""
        return read_pid(self.pid_file)
