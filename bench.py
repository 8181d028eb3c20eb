"""bench.py: training throughput of every method on a fixed configuration, in one Markdown table.

Each method's training step is rebuilt here the way its script's main() builds it (data.build_data,
data.build_tokenizer, data.train_loader, data.to_device, build_model, make_optimizer, the torch.backends
flags, autocast from eval.PRECISIONS, the step, then the temperature clamp and, for the fusion models,
momentum_update), by importing the script as a module: bench.py is a tool, not a method script, so it may
import them. Per method (one table row): one untimed step that counts the FLOPs (torch.utils.flop_counter),
W warm-up steps, then N timed steps, each split in four phases:

    data       waiting for the next batch + data.to_device (host→device copy, uint8 → normalized float)
    forward    compute_losses under autocast
    backward   zero_grad + backward
    optimizer  optimizer step + scheduler + the temperature clamp (+ the momentum update of ALBEF/CODIS)

A PhaseTimer marks the start of each step and the end of each phase. On a GPU the marks are CUDA events
recorded on the stream and read once, after the timed window: nothing synchronizes between phases, so the
host queues kernels ahead as it does in training, and each phase is GPU time (the data phase is how long the
GPU waited for the batch, plus the copy). On the CPU the marks are time.perf_counter readings.

The table reports the medians over the timed steps (samples/s, step time, each phase), the data share of the
step, peak memory, the model FLOPs of one step (forward + backward), the model FLOPs utilization on a GPU, and
each row's step time divided by its baseline's, measured in the same run at the same model and batch:
sep / bridge / geocons ÷ clip_base, codis ÷ albef_fusion, clip_base --plain-clip ÷ the reference step.
MFU = FLOPs per step ÷ median step time ÷ the GPU's dense peak in the precision in use: bf16 / fp16 tensor
cores, or TF32 tensor cores for fp32 (the scripts allow TF32). PEAK_TFLOPS lists the known GPUs, each figure
with its source; on another GPU the MFU column is empty unless --peak-flops gives the peak.

Configurations (--config):
    cpu  every script's defaults: small CNN / ViT + 2-layer BERT trained from scratch, 32 px synthetic data,
         fp32. Runs on a laptop.
    gpu  every script's defaults except the flags of its GPU command (docs/gpu.md, "Commands"): two-tower
         ResNet-50 + BERT-base at 224 px, embedding 256, batch 256; fusion ViT-B/16 + BERT-base (6 text + 6
         fusion layers, [CLS] pooling) at 256 px, embedding 256, batch 64, queue 65,536; bf16. What no network
         allows instead: random weights (no --pretrained-vision; BERT-base = transformers' BertConfig()
         defaults, saved once under --cache), the word tokenizer (--tokenizer auto) and synthetic images drawn
         at the image size; and no evaluation (--eval-every). Adds
         `reference`: plain CLIP written with the same torchvision / transformers modules and no project code
         (ReferenceCLIP below), the yardstick of clip_base.py --plain-clip.
The report lists, per row, every flag it ran with besides its script's defaults.
Limits checked: each regularizer ≤ 1.05× clip_base's step time on the GPU config (≤ 1.10× on the CPU one);
codis ≤ 1.15× albef_fusion; data < 5% of the step on the GPU config; clip_base --plain-clip at least the
reference's throughput in bf16 on the GPU. With the codis row, IPOT alone is timed too (256 × 1024, 50 outer
steps, median of 30 calls; ≤ 30 ms on a 2-core CPU). Results, commands and hardware: docs/benchmarks.md.

Run it:  python bench.py                                   (cpu config: 5 warm-up + 20 timed steps per method)
         python bench.py --interleave                      (a shared machine: the rows' steps alternate, so
                                                            a change of load hits every row alike)
         python bench.py --config gpu --save bench-gpu.json
         python bench.py --config gpu --fixed-batch        (one batch reused on the GPU: no input pipeline)
         python bench.py --config gpu --methods clip_base --data-root /data/coco --num-workers 12
bench.py times one process. On K GPUs, each script's scaling efficiency comes from the scripts themselves
under torchrun (samples_per_s in log.jsonl at K = 1, 2, 4, 8 with --batch-size growing with K): the command is
in docs/distributed.md, "Scaling" (not yet measured here: it needs a machine with several GPUs).
Any other flag is passed to every method script that has it (the scripts' own flags: --batch-size 64,
--image-size 64, --num-workers 4, ...); --two-tower-flags="..." / --fusion-flags="..." reach one family only.
"""
# ============================== imports =======================================================
import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as ev


