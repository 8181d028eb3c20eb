"""course/: blanking by `ast`, student copies without a solution anywhere, and the proof that the graders work: the
blank copy scores zero with NotImplementedError reasons, the copy filled with the reference gets full marks, and
every plausible wrong answer of course/mutants.py fails its grader (a mutation test, graded in-process; one
student copy per assignment is shared by its mutants)."""
import ast
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from course.assignments import ASSIGNMENTS
from course.grade import LEARNING_ROW, full_marks, grade
from course.graders import CHECKS, LEARNING
from course.loader import Copy
from course.make_assignment import (ROOT, blank_source, comments_by_line, find_function, function_lines,
                                    make_assignment, splice_function)
from course.mutants import MUTANTS, filled_copy, kill, mutate
from tiny import ONE_THREAD

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def reference():
    return Copy(ROOT, "reference")


_COPIES = {}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """copies(key, kind) -> (folder, plan): the blank student copy, or the same copy filled with the reference;
    written once per module."""
    def get(key, kind):
        if (key, kind) not in _COPIES:
            folder = tmp_path_factory.mktemp(f"{key}-{kind}")
            plan = filled_copy(key, folder) if kind == "filled" else make_assignment([key], folder, force=True)
            _COPIES[key, kind] = folder, plan, Copy(folder, f"{kind}{key}")
        return _COPIES[key, kind]
    yield get
    _COPIES.clear()


# ------------------------------------------------------------------------------------------------------------
# the definitions hang together
# ------------------------------------------------------------------------------------------------------------
def test_every_assignment_has_functions_checks_learning_and_eight_mutants():
    assert len(ASSIGNMENTS) >= 6
    scripts = {a.learning for a in ASSIGNMENTS.values()}
    assert {"clip_base", "sep", "bridge", "geocons", "albef_fusion", "codis"} <= scripts   # one per method
    for key, a in ASSIGNMENTS.items():
        assert a.functions and a.minutes > 0 and a.goals, key
        for f in a.functions:
            module, qualname = f.name.split(".", 1)
            assert find_function(ast.parse((ROOT / f"{module}.py").read_text()), qualname), f.name
            assert len(CHECKS.get(f.name, [])) >= 2, f"{f.name}: at least two checks"
        assert not a.learning or a.learning in LEARNING, key
        assert len(MUTANTS[key]) >= 8, key
        assert {m.function for m in MUTANTS[key]} <= set(a.names), key
        assert {m.function for m in MUTANTS[key]} == set(a.names), f"{key}: a mutant for every function"


# ------------------------------------------------------------------------------------------------------------
# blanking
# ------------------------------------------------------------------------------------------------------------
SAMPLE = textwrap.dedent('''\
    import torch


    @torch.no_grad()
    def f(x,
          y=1):
        """Doc: y = 2x."""
        n = len(x)                      # (N,) inputs
        # y = 2 x
        for _ in range(n):
            x = x * 2                   # the step
        return x  # done


    class C:
        def g(self):
            return "a # not a comment"
    ''')


def test_blank_keeps_decorator_signature_docstring_and_every_comment():
    out = blank_source(SAMPLE, {"f": "write f: y = 2x", "C.g": "write g"})
    assert out == textwrap.dedent('''\
        import torch


        @torch.no_grad()
        def f(x,
              y=1):
            """Doc: y = 2x."""
            # (N,) inputs
            # y = 2 x
                # the step
            # done
            raise NotImplementedError('write f: y = 2x')


        class C:
            def g(self):
                raise NotImplementedError('write g')
        ''')
    assert splice_function(splice_function(out, SAMPLE, "f"), SAMPLE, "C.g") == SAMPLE   # filling restores it


def test_blank_splits_a_long_message_and_handles_a_function_without_docstring():
    source = "def h(a):\n    return a + 1  # plus one\n"
    out = blank_source(source, {"h": "write h: " + "word " * 40})
    assert all(len(line) <= 100 for line in out.splitlines())
    ns = {}
    exec(out, ns)
    with pytest.raises(NotImplementedError, match="write h: word word"):
        ns["h"](1)
    assert "# plus one" in out and comments_by_line(out)


# ------------------------------------------------------------------------------------------------------------
# the student copy: no solution anywhere, still runs
# ------------------------------------------------------------------------------------------------------------
# lines of a graded function that also occur in ungraded code (casts of the inputs): not an answer by themselves
COMMON = {"img_feats, txt_feats = img_feats.float(), txt_feats.float()",
          "txt2img = torch.as_tensor(txt2img, dtype=torch.long)"}


