"""codis.py: CODIS, codebook learning with distillation: Duan et al., "Multi-modal Alignment using
Representation Codebook", CVPR 2022 (arXiv:2203.00048). albef_fusion.py plus a codebook shared by both
modalities, fitted by optimal transport (IPOT: Xie et al., "A Fast Proximal Point Method for Computing Exact
Wasserstein Distance", UAI 2019, arXiv:1802.04307), and intra-modal alignment terms.

What CODIS adds to ALBEF. C holds K learnable unit vectors (codewords) in the E-dim space of z = g(·):
    L_ica = ½[H(y^i2t, p^i2t) + H(y^t2i, p^t2i)] + ½[H(y^i2i, p^i2i) + H(y^t2t, p^t2t)]   (L_itc + intra)
            (p^i2i_k = softmax_k ⟨z_v, z′_v,k⟩ / τ over the keys [momentum batch ; image queue]; y^i2i alike)
    D_v = 1 − Z′_v Cᵀ (N, K),  T_i2p = IPOT(D_v, μ = 1/N, ν = 1/K)    the teacher image plan; T_t2p from Z′_t
    L_ot(Z′, C) = ⟨T, D⟩                                              gradient to the codebook only
    P_t2p = softmax(Z_t Cᵀ / γ),  L_t2p = H(T_i2p, P_t2p)             swapped: the text student predicts the
    P_i2p = softmax(Z_v Cᵀ / γ),  L_i2p = H(T_t2p, P_i2p)             image's plan and vice versa
    L_code = L_ot(Z′_v, C) + L_ot(Z′_t, C) + L_t2p + L_i2p,      L = L_mlm + L_itm + L_ica + λ_code·L_code

CODIS readings (no public code exists; every choice below is ours and is checked in docs/results.md):
- The paper's "Codebook Loss" line pairs L_t2p with T_t2p, its equation (2) with T_i2p: we follow equation
  (2), the swap that makes each modality's teacher supervise the other modality's student (SwAV across
  modalities).
- H(T, P) = −Σ_k T̂_jk log P_jk with the plan's rows renormalized to distributions (T̂ = N·T for μ = 1/N): the
  plan is the target, so this is the printed H(P, T) with its arguments in the cross-entropy's usual order.
- The plans are computed over the batch alone: N = 32 rows against K = 128 codewords, so equipartition (each
  codeword receives mass 1/K) spreads every row's target over at least K/N = 4 codewords. Momentum features of
  the queue could serve as extra rows (as SwAV does with its queue); not done here.
- The paper writes γ in both the codebook softmax and p^i2t; in p^i2t etc. it plays ALBEF's τ (learned), and
  only the codebook's γ is a separate flag. i2i / t2t contrast an input with its own momentum feature (one
  view, as ALBEF's loader gives; TCL uses two augmented views).
- C is normalized in the forward pass (unit codewords); the plans see no gradient (IPOT under no_grad, fp32).
- K = 128 (2× the 64 colour×shape objects of the synthetic benchmark), γ = 0.1 (SwAV's temperature), IPOT
  β = 0.5, 50 outer steps, 1 inner step: not IPOT's own defaults but the values UNITER and ViLT use for their
  word–region optimal transport; loss weights 1 (the paper's plain sum) but λ_code = 0.3 (--code-weight 1
  gives the paper's sum; docs/codis.md gives the runs behind 0.3).

The ALBEF part. A ViT encodes the image into tokens v = (v_cls, v_1..v_P); the first layers of a BERT encode
the text alone into w = (w_cls, w_1..w_L); the last layers of the same BERT, each with an added
cross-attention to the image tokens, are the fusion encoder. v̄, w̄ are the pooled unimodal features (the
mean of the real tokens by default, the [CLS] token with --pool cls). g_v, g_w are linear projections to a
shared E-dim space followed by L2 normalization. A prime marks the momentum model (the suffix _m in the
code): a copy θ′ of the encoders, projections and MLM head that never sees the optimizer, moved towards the
online parameters θ with the momentum coefficient m after every step:

    θ′ ← m θ′ + (1 − m) θ

ITC (image-text contrastive) against keys k = 1..N+M: the momentum features of this batch, then a queue of
the M most recent ones (the positive of query j is key j):
    s^i2t_k = ⟨g_v(v̄), g′_w(w̄′_k)⟩ / τ          s^t2i_k = ⟨g_w(w̄), g′_v(v̄′_k)⟩ / τ
    p^i2t_k = exp(s^i2t_k) / Σ_k' exp(s^i2t_k')                  (p^t2i likewise)
    y^i2t = α·softmax(s′^i2t) + (1 − α)·onehot      momentum distillation, with the momentum model's own
                                                     similarities s′^i2t_k = ⟨g′_v(v̄′), g′_w(w̄′_k)⟩ / τ
    L_itc = ½ E[ H(y^i2t, p^i2t) + H(y^t2i, p^t2i) ],  H(y, p) = −Σ_k y_k log p_k
MLM (masked language modelling), predicted by the fusion encoder from the masked text T̂ and the image:
    L_mlm = (1 − α)·H(y^msk, p^msk(I, T̂)) + α·H(p′^msk(I, T̂), p^msk(I, T̂))     (at the masked tokens)
ITM (image-text matching) on the fusion [CLS], a 2-way linear head, with hard negatives: for every text
one negative image and for every image one negative text, drawn from the in-batch ITC softmax:
    L_itm = E[ H(y^itm, p^itm(I, T)) ]     over the N positive and 2N negative pairs (labels 1, 0, 0)
    L = L_itc + L_mlm + L_itm                            (CODIS: L_itc becomes L_ica, + λ_code·L_code)

Readings where the paper is brief (the page lists every departure from the authors' code):
- ITC's in-batch keys are momentum features too: online features are contrasted against
  [momentum batch ; queue], as in the reference code; the queue starts as random unit vectors.
- MLM masks 15% of the tokens except [PAD], [CLS] and [SEP] (BERT's rule; the reference also masks
  [SEP], a token the model learns to predict from the padding alone); of those 80% [MASK], 10% a random
  vocabulary id, 10% kept. The distillation target is the momentum model's softmax at the same positions.
- Hard negatives use the online-vs-momentum similarities s^i2t, s^t2i of this batch; weights are
  softmax(s) + ε, ε = 1e-4 (after the softmax, so every row keeps something to draw), then the positive
  and any other caption of the same image in the batch are zeroed.
- itm_score(images, texts) = logit_match − logit_no_match (the log-odds of "match").
- τ is learned directly (not as a log scale) and clamped to [0.001, 0.5].

Reference values (ViT-B/16 + BERT-base, 14M images): E = 256, M = 65,536, m = 0.995, α = 0.4 ramped over the
first epoch, AdamW lr 1e-4 from pretrained encoders, batch 512 (64 per GPU), [CLS] features. The CPU default
trains from scratch (1,200 steps of 32, ITM reranking of the top 8) and departs from them so that it learns
within a few CPU minutes: a conv stem embeds each 8×8 patch (16 tokens) and one transformer block follows,
many small steps rather than few large ones, M = 256 and m = 0.99 (the run is shorter than one epoch, and
old queue entries would be stale negatives), E = 128, mean-pooled unimodal features, and linear weights at
N(0, 1/fan_in) rather than BERT's N(0, 0.02) (see init_weights). docs/albef_fusion.md gives the runs behind
each choice and the wall times.

Run it:  python codis.py                          (synthetic benchmark, CPU)
         python codis.py --data karpathy --data-root DIR --vision vit_b_16 --pretrained-vision \
             --text-model bert-base-uncased --tokenizer bert-base-uncased --text-layers 6 --image-size 256 \
             --embed-dim 256 --queue-size 65536 --momentum 0.995 --alpha-ramp -1 --lr 1e-4 \
             --weight-decay 0.02 --batch-size 64 --pool cls --precision bf16 --itm-k 128
Outputs go to runs/<exp>-<data>-<seed>-<time>/ : args.json, log.jsonl, checkpoint.pt, metrics.json.
"""
# ============================== imports ======================================================
import copy
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

