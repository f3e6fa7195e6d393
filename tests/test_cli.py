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


def test_old_option_spellings_answer_with_the_new_name(capsys):
    from tune_rice.data import demo, prepare

    for parser in (demo.build_parser(), prepare._parser()):
        args = parser.parse_args(["somewhere", "--workers", "3"])
        assert args.num_workers == 3
        assert capsys.readouterr().err == "note: --workers is now --num-workers\n"
        assert parser.parse_args(["somewhere", "--num-workers", "2"]).num_workers == 2
        assert capsys.readouterr().err == ""
        assert "--num-workers" in parser.format_help() and "--workers" not in parser.format_help()


def test_names_sort_naturally_and_counts_agree():
    names = ["resnet152", "resnet18", "resnet101", "resnet50", "resnet34", "regnet_y_16gf", "regnet_y_1_6gf"]
    assert sorted(names, key=cli.natural_key) == [
        "regnet_y_1_6gf",
        "regnet_y_16gf",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
    ]
    assert [cli.counted(n, "family", "families") for n in (0, 1, 2)] == ["0 families", "1 family", "2 families"]


def test_a_reader_that_stops_early_gets_no_traceback():
    """``tune-rice backbones | head -1``: a tool whose reader closes the pipe stops quietly (exit 141)."""
    code = (
        "import sys; from tune_rice import cli; sys.exit(cli.run(lambda argv: [print('x' * 99) for _ in range(10**5)]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "x" * 99 + "\n"
    proc.stdout.close()  # 10 MB more to write: the next write meets the closed pipe
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait() == 141 and err == "", err
