"""course/: blanking by `ast`, student copies made from what is committed and holding no solution, and the proof
that the graders work: the blank copy scores zero with NotImplementedError reasons, the copy filled with the
reference gets full marks, every wrong answer of course/mutants.py (the kit's own and those written after the
checks) fails its grader, every right answer written another way gets full marks, and every cheat scores zero
for the functions it touches without ever making grade.py exit 0. The student's code runs in child processes
(course/child.py); one child per assignment serves all of its versions (mutants.Batch)."""
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from course import sandbox
from course.assignments import ASSIGNMENTS
from course.grade import LEARNING_ROW, definition, full_marks, grade
from course.grade import main as grade_main
from course.graders import CHECKS, LEARNING
from course.loader import Copy
from course.make_assignment import (ROOT, blank_plan, blank_source, comments_by_line, fill_functions,
                                    find_function, function_lines, grade_commands, make_assignment,
                                    splice_function)
from course.make_assignment import main as make_main
from course.mutants import (ALTERNATIVES, CHEATS, HIDDEN, MUTANTS, Batch, assignment_of, cheat_score,
                            filled_copy, kill, mutate, right, trivial_answers)
from course.sandbox import Child
from tiny import ONE_THREAD

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
SEED = 1   # the inputs' seed for the tests (grade.py draws a new one per grading)


@pytest.fixture(scope="module")
def reference():
    return Copy(ROOT, "reference")


_COPIES, _BATCHES = {}, {}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """copies(key, kind) -> (folder, plan): the blank student copy, or the same copy filled with the reference,
    both made from the working tree (the reference the grader compares with); written once per module."""
    def get(key, kind):
        if (key, kind) not in _COPIES:
            folder = tmp_path_factory.mktemp(f"{key}-{kind}")
            plan = (filled_copy(key, folder) if kind == "filled"
                    else make_assignment([key], folder, force=True, from_worktree=True))
            _COPIES[key, kind] = folder, plan
        return _COPIES[key, kind]
    yield get
    _COPIES.clear()


@pytest.fixture(scope="module")
def batches(copies, reference):
    """batches(key, kind) -> a mutants.Batch on the filled copy: 'versions' for the wrong and right answers,
    'cheats' for the cheats (their tricks may leave the child's torch patched)."""
    def get(key, kind="versions"):
        if (key, kind) not in _BATCHES:
            _BATCHES[key, kind] = Batch(key, copies(key, "filled")[0], reference)
        return _BATCHES[key, kind]
    yield get
    for batch in _BATCHES.values():
        batch.close()
    _BATCHES.clear()


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
        assert HIDDEN[key] and ALTERNATIVES[key], f"{key}: wrong answers written after the checks, right answers"
        assert {m.function for m in HIDDEN[key] + ALTERNATIVES[key]} <= set(a.names), key
    assert {assignment_of(c.function) for c in CHEATS} == set(ASSIGNMENTS)


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
    folder, plan = copies(key, "blank")
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
    folder, _ = copies("A3", "blank")
    s = Copy(folder, "blankA3")        # the student's modules, imported here by the test (not by the grader)
    assert s.bridge.pad_cat(torch.tensor([[2, 7]]), torch.tensor([[2, 7, 3]])).tolist() == [[2, 7, 0], [2, 7, 3]]
    with pytest.raises(NotImplementedError, match=r"A3: write bridge.loss_bridge: μ = \(t z_V"):
        s.bridge.loss_bridge(*torch.eye(3).split(1), 0.25)
    with pytest.raises(SystemExit) as e:       # the flags still parse: --help
        s.bridge.main(["--help"])
    assert e.value.code == 0
    text = (folder / "bridge.py").read_text()
    assert "# μ = (t z_V + (1−t) z_T) / ‖t z_V + (1−t) z_T‖" in text        # the equation comments stay


def test_a_duplicate_of_a_graded_function_is_blanked_too(copies):
    folder, plan = copies("A1", "blank")
    s = Copy(folder, "blankA1")
    assert {name for name, blanks in plan.items() if "nce" in blanks} == {"clip_base.py", "sep.py", "bridge.py",
                                                                         "geocons.py"}
    with pytest.raises(NotImplementedError, match="write clip_base.nce first, then the same code here"):
        s.sep.nce(torch.eye(2), torch.eye(2), torch.tensor(0.0))