import data
import eval as ev


# ============================== flags ========================================================
@dataclass
class Args(data.DataArgs):  # the data flags (--data, --data-root, --image-size, ...) live in data.py
    exp_name: str = "codis"
    """name of the run (first part of the output folder)"""
    seed: int = 1
    """seed of the model initialization, the batch order, the masking and the negative sampling"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (autocast; a gradient scaler only for fp16)"""
    compile: bool = False
    """torch.compile every transformer layer"""
    grad_checkpoint: bool = False
    """recompute each transformer layer in the backward pass instead of storing its activations (less
    memory)"""
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
    steps: int = 1200
    """optimizer steps"""
    epochs: float = 0.0
    """if > 0: train for this many passes over the training images instead of --steps"""
    batch_size: int = 32
    """image-text pairs per step (N): the global batch the loss sees; under torchrun each of the K
    processes loads N/K of them (N must divide by K), so a run gives the numbers of one process"""
    lr: float = 1e-3
    """peak learning rate of AdamW (linear warm-up, cosine decay to 0; the reference: 1e-4 from pretrained)"""
    warmup: int = 100
    """warm-up steps"""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices (not on biases, norms, temperature; the reference: 0.02)"""
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
    vision: str = "vit"
    """image encoder: vit (small, from scratch, sized by --vit-*) or torchvision's vit_b_16 / vit_b_32 /
    vit_l_16"""
    pretrained_vision: bool = False
    """load the torchvision ImageNet weights of --vision (needs the network once)"""
    vit_patch: int = 8
    """small ViT: patch size in pixels (32 px / 8 = 4×4 = 16 patch tokens, plus [CLS])"""
    vit_stem: str = "conv"
    """small ViT: linear (one linear map per patch, as in ViT) or conv (a small CNN down to the same patch
    grid)"""
    vit_width: int = 128
    """small ViT: token width"""
    vit_depth: int = 1
    """small ViT: transformer blocks"""
    vit_heads: int = 4
    """small ViT: attention heads"""
    text_model: str = ""
    """BERT: '' = a small one from scratch, or a Hugging Face name / local folder (bert-base-uncased)"""
    text_layers: int = 2
    """BERT layers that encode the text alone; the rest are the fusion encoder (the reference: 6 of 12)"""
    fusion_layers: int = 1
    """small BERT: fusion layers (with cross-attention) after the text layers; a pretrained BERT uses the
    rest"""
    text_width: int = 128
    """small BERT: hidden size"""
    text_heads: int = 4
    """small BERT: attention heads"""
    dropout: float = 0.0
    """dropout of the embeddings and of each BERT sublayer's output (BERT: 0.1; its attention-probability
    dropout is not implemented here)"""
    embed_dim: int = 128
    """dimension of the shared ITC embedding (the reference: 256)"""
    queue_size: int = 256
    """M, momentum features kept per modality; a multiple of --batch-size (the reference: 65,536)"""
    momentum: float = 0.99
    """m, the momentum coefficient: θ′ ← m θ′ + (1 − m) θ after every step (the reference: 0.995)"""
    alpha: float = 0.4
    """α, weight of the momentum model's pseudo-targets in ITC and MLM"""
    alpha_ramp: int = 300
    """steps over which α rises linearly from 0 (-1 = the first epoch, the reference's schedule; 0 = no
    ramp)"""
    temp: float = 0.07
    """initial temperature τ (learned, clamped to [0.001, 0.5])"""
    mlm_prob: float = 0.15
    """fraction of the text tokens masked for MLM"""
    itm_k: int = 8
    """retrieval evaluation: ITC candidates per query reranked by ITM (the reference: 256 COCO, 128 Flickr)"""
    codebook_size: int = 128
    """K, codewords (2× the 64 colour×shape objects of the synthetic benchmark)"""
    code_temp: float = 0.1
    """γ of P = softmax(z Cᵀ / γ) (SwAV's temperature; no public CODIS code fixes it)"""
    ipot_beta: float = 0.5
    """β of IPOT's kernel A = exp(−D/β) (the value of UNITER's and ViLT's word–region OT)"""
    ipot_outer: int = 50
    """IPOT outer (proximal point) steps (as in UNITER's and ViLT's word–region OT)"""
    ipot_inner: int = 1
    """IPOT inner scaling steps per outer step (as in UNITER's and ViLT's word–region OT; IPOT's paper: 1
    too)"""
    plan_features: str = "teacher"
    """features the transport plans come from: teacher (momentum, CODIS) or student (the paper's ablation)"""
    intra: bool = True
    """the intra-modal terms i2i, t2t of L_ica (--no-intra: cross-modal only, the paper's ablation row a)"""
    code_weight: float = 0.3
    """λ_code of L_code in L (the paper: 1; 0: no codebook learning, L_ica alone, the paper's ablation
    row b)"""
    pool: str = "mean"
    """unimodal feature for ITC and the contract: mean (of the real tokens) or cls ([CLS] token, the
    reference)"""


