"""tune-rice: hyperparameter search for frozen-backbone image classifiers.

One folder per stage of the flow (docs/architecture.md): ``data`` (images in, labels.csv out),
``features`` (frozen backbones and their banks), ``heads`` (training and choosing on banks),
``experiment`` (what a search leaves on disk), ``tools`` (predict, evaluate, explain, report, export) and
``search`` (Ray Tune). Only ``search`` imports Ray.

From Python: ``tune_rice.search(data=..., num_samples=30, **options)`` runs a search (the ``search``
package is callable) and ``tune_rice.load(path)`` loads its model (``tools/api.py``); both are imported
on first use, so ``import tune_rice`` stays light.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits with code 2."""


def __getattr__(name: str):
    if name == "search":
        import importlib

        return importlib.import_module(f"{__name__}.search")
    if name == "load":
        from .tools.api import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
