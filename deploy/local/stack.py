"""A local Kafka + Redis stack with no Docker: the real Apache Kafka broker and redis-server.

Kafka's jars are resolved from Maven Central by ``mvn`` into a cache outside the repository
(``~/.cache/inferq/kafka-{version}``), so only the first run downloads anything. Redis is
Debian's ``redis-server``, installed with apt when it is missing and we are root; it keeps an
append-only file in the run directory, so a restart of Redis alone keeps the cached results.

Used by the Makefile (``python -m deploy.local.stack up|down|status``) and by the test
fixtures, which start a private stack on free ports in a temporary directory.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from deploy.local.broker_limits import MIB, BrokerLimits, java_size_bytes
from deploy.local.processes import (
    StackError,
    alive,
    free_port,
    free_ports,
    kafka_answers,
    log,
    read_pid,
    redis_answers,
    running,
    spawn,
    tail,
    terminate,
)
from deploy.local.redis_server import RedisServer, ensure_debian_binary, ensure_redis_server

__all__ = [
    "KAFKA_VERSION",
    "BrokerLimits",
    "LocalStack",
    "RedisServer",
    "StackConfig",
    "StackError",
    "config_from_env",
    "ensure_kafka_jars",
    "ensure_redis_server",
    "free_port",
    "kafka_answers",
    "redis_answers",
    "running_stack",
]

KAFKA_VERSION = "4.3.1"
HERE = Path(__file__).resolve().parent
POM = HERE / "kafka" / "pom.xml"
LOG4J_CONFIG = HERE / "kafka" / "log4j2.properties"


def default_cache_dir() -> Path:
    """Where downloaded broker jars live; ``INFERQ_CACHE_DIR`` overrides it."""
    env = os.environ.get("INFERQ_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "inferq"


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    """Where the local stack runs.

    run_dir: data, logs and pid files. kafka_port: the client listener.
    controller_port: the KRaft controller listener. redis_port: redis-server's port.
    broker_limits: the broker's size limits, threads and the memory derived from them.
    kafka_heap: a larger `-Xmx` than the limits need (e.g. ``"1g"``); None: what they need.
    start_timeout_s: how long to wait for both services to answer.
    """

    run_dir: Path
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    controller_port: int = 9093
    redis_port: int = 6379
    broker_limits: BrokerLimits = field(default_factory=BrokerLimits)
    kafka_heap: str | None = None
    start_timeout_s: float = 90.0
    stop_timeout_s: float = 30.0
    cache_dir: Path = field(default_factory=default_cache_dir)

    @classmethod
    def on_free_ports(cls, run_dir: Path, **options: Any) -> Self:
        """A config under ``run_dir`` whose broker, controller and Redis ports are free now
        (a private stack beside any other); ``options`` set the other fields."""
        kafka_port, controller_port, redis_port = free_ports(3)
        return cls(
            run_dir=run_dir, kafka_port=kafka_port, controller_port=controller_port,
            redis_port=redis_port, **options,
        )  # fmt: skip

    def __post_init__(self) -> None:
        needed = self.broker_limits.heap_bytes
        if self.kafka_heap is not None and java_size_bytes(self.kafka_heap) < needed:
            raise ValueError(
                f"kafka_heap {self.kafka_heap!r} is below the {needed // MIB}m "
                "that the broker's request limits need"
            )

    @property
    def kafka_jvm_options(self) -> list[str]:
        """`java` options of the broker: its limits' memory, or the larger heap asked for."""
        options = self.broker_limits.jvm_options()
        if self.kafka_heap is not None:
            options[0] = f"-Xmx{self.kafka_heap}"
        return options

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"


# --- installation -------------------------------------------------------------------------


