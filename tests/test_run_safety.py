"""What a tired user types or feeds by mistake, in the shared skeleton of every method script: every flag is
checked before any data is read (one line naming the flag, exit status 2), --resume applies the flags that are
safe to change and refuses the others by name, a finished run is not trained again, a checkpoint write that
fails leaves the previous checkpoint and no temporary file, one process trains in a run folder at a time, and
a signal during the final evaluation names the complete checkpoint and how to get the metrics."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import eval as ev
from tiny import ONE_THREAD, ROOT, run_dir_of, tiny_albef, tiny_args

SCRIPTS = ["clip_base", "sep", "bridge", "geocons", "albef_fusion", "codis"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny runs gain nothing from more threads


def exit_of(call, capsys):
    """(exit status, what was printed to stderr) of a call that must stop with SystemExit."""
    with pytest.raises(SystemExit) as e:
        call()
    code = e.value.code
    err = capsys.readouterr().err
    return (code if isinstance(code, int) else 1), (err + (code if isinstance(code, str) else ""))


# ------------------------------------------------------------------ every flag in its range, before anything runs
BAD_FLAGS = [("--steps", "0"), ("--steps", "-5"), ("--stop-at", "-1"), ("--batch-size", "0"), ("--batch-size", "1"),
             ("--log-every", "0"), ("--log-every", "-1"), ("--image-size", "0"), ("--max-samples", "-1"),
             ("--max-eval", "-2"), ("--max-eval", "-1"), ("--max-len", "0"), ("--save-every", "-1"),
             ("--save-minutes", "-1"), ("--epochs", "-1"), ("--embed-dim", "0"), ("--lr", "0"),
             ("--precision", "fp64"), ("--eval-split", "train"), ("--num-workers", "-2")]


@pytest.mark.method
@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_a_flag_out_of_range_stops_at_parse_time_naming_it(flag, value, capsys):
    import clip_base
    code, err = exit_of(lambda: data.parse_args(clip_base.Args, [flag, value]), capsys)
    assert code == 2
    assert f"{flag} {value}: must be" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.method
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_checks_its_own_flags_and_accepts_its_defaults(script, capsys):
    mod = importlib.import_module(script)
    assert data.parse_args(mod.Args, []) == mod.Args()            # the defaults are all in range
    code, err = exit_of(lambda: data.parse_args(mod.Args, ["--batch-size", "1"]), capsys)
    assert code == 2 and "--batch-size 1: must be ≥ 2" in err
    own = {"sep": ("--sep-weight", "-1"), "bridge": ("--bridge-t", "1.5"), "geocons": ("--gc-weight", "-0.1"),
           "albef_fusion": ("--momentum", "1.2"), "codis": ("--ipot-beta", "0")}.get(script)
    if own:
        code, err = exit_of(lambda: data.parse_args(mod.Args, list(own)), capsys)
        assert code == 2 and f"{own[0]} {own[1]}: must be" in err


@pytest.mark.method
def test_combinations_are_checked(capsys):
    import albef_fusion
    code, err = exit_of(lambda: data.parse_args(albef_fusion.Args, ["--queue-size", "50", "--batch-size", "16"]),
                        capsys)
    assert code == 2 and "--queue-size 50 is not a multiple of --batch-size 16" in err and "--queue-size 48" in err
    code, err = exit_of(lambda: data.parse_args(albef_fusion.Args, ["--image-size", "36", "--vit-patch", "8"]),
                        capsys)
    assert code == 2 and "--image-size 36 is not a multiple of --vit-patch 8" in err


def test_as_the_user_meets_it_one_line_no_run_folder(tmp_path):
    """`python clip_base.py --steps 0` used to train nothing and crash in the NaN check (NameError)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "clip_base.py", *tiny_args(tmp_path, "--steps", 0)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert p.returncode == 2 and p.stderr.strip() == "error: --steps 0: must be ≥ 1"
    assert "Traceback" not in p.stderr and not os.listdir(tmp_path)
    assert time.perf_counter() - t < 60


def test_a_batch_larger_than_the_training_set_needs_allow_repeats(tmp_path, capsys):
    import clip_base
    code, err = exit_of(lambda: clip_base.main(tiny_args(tmp_path, "--synth-train", 10, "--batch-size", 16)),
                        capsys)
    assert code == 2 and "--batch-size 16 is larger than the 10 training images" in err and "--allow-repeats" in err
    run = clip_base.main(tiny_args(tmp_path / "ok", "--synth-train", 10, "--batch-size", 16, "--steps", 2,
                                   "--allow-repeats"))
    assert ev.load_checkpoint(os.path.join(run, "checkpoint.pt"))["step"] == 2


