"""The child side of grading: the only process in which a student's code runs.

The grader (course/sandbox.py) starts this file's text as `python -I -c <text> --zygote SOCKET_FD`: a fork
server that imports torch once and forks a fresh child whenever the grader asks for one, each in an empty
working folder and a session (process group) of its own. A child's import path is the student's folder and
the installed packages: nothing of course/, the reference or the tests. It answers requests, one at a time,
each a frame (8-byte length, then a torch.save'd dict of plain values and tensors, read back with
weights_only=True):

    {"op": "define", "source": ...}                    helper classes for the drivers (toy models, tokenizers)
    {"op": "inject", "module": m, "source": ...}       a function's reference code into the student's module m
    {"op": "call", "fn": "sep.loss_ortho", "args": [...], "kwargs": {...}, "opts": {...}}
    {"op": "run", "driver": name, "kwargs": {...}}     a driver below (a training step, a momentum update, ...)

and replies {"ok": True, "value": ...} or {"ok": False, "error": type name, "message": ...}. The reply holds
tensors, numbers, strings, lists and dicts only; the grader computes every expected value and every verdict.
Placeholders in the arguments ({"__kind__": ...}) become leaves that require grad, a row-by-row score
function, the student's Args, or an instance of a defined class. This file imports nothing of the project.
"""
import contextlib
import importlib
import io
import os
import random
import struct
import sys
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

HELPERS = {"torch": torch, "nn": nn, "F": F}      # the namespace of `define` (toy models, tokenizers)
RECORD = {}                                        # what the placeholders observed during one call


