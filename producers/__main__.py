"""``python -m producers`` is ``inferq-produce``."""

import sys

from producers.cli import main

sys.exit(main())
