"""``python -m workers`` is ``inferq-worker``."""

import sys

from workers.cli import main

sys.exit(main())
