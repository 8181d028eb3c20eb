"""Every metric, the comparison table and the plots, for any method script and any saved run.

eval.py sees a model only through the contract that every method script's model honours:
    model.encode_image(images (N,3,H,W))                     -> (N, d), L2-normalized
    model.encode_text(input_ids, attention_mask (N,L))       -> (N, d), L2-normalized
    optional  encode_image_indep / encode_text_indep (same signatures): sep.py's independent features z^i
    optional  itm_score(images, input_ids, attention_mask)   -> (N,)  fusion models: the ITM "match" score
    optional, with itm_score: image_tokens(images) -> (N, T, D) and itm_score_tokens(tokens, input_ids,
              attention_mask) -> (N,), the same score split in two, so that reranking encodes each image once

Protocols
- Retrieval, R@k in percent, named by direction: i2t (image query, caption candidates) and t2i.
  With several captions per image, the rank of a query is the number of NEGATIVE candidates scoring at
  least as high as its best-scoring positive, and R@k counts the queries with rank < k. i2t: the positives
  are all the image's captions (a hit if ANY of them is in the top k); t2i: the one positive is the
  caption's own image. Ties go against the query: a negative tied with the best positive is ordered before
  it (and before every positive it ties with), so a model that gives every candidate the same score (e.g.
  constant features) has R@1 = 0, never 100. Common evaluation code (open_clip's training-time retrieval
  metrics sort with torch.argsort, CLIP_benchmark's recall_at_k takes torch.topk) leaves ties to whatever
  order the sort returns; with continuous features ties have probability zero and every rule gives the
  same numbers. rsum = the sum of the six recalls.
- ITM reranking (fusion models, keys retrieval_itm/*): each query's top-k candidates by the ITC cosine are
  reordered by model.itm_score of the (image, caption) pair; the candidates outside the top k follow them
  in ITC order. Ties go against the query at both stages: a negative tied with a positive at the k-th ITC
  score enters the top k first, and a negative tied with the best positive in the order below counts
  before it. R@k is then read off that order exactly as above (a query's rank = the number of negatives
  ordered before its best positive). Each distinct pair is scored once, each image loaded once, and
  encoded once when the model has image_tokens / itm_score_tokens.
- Zero-shot classification (CLIP's prompt ensemble): each template is filled with each class name,
  the text features are L2-normalized, averaged over the templates and re-normalized, giving one
  classifier row per class; logits are cosines. Reports top-1/3/5 and balanced accuracy (the mean
  per-class recall over the classes present). Ties go against the image: an image is a top-k hit when
  fewer than k other classes have a logit at least as high as its true class's, and is predicted
  correctly (balanced accuracy) only when its true class is strictly the highest. Targets equal to -1
  are ignored.
- Linear probe: multinomial logistic regression on frozen features standardized with the training
  mean/std, full-batch L-BFGS from zero weights (no randomness, so deterministic). Every weight decay
  of the sweep is fitted on train and scored on val; the first one with the best val accuracy wins, the
  probe is refit on train+val with it and its test accuracy reported. Text probes use each caption,
  labelled with its image's label. Models with independent features are probed on z and on [z, z^i]
  (feature names "z" and "z+zi").
- Structure of the retrieval set's embeddings: modality gap = ||mean_i x_i - mean_k y_k|| (centroid
  distance, Liang et al. 2022); alignment = mean over matched pairs ||x - y||^2 and uniformity =
  log mean_{i!=j} exp(-2 ||u_i - u_j||^2) per modality (Wang & Isola 2020); matched cosine = mean <x, y>.

- Periodic validation during training (validate, keys val/...; the trainers pass the validation split):
  retrieval R@1 both ways and rsum, and zero-shot top-1, on at most 1,000 images of each set, plus one score
  val/score = (mean zero-shot top-1 over the label sets + rsum / 6) / 2, in percent.
- Features with a NaN or inf row (a diverged model) are refused with an error naming them: no metric is
  computed on them.

CLI: `python eval.py RUN_DIR [RUN_DIR ...] [--plot] [--save] [--eval-split val] [--data karpathy --data-root DIR]`
re-evaluates saved runs (data flags given override each run's saved ones) and prints one Markdown table.
`--clip NAME_OR_FOLDER` (a Hugging Face CLIP or SigLIP) and `--open-clip ARCH:PRETRAINED` (with open_clip_torch
installed) add pretrained models to the same table, on the same protocols; `RUN_DIR --export DIR` writes a run
as safetensors (a CLIPModel folder for a run started with --init-clip) instead of evaluating it
(docs/pretrained.md). Checkpoints are read with torch.load(weights_only=True) (load_checkpoint): tensors and
plain values only, so loading one, from anywhere, never runs code. Checkpoints are written by save_checkpoint
(fsynced, atomic), and the torchrun helpers the trainers share are at the end of the checkpoint section.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import importlib
import json
import math
import os
import pickle
import re
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ========== Encoding (boilerplate) ================================================================
def pick_device(name: str = "auto") -> torch.device:
    """'auto' = cuda > mps > cpu; any other name is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextlib.contextmanager
def inference(model, device, precision="fp32"):
    """model.eval() + no_grad (+ autocast unless fp32); restores the previous train/eval mode."""
    was_training, dtype = model.training, PRECISIONS[precision]
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            yield
    finally:
        model.train(was_training)


def resolve_workers(num_workers: int) -> int:
    """num_workers >= 0 as given; -1 (auto) resolved by data.resolve_workers, the training loader's rule."""
    if num_workers >= 0:
        return num_workers
    import data  # here, not at the top: the metrics need no dataset code
    return data.resolve_workers(num_workers)


class _Images(torch.utils.data.Dataset):
    """transform(pairset.load_image(i)) for the listed image indices, in order."""

    def __init__(self, pairset, indices, transform):
        self.pairset, self.indices, self.transform = pairset, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        return self.transform(self.pairset.load_image(self.indices[j]))


def image_loader(pairset, transform, device, batch_size=256, num_workers=0, indices=None):
    """DataLoader of (B, 3, H, W) transformed images of a PairSet (all, or `indices`), in order.

    num_workers loader processes (-1 = auto; never more than there are batches); pinned host memory when the
    device is CUDA, so the copy to the device can be non-blocking.
    """
    ds = _Images(pairset, range(len(pairset)) if indices is None else indices, transform)
    workers = min(resolve_workers(num_workers), math.ceil(len(ds) / batch_size))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=torch.device(device).type == "cuda")


def _check_finite(feats, what):
    """Refuse features with NaN/inf rows (a diverged model): no metric is computed on them."""
    bad = int((~torch.isfinite(feats)).any(1).sum()) if feats.numel() else 0
    if bad:
        raise ValueError(f"{what}: {bad} of {len(feats)} feature rows are not finite (NaN or inf), so no metric "
                         f"is computed on them; the model has diverged (see the losses in the run's log.jsonl)")
    return feats


def _encode(model, method, batches, n_batches, device, precision, progress, desc, what):
    """Concatenate model.<method>(*batch) over the batches: (N, d) float32 on the CPU, all rows finite."""
    fn, out = getattr(model, method), []
    with inference(model, device, precision):
        for batch in tqdm(batches, total=n_batches, desc=desc, disable=not progress, leave=False):
            out.append(fn(*(t.to(device, non_blocking=True) for t in batch)).float().cpu())
    return _check_finite(torch.cat(out), f"{method} of {what}")


def encode_images(model, pairset, transform, device, batch_size=256, precision="fp32", indep=False, progress=False,
                  num_workers=0):
    """(N, d) features of every image of a PairSet (indep=True: encode_image_indep); images are loaded by
    num_workers processes (-1 = auto)."""
    loader = image_loader(pairset, transform, device, batch_size, num_workers)
    method = "encode_image_indep" if indep else "encode_image"
    return _encode(model, method, ((x,) for x in loader), len(loader), device, precision, progress,
                   f"encode {pairset.name}", f"the {len(pairset)} images of {pairset.name!r}")


def encode_texts(model, tokenizer, texts, device, max_len, batch_size=512, precision="fp32", indep=False,
                 progress=False, name="texts"):
    """(M, d) features of a list of strings (indep=True: encode_text_indep); `name` says what they are in errors."""
    starts = range(0, len(texts), batch_size)

    def batches():
        for s in starts:
            tok = tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            yield tok["input_ids"], tok["attention_mask"]
    method = "encode_text_indep" if indep else "encode_text"
    return _encode(model, method, batches(), len(starts), device, precision, progress, "encode texts",
                   f"the {len(texts)} {name}")


