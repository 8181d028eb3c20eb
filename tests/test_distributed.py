"""Under torchrun (2 processes, gloo on this CPU): the losses see the global batch, the gradients are
synchronized, and a run is one run.

- Every loss function, on 2 processes' slices of fixed features, gives the one-process loss (the mean over the
  processes) and gradients (each process's rows get K times the one-process gradient of the mean loss, which
  DDP's averaging over the K processes brings back to it; the temperature's gradient is the mean).
- Every script trains under `torchrun --nproc_per_node 2`: one run folder with metrics, and every parameter
  (momentum copy, queue, codebook included) bit-identical on both processes at the end.
- With BatchNorm and dropout off, clip_base's first logged loss on 2 processes equals 1 process's.
- A run stopped and resumed under torchrun ends with the weights of an uninterrupted one; a killed process
  ends the run with a non-zero status and the last checkpoint loads.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ddp_worker
import eval as ev
from tiny import ONE_THREAD, ROOT, run_dir_of, tiny_albef, tiny_args

pytestmark = pytest.mark.slow
WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")
SMALL = ("--steps", 4, "--max-eval", 16, "--probe-train", 32)


def torchrun(*argv, k=2, timeout=300, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(k), *map(str, argv)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**ONE_THREAD, "PYTHONWARNINGS": "ignore"})
    if check:
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return p


def test_every_loss_and_gradient_on_two_processes_equals_one_process(tmp_path):
    torchrun(WORKER, "features", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = ddp_worker.evaluate_cases(0, 1)
    n = ddp_worker.N // 2
    assert set(one) == set(ranks[0]) and len(one) == 11
    for name, (loss, grads, shared_grads) in one.items():
        two = [r[name] for r in ranks]
        assert torch.allclose((two[0][0] + two[1][0]) / 2, loss, atol=1e-6), name
        for i, g in enumerate(grads):       # None: a momentum feature (no gradient by design)
            for r in range(2):
                assert (g is None and two[r][1][i] is None) or torch.allclose(two[r][1][i] / 2, g[r * n:(r + 1) * n],
                                                                             atol=1e-6), (name, i, r)
        for i, g in enumerate(shared_grads):
            assert (g is None) or torch.allclose((two[0][2][i] + two[1][2][i]) / 2, g, atol=1e-6), (name, i)
        assert any(g is not None for g in grads), name              # something is checked in every case


TWO_TOWER = ["clip_base", "sep", "bridge", "geocons"]


def argv_of(script, out, *extra):
    return (tiny_args if script in TWO_TOWER else tiny_albef)(out, *SMALL, *extra)


def train_two(script, tmp, *extra):
    """`torchrun --nproc_per_node 2` of the worker's train mode: runs under tmp/runs, weights under tmp/w."""
    (tmp / "w").mkdir(parents=True, exist_ok=True)
    torchrun(WORKER, "train", script, tmp / "w", *argv_of(script, tmp / "runs", *extra))
    return tmp


@pytest.fixture(scope="module")
def clip_two(tmp_path_factory):
    """clip_base on 2 processes (BatchNorm and dropout off): tmp/runs/<run>, tmp/w/weights{0,1}.pt."""
    return train_two("clip_base", tmp_path_factory.mktemp("clip_two"))


def weights_agree(tmp):
    a, b = (torch.load(tmp / "w" / f"weights{r}.pt", weights_only=True) for r in range(2))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ
    return a


@pytest.mark.parametrize("script", TWO_TOWER + ["albef_fusion", "codis"])
def test_every_script_trains_under_torchrun_as_one_run(script, tmp_path, clip_two):
    tmp = clip_two if script == "clip_base" else train_two(script, tmp_path)
    run = run_dir_of(tmp / "runs")                                  # exactly one run folder
    assert json.load(open(os.path.join(run, "metrics.json")))["train/steps"] == 4
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))] == [2, 4]
    state = weights_agree(tmp)
    saved = ev.load_checkpoint(os.path.join(run, "checkpoint.pt"))
    assert all(torch.equal(saved["model"][k], state[k]) for k in state)
    assert len(saved["rng_ranks"]) == 2


def test_unsynchronized_gradients_are_caught(tmp_path):
    """Without DDP each process follows its own gradients: the end-of-training check stops the run."""
    (tmp_path / "w").mkdir()
    p = torchrun(WORKER, "train-unsynced", "clip_base", tmp_path / "w", *argv_of("clip_base", tmp_path / "runs"),
                 check=False)
    assert p.returncode != 0 and "their gradients were not synchronized" in p.stdout + p.stderr


def test_first_logged_loss_on_two_processes_equals_one_process(tmp_path, clip_two):
    subprocess.run([sys.executable, WORKER, "train", "clip_base", tmp_path,
                    *map(str, argv_of("clip_base", tmp_path / "runs"))],
                   cwd=ROOT, check=True, capture_output=True, timeout=300, env=ONE_THREAD)
    first = [json.loads(open(os.path.join(run_dir_of(t / "runs"), "log.jsonl")).readline())
             for t in (tmp_path, clip_two)]
    for key in ("loss", "loss_v2t", "loss_t2v", "loss_v2v", "loss_t2t"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-5), key


def test_resume_under_torchrun_continues_exactly(tmp_path, clip_two):
    train_two("clip_base", tmp_path, "--stop-at", 2)
    run = run_dir_of(tmp_path / "runs")
    torchrun(WORKER, "train", "clip_base", tmp_path / "w", "--resume", os.path.join(run, "checkpoint.pt"))
    a = ev.load_checkpoint(os.path.join(run_dir_of(clip_two / "runs"), "checkpoint.pt"))["model"]
    b = ev.load_checkpoint(os.path.join(run, "checkpoint.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_must_divide_over_the_processes(tmp_path):
    p = torchrun("clip_base.py", *tiny_args(tmp_path, "--batch-size", 15), check=False)
    assert p.returncode != 0 and "--batch-size 15 is the global batch" in p.stderr


def test_a_killed_process_ends_the_run_and_keeps_the_last_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "clip_base.py", *tiny_args(tmp_path, "--steps", 100000, "--save-every", 2, "--dist-timeout", 0.5)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            dirs = os.listdir(tmp_path)
            if dirs and os.path.exists(os.path.join(tmp_path, dirs[0], "checkpoint.pt")):
                break
            time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "clip_base.py"], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    ckpt = ev.load_checkpoint(os.path.join(run_dir_of(tmp_path), "checkpoint.pt"))
    assert ckpt["step"] >= 2
