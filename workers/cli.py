"""``inferq-worker``: start N supervised worker processes (settings from ``INFERQ_*``)."""

from __future__ import annotations

import argparse
import sys

from workers.logging import configure_logging
from workers.process import run_worker_process
from workers.settings import WorkerSettings
from workers.supervisor import Supervisor

SUPERVISOR_GRACE_S = 10.0
"""How much longer than a worker's own shutdown bound the supervisor waits before SIGKILL."""


def default_procs() -> int:
    """One process per visible CUDA device, else one."""
    import torch

    return max(torch.cuda.device_count(), 1)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, then supervise the worker processes until SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="inferq-worker",
        description="Serve PyTorch models from Kafka. Every setting is an INFERQ_* variable "
        "(see README); the flags here only shape the process tree.",
    )
    parser.add_argument(
        "--procs", type=int, default=None, help="worker processes (default: GPUs, else 1)"
    )
    args = parser.parse_args(argv)
    settings = WorkerSettings()
    configure_logging(level=settings.log_level, json=settings.log_json)
    procs = args.procs if args.procs is not None else default_procs()
    supervisor = Supervisor(
        target=run_worker_process,
        procs=procs,
        shutdown_timeout_s=settings.shutdown_timeout_s + SUPERVISOR_GRACE_S,
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
