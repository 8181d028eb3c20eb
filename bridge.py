"""bridge.py: two-tower CLIP with intra-modal contrastive terms (L_con) + a Brownian-bridge regularizer
(L_Br).

Method: the "basic contrastive framework" of Jiang et al., "Understanding and Constructing Latent Modality
Structures in Multi-Modal Representation Learning", CVPR 2023 (arXiv:2303.05952), i.e. CLIP's symmetric loss
(Radford et al., ICML 2021, arXiv:2103.00020) plus one in-modal term per modality. A batch holds N image-text
pairs; z_V, z_T are the L2-normalized projections of the image and text encoders and z_V^a, z_T^a
those of an augmented view (image augmentations; EDA for text: Wei & Zou, EMNLP 2019, arXiv:1901.11196).
τ is a learnable temperature (init 0.07, 1/τ clamped to at most 100).

    NCE(a, b) = −1/N Σ_j log( exp(⟨a_j, b_j⟩/τ) / Σ_k exp(⟨a_j, b_k⟩/τ) )
    L_V2T = NCE(z_V, z_T)     L_T2V = NCE(z_T, z_V)     (cross-modal, CLIP's symmetric loss)
    L_V2V = NCE(z_V, z_V^a)   L_T2T = NCE(z_T, z_T^a)   (intra-modal, two views of one input)
    L_con = ¼ (L_V2T + L_T2V + L_V2V + L_T2T)

A choice between readings: the paper prints L_V2V with a denominator over z_Vk of the *same* view, which
contains the trivial pair ⟨z_Vj, z_Vj⟩ = 1. We chose to contrast z_Vj against the other view's z_Vk^a
(k = 1..N), which is what the numerator ⟨z_Vj, z_Vj^a⟩ implies and gives L_V2V the form of L_V2T; SimCLR's
NT-Xent would also use the same view's other samples as negatives, which we do not.
`--plain-clip` keeps only ½(L_V2T + L_T2V).

Brownian bridge (inter-modality regularization, Jiang et al. 2023). The augmented image feature z_V^a should
stay on a path from z_V to z_T: a Brownian bridge p(z_V^a | z_V, z_T) = N(z_V^a; μ(z_V, z_T, t), t(1−t) I)
whose mean, projected on the sphere, is

    μ(z_V, z_T, t) = (t z_V + (1−t) z_T) / ‖t z_V + (1−t) z_T‖   t = 0.25 (ours) or t ~ U(0,1) per pair
    L_Br = 1/N Σ_j ‖z_Vj^a − μ_j‖²                                 L = L_con + w·L_Br    (w = --bridge-weight:
                                                                   ours 0.3, the paper's plain sum 1)

t weights z_V, so t = 0.25 puts μ a quarter of the way from z_T towards z_V (nearer the text).
Reading of the printed formula: for unit vectors the squared distance has the closed form
    ‖z_V^a − μ‖² = 2 − 2 (t⟨z_V^a, z_V⟩ + (1−t)⟨z_V^a, z_T⟩) / sqrt(t² + (1−t)² + 2t(1−t)⟨z_V, z_T⟩).
The paper's expanded second line drops the sqrt and the "2 − 2(·)": what it prints grows with the cosine
⟨z_V^a, μ⟩, so minimizing it as printed would push z_V^a *away* from the bridge. We implement the squared
distance of its first line (tests check it against the closed form). The gradient reaches z_V^a, z_V and
z_T (the paper shows no stop-gradient). The method needs the augmented views, so `--plain-clip` is refused.

Run it:  python bridge.py                         (synthetic benchmark, CPU, about 3 minutes)
         python bridge.py --data karpathy --data-root DIR --vision resnet50 --pretrained-vision \
             --text-model bert-base-uncased --tokenizer bert-base-uncased --image-size 224 --embed-dim 256 \
             --batch-size 256 --lr 1e-4 --epochs 5 --precision bf16 --eval-every 500   (docs/gpu.md)
Outputs go to runs/<exp>-<data>-<seed>-<time>/ : args.json, log.jsonl, checkpoint.pt, metrics.json.
"""
# ============================== imports ======================================================
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
import dataclasses
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval as ev


