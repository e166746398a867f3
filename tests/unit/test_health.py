"""The metrics and probe endpoints answer like Prometheus and Kubernetes expect."""

from __future__ import annotations

import asyncio

from workers.health import HealthServer
from workers.metrics import Outcome, WorkerMetrics


async def get(port: int, path: str) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


async def test_metrics_and_probes() -> None:
    metrics = WorkerMetrics()
    metrics.answered_many({("mlp", "", Outcome.ERROR, "SHAPE_MISMATCH"): 1})
    ready = False
    server = HealthServer(
        registry=metrics.registry, is_ready=lambda: ready, host="127.0.0.1", port=0
    )
    await server.start()
    try:
        status, body = await get(server.port, "/metrics")
        assert status == "HTTP/1.1 200 OK"
        labels = b'code="SHAPE_MISMATCH",model="mlp",outcome="error",version=""'
        assert b"inferq_requests_total{" + labels + b"} 1.0" in body
        assert (await get(server.port, "/healthz"))[0] == "HTTP/1.1 200 OK"
        assert (await get(server.port, "/readyz"))[0] == "HTTP/1.1 503 Service Unavailable"
        ready = True
        assert (await get(server.port, "/readyz"))[0] == "HTTP/1.1 200 OK"
        assert (await get(server.port, "/nope"))[0] == "HTTP/1.1 404 Not Found"
    finally:
        await server.close()