# ========== Metrics ===============================================================================
def _ranks(queries, cands, q_group, c_group, chunk):
    """Rank of each query = number of negatives scoring at least as high as its best positive.

    A candidate is positive for a query when their group ids are equal. Ties go against the query: a
    negative tied with the best positive counts, as if ordered before it. queries (Q,d), cands (C,d),
    q_group (Q,), c_group (C,) -> (Q,) long. Only a (chunk, C) block is held at a time.
    """
    ranks = []
    for s in range(0, len(queries), chunk):
        sim = queries[s:s + chunk] @ cands.T                                  # (c, C) cosine similarities
        pos = q_group[s:s + chunk, None] == c_group[None, :]                  # (c, C) positives
        best = sim.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)     # (c, 1) best positive score
        ranks.append(((sim >= best) & ~pos).sum(1))                           # (c,) negatives not below it
    return torch.cat(ranks)


def _against_query(scores, pos):
    """float64 copy of float32 scores (c, C) in which every positive is moved half a float32 step down:
    the order of `scores`, except that a negative tied with a positive now comes first. Used to pick the
    top k candidates with ties going against the query."""
    below = torch.nextafter(scores, torch.full_like(scores, float("-inf"))).double()   # next float32 down
    return torch.where(pos, (scores.double() + below) / 2, scores.double())


def retrieval_metrics(img_feats, txt_feats, txt2img, ks=(1, 5, 10), chunk=1024) -> dict:
    """i2t_R@k, t2i_R@k (percent) and rsum; img_feats (N,d), txt_feats (M,d), txt2img (M,) image of each caption."""
    img_feats, txt_feats = img_feats.float(), txt_feats.float()
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)                      # (M,)
    img_ids = torch.arange(len(img_feats))                                     # (N,)
    if torch.bincount(txt2img, minlength=len(img_feats)).min() == 0:
        raise ValueError("retrieval_metrics: every image needs at least one caption")
    ranks = {"i2t": _ranks(img_feats, txt_feats, img_ids, txt2img, chunk),
             "t2i": _ranks(txt_feats, img_feats, txt2img, img_ids, chunk)}
    out = {f"{d}_R@{k}": 100.0 * (r < k).float().mean().item() for d, r in ranks.items() for k in ks}
    out["rsum"] = sum(out.values())
    return out


def _class_ranks(logits, targets):
    """(N,) number of other classes whose logit is at least the target's: ties go against the image."""
    own = logits.gather(1, targets[:, None])                                   # (N, 1) the true class's logit
    return (logits >= own).sum(1) - 1                                          # itself not counted


def topk_accuracy(logits, targets, ks=(1, 3, 5)) -> dict:
    """{'top{k}': percent of rows with fewer than k other classes scoring at least their target's logit}
    (a tie is not a hit); k larger than the number of classes counts every row."""
    rank = _class_ranks(logits, targets)                                       # (N,)
    return {f"top{k}": 100.0 * (rank < k).float().mean().item() for k in ks}


def balanced_accuracy(pred, targets, n_classes) -> float:
    """Mean per-class recall (percent) over the classes present in targets."""
    correct = torch.bincount(targets[pred == targets], minlength=n_classes).float()   # (C,)
    count = torch.bincount(targets, minlength=n_classes).float()                      # (C,)
    present = count > 0
    return 100.0 * (correct[present] / count[present]).mean().item()


def zeroshot_classifier(model, tokenizer, classnames, templates, device, max_len, precision="fp32"):
    """(C, d) prompt-ensemble classifier: w_c = normalize(mean_t normalize(f(template_t.format(c))))."""
    prompts = [t.format(c) for c in classnames for t in templates]              # class-major, C*T
    z = encode_texts(model, tokenizer, prompts, device, max_len, precision=precision, name="class prompts")
    z = F.normalize(z, dim=-1).view(len(classnames), len(templates), -1)     # (C, T, d)
    return F.normalize(z.mean(1), dim=-1)                                      # (C, d)