# ============================== flags ========================================================
@dataclass
class Args(data.DataArgs):  # the data flags (--data, --data-root, --image-size, ...) live in data.py
    exp_name: str = "bridge"
    """name of the run (first part of the output folder)"""
    seed: int = 1
    """seed of the model initialization and the batch order"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (autocast; a gradient scaler only for fp16)"""
    compile: bool = False
    """torch.compile the model"""
    torch_deterministic: bool = False
    """GPU: deterministic cuDNN kernels, no autotuning (slower; what stays bit-exact: docs/gpu.md)"""
    sync_bn: bool = True
    """under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm); on CPUs (gloo)
    each process keeps its own (docs/distributed.md)"""
    dist_timeout: float = 10.0
    """under torchrun: minutes a process waits for the others before the run stops with an error"""
    out: str = "runs"
    """parent folder of the run folder"""
    resume: str = ""
    """path of a checkpoint.pt to continue exactly where it stopped, with the run's own flags (which flags
    given with it still apply: the end of --help)"""
    stop_at: int = 0
    """stop at this step with a checkpoint, as a preempted job would (0 = run to the end)"""
    steps: int = 450
    """optimizer steps"""
    epochs: float = 0.0
    """if > 0: train for this many passes over the training images instead of --steps"""
    batch_size: int = 128
    """image-text pairs per step (N): the global batch the loss sees; under torchrun each of the K
    processes loads N/K of them (N must divide by K), so a run gives the numbers of one process"""
    lr: float = 1e-3
    """peak learning rate of AdamW (linear warm-up, cosine decay to 0)"""
    warmup: int = 50
    """warm-up steps"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases, norms, temperature)"""
    log_every: int = 20
    """steps between log.jsonl lines"""
    save_every: int = 0
    """steps between checkpoints (0 = none by step count; see --save-minutes)"""
    save_minutes: float = 10.0
    """minutes of training between checkpoints (0 = off); also saved after each epoch of real data, at the
    end, at --stop-at and on Ctrl-C / SIGTERM"""
    eval_every: int = 0
    """steps between cheap validations on the validation split, written to log.jsonl as val/... (0 = off)"""
    report_to: str = ""
    """live curves besides log.jsonl: tensorboard or wandb (optional packages, docs/pretrained.md)"""
    init_from: str = ""
    """start from the weights of a run of this script exported with `python eval.py RUN --export DIR`"""
    vision: str = "cnn"
    """image encoder: cnn (small, from scratch) or a torchvision ResNet name (resnet18, resnet50, ...)"""
    pretrained_vision: bool = False
    """load the torchvision ImageNet weights of --vision (needs the network once)"""
    cnn_width: int = 32
    """channels of the first stage of the small CNN (doubled at each of its 4 stages)"""
    text_model: str = ""
    """text encoder: '' = a small BERT from scratch, or a Hugging Face name / local folder"""
    init_clip: str = ""
    """start from a pretrained CLIP (Hugging Face CLIPModel or SigLIP, name or local folder): both towers,
    both projections, the temperature, the tokenizer and the eval preprocessing; --image-size, --max-len,
    --embed-dim and --tokenizer are then the model's (docs/pretrained.md)"""
    text_layers: int = 2
    """small BERT: layers"""
    text_width: int = 128
    """small BERT: hidden size"""
    embed_dim: int = 128
    """dimension of the shared embedding z"""
    plain_clip: bool = False
    """drop the intra-modal terms: L = ½(L_V2T + L_T2V), plain CLIP"""
    bridge_weight: float = 0.3
    """w in L = L_con + w·L_Br (0.3: chosen on the validation split, docs/results.md; the paper gives no
    weight, i.e. the plain sum: --bridge-weight 1)"""
    bridge_t: float = 0.25
    """t of the bridge mean μ = norm(t z_V + (1−t) z_T) (0.25: this project's fixed choice; the paper prints no t)"""
    bridge_random_t: bool = False
    """draw t ~ U(0, 1) for each pair at each step instead of the fixed --bridge-t"""


