"""The shipped Prometheus config, rules and Grafana dashboard, against a real Prometheus.

`promtool` checks the config and the rules; then a Prometheus scrapes a worker under load
(good and bad requests) every second, evaluates the rules, and every query of the dashboard
and every recording rule must return data: a query that returns nothing is a broken panel.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from deploy.local.stack import free_port
from producers.load import publish, random_requests
from schemas.messages import InferenceRequest
from schemas.tensors import Tensor
from tests.integration.worker_harness import Deployment, running_worker, wait_until_ready
from workers.health import HealthServer

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "inferq.yml"
DASHBOARD = DEPLOY / "grafana" / "inferq.json"


def promtool(*args: str) -> None:
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def recording_rules() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["record"] for group in groups for rule in group["rules"] if "record" in rule]


def query(port: int, expression: str) -> list[object]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as reply:
        answer = json.load(reply)
    assert answer["status"] == "success", answer
    result: list[object] = answer["data"]["result"]
    return result


async def has_data(port: int, expression: str) -> bool:
    return bool(await asyncio.to_thread(query, port, expression))


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:  # `make test` runs `stack install`, which installs it
        pytest.fail("prometheus is not installed: run python -m deploy.local.stack install")
    return found


@pytest.mark.timeout(300)
async def test_every_dashboard_query_and_recording_rule_returns_data(
    deployment: Deployment, tmp_path: Path, prometheus_binary: str
) -> None:
    promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    promtool("check", "rules", str(RULES))
    bad = [
        InferenceRequest(id=f"bad-{i}", model="mlp",
                         inputs=(Tensor.from_numpy("input", np.zeros((1, 3), np.float32)),))
        for i in range(30)
    ]  # fmt: skip
    async with running_worker(deployment, lag_interval_s=0.5) as running:
        await wait_until_ready(running)
        health = HealthServer(
            registry=running.metrics.registry, is_ready=lambda: running.worker.ready,
            host="127.0.0.1", port=0, models=running.repository.statuses,
        )  # fmt: skip
        await health.start()
        prometheus_port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "inferq-workers",
                                "static_configs": [{"targets": [f"127.0.0.1:{health.port}"]}]}],
        }  # fmt: skip
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("wb")
        server = subprocess.Popen(  # noqa: ASYNC220 - started here, stopped below
            [prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            async with deployment.client() as client:

                async def traffic() -> None:  # throughout, so every rate has samples
                    for second in range(60):
                        good = random_requests(model="mlp", count=300, input_name="input",
                                               row_shape=[784], seed=second)  # fmt: skip
                        batch = good + bad[second % len(bad) : second % len(bad) + 1]
                        await publish(client, batch)
                        await asyncio.sleep(0.5)

                sending = asyncio.create_task(traffic())
                try:
                    await asyncio.sleep(8)  # a few scrapes and rule evaluations
                    empty = [*dashboard_queries(), *recording_rules()]
                    for _ in range(30):  # rules evaluate on their own clock: give them time
                        empty = [e for e in empty if not await has_data(prometheus_port, e)]
                        if not empty:
                            break
                        await asyncio.sleep(1)
                finally:
                    sending.cancel()
            assert not empty, f"queries without data: {empty}"
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
            await health.close()
