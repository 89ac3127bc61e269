"""`visual-rft --version` prints the installed package's version (issue 18, item 7)."""

import importlib.metadata

import pytest

from visual_rft.cli import main


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"visual-rft {importlib.metadata.version('visual-rft')}"
