"""Every command-line tool besides main.py answers bad input with one ``error:`` line on stderr and exit status 2,
never a traceback or a silent success (issue 26). Each case runs the tool's ``main`` in-process, as its
``__main__`` block does (``utils.cli.run_tool``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

from utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]


def tool(relative: str):
    """The module of a tool: a package module (``utils/...``) by name, a script (exps/...) by path."""
    if relative.startswith("utils/"):
        return importlib.import_module(relative[:-3].replace("/", "."))
    name = Path(relative).stem + "_under_test"
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


CASES = [  # (script or module, argv (tmp_path substituted for {tmp}), fragment of the error line)
    ("exps/demo_vit/summarize.py", ["{tmp}/nowhere"], "does not exist"),
    ("exps/demo_vit/summarize.py", ["{tmp}"], "no complete run"),
    ("exps/demo_vit/vote_ties.py", ["{tmp}/nowhere.json"], "nowhere.json does not exist"),
    ("exps/update_magnitude/run.py", ["--seeds", "-1", "--out", "{tmp}/um"], "seeds are integers"),
    ("exps/update_magnitude/run.py", ["--seeds", "3", "3", "--out", "{tmp}/um"], "distinct seeds"),
    ("exps/update_magnitude/run.py", ["--epochs", "0", "--out", "{tmp}/um"], "--epochs is 0"),
    ("exps/update_magnitude/run.py", ["--threshold", "2", "--out", "{tmp}/um"], "--threshold is 2"),
    ("exps/update_magnitude/run.py", ["--rewrite", "--out", "{tmp}/um"], "does not exist"),
    ("utils/config_docs.py", ["--write-readme", "{tmp}/nowhere/README.md"], "--write-readme"),
    ("utils/report.py", ["{tmp}/nowhere", "--out", "{tmp}/r"], "does not exist"),
]


@pytest.mark.parametrize("script,argv,fragment", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_tool_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, script, argv, fragment):
    module = tool(script)
    code = run_tool(module.main, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (code, err)
