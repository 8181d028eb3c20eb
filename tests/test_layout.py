"""The layout rules: every method script imports from the project only data.py and eval.py, and
`diff BASE.py METHOD.py` shows the method and little else (a small diff that removes almost nothing)."""
import ast
import difflib
import os

import pytest

from tiny import ROOT

SCRIPTS = ["clip_base", "sep", "bridge", "geocons", "albef_fusion", "codis"]
# (base, method): (most changed lines, most removed base lines, most lines in the method file)
# (the line counts include each script's appendix: encoders, checkpoints, signals and the torchrun set-up)
DIFFS = {("clip_base", "sep"): (150, 8, 760), ("clip_base", "bridge"): (150, 8, 760),
         ("clip_base", "geocons"): (150, 8, 760), ("albef_fusion", "codis"): (200, 20, 1250)}


def lines(name):
    return open(os.path.join(ROOT, f"{name}.py")).read().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_imports_only_data_and_eval_from_the_project(script):
    names = set()
    for node in ast.walk(ast.parse("\n".join(lines(script)))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0] if node.level == 0 else ".")
    project = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert names & project <= {"data", "eval"}, names
    assert "." not in names


@pytest.mark.parametrize("base, method", list(DIFFS))
def test_diff_against_the_base_script_is_small(base, method):
    """Changed lines under the budget, and only a few base lines removed (the docstring title, the run commands,
    exp_name, the lines the method extends): the rest is a verbatim copy of the base script."""
    most_changed, most_removed, most_lines = DIFFS[base, method]
    diff = [d for d in difflib.unified_diff(lines(base), lines(method), lineterm="", n=0)
            if not d.startswith(("---", "+++", "@@"))]
    removed = [d for d in diff if d.startswith("-")]
    assert len(diff) < most_changed, len(diff)
    assert len(removed) <= most_removed, removed
    assert len(lines(method)) < most_lines
