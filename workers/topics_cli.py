"""`inferq-topics`: create or check the topics of the models in a repository.

    inferq-topics check     # exit 1 when a topic is missing or differs from the settings
    inferq-topics create    # create the missing ones (idempotent), then check

The models are the directories of `INFERQ_MODELS_DIR` (or `INFERQ_SERVED_MODELS`); partitions,
replication and retention come from `INFERQ_TOPIC_PARTITIONS`,
`INFERQ_TOPIC_REPLICATION_FACTOR` and `INFERQ_TOPIC_RETENTION_MS`. Existing topics are never
changed: a difference (drift) is reported for an operator to act on. From a checkout,
`python -m workers.topics_cli` is the same command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console
from rich.table import Table

from schemas.kafka import client_options
from schemas.names import is_model_name
from schemas.topics import TopicNames
from workers.settings import WorkerSettings
from workers.topics import create_missing, deployment_topics, inspect_topics

console = Console(width=None if sys.stdout.isatty() else 200)


def repository_models(root: Path) -> list[str]:
    """The model directories of a repository that hold a version (a decimal directory)."""
    if not root.is_dir():
        raise SystemExit(f"model repository {root} is not a directory")
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir()
        and is_model_name(entry.name)
        and any(child.is_dir() and child.name.isdigit() for child in entry.iterdir())
    )


async def run(command: str, settings: WorkerSettings) -> int:
    models = settings.served_model_names or repository_models(settings.models_dir)
    specs = deployment_topics(
        TopicNames(prefix=settings.kafka.topic_prefix),
        models,
        partitions=settings.topic_partitions,
        replication_factor=settings.topic_replication_factor,
        retention_ms=settings.topic_retention_ms,
    )
    admin = AIOKafkaAdminClient(
        **client_options(settings.kafka), client_id=f"{settings.kafka.client_id}-topics"
    )
    await admin.start()
    try:
        if command == "create":
            for name in await create_missing(admin, specs):
                console.print(f"created {name}")
        missing, drift = await inspect_topics(admin, specs)
    finally:
        await admin.close()
    table = Table("topic", "state", "wanted", "actual")
    for spec in missing:
        table.add_row(spec.name, "[red]missing[/red]", f"{spec.partitions} partitions", "")
    for difference in drift:
        table.add_row(difference.topic, f"[yellow]{difference.what}[/yellow]",
                      difference.wanted, difference.actual)  # fmt: skip
    ok = len(specs) - len(missing) - len({d.topic for d in drift})
    console.print(f"{len(specs)} topics of {len(models)} models: {ok} as wanted")
    if missing or drift:
        console.print(table)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; settings come from INFERQ_*."""
    parser = argparse.ArgumentParser(prog="inferq-topics", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["check", "create"])
    args = parser.parse_args(argv)
    return asyncio.run(run(args.command, WorkerSettings()))


if __name__ == "__main__":
    sys.exit(main())
