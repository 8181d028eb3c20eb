"""sep.py, bridge.py, geocons.py: each loss against loops or a closed form (float64), gradients, the layout
layout rules (imports, diff against clip_base.py), and per script a smoke run plus eval.py on it."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import bridge
import geocons
import sep
from test_clip_base import nce_loop
from tiny import eval_cli_agrees, smoke_run, tiny_args, unit

METHODS = {"sep": sep, "bridge": bridge, "geocons": geocons}
TAU = 0.07
SCALE = torch.tensor(math.log(1 / TAU))


def dot(u, v):
    return float(u @ v)


# ------------------------------------------------------------------ sep.py: L_ortho, L_con^i, L_uni^i
@pytest.mark.method
def test_loss_ortho_matches_loop_and_its_extremes():
    zv, zv_i, zt, zt_i = (unit(6, 5, seed=s) for s in (1, 2, 3, 4))
    loop = sum(dot(zv[j], zv_i[j]) ** 2 + dot(zt[j], zt_i[j]) ** 2 for j in range(6)) / 6
    assert sep.loss_ortho(zv, zv_i, zt, zt_i).item() == pytest.approx(loop, rel=1e-5)
    e = torch.eye(6, dtype=torch.float64)
    # z^i orthogonal to z (e_j against e_{j+3}): 0, the minimum
    assert sep.loss_ortho(e[:3], e[3:], e[:3], e[3:]).item() == pytest.approx(0.0, abs=1e-12)
    # z^i parallel (or anti-parallel) to z in both modalities: 1 + 1 = 2 per pair, the maximum
    assert sep.loss_ortho(zv, zv, zt, -zt).item() == pytest.approx(2.0, rel=1e-6)
    assert sep.loss_ortho(zv, zv_i, zt, zt_i).item() < 2.0


@pytest.mark.method
def test_loss_con_i_matches_loop():
    zv_i, zv_ai, zt_i, zt_ai = (unit(7, 5, seed=s) for s in (5, 6, 7, 8))
    loop = nce_loop(zv_i, zv_ai, TAU) + nce_loop(zt_i, zt_ai, TAU)
    assert sep.loss_con_i(zv_i, zv_ai, zt_i, zt_ai, SCALE).item() == pytest.approx(loop, rel=1e-5)


def uni_loop(z, t=2.0):
    """log mean_{j≠k} exp(−t‖z_j − z_k‖²) of one modality, one pair at a time."""
    n = len(z)
    total = sum(math.exp(-t * float((z[j] - z[k]).square().sum())) for j in range(n) for k in range(n) if j != k)
    return math.log(total / (n * (n - 1)))


@pytest.mark.method
def test_loss_uni_matches_loop_one_log_per_modality():
    zv_i, zt_i = unit(6, 4, seed=9), unit(6, 4, seed=10)
    for t in (2.0, 0.5):
        want = uni_loop(zv_i, t) + uni_loop(zt_i, t)
        assert sep.loss_uni(zv_i, zt_i, t=t).item() == pytest.approx(want, rel=1e-5)
    # collapsed features (every point equal): G_t = 1 everywhere, log 1 + log 1 = 0, the maximum
    same = unit(1, 4, seed=11).expand(6, 4)
    assert sep.loss_uni(same, same).item() == pytest.approx(0.0, abs=1e-6)
    # the 4 vertices of a regular simplex (⟨u, v⟩ = −1/3, ‖u − v‖² = 8/3): −2·(8/3) per modality
    simplex = F.normalize(torch.eye(4, dtype=torch.float64) - 0.25, dim=-1)
    assert sep.loss_uni(simplex, simplex).item() == pytest.approx(-2 * 2 * 8 / 3, rel=1e-5)
    # one log per modality: a collapsed text side does not hide the image side's spread (one log of the sum
    # would give log((e^{-16/3} + 1)/2) ≈ −0.69 and let the image term vanish behind the text term)
    assert sep.loss_uni(simplex, same[:4]).item() == pytest.approx(-2 * 8 / 3, rel=1e-5)


# ------------------------------------------------------------------ bridge.py: L_Br
def bridge_closed_form(zv_a, zv, zt, t):
    """2 − 2 (t⟨z_V^a,z_V⟩ + (1−t)⟨z_V^a,z_T⟩) / sqrt(t² + (1−t)² + 2t(1−t)⟨z_V,z_T⟩), averaged over j."""
    vals = []
    for j in range(len(zv)):
        tj = float(t[j]) if torch.is_tensor(t) else t
        num = tj * dot(zv_a[j], zv[j]) + (1 - tj) * dot(zv_a[j], zt[j])
        vals.append(2 - 2 * num / math.sqrt(tj ** 2 + (1 - tj) ** 2 + 2 * tj * (1 - tj) * dot(zv[j], zt[j])))
    return sum(vals) / len(vals)


def printed_form(zv_a, zv, zt, t):
    """The paper's expanded line as printed: (t⟨z_V,z_V^a⟩ + (1−t)⟨z_V^a,z_T⟩) / (t² + (1−t)² + 2t(1−t)⟨z_V,z_T⟩)."""
    num = t * (zv * zv_a).sum(-1) + (1 - t) * (zv_a * zt).sum(-1)
    return (num / (t ** 2 + (1 - t) ** 2 + 2 * t * (1 - t) * (zv * zt).sum(-1))).mean().item()


