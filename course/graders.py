"""The checks of every graded function, and one learning check per method script (never shipped to students).

A check is `fn(s, r)`: `s` the student's copy, `r` the instructor's reference (course/loader.py Copy objects;
s.sep is the student's sep.py). It returns on success and raises Fail with a one-line reason a student
understands otherwise ("L_ortho of orthogonal features: expected 0, got 0.31"); any other exception is reported
by grade.py as what the student's code raised. While a function is graded, the other graded functions of its
assignment are the reference's (grade.py patches them in), so each function is judged on its own.

What is compared against what: loops and closed forms (most of them are the loops the project's own tests
use, imported from tests/, which the student copy does not ship), invariances (permuting the batch, scaling),
limits (orthogonal, collapsed, perfectly matched), the reference's value on fixed inputs where a loop would
be the algorithm itself (IPOT with general marginals), statistics for the random draws (masking, hard
negatives: any correct sampler passes, whatever its random draws), and gradients (the right inputs receive
gradient, the frozen ones none). The learning check trains the student's tiny model for a few dozen steps on
one synthetic batch: the loss falls, every part of both towers moves, the method's own terms reach both
towers and the augmented views, and (fusion models) the momentum model follows the moving average.
"""
import copy
import importlib
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from course.make_assignment import ROOT

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
             "distilled_nce_loop": "test_albef", "tiny_model": "test_albef", "toy_batch": "test_albef",
             "exact_uniform_ot": "test_codis", "sinkhorn": "test_codis",
             "uniform": "test_codis", "brute_force_recall": "test_eval", "ToyModel": "test_eval",
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
_TOKENIZER = []


def tokenizer():
    """The synthetic benchmark's word-level tokenizer (built offline), once per process."""
    if not _TOKENIZER:
        import data
        _TOKENIZER.append(data.build_tokenizer(data.DataArgs()))
    return _TOKENIZER[0]


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


