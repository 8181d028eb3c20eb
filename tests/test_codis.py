"""codis.py: IPOT against exact optima (brute force over permutations), Sinkhorn, CODIS's printed uniform form and
low-precision inputs; the codebook losses and L_ica against hand computations; a smoke run, exact resume, eval.py."""
import itertools
import json
import math
import os

import pytest
import torch

import codis
from test_albef import distilled_nce_loop, tiny_model, toy_batch
from tiny import eval_cli_agrees, resume_is_exact, smoke_run, tiny_albef, unit

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
TINY_CODIS = ("--codebook-size", 8, "--ipot-outer", 10)


def exact_uniform_ot(cost):
    """min over permutations σ of (1/n) Σ_i D[i, σ(i)]: the optimum for uniform square marginals (Birkhoff)."""
    n = len(cost)
    return min(sum(cost[i, p[i]].item() for i in range(n)) / n for p in itertools.permutations(range(n)))


def sinkhorn(cost, mu, nu, beta, iters=2000):
    """Plain Sinkhorn: the entropic plan at the same β (IPOT's first outer step, iterated to convergence)."""
    return codis.ipot(cost, mu, nu, beta, n_outer=1, n_inner=iters)


def uniform(n):
    return torch.full((n,), 1 / n, dtype=torch.float64)


@pytest.mark.parametrize("n", [3, 5, 7])
@pytest.mark.method
def test_ipot_reaches_the_exact_optimum_and_beats_sinkhorn(n):
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    best = exact_uniform_ot(cost)
    plan = codis.ipot(cost, uniform(n), uniform(n), beta=0.5, n_outer=300)
    assert (plan * cost).sum().item() == pytest.approx(best, abs=1e-3)
    entropic = sinkhorn(cost, uniform(n), uniform(n), beta=0.5)
    assert abs((entropic * cost).sum().item() - best) > abs((plan * cost).sum().item() - best)
    # the optimum is a permutation: n entries hold all the mass
    assert plan.flatten().topk(n).values.sum().item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.method
def test_ipot_marginals_on_rectangular_problems():
    """Columns are exact after every outer step (σ is updated last); rows converge with the steps: within 1e-4 at
    the defaults for CODIS's uniform marginals, and with 3 inner steps for strongly non-uniform ones."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((16, 40), (40, 16), (256, 1024)):
        cost = 1 - unit(n, 8, seed=n) @ unit(k, 8, seed=k).T                                 # cosine costs in [0, 2]
        plan = codis.ipot(cost, uniform(n), uniform(k))                                       # beta 0.5, 50 x 1
        assert plan.shape == (n, k) and (plan >= 0).all()
        assert torch.allclose(plan.sum(1).double(), uniform(n), atol=1e-4), n
        assert torch.allclose(plan.sum(0).double(), uniform(k), atol=1e-4), n
        mu = torch.rand(n, generator=g, dtype=torch.float64) ** 4 + 1e-3
        nu = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
        mu, nu = mu / mu.sum(), nu / nu.sum()
        row_error = [(codis.ipot(cost, mu, nu, n_outer=t).sum(1).double() - mu).abs().max().item()
                     for t in (10, 50, 200)]
        assert row_error[0] > row_error[1] > row_error[2], row_error
        plan = codis.ipot(cost, mu, nu, n_outer=50, n_inner=3)
        assert torch.allclose(plan.sum(1).double(), mu, atol=1e-4), n
        assert torch.allclose(plan.sum(0).double(), nu, atol=1e-4), n


def printed_ipot(cost, beta, n_outer):
    """CODIS's IPOT algorithm as printed: n×n, μ = ν = 1/n, σ = 1/n·1, δ = μ / (n Q σ), σ = ν / (n Qᵀ δ)."""
    n = len(cost)
    mu = nu = uniform(n)
    sigma, plan = torch.full((n,), 1 / n, dtype=torch.float64), torch.ones(n, n, dtype=torch.float64)
    kernel = torch.exp(-cost / beta)
    for _ in range(n_outer):
        q = kernel * plan
        delta = mu / (n * (q @ sigma))
        sigma = nu / (n * (q.T @ delta))
        plan = torch.diag(delta) @ q @ torch.diag(sigma)
    return plan


