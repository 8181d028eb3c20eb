"""Grade a student's copy: run every check of an assignment's functions, print a table, exit 0 on full marks only.

    python course/grade.py A2 DIR                     every function of A2, then sep.py's learning check
    python course/grade.py A2 DIR --only sep.loss_uni one function (no learning check)
    python course/grade.py A2 DIR --json marks.json   also write the results for a gradebook
    python course/grade.py A2 --list                  what A2's graders check

The student's code runs only in child processes (course/child.py, forked from a clean fork server: a process
group of its own, the student's folder as its import path and nothing of the instructor's). This process
draws every input from a seed picked now, sends it to the child, reads back plain tensors and numbers
(weights_only=True), computes the expected values itself and alone writes the table, the JSON and the exit
status. Each check has a
time limit (--timeout) and the whole grading one (--total-timeout), enforced by killing the child's process
group; a check the child did not answer fails with the reason. While a function is graded, the assignment's
functions listed before it are the reference's in the child, so a wrong answer costs only its own points; in
a copy that blanks several assignments, the blanked functions of the other assignments are the reference's
too. The learning check runs the student's whole training step in a fresh child. What the student's code
printed is shown apart from the verdict. Even so, grade in a container or under a throwaway account
(course/README.md): the student's code can read whatever that account can read.
"""
import argparse
import ast
import json
import random
import resource
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if __name__ == "__main__" and not {"-h", "--help", "--list"} & set(sys.argv):
    # start the fork server first: it imports torch while this process does the same
    import shlex as _shlex
    from course.sandbox import zygote as _zygote
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--python")
    _python = _early.parse_known_args()[0].python
    _zygote(_shlex.split(_python) if _python else [sys.executable])

from course import graders  # noqa: E402
from course.assignments import ASSIGNMENTS  # noqa: E402
from course.graders import CHECKS, LEARNING, T, Fail  # noqa: E402
from course.loader import Copy  # noqa: E402
from course.make_assignment import blank_plan, find_function, has_docstring, parse  # noqa: E402
from course.sandbox import CHILD_CPU, Child, ChildGone, Remote, StudentRaised  # noqa: E402

LEARNING_ROW = "learning check"


@dataclass
class Result:
    function: str     # qualified function, or "learning check"
    check: str        # what is checked
    passed: bool
    reason: str       # why it failed ("" when passed)
    points: int       # 1 when passed
    seconds: float    # how long the check ran


def reason_of(exc):
    """The one-line reason a student reads for an exception raised while a check ran."""
    if isinstance(exc, Fail):
        return str(exc)
    text = " ".join(str(exc).split())
    if isinstance(exc, NotImplementedError):
        return f"not implemented yet (NotImplementedError: {text})" if text else "not implemented yet"
    if isinstance(exc, StudentRaised):
        return f"your code raised {text[:300]}"
    if isinstance(exc, ChildGone):
        return f"your code {text} (the process running it was stopped)"
    return f"the check could not use what your code returned ({type(exc).__name__}: {text[:200]})"


# ============================== the reference inside the child ========================================
def definition(text, qualname):
    """The definition of a module-level function in a module's source text, decorators included."""
    node = find_function(parse(text), qualname)
    if node is None:
        raise KeyError(qualname)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return "".join(text.splitlines(keepends=True)[first - 1:node.end_lineno])


def reference_source(module, qualname, root=ROOT):
    """The reference's definition of a module-level function, decorators included."""
    return definition((Path(root) / f"{module}.py").read_text(), qualname)


def inject(child, name, root=ROOT):
    """The reference's `name` (module.function) replaces the student's in the child, from now on."""
    module, qualname = name.split(".", 1)
    if "." not in qualname:    # module-level functions (a method is graded with its class as it is)
        child.remember({"op": "inject", "module": module, "source": reference_source(module, qualname, root)})


def is_blank(node):
    """A function whose body (after its docstring) is only `raise NotImplementedError(...)`."""
    body = node.body[1:] if has_docstring(node) else node.body
    return (len(body) == 1 and isinstance(body[0], ast.Raise) and isinstance(body[0].exc, ast.Call)
            and getattr(body[0].exc.func, "id", "") == "NotImplementedError")


