"""``python -m tune_rice.search``: the search tool (``tune-rice search``)."""

import sys

from .run import main

sys.exit(main())
