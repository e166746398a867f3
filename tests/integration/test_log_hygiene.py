"""A worker's logs, at debug level, never carry tensor data or a request's payload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from producers.load import publish
from schemas.messages import InferenceRequest
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from tests.integration.kafka_helpers import bounded
from tests.integration.worker_harness import Deployment, spawn_worker_cli, stop_process

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

MARKER_VALUE = 4242.125  # exact in FP32; its text and its bytes must not reach a log
MARKER_TEXT = "PAYLOAD-MARKER-7f3a"


async def test_no_tensor_data_or_payload_reaches_the_logs(
    deployment: Deployment, tmp_path: Path
) -> None:
    row = np.full((1, 784), MARKER_VALUE, np.float32)
    good = [
        InferenceRequest(id=f"g{i}", model="mlp", inputs=(Tensor.from_numpy("input", row),))
        for i in range(50)
    ]
    wrong_shape = InferenceRequest(
        id="bad-shape", model="mlp", inputs=(Tensor.from_numpy("input", row[:, :3]),)
    )
    log_path = tmp_path / "worker.log"
    worker = spawn_worker_cli(deployment, log_path, "--procs", "1", INFERQ_LOG_LEVEL="debug")
    try:
        async with deployment.client() as client:
            await bounded(publish(client, [*good, wrong_shape]), what="publishing", timeout_s=120)
            producer = AIOKafkaProducer(bootstrap_servers=deployment.bootstrap)
            await producer.start()
            try:  # undecodable, and decodable with the marker where a model name goes
                topic = TopicNames(prefix=deployment.prefix).requests("mlp")
                await producer.send_and_wait(topic, MARKER_TEXT.encode() + b"\xc1")
                await producer.send_and_wait(topic, json.dumps(
                    {"id": "m1", "model": MARKER_TEXT + " bad", "inputs": []}).encode(),
                    headers=[("content-type", b"application/json")])  # fmt: skip
            finally:
                await producer.stop()
            await client.results([r.id for r in [*good, wrong_shape]], timeout_s=180)
    finally:
        assert stop_process(worker) == 0
    text = log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the worker logged nothing"
    for line in lines:
        json.loads(line)  # one JSON object per line, libraries included
    raw = log_path.read_bytes()
    assert np.float32(MARKER_VALUE).tobytes() not in raw
    for forbidden in (str(MARKER_VALUE), MARKER_TEXT):
        assert forbidden not in text, f"{forbidden!r} reached the log"
