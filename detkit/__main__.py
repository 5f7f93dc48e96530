"""``python -m detkit`` is the ``detkit`` command."""

import sys

from detkit.cli import main

sys.exit(main())