def zeroshot_metrics(img_feats, weights, targets) -> dict:
    """top1/top3/top5, balanced_acc (percent) and n_classes of cosine logits img_feats (N,d) @ weights (C,d)^T."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    keep = targets != -1
    logits = img_feats[keep].float() @ weights.float().T                     # (N', C)
    targets = targets[keep]
    out = topk_accuracy(logits, targets)
    # the prediction: the target when it is strictly the highest, else a class scoring at least as high
    rival = logits.scatter(1, targets[:, None], float("-inf")).argmax(1)       # (N',) best other class
    pred = torch.where(_class_ranks(logits, targets) == 0, targets, rival)
    out["balanced_acc"] = balanced_accuracy(pred, targets, len(weights))
    out["n_classes"] = float(len(weights))
    return out


def fit_logreg(x, y, n_classes, wd, max_iter=100):
    """Multinomial logistic regression, min_W,b CE(x_s W + b, y) + wd/2 ||W||^2 on x_s = (x - mean)/std.

    x (N,d), y (N,). Full-batch L-BFGS from zeros; the bias is not decayed. Returns predict(x) -> (N,) labels.
    """
    mean, std = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)               # (d,) training statistics
    xs = (x - mean) / std                                                       # (N, d)
    W = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)  # (d, C)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)             # (C,)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ W + b, y) + 0.5 * wd * W.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    W, b = W.detach(), b.detach()
    return lambda z: (((z - mean) / std) @ W + b).argmax(1)


def _accuracy(pred, y) -> float:
    return 100.0 * (pred == y).float().mean().item()


def linear_probe(xtr, ytr, xva, yva, xte, yte, n_classes, wds=(0, 1e-4, 1e-3, 1e-2, 1e-1), max_iter=100,
                 device="cpu") -> dict:
    """{acc: test accuracy (percent), best_wd}: wd chosen by val accuracy, then refit on train+val."""
    xtr, xva, xte = (x.float().to(device) for x in (xtr, xva, xte))
    ytr, yva, yte = (torch.as_tensor(y, dtype=torch.long).to(device) for y in (ytr, yva, yte))
    val = [_accuracy(fit_logreg(xtr, ytr, n_classes, wd, max_iter)(xva), yva) for wd in wds]
    best = wds[val.index(max(val))]                                            # first best in sweep order
    predict = fit_logreg(torch.cat([xtr, xva]), torch.cat([ytr, yva]), n_classes, best, max_iter)
    return {"acc": _accuracy(predict(xte), yte), "best_wd": float(best)}


def uniformity(u, max_points=2000) -> float:
    """log mean_{i!=j} exp(-2 ||u_i - u_j||^2) of u (N,d), on a fixed random subset of <= max_points rows."""
    if len(u) > max_points:
        u = u[torch.randperm(len(u), generator=torch.Generator().manual_seed(0))[:max_points]]
    sq = torch.pdist(u.float()).pow(2)            # (n(n-1)/2,) pairs i<j; the i!=j mean is the same by symmetry
    return (torch.logsumexp(-2 * sq, 0) - math.log(len(sq))).item()


def structure_metrics(img_feats, txt_feats, txt2img) -> dict:
    """modality_gap, alignment, uniformity_image, uniformity_text, matched_cosine of (N,d) and (M,d) features."""
    img_feats, txt_feats = img_feats.float(), txt_feats.float()
    x = img_feats[torch.as_tensor(txt2img, dtype=torch.long)]               # (M, d) image of each caption
    return {"modality_gap": (img_feats.mean(0) - txt_feats.mean(0)).norm().item(),  # ||mean x - mean y||
            "alignment": (x - txt_feats).pow(2).sum(1).mean().item(),               # mean ||x_k - y_k||^2
            "uniformity_image": uniformity(img_feats),
            "uniformity_text": uniformity(txt_feats),
            "matched_cosine": (x * txt_feats).sum(1).mean().item()}                 # mean <x_k, y_k>


def itm_scores(model, pairset, pairs, transform, tokenizer, device, max_len, precision="fp32", batch_size=256,
               progress=False, image_batch_size=64, num_workers=0):
    """(P,) model.itm_score of the (image index, caption index) rows of pairs (P, 2), in batches of pairs.

    Every image is loaded once (num_workers loader processes, -1 = auto) and copied to the device once;
    every caption is tokenized once. The pairs are scored image by image, `image_batch_size` images at a time:
    - a model with image_tokens(images) -> (n, T, D) and itm_score_tokens(tokens, input_ids, attention_mask)
      -> (B,) has each image encoded once, its tokens picked per pair on the device;
    - any other model gets itm_score(images, input_ids, attention_mask), its images picked per pair on the device.
    A batch of pairs is padded to its longest caption, as if it were tokenized alone.
    """
    pairs = torch.as_tensor(pairs, dtype=torch.long).view(-1, 2)
    texts, out = pairset.texts, torch.empty(len(pairs))
    if not len(pairs):
        return out
    order = torch.argsort(pairs[:, 0] * len(texts) + pairs[:, 1], stable=True)   # by image, then caption
    img_of, cap_of = pairs[order, 0], pairs[order, 1]                            # (P,) sorted pairs
    img_ids, counts = torch.unique_consecutive(img_of, return_counts=True)       # distinct images, pairs of each
    ends = counts.cumsum(0).tolist()                                             # end of each image's pairs
    tok = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    ids_all, mask_all = tok["input_ids"], tok["attention_mask"]                  # (M, L) every caption, once
    split = hasattr(model, "image_tokens") and hasattr(model, "itm_score_tokens")
    loader = image_loader(pairset, transform, device, image_batch_size, num_workers, img_ids.tolist())
    first = 0                                                                    # img_ids index of the batch's first
    with inference(model, device, precision):
        for images in tqdm(loader, desc="ITM rerank", disable=not progress, leave=False):
            images, n = images.to(device, non_blocking=True), len(images)
            feats = model.image_tokens(images) if split else images              # (n, T, D) or (n, 3, H, W)
            lo, hi = (ends[first - 1] if first else 0), ends[first + n - 1]       # this batch's sorted pairs
            local = torch.repeat_interleave(torch.arange(n), counts[first:first + n])   # (hi - lo,) image in batch
            for s in range(lo, hi, batch_size):
                e = min(s + batch_size, hi)
                ids, mask = ids_all[cap_of[s:e]], mask_all[cap_of[s:e]]             # (B, L)
                used = mask.bool().any(0)                                          # drop all-padding columns
                ids, mask = ids[:, used].to(device), mask[:, used].to(device)
                pick = feats[local[s - lo:e - lo].to(device)]                      # (B, ...) each pair's image
                score = model.itm_score_tokens(pick, ids, mask) if split else model.itm_score(pick, ids, mask)
                out[order[s:e]] = score.float().cpu()
            first += n
    return out


def _sim_rows(img_feats, txt_feats, direction):
    """rows(s, e) -> (e - s, C) ITC cosines of queries s..e: i2t rows are images, t2i rows are captions."""
    if direction == "i2t":
        return lambda s, e: img_feats[s:e] @ txt_feats.T
    return lambda s, e: (img_feats @ txt_feats[s:e].T).T


def _reranked_ranks(rows, n_queries, top, top_scores, q_group, c_group, chunk):
    """Rank of each query's best positive once its top-k candidates are reordered by their rescores.

    rows(s, e) -> (e - s, C) first-stage scores; top (Q, k) the first stage's top k; top_scores (Q, k) their
    rescores. The reranked order is: the top k by rescore, then the rest by first-stage score; the rank is
    the number of negatives ordered before the best positive, ties going against the query. -> (Q,) long.
    """
    ranks, k = [], top.shape[1]
    for s in range(0, n_queries, chunk):
        sc, tp, ts = rows(s, s + chunk), top[s:s + chunk], top_scores[s:s + chunk]  # (c, C), (c, k), (c, k)
        pos = q_group[s:s + chunk, None] == c_group[None, :]                     # (c, C) positives
        pos_top = pos.gather(1, tp)                                              # (c, k) positives in the top k
        best_top = ts.masked_fill(~pos_top, float("-inf")).amax(1, keepdim=True)  # (c, 1)
        rank_top = ((ts >= best_top) & ~pos_top).sum(1)                          # a positive made the top k
        rest = sc.scatter(1, tp, float("-inf"))                                  # (c, C) outside the top k
        best_rest = rest.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)   # (c, 1)
        rank_rest = k + ((rest >= best_rest) & ~pos).sum(1)                      # none did: after all k
        ranks.append(torch.where(pos_top.any(1), rank_top, rank_rest))
    return torch.cat(ranks)


def rerank_retrieval(model, pairset, img_feats, txt_feats, transform, tokenizer, device, max_len, k=16,
                     precision="fp32", ks=(1, 5, 10), batch_size=256, chunk=1024, progress=False,
                     num_workers=0) -> dict:
    """i2t_R@k, t2i_R@k (percent) and rsum after ITM reranking of each query's top-k ITC candidates.

    img_feats (N,d), txt_feats (M,d): the ITC features of pairset's images and captions. Every distinct
    (image, caption) pair among the N*k + M*k candidates is scored once by itm_scores (which encodes each
    image once); the (N, M) cosine matrix is never held whole, only `chunk` query rows at a time.
    """
    img_feats, txt_feats = img_feats.float(), txt_feats.float()
    n, m = len(img_feats), len(txt_feats)
    txt2img = torch.as_tensor(pairset.txt2img, dtype=torch.long)            # (M,)
    img_ids, txt_ids = torch.arange(n), torch.arange(m)
    rows = {d: _sim_rows(img_feats, txt_feats, d) for d in ("i2t", "t2i")}
    groups = {"i2t": (img_ids, txt2img), "t2i": (txt2img, img_ids)}          # (query, candidate) group ids

    def top_k(d, s, c):   # the top k candidates of queries s..s+chunk, a tied negative before a positive
        pos = groups[d][0][s:s + chunk, None] == groups[d][1][None, :]          # (chunk, C) positives
        return _against_query(rows[d](s, s + chunk), pos).topk(min(k, c), dim=1).indices
    top = {d: torch.cat([top_k(d, s, c) for s in range(0, q, chunk)])
           for d, q, c in (("i2t", n, m), ("t2i", m, n))}                      # (N, k) captions, (M, k) images
    keys = torch.cat([(img_ids[:, None] * m + top["i2t"]).flatten(),          # pair (i, t) -> i * M + t
                      (top["t2i"] * m + txt_ids[:, None]).flatten()])
    keys, inverse = torch.unique(keys, return_inverse=True)                  # each distinct pair scored once
    scores = itm_scores(model, pairset, torch.stack([keys // m, keys % m], 1), transform, tokenizer, device,
                        max_len, precision, batch_size, progress, num_workers=num_workers)[inverse]
    n_i2t = top["i2t"].numel()
    s_i2t, s_t2i = scores[:n_i2t].view_as(top["i2t"]), scores[n_i2t:].view_as(top["t2i"])
    ranks = {"i2t": _reranked_ranks(rows["i2t"], n, top["i2t"], s_i2t, img_ids, txt2img, chunk),
             "t2i": _reranked_ranks(rows["t2i"], m, top["t2i"], s_t2i, txt2img, img_ids, chunk)}
    out = {f"{d}_R@{r}": 100.0 * (rk < r).float().mean().item() for d, rk in ranks.items() for r in ks}
    out["rsum"] = sum(out.values())
    return out


# ========== One model on one suite ================================================================
def _prefixed(prefix, metrics) -> dict:
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}


def _probe_data(task, pairset, feats):
    """Features and labels of one probe split: images, or captions labelled by their image; drops -1."""
    y = torch.as_tensor(pairset.labels[task.target], dtype=torch.long)        # (N,)
    if task.modality == "text":
        y = y[torch.as_tensor(pairset.txt2img, dtype=torch.long)]              # (M,) caption k gets its image's
    keep = y != -1
    return feats[keep], y[keep]


def _feature_cache(model, tokenizer, transform, device, max_len, precision, cache, progress, num_workers):
    """feats(pairset, kind) -> (n, d) features, encoded once per PairSet and kind and kept in `cache`:
    (id(pairset), 'image' | 'text' | 'image_indep' | 'text_indep') -> (pairset, features)."""
    def feats(pairset, kind):
        if (id(pairset), kind) not in cache:         # keeping pairset in the value keeps its id unique
            indep = kind.endswith("_indep")
            f = (encode_images(model, pairset, transform, device, precision=precision, indep=indep,
                               progress=progress, num_workers=num_workers) if kind.startswith("image") else
                 encode_texts(model, tokenizer, pairset.texts, device, max_len, precision=precision,
                              indep=indep, progress=progress, name=f"captions of {pairset.name!r}"))
            cache[id(pairset), kind] = (pairset, f)
        return cache[id(pairset), kind][1]
    return feats


def evaluate(model, tokenizer, suite, transform, device, max_len, precision="fp32", cache=None,
             progress=False, itm_k=16, num_workers=0) -> dict:
    """Flat {'retrieval/i2t_R@1': ..., 'zeroshot/<name>/top1': ..., 'probe/<name>/<z|z+zi>/acc': ...,
    'structure/modality_gap': ...} of one model on one EvalSuite; models with itm_score also get
    'retrieval_itm/...' (the top itm_k ITC candidates of each query reranked by ITM).

    Each PairSet is encoded once per modality; `cache` (optional dict, filled in place) maps
    (id(pairset), 'image' | 'text' | 'image_indep' | 'text_indep') -> (pairset, (n, d) features).
    Images are loaded by num_workers processes (-1 = auto). Features with NaN/inf rows (a diverged model)
    raise a ValueError naming them.
    """
    cache = {} if cache is None else cache
    feats = _feature_cache(model, tokenizer, transform, device, max_len, precision, cache, progress, num_workers)

    def probe_split(task, pairset, indep):                                    # features and labels
        f = feats(pairset, task.modality)                                       # (n, d)
        if indep:
            f = torch.cat([f, feats(pairset, task.modality + "_indep")], 1)    # (n, 2d) = [z, z_i]
        return _probe_data(task, pairset, f)

    out, ps = {}, suite.retrieval
    if ps is not None:
        out.update(_prefixed("retrieval", retrieval_metrics(feats(ps, "image"), feats(ps, "text"), ps.txt2img)))
        out.update(_prefixed("structure", structure_metrics(feats(ps, "image"), feats(ps, "text"), ps.txt2img)))
        if hasattr(model, "itm_score"):
            out.update(_prefixed("retrieval_itm", rerank_retrieval(
                model, ps, feats(ps, "image"), feats(ps, "text"), transform, tokenizer, device, max_len, itm_k,
                precision, progress=progress, num_workers=num_workers)))
    for name, ls in suite.zeroshot.items():
        w = zeroshot_classifier(model, tokenizer, ls.classnames, ls.templates, device, max_len, precision)
        out.update(_prefixed(f"zeroshot/{name}", zeroshot_metrics(feats(ls.images, "image"), w,
                                                                  ls.images.labels[ls.target])))
    views = {"z": False, "z+zi": True} if hasattr(model, "encode_image_indep") else {"z": False}
    for name, task in suite.probes.items():
        for view, indep in views.items():
            splits = [t for p in (task.train, task.val, task.test) for t in probe_split(task, p, indep)]
            out.update(_prefixed(f"probe/{name}/{view}", linear_probe(*splits, len(task.classes), device=device)))
    return out


def validate(model, tokenizer, suite, transform, device, max_len, precision="fp32", max_images=1000,
             num_workers=0) -> dict:
    """Cheap metrics for periodic validation during training; each key is 'val/' + evaluate()'s key:
    val/retrieval/i2t_R@1, val/retrieval/t2i_R@1 and val/retrieval/rsum on the first max_images images of
    suite.retrieval (and their captions), val/zeroshot/<name>/top1 on the first max_images images of each
    zero-shot label set, and one selection score (percent, higher is better):

        val/score = ( mean over label sets of zeroshot top-1  +  retrieval rsum / 6 ) / 2

    (rsum / 6 is the mean of the six recalls; a suite with only one of the two parts scores that part alone).
    No ITM reranking, probe or structure metric. With at most max_images images per set the numbers equal
    evaluate()'s. The model's train/eval mode is left as it was found.
    """
    if max_images < 1:
        raise ValueError(f"validate: max_images must be >= 1, got {max_images}")
    feats = _feature_cache(model, tokenizer, transform, device, max_len, precision, {}, False, num_workers)
    heads = {}

    def head(ps):   # the first max_images images; one subset per PairSet, so a shared set is encoded once
        if id(ps) not in heads:
            heads[id(ps)] = (ps, ps if len(ps) <= max_images else ps.subset(range(max_images)))
        return heads[id(ps)][1]

    out, parts = {}, []
    if suite.retrieval is not None:
        ps = head(suite.retrieval)
        r = retrieval_metrics(feats(ps, "image"), feats(ps, "text"), ps.txt2img)
        out.update({f"val/retrieval/{k}": float(r[k]) for k in ("i2t_R@1", "t2i_R@1", "rsum")})
        parts.append(r["rsum"] / 6)
    top1 = []
    for name, ls in suite.zeroshot.items():
        ims = head(ls.images)
        w = zeroshot_classifier(model, tokenizer, ls.classnames, ls.templates, device, max_len, precision)
        top1.append(zeroshot_metrics(feats(ims, "image"), w, ims.labels[ls.target])["top1"])
        out[f"val/zeroshot/{name}/top1"] = float(top1[-1])
    if top1:
        parts.append(sum(top1) / len(top1))
    if not parts:
        raise ValueError("validate: the suite has neither a retrieval set nor a zero-shot label set")
    out["val/score"] = float(sum(parts) / len(parts))
    return out


# ========== Comparison table ======================================================================
DEFAULT_COLUMNS = ("retrieval/i2t_R@*", "retrieval/t2i_R@*", "retrieval/rsum", "retrieval_itm/i2t_R@*",
                   "retrieval_itm/t2i_R@*", "retrieval_itm/rsum", "zeroshot/*/top1", "probe/*/acc",
                   "structure/modality_gap", "structure/alignment", "structure/uniformity_*",
                   "structure/matched_cosine")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def comparison_table(rows: dict, columns=None) -> str:
    """Markdown table, one row per run {name: flat metrics dict}, 2 decimals, '-' where a run lacks a column.

    columns: metric keys or fnmatch patterns, expanded in order over the numeric keys present
    (default DEFAULT_COLUMNS: retrieval, zero-shot top-1, probe accuracy, structure).
    """
    present = list(dict.fromkeys(k for m in rows.values() for k, v in m.items() if _is_num(v)))
    cols = list(dict.fromkeys(k for pat in (columns or DEFAULT_COLUMNS) for k in present
                              if fnmatch.fnmatchcase(k, pat)))
    heads = [k.split("/", 1)[1] if k.startswith(("retrieval/", "structure/")) else k for k in cols]
    lines = ["| run | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, m in rows.items():
        cells = [f"{m[k]:.2f}" if k in m else "-" for k in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ========== Plots (matplotlib is optional) ========================================================
def _figure(nrows=1, ncols=1, size=(5.0, 4.5)):
    """A matplotlib Figure (rendered by Agg on savefig, no pyplot state) and its (nrows, ncols) axes."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _draw_embeddings(ax, img_feats, txt_feats, txt2img, title, max_pairs=500, n_lines=40):
    """2-D PCA (fit on both modalities) of evenly spaced matched pairs, a few joined, centroids marked."""
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    k = torch.linspace(0, len(txt2img) - 1, min(len(txt2img), max_pairs)).round().long().unique()  # captions
    x, y = img_feats[txt2img[k]].float(), txt_feats[k].float()                # (P, d) matched pairs
    both = torch.cat([x, y])                                                  # (2P, d)
    mean = both.mean(0)
    basis = torch.linalg.svd(both - mean, full_matrices=False).Vh[:2].T      # (d, 2) top principal axes
    px, py = ((x - mean) @ basis).numpy(), ((y - mean) @ basis).numpy()      # (P, 2)
    for a, b in zip(px[:n_lines], py[:n_lines]):
        ax.plot([a[0], b[0]], [a[1], b[1]], color="grey", lw=0.5, alpha=0.6)
    ax.scatter(px[:, 0], px[:, 1], s=6, c="C0", alpha=0.6, label="image")
    ax.scatter(py[:, 0], py[:, 1], s=6, c="C1", alpha=0.6, label="text")
    for feats, color, label in ((img_feats, "C0", "image centroid"), (txt_feats, "C1", "text centroid")):
        c = ((feats.float().mean(0) - mean) @ basis).numpy()
        ax.scatter([c[0]], [c[1]], s=180, marker="*", c=color, edgecolors="black", label=label)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    ax.legend(fontsize=7, loc="best")


