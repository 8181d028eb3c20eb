"""The checks of every graded function, and one learning check per method script (never shipped to students).

A check is `fn(s, r)` and runs in the grader's process. `s` is the student's copy as seen from there
(course/sandbox.py Remote): `s.sep.loss_ortho(zv, zv_i, zt, zt_i)` sends the inputs to the child process in
which the student's code runs and returns its result as plain tensors and numbers; `s.child` makes the other
requests (a call with gradients, under bf16 autocast, repeated, a training step). `r` is the instructor's
reference (course/loader.py Copy), imported here and never in the child. A check returns on success and raises
Fail with a one-line reason a student understands ("L_ortho of orthogonal features: expected 0, got 0.31");
what the student's code raised comes back as the reason. Every input is drawn here, from `draw(seed)`'s seed,
chosen when the grading starts, so no answer can be a constant copied from a run.

What is compared against what: loops and closed forms (most of them are the loops the project's own tests
use, imported from tests/, which the student copy does not ship), invariances (permuting the batch, scaling),
limits (orthogonal, collapsed, perfectly matched), the reference's value where a loop would be the algorithm
itself (IPOT with general marginals), gradients in value (the gradient with respect to the raw parameters of
the real call path, before their normalization, against the reference's, by relative error), bf16 tensors
under bf16 autocast (what a --precision bf16 run passes), statistics sized so that a sampler's ε-sized mistake
is caught with probability ≥ 0.999, and both index orders of every tie. The learning check trains the student's
tiny model in the child for a few dozen steps on one synthetic batch and returns its measurements (gradient
sums per part, losses, parameters before and after); the grader judges them: the loss falls, every part
moves, the method's own terms reach both towers and the augmented views, and (fusion models) the momentum
model follows the moving average the grader computes.
"""
import importlib
import inspect
import math
import sys

import torch
import torch.nn.functional as F

from course.make_assignment import ROOT
from course.sandbox import StudentRaised

if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))


class Fail(AssertionError):
    """A check failed: the message is the one-line reason shown to the student."""


CHECKS = {}     # qualified function -> [(description, fn)]
LEARNING = {}   # method script -> (description, fn)


def check(function, description):
    def register(fn):
        CHECKS.setdefault(function, []).append((description, fn))
        return fn
    return register


def learning(script, description):
    def register(fn):
        LEARNING[script] = (description, fn)
        return fn
    return register


class _TestHelpers:
    """The loops and tiny models of the project's tests (tests/), imported on first use."""
    WHERE = {"unit": "tiny", "nce_loop": "test_clip_base", "uni_loop": "test_regularizers",
             "bridge_closed_form": "test_regularizers",
             "fake_batch": "test_regularizers", "TINY_TWO_TOWER": ("test_regularizers", "TINY_MODEL"),
             "TINY_ALBEF": ("test_albef", "TINY_MODEL"),
             "distilled_nce_loop": "test_albef", "exact_uniform_ot": "test_codis", "sinkhorn": "test_codis",
             "uniform": "test_codis", "brute_force_recall": "test_eval", "ToyModel": "test_eval",
             "ToyTwoTower": "test_eval",
             "ToyTokenizer": "test_eval", "brute_force_rerank": "test_albef", "GridPairSet": "test_albef",
             "GridTokenizer": "test_albef", "TableScorer": "test_albef"}

    def __getattr__(self, name):
        module, attr = self.WHERE[name] if isinstance(self.WHERE[name], tuple) else (self.WHERE[name], name)
        return getattr(importlib.import_module(module), attr)

    def preload(self):
        """Import them all now, before a student's copy is active (their own imports must see the reference)."""
        for name in self.WHERE:
            getattr(self, name)


T = _TestHelpers()
_BASE = [0]


def draw(seed):
    """Every input of every check is drawn from generators offset by `seed` (grade.py picks it per grading)."""
    _BASE[0] = int(seed)


def gen(seed):
    return torch.Generator().manual_seed(seed + _BASE[0])


def unit(n, e, seed):
    """n random unit rows of dimension e (float64)."""
    return T.unit(n, e, seed=seed + _BASE[0])


def sign_units(n, e, seed):
    """n random rows of ±1/√e, e a power of 4: unit norm exactly, also in bf16 (re-normalizing them is a no-op)."""
    return (torch.randint(0, 2, (n, e), generator=gen(seed)).double() * 2 - 1) / math.sqrt(e)


def child_seed(seed):
    """The seed the child sets before a call whose draws are the student's (masking, hard negatives)."""
    return seed + _BASE[0]