def tensors_close(got, want, what, atol=1e-6):
    require(torch.is_tensor(got), f"{what}: expected a tensor, got {type(got).__name__}")
    require(tuple(got.shape) == tuple(want.shape),
            f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    err = (got.double() - want.double()).abs().max().item()
    require(err <= atol, f"{what}: off by up to {err:.3g}")


def leaves(*shapes, seed=0):
    """Random float32 tensors that require grad (the raw features before normalization)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def reaches(named, what):
    """Every tensor of `named` received a finite, nonzero gradient."""
    for name, t in named.items():
        require(t.grad is not None and t.grad.abs().sum() > 0,
                f"{what}: no gradient reaches {name} (a detach, or a constant where the input should be?)")
        require(torch.isfinite(t.grad).all(), f"{what}: the gradient of {name} is not finite")


def scale(tau):
    """logit_scale = log(1/τ) (float64)."""
    return torch.tensor(math.log(1 / tau), dtype=torch.float64)


def bf16_agrees(fn, what):
    """fn() under bf16 autocast returns float32 values equal to fn() without it (fp32 loss math)."""
    want = fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn()
    for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        require(g.dtype == torch.float32, f"{what} under bf16 autocast: expected float32, got {g.dtype}")
        close(g, value(w, what), f"{what} under bf16 autocast (bf16 matmuls lose about 2 digits)", rel=2e-4)


# ============================== A1 clip_base.py: nce, loss_con ========================================
@check("clip_base.nce", "matches a loop over the batch at τ = 0.07, in both argument orders")
def _(s, r):
    a, b = T.unit(7, 5, seed=1), T.unit(7, 5, seed=2)
    close(s.clip_base.nce(a, b, scale(0.07)), T.nce_loop(a, b, 0.07), "NCE(a, b) of random unit features")
    close(s.clip_base.nce(b, a, scale(0.07)), T.nce_loop(b, a, 0.07),
          "NCE(b, a) (the softmax runs over the batch of the second argument)")


@check("clip_base.nce", "τ = exp(−logit_scale): the loop again at τ = 0.5")
def _(s, r):
    a, b = T.unit(6, 4, seed=3), T.unit(6, 4, seed=4)
    close(s.clip_base.nce(a, b, scale(0.5)), T.nce_loop(a, b, 0.5), "NCE at τ = 0.5 (logit_scale = log 2)")


@check("clip_base.nce", "limits: perfectly matched pairs give 0, identical features give log N")
def _(s, r):
    e = torch.eye(4, dtype=torch.float64)
    close(s.clip_base.nce(e, e, scale(0.01)), 0.0, "NCE of perfectly matched one-hot pairs at τ = 0.01", abs=1e-6)
    same = torch.ones(4, 3, dtype=torch.float64) / math.sqrt(3)
    close(s.clip_base.nce(same, same, scale(1.0)), math.log(4), "NCE of 4 identical pairs (every row uniform)")


@check("clip_base.nce", "permuting the pairs (the same permutation of a and b) leaves it unchanged")
def _(s, r):
    a, b = T.unit(9, 6, seed=5), T.unit(9, 6, seed=6)
    p = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    close(s.clip_base.nce(a[p], b[p], scale(0.07)), value(s.clip_base.nce(a, b, scale(0.07)), "NCE"),
          "NCE of the same pairs in another order")


@check("clip_base.nce", "the gradient reaches a, b and logit_scale")
def _(s, r):
    ra, rb = leaves((6, 5), (6, 5), seed=7)
    ls = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    s.clip_base.nce(F.normalize(ra, dim=-1), F.normalize(rb, dim=-1), ls).backward()
    reaches({"a": ra, "b": rb, "logit_scale": ls}, "NCE(a, b)")


@check("clip_base.nce", "fp32 logits under bf16 autocast (what a --precision bf16 run computes)")
def _(s, r):
    a, b = T.unit(16, 64, seed=8).float(), T.unit(16, 64, seed=9).float()
    bf16_agrees(lambda: s.clip_base.nce(a, b, torch.tensor(math.log(1 / 0.07))), "NCE")


def _two_views(n=6, e=4, seed=10):
    f = {"v": T.unit(n, e, seed=seed), "t": T.unit(n, e, seed=seed + 1)}
    f_a = {"v": T.unit(n, e, seed=seed + 2), "t": T.unit(n, e, seed=seed + 3)}
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


@check("clip_base.loss_con", "the gradient of L_con reaches z_V, z_T and both augmented views")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, seed=40)
    v, t, va, ta = (F.normalize(x, dim=-1) for x in raw)
    s.clip_base.loss_con({"v": v, "t": t}, {"v": va, "t": ta}, scale(0.07).float())["con"].backward()
    reaches(dict(zip(("z_V", "z_T", "z_V^a", "z_T^a"), raw)), "L_con")


# ============================== the two-tower learning check (A1-A4) ===================================
def two_tower_learning(s, script, method_terms, own=(), steps=30):
    mod = getattr(s, script)
    args = mod.Args(**T.TINY_TWO_TOWER)
    torch.manual_seed(0)
    model = mod.build_model(args, range(50)).train()
    batch = T.fake_batch(8)
    batch["image_aug"].requires_grad_()
    parts = {"the image encoder": model.visual, "the text encoder": model.text, "the image projection":
             model.image_proj, "the text projection": model.text_proj,
             **{f"the {name}": getattr(model, attr) for name, attr in own}}
    # the method's own terms reach both towers (and the augmented images) at the first step; in eval mode, since
    # in train mode batch norm couples the two views (one batch of 2N) and every term would reach both
    terms = mod.compute_losses(model.eval(), batch, args)
    what = " + ".join(f"terms['{k}']" for k in method_terms)
    sum(terms[k] for k in method_terms).backward()
    for name, part in parts.items():
        grads = [p.grad for p in (part.parameters() if isinstance(part, nn.Module) else [part])]
        require(any(g is not None and g.abs().sum() > 0 for g in grads),
                f"the gradient of {what} does not reach {name}: is a tower detached?")
    require(batch["image_aug"].grad is not None and batch["image_aug"].grad.abs().sum() > 0,
            f"{what} does not depend on the augmented images: the loss ignores its views")
    # a few dozen steps on the same batch: the loss falls and every part moves
    model.train()
    batch["image_aug"] = batch["image_aug"].detach()
    model.zero_grad(set_to_none=True)
    before = {name: [p.detach().clone() for p in (part.parameters() if isinstance(part, nn.Module) else [part])]
              for name, part in parts.items()}
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        terms = mod.compute_losses(model, batch, args)
        require(all(torch.isfinite(v).all() for v in terms.values()), f"a loss term is not finite at step {step}")
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    require(last < first - 0.05 * max(1.0, abs(first)),
            f"the training loss did not fall in {steps} steps on one batch: {first:.3f} -> {last:.3f}")
    for name, part in parts.items():
        now = part.parameters() if isinstance(part, nn.Module) else [part]
        require(any(not torch.equal(a, b) for a, b in zip(now, before[name])), f"{name} did not move in training")


@learning("clip_base", "30 steps of clip_base's tiny model on one batch: L_con reaches both towers and the views, "
                       "the loss falls, every part moves")
def _(s, r):
    two_tower_learning(s, "clip_base", ("con",), (("temperature", "logit_scale"),))


# ============================== A2 sep.py: loss_ortho, loss_con_i, uniformity, loss_uni; eval.uniformity ===
@check("sep.loss_ortho", "matches a loop over the pairs: 1/N Σ_j (⟨z_Vj, z_Vj^i⟩² + ⟨z_Tj, z_Tj^i⟩²)")
def _(s, r):
    zv, zv_i, zt, zt_i = (T.unit(6, 5, seed=k) for k in (1, 2, 3, 4))
    loop = sum(float(zv[j] @ zv_i[j]) ** 2 + float(zt[j] @ zt_i[j]) ** 2 for j in range(6)) / 6
    close(s.sep.loss_ortho(zv, zv_i, zt, zt_i), loop, "L_ortho of random unit features")


@check("sep.loss_ortho", "orthogonal features give 0; parallel or anti-parallel ones give 2, the maximum")
def _(s, r):
    e = torch.eye(6, dtype=torch.float64)
    close(s.sep.loss_ortho(e[:3], e[3:], e[:3], e[3:]), 0.0, "L_ortho of orthogonal features", abs=1e-9)
    zv, zt = T.unit(5, 4, seed=5), T.unit(5, 4, seed=6)
    close(s.sep.loss_ortho(zv, zv, zt, -zt), 2.0, "L_ortho with z^i = z (image) and z^i = −z (text)")
    close(s.sep.loss_ortho(e[:3], e[3:], zt[:3], zt[:3]), 1.0,
          "L_ortho with orthogonal image pairs and parallel text pairs")


@check("sep.loss_ortho", "a mean over the batch: repeating the batch twice leaves it unchanged")
def _(s, r):
    zv, zv_i, zt, zt_i = (T.unit(4, 5, seed=k) for k in (7, 8, 9, 10))
    once = value(s.sep.loss_ortho(zv, zv_i, zt, zt_i), "L_ortho")
    close(s.sep.loss_ortho(*(torch.cat([x, x]) for x in (zv, zv_i, zt, zt_i))), once, "L_ortho of the batch twice")


@check("sep.loss_ortho", "the gradient reaches z_V, z_V^i, z_T and z_T^i")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, seed=11)
    s.sep.loss_ortho(*(F.normalize(x, dim=-1) for x in raw)).backward()
    reaches(dict(zip(("z_V", "z_V^i", "z_T", "z_T^i"), raw)), "L_ortho")


@check("sep.loss_con_i", "NCE(z_V^i, z_V^{a,i}) + NCE(z_T^i, z_T^{a,i}) against loops, at τ = 0.07 and 0.5")
def _(s, r):
    zv_i, zv_ai, zt_i, zt_ai = (T.unit(7, 5, seed=k) for k in (12, 13, 14, 15))
    for tau in (0.07, 0.5):
        close(s.sep.loss_con_i(zv_i, zv_ai, zt_i, zt_ai, scale(tau)),
              T.nce_loop(zv_i, zv_ai, tau) + T.nce_loop(zt_i, zt_ai, tau), f"L_con^i at τ = {tau}")


@check("sep.loss_con_i", "the gradient reaches both views of both modalities and logit_scale")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, seed=16)
    ls = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    s.sep.loss_con_i(*(F.normalize(x, dim=-1) for x in raw), ls).backward()
    reaches({**dict(zip(("z_V^i", "z_V^{a,i}", "z_T^i", "z_T^{a,i}"), raw)), "logit_scale": ls}, "L_con^i")


@check("sep.uniformity", "matches a loop over the pairs j ≠ k, at t = 2 and t = 0.5")
def _(s, r):
    z = T.unit(7, 4, seed=17)
    for t in (2.0, 0.5):
        close(s.sep.uniformity(z, t), T.uni_loop(z, t), f"uniformity of 7 random unit points at t = {t}")


@check("sep.uniformity", "limits: collapsed points give 0, a regular simplex gives −t·8/3")
def _(s, r):
    same = T.unit(1, 4, seed=18).expand(6, 4)
    close(s.sep.uniformity(same), 0.0, "uniformity of 6 identical points (G_t = 1 for every pair)", abs=1e-6)
    simplex = F.normalize(torch.eye(4, dtype=torch.float64) - 0.25, dim=-1)   # ‖u − v‖² = 8/3 for every pair
    close(s.sep.uniformity(simplex), -2 * 8 / 3, "uniformity of the 4 vertices of a regular simplex at t = 2")


@check("sep.uniformity", "the gradient is finite, also for coincident points (no square root of 0)")
def _(s, r):
    raw, = leaves((6, 5), seed=19)
    z = F.normalize(torch.cat([raw[:4], raw[:2]]), dim=-1)       # rows 4, 5 coincide with rows 0, 1
    s.sep.uniformity(z).backward()
    reaches({"z": raw}, "uniformity of points of which two pairs coincide")


@check("sep.loss_uni", "uniformity(z_V^i) + uniformity(z_T^i), one log per modality, against loops")
def _(s, r):
    zv_i, zt_i = T.unit(6, 4, seed=20), T.unit(6, 4, seed=21)
    for t in (2.0, 0.5):
        close(s.sep.loss_uni(zv_i, zt_i, t=t), T.uni_loop(zv_i, t) + T.uni_loop(zt_i, t), f"L_uni^i at t = {t}")
    simplex = F.normalize(torch.eye(4, dtype=torch.float64) - 0.25, dim=-1)
    same = T.unit(1, 4, seed=22).expand(4, 4)
    close(s.sep.loss_uni(simplex, same), -2 * 8 / 3,
          "L_uni^i of a spread image side and a collapsed text side (one log per modality, not of the sum)")


@check("sep.loss_uni", "the gradient reaches both modalities")
def _(s, r):
    rv, rt = leaves((6, 5), (6, 5), seed=23)
    s.sep.loss_uni(F.normalize(rv, dim=-1), F.normalize(rt, dim=-1)).backward()
    reaches({"z_V^i": rv, "z_T^i": rt}, "L_uni^i")


@check("eval.uniformity", "a Python float equal to a loop over the pairs i ≠ j at t = 2")
def _(s, r):
    u = T.unit(9, 4, seed=24).float()
    got = s.eval.uniformity(u)
    require(isinstance(got, float), f"eval.uniformity returns a Python float (a metric), not {type(got).__name__}")
    close(got, T.uni_loop(u.double(), 2.0), "uniformity of 9 random unit points", rel=1e-4)


@check("eval.uniformity", "two points give −2‖u − v‖²; identical points give 0")
def _(s, r):
    close(s.eval.uniformity(torch.eye(2)), -4.0, "uniformity of two orthogonal unit vectors", rel=1e-5)
    close(s.eval.uniformity(torch.ones(5, 3) / math.sqrt(3)), 0.0, "uniformity of 5 identical points", abs=1e-6)


@check("eval.uniformity", "more rows than max_points: the same fixed subset on every call; fewer: every row")
def _(s, r):
    u = T.unit(50, 3, seed=25).float()
    a, b = s.eval.uniformity(u, max_points=20), s.eval.uniformity(u, max_points=20)
    require(a == b, f"two calls on the same 50 points (max_points 20) differ: {a:.6g} and {b:.6g}")
    full = T.uni_loop(u.double(), 2.0)
    require(abs(a - full) > 1e-6, "with max_points 20 of 50 points, the value should come from a subset of 20 rows")
    close(s.eval.uniformity(u, max_points=50), full, "uniformity of 50 points with max_points 50", rel=1e-4)


@learning("sep", "30 steps of sep's tiny model: L_Sep reaches both towers, both independent heads and the views; "
                 "the loss falls, every part moves")
def _(s, r):
    two_tower_learning(s, "sep", ("sep",), (("independent image head", "image_proj_i"),
                                           ("independent text head", "text_proj_i"), ("temperature", "logit_scale")))


# ============================== A3 bridge.py: loss_bridge ============================================
@check("bridge.loss_bridge", "matches the closed form for unit vectors at t = 0.25 and t = 0.7")
def _(s, r):
    zv_a, zv, zt = T.unit(8, 5, seed=1), T.unit(8, 5, seed=2), T.unit(8, 5, seed=3)
    for t in (0.25, 0.7):
        close(s.bridge.loss_bridge(zv_a, zv, zt, t), T.bridge_closed_form(zv_a, zv, zt, t), f"L_Br at t = {t}",
              abs=1e-6)


@check("bridge.loss_bridge", "one t per pair: t of shape (N, 1)")
def _(s, r):
    zv_a, zv, zt = T.unit(8, 5, seed=4), T.unit(8, 5, seed=5), T.unit(8, 5, seed=6)
    t = torch.rand(8, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    close(s.bridge.loss_bridge(zv_a, zv, zt, t), T.bridge_closed_form(zv_a, zv, zt, t), "L_Br with a t per pair",
          abs=1e-6)


@check("bridge.loss_bridge", "0 on the bridge (z^a = μ), 4 at the antipode (z^a = −μ); t = 1 is z_V's end")
def _(s, r):
    zv, zt, t = T.unit(6, 5, seed=7), T.unit(6, 5, seed=8), 0.25
    mu = F.normalize(t * zv + (1 - t) * zt, dim=-1)
    close(s.bridge.loss_bridge(mu, zv, zt, t), 0.0, "L_Br with z^a = μ (on the bridge)", abs=1e-6)
    close(s.bridge.loss_bridge(-mu, zv, zt, t), 4.0, "L_Br with z^a = −μ (the farthest point)", abs=1e-5)
    close(s.bridge.loss_bridge(zv, zv, zt, 1.0), 0.0, "L_Br with t = 1 and z^a = z_V (μ is z_V)", abs=1e-6)


@check("bridge.loss_bridge", "grows as z^a moves away from μ along a great circle (the printed expansion shrinks)")
def _(s, r):
    zv, zt, w = T.unit(1, 5, seed=9), T.unit(1, 5, seed=10), T.unit(1, 5, seed=11)
    mu = F.normalize(0.25 * zv + 0.75 * zt, dim=-1)
    w = F.normalize(w - (w * mu).sum(-1, keepdim=True) * mu, dim=-1)
    vals = [value(s.bridge.loss_bridge(math.cos(a) * mu + math.sin(a) * w, zv, zt, 0.25), "L_Br")
            for a in torch.linspace(0, math.pi, 9).tolist()]
    require(all(b > a for a, b in zip(vals, vals[1:])),
            f"L_Br along a great circle from μ to −μ should grow, got {', '.join(f'{v:.3f}' for v in vals)}")


@check("bridge.loss_bridge", "a mean over the batch: repeating the batch twice leaves it unchanged")
def _(s, r):
    zv_a, zv, zt = T.unit(4, 5, seed=12), T.unit(4, 5, seed=13), T.unit(4, 5, seed=14)
    once = value(s.bridge.loss_bridge(zv_a, zv, zt, 0.25), "L_Br")
    close(s.bridge.loss_bridge(torch.cat([zv_a] * 2), torch.cat([zv] * 2), torch.cat([zt] * 2), 0.25), once,
          "L_Br of the batch twice")


@check("bridge.loss_bridge", "the gradient reaches z^a, z_V and z_T (no stop-gradient on the bridge)")
def _(s, r):
    ra, rv, rt = leaves((6, 5), (6, 5), (6, 5), seed=15)
    s.bridge.loss_bridge(*(F.normalize(x, dim=-1) for x in (ra, rv, rt)), 0.25).backward()
    reaches({"z_V^a": ra, "z_V": rv, "z_T": rt}, "L_Br")


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
    q, _ = torch.linalg.qr(torch.randn(e, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@check("geocons.loss_gc", "matches a loop over the pairs (j, k), divided by N")
def _(s, r):
    zv, zt = T.unit(5, 4, seed=1), T.unit(5, 4, seed=2)
    close(s.geocons.loss_gc(zv, zt), gc_loop(zv, zt), "L_GC of random unit features")


@check("geocons.loss_gc", "identical modalities give 0; rotating both modalities together changes nothing")
def _(s, r):
    zv, zt = T.unit(6, 4, seed=3), T.unit(6, 4, seed=4)
    close(s.geocons.loss_gc(zv, zv), 0.0, "L_GC with z_T = z_V", abs=1e-6)
    q = rotation(4, 0)
    close(s.geocons.loss_gc(zv @ q, zt @ q), value(s.geocons.loss_gc(zv, zt), "L_GC"),
          "L_GC after rotating both modalities by the same rotation")


@check("geocons.loss_gc", "CyCLIP's normalization: N times the mean over the N² pairs (it grows with the batch)")
def _(s, r):
    zv, zt = T.unit(32, 8, seed=5), T.unit(32, 8, seed=6)
    s_vt, s_vv, s_tt = zv @ zt.t(), zv @ zv.t(), zt @ zt.t()
    want = ((s_vt - s_vt.t()).square().mean() + (s_vv - s_tt).square().mean()).item() * 32
    close(s.geocons.loss_gc(zv, zt), want, "L_GC of a batch of 32")


@check("geocons.loss_gc", "the gradient reaches z_V and z_T")
def _(s, r):
    rv, rt = leaves((6, 5), (6, 5), seed=7)
    s.geocons.loss_gc(F.normalize(rv, dim=-1), F.normalize(rt, dim=-1)).backward()
    reaches({"z_V": rv, "z_T": rt}, "L_GC")


@check("geocons.loss_gc_aug", "matches a loop: the two views' pair sums / N + the matched term ⟨z_Vj, z_Tj⟩")
def _(s, r):
    zv, zt, zv_a, zt_a = (T.unit(5, 4, seed=k) for k in (8, 9, 10, 11))
    close(s.geocons.loss_gc_aug(zv, zt, zv_a, zt_a), gc_aug_loop(zv, zt, zv_a, zt_a), "L_GC^a of random features")


@check("geocons.loss_gc_aug", "views equal to the originals, or both rotated together, give 0")
def _(s, r):
    zv, zt = T.unit(5, 4, seed=12), T.unit(5, 4, seed=13)
    close(s.geocons.loss_gc_aug(zv, zt, zv, zt), 0.0, "L_GC^a with z^a = z", abs=1e-6)
    q = rotation(4, 1)
    close(s.geocons.loss_gc_aug(zv, zt, zv @ q, zt @ q), 0.0, "L_GC^a with both views rotated together", abs=1e-6)


@check("geocons.loss_gc_aug", "the matched term: rotating only the text view changes ⟨z_V^a, z_T^a⟩ and nothing else")
def _(s, r):
    zv, zt = T.unit(5, 4, seed=14), T.unit(5, 4, seed=15)
    zt_a = zt @ rotation(4, 2)
    want = sum((_dot(zv[j], zt[j]) - _dot(zv[j], zt_a[j])) ** 2 for j in range(5)) / 5
    close(s.geocons.loss_gc_aug(zv, zt, zv, zt_a), want, "L_GC^a when only the text view is rotated (matched term)")


@check("geocons.loss_gc_aug", "the gradient reaches both modalities and both views")
def _(s, r):
    raw = leaves(*[(6, 5)] * 4, seed=16)
    s.geocons.loss_gc_aug(*(F.normalize(x, dim=-1) for x in raw)).backward()
    reaches(dict(zip(("z_V", "z_T", "z_V^a", "z_T^a"), raw)), "L_GC^a")


@learning("geocons", "30 steps of geocons' tiny model: L_GC + L_GC^a reach both towers and the views; the loss "
                     "falls, every part moves")
def _(s, r):
    two_tower_learning(s, "geocons", ("gc", "gc_a"))


# ============================== A5 albef_fusion.py ===================================================
def _pairs(n_pairs=2):
    """(online, momentum) module pairs with different weights; the momentum side never requires grad."""
    torch.manual_seed(0)
    out = []
    for _ in range(n_pairs):
        online = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        momentum = copy.deepcopy(online)
        for p in list(momentum.parameters()) + list(online.parameters()):
            nn.init.normal_(p)
        for p in momentum.parameters():
            p.requires_grad_(False)
        out.append((online, momentum))
    return out


def _params(pairs, side):
    return [[p.detach().clone() for p in pair[side].parameters()] for pair in pairs]


@check("albef_fusion.momentum_update", "θ_m ← m θ_m + (1 − m) θ at m = 0.9, for every parameter of every pair")
def _(s, r):
    pairs = _pairs()
    old = _params(pairs, 1)
    s.albef_fusion.momentum_update(pairs, 0.9)
    for i, ((online, momentum), before) in enumerate(zip(pairs, old)):
        for k, (p, p_m, b) in enumerate(zip(online.parameters(), momentum.parameters(), before)):
            tensors_close(p_m, 0.9 * b + 0.1 * p.detach(), f"pair {i}, parameter {k}: θ_m after the update", 1e-6)


@check("albef_fusion.momentum_update", "m = 0 copies the online model; m = 1 leaves the momentum model as it was")
def _(s, r):
    pairs = _pairs()
    old = _params(pairs, 1)
    s.albef_fusion.momentum_update(pairs, 1.0)
    for before, (_, momentum) in zip(old, pairs):
        for b, p_m in zip(before, momentum.parameters()):
            tensors_close(p_m, b, "θ_m after an update with m = 1", 0)
    s.albef_fusion.momentum_update(pairs, 0.0)
    for online, momentum in pairs:
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            tensors_close(p_m, p.detach(), "θ_m after an update with m = 0 (a copy of θ)", 1e-7)


@check("albef_fusion.momentum_update", "the online model is left unchanged and needs no gradient")
def _(s, r):
    pairs = _pairs()
    old = _params(pairs, 0)
    s.albef_fusion.momentum_update(pairs, 0.9)
    for before, (online, momentum) in zip(old, pairs):
        for b, p in zip(before, online.parameters()):
            tensors_close(p.detach(), b, "the online parameters after a momentum update (the update runs one way)", 0)
        require(all(not p.requires_grad for p in momentum.parameters()),
                "the momentum parameters should stay out of autograd (requires_grad False)")


def _queues(M=12, E=3):
    return (torch.arange(M * E).float().view(M, E), -torch.arange(M * E).float().view(M, E),
            torch.zeros((), dtype=torch.long))


@check("albef_fusion.dequeue_and_enqueue", "a FIFO: over 7 steps of 4 into 12 rows, the ring buffer read from the "
                                           "pointer on is always the 12 most recent features, oldest first")
def _(s, r):
    image_q, text_q, ptr = _queues()
    ref_img, ref_txt = list(image_q.clone()), list(text_q.clone())
    g = torch.Generator().manual_seed(0)
    for step in range(7):
        new_img, new_txt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
        s.albef_fusion.dequeue_and_enqueue(image_q, text_q, ptr, new_img, new_txt)
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
        s.albef_fusion.dequeue_and_enqueue(image_q, text_q, ptr, torch.ones(4, 3), -torch.ones(4, 3))
        seen.append(int(ptr))
    require(seen == [4, 8, 0, 4, 8, 0, 4], f"queue_ptr after each of 7 steps: expected 4, 8, 0, 4, 8, 0, 4, got "
                                          f"{', '.join(map(str, seen))}")


@check("albef_fusion.distill_targets", "y = α·softmax(s_m) + (1 − α)·onehot against a loop, α ∈ {0, 0.25, 0.4, 1}")
def _(s, r):
    s_m = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    for alpha in (0.0, 0.25, 0.4, 1.0):
        y = s.albef_fusion.distill_targets(s_m, alpha)
        want = torch.tensor([[alpha * math.exp(s_m[j, k].item()) / sum(math.exp(v) for v in s_m[j].tolist())
                              + (1 - alpha) * (j == k) for k in range(10)] for j in range(4)], dtype=torch.float64)
        tensors_close(y, want, f"the soft labels y at α = {alpha}", 1e-9)


@check("albef_fusion.distill_targets", "rows are distributions; the one-hot of row j sits in column j of (N, N+M)")
def _(s, r):
    s_m = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    y = s.albef_fusion.distill_targets(s_m, 0.0)
    tensors_close(y, torch.eye(5, 12), "the soft labels at α = 0 (the one-hot positives)", 0)
    y = s.albef_fusion.distill_targets(s_m, 0.4)
    tensors_close(y.sum(1), torch.ones(5), "the row sums of the soft labels at α = 0.4", 1e-6)


def _itc_inputs(seed=0, n=3, m=6, e=5):
    return (T.unit(n, e, seed=seed), T.unit(n, e, seed=seed + 1), T.unit(n + m, e, seed=seed + 2))


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
    _, sim = s.albef_fusion.distilled_nce(zr, z_m.float(), keys.float(), torch.tensor(0.1), 0.4)
    tensors_close(sim, (zr @ keys.float().t() / 0.1).detach(), "the returned similarities s", 1e-5)
    require(not sim.requires_grad, "the returned similarities should be detached (they only pick hard negatives)")


@check("albef_fusion.distilled_nce", "the gradient reaches z and τ, never the momentum queries (the soft labels "
                                     "are constants)")
def _(s, r):
    zr, zmr = leaves((3, 5), (3, 5), seed=5)
    keys = T.unit(9, 5, seed=6).float()
    temp = torch.tensor(0.1, requires_grad=True)
    h, _ = s.albef_fusion.distilled_nce(F.normalize(zr, dim=-1), F.normalize(zmr, dim=-1), keys, temp, 0.4)
    h.backward()
    reaches({"z": zr, "τ": temp}, "H(y, p)")
    require(zmr.grad is None or not zmr.grad.any(),
            "the gradient reaches the momentum queries z_m: compute the soft labels without a graph (no_grad)")


@check("albef_fusion.distilled_nce", "fp32 under bf16 autocast")
def _(s, r):
    z, z_m, keys = (x.float() for x in _itc_inputs(seed=7, n=8, m=24, e=32))
    bf16_agrees(lambda: s.albef_fusion.distilled_nce(z, z_m, keys, torch.tensor(0.07), 0.4)[0], "H(y, p)")


PAD, CLS, SEP, MASK, VOCAB = 0, 2, 3, 4, 100


def _token_batch():
    """64 captions [CLS] w ... w [SEP] [PAD] ... of 3 to 20 tokens, word ids 5..99."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (64, 20), generator=g)
    for row, n in enumerate(torch.randint(3, 21, (64,), generator=g).tolist()):
        ids[row, 0], ids[row, n - 1], ids[row, n:] = CLS, SEP, PAD
    return ids, (ids == PAD) | (ids == CLS) | (ids == SEP)


def _masking_counts(s, prob, draws):
    ids, special = _token_batch()
    chosen = masked = kept = other = eligible = 0
    random_ids = []
    for _ in range(draws):
        out, labels = s.albef_fusion.mask_tokens(ids, VOCAB, MASK, [PAD, CLS, SEP], prob)
        sel = labels != -100
        chosen, eligible = chosen + sel.sum().item(), eligible + (~special).sum().item()
        masked += (out[sel] == MASK).sum().item()
        kept += (out[sel] == ids[sel]).sum().item()
        rand = sel & (out != MASK) & (out != ids)
        other += rand.sum().item()
        random_ids += out[rand].tolist()
    return chosen, eligible, masked, kept, other, random_ids


@check("albef_fusion.mask_tokens", "never [PAD], [CLS] or [SEP]; labels are the original ids where chosen and −100 "
                                   "elsewhere; nothing else changes, the input included")
def _(s, r):
    torch.manual_seed(0)
    ids, special = _token_batch()
    original = ids.clone()
    for _ in range(20):
        out, labels = s.albef_fusion.mask_tokens(ids, VOCAB, MASK, [PAD, CLS, SEP], 0.15)
        require(torch.equal(ids, original), "mask_tokens changed its input_ids in place: work on a copy")
        require(out.shape == ids.shape and labels.shape == ids.shape, "ids and labels keep the (N, L) shape")
        require(((labels == -100) | (labels == ids)).all(),
                "a label is neither the original id (a chosen token) nor −100 (every other token)")
        sel = labels != -100
        require(sel.any(), "no token was chosen in 20 draws at prob 0.15")
        require(not (sel & special).any(), "a [PAD], [CLS] or [SEP] token was chosen for masking")
        require(torch.equal(labels[sel], ids[sel]), "the labels of the chosen tokens are not their original ids")
        require(torch.equal(out[~sel], ids[~sel]), "a token that was not chosen changed")


@check("albef_fusion.mask_tokens", "chooses a fraction prob of the other tokens (15% and 40%)")
def _(s, r):
    torch.manual_seed(1)
    for prob in (0.15, 0.4):
        chosen, eligible, *_ = _masking_counts(s, prob, 30)
        close(chosen / eligible, prob, f"the fraction of eligible tokens chosen at prob {prob}", rel=0, abs=0.01)


@check("albef_fusion.mask_tokens", "of the chosen tokens 80% become [MASK], 10% a random id, 10% stay")
def _(s, r):
    torch.manual_seed(2)
    chosen, _, masked, kept, other, random_ids = _masking_counts(s, 0.15, 80)
    # a random id can be [MASK] or the original id itself (1/V each)
    close(masked / chosen, 0.8 + 0.1 / VOCAB, "the fraction of chosen tokens replaced by [MASK]", rel=0, abs=0.015)
    close(kept / chosen, 0.1 + 0.1 / VOCAB, "the fraction of chosen tokens kept", rel=0, abs=0.015)
    close(other / chosen, 0.1 * (1 - 2 / VOCAB), "the fraction of chosen tokens replaced by a random id", rel=0,
          abs=0.015)
    require(min(random_ids) >= 0 and max(random_ids) < VOCAB and len(set(random_ids)) > VOCAB // 2,
            "the random replacement ids should be spread over the whole vocabulary [0, vocab_size)")


def _negatives(s, s_i2t, s_t2i, same=None, draws=1):
    out = [s.albef_fusion.hard_negatives(s_i2t, s_t2i, same) for _ in range(draws)]
    for neg_text, neg_image in out[:1]:
        for name, idx in (("negative text of each image", neg_text), ("negative image of each text", neg_image)):
            require(torch.is_tensor(idx) and idx.shape == (len(s_i2t),) and not idx.is_floating_point(),
                    f"the {name}: expected an integer tensor of shape ({len(s_i2t)},), got "
                    f"{getattr(idx, 'shape', type(idx).__name__)}")
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


@check("albef_fusion.hard_negatives", "one index per row, never the positive, even when the positive's similarity "
                                      "makes every other softmax weight underflow")
def _(s, r):
    torch.manual_seed(0)
    n = 8
    for sim in (torch.randn(n, n), torch.randn(n, n) * 10, torch.full((n, n), -100.0).fill_diagonal_(100.0)):
        neg_text, neg_image = _negatives(s, sim, sim.t().contiguous(), draws=30)
        require((neg_text != torch.arange(n)).all() and (neg_image != torch.arange(n)).all(),
                "a row drew its own positive as a negative")


@check("albef_fusion.hard_negatives", "never another caption of the same image (the `same` mask)")
def _(s, r):
    torch.manual_seed(1)
    index = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])
    same, sim = index[:, None] == index[None, :], torch.randn(8, 8)
    neg_text, neg_image = _negatives(s, sim, sim.t().contiguous(), same, draws=50)
    require((index[neg_text] != index).all() and (index[neg_image] != index).all(),
            "a negative came from the same image (`same` marks the pairs that must never be drawn)")