# ============================== flags =========================================================
@dataclass
class BenchArgs:
    config: str = "cpu"
    """cpu (each script's defaults, 32 px) or gpu (each script's GPU command: ResNet-50 / ViT-B/16 + BERT-base)"""
    methods: str = ""
    """comma-separated rows (default: the config's): reference, clip_plain, clip_base, sep, bridge, geocons, albef_fusion, codis"""
    steps: int = 20
    """timed steps per method"""
    warmup: int = 5
    """untimed warm-up steps per method, after the FLOP-counting step (and after compilation)"""
    precision: str = ""
    """fp32 | bf16 | fp16 ('' = the config's: cpu fp32, gpu bf16)"""
    compile: bool = False
    """torch.compile as each script does (skipped with a note where unsupported)"""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor, the scripts' default; eager/aot_eager only trace: quick checks)"""
    data_root: str = ""
    """a Karpathy-format folder: time image files on disk (--data karpathy) instead of synthetic images"""
    interleave: bool = False
    """build every row first, then alternate their timed steps: ratios that hold while other jobs load the machine"""
    fixed_batch: bool = False
    """draw one batch, keep it on the device and reuse it every step: the model's speed without the input pipeline"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1"""
    peak_flops: float = 0.0
    """dense peak FLOP/s of the GPU in the precision used, for the MFU column (0 = PEAK_TFLOPS, by name)"""
    two_tower_flags: str = ""
    """extra flags for the two-tower scripts and the reference only, e.g. --two-tower-flags="--vision resnet18" """
    fusion_flags: str = ""
    """extra flags for albef_fusion / codis only, e.g. --fusion-flags="--queue-size 1024" """
    cache: str = "runs/bench-cache"
    """folder for the random-weight BERT-base that the gpu config builds once (about 440 MB)"""
    save: str = ""
    """also write the rows, the limits checked and the hardware to this JSON file"""


BERT_BASE = "<bert-base>"  # in a config: a BERT-base (BertConfig() defaults) with random weights, saved in --cache

# per config: the default rows, the precision, and the Args fields each family changes from its script's defaults
CONFIGS = {
    "cpu": dict(methods="clip_base,sep,bridge,geocons,albef_fusion,codis", precision="fp32", two_tower={}, fusion={}),
    "gpu": dict(methods="reference,clip_plain,clip_base,sep,bridge,geocons,albef_fusion,codis", precision="bf16",
                # docs/gpu.md's GPU command of clip_base.py & co., less --data/--data-root/--epochs (synthetic data, a
                # fixed number of steps), --eval-every (no evaluation here), --pretrained-vision and --tokenizer
                # bert-base-uncased (no network)
                two_tower=dict(vision="resnet50", text_model=BERT_BASE, image_size=224, embed_dim=256, batch_size=256,
                               lr=1e-4),
                # docs/gpu.md's (and albef_fusion.py's, codis.py's) GPU command of ALBEF / CODIS, less the same flags
                fusion=dict(vision="vit_b_16", text_model=BERT_BASE, text_layers=6, image_size=256, embed_dim=256,
                            queue_size=65536, momentum=0.995, alpha_ramp=-1, lr=1e-4, weight_decay=0.02,
                            batch_size=64, pool="cls", itm_k=128)),
}

# Dense peak tensor-core TFLOP/s (no 2:4 sparsity) per GPU: (pattern searched in torch.cuda.get_device_name(),
# label, {bf16 (= fp16 with fp32 accumulation on all of these), tf32, fp32 (CUDA cores)}). NVIDIA's datasheets
# print the tensor-core figures "with sparsity": they are halved here. First match wins (NVL/PCIe before SXM).
PEAK_TFLOPS = [
    # NVIDIA H100 Tensor Core GPU datasheet: H100 NVL 1,671 / 835 (sparse) / 60; H100 PCIe 1,513 / 756 / 51;
    # H100 SXM 1,979 / 989 / 67 (device name "NVIDIA H100 80GB HBM3")
    (r"H100.*NVL", "H100 NVL", dict(bf16=835.5, tf32=417.5, fp32=60)),
    (r"H100.*PCIe", "H100 PCIe", dict(bf16=756.5, tf32=378, fp32=51)),
    (r"H100.*(SXM|HBM3)", "H100 SXM", dict(bf16=989.5, tf32=494.5, fp32=67)),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 NVL 1,671 / 835 / 60; H200 SXM 1,979 / 989 / 67
    (r"H200.*NVL", "H200 NVL", dict(bf16=835.5, tf32=417.5, fp32=60)),
    (r"\bH200\b", "H200 SXM", dict(bf16=989.5, tf32=494.5, fp32=67)),
    # NVIDIA A100 Tensor Core GPU datasheet (40 and 80 GB, SXM and PCIe): 624 / 312 / 19.5
    (r"A100", "A100", dict(bf16=312, tf32=156, fp32=19.5)),
    # NVIDIA L40S datasheet: 733 / 366 / 91.6 (dense bf16 printed as 362.05)
    (r"L40S", "L40S", dict(bf16=362.05, tf32=183, fp32=91.6)),
    # NVIDIA L4 Tensor Core GPU datasheet: 242 / 120 / 30.3
    (r"\bL4\b", "L4", dict(bf16=121, tf32=60, fp32=30.3)),
    # NVIDIA A10 Tensor Core GPU datasheet: 250 / 125 / 31.2 (not the A10G, whose figures differ)
    (r"\bA10\b", "A10", dict(bf16=125, tf32=62.5, fp32=31.2)),
    # NVIDIA Ada Lovelace GPU architecture whitepaper (2022), appendix A, GeForce RTX 4090: FP16 / BF16 tensor
    # with FP32 accumulate 330.3 (sparse), TF32 165.2 (sparse), FP32 82.6
    (r"RTX 4090", "RTX 4090", dict(bf16=165.2, tf32=82.6, fp32=82.6)),
    # NVIDIA Ampere GA102 GPU architecture whitepaper (2020), GeForce RTX 3090: 142 / 71 (sparse) / 35.6
    (r"RTX 3090(?! Ti)", "RTX 3090", dict(bf16=71, tf32=35.6, fp32=35.6)),
]


