"""The grader's side of the child processes in which the student's code runs (course/child.py).

`Child(folder)` is one such process: forked from a fork server (`Zygote`: a fresh `python -I` interpreter in an
empty working folder that imported torch, numpy, PIL and transformers and nothing of the project), in a
session and process group of its own, with the student's folder as the head of its import path. A child
starts in milliseconds; the fork server is started once per grading process (grade.py starts it before its
own imports, so both import torch at the same time).

`child.call("sep.loss_ortho", args, kwargs, opts)` sends the inputs and waits for the reply within the current
deadline; the reply is read with `torch.load(weights_only=True)`, so it can hold tensors and plain values but no
code. When the deadline passes, the child dies or it answers something that is not a reply, its whole process
group is killed and `ChildGone` says why ("did not finish in 30 s", "exited with status 0 before answering");
the next request forks a new child, which gets the same definitions and injected functions again. What the
child prints goes to a file of its own: `output()` returns it.

`Remote(child)` lets a check call the student's functions as `s.sep.loss_ortho(zv, ...)`: each call is one
request, its value comes back as plain tensors and numbers, and an exception the student's code raised comes
back as `StudentRaised` (or NotImplementedError, for a blank).
"""
import atexit
import io
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_SOURCE = (Path(__file__).parent / "child.py").read_text()
MAX_REPLY = 512 * 2 ** 20          # bytes: a reply larger than this is not an answer


class ChildGone(Exception):
    """The child did not answer: killed at its deadline, crashed, or exited (the message says which)."""


class StudentRaised(Exception):
    """The student's code raised an exception in the child: kind 'TypeError', str 'TypeError: ...'."""

    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind


class Child:
    def __init__(self, folder, python=None):
        """folder: the student's copy; python: the command that starts the child's interpreter (a list, default
        this interpreter), e.g. ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', 'python3'] to run
        the student's code as another user (course/README.md)."""
        self.folder, self.python = str(Path(folder).resolve()), list(python or [sys.executable])
        self.setup = []              # requests replayed into every new child (definitions, injections)
        self.defined = set()         # the helper classes among them
        self.pid = None
        self._unsent = []
        self.deadline = None         # time.monotonic() by which the current check must be answered
        self.late = ""               # what to say when it is not ("did not finish in 30 s ...")
        self._out = tempfile.TemporaryFile()
        self._tmp = tempfile.TemporaryDirectory(prefix="grading-")
        os.chmod(self._tmp.name, 0o755)          # empty; a child started as another user may enter it

    # ------------------------------------------------------------------ life cycle
    def start(self):
        """Fork a fresh child from the fork server; the setup is sent before the next request."""
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        fds = (req_r, rep_w, self._out.fileno())
        try:
            try:
                self.pid = zygote(self.python).spawn(self.folder, self._tmp.name, fds)
            except (OSError, ChildGone):
                # The fork server died after zygote() found it alive (student code may SIGKILL it, and the
                # signal lands asynchronously): start a new one, once.
                self.pid = zygote(self.python, fresh=True).spawn(self.folder, self._tmp.name, fds)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._requests, self._replies = os.fdopen(req_w, "wb"), rep_r
        self._unsent = list(self.setup)

    def _replay(self):
        while self._unsent:
            self._ask(self._unsent.pop(0))

    def kill(self):
        if self.pid is None:
            return
        with _quiet():
            os.killpg(self.pid, signal.SIGKILL)
        try:                                      # reap it (the fork server is its parent)
            zygote(self.python).status(self.pid, wait=5)
        except (OSError, ChildGone):              # the fork server itself is gone: nothing left to reap
            pass
        with _quiet():
            self._requests.close()
        with _quiet():
            os.close(self._replies)
        self.pid = None

    def close(self):
        self.kill()
        self._tmp.cleanup()

    def output(self):
        """Everything the student's code printed so far (stdout and stderr together)."""
        self._out.seek(0)
        return self._out.read().decode(errors="replace")

    # ------------------------------------------------------------------ requests
    def remember(self, request):
        """Send a request to this child and to every child started after it (a definition, an injection)."""
        if request in self.setup:
            return
        self.setup.append(request)
        if self.pid is not None:
            self._unsent.append(request)

    def ask(self, request):
        if self.pid is None:
            self.start()
        self._replay()
        return self._ask(request)

    def call(self, fn, args=(), kwargs=None, opts=None):
        """The reply of one call of the student's `fn` (module.function): {'value', 'record', ['grads', 'args']}."""
        return self.ask({"op": "call", "fn": fn, "args": list(args), "kwargs": kwargs or {}, "opts": opts or {}})

    def run(self, driver, **kwargs):
        return self.ask({"op": "run", "driver": driver, "kwargs": kwargs})

    def _ask(self, request):
        import torch   # here, so that importing this module (to start the fork server early) is instant
        buf = io.BytesIO()
        torch.save(request, buf)
        try:
            self._requests.write(struct.pack(">Q", len(buf.getvalue())) + buf.getvalue())
            self._requests.flush()
            head = self._read(8)
            size = struct.unpack(">Q", head)[0]
            if size > MAX_REPLY:
                raise ChildGone(f"answered {size} bytes, more than the {MAX_REPLY} a reply may have")
            reply = torch.load(io.BytesIO(self._read(size)), weights_only=True)
            if not isinstance(reply, dict) or "ok" not in reply:
                raise ChildGone("answered something that is not a reply")
        except ChildGone:
            self.kill()
            raise
        except Exception as exc:   # noqa: BLE001 - a broken pipe, a reply that does not unpickle safely, ...
            reason = self._ended() or f"answered something unreadable ({type(exc).__name__})"
            self.kill()
            raise ChildGone(reason) from None
        if reply["ok"]:
            return reply["value"]
        if reply["error"] == "NotImplementedError":
            raise NotImplementedError(reply["message"])
        raise StudentRaised(reply["error"], reply["message"])

    def _read(self, n):
        chunks, got = [], 0
        while got < n:
            left = None if self.deadline is None else self.deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChildGone(self.late or "did not finish in time")
            ready, _, _ = select.select([self._replies], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._replies, min(n - got, 2 ** 20))
            if not chunk:
                raise ChildGone(self._ended(wait=True) or "closed its answers before answering")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _ended(self, wait=False):
        """'exited with status 0 before answering' when the child has ended, else ''."""
        if self.pid is None:
            return ""
        try:
            code = zygote(self.python).status(self.pid, wait=2 if wait else 0)
        except (OSError, ChildGone):
            return "ended before answering (and took the fork server with it)"
        if code is None:
            return ""
        if code < 0:
            return f"was ended by signal {-code} before answering"
        return f"exited with status {code} before answering"


