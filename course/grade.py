"""Grade a student's copy: run every check of an assignment's functions, print a table, exit 0 on full marks.

    python course/grade.py A2 DIR                     every function of A2, then sep.py's learning check
    python course/grade.py A2 DIR --only sep.loss_uni one function (no learning check)
    python course/grade.py A2 DIR --json marks.json   also write the results for a gradebook
    python course/grade.py A2 --list                  what A2's graders check

The student's modules are imported from DIR under private names (course/loader.py), with their own data.py and
eval.py, next to the instructor's reference (this project): the checks call the student's functions and compare
with loops, closed forms and, where noted, the reference. While one function is graded the assignment's other
functions are the reference's, so a wrong answer costs only its own points. Each check is worth one point and
has a time limit; the learning check runs last. The grader RUNS THE STUDENT'S CODE: run it in a container or
under a throwaway account (course/README.md).
"""
import argparse
import contextlib
import json
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from course.assignments import ASSIGNMENTS  # noqa: E402
from course.graders import CHECKS, LEARNING, T, Fail  # noqa: E402
from course.loader import Copy, patched  # noqa: E402

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
    """The one-line reason a student reads for an exception raised by a check."""
    if isinstance(exc, Fail):
        return str(exc)
    text = " ".join(str(exc).split())
    if isinstance(exc, NotImplementedError):
        return f"not implemented yet (NotImplementedError: {text})" if text else "not implemented yet"
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"your code raised {text[:300]}"


@contextlib.contextmanager
def time_limit(seconds):
    """Raise TimeoutError after `seconds` (SIGALRM: main thread on Unix only; elsewhere no limit)."""
    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s (an endless loop?)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def others_from_reference(s, r, names):
    """The student's graded functions in `names` replaced by the reference's, for the duration."""
    with contextlib.ExitStack() as stack:
        for name in names:
            module, qualname = name.split(".", 1)
            if "." not in qualname:   # module-level functions (a method is graded with its class as it is)
                stack.enter_context(patched(getattr(s, module), **{qualname: getattr(getattr(r, module), qualname)}))
        yield


def run_check(fn, s, r, timeout, others=()):
    """(passed, reason, seconds) of one check, from a fixed RNG state, with the graded functions `others` taken
    from the reference. A student's module that does not even import fails the check with the reason."""
    random.seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        with time_limit(timeout), s.active(), others_from_reference(s, r, others):
            fn(s, r)
        return True, "", time.perf_counter() - start
    except Exception as exc:   # noqa: BLE001 - anything the student's code raises is a failed check
        return False, reason_of(exc), time.perf_counter() - start


def grade(key, student, reference=None, functions=None, learning=None, fail_fast=False, timeout=120):
    """Grade an assignment. student: a folder or a loader.Copy; functions: a subset of the assignment's (default
    all); learning: run the learning check (default: when all functions are graded); fail_fast: stop at the
    first failed check (mutation tests). Returns [Result]."""
    a = ASSIGNMENTS[key]
    s = student if isinstance(student, Copy) else Copy(student, "student")
    r = reference if reference is not None else Copy(ROOT, "reference")
    names = list(functions) if functions else a.names
    unknown = [n for n in names if n not in a.names]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not in assignment {key} ({', '.join(a.names)})")
    missing = [n for n in names if n not in CHECKS]
    if missing:
        raise RuntimeError(f"no checks registered for {', '.join(missing)} in course/graders.py")
    T.preload()
    results = []
    for name in names:
        for description, fn in CHECKS[name]:
            passed, reason, seconds = run_check(fn, s, r, timeout, [n for n in a.names if n != name])
            results.append(Result(name, description, passed, reason, int(passed), seconds))
            if fail_fast and not passed:
                return results
    if (functions is None if learning is None else learning) and a.learning:
        description, fn = LEARNING[a.learning]
        passed, reason, seconds = run_check(fn, s, r, timeout)
        results.append(Result(LEARNING_ROW, description, passed, reason, int(passed), seconds))
    return results


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("assignment", choices=list(ASSIGNMENTS))
    p.add_argument("student_dir", nargs="?", help="the student's copy of the project")
    p.add_argument("--list", action="store_true", help="print the checks of the assignment and exit")
    p.add_argument("--only", nargs="+", metavar="FUNCTION", help="grade only these functions (module.function)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--timeout", type=int, default=120, help="seconds allowed per check (default 120)")
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
    torch.set_num_threads(1)   # tiny tensors: one thread is fastest and leaves a shared machine alone
    start = time.perf_counter()
    results = grade(a.assignment, folder, functions=a.only, timeout=a.timeout)
    print(table(a.assignment, results, str(folder)))
    print(f"graded in {time.perf_counter() - start:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"assignment": a.assignment, "student_dir": str(folder),
                                            "points": sum(x.points for x in results), "max_points": len(results),
                                            "results": [asdict(x) for x in results]}, indent=2, ensure_ascii=False))
    return 0 if full_marks(results) else 1


if __name__ == "__main__":
    sys.exit(main())
