"""bench.py: training throughput of every method on a fixed configuration, in one Markdown table.

Each method's training step is rebuilt here the way its script's main() builds it (data.build_data,
data.build_tokenizer, data.train_loader, build_model, make_optimizer, autocast from eval.PRECISIONS, the
step, then the temperature clamp and, for the fusion models, momentum_update), by importing the script as a
module: bench.py is a tool, not a method script, so it may import them. Per method (one table row): one
untimed step that counts the FLOPs (torch.utils.flop_counter), W warm-up steps, then N timed steps, each
split in four phases (torch.cuda.synchronize() before every clock read on a GPU, perf_counter on the CPU):

    data       waiting for the next batch + the host→device copy
    forward    compute_losses under autocast
    backward   zero_grad + backward
    optimizer  optimizer step + scheduler + the temperature clamp (+ the momentum update of ALBEF/CODIS)

The table reports the medians over the timed steps (samples/s, step time, each phase), the data share of the
step, peak memory, the model FLOPs of one step (forward + backward), the model FLOPs utilization on a GPU, and
each row's step time divided by its baseline's, measured in the same run at the same model and batch:
sep / bridge / geocons ÷ clip_base, codis ÷ albef_fusion, clip_base --plain-clip ÷ the reference step.

Configurations (--config):
    cpu  every script's defaults: small CNN / ViT + 2-layer BERT trained from scratch, 32 px synthetic data,
         batch 128, fp32. Runs on a laptop.
    gpu  two-tower: ResNet-50 + BERT-base at 224 px, batch 256; fusion: ViT-B/16 + BERT-base (6 text + 6 fusion
         layers) at 224 px, batch 64, queue 65,536; bf16; synthetic images drawn at 224 px (no dataset needed).
         Every model is built from its config with random weights (BERT-base = transformers' BertConfig()
         defaults, saved once under --cache), so no network is needed. Adds `reference`: plain CLIP written
         with the same torchvision / transformers modules and no project code (ReferenceCLIP below), the
         yardstick of clip_base.py --plain-clip.
Targets (the benchmark issue): each regularizer ≤ 1.05× clip_base's step time on the GPU config (≤ 1.10× on
the CPU one); codis ≤ 1.15× albef_fusion; data < 5% of the step on the GPU config; clip_base --plain-clip at
least the reference's throughput in bf16 on the GPU. With the codis row, IPOT alone is timed too (256 × 1024,
50 outer steps, median of 30 calls; the CODIS issue: ≤ 30 ms on the 2-core CPU). Results, commands and hardware:
docs/benchmarks.md.

Run it:  python bench.py                                   (cpu config: 5 warm-up + 20 timed steps per method)
         python bench.py --interleave                      (a shared machine: the rows' steps alternate, so
                                                            a change of load hits every row alike)
         python bench.py --config gpu --save bench-gpu.json
         python bench.py --config gpu --fixed-batch        (one batch reused on the GPU: no input pipeline)
         python bench.py --config gpu --methods clip_base --data-root /data/coco --num-workers 12
Any other flag is passed to every method script that has it (the scripts' own flags: --batch-size 64,
--image-size 64, --text-layers 4, ...); --two-tower-flags="..." / --fusion-flags="..." reach one family only.
"""
# ============================== imports =======================================================
import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import random
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
    """cpu (each script's defaults, synthetic 32 px) or gpu (ResNet-50/ViT-B/16 + BERT-base, 224 px, bf16)"""
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
    num_workers: int = -1
    """DataLoader workers (-1 = the config's: cpu 1, the scripts' default; gpu 14)"""
    data_root: str = ""
    """a Karpathy-format folder: time image files on disk (--data karpathy) instead of synthetic images"""
    interleave: bool = False
    """build every row first, then alternate their timed steps: ratios that hold while other jobs load the machine"""
    fixed_batch: bool = False
    """draw one batch, keep it on the device and reuse it every step: the model's speed without the input pipeline"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1"""
    peak_flops: float = 989e12
    """peak dense bf16 FLOP/s of the GPU for the MFU column (989e12: H100 SXM; H100 PCIe 756e12, A100 312e12)"""
    two_tower_flags: str = ""
    """extra flags for the two-tower scripts and the reference only, e.g. --two-tower-flags="--vision resnet18" """
    fusion_flags: str = ""
    """extra flags for albef_fusion / codis only, e.g. --fusion-flags="--queue-size 1024" """
    cache: str = "runs/bench-cache"
    """folder for the random-weight BERT-base that the gpu config builds once (about 440 MB)"""
    save: str = ""
    """also write the rows, targets and hardware to this JSON file"""


BERT_BASE = "<bert-base>"  # in a config: a BERT-base (BertConfig() defaults) with random weights, saved in --cache

