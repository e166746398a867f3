"""The local stack's pure parts: ports, properties, persistence, probes of nothing."""

from __future__ import annotations

from pathlib import Path

from deploy.local.stack import LocalStack, StackConfig, free_port, redis_answers


def test_server_properties_use_the_configured_ports(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(run_dir=tmp_path, kafka_port=1111, controller_port=2222))
    properties = stack._server_properties()
    assert "listeners=PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222\n" in properties
    assert f"log.dirs={tmp_path / 'kafka-data'}\n" in properties
    assert "process.roles=broker,controller\n" in properties


def test_redis_probe_says_no_when_nothing_listens() -> None:
    assert not redis_answers("127.0.0.1", free_port(), timeout_s=0.5)


def test_status_of_a_stack_that_never_ran(tmp_path: Path) -> None:
    status = LocalStack(StackConfig(run_dir=tmp_path, kafka_port=free_port())).status()
    assert status["kafka"].startswith("down")
    assert status["redis"].startswith("down")


# --- redis persistence --------------------------------------------------------------------


def test_redis_keeps_an_append_only_file_in_the_run_dir(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(run_dir=tmp_path, redis_port=1234))
    command = stack.redis.command("redis-server")
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--dir"] == str(tmp_path)
    assert options["--port"] == "1234"
    assert stack.redis.url == stack.config.redis_url