def blanks_of_other_assignments(key, folder, root=ROOT):
    """module.function of every function of another assignment (or a copy of one) that the student's folder
    leaves blank, in the modules this assignment's checks use: the child gets the reference's for them."""
    a = ASSIGNMENTS[key]
    others = [f for k, other in ASSIGNMENTS.items() if k != key for f in other.functions]
    out = []
    for file, qualnames in blank_plan(others, root).items():
        path = Path(folder) / file
        if Path(file).stem not in a.modules or not path.exists():
            continue
        try:
            tree = parse(path.read_text())
        except SyntaxError:
            continue
        for qualname in qualnames:
            node = find_function(tree, qualname)
            if node is not None and is_blank(node) and f"{Path(file).stem}.{qualname}" not in a.names:
                out.append(f"{Path(file).stem}.{qualname}")
    return out


# ============================== grading =================================================================
class Clock:
    """The per-check limit and the total one; sets a child's deadline for the next check."""

    def __init__(self, timeout, total):
        self.timeout, self.total, self.end = timeout, total, time.monotonic() + total

    def left(self):
        return self.end - time.monotonic()

    def arm(self, child):
        now = time.monotonic()
        if now + self.timeout <= self.end:
            child.deadline, child.late = now + self.timeout, f"did not finish in {self.timeout:g} s (an endless loop?)"
        else:
            child.deadline, child.late = self.end, f"did not finish before the grading's total time of " \
                                                   f"{self.total:g} s ran out"


def run_check(fn, child, reference, clock):
    """(passed, reason, seconds) of one check, the child's answers within the clock's deadline."""
    start = time.perf_counter()
    if clock.left() <= 0:
        return False, f"not run: the grading's total time of {clock.total:g} s ran out", 0.0
    clock.arm(child)
    try:
        fn(Remote(child), reference)
        return True, "", time.perf_counter() - start
    except Exception as exc:   # noqa: BLE001 - anything that goes wrong is a failed check with its reason
        return False, reason_of(exc), time.perf_counter() - start


def grade(key, student, reference=None, functions=None, learning=None, fail_fast=False, timeout=30,
          total_timeout=300, seed=None, child=None, output=None, python=None):
    """Grade an assignment. student: the student's folder; functions: a subset of the assignment's (default
    all); learning: run the learning check (default: when all functions are graded); fail_fast: stop at the
    first failed check; seed: the inputs' seed (default: a new one); child: a started sandbox.Child to use (and
    leave open) instead of new ones; output: a list that receives what the student's code printed; python: the
    command that starts a child's interpreter (sandbox.Child). Returns [Result]."""
    a = ASSIGNMENTS[key]
    r = reference if reference is not None else Copy(ROOT, "reference")
    names = list(functions) if functions else a.names
    unknown = [n for n in names if n not in a.names]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not in assignment {key} ({', '.join(a.names)})")
    missing = [n for n in names if n not in CHECKS]
    if missing:
        raise RuntimeError(f"no checks registered for {', '.join(missing)} in course/graders.py")
    T.preload()
    graders.draw(random.SystemRandom().randrange(10 ** 6) if seed is None else seed)
    clock, results, own = Clock(timeout, total_timeout), [], []

    def new_child():
        c = Child(student, python)
        for name in blanks_of_other_assignments(key, student):
            inject(c, name)
        own.append(c)
        return c
    try:
        c = child or new_child()
        run_learning = (functions is None if learning is None else learning) and a.learning
        learner = new_child() if run_learning and not child else child   # a fresh child for the training step
        injected = set()
        for name in names:
            for earlier in a.names[:a.names.index(name)]:
                if earlier not in injected:
                    inject(c, earlier)
                    injected.add(earlier)
            for description, fn in CHECKS[name]:
                passed, reason, seconds = run_check(fn, c, r, clock)
                results.append(Result(name, description, passed, reason, int(passed), seconds))
                if fail_fast and not passed:
                    return results
        if run_learning:
            description, fn = LEARNING[a.learning]
            passed, reason, seconds = run_check(fn, learner, r, clock)
            results.append(Result(LEARNING_ROW, description, passed, reason, int(passed), seconds))
        return results
    finally:
        for c in own:
            c.close()
            if output is not None:
                output.append(c.output())


