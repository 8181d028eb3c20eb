"""clip_base.py: the InfoNCE loss against a loop, L_con's composition, a smoke run, exact resume, eval.py."""
import json
import math
import os

import pytest
import torch

import clip_base
from tiny import eval_cli_agrees, resume_is_exact, smoke_run, tiny_args, unit



def nce_loop(a, b, tau):
    """NCE(a, b) = −1/N Σ_j log( exp(⟨a_j,b_j⟩/τ) / Σ_k exp(⟨a_j,b_k⟩/τ) ), one term at a time."""
    total = 0.0
    for j in range(len(a)):
        num = math.exp(float(a[j] @ b[j]) / tau)
        den = sum(math.exp(float(a[j] @ b[k]) / tau) for k in range(len(b)))
        total += -math.log(num / den)
    return total / len(a)


@pytest.mark.method
def test_nce_matches_loop():
    a, b = unit(7, 5, seed=1), unit(7, 5, seed=2)
    scale = torch.tensor(math.log(1 / 0.07))
    assert clip_base.nce(a, b, scale).item() == pytest.approx(nce_loop(a, b, 0.07), rel=1e-5)
    # the loss is not symmetric: NCE(a, b) normalizes over b, NCE(b, a) over a
    assert clip_base.nce(b, a, scale).item() == pytest.approx(nce_loop(b, a, 0.07), rel=1e-5)
    assert abs(nce_loop(a, b, 0.07) - nce_loop(b, a, 0.07)) > 1e-3


@pytest.mark.method
def test_nce_perfect_and_uniform():
    e = torch.eye(4, dtype=torch.float64)
    # perfectly matched one-hot pairs at 1/τ = 100: loss ≈ log(1 + 3 e^{-100}) ≈ 0
    assert clip_base.nce(e, e, torch.tensor(math.log(100.0))).item() < 1e-6
    # identical features everywhere: every row is uniform over N, loss = log N
    same = torch.ones(4, 3, dtype=torch.float64) / math.sqrt(3)
    assert clip_base.nce(same, same, torch.tensor(0.0)).item() == pytest.approx(math.log(4))


@pytest.mark.method
def test_loss_con_is_the_mean_of_four_terms():
    f = {"v": unit(6, 4, seed=3), "t": unit(6, 4, seed=4)}
    f_a = {"v": unit(6, 4, seed=5), "t": unit(6, 4, seed=6)}
    scale = torch.tensor(math.log(1 / 0.07))
    terms = clip_base.loss_con(f, f_a, scale)
    expected = [nce_loop(f["v"], f["t"], 0.07), nce_loop(f["t"], f["v"], 0.07),
                nce_loop(f["v"], f_a["v"], 0.07), nce_loop(f["t"], f_a["t"], 0.07)]
    assert terms["con"].item() == pytest.approx(sum(expected) / 4, rel=1e-5)
    plain = clip_base.loss_con(f, None, scale, plain_clip=True)
    assert set(plain) == {"v2t", "t2v", "con"}
    assert plain["con"].item() == pytest.approx(sum(expected[:2]) / 2, rel=1e-5)


@pytest.mark.method
def test_pad_cat():
    a, b = torch.tensor([[2, 7, 3]]), torch.tensor([[2, 7, 8, 9, 3]])
    assert clip_base.pad_cat(a, b).tolist() == [[2, 7, 3, 0, 0], [2, 7, 8, 9, 3]]


def test_args_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        clip_base.main(["--help"])
    out = capsys.readouterr().out
    assert "--plain-clip" in out and "drop the intra-modal terms" in out and "--data-root" in out


@pytest.mark.slow
def test_smoke_subprocess_and_eval_cli(tmp_path):
    """The script as a user runs it: the outputs a run writes, then eval.py re-evaluates the saved run."""
    run, rows, metrics = smoke_run("clip_base.py", tiny_args(tmp_path), tmp_path,
                                   ("loss", "loss_v2t", "loss_t2v", "loss_v2v", "loss_t2t", "logit_scale", "lr",
                                    "samples_per_s"))
    assert 0 <= metrics["retrieval/t2i_R@10"] <= 100 and metrics["zeroshot/shape/n_classes"] == 8
    eval_cli_agrees(run, metrics, ("retrieval/i2t_R@1", "retrieval/t2i_R@10", "zeroshot/colour/top1",
                                   "structure/modality_gap"))


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """N steps, stop, resume to 2N gives bit-identical weights to 2N straight (CPU)."""
    resume_is_exact(clip_base.main, tiny_args, tmp_path)


def test_bf16_autocast_on_cpu_gives_finite_losses(tmp_path):
    run = clip_base.main(tiny_args(tmp_path, "--precision", "bf16", "--steps", 2))
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert rows and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)


def test_unknown_precision_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        clip_base.main(tiny_args(tmp_path, "--precision", "fp8"))
    assert e.value.code == 2 and "--precision fp8: must be one of fp32, bf16, fp16" in capsys.readouterr().err


def test_resume_rejects_another_scripts_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"script": "sep", "args": {}, "step": 1}, path)
    with pytest.raises(ValueError, match="sep.py"):
        clip_base.main(["--resume", str(path)])
