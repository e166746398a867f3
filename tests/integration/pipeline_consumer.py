"""A pipeline stage as its own process: read results, record each id, then acknowledge it.

    python -m tests.integration.pipeline_consumer OUT_FILE MODEL GROUP

Settings come from INFERQ_* (as any producer's do). Each handled result's id is appended to
OUT_FILE (flushed) before it is acknowledged, so a SIGKILL can only lose acknowledgements,
never handled results: at-least-once.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from producers.settings import ProducerSettings
from producers.stream import ResultStream


async def main(out: Path, model: str, group: str) -> None:
    async with ResultStream(ProducerSettings(), models=[model], group_id=group) as stream:
        with out.open("a") as handled:
            async for delivery in stream:
                handled.write(delivery.result.id + "\n")
                handled.flush()
                delivery.ack()
                await asyncio.sleep(0.001)  # a stage that takes its time


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