# ============================== the model (the method's parts) ===============================
class CODIS(nn.Module):
    def __init__(self, args, tokenizer):
        super().__init__()
        # ---- online model: trained by the optimizer
        self.visual = build_vision(args)                                          # image encoder (ViT)
        # text encoder + fusion encoder
        self.bert = build_bert(args, len(tokenizer), self.visual.width)
        self.visual.grad_checkpoint = self.bert.grad_checkpoint = args.grad_checkpoint
        width = self.bert.word_emb.embedding_dim
        self.vision_proj = nn.Linear(self.visual.width, args.embed_dim)          # g_v
        self.text_proj = nn.Linear(width, args.embed_dim)                        # g_w
        # fusion [CLS] -> (no match, match)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(args.temp))                        # τ
        # C (K, E)
        self.codebook = nn.Parameter(F.normalize(torch.randn(args.codebook_size, args.embed_dim), dim=-1))
        # nearest-codeword counts, per log line
        self.register_buffer("code_counts", torch.zeros(args.codebook_size))
        for m in (self.vision_proj, self.text_proj, self.itm_head):
            init_weights(m)
        # ---- momentum model θ′ (suffix _m): a copy of the encoders, projections and MLM head, never optimized
        self.visual_m, self.bert_m = copy.deepcopy(self.visual), copy.deepcopy(self.bert)
        self.vision_proj_m, self.text_proj_m = copy.deepcopy(self.vision_proj), copy.deepcopy(self.text_proj)
        for p in self.momentum_parameters():
            p.requires_grad_(False)
        # ---- the queues of momentum features (rows, oldest overwritten first), random unit vectors at start
        self.register_buffer("image_queue", F.normalize(torch.randn(args.queue_size, args.embed_dim), dim=-1))
        self.register_buffer("text_queue", F.normalize(torch.randn(args.queue_size, args.embed_dim), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # [PAD], [CLS], [SEP], never masked by MLM: a buffer, built once and on the model's device
        special = (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
        self.register_buffer("special_ids", torch.tensor([i for i in special if i is not None]),
                             persistent=False)
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.pooling = args.pool

    def momentum_pairs(self):  # (online, momentum) modules of θ′ ← m θ′ + (1 − m) θ
        return [(self.visual, self.visual_m), (self.bert, self.bert_m), (self.vision_proj, self.vision_proj_m),
                (self.text_proj, self.text_proj_m)]

    def momentum_parameters(self):
        return [p for _, m in self.momentum_pairs() for p in m.parameters()]

    # tokens (N, L, D) -> (N, D): v̄ or w̄, the mean of the real tokens or [CLS] (--pool cls, the reference)
    def pool(self, h, mask=None):
        if self.pooling == "cls":
            return h[:, 0]
        mask = h.new_ones(h.shape[:2]) if mask is None else mask.to(h.dtype)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    # ---- the shared contract (eval.py): unimodal features, and the ITM score of fused pairs
    def encode_image(self, images):  # (N, 3, H, W) -> g_v(v̄) (N, E), unit norm
        return F.normalize(self.vision_proj(self.pool(self.visual(images))), dim=-1)

    def encode_text(self, input_ids, attention_mask):  # (N, L) -> g_w(w̄) (N, E), unit norm
        w = self.bert.encode_text(input_ids, attention_mask)                              # (N, L, W)
        return F.normalize(self.text_proj(self.pool(w, attention_mask)), dim=-1)

    def itm_score(self, images, input_ids, attention_mask):  # (N,) logit_match − logit_no_match of each pair
        return self.itm_score_tokens(self.image_tokens(images), input_ids, attention_mask)

    def image_tokens(self, images):  # (N, 3, H, W) -> (N, 1+P, Wv): what the fusion encoder attends to
        return self.visual(images)

    def itm_score_tokens(self, image, input_ids, attention_mask):  # image tokens (N, 1+P, Wv) -> (N,)
        # eval.py encodes each image once and indexes its tokens per candidate caption; h (N, L, W)
        h = self.bert.fuse(self.bert.encode_text(input_ids, attention_mask), attention_mask, image)
        logits = self.itm_head(h[:, 0])                                                    # (N, 2)
        return logits[:, 1] - logits[:, 0]


# ---- the BERT of ALBEF, split in two: the text encoder, then the fusion encoder whose layers add a
# cross-attention to the image tokens (align before fuse), and the MLM head on the fusion output
class Bert(nn.Module):
    """One BERT, split in two. encode_text runs the text_layers on the caption alone: its output w is what ITC
    aligns. fuse runs the fusion_layers, each of which also attends to the image tokens: its output is what
    ITM and MLM read. Aligning w before fusing it is ALBEF's "align before fuse". The MLM head (tied to the
    word embeddings) reads the fusion output. Attention, mlp and run_layer are generic (appendix A)."""

    def __init__(self, vocab_size, width, heads, text_layers, fusion_layers, image_width, max_positions=64,
                 intermediate=None, dropout=0.0):
        super().__init__()
        intermediate = intermediate or 4 * width
        self.word_emb, self.pos_emb = nn.Embedding(vocab_size, width), nn.Embedding(max_positions, width)
        self.emb_norm, self.emb_drop = nn.LayerNorm(width, eps=1e-12), nn.Dropout(dropout)
        self.text_layers = nn.ModuleList(BertLayer(width, heads, intermediate, dropout) for _ in range(text_layers))
        self.fusion_layers = nn.ModuleList(BertLayer(width, heads, intermediate, dropout, image_width)
                                           for _ in range(fusion_layers))
        self.mlm_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))
        self.mlm_decoder = nn.Linear(width, vocab_size)
        self.mlm_decoder.weight = self.word_emb.weight  # tied, as in BERT
        self.grad_checkpoint = False

    def encode_text(self, ids, mask):  # (N, L) -> (N, L, W): the text encoder, text only
        h = self.emb_drop(self.emb_norm(self.word_emb(ids) + self.pos_emb.weight[:ids.shape[1]]))
        for layer in self.text_layers:
            h = run_layer(layer, h, mask, checkpointed=self.grad_checkpoint)
        return h

    def fuse(self, h, mask, image):  # text states (N, L, W) + image tokens (N, 1+P, Wv) -> (N, L, W)
        for layer in self.fusion_layers:
            h = run_layer(layer, h, mask, image, checkpointed=self.grad_checkpoint)
        return h

    def mlm_logits(self, h):  # (..., W) -> (..., vocab)
        return self.mlm_decoder(self.mlm_transform(h))


class BertLayer(nn.Module):
    """Post-norm BERT layer: self-attention, then (fusion layers only) cross-attention from the text tokens to
    the image tokens, then the MLP; bidirectional, as in ALBEF (no causal mask)."""

    def __init__(self, width, heads, intermediate, dropout=0.0, image_width=None):
        super().__init__()
        self.self_attn, self.norm1 = Attention(width, heads), nn.LayerNorm(width, eps=1e-12)
        self.cross_attn = Attention(width, heads, kv_width=image_width) if image_width else None
        self.norm_cross = nn.LayerNorm(width, eps=1e-12) if image_width else None
        self.mlp, self.norm2 = mlp(width, intermediate), nn.LayerNorm(width, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, h, mask, image=None):  # h (N, L, W), mask (N, L), image (N, 1+P, Wv)
        h = self.norm1(h + self.drop(self.self_attn(h, key_mask=mask)))   # every token sees every real token
        if self.cross_attn is not None:
            # every text token sees every image token
            h = self.norm_cross(h + self.drop(self.cross_attn(h, image)))
        return self.norm2(h + self.drop(self.mlp(h)))


def build_model(args, tokenizer):
    return CODIS(args, tokenizer)


# ============================== losses (the method) ==========================================
@torch.no_grad()
def momentum_update(pairs, m):
    """θ′ ← m θ′ + (1 − m) θ for every (online, momentum) module pair. Plain form, one parameter pair at a time:
    `for p, p_m in zip(online, momentum): p_m.mul_(m).add_(p, alpha=1 − m)`; the two foreach calls below do
    the same to all tensors at once (GPU notes), bit for bit (tests/test_sync.py,
    test_foreach_momentum_update_is_the_per_tensor_loop)."""
    online = [p.detach() for o, _ in pairs for p in o.parameters()]   # θ, in the order of ...
    momentum = [p for _, o_m in pairs for p in o_m.parameters()]      # ... θ′ (a deep copy: same order)
    # θ′ ← m θ′ + (1 − m) θ
    torch._foreach_mul_(momentum, m)
    torch._foreach_add_(momentum, online, alpha=1 - m)


def check_queue(queue_size, batch_size):
    if queue_size % batch_size:
        fix = max(1, round(queue_size / batch_size)) * batch_size
        raise ValueError(f"--queue-size {queue_size} is not a multiple of --batch-size {batch_size}: each "
                         f"step replaces the oldest {batch_size} entries, so the queue must hold a whole "
                         f"number of batches (e.g. --queue-size {fix})")


@torch.no_grad()
def dequeue_and_enqueue(image_queue, text_queue, queue_ptr, image_feat_m, text_feat_m):
    """FIFO queues as ring buffers (M, E): this batch's N momentum features overwrite the N oldest rows.
    Plain form: ptr = int(queue_ptr); queue[ptr:ptr + N] = features; queue_ptr = (ptr + N) % M. Here the rows
    are an index computed from the pointer on the device (GPU notes)."""
    n = len(image_feat_m)
    check_queue(len(image_queue), n)
    rows = queue_ptr + torch.arange(n, device=queue_ptr.device)  # (N,) ptr..ptr+N−1 held the oldest: dequeued
    image_queue.index_copy_(0, rows, image_feat_m.to(image_queue.dtype))
    text_queue.index_copy_(0, rows, text_feat_m.to(text_queue.dtype))
    queue_ptr.add_(n).remainder_(len(image_queue))               # the next oldest; 0 again after M / N steps


def distill_targets(s_m, alpha):
    """Pseudo-targets of one direction: s_m (N, N+M) is s′, the momentum model's similarities (already / τ);
    row j's positive is column j."""
    onehot = torch.zeros_like(s_m)
    onehot.fill_diagonal_(1)                               # (N, N+M), 1 at (j, j)
    # y = α·softmax(s′) + (1 − α)·onehot
    return alpha * F.softmax(s_m, dim=1) + (1 - alpha) * onehot


def distilled_nce(z, z_m, keys, temp, alpha):
    """One direction of ITC: online queries z (N, E) against keys (N+M, E) = [momentum batch ; queue],
    query j's positive is key j; the soft targets come from the momentum queries z_m (N, E). Returns (H, s)
    with s (N, N+M)."""
    with torch.autocast(z.device.type, enabled=False):  # fp32 logits under bf16/fp16 autocast too
        with torch.no_grad():  # the momentum model's own similarities give the soft targets
            y = distill_targets(z_m.float() @ keys.float().t() / temp, alpha)     # (N, N+M)
        # s_k = ⟨z, key_k⟩ / τ, e.g. s^i2t_k = ⟨g_v(v̄), g′_w(w̄′_k)⟩ / τ                                (N, N+M)
        s = z.float() @ keys.float().t() / temp
        # H(y, p) = −Σ_k y_k log p_k,  p = softmax(s), averaged over the N queries
        return -(y * F.log_softmax(s, 1)).sum(1).mean(), s.detach()


def all_gather_rows(x):
    """Every process's rows of x in rank order, (n, E) -> (N, E) with N = K·n; x itself on one process. No
    gradient: only momentum features (which are not trained) are gathered."""
    if not dist.is_initialized():
        return x
    rows = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, x.contiguous())
    return torch.cat(rows)