# ------------------------------------------------------------------------------------------------------------
# grading: zero for the blank copy, full marks for the reference and the right answers, every mutant rejected
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(ASSIGNMENTS))
def test_blank_copy_gets_zero_with_not_implemented_reasons(key, copies, reference):
    folder, _ = copies(key, "blank")
    results = grade(key, folder, reference, seed=SEED)
    assert results and sum(x.points for x in results) == 0
    assert {x.function for x in results} == set(ASSIGNMENTS[key].names) | ({LEARNING_ROW} if
                                                                           ASSIGNMENTS[key].learning else set())
    for x in results:
        assert x.reason.startswith("not implemented yet (NotImplementedError: "), (x.function, x.reason)


@pytest.mark.parametrize("key", list(ASSIGNMENTS))
def test_copy_filled_with_the_reference_is_the_reference_and_gets_full_marks(key, copies, reference):
    folder, plan = copies(key, "filled")
    for name in plan:
        assert (folder / name).read_text() == (ROOT / name).read_text(), name
    printed = []
    results = grade(key, folder, reference, output=printed)      # as grade.py runs it: new children, new seed
    assert full_marks(results), [(x.function, x.check, x.reason) for x in results if not x.passed]


def _ids(cases):
    return [f"{k}-{m.function}-{i}" for k, ms in cases.items() for i, m in enumerate(ms)]


def _pairs(cases):
    return [(k, i) for k, ms in cases.items() for i in range(len(ms))]


@pytest.mark.parametrize("key, index", _pairs(MUTANTS), ids=_ids(MUTANTS))
def test_every_mutant_fails_its_grader(key, index, batches):
    mutant = MUTANTS[key][index]
    killed, why = kill(batches(key), mutant)
    assert killed, f"{key}: the wrong answer '{mutant.mistake}' in {mutant.function} got full marks"


# the kind of each mistake written after the checks -> a word of the check that must fail for it
NAMED = {"partial detach": "gradient", "wrong dtype path": "bf16", "mirrored tie order": "ties",
         "mirrored tie rule": "ties", "first k instead of a random subset": "random", "off by ε": "ε",
         "ignored argument": ""}


@pytest.mark.parametrize("key, index", _pairs(HIDDEN), ids=_ids(HIDDEN))
def test_every_mistake_written_after_the_checks_fails_the_check_that_names_it(key, index, batches):
    mistake = HIDDEN[key][index]
    results = batches(key).grade(mistake.function, mistake.source, learning=False, seed=SEED)
    failed = [x.check for x in results if not x.passed]
    assert failed, f"{key}: the wrong answer '{mistake.what}' in {mistake.function} got full marks"
    word = NAMED[mistake.what.split(":")[0]]
    assert any(word in check for check in failed), (mistake.what, failed)


@pytest.mark.parametrize("key, index", _pairs(ALTERNATIVES), ids=_ids(ALTERNATIVES))
def test_every_right_answer_written_another_way_gets_full_marks(key, index, batches):
    alternative = ALTERNATIVES[key][index]
    fine, failed = right(batches(key), alternative)
    assert fine, (alternative.what, [(x.check, x.reason) for x in failed])


@pytest.mark.parametrize("index", range(len(CHEATS)), ids=[c.what[:40] for c in CHEATS])
def test_every_cheat_scores_zero_for_the_function_it_touches(index, batches):
    cheat = CHEATS[index]
    points, results = cheat_score(batches(assignment_of(cheat.function), "cheats"), cheat, timeout=2,
                                  total_timeout=6)
    assert results and points == 0, [(x.check, x.reason) for x in results if x.passed]
    assert sum(x.seconds for x in results) < 15


@pytest.mark.parametrize("key", list(ASSIGNMENTS))
def test_a_stub_or_a_constant_earns_no_point(key, batches):
    """`return None` and `return torch.tensor(0.0)` in place of each graded function: zero on every check (a
    check of an invariance a constant also has must check the value too)."""
    batch = batches(key)
    answers = trivial_answers(key, batch.folder)
    assert len(answers) == 2 * len(ASSIGNMENTS[key].names)
    for answer in answers:
        points, results = cheat_score(batch, answer, timeout=5, total_timeout=30)
        assert results and points == 0, (answer.function, answer.what, [x.check for x in results if x.passed])


FORK_SERVER_CHEAT = next(c for c in CHEATS if "fork server" in c.what)


def assert_a_new_server_grades_the_reference(batch, dead):
    """After the fork server `dead` is gone, the reference's own dequeue_and_enqueue gets full marks in the same
    batch, from a child of a new server."""
    source = definition((batch.folder / "albef_fusion.py").read_text(), "dequeue_and_enqueue")
    fine, failed = right(batch, type(FORK_SERVER_CHEAT)(FORK_SERVER_CHEAT.function, "the reference", source))
    assert fine, [(x.check, x.reason) for x in failed]
    assert sandbox.zygote(batch.child.python) is not dead