def plot_embeddings(img_feats, txt_feats, txt2img, path, title=""):
    """Write a PCA scatter of both modalities (see _draw_embeddings) to path (PNG)."""
    plot_embeddings_grid({title: (img_feats, txt_feats, txt2img)}, path)


def plot_embeddings_grid(panels: dict, path, ncols=3):
    """Several runs side by side: panels {title: (img_feats, txt_feats, txt2img)} -> one PNG."""
    ncols = min(ncols, len(panels))
    fig, axes = _figure(math.ceil(len(panels) / ncols), ncols)
    for ax, (title, (img, txt, t2i)) in zip(axes.flat, panels.items()):
        _draw_embeddings(ax, img, txt, t2i, title)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def _series(records, key):
    """(steps, values) of the log rows holding a number under key."""
    pts = [(r["step"], r[key]) for r in records if "step" in r and _is_num(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_panels(records) -> list:
    """[(title, keys)] that plot_curves draws for log.jsonl rows (dicts), in order; panels without keys omitted:
    - losses: every loss* term, the total `loss` first; a term equal to `loss` at every step (e.g. loss_con
      when L_con is the whole loss) is left out, as it would hide under it;
    - temperature: 1/τ, logged as logit_scale;
    - learning rate: lr;
    - validation: the 'val/...' keys.
    """
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and _is_num(v)})
    total = _series(records, "loss")
    losses = sorted((k for k in keys if k.startswith("loss") and (k == "loss" or _series(records, k) != total)),
                    key=lambda k: (k != "loss", k))
    panels = (("losses", losses), ("temperature", [k for k in keys if k == "logit_scale"]),
              ("learning rate", [k for k in keys if k == "lr"]),
              ("validation", [k for k in keys if k.startswith("val/")]))
    return [(title, ks) for title, ks in panels if ks]


