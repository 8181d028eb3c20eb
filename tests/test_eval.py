"""Tests of eval.py: every metric against an independent reference (loops, hand-computed values).

Offline and fast: toy models and small PairSets of random pixels built here (none of data.py's datasets).
"""
import dataclasses
import itertools
import json
import math
import sys
import types
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as ev  # noqa: E402
from data import PairSet  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Fakes: PairSet, tokenizer, transform, a toy two-tower model honouring the encode_* contract
# ----------------------------------------------------------------------------------------------
class FakePairSet(PairSet):
    """A real data.PairSet over random 8x8 images, captions 'w<i> c<j> l<label>...', integer labels."""

    def __init__(self, name, n_captions, labels, seed=0, size=8):
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randint(0, 256, (len(n_captions), size, size, 3), generator=g, dtype=torch.uint8)
        captions = [[f"w{i} c{j} " + " ".join(f"l{v[i]}" for v in labels.values()) for j in range(c)]
                    for i, c in enumerate(n_captions)]
        super().__init__(name, range(len(n_captions)), captions, labels)

    def _load(self, ref):
        return Image.fromarray(self.pixels[ref].numpy(), "RGB")


class ToyTokenizer:
    """Word ids from crc32 (deterministic), padded with 0, called like a HF tokenizer."""
    vocab = 97

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        ids = [[1 + zlib.crc32(w.encode()) % (self.vocab - 1) for w in t.split()][:max_length] for t in texts]
        n = max(map(len, ids))
        return {"input_ids": torch.tensor([x + [0] * (n - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])}


def to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class ToyTwoTower(torch.nn.Module):
    """Fixed random projections of flattened pixels / of the bag of token ids; counts encoded images."""

    def __init__(self, d=6, seed=0, pixels=3 * 8 * 8, vocab=ToyTokenizer.vocab):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, rows in (("pi", pixels), ("pt", vocab), ("pii", pixels), ("pti", vocab)):
            self.register_buffer(name, torch.randn(rows, d, generator=g))
        self.n_images = 0

    def _img(self, images, proj):
        self.n_images += len(images)
        return F.normalize(images.flatten(1) @ proj, dim=-1)

    def _txt(self, ids, mask, proj):
        bag = (F.one_hot(ids, len(proj)).float() * mask[..., None]).sum(1)       # (N, V)
        return F.normalize(bag @ proj, dim=-1)

    def encode_image(self, images):
        return self._img(images, self.pi)

    def encode_text(self, ids, mask):
        return self._txt(ids, mask, self.pt)


class ToyModel(ToyTwoTower):
    """ToyTwoTower plus the optional independent features z_i (like sep.py)."""

    def encode_image_indep(self, images):
        return self._img(images, self.pii)

    def encode_text_indep(self, ids, mask):
        return self._txt(ids, mask, self.pti)


def fake_suite(n=16):
    """Retrieval on n images; zero-shot on the same PairSet; an image probe and a text probe."""
    color = [i % 3 for i in range(n)]
    shape = [-1 if i % 5 == 0 else i % 2 for i in range(n)]
    ps = FakePairSet("fake", [2 + i % 3 for i in range(n)], {"color": color, "shape": shape})
    third = n // 3
    tr, va, te = ps.subset(range(third)), ps.subset(range(third, 2 * third)), ps.subset(range(2 * third, n))
    return SimpleNamespace(
        retrieval=ps,
        zeroshot={"color": SimpleNamespace(classnames=["red", "green", "blue"], templates=["a {}", "{} thing"],
                                           images=ps, target="color")},
        probes={"color": SimpleNamespace(target="color", classes=["r", "g", "b"], modality="image",
                                         train=tr, val=va, test=te),
                "shape_text": SimpleNamespace(target="shape", classes=["a", "b"], modality="text",
                                              train=tr, val=va, test=te)})


def rand_unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------
def test_retrieval_hand_case_with_ties():
    # images = identity, so sim[i, k] = txt[k, i]; 3 images x 2 captions (txt2img = 0 0 1 1 2 2)
    sim = torch.tensor([[0.5, 0.9, 0.1, 0.2, 0.3, 0.0],   # img0: best positive 0.9, nothing above -> rank 0
                        [0.8, 0.7, 0.3, 0.6, 0.5, 0.2],   # img1: best positive 0.6, 0.8 and 0.7 above -> rank 2
                        [0.2, 0.1, 0.5, 0.0, 0.5, 0.4]])  # img2: best positive 0.5 tied with a negative -> rank 1
    m = ev.retrieval_metrics(torch.eye(3), sim.T.contiguous(), [0, 0, 1, 1, 2, 2], ks=(1, 2, 3))
    # t2i columns: cap0 [.5,.8,.2] own .5 -> 1; cap1 -> 0; cap2 [.1,.3,.5] own .3 -> 1; cap3 -> 0;
    # cap4 [.3,.5,.5] own .5 tied with image 1 -> 1; cap5 -> 0
    expected = {"i2t_R@1": 100 / 3, "i2t_R@2": 200 / 3, "i2t_R@3": 100, "t2i_R@1": 50, "t2i_R@2": 100,
                "t2i_R@3": 100}
    expected["rsum"] = sum(expected.values())
    assert m.keys() == expected.keys()
    for k in expected:
        assert m[k] == pytest.approx(expected[k], abs=1e-4), k


def test_retrieval_constant_features_score_zero_not_hundred():
    # every score ties: 10 images x 5 captions; i2t: 45 tied negatives before the positives -> rank 45;
    # t2i: the 9 other images -> rank 9, so only R@10 (all 10 images) is a hit
    for chunk in (1024, 3):
        m = ev.retrieval_metrics(torch.ones(10, 4), torch.ones(50, 4), torch.arange(50) // 5, chunk=chunk)
        assert m == pytest.approx({"i2t_R@1": 0, "i2t_R@5": 0, "i2t_R@10": 0, "t2i_R@1": 0, "t2i_R@5": 0,
                                   "t2i_R@10": 100, "rsum": 100})


def brute_force_recall(sim, txt2img, ks):
    """R@k by sorting every row of the full similarity matrix in Python (no ties with random floats)."""
    n_img, n_txt = sim.shape
    rows = sim.tolist()
    out = {}
    for k in ks:
        i2t = [any(txt2img[c] == i for c in sorted(range(n_txt), key=lambda c: -rows[i][c])[:k]) for i in range(n_img)]
        t2i = [txt2img[t] in sorted(range(n_img), key=lambda i: -rows[i][t])[:k] for t in range(n_txt)]
        out[f"i2t_R@{k}"], out[f"t2i_R@{k}"] = 100 * sum(i2t) / n_img, 100 * sum(t2i) / n_txt
    return out


def test_retrieval_matches_brute_force_and_chunking():
    txt2img = [i for i in range(23) for _ in range(1 + i % 4)]          # 1 to 4 captions per image
    img, txt = rand_unit(23, 5, 0), rand_unit(len(txt2img), 5, 1)
    m = ev.retrieval_metrics(img, txt, txt2img, ks=(1, 5, 10))
    ref = brute_force_recall(img @ txt.T, txt2img, (1, 5, 10))
    for k, v in ref.items():
        assert m[k] == pytest.approx(v, abs=1e-4), k
    assert m["rsum"] == pytest.approx(sum(ref.values()), abs=1e-3)
    assert 0 < m["i2t_R@1"] < m["i2t_R@10"] < 100                      # a non-trivial case
    assert ev.retrieval_metrics(img, txt, txt2img, chunk=4) == m         # chunk < number of queries


def test_retrieval_perfect_and_missing_caption():
    img = torch.eye(4)
    assert ev.retrieval_metrics(img, img[[0, 0, 1, 2, 3]], [0, 0, 1, 2, 3])["rsum"] == pytest.approx(600)
    with pytest.raises(ValueError, match="caption"):
        ev.retrieval_metrics(img, img[:3], [0, 1, 2])


# ----------------------------------------------------------------------------------------------
# Classification metrics and zero-shot
# ----------------------------------------------------------------------------------------------
def test_topk_accuracy_hand_computed():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.5],    # target 0: rank 0
                           [0.9, 0.1, 0.0, 0.5],    # target 3: rank 1
                           [0.9, 0.1, 0.0, 0.5],    # target 2: rank 3
                           [0.2, 0.8, 0.1, 0.0]])   # target 2: rank 2
    m = ev.topk_accuracy(logits, torch.tensor([0, 3, 2, 2]), ks=(1, 2, 3, 5))
    assert m == pytest.approx({"top1": 25.0, "top2": 50.0, "top3": 75.0, "top5": 100.0})   # k=5 clipped to 4


