"""The umbrella command: its tool list, --version and the answer to a mistyped tool."""

from __future__ import annotations

import subprocess
import sys

import tune_rice
from tune_rice import cli


def test_version_is_the_package_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tune-rice {tune_rice.__version__}"


def test_a_mistyped_tool_is_one_error_line_with_the_closest_name(capsys):
    assert cli.main(["serach"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown tool 'serach'; did you mean search?"


def test_an_unrelated_tool_name_lists_the_tools(capsys):
    assert cli.main(["zzz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown tool 'zzz'; valid: search, prepare, ")
    assert all(tool in err for tool in cli.TOOLS)


def test_the_installed_command_answers_version():
    out = subprocess.run([sys.executable, "-m", "tune_rice.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"tune-rice {tune_rice.__version__}"