# ============================== helpers =============================================================
def value(x, what):
    """A finite Python float from a number or a one-element tensor, else Fail."""
    if torch.is_tensor(x):
        if x.numel() != 1:
            raise Fail(f"{what}: expected a single number, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if not isinstance(x, (int, float)):
        raise Fail(f"{what}: expected a number, got {type(x).__name__}")
    if not math.isfinite(x):
        raise Fail(f"{what}: expected a finite number, got {x}")
    return float(x)


def close(got, want, what, rel=1e-5, abs=1e-6):
    g, w = value(got, what), float(want)
    if not math.isclose(g, w, rel_tol=rel, abs_tol=abs):
        raise Fail(f"{what}: expected {w:.6g}, got {g:.6g}")


def require(condition, reason):
    if not condition:
        raise Fail(reason)


def entry(got, key, what):
    """got[key] of a result that should be a dict, else Fail saying what came back instead."""
    require(isinstance(got, dict), f"{what}: expected a dict of metrics, got {type(got).__name__}")
    require(key in got, f"{what}: the result has no '{key}'; keys: {sorted(got)}")
    return got[key]


def tensors_close(got, want, what, atol=1e-6):
    require(torch.is_tensor(got), f"{what}: expected a tensor, got {type(got).__name__}")
    require(tuple(got.shape) == tuple(want.shape),
            f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    err = (got.double() - want.double()).abs().max().item()
    require(err <= atol, f"{what}: off by up to {err:.3g}")


def leaves(*shapes, seed=0):
    """Random float32 tensors (the raw features before normalization)."""
    g = gen(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


def scale(tau):
    """logit_scale = log(1/τ) (float64)."""
    return torch.tensor(math.log(1 / tau), dtype=torch.float64)


# ---------------------------------------------- inputs that travel to the child
class Leaf:
    """A raw input that requires grad; by default normalized on the way in, as the real call path does
    (z = F.normalize(proj(x))), so the gradient is compared where a student's mistake shows."""

    def __init__(self, name, tensor, normalize=True):
        self.name, self.tensor, self.normalize = name, tensor, normalize


class ArgsOf:
    """The Args of a method script: the student's in the child, the reference's here."""

    def __init__(self, module, **kw):
        self.module, self.kw = module, kw


def for_child(x):
    """Leaf / ArgsOf -> the child's placeholders (course/child.py materialize), the rest as it is."""
    if isinstance(x, Leaf):
        return {"__kind__": "leaf", "t": x.tensor, "normalize": x.normalize}
    if isinstance(x, ArgsOf):
        return {"__kind__": "args", "module": x.module, "kw": x.kw}
    if isinstance(x, (list, tuple)):
        return [for_child(v) for v in x]
    if isinstance(x, dict):
        return {k: for_child(v) for k, v in x.items()}
    return x


def for_reference(x, r, live):
    """The same inputs for the reference, here: leaves (collected in `live`, in the child's order) and Args."""
    if isinstance(x, Leaf):
        leaf = x.tensor.clone().requires_grad_()
        live.append((x.name, leaf))
        return F.normalize(leaf, dim=-1) if x.normalize else leaf
    if isinstance(x, ArgsOf):
        return getattr(r, x.module).Args(**x.kw)
    if isinstance(x, (list, tuple)):
        return [for_reference(v, r, live) for v in x]
    if isinstance(x, dict):
        return {k: for_reference(v, r, live) for k, v in x.items()}
    return x


def call(s, fn, *args, opts=None, **kwargs):
    """The child's whole reply to one call of the student's `fn` (module.function) with these options."""
    return s.child.call(fn, for_child(list(args)), for_child(kwargs), opts)


def _picked(out, key):
    return out if key is None else sum(out[k] for k in key) if isinstance(key, list) else out[key]


def gradients_agree(s, r, fn, *args, backward=None, what, rel=2e-3, **kwargs):
    """The gradient of the student's fn with respect to every Leaf equals the reference's (relative error ≤
    rel); `backward`: the key (or keys, summed) of a dict result to differentiate. A Leaf that the reference's
    result does not depend on must receive none."""
    reply = call(s, fn, *args, opts={"backward": backward}, **kwargs)
    live = []
    module, name = fn.split(".")
    ref_args, ref_kwargs = for_reference(list(args), r, live), for_reference(kwargs, r, live)
    _picked(getattr(getattr(r, module), name)(*ref_args, **ref_kwargs), backward).backward()
    for (leaf_name, leaf), got in zip(live, reply["grads"]):
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        got = torch.zeros_like(leaf) if got is None else got
        require(tuple(got.shape) == tuple(want.shape), f"{what}: the gradient of {leaf_name} has the wrong shape")
        require(bool(torch.isfinite(got).all()), f"{what}: the gradient with respect to {leaf_name} is not finite")
        size, err = want.double().norm().item(), (got.double() - want.double()).norm().item()
        if size == 0:
            require(err <= 1e-9, f"{what}: {leaf_name} receives a gradient but should receive none (it is fixed "
                                 f"here: detach it, or compute it under no_grad)")
        else:
            require(err <= rel * size,
                    f"{what}: the gradient with respect to {leaf_name} is off by {100 * err / size:.3g}% from the "
                    f"reference's" + (" (no gradient reaches it: a detach, or a constant where the input should "
                                      "be?)" if got.abs().sum() == 0 else " (a partial detach, or a wrong factor?)"))


def bf16_agrees(s, fn, args, want, what, keys=None, rel=5e-4):
    """The student's fn, called under bf16 autocast with bf16 inputs (what a --precision bf16 run passes it),
    returns float32 values equal to `want` (the values computed in fp32 from the same bf16 inputs)."""
    got = call(s, fn, *args, opts={"autocast": True})["value"]
    require(isinstance(got, (dict, list)) if keys else True, f"{what} under bf16 autocast: expected several values, "
                                                             f"got {type(got).__name__}")
    for k, w in (zip(keys, want) if keys else [(None, want)]):
        g = got if k is None else got[k]
        label = what if k is None or isinstance(k, int) else f"{k}"
        require(torch.is_tensor(g) and g.dtype == torch.float32,
                f"{label} under bf16 autocast: expected a float32 tensor, got "
                f"{getattr(g, 'dtype', type(g).__name__)}")
        close(g, w, f"{label} under bf16 autocast from bf16 features (the loss math must run in fp32)", rel=rel)


# ============================== A1 clip_base.py: nce, loss_con ========================================
@check("clip_base.nce", "matches a loop over the batch at τ = 0.07, in both argument orders")
def _(s, r):
    a, b = unit(7, 5, seed=1), unit(7, 5, seed=2)
    close(s.clip_base.nce(a, b, scale(0.07)), T.nce_loop(a, b, 0.07), "NCE(a, b) of random unit features")
    close(s.clip_base.nce(b, a, scale(0.07)), T.nce_loop(b, a, 0.07),
          "NCE(b, a) (the softmax runs over the batch of the second argument)")


@check("clip_base.nce", "τ = exp(−logit_scale): the loop again at τ = 0.5")
def _(s, r):
    a, b = unit(6, 4, seed=3), unit(6, 4, seed=4)
    close(s.clip_base.nce(a, b, scale(0.5)), T.nce_loop(a, b, 0.5), "NCE at τ = 0.5 (logit_scale = log 2)")


@check("clip_base.nce", "limits: perfectly matched pairs give 0, identical features give log N")
def _(s, r):
    e = torch.eye(4, dtype=torch.float64)
    close(s.clip_base.nce(e, e, scale(0.01)), 0.0, "NCE of perfectly matched one-hot pairs at τ = 0.01", abs=1e-6)
    same = torch.ones(4, 3, dtype=torch.float64) / math.sqrt(3)
    close(s.clip_base.nce(same, same, scale(1.0)), math.log(4), "NCE of 4 identical pairs (every row uniform)")


@check("clip_base.nce", "permuting the pairs (the same permutation of a and b) leaves it unchanged")
def _(s, r):
    a, b = unit(9, 6, seed=5), unit(9, 6, seed=6)
    p = torch.randperm(9, generator=gen(0))
    once = value(s.clip_base.nce(a, b, scale(0.07)), "NCE")
    close(s.clip_base.nce(a[p], b[p], scale(0.07)), once, "NCE of the same pairs in another order")
    # the value itself as well: a constant would pass the invariance above
    close(once, r.clip_base.nce(a, b, scale(0.07)), "NCE of the pairs in their first order")


@check("clip_base.nce", "the gradient with respect to a, b (before normalization) and logit_scale equals the "
                        "reference's")
def _(s, r):
    ra, rb = leaves((6, 5), (6, 5), seed=7)
    gradients_agree(s, r, "clip_base.nce", Leaf("a", ra), Leaf("b", rb),
                    Leaf("logit_scale", torch.tensor(math.log(1 / 0.07)), normalize=False), what="NCE(a, b)")


@check("clip_base.nce", "bf16 features under bf16 autocast give the fp32 value (what a --precision bf16 run "
                        "computes)")
def _(s, r):
    # at τ = 0.013 the logits reach ±30, where bf16 keeps steps of 0.0625 to 0.125: bf16 logits move the loss by
    # 1e-4 to 1e-3, fp32 logits by 1e-7; the rows are exactly unit-norm in bf16 (re-normalizing is a no-op)
    a, b = sign_units(16, 64, seed=8).bfloat16(), sign_units(16, 64, seed=9).bfloat16()
    bf16_agrees(s, "clip_base.nce", (a, b, torch.tensor(math.log(1 / 0.013))),
                T.nce_loop(a.double(), b.double(), 0.013), "NCE", rel=1e-5)


def _two_views(n=6, e=4, seed=10):
    f = {"v": unit(n, e, seed=seed), "t": unit(n, e, seed=seed + 1)}
    f_a = {"v": unit(n, e, seed=seed + 2), "t": unit(n, e, seed=seed + 3)}
    loops = {"v2t": T.nce_loop(f["v"], f["t"], 0.07), "t2v": T.nce_loop(f["t"], f["v"], 0.07),
             "v2v": T.nce_loop(f["v"], f_a["v"], 0.07), "t2t": T.nce_loop(f["t"], f_a["t"], 0.07)}
    return f, f_a, loops


TERM_NAMES = {"v2t": "L_V2T = NCE(z_V, z_T)", "t2v": "L_T2V = NCE(z_T, z_V)", "v2v": "L_V2V = NCE(z_V, z_V^a)",
              "t2t": "L_T2T = NCE(z_T, z_T^a)"}


@check("clip_base.loss_con", "each term is the right NCE: v2t, t2v (cross-modal), v2v, t2t (against the views)")
def _(s, r):
    f, f_a, loops = _two_views()
    terms = s.clip_base.loss_con(f, f_a, scale(0.07))
    require(isinstance(terms, dict), f"loss_con returns a dict of terms, not {type(terms).__name__}")
    for k, want in loops.items():
        require(k in terms, f"the returned dict has no '{k}' ({TERM_NAMES[k]}); its keys: {sorted(terms)}")
        close(terms[k], want, TERM_NAMES[k])


@check("clip_base.loss_con", "con = ¼ (L_V2T + L_T2V + L_V2V + L_T2T)")
def _(s, r):
    f, f_a, loops = _two_views(seed=20)
    terms = s.clip_base.loss_con(f, f_a, scale(0.07))
    require("con" in terms, f"the returned dict has no 'con'; its keys: {sorted(terms)}")
    close(terms["con"], sum(loops.values()) / 4, "L_con")


@check("clip_base.loss_con", "plain CLIP: only v2t, t2v and con = ½ (L_V2T + L_T2V), even when views are passed")
def _(s, r):
    f, f_a, loops = _two_views(seed=30)
    for views in (None, f_a):
        terms = s.clip_base.loss_con(f, views, scale(0.07), plain_clip=True)
        require(set(terms) == {"v2t", "t2v", "con"},
                f"plain CLIP returns v2t, t2v and con only, got {sorted(terms)}")
        close(terms["con"], (loops["v2t"] + loops["t2v"]) / 2, "plain CLIP's L = ½ (L_V2T + L_T2V)")


@check("clip_base.loss_con", "the gradient of L_con with respect to z_V, z_T and both augmented views equals "
                             "the reference's")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, seed=40)
    v, t, va, ta = (Leaf(n, x) for n, x in zip(("z_V", "z_T", "z_V^a", "z_T^a"), raw))
    gradients_agree(s, r, "clip_base.loss_con", {"v": v, "t": t}, {"v": va, "t": ta}, scale(0.07).float(),
                    backward="con", what="L_con")


# ============================== the two-tower learning check (A1-A4) ===================================
TWO_TOWER_PARTS = {"visual": "the image encoder", "text": "the text encoder", "image_proj": "the image projection",
                   "text_proj": "the text projection"}


def judge_training(out, parts, steps):
    """The loss fell over the steps on one batch, every loss term stayed finite, every part moved."""
    bad = [i for i, ok in enumerate(out["finite"]) if not ok]
    require(not bad, f"a loss term is not finite at step {bad[0]}" if bad else "")
    losses = out["losses"]
    require(len(losses) == steps, f"expected {steps} training steps, the child reported {len(losses)}")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    require(last < first - 0.05 * max(1.0, abs(first)),
            f"the training loss did not fall in {steps} steps on one batch: {first:.3f} -> {last:.3f}")
    for attr, name in parts.items():
        moved = any(not torch.equal(a, b) for a, b in zip(out["before"][attr], out["after"][attr]))
        require(moved, f"{name} did not move in training")


def two_tower_learning(s, script, method_terms, own=(), steps=30):
    """The student's training step, in the child: the method's own terms reach both towers, the method's parts
    and the augmented images (in eval mode, since in train mode batch norm couples the two views, one batch of
    2N, and every term would reach both); then `steps` Adam steps on one batch."""
    parts = {**TWO_TOWER_PARTS, **{attr: f"the {name}" for name, attr in own}}
    out = s.child.run("learn_two_tower", script=script, tiny=dict(T.TINY_TWO_TOWER),
                      batch=T.fake_batch(8, seed=child_seed(0)), method_terms=list(method_terms), parts=list(parts),
                      steps=steps, seed=child_seed(0))
    what = " + ".join(f"terms['{k}']" for k in method_terms)
    for attr, name in parts.items():
        require(out["grad"][attr] > 0, f"the gradient of {what} does not reach {name}: is a tower detached?")
    require(out["grad_image_aug"] > 0, f"{what} does not depend on the augmented images: the loss ignores its views")
    judge_training(out, parts, steps)


@learning("clip_base", "30 steps of clip_base's tiny model on one batch: L_con reaches both towers and the views, "
                       "the loss falls, every part moves")
def _(s, r):
    two_tower_learning(s, "clip_base", ("con",), (("temperature", "logit_scale"),))


# ============================== A2 sep.py: loss_ortho, loss_con_i, uniformity, loss_uni; eval.uniformity ===
@check("sep.loss_ortho", "matches a loop over the pairs: 1/N Σ_j (⟨z_Vj, z_Vj^i⟩² + ⟨z_Tj, z_Tj^i⟩²)")
def _(s, r):
    zv, zv_i, zt, zt_i = (unit(6, 5, seed=k) for k in (1, 2, 3, 4))
    loop = sum(float(zv[j] @ zv_i[j]) ** 2 + float(zt[j] @ zt_i[j]) ** 2 for j in range(6)) / 6
    close(s.sep.loss_ortho(zv, zv_i, zt, zt_i), loop, "L_ortho of random unit features")


@check("sep.loss_ortho", "orthogonal features give 0; parallel or anti-parallel ones give 2, the maximum")
def _(s, r):
    e = torch.eye(6, dtype=torch.float64)
    close(s.sep.loss_ortho(e[:3], e[3:], e[:3], e[3:]), 0.0, "L_ortho of orthogonal features", abs=1e-9)
    zv, zt = unit(5, 4, seed=5), unit(5, 4, seed=6)
    close(s.sep.loss_ortho(zv, zv, zt, -zt), 2.0, "L_ortho with z^i = z (image) and z^i = −z (text)")
    close(s.sep.loss_ortho(e[:3], e[3:], zt[:3], zt[:3]), 1.0,
          "L_ortho with orthogonal image pairs and parallel text pairs")


@check("sep.loss_ortho", "a mean over the batch: repeating the batch twice leaves it unchanged")
def _(s, r):
    zv, zv_i, zt, zt_i = (unit(4, 5, seed=k) for k in (7, 8, 9, 10))
    once = value(s.sep.loss_ortho(zv, zv_i, zt, zt_i), "L_ortho")
    close(s.sep.loss_ortho(*(torch.cat([x, x]) for x in (zv, zv_i, zt, zt_i))), once, "L_ortho of the batch twice")
    # the value itself as well: a constant would pass the invariance above
    close(once, r.sep.loss_ortho(zv, zv_i, zt, zt_i), "L_ortho of the batch once")


@check("sep.loss_ortho", "the gradient with respect to z_V, z_V^i, z_T and z_T^i equals the reference's")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, seed=11)
    gradients_agree(s, r, "sep.loss_ortho", *(Leaf(n, x) for n, x in zip(("z_V", "z_V^i", "z_T", "z_T^i"), raw)),
                    what="L_ortho")


@check("sep.loss_con_i", "NCE(z_V^i, z_V^{a,i}) + NCE(z_T^i, z_T^{a,i}) against loops, at τ = 0.07 and 0.5")
def _(s, r):
    zv_i, zv_ai, zt_i, zt_ai = (unit(7, 5, seed=k) for k in (12, 13, 14, 15))
    for tau in (0.07, 0.5):
        close(s.sep.loss_con_i(zv_i, zv_ai, zt_i, zt_ai, scale(tau)),
              T.nce_loop(zv_i, zv_ai, tau) + T.nce_loop(zt_i, zt_ai, tau), f"L_con^i at τ = {tau}")


@check("sep.loss_con_i", "the gradient with respect to both views of both modalities and logit_scale equals "
                         "the reference's")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, seed=16)
    gradients_agree(s, r, "sep.loss_con_i",
                    *(Leaf(n, x) for n, x in zip(("z_V^i", "z_V^{a,i}", "z_T^i", "z_T^{a,i}"), raw)),
                    Leaf("logit_scale", torch.tensor(math.log(1 / 0.07)), normalize=False), what="L_con^i")


