"""The search: Ray Tune, its trainable, the sharded extraction, the results and the summary.

``tune_rice.search(data=..., num_samples=30, **options)`` runs a search from Python (:func:`run.search`);
``python -m tune_rice.search`` is the search tool (``__main__.py``). The package imports nothing else until
it is called, so its Ray-free modules (``config``, ``tracking``) import without Ray.
"""

from __future__ import annotations

import sys
import types


class _SearchPackage(types.ModuleType):
    """This package, callable: ``tune_rice.search(...)`` is :func:`tune_rice.search.run.search`."""

    def __call__(self, *args, **options):
        from .run import search

        return search(*args, **options)


sys.modules[__name__].__class__ = _SearchPackage
