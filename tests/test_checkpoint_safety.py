"""Loading a checkpoint never runs code: eval.load_checkpoint (and so eval.py RUN_DIR and every --resume) reads
only tensors and plain Python values, and only checkpoints that name one of the six method scripts.

Every checkpoint here is written by hand with torch.save (no method script runs).
"""
import os
import pickle
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as ev  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class WritesMarker:
    """Unpickling this object calls Path.write_text(marker, 'ran'): code run by the loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (Path(self.marker), "ran")


class RunsShell:
    """Unpickling this object calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def plain_checkpoint(script="clip_base"):
    """The layout the method scripts save, with plain values only: real model / optimizer / scheduler / scaler
    state dicts, args as a dict, RNG states as tensors and lists."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    py_state = random.getstate()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "step": 7,
            "args": {"lr": 1e-3, "steps": 10, "out": "runs", "image_size": 32},
            "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]], "torch": torch.get_rng_state()},
            "script": script}


def test_the_payload_really_runs_code_under_the_unsafe_loader(tmp_path):
    """Control: what the refusals below prevent does happen with torch.load(weights_only=False)."""
    marker = tmp_path / "ran.txt"
    torch.save({"model": {}, "script": "clip_base", "x": WritesMarker(marker)}, tmp_path / "checkpoint.pt")
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("payload", ["write", "shell"])
def test_code_running_checkpoint_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "ran.txt"
    evil = WritesMarker(marker) if payload == "write" else RunsShell(f"touch {marker}")
    run = tmp_path / "run"
    run.mkdir()
    ckpt = plain_checkpoint()
    ckpt["args"] = evil                                           # hidden where a loader reads first
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError, match="tensors and plain Python values.*never run code"):
        ev.load_checkpoint(run / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError, match="refused to load"):
        ev.load_run(run, "cpu")                                   # what `python eval.py RUN_DIR` calls
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        ev.load_checkpoint(run / "checkpoint.pt", expect_script="clip_base")   # what --resume calls
    assert not marker.exists()


def test_old_checkpoint_with_objects_is_refused_with_a_reason(tmp_path):
    ckpt = plain_checkpoint()
    ckpt["args"] = ev.argparse.Namespace(lr=1e-3)                  # an object, as older scripts saved args
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError) as e:
        ev.load_checkpoint(tmp_path / "checkpoint.pt")
    msg = str(e.value)
    assert "argparse.Namespace" in msg and "weights_only=True" in msg and "re-saved by a current script" in msg


@pytest.mark.parametrize("script", ["os", "evil", None, "eval"])
def test_checkpoint_naming_another_module_is_refused(tmp_path, script):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(plain_checkpoint(script), run / "checkpoint.pt")
    sys.modules.pop("evil", None)
    with pytest.raises(ValueError, match=f"its 'script' is {script!r}, expected one of clip_base, sep"):
        ev.load_checkpoint(run / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a checkpoint of a method script"):
        ev.load_run(run, "cpu")
    assert "evil" not in sys.modules                              # nothing was imported


def test_valid_plain_checkpoint_loads_exactly(tmp_path):
    ckpt = plain_checkpoint("albef_fusion")
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    back = ev.load_checkpoint(tmp_path / "checkpoint.pt", expect_script="albef_fusion")
    assert back.keys() == ckpt.keys() and back["step"] == 7 and back["args"] == ckpt["args"]
    for k, v in ckpt["model"].items():
        assert torch.equal(back["model"][k], v)
    exp_avg = ckpt["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert back["scheduler"] == ckpt["scheduler"] and back["rng"]["python"] == ckpt["rng"]["python"]
    assert torch.equal(back["rng"]["torch"], ckpt["rng"]["torch"])
    assert set(ev.METHOD_SCRIPTS) == {"clip_base", "sep", "bridge", "geocons", "albef_fusion", "codis"}


def test_expect_script_names_both_scripts(tmp_path):
    torch.save(plain_checkpoint("sep"), tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"written by sep\.py, not codis\.py.*python sep\.py --resume"):
        ev.load_checkpoint(tmp_path / "checkpoint.pt", expect_script="codis")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ev.load_checkpoint(tmp_path / "nowhere.pt")
    torch.save(plain_checkpoint(), tmp_path / "checkpoint.pt")
    raw = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])      # a copy interrupted half way
    with pytest.raises(ValueError, match="could not be read as a checkpoint"):
        ev.load_checkpoint(tmp_path / "cut.pt")
