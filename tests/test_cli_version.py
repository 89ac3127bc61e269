"""`visual-rft --version` prints the installed package's version; every argument has help text (issue 18, item 7)."""

import argparse
import importlib.metadata

import pytest

from visual_rft.cli import build_parser, main


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"visual-rft {importlib.metadata.version('visual-rft')}"


def _actions(parser, where="visual-rft"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _actions(child, f"{where} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield where, action


def test_every_argument_of_every_command_says_what_it_is():
    """Issue 18, item 7: tiny-model DIR / --seed, data fewshot --k / --seed, score INPUT OUTPUT and
    demo --out had no help text."""
    missing = [f"{where} {action.dest}" for where, action in _actions(build_parser()) if not action.help]
    assert missing == []


def test_tiny_model_draws_no_library_progress_bars(tmp_path):
    """Issue 18, item 7: transformers' "Writing model shards" bar cluttered `visual-rft tiny-model`."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "visual_rft.cli", "tiny-model", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Writing model shards" not in done.stderr and (tmp_path / "m" / "config.json").is_file()