def test_zeroshot_ties_are_not_hits():
    # row 0: target 1 ties class 0 -> rank 1; row 1: all three tie -> rank 2; row 2: target 2 strictly first
    logits = torch.tensor([[0.7, 0.7, 0.1], [0.3, 0.3, 0.3], [0.1, 0.2, 0.9]])
    assert ev.topk_accuracy(logits, torch.tensor([1, 0, 2]), ks=(1, 2, 3)) == pytest.approx(
        {"top1": 100 / 3, "top2": 200 / 3, "top3": 100.0})
    m = ev.zeroshot_metrics(torch.ones(6, 3), torch.eye(3), [0, 1, 2, 0, 1, 2])   # constant logits
    assert m["top1"] == 0 and m["balanced_acc"] == 0 and m["top3"] == 100


def test_balanced_accuracy_differs_from_accuracy():
    targets = torch.tensor([0] * 8 + [1] * 2)
    pred = torch.tensor([0] * 8 + [0, 1])               # accuracy 90%, recalls 100% and 50%
    assert ev.balanced_accuracy(pred, targets, n_classes=3) == pytest.approx(75.0)   # class 2 absent: ignored
    assert ev.balanced_accuracy(torch.zeros(10, dtype=torch.long), targets, 2) == pytest.approx(50.0)