def read_frame(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    return torch.load(io.BytesIO(stream.read(struct.unpack(">Q", head)[0])), weights_only=True)


def write_frame(stream, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    stream.write(struct.pack(">Q", len(buf.getvalue())) + buf.getvalue())
    stream.flush()


def plain(x):
    """Tensors (detached plain copies), numbers, strings, None, lists and dicts of them; anything else named."""
    if torch.is_tensor(x):
        return x.detach().clone().as_subclass(torch.Tensor)
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    return {"__unsupported__": type(x).__name__}


def module(name):
    return importlib.import_module(name)


def function(qualname):
    mod, *path = qualname.split(".")
    obj = module(mod)
    for part in path:
        obj = getattr(obj, part)
    return obj


def materialize(x, leaves):
    """Placeholders -> live objects; tensors that become leaves are collected in `leaves`."""
    if isinstance(x, list):
        return [materialize(v, leaves) for v in x]
    if not isinstance(x, dict):
        return x
    kind = x.get("__kind__")
    if kind is None:
        return {k: materialize(v, leaves) for k, v in x.items()}
    if kind == "leaf":                       # a raw tensor that requires grad, normalized on the call path
        leaf = x["t"].clone().requires_grad_()
        leaves.append(leaf)
        return F.normalize(leaf, dim=-1) if x["normalize"] else leaf
    if kind == "rows":                       # rows(a, b) -> scores[a:b], the block sizes asked for recorded
        scores = x["t"]
        RECORD["asked"] = []

        def rows(a, b):
            RECORD["asked"].append(b - a)
            return scores[a:b]
        return rows
    if kind == "args":                       # the student's module.Args(**kw)
        return module(x["module"]).Args(**x["kw"])
    if kind == "object":                     # an instance of a defined helper class
        return HELPERS[x["cls"]](*materialize(x["args"], leaves))
    raise ValueError(f"unknown placeholder {kind}")


@contextlib.contextmanager
def largest_product():
    """Record the largest result (elements) of a matrix product formed while inside: RECORD['largest']."""
    RECORD["largest"] = 0
    names = [(torch, "matmul"), (torch, "mm"), (torch, "bmm"), (torch, "einsum"), (torch.Tensor, "matmul"),
             (torch.Tensor, "mm"), (torch.Tensor, "__matmul__"), (torch.Tensor, "__rmatmul__"), (F, "linear"),
             (torch, "cdist"), (F, "cosine_similarity")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in names]

    def wrap(fn):
        def measured(*a, **k):
            out = fn(*a, **k)
            if torch.is_tensor(out):
                RECORD["largest"] = max(RECORD["largest"], out.numel())
            return out
        return measured
    for owner, name, fn in saved:
        setattr(owner, name, wrap(fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def grad_flags(x):
    """Which tensors of a result (a tensor, or a list or tuple of them) require grad."""
    if isinstance(x, (list, tuple)):
        return [grad_flags(v) for v in x]
    return bool(torch.is_tensor(x) and x.requires_grad)


def pick(out, key):
    """The scalar of a result that backward runs from: the result, out[key], or the sum of several keys."""
    if key is None:
        return out
    if isinstance(key, list):
        return sum(out[k] for k in key)
    return out[key]


def call(fn, args=(), kwargs=None, opts=None):
    opts, kwargs = opts or {}, kwargs or {}
    RECORD.clear()
    if "seed" in opts:
        torch.manual_seed(opts["seed"])
        random.seed(opts["seed"])
    leaves = []
    args, kwargs = materialize(list(args), leaves), materialize(dict(kwargs), leaves)
    f = function(fn)
    with contextlib.ExitStack() as stack:
        if opts.get("autocast"):
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        if opts.get("track_products"):
            stack.enter_context(largest_product())
        outs = [f(*args, **kwargs) for _ in range(opts.get("repeat", 1))]
    value = outs if "repeat" in opts else outs[0]
    reply = {"value": plain(value), "requires_grad": grad_flags(value)}
    if "backward" in opts:
        pick(outs[0], opts["backward"]).backward()
        reply["grads"] = [None if leaf.grad is None else leaf.grad.clone() for leaf in leaves]
    if opts.get("return_args"):
        reply["args"] = plain(args)
    reply["record"] = plain(dict(RECORD))
    return reply


# ============================== drivers: a whole training step, a momentum update ======================
def parts_of(model, names):
    """{name: [parameters]} of attribute paths ('visual', 'bert.text_layers', 'logit_scale')."""
    out = {}
    for name in names:
        obj = model
        for attr in name.split("."):
            obj = getattr(obj, attr)
        out[name] = list(obj.parameters()) if isinstance(obj, nn.Module) else [obj]
    return out


def snapshot(parts):
    return {k: [p.detach().clone() for p in v] for k, v in parts.items()}


def grad_sums(parts):
    return {k: sum(0.0 if p.grad is None else p.grad.abs().sum().item() for p in v) for k, v in parts.items()}


def train(mod, model, batch, args, steps, extra=(), after_step=None):
    """Adam steps on one batch: the losses, whether every term was finite, and (optionally) what after_step saw."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3 if not extra else 1e-3)
    losses, finite, seen = [], [], []
    for _ in range(steps):
        terms = mod.compute_losses(model, batch, args, *extra)
        finite.append(all(bool(torch.isfinite(v).all()) for v in terms.values()))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if after_step:
            seen.append(after_step())
        losses.append(terms["loss"].item())
    return {"losses": losses, "finite": finite, "seen": seen}


def learn_two_tower(script, tiny, batch, method_terms, parts, steps, seed):
    mod = module(script)
    args = mod.Args(**tiny)
    torch.manual_seed(seed)
    model = mod.build_model(args, range(50)).train()
    batch = dict(batch)
    batch["image_aug"] = batch["image_aug"].clone().requires_grad_()
    parts = parts_of(model, parts)
    terms = mod.compute_losses(model.eval(), batch, args)        # eval mode: batch norm couples the views in train
    sum(terms[k] for k in method_terms).backward()
    out = {"grad": grad_sums(parts), "grad_image_aug": float(batch["image_aug"].grad.abs().sum())
           if batch["image_aug"].grad is not None else 0.0}
    model.train()
    batch["image_aug"] = batch["image_aug"].detach()
    model.zero_grad(set_to_none=True)
    out["before"] = snapshot(parts)
    out.update(train(mod, model, batch, args, steps))
    out["after"] = snapshot(parts)
    return out


def learn_fusion(script, tiny, captions, image, parts, steps, seed):
    mod, data = module(script), module("data")
    tok = data.build_tokenizer(data.DataArgs())
    args = mod.Args(**tiny)
    torch.manual_seed(0)
    model = mod.build_model(args, tok).train()
    t = tok(captions, padding=True, return_tensors="pt")
    batch = {"image": image, "input_ids": t["input_ids"], "attention_mask": t["attention_mask"],
             "index": torch.arange(len(captions))}
    parts = parts_of(model, [p for p in parts if p != "codebook" or hasattr(model, "codebook")])
    momentum = model.momentum_parameters()
    torch.manual_seed(seed)
    mod.compute_losses(model, batch, args, 0.4)["loss"].backward()
    out = {"grad": grad_sums(parts), "momentum_grad": any(p.grad is not None for p in momentum)}
    model.zero_grad(set_to_none=True)
    out["before"], out["momentum_before"] = snapshot(parts), [p.detach().clone() for p in momentum]

    def after_step():
        mod.momentum_update(model.momentum_pairs(), 0.9)
        return [p.detach().clone() for o, _ in model.momentum_pairs() for p in o.parameters()]
    out.update(train(mod, model, batch, args, steps, (0.4,), after_step))
    out["after"], out["momentum_after"] = snapshot(parts), [p.detach().clone() for p in momentum]
    out["queue_ptr"], out["image_queue"] = int(model.queue_ptr), model.image_queue.detach().clone()
    return out


def momentum(pairs, m):
    """The student's momentum_update on (online, momentum) pairs of Linear(3, 4) + LayerNorm(4) from the given
    parameters; returns both sides' parameters afterwards and whether the momentum side requires grad."""
    built = []
    for online_params, momentum_params in pairs:
        sides = []
        for params in (online_params, momentum_params):
            net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
            with torch.no_grad():
                for p, v in zip(net.parameters(), params):
                    p.copy_(v)
            sides.append(net)
        for p in sides[1].parameters():
            p.requires_grad_(False)
        built.append(tuple(sides))
    module("albef_fusion").momentum_update(built, m)
    return {"online": [[p.detach().clone() for p in o.parameters()] for o, _ in built],
            "momentum": [[p.detach().clone() for p in mm.parameters()] for _, mm in built],
            "momentum_requires_grad": any(p.requires_grad for _, mm in built for p in mm.parameters())}


def rerank(captions, table, img, txt, k):
    """The student's rerank_retrieval on a grid pair set scored by a table; returns the metrics and the pairs
    itm_score was asked for."""
    ps, model = HELPERS["GridPairSet"](captions), HELPERS["TableScorer"](table)
    pixels = lambda im: torch.tensor(float(im.getpixel((0, 0)))).expand(3, 2, 2)   # noqa: E731 image i -> level i
    out = module("eval").rerank_retrieval(model, ps, img, txt, pixels, HELPERS["GridTokenizer"](), "cpu", 8, k=k)
    return {"metrics": out, "calls": [list(c) for c in model.calls]}


def zeroshot(classes, templates):
    """The student's zeroshot_classifier with the toy model whose text features have unequal lengths."""
    return module("eval").zeroshot_classifier(HELPERS["UnnormalizedToy"](), HELPERS["ToyTokenizer"](), classes,
                                              templates, "cpu", max_len=16)


DRIVERS = {"learn_two_tower": learn_two_tower, "learn_fusion": learn_fusion, "momentum": momentum,
           "rerank": rerank, "zeroshot": zeroshot}


def handle(request):
    op = request["op"]
    if op == "define":
        exec(compile(request["source"], "<grader helpers>", "exec"), HELPERS)
        return None
    if op == "inject":                       # the reference's version of a function the student does not write
        mod = module(request["module"])
        exec(compile(request["source"], f"<reference {request['module']}>", "exec"), mod.__dict__)
        return None
    if op == "call":
        return call(request["fn"], request.get("args", ()), request.get("kwargs"), request.get("opts"))
    if op == "run":
        RECORD.clear()
        return plain(DRIVERS[request["driver"]](**request["kwargs"]))
    raise ValueError(f"unknown request {op}")


def main(student_dir, request_fd, reply_fd):
    sys.path.insert(0, student_dir)
    sys.argv = [os.path.join(student_dir, "student")]
    torch.set_num_threads(1)
    import zlib

    import numpy as np
    from PIL import Image
    HELPERS.update(np=np, Image=Image, zlib=zlib)
    requests, replies = os.fdopen(int(request_fd), "rb"), os.fdopen(int(reply_fd), "wb")
    while True:
        request = read_frame(requests)
        if request is None:
            return
        try:
            if request["op"] == "define" and "data" in request.get("needs", ()):
                HELPERS["data"] = module("data")
            reply = {"ok": True, "value": handle(request)}
        except BaseException as exc:   # noqa: BLE001 - SystemExit and KeyboardInterrupt too: all are answers
            reply = {"ok": False, "error": type(exc).__name__, "message": " ".join(str(exc).split())[:500],
                     "where": traceback.format_exc(limit=-3)[-1500:]}
        write_frame(replies, reply)


def zygote(sock_fd):
    """The fork server: imports torch once, then forks one fresh child per request from the grader (a
    message 'spawn\0FOLDER\0CWD' with the child's request, reply and output descriptors) and reports how
    children ended ('status\0PID'). It never runs a student's code itself."""
    import signal
    import socket
    import zlib  # noqa: F401 - imported once here, for every child

    import numpy  # noqa: F401
    from PIL import Image  # noqa: F401
    try:                                          # the text towers' library: seconds to import, once here
        from transformers import AutoModel, BertConfig, BertModel  # noqa: F401
    except ImportError:
        pass
    torch.set_num_threads(1)
    sock, ended = socket.socket(fileno=int(sock_fd)), {}
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
        if not msg:
            return
        op, *rest = msg.decode().split("\0")
        if op == "spawn":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:                              # the child: its own session, its own output
                code = 1
                try:
                    sock.close()
                    os.setsid()
                    os.chdir(rest[1])
                    os.dup2(fds[2], 1)
                    os.dup2(fds[2], 2)
                    main(rest[0], fds[0], fds[1])
                    code = 0
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            sock.send(struct.pack(">qd", pid, 0.0))
        elif op == "status":    # the exit code (a large negative number while running) and the CPU time used
            pid = int(rest[0])
            if pid not in ended:
                try:
                    done, status, usage = os.wait4(pid, os.WNOHANG)
                    if done:
                        ended[pid] = os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
                except ChildProcessError:
                    ended[pid] = -1000, 0.0
            sock.send(struct.pack(">qd", *ended.get(pid, (-(1 << 40), 0.0))))


if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        zygote(sys.argv[2])
    else:
        main(*sys.argv[1:4])