@torch.no_grad()
def momentum_keys(z_m, queue):
    """The keys of one ITC direction, (N+M, E): [momentum batch ; queue]. Under torchrun the batch part is the
    whole batch's N momentum features, rolled so that this process's n come first: key j is still query j's
    positive, and the other N − 1 + M keys are the negatives a single process would use (in another order,
    which a softmax ignores)."""
    batch = all_gather_rows(z_m.float())                                  # (N, E) in rank order
    rank = dist.get_rank() if dist.is_initialized() else 0
    return torch.cat([batch.roll(-rank * len(z_m), 0), queue.float()])    # (N+M, E)


def loss_itc(z_v, z_t, z_v_m, z_t_m, image_queue, text_queue, temp, alpha):
    """L_itc of online features z (n, E) against [momentum batch ; queue] (N+M, E) (n = N on one process).
    Returns (loss, s_i2t, s_t2i); their first n columns are this process's own batch."""
    temp = temp.float()
    z_v_all = momentum_keys(z_v_m, image_queue)                   # (N+M, E) keys g′_v(v̄′_k): batch, then queue
    z_t_all = momentum_keys(z_t_m, text_queue)                    # (N+M, E) keys g′_w(w̄′_k)
    h_i2t, s_i2t = distilled_nce(z_v, z_v_m, z_t_all, temp, alpha)
    h_t2i, s_t2i = distilled_nce(z_t, z_t_m, z_v_all, temp, alpha)
    # L_itc = ½ [ H(y^i2t, p^i2t) + H(y^t2i, p^t2i) ]
    return 0.5 * (h_i2t + h_t2i), s_i2t, s_t2i


def loss_ica(z_v, z_t, z_v_m, z_t_m, image_queue, text_queue, temp, alpha, intra=True):
    """L_ica: ALBEF's cross-modal L_itc plus the intra-modal i2i and t2t against the same queues (N+M keys
    each)."""
    cross, s_i2t, s_t2i = loss_itc(z_v, z_t, z_v_m, z_t_m, image_queue, text_queue, temp, alpha)
    if not intra:
        return cross, s_i2t, s_t2i
    z_v_all = momentum_keys(z_v_m, image_queue)                   # (N+M, E) keys z′_v,k: batch, then queue
    z_t_all = momentum_keys(z_t_m, text_queue)                    # (N+M, E) keys z′_t,k
    h_i2i, _ = distilled_nce(z_v, z_v_m, z_v_all, temp.float(), alpha)
    h_t2t, _ = distilled_nce(z_t, z_t_m, z_t_all, temp.float(), alpha)
    # L_ica = ½[H(y^i2t, p^i2t) + H(y^t2i, p^t2i)] + ½[H(y^i2i, p^i2i) + H(y^t2t, p^t2t)]
    return cross + 0.5 * (h_i2i + h_t2t), s_i2t, s_t2i


@torch.no_grad()
def ipot(cost, mu, nu, beta=0.5, n_outer=50, n_inner=1):
    """Inexact proximal point optimal transport (Xie et al., UAI 2019, Algorithm 1), general marginals.

    cost D (N, K) ≥ 0, marginals mu (N,), nu (K,) of equal mass. Returns the plan T (N, K) that approaches
    argmin ⟨T, D⟩ over the plans with T 1 = μ, Tᵀ 1 = ν: Tᵀ 1 = ν holds exactly (σ is updated last), T 1 = μ in
    the limit (with one inner step per outer step the row sums are close to μ, not equal). Each outer step is
    one Sinkhorn projection of A ⊙ T^(t), i.e. a proximal step min ⟨T, D⟩ + β·KL(T ‖ T^(t)), so T converges to
    the exact optimum where Sinkhorn's plan stays blurred by β. fp32 with autocast off. Each row of D is
    shifted by its minimum before exp: scaling a row of A is absorbed by δ, so the plan is unchanged, and no
    row of A underflows. CODIS's printed δ = μ / (n Q σ), σ = ν / (n Qᵀ δ) (μ, ν probability vectors,
    n = N = K) are these updates with marginals μ/n, ν/n: its plan is ours / n, mass 1/n.
    """
    with torch.autocast(cost.device.type, enabled=False):
        D, mu, nu = cost.float(), mu.float(), nu.float()
        b = torch.full_like(nu, 1.0 / len(nu))                      # line 2: σ = 1/K · 1
        T = torch.ones_like(D)                                      # line 2: T^(1) = 1 1ᵀ
        # line 3: A_ij = exp(−D_ij / β), row-shifted
        A = torch.exp(-(D - D.min(1, keepdim=True).values) / beta)
        for _ in range(n_outer):                                    # line 4: for t = 1, 2, 3, ...
            # line 5: Q = A ⊙ T^(t) (in place: T is done)
            Q = T.mul_(A)
            for _ in range(n_inner):                                # line 6: inner steps, σ warm-started
                a = mu / (Q @ b)                                    # line 7: δ = μ / (Q σ)
                b = nu / (a @ Q)                                    # line 7: σ = ν / (Qᵀ δ)
            T = Q.mul_(a[:, None]).mul_(b)                          # line 9: T^(t+1) = diag(δ) Q diag(σ)
    return T                                                        # line 11