@check("albef_fusion.hard_negatives", "draws in proportion to softmax(s) + ε: the frequencies of 3,000 draws")
def _(s, r):
    torch.manual_seed(2)
    n = 5
    sim = torch.arange(n * n, dtype=torch.float32).view(n, n) % 4 * 0.7          # uneven rows
    weights = (F.softmax(sim, 1) + 1e-4).masked_fill(torch.eye(n, dtype=torch.bool), 0)
    want = weights / weights.sum(1, keepdim=True)
    neg_text, _ = _negatives(s, sim, torch.zeros(n, n), draws=3000)
    freq = torch.stack([torch.bincount(neg_text[:, j], minlength=n).float() / 3000 for j in range(n)])
    err, (j, k) = (freq - want).abs().max().item(), divmod((freq - want).abs().argmax().item(), n)
    require(err < 0.035, f"image {j} drew text {k} with frequency {freq[j, k]:.3f}, expected {want[j, k]:.3f} "
                         f"(softmax of its similarities + ε, the positive excluded)")


@check("albef_fusion.hard_negatives", "the texts for each image come from s_i2t, the images for each text from s_t2i")
def _(s, r):
    torch.manual_seed(3)
    s_i2t, s_t2i = torch.zeros(6, 6), torch.zeros(6, 6)
    s_i2t[0, 3], s_t2i[0, 5] = 8.0, 8.0
    neg_text, neg_image = _negatives(s, s_i2t, s_t2i, draws=200)
    require((neg_text[:, 0] == 3).float().mean() > 0.9,
            "image 0 is most similar to text 3 in s_i2t: its negative text should almost always be text 3")
    require((neg_image[:, 0] == 5).float().mean() > 0.9,
            "text 0 is most similar to image 5 in s_t2i: its negative image should almost always be image 5")
    spread = torch.bincount(neg_text[:, 1], minlength=6)
    require((spread[[0, 2, 3, 4, 5]] > 20).all(), "a row of equal similarities should spread its draws over every "
                                                  "other column (a sample, not the hardest one)")


