"""Runs that are safe to share and hard to lose, in every method script's shared skeleton: a run folder is never
reused, a non-finite loss stops the run and keeps the last good checkpoint, Ctrl-C / SIGTERM finish the step and
checkpoint so that a resumed run ends with the same weights as an uninterrupted one, periodic saves, and optimizer
state that follows its parameter's memory layout."""
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import clip_base
import eval as ev
from tiny import ONE_THREAD, ROOT, run_dir_of, tiny_args

SCRIPTS = ["clip_base", "sep", "bridge", "geocons", "albef_fusion", "codis"]


@pytest.fixture(params=SCRIPTS)
def script(request):
    return importlib.import_module(request.param)


# ------------------------------------------------------------------ a run folder is never reused
def test_two_runs_started_in_the_same_second_get_two_folders(script, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")  # every run "starts" in this second
    args = SimpleNamespace(out=str(tmp_path), exp_name="x", data="synthetic", seed=1)
    made = [script.make_run_dir(args) for _ in range(3)]
    base = os.path.join(str(tmp_path), "x-synthetic-1-20260101-000000")
    assert made == [base, base + "-2", base + "-3"]
    assert all(os.path.isdir(d) and not os.listdir(d) for d in made)


# ------------------------------------------------------------------ non-finite losses
def test_first_non_finite_names_the_step_and_term(script):
    ok = torch.tensor([1.0, 2.0, 3.0])
    assert script.first_non_finite([], ["a", "b", "c"], 0) is None
    assert script.first_non_finite([ok, ok], ["a", "b", "c"], 10) is None
    window = [ok, torch.tensor([1.0, 2.0, float("inf")]), torch.tensor([float("nan"), 2.0, 3.0])]
    # steps 11, 12, 13 in the window: the first bad one is step 12, term c (not the later nan of a)
    assert script.first_non_finite(window, ["a", "b", "c"], 10) == (12, "c")


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN in L_V2T at step 4: the run stops at the next check naming step 4 and the term; the checkpoint of
    step 2 stays (it is not overwritten with diverged weights) and is finite."""
    real, calls = clip_base.compute_losses, []

    def poisoned(model, batch, args):
        terms = real(model, batch, args)
        calls.append(1)
        if len(calls) == 4:
            terms["v2t"] = terms["v2t"] * float("nan")
        return terms
    monkeypatch.setattr(clip_base, "compute_losses", poisoned)
    with pytest.raises(SystemExit) as e:
        clip_base.main(tiny_args(tmp_path, "--steps", 8, "--log-every", 3, "--save-every", 2))
    msg = str(e.value.code)
    assert "'v2t'" in msg and "step 4" in msg and "--lr" in msg
    assert "--precision" not in msg                                 # the run is fp32 already: nothing to suggest
    ckpt = ev.load_checkpoint(os.path.join(run_dir_of(tmp_path), "checkpoint.pt"))
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_lr_1e4_diverges_and_exits_non_zero(tmp_path):
    """As a user would meet it: the process exits with a non-zero status and says what to try."""
    p = subprocess.run([sys.executable, "clip_base.py", *tiny_args(tmp_path, "--lr", 1e4, "--steps", 6)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert p.returncode != 0
    assert "is not finite at step" in p.stderr and "--lr" in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(os.path.join(run_dir_of(tmp_path), "metrics.json"))


# ------------------------------------------------------------------ periodic checkpoints
def test_save_minutes_saves_while_training(tmp_path, monkeypatch):
    saved = []
    real = ev.save_checkpoint
    monkeypatch.setattr(ev, "save_checkpoint", lambda path, **s: (saved.append(s["step"]), real(path, **s)))
    clip_base.main(tiny_args(tmp_path / "a", "--steps", 4, "--save-minutes", 1e-9))  # due after every step
    assert saved == [1, 2, 3, 4, 4]                                                  # ... and at the end
    saved.clear()
    clip_base.main(tiny_args(tmp_path / "b", "--steps", 4, "--save-minutes", 0))
    assert saved == [4]


# ------------------------------------------------------------------ Ctrl-C and SIGTERM
def weights(run):
    return ev.load_checkpoint(os.path.join(run, "checkpoint.pt"))["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run (40 steps)."""
    out = tmp_path_factory.mktemp("straight")
    subprocess.run([sys.executable, "clip_base.py", *tiny_args(out, "--steps", 40)], cwd=ROOT, check=True,
                   timeout=300, env=ONE_THREAD, capture_output=True)
    return run_dir_of(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_to_the_same_weights(straight, tmp_path, signum):
    proc = subprocess.Popen([sys.executable, "clip_base.py", *tiny_args(tmp_path, "--steps", 40)], cwd=ROOT,
                            env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first log line (step 2): training is under way
        logs = [os.path.join(d, "log.jsonl") for d in map(lambda n: os.path.join(tmp_path, n), os.listdir(tmp_path))]
        if logs and os.path.exists(logs[0]) and os.path.getsize(logs[0]) > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    run = run_dir_of(tmp_path)
    step = ev.load_checkpoint(os.path.join(run, "checkpoint.pt"))["step"]
    assert 2 <= step < 40                                          # stopped mid-run, with a checkpoint
    assert f"--resume {run}" in out or f"--resume {os.path.abspath(run)}" in out
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    subprocess.run([sys.executable, "clip_base.py", "--resume", os.path.join(run, "checkpoint.pt")], cwd=ROOT,
                   check=True, timeout=300, env=ONE_THREAD, capture_output=True)
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert rows[-1]["step"] == 40 and math.isfinite(rows[-1]["loss"])


# ------------------------------------------------------------------ resume on another device's memory layout
def test_optimizer_state_follows_the_parameter_layout(script):
    """State saved from an NCHW model, loaded into a channels-last one (as a CPU checkpoint resumed on a GPU)."""
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    opt = torch.optim.AdamW([w])
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone().contiguous(memory_format=torch.channels_last))
    opt2 = torch.optim.AdamW([w2])
    opt2.load_state_dict(state)
    assert opt2.state[w2]["exp_avg"].stride() != w2.stride()        # what loading alone leaves behind
    script.match_state_layout(opt2)
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[w2][k].stride() == w2.stride()
        assert torch.equal(opt2.state[w2][k], opt.state[w][k])
    assert opt2.state[w2]["step"].shape == ()                       # scalars untouched


def test_rng_state_holds_plain_values_and_no_gpu_list(script, tmp_path):
    s = script.rng_state(torch.device("cpu"))
    assert s["cuda"] is None
    path = tmp_path / "rng.pt"
    torch.save(s, path)
    back = torch.load(path, weights_only=True)                       # the restricted unpickler accepts it
    torch.manual_seed(0)
    script.set_rng_state(back, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), s["torch"])


# ------------------------------------------------------------------ periodic validation (--eval-every)
def test_eval_every_logs_validation_metrics_of_the_model_at_that_step(tmp_path):
    """val/... rows at steps 3 and 6; the step-6 row equals ev.validate of the saved final model on the
    validation split, recomputed from the checkpoint."""
    import data
    run = clip_base.main(tiny_args(tmp_path, "--steps", 6, "--eval-every", 3))
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    val = [r for r in rows if "val/score" in r]
    assert [r["step"] for r in val] == [3, 6]
    model, tokenizer, args, _ = ev.load_run(run, torch.device("cpu"))
    again = ev.validate(model, tokenizer, data.build_eval_suite(args, "val"), data.eval_transform(args.image_size),
                        torch.device("cpu"), args.max_len)
    for k, v in again.items():
        assert val[-1][k] == pytest.approx(v, abs=1e-6), k