def swapped_prediction(z, codebook, plan, gamma):
    """H(T̂, P) = −mean_j Σ_k T̂_jk log P_jk: student features z (N, E) of one modality predict the plan
    (N, K) computed from the other modality; codebook (K, E) unit rows."""
    target = plan / plan.sum(1, keepdim=True)                      # (N, K) T̂: rows renormalized to distributions
    # P = SoftMax(Z Cᵀ / γ)                                                                     (N, K)
    log_p = F.log_softmax(z.float() @ codebook.float().t() / gamma, dim=1)
    # H(T̂, P) = −(1/N) Σ_j Σ_k T̂_jk log P_jk                                                   scalar
    return -(target * log_p).sum(1).mean()


def loss_code(z_v, z_t, f_v, f_t, codebook, args):
    """The terms of L_code: student features z (n, E), plan features f (n, E) (teacher or student), the
    codebook C (K, E), which comes in with unit rows: the caller normalizes the parameter (compute_losses:
    F.normalize(model.codebook)), so normalizing C again here changes nothing. The plans are the whole
    batch's: under torchrun f is gathered from every process (the marginals balance the codewords over all
    N features), and each student predicts its own rows of them."""
    f_v, f_t = all_gather_rows(f_v.detach()), all_gather_rows(f_t.detach())  # (N, E): no gradient through f
    o = dist.get_rank() * len(z_v) if dist.is_initialized() else 0          # this process's plan rows: o + j
    n, k, codebook = len(f_v), len(codebook), codebook.float()
    mu, nu = f_v.new_full((n,), 1 / n, dtype=torch.float32), f_v.new_full((k,), 1 / k, dtype=torch.float32)
    with torch.autocast(f_v.device.type, enabled=False):  # costs, plans and predictions in fp32
        # D = 1 − ⟨z, c⟩ (N, K): the features are fixed here, the gradient of ⟨T, D⟩ goes to the codebook
        d_v, d_t = 1 - f_v.detach().float() @ codebook.t(), 1 - f_t.detach().float() @ codebook.t()
        t_i2p = ipot(d_v, mu, nu, args.ipot_beta, args.ipot_outer, args.ipot_inner)   # (N, K) image plan
        t_t2p = ipot(d_t, mu, nu, args.ipot_beta, args.ipot_outer, args.ipot_inner)   # (N, K) text plan
        return {  # the plans swapped: each modality's student predicts the other modality's plan
            # L_ot = ⟨T, D⟩ per modality: ⟨T_i2p, D_v⟩ and ⟨T_t2p, D_t⟩                                 scalars
            "ot_v": (t_i2p * d_v).sum(), "ot_t": (t_t2p * d_t).sum(),
            # L_t2p = H(T̂_i2p, P_t2p): the text student predicts the image plan
            "t2p": swapped_prediction(z_t, codebook, t_i2p[o:o + len(z_t)], args.code_temp),
            # L_i2p = H(T̂_t2p, P_i2p): the image student predicts the text plan
            "i2p": swapped_prediction(z_v, codebook, t_t2p[o:o + len(z_v)], args.code_temp)}


def code_perplexity(counts):
    """exp(entropy) of the nearest-codeword histogram: 1 = every feature on one codeword, K = all used
    equally."""
    p = counts[counts > 0] / counts.sum()
    return math.exp(-(p * p.log()).sum().item()) if len(p) else 0.0


def mask_tokens(input_ids, vocab_size, mask_id, special_ids, prob=0.15):
    """BERT masking: each real token is chosen with probability `prob`, never [PAD]/[CLS]/[SEP] (special_ids);
    a chosen token becomes [MASK] (80%), a random id (10%) or stays (10%). Returns (masked ids, labels):
    labels hold the original id at the chosen positions and −100 elsewhere. Draws from the global RNG."""
    ids, device = input_ids, input_ids.device                                    # (N, L)
    special_ids = torch.as_tensor(special_ids, device=device)                   # the model's buffer: no copy
    special = (ids[..., None] == special_ids).any(-1)                            # (N, L) [PAD], [CLS], [SEP]
    chosen = (torch.rand(ids.shape, device=device) < prob) & ~special           # (N, L) the tokens to predict
    labels = ids.masked_fill(~chosen, -100)
    r = torch.rand(ids.shape, device=device)                                    # one draw decides 80/10/10
    random_ids = torch.randint(vocab_size, ids.shape, device=device)
    ids = torch.where(chosen & (r < 0.8), mask_id, ids)                         # 80% [MASK]
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, ids)         # 10% a random id, 10% kept
    return ids, labels


def loss_mlm(logits, logits_m, labels, alpha):
    """logits, logits_m (..., V) of the online and momentum fusion encoders at every token; labels (...) hold
    the original id at the K masked tokens and −100 at the others, ignored (as in BERT's own MLM head)."""
    logits, logits_m = logits.flatten(0, -2).float(), logits_m.flatten(0, -2).float()  # (N·L, V)
    labels = labels.flatten()                                            # (N·L,)
    at = (labels != -100).float()                                        # (N·L,) 1 at the K masked tokens
    # H(y^msk, p^msk): cross-entropy with the original tokens (0 where ignored)                  (N·L,)
    ce = F.cross_entropy(logits, labels, reduction="none")
    # H(p′^msk, p^msk): cross-entropy with the momentum model's prediction                          (N·L,)
    distill = -(F.softmax(logits_m, -1) * F.log_softmax(logits, -1)).sum(-1)
    # L_mlm = (1 − α)·H(y^msk, p^msk) + α·H(p′^msk, p^msk), the mean over the K masked tokens (0 if K = 0)
    return (((1 - alpha) * ce + alpha * distill) * at).sum() / at.sum().clamp(min=1)