@check("sep.uniformity", "matches a loop over the pairs j ≠ k, at t = 2 and t = 0.5")
def _(s, r):
    z = unit(7, 4, seed=17)
    for t in (2.0, 0.5):
        close(s.sep.uniformity(z, t), T.uni_loop(z, t), f"uniformity of 7 random unit points at t = {t}")


@check("sep.uniformity", "limits: collapsed points give 0, a regular simplex gives −t·8/3")
def _(s, r):
    same = unit(1, 4, seed=18).expand(6, 4)
    close(s.sep.uniformity(same), 0.0, "uniformity of 6 identical points (G_t = 1 for every pair)", abs=1e-6)
    simplex = F.normalize(torch.eye(4, dtype=torch.float64) - 0.25, dim=-1)   # ‖u − v‖² = 8/3 for every pair
    close(s.sep.uniformity(simplex), -2 * 8 / 3, "uniformity of the 4 vertices of a regular simplex at t = 2")


@check("sep.uniformity", "the gradient equals the reference's and stays finite for coincident points (no square "
                         "root of 0)")
def _(s, r):
    raw, = leaves((4, 5), seed=19)
    z = torch.cat([raw, raw[:2]])                                   # rows 4, 5 coincide with rows 0, 1
    gradients_agree(s, r, "sep.uniformity", Leaf("z", z), what="uniformity of points of which two pairs coincide")


@check("sep.loss_uni", "uniformity(z_V^i) + uniformity(z_T^i), one log per modality, against loops")
def _(s, r):
    zv_i, zt_i = unit(6, 4, seed=20), unit(6, 4, seed=21)
    for t in (2.0, 0.5):
        close(s.sep.loss_uni(zv_i, zt_i, t=t), T.uni_loop(zv_i, t) + T.uni_loop(zt_i, t), f"L_uni^i at t = {t}")
    simplex = F.normalize(torch.eye(4, dtype=torch.float64) - 0.25, dim=-1)
    same = unit(1, 4, seed=22).expand(4, 4)
    close(s.sep.loss_uni(simplex, same), -2 * 8 / 3,
          "L_uni^i of a spread image side and a collapsed text side (one log per modality, not of the sum)")


@check("sep.loss_uni", "the gradient with respect to both modalities equals the reference's")
def _(s, r):
    rv, rt = leaves((6, 5), (6, 5), seed=23)
    gradients_agree(s, r, "sep.loss_uni", Leaf("z_V^i", rv), Leaf("z_T^i", rt), what="L_uni^i")


@check("eval.uniformity", "a Python float equal to a loop over the pairs i ≠ j at t = 2")
def _(s, r):
    u = unit(9, 4, seed=24).float()
    got = s.eval.uniformity(u)
    require(isinstance(got, float), f"eval.uniformity returns a Python float (a metric), not {type(got).__name__}")
    close(got, T.uni_loop(u.double(), 2.0), "uniformity of 9 random unit points", rel=1e-4)


@check("eval.uniformity", "two points give −2‖u − v‖²; identical points give 0")
def _(s, r):
    close(s.eval.uniformity(torch.eye(2)), -4.0, "uniformity of two orthogonal unit vectors", rel=1e-5)
    close(s.eval.uniformity(torch.ones(5, 3) / math.sqrt(3)), 0.0, "uniformity of 5 identical points", abs=1e-6)


@check("eval.uniformity", "more rows than max_points: the same subset on every call, drawn at random from all "
                          "rows (not the first or last ones); fewer: every row")
def _(s, r):
    u = unit(50, 3, seed=25).float()
    a, b = s.eval.uniformity(u, max_points=20), s.eval.uniformity(u, max_points=20)
    require(a == b, f"two calls on the same 50 points (max_points 20) differ: {a:.6g} and {b:.6g}")
    close(s.eval.uniformity(u, max_points=50), T.uni_loop(u.double(), 2.0), "uniformity of 50 points with "
          "max_points 50", rel=1e-4)
    # 20 identical rows at one end, 30 spread rows: those 20 rows alone give 0; a random subset of 20 holds about
    # 8 of them (16 or more with a probability below 1e-6) and gives about −1.9
    spread, same = unit(30, 3, seed=26).float(), unit(1, 3, seed=27).float().expand(20, 3)
    for where, rows in (("first", torch.cat([same, spread])), ("last", torch.cat([spread, same]))):
        got = value(s.eval.uniformity(rows.contiguous(), max_points=20), "eval.uniformity")
        require(got < -0.5, f"with 20 identical points as the {where} of 50 rows and max_points 20 the uniformity is "
                            f"{got:.3g}: a random subset would give about −1.9 (the {where} 20 rows give 0)")


@learning("sep", "30 steps of sep's tiny model: L_Sep reaches both towers, both independent heads and the views; "
                 "the loss falls, every part moves")
def _(s, r):
    two_tower_learning(s, "sep", ("sep",), (("independent image head", "image_proj_i"),
                                           ("independent text head", "text_proj_i"), ("temperature", "logit_scale")))


# ============================== A3 bridge.py: loss_bridge ============================================
@check("bridge.loss_bridge", "matches the closed form for unit vectors at t = 0.25 and t = 0.7")
def _(s, r):
    zv_a, zv, zt = unit(8, 5, seed=1), unit(8, 5, seed=2), unit(8, 5, seed=3)
    for t in (0.25, 0.7):
        close(s.bridge.loss_bridge(zv_a, zv, zt, t), T.bridge_closed_form(zv_a, zv, zt, t), f"L_Br at t = {t}",
              abs=1e-6)


@check("bridge.loss_bridge", "one t per pair: t of shape (N, 1)")
def _(s, r):
    zv_a, zv, zt = unit(8, 5, seed=4), unit(8, 5, seed=5), unit(8, 5, seed=6)
    t = torch.rand(8, 1, generator=gen(0), dtype=torch.float64)
    close(s.bridge.loss_bridge(zv_a, zv, zt, t), T.bridge_closed_form(zv_a, zv, zt, t), "L_Br with a t per pair",
          abs=1e-6)


@check("bridge.loss_bridge", "0 on the bridge (z^a = μ), 4 at the antipode (z^a = −μ); t = 1 is z_V's end")
def _(s, r):
    zv, zt, t = unit(6, 5, seed=7), unit(6, 5, seed=8), 0.25
    mu = F.normalize(t * zv + (1 - t) * zt, dim=-1)
    close(s.bridge.loss_bridge(mu, zv, zt, t), 0.0, "L_Br with z^a = μ (on the bridge)", abs=1e-6)
    close(s.bridge.loss_bridge(-mu, zv, zt, t), 4.0, "L_Br with z^a = −μ (the farthest point)", abs=1e-5)
    close(s.bridge.loss_bridge(zv, zv, zt, 1.0), 0.0, "L_Br with t = 1 and z^a = z_V (μ is z_V)", abs=1e-6)


@check("bridge.loss_bridge", "grows as z^a moves away from μ along a great circle (the printed expansion shrinks)")
def _(s, r):
    zv, zt, w = unit(1, 5, seed=9), unit(1, 5, seed=10), unit(1, 5, seed=11)
    mu = F.normalize(0.25 * zv + 0.75 * zt, dim=-1)
    w = F.normalize(w - (w * mu).sum(-1, keepdim=True) * mu, dim=-1)
    vals = [value(s.bridge.loss_bridge(math.cos(a) * mu + math.sin(a) * w, zv, zt, 0.25), "L_Br")
            for a in torch.linspace(0, math.pi, 9).tolist()]
    require(all(b > a for a, b in zip(vals, vals[1:])),
            f"L_Br along a great circle from μ to −μ should grow, got {', '.join(f'{v:.3f}' for v in vals)}")


@check("bridge.loss_bridge", "a mean over the batch: repeating the batch twice leaves it unchanged")
def _(s, r):
    zv_a, zv, zt = unit(4, 5, seed=12), unit(4, 5, seed=13), unit(4, 5, seed=14)
    once = value(s.bridge.loss_bridge(zv_a, zv, zt, 0.25), "L_Br")
    close(s.bridge.loss_bridge(torch.cat([zv_a] * 2), torch.cat([zv] * 2), torch.cat([zt] * 2), 0.25), once,
          "L_Br of the batch twice")
    # the value itself as well: a constant would pass the invariance above
    close(once, r.bridge.loss_bridge(zv_a, zv, zt, 0.25), "L_Br of the batch once")


@check("bridge.loss_bridge", "the gradient with respect to z^a, z_V and z_T equals the reference's (no "
                             "stop-gradient on the bridge, not even on its norm)")
def _(s, r):
    ra, rv, rt = leaves((6, 5), (6, 5), (6, 5), seed=15)
    gradients_agree(s, r, "bridge.loss_bridge", Leaf("z_V^a", ra), Leaf("z_V", rv), Leaf("z_T", rt), 0.25,
                    what="L_Br")


@learning("bridge", "30 steps of bridge's tiny model: L_Br reaches both towers and the augmented images; the loss "
                    "falls, every part moves")
def _(s, r):
    two_tower_learning(s, "bridge", ("bridge",))


# ============================== A4 geocons.py: loss_gc, loss_gc_aug ==================================
def _dot(u, v):
    return float(u @ v)


def gc_loop(zv, zt):
    n = len(zv)
    return sum((_dot(zv[j], zt[k]) - _dot(zv[k], zt[j])) ** 2 + (_dot(zv[j], zv[k]) - _dot(zt[j], zt[k])) ** 2
               for j in range(n) for k in range(n)) / n


