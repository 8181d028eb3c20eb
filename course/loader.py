"""Load the modules of one copy of the project under private names, next to whatever else is loaded.

The grader loads the instructor's reference this way (it never loads a student's code: that runs only in the
child processes of course/sandbox.py); the tests also load a blank student copy to show that it still runs.
Each copy's modules are executed under private names (`_course_<label>_<module>_<n>`), with `data` and `eval`
pointing at that copy's own data.py and eval.py while its method scripts execute, so two copies of sep.py live
in one process, each with its own eval.py.
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

    def __init__(self, root, label="copy"):
        self.root, self.label = Path(root), label
        self._modules = {}

    def __getattr__(self, name):
        if name.startswith("_") or name in ("root", "label"):
            raise AttributeError(name)
        if name not in self._modules:
            self._modules[name] = self._load(name)
        return self._modules[name]

    def _load(self, name):
        path = self.root / f"{name}.py"
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