# per config: the default rows, precision, workers, and the Args fields each family changes from its defaults
CONFIGS = {
    "cpu": dict(methods="clip_base,sep,bridge,geocons,albef_fusion,codis", precision="fp32", num_workers=1,
                two_tower={}, fusion={}),
    "gpu": dict(methods="reference,clip_plain,clip_base,sep,bridge,geocons,albef_fusion,codis", precision="bf16",
                num_workers=14,
                # cudnn.deterministic off: the reference does not ask for it, and it can only slow the convolutions
                two_tower=dict(vision="resnet50", text_model=BERT_BASE, image_size=224, embed_dim=256, batch_size=256,
                               lr=1e-4, torch_deterministic=False),
                fusion=dict(vision="vit_b_16", text_model=BERT_BASE, text_layers=6, image_size=224, embed_dim=256,
                            batch_size=64, queue_size=65536, momentum=0.995, lr=1e-4, weight_decay=0.02,
                            torch_deterministic=False)),
}


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


def target_of(name, config):
    """The issue's ceiling on a row's step time ÷ its baseline's, with its wording (None: no target)."""
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
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_set, tokenizer = train_data(a)
    fusion = hasattr(mod, "momentum_update")
    if fusion:
        mod.check_queue(a.queue_size, a.batch_size)
    if name == "reference":
        model = ReferenceCLIP(a.vision, reference_bert_config(a, tokenizer), a.embed_dim).to(device)
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, fused=device.type == "cuda")
        loader = data.train_loader(train_set, tokenizer, a, a.batch_size, a.seed, second_view=False)
        return Reference(model, optimizer, None, loader, a, device)
    model = mod.build_model(a, tokenizer).to(device)
    if not fusion and (a.vision != "cnn" or device.type == "cuda"):  # as clip_base.main()
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = mod.make_optimizer(model, a, device)
    loader = data.train_loader(train_set, tokenizer, a, a.batch_size, a.seed,
                               second_view=not fusion and not a.plain_clip)
    if fusion:
        return Fusion(mod, max(1, len(train_set) // a.batch_size), model, optimizer, scheduler, loader, a, device)
    return TwoTower(mod, model, optimizer, scheduler, loader, a, device)


# ============================== timing ========================================================
def one_step(t, batches, step, sync):
    """One training step, as the scripts' loops run it; returns ([data, forward, backward, optimizer] s, loss)."""
    clock = [time.perf_counter()]

    def lap():
        sync()
        clock.append(time.perf_counter())
    batch = {k: v.to(t.device, non_blocking=True) for k, v in next(batches).items()}
    lap()
    with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
        terms = t.losses(batch, step)
    lap()
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(terms["loss"]).backward()
    lap()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.scheduler is not None:
        t.scheduler.step()
    t.after_step()
    lap()
    return [b - a for a, b in zip(clock, clock[1:])], terms["loss"].detach()


class Timing:
    """A row's steps: its batch stream, the FLOP-counting step, --compile and the warm-up (start), then the
    timed steps one at a time (timed_step: a run either times each row in turn or interleaves them)."""

    def __init__(self, t, b, device):
        from torch.utils.flop_counter import FlopCounterMode
        self.t, self.times, self.step = t, [], 0
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.batches = iter(t.loader)
        if b.fixed_batch:  # one batch, on the device once: every later step skips the input pipeline
            fixed = {k: v.to(device) for k, v in next(self.batches).items()}
            self.batches = iter(lambda: fixed, None)
        t.model.train()
        counter = FlopCounterMode(display=False)
        with counter:  # step 0, eager: the model FLOPs of one forward + backward (the optimizer's are not counted)
            self._step()
        self.flops = counter.get_total_flops()
        if b.compile:
            t.compile(b.compile_backend)
        for _ in range(b.warmup):
            self._step()

    def _step(self):
        phases, self.loss = one_step(self.t, self.batches, self.step, self.sync)
        self.step += 1
        return phases

    def timed_step(self):
        self.times.append(self._step())

    def result(self, peak_mib, peak_flops, cuda):
        """The row's medians over the timed steps (its batch stream is closed: the DataLoader workers stop)."""
        self.batches = None
        med = statistics.median
        step_s = [sum(p) for p in self.times]
        data_s, fwd_s, bwd_s, opt_s, total_s = (med(col) for col in (*zip(*self.times), step_s))
        return {"samples_per_s": med([self.t.a.batch_size / s for s in step_s]), "step_ms": 1e3 * total_s,
                "data_ms": 1e3 * data_s, "forward_ms": 1e3 * fwd_s, "backward_ms": 1e3 * bwd_s,
                "optimizer_ms": 1e3 * opt_s, "data_pct": 100 * data_s / total_s, "peak_mib": peak_mib,
                "gflop_per_step": self.flops / 1e9, "mfu_pct": 100 * self.flops / total_s / peak_flops if cuda else None,
                "loss": self.loss.float().item()}


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
    every script that has them; a flag that no method script knows is an error."""
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
    b.num_workers = cfg["num_workers"] if b.num_workers < 0 else b.num_workers
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
            fields.update(precision=b.precision, num_workers=b.num_workers, device=b.device, compile=False,
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


def targets(rows, b):
    """Each target of the issue that this run measures: what, the measured value, the limit, met or not."""
    out = []
    for r in rows:
        tgt = target_of(r["method"], b.config)
        if tgt and r["vs_baseline"] is not None:
            limit, what = tgt
            out.append({"target": f"{r['method']}: {what} (step time ÷ {r['baseline']})", "value": r["vs_baseline"],
                        "limit": f"≤ {limit:.2f}", "met": r["vs_baseline"] <= limit})
    if b.config == "gpu" and rows and not b.fixed_batch and not b.interleave:  # else the data time says little
        worst = max(rows, key=lambda r: r["data_pct"])
        out.append({"target": f"data time < 5% of the step (worst row: {worst['method']})", "value": worst["data_pct"],
                    "limit": "< 5 %", "met": worst["data_pct"] < 5})
    return out


def time_ipot(device, repeats=30):
    """Median ms of codis.ipot on a 256 × 1024 problem (batch × codebook) with 50 outer steps, on this process's
    torch threads: issue 5's figure (≤ 30 ms on the 2-core CPU)."""
    codis = importlib.import_module("codis")
    g = torch.Generator().manual_seed(0)
    z, c = (F.normalize(torch.randn(n, 128, generator=g), dim=1) for n in (256, 1024))
    cost = (1 - z @ c.T).to(device)                                       # D = 1 − ⟨z, c⟩ in [0, 2]
    mu, nu = torch.full((256,), 1 / 256, device=device), torch.full((1024,), 1 / 1024, device=device)
    times = []
    for i in range(repeats + 3):  # 3 untimed calls first
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        codis.ipot(cost, mu, nu, n_outer=50, n_inner=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


# ============================== main =========================================================
def start(name, a, b, device):
    """Build one row's trainer as its script does, then its FLOP-counting step, --compile and warm-up."""
    return Timing(build_trainer(name, importlib.import_module(ROWS[name].script), a, device), b, device)


def row_of(name, timing, b, device, peak_mib):
    """One line of the table (its ratio to the baseline is added once every row has run)."""
    row = {"method": name, "label": ROWS[name].label, "model": describe(timing.t.a), "batch": timing.t.a.batch_size,
           "baseline": ROWS[name].baseline or None,
           **timing.result(peak_mib, b.peak_flops, device.type == "cuda")}
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
        rows.append(row_of(name, timing, b, device, peak_memory_mib(device)))
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
    return [row_of(name, timing, b, device, None) for name, timing in timings.items()]


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints a load report each time a script loads the BERT-base folder: errors only, meanwhile."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)



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
    for r in rows:  # the overhead ratio: this row's median step time ÷ its baseline's, both measured above
        r["baseline"] = r["baseline"] if r["baseline"] in step_ms else None
        r["vs_baseline"] = r["step_ms"] / step_ms[r["baseline"]] if r["baseline"] else None
    if b.num_workers == 0 and not b.fixed_batch:  # the data column is then the whole loading cost of a batch
        notes += [workers_advice(r) for r in rows]
    result = {"command": "python bench.py " + shlex.join(argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "hardware": hardware(device), "device": str(device), "config": b.config, "precision": b.precision,
              "compile": b.compile, "num_workers": b.num_workers, "fixed_batch": b.fixed_batch,
              "interleave": b.interleave, "steps": b.steps, "warmup": b.warmup, "rows": rows,
              "targets": targets(rows, b), "notes": notes}
    if "codis" in order:  # IPOT alone, at the size the issue names
        ms = time_ipot(device)
        result["ipot_ms"] = ms
        result["targets"].append({"target": "codis: IPOT 256 × 1024, 50 outer steps (median ms)", "value": ms,
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
    """The Markdown printed at the end: a header line, the table, the targets, the notes."""
    mem = ("not measured (interleaved)" if res["interleave"] else "CUDA max allocated"
           if res["device"].startswith("cuda") else "process peak RSS, reset before each row")
    lines = [f"`{res['command']}` — {res['date']}, {res['hardware']}; device {res['device']}, {res['precision']}, "
             f"compile {'on' if res['compile'] else 'off'}, --num-workers {res['num_workers']}"
             f"{', fixed batch' if res['fixed_batch'] else ''}{', interleaved' if res['interleave'] else ''}; medians of {res['steps']} timed steps after "
             f"{res['warmup']} warm-up; peak MiB = {mem}", "", markdown(res["rows"])]
    if res["targets"]:
        lines += ["", "| target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {t['target']} | {t['value']:.3f} | {t['limit']} | {'yes' if t['met'] else 'NO'} |"
                  for t in res["targets"]]
    lines += [f"- {n}" for n in res["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
