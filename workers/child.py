"""What the supervisor knows of its children, without importing torch.

The supervising process only starts, watches and stops children; importing torch there would
cost hundreds of megabytes for nothing. So the children's entry point imports the serving code
inside the child, and GPUs are counted from the driver instead of through CUDA.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")
"""One entry per GPU the NVIDIA driver exposes to this machine or container."""
NVIDIA_SMI_TIMEOUT_S = 10.0

_LEADING_INTEGER = re.compile(r"[+-]?\d+")


def run_supervised_child(group_instance_prefix: str | None, index: int) -> None:
    """Entry point of child ``index``: serve with settings from the environment.

    group_instance_prefix: the static member id stem the supervisor chose, the same for every
        restart of this child; the child joins its group as ``{prefix}-{index}``.
    """
    from workers.process import run_worker_process  # torch is imported here, in the child

    run_worker_process(index, group_instance_prefix=group_instance_prefix)


def group_instance_prefix(configured: str | None) -> str:
    """The stem of the children's static member ids: ``configured``, else host and our pid."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"


def visible_gpu_count(
    *, environ: Mapping[str, str] | None = None, proc_gpus: Path = NVIDIA_PROC_GPUS
) -> int:
    """How many CUDA devices a child would see, as ``torch.cuda.device_count()`` counts them.

    The driver's GPUs (``/proc/driver/nvidia/gpus``, else ``nvidia-smi -L``), narrowed by
    ``CUDA_VISIBLE_DEVICES`` where it is set; 0 without an NVIDIA driver.
    """
    environ = os.environ if environ is None else environ
    installed = _installed_gpu_count(proc_gpus)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or installed == 0:
        return installed
    return min(_count_visible(visible, installed), installed)


def _count_visible(visible: str, installed: int) -> int:
    """Devices named by ``CUDA_VISIBLE_DEVICES``, parsed as CUDA (and torch) parse it."""
    entries = [entry.strip() for entry in visible.split(",")]
    if entries[0].startswith(("GPU-", "MIG-")):
        kind = entries[0][:4]
        uuids: list[str] = []
        for entry in entries:
            if entry in uuids:  # a repeated device hides every device
                return 0
            if not entry.startswith(kind):
                break
            uuids.append(entry)
        return len(uuids)
    ordinals: list[int] = []
    for entry in entries:
        number = _LEADING_INTEGER.match(entry)  # "1gpu" reads as 1, like strtoul
        ordinal = int(number.group()) if number else -1
        if ordinal in ordinals:
            return 0
        if ordinal < 0:  # "", "-1" or a word ends the list
            break
        ordinals.append(ordinal)
    # The list ends before the first ordinal past the installed devices.
    return next((i for i, ordinal in enumerate(ordinals) if ordinal >= installed), len(ordinals))


def _installed_gpu_count(proc_gpus: Path) -> int:
    try:
        return sum(1 for _ in proc_gpus.iterdir())
    except OSError:
        pass
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        listing = subprocess.run(
            [nvidia_smi, "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))
