"""Shared by the tests of every method script: flags for tiny end-to-end runs (seconds on a CPU), and the
checks every script's end-to-end tests make (a smoke run as a user runs it, eval.py on the saved run, exact
resume)."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread: a tiny model gains nothing from more, and on shared cores OpenMP's spin-waiting made these runs
# ten times slower (measured: 80 s instead of 7 s for one geocons run while another job trained)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

TINY = ["--synth-train", "256", "--steps", "6", "--batch-size", "16", "--log-every", "2", "--warmup", "2",
        "--image-size", "32", "--cnn-width", "8", "--text-width", "32", "--text-layers", "1", "--embed-dim", "16",
        "--probe-train", "64", "--max-eval", "64", "--num-workers", "0"]


def tiny_args(out_dir, *extra):
    """TINY plus an output folder and any extra flags (later flags win)."""
    return [*TINY, "--out", str(out_dir), *map(str, extra)]


# tiny end-to-end runs (seconds on a CPU): ViT/BERT sizes of ALBEF instead of tiny.TINY's CNN flags
TINY_ALBEF = ["--synth-train", "256", "--steps", "6", "--batch-size", "16", "--log-every", "2", "--warmup", "2",
              "--image-size", "32", "--vit-patch", "8", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2",
              "--text-width", "32", "--text-layers", "1", "--fusion-layers", "1", "--text-heads", "2",
              "--embed-dim", "16", "--queue-size", "48", "--alpha-ramp", "3", "--itm-k", "4",
              "--probe-train", "64", "--max-eval", "48", "--num-workers", "0"]


def tiny_albef(out_dir, *extra):
    """TINY_ALBEF plus an output folder and any extra flags (later flags win)."""
    return [*TINY_ALBEF, "--out", str(out_dir), *map(str, extra)]


def unit(*shape, seed=0):
    """Random unit rows (float64), reproducible by seed."""
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def run_dir_of(out):
    """The one run folder a script wrote under `out`."""
    dirs = glob.glob(os.path.join(out, "*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def smoke_run(script, argv, out, finite_keys=("loss",)):
    """`python script argv` in a subprocess, as a user runs it (6 steps, a log line every 2): the outputs of
    a run writes exist and every logged `finite_keys` value is finite. Returns (run folder, log rows, metrics)."""
    subprocess.run([sys.executable, script, *argv], cwd=ROOT, check=True, timeout=300, env=ONE_THREAD)
    run = run_dir_of(out)
    for name in ("args.json", "log.jsonl", "checkpoint.pt", "metrics.json", "tokenizer"):
        assert os.path.exists(os.path.join(run, name)), name
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in finite_keys:
        assert all(math.isfinite(r[key]) for r in rows), key
    return run, rows, json.load(open(os.path.join(run, "metrics.json")))


def eval_cli_agrees(run, metrics, keys):
    """`python eval.py RUN --save` re-evaluates a saved run: same checkpoint, data and protocol, so the same
    numbers as the trainer's metrics.json for every key in `keys`. Returns what eval.py printed."""
    out = subprocess.run([sys.executable, "eval.py", run, "--save"], cwd=ROOT, check=True, timeout=300,
                         capture_output=True, text=True, env=ONE_THREAD).stdout
    assert os.path.basename(run) in out and "|" in out
    again = json.load(open(os.path.join(run, "metrics_eval.json")))
    for k in keys:
        assert again[k] == pytest.approx(metrics[k], abs=1e-4), k
    return out


def resume_is_exact(main, argv_of, tmp_path):
    """6 steps straight, or stopped at 3 and resumed to 6 (`main` is a script's main, `argv_of(out, *extra)`
    its tiny flags): bit-identical state dicts and identical logged losses (CPU). Returns the state dict."""
    straight = main(argv_of(tmp_path / "a", "--steps", 6))
    stopped = main(argv_of(tmp_path / "b", "--steps", 6, "--stop-at", 3))
    assert not os.path.exists(os.path.join(stopped, "metrics.json"))
    resumed = main(["--resume", os.path.join(stopped, "checkpoint.pt")])
    assert resumed == stopped
    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    loss_a = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(straight, "log.jsonl")))}
    loss_b = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(resumed, "log.jsonl")))}
    assert sorted(loss_b) == [2, 3, 4, 6]  # the stop is logged too
    assert all(loss_a[s] == loss_b[s] for s in (2, 4, 6))
    return a["model"]