# ============================== the model (the method's parts) ===============================
class CLIP(nn.Module):
    def __init__(self, args, vocab_size):
        super().__init__()
        if args.init_clip:  # a pretrained CLIP's towers, projections and temperature (eval.load_clip_parts)
            parts = ev.load_clip_parts(args.init_clip)
            self.visual, self.text, self.image_proj, self.text_proj = parts[:4]
            self.logit_scale = nn.Parameter(torch.tensor(parts.logit_scale))
        else:
            self.visual, self.text = build_vision(args), TextEncoder(args, vocab_size)
            self.image_proj = nn.Linear(self.visual.out_dim, args.embed_dim)
            self.text_proj = nn.Linear(self.text.out_dim, args.embed_dim)
            # τ = exp(−logit_scale), initialized at 0.07 and learned; 1/τ is clamped to ≤ 100 after each step
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images):  # (N, 3, H, W) -> z_V (N, E), unit norm
        return F.normalize(self.image_proj(self.visual(images)), dim=-1)

    def encode_text(self, input_ids, attention_mask):  # (N, L) -> z_T (N, E), unit norm
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask)), dim=-1)

    def forward(self, images, input_ids, attention_mask):  # every feature the losses need
        h_v, h_t = self.visual(images), self.text(input_ids, attention_mask)
        return {"v": F.normalize(self.image_proj(h_v), dim=-1), "t": F.normalize(self.text_proj(h_t), dim=-1)}


def build_model(args, tokenizer):
    return CLIP(args, len(tokenizer))


# ============================== losses (the method) ==========================================
class AllGatherWithGrad(torch.autograd.Function):
    """forward: the whole batch's rows, from every process in rank order, (n, E) -> (N, E) with N = K·n.
    backward: every process's loss depends on this process's rows (as negatives), so their gradient is the sum
    over the processes of each one's gradient for these rows: an all-reduce, then this process's slice."""

    @staticmethod
    def forward(ctx, x):
        rows = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, x.contiguous())
        return torch.cat(rows)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)                                        # Σ over processes, (N, E)
        n = len(grad) // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]   # this process's rows, (n, E)


def all_gather_with_grad(x):
    """Every process's rows of x (the whole batch), differentiable; x itself on one process. Without the
    gradient, the other processes' rows would be constants and each encoder would learn from its own rows'
    terms only."""
    return AllGatherWithGrad.apply(x) if dist.is_initialized() else x


def nce(a, b, logit_scale):
    """InfoNCE of a against b: row j's positive is b_j, its negatives the other b_k of the batch. Under
    torchrun a holds this process's n rows and b is gathered from every process: the negatives are the
    whole batch's N, and row j's positive is b_{rank·n + j}."""
    b = all_gather_with_grad(b)                                       # (N, E)
    with torch.autocast(a.device.type, enabled=False):  # fp32 logits, also under bf16/fp16 autocast
        # s_jk = ⟨a_j, b_k⟩ / τ                                          (n, N)
        logits = logit_scale.exp().float() * (a.float() @ b.float().t())
    # NCE(a, b) = −1/n Σ_j log( exp(s_j,o+j) / Σ_k exp(s_jk) ),  o = rank·n (0 on one process, where n = N)
    o = dist.get_rank() * len(a) if dist.is_initialized() else 0
    return F.cross_entropy(logits, torch.arange(o, o + len(a), device=a.device))


