"""Load the modules of one copy of the project (the student's, or the instructor's reference) side by side.

Each copy's modules are executed under private names (`_course_<label>_<module>_<n>`), with `data` and `eval`
pointing at that copy's own data.py and eval.py while its method scripts execute, so a student's sep.py sees
the student's eval.py and never the instructor's, and two copies of sep.py live in one process. A module can
also be loaded from a source string (mutants.py: a reference with one edit). While a copy is `active()`, a
late `import data` / `import eval` inside its functions resolves to that copy as well.
"""
import contextlib
import importlib.util
import itertools
import sys
from pathlib import Path

_serial = itertools.count()
SHARED = ("data", "eval")   # the project modules a method script imports


class Copy:
    """copy.sep, copy.eval, ...: the modules of the project copy at `root`, loaded on first use."""

    def __init__(self, root, label="copy", sources=None):
        self.root, self.label = Path(root), label
        self.sources = dict(sources or {})   # module name -> source text used instead of the file
        self._modules = {}

    def __getattr__(self, name):
        if name.startswith("_") or name in ("root", "label", "sources"):
            raise AttributeError(name)
        if name not in self._modules:
            self._modules[name] = self._load(name)
        return self._modules[name]

    def with_source(self, module, source):
        """A copy that shares this one's loaded modules but executes `source` as `module` (a changed data.py or
        eval.py: the method scripts are loaded again on top of it)."""
        other = Copy(self.root, self.label, {**self.sources, module: source})
        if module not in SHARED:
            other._modules = {k: v for k, v in self._modules.items() if k != module}
        return other

    def _load(self, name):
        path = self.root / f"{name}.py"
        source = self.sources.get(name)
        if source is None:
            if not path.exists():
                raise ModuleNotFoundError(f"{path} does not exist")
            source = path.read_text()
        deps = {} if name in SHARED else {k: getattr(self, k) for k in SHARED}
        if name == "eval":
            deps = {"data": self.data}
        unique = f"_course_{self.label}_{name}_{next(_serial)}"
        spec = importlib.util.spec_from_loader(unique, loader=None, origin=str(path))
        module = importlib.util.module_from_spec(spec)
        module.__file__ = str(path)
        with _swapped({**deps, unique: module}, keep=(unique,)):
            exec(compile(source, str(path), "exec"), module.__dict__)
        return module

    @contextlib.contextmanager
    def active(self):
        """`import data` / `import eval` run while inside resolve to this copy's modules."""
        with _swapped({k: getattr(self, k) for k in SHARED}):
            yield self


@contextlib.contextmanager
def _swapped(entries, keep=()):
    saved = {k: sys.modules.get(k) for k in entries}
    sys.modules.update(entries)
    try:
        yield
    finally:
        for k, v in saved.items():
            if k in keep:
                continue
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@contextlib.contextmanager
def patched(module, **functions):
    """Temporarily replace module-level names (a student's other graded functions by the reference's, so each
    function is graded on its own)."""
    saved = {k: module.__dict__[k] for k in functions if k in module.__dict__}
    module.__dict__.update(functions)
    try:
        yield
    finally:
        for k in functions:
            if k in saved:
                module.__dict__[k] = saved[k]
            else:
                module.__dict__.pop(k, None)