class Zygote:
    """The fork server (course/child.py zygote): one interpreter that imported torch and nothing of the
    project, forking a fresh child per request, so a child starts in milliseconds instead of seconds."""

    def __init__(self, python):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._tmp = tempfile.TemporaryDirectory(prefix="grading-zygote-")
        os.chmod(self._tmp.name, 0o755)
        self.proc = subprocess.Popen([*python, "-I", "-c", CHILD_SOURCE, "--zygote", str(theirs.fileno())],
                                     cwd=self._tmp.name, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                     start_new_session=True, env=child_environment())
        theirs.close()
        self.sock, self.counted = ours, set()

    def alive(self):
        return self.proc.poll() is None

    def _ask(self, message, fds=()):
        socket.send_fds(self.sock, [message.encode()], list(fds))
        reply = self.sock.recv(16)
        if len(reply) != 16:
            raise ChildGone("could not be started (the fork server is gone)")
        return struct.unpack(">qd", reply)

    def spawn(self, folder, cwd, fds):
        return self._ask(f"spawn\0{folder}\0{cwd}", fds)[0]

    def status(self, pid, wait=0):
        """The child's exit code (negative: the signal that ended it), or None while it runs (after `wait` s).
        The CPU seconds of an ended child are added to CHILD_CPU once."""
        end = time.monotonic() + wait
        while True:
            code, cpu = self._ask(f"status\0{pid}")
            if code > -(1 << 39):
                if pid not in self.counted:
                    self.counted.add(pid)
                    CHILD_CPU[0] += cpu
                return code
            if time.monotonic() >= end:
                return None
            time.sleep(0.01)

    def close(self):
        with _quiet():
            self.sock.close()
        with _quiet():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._tmp.cleanup()


_ZYGOTES = {}
CHILD_CPU = [0.0]      # CPU seconds of every ended child of this process: the time the student's code ran


def zygote(python, fresh=False):
    """The fork server for this interpreter command, started on first use, again if it died, and anew if
    `fresh` (the caller found it dead though it looked alive)."""
    key = tuple(python)
    if fresh and key in _ZYGOTES:
        _ZYGOTES.pop(key).close()
    if key not in _ZYGOTES or not _ZYGOTES[key].alive():
        _ZYGOTES[key] = Zygote(python)
    return _ZYGOTES[key]


@atexit.register
def _close_zygotes():
    for z in _ZYGOTES.values():
        z.close()


def child_environment():
    """The environment of the child: the grader's, minus anything that points Python at other code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (OSError, ValueError, ProcessLookupError))


class Remote:
    """s.module.function(*args, **kwargs) runs the student's function in the child and returns its plain value."""

    def __init__(self, child):
        self.child = child

    def __getattr__(self, module):
        if module.startswith("_") or module == "child":
            raise AttributeError(module)
        return _RemoteModule(self.child, module)


class _RemoteModule:
    def __init__(self, child, module):
        self._child, self._module = child, module

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        qualname = f"{self._module}.{name}"
        return lambda *args, **kwargs: self._child.call(qualname, args, kwargs)["value"]
