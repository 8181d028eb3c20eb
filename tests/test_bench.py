"""bench.py: the CPU configuration end to end with tiny models (a smoke test, not a timed one), the reference row
and its ratio, bf16 on the CPU, --compile (run where supported, skipped cleanly where not), the CLI's errors;
the phase timers (perf_counter, and CUDA events through a fake event class), the phases of a step, the medians,
the MFU peaks, the gpu config against the scripts' GPU commands, batches through data.to_device."""
import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import re
import shlex
import statistics
from types import SimpleNamespace

import pytest
import torch

import bench
import data
from tiny import ROOT, TINY, TINY_ALBEF

# the other tests' tiny sizes (each flag reaches the scripts that have it; later flags win, so bench.py's
# --steps/--warmup become 2 timed steps after 1 warm-up per row)
TINY_BENCH = [*TINY, *TINY_ALBEF, "--steps", "2", "--warmup", "1"]
TWO_TOWER = ["clip_base", "sep", "bridge", "geocons"]
FUSION = ["albef_fusion"] + (["codis"] if importlib.util.find_spec("codis") else [])  # codis.py may be absent


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


def assert_ratio(rows, name, baseline):
    """The overhead ratio is exactly the quotient of the two median step times printed beside it."""
    assert rows[name]["baseline"] == baseline
    assert rows[name]["vs_baseline"] == rows[name]["step_ms"] / rows[baseline]["step_ms"]


@pytest.mark.slow
def test_cpu_config_smoke(tmp_path, capsys):
    res = bench.main([*TINY_BENCH, "--save", str(tmp_path / "bench.json")])
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == TWO_TOWER + FUSION  # the cpu config's rows, baselines first
    for r in rows.values():
        for key in ("samples_per_s", "step_ms", "forward_ms", "backward_ms", "optimizer_ms", "peak_mib",
                    "gflop_per_step"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["method"], key)
        assert math.isfinite(r["data_ms"]) and r["data_ms"] >= 0 and 0 <= r["data_pct"] <= 100
        assert math.isfinite(r["loss"]) and r["mfu_pct"] is None  # MFU only on a GPU
        assert r["batch"] == 16 and r["workers"] == 0 and r["skipped_images"] == 0
        # the flags listed are the tiny ones and bench.py's scheduler span (1 + 1 warm-up + 2 steps), nothing else
        assert "--batch-size 16" in r["flags"] and "--steps 4" in r["flags"] and "deterministic" not in r["flags"]
    for name in TWO_TOWER[1:]:
        assert_ratio(rows, name, "clip_base")
    if "codis" in rows:
        assert_ratio(rows, "codis", "albef_fusion")
    assert rows["clip_base"]["vs_baseline"] is None and rows["albef_fusion"]["vs_baseline"] is None
    # a regularizer's extra heads/terms never make its step cheaper in FLOPs than the baseline's
    assert all(rows[n]["gflop_per_step"] >= rows["clip_base"]["gflop_per_step"] for n in TWO_TOWER)
    # the limits of the cpu config: ≤ 1.10× clip_base per regularizer (codis ≤ 1.15× albef_fusion)
    lim = {c["check"].split(":")[0]: c for c in res["limits"] if "IPOT" not in c["check"]}
    assert sorted(lim) == sorted(TWO_TOWER[1:] + FUSION[1:])
    assert all(c["met"] == (c["value"] <= (1.15 if n == "codis" else 1.10)) for n, c in lim.items())
    if "codis" in rows:  # and IPOT alone at 256 × 1024, against its ≤ 30 ms
        (ipot,) = [c for c in res["limits"] if "IPOT" in c["check"]]
        assert ipot["value"] == res["ipot_ms"] > 0 and ipot["met"] == (res["ipot_ms"] <= 30)
    # one Markdown table with a line per row, and the same numbers saved as JSON
    out = capsys.readouterr().out
    for name in rows:
        assert sum(line.startswith(f"| {name} | ") for line in out.splitlines()) == 1, name
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(res))


@pytest.mark.slow
def test_interleaved_rows():
    """--interleave alternates the rows' timed steps: same rows and ratios, no per-row peak memory."""
    res = bench.main([*TINY_BENCH, "--methods", "sep,clip_base", "--interleave"])
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["clip_base", "sep"] and all(r["peak_mib"] is None for r in rows.values())
    assert_ratio(rows, "sep", "clip_base")
    assert any(n.startswith("--interleave") for n in res["notes"])