def loss_con(f, f_a, logit_scale, plain_clip=False):
    """L_con = ¼ (L_V2T + L_T2V + L_V2V + L_T2T), or ½ (L_V2T + L_T2V) for plain CLIP.
    f: the features, f_a: those of the augmented views."""
    # L_V2T = NCE(z_V, z_T),  L_T2V = NCE(z_T, z_V): cross-modal, each image against the batch's captions and
    # back
    terms = {"v2t": nce(f["v"], f["t"], logit_scale), "t2v": nce(f["t"], f["v"], logit_scale)}
    if not plain_clip:
        # intra-modal: each input against its augmented view (the other view's batch as negatives)
        # L_V2V = NCE(z_V, z_V^a)
        terms["v2v"] = nce(f["v"], f_a["v"], logit_scale)
        # L_T2T = NCE(z_T, z_T^a)
        terms["t2t"] = nce(f["t"], f_a["t"], logit_scale)
    # L_con = ¼ (L_V2T + L_T2V + L_V2V + L_T2T), or ½ (L_V2T + L_T2V) for plain CLIP
    terms["con"] = sum(terms.values()) / len(terms)
    return terms


def loss_bridge(zv_a, zv, zt, t):
    """L_Br: pull the augmented image feature onto the mean of the Brownian bridge from z_V to z_T."""
    zv_a, zv, zt = zv_a.float(), zv.float(), zt.float()  # (N, E) each, unit norm; t: float or (N, 1)
    # μ = (t z_V + (1−t) z_T) / ‖t z_V + (1−t) z_T‖                              (N, E)
    mu = F.normalize(t * zv + (1 - t) * zt, dim=-1)
    # Closed form for unit vectors, as ‖t z_V + (1−t) z_T‖² = t² + (1−t)² + 2t(1−t)⟨z_V, z_T⟩:
    #   ‖z_V^a − μ‖² = 2 − 2 (t⟨z_V^a, z_V⟩ + (1−t)⟨z_V^a, z_T⟩) / sqrt(t² + (1−t)² + 2t(1−t)⟨z_V, z_T⟩)
    # The paper's expanded line drops the sqrt and the 2 − 2(·): minimized as printed, it pushes z^a AWAY from
    # μ.
    # L_Br = 1/N Σ_j ‖z_Vj^a − μ_j‖²                                             (N,) -> scalar
    return (zv_a - mu).square().sum(-1).mean()


def compute_losses(model, batch, args):
    """Forward both views in one pass and return every loss term; terms['loss'] is optimized."""
    n = batch["image"].shape[0]
    if args.plain_clip:
        f, f_a = model(batch["image"], batch["input_ids"], batch["attention_mask"]), None
    else:  # the two views go through the encoders as one batch of 2N (one pass instead of two); so the CNN's
        # BatchNorm statistics are those of both views together, not of each view alone
        ids, mask = pad_cat(batch["input_ids"], batch["input_ids_aug"]), pad_cat(batch["attention_mask"],
                                                                                 batch["attention_mask_aug"])
        both = model(torch.cat([batch["image"], batch["image_aug"]]), ids, mask)
        f, f_a = {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}
    terms = loss_con(f, f_a, model.logit_scale, args.plain_clip)
    with torch.autocast(f["v"].device.type, enabled=False):  # the method's term in fp32 (matmuls too)
        # t: a fixed 0.25 (ours), or one t ~ U(0, 1) per pair                  float or (N, 1)
        t = torch.rand(n, 1, device=f["v"].device) if args.bridge_random_t else args.bridge_t
        # L_Br = 1/N Σ_j ‖z_Vj^a − μ(z_Vj, z_Tj, t)‖²
        terms["bridge"] = loss_bridge(f_a["v"], f["v"], f["t"], t)
    # L = L_con + w·L_Br
    terms["loss"] = terms["con"] + args.bridge_weight * terms["bridge"]
    return terms


def pad_cat(a, b):
    """Stack two (N, L1), (N, L2) token tensors along the batch, right-padding with 0 ([PAD])."""
    L = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(a, (0, L - a.shape[1])), F.pad(b, (0, L - b.shape[1]))])