def plot_curves(log_jsonl_path, path):
    """A run's log.jsonl against step in one figure (PNG at path), one panel per kind of curve (curve_panels):
    the loss terms with a legend and the total `loss` bold black, the temperature 1/τ, the learning rate, and
    the validation metrics (percent, with markers; rsum drawn as rsum / 6, the mean recall, so every curve
    shares the 0-100 axis; val/score bold black)."""
    with open(log_jsonl_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    panels = curve_panels(records)
    if not panels:
        raise ValueError(f"{log_jsonl_path}: no loss*, logit_scale, lr or val/... numbers to plot")
    ncols = min(2, len(panels))
    fig, axes = _figure(math.ceil(len(panels) / ncols), ncols, size=(6.0, 3.8))
    ylabels = {"losses": "loss", "temperature": "1/τ (logit_scale)", "learning rate": "learning rate",
               "validation": "percent"}
    for ax, (title, ks) in zip(axes.flat, panels):
        for k in ks:
            x, y = _series(records, k)
            bold = k in ("loss", "val/score")
            if k.endswith("/rsum"):
                y, k = [v / 6 for v in y], f"{k} / 6"
            ax.plot(x, y, lw=2.2 if bold else 1.1, color="black" if bold else None, label=k,
                    marker="o" if title == "validation" else None, ms=3)
        ax.set(title=title, xlabel="step", ylabel=ylabels[title])
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if title in ("losses", "validation"):
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(Path(log_jsonl_path).parent.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ========== Saved runs and the command line =======================================================
METHOD_SCRIPTS = ("clip_base", "sep", "bridge", "geocons", "albef_fusion", "codis")


def load_checkpoint(path, expect_script=None) -> dict:
    """The dict a method script saved (model, optimizer, scheduler, scaler, step, args, rng, script), on the CPU.

    Loaded with torch.load(weights_only=True): only tensors and plain Python values (dict, list, str, numbers)
    are unpickled, never an arbitrary object, so a checkpoint from anywhere cannot run code when loaded; a file
    holding anything else is refused, never retried with the unsafe loader. Its "script" must be one of
    METHOD_SCRIPTS, and expect_script (e.g. for --resume) when given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a checkpoint.pt written by a method script "
                                f"(e.g. python clip_base.py)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported (global: )?GLOBAL \S+|Unsupported operand \S+", str(e), re.IGNORECASE)
        detail = found.group(0) if found else ""
        raise pickle.UnpicklingError(
            f"refused to load {path}: it holds something other than tensors and plain Python values"
            f"{f' ({detail})' if detail else ''}. Checkpoints are loaded with torch.load(weights_only=True), "
            f"which never unpickles other objects, so that a shared checkpoint can never run code. A checkpoint "
            f"saved by an older version of a method script (args as a dataclass, RNG states as other objects) "
            f"must be re-saved by a current script; a file from elsewhere is not a checkpoint of this "
            f"project.") from None
    except (RuntimeError, EOFError, OSError) as e:    # truncated, unreadable, or not written by torch.save
        raise ValueError(f"{path} could not be read as a checkpoint ({e}): truncated, or not written by "
                         f"torch.save") from e
    script = ckpt.get("script") if isinstance(ckpt, dict) else None
    if script not in METHOD_SCRIPTS:
        raise ValueError(f"{path} is not a checkpoint of a method script: its 'script' is {script!r}, expected "
                         f"one of {', '.join(METHOD_SCRIPTS)}")
    if expect_script is not None and script != expect_script:
        raise ValueError(f"{path} was written by {script}.py, not {expect_script}.py: resume it with "
                         f"python {script}.py --resume {path}")
    return ckpt


def save_checkpoint(path, **state):
    """Write a checkpoint so that a crash, a full disk or a power cut never loses the previous one: write a
    temporary file, fsync it, rename it over `path` (atomic on POSIX), fsync the folder (so the rename itself
    is on disk). If the write fails, the temporary file is removed and the error says the previous checkpoint
    is intact."""
    path = str(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(os.path.abspath(path)))
    except (OSError, RuntimeError) as e:   # ENOSPC, EACCES, or torch's "enforce fail ... unexpected pos"
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = (f"the previous checkpoint at {path} is intact" if os.path.exists(path)
                else "no earlier checkpoint of this run exists")
        raise SystemExit(f"could not write the checkpoint {path}: disk full or not writable "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {kept}") from e


def _fsync_folder(folder):
    if hasattr(os, "O_DIRECTORY"):        # POSIX; Windows cannot open a folder
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def lock_run_dir(run_dir):
    """Hold an exclusive lock on run_dir for as long as the returned file stays open (the process's life): a
    second process that tries to train in the same folder (two --resume of one checkpoint) stops at once
    with the first one's pid, instead of both writing the checkpoint and the log. The lock is the kernel's
    (flock), so a killed process never leaves a stale one."""
    try:
        import fcntl
    except ImportError:                   # Windows: no flock; runs are not protected from each other there
        return None
    handle = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        raise SystemExit(f"another process (pid {pid}) is training in {run_dir}: wait for it to end (or stop "
                         f"it) before resuming this run") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


# ---- under torchrun: the decisions and values the processes of one run share (the method scripts call these;
# each is a no-op on one process)
def shared_by_rank_0(value):
    """Rank 0's value (e.g. the run folder it made) on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered_objects(value):
    """[value of rank 0, of rank 1, ...]: one entry per process."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def mean_over_processes(window):
    """Each step's loss terms averaged over the processes: the loss of the global batch (a NaN stays a NaN)."""
    if not dist.is_initialized() or not window:
        return window
    stacked = torch.stack(window)
    dist.all_reduce(stacked)
    return list(stacked / dist.get_world_size())


def agreed(save_due, signum, device):
    """(save now?, signal) decided for all processes at once: True/the signal if any process says so."""
    if not dist.is_initialized():
        return save_due, signum
    flags = torch.tensor([float(save_due), float(signum)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), int(flags[1])


def resumed_rng(ckpt, rank, world):
    """The RNG state this process resumes with: its own when the run was saved by as many processes;
    otherwise rank 0's (the data order is the same at any process count, the dropout streams are not)."""
    saved = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(saved) != world and rank == 0:
        print(f"resuming on {world} processes a run saved by {len(saved)}: the batches are the same, the random "
              f"streams of each process (dropout, masks) are not those of an uninterrupted run")
    return saved[rank] if len(saved) == world else saved[0]


def check_in_sync(model, device):
    """Stop with an error if any parameter or buffer (BatchNorm statistics aside, which stay per process on
    CPUs) differs between the processes: what unsynchronized gradients would cause. Compares a float64 sum of
    every tensor."""
    names = [k for k, v in model.state_dict().items() if v.is_floating_point() and "running_" not in k]
    sums = torch.stack([model.state_dict()[k].double().sum() for k in names]).to(device)
    every = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(every, sums)
    differ = [n for n, *vals in zip(names, *every) if any(v != vals[0] for v in vals)]
    if differ:
        raise RuntimeError(f"the processes' weights differ after training ({', '.join(differ[:5])}, ...): "
                           f"their gradients were not synchronized")



def finished_run(ckpt_path, step):
    """What --resume of a run that already reached its last step says (nothing is trained again)."""
    run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    metrics = os.path.join(run_dir, "metrics.json")
    where = (f"its metrics are in {metrics}" if os.path.exists(metrics)
             else "its final evaluation did not finish (no metrics.json)")
    print(f"{run_dir} finished at step {step}: {where}. Compute them again with: python eval.py {run_dir} "
          f"--save (writes metrics_eval.json); train longer with --resume {ckpt_path} --steps N.")
    return run_dir


def load_run(run_dir, device):
    """(model, tokenizer, args, module) rebuilt from RUN_DIR/checkpoint.pt by the script that wrote it, or
    from a folder written by `eval.py RUN --export DIR` (load_export; tokenizer in DIR itself).

    The checkpoint is read by load_checkpoint (tensors and plain values only; its script must be one of
    METHOD_SCRIPTS). The tokenizer is RUN_DIR/tokenizer/ when the run saved one, else
    data.build_tokenizer(saved args).
    """
    import data  # here, not at the top: the metrics above need no dataset code
    path, tok_dir = Path(run_dir) / "checkpoint.pt", Path(run_dir) / "tokenizer"
    if not path.is_file() and (Path(run_dir) / "project.json").is_file():   # an export
        path, tok_dir = Path(run_dir) / "project.json", Path(run_dir)
        state, script, saved = load_export(run_dir)
        if script not in METHOD_SCRIPTS:
            raise ValueError(f"{path}: its script {script!r} is not one of {', '.join(METHOD_SCRIPTS)}")
        ckpt = {"model": state, "script": script, "args": saved}
    else:
        ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "args") if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise ValueError(f"{path} has no {' and no '.join(missing)} dict: not a complete checkpoint")
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(ckpt["script"])
    except ModuleNotFoundError as e:
        if e.name != ckpt["script"]:
            raise
        raise ModuleNotFoundError(f"{path} was written by {ckpt['script']}.py, expected next to eval.py in "
                                  f"{here}") from e
    fields = {f.name for f in dataclasses.fields(module.Args)}
    unknown = sorted(set(ckpt["args"]) - fields)
    if unknown:
        raise ValueError(f"{path}: its args {unknown} are not flags of the current {ckpt['script']}.py: it was "
                         f"written by another version of the script")
    args = module.Args(**ckpt["args"])
    if (tok_dir / "tokenizer_config.json").is_file():   # the exact tokenizer of training, saved by the script
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = data.build_tokenizer(args)
    model = module.build_model(args, tokenizer)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer, args, module


# ========== Pretrained CLIP models (Hugging Face), export, live curves =============================
HF_TYPES = ("clip", "siglip")   # model_type values load_clip_parts accepts (SigLIP: evaluation only, see below)
# script module names <-> CLIPModel state-dict names (export_model, load_export)
HF_CLIP_NAMES = (("visual.model.", "vision_model."), ("text.model.", "text_model."),
                 ("image_proj.", "visual_projection."), ("text_proj.", "text_projection."),
                 ("logit_scale", "logit_scale"))


def _hf_load(loader, name, what):
    """loader(name), or an error saying what to download and where to put it when `name` is not found."""
    try:
        return loader(name)
    except (OSError, ValueError) as e:   # ValueError: huggingface_hub's invalid repo id (a missing local path)
        where = "" if Path(name).is_dir() else f"; there is no local folder {name!r}"
        raise OSError(
            f"{what} of {name!r} not found ({type(e).__name__}: {e}{where}). Give a local folder (save_pretrained "
            f"output) or download it once with network access: on a machine with the network, python -c \"from "
            f"transformers import AutoModel, AutoProcessor; [c.from_pretrained('{name}').save_pretrained('DIR') "
            f"for c in (AutoModel, AutoProcessor)]\", then copy DIR (config.json, model.safetensors, the tokenizer "
            f"files, preprocessor_config.json) here and pass DIR; or copy the Hugging Face cache "
            f"(~/.cache/huggingface/hub, or $HF_HOME/hub).") from e


def _pooled(out):
    """Pooled features of a Hugging Face call: a tensor as it is, else its pooler_output (transformers 5's
    get_image_features / get_text_features and the towers return output objects, 4.x's features tensors)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class VisionTower(torch.nn.Module):
    """A Hugging Face CLIP / SigLIP vision transformer as a script's image encoder: images (N, 3, H, W)
    normalized with data.MEAN / data.STD (every transform of this project, and data.to_device, use them)
    -> pooled features (N, out_dim), before the projection. A model trained with another normalization
    (SigLIP: mean = std = 0.5) gets its own back by a per-channel affine map first.
    Attributes read by export_model: clip_config (the whole model's config), preprocess (its
    preprocessor_config.json as a dict)."""

    def __init__(self, model, preprocess: dict, clip_config):
        super().__init__()
        import data
        self.model, self.preprocess, self.clip_config = model, preprocess, clip_config
        self.out_dim = model.config.hidden_size
        ours = torch.tensor([data.MEAN, data.STD])                                            # (2, 3)
        theirs = torch.tensor([preprocess.get("image_mean", data.MEAN), preprocess.get("image_std", data.STD)])
        self.renormalize = not torch.allclose(ours, theirs)
        # x_theirs = (x_ours * std_ours + mean_ours - mean_theirs) / std_theirs = x_ours * scale + shift
        self.register_buffer("scale", (ours[1] / theirs[1]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((ours[0] - theirs[0]) / theirs[1]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        if self.renormalize:
            images = images * self.scale + self.shift
        return _pooled(self.model(pixel_values=images))


class TextTower(torch.nn.Module):
    """A Hugging Face CLIP / SigLIP text transformer as a script's text encoder: (input_ids, attention_mask)
    (N, L) -> pooled features (N, out_dim), before the projection. CLIP pools its end-of-text token;
    SigLIP (pad_to > 0) pools the last position and was trained on captions padded to its full length and
    no mask, so its ids are padded with pad_id to pad_to and the mask is not passed."""

    def __init__(self, model, pad_to=0, pad_id=0):
        super().__init__()
        self.model, self.pad_to, self.pad_id = model, pad_to, pad_id
        self.out_dim = model.config.hidden_size

    def forward(self, input_ids, attention_mask):
        if self.pad_to:
            input_ids = F.pad(input_ids, (0, self.pad_to - input_ids.shape[1]), value=self.pad_id)
            return _pooled(self.model(input_ids=input_ids))
        return _pooled(self.model(input_ids=input_ids, attention_mask=attention_mask))


class ClipParts(NamedTuple):
    """What a two-tower script needs to start from a pretrained CLIP (load_clip_parts)."""
    visual: torch.nn.Module        # VisionTower: normalized images -> (N, out_dim) pooled features
    text: torch.nn.Module          # TextTower: (input_ids, attention_mask) -> (N, out_dim) pooled features
    image_proj: torch.nn.Module    # CLIP: the pretrained Linear(out_dim, embed_dim, bias=False); SigLIP: Identity
    text_proj: torch.nn.Module
    logit_scale: float             # the pretrained log(1/τ)
    tokenizer: object
    image_size: int                # the model's input resolution
    max_len: int                   # its text length (positions)
    embed_dim: int                 # dimension of the projected features
    transform: object              # PIL image -> normalized (3, image_size, image_size), the model's eval preprocessing


def _clip_config(name_or_folder):
    """The config of a Hugging Face CLIP or SigLIP (AutoConfig); any other model type is refused."""
    from transformers import AutoConfig
    config = _hf_load(AutoConfig.from_pretrained, name_or_folder, "the config (config.json)")
    if config.model_type not in HF_TYPES:
        raise ValueError(f"{name_or_folder!r} is a {config.model_type!r} model: expected a CLIP or SigLIP model "
                         f"(model_type one of {', '.join(HF_TYPES)})")
    return config


def _sizes(config) -> dict:
    """{"image_size", "max_len", "embed_dim"} of a CLIP / SigLIP config."""
    siglip = config.model_type == "siglip"
    return {"image_size": config.vision_config.image_size, "max_len": config.text_config.max_position_embeddings,
            "embed_dim": config.text_config.hidden_size if siglip else config.projection_dim}


def clip_settings(name_or_folder) -> dict:
    """The flags a run started from this CLIP must take, read from its config alone (no weights loaded):
    {"image_size", "max_len", "embed_dim", "tokenizer": name_or_folder}."""
    return {**_sizes(_clip_config(name_or_folder)), "tokenizer": str(name_or_folder)}


def load_clip_parts(name_or_folder) -> ClipParts:
    """The towers, projections, temperature, tokenizer and eval preprocessing of a Hugging Face CLIP
    (transformers.CLIPModel) or SigLIP (SiglipModel; its sigmoid loss's logit_bias is not part of this
    contract) by hub name or local folder, loaded in float32. A missing model raises an OSError saying what
    to download and where to put it."""
    import data
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import cached_file
    config = _clip_config(name_or_folder)
    hf = _hf_load(lambda n: AutoModel.from_pretrained(n).float(), name_or_folder, "the weights")
    tokenizer = _hf_load(AutoTokenizer.from_pretrained, name_or_folder, "the tokenizer")
    pre_path = _hf_load(lambda n: cached_file(n, "preprocessor_config.json"), name_or_folder,
                        "the image preprocessing (preprocessor_config.json)")
    with open(pre_path) as f:
        preprocess = json.load(f)
    siglip = config.model_type == "siglip"
    visual = VisionTower(hf.vision_model, preprocess, config)
    text = TextTower(hf.text_model, config.text_config.max_position_embeddings if siglip else 0,
                     tokenizer.pad_token_id or 0)
    image_proj, text_proj = ((torch.nn.Identity(), torch.nn.Identity()) if siglip else
                             (hf.visual_projection, hf.text_projection))
    sizes = _sizes(config)
    return ClipParts(visual, text, image_proj, text_proj, float(hf.logit_scale.detach().reshape(-1)[0]),
                     tokenizer, sizes["image_size"], sizes["max_len"], sizes["embed_dim"],
                     data.preprocess_transform(preprocess))


class PretrainedCLIP(torch.nn.Module):
    """A pretrained CLIP in the two-tower scripts' layout (visual, text, image_proj, text_proj, logit_scale),
    with eval.py's contract: encode_image / encode_text return unit-norm projected features. image_size and
    max_len are the model's."""

    def __init__(self, parts: ClipParts):
        super().__init__()
        self.visual, self.text, self.image_proj, self.text_proj = parts[:4]
        self.logit_scale = torch.nn.Parameter(torch.tensor(parts.logit_scale))
        self.image_size, self.max_len = parts.image_size, parts.max_len

    def encode_image(self, images):  # (N, 3, H, W) -> (N, E), unit norm
        return F.normalize(self.image_proj(self.visual(images)), dim=-1)

    def encode_text(self, input_ids, attention_mask):  # (N, L) -> (N, E), unit norm
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask)), dim=-1)


