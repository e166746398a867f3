"""A local Redis Cluster: three (or more) of Debian's redis-servers on loopback ports, no replicas.

Each node is a `RedisServer` in a directory of its own, cluster-enabled, its cluster bus on a
port of its own. The first start joins them with ``redis-cli --cluster create`` and waits until
every node says ``cluster_state:ok``; a restart finds them joined already (``nodes.conf``).

Used by the Redis Cluster test's fixture on free ports, and by hand::

    python -m deploy.local.redis_cluster up|down|status

which runs nodes on ``INFERQ_STACK_REDIS_CLUSTER_PORTS`` (``7001,7002,7003``; buses 10000
above) under ``$INFERQ_STACK_DIR/redis-cluster`` (``.stack/redis-cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from deploy.local.processes import StackError, log, tail
from deploy.local.redis_server import RedisServer, ensure_debian_binary, ensure_redis_server

HASH_SLOTS = 16384
"""Every Redis Cluster has this many hash slots, spread over its primaries."""


class LocalRedisCluster:
    """Redis Cluster nodes under ``run_dir``: node ``i`` serves ``ports[i]``, its bus on
    ``bus_ports[i]``, and keeps its data and ``nodes.conf`` in ``run_dir/node-{port}``."""

    def __init__(
        self,
        *,
        run_dir: Path,
        ports: Sequence[int],
        bus_ports: Sequence[int],
        host: str = "127.0.0.1",
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        """ports, bus_ports: one client port and one cluster bus port per node (3 or more)."""
        if len(ports) < 3 or len(bus_ports) != len(ports):
            raise ValueError("a Redis Cluster needs 3 or more nodes, each with a bus port")
        if len(set(ports) | set(bus_ports)) != 2 * len(ports):
            raise ValueError(f"ports {list(ports)} and bus ports {list(bus_ports)} must differ")
        self.run_dir = run_dir
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.nodes = [
            RedisServer(
                run_dir=run_dir / f"node-{port}",
                host=host,
                port=port,
                start_timeout_s=start_timeout_s,
                stop_timeout_s=stop_timeout_s,
                cluster_bus_port=bus_port,
            )
            for port, bus_port in zip(ports, bus_ports, strict=True)
        ]

    @property
    def url(self) -> str:
        """A DSN of the first node: `INFERQ_REDIS__URL` with `INFERQ_REDIS__CLUSTER=true`."""
        return self.nodes[0].url

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of every node."""
        return [f"{node.host}:{node.port}" for node in self.nodes]

    def start(self) -> None:
        """Start every node, join them into one cluster on the first start, and wait until
        every node serves all slots (``cluster_state:ok``)."""
        redis_cli = ensure_redis_cli()
        ensure_redis_server()
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.start()  # waits for PING
            if self.info(self.nodes[0]).get("cluster_slots_assigned") != str(HASH_SLOTS):
                self._create(redis_cli)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after the stop timeout); data stays."""
        for node in self.nodes:
            node.stop()

    def info(self, node: RedisServer) -> dict[str, str]:
        """``CLUSTER INFO`` of ``node`` as a mapping; empty when it does not answer."""
        try:
            result = subprocess.run(
                [ensure_redis_cli(), "-h", node.host, "-p", str(node.port), "cluster", "info"],
                capture_output=True, text=True, timeout=5, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {}
        fields = (line.strip().split(":", 1) for line in result.stdout.splitlines())
        return {field[0]: field[1] for field in fields if len(field) == 2}

    def status(self) -> dict[str, str]:
        """A line per node: its pid and cluster state."""
        lines: dict[str, str] = {}
        for node in self.nodes:
            info = self.info(node) if node.process_id() is not None else {}
            state = info.get("cluster_state", "down")
            lines[f"{node.host}:{node.port}"] = f"{state} pid={node.process_id()}"
        return lines

    def _create(self, redis_cli: str) -> None:
        command = [redis_cli, "--cluster", "create", *self.addresses,
                   "--cluster-replicas", "0", "--cluster-yes"]  # fmt: skip
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=self.start_timeout_s, check=False
        )
        if result.returncode != 0:
            raise StackError(
                f"redis-cli --cluster create failed (exit {result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )

    def wait_ok(self) -> None:
        """Until every node serves all slots and knows every other (a node restarted alone
        rejoins by itself); StackError after the start timeout."""
        deadline = time.monotonic() + self.start_timeout_s
        waiting = list(self.nodes)
        while waiting:
            node = waiting[0]
            info = self.info(node)
            if info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(
                len(self.nodes)
            ):
                waiting.pop(0)
                continue
            if node.process_id() is None:
                raise StackError(f"redis-server {node.port} exited:\n{tail(node.log)}")
            if time.monotonic() >= deadline:
                raise StackError(
                    f"Redis Cluster node {node.port} not ok within {self.start_timeout_s:.0f}s: "
                    f"{info}\n{tail(node.log)}"
                )
            time.sleep(0.1)


def ensure_redis_cli() -> str:
    """The path of redis-cli (Debian's redis-tools, which redis-server depends on)."""
    return ensure_debian_binary("redis-cli", "redis-tools")


@contextlib.contextmanager
def running_redis_cluster(
    *, run_dir: Path, ports: Sequence[int], bus_ports: Sequence[int]
) -> Iterator[LocalRedisCluster]:
    """A started cluster, stopped on exit whatever happens inside."""
    cluster = LocalRedisCluster(run_dir=run_dir, ports=ports, bus_ports=bus_ports)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def cluster_from_env() -> LocalRedisCluster:
    """The hand-run cluster: ports from ``INFERQ_STACK_REDIS_CLUSTER_PORTS``."""
    env = os.environ
    ports = [
        int(p) for p in env.get("INFERQ_STACK_REDIS_CLUSTER_PORTS", "7001,7002,7003").split(",")
    ]
    run_dir = Path(env.get("INFERQ_STACK_DIR", ".stack")).resolve() / "redis-cluster"
    return LocalRedisCluster(run_dir=run_dir, ports=ports, bus_ports=[p + 10000 for p in ports])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.redis_cluster", description=__doc__
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    cluster = cluster_from_env()
    try:
        if args.command == "up":
            cluster.start()
            log(f"redis cluster up: {', '.join(cluster.addresses)}; INFERQ_REDIS__URL={cluster.url}"
                " INFERQ_REDIS__CLUSTER=true")  # fmt: skip
        elif args.command == "down":
            cluster.stop()
            log("redis cluster down")
        else:
            for address, line in cluster.status().items():
                print(f"{address}: {line}")
    except StackError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