def gc_aug_loop(zv, zt, zv_a, zt_a):
    n = len(zv)
    pairs = sum((_dot(zv[j], zv[k]) - _dot(zv_a[j], zv_a[k])) ** 2 + (_dot(zt[j], zt[k]) - _dot(zt_a[j], zt_a[k])) ** 2
                for j in range(n) for k in range(n)) / n
    return pairs + sum((_dot(zv[j], zt[j]) - _dot(zv_a[j], zt_a[j])) ** 2 for j in range(n)) / n


def rotation(e, seed):
    q, _ = torch.linalg.qr(torch.randn(e, e, generator=gen(seed), dtype=torch.float64))
    return q


@check("geocons.loss_gc", "matches a loop over the pairs (j, k), divided by N")
def _(s, r):
    zv, zt = unit(5, 4, seed=1), unit(5, 4, seed=2)
    close(s.geocons.loss_gc(zv, zt), gc_loop(zv, zt), "L_GC of random unit features")


@check("geocons.loss_gc", "identical modalities give 0; rotating both modalities together changes nothing")
def _(s, r):
    zv, zt = unit(6, 4, seed=3), unit(6, 4, seed=4)
    close(s.geocons.loss_gc(zv, zv), 0.0, "L_GC with z_T = z_V", abs=1e-6)
    q = rotation(4, 0)
    once = value(s.geocons.loss_gc(zv, zt), "L_GC")
    close(s.geocons.loss_gc(zv @ q, zt @ q), once, "L_GC after rotating both modalities by the same rotation")
    # the value itself as well: a constant would pass the invariance above
    close(once, r.geocons.loss_gc(zv, zt), "L_GC of different modalities (not 0)")


@check("geocons.loss_gc", "CyCLIP's normalization: N times the mean over the N² pairs (it grows with the batch)")
def _(s, r):
    zv, zt = unit(32, 8, seed=5), unit(32, 8, seed=6)
    s_vt, s_vv, s_tt = zv @ zt.t(), zv @ zv.t(), zt @ zt.t()
    want = ((s_vt - s_vt.t()).square().mean() + (s_vv - s_tt).square().mean()).item() * 32
    close(s.geocons.loss_gc(zv, zt), want, "L_GC of a batch of 32")


@check("geocons.loss_gc", "the gradient with respect to z_V and z_T equals the reference's")
def _(s, r):
    rv, rt = leaves((6, 5), (6, 5), seed=7)
    gradients_agree(s, r, "geocons.loss_gc", Leaf("z_V", rv), Leaf("z_T", rt), what="L_GC")


@check("geocons.loss_gc_aug", "matches a loop: the two views' pair sums / N + the matched term ⟨z_Vj, z_Tj⟩")
def _(s, r):
    zv, zt, zv_a, zt_a = (unit(5, 4, seed=k) for k in (8, 9, 10, 11))
    close(s.geocons.loss_gc_aug(zv, zt, zv_a, zt_a), gc_aug_loop(zv, zt, zv_a, zt_a), "L_GC^a of random features")


@check("geocons.loss_gc_aug", "views equal to the originals, or both rotated together, give 0; rotating the "
                              "image view alone does not")
def _(s, r):
    zv, zt = unit(5, 4, seed=12), unit(5, 4, seed=13)
    close(s.geocons.loss_gc_aug(zv, zt, zv, zt), 0.0, "L_GC^a with z^a = z", abs=1e-6)
    q = rotation(4, 1)
    close(s.geocons.loss_gc_aug(zv, zt, zv @ q, zt @ q), 0.0, "L_GC^a with both views rotated together", abs=1e-6)
    # the value itself as well: a constant would pass the two zeros above
    close(s.geocons.loss_gc_aug(zv, zt, zv @ q, zt), r.geocons.loss_gc_aug(zv, zt, zv @ q, zt),
          "L_GC^a with only the image view rotated (not 0)")


@check("geocons.loss_gc_aug", "the matched term: rotating only the text view changes ⟨z_V^a, z_T^a⟩ and nothing else")
def _(s, r):
    zv, zt = unit(5, 4, seed=14), unit(5, 4, seed=15)
    zt_a = zt @ rotation(4, 2)
    want = sum((_dot(zv[j], zt[j]) - _dot(zv[j], zt_a[j])) ** 2 for j in range(5)) / 5
    close(s.geocons.loss_gc_aug(zv, zt, zv, zt_a), want, "L_GC^a when only the text view is rotated (matched term)")


@check("geocons.loss_gc_aug", "the gradient with respect to both modalities and both views equals the "
                              "reference's")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, seed=16)
    gradients_agree(s, r, "geocons.loss_gc_aug", *(Leaf(n, x) for n, x in zip(("z_V", "z_T", "z_V^a", "z_T^a"), raw)),
                    what="L_GC^a")


@learning("geocons", "30 steps of geocons' tiny model: L_GC + L_GC^a reach both towers and the views; the loss "
                     "falls, every part moves")
def _(s, r):
    two_tower_learning(s, "geocons", ("gc", "gc_a"))


# ============================== A5 albef_fusion.py ===================================================
PAIR_SHAPES = ((4, 3), (4,), (4,), (4,))      # the parameters of Linear(3, 4) + LayerNorm(4)


def _pairs(n_pairs=2, seed=0):
    """The parameters of (online, momentum) pairs of Linear(3, 4) + LayerNorm(4), all different."""
    g = gen(seed)
    return [tuple([torch.randn(*shape, generator=g) for shape in PAIR_SHAPES] for _ in range(2))
            for _ in range(n_pairs)]


def _momentum_update(s, pairs, m):
    """The student's momentum_update on modules built from `pairs` in the child: both sides afterwards."""
    return s.child.run("momentum", pairs=[list(p) for p in pairs], m=m)


@check("albef_fusion.momentum_update", "θ_m ← m θ_m + (1 − m) θ at m = 0.9, for every parameter of every pair")
def _(s, r):
    pairs = _pairs()
    out = _momentum_update(s, pairs, 0.9)
    for i, ((online, before), after) in enumerate(zip(pairs, out["momentum"])):
        for k, (p, b, p_m) in enumerate(zip(online, before, after)):
            tensors_close(p_m, 0.9 * b + 0.1 * p, f"pair {i}, parameter {k}: θ_m after the update", 1e-6)


@check("albef_fusion.momentum_update", "m = 0 copies the online model; m = 1 leaves the momentum model as it was")
def _(s, r):
    pairs = _pairs(seed=1)
    for m, side, what, atol in ((1.0, 1, "θ_m after an update with m = 1", 0),
                                (0.0, 0, "θ_m after an update with m = 0 (a copy of θ)", 1e-7)):
        out = _momentum_update(s, pairs, m)
        for pair, after in zip(pairs, out["momentum"]):
            for want, p_m in zip(pair[side], after):
                tensors_close(p_m, want, what, atol)


@check("albef_fusion.momentum_update", "the online model is left unchanged while the momentum model moves; "
                                       "the momentum side needs no gradient")
def _(s, r):
    pairs = _pairs(seed=2)
    out = _momentum_update(s, pairs, 0.9)
    for (online, _), after in zip(pairs, out["online"]):
        for b, p in zip(online, after):
            tensors_close(p, b, "the online parameters after a momentum update (the update runs one way)", 0)
    # and the momentum side moved: an update that does nothing would pass the loop above
    require(all(not torch.equal(p_m, b) for (_, before), after in zip(pairs, out["momentum"])
                for b, p_m in zip(before, after)),
            "the momentum parameters did not move at m = 0.9: an update that changes nothing")
    require(not out["momentum_requires_grad"], "the momentum parameters should stay out of autograd (requires_grad "
                                               "False)")


def _queues(M=12, E=3):
    return (torch.arange(M * E).float().view(M, E), -torch.arange(M * E).float().view(M, E),
            torch.zeros((), dtype=torch.long))


def _enqueue(s, image_q, text_q, ptr, new_img, new_txt):
    """The queues and the pointer after the student's in-place dequeue_and_enqueue (run in the child)."""
    reply = call(s, "albef_fusion.dequeue_and_enqueue", image_q, text_q, ptr, new_img, new_txt,
                 opts={"return_args": True})
    return reply["args"][:3]


@check("albef_fusion.dequeue_and_enqueue", "a FIFO: over 7 steps of 4 into 12 rows, the ring buffer read from the "
                                           "pointer on is always the 12 most recent features, oldest first")
def _(s, r):
    image_q, text_q, ptr = _queues()
    ref_img, ref_txt = list(image_q.clone()), list(text_q.clone())
    g = gen(0)
    for step in range(7):
        new_img, new_txt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
        image_q, text_q, ptr = _enqueue(s, image_q, text_q, ptr, new_img, new_txt)
        ref_img, ref_txt = ref_img[4:] + list(new_img), ref_txt[4:] + list(new_txt)
        p = int(ptr)
        require(torch.equal(torch.roll(image_q, -p, 0), torch.stack(ref_img)),
                f"after step {step + 1}, the image queue read from the pointer ({p}) on is not the 12 most recent "
                f"features, oldest first")
        require(torch.equal(torch.roll(text_q, -p, 0), torch.stack(ref_txt)),
                f"after step {step + 1}, the text queue read from the pointer on is not the 12 most recent text "
                f"features, oldest first")


@check("albef_fusion.dequeue_and_enqueue", "the pointer moves on by N modulo M, in place: 4, 8, 0, 4, 8, 0, 4")
def _(s, r):
    image_q, text_q, ptr = _queues()
    seen = []
    for _ in range(7):
        image_q, text_q, ptr = _enqueue(s, image_q, text_q, ptr, torch.ones(4, 3), -torch.ones(4, 3))
        seen.append(int(ptr))
    require(seen == [4, 8, 0, 4, 8, 0, 4], f"queue_ptr after each of 7 steps: expected 4, 8, 0, 4, 8, 0, 4, got "
                                          f"{', '.join(map(str, seen))}")


@check("albef_fusion.distill_targets", "y = α·softmax(s_m) + (1 − α)·onehot against a loop, α ∈ {0, 0.25, 0.4, 1}")
def _(s, r):
    s_m = torch.randn(4, 10, generator=gen(0), dtype=torch.float64) * 3
    for alpha in (0.0, 0.25, 0.4, 1.0):
        y = s.albef_fusion.distill_targets(s_m, alpha)
        want = torch.tensor([[alpha * math.exp(s_m[j, k].item()) / sum(math.exp(v) for v in s_m[j].tolist())
                              + (1 - alpha) * (j == k) for k in range(10)] for j in range(4)], dtype=torch.float64)
        tensors_close(y, want, f"the soft labels y at α = {alpha}", 1e-9)