def test_grading_goes_on_after_a_cheat_kills_the_fork_server(copies, reference):
    """The fork-server cheat scores zero, and the next function graded in the same run gets full marks from a
    fork server started again."""
    batch = Batch("A5", copies("A5", "filled")[0], reference)      # its own child, forked by the current server
    try:
        server = sandbox.zygote(batch.child.python)
        points, results = cheat_score(batch, FORK_SERVER_CHEAT, timeout=2, total_timeout=6)
        assert results and points == 0
        server.proc.wait(timeout=10)              # SIGKILL is asynchronous: the server is gone moments later
        assert_a_new_server_grades_the_reference(batch, server)
    finally:
        batch.close()


def test_a_child_is_forked_by_a_new_server_when_the_old_one_died_looking_alive(copies, reference, monkeypatch):
    """The fork server can die between the check that it lives and the request to fork (a student's code
    SIGKILLs it, and the signal lands asynchronously): the next function is then graded by a child of a new
    server, not lost to a BrokenPipeError. The race is made certain here: the dead server still looks alive."""
    batch = Batch("A5", copies("A5", "filled")[0], reference)
    try:
        server = sandbox.zygote(batch.child.python)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        monkeypatch.setattr(sandbox.Zygote, "alive", lambda self: self is server or self.proc.poll() is None)
        batch.child.kill()                        # the next request forks a fresh child
        assert_a_new_server_grades_the_reference(batch, server)
    finally:
        batch.close()


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


def test_a_wrong_answer_costs_only_its_own_points(batches, reference):
    """A mutant of loss_ortho loses loss_ortho's points; L_Sep's other functions are graded with the reference's
    loss_ortho (grade.py sends it to the child), so they keep theirs."""
    batch = batches("A2")
    m = next(m for m in MUTANTS["A2"] if m.function == "sep.loss_ortho")
    source = definition(mutate((batch.folder / "sep.py").read_text(), m), "loss_ortho")
    with batch.replaced("sep.loss_ortho", source):
        results = grade("A2", batch.folder, reference, learning=False, seed=SEED, child=batch.child)
    assert {x.function for x in results if not x.passed} == {"sep.loss_ortho"}


@pytest.mark.parametrize("mistake, old, new, reason", [
    ("the text end of the bridge detached", 'loss_bridge(f_a["v"], f["v"], f["t"], t)',
     'loss_bridge(f_a["v"], f["v"], f["t"].detach(), t)', "does not reach the text encoder"),
    ("the bridge pulls the original image, not its augmented view", 'loss_bridge(f_a["v"], f["v"], f["t"], t)',
     'loss_bridge(f["v"], f["v"], f["t"], t)', "ignores its views"),
    ("no gradient at all: the loss is constant", 'terms["loss"] = terms["con"] + args.bridge_weight * terms["bridge"]',
     'terms["loss"] = (terms["con"] + args.bridge_weight * terms["bridge"]).detach().requires_grad_()',
     "did not fall")])
def test_learning_check_catches_a_broken_training_step(mistake, old, new, reason, batches, reference):
    """Mistakes outside the graded functions (here bridge.compute_losses) that only training reveals."""
    batch = batches("A3")
    broken = type(MUTANTS["A3"][0])("bridge.compute_losses", mistake, ((old, new),))
    source = definition(mutate((batch.folder / "bridge.py").read_text(), broken), "compute_losses")
    with batch.replaced("bridge.compute_losses", source):
        results = grade("A3", batch.folder, reference, functions=["bridge.loss_bridge"], learning=True, seed=SEED,
                        child=batch.child)
    assert [x.function for x in results if not x.passed] == [LEARNING_ROW], mistake
    assert reason in results[-1].reason, results[-1].reason


