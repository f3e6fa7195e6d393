"""``python -m tune_rice TOOL``: the same as the ``tune-rice`` command."""

import sys

from .cli import main

sys.exit(main())