def load_hf_clip(name_or_folder, device="cpu") -> tuple:
    """(model, tokenizer, transform) of a Hugging Face CLIP / SigLIP: a PretrainedCLIP in eval mode on device,
    its tokenizer, and its eval preprocessing (PIL image -> normalized tensor) for encode_images."""
    parts = load_clip_parts(name_or_folder)
    return PretrainedCLIP(parts).to(device).eval(), parts.tokenizer, parts.transform


class OpenCLIP(torch.nn.Module):
    """An open_clip model with eval.py's contract (unit-norm features); its text encoder takes the token ids
    alone (open_clip pads with 0 to its context length and pools by position, never reading a mask)."""

    def __init__(self, model, image_size: int, max_len: int):
        super().__init__()
        self.model, self.image_size, self.max_len = model, image_size, max_len

    def encode_image(self, images):  # (N, 3, H, W) -> (N, E), unit norm
        return F.normalize(self.model.encode_image(images), dim=-1)

    def encode_text(self, input_ids, attention_mask):  # (N, L) -> (N, E), unit norm
        return F.normalize(self.model.encode_text(input_ids), dim=-1)


class OpenCLIPTokenizer:
    """open_clip's tokenizer called like a Hugging Face one: tokenizer(texts, ...) -> {"input_ids",
    "attention_mask"} of (N, context length) tensors (padding and truncation are open_clip's own)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts, **_):
        ids = self.tokenizer(list(texts))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def load_open_clip(spec: str, device="cpu") -> tuple:
    """(model, tokenizer, transform) of open_clip's ARCH:PRETRAINED (e.g. ViT-B-32:laion2b_s34b_b79k, or
    ARCH:/path/to/checkpoint.bin offline), for --open-clip; open_clip_torch is imported here only."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(f"--open-clip needs the open_clip_torch package ({e}): pip install open_clip_torch") from e
    arch, _, pretrained = spec.partition(":")
    try:
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
    except RuntimeError as e:
        raise RuntimeError(f"--open-clip {spec!r}: {e}. Download the weights once with network access (they are "
                           f"kept in the Hugging Face cache), or give a local checkpoint file: --open-clip "
                           f"{arch}:/path/to/open_clip_pytorch_model.bin") from e
    size = getattr(model.visual, "image_size", 224)
    size = max(size) if isinstance(size, (tuple, list)) else size
    wrapped = OpenCLIP(model, int(size), int(getattr(model, "context_length", 77)))
    return wrapped.to(device).eval(), OpenCLIPTokenizer(open_clip.get_tokenizer(arch)), transform