def peak_flops_of(gpu_name, precision, tf32=True):
    """(dense peak FLOP/s of this GPU in this precision, e.g. 'H100 SXM bf16') from PEAK_TFLOPS; (None, None) for
    a GPU it does not list. fp32 counts the TF32 tensor-core peak when TF32 is allowed (the scripts allow it)."""
    kind = "bf16" if precision in ("bf16", "fp16") else "tf32" if tf32 else "fp32"
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, gpu_name):
            return peaks[kind] * 1e12, f"{label} {kind}"
    return None, None


@dataclass
class Row:
    """One line of the table: which script builds it, with which extra Args fields, compared with which row."""
    script: str          # module name; "clip_base" for the reference (its flags size the reference's encoders)
    label: str           # as printed
    flags: dict          # Args fields on top of the config's
    baseline: str = ""   # the row whose step time this one is divided by ('' = none)


ROWS = {"reference": Row("clip_base", "reference (torchvision + transformers, no project code)", {}),
        "clip_plain": Row("clip_base", "clip_base --plain-clip", {"plain_clip": True}, "reference"),
        "clip_base": Row("clip_base", "clip_base", {}),
        "sep": Row("sep", "sep", {}, "clip_base"),
        "bridge": Row("bridge", "bridge", {}, "clip_base"),
        "geocons": Row("geocons", "geocons", {}, "clip_base"),
        "albef_fusion": Row("albef_fusion", "albef_fusion", {}),
        "codis": Row("codis", "codis", {}, "albef_fusion")}


def limit_of(name, config):
    """The most a row's step time may be as a multiple of its baseline's, with what it checks (None: no limit)."""
    if ROWS[name].baseline == "clip_base":
        return (1.05 if config == "gpu" else 1.10), "regularizer overhead"
    if name == "codis":
        return 1.15, "CODIS overhead over ALBEF"
    if name == "clip_plain":
        return 1.0, "throughput at least the reference's"
    return None


# ============================== the reference step (no project code) ==========================
class ReferenceCLIP(nn.Module):
    """Plain CLIP written with torchvision and transformers modules only: the encoders (same names and sizes as
    the two-tower rows), mean-pooled text, linear projections, the symmetric InfoNCE loss. Its forward returns
    the loss; bench.py trains it with fused AdamW under the same autocast as the method rows."""

    def __init__(self, vision, bert_config, embed_dim):
        super().__init__()
        import torchvision
        from transformers import BertModel
        self.visual = getattr(torchvision.models, vision)(weights=None)
        width, self.visual.fc = self.visual.fc.in_features, nn.Identity()
        self.text = BertModel(bert_config, add_pooling_layer=False)
        self.image_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(bert_config.hidden_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, input_ids, attention_mask):
        z_v = F.normalize(self.image_proj(self.visual(images.contiguous(memory_format=torch.channels_last))), dim=-1)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, L, D)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        z_t = F.normalize(self.text_proj((h * m).sum(1) / m.sum(1)), dim=-1)
        logits = self.logit_scale.exp() * z_v.float() @ z_t.float().t()                      # (N, N)
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def reference_bert_config(a, tokenizer):
    """The BertConfig of the two-tower rows' text encoder (clip_base.TextEncoder), written out with transformers."""
    from transformers import BertConfig
    if a.text_model:
        return BertConfig.from_pretrained(a.text_model)
    return BertConfig(vocab_size=len(tokenizer), hidden_size=a.text_width, num_hidden_layers=a.text_layers,
                      num_attention_heads=4, intermediate_size=4 * a.text_width,
                      max_position_embeddings=max(64, a.max_len))


# ============================== what one row trains ===========================================
class Trainer:
    """A row's model, optimizer, scheduler and batches; subclasses say how the losses are computed, what
    follows the optimizer step, and how --compile applies (each the way its script's main() does it)."""

    def __init__(self, model, optimizer, scheduler, loader, a, device):
        self.model, self.fwd_model, self.optimizer, self.scheduler = model, model, optimizer, scheduler
        self.loader, self.a, self.device = loader, a, device
        self.channels_last = False  # data.to_device makes the images channels_last (set by build_trainer)
        self.amp_dtype = ev.PRECISIONS[a.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=a.precision == "fp16")

    def losses(self, batch, step):  # -> dict of loss terms, 'loss' is optimized
        raise NotImplementedError

    def after_step(self):
        pass

    def compile(self, backend):  # clip_base.py & co.: the whole model
        self.fwd_model = torch.compile(self.model, backend=backend)


