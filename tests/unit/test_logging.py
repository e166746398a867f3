"""Every log line of a worker process is one JSON object, libraries' lines included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, warnings
import torch  # torch installs its own handlers at import
from workers.logging import configure_logging
import structlog
configure_logging(level="info", json=True)
structlog.get_logger("inferq").info("ours", model="mlp")
logging.getLogger("aiokafka.consumer").error("Unable connect to node with id 1")
logging.getLogger("torch._dynamo").warning("a torch warning")
warnings.warn("a python warning", UserWarning)
"""


def test_structlog_stdlib_torch_and_warnings_all_log_json_lines() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2], check=True,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses
    events = {record["event"]: record for record in records}
    assert events["ours"]["model"] == "mlp"
    assert events["Unable connect to node with id 1"]["logger"] == "aiokafka.consumer"
    assert events["Unable connect to node with id 1"]["level"] == "error"
    assert events["a torch warning"]["logger"] == "torch._dynamo"
    assert any("a python warning" in record["event"] for record in records)