@check("albef_fusion.distill_targets", "rows are distributions; the one-hot of row j sits in column j of (N, N+M)")
def _(s, r):
    s_m = torch.randn(5, 12, generator=gen(1))
    y = s.albef_fusion.distill_targets(s_m, 0.0)
    tensors_close(y, torch.eye(5, 12), "the soft labels at α = 0 (the one-hot positives)", 0)
    y = s.albef_fusion.distill_targets(s_m, 0.4)
    tensors_close(y.sum(1), torch.ones(5), "the row sums of the soft labels at α = 0.4", 1e-6)


def _itc_inputs(seed=0, n=3, m=6, e=5):
    return (unit(n, e, seed=seed), unit(n, e, seed=seed + 1), unit(n + m, e, seed=seed + 2))


@check("albef_fusion.distilled_nce", "matches a loop: soft labels from the momentum queries, p from the online ones")
def _(s, r):
    z, z_m, keys = _itc_inputs()
    for alpha in (0.0, 0.4):
        h, _ = s.albef_fusion.distilled_nce(z, z_m, keys, torch.tensor(0.1, dtype=torch.float64), alpha)
        close(h, T.distilled_nce_loop(z, z_m, list(keys), 0.1, alpha), f"H(y, p) at τ = 0.1, α = {alpha}")


@check("albef_fusion.distilled_nce", "also returns s = z keysᵀ / τ, (N, N+M), detached from the graph")
def _(s, r):
    z, z_m, keys = _itc_inputs(seed=3)
    zr, = leaves(tuple(z.shape), seed=4)
    reply = call(s, "albef_fusion.distilled_nce", Leaf("z", zr, normalize=False), z_m.float(), keys.float(),
                 torch.tensor(0.1), 0.4)
    require(isinstance(reply["value"], list) and len(reply["value"]) == 2,
            "distilled_nce returns two things: (H, s)")
    tensors_close(reply["value"][1], zr @ keys.float().t() / 0.1, "the returned similarities s", 1e-5)
    require(not reply["requires_grad"][1], "the returned similarities should be detached (they only pick hard "
                                           "negatives)")


@check("albef_fusion.distilled_nce", "the gradient with respect to z and τ equals the reference's; none reaches the "
                                     "momentum queries (the soft labels are constants)")
def _(s, r):
    zr, zmr = leaves((3, 5), (3, 5), seed=5)
    keys = unit(9, 5, seed=6).float()
    gradients_agree(s, r, "albef_fusion.distilled_nce", Leaf("z", zr), Leaf("the momentum queries z_m", zmr), keys,
                    Leaf("τ", torch.tensor(0.1), normalize=False), 0.4, backward=0, what="H(y, p)")


@check("albef_fusion.distilled_nce", "bf16 features under bf16 autocast give the fp32 value")
def _(s, r):
    z, z_m, keys = (sign_units(n, 64, seed=seed).bfloat16() for n, seed in ((8, 7), (8, 8), (32, 9)))
    want = T.distilled_nce_loop(z.double(), z_m.double(), list(keys.double()), 0.013, 0.4)
    bf16_agrees(s, "albef_fusion.distilled_nce", (z, z_m, keys, torch.tensor(0.013), 0.4), [want], "H(y, p)",
                keys=[0], rel=1e-5)


PAD, CLS, SEP, MASK, VOCAB = 0, 2, 3, 4, 100


def _token_batch():
    """64 captions [CLS] w ... w [SEP] [PAD] ... of 3 to 20 tokens, word ids 5..99."""
    g = gen(0)
    ids = torch.randint(5, VOCAB, (64, 20), generator=g)
    for row, n in enumerate(torch.randint(3, 21, (64,), generator=g).tolist()):
        ids[row, 0], ids[row, n - 1], ids[row, n:] = CLS, SEP, PAD
    return ids, (ids == PAD) | (ids == CLS) | (ids == SEP)


def five_sigma(p, n):
    """Five standard deviations of a frequency of probability p over n draws: a correct sampler falls outside
    about once in 2 million draws of the whole check."""
    return 5 * math.sqrt(p * (1 - p) / n)


def _mask(s, ids, prob, draws, seed):
    """[(ids, labels)] of `draws` calls of the student's mask_tokens, and the input afterwards."""
    reply = call(s, "albef_fusion.mask_tokens", ids, VOCAB, MASK, [PAD, CLS, SEP], prob,
                 opts={"repeat": draws, "seed": child_seed(seed), "return_args": True})
    return reply["value"], reply["args"][0]


def _masking_counts(s, prob, draws, seed):
    ids, special = _token_batch()
    chosen = masked = kept = other = eligible = 0
    random_ids = []
    for out, labels in _mask(s, ids, prob, draws, seed)[0]:
        sel = labels != -100
        chosen, eligible = chosen + sel.sum().item(), eligible + (~special).sum().item()
        masked += (out[sel] == MASK).sum().item()
        kept += (out[sel] == ids[sel]).sum().item()
        rand = sel & (out != MASK) & (out != ids)
        other += rand.sum().item()
        random_ids += out[rand].tolist()
    return chosen, eligible, masked, kept, other, random_ids


@check("albef_fusion.mask_tokens", "never [PAD], [CLS] or [SEP] (in 120 draws, about 80,000 special tokens: one "
                                   "chosen with probability 1e-4 would show with probability > 0.999); labels are "
                                   "the original ids where chosen and −100 elsewhere; nothing else changes, the "
                                   "input included")
def _(s, r):
    ids, special = _token_batch()
    draws, after = _mask(s, ids, 0.15, 120, seed=0)
    require(torch.equal(ids, after), "mask_tokens changed its input_ids in place: work on a copy")
    for out, labels in draws:
        require(out.shape == ids.shape and labels.shape == ids.shape, "ids and labels keep the (N, L) shape")
        require(((labels == -100) | (labels == ids)).all(),
                "a label is neither the original id (a chosen token) nor −100 (every other token)")
        sel = labels != -100
        require(sel.any(), "no token was chosen in a draw at prob 0.15 (64 captions)")
        require(not (sel & special).any(), "a [PAD], [CLS] or [SEP] token was chosen for masking")
        require(torch.equal(labels[sel], ids[sel]), "the labels of the chosen tokens are not their original ids")
        require(torch.equal(out[~sel], ids[~sel]), "a token that was not chosen changed")


@check("albef_fusion.mask_tokens", "chooses a fraction prob of the other tokens (15% and 40%)")
def _(s, r):
    for prob in (0.15, 0.4):
        chosen, eligible, *_ = _masking_counts(s, prob, 30, seed=1)
        close(chosen / eligible, prob, f"the fraction of eligible tokens chosen at prob {prob}", rel=0,
              abs=five_sigma(prob, eligible))


@check("albef_fusion.mask_tokens", "of the chosen tokens 80% become [MASK], 10% a random id, 10% stay")
def _(s, r):
    chosen, _, masked, kept, other, random_ids = _masking_counts(s, 0.15, 80, seed=2)
    # a random id can be [MASK] or the original id itself (1/V each)
    for got, want, what in ((masked, 0.8 + 0.1 / VOCAB, "replaced by [MASK]"), (kept, 0.1 + 0.1 / VOCAB, "kept"),
                            (other, 0.1 * (1 - 2 / VOCAB), "replaced by a random id")):
        close(got / chosen, want, f"the fraction of chosen tokens {what}", rel=0, abs=five_sigma(want, chosen))
    require(min(random_ids) >= 0 and max(random_ids) < VOCAB and len(set(random_ids)) > VOCAB // 2,
            "the random replacement ids should be spread over the whole vocabulary [0, vocab_size)")


def _negatives(s, s_i2t, s_t2i, same=None, draws=1, seed=0):
    """(draws, N) negative texts of each image and negative images of each text, from the student's sampler."""
    out = call(s, "albef_fusion.hard_negatives", s_i2t, s_t2i, same, opts={"repeat": draws, "seed": child_seed(seed)})
    out = out["value"]
    for pair in out[:1]:
        require(isinstance(pair, list) and len(pair) == 2, "hard_negatives returns two index tensors (texts, images)")
        for name, idx in zip(("negative text of each image", "negative image of each text"), pair):
            require(torch.is_tensor(idx) and idx.shape == (len(s_i2t),) and not idx.is_floating_point(),
                    f"the {name}: expected an integer tensor of shape ({len(s_i2t)},), got "
                    f"{getattr(idx, 'shape', type(idx).__name__)}")
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


@check("albef_fusion.hard_negatives", "one index per row, never the positive, even when the positive's similarity "
                                      "makes every other softmax weight underflow")
def _(s, r):
    n, g = 8, gen(0)
    for sim in (torch.randn(n, n, generator=g), torch.randn(n, n, generator=g) * 10,
                torch.full((n, n), -100.0).fill_diagonal_(100.0)):
        neg_text, neg_image = _negatives(s, sim, sim.t().contiguous(), draws=30)
        require((neg_text != torch.arange(n)).all() and (neg_image != torch.arange(n)).all(),
                "a row drew its own positive as a negative")


@check("albef_fusion.hard_negatives", "never another caption of the same image (the `same` mask), also when those "
                                      "captions carry the only non-negligible softmax weight of the row")
def _(s, r):
    index = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])
    same = index[:, None] == index[None, :]
    # every positive 50 above every negative: softmax + ε leaves the negatives ε each; a sampler that keeps the
    # positives at any weight of that size draws one in a quarter of the draws or more
    for sim in (torch.randn(8, 8, generator=gen(1)), torch.where(same, 50.0, -50.0)):
        neg_text, neg_image = _negatives(s, sim, sim.t().contiguous(), same, draws=50, seed=1)
        require((index[neg_text] != index).all() and (index[neg_image] != index).all(),
                "a negative came from the same image (`same` marks the pairs that must never be drawn, at any "
                "weight)")


@check("albef_fusion.hard_negatives", "the positive has weight exactly 0, not ε: 76,800 draws of each direction "
                                      "never draw it (a weight ε = 1e-4 would show with probability > 0.999)")
def _(s, r):
    n, repeats = 256, 300
    sim = torch.randn(n, n, generator=gen(2)) * 2
    neg_text, neg_image = _negatives(s, sim, sim.t().contiguous(), draws=repeats, seed=2)
    hits = int((neg_text == torch.arange(n)).sum() + (neg_image == torch.arange(n)).sum())
    require(hits == 0, f"{hits} of {2 * n * repeats} draws were the row's own positive: its weight must be 0 (masked "
                       f"after adding ε), not ε")


@check("albef_fusion.hard_negatives", "draws in proportion to softmax(s) + ε: the frequencies of 3,000 draws")
def _(s, r):
    n = 5
    sim = torch.arange(n * n, dtype=torch.float32).view(n, n) % 4 * 0.7          # uneven rows
    weights = (F.softmax(sim, 1) + 1e-4).masked_fill(torch.eye(n, dtype=torch.bool), 0)
    want = weights / weights.sum(1, keepdim=True)
    neg_text, _ = _negatives(s, sim, torch.zeros(n, n), draws=3000, seed=3)
    freq = torch.stack([torch.bincount(neg_text[:, j], minlength=n).float() / 3000 for j in range(n)])
    err, (j, k) = (freq - want).abs().max().item(), divmod((freq - want).abs().argmax().item(), n)
    require(err < 0.045, f"image {j} drew text {k} with frequency {freq[j, k]:.3f}, expected {want[j, k]:.3f} "
                         f"(softmax of its similarities + ε, the positive excluded)")


