"""``inferq-worker``: start N supervised worker processes (settings from ``INFERQ_*``).

The supervising process imports no torch: only the children serve (see `workers.child`).
"""

from __future__ import annotations

import argparse
import functools
import sys

from workers.child import group_instance_prefix, run_supervised_child, visible_gpu_count
from workers.logging import configure_logging
from workers.settings import WorkerSettings
from workers.supervisor import Supervisor

SUPERVISOR_GRACE_S = 10.0
"""How much longer than a worker's own shutdown bound the supervisor waits before SIGKILL."""


def default_procs() -> int:
    """One process per visible CUDA device, else one."""
    return max(visible_gpu_count(), 1)


def build_supervisor(settings: WorkerSettings, *, procs: int) -> Supervisor:
    """The supervisor of ``procs`` children serving with ``settings``' environment."""
    # Chosen here, once: a restarted child must come back under the same static member id.
    prefix = (
        group_instance_prefix(settings.group_instance_id) if settings.static_membership else None
    )
    return Supervisor(
        target=functools.partial(run_supervised_child, prefix),
        procs=procs,
        shutdown_timeout_s=settings.shutdown_timeout_s + SUPERVISOR_GRACE_S,
    )


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
    return build_supervisor(settings, procs=procs).run()


if __name__ == "__main__":
    sys.exit(main())