@torch.no_grad()
def hard_negatives(s_i2t, s_t2i, same=None, eps=1e-4):
    """For each image a negative text and for each text a negative image, drawn ∝ in-batch softmax similarity.

    s_i2t, s_t2i (N, N) in-batch similarities; same (N, N) bool, pairs that must never be drawn (default the
    diagonal; the trainer passes 'same image'). Returns (neg_text_of_image (N,), neg_image_of_text (N,))."""
    same = torch.eye(len(s_i2t), dtype=torch.bool, device=s_i2t.device) if same is None else same
    # w_jk = softmax_k(s_jk) + ε (after the softmax: every row keeps mass), 0 for the positive(s)
    w_i2t = (F.softmax(s_i2t.float(), dim=1) + eps).masked_fill(same, 0)
    w_t2i = (F.softmax(s_t2i.float(), dim=1) + eps).masked_fill(same, 0)
    # one draw per row ∝ w. Plain form: torch.multinomial(w, 1).squeeze(1); sample_rows draws the same indices
    # (GPU notes; tests/test_sync.py, test_sample_rows_draws_what_multinomial_draws)
    return sample_rows(w_i2t), sample_rows(w_t2i)


def sample_rows(w):
    """One column per row of w (N, K) ≥ 0, column k with probability w_jk / Σ_k' w_jk', by Gumbel-max:
    argmax_k (log w_jk + g_jk) with g = −log E standard Gumbel noise, E ~ Exp(1), i.e. argmax_k w_jk / E_jk.
    This is how torch.multinomial(w, 1) draws too: the same draws from the same RNG state. A zero weight is
    never drawn (scored 0, also where a draw E is 0); a row of zeros is an error, checked on the device."""
    torch._assert_async((w > 0).any(1).all(), "hard negatives: a row with nothing to draw (one image)")
    e = torch.empty_like(w).exponential_()                                # (N, K) E ~ Exp(1)
    return torch.where(w > 0, w / e, 0).argmax(1)                         # (N,)


def loss_itm(itm_logits, n):
    """itm_logits (3N, 2) of [N positives ; N (text, negative image) ; N (negative text, image)]."""
    labels = (torch.arange(3 * n, device=itm_logits.device) < n).long()  # (3N,) y^itm: 1, 0, 0
    # L_itm = H(y^itm, p^itm(I, T))
    return F.cross_entropy(itm_logits.float(), labels)


def compute_losses(model, batch, args, alpha):
    """One CODIS forward: every loss term (terms['loss'] is optimized); enqueues the momentum features."""
    image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    n = len(image)
    # ---- unimodal encoders: the image, and the text alone (first BERT layers)
    v = model.visual(image)                                             # (N, 1+P, Wv) image tokens, v[:, 0] = [CLS]
    w = model.bert.encode_text(ids, mask)                               # (N, L, W) text-only states
    z_v = F.normalize(model.vision_proj(model.pool(v)), dim=-1)         # (N, E) g_v(v̄)
    z_t = F.normalize(model.text_proj(model.pool(w, mask)), dim=-1)     # (N, E) g_w(w̄)
    with torch.no_grad():  # the momentum model on the same inputs: z_v_m = g′_v(v̄′), z_t_m = g′_w(w̄′) (N, E)
        v_m = model.visual_m(image)                                     # (N, 1+P, Wv)
        z_v_m = F.normalize(model.vision_proj_m(model.pool(v_m)), dim=-1)
        z_t_m = F.normalize(model.text_proj_m(model.pool(model.bert_m.encode_text(ids, mask), mask)), dim=-1)

    # ---- L_ica: cross- and intra-modal alignment against [momentum batch ; queue], with momentum
    # distillation
    terms = {}
    # L_ica = ½[H(y^i2t, p^i2t) + H(y^t2i, p^t2i)] + ½[H(y^i2i, p^i2i) + H(y^t2t, p^t2t)]   s_i2t (N, N+M)
    terms["ica"], s_i2t, s_t2i = loss_ica(z_v, z_t, z_v_m, z_t_m, model.image_queue, model.text_queue,
                                          model.temp, alpha, args.intra)

    # ---- MLM: the fusion encoder (last BERT layers + cross-attention) predicts the masked tokens; every token
    # is scored and the unmasked ones are ignored (labels −100), as in BERT's MLM head and ALBEF's code
    masked_ids, labels = mask_tokens(ids, model.vocab_size, model.mask_id, model.special_ids, args.mlm_prob)
    h = model.bert.fuse(model.bert.encode_text(masked_ids, mask), mask, v)          # (N, L, W)
    with torch.no_grad():
        h_m = model.bert_m.fuse(model.bert_m.encode_text(masked_ids, mask), mask, v_m)
        logits_m = model.bert_m.mlm_logits(h_m)                         # (N, L, V)
    # L_mlm = (1 − α)·H(y^msk, p^msk(I, T̂)) + α·H(p′^msk(I, T̂), p^msk(I, T̂))     at the masked tokens
    terms["mlm"] = loss_mlm(model.bert.mlm_logits(h), logits_m, labels, alpha)

    # ---- ITM with hard negatives: N positive pairs, N (text, negative image), N (negative text, image)
    same = batch["index"][:, None] == batch["index"][None, :]          # (N, N) same image: never a negative
    neg_text, neg_image = hard_negatives(s_i2t[:, :n], s_t2i[:, :n], same)
    h_itm = model.bert.fuse(torch.cat([w, w, w[neg_text]]), torch.cat([mask, mask, mask[neg_text]]),
                            torch.cat([v, v[neg_image], v]))           # (3N, L, W)
    # L_itm = H(y^itm, p^itm(I, T)) over the 3N pairs, labels (1, 0, 0)          logits (3N, 2)
    terms["itm"] = loss_itm(model.itm_head(h_itm[:, 0]), n)

    # ---- the codebook: transport plans from the teacher (or student) features, swapped prediction by students
    codebook = F.normalize(model.codebook, dim=-1)                     # (K, E) unit codewords
    f_v, f_t = (z_v_m, z_t_m) if args.plan_features == "teacher" else (z_v, z_t)
    # L_ot(Z′_v, C), L_ot(Z′_t, C), L_t2p(Z_t, C, T_i2p), L_i2p(Z_v, C, T_t2p): ot_v, ot_t, t2p, i2p, scalars
    terms.update(loss_code(z_v, z_t, f_v, f_t, codebook, args))
    # L_code = L_ot(Z′_v, C) + L_ot(Z′_t, C) + L_t2p(Z_t, C, T_i2p) + L_i2p(Z_v, C, T_t2p)
    terms["code"] = terms["ot_v"] + terms["ot_t"] + terms["t2p"] + terms["i2p"]
    # codebook health: each student feature's nearest codeword, counted until the next log
    with torch.no_grad():
        nearest = (torch.cat([all_gather_rows(z_v), all_gather_rows(z_t)]).float() @ codebook.t()).argmax(1)
        # a histogram by index_add_ (GPU notes)
        model.code_counts.index_add_(0, nearest, torch.ones_like(nearest, dtype=model.code_counts.dtype))

    # ---- after the loss: the momentum features of the whole batch (every process's) replace the oldest entries
    dequeue_and_enqueue(model.image_queue, model.text_queue, model.queue_ptr, all_gather_rows(z_v_m),
                        all_gather_rows(z_t_m))
    # L = L_mlm + L_itm + L_ica + λ_code L_code   (λ_code = 0.3 here; the paper's sum has 1)
    terms["loss"] = terms["mlm"] + terms["itm"] + terms["ica"] + args.code_weight * terms["code"]
    return terms