# ============================== train loop ===================================================
def main(argv=None):
    args = data.parse_args(Args, argv)
    script = os.path.splitext(os.path.basename(__file__))[0]
    ckpt = None
    if args.resume:  # tensors and plain values only: loading a checkpoint never runs code (eval.py)
        ckpt = ev.load_checkpoint(args.resume, expect_script=script)
        # the run's own flags, plus the few that are safe to change (--steps, --stop-at, ...: data.RESUME_HELP)
        args = data.resume_args(Args, ckpt, argv)
        if ckpt["step"] >= args.steps:  # a finished run: say where its metrics are, train nothing
            return ev.finished_run(args.resume, ckpt["step"])
    if args.plain_clip:  # the method: L_Br needs the augmented views, which --plain-clip does not load
        data.flag_error("--plain-clip drops the augmented views z^a that L_Br needs; use clip_base.py "
                        "--plain-clip")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # speed by default (cuDNN picks the fastest kernels); --torch-deterministic for bit-exact GPU runs
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = ev.pick_device(args.device)
    # under torchrun: this process's rank of K, and its GPU (LOCAL_RANK); (0, 1, device) for python SCRIPT.py
    rank, world, device = init_distributed(args, device)
    amp_dtype = ev.PRECISIONS[args.precision]
    if args.init_clip and ckpt is None:  # the pretrained CLIP's image size, caption length, width and tokenizer
        args = dataclasses.replace(args, **ev.clip_settings(args.init_clip))

    # ---- data, tokenizer, model
    train_set, suite = data.build_data(args)
    val_suite = data.build_eval_suite(args, "val") if args.eval_every else None
    tokenizer = data.build_tokenizer(args, train_set)
    steps_per_epoch = max(1, len(train_set) // args.batch_size)
    if args.epochs > 0:
        args.steps = max(1, int(args.epochs * steps_per_epoch))
    model = build_model(args, tokenizer).to(device)
    if args.init_from and ckpt is None:  # the weights of an exported run of this script (eval.py RUN --export)
        state, exported_by, _ = ev.load_export(args.init_from)
        if exported_by != script:
            data.flag_error(f"--init-from {args.init_from} holds a run of {exported_by}.py, not {script}.py")
        model.load_state_dict(state)
    if world > 1 and args.sync_bn and device.type == "cuda":  # BatchNorm over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # NHWC: faster convolutions (GPU tensor cores)
    channels_last = args.vision != "cnn" or device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step, n_skipped = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # a checkpoint written on another device may store another memory layout
        match_state_layout(optimizer)
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, n_skipped = ckpt["step"], ckpt.get("skipped_images", 0)
        set_rng_state(ev.resumed_rng(ckpt, rank, world), device)
        run_dir = os.path.dirname(os.path.abspath(args.resume))
    else:
        if world > 1:  # the same weights everywhere, then a random stream of its own per process (dropout)
            torch.manual_seed(args.seed + 1_000_003 * rank)
        run_dir = make_run_dir(args) if rank == 0 else None
        if rank == 0:
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump(asdict(args), f, indent=2)
        run_dir = ev.shared_by_rank_0(run_dir)
    if rank == 0:  # one run, not K: rank 0 alone writes the run folder
        lock = ev.lock_run_dir(run_dir)  # noqa: F841 - held until the process ends: one process trains in a run
        tokenizer.save_pretrained(os.path.join(run_dir, "tokenizer"))
    fwd_model = torch.compile(model) if args.compile else model
    if world > 1:  # DDP synchronizes the gradients of what runs in its forward: there, all of compute_losses
        fwd_model = nn.parallel.DistributedDataParallel(LossInForward(fwd_model, compute_losses))
    loader = data.train_loader(train_set, tokenizer, args, args.batch_size, args.seed, start_step=step,
                               second_view=not args.plain_clip, pad_to_max=args.compile, rank=rank, world=world)
    print_0 = print if rank == 0 else (lambda *a, **k: None)  # one process speaks
    print_0(f"{script}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_set)} "
            f"training images, {args.steps} steps of {args.batch_size} on {device} ({args.precision}) "
            f"-> {run_dir}")
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    window = []  # each step's loss terms, kept on the device and checked (one sync) when logging or saving

    def check_finite():
        window[:] = ev.mean_over_processes(window)  # K processes: the global batch's terms; a NaN stops all
        bad = window and first_non_finite(window, list(terms), step - len(window))
        if bad:
            kept = (f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path)
                    else "no checkpoint")
            fp32 = f" or --precision fp32 (now {args.precision})" if args.precision != "fp32" else ""
            raise SystemExit(f"{script}: the loss term {bad[1]!r} is not finite at step {bad[0]}; stopping "
                             f"({kept}). Try a lower --lr (now {args.lr:g}){fp32}.")

    def checkpoint():
        check_finite()  # never overwrite a good checkpoint with diverged weights
        rngs = ev.gathered_objects(rng_state(device))  # every process's RNG state (one on one process)
        if rank == 0:
            ev.save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), step=step,
                               args=asdict(args), rng=rngs[0], rng_ranks=rngs, script=script,
                               skipped_images=n_skipped)
        return time.perf_counter()

    # the images of evaluation: a pretrained CLIP's own preprocessing (--init-clip), else resize and normalize
    eval_transform = ev.model_transform(model, args.image_size)

    # ---- the loop
    model.train()
    end = min(args.steps, args.stop_at) if args.stop_at else args.steps
    log = open(os.path.join(run_dir, "log.jsonl") if rank == 0 else os.devnull, "a")
    bar = tqdm(total=end, initial=step, desc=script, dynamic_ncols=True, disable=rank != 0)
    reporter = ev.open_reporter(args.report_to if rank == 0 else "", run_dir, asdict(args))  # live curves
    t_log = t_start = t_saved = time.perf_counter()
    last_step = step
    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: finish this step, checkpoint, exit
        for batch in loader:
            if step >= end:
                break
            # uint8 -> normalized float, on device
            batch, skipped = data.to_device(batch, device, channels_last)
            n_skipped += skipped
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # under torchrun the same call, inside DDP's forward (LossInForward)
                terms = fwd_model(batch, args) if world > 1 else compute_losses(fwd_model, batch, args)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():  # 1/τ ≤ 100
                model.logit_scale.clamp_(0, math.log(100))
            window.append(torch.stack([v.detach().float() for v in terms.values()]))
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or step == end:
                check_finite()
                now, values = time.perf_counter(), window[-1].tolist()  # the one host sync of a logging step
                window.clear()
                row = {"step": step, **{f"loss_{k}" if k != "loss" else k: v for k, v in zip(terms, values)},
                       "logit_scale": model.logit_scale.exp().item(), "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": args.batch_size * (step - last_step) / (now - t_log),
                       "peak_mem_mib": peak_memory_mib(device), "skipped_images": n_skipped}
                log.write(json.dumps(row) + "\n")
                log.flush()
                reporter.log(row)
                bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in row.items() if k.startswith("loss")})
                t_log, last_step = now, step
            if args.eval_every and step % args.eval_every == 0 and rank == 0:  # cheap metrics, validation split
                row = {"step": step, **ev.validate(model, tokenizer, val_suite, eval_transform, device, args.max_len,
                                                   args.precision)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                reporter.log(row)
            due = args.save_minutes and time.perf_counter() - t_saved >= 60 * args.save_minutes
            # K processes decide together: rank 0's clock, and a signal to any one stops all
            due, stop.signal = ev.agreed(due if rank == 0 else False, stop.signal, device)
            if ((args.save_every and step % args.save_every == 0) or due
                    or (args.data != "synthetic" and step % steps_per_epoch == 0)):  # and after every epoch
                t_saved = checkpoint()
            if stop.signal:
                break
    bar.close()
    log.close()
    reporter.close()
    del loader  # its worker processes end here, before the evaluation
    checkpoint()
    train_seconds = time.perf_counter() - t_start
    if world > 1:  # every parameter (and queue, codebook) must be the same on every process: checked
        ev.check_in_sync(model, device)
    if n_skipped:
        print(f"{script}: {n_skipped} training images could not be decoded and were replaced by the next one")
    if stop.signal or step < args.steps:
        print_0(f"stopped at step {step} of {args.steps}; continue with --resume {ckpt_path}")
        if stop.signal:
            # the conventional status: 130 after Ctrl-C, 143 after SIGTERM
            raise SystemExit(128 + stop.signal)
        return run_dir
    if rank != 0:  # the evaluation runs once, on rank 0
        return run_dir

    # ---- final evaluation on the --eval-split split (test by default) (eval.py, through encode_image /
    # encode_text)
    # a signal now stops at once: the checkpoint is complete, and eval.py computes the metrics from it
    with StopOnSignal(at_once=f"the checkpoint {ckpt_path} of step {step} is complete; compute the metrics "
                              f"with python eval.py {run_dir} --save"):
        metrics = ev.evaluate(model, tokenizer, suite, eval_transform, device, args.max_len,
                              args.precision, num_workers=args.num_workers)
    metrics.update({"train/steps": step, "train/seconds": train_seconds,
                    "train/peak_mem_mib": peak_memory_mib(device),
                    "train/skipped_images": n_skipped})
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(ev.comparison_table({os.path.basename(run_dir): metrics}))
    return run_dir


# ============================== appendix: generic parts (not the method) =====================
# Everything below is standard plumbing that any vision-language trainer needs; read it after the method.
# Python resolves these names when main() runs, so they can live after it.

# ---- appendix A. encoders
class SmallCNN(nn.Module):
    """4 stages of conv-BN-ReLU (stride 2 each), then a 2×2 average pool: keeps coarse position."""

    def __init__(self, width=32):
        super().__init__()
        chans, layers = [3, width, 2 * width, 4 * width, 8 * width], []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1,
                                 bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.out_dim = 8 * width * 4

    def forward(self, x):  # (N, 3, H, W) -> (N, 32·width)
        return self.net(x)


def build_vision(args):
    if args.vision == "cnn":
        return SmallCNN(args.cnn_width)
    import torchvision
    try:
        net = getattr(torchvision.models, args.vision)(weights="DEFAULT" if args.pretrained_vision else None)
    except Exception as e:  # noqa: BLE001 - no network, or no such model
        raise RuntimeError(f"could not build torchvision model {args.vision!r} "
                           f"(pretrained={args.pretrained_vision}): "
                           f"{e}. Without the network, put the weights file in $TORCH_HOME/hub/checkpoints/ "
                           f"or drop --pretrained-vision.") from e
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class TextEncoder(nn.Module):
    """A BERT (small config from scratch, or pretrained by name); the sentence is the mean of its token
    states.

    Mean pooling rather than [CLS]: a small BERT trained from scratch learns several times faster with it on
    the synthetic benchmark (measured), and it is the native pooling of sentence-transformers models.
    """

    def __init__(self, args, vocab_size):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel
        if args.text_model:
            try:
                self.bert = AutoModel.from_pretrained(args.text_model)
            except OSError as e:
                raise OSError(f"text model {args.text_model!r} not found ({e}): give a local folder "
                              f"(save_pretrained output) or download it once with network access.") from e
        else:
            self.bert = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=args.text_width,
                                             num_hidden_layers=args.text_layers, num_attention_heads=4,
                                             intermediate_size=4 * args.text_width,
                                             max_position_embeddings=max(64, args.max_len)),
                                  add_pooling_layer=False)
        self.out_dim = self.bert.config.hidden_size
        # BERT uses a ready 4-D additive mask as it is, where from a 2-D mask transformers first asks the host
        # whether any token is padding (mask.all(): a GPU sync every forward). Other models keep the 2-D mask
        # (DeBERTa, for one, reads a 4-D mask differently)
        self.additive_mask = isinstance(self.bert, BertModel)

    def forward(self, input_ids, attention_mask):  # (N, L), (N, L) -> (N, width)
        mask = attention_mask
        if self.additive_mask:  # (N, 1, 1, L): 0 at the real tokens, the most negative float at the padding
            mask = (attention_mask[:, None, None, :] == 0).float() * torch.finfo(torch.float32).min
        h = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (N, L, width)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)  # mean over the real tokens