def full_marks(results):
    return bool(results) and all(x.passed for x in results)


def table(key, results, where=""):
    """The report: one row per function with its points, then each of its checks, PASS or FAIL with the reason."""
    a = ASSIGNMENTS[key]
    out = [f"{key}: {a.title}" + (f"   [{where}]" if where else ""), ""]
    rows = list(dict.fromkeys(x.function for x in results))
    width = max(len(n) for n in rows) + 2
    for name in rows:
        mine, last = [x for x in results if x.function == name], None
        out.append(f"{name:<{width}} {sum(x.points for x in mine)}/{len(mine)}")
        for x in mine:
            if x.passed:
                out.append(f"    PASS  {x.check}")
            else:
                out.append(f"    FAIL  {x.check}\n          -> {'(the same)' if x.reason == last else x.reason}")
                last = x.reason
    got, total = sum(x.points for x in results), len(results)
    out += ["", f"total {got}/{total}" + ("  (full marks)" if got == total else "")]
    return "\n".join(out)


def student_output(texts, limit=4000):
    """What the student's code printed, every line marked, so it cannot pass for the grader's verdict."""
    text = "".join(texts).strip("\n")
    if not text:
        return ""
    if len(text) > limit:
        text = f"... ({len(text) - limit} characters left out)\n" + text[-limit:]
    return "\n".join(["---- printed by the student's code (not part of the verdict) ----",
                      *(f"  | {line}" for line in text.splitlines()),
                      "---- end of the student's output; the grader's verdict follows ----", ""])


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime   # the fork server (it imports torch once) is not counted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("assignment", choices=list(ASSIGNMENTS), help="the assignment: " + ", ".join(ASSIGNMENTS))
    p.add_argument("student_dir", nargs="?", help="the student's copy of the project")
    p.add_argument("--list", action="store_true", help="print the checks of the assignment and exit")
    p.add_argument("--only", nargs="+", metavar="FUNCTION", help="grade only these functions (module.function)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--timeout", type=float, default=30, help="seconds allowed per check (default 30)")
    p.add_argument("--total-timeout", type=float, default=300,
                   help="seconds allowed for the whole grading (default 300)")
    p.add_argument("--seed", type=int, help="draw the inputs from this seed (default: a new one per grading)")
    p.add_argument("--python", metavar="COMMAND", help="the command that starts the interpreter of the student's "
                                                      "code, e.g. 'setpriv --reuid=65534 --regid=65534 "
                                                      "--clear-groups python3' (default: this interpreter)")
    a = p.parse_args(argv)
    if a.list:
        assignment = ASSIGNMENTS[a.assignment]
        for name in assignment.names:
            print(name + "".join(f"\n    {d}" for d, _ in CHECKS[name]))
        if assignment.learning:
            print(f"{LEARNING_ROW}\n    {LEARNING[assignment.learning][0]}")
        return 0
    if not a.student_dir:
        p.error("give the student's folder (or --list)")
    folder = Path(a.student_dir)
    if not folder.is_dir():
        print(f"{folder} is not a folder", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(1)   # tiny tensors: one thread is fastest and leaves a shared machine alone
    seed = random.SystemRandom().randrange(10 ** 6) if a.seed is None else a.seed
    start, printed = time.perf_counter(), []
    results = grade(a.assignment, folder, functions=a.only, timeout=a.timeout, total_timeout=a.total_timeout,
                    seed=seed, output=printed, python=shlex.split(a.python) if a.python else None)
    wall = time.perf_counter() - start
    print(student_output(printed) + table(a.assignment, results, str(folder)))
    print(f"graded in {wall:.1f} s (CPU: grader {cpu_seconds(resource.RUSAGE_SELF):.1f} s, the children running "
          f"the student's code {CHILD_CPU[0]:.1f} s); inputs drawn with --seed {seed}")
    if a.json:
        Path(a.json).write_text(json.dumps({"assignment": a.assignment, "student_dir": str(folder), "seed": seed,
                                            "points": sum(x.points for x in results), "max_points": len(results),
                                            "results": [asdict(x) for x in results]}, indent=2, ensure_ascii=False))
    return 0 if full_marks(results) else 1


if __name__ == "__main__":
    sys.exit(main())