def test_zeroshot_classifier_is_normalized_template_mean():
    model, tok = ToyModel(), ToyTokenizer()
    classes, templates = ["red", "green", "dark blue"], ["a {}", "a photo of a {}.", "{} thing"]
    w = ev.zeroshot_classifier(model, tok, classes, templates, "cpu", max_len=16)
    for c, name in enumerate(classes):
        feats = []
        for t in templates:
            enc = tok([t.format(name)])
            f = model.encode_text(enc["input_ids"], enc["attention_mask"])[0]
            feats.append(f / f.norm())
        mean = sum(feats) / len(feats)
        assert torch.allclose(w[c], mean / mean.norm(), atol=1e-5)


def test_zeroshot_metrics_hand_case_ignores_minus_one():
    weights = torch.eye(3)
    img = torch.tensor([[1.0, 0.2, 0.1], [0.1, 1.0, 0.5], [0.9, 0.3, 0.0], [0.0, 0.0, 1.0], [1, 1, 1.0]])
    m = ev.zeroshot_metrics(img, weights, [0, 2, 1, 2, -1])   # preds 0,1,0,2; ranks of target 0,1,1,0
    assert m == pytest.approx({"top1": 50.0, "top3": 100.0, "top5": 100.0, "n_classes": 3.0,
                               "balanced_acc": (100 + 0 + 50) / 3})