@check("albef_fusion.hard_negatives", "the texts for each image come from s_i2t, the images for each text from s_t2i")
def _(s, r):
    s_i2t, s_t2i = torch.zeros(6, 6), torch.zeros(6, 6)
    s_i2t[0, 3], s_t2i[0, 5] = 8.0, 8.0
    neg_text, neg_image = _negatives(s, s_i2t, s_t2i, draws=200, seed=4)
    require((neg_text[:, 0] == 3).float().mean() > 0.9,
            "image 0 is most similar to text 3 in s_i2t: its negative text should almost always be text 3")
    require((neg_image[:, 0] == 5).float().mean() > 0.9,
            "text 0 is most similar to image 5 in s_t2i: its negative image should almost always be image 5")
    spread = torch.bincount(neg_text[:, 1], minlength=6)
    require((spread[[0, 2, 3, 4, 5]] > 10).all(), "a row of equal similarities should spread its draws over every "
                                                  "other column (a sample, not the hardest one)")


FUSION_PARTS = {"visual": "the image encoder", "bert.text_layers": "the text encoder",
                "bert.fusion_layers": "the fusion encoder", "vision_proj": "the image projection",
                "text_proj": "the text projection", "itm_head": "the ITM head", "temp": "the temperature",
                "codebook": "the codebook"}


def fusion_learning(s, script, steps=20, **extra):
    """The student's training step, in the child; the grader judges the gradients, the losses, the parameters
    and the moving average of the momentum copy, which it computes from the online parameters after each step."""
    tiny = {**T.TINY_ALBEF, "batch_size": 8, "queue_size": 32, **extra}
    captions = [f"a red {w}." for w in ["circle", "square", "star", "ring"] * 2]
    image = torch.randn(8, 3, 32, 32, generator=gen(0))
    out = s.child.run("learn_fusion", script=script, tiny=tiny, captions=captions, image=image,
                      parts=list(FUSION_PARTS), steps=steps, seed=child_seed(0))
    parts = {k: v for k, v in FUSION_PARTS.items() if k in out["grad"]}
    for attr, name in parts.items():
        require(out["grad"][attr] > 0, f"the loss sends no gradient to {name}: is a tower detached?")
    require(not out["momentum_grad"], "the momentum model received a gradient: it must stay frozen")
    judge_training(out, parts, steps)
    ema = out["momentum_before"]
    for online in out["seen"]:
        require(len(online) == len(ema), "the momentum pairs do not match the momentum parameters")
        ema = [0.9 * e + 0.1 * p for e, p in zip(ema, online)]
    err = max((p - e).abs().max().item() for p, e in zip(out["momentum_after"], ema))
    require(err < 1e-4, f"after {steps} steps the momentum model is off the moving average of the online model by "
                        f"up to {err:.3g}")
    want = (steps + 1) * 8 % 32                       # the first batch (the gradient check) was enqueued too
    require(out["queue_ptr"] == want, f"after {steps + 1} batches of 8 into a queue of 32 the pointer should be "
                                      f"{want}, got {out['queue_ptr']}")
    tensors_close(out["image_queue"].norm(dim=-1), torch.ones(32), "the norms of the image queue's rows", 1e-5)


@learning("albef_fusion", "20 steps of ALBEF's tiny model: gradient to every online part and none to the momentum "
                          "copy; the loss falls; the momentum copy is the moving average; the queue turns over")
def _(s, r):
    fusion_learning(s, "albef_fusion")


# ============================== A6 codis.py: ipot, swapped_prediction, loss_code =======================
@check("codis.ipot", "reaches the exact optimum of square uniform problems (brute force over permutations), "
                     "where Sinkhorn's plan stays off")
def _(s, r):
    for n in (3, 4, 5):
        cost = torch.rand(n, n, generator=gen(n), dtype=torch.float64)
        best = T.exact_uniform_ot(cost)
        plan = s.codis.ipot(cost, T.uniform(n), T.uniform(n), beta=0.5, n_outer=300)
        got = value((plan * cost).sum(), "⟨T, D⟩")
        close(got, best, f"⟨T, D⟩ of IPOT's plan (300 steps) on a random {n}×{n} cost: the optimum", rel=0, abs=1e-3)
        entropic = value((T.sinkhorn(cost, T.uniform(n), T.uniform(n), beta=0.5) * cost).sum(), "Sinkhorn")
        require(abs(got - best) < abs(entropic - best), f"on a {n}×{n} cost IPOT's plan is no closer to the optimum "
                                                        f"than Sinkhorn's: the proximal step T ← A ⊙ T is missing?")


@check("codis.ipot", "marginals Tᵀ 1 = ν (exactly) and T 1 ≈ μ on rectangular problems (16×40, 40×16) at the "
                     "defaults")
def _(s, r):
    for n, k in ((16, 40), (40, 16)):
        cost = 1 - unit(n, 8, seed=n) @ unit(k, 8, seed=k).T
        plan = s.codis.ipot(cost, T.uniform(n), T.uniform(k))
        require(tuple(plan.shape) == (n, k), f"the plan of a {n}×{k} cost should be {n}×{k}, got {tuple(plan.shape)}")
        require((plan >= 0).all(), "the plan has negative entries")
        # Tᵀ 1 = ν to float precision (σ is updated last); T 1 = μ only in the limit: the reference's row sums are
        # off by up to 4e-4 at the defaults
        tensors_close(plan.sum(1), T.uniform(n).to(plan.dtype), f"the row sums T 1 of a {n}×{k} plan", 2e-3)
        tensors_close(plan.sum(0), T.uniform(k).to(plan.dtype), f"the column sums Tᵀ 1 of a {n}×{k} plan", 1e-5)


@check("codis.ipot", "general marginals, 3 inner steps: the reference's plan")
def _(s, r):
    g = gen(0)
    cost = 1 - unit(12, 8, seed=3) @ unit(20, 8, seed=4).T
    mu, nu = torch.rand(12, generator=g, dtype=torch.float64) ** 4 + 1e-3, torch.rand(20, generator=g) + 0.1
    mu, nu = mu / mu.sum(), (nu / nu.sum()).double()
    tensors_close(s.codis.ipot(cost, mu, nu, 0.5, 50, 3), r.codis.ipot(cost, mu, nu, 0.5, 50, 3),
                  "the plan for non-uniform marginals", 1e-6)


@check("codis.ipot", "a sharp kernel (β = 0.01) and a far-away row of fp16 costs: a finite fp32 plan")
def _(s, r):
    cost = (2 * torch.rand(64, 32, generator=gen(2))).half()
    cost[0] = 2.0
    plan = s.codis.ipot(cost, torch.full((64,), 1 / 64), torch.full((32,), 1 / 32), beta=0.01, n_outer=50)
    require(plan.dtype == torch.float32, f"the plan of fp16 costs should be float32, got {plan.dtype}")
    require(torch.isfinite(plan).all(), "the plan is not finite: exp(−D/β) underflows to 0 for a whole row unless "
                                        "each row of D is shifted by its minimum first")
    tensors_close(plan.sum(0), torch.full((32,), 1 / 32), "the column sums of the plan", 1e-4)


def swapped_loop(z, codebook, plan, gamma):
    total = 0.0
    for j in range(len(z)):
        logits = [float(z[j] @ c) / gamma for c in codebook]
        log_p = [x - math.log(sum(math.exp(y) for y in logits)) for x in logits]
        row = [float(t) / float(plan[j].sum()) for t in plan[j]]
        total += -sum(t * lp for t, lp in zip(row, log_p))
    return total / len(z)


@check("codis.swapped_prediction", "matches a loop: −1/N Σ_j Σ_k T̂_jk log softmax_k(⟨z_j, c_k⟩ / γ), γ = 0.1 and 0.5")
def _(s, r):
    z, codebook = unit(3, 4, seed=0), unit(5, 4, seed=1)
    plan = torch.rand(3, 5, generator=gen(0), dtype=torch.float64) / 15
    for gamma in (0.1, 0.5):
        close(s.codis.swapped_prediction(z, codebook, plan, gamma), swapped_loop(z, codebook, plan, gamma),
              f"H(T̂, P) at γ = {gamma}")


@check("codis.swapped_prediction", "the plan's rows are renormalized: scaling the plan changes nothing")
def _(s, r):
    z, codebook = unit(4, 4, seed=2), unit(6, 4, seed=3)
    plan = torch.rand(4, 6, generator=gen(1), dtype=torch.float64)
    once = value(s.codis.swapped_prediction(z, codebook, plan, 0.1), "H(T̂, P)")
    close(s.codis.swapped_prediction(z, codebook, plan / 24, 0.1), once, "H(T̂, P) with the plan divided by 24")
    # the value itself as well: a constant would pass the invariance above
    close(once, r.codis.swapped_prediction(z, codebook, plan, 0.1), "H(T̂, P) of the plan as given")


@check("codis.swapped_prediction", "the gradient with respect to the student features z and the codebook "
                                   "equals the reference's")
def _(s, r):
    rz, rc = leaves((4, 5), (6, 5), seed=4)
    plan = torch.rand(4, 6, generator=gen(2))
    gradients_agree(s, r, "codis.swapped_prediction", Leaf("z", rz), Leaf("the codebook", rc), plan, 0.1,
                    what="H(T̂, P)")


CODE_ARGS = dict(code_temp=0.2, ipot_beta=0.5, ipot_outer=40, ipot_inner=1)
CODE_TERMS = ("ot_v", "ot_t", "t2p", "i2p")


def _code_inputs():
    """z_v, z_t, f_v, f_t (6, 5) and a codebook (4, 5): unit rows, float32."""
    return [unit(6, 5, seed=k).float() for k in range(4)], unit(4, 5, seed=4).float()


def _code_terms(s, feats, codebook):
    terms = call(s, "codis.loss_code", *feats, codebook, ArgsOf("codis", **CODE_ARGS))["value"]
    require(isinstance(terms, dict) and set(CODE_TERMS) <= set(terms),
            f"loss_code returns a dict with ot_v, ot_t, t2p and i2p, got "
            f"{sorted(terms) if isinstance(terms, dict) else type(terms).__name__}")
    return terms