# ------------------------------------------------------------------ --resume says what it does
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step clip_base run (with metrics.json)."""
    import clip_base
    return clip_base.main(tiny_args(tmp_path_factory.mktemp("finished"), "--steps", 4))


def state_of(run):
    """(checkpoint bytes, log text, metrics text) of a run folder: what resuming must not touch."""
    read = lambda name, mode="r": open(os.path.join(run, name), mode).read()  # noqa: E731
    return read("checkpoint.pt", "rb"), read("log.jsonl"), read("metrics.json")


def test_resuming_a_finished_run_trains_nothing_and_names_its_metrics(finished, capsys):
    import clip_base
    before = state_of(finished)
    ckpt = os.path.join(finished, "checkpoint.pt")
    assert clip_base.main(["--resume", ckpt]) == finished
    out = capsys.readouterr().out
    assert f"finished at step 4: its metrics are in {os.path.join(finished, 'metrics.json')}" in out
    assert f"python eval.py {finished} --save" in out
    assert state_of(finished) == before


@pytest.mark.parametrize("extra, named", [
    (["--lr", "0.5", "--seed", "99", "--precision", "bf16", "--out", "X"],
     ["--lr 0.5 (the run has 0.001)", "--seed 99 (the run has 1)", "--precision bf16 (the run has fp32)",
      "--out X"]),
    (["--stop-at", "3"], ["--stop-at 3: the checkpoint is at step 4 already"]),
    (["--steps", "3"], ["--steps 3: the checkpoint is at step 4 already"]),
])
def test_resume_refuses_flags_that_would_change_the_run(finished, extra, named, capsys):
    import clip_base
    before = state_of(finished)
    code, err = exit_of(lambda: clip_base.main(["--resume", os.path.join(finished, "checkpoint.pt"), *extra]),
                        capsys)
    assert code == 2 and all(n in err for n in named), err
    assert state_of(finished) == before


def test_resume_with_the_same_command_and_a_longer_steps_extends_the_run(tmp_path, capsys):
    """Re-typing the run's own flags is fine; --steps extends it (the cosine schedule then ends at the new step)."""
    import clip_base
    run = clip_base.main(tiny_args(tmp_path, "--steps", 4))
    again = clip_base.main(tiny_args(tmp_path, "--steps", 6, "--resume", os.path.join(run, "checkpoint.pt")))
    assert again == run and "the cosine schedule now ends at step 6" in capsys.readouterr().out
    assert ev.load_checkpoint(os.path.join(run, "checkpoint.pt"))["step"] == 6
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))] == [2, 4, 6]
    assert json.load(open(os.path.join(run, "metrics.json")))["train/steps"] == 6


# ------------------------------------------------------------------ checkpoints that survive the disk
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_no_temporary_file(tmp_path):
    """A real "no space left on device": the temporary file is a link to /dev/full."""
    path = str(tmp_path / "checkpoint.pt")
    ev.save_checkpoint(path, step=1, w=torch.ones(3))
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    os.symlink("/dev/full", path + ".tmp")
    with pytest.raises(SystemExit) as e:
        ev.save_checkpoint(path, step=2, w=torch.zeros(10_000))
    msg = str(e.value.code)
    assert "disk full or not writable" in msg and f"the previous checkpoint at {path} is intact" in msg
    assert not os.path.lexists(path + ".tmp")
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_checkpoint_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", None)), real_replace(a, b)))
    ev.save_checkpoint(str(tmp_path / "checkpoint.pt"), step=3)
    assert calls == [("fsync", False), ("replace", None), ("fsync", True)]   # the file, the rename, the folder


# ------------------------------------------------------------------ one process trains in a run folder
def test_a_second_process_cannot_train_in_a_locked_run_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, eval; h = eval.lock_run_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"another process \\(pid {holder.pid}\\) is training in {tmp_path}"):
            ev.lock_run_dir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    ev.lock_run_dir(str(tmp_path)).close()             # the kernel released the lock of the killed process


def test_two_resumes_of_one_checkpoint_one_refuses(tmp_path):
    """The first resume holds the folder; the second stops at once with the first one's pid."""
    import clip_base
    run = clip_base.main(tiny_args(tmp_path, "--steps", 2))
    ckpt = os.path.join(run, "checkpoint.pt")
    first = subprocess.Popen([sys.executable, "clip_base.py", "--resume", ckpt, "--steps", "2000",
                              "--save-minutes", "0"], cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        lines_before = len(open(os.path.join(run, "log.jsonl")).readlines())
        deadline = time.time() + 120
        while len(open(os.path.join(run, "log.jsonl")).readlines()) == lines_before and time.time() < deadline:
            time.sleep(0.1)                            # the first one is training
        second = subprocess.run([sys.executable, "clip_base.py", "--resume", ckpt, "--steps", "2000"], cwd=ROOT,
                                env=ONE_THREAD, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and f"another process (pid {first.pid}) is training in {run}" in second.stderr
    finally:
        first.kill()
        first.communicate()


# ------------------------------------------------------------------ a signal during the final evaluation
@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_names_the_checkpoint_and_eval_py(tmp_path):
    argv = tiny_args(tmp_path, "--steps", 2, "--save-minutes", 0, "--max-eval", 1000, "--probe-train", 2000)
    proc = subprocess.Popen([sys.executable, "clip_base.py", *argv], cwd=ROOT, env=ONE_THREAD,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(os.path.exists(os.path.join(tmp_path, d, "checkpoint.pt"))
                                             for d in os.listdir(tmp_path)):
        time.sleep(0.05)                               # the only checkpoint is the final one: evaluation begins
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    run = run_dir_of(tmp_path)
    assert proc.returncode == 143, err[-2000:]
    assert f"the checkpoint {os.path.join(run, 'checkpoint.pt')} of step 2 is complete" in err
    assert f"python eval.py {run} --save" in err and not os.path.exists(os.path.join(run, "metrics.json"))
    again = subprocess.run([sys.executable, "clip_base.py", "--resume", os.path.join(run, "checkpoint.pt")],
                           cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "its final evaluation did not finish" in again.stdout
    assert f"python eval.py {run} --save" in again.stdout


# ------------------------------------------------------------------ the fusion scripts share the skeleton
def test_fusion_resume_of_a_finished_run_trains_nothing(tmp_path, capsys):
    import albef_fusion
    run = albef_fusion.main(tiny_albef(tmp_path, "--steps", 2))
    before = state_of(run)
    assert albef_fusion.main(["--resume", os.path.join(run, "checkpoint.pt")]) == run
    assert "finished at step 2" in capsys.readouterr().out and state_of(run) == before