def alpha_at(step, args, steps_per_epoch):
    """α ramped linearly from 0 over --alpha-ramp steps (-1: one epoch, as in the reference)."""
    ramp = steps_per_epoch if args.alpha_ramp < 0 else args.alpha_ramp
    return args.alpha * min(1.0, step / ramp) if ramp > 0 else args.alpha


# ---- GPU notes. A few lines above take a longer road than their plain form so that a training step never
# waits for the GPU (a host sync: the CPU reading a value the GPU has not computed yet). Each gives the result
# of its plain form; tests/test_sync.py checks the results and that a step does not sync:
# - momentum_update: two foreach calls for all tensors (a few kernel launches), not a Python loop with two
#   launches per tensor, over hundreds of tensors.
# - dequeue_and_enqueue: the queue pointer stays on the device and the rows are an index computed from it;
#   the plain form reads int(queue_ptr).
# - mask_tokens: whole (N, L) masks and torch.where, no boolean-mask indexing (its result size is read by
#   the host). compute_losses scores MLM at every token (N·L·V logits, ≥ 1/0.15 ≈ 7× the K·V at the masked
#   tokens) for the same reason: h[masked] has a size K that the host must read.
# - sample_rows: Gumbel-max instead of torch.multinomial, which checks its weights on the host (two syncs);
#   torch._assert_async keeps the one check that matters, a row with nothing to draw, on the device.
# - compute_losses counts the nearest codewords with index_add_, not torch.bincount, which sizes its output
#   by the largest id (a sync).


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
    # torch.compile in place, per layer: the state dict keeps its names. Static shapes: captions are padded to
    # --max-len, so each layer compiles once for N and once for ITM's 3N pairs
    if args.compile:
        for m in model.modules():
            if isinstance(m, (ViTBlock, BertLayer)):
                m.compile(dynamic=False)
    fwd_model = model
    if world > 1:  # DDP synchronizes the gradients of what runs in its forward: there, all of compute_losses
        fwd_model = nn.parallel.DistributedDataParallel(LossInForward(fwd_model, compute_losses))
    loader = data.train_loader(train_set, tokenizer, args, args.batch_size, args.seed, start_step=step,
                               second_view=False, pad_to_max=args.compile, rank=rank, world=world)
    print_0 = print if rank == 0 else (lambda *a, **k: None)  # one process speaks
    n_online, n_momentum = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                            sum(p.numel() for p in model.momentum_parameters()))
    print_0(f"{script}: {n_online / 1e6:.2f}M trained parameters (+ {n_momentum / 1e6:.2f}M in the momentum "
            f"copy), {len(train_set)} training images, {args.steps} steps of {args.batch_size} on {device} "
            f"({args.precision}) -> {run_dir}")
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

    eval_transform = data.eval_transform(args.image_size)  # the images of evaluation: resize and normalize

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
            batch, skipped = data.to_device(batch, device)
            n_skipped += skipped
            alpha = alpha_at(step, args, steps_per_epoch)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # under torchrun the same call, inside DDP's forward (LossInForward)
                terms = fwd_model(batch, args, alpha) if world > 1 else compute_losses(fwd_model, batch, args, alpha)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():  # τ ∈ [0.001, 0.5]
                model.temp.clamp_(0.001, 0.5)
            momentum_update(model.momentum_pairs(), args.momentum)  # θ′ ← m θ′ + (1 − m) θ
            window.append(torch.stack([v.detach().float() for v in terms.values()]))
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or step == end:
                check_finite()
                now, values = time.perf_counter(), window[-1].tolist()  # the one host sync of a logging step
                window.clear()
                row = {"step": step, **{f"loss_{k}" if k != "loss" else k: v for k, v in zip(terms, values)},
                       "logit_scale": 1 / model.temp.item(), "alpha": alpha, "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": args.batch_size * (step - last_step) / (now - t_log),
                       "peak_mem_mib": peak_memory_mib(device), "skipped_images": n_skipped,
                       "codes_used": int((model.code_counts > 0).sum()),
                       "code_perplexity": code_perplexity(model.code_counts)}
                model.code_counts.zero_()
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

    # ---- final evaluation on the --eval-split split (test by default) (eval.py: encode_image / encode_text,
    # and itm_score to rerank)
    # a signal now stops at once: the checkpoint is complete, and eval.py computes the metrics from it
    with StopOnSignal(at_once=f"the checkpoint {ckpt_path} of step {step} is complete; compute the metrics "
                              f"with python eval.py {run_dir} --save"):
        metrics = ev.evaluate(model, tokenizer, suite, eval_transform, device, args.max_len,
                              args.precision, itm_k=args.itm_k, num_workers=args.num_workers)
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

# ---- appendix A. encoders: attention, ViT (the BERT of ALBEF is in the method section)
class Attention(nn.Module):
    """Multi-head attention of the queries x over the keys/values y: y = x is self-attention, y = image tokens
    cross-attention. Bidirectional: key_mask (N, Lk) only hides padding; there is no causal mask anywhere."""

    def __init__(self, width, heads, kv_width=None):
        super().__init__()
        self.heads = heads
        self.q, self.o = nn.Linear(width, width), nn.Linear(width, width)
        self.k, self.v = nn.Linear(kv_width or width, width), nn.Linear(kv_width or width, width)

    # x (N, Lq, D), y (N, Lk, Dk), key_mask (N, Lk) 1 = real token
    def forward(self, x, y=None, key_mask=None):
        y = x if y is None else y
        n, lq, d = x.shape
        # (N, L, D) -> (N, h, L, D/h)
        split = lambda t: t.view(n, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        mask = None if key_mask is None else key_mask[:, None, None, :].bool()         # (N, 1, 1, Lk)
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(y)), split(self.v(y)),
                                             attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(n, lq, d))                           # (N, Lq, D)


def run_layer(layer, *inputs, checkpointed=False):
    """layer(*inputs); with --grad-checkpoint its activations are recomputed in the backward pass, not
    stored."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *inputs, use_reentrant=False)
    return layer(*inputs)


def mlp(width, hidden):
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class ViTBlock(nn.Module):
    """Pre-norm transformer block of a ViT: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), mlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Image → P patches → P tokens (one linear map per patch, or a small CNN per patch grid cell) → [CLS]
    prepended → transformer blocks → (N, 1+P, width)."""

    def __init__(self, image_size, patch, width, depth, heads, stem="linear"):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"--image-size {image_size} is not a multiple of the ViT patch size {patch}")
        self.patch, self.width, n_patches = patch, width, (image_size // patch) ** 2
        if stem == "linear":
            self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)  # a linear map of each p×p×3 patch
        # conv: log2(p) stages of two 3×3 convolutions (the first with stride 2), then 1×1: same token grid
        else:
            chans, layers = [3] + [32 * 2 ** k for k in range(int(math.log2(patch)))], []
            for cin, cout in zip(chans, chans[1:]):
                layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                           nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            self.patch_embed = nn.Sequential(*layers, nn.Conv2d(chans[-1], width, 1))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_patches, width) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.grad_checkpoint = False

    def forward(self, images):                                   # (N, 3, H, W)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, P, width): one token per patch
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed  # (N, 1+P, width)
        for block in self.blocks:
            x = run_layer(block, x, checkpointed=self.grad_checkpoint)
        return self.norm(x)                                      # token 0 is [CLS]


def init_weights(module):
    """N(0, 1/fan_in) linear weights (LeCun), N(0, 0.02) embeddings, zero biases; LayerNorms stay at 1, 0.
    The word embeddings are tied to the MLM decoder, a Linear visited after them, so they end at
    N(0, 1/width).

    Not BERT's N(0, 0.02) everywhere: a matrix at std 0.02 scales a unit-variance input by 0.02·√width, 0.55 at
    BERT's width 768 but 0.23 at 128, and an attention output passes through two such matrices (value, output):
    at width 128 it starts far smaller than the residual stream, so the [CLS] state barely depends on the
    other tokens and all captions start with nearly the same ITC feature (docs/albef_fusion.md shows the
    sizes and what it does to ITC). At N(0, 1/fan_in) each matrix keeps the scale of its input at any width.
    Pretrained weights overwrite it.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