def _code_plans(r, f_v, f_t, codebook):
    n, k = len(f_v), len(codebook)
    mu, nu = torch.full((n,), 1 / n), torch.full((k,), 1 / k)
    d_v, d_t = 1 - f_v @ codebook.T, 1 - f_t @ codebook.T
    return d_v, d_t, r.codis.ipot(d_v, mu, nu, 0.5, 40), r.codis.ipot(d_t, mu, nu, 0.5, 40)


@check("codis.loss_code", "ot_v, ot_t = ⟨T, D⟩ with D = 1 − f Cᵀ of the plan features f and T = IPOT(D, 1/N, 1/K)")
def _(s, r):
    (z_v, z_t, f_v, f_t), codebook = _code_inputs()
    terms = _code_terms(s, (z_v, z_t, f_v, f_t), codebook)
    d_v, d_t, t_i2p, t_t2p = _code_plans(r, f_v, f_t, codebook)
    close(terms["ot_v"], (t_i2p * d_v).sum().item(), "ot_v = ⟨T_i2p, D_v⟩ (the plan of the image features f_v)")
    close(terms["ot_t"], (t_t2p * d_t).sum().item(), "ot_t = ⟨T_t2p, D_t⟩ (the plan of the text features f_t)")


@check("codis.loss_code", "the plans are swapped: t2p = H(T_i2p, P_t2p), i2p = H(T_t2p, P_i2p)")
def _(s, r):
    (z_v, z_t, f_v, f_t), codebook = _code_inputs()
    terms = _code_terms(s, (z_v, z_t, f_v, f_t), codebook)
    _, _, t_i2p, t_t2p = _code_plans(r, f_v, f_t, codebook)
    close(terms["t2p"], r.codis.swapped_prediction(z_t, codebook, t_i2p, 0.2).item(),
          "t2p: the text student z_t predicts the IMAGE plan T_i2p", rel=1e-5)
    close(terms["i2p"], r.codis.swapped_prediction(z_v, codebook, t_t2p, 0.2).item(),
          "i2p: the image student z_v predicts the TEXT plan T_t2p", rel=1e-5)


@check("codis.loss_code", "gradients equal the reference's along the real call path (the codebook parameter "
                          "normalized, then passed in): ⟨T, D⟩ trains the codebook only, the swapped predictions "
                          "train z and the codebook, the plan features f get none")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, (4, 5), seed=5)
    inputs = [Leaf(n, x) for n, x in zip(("z_v", "z_t", "f_v", "f_t", "the codebook"), raw)]
    for terms, what in ((["ot_v", "ot_t"], "ot_v + ot_t"), (["t2p", "i2p"], "t2p + i2p")):
        gradients_agree(s, r, "codis.loss_code", *inputs, ArgsOf("codis", **CODE_ARGS), backward=terms, what=what)


@check("codis.loss_code", "bf16 features under bf16 autocast give the fp32 values")
def _(s, r):
    feats = [sign_units(6, 16, seed=20 + k).bfloat16() for k in range(4)]
    codebook = unit(4, 16, seed=24).float()
    want = r.codis.loss_code(*(f.float() for f in feats), codebook, r.codis.Args(**CODE_ARGS))
    bf16_agrees(s, "codis.loss_code", (*feats, codebook, ArgsOf("codis", **CODE_ARGS)),
                [want[k].item() for k in CODE_TERMS], "L_code", keys=CODE_TERMS)


@learning("codis", "20 steps of CODIS's tiny model: gradient to every online part and the codebook, none to the "
                   "momentum copy; the loss falls; the momentum copy is the moving average")
def _(s, r):
    fusion_learning(s, "codis", codebook_size=8, ipot_outer=10)


# ============================== A7 eval.py: _ranks, retrieval_metrics, _reranked_ranks, rerank_retrieval ==
def _retrieval_case(seed=0):
    txt2img = torch.tensor([i for i in range(23) for _ in range(1 + i % 4)])       # 1 to 4 captions per image
    return unit(23, 5, seed=seed).float(), unit(len(txt2img), 5, seed=seed + 1).float(), txt2img


def ranks_loop(queries, cands, q_group, c_group):
    """The rank of each query by hand: the negatives scoring at least as high as its best positive (ties go
    against the query, eval.py's rule)."""
    sim = (queries @ cands.T).tolist()
    out = []
    for q, row in enumerate(sim):
        best = max(v for c, v in enumerate(row) if c_group[c] == q_group[q])
        out.append(sum(v >= best for c, v in enumerate(row) if c_group[c] != q_group[q]))
    return torch.tensor(out)


def _ranks(s, *args, chunk, track=False):
    reply = call(s, "eval._ranks", *args, chunk=chunk, opts={"track_products": track})
    return reply["value"], reply["record"].get("largest", 0)


@check("eval._ranks", "matches a count by hand (negatives scoring at least as high as the best positive), both "
                      "directions")
def _(s, r):
    img, txt, txt2img = _retrieval_case()
    ids = torch.arange(23)
    for what, args in (("image→text", (img, txt, ids, txt2img)), ("text→image", (txt, img, txt2img, ids))):
        tensors_close(_ranks(s, *args, chunk=1024)[0], ranks_loop(*args), f"the {what} ranks", 0)


@check("eval._ranks", "ties go against the query, in both index orders: a negative tied with the best positive "
                      "counts before or after it; constant features rank every query after all its negatives")
def _(s, r):
    query, tied = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    for groups, where in ((torch.tensor([0, 1, 2]), "after"), (torch.tensor([1, 0, 2]), "before")):
        want = ranks_loop(query, tied, torch.tensor([0]), groups)
        tensors_close(_ranks(s, query, tied, torch.tensor([0]), groups, chunk=8)[0], want,
                      f"the rank of a query whose positive ties a negative listed {where} it", 0)
    img, txt = torch.ones(4, 3), torch.ones(7, 3)
    txt2img = torch.tensor([0, 0, 1, 2, 2, 3, 3])
    tensors_close(_ranks(s, img, txt, torch.arange(4), txt2img, chunk=2)[0],
                  ranks_loop(img, txt, torch.arange(4), txt2img), "the ranks of constant features (every score tied)",
                  0)


@check("eval._ranks", "the same ranks for every chunk size (1, 4, all), and no similarity block larger than "
                      "chunk × candidates is formed")
def _(s, r):
    img, txt, txt2img = _retrieval_case(seed=2)
    want = ranks_loop(txt, img, txt2img, torch.arange(23))
    for chunk in (1, 4, 4096):
        got, largest = _ranks(s, txt, img, txt2img, torch.arange(23), chunk=chunk, track=True)
        tensors_close(got, want, f"the text→image ranks with chunk = {chunk}", 0)
        limit = min(chunk, len(txt)) * len(img)
        require(largest <= limit, f"with chunk = {chunk} a product of {largest} elements was formed; at most "
                                  f"chunk × candidates = {limit} may be held at a time")


@check("eval.retrieval_metrics", "matches sorting every row by hand (1 to 4 captions per image): R@k in percent "
                                 "for the ks asked for (1, 5, 10 and 2, 3), rsum their sum")
def _(s, r):
    img, txt, txt2img = _retrieval_case(seed=4)
    for ks in ((1, 5, 10), (2, 3)):
        got = s.eval.retrieval_metrics(img, txt, txt2img.tolist(), ks=ks)
        want = T.brute_force_recall(img @ txt.T, txt2img.tolist(), ks)
        require(isinstance(got, dict) and set(got) == set(want) | {"rsum"},
                f"with ks = {ks} the metrics should have the keys {sorted(set(want) | {'rsum'})}, got "
                f"{sorted(got) if isinstance(got, dict) else type(got).__name__}")
        for k, v in want.items():
            close(got[k], v, f"{k} (ks = {ks})", rel=0, abs=1e-4)
        close(got["rsum"], sum(want.values()), f"rsum (ks = {ks})", rel=0, abs=1e-3)


