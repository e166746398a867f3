"""``inferq-worker``: a supervisor without torch, GPUs counted from the driver, static ids."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from workers.child import group_instance_prefix, run_supervised_child, visible_gpu_count
from workers.cli import build_supervisor
from workers.process import child_settings
from workers.settings import WorkerSettings

REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_supervising_process_imports_neither_torch_nor_numpy() -> None:
    # A fresh interpreter runs the CLI up to the point where it would start the children.
    script = "\n".join(
        [
            "import sys",
            "import workers.supervisor",
            "workers.supervisor.Supervisor.run = lambda self: 0",
            "import workers.cli",
            "assert workers.cli.main([]) == 0",
            "print('torch' in sys.modules, 'numpy' in sys.modules)",
        ]
    )
    env = {**os.environ, "INFERQ_LOG_JSON": "true"}
    finished = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == ["False", "False"], "the supervisor imported torch/numpy"


# --- static member ids --------------------------------------------------------------------


def test_children_join_as_static_members_named_after_the_supervisor() -> None:
    settings = WorkerSettings(device="cpu", http_port=0)
    prefix = group_instance_prefix(settings.group_instance_id)
    assert prefix == f"{socket.gethostname()}-{os.getpid()}"
    ids = [
        child_settings(settings, index, group_instance_prefix=prefix).group_instance_id
        for index in range(3)
    ]
    assert ids == [f"{prefix}-0", f"{prefix}-1", f"{prefix}-2"]


def test_a_configured_instance_id_is_the_stem_of_every_child() -> None:
    settings = WorkerSettings(device="cpu", http_port=0, group_instance_id="pod-7")
    prefix = group_instance_prefix(settings.group_instance_id)
    assert prefix == "pod-7"
    assert child_settings(settings, 1, group_instance_prefix=prefix).group_instance_id == "pod-7-1"


def test_children_are_dynamic_members_when_static_membership_is_off() -> None:
    settings = WorkerSettings(device="cpu", http_port=0, static_membership=False)
    child = child_settings(settings, 0, group_instance_prefix=None)
    assert child.group_instance_id is None


def test_the_supervisor_passes_the_same_id_stem_to_every_start() -> None:
    settings = WorkerSettings(device="cpu", http_port=0, group_instance_id="pod-7")
    target = build_supervisor(settings, procs=2)._target  # pickled for each child's start
    assert isinstance(target, functools.partial)
    assert target.func is run_supervised_child
    assert target.args == ("pod-7",)


# --- counting GPUs without CUDA -----------------------------------------------------------


def fake_driver(tmp_path: Path, gpus: int) -> Path:
    directory = tmp_path / "gpus"
    directory.mkdir()
    for index in range(gpus):
        (directory / f"0000:{index:02x}:00.0").mkdir()
    return directory


@pytest.mark.parametrize(
    ("cuda_visible_devices", "expected"),
    [
        (None, 4),
        ("0,1", 2),
        ("3", 1),
        ("", 0),
        ("-1", 0),
        ("1,7,2", 1),  # CUDA stops at the first entry naming no device
        ("2,none,3", 1),
        ("0,1,0", 0),  # a repeated device hides every device
        ("GPU-8a1b,GPU-77c0", 2),
        ("MIG-1,MIG-2,GPU-3", 2),
        ("0,1,2,3,4,5", 4),
    ],
)
def test_gpus_are_counted_from_the_driver_narrowed_by_cuda_visible_devices(
    tmp_path: Path, cuda_visible_devices: str | None, expected: int
) -> None:
    environ = {} if cuda_visible_devices is None else {"CUDA_VISIBLE_DEVICES": cuda_visible_devices}
    assert visible_gpu_count(environ=environ, proc_gpus=fake_driver(tmp_path, 4)) == expected


def test_no_nvidia_driver_counts_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi either
    assert visible_gpu_count(environ={}, proc_gpus=tmp_path / "missing") == 0
    assert visible_gpu_count(environ={"CUDA_VISIBLE_DEVICES": "0"}, proc_gpus=tmp_path / "x") == 0