def ensure_kafka_jars(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """The directory of broker jars, resolved through Maven on the first call only."""
    libs = cache_dir / f"kafka-{version}" / "libs"
    marker = libs.parent / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise StackError("Maven (mvn) is needed to fetch the Kafka broker jars; install it.")
    if shutil.which("java") is None:
        raise StackError("Java 17 is needed to run the Kafka broker; install it.")
    log(f"resolving Apache Kafka {version} jars with Maven into {libs}")
    shutil.rmtree(libs, ignore_errors=True)
    libs.mkdir(parents=True)
    command = [
        "mvn", "-B", "-q", "-f", str(POM),
        f"-Dkafka.version={version}",
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not any(libs.glob(f"kafka_2.13-{version}.jar")):
        raise StackError(
            f"mvn could not resolve Kafka {version} (exit {result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    marker.touch()
    return libs


# --- one broker process ---------------------------------------------------------------------


def kafka_java(jvm_options: list[str], libs: Path) -> list[str]:
    """The `java` command line of Kafka's tools and broker, up to the main class."""
    return [
        "java", *jvm_options, "-Xms128m", "-XX:+UseG1GC",
        "-cp", f"{libs}/*", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
    ]  # fmt: skip


def new_cluster_id() -> str:
    """A fresh KRaft cluster id."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def format_storage(java: list[str], properties: Path, cluster_id: str, *options: str) -> None:
    """Format a node's log directories (kafka-storage format) for ``cluster_id``."""
    command = [
        *java, "kafka.tools.StorageTool", "format",
        f"--cluster-id={cluster_id}",  # an id may start with "-": not a separate word
        "--config", str(properties),
        *options,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(f"kafka-storage format failed:\n{result.stdout}\n{result.stderr}")


# --- the stack ----------------------------------------------------------------------------


class LocalStack:
    """Starts, probes and stops one Kafka broker and one redis-server under ``run_dir``."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.kafka_data = self.run_dir / "kafka-data"
        self.kafka_log = self.run_dir / "kafka.log"
        self.kafka_pid = self.run_dir / "kafka.pid"
        self.redis = RedisServer(
            run_dir=self.run_dir,
            host=config.host,
            port=config.redis_port,
            start_timeout_s=config.start_timeout_s,
            stop_timeout_s=config.stop_timeout_s,
        )
        self.redis_log = self.redis.log
        self.redis_pid = self.redis.pid_file
        # Handles of the broker processes this object started, reaped on down().
        self._processes: list[subprocess.Popen[bytes]] = []

    # public API

    def up(self) -> None:
        """Install what is missing, start both services and wait until they answer."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        libs = ensure_kafka_jars(self.config.cache_dir)
        ensure_redis_server()
        try:
            self.redis.spawn()
            self._start_kafka(libs)
            self._wait_ready()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop both services (SIGTERM, then SIGKILL after the stop timeout)."""
        terminate(self.kafka_pid, self.config.stop_timeout_s)
        self.redis.stop()
        for process in self._processes:
            process.wait()
        self._processes.clear()

    def restart_redis(self) -> None:
        """Stop redis-server alone and start it again; its append-only file keeps the data."""
        self.redis.restart()

    def status(self) -> dict[str, str]:
        """A line per service: its pid and whether it answers."""
        c = self.config
        kafka_pid, redis_pid = read_pid(self.kafka_pid), read_pid(self.redis_pid)
        kafka_ok = kafka_pid is not None and kafka_answers(c.bootstrap_servers, timeout_s=3)
        redis_ok = redis_pid is not None and redis_answers(c.host, c.redis_port)
        return {
            "kafka": f"{'up' if kafka_ok else 'down'} pid={kafka_pid} {c.bootstrap_servers}",
            "redis": f"{'up' if redis_ok else 'down'} pid={redis_pid} {c.redis_url}",
        }

    def kafka_process_id(self) -> int | None:
        """The broker's pid while it runs (tests kill it to check failure handling)."""
        return read_pid(self.kafka_pid)

    def kill_kafka(self) -> None:
        """SIGKILL the broker (a crash: no controlled shutdown) and reap it."""
        pid = read_pid(self.kafka_pid)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.05)
        self.kafka_pid.unlink(missing_ok=True)

    def start_kafka(self) -> None:
        """Start the broker again on the same ports and data, and wait until it answers."""
        self._start_kafka(ensure_kafka_jars(self.config.cache_dir))
        self._wait_ready()

    # internals

    def _start_kafka(self, libs: Path) -> None:
        if read_pid(self.kafka_pid) is not None:
            return
        properties = self.run_dir / "server.properties"
        properties.write_text(self._server_properties())
        java = kafka_java(self.config.kafka_jvm_options, libs)
        if not (self.kafka_data / "meta.properties").exists():
            self.kafka_data.mkdir(parents=True, exist_ok=True)
            format_storage(
                java, properties, new_cluster_id(), "--standalone", *self._format_options()
            )
        command = [*java, "kafka.Kafka", str(properties)]
        self._processes.append(spawn(command, self.kafka_log, self.kafka_pid))

    def _format_options(self) -> list[str]:
        """More options of `kafka-storage format` (SCRAM users, for the secure stack)."""
        return []

    def _server_properties(self) -> str:
        return "".join(f"{key}={value}\n" for key, value in self._server_settings().items())

    def _server_settings(self) -> dict[str, str]:
        c = self.config
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{c.host}:{c.controller_port}",
            "listeners": f"PLAINTEXT://{c.host}:{c.kafka_port},CONTROLLER://{c.host}:{c.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{c.host}:{c.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.kafka_data),
            "num.partitions": "4",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # A single-node test cluster: rebalance at once instead of waiting for members.
            "group.initial.rebalance.delay.ms": "0",
            # Request and record limits, and the threads the JVM's memory is sized for.
            **c.broker_limits.server_properties(),
        }
        return settings

    def _wait_ready(self) -> None:
        c = self.config
        deadline = time.monotonic() + c.start_timeout_s
        redis_ok = kafka_ok = False
        while time.monotonic() < deadline:
            for name, pid_file, log_file in (
                ("redis-server", self.redis_pid, self.redis_log),
                ("kafka", self.kafka_pid, self.kafka_log),
            ):
                if read_pid(pid_file) is None:
                    raise StackError(
                        f"{name} exited during start-up; last lines of {log_file}:\n"
                        f"{tail(log_file)}"
                    )
            redis_ok = redis_ok or redis_answers(c.host, c.redis_port)
            kafka_ok = kafka_ok or kafka_answers(c.bootstrap_servers, timeout_s=2)
            if redis_ok and kafka_ok:
                return
            time.sleep(0.3)
        failing = [n for n, ok in (("kafka", kafka_ok), ("redis", redis_ok)) if not ok]
        logs = "\n".join(
            f"--- {log_file}:\n{tail(log_file)}"
            for name, log_file in (("kafka", self.kafka_log), ("redis", self.redis_log))
            if name in failing
        )
        raise StackError(
            f"{', '.join(failing)} did not answer within {c.start_timeout_s:.0f}s\n{logs}"
        )


def running_stack(config: StackConfig) -> contextlib.AbstractContextManager[LocalStack]:
    """A started stack, stopped on exit whatever happens inside."""
    return running(LocalStack(config))


def config_from_env() -> StackConfig:
    """The Makefile's stack: ports and run directory from ``INFERQ_STACK_*`` variables."""
    env = os.environ
    return StackConfig(
        run_dir=Path(env.get("INFERQ_STACK_DIR", ".stack")).resolve(),
        kafka_port=int(env.get("INFERQ_STACK_KAFKA_PORT", "9092")),
        controller_port=int(env.get("INFERQ_STACK_CONTROLLER_PORT", "9093")),
        redis_port=int(env.get("INFERQ_STACK_REDIS_PORT", "6379")),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "install"])
    args = parser.parse_args(argv)
    config = config_from_env()
    stack = LocalStack(config)
    try:
        if args.command == "install":
            ensure_kafka_jars(config.cache_dir)
            ensure_redis_server()
            ensure_debian_binary("prometheus", "prometheus")  # the dashboard's test
        elif args.command == "up":
            started = time.monotonic()
            stack.up()
            log(
                f"up in {time.monotonic() - started:.1f}s: kafka {config.bootstrap_servers}, "
                f"redis {config.redis_url}, logs in {config.run_dir}"
            )
        elif args.command == "down":
            stack.down()
            log("down")
        else:
            for name, line in stack.status().items():
                print(f"{name}: {line}")
    except StackError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