def model_transform(model, image_size: int):
    """The eval transform for a model: the pretrained model's own preprocessing when its image tower is a
    VisionTower, else data.eval_transform(image_size)."""
    import data
    preprocess = getattr(getattr(model, "visual", None), "preprocess", None)
    return data.preprocess_transform(preprocess) if preprocess is not None else data.eval_transform(image_size)


def _rename(state: dict, names) -> tuple:
    """({renamed key: tensor} for the keys starting with a `names` prefix (old, new), {key: tensor} of the rest)."""
    hit, rest = {}, {}
    for k, v in state.items():
        new = next((n + k[len(o):] for o, n in names if k.startswith(o)), None)
        (hit if new is not None else rest)[new if new is not None else k] = v
    return hit, rest


def export_model(model, tokenizer, out_dir, script="", args=None) -> Path:
    """Write a model as safetensors, with project.json ({script, args, hf_clip}) and the tokenizer, to out_dir.

    A model whose towers came from a Hugging Face CLIP (visual is a VisionTower of a CLIP config: a run started
    with --init-clip, or a PretrainedCLIP) is written as a CLIPModel folder (config.json, model.safetensors,
    preprocessor_config.json; transformers.CLIPModel.from_pretrained(out_dir) loads it), its state-dict names
    mapped by HF_CLIP_NAMES; whatever else it holds (sep.py's independent heads) goes to
    project_model.safetensors. Any other model is written whole to project_model.safetensors.
    load_export(out_dir) reads either back as the script's state dict.
    """
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}  # no shared memory
    visual = getattr(model, "visual", None)
    config = getattr(visual, "clip_config", None)
    hf_clip = getattr(config, "model_type", None) == "clip"
    if hf_clip:
        hf, state = _rename(state, HF_CLIP_NAMES)
        config.save_pretrained(out)
        save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "preprocessor_config.json").write_text(json.dumps(visual.preprocess, indent=2))
    save_file(state, str(out / "project_model.safetensors"), metadata={"format": "pt"})
    (out / "project.json").write_text(json.dumps({"script": script, "args": args or {}, "hf_clip": hf_clip},
                                                 indent=2))
    tokenizer.save_pretrained(out)
    return out