# ---- appendix B. optimizer, checkpoint, RNG
def make_optimizer(model, args, device):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    total = args.steps

    def schedule(step):  # linear warm-up, then cosine to 0
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - args.warmup) / max(1, total - args.warmup))))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def make_run_dir(args):
    """runs/<name>-<data>-<seed>-<time>/, never an existing folder: a sweep that starts two runs of the same
    name, data and seed in the same second gets <...>-2, <...>-3 (os.makedirs of a new leaf is atomic)."""
    base = os.path.join(args.out, f"{args.exp_name}-{args.data}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    for k in range(1, 10_000):
        path = base if k == 1 else f"{base}-{k}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: 10,000 run folders of this name already exist; choose another --exp-name")


def first_non_finite(window, names, first_step):
    """(step, term name) of the first non-finite loss term in `window` (one (terms,) vector per step since
    `first_step`), or None. One host sync for the whole window instead of one per step."""
    if not window:
        return None
    bad = ~torch.isfinite(torch.stack(window).cpu())  # (steps, terms)
    if not bad.any():
        return None
    i, j = bad.nonzero()[0].tolist()
    return first_step + i + 1, names[j]


class StopOnSignal:
    """Inside `with`: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before preemption) only set .signal,
    so the loop finishes its step and checkpoints; a second signal interrupts at once. With at_once (a message
    saying what is already safe), the first signal prints it and exits at once with 130 / 143. The handlers
    are restored on exit."""

    def __init__(self, at_once=""):
        self.at_once = at_once

    def __enter__(self):
        self.signal, self.old = 0, {}
        if threading.current_thread() is threading.main_thread():  # Python handles signals in the main thread
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.at_once:
            print(f"\n{signal.Signals(signum).name}: stopping; {self.at_once}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              f"(the same signal again stops at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def match_state_layout(optimizer):
    """Give each optimizer state tensor its parameter's memory layout. A checkpoint written on the CPU (NCHW)
    and resumed on a GPU (channels-last convolutions) would otherwise mix layouts, which fused AdamW
    refuses."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    optimizer.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def rng_state(device):
    """The RNG states a resumed run needs: CPU, Python, and the current GPU's only (so a run can resume with
    fewer GPUs visible)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(s, device):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)