# ---- appendix B. pretrained weights
TV_VITS = {"vit_b_16": (16, 768, 12, 12), "vit_b_32": (32, 768, 12, 12), "vit_l_16": (16, 1024, 24, 16),
           "vit_l_32": (32, 1024, 24, 16)}  # torchvision name -> (patch, width, depth, heads)


def load_torchvision_vit(vit, tv_state):
    """Copy a torchvision VisionTransformer state dict into our ViT (position grid resized if needed)."""
    sd = {"patch_embed.weight": tv_state["conv_proj.weight"], "patch_embed.bias": tv_state["conv_proj.bias"],
          "cls_token": tv_state["class_token"], "norm.weight": tv_state["encoder.ln.weight"],
          "norm.bias": tv_state["encoder.ln.bias"]}
    pos = tv_state["encoder.pos_embedding"]                              # (1, 1+G*G, width)
    g_old, g_new = math.isqrt(pos.shape[1] - 1), math.isqrt(vit.pos_embed.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)  # (1, width, G, G)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    sd["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1)], 1)
    for i in range(len(vit.blocks)):
        src, dst = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.o", "self_attention.out_proj"),
                     ("mlp.0", "mlp.0"), ("mlp.2", "mlp.3")):
            for t in ("weight", "bias"):
                sd[f"{dst}{a}.{t}"] = tv_state[f"{src}{b}.{t}"]
        for t in ("weight", "bias"):  # torchvision packs q, k, v into one in_proj
            for name, part in zip("qkv", tv_state[f"{src}self_attention.in_proj_{t}"].chunk(3)):
                sd[f"{dst}attn.{name}.{t}"] = part
    vit.load_state_dict(sd)


def build_vision(args):
    if args.vision == "vit":
        vit = ViT(args.image_size, args.vit_patch, args.vit_width, args.vit_depth, args.vit_heads, args.vit_stem)
        init_weights(vit)
        return vit
    if args.vision not in TV_VITS:
        raise ValueError(f"--vision {args.vision!r}: choose vit or one of {', '.join(TV_VITS)}")
    vit = ViT(args.image_size, *TV_VITS[args.vision])
    init_weights(vit)
    if args.pretrained_vision:
        import torchvision
        try:
            tv = getattr(torchvision.models, args.vision)(weights="DEFAULT")
        except Exception as e:  # noqa: BLE001 - no network
            raise RuntimeError(f"could not load the torchvision weights of {args.vision!r}: {e}. Without the "
                               f"network, put the weights file in $TORCH_HOME/hub/checkpoints/ or drop "
                               f"--pretrained-vision.") from e
        load_torchvision_vit(vit, tv.state_dict())
    return vit


def load_hf_bert(bert, hf_state):
    """Copy a Hugging Face BertForMaskedLM state dict into our Bert: layer i < text_layers goes to the text
    encoder, the rest to the fusion encoder (whose cross-attentions stay freshly initialized, as in ALBEF)."""
    p = "bert.embeddings."
    # BERT adds token_type_embeddings[0] to every token of a single sentence: fold it into the positions
    sd = {"word_emb.weight": hf_state[p + "word_embeddings.weight"],
          "pos_emb.weight": hf_state[p + "position_embeddings.weight"]
          + hf_state[p + "token_type_embeddings.weight"][0],
          "emb_norm.weight": hf_state[p + "LayerNorm.weight"],
          "emb_norm.bias": hf_state[p + "LayerNorm.bias"]}
    for i in range(len(bert.text_layers) + len(bert.fusion_layers)):
        n_text = len(bert.text_layers)
        dst = f"text_layers.{i}." if i < n_text else f"fusion_layers.{i - n_text}."
        for a, b in (("self_attn.q", "attention.self.query"), ("self_attn.k", "attention.self.key"),
                     ("self_attn.v", "attention.self.value"), ("self_attn.o", "attention.output.dense"),
                     ("norm1", "attention.output.LayerNorm"), ("mlp.0", "intermediate.dense"),
                     ("mlp.2", "output.dense"), ("norm2", "output.LayerNorm")):
            for t in ("weight", "bias"):
                sd[f"{dst}{a}.{t}"] = hf_state[f"bert.encoder.layer.{i}.{b}.{t}"]
    head = {"mlm_transform.0": "transform.dense", "mlm_transform.2": "transform.LayerNorm"}
    for a, b in head.items():
        for t in ("weight", "bias"):
            sd[f"{a}.{t}"] = hf_state[f"cls.predictions.{b}.{t}"]
    sd["mlm_decoder.bias"] = hf_state["cls.predictions.bias"]
    missing, unexpected = bert.load_state_dict(sd, strict=False)
    assert not unexpected and all(".cross_attn." in k or ".norm_cross." in k or k == "mlm_decoder.weight"
                                  for k in missing), (missing, unexpected)


def build_bert(args, vocab_size, image_width):
    if not args.text_model:
        bert = Bert(vocab_size, args.text_width, args.text_heads, args.text_layers, args.fusion_layers,
                    image_width, max(64, args.max_len), dropout=args.dropout)
        init_weights(bert)
        return bert
    from transformers import BertForMaskedLM
    try:
        hf = BertForMaskedLM.from_pretrained(args.text_model)
    except OSError as e:
        raise OSError(f"text model {args.text_model!r} not found ({e}): give a local folder "
                      f"(save_pretrained output) or download it once with network access.") from e
    c = hf.config
    if not 0 < args.text_layers < c.num_hidden_layers:
        raise ValueError(f"--text-layers {args.text_layers}: {args.text_model} has {c.num_hidden_layers} "
                         f"layers; keep at least one for the fusion encoder")
    bert = Bert(c.vocab_size, c.hidden_size, c.num_attention_heads, args.text_layers,
                c.num_hidden_layers - args.text_layers, image_width, c.max_position_embeddings,
                c.intermediate_size, args.dropout)
    init_weights(bert)
    load_hf_bert(bert, hf.state_dict())
    return bert


# ---- appendix C. optimizer, checkpoint, RNG
def make_optimizer(model, args, device):
    # the momentum model is excluded
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
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



# ---- appendix D. many processes (torchrun; see docs/distributed.md)
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