@check("eval.retrieval_metrics", "image→text counts a hit when ANY caption of the image is in the top k")
def _(s, r):
    img = torch.eye(3)
    # image 0 has a far caption (third for it) and a near one (first); images 1 and 2 rank their captions first
    txt = F.normalize(torch.tensor([[0.0, 0.3, 1.0], [1.0, 0.1, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    got = s.eval.retrieval_metrics(img, txt, [0, 0, 1, 2], ks=(1,))
    close(entry(got, "i2t_R@1", "i2t R@1"), 100.0, "i2t R@1 when each image's best caption is its top candidate",
          rel=0, abs=1e-4)


@check("eval.retrieval_metrics", "an image without any caption is refused with a ValueError")
def _(s, r):
    try:
        s.eval.retrieval_metrics(torch.eye(4), torch.eye(4)[:3], [0, 1, 2])
    except StudentRaised as exc:
        if exc.kind == "ValueError":
            return
        raise
    raise Fail("retrieval_metrics accepted an image without any caption (txt2img never names image 3)")


def reranked_loop(sc, top, ts, positives):
    """Each query's order (its top k by rescore, then the rest by first-stage score; a negative tied with a
    positive first) -> the number of negatives before its first positive."""
    out = []
    for q in range(len(sc)):
        pos = set(positives[q])
        head = sorted(top[q].tolist(), key=lambda c: (-ts[q][top[q].tolist().index(c)].item(), c in pos))
        rest = sorted((c for c in range(sc.shape[1]) if c not in head), key=lambda c: (-sc[q, c].item(), c in pos))
        out.append(min((head + rest).index(c) for c in pos))
    return torch.tensor(out)


def _reranked(s, sc, *args, chunk):
    """(ranks, the block sizes of the rows asked for) from the student's _reranked_ranks."""
    reply = call(s, "eval._reranked_ranks", {"__kind__": "rows", "t": sc}, len(sc), *args, chunk=chunk)
    return reply["value"], reply["record"].get("asked", [])


def _rerank_case(seed, k, q=11, c=17):
    g = gen(seed)
    sc, c_group = torch.randn(q, c, generator=g), torch.randint(0, q, (c,), generator=g)
    c_group[:q] = torch.arange(q)                                        # every query has a positive
    top = sc.topk(k, dim=1).indices
    return sc, top, torch.randn(q, k, generator=g), torch.arange(q), c_group


@check("eval._reranked_ranks", "matches the rank of the first positive in the order built by hand (top k by "
                               "rescore, then the rest), k = 1, 4 and all")
def _(s, r):
    for k in (1, 4, 17):
        sc, top, ts, q_group, c_group = _rerank_case(k, k)
        got, _ = _reranked(s, sc, top, ts, q_group, c_group, chunk=1024)
        positives = [[c for c in range(sc.shape[1]) if c_group[c] == q] for q in range(len(sc))]
        tensors_close(got, reranked_loop(sc, top, ts, positives), f"the reranked ranks with k = {k}", 0)


@check("eval._reranked_ranks", "the same ranks for every chunk size; rows are asked for chunk by chunk")
def _(s, r):
    sc, top, ts, q_group, c_group = _rerank_case(5, 4)
    positives = [[c for c in range(sc.shape[1]) if c_group[c] == q] for q in range(len(sc))]
    want = reranked_loop(sc, top, ts, positives)
    for chunk in (1, 4, 4096):
        got, asked = _reranked(s, sc, top, ts, q_group, c_group, chunk=chunk)
        tensors_close(got, want, f"the reranked ranks with chunk = {chunk}", 0)
        require(asked and max(asked) <= chunk, f"with chunk = {chunk} the rows were asked for "
                                               f"{max(asked) if asked else 'no'} queries at a time")


@check("eval._reranked_ranks", "ties go against the query, in both index orders: a negative whose rescore (or, "
                               "outside the top k, first-stage score) ties the best positive's counts")
def _(s, r):
    sc = torch.tensor([[0.9, 0.8, 0.1, 0.1]])           # top 2 by first stage: candidates 0 and 1
    for group, where in (([1, 0, 2, 3], "after"), ([0, 1, 2, 3], "before")):   # the positive: candidate 1 or 0
        c_group = torch.tensor(group)
        top, ts = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])
        want = reranked_loop(sc, top, ts, [[group.index(0)]])
        got, _ = _reranked(s, sc, top, ts, torch.tensor([0]), c_group, chunk=8)
        tensors_close(got, want, f"the rank of a positive whose rescore ties a negative's listed {where} it", 0)
    for group in ([1, 1, 0, 2], [1, 1, 2, 0]):           # the positive outside the top k, tied with a negative
        c_group = torch.tensor(group)
        want = reranked_loop(sc, torch.tensor([[0, 1]]), torch.tensor([[0.3, 0.2]]), [[group.index(0)]])
        got, _ = _reranked(s, sc, torch.tensor([[0, 1]]), torch.tensor([[0.3, 0.2]]), torch.tensor([0]), c_group,
                           chunk=8)
        tensors_close(got, want, "the rank of a positive outside the top k whose score ties a negative's", 0)


GRID_CAPTIONS = [2, 3, 1, 4, 2, 3, 1, 2, 2, 3, 2, 1]          # 12 images, 26 captions


def define(s, *names):
    """Send the source of the tests' helper classes (toy models, tokenizers: no answers) to the child, once."""
    for name in names:
        if name not in s.child.defined:
            source = UNNORMALIZED_TOY if name == "UnnormalizedToy" else inspect.getsource(getattr(T, name))
            s.child.remember({"op": "define", "source": source, "needs": ["data"]})
            s.child.defined.add(name)


def _rerank_run(s, k, seed):
    g = gen(seed)
    ps = T.GridPairSet(GRID_CAPTIONS)
    n, m = len(ps), len(ps.texts)
    img, txt = F.normalize(torch.randn(n, 5, generator=g), dim=-1), F.normalize(torch.randn(m, 5, generator=g), dim=-1)
    table = torch.randn(n, m, generator=g)
    define(s, "GridPairSet", "TableScorer", "GridTokenizer")
    out = s.child.run("rerank", captions=GRID_CAPTIONS, table=table, img=img, txt=txt, k=k)
    return out["metrics"], [tuple(c) for c in out["calls"]], table, ps, img, txt


@check("eval.rerank_retrieval", "matches reranking every query's top k by hand (k = 1, 3, 7, all)")
def _(s, r):
    for k in (1, 3, 7, 100):
        out, _, table, ps, img, txt = _rerank_run(s, k, seed=k)
        sim, t2i, n, m = img @ txt.T, ps.txt2img, len(img), len(txt)
        want = {"i2t": T.brute_force_rerank(sim, table, [[t for t in range(m) if t2i[t] == i] for i in range(n)],
                                            min(k, m)),
                "t2i": T.brute_force_rerank(sim.T, table.T, [[t2i[t]] for t in range(m)], min(k, n))}
        require(isinstance(out, dict), f"rerank_retrieval returns a dict of metrics, not {type(out).__name__}")
        for d in ("i2t", "t2i"):
            for rr in (1, 5, 10):
                require(f"{d}_R@{rr}" in out, f"the metrics have no '{d}_R@{rr}'; keys: {sorted(out)}")
                close(out[f"{d}_R@{rr}"], want[d][rr], f"{d}_R@{rr} after reranking the top {k}", rel=0, abs=1e-4)
        require("rsum" in out, f"the metrics have no 'rsum'; keys: {sorted(out)}")
        close(out["rsum"], sum(want[d][rr] for d in want for rr in (1, 5, 10)), f"rsum (k = {k})", rel=0, abs=1e-3)


@check("eval.rerank_retrieval", "scores exactly the pairs in some query's top k, each once")
def _(s, r):
    k = 3
    _, calls, _, _, img, txt = _rerank_run(s, k, seed=11)
    sim = img @ txt.T
    needed = {(i, t) for i in range(len(img)) for t in sim[i].topk(k).indices.tolist()}
    needed |= {(i, t) for t in range(len(txt)) for i in sim[:, t].topk(k).indices.tolist()}
    require(len(calls) == len(set(calls)), f"{len(calls) - len(set(calls))} pairs were scored more than once by "
                                           f"itm_score")
    require(set(calls) == needed, f"itm_score scored {len(set(calls) - needed)} pairs outside every top {k} and "
                                  f"missed {len(needed - set(calls))} inside one")


# ============================== A8 eval.py: zeroshot_classifier, topk_accuracy, balanced_accuracy ======
UNNORMALIZED_TOY = '''
class UnnormalizedToy(ToyModel):
    """The test suite's ToyModel with text features of different lengths (the per-prompt normalization shows)."""

    def encode_text(self, ids, mask):
        return super().encode_text(ids, mask) * (1 + mask.sum(1, keepdim=True).float())
'''


def _toy():
    """The same toy model here as the child builds (its weights are fixed by its own generator)."""
    space = {"ToyModel": T.ToyModel}
    exec(UNNORMALIZED_TOY, space)
    return space["UnnormalizedToy"](), T.ToyTokenizer()


def _zeroshot(s, classes, templates):
    define(s, "ToyTokenizer", "ToyTwoTower", "ToyModel", "UnnormalizedToy")
    w = s.child.run("zeroshot", classes=classes, templates=templates)
    require(torch.is_tensor(w) and tuple(w.shape) == (len(classes), 6),
            f"the classifier of {len(classes)} classes should be (C, d) = ({len(classes)}, 6), got "
            f"{getattr(w, 'shape', type(w).__name__)}")
    return w


@check("eval.zeroshot_classifier", "w_c = normalize(mean_t normalize(f(template_t.format(c)))), one row per class in "
                                   "class order")
def _(s, r):
    model, tok = _toy()
    classes, templates = ["red", "green", "dark blue"], ["a {}", "a photo of a big {} thing.", "{} thing"]
    w = _zeroshot(s, classes, templates)
    for c, name in enumerate(classes):
        encoded = [tok([t.format(name)]) for t in templates]
        feats = [F.normalize(model.encode_text(e["input_ids"], e["attention_mask"])[0], dim=0) for e in encoded]
        tensors_close(w[c], F.normalize(sum(feats) / len(feats), dim=0), f"the classifier row of class '{name}'", 1e-5)


@check("eval.zeroshot_classifier", "one template: each row is the normalized feature of its one prompt")
def _(s, r):
    model, tok = _toy()
    w = _zeroshot(s, ["red", "blue"], ["a {} square"])
    enc = tok(["a red square", "a blue square"])
    tensors_close(w, F.normalize(model.encode_text(enc["input_ids"], enc["attention_mask"]), dim=-1),
                  "the classifier of one template", 1e-5)


@check("eval.topk_accuracy", "a hand case: true classes at ranks 0, 1, 3 and 2; k = 5 is clipped to the 4 classes")
def _(s, r):
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.5], [0.9, 0.1, 0.0, 0.5], [0.9, 0.1, 0.0, 0.5], [0.2, 0.8, 0.1, 0.0]])
    got = s.eval.topk_accuracy(logits, torch.tensor([0, 3, 2, 2]), ks=(1, 2, 3, 5))
    want = {"top1": 25.0, "top2": 50.0, "top3": 75.0, "top5": 100.0}
    for k, v in want.items():
        close(entry(got, k, k), v, k, rel=0, abs=1e-4)


@check("eval.topk_accuracy", "matches counting by hand on random logits (20 rows, 7 classes)")
def _(s, r):
    logits = torch.randn(20, 7, generator=gen(0))
    labels = torch.randint(0, 7, (20,), generator=gen(1))
    got = s.eval.topk_accuracy(logits, labels, ks=(1, 3, 5))
    for k in (1, 3, 5):
        hits = sum(topk_hit(logits[i], labels[i], k) for i in range(20))
        close(entry(got, f"top{k}", f"top{k}"), 100.0 * hits / 20, f"top{k}", rel=0, abs=1e-4)


def topk_hit(row, label, k):
    """A hit by eval.py's rule: fewer than k other classes have a logit at least as high (a tie is not a hit)."""
    return int((row >= row[label]).sum()) - 1 < k


@check("eval.topk_accuracy", "ties go against the image, in both index orders: a class tied with the true one "
                             "ranks before it")
def _(s, r):
    logits = torch.tensor([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [0.2, 0.2, 0.2]])
    labels = torch.tensor([0, 1, 2])                     # the tied rival after, before; every class tied
    got = s.eval.topk_accuracy(logits, labels, ks=(1, 2, 3))
    for k in (1, 2, 3):
        want = 100.0 * sum(topk_hit(logits[i], labels[i], k) for i in range(3)) / 3
        close(entry(got, f"top{k}", f"top{k}"), want, f"top{k} with tied logits", rel=0, abs=1e-4)


@check("eval.balanced_accuracy", "the mean per-class recall over the classes present, in percent")
def _(s, r):
    labels = torch.tensor([0] * 8 + [1] * 2)
    pred = torch.tensor([0] * 8 + [0, 1])                  # accuracy 90%, recalls 100% and 50%, class 2 absent
    close(s.eval.balanced_accuracy(pred, labels, n_classes=3), 75.0, "balanced accuracy (class 2 never occurs)",
          rel=0, abs=1e-4)
    close(s.eval.balanced_accuracy(torch.zeros(10, dtype=torch.long), labels, 2), 50.0,
          "balanced accuracy of always predicting class 0", rel=0, abs=1e-4)


@check("eval.balanced_accuracy", "matches per-class recalls by hand on random labels")
def _(s, r):
    g = gen(2)
    labels, pred = torch.randint(0, 5, (40,), generator=g), torch.randint(0, 5, (40,), generator=g)
    recalls = [float((pred[labels == c] == c).float().mean()) for c in range(5) if (labels == c).any()]
    close(s.eval.balanced_accuracy(pred, labels, 6), 100.0 * sum(recalls) / len(recalls), "balanced accuracy",
          rel=1e-5)