@pytest.mark.method
def test_printed_form_is_the_uniform_case_with_mass_one_over_n():
    n = 6
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    printed = printed_ipot(cost, beta=0.5, n_outer=30)
    ours = codis.ipot(cost, uniform(n), uniform(n), beta=0.5, n_outer=30).double()
    assert printed.sum().item() == pytest.approx(1 / n, rel=1e-6)
    assert torch.allclose(n * printed, ours, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.method
def test_ipot_is_finite_for_low_precision_costs(dtype):
    cost = (2 * torch.rand(64, 32, generator=torch.Generator().manual_seed(2))).to(dtype)   # costs in [0, 2]
    cost[0] = 2.0   # a row as far as it gets from every codeword
    for beta in (0.05, 0.5):
        plan = codis.ipot(cost, torch.full((64,), 1 / 64), torch.full((32,), 1 / 32), beta=beta, n_outer=50)
        assert plan.dtype == torch.float32 and torch.isfinite(plan).all(), beta
        assert torch.allclose(plan.sum(0), torch.full((32,), 1 / 32), atol=1e-4)
        # rows converge more slowly with a sharp kernel (β = 0.05: within 1e-3 after 50 steps)
        assert torch.allclose(plan.sum(1), torch.full((64,), 1 / 64), atol=1e-4 if beta == 0.5 else 1e-3)


@pytest.mark.method
def test_ipot_under_autocast_runs_in_fp32():
    cost = torch.rand(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = codis.ipot(cost, torch.full((8,), 1 / 8), torch.full((4,), 1 / 4))
    assert plan.dtype == torch.float32 and torch.allclose(plan, codis.ipot(cost, torch.full((8,), 1 / 8),
                                                                           torch.full((4,), 1 / 4)))


# ----------------------------------------------------------------------------------------------
# the codebook losses and L_ica against hand computations
# ----------------------------------------------------------------------------------------------
@pytest.mark.method
def test_swapped_prediction_matches_a_loop():
    z, codebook = unit(3, 4, seed=0), unit(5, 4, seed=1)
    plan = torch.rand(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 15
    gamma, want = 0.1, 0.0
    for j in range(3):
        logits = [float(z[j] @ c) / gamma for c in codebook]
        log_p = [x - math.log(sum(math.exp(y) for y in logits)) for x in logits]
        target = [float(t) / float(plan[j].sum()) for t in plan[j]]
        want += -sum(t * lp for t, lp in zip(target, log_p)) / 3
    assert codis.swapped_prediction(z, codebook, plan, gamma).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.method
def test_loss_code_swaps_the_plans_and_sends_ot_gradients_to_the_codebook_only():
    n, k, e = 6, 4, 5
    args = codis.Args(code_temp=0.2, ipot_beta=0.5, ipot_outer=40, ipot_inner=1)
    z_v, z_t = unit(n, e, seed=0).float().requires_grad_(), unit(n, e, seed=1).float().requires_grad_()
    f_v, f_t = unit(n, e, seed=2).float().requires_grad_(), unit(n, e, seed=3).float().requires_grad_()
    codebook = unit(k, e, seed=4).float().requires_grad_()
    terms = codis.loss_code(z_v, z_t, f_v, f_t, codebook, args)
    # the plans by hand: IPOT on D = 1 − f Cᵀ with uniform marginals
    mu, nu = torch.full((n,), 1 / n), torch.full((k,), 1 / k)
    d_v, d_t = 1 - f_v.detach() @ codebook.detach().T, 1 - f_t.detach() @ codebook.detach().T
    t_i2p, t_t2p = codis.ipot(d_v, mu, nu, 0.5, 40), codis.ipot(d_t, mu, nu, 0.5, 40)
    assert terms["ot_v"].item() == pytest.approx(sum(t_i2p[i, j] * d_v[i, j] for i in range(n) for j in range(k)).item())
    assert terms["ot_t"].item() == pytest.approx((t_t2p * d_t).sum().item())
    # the swap of equation (2): the text student predicts the IMAGE plan, the image student the text plan
    assert terms["t2p"].item() == pytest.approx(codis.swapped_prediction(z_t, codebook, t_i2p, 0.2).item(), rel=1e-6)
    assert terms["i2p"].item() == pytest.approx(codis.swapped_prediction(z_v, codebook, t_t2p, 0.2).item(), rel=1e-6)
    assert terms["t2p"].item() != pytest.approx(codis.swapped_prediction(z_t, codebook, t_t2p, 0.2).item(), rel=1e-3)
    # L_ot reaches the codebook, never the features the plans come from
    (terms["ot_v"] + terms["ot_t"]).backward(retain_graph=True)
    assert f_v.grad is None and f_t.grad is None and z_v.grad is None
    assert torch.allclose(codebook.grad, -(t_i2p.T @ f_v.detach() + t_t2p.T @ f_t.detach()), atol=1e-6)
    # the swapped predictions train the students and the codebook
    codebook.grad = None
    (terms["t2p"] + terms["i2p"]).backward()
    assert z_t.grad.abs().sum() > 0 and z_v.grad.abs().sum() > 0 and codebook.grad.abs().sum() > 0
    assert f_v.grad is None


@pytest.mark.method
def test_loss_code_is_fp32_under_autocast():
    args = codis.Args()
    feats = [unit(8, 16, seed=s).float() for s in range(4)]
    codebook = unit(32, 16, seed=9).float()
    want = codis.loss_code(*feats, codebook, args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = codis.loss_code(*feats, codebook, args)
    for k in want:
        assert got[k].dtype == torch.float32 and got[k].item() == pytest.approx(want[k].item(), rel=1e-6), k


@pytest.mark.method
def test_loss_ica_adds_the_intra_modal_terms():
    n, m, e, tau, alpha = 3, 6, 5, 0.1, 0.4
    z_v, z_t, z_v_m, z_t_m = (unit(n, e, seed=s) for s in range(4))
    q_img, q_txt = unit(m, e, seed=5), unit(m, e, seed=6)
    temp = torch.tensor(tau, dtype=torch.float64)
    loss, s_i2t, s_t2i = codis.loss_ica(z_v, z_t, z_v_m, z_t_m, q_img, q_txt, temp, alpha)
    imgs, txts = list(z_v_m) + list(q_img), list(z_t_m) + list(q_txt)
    cross = 0.5 * (distilled_nce_loop(z_v, z_v_m, txts, tau, alpha) + distilled_nce_loop(z_t, z_t_m, imgs, tau, alpha))
    intra = 0.5 * (distilled_nce_loop(z_v, z_v_m, imgs, tau, alpha) + distilled_nce_loop(z_t, z_t_m, txts, tau, alpha))
    assert loss.item() == pytest.approx(cross + intra, rel=1e-5)
    no_intra, _, _ = codis.loss_ica(z_v, z_t, z_v_m, z_t_m, q_img, q_txt, temp, alpha, intra=False)
    assert no_intra.item() == pytest.approx(cross, rel=1e-5)
    assert s_i2t.shape == s_t2i.shape == (n, n + m)


@pytest.mark.method
def test_code_perplexity():
    assert codis.code_perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0, 0.0])) == pytest.approx(4.0)
    assert codis.code_perplexity(torch.tensor([0.0, 7.0, 0.0])) == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert codis.code_perplexity(4 * p) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert codis.code_perplexity(torch.zeros(3)) == 0.0


@pytest.mark.method
def test_code_weight_scales_l_code_and_zero_leaves_the_codebook_untrained(tokenizer):
    """L = L_mlm + L_itm + L_ica + λ L_code; with λ = 0 (the ablation's "no codebook" row) no gradient reaches C."""
    batch = toy_batch(tokenizer)
    for weight in (1.0, 0.5, 0.0):
        model, args = tiny_model(tokenizer, codis, queue_size=16, batch_size=8, codebook_size=8, ipot_outer=10,
                                 code_weight=weight)
        model.train()
        terms = codis.compute_losses(model, batch, args, 0.4)
        parts = terms["mlm"] + terms["itm"] + terms["ica"] + weight * terms["code"]
        assert terms["loss"].item() == pytest.approx(parts.item(), rel=1e-6) and terms["code"].item() > 0
        terms["loss"].backward()
        grad = model.codebook.grad
        assert (grad is None or not grad.any()) if weight == 0 else grad.abs().max() > 0


def test_plan_features_flag_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        codis.main(tiny_albef(tmp_path, "--plan-features", "both"))
    assert e.value.code == 2 and "--plan-features both: must be one of teacher, student" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
def tiny_codis(out_dir, *extra):
    return tiny_albef(out_dir, *TINY_CODIS, *extra)


@pytest.mark.slow
def test_smoke_subprocess_and_eval_cli(tmp_path):
    run, rows, metrics = smoke_run("codis.py", tiny_codis(tmp_path), tmp_path,
                                   ("loss", "loss_ica", "loss_mlm", "loss_itm", "loss_code", "loss_ot_v", "loss_ot_t",
                                    "loss_t2p", "loss_i2p", "code_perplexity"))
    weight = json.load(open(os.path.join(run, "args.json")))["code_weight"]      # λ_code, the default (0.3)
    assert weight == codis.Args().code_weight != 1
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_ica"] + r["loss_mlm"] + r["loss_itm"] + weight * r["loss_code"],
                                          rel=1e-5)
        assert r["loss_code"] == pytest.approx(r["loss_ot_v"] + r["loss_ot_t"] + r["loss_t2p"] + r["loss_i2p"], rel=1e-5)
        assert 1 <= r["codes_used"] <= 8 and 1 <= r["code_perplexity"] <= r["codes_used"] + 1e-6
    assert metrics["zeroshot/shape/n_classes"] == 8 and "retrieval_itm/i2t_R@1" in metrics
    eval_cli_agrees(run, metrics, ("retrieval/i2t_R@1", "retrieval_itm/t2i_R@5", "zeroshot/colour/top1"))


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    state = resume_is_exact(codis.main, tiny_codis, tmp_path)
    assert "codebook" in state and "code_counts" in state and any(k.startswith("bert_m.") for k in state)


def test_resume_rejects_an_albef_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"script": "albef_fusion", "args": {}, "step": 1}, path)
    with pytest.raises(ValueError, match="albef_fusion.py"):
        codis.main(["--resume", str(path)])
