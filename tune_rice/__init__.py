"""tune-rice: hyperparameter search for frozen-backbone image classifiers.

The core (``data``, ``prepare``, ``model``, ``features``, ``engine``) runs without Ray;
``space``, ``trainable`` and ``search`` put it on Ray Tune.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits with code 2."""
