"""Write a student copy of the project in which the functions of one or more assignments are blanked.

    python course/make_assignment.py A2 --out DIR                  A2, from the last commit (HEAD)
    python course/make_assignment.py A1 A2 A5 --out DIR            several assignments in one copy
    python course/make_assignment.py sep.loss_ortho sep.loss_uni --out DIR     (any qualified functions)
    python course/make_assignment.py A2 --out DIR --ref v1.0       from another commit
    python course/make_assignment.py A2 --out DIR --from-worktree  the tracked files as they are now

The copy is made from what git holds (HEAD by default, --ref for another commit), so a file that is not
committed (a notebook of solutions, a scratch script) never ships; with a working tree that has uncommitted
changes or untracked files it refuses, naming them, unless --from-worktree (the files git tracks, with their
uncommitted changes; untracked files never ship) or --ref is given.

A blanked function keeps its decorators, signature and docstring, and every comment of its body (the equation
comments, and the trailing comments of code lines moved onto lines of their own, at the same indentation);
each line of code is gone and the body ends in `raise NotImplementedError("...")` naming the equation. The
functions are found by parsing the source with `ast` (no markers in the method files). A byte-identical copy of
a blanked function elsewhere (the scripts of a family share their skeleton, e.g. clip_base.nce is also in
sep.py) is blanked too, since it would give the answer away.

The copy is written file by file (no .git): the committed project minus course/, bench.py (its reference CLIP writes
the InfoNCE loss out), whatever .gitignore lists, and every test file that names a blanked function or
imports from such a file (those tests compare against loops that are the answers). The copy still runs:
ungraded functions work, blanked ones fail loudly.
"""
import argparse
import ast
import fnmatch
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from course.assignments import ASSIGNMENTS, Function  # noqa: E402

NEVER_SHIPPED = {"course", "bench.py", ".git"}          # top-level names never copied to a student


# ============================== finding a function in the source ======================================
@functools.lru_cache(maxsize=128)
def parse(source):
    """ast.parse, once per distinct source text (the graders look the same files up many times; never mutate
    the tree)."""
    return ast.parse(source)


@functools.lru_cache(maxsize=128)
def fingerprints(source):
    """((qualname, body_fingerprint), ...) of every function of a module's source."""
    return tuple((qualname, body_fingerprint(node)) for qualname, node in all_functions(parse(source)))


def find_function(tree, qualname):
    """The FunctionDef of 'f' or 'Class.f' at module level of a parsed module, or None."""
    *outer, name = qualname.split(".")
    body = tree.body
    for part in outer:
        cls = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if cls is None:
            return None
        body = cls.body
    return next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name),
                None)


def all_functions(tree):
    """(qualname, node) of every module-level function and every method of a module-level class."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{sub.name}", sub


def body_fingerprint(node):
    """The function's code without its docstring, positions or comments: equal for copies of one function."""
    body = node.body[1:] if has_docstring(node) else node.body
    return ast.dump(ast.Module(body=body, type_ignores=[]))


def has_docstring(node):
    first = node.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def function_lines(source, qualname):
    """(first, last) 1-based lines of a function's definition (decorators excluded: they stay as they are)."""
    node = find_function(parse(source), qualname)
    if node is None:
        raise KeyError(qualname)
    return node.lineno, node.end_lineno


def body_region(source, node):
    """(first, last) 1-based lines of the body that blanking replaces: after the signature and docstring."""
    if has_docstring(node):
        return node.body[0].end_lineno + 1, node.end_lineno
    lines = source.splitlines(keepends=True)
    # the signature ends at the first NEWLINE token at or after the `def` line
    tokens = tokenize.generate_tokens(io.StringIO("".join(lines[node.lineno - 1:])).readline)
    sig_end = next(t.start[0] for t in tokens if t.type == tokenize.NEWLINE) + node.lineno - 1
    if sig_end >= node.body[0].lineno:
        raise ValueError(f"{node.name}: the body starts on the line of the signature; put it on its own lines")
    return sig_end + 1, node.end_lineno


def comments_by_line(source):
    """{line: comment text} for every comment token of a module (strings that contain '#' are not comments)."""
    return {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type == tokenize.COMMENT}


# ============================== blanking and filling ==================================================
def blank_source(source, blanks):
    """Source with the functions of `blanks` ({qualname: NotImplementedError message}) blanked."""
    tree, lines, comments = ast.parse(source), source.splitlines(keepends=True), comments_by_line(source)
    regions = []
    for qualname, message in blanks.items():
        node = find_function(tree, qualname)
        if node is None:
            raise KeyError(f"no function {qualname} in this file")
        first, last = body_region(source, node)
        indent = " " * node.body[0].col_offset
        new = []
        for i in range(first, last + 1):
            text = lines[i - 1]
            if i in comments:
                code_indent = text[:len(text) - len(text.lstrip())]
                new.append(f"{code_indent}{comments[i]}\n")          # a comment line, or the comment of a code line
        new += raise_lines(indent, message)
        regions.append((first, last, new))
    for first, last, new in sorted(regions, reverse=True):          # bottom up: line numbers above stay valid
        lines[first - 1:last] = new
    out = "".join(lines)
    ast.parse(out)                                                 # still valid Python
    return out


