"""A small asyncio HTTP server: /metrics, /healthz (alive), /readyz (serving), /models."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from workers.repository import VersionStatus

log = structlog.get_logger(__name__)

READ_TIMEOUT_S = 5.0


class HealthServer:
    """Serves the worker's metrics and probes on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        is_ready: Callable[[], bool],
        host: str = "0.0.0.0",  # noqa: S104 - probes come from outside the pod
        port: int,
        models: Callable[[], Iterable[VersionStatus]] | None = None,
    ) -> None:
        """models: the model versions' states, served as JSON at /models."""
        self._models = models
        self._registry = registry
        self._is_ready = is_ready
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        if self._server is None:
            raise RuntimeError("health server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start answering."""
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("health_server_started", port=self.port)

    async def close(self) -> None:
        """Stop answering and close open connections."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            while (await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)) not in (b"\r\n", b""):
                pass  # headers are not needed
            parts = request_line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            status, content_type, body = self._route(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self._is_ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        if path == "/models" and self._models is not None:
            body = json.dumps({"models": [asdict(status) for status in self._models()]})
            return "200 OK", "application/json", body.encode() + b"\n"
        return "404 Not Found", "text/plain", b"not found\n"