# ---- appendix C. many processes (torchrun; see docs/distributed.md)
def init_distributed(args, device):
    """torchrun starts K copies of the script with RANK, WORLD_SIZE and LOCAL_RANK set: join the process group
    (NCCL between GPUs, gloo between CPUs) and take GPU number LOCAL_RANK. Returns (rank, K, device); (0, 1,
    device) for a plain `python SCRIPT.py`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if args.batch_size % world or args.batch_size < 2 * world:  # at least 2 pairs per process
        data.flag_error(f"--batch-size {args.batch_size} is the global batch: it must divide evenly over the "
                        f"{world} processes, at least 2 pairs each (e.g. --batch-size "
                        f"{max(2, args.batch_size // world) * world})")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(minutes=args.dist_timeout))
    return dist.get_rank(), world, device


class LossInForward(nn.Module):
    """The model with compute_losses as its forward. DistributedDataParallel all-reduces the gradients of what
    ran inside its forward; compute_losses reads the model's parts directly (the temperature, the towers), so
    the whole loss must run there, or some gradients would silently stay per process."""

    def __init__(self, model, compute_losses):
        super().__init__()
        self.model, self.compute_losses = model, compute_losses

    def forward(self, *inputs):
        return self.compute_losses(self.model, *inputs)


if __name__ == "__main__":
    main()