def raise_lines(indent, message, width=100):
    """`raise NotImplementedError("...")` over lines of at most `width` characters (one string, split at spaces)."""
    pieces, line = [], ""
    for word in message.split(" "):
        if line and len(indent) + 8 + len(line) + len(word) > width:
            pieces.append(line)
            line = ""
        line += word + " "
    pieces.append(line.rstrip(" "))
    if len(pieces) == 1 and len(indent) + 27 + len(pieces[0]) <= width:
        return [f"{indent}raise NotImplementedError({pieces[0]!r})\n"]
    body = [f"{indent}    {p!r}\n" for p in pieces]
    body[-1] = body[-1].rstrip("\n") + ")\n"
    return [f"{indent}raise NotImplementedError(\n", *body]


def splice_function(target_source, donor_source, qualname):
    """target_source with the definition of `qualname` replaced by the one in donor_source."""
    t_first, t_last = function_lines(target_source, qualname)
    d_first, d_last = function_lines(donor_source, qualname)
    t_lines, d_lines = target_source.splitlines(keepends=True), donor_source.splitlines(keepends=True)
    t_lines[t_first - 1:t_last] = d_lines[d_first - 1:d_last]
    return "".join(t_lines)


def blank_plan(functions, root=ROOT, label="the assignment", labels=None):
    """{file name: {qualname: message}} for the graded functions and every byte-identical copy of one of them;
    labels: {function: the label its message starts with} (default `label` for all)."""
    plan, prints, labels = {}, {}, labels or {}
    for f in functions:
        module, qualname = f.name.split(".", 1)
        path = root / f"{module}.py"
        if not path.exists():
            raise FileNotFoundError(f"{f.name}: there is no {module}.py in {root}")
        node = find_function(parse(path.read_text()), qualname)
        if node is None:
            raise KeyError(f"{f.name}: {module}.py has no function {qualname}")
        plan.setdefault(path.name, {})[qualname] = f"{labels.get(f.name, label)}: write {f.name}: {f.equation}"
        prints[body_fingerprint(node)] = f.name
    for path in sorted(root.glob("*.py")):                          # copies elsewhere give the answer away
        if path.name in NEVER_SHIPPED:
            continue
        for qualname, fingerprint in fingerprints(path.read_text()):
            original = prints.get(fingerprint)
            if original and f"{path.stem}.{qualname}" != original:
                plan.setdefault(path.name, {}).setdefault(
                    qualname, f"{labels.get(original, label)}: write {original} first, then the same code here (each "
                              f"script stands alone)")
    return plan


def fill_functions(copy_dir, plan, root=ROOT):
    """Put the reference's code back into every blanked function of a student copy (a copy 'filled with the
    reference': grading it must give full marks; mutants.py edits it)."""
    for name, blanks in plan.items():
        path, source = Path(copy_dir) / name, (Path(root) / name).read_text()
        text = path.read_text()
        for qualname in blanks:
            text = splice_function(text, source, qualname)
        path.write_text(text)


# ============================== which files a student gets ============================================
def ignored_patterns(root):
    path = Path(root) / ".gitignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [p.strip().rstrip("/") for p in lines if p.strip() and not p.startswith("#")]