@pytest.mark.slow
def test_reference_row_in_bf16():
    """The reference step (torchvision + transformers only) runs in bf16 autocast, and clip_base --plain-clip's
    ratio is measured against it at the same encoders and batch."""
    res = bench.main([*TINY_BENCH, "--methods", "clip_plain,reference", "--precision", "bf16",
                      "--two-tower-flags=--vision resnet18"])
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["reference", "clip_plain"]  # the baseline runs first, whatever the order asked
    assert rows["reference"]["model"] == rows["clip_plain"]["model"] == "resnet18 + BERT 1×32 @ 32 px"
    assert all(math.isfinite(r["loss"]) for r in rows.values())
    assert_ratio(rows, "clip_plain", "reference")
    assert [c["limit"] for c in res["limits"]] == ["≤ 1.00"]


@pytest.mark.slow
def test_bf16_on_cpu_gives_finite_losses_for_every_method():
    res = bench.main([*TINY_BENCH, "--precision", "bf16", "--steps", "1", "--warmup", "0"])
    assert res["precision"] == "bf16"
    losses = {r["method"]: r["loss"] for r in res["rows"]}
    assert sorted(losses) == sorted(TWO_TOWER + FUSION)
    assert all(math.isfinite(v) for v in losses.values()), losses


@pytest.mark.slow
def test_compile_where_supported():
    """--compile as each script applies it (the whole two-tower model; ALBEF/CODIS layer by layer), traced by
    dynamo with the `eager` backend (no code generation: seconds, not minutes). Skipped where unsupported."""
    reason = bench.compile_unsupported(torch.device("cpu"), "eager")
    if reason:
        pytest.skip(reason)
    from torch._dynamo.utils import counters
    counters.clear()
    res = bench.main([*TINY_BENCH, "--methods", "clip_base,albef_fusion", "--compile", "--compile-backend", "eager",
                      "--steps", "1"])
    assert res["compile"] is True and not any("compile" in n for n in res["notes"])
    assert counters["stats"]["unique_graphs"] > 0  # something was really compiled
    assert all(math.isfinite(r["loss"]) for r in res["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag", "1"], "no method script has --no-such-flag"),
    (["--methods", "clip_base,nope"], "unknown nope"),
    (["--fusion-flags=--cnn-width 8"], "no fusion script has --cnn-width"),
    (["--methods", "reference"], "the reference row needs a torchvision image encoder"),
    (["--precision", "fp64"], "choose one of fp32, bf16, fp16"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


# ------------------------------ timers, phases, medians (no model) ------------------------------------------
def test_host_timer_reads_the_clock_at_each_mark():
    ticks, syncs = iter([1.0, 1.5, 2.0, 4.0, 4.25, 10.0, 10.0, 13.0, 13.5, 16.0]), []
    timer = bench.HostTimer(sync=lambda: syncs.append(1), clock=lambda: next(ticks))
    for _ in range(2):
        timer.start()
        for _ in range(4):
            timer.mark()
    assert len(syncs) == 10  # the device is synchronized before each reading (MPS), never on the CPU (sync=None)
    assert timer.phases() == [[0.5, 0.5, 2.0, 0.25], [0.0, 3.0, 0.5, 2.5]]


def test_cuda_timer_records_events_and_waits_once_at_the_end():
    """CUDA events (a fake event class): one event per mark, on the step's stream; nothing waits while the steps
    run; reading the phases waits for the last event only, then takes elapsed_time (ms) between neighbours."""
    completes_at_ms = iter([0.0, 1.0, 3.5, 4.0, 10.0, 10.0, 10.25, 11.0, 12.0, 15.0])
    waits = []

    class FakeEvent:
        def record(self, stream):
            assert stream == "the stream"
            self.ms = next(completes_at_ms)

        def synchronize(self):
            waits.append(self)

        def elapsed_time(self, end):
            assert waits, "an event's time was read before waiting for the GPU"
            return end.ms - self.ms

    timer = bench.CudaTimer("the stream", FakeEvent)
    for _ in range(2):
        timer.start()
        for _ in range(4):
            timer.mark()
    assert waits == []
    phases = timer.phases()
    assert waits == [timer.steps[-1][-1]]
    assert [len(p) for p in phases] == [4, 4]
    assert sum(phases, []) == pytest.approx([1e-3, 2.5e-3, 0.5e-3, 6e-3, 0.25e-3, 0.75e-3, 1e-3, 3e-3])


def test_one_step_marks_the_end_of_each_phase():
    """The four phases hold what the docs say: data = fetch; forward = the losses; backward = zero_grad +
    backward; optimizer = optimizer step + scheduler + the clamp / momentum update. A timer whose marks are
    positions in a log of the calls reads which calls fell in each phase."""
    log = []
    model = torch.nn.Linear(2, 1)
    model.weight.register_hook(lambda g: log.append("backward"))

    class Opt(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            log.append("zero_grad")
            super().zero_grad(set_to_none)

        def step(self, closure=None):
            log.append("optimizer")
            return super().step(closure)

    class Trainer(bench.Trainer):
        def losses(self, batch, step):
            log.append("forward")
            return {"loss": self.model(batch["x"]).sum()}

        def after_step(self):
            log.append("after_step")

    class LogTimer(bench.PhaseTimer):
        def _now(self):
            return len(log)

        def _seconds(self, a, b):
            return tuple(log[a:b])

        def _wait(self, last):
            pass

    scheduler = SimpleNamespace(step=lambda: log.append("scheduler"))
    t = Trainer(model, Opt(model.parameters(), lr=0.1), scheduler, None, SimpleNamespace(precision="fp32"),
                torch.device("cpu"))
    timer = LogTimer()
    for step in range(2):
        bench.one_step(t, lambda: log.append("data") or {"x": torch.ones(3, 2)}, step, timer)
    assert timer.phases() == [[("data",), ("forward",), ("zero_grad", "backward"),
                               ("optimizer", "scheduler", "after_step")]] * 2


def test_summarize_takes_the_median_step_not_the_sum_of_median_phases():
    times = [[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 1.0, 1.0], [0.5, 9.0, 0.5, 0.5]]
    r = bench.summarize(times, batch_size=8)
    # steps: 10, 8, 3, 10.5 s -> median 9 s; per phase: data 0.75, forward 2, backward 1.5, optimizer 1.5
    assert r["step_ms"] == pytest.approx(9000) and r["data_ms"] == pytest.approx(750)
    assert (r["forward_ms"], r["backward_ms"], r["optimizer_ms"]) == pytest.approx((2000, 1500, 1500))
    assert r["data_pct"] == pytest.approx(100 * 0.75 / 9)
    assert r["samples_per_s"] == pytest.approx(statistics.median([0.8, 1.0, 8 / 3, 8 / 10.5]))


# ------------------------------ MFU peaks ------------------------------------------------------------------
# NVIDIA's datasheets print tensor-core peaks with 2:4 sparsity; the dense peak is half
@pytest.mark.parametrize("name, precision, tf32, dense_tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 1979 / 2),      # H100 SXM
    ("NVIDIA H100 PCIe", "bf16", True, 1513 / 2),
    ("NVIDIA H100 NVL", "fp16", True, 1671 / 2),
    ("NVIDIA H200", "bf16", True, 1979 / 2),
    ("NVIDIA H200", "fp32", True, 989 / 2),                 # fp32 with TF32 allowed: the TF32 tensor cores
    ("NVIDIA H200", "fp32", False, 67),                      # TF32 off: the CUDA cores
    ("NVIDIA A100-SXM4-80GB", "bf16", True, 624 / 2),
    ("NVIDIA A100 80GB PCIe", "fp32", True, 312 / 2),
    ("NVIDIA L4", "bf16", True, 242 / 2),
    ("NVIDIA L40S", "bf16", True, 362.05),
    ("NVIDIA A10", "bf16", True, 250 / 2),
    ("NVIDIA GeForce RTX 4090", "bf16", True, 330.4 / 2),
    ("NVIDIA GeForce RTX 4090", "fp32", True, 165.2 / 2),
    ("NVIDIA A10G", "bf16", True, None),                     # not an A10
    ("NVIDIA GeForce RTX 3090 Ti", "bf16", True, None),      # not an RTX 3090
    ("Tesla V100-SXM2-16GB", "bf16", True, None),
])
def test_peak_flops_by_gpu_name_and_precision(name, precision, tf32, dense_tflops):
    peak, label = bench.peak_flops_of(name, precision, tf32)
    if dense_tflops is None:
        assert peak is None and label is None
    else:
        assert peak == pytest.approx(dense_tflops * 1e12, rel=2e-3) and label.endswith(
            "bf16" if precision in ("bf16", "fp16") else "tf32" if tf32 else "fp32")


def test_mfu_peak_on_an_unknown_gpu_is_none_with_a_note(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    peak, note = bench.mfu_peak(SimpleNamespace(peak_flops=0.0, precision="bf16"), cuda)
    assert peak is None and "Mystery GPU 9000" in note and "--peak-flops" in note
    assert bench.mfu_peak(SimpleNamespace(peak_flops=5e14, precision="bf16"), cuda)[0] == 5e14
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.mfu_peak(SimpleNamespace(peak_flops=0.0, precision="bf16"), cuda)[0] == 756.5e12
    assert bench.mfu_peak(SimpleNamespace(peak_flops=0.0, precision="bf16"), torch.device("cpu")) == (None, None)


def test_main_on_one_row_mfu_undecodable_images_and_no_compiler(monkeypatch):
    """One tiny row through main(): every batch goes through data.to_device, whose counts of images that could
    not be decoded are summed and reported; MFU % = GFLOP/step ÷ median step time ÷ peak (a peak given, as on a
    GPU); --compile where it is unsupported runs eagerly with a note."""
    monkeypatch.setattr(bench, "compile_unsupported", lambda device, backend: "no C++ compiler here")
    monkeypatch.setattr(bench, "mfu_peak", lambda b, device: (1e10, "MFU against a made-up peak"))
    real, channels_last = data.to_device, []

    def to_device(batch, device, cl=False):  # the real one, with 2 images of every batch reported undecodable
        channels_last.append(cl)
        return real(batch, device, cl)[0], 2
    monkeypatch.setattr(data, "to_device", to_device)
    res = bench.main([*TINY_BENCH, "--methods", "clip_base", "--compile", "--steps", "3", "--warmup", "0"])
    assert res["compile"] is False
    assert res["notes"][0] == "--compile skipped (no C++ compiler here): every row ran eagerly"
    (r,) = res["rows"]
    assert math.isfinite(r["loss"])
    assert r["mfu_pct"] == pytest.approx(100 * r["gflop_per_step"] * 1e9 / (r["step_ms"] / 1e3) / 1e10)
    assert r["skipped_images"] == 2 * (1 + 3)  # the FLOP-counting step and the timed steps
    assert channels_last == [False] * 4  # clip_base's CNN on the CPU: NCHW, as clip_base.main() decides
    assert "MFU against a made-up peak" in res["notes"]
    assert any("8 images could not be decoded" in n for n in res["notes"])


# ------------------------------ the input path and the gpu config ------------------------------------------
def test_flags_of_parses_back_to_the_same_args():
    import clip_base
    defaults = clip_base.Args()
    a = dataclasses.replace(defaults, vision="resnet50", lr=1e-4, plain_clip=True, text_model="a folder/bert",
                            torch_deterministic=not defaults.torch_deterministic)
    flags = bench.flags_of(a, defaults)
    parser = data.add_dataclass_args(argparse.ArgumentParser(), clip_base.Args)
    assert clip_base.Args(**vars(parser.parse_args(shlex.split(flags)))) == a
    assert len(shlex.split(flags)) == 8 and bench.flags_of(defaults, defaults) == ""


# the flags of a GPU command that bench.py does not follow: synthetic data for a fixed number of steps instead
# of the dataset, random weights instead of the downloaded ones (offline), no evaluation during training
OFFLINE = {"data", "data_root", "epochs", "pretrained_vision", "tokenizer", "eval_every"}


def gpu_command(text, script, mod):
    """The Args fields set by the one `python SCRIPT.py ... --precision bf16` command in text (lines continued
    with a backslash joined), parsed by the script's own flags: an unknown flag fails."""
    commands = [c.replace("\\\n", " ") for c in re.findall(rf"python {script}\.py ((?:[^\n]*\\\n)*[^\n]*)", text)]
    (command,) = [c for c in commands if "--precision bf16" in c]
    return vars(data.add_dataclass_args(argparse.ArgumentParser(), mod.Args, defaults=False).parse_args(
        shlex.split(command)))


def test_gpu_config_is_each_scripts_gpu_command_and_nothing_else(monkeypatch):
    """Each row of --config gpu runs its script's defaults except the flags of its GPU command (docs/gpu.md's;
    CODIS's is ALBEF's, and its docstring's too), less OFFLINE, plus bench.py's steps: no flag a user does not
    set (cudnn determinism, workers, ...) is changed behind their back."""
    monkeypatch.setattr(bench, "random_bert_base", lambda cache: "random BERT-base")
    b, names, args, notes = bench.parse(["--config", "gpu"])
    gpu_md = open(f"{ROOT}/docs/gpu.md").read()
    checks = [(n, "clip_base", gpu_md) for n in ("clip_base", "sep", "bridge", "geocons")]
    checks += [(n, "albef_fusion", gpu_md) for n in ("albef_fusion", "codis")] + [("codis", "codis", None)]
    for row, script, text in checks:
        if row not in names:
            continue
        mod = importlib.import_module(row)
        command = gpu_command(text or mod.__doc__, script, mod)
        expected = {k: v for k, v in command.items() if k not in OFFLINE}
        expected.update(text_model="random BERT-base", steps=1 + b.warmup + b.steps)
        defaults = mod.Args()
        changed = {f.name: getattr(args[row], f.name) for f in dataclasses.fields(defaults)
                   if getattr(args[row], f.name) != getattr(defaults, f.name)}
        assert changed == expected, row