class TwoTower(Trainer):
    def __init__(self, mod, *rest):
        super().__init__(*rest)
        self.mod = mod

    def losses(self, batch, step):
        return self.mod.compute_losses(self.fwd_model, batch, self.a)

    def after_step(self):
        with torch.no_grad():  # 1/τ ≤ 100
            self.model.logit_scale.clamp_(0, math.log(100))


class Fusion(Trainer):
    def __init__(self, mod, steps_per_epoch, *rest):
        super().__init__(*rest)
        self.mod, self.steps_per_epoch = mod, steps_per_epoch

    def losses(self, batch, step):
        alpha = self.mod.alpha_at(step, self.a, self.steps_per_epoch)  # α ramped up, as in the script's loop
        return self.mod.compute_losses(self.model, batch, self.a, alpha)

    def after_step(self):
        with torch.no_grad():  # τ ∈ [0.001, 0.5]
            self.model.temp.clamp_(0.001, 0.5)
        self.mod.momentum_update(self.model.momentum_pairs(), self.a.momentum)

    def compile(self, backend):  # albef_fusion.py: every transformer layer, in place
        layers = tuple(getattr(self.mod, name) for name in ("ViTBlock", "BertLayer") if hasattr(self.mod, name))
        for m in self.model.modules():
            if isinstance(m, layers):
                m.compile(backend=backend)


class Reference(Trainer):
    def losses(self, batch, step):
        return {"loss": self.fwd_model(batch["image"], batch["input_ids"], batch["attention_mask"])}


_DATA = {}  # data-flag values -> (training PairSet, tokenizer): rows with the same data flags share them


def train_data(a):
    key = tuple(getattr(a, f.name) for f in dataclasses.fields(data.DataArgs))
    if key not in _DATA:
        train_set, _ = data.build_data(a)
        _DATA[key] = train_set, data.build_tokenizer(a, train_set)
    return _DATA[key]