@pytest.mark.parametrize("t", [0.25, 0.7, "per-pair"])
@pytest.mark.method
def test_loss_bridge_is_the_squared_distance_and_matches_the_closed_form(t):
    zv_a, zv, zt = unit(8, 5, seed=12), unit(8, 5, seed=13), unit(8, 5, seed=14)
    if t == "per-pair":
        t = torch.rand(8, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = bridge.loss_bridge(zv_a, zv, zt, t).item()
    assert loss == pytest.approx(bridge_closed_form(zv_a, zv, zt, t), abs=1e-6)
    tt = t[:, 0] if torch.is_tensor(t) else torch.full((8,), t, dtype=torch.float64)
    direct = sum(float((zv_a[j] - F.normalize(tt[j] * zv[j] + (1 - tt[j]) * zt[j], dim=0)).square().sum())
                 for j in range(8)) / 8
    assert loss == pytest.approx(direct, abs=1e-6)
    # on the bridge (z^a = μ): 0
    mu = F.normalize(tt[:, None] * zv + (1 - tt[:, None]) * zt, dim=-1)
    assert bridge.loss_bridge(mu, zv, zt, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.method
def test_printed_expression_has_the_wrong_monotonicity():
    """Move z^a away from μ along a great circle: L_Br grows, the paper's printed line shrinks."""
    zv, zt, w = unit(1, 5, seed=15), unit(1, 5, seed=16), unit(1, 5, seed=17)
    t = 0.25
    mu = F.normalize(t * zv + (1 - t) * zt, dim=-1)
    w = F.normalize(w - (w * mu).sum(-1, keepdim=True) * mu, dim=-1)  # unit, orthogonal to μ
    angles = torch.linspace(0, math.pi, 9, dtype=torch.float64)
    ours, printed = [], []
    for a in angles:
        zv_a = torch.cos(a) * mu + torch.sin(a) * w
        ours.append(bridge.loss_bridge(zv_a, zv, zt, t).item())
        printed.append(printed_form(zv_a, zv, zt, t))
    assert ours[0] == pytest.approx(0.0, abs=1e-6) and ours[-1] == pytest.approx(4.0, abs=1e-5)
    assert all(b > a for a, b in zip(ours, ours[1:]))
    assert all(b < a for a, b in zip(printed, printed[1:]))  # minimizing it pushes z^a to −μ


# ------------------------------------------------------------------ geocons.py: L_GC, L_GC^a
@pytest.mark.method
def test_loss_gc_matches_loops():
    zv, zt, n = unit(5, 4, seed=18), unit(5, 4, seed=19), 5
    loop = sum((dot(zv[j], zt[k]) - dot(zv[k], zt[j])) ** 2 + (dot(zv[j], zv[k]) - dot(zt[j], zt[k])) ** 2
               for j in range(n) for k in range(n)) / n
    assert geocons.loss_gc(zv, zt).item() == pytest.approx(loop, rel=1e-5)
    # identical modalities are perfectly consistent
    assert geocons.loss_gc(zv, zv).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.method
def test_loss_gc_grows_with_the_batch_like_cyclip():
    """1/N Σ_j Σ_k = N · mean over the N² pairs (CyCLIP's `.square().mean() * batch_size`)."""
    zv, zt = unit(64, 8, seed=20), unit(64, 8, seed=21)
    s_vt, s_vv, s_tt = zv @ zt.t(), zv @ zv.t(), zt @ zt.t()
    cyclip = ((s_vt - s_vt.t()).square().mean() + (s_vv - s_tt).square().mean()) * 64
    assert geocons.loss_gc(zv, zt).item() == pytest.approx(cyclip.item(), rel=1e-5)
    assert geocons.loss_gc(zv, zt).item() > 3 * geocons.loss_gc(zv[:16], zt[:16]).item()


@pytest.mark.method
def test_loss_gc_aug_matches_loops():
    zv, zt, zv_a, zt_a, n = unit(5, 4, seed=22), unit(5, 4, seed=23), unit(5, 4, seed=24), unit(5, 4, seed=25), 5
    pairs = sum((dot(zv[j], zv[k]) - dot(zv_a[j], zv_a[k])) ** 2 + (dot(zt[j], zt[k]) - dot(zt_a[j], zt_a[k])) ** 2
                for j in range(n) for k in range(n)) / n
    # the last term read as ⟨z_Vj, z_Tj⟩ (the printed ⟨z_Tj, z_Tj⟩ = 1 would be a constant)
    matched = sum((dot(zv[j], zt[j]) - dot(zv_a[j], zt_a[j])) ** 2 for j in range(n)) / n
    assert geocons.loss_gc_aug(zv, zt, zv_a, zt_a).item() == pytest.approx(pairs + matched, rel=1e-5)
    assert geocons.loss_gc_aug(zv, zt, zv, zt).item() == pytest.approx(0.0, abs=1e-6)
    # a rotation of both views keeps every similarity: still 0
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert geocons.loss_gc_aug(zv, zt, zv @ q, zt @ q).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ gradients
LOSSES = {
    "ortho": (lambda z: sep.loss_ortho(z[0], z[1], z[2], z[3]), 4),
    "con_i": (lambda z: sep.loss_con_i(z[0], z[1], z[2], z[3], SCALE), 4),
    "uni": (lambda z: sep.loss_uni(z[0], z[1]), 2),
    "uni_collapsed": (lambda z: sep.loss_uni(z[0][:1].expand(6, -1), z[1][:1].expand(6, -1)), 2),
    "bridge": (lambda z: bridge.loss_bridge(z[0], z[1], z[2], 0.25), 3),
    "bridge_random_t": (lambda z: bridge.loss_bridge(z[0], z[1], z[2], torch.rand(6, 1)), 3),
    "gc": (lambda z: geocons.loss_gc(z[0], z[1]), 2),
    "gc_a": (lambda z: geocons.loss_gc_aug(z[0], z[1], z[2], z[3]), 4),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.method
def test_gradients_are_finite(name):
    fn, n_inputs = LOSSES[name]
    raw = [torch.randn(6, 5, generator=torch.Generator().manual_seed(30 + i), requires_grad=True)
           for i in range(n_inputs)]
    loss = fn([F.normalize(r, dim=-1) for r in raw])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for r in raw:
        assert r.grad is not None and torch.isfinite(r.grad).all()
    if name != "uni_collapsed":  # collapsed: every pair at distance 0, a stationary point
        assert any(r.grad.abs().sum() > 0 for r in raw)


# ------------------------------------------------------------------ compute_losses on a tiny model
def fake_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "image_aug": torch.randn(n, 3, 32, 32, generator=g),
            "input_ids": torch.randint(1, 50, (n, 7), generator=g), "attention_mask": torch.ones(n, 7).long(),
            "input_ids_aug": torch.randint(1, 50, (n, 5), generator=g), "attention_mask_aug": torch.ones(n, 5).long()}


TINY_MODEL = dict(cnn_width=4, text_width=16, text_layers=1, embed_dim=8)


@pytest.mark.parametrize("method,extra,total", [
    ("sep", {"sep_weight": 1.0, "sep_con_weight": 1.0}, lambda t, a: t["con"] + t["ortho"] + t["con_i"] + t["uni"]),
    ("sep", {"sep_weight": 0.3, "sep_con_weight": 0.1},
     lambda t, a: t["con"] + 0.3 * (t["ortho"] + 0.1 * t["con_i"] + t["uni"])),
    ("bridge", {"bridge_weight": 0.7}, lambda t, a: t["con"] + 0.7 * t["bridge"]),
    ("bridge", {"bridge_weight": 0.7, "bridge_random_t": True}, lambda t, a: t["con"] + 0.7 * t["bridge"]),
    ("geocons", {"gc_weight": 0.5}, lambda t, a: t["con"] + 0.5 * (t["gc"] + t["gc_a"])),
])
@pytest.mark.method
def test_compute_losses_adds_the_method_terms(method, extra, total):
    mod = METHODS[method]
    args = mod.Args(**TINY_MODEL, **extra)
    torch.manual_seed(0)
    model = mod.build_model(args, range(50)).eval()  # eval: no dropout, so two calls differ only by t
    batch = fake_batch()
    terms = mod.compute_losses(model, batch, args)
    assert {"v2t", "t2v", "v2v", "t2t", "con", "loss"} <= set(terms)
    assert terms["loss"].item() == pytest.approx(total(terms, args).item(), rel=1e-6)
    assert all(torch.isfinite(v) for v in terms.values())
    if method == "sep":
        c = extra["sep_con_weight"]
        assert terms["sep"].item() == pytest.approx((terms["ortho"] + c * terms["con_i"] + terms["uni"]).item())
        zi = model.encode_image_indep(batch["image"])
        assert zi.shape == (4, 8) and torch.allclose(zi.norm(dim=-1), torch.ones(4), atol=1e-5)
        assert not torch.allclose(zi, model.encode_image(batch["image"]))  # a second head, not the first
    if method == "bridge":
        again = mod.compute_losses(model, batch, args)["bridge"].item()
        assert (again != terms["bridge"].item()) == args.bridge_random_t
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --precision bf16: the method's terms still in fp32
        low = mod.compute_losses(model, batch, args)
    method_terms = set(low) - {"v2t", "t2v", "v2v", "t2t", "con", "loss"}
    assert method_terms and all(low[k].dtype == torch.float32 and torch.isfinite(low[k]) for k in method_terms)


@pytest.mark.parametrize("method", list(METHODS))
def test_plain_clip_is_refused(method, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        METHODS[method].main(tiny_args(tmp_path, "--plain-clip"))
    assert e.value.code == 2 and "--plain-clip drops the augmented views" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())                          # refused before a run folder was made


# ------------------------------------------------------------------ smoke runs + eval.py
EXTRA_TERMS = {"sep": ("loss_ortho", "loss_con_i", "loss_uni", "loss_sep"), "bridge": ("loss_bridge",),
               "geocons": ("loss_gc", "loss_gc_a")}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_smoke_subprocess_and_eval_cli(method, tmp_path):
    run, rows, metrics = smoke_run(f"{method}.py", tiny_args(tmp_path), tmp_path,
                                   ("loss", "loss_con", "loss_v2v", *EXTRA_TERMS[method]))
    assert os.path.basename(run).startswith(f"{method}-synthetic-1-")
    assert 0 <= metrics["retrieval/t2i_R@10"] <= 100
    zz = [k for k in metrics if k.startswith("probe/") and k.endswith("/z+zi/acc")]
    assert bool(zz) == (method == "sep"), zz  # [z, z^i] probes only for the model with independent features
    if method == "sep":
        assert {k.replace("/z+zi/", "/z/") for k in zz} <= set(metrics)
    eval_cli_agrees(run, metrics, ("retrieval/i2t_R@1", "zeroshot/shape/top1", *zz[:1]))