def test_a_file_that_does_not_import_scores_zero_with_the_reason(copies, reference, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(copies("A3", "filled")[0], folder)
    (folder / "bridge.py").write_text((folder / "bridge.py").read_text() + "\ndef oops(:\n")
    child = Child(folder)
    try:
        results = grade("A3", folder, reference, seed=SEED, child=child)
    finally:
        child.close()
    assert sum(x.points for x in results) == 0 and all("SyntaxError" in x.reason for x in results)


def test_a_copy_of_several_assignments_grades_each_with_the_others_from_the_reference(tmp_path, reference):
    """A5 and A6 blanked in one copy; only A6's functions written: A6 gets full marks, its learning check
    included, although codis.py's copies of A5's functions are still blank."""
    folder = tmp_path / "a5a6"
    plan = make_assignment(["A5", "A6"], folder, from_worktree=True)
    assert "write albef_fusion.momentum_update first" in (folder / "codis.py").read_text()
    assert "A6: write codis.loss_code" in (folder / "codis.py").read_text()
    fill_functions(folder, blank_plan(ASSIGNMENTS["A6"].functions))
    assert any("momentum_update" in blanks for blanks in plan.values())
    results = grade("A6", folder, reference, seed=SEED)
    assert full_marks(results), [(x.function, x.check, x.reason) for x in results if not x.passed]


# ------------------------------------------------------------------------------------------------------------
# the command lines, as an instructor runs them
# ------------------------------------------------------------------------------------------------------------
def _run(*argv, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=ONE_THREAD)


def test_cli_make_and_grade_with_the_printed_command(tmp_path, capsys):
    out = tmp_path / "student"
    made = _run("course/make_assignment.py", "bridge.loss_bridge", "--out", str(out), "--from-worktree")
    assert made.returncode == 0, made.stderr
    assert "bridge.py: blanked loss_bridge" in made.stdout and not (out / "course").exists()
    command = next(line.split() for line in made.stdout.splitlines() if "course/grade.py" in line)
    assert command[:4] == ["python", "course/grade.py", "A3", str(out)]
    assert grade_main([*command[2:], "--json", str(tmp_path / "m.json"), "--seed", str(SEED)]) == 1
    printed = capsys.readouterr().out                     # not full marks
    assert "bridge.loss_bridge" in printed and "FAIL" in printed and "not implemented yet" in printed
    marks = json.loads((tmp_path / "m.json").read_text())
    assert marks["points"] == 0 and marks["max_points"] == len(marks["results"]) > 1
    with pytest.raises(SystemExit, match="not empty"):
        make_assignment(["A3"], out, from_worktree=True)
    with pytest.raises(SystemExit, match="inside the project"):
        make_assignment(["A3"], ROOT / "docs" / "student", from_worktree=True)


def test_grade_commands_for_every_way_a_copy_is_made(capsys):
    assert grade_commands(["A1", "A2"], "D") == ["python course/grade.py A1 D", "python course/grade.py A2 D"]
    assert grade_commands(["sep.loss_ortho", "sep.loss_uni"], "D") == [
        "python course/grade.py A2 D --only sep.loss_ortho sep.loss_uni"]
    assert grade_commands(["A1", "clip_base.nce", "bridge.pad_cat"], "D")[1:] == [
        "(no grader for bridge.pad_cat: not part of any assignment in course/assignments.py)"]
    for main in (make_main, grade_main):
        with pytest.raises(SystemExit):
            main(["--help"])
        helped = capsys.readouterr().out
        assert all(key in helped for key in ASSIGNMENTS), helped


def test_a_copy_is_made_from_the_last_commit_and_refuses_untracked_files(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    (clone / "solutions.ipynb").write_text("{}")
    with pytest.raises(SystemExit, match="solutions.ipynb"):
        make_assignment(["A3"], tmp_path / "refused", root=clone)
    assert not (tmp_path / "refused").exists()
    make_assignment(["A3"], tmp_path / "committed", root=clone, ref="HEAD")
    assert not (tmp_path / "committed" / "solutions.ipynb").exists()
    assert (tmp_path / "committed" / "bridge.py").read_text() == blank_source(
        subprocess.run(["git", "-C", str(clone), "show", "HEAD:bridge.py"], capture_output=True, text=True,
                       check=True).stdout, blank_plan(ASSIGNMENTS["A3"].functions, clone, "A3")["bridge.py"])


def test_a_cheat_that_prints_a_verdict_and_exits_0_gets_exit_1_and_zero(copies, tmp_path):
    """grade.py as a command, on a folder whose loss_gc_aug prints a full-marks table and calls os._exit(0)."""
    folder = tmp_path / "cheat"
    shutil.copytree(copies("A4", "filled")[0], folder)
    cheat = next(c for c in CHEATS if "os._exit(0)" in c.what)
    text = (folder / "geocons.py").read_text()
    start, end = function_lines(text, "loss_gc_aug")
    lines = text.splitlines(keepends=True)
    (folder / "geocons.py").write_text("".join(lines[:start - 1]) + cheat.source + "".join(lines[end:]))
    graded = _run("course/grade.py", "A4", str(folder), "--only", "geocons.loss_gc_aug", "--timeout", "20",
                  "--total-timeout", "40", "--seed", str(SEED))   # generous: the cheat exits at once
    assert graded.returncode == 1, graded.stdout
    verdict = graded.stdout.split("the grader's verdict follows ----", 1)[1]
    assert "total 15/15" not in verdict and "total 0/4" in verdict
    assert "exited with status 0 before answering" in verdict
    assert all(line.startswith("  | ") for line in graded.stdout.split("verdict) ----\n", 1)[1].split(
        "\n---- end")[0].splitlines())