def solution_lines(source, qualname):
    """The distinctive code lines of a reference function's body (comments stripped; at least 24 characters)."""
    node = find_function(ast.parse(source), qualname)
    start = node.body[1].lineno if isinstance(node.body[0], ast.Expr) and len(node.body) > 1 else node.body[0].lineno
    comments, lines = comments_by_line(source), source.splitlines()
    out = []
    for i in range(start, node.end_lineno + 1):
        code = lines[i - 1].replace(comments.get(i, ""), "").strip() if i in comments else lines[i - 1].strip()
        if len(code) >= 24 and code not in COMMON:
            out.append(code)
    return out


@pytest.mark.parametrize("key", list(ASSIGNMENTS))
def test_student_copy_holds_no_solution(key, copies):
    folder, plan, _ = copies(key, "blank")
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    assert not any(n.split("/")[0] in (".git", "course", "bench.py") for n in names), "never shipped"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert {"clip_base.py", "data.py", "eval.py", "README.md", "tests/conftest.py"} <= names
    texts = {n: (folder / n).read_text(errors="ignore") for n in names if (folder / n).is_file()
             and not n.endswith((".png", ".jpg"))}
    blanked = {q.split(".")[-1] for blanks in plan.values() for q in blanks}
    for file, blanks in plan.items():
        source = (ROOT / file).read_text()
        for qualname in blanks:
            for line in solution_lines(source, qualname):
                holders = [n for n, text in texts.items() if line in text]
                assert not holders, f"{file}:{qualname}: {line!r} is in {holders}"
    for name, text in texts.items():     # no shipped test names a blanked function (they hold the loops)
        if name.startswith("tests/") and name.endswith(".py"):
            idents = {getattr(n, "attr", None) or getattr(n, "id", None) for n in ast.walk(ast.parse(text))}
            assert not idents & blanked, (name, idents & blanked)


def test_blank_copy_runs_and_blanked_functions_fail_loudly(copies):
    folder, _, s = copies("A3", "blank")
    assert s.bridge.pad_cat(torch.tensor([[2, 7]]), torch.tensor([[2, 7, 3]])).tolist() == [[2, 7, 0], [2, 7, 3]]
    with pytest.raises(NotImplementedError, match=r"A3: write bridge.loss_bridge: μ = \(t z_V"):
        s.bridge.loss_bridge(*torch.eye(3).split(1), 0.25)
    with pytest.raises(SystemExit) as e:       # the flags still parse: --help
        s.bridge.main(["--help"])
    assert e.value.code == 0
    text = (folder / "bridge.py").read_text()
    assert "# μ = (t z_V + (1−t) z_T) / ‖t z_V + (1−t) z_T‖" in text        # the equation comments stay


def test_a_duplicate_of_a_graded_function_is_blanked_too(copies):
    _, plan, s = copies("A1", "blank")
    assert {name for name, blanks in plan.items() if "nce" in blanks} == {"clip_base.py", "sep.py", "bridge.py",
                                                                         "geocons.py"}
    with pytest.raises(NotImplementedError, match="write clip_base.nce first, then the same code here"):
        s.sep.nce(torch.eye(2), torch.eye(2), torch.tensor(0.0))


# ------------------------------------------------------------------------------------------------------------
# grading: zero for the blank copy, full marks for the reference, every mutant rejected
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(ASSIGNMENTS))
def test_blank_copy_gets_zero_with_not_implemented_reasons(key, copies, reference):
    _, _, s = copies(key, "blank")
    results = grade(key, s, reference)
    assert results and sum(x.points for x in results) == 0
    assert {x.function for x in results} == set(ASSIGNMENTS[key].names) | ({LEARNING_ROW} if
                                                                           ASSIGNMENTS[key].learning else set())
    for x in results:
        assert x.reason.startswith("not implemented yet (NotImplementedError: "), (x.function, x.reason)


@pytest.mark.parametrize("key", list(ASSIGNMENTS))
def test_copy_filled_with_the_reference_is_the_reference_and_gets_full_marks(key, copies, reference):
    folder, plan, s = copies(key, "filled")
    for name in plan:
        assert (folder / name).read_text() == (ROOT / name).read_text(), name
    results = grade(key, s, reference)
    assert full_marks(results), [(x.function, x.check, x.reason) for x in results if not x.passed]


@pytest.mark.parametrize("key, index", [(k, i) for k, ms in MUTANTS.items() for i in range(len(ms))],
                         ids=[f"{k}-{m.function}-{i}" for k, ms in MUTANTS.items() for i, m in enumerate(ms)])