def tracked_files(root):
    """The paths git tracks in the working tree at root (a set of Paths), or None when root is no git tree."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return {Path(p) for p in out.stdout.split("\0") if p}


def shipped_files(root=ROOT, only=None):
    """Relative paths of the project files a student copy may hold (before the test filter); only: a set of
    paths the copy may not go beyond (the tracked files)."""
    root, patterns, out = Path(root), ignored_patterns(root), []
    if only is not None:
        return [p for p in shipped_files(root) if p in only]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        keep = lambda n: not n.startswith(".") and not any(fnmatch.fnmatch(n, p) for p in patterns)  # noqa: E731
        dirnames[:] = sorted(d for d in dirnames if keep(d) and not (rel == Path(".") and d in NEVER_SHIPPED))
        out += [rel / f for f in sorted(filenames)
                if (keep(f) or f == ".gitignore") and not (rel == Path(".") and f in NEVER_SHIPPED)]
    return out


def _identifiers(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.alias):
            yield node.name.split(".")[-1]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def excluded_tests(root, files, blanked_names):
    """Test files that name a blanked function, import a module the copy lacks, or import such a test file."""
    root = Path(root)
    shipped_modules = {p.stem for p in files if len(p.parts) == 1 and p.suffix == ".py"}
    project_modules = {p.stem for p in root.glob("*.py")} | {"course"}
    tests = {p.stem: ast.parse((root / p).read_text()) for p in files if p.parts[0] == "tests" and p.suffix == ".py"}
    out = {name for name, tree in tests.items() if set(_identifiers(tree)) & blanked_names}
    out |= {name for name, tree in tests.items() if (set(_imported_modules(tree)) & project_modules) - shipped_modules}
    while True:                                                   # and whatever imports an excluded test file
        more = {name for name, tree in tests.items() if name not in out and set(_imported_modules(tree)) & out}
        if not more:
            return out
        out |= more


# ============================== the copy ==============================================================
def resolve(names):
    """Assignment keys and qualified function names -> ({function: label}, [Function]): an assignment's
    functions are labelled with its key, a function of no assignment with 'assignment'."""
    bad = [n for n in names if n not in ASSIGNMENTS and "." not in n]
    if bad:
        raise SystemExit(f"give assignments ({', '.join(ASSIGNMENTS)}) or qualified functions such as "
                         f"sep.loss_ortho, not {' '.join(bad)}")
    known = {f.name: (k, f) for k, a in ASSIGNMENTS.items() for f in a.functions}
    labels, functions = {}, []
    for n in names:
        for key, f in ([(n, f) for f in ASSIGNMENTS[n].functions] if n in ASSIGNMENTS
                       else [known.get(n, ("assignment", Function(n, "see its docstring and comments")))]):
            if f.name not in labels:
                labels[f.name] = key
                functions.append(f)
    return labels, functions


def uncommitted(root):
    """The `git status --porcelain` lines of a working tree (modified, added, deleted, untracked; not ignored)."""
    out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{root} is not a git working tree ({out.stderr.strip()}): pass --from-worktree to copy "
                         f"the folder as it is")
    return [line for line in out.stdout.splitlines() if line.strip()]


def export_commit(root, ref, folder):
    """Write the files of commit `ref` of the repository at root into folder (git archive)."""
    archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", ref], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {ref} failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)


def make_assignment(names, out, root=ROOT, force=False, ref=None, from_worktree=False):
    """Write the student copy to `out` from commit `ref` (default HEAD, refused when the working tree has
    uncommitted changes), or from the working tree as it is (from_worktree); returns the blank plan
    ({file: {qualname: message}})."""
    labels, functions = resolve(list(names))
    root, out = Path(root), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise SystemExit(f"{out} exists and is not empty: choose a new folder (or --force to overwrite it)")
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise SystemExit(f"{out} is inside the project {root}: write the student copy outside it")
    if from_worktree:                    # the tracked files as they are; untracked files never ship
        return write_copy(functions, labels, root, out, tracked_files(root))
    if ref is None:
        dirty = uncommitted(root)
        if dirty:
            raise SystemExit("the working tree has changes that are not committed, and the copy is made from the "
                             "last commit:\n" + "\n".join(f"    {line}" for line in dirty)
                             + "\ncommit (or remove) them, or pass --from-worktree to copy the tracked files with "
                               "their uncommitted changes (untracked files never ship), or --ref to name the "
                               "commit to copy")
    with tempfile.TemporaryDirectory(prefix="committed-") as tmp:
        export_commit(root, ref or "HEAD", tmp)
        return write_copy(functions, labels, Path(tmp), out)


def write_copy(functions, labels, root, out, only=None):
    plan = blank_plan(functions, root, labels=labels)
    files = shipped_files(root, only)
    blanked_names = {q.split(".")[-1] for blanks in plan.values() for q in blanks}
    skip = {Path("tests") / f"{t}.py" for t in excluded_tests(root, files, blanked_names)}
    for rel in files:
        if rel in skip:
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.name in plan and len(rel.parts) == 1:
            dst.write_text(blank_source((root / rel).read_text(), plan[rel.name]))
        else:
            shutil.copyfile(root / rel, dst)
    return plan


def grade_commands(names, out):
    """The grade.py command lines for a copy made from `names` (keys, functions), one per assignment."""
    labels, _ = resolve(list(names))
    keys = [n for n in names if n in ASSIGNMENTS]
    lines = [f"python course/grade.py {k} {out}" for k in keys]
    loose = {}
    for n in names:
        if n not in ASSIGNMENTS and labels[n] not in keys:
            loose.setdefault(labels[n], []).append(n)
    for key, fns in loose.items():
        if key in ASSIGNMENTS:
            lines.append(f"python course/grade.py {key} {out} --only {' '.join(fns)}")
        else:
            lines.append(f"(no grader for {', '.join(fns)}: not part of any assignment in course/assignments.py)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help=f"assignment keys ({', '.join(ASSIGNMENTS)}), one or several, or "
                                            f"qualified functions (sep.loss_ortho)")
    p.add_argument("--out", required=True, help="folder for the student copy (new or empty)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.add_argument("--ref", help="the commit to copy (default HEAD)")
    p.add_argument("--from-worktree", action="store_true",
                   help="copy the tracked files as they are in the working tree (uncommitted changes included; "
                        "untracked files never ship)")
    a = p.parse_args(argv)
    plan = make_assignment(a.names, a.out, force=a.force, ref=a.ref, from_worktree=a.from_worktree)
    for name, blanks in plan.items():
        print(f"{name}: blanked {', '.join(blanks)}")
    print(f"student copy written to {a.out}; grade it with:")
    for line in grade_commands(a.names, a.out):
        print(f"    {line}")


if __name__ == "__main__":
    main()