def fusion_learning(s, script, steps=20, **extra):
    mod = getattr(s, script)
    tok = tokenizer()
    model, args = T.tiny_model(tok, script=mod, batch_size=8, queue_size=32, **extra)
    model.train()
    batch = T.toy_batch(tok)
    online = {"the image encoder": model.visual, "the text encoder": model.bert.text_layers,
              "the fusion encoder": model.bert.fusion_layers, "the image projection": model.vision_proj,
              "the text projection": model.text_proj, "the ITM head": model.itm_head}
    online = {k: list(v.parameters()) for k, v in online.items()}
    online["the temperature"] = [model.temp]
    if hasattr(model, "codebook"):
        online["the codebook"] = [model.codebook]
    momentum = model.momentum_parameters()
    torch.manual_seed(0)
    mod.compute_losses(model, batch, args, 0.4)["loss"].backward()
    for name, params in online.items():
        require(any(p.grad is not None and p.grad.abs().sum() > 0 for p in params),
                f"the loss sends no gradient to {name}: is a tower detached?")
    require(all(p.grad is None for p in momentum), "the momentum model received a gradient: it must stay frozen")
    model.zero_grad(set_to_none=True)
    before = {k: [p.detach().clone() for p in v] for k, v in online.items()}
    ema = [p.detach().clone() for p in momentum]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        terms = mod.compute_losses(model, batch, args, 0.4)
        require(all(torch.isfinite(v).all() for v in terms.values()), f"a loss term is not finite at step {step}")
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        mod.momentum_update(model.momentum_pairs(), 0.9)
        now = [p.detach() for o, _ in model.momentum_pairs() for p in o.parameters()]
        ema = [0.9 * e + 0.1 * p for e, p in zip(ema, now)]
        losses.append(terms["loss"].item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    require(last < first - 0.05 * max(1.0, abs(first)),
            f"the training loss did not fall in {steps} steps on one batch: {first:.3f} -> {last:.3f}")
    for name, params in online.items():
        require(any(not torch.equal(p, b) for p, b in zip(params, before[name])), f"{name} did not move in training")
    err = max((p - e).abs().max().item() for p, e in zip(momentum, ema))
    require(err < 1e-4, f"after {steps} steps the momentum model is off the moving average of the online model by "
                        f"up to {err:.3g}")
    want = (steps + 1) * 8 % 32                       # the first batch (the gradient check) was enqueued too
    require(int(model.queue_ptr) == want, f"after {steps + 1} batches of 8 into a queue of 32 the pointer should be "
                                          f"{want}, got {int(model.queue_ptr)}")
    tensors_close(model.image_queue.norm(dim=-1), torch.ones(32), "the norms of the image queue's rows", 1e-5)


@learning("albef_fusion", "20 steps of ALBEF's tiny model: gradient to every online part and none to the momentum "
                          "copy; the loss falls; the momentum copy is the moving average; the queue turns over")
def _(s, r):
    fusion_learning(s, "albef_fusion")


# ============================== A6 codis.py: ipot, swapped_prediction, loss_code =======================
@check("codis.ipot", "reaches the exact optimum of square uniform problems (brute force over permutations), "
                     "where Sinkhorn's plan stays off")
def _(s, r):
    for n in (3, 4, 5):
        cost = torch.rand(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        best = T.exact_uniform_ot(cost)
        plan = s.codis.ipot(cost, T.uniform(n), T.uniform(n), beta=0.5, n_outer=300)
        got = value((plan * cost).sum(), "⟨T, D⟩")
        close(got, best, f"⟨T, D⟩ of IPOT's plan (300 steps) on a random {n}×{n} cost: the optimum", rel=0, abs=1e-3)
        entropic = value((T.sinkhorn(cost, T.uniform(n), T.uniform(n), beta=0.5) * cost).sum(), "Sinkhorn")
        require(abs(got - best) < abs(entropic - best), f"on a {n}×{n} cost IPOT's plan is no closer to the optimum "
                                                        f"than Sinkhorn's: the proximal step T ← A ⊙ T is missing?")


@check("codis.ipot", "marginals T 1 = μ, Tᵀ 1 = ν on rectangular problems (16×40, 40×16) at the defaults")
def _(s, r):
    for n, k in ((16, 40), (40, 16)):
        cost = 1 - T.unit(n, 8, seed=n) @ T.unit(k, 8, seed=k).T
        plan = s.codis.ipot(cost, T.uniform(n), T.uniform(k))
        require(tuple(plan.shape) == (n, k), f"the plan of a {n}×{k} cost should be {n}×{k}, got {tuple(plan.shape)}")
        require((plan >= 0).all(), "the plan has negative entries")
        tensors_close(plan.sum(1), T.uniform(n).to(plan.dtype), f"the row sums T 1 of a {n}×{k} plan", 1e-4)
        tensors_close(plan.sum(0), T.uniform(k).to(plan.dtype), f"the column sums Tᵀ 1 of a {n}×{k} plan", 1e-4)


@check("codis.ipot", "general marginals, 3 inner steps: the reference's plan")
def _(s, r):
    g = torch.Generator().manual_seed(0)
    cost = 1 - T.unit(12, 8, seed=3) @ T.unit(20, 8, seed=4).T
    mu, nu = torch.rand(12, generator=g, dtype=torch.float64) ** 4 + 1e-3, torch.rand(20, generator=g) + 0.1
    mu, nu = mu / mu.sum(), (nu / nu.sum()).double()
    tensors_close(s.codis.ipot(cost, mu, nu, 0.5, 50, 3), r.codis.ipot(cost, mu, nu, 0.5, 50, 3),
                  "the plan for non-uniform marginals", 1e-6)


@check("codis.ipot", "a sharp kernel (β = 0.01) and a far-away row of fp16 costs: a finite fp32 plan")
def _(s, r):
    cost = (2 * torch.rand(64, 32, generator=torch.Generator().manual_seed(2))).half()
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
    z, codebook = T.unit(3, 4, seed=0), T.unit(5, 4, seed=1)
    plan = torch.rand(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 15
    for gamma in (0.1, 0.5):
        close(s.codis.swapped_prediction(z, codebook, plan, gamma), swapped_loop(z, codebook, plan, gamma),
              f"H(T̂, P) at γ = {gamma}")


@check("codis.swapped_prediction", "the plan's rows are renormalized: scaling the plan changes nothing")
def _(s, r):
    z, codebook = T.unit(4, 4, seed=2), T.unit(6, 4, seed=3)
    plan = torch.rand(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    once = value(s.codis.swapped_prediction(z, codebook, plan, 0.1), "H(T̂, P)")
    close(s.codis.swapped_prediction(z, codebook, plan / 24, 0.1), once, "H(T̂, P) with the plan divided by 24")


@check("codis.swapped_prediction", "the gradient reaches the student features z and the codebook")
def _(s, r):
    rz, rc = leaves((4, 5), (6, 5), seed=4)
    plan = torch.rand(4, 6, generator=torch.Generator().manual_seed(2))
    s.codis.swapped_prediction(F.normalize(rz, dim=-1), F.normalize(rc, dim=-1), plan, 0.1).backward()
    reaches({"z": rz, "the codebook": rc}, "H(T̂, P)")


def _code_inputs(s, grad=False):
    n, k, e = 6, 4, 5
    args = s.codis.Args(code_temp=0.2, ipot_beta=0.5, ipot_outer=40, ipot_inner=1)
    feats = [T.unit(n, e, seed=k_).float().requires_grad_(grad) for k_ in range(4)]   # z_v, z_t, f_v, f_t
    return args, feats, T.unit(k, e, seed=4).float().requires_grad_(grad)


def _code_plans(r, f_v, f_t, codebook):
    n, k = len(f_v), len(codebook)
    mu, nu = torch.full((n,), 1 / n), torch.full((k,), 1 / k)
    d_v, d_t = 1 - f_v.detach() @ codebook.detach().T, 1 - f_t.detach() @ codebook.detach().T
    return d_v, d_t, r.codis.ipot(d_v, mu, nu, 0.5, 40), r.codis.ipot(d_t, mu, nu, 0.5, 40)


@check("codis.loss_code", "ot_v, ot_t = ⟨T, D⟩ with D = 1 − f Cᵀ of the plan features f and T = IPOT(D, 1/N, 1/K)")
def _(s, r):
    args, (z_v, z_t, f_v, f_t), codebook = _code_inputs(s)
    terms = s.codis.loss_code(z_v, z_t, f_v, f_t, codebook, args)
    require(isinstance(terms, dict) and {"ot_v", "ot_t", "t2p", "i2p"} <= set(terms),
            f"loss_code returns a dict with ot_v, ot_t, t2p and i2p, got "
            f"{sorted(terms) if isinstance(terms, dict) else type(terms).__name__}")
    d_v, d_t, t_i2p, t_t2p = _code_plans(r, f_v, f_t, codebook)
    close(terms["ot_v"], (t_i2p * d_v).sum().item(), "ot_v = ⟨T_i2p, D_v⟩ (the plan of the image features f_v)")
    close(terms["ot_t"], (t_t2p * d_t).sum().item(), "ot_t = ⟨T_t2p, D_t⟩ (the plan of the text features f_t)")


@check("codis.loss_code", "the plans are swapped: t2p = H(T_i2p, P_t2p), i2p = H(T_t2p, P_i2p)")
def _(s, r):
    args, (z_v, z_t, f_v, f_t), codebook = _code_inputs(s)
    terms = s.codis.loss_code(z_v, z_t, f_v, f_t, codebook, args)
    _, _, t_i2p, t_t2p = _code_plans(r, f_v, f_t, codebook)
    close(terms["t2p"], r.codis.swapped_prediction(z_t, codebook, t_i2p, 0.2).item(),
          "t2p: the text student z_t predicts the IMAGE plan T_i2p", rel=1e-5)
    close(terms["i2p"], r.codis.swapped_prediction(z_v, codebook, t_t2p, 0.2).item(),
          "i2p: the image student z_v predicts the TEXT plan T_t2p", rel=1e-5)


@check("codis.loss_code", "⟨T, D⟩ trains the codebook only; the swapped predictions train z and the codebook; "
                          "the plan features f get no gradient")
def _(s, r):
    args, (z_v, z_t, f_v, f_t), codebook = _code_inputs(s, grad=True)
    terms = s.codis.loss_code(z_v, z_t, f_v, f_t, codebook, args)
    _, _, t_i2p, t_t2p = _code_plans(r, f_v, f_t, codebook)
    (terms["ot_v"] + terms["ot_t"]).backward(retain_graph=True)
    for name, t in (("f_v", f_v), ("f_t", f_t), ("z_v", z_v), ("z_t", z_t)):
        require(t.grad is None or not t.grad.any(), f"⟨T, D⟩ sends gradient to {name}: the features in D are fixed")
    require(codebook.grad is not None, "⟨T, D⟩ sends no gradient to the codebook")
    tensors_close(codebook.grad, -(t_i2p.T @ f_v.detach() + t_t2p.T @ f_t.detach()),
                  "the codebook's gradient of ot_v + ot_t (−Tᵀ f per modality)", 1e-5)
    codebook.grad = None
    (terms["t2p"] + terms["i2p"]).backward()
    reaches({"z_v": z_v, "z_t": z_t, "the codebook": codebook}, "t2p + i2p")
    require(f_v.grad is None or not f_v.grad.any(), "the swapped predictions send gradient to the plan features f_v")


@check("codis.loss_code", "fp32 under bf16 autocast")
def _(s, r):
    args, feats, codebook = _code_inputs(s)
    want = s.codis.loss_code(*feats, codebook, args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = s.codis.loss_code(*feats, codebook, args)
    for k in ("ot_v", "ot_t", "t2p", "i2p"):
        require(got[k].dtype == torch.float32, f"{k} under bf16 autocast: expected float32, got {got[k].dtype}")
        close(got[k], value(want[k], k), f"{k} under bf16 autocast", rel=2e-4)


@learning("codis", "20 steps of CODIS's tiny model: gradient to every online part and the codebook, none to the "
                   "momentum copy; the loss falls; the momentum copy is the moving average")
def _(s, r):
    fusion_learning(s, "codis", codebook_size=8, ipot_outer=10)


# ============================== A7 eval.py: _ranks, retrieval_metrics, _reranked_ranks, rerank_retrieval ==
def _retrieval_case(seed=0):
    txt2img = torch.tensor([i for i in range(23) for _ in range(1 + i % 4)])       # 1 to 4 captions per image
    return T.unit(23, 5, seed=seed).float(), T.unit(len(txt2img), 5, seed=seed + 1).float(), txt2img


def ranks_loop(queries, cands, q_group, c_group):
    sim = (queries @ cands.T).tolist()
    out = []
    for q, row in enumerate(sim):
        best = max(v for c, v in enumerate(row) if c_group[c] == q_group[q])
        out.append(sum(v > best for v in row))
    return torch.tensor(out)


@check("eval._ranks", "matches a count by hand (candidates strictly above the best positive), both directions")
def _(s, r):
    img, txt, txt2img = _retrieval_case()
    ids = torch.arange(23)
    for what, args in (("image→text", (img, txt, ids, txt2img)), ("text→image", (txt, img, txt2img, ids))):
        got = s.eval._ranks(*args, chunk=1024)
        tensors_close(got, ranks_loop(*args), f"the {what} ranks", 0)


@check("eval._ranks", "a negative tied with the best positive does not count (ties go to the query)")
def _(s, r):
    cands = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])       # candidate 1 (a negative) ties candidate 0
    got = s.eval._ranks(torch.tensor([[1.0, 0.0]]), cands, torch.tensor([0]), torch.tensor([0, 1, 2]), chunk=8)
    tensors_close(got, torch.tensor([0]), "the rank of a query whose positive ties a negative", 0)


@check("eval._ranks", "the same ranks for every chunk size (1, 4, all)")
def _(s, r):
    img, txt, txt2img = _retrieval_case(seed=2)
    want = ranks_loop(txt, img, txt2img, torch.arange(23))
    for chunk in (1, 4, 4096):
        tensors_close(s.eval._ranks(txt, img, txt2img, torch.arange(23), chunk=chunk), want,
                      f"the text→image ranks with chunk = {chunk}", 0)


@check("eval.retrieval_metrics", "matches sorting every row by hand (1 to 4 captions per image): R@k in percent, "
                                 "rsum the sum of the six")
def _(s, r):
    img, txt, txt2img = _retrieval_case(seed=4)
    got = s.eval.retrieval_metrics(img, txt, txt2img.tolist(), ks=(1, 5, 10))
    want = T.brute_force_recall(img @ txt.T, txt2img.tolist(), (1, 5, 10))
    for k, v in want.items():
        require(k in got, f"the metrics have no '{k}'; keys: {sorted(got)}")
        close(got[k], v, k, rel=0, abs=1e-4)
    require("rsum" in got, f"the metrics have no 'rsum'; keys: {sorted(got)}")
    close(got["rsum"], sum(want.values()), "rsum", rel=0, abs=1e-3)


@check("eval.retrieval_metrics", "image→text counts a hit when ANY caption of the image is in the top k")
def _(s, r):
    img = torch.eye(3)
    # image 0 has a far caption (third for it) and a near one (first); images 1 and 2 rank their captions first
    txt = F.normalize(torch.tensor([[0.0, 0.3, 1.0], [1.0, 0.1, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    got = s.eval.retrieval_metrics(img, txt, [0, 0, 1, 2], ks=(1,))
    close(got["i2t_R@1"], 100.0, "i2t R@1 when each image's best caption is its top candidate", rel=0, abs=1e-4)


@check("eval.retrieval_metrics", "an image without any caption is refused with a ValueError")
def _(s, r):
    try:
        s.eval.retrieval_metrics(torch.eye(4), torch.eye(4)[:3], [0, 1, 2])
    except ValueError:
        return
    raise Fail("retrieval_metrics accepted an image without any caption (txt2img never names image 3)")


def reranked_loop(sc, top, ts, positives):
    """Each query's order (its top k by rescore, then the rest by first-stage score) -> index of its first positive."""
    out = []
    for q in range(len(sc)):
        head = [c for _, c in sorted(zip((-ts[q]).tolist(), top[q].tolist()))]
        rest = [c for _, c in sorted(zip((-sc[q]).tolist(), range(sc.shape[1]))) if c not in head]
        out.append(min((head + rest).index(c) for c in positives[q]))
    return torch.tensor(out)


def _rerank_case(seed, k, q=11, c=17):
    g = torch.Generator().manual_seed(seed)
    sc, c_group = torch.randn(q, c, generator=g), torch.randint(0, q, (c,), generator=g)
    c_group[:q] = torch.arange(q)                                        # every query has a positive
    top = sc.topk(k, dim=1).indices
    return sc, top, torch.randn(q, k, generator=g), torch.arange(q), c_group


@check("eval._reranked_ranks", "matches the rank of the first positive in the order built by hand (top k by "
                               "rescore, then the rest), k = 1, 4 and all")
def _(s, r):
    for k in (1, 4, 17):
        sc, top, ts, q_group, c_group = _rerank_case(k, k)
        got = s.eval._reranked_ranks(lambda a, b: sc[a:b], len(sc), top, ts, q_group, c_group, chunk=1024)
        positives = [[c for c in range(sc.shape[1]) if c_group[c] == q] for q in range(len(sc))]
        tensors_close(got, reranked_loop(sc, top, ts, positives), f"the reranked ranks with k = {k}", 0)


@check("eval._reranked_ranks", "the same ranks for every chunk size; rows are asked for chunk by chunk")
def _(s, r):
    sc, top, ts, q_group, c_group = _rerank_case(5, 4)
    asked = []

    def rows(a, b):
        asked.append(b - a)
        return sc[a:b]
    want = s.eval._reranked_ranks(rows, len(sc), top, ts, q_group, c_group, chunk=4096)
    for chunk in (1, 4):
        asked.clear()
        tensors_close(s.eval._reranked_ranks(rows, len(sc), top, ts, q_group, c_group, chunk=chunk), want,
                      f"the reranked ranks with chunk = {chunk}", 0)
        require(max(asked) <= chunk, f"with chunk = {chunk} the rows were asked for {max(asked)} queries at a time")


@check("eval._reranked_ranks", "a rescore tied with the best positive's does not count (ties go to the query)")
def _(s, r):
    sc = torch.tensor([[0.9, 0.8, 0.1]])                 # top 2: candidates 0 (negative) and 1 (positive)
    got = s.eval._reranked_ranks(lambda a, b: sc[a:b], 1, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]),
                                 torch.tensor([0]), torch.tensor([1, 0, 2]), chunk=8)
    tensors_close(got, torch.tensor([0]), "the rank of a positive whose rescore ties a negative's", 0)


def _rerank_run(s, k, seed):
    g = torch.Generator().manual_seed(seed)
    ps = T.GridPairSet([2, 3, 1, 4, 2, 3, 1, 2, 2, 3, 2, 1])             # 12 images, 26 captions
    n, m = len(ps), len(ps.texts)
    img, txt = F.normalize(torch.randn(n, 5, generator=g), dim=-1), F.normalize(torch.randn(m, 5, generator=g), dim=-1)
    model = T.TableScorer(torch.randn(n, m, generator=g))
    pixels = lambda im: torch.tensor(float(im.getpixel((0, 0)))).expand(3, 2, 2)   # noqa: E731 image i -> level i
    out = s.eval.rerank_retrieval(model, ps, img, txt, pixels, T.GridTokenizer(), "cpu", 8, k=k)
    return out, model, ps, img, txt


@check("eval.rerank_retrieval", "matches reranking every query's top k by hand (k = 1, 3, 7, all)")
def _(s, r):
    for k in (1, 3, 7, 100):
        out, model, ps, img, txt = _rerank_run(s, k, seed=k)
        sim, t2i, n, m = img @ txt.T, ps.txt2img, len(img), len(txt)
        want = {"i2t": T.brute_force_rerank(sim, model.table, [[t for t in range(m) if t2i[t] == i] for i in range(n)],
                                            min(k, m)),
                "t2i": T.brute_force_rerank(sim.T, model.table.T, [[t2i[t]] for t in range(m)], min(k, n))}
        for d in ("i2t", "t2i"):
            for rr in (1, 5, 10):
                require(f"{d}_R@{rr}" in out, f"the metrics have no '{d}_R@{rr}'; keys: {sorted(out)}")
                close(out[f"{d}_R@{rr}"], want[d][rr], f"{d}_R@{rr} after reranking the top {k}", rel=0, abs=1e-4)
        require("rsum" in out, f"the metrics have no 'rsum'; keys: {sorted(out)}")
        close(out["rsum"], sum(want[d][rr] for d in want for rr in (1, 5, 10)), f"rsum (k = {k})", rel=0, abs=1e-3)


@check("eval.rerank_retrieval", "scores exactly the pairs in some query's top k, each once")
def _(s, r):
    k = 3
    _, model, ps, img, txt = _rerank_run(s, k, seed=11)
    sim = img @ txt.T
    needed = {(i, t) for i in range(len(img)) for t in sim[i].topk(k).indices.tolist()}
    needed |= {(i, t) for t in range(len(txt)) for i in sim[:, t].topk(k).indices.tolist()}
    require(len(model.calls) == len(set(model.calls)), f"{len(model.calls) - len(set(model.calls))} pairs were "
                                                        f"scored more than once by itm_score")
    require(set(model.calls) == needed, f"itm_score scored {len(set(model.calls) - needed)} pairs outside every top "
                                        f"{k} and missed {len(needed - set(model.calls))} inside one")


# ============================== A8 eval.py: zeroshot_classifier, topk_accuracy, balanced_accuracy ======
class _UnnormalizedToy:
    """The test suite's ToyModel with text features of different lengths (so the per-prompt normalization shows)."""

    def __init__(self):
        self.toy = T.ToyModel()

    def __getattr__(self, name):
        return getattr(self.toy, name)

    def encode_text(self, ids, mask):
        return self.toy.encode_text(ids, mask) * (1 + mask.sum(1, keepdim=True).float())


@check("eval.zeroshot_classifier", "w_c = normalize(mean_t normalize(f(template_t.format(c)))), one row per class in "
                                   "class order")
def _(s, r):
    model, tok = _UnnormalizedToy(), T.ToyTokenizer()
    classes, templates = ["red", "green", "dark blue"], ["a {}", "a photo of a big {} thing.", "{} thing"]
    w = s.eval.zeroshot_classifier(model, tok, classes, templates, "cpu", max_len=16)
    require(torch.is_tensor(w) and tuple(w.shape) == (3, 6), f"the classifier of 3 classes should be (3, d) = (3, 6), "
                                                             f"got {getattr(w, 'shape', type(w).__name__)}")
    for c, name in enumerate(classes):
        encoded = [tok([t.format(name)]) for t in templates]
        feats = [F.normalize(model.encode_text(e["input_ids"], e["attention_mask"])[0], dim=0) for e in encoded]
        tensors_close(w[c], F.normalize(sum(feats) / len(feats), dim=0), f"the classifier row of class '{name}'", 1e-5)


@check("eval.zeroshot_classifier", "one template: each row is the normalized feature of its one prompt")
def _(s, r):
    model, tok = _UnnormalizedToy(), T.ToyTokenizer()
    w = s.eval.zeroshot_classifier(model, tok, ["red", "blue"], ["a {} square"], "cpu", max_len=16)
    enc = tok(["a red square", "a blue square"])
    tensors_close(w, F.normalize(model.encode_text(enc["input_ids"], enc["attention_mask"]), dim=-1),
                  "the classifier of one template", 1e-5)


@check("eval.topk_accuracy", "a hand case: true classes at ranks 0, 1, 3 and 2; k = 5 is clipped to the 4 classes")
def _(s, r):
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.5], [0.9, 0.1, 0.0, 0.5], [0.9, 0.1, 0.0, 0.5], [0.2, 0.8, 0.1, 0.0]])
    got = s.eval.topk_accuracy(logits, torch.tensor([0, 3, 2, 2]), ks=(1, 2, 3, 5))
    want = {"top1": 25.0, "top2": 50.0, "top3": 75.0, "top5": 100.0}
    for k, v in want.items():
        require(k in got, f"the result has no '{k}'; keys: {sorted(got)}")
        close(got[k], v, k, rel=0, abs=1e-4)


@check("eval.topk_accuracy", "matches counting by hand on random logits (20 rows, 7 classes)")
def _(s, r):
    logits = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 7, (20,), generator=torch.Generator().manual_seed(1))
    got = s.eval.topk_accuracy(logits, labels, ks=(1, 3, 5))
    for k in (1, 3, 5):
        hits = sum(int((logits[i] > logits[i, labels[i]]).sum()) < k for i in range(20))
        close(got[f"top{k}"], 100.0 * hits / 20, f"top{k}", rel=0, abs=1e-4)


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
    g = torch.Generator().manual_seed(2)
    labels, pred = torch.randint(0, 5, (40,), generator=g), torch.randint(0, 5, (40,), generator=g)
    recalls = [float((pred[labels == c] == c).float().mean()) for c in range(5) if (labels == c).any()]
    close(s.eval.balanced_accuracy(pred, labels, 6), 100.0 * sum(recalls) / len(recalls), "balanced accuracy",
          rel=1e-5)
