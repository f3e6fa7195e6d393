"""Shared command-line plumbing and the ``tune-rice`` umbrella command.

Every ``python -m tune_rice.<tool>`` entry point goes through :func:`run`, so that a :class:`UserError`
is one clear line on stderr with exit code 2 (never a traceback) and logging looks the same everywhere.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import UserError, __version__

TOOLS = {
    "search": "run a hyperparameter search (the main job)",
    "prepare": "read class folders, a CSV or a pre-split tree; write labels.csv with a leakage-safe split",
    "demo": "generate the synthetic rice-leaf dataset",
    "predict": "classify new images with a trained model",
    "explain": "show where a trained model finds its evidence (class activation maps)",
    "evaluate": "score a trained model on labelled images (a split, all of them, or another set)",
    "report": "write plots and tables for a finished search",
    "export": "export a trained model to TorchScript or ONNX",
    "backbones": "list the usable backbones and their weights (offline)",
}
# Where each tool's main() lives: the folders follow the flow (data, features, heads, experiment, tools, search).
TOOL_MODULES = {
    "search": "tune_rice.search.run",
    "prepare": "tune_rice.data.prepare",
    "demo": "tune_rice.data.demo",
    "predict": "tune_rice.tools.predict",
    "explain": "tune_rice.tools.explain",
    "evaluate": "tune_rice.tools.evaluate",
    "report": "tune_rice.tools.report",
    "export": "tune_rice.tools.export",
    "backbones": "tune_rice.features.backbones",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is a default worth showing and the help does not say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "default" in text
        ):
            return text
        return super()._get_help_string(action)


# ------------------------------------------------------------------ the options every tool spells alike
class _Renamed(argparse.Action):
    """An option's old spelling: stores into the new option and says the new name on stderr."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is now {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_num_workers_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    """``--num-workers N``, the one name of every tool's worker count; ``--workers`` (its old spelling in
    prepare and demo) still works and answers with the new name."""
    p.add_argument("--num-workers", type=int, default=None, metavar="N", help=help)
    add_old_spelling(p, "--workers", "--num-workers", type=int)


def add_old_spelling(p: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, **kwargs) -> None:
    """``old``, hidden from --help, sets what ``new`` sets and prints ``note: OLD is now NEW``."""
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=dest, action=_Renamed, new=new, help=argparse.SUPPRESS, **kwargs)


def add_force_arg(p: argparse.ArgumentParser, what: str = "the output") -> None:
    """``--force``: the one way to overwrite an existing output; without it a tool refuses."""
    p.add_argument("--force", action="store_true", help=f"overwrite {what} if it exists")


def refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    """The one overwrite policy: an existing output is replaced only with ``--force``."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise UserError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
            "pass --force to overwrite, or --out another file"
        )


def natural_key(name: str) -> tuple:
    """Sorts names as people read them: ``resnet18`` before ``resnet101``, ``vit_b_16`` before ``vit_b_32``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 family``, ``3 families``: a count with its noun agreeing."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; turn user errors and Ctrl-C into a message and an exit code."""
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tune-rice backbones | head`: the reader has gone, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, as the shell reports a command cut short by a closed pipe


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"tune-rice {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TOOLS:
        width = max(map(len, TOOLS))
        lines = [f"  {name:<{width}}  {text}" for name, text in TOOLS.items()]
        print(
            "usage: tune-rice TOOL [options]   (tune-rice TOOL --help for its options)\n\ntools:\n" + "\n".join(lines)
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: {unknown_tool(argv[0])}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(TOOL_MODULES[argv[0]])
    os.environ.setdefault("TUNE_RICE_PROG", f"tune-rice {argv[0]}")
    return module.main(argv[1:])


def unknown_tool(name: str) -> str:
    """The error for a tool name that is not one of :data:`TOOLS`, with the closest names if any."""
    close = difflib.get_close_matches(name, TOOLS, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid: {', '.join(TOOLS)}"
    return f"unknown tool {name!r}{hint}"


if __name__ == "__main__":
    sys.exit(main())