def build_trainer(name, mod, a, device):
    """The row's Trainer, set up as the script's main() sets it up (seeds, backend flags, channels_last)."""
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    torch.backends.cudnn.deterministic = a.torch_deterministic
    torch.backends.cudnn.benchmark = not a.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_set, tokenizer = train_data(a)
    fusion = hasattr(mod, "momentum_update")
    if fusion:
        mod.check_queue(a.queue_size, a.batch_size)
    channels_last = not fusion and (a.vision != "cnn" or device.type == "cuda")  # as clip_base.main()
    if name == "reference":
        model = ReferenceCLIP(a.vision, reference_bert_config(a, tokenizer), a.embed_dim).to(device)
    else:
        model = mod.build_model(a, tokenizer).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if name == "reference":
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, fused=device.type == "cuda")
        loader = data.train_loader(train_set, tokenizer, a, a.batch_size, a.seed, second_view=False)
        t = Reference(model, optimizer, None, loader, a, device)
    else:
        optimizer, scheduler = mod.make_optimizer(model, a, device)
        loader = data.train_loader(train_set, tokenizer, a, a.batch_size, a.seed,
                                   second_view=not fusion and not a.plain_clip)
        t = (Fusion(mod, max(1, len(train_set) // a.batch_size), model, optimizer, scheduler, loader, a, device)
             if fusion else TwoTower(mod, model, optimizer, scheduler, loader, a, device))
    t.channels_last = channels_last
    return t


# ============================== timing ========================================================
class PhaseTimer:
    """Marks at the start of each timed step (start) and at the end of each of its phases (mark); the seconds
    between them are read once, at the end of the timed window (phases). Subclasses say what a mark is."""

    def __init__(self):
        self.steps = []  # per step: its marks

    def start(self):
        self.steps.append([self._now()])

    def mark(self):
        self.steps[-1].append(self._now())

    def phases(self):
        """[[seconds of each phase] per step], after waiting once for the marks still in flight."""
        if self.steps:
            self._wait(self.steps[-1][-1])
        return [[self._seconds(a, b) for a, b in zip(marks, marks[1:])] for marks in self.steps]


class HostTimer(PhaseTimer):
    """time.perf_counter: on the CPU an op has finished when it returns. sync: a device's synchronize to call
    before each reading (MPS)."""

    def __init__(self, sync=None, clock=time.perf_counter):
        super().__init__()
        self.sync, self.clock = sync, clock

    def _now(self):
        if self.sync:
            self.sync()
        return self.clock()

    def _seconds(self, a, b):
        return b - a

    def _wait(self, last):
        pass


class CudaTimer(PhaseTimer):
    """CUDA events recorded on the stream the step runs on: the host never waits while the steps run, and each
    phase is the GPU time between two events (elapsed_time, in ms)."""

    def __init__(self, stream=None, event=functools.partial(torch.cuda.Event, enable_timing=True)):
        super().__init__()
        self.stream, self.event = stream, event

    def _now(self):
        e = self.event()
        e.record(self.stream)
        return e

    def _seconds(self, a, b):
        return a.elapsed_time(b) / 1e3

    def _wait(self, last):
        last.synchronize()  # every earlier event on the stream has completed too


class NoTimer:
    """The untimed steps (FLOP counting, warm-up)."""

    def start(self):
        pass

    def mark(self):
        pass


def make_timer(device):
    if device.type == "cuda":
        return CudaTimer(torch.cuda.current_stream(device))
    return HostTimer(sync=torch.mps.synchronize if device.type == "mps" else None)


def one_step(t, fetch, step, timer):
    """One training step as the scripts' loops run it, marked at its start and after each phase (data, forward,
    backward, optimizer). fetch() gives the batch on the device. Returns the loss (still on the device)."""
    timer.start()
    batch = fetch()
    timer.mark()
    with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
        terms = t.losses(batch, step)
    timer.mark()
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(terms["loss"]).backward()
    timer.mark()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.scheduler is not None:
        t.scheduler.step()
    t.after_step()
    timer.mark()
    return terms["loss"].detach()


def summarize(times, batch_size):
    """A row's columns from its timed steps' phases ([[data, forward, backward, optimizer] s per step]): the
    median of each phase and of the step (the sum of its phases), samples/s from each step's time."""
    med = statistics.median
    step_s = [sum(p) for p in times]
    data_s, fwd_s, bwd_s, opt_s = (med(col) for col in zip(*times))
    total_s = med(step_s)
    return {"samples_per_s": med([batch_size / s for s in step_s]), "step_ms": 1e3 * total_s,
            "data_ms": 1e3 * data_s, "forward_ms": 1e3 * fwd_s, "backward_ms": 1e3 * bwd_s,
            "optimizer_ms": 1e3 * opt_s, "data_pct": 100 * data_s / total_s}


class Timing:
    """A row's steps: its batch stream, the FLOP-counting step, --compile and the warm-up (start), then the
    timed steps one at a time (timed_step: a run either times each row in turn or interleaves them)."""

    def __init__(self, t, b, device):
        from torch.utils.flop_counter import FlopCounterMode
        self.t, self.step, self.skipped, self.timer = t, 0, 0, make_timer(device)
        batches = iter(t.loader)
        if b.fixed_batch:  # one batch, on the device once: every later step skips the input pipeline
            fixed = self._to_device(next(batches))
            self.fetch = lambda: fixed
        else:
            self.fetch = lambda: self._to_device(next(batches))
        t.model.train()
        counter = FlopCounterMode(display=False)
        with counter:  # step 0, eager: the model FLOPs of one forward + backward (the optimizer's are not counted)
            self._step(NoTimer())
        self.flops = counter.get_total_flops()
        if b.compile:
            t.compile(b.compile_backend)
        for _ in range(b.warmup):
            self._step(NoTimer())

    def _to_device(self, batch):  # as the scripts' loops: uint8 → normalized float on the device
        batch, skipped = data.to_device(batch, self.t.device, self.t.channels_last)
        self.skipped += skipped
        return batch

    def _step(self, timer):
        self.loss = one_step(self.t, self.fetch, self.step, timer)
        self.step += 1

    def timed_step(self):
        self._step(self.timer)

    def result(self, peak_mib):
        """The row's medians over the timed steps (its batch stream is closed: the DataLoader workers stop)."""
        self.fetch = None
        return {**summarize(self.timer.phases(), self.t.a.batch_size), "peak_mib": peak_mib,
                "gflop_per_step": self.flops / 1e9, "mfu_pct": None, "loss": self.loss.float().item(),
                "workers": getattr(self.t.loader, "num_workers", None), "skipped_images": self.skipped}


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: restart the process's peak-RSS counter (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


def peak_memory_mib(device):
    """CUDA: max_memory_allocated. CPU: the process's peak RSS since reset_peak_memory (VmHWM; ru_maxrss,
    which the scripts report, is the same counter on Linux but cannot be reset once a thread has exited)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compile_unsupported(device, backend):
    """Why torch.compile cannot run here (None if it can), checked up front so that --compile is skipped
    with a note instead of failing in the middle of a run."""
    import torch._dynamo
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {platform.python_version()} on {platform.system()}"
    if backend == "inductor":
        if device.type == "cuda":
            from torch.utils._triton import has_triton
            if not has_triton():
                return "inductor on CUDA needs triton (pip install triton)"
        elif device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
            return "inductor on the CPU needs a C++ compiler (g++ or clang++)"
    return None


# ============================== configuration ===============================================
def random_bert_base(cache):
    """A folder holding BERT-base (transformers' BertConfig() defaults) with random weights, written once:
    clip_base.py (AutoModel) and albef_fusion.py (BertForMaskedLM) load it like a downloaded checkpoint."""
    path = os.path.join(cache, "bert-base-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        from transformers import BertConfig, BertForMaskedLM
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig()).save_pretrained(path)
    return path


def parse(argv):
    """(BenchArgs, the row names, {row name: its script's Args}, notes). Flags bench.py does not know go to
    every script that has them; a flag that no method script knows is an error. Each row's Args are its
    script's defaults but for the config's fields, the row's, the user's flags and bench.py's own (precision,
    device, compile, steps): flags_of lists them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     epilog="Any other flag is passed to every method script that has it.")
    data.add_dataclass_args(parser, BenchArgs)
    ns, rest = parser.parse_known_args(argv)
    b = BenchArgs(**vars(ns))
    if b.config not in CONFIGS:
        parser.error(f"--config {b.config!r}: choose {' or '.join(CONFIGS)}")
    cfg = CONFIGS[b.config]
    b.precision = b.precision or cfg["precision"]
    if b.precision not in ev.PRECISIONS:
        parser.error(f"--precision {b.precision!r}: choose one of {', '.join(ev.PRECISIONS)}")
    if b.steps < 1 or b.warmup < 0:
        parser.error("--steps must be ≥ 1 and --warmup ≥ 0")
    names = [n.strip() for n in (b.methods or cfg["methods"]).split(",") if n.strip()]
    if unknown := [n for n in names if n not in ROWS]:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    available = [n for n in ROWS if importlib.util.find_spec(ROWS[n].script) is not None]
    notes = [f"{n}: {ROWS[n].script}.py not found, row skipped" for n in names if n not in available]
    names = [n for n in names if n in available]  # codis.py may not exist yet

    # every row's Args: its script's defaults < the config's family fields < the row's < the user's < bench's own.
    # A flag is an error only if no method script knows it (then it is a typo), whether its row runs or not.
    args, unknown_everywhere = {}, None
    for family in ("two_tower", "fusion"):
        scoped = shlex.split(getattr(b, f"{family}_flags"))
        unknown_in_family = None
        for n in available:
            mod = importlib.import_module(ROWS[n].script)
            if hasattr(mod, "momentum_update") != (family == "fusion"):
                continue
            p = data.add_dataclass_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False), mod.Args,
                                        defaults=False)
            given, unk = p.parse_known_args(rest)
            given_scoped, unk_scoped = p.parse_known_args(scoped)
            unknown_everywhere = _common(unknown_everywhere, unk)
            unknown_in_family = _common(unknown_in_family, unk_scoped)
            if n not in names:
                continue
            fields = {**cfg[family], **ROWS[n].flags, **vars(given), **vars(given_scoped)}
            if b.data_root:
                fields.update(data_root=b.data_root, data=fields.get("data", "karpathy"))
            if fields.get("text_model") == BERT_BASE:
                fields["text_model"] = random_bert_base(b.cache)
            fields.update(precision=b.precision, device=b.device, compile=False,
                          steps=1 + b.warmup + b.steps)  # the scheduler spans the benchmark
            args[n] = mod.Args(**fields)
        if unknown_in_family:
            parser.error(f"--{family.replace('_', '-')}-flags: no {family.replace('_', '-')} script has "
                         f"{', '.join(sorted(unknown_in_family))}")
    if unknown_everywhere:
        parser.error(f"no method script has {', '.join(sorted(unknown_everywhere))}")
    if "reference" in names and args["reference"].vision == "cnn":
        parser.error("the reference row needs a torchvision image encoder: --two-tower-flags=\"--vision resnet50\" "
                     "(the gpu config sets it)")
    return b, names, args, notes


def flags_of(a, defaults):
    """The flags that turn a script's default Args (defaults) into a, as its command line spells them."""
    out = []
    for f in dataclasses.fields(a):
        value, flag = getattr(a, f.name), "--" + f.name.replace("_", "-")
        if value != getattr(defaults, f.name):
            out.append(flag if value is True else f"--no-{flag[2:]}" if value is False
                       else f"{flag} {shlex.quote(str(value))}")
    return " ".join(out)


def _common(acc, unknown_tokens):
    """Intersection of the flags (tokens starting with --) that each script left unparsed."""
    flags = {tok.split("=")[0] for tok in unknown_tokens if tok.startswith("--")}
    return flags if acc is None else acc & flags


# ============================== report =======================================================
def describe(a):
    """'vision + text @ px' of a row's Args, e.g. 'resnet50 + bert-base-random @ 224 px'."""
    fusion = hasattr(a, "queue_size")
    if a.vision == "cnn":
        vision = f"CNN w{a.cnn_width}"
    elif a.vision == "vit":
        vision = f"ViT {a.vit_depth}×{a.vit_width}/p{a.vit_patch}"
    else:
        vision = a.vision
    text = (os.path.basename(a.text_model.rstrip("/")) + (f" ({a.text_layers} text layers)" if fusion else "")
            if a.text_model else f"BERT {a.text_layers}×{a.text_width}" + (f" + {a.fusion_layers} fusion" if fusion else ""))
    return f"{vision} + {text} @ {a.image_size} px"


def hardware(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, IndexError):
        with open("/proc/cpuinfo") as f:
            cpu = f.read().split("model name")[1].split(":", 1)[1].split("\n")[0].strip()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return f"{gpu}; CPU {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, Python {platform.python_version()}"


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(rows):
    head = ("| method | model | batch | samples/s | step ms | data ms | fwd ms | bwd ms | opt ms | data % | peak MiB "
            "| GFLOP/step | MFU % | step ÷ baseline |")
    lines = [head, "| " + " | ".join(["---"] * 2 + ["---:"] * 12) + " |"]
    for r in rows:
        ratio = f"{r['vs_baseline']:.3f}× {r['baseline']}" if r["vs_baseline"] is not None else "—"
        lines.append(f"| {r['label']} | {r['model']} | {r['batch']} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} "
                     f"| {r['data_ms']:.1f} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} "
                     f"| {r['data_pct']:.1f} | {fmt(r['peak_mib'], '.0f')} | {r['gflop_per_step']:.1f} "
                     f"| {fmt(r['mfu_pct'], '.1f')} | {ratio} |")
    return "\n".join(lines)


def limits(rows, b):
    """Each limit that this run measures: what it checks, the measured value, the limit, met or not."""
    out = []
    for r in rows:
        lim = limit_of(r["method"], b.config)
        if lim and r["vs_baseline"] is not None:
            limit, what = lim
            out.append({"check": f"{r['method']}: {what} (step time ÷ {r['baseline']})", "value": r["vs_baseline"],
                        "limit": f"≤ {limit:.2f}", "met": r["vs_baseline"] <= limit})
    if b.config == "gpu" and rows and not b.fixed_batch and not b.interleave:  # else the data time says little
        worst = max(rows, key=lambda r: r["data_pct"])
        out.append({"check": f"data time < 5% of the step (worst row: {worst['method']})", "value": worst["data_pct"],
                    "limit": "< 5 %", "met": worst["data_pct"] < 5})
    return out


def time_ipot(device, repeats=30):
    """Median ms of codis.ipot on a 256 × 1024 problem (batch × codebook) with 50 outer steps, on this process's
    torch threads, after 3 untimed calls (≤ 30 ms on a 2-core CPU)."""
    codis = importlib.import_module("codis")
    g = torch.Generator().manual_seed(0)
    z, c = (F.normalize(torch.randn(n, 128, generator=g), dim=1) for n in (256, 1024))
    cost = (1 - z @ c.T).to(device)                                       # D = 1 − ⟨z, c⟩ in [0, 2]
    mu, nu = torch.full((256,), 1 / 256, device=device), torch.full((1024,), 1 / 1024, device=device)
    for _ in range(3):
        codis.ipot(cost, mu, nu, n_outer=50, n_inner=1)
    timer = make_timer(device)
    for _ in range(repeats):
        timer.start()
        codis.ipot(cost, mu, nu, n_outer=50, n_inner=1)
        timer.mark()
    return 1000 * statistics.median(p for (p,) in timer.phases())


# ============================== main =========================================================
def start(name, a, b, device):
    """Build one row's trainer as its script does, then its FLOP-counting step, --compile and warm-up."""
    return Timing(build_trainer(name, importlib.import_module(ROWS[name].script), a, device), b, device)


def row_of(name, timing, peak_mib):
    """One line of the table (its ratio to the baseline and its MFU are added once every row has run)."""
    a = timing.t.a
    row = {"method": name, "label": ROWS[name].label, "model": describe(a), "batch": a.batch_size,
           "baseline": ROWS[name].baseline or None,
           "flags": flags_of(a, importlib.import_module(ROWS[name].script).Args()), **timing.result(peak_mib)}
    print(f"[bench] {name}: {row['samples_per_s']:.1f} samples/s, {row['step_ms']:.1f} ms/step", file=sys.stderr,
          flush=True)
    return row


def free(device):
    gc.collect()  # the model, its optimizer state and its DataLoader workers, before the next row
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_in_turn(order, args, b, device):
    """The default: one row after the other, each alone in memory (an honest peak memory and data time)."""
    rows = []
    for name in order:
        reset_peak_memory(device)
        timing = start(name, args[name], b, device)
        for _ in range(b.steps):
            timing.timed_step()
        rows.append(row_of(name, timing, peak_memory_mib(device)))
        del timing
        free(device)
    return rows


def time_interleaved(order, args, b, device):
    """--interleave: every row built and warmed up, then their timed steps alternate (A B C A B C ...), so a
    change of the machine's load hits every row alike: the ratios hold on a shared machine."""
    timings = {name: start(name, args[name], b, device) for name in order}
    for _ in range(b.steps):
        for timing in timings.values():
            timing.timed_step()
    return [row_of(name, timing, None) for name, timing in timings.items()]


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints a load report and a progress bar each time a script loads the BERT-base folder: errors
    only, meanwhile."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def mfu_peak(b, device):
    """(the MFU denominator in FLOP/s, a note saying which): --peak-flops if given, else PEAK_TFLOPS for this GPU
    and precision (TF32 for fp32 where the rows allowed it); (None, why) on an unknown GPU, (None, None) off a GPU."""
    if device.type != "cuda":
        return None, None
    if b.peak_flops > 0:
        return b.peak_flops, f"MFU against --peak-flops {b.peak_flops:.4g} FLOP/s"
    name = torch.cuda.get_device_name(device)
    peak, label = peak_flops_of(name, b.precision, tf32=torch.backends.cuda.matmul.allow_tf32)
    if peak is None:
        return None, (f"MFU not reported: bench.PEAK_TFLOPS has no peak for {name!r}; pass --peak-flops (its dense "
                      f"FLOP/s in {b.precision}) to get it")
    return peak, f"MFU against the {label} dense peak, {peak / 1e12:g} TFLOP/s (bench.PEAK_TFLOPS)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    b, names, args, notes = parse(argv)
    device = ev.pick_device(b.device)
    if b.config == "gpu" and device.type != "cuda":
        notes.append(f"the gpu config ran on {device}: its timings say nothing about a GPU")
    if b.compile and (reason := compile_unsupported(device, b.compile_backend)):
        notes.append(f"--compile skipped ({reason}): every row ran eagerly")
        b.compile = False
    order = sorted(names, key=list(ROWS).index)  # baselines first
    with quiet_transformers():
        rows = time_interleaved(order, args, b, device) if b.interleave else time_in_turn(order, args, b, device)
    if b.interleave:
        notes.append("--interleave: the rows' timed steps alternated (peak memory per row is not measured; data time "
                     "is optimistic with workers, which prefetch while the other rows compute)")
    step_ms = {r["method"]: r["step_ms"] for r in rows}
    peak, peak_note = mfu_peak(b, device)
    for r in rows:  # the overhead ratio: this row's median step time ÷ its baseline's, both measured above
        r["baseline"] = r["baseline"] if r["baseline"] in step_ms else None
        r["vs_baseline"] = r["step_ms"] / step_ms[r["baseline"]] if r["baseline"] else None
        r["mfu_pct"] = 100 * r["gflop_per_step"] * 1e9 / (r["step_ms"] / 1e3) / peak if peak else None
    notes += [peak_note] if peak_note else []
    if not b.fixed_batch:  # with no worker the data column is the whole loading cost of a batch
        notes += [workers_advice(r) for r in rows if r["workers"] == 0]
    notes += [f"{r['method']}: {r['skipped_images']} images could not be decoded and were substituted"
              for r in rows if r["skipped_images"]]
    result = {"command": "python bench.py " + shlex.join(argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "hardware": hardware(device), "device": str(device), "config": b.config, "precision": b.precision,
              "compile": b.compile, "fixed_batch": b.fixed_batch, "interleave": b.interleave, "steps": b.steps,
              "warmup": b.warmup, "peak_flops": peak, "rows": rows, "limits": limits(rows, b), "notes": notes}
    if "codis" in order:  # IPOT alone, at the size of the ≤ 30 ms limit
        ms = time_ipot(device)
        result["ipot_ms"] = ms
        result["limits"].append({"check": "codis: IPOT 256 × 1024, 50 outer steps (median ms)", "value": ms,
                                 "limit": "≤ 30" if device.type == "cpu" else "–", "met": ms <= 30})
    print(report(result))
    if b.save:
        with open(b.save, "w") as f:
            json.dump(result, f, indent=2)
    return result


def workers_advice(r):
    """With --num-workers 0 a batch is loaded in the main process: its data time is the CPU cost of a batch, and
    K workers keep up when K × (the compute time of a step) exceeds it (one more for slack)."""
    compute = r["step_ms"] - r["data_ms"]
    return (f"{r['method']}: loading one batch takes {r['data_ms']:.0f} ms of one core against {compute:.0f} ms of "
            f"compute per step: --num-workers {math.ceil(r['data_ms'] / compute) + 1} or more keeps the loader ahead")


def report(res):
    """The Markdown printed at the end: a header line, the table, the limits checked, the flags, the notes."""
    mem = ("not measured (interleaved)" if res["interleave"] else "CUDA max allocated"
           if res["device"].startswith("cuda") else "process peak RSS, reset before each row")
    clock = "CUDA events" if res["device"].startswith("cuda") else "perf_counter"
    workers = "/".join(str(w) for w in sorted({r["workers"] for r in res["rows"]}, key=str))
    lines = [f"`{res['command']}` — {res['date']}, {res['hardware']}; device {res['device']}, {res['precision']}, "
             f"compile {'on' if res['compile'] else 'off'}, DataLoader workers {workers or '—'}"
             f"{', fixed batch' if res['fixed_batch'] else ''}{', interleaved' if res['interleave'] else ''}; "
             f"medians of {res['steps']} timed steps ({clock}) after {res['warmup']} warm-up; peak MiB = {mem}",
             "", markdown(res["rows"])]
    if res["limits"]:
        lines += ["", "| check | measured | limit | met |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {c['check']} | {c['value']:.3f} | {c['limit']} | {'yes' if c['met'] else 'NO'} |"
                  for c in res["limits"]]
    groups = {}
    for r in res["rows"]:  # rows with the same flags on one line
        groups.setdefault(r["flags"], []).append(r["method"])
    lines += ["", "Flags besides each script's defaults:"]
    lines += [f"- {', '.join(names)}: `{flags or '(none)'}`" for flags, names in groups.items()]
    if res["notes"]:
        lines += ["", *[f"- {n}" for n in res["notes"]]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