def test_every_mutant_fails_its_grader(key, index, copies, reference):
    mutant = MUTANTS[key][index]
    _, _, base = copies(key, "filled")
    killed, why = kill(key, base, reference, mutant)
    assert killed, f"{key}: the wrong answer '{mutant.mistake}' in {mutant.function} got full marks"


def test_mutate_edits_only_its_function_and_reports_outdated_edits():
    source = (ROOT / "bridge.py").read_text()
    m = MUTANTS["A3"][0]
    out = mutate(source, m)
    first, last = function_lines(source, "loss_bridge")
    a, b = source.splitlines(), out.splitlines()
    changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert len(a) == len(b) and changed and all(first - 1 <= i < last for i in changed)
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutate(source, type(m)(m.function, "stale", (("no such code", "x"),)))


def test_a_wrong_answer_costs_only_its_own_points(copies, reference):
    """A mutant of loss_ortho loses loss_ortho's points; L_Sep's other functions are graded with the reference's
    loss_ortho (grade.py patches it in), so they keep theirs."""
    _, _, base = copies("A2", "filled")
    m = next(m for m in MUTANTS["A2"] if m.function == "sep.loss_ortho")
    mutated = base.with_source("sep", mutate((base.root / "sep.py").read_text(), m))
    results = grade("A2", mutated, reference, learning=False)
    assert {x.function for x in results if not x.passed} == {"sep.loss_ortho"}


@pytest.mark.parametrize("mistake, old, new, reason", [
    ("the text end of the bridge detached", 'loss_bridge(f_a["v"], f["v"], f["t"], t)',
     'loss_bridge(f_a["v"], f["v"], f["t"].detach(), t)', "does not reach the text encoder"),
    ("the bridge pulls the original image, not its augmented view", 'loss_bridge(f_a["v"], f["v"], f["t"], t)',
     'loss_bridge(f["v"], f["v"], f["t"], t)', "ignores its views"),
    ("no gradient at all: the loss is constant", 'terms["loss"] = terms["con"] + args.bridge_weight * terms["bridge"]',
     'terms["loss"] = (terms["con"] + args.bridge_weight * terms["bridge"]).detach().requires_grad_()',
     "did not fall")])
def test_learning_check_catches_a_broken_training_step(mistake, old, new, reason, copies, reference):
    """Mistakes outside the graded functions (here bridge.compute_losses) that only training reveals."""
    _, _, base = copies("A3", "filled")
    broken = base.with_source("bridge", mutate((base.root / "bridge.py").read_text(),
                                               type(MUTANTS["A3"][0])("bridge.compute_losses", mistake, ((old, new),))))
    results = grade("A3", broken, reference, functions=["bridge.loss_bridge"], learning=True)
    assert [x.function for x in results if not x.passed] == [LEARNING_ROW], mistake
    assert reason in results[-1].reason, results[-1].reason


def test_a_file_that_does_not_import_scores_zero_with_the_reason(copies, reference):
    _, _, base = copies("A3", "filled")
    broken = base.with_source("bridge", (base.root / "bridge.py").read_text() + "\ndef oops(:\n")
    results = grade("A3", broken, reference)
    assert sum(x.points for x in results) == 0 and all("SyntaxError" in x.reason for x in results)


# ------------------------------------------------------------------------------------------------------------
# the command lines, as an instructor runs them
# ------------------------------------------------------------------------------------------------------------
def test_cli_make_and_grade(tmp_path):
    out = tmp_path / "student"
    made = subprocess.run([sys.executable, "course/make_assignment.py", "bridge.loss_bridge", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert made.returncode == 0, made.stderr
    assert "bridge.py: blanked loss_bridge" in made.stdout and not (out / "course").exists()
    graded = subprocess.run([sys.executable, "course/grade.py", "A3", str(out), "--only", "bridge.loss_bridge",
                             "--json", str(tmp_path / "m.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert graded.returncode == 1, graded.stderr          # not full marks
    assert "bridge.loss_bridge" in graded.stdout and "FAIL" in graded.stdout and "not implemented yet" in graded.stdout
    marks = json.loads((tmp_path / "m.json").read_text())
    assert marks["points"] == 0 and marks["max_points"] == len(marks["results"]) > 1
    with pytest.raises(SystemExit, match="not empty"):
        make_assignment(["A3"], out)
    with pytest.raises(SystemExit, match="inside the project"):
        make_assignment(["A3"], ROOT / "docs" / "student")