def test_encode_restores_mode_and_is_batch_independent():
    model, ps = ToyModel(), FakePairSet("p", [1] * 7, {})
    model.train()
    a = ev.encode_images(model, ps, to_tensor, "cpu", batch_size=3)
    assert model.training and a.dtype == torch.float32 and a.shape == (7, 6)
    b = ev.encode_images(model, ps, to_tensor, "cpu", batch_size=100)
    assert torch.allclose(a, b, atol=1e-6)
    c = ev.encode_images(model, ps, to_tensor, "cpu", indep=True)
    assert not torch.allclose(a, c)
    t = ev.encode_texts(model, ToyTokenizer(), ps.texts, "cpu", max_len=16, batch_size=2)
    assert torch.allclose(t, ev.encode_texts(model, ToyTokenizer(), ps.texts, "cpu", max_len=16), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------
def blobs(n_per_class, means, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([m + torch.randn(n_per_class, len(m), generator=g) for m in means])
    return x, torch.arange(len(means)).repeat_interleave(n_per_class)


def test_linear_probe_separable_blobs():
    means = 4 * torch.eye(3, 8)                                          # 3 classes, 5.7 sigma apart
    m = ev.linear_probe(*blobs(40, means, 0), *blobs(20, means, 1), *blobs(50, means, 2), n_classes=3)
    assert m["acc"] >= 95 and m["best_wd"] in (0, 1e-4, 1e-3, 1e-2, 1e-1)


def test_linear_probe_random_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(800, 5, generator=g), torch.randint(0, 4, (800,), generator=g)
    m = ev.linear_probe(x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:], n_classes=4)
    assert 15 <= m["acc"] <= 35                                          # chance = 25%


def test_linear_probe_selects_weight_decay_by_validation():
    # train: 40 points of class 0 near -2, 20 of class 1 near +2 (separable)
    xtr = torch.cat([torch.full((40, 1), -2.0), torch.full((20, 1), 2.0)]) + 0.1 * torch.randn(60, 1)
    ytr = torch.tensor([0] * 40 + [1] * 20)
    xva = torch.full((10, 1), 2.0)
    # val labels 0 at +2 contradict train: only the huge wd (W ~ 0, majority class 0) is right on val
    m = ev.linear_probe(xtr, ytr, xva, torch.zeros(10, dtype=torch.long), xva, torch.zeros(10, dtype=torch.long),
                        n_classes=2, wds=(0, 1e4))
    assert m["best_wd"] == 1e4
    # val labels 1 at +2 agree with train: the unregularized probe is right, the huge wd wrong
    m = ev.linear_probe(xtr, ytr, xva, torch.ones(10, dtype=torch.long), xva, torch.ones(10, dtype=torch.long),
                        n_classes=2, wds=(1e4, 0))
    assert m["best_wd"] == 0 and m["acc"] == 100


# ----------------------------------------------------------------------------------------------
# Structure metrics
# ----------------------------------------------------------------------------------------------
def test_structure_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    m = ev.structure_metrics(img, txt, [0, 0, 1])
    # centroids (1/2, 1/2) and (1/3, 2/3): gap = sqrt(2)/6; pairs (img0,txt0) 0, (img0,txt1) 2, (img1,txt2) 0
    assert m["modality_gap"] == pytest.approx(math.sqrt(2) / 6)
    assert m["alignment"] == pytest.approx(2 / 3)
    assert m["matched_cosine"] == pytest.approx(2 / 3)
    assert m["uniformity_image"] == pytest.approx(-4.0)                        # one pair, ||d||^2 = 2
    assert m["uniformity_text"] == pytest.approx(math.log((2 * math.exp(-4) + 1) / 3), abs=1e-6)


def test_structure_against_loops():
    txt2img = [0, 0, 1, 2, 2, 2, 3, 4]
    img, txt = rand_unit(5, 4, 3), rand_unit(8, 4, 4)
    m = ev.structure_metrics(img, txt, txt2img)
    gap = sum(img) / 5 - sum(txt) / 8
    pairs = [(img[i], txt[k]) for k, i in enumerate(txt2img)]
    unif = lambda u: math.log(sum(math.exp(-2 * float((a - b) @ (a - b)))                      # noqa: E731
                                  for a, b in itertools.permutations(u, 2)) / (len(u) * (len(u) - 1)))
    assert m["modality_gap"] == pytest.approx(math.sqrt(sum(float(v) ** 2 for v in gap)), abs=1e-6)
    assert m["alignment"] == pytest.approx(sum(float((x - y) @ (x - y)) for x, y in pairs) / 8, abs=1e-6)
    assert m["matched_cosine"] == pytest.approx(sum(float(x @ y) for x, y in pairs) / 8, abs=1e-6)
    assert m["uniformity_image"] == pytest.approx(unif(list(img)), abs=1e-5)
    assert m["uniformity_text"] == pytest.approx(unif(list(txt)), abs=1e-5)


def test_uniformity_subsample_is_deterministic():
    u = rand_unit(50, 3, 5)
    assert ev.uniformity(u, max_points=20) == ev.uniformity(u, max_points=20)
    assert ev.uniformity(u, max_points=20) != ev.uniformity(u)


# ----------------------------------------------------------------------------------------------
# ITM scoring and reranking (fusion models)
# ----------------------------------------------------------------------------------------------
class ToyFusion(ToyTwoTower):
    """ToyTwoTower plus an ITM score unrelated to the ITC cosine: tanh of a bilinear form of the pixels and the
    bag of words through its own random matrices, rounded to a multiple of `step` when step > 0 (so that
    scores tie). Counts the images its ITM encodes."""

    def __init__(self, seed=0, step=0.0):
        super().__init__(seed=seed)
        self.step = step
        g = torch.Generator().manual_seed(seed + 100)
        self.register_buffer("pf", torch.randn(3 * 8 * 8, 5, generator=g))
        self.register_buffer("tf", torch.randn(ToyTokenizer.vocab, 5, generator=g))
        self.itm_images = 0

    def _fuse(self, img_tokens, ids, mask):                                     # img_tokens (N, 1, 5)
        bag = (F.one_hot(ids, len(self.tf)).float() * mask[..., None]).sum(1)     # (N, V)
        score = torch.tanh((img_tokens[:, 0] * (bag @ self.tf)).sum(1) / 10)
        return torch.round(score / self.step) * self.step if self.step else score

    def itm_score(self, images, ids, mask):
        self.itm_images += len(images)
        return self._fuse((images.flatten(1) @ self.pf)[:, None], ids, mask)


class ToyFusionSplit(ToyFusion):
    """The same scores through the optional split: image_tokens once per image, itm_score_tokens per pair."""

    def image_tokens(self, images):
        self.itm_images += len(images)
        return (images.flatten(1) @ self.pf)[:, None]                              # (N, 1, 5)

    def itm_score_tokens(self, tokens, ids, mask):
        return self._fuse(tokens, ids, mask)


def score_alone(model, ps, tok, i, t):
    """ITM score of one (image, caption) pair, fed alone: the image once, the caption tokenized alone."""
    enc = tok([ps.texts[t]])
    return model.itm_score(to_tensor(ps.load_image(i))[None], enc["input_ids"], enc["attention_mask"]).item()


@pytest.mark.parametrize("model_cls", [ToyFusion, ToyFusionSplit])
def test_itm_scores_match_pairs_scored_alone(model_cls):
    ps, tok = FakePairSet("p", [1 + i % 3 for i in range(11)], {}), ToyTokenizer()
    g = torch.Generator().manual_seed(1)
    pairs = torch.stack([torch.randint(0, 11, (60,), generator=g), torch.randint(0, len(ps.texts), (60,),
                                                                                   generator=g)], 1)
    pairs = torch.unique(pairs, dim=0)[torch.randperm(len(torch.unique(pairs, dim=0)), generator=g)]  # unsorted
    ref = torch.tensor([score_alone(ToyFusion(), ps, tok, i, t) for i, t in pairs.tolist()])
    for batch_size, image_batch_size, workers in ((256, 64, 0), (7, 3, 0), (5, 2, 2)):
        model = model_cls()
        out = ev.itm_scores(model, ps, pairs, to_tensor, tok, "cpu", 16, batch_size=batch_size,
                            image_batch_size=image_batch_size, num_workers=workers)
        assert torch.allclose(out, ref, atol=1e-6), (batch_size, image_batch_size, workers)
        n_images = len(set(pairs[:, 0].tolist()))
        assert model.itm_images == (n_images if model_cls is ToyFusionSplit else len(pairs))   # each once


def reranked_recall(sim, itm, positives, k, ks):
    """R@r by brute force: candidate c of query q sorts by the key (0, -itm[q, c]) if c is among the k largest
    sim[q] (a negative before a positive it ties) else (1, -sim[q, c]); the rank of q is the number of
    negatives whose key is at most its best positive's key."""
    hits = dict.fromkeys(ks, 0)
    for q in range(len(sim)):
        top = set(sorted(range(sim.shape[1]), key=lambda c: (-sim[q, c].item(), c in positives[q]))[:k])
        key = {c: (0, -itm[q, c].item()) if c in top else (1, -sim[q, c].item()) for c in range(sim.shape[1])}
        best = min(key[c] for c in positives[q])
        rank = sum(v <= best for c, v in key.items() if c not in positives[q])   # a tied negative counts
        for r in ks:
            hits[r] += rank < r
    return {r: 100.0 * h / len(sim) for r, h in hits.items()}


@pytest.mark.parametrize("k, tied", [(1, False), (4, False), (100, False), (3, True), (100, True)])
def test_rerank_retrieval_matches_brute_force(k, tied):
    # tied: three distinct image and caption features (cosines 0 or 1) and ITM scores rounded to 0.5 steps,
    # so ties at the k-th ITC score and among the rescores, all going against the query
    ps, tok = FakePairSet("p", [1 + i % 4 for i in range(13)], {}), ToyTokenizer()
    n, m, t2i, step = len(ps), len(ps.texts), ps.txt2img, 0.5 if tied else 0.0
    if tied:
        img, txt = (F.one_hot(torch.as_tensor(g) % 3, 6).float() for g in (range(n), t2i))
    else:
        img, txt = rand_unit(n, 6, 2), rand_unit(m, 6, 3)
    itm = torch.tensor([[score_alone(ToyFusion(step=step), ps, tok, i, t) for t in range(m)] for i in range(n)])
    ref_i2t = reranked_recall(img @ txt.T, itm, [[t for t in range(m) if t2i[t] == i] for i in range(n)], k,
                              (1, 5, 10))
    ref_t2i = reranked_recall(txt @ img.T, itm.T, [[t2i[t]] for t in range(m)], k, (1, 5, 10))
    for model_cls, chunk in ((ToyFusion, 1024), (ToyFusionSplit, 1024), (ToyFusionSplit, 3)):
        out = ev.rerank_retrieval(model_cls(step=step), ps, img, txt, to_tensor, tok, "cpu", 16, k=k, chunk=chunk,
                                  batch_size=8)
        for r in (1, 5, 10):
            assert out[f"i2t_R@{r}"] == pytest.approx(ref_i2t[r]), (model_cls, chunk, r)
            assert out[f"t2i_R@{r}"] == pytest.approx(ref_t2i[r]), (model_cls, chunk, r)
        assert out["rsum"] == pytest.approx(sum(ref_i2t.values()) + sum(ref_t2i.values()))
    assert ref_i2t[1] != ev.retrieval_metrics(img, txt, t2i)["i2t_R@1"] or k == 1 or tied  # reranking mattered
    if tied:   # rescored by the ITC cosine itself, the reranked order is the first stage's: the same ranks
        sim, groups = img @ txt.T, (torch.arange(n), torch.as_tensor(t2i))
        top = ev._against_query(sim, groups[0][:, None] == groups[1][None]).topk(min(k, m), dim=1).indices
        again = ev._reranked_ranks(ev._sim_rows(img, txt, "i2t"), n, top, sim.gather(1, top), *groups, 4)
        assert torch.equal(again, ev._ranks(img, txt, *groups, 4))


def tiny_albef_model(split):
    """A real ALBEF (albef_fusion.build_model) at tiny.TINY_ALBEF sizes; split=True adds image_tokens / itm_score_tokens
    made of its own parts (the optional split of the ITM contract)."""
    import albef_fusion as albef
    import data
    from tiny import TINY_ALBEF
    args = data.parse_args(albef.Args, TINY_ALBEF)
    tokenizer = data.build_tokenizer(args)
    torch.manual_seed(0)
    model = albef.build_model(args, tokenizer).eval()
    if split:
        model.image_tokens = model.visual                                            # (N, 1+P, Wv)

        def itm_score_tokens(tokens, ids, mask):
            h = model.bert.fuse(model.bert.encode_text(ids, mask), mask, tokens)
            logits = model.itm_head(h[:, 0])
            return logits[:, 1] - logits[:, 0]
        model.itm_score_tokens = itm_score_tokens
    return model, tokenizer, data.eval_transform(args.image_size), data.SynthPairSet("test", 9, size=args.image_size)


def test_itm_scores_real_albef_pairs_alone_and_split():
    model, tok, transform, ps = tiny_albef_model(split=False)
    pairs = torch.tensor([(i, t) for i in range(len(ps)) for t in range(0, len(ps.texts), 4)])   # (P, 2)
    with torch.no_grad():
        ref = torch.cat([model.itm_score(transform(ps.load_image(i))[None], **_tok1(tok, ps.texts[t]))
                         for i, t in pairs.tolist()])
    got = ev.itm_scores(model, ps, pairs, transform, tok, "cpu", 32, batch_size=16, image_batch_size=4)
    assert torch.allclose(got, ref, atol=1e-5)
    split, *_ = tiny_albef_model(split=True)
    got_split = ev.itm_scores(split, ps, pairs, transform, tok, "cpu", 32, batch_size=16, image_batch_size=4)
    assert torch.allclose(got_split, ref, atol=1e-5)


def _tok1(tok, text):
    enc = tok([text], padding=True, truncation=True, max_length=32, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ----------------------------------------------------------------------------------------------
# evaluate() and the table
# ----------------------------------------------------------------------------------------------
def test_evaluate_keys_values_and_caching():
    model, tok, suite = ToyModel(), ToyTokenizer(), fake_suite()
    cache = {}
    out = ev.evaluate(model, tok, suite, to_tensor, "cpu", max_len=16, cache=cache)
    ret = [f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["retrieval/rsum"]
    struct = [f"structure/{k}" for k in ("modality_gap", "alignment", "uniformity_image", "uniformity_text",
                                         "matched_cosine")]
    zs = [f"zeroshot/color/{k}" for k in ("top1", "top3", "top5", "balanced_acc", "n_classes")]
    probe = [f"probe/{t}/{f}/{k}" for t in ("color", "shape_text") for f in ("z", "z+zi") for k in ("acc", "best_wd")]
    assert sorted(out) == sorted(ret + struct + zs + probe)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    # each PairSet encoded once: retrieval set (shared with zero-shot) z; the 3 probe splits z and z_i
    assert model.n_images == 16 + 2 * 16
    ps = suite.retrieval
    img = ev.encode_images(model, ps, to_tensor, "cpu")
    txt = ev.encode_texts(model, tok, ps.texts, "cpu", 16)
    assert torch.allclose(cache[id(ps), "image"][1], img) and torch.allclose(cache[id(ps), "text"][1], txt)
    for k, v in ev.retrieval_metrics(img, txt, ps.txt2img).items():
        assert out[f"retrieval/{k}"] == pytest.approx(v)
    # text probe on [z, z_i]: each caption labelled by a loop over captions, label -1 dropped
    task, data = suite.probes["shape_text"], []
    for p in (task.train, task.val, task.test):
        keep = [k for k, i in enumerate(p.txt2img) if p.labels["shape"][i] != -1]
        x = torch.cat([ev.encode_texts(model, tok, p.texts, "cpu", 16, indep=i) for i in (False, True)], 1)
        data += [x[keep], torch.tensor([p.labels["shape"][p.txt2img[k]] for k in keep])]
    ref = ev.linear_probe(*data, n_classes=2)
    assert out["probe/shape_text/z+zi/acc"] == ref["acc"] and out["probe/shape_text/z+zi/best_wd"] == ref["best_wd"]


def test_evaluate_without_indep_reports_z_only():
    out = ev.evaluate(ToyTwoTower(), ToyTokenizer(), fake_suite(), to_tensor, "cpu", max_len=16)
    assert not any("z+zi" in k for k in out) and "probe/color/z/acc" in out


class NaNImages(ToyModel):
    """A diverged model: the image features of images whose first pixel is brighter than 0.5 are NaN."""

    def encode_image(self, images):
        f = super().encode_image(images)
        return torch.where(images[:, :1, 0, 0] > 0.5, float("nan"), f)


def test_evaluate_refuses_non_finite_features():
    suite = fake_suite()
    n_bad = sum(to_tensor(suite.retrieval.load_image(i))[0, 0, 0].item() > 0.5 for i in range(16))
    assert 0 < n_bad < 16
    with pytest.raises(ValueError, match=rf"encode_image of the 16 images of 'fake': {n_bad} of 16 feature rows "
                                         rf"are not finite .*diverged"):
        ev.evaluate(NaNImages(), ToyTokenizer(), suite, to_tensor, "cpu", max_len=16)

    class NaNTexts(ToyModel):
        def encode_text(self, ids, mask):
            return torch.full((len(ids), 6), float("inf"))
    m = len(suite.retrieval.texts)
    with pytest.raises(ValueError, match=rf"encode_text of the {m} captions of 'fake': {m} of {m} .* not finite"):
        ev.evaluate(NaNTexts(), ToyTokenizer(), suite, to_tensor, "cpu", max_len=16)


# ----------------------------------------------------------------------------------------------
# validate(): the cheap periodic metrics
# ----------------------------------------------------------------------------------------------
def test_validate_equals_evaluate_on_shared_keys_and_states_its_score():
    suite = fake_suite()
    suite.zeroshot["parity"] = SimpleNamespace(classnames=["even", "odd"], templates=["{}"], images=suite.probes[
        "color"].test, target="shape")                               # a second label set on other images
    full = ev.evaluate(ToyModel(), ToyTokenizer(), suite, to_tensor, "cpu", max_len=16)
    model = ToyModel()
    val = ev.validate(model, ToyTokenizer(), suite, to_tensor, "cpu", 16)
    expected = ["retrieval/i2t_R@1", "retrieval/t2i_R@1", "retrieval/rsum", "zeroshot/color/top1",
                "zeroshot/parity/top1"]
    assert sorted(val) == sorted(["val/" + k for k in expected] + ["val/score"])
    for k in expected:
        assert val["val/" + k] == full[k], k
    zs = (full["zeroshot/color/top1"] + full["zeroshot/parity/top1"]) / 2
    assert val["val/score"] == pytest.approx((zs + full["retrieval/rsum"] / 6) / 2)
    assert model.n_images == 16 + len(suite.probes["color"].test)      # each image set encoded once


def test_validate_caps_images_and_restores_mode():
    suite = fake_suite(n=15)
    model = ToyModel()
    model.train()
    val = ev.validate(model, ToyTokenizer(), suite, to_tensor, "cpu", 16, max_images=7)
    assert model.training
    head = suite.retrieval.subset(range(7))                              # the first 7 images, their captions
    small = SimpleNamespace(retrieval=head, probes={}, zeroshot={"color": SimpleNamespace(
        **{**vars(suite.zeroshot["color"]), "images": head})})
    ref = ev.evaluate(ToyModel(), ToyTokenizer(), small, to_tensor, "cpu", max_len=16)
    assert val["val/retrieval/rsum"] == ref["retrieval/rsum"] and val["val/zeroshot/color/top1"] == \
        ref["zeroshot/color/top1"]
    assert model.n_images == 7
    model.eval()
    ev.validate(model, ToyTokenizer(), suite, to_tensor, "cpu", 16)
    assert not model.training
    only_zs = ev.validate(ToyModel(), ToyTokenizer(), SimpleNamespace(retrieval=None, zeroshot=suite.zeroshot,
                                                                      probes={}), to_tensor, "cpu", 16)
    assert only_zs["val/score"] == only_zs["val/zeroshot/color/top1"]
    with pytest.raises(ValueError, match="neither a retrieval set nor a zero-shot"):
        ev.validate(ToyModel(), ToyTokenizer(), SimpleNamespace(retrieval=None, zeroshot={}, probes={}),
                    to_tensor, "cpu", 16)


def test_comparison_table():
    a = {"retrieval/i2t_R@1": 12.345, "retrieval/rsum": 300.0, "zeroshot/color/top1": 50.0,
         "zeroshot/color/top3": 90.0, "probe/color/z/acc": 80.0, "probe/color/z/best_wd": 0.01,
         "structure/modality_gap": 0.5}
    b = {"retrieval/i2t_R@1": 1.0, "retrieval/rsum": 3.0, "probe/color/z+zi/acc": 81.256, "note": "text"}
    assert ev.comparison_table({"runA": a, "runB": b}).splitlines() == [
        "| run | i2t_R@1 | rsum | zeroshot/color/top1 | probe/color/z/acc | probe/color/z+zi/acc | modality_gap |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| runA | 12.35 | 300.00 | 50.00 | 80.00 | - | 0.50 |",
        "| runB | 1.00 | 3.00 | - | - | 81.26 | - |"]
    assert ev.comparison_table({"r": a}, columns=["zeroshot/color/*"]).splitlines()[0] == \
        "| run | zeroshot/color/top1 | zeroshot/color/top3 |"


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def training_log(with_val):
    """log.jsonl rows as a method script writes them: loss == loss_con (L_con is the whole loss), a second
    term, 1/τ, lr; with_val: a 'val/...' row every 4 steps."""
    rows = [{"step": s, "loss": 2 / s, "loss_con": 2 / s, "loss_v2t": 1 / s, "logit_scale": 14 + s, "lr": 1e-3 / s,
             "samples_per_s": 100.0} for s in range(1, 9)]
    if with_val:
        rows += [{"step": s, "val/retrieval/i2t_R@1": 10.0 * s, "val/retrieval/rsum": 60.0 * s,
                  "val/zeroshot/shape/top1": 5.0 * s, "val/score": 7.0 * s} for s in (4, 8)]
    return rows


def test_curve_panels():
    assert ev.curve_panels(training_log(False)) == [("losses", ["loss", "loss_v2t"]), ("temperature", ["logit_scale"]),
                                                    ("learning rate", ["lr"])]   # loss_con == loss: left out
    panels = dict(ev.curve_panels(training_log(True)))
    assert panels["validation"] == ["val/retrieval/i2t_R@1", "val/retrieval/rsum", "val/score",
                                    "val/zeroshot/shape/top1"]
    rows = training_log(False)
    rows[3]["loss_con"] = 0.0                                             # differs at one step: a term of its own
    assert dict(ev.curve_panels(rows))["losses"] == ["loss", "loss_con", "loss_v2t"]
    assert ev.curve_panels([{"step": 1, "samples_per_s": 3.0}]) == []


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    img, txt, t2i = rand_unit(10, 4, 0), rand_unit(20, 4, 1), [i // 2 for i in range(20)]
    ev.plot_embeddings(img, txt, t2i, tmp_path / "e.png", "toy")
    ev.plot_embeddings_grid({"a": (img, txt, t2i), "b": (txt[:10], img, list(range(10)))}, tmp_path / "g.png")
    for with_val in (False, True):
        log = tmp_path / f"log{with_val}.jsonl"
        log.write_text("\n".join(json.dumps(r) for r in training_log(with_val)))
        ev.plot_curves(log, tmp_path / f"c{with_val}.png")
    for name in ("e.png", "g.png", "cFalse.png", "cTrue.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.write_text(json.dumps({"step": 1, "samples_per_s": 3.0}))
    with pytest.raises(ValueError, match="no loss"):
        ev.plot_curves(log, tmp_path / "none.png")


# ----------------------------------------------------------------------------------------------
# Saved runs and the CLI (fake `data` module and fake method script, injected into sys.modules)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FakeDataArgs:
    data: str = "fake"
    max_samples: int = 0
    image_size: int = 8
    max_len: int = 16
    eval_split: str = "test"
    num_workers: int = 0


@dataclasses.dataclass
class FakeArgs(FakeDataArgs):
    seed: int = 0


@pytest.fixture
def fake_project(monkeypatch, tmp_path):
    """A run folder written by a fake method script (a toy model under the name clip_base), and a fake `data`
    module recording its calls."""
    calls = []

    def add_dataclass_args(parser, cls, defaults=True):
        import argparse
        for f in dataclasses.fields(cls):
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                                default=f.default if defaults else argparse.SUPPRESS)

    def build_eval_suite(args, split=None):
        calls.append(args)
        return fake_suite(n=args.max_samples or 12)

    data = types.SimpleNamespace(DataArgs=FakeDataArgs, add_dataclass_args=add_dataclass_args,
                                 build_tokenizer=lambda args: ToyTokenizer(), eval_transform=lambda s: to_tensor,
                                 build_eval_suite=build_eval_suite, folder_suite=None)
    script = types.SimpleNamespace(Args=FakeArgs, build_model=lambda args, tok: ToyModel(seed=args.seed + 1))
    monkeypatch.setitem(sys.modules, "data", data)
    monkeypatch.setitem(sys.modules, "clip_base", script)
    run = tmp_path / "toy-run"
    run.mkdir()
    torch.save({"model": ToyModel(seed=0).state_dict(), "args": dataclasses.asdict(FakeArgs()),
                "script": "clip_base", "step": 3}, run / "checkpoint.pt")
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.0}))
    return run, calls


def test_load_run_restores_weights(fake_project):
    run, _ = fake_project
    model, tok, args, module = ev.load_run(run, "cpu")
    assert args == FakeArgs() and module.Args is FakeArgs and not model.training
    assert torch.equal(model.pi, ToyModel(seed=0).pi)       # build_model used seed 1: weights came from the file


def test_load_run_prefers_the_saved_tokenizer(fake_project):
    transformers = pytest.importorskip("transformers")
    run, _ = fake_project
    (run / "vocab").mkdir()
    (run / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zebra"]))
    transformers.BertTokenizerFast.from_pretrained(run / "vocab").save_pretrained(run / "tokenizer")
    _, tok, _, _ = ev.load_run(run, "cpu")
    assert tok(["zebra"])["input_ids"] == [[2, 5, 3]]


def test_load_run_clear_errors(fake_project, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        ev.load_run(tmp_path / "nowhere", "cpu")
    run, _ = fake_project
    monkeypatch.setitem(sys.modules, "sep", None)                        # a method script that cannot be imported
    torch.save({"model": {}, "args": {}, "script": "sep", "step": 0}, run / "checkpoint.pt")
    with pytest.raises(ModuleNotFoundError, match="written by sep.py, expected next to eval.py"):
        ev.load_run(run, "cpu")
    torch.save({"model": {}, "args": {"seed": 0, "no_such_flag": 1}, "script": "clip_base"}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"\['no_such_flag'\] are not flags of the current clip_base.py"):
        ev.load_run(run, "cpu")
    torch.save({"args": {}, "script": "clip_base"}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="no model dict"):
        ev.load_run(run, "cpu")


def test_cli_overrides_saves_plots_and_prints_table(fake_project, capsys):
    run, calls = fake_project
    ev.main([str(run), "--device", "cpu", "--max-samples", "9", "--save"] +
            (["--plot"] if _has_matplotlib() else []))
    assert calls[-1].max_samples == 9 and calls[-1].data == "fake"     # given flag overrides, others kept
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| toy-run | ")
    saved = json.loads((run / "metrics_eval.json").read_text())
    assert "retrieval/rsum" in saved and "probe/color/z+zi/acc" in saved
    if _has_matplotlib():
        assert (run / "embeddings.png").is_file() and (run / "curves.png").is_file()
    ev.main([str(run), "--device", "cpu"])
    assert calls[-1].max_samples == 0                                  # not given: the run's saved value


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_cli_eval_split_val_flows_to_the_suite_and_its_own_file(fake_project, capsys):
    run, calls = fake_project
    ev.main([str(run), "--device", "cpu", "--eval-split", "val", "--save"])
    assert calls[-1].eval_split == "val"
    assert (run / "metrics_eval_val.json").is_file() and not (run / "metrics_eval.json").exists()
    assert json.loads((run / "metrics_eval_val.json").read_text())["eval_split"] == "val"
    assert capsys.readouterr().out.strip().splitlines()[2].startswith("| toy-run [val] | ")
    ev.main([str(run), "--device", "cpu", "--save"])
    assert calls[-1].eval_split == "test" and (run / "metrics_eval.json").is_file()


def test_real_cli_has_the_eval_split_flag():
    opts = ev.build_parser().parse_args(["run", "--eval-split", "val"])   # the real data.DataArgs flags
    assert opts.eval_split == "val"
    assert not hasattr(ev.build_parser().parse_args(["run"]), "eval_split")   # not given: the run's own value
