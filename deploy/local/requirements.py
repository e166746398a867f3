"""Print the project's requirements from pyproject.toml, one per line, for ``pip install -r``.

    python deploy/local/requirements.py [EXTRA ...]

The cached virtual environment gets the dependencies only, never the project itself: every
command runs from its checkout (``python -m ...``), so one environment serves any number of
checkouts and none of them re-points it at itself.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def requirements(extras: list[str]) -> list[str]:
    """The core dependencies plus those of each named extra."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
