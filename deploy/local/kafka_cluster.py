"""A local three-node KRaft cluster: each node a combined broker and controller on loopback
ports, topics replicated three times with ``min.insync.replicas`` 2, so one node can be
killed and nothing acknowledged is lost. For the fault suite; Redis comes from elsewhere.

The nodes run from the same cached jars as the local stack (`deploy.local.stack`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.broker_limits import BrokerLimits
from deploy.local.processes import (
    StackError,
    alive,
    free_ports,
    kafka_answers,
    read_pid,
    spawn,
    tail,
    terminate,
)
from deploy.local.stack import (
    default_cache_dir,
    ensure_kafka_jars,
    format_storage,
    kafka_java,
    new_cluster_id,
)

NODES = 3


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where the cluster runs: data, logs and pid files of node ``i`` under ``run_dir/node-i``."""

    run_dir: Path
    host: str = "127.0.0.1"
    nodes: int = NODES
    min_insync_replicas: int = 2
    broker_limits: BrokerLimits = field(default_factory=BrokerLimits)
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    cache_dir: Path = field(default_factory=default_cache_dir)


class KafkaCluster:
    """Starts, kills, restarts and stops the nodes of a local KRaft cluster."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        ports = free_ports(2 * config.nodes, config.host)
        self.broker_ports = ports[: config.nodes]
        self.controller_ports = ports[config.nodes :]
        self._cluster_id = new_cluster_id()
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def bootstrap_servers(self) -> str:
        """Every node's client listener, comma-separated."""
        return ",".join(f"{self.config.host}:{port}" for port in self.broker_ports)

    def node_id(self, index: int) -> int:
        return index + 1

    def _dir(self, index: int) -> Path:
        return self.config.run_dir / f"node-{self.node_id(index)}"

    def _pid_file(self, index: int) -> Path:
        return self._dir(index) / "kafka.pid"

    def process_id(self, node_id: int) -> int | None:
        """The pid of node ``node_id`` while it runs."""
        return read_pid(self._pid_file(node_id - 1))

    def up(self) -> None:
        """Format and start every node; wait until each answers."""
        libs = ensure_kafka_jars(self.config.cache_dir)
        try:
            for index in range(self.config.nodes):
                self._start(index, libs)
            for index in range(self.config.nodes):
                self._wait_ready(index)
        except BaseException:
            self.down()
            raise

    def kill(self, node_id: int) -> None:
        """SIGKILL node ``node_id`` (a crash) and reap it."""
        pid_file = self._pid_file(node_id - 1)
        pid = read_pid(pid_file)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.05)
        pid_file.unlink(missing_ok=True)

    def start(self, node_id: int) -> None:
        """Start node ``node_id`` again on its ports and data; wait until it answers."""
        self._start(node_id - 1, ensure_kafka_jars(self.config.cache_dir))
        self._wait_ready(node_id - 1)

    def down(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after the stop timeout)."""
        for index in range(self.config.nodes):
            terminate(self._pid_file(index), self.config.stop_timeout_s)
        for process in self._processes:
            process.wait()
        self._processes.clear()

    def _properties(self, index: int) -> str:
        c = self.config
        node = self.node_id(index)
        voters = ",".join(
            f"{self.node_id(i)}@{c.host}:{port}" for i, port in enumerate(self.controller_ports)
        )
        broker, controller = self.broker_ports[index], self.controller_ports[index]
        replicas = str(c.nodes)
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(node),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{c.host}:{broker},CONTROLLER://{c.host}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{c.host}:{broker}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self._dir(index) / "data"),
            "num.partitions": "4",
            "default.replication.factor": replicas,
            "min.insync.replicas": str(c.min_insync_replicas),
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": str(c.min_insync_replicas),
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": str(c.min_insync_replicas),
            "group.initial.rebalance.delay.ms": "0",
            # No unclean leader election: a replica that missed acknowledged writes never leads.
            "unclean.leader.election.enable": "false",
            **c.broker_limits.server_properties(),
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _start(self, index: int, libs: Path) -> None:
        if read_pid(self._pid_file(index)) is not None:
            return
        node_dir = self._dir(index)
        (node_dir / "data").mkdir(parents=True, exist_ok=True)
        properties = node_dir / "server.properties"
        properties.write_text(self._properties(index))
        java = kafka_java(self.config.broker_limits.jvm_options(), libs)
        if not (node_dir / "data" / "meta.properties").exists():
            format_storage(java, properties, self._cluster_id)
        command = [*java, "kafka.Kafka", str(properties)]
        self._processes.append(spawn(command, node_dir / "kafka.log", self._pid_file(index)))

    def _wait_ready(self, index: int) -> None:
        address = f"{self.config.host}:{self.broker_ports[index]}"
        log = self._dir(index) / "kafka.log"
        deadline = time.monotonic() + self.config.start_timeout_s
        while not kafka_answers(address, timeout_s=2):
            if read_pid(self._pid_file(index)) is None:
                raise StackError(f"kafka node {self.node_id(index)} exited:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise StackError(f"kafka node {self.node_id(index)} did not answer:\n{tail(log)}")
            time.sleep(0.3)