def load_export(folder) -> tuple:
    """(state dict, script name, args dict) of a folder written by export_model (eval.py RUN --export DIR).
    safetensors files hold tensors only, so reading one never runs code."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / "project.json").is_file():
        raise FileNotFoundError(f"{folder} has no project.json: not a folder written by eval.py RUN --export")
    meta = json.loads((folder / "project.json").read_text())
    state = load_file(str(folder / "project_model.safetensors"))
    if meta.get("hf_clip"):
        hf, _ = _rename(load_file(str(folder / "model.safetensors")), [(n, o) for o, n in HF_CLIP_NAMES])
        state.update(hf)
    return state, meta.get("script", ""), meta.get("args", {})


class Reporter:
    """Live curves: log(row) writes every numeric value of a log.jsonl row (a dict with "step"), the val/...
    keys included, as a scalar at row["step"] to TensorBoard or Weights & Biases; close() flushes.
    Made by open_reporter; kind "" logs nothing."""

    def __init__(self, write=None, close=None):
        self._write, self._close = write, close

    def log(self, row: dict):
        if self._write is None or not _is_num(row.get("step")):
            return
        self._write(int(row["step"]), {k: float(v) for k, v in row.items() if k != "step" and _is_num(v)})

    def close(self):
        if self._close is not None:
            self._close()
            self._close = self._write = None


def open_reporter(kind: str, run_dir, config: dict | None = None) -> Reporter:
    """A Reporter for --report-to kind: "" (nothing), "tensorboard" (event files in run_dir; needs the
    tensorboard package) or "wandb" (a run named after run_dir, files under run_dir, config logged; needs
    wandb, and a login or WANDB_MODE=offline). The package is imported here only, when asked."""
    if not kind:
        return Reporter()
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"--report-to tensorboard needs the tensorboard package ({e}): "
                              f"pip install tensorboard") from e
        writer = SummaryWriter(log_dir=str(run_dir))

        def write(step, scalars):
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
        return Reporter(write, writer.close)
    if kind == "wandb":
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"--report-to wandb needs the wandb package ({e}): pip install wandb") from e
        run = wandb.init(name=Path(run_dir).name, dir=str(run_dir), config=config or {})
        return Reporter(lambda step, scalars: run.log(scalars, step=step), run.finish)
    raise ValueError(f"--report-to {kind!r}: choose tensorboard or wandb (or leave it empty)")


def build_parser() -> argparse.ArgumentParser:
    import data
    p = argparse.ArgumentParser(description="Re-evaluate saved runs and pretrained CLIPs and print one comparison "
                                            "table, or export a run (--export).")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders holding checkpoint.pt (or folders "
                                                             "written by --export)")
    p.add_argument("--clip", action="append", default=[], metavar="NAME_OR_FOLDER",
                   help="also evaluate a pretrained Hugging Face CLIP (or SigLIP), by hub name or local folder, on "
                        "the same protocol (its own preprocessing and text length); repeatable")
    p.add_argument("--open-clip", action="append", default=[], metavar="ARCH:PRETRAINED",
                   help="also evaluate an open_clip model (needs open_clip_torch), e.g. ViT-B-32:laion2b_s34b_b79k or "
                        "ARCH:/path/to/checkpoint.bin; repeatable")
    p.add_argument("--export", default="", metavar="DIR", help="write the one RUN_DIR's model to DIR (safetensors, "
                                                               "project.json, tokenizer; a CLIPModel folder for a "
                                                               "run started with --init-clip) instead of evaluating")
    p.add_argument("--device", default="auto", help="auto = cuda > mps > cpu, or a torch device name")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast precision")
    p.add_argument("--zeroshot-folder", default="", help="an ImageFolder (DIR/<class>/<images>) added as a "
                                                        "zero-shot + linear-probe task")
    p.add_argument("--plot", action="store_true", help="write RUN_DIR/embeddings.png and RUN_DIR/curves.png")
    p.add_argument("--save", action="store_true", help="write RUN_DIR/metrics_eval.json (with --eval-split val: "
                                                      "metrics_eval_val.json)")
    p.add_argument("--itm-k", type=int, default=None, help="fusion models: ITC candidates per query reranked by "
                                                          "ITM (default: the run's own --itm-k, else 16)")
    group = p.add_argument_group("data flags", "override the run's saved value only when given (--clip: the "
                                               "defaults, with the model's image size and text length)")
    data.add_dataclass_args(group, data.DataArgs, defaults=False)
    return p


def evaluate_suites(model, tokenizer, args, transform, opts, device) -> tuple:
    """(metrics, suites, cache): evaluate() of one model on the suite of args's data flags (args.eval_split)
    plus opts.zeroshot_folder when given; metrics["eval_split"] names the split."""
    import data
    suites = [data.build_eval_suite(args)] + ([data.folder_suite(opts.zeroshot_folder, args)]
                                              if opts.zeroshot_folder else [])
    cache, metrics = {}, {}
    for suite in suites:
        metrics.update(evaluate(model, tokenizer, suite, transform, device, args.max_len, opts.precision,
                                cache=cache, progress=True, itm_k=opts.itm_k or getattr(args, "itm_k", 16),
                                num_workers=getattr(args, "num_workers", 0)))
    metrics["eval_split"] = getattr(args, "eval_split", "test")   # a string: the table shows only numbers
    return metrics, suites, cache


def evaluate_run(run_dir, opts, overrides, device) -> dict:
    """Re-evaluate one run (data flags in `overrides` replace its saved ones) on the split its eval_split
    names (--eval-split: test, or val for model selection); save / plot as asked."""
    model, tokenizer, args, _ = load_run(run_dir, device)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(args)}
    if unknown:
        raise ValueError(f"{run_dir}: the run's Args have no field(s) {sorted(unknown)}")
    args = dataclasses.replace(args, **overrides)
    metrics, suites, cache = evaluate_suites(model, tokenizer, args, model_transform(model, args.image_size),
                                             opts, device)
    run_dir, split = Path(run_dir), metrics["eval_split"]
    if opts.save:   # the test split's numbers are never overwritten by the validation split's
        name = "metrics_eval.json" if split == "test" else f"metrics_eval_{split}.json"
        (run_dir / name).write_text(json.dumps(metrics, indent=2))
    if opts.plot and suites[0].retrieval is not None:
        ps = suites[0].retrieval
        plot_embeddings(cache[id(ps), "image"][1], cache[id(ps), "text"][1], ps.txt2img,
                        run_dir / "embeddings.png", run_dir.name)
    if opts.plot and (run_dir / "log.jsonl").is_file():
        plot_curves(run_dir / "log.jsonl", run_dir / "curves.png")
    return metrics


def evaluate_pretrained(name_or_folder, opts, overrides, device, loader=None) -> dict:
    """Evaluate a pretrained CLIP, loaded by loader(name_or_folder, device) (default load_hf_clip; load_open_clip
    for --open-clip), on the suite of the data flags in `overrides` (DataArgs defaults for the others, with the
    model's image size and text length)."""
    import data
    model, tokenizer, transform = (loader or load_hf_clip)(name_or_folder, device)
    args = data.DataArgs(**{"image_size": model.image_size, "max_len": model.max_len, **overrides})
    return evaluate_suites(model, tokenizer, args, transform, opts, device)[0]


def main(argv=None):
    import data
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.export:
        if len(opts.runs) != 1 or opts.clip or opts.open_clip:
            parser.error("--export DIR takes exactly one RUN_DIR (and no --clip / --open-clip)")
        model, tokenizer, args, module = load_run(opts.runs[0], "cpu")
        print(export_model(model, tokenizer, opts.export, module.__name__, dataclasses.asdict(args)))
        return
    if not opts.runs and not opts.clip and not opts.open_clip:
        parser.error("give at least one RUN_DIR, --clip NAME_OR_FOLDER or --open-clip ARCH:PRETRAINED")
    overrides = {f.name: getattr(opts, f.name) for f in dataclasses.fields(data.DataArgs) if hasattr(opts, f.name)}
    device = pick_device(opts.device)
    rows = {}

    def add(name, metrics):   # a row per model; the split is named when it is not the test split
        rows[name if metrics["eval_split"] == "test" else f"{name} [{metrics['eval_split']}]"] = metrics
    for c in opts.clip:
        add(c, evaluate_pretrained(c, opts, overrides, device))
    for c in opts.open_clip:
        add(c, evaluate_pretrained(c, opts, overrides, device, load_open_clip))
    for r in opts.runs:   # row name = folder name, or the path as given when two folders share a name
        name = Path(r).resolve().name
        add(name if name not in rows else str(r), evaluate_run(r, opts, overrides, device))
    print(comparison_table(rows))


if __name__ == "__main__":
    main()
