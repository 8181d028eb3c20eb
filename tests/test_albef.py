"""albef_fusion.py: queue, momentum update, MLM masking, hard negatives, distillation targets, the ITC/MLM/ITM
losses against loops, bidirectional attention, pretrained-weight loading, eval.py's ITM reranking against a
brute force, a smoke run, exact resume and eval.py on the saved run."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import albef_fusion as albef
import data
import eval as ev
from tiny import eval_cli_agrees, resume_is_exact, smoke_run, tiny_albef, unit


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


TINY_MODEL = dict(vit_patch=8, vit_width=32, vit_depth=1, vit_heads=2, text_width=32, text_layers=1, fusion_layers=1,
                  text_heads=2, embed_dim=16, queue_size=32)


def tiny_model(tokenizer, script=albef, **kw):
    """A tiny model of `script` (albef_fusion or codis), seeded, in eval mode, and its Args."""
    args = script.Args(**{**TINY_MODEL, **kw})
    torch.manual_seed(0)
    return script.build_model(args, tokenizer).eval(), args


def toy_batch(tokenizer, n=8):
    """n captions and random 32 px images, as compute_losses takes them (every pair its own image)."""
    ids, mask = tokens(tokenizer, [f"a red {s}." for s in ["circle", "square", "star", "ring"] * (n // 4)])
    return {"image": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "input_ids": ids,
            "attention_mask": mask, "index": torch.arange(n)}


def tokens(tokenizer, texts):
    t = tokenizer(texts, padding=True, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


# ----------------------------------------------------------------------------------------------
# queue
# ----------------------------------------------------------------------------------------------
@pytest.mark.method
def test_queue_is_a_fifo_with_wraparound():
    M, N, E = 12, 4, 3
    image_q, text_q = torch.arange(M * E).float().view(M, E), -torch.arange(M * E).float().view(M, E)
    ptr = torch.zeros((), dtype=torch.long)
    ref_img, ref_txt = [r.clone() for r in image_q], [r.clone() for r in text_q]  # oldest first
    ptrs = []
    for step in range(7):  # 7 steps of 4 over a queue of 12: wraps around twice
        new_img, new_txt = torch.randn(N, E), torch.randn(N, E)
        albef.dequeue_and_enqueue(image_q, text_q, ptr, new_img, new_txt)
        ref_img, ref_txt = ref_img[N:] + list(new_img), ref_txt[N:] + list(new_txt)  # dequeue N, enqueue N
        ptrs.append(int(ptr))
        # the ring buffer read from the pointer on is the queue, oldest first
        assert torch.equal(torch.roll(image_q, -int(ptr), 0), torch.stack(ref_img))
        assert torch.equal(torch.roll(text_q, -int(ptr), 0), torch.stack(ref_txt))
        # the newest batch sits just before the pointer
        assert torch.equal(image_q[(int(ptr) - N) % M:][:N], new_img)
    assert ptrs == [4, 8, 0, 4, 8, 0, 4]


def test_queue_size_must_be_a_multiple_of_the_batch(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of --batch-size 16"):
        albef.check_queue(100, 16)
    albef.check_queue(96, 16)
    with pytest.raises(SystemExit) as e:                          # the flag check, before anything runs
        albef.main(["--queue-size", "100", "--batch-size", "16", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert not os.listdir(tmp_path)  # an error at start-up, before any output


@pytest.mark.parametrize("script", ["albef_fusion", "codis"])
def test_default_flags_pass_the_start_up_checks(script):
    """The no-argument run: the default queue holds whole batches, and warm-up and α ramp end before the last step."""
    args = pytest.importorskip(script).Args()
    assert args.queue_size % args.batch_size == 0
    albef.check_queue(args.queue_size, args.batch_size)
    assert 0 < args.warmup < args.steps and 0 < args.alpha_ramp < args.steps


# ----------------------------------------------------------------------------------------------
# momentum model
# ----------------------------------------------------------------------------------------------
@pytest.mark.method
def test_momentum_update_formula():
    torch.manual_seed(0)
    online, momentum = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    nn.init.normal_(momentum[1].weight)
    before = [p.clone() for p in momentum.parameters()]
    albef.momentum_update([(online, momentum)], 0.9)
    for p, p_m, old in zip(online.parameters(), momentum.parameters(), before):
        assert torch.allclose(p_m, 0.9 * old + 0.1 * p, atol=1e-7)  # θ_m ← m θ_m + (1 − m) θ
    albef.momentum_update([(online, momentum)], 0.0)                 # m = 0: a copy
    assert all(torch.equal(p, p_m) for p, p_m in zip(online.parameters(), momentum.parameters()))


@pytest.mark.method
def test_momentum_model_is_not_trained_by_the_optimizer(tokenizer):
    model, args = tiny_model(tokenizer, batch_size=8, queue_size=16)
    model.train()
    opt, _ = albef.make_optimizer(model, args, torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    mom = model.momentum_parameters()
    assert mom and all(not p.requires_grad and id(p) not in in_opt for p in mom)
    assert {id(p) for p in model.parameters() if p.requires_grad} == in_opt
    # the copy starts equal to the online model (ITM head and temperature have no momentum copy)
    for online, momentum in model.momentum_pairs():
        assert all(torch.equal(p, q) for p, q in zip(online.parameters(), momentum.parameters()))
    # one step: the optimizer moves the online weights; the momentum weights move only by the formula
    ids, mask = tokens(tokenizer, [f"a red {s}." for s in ["circle", "square", "star", "ring"] * 2])
    batch = {"image": torch.randn(8, 3, 32, 32), "input_ids": ids, "attention_mask": mask, "index": torch.arange(8)}
    before = [p.clone() for p in mom]
    albef.compute_losses(model, batch, args, 0.4)["loss"].backward()
    assert all(p.grad is None for p in mom)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(mom, before))
    albef.momentum_update(model.momentum_pairs(), 0.995)
    online = [p for o, _ in model.momentum_pairs() for p in o.parameters()]
    for p, p_m, old in zip(online, mom, before):
        assert torch.allclose(p_m, 0.995 * old + 0.005 * p, atol=1e-7)
    assert any(not torch.equal(p, b) for p, b in zip(mom, before))


@pytest.mark.method
def test_grad_checkpoint_gives_the_same_losses_and_gradients(tokenizer):
    batch = toy_batch(tokenizer)
    out = []
    for checkpointed in (False, True):
        model, args = tiny_model(tokenizer, batch_size=8, queue_size=16, grad_checkpoint=checkpointed)
        model.train()
        torch.manual_seed(1)  # the same masking and negatives
        terms = albef.compute_losses(model, batch, args, 0.4)
        terms["loss"].backward()
        out.append((terms["loss"].item(), [p.grad for p in model.parameters() if p.requires_grad]))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out[0][1], out[1][1]) if a is not None)


# ----------------------------------------------------------------------------------------------
# MLM masking
# ----------------------------------------------------------------------------------------------
@pytest.mark.method
def test_mask_tokens_rule_and_proportions():
    torch.manual_seed(0)
    PAD, CLS, SEP, MASK, V = 0, 2, 3, 4, 100
    ids = torch.randint(5, V, (64, 20))
    lengths = torch.randint(3, 21, (64,))
    for row, n in enumerate(lengths.tolist()):  # [CLS] w ... w [SEP] [PAD] ...
        ids[row, 0], ids[row, n - 1], ids[row, n:] = CLS, SEP, PAD
    special = (ids == PAD) | (ids == CLS) | (ids == SEP)
    chosen = masked = kept = other = eligible = 0
    for _ in range(100):
        out, labels = albef.mask_tokens(ids, V, MASK, [PAD, CLS, SEP], 0.15)
        sel = labels != -100
        assert not (sel & special).any()                              # never [PAD], [CLS], [SEP]
        assert torch.equal(labels[sel], ids[sel])                     # labels: the original ids there ...
        assert torch.equal(out[~sel], ids[~sel])                      # ... and nothing else changes
        chosen, eligible = chosen + sel.sum().item(), eligible + (~special).sum().item()
        masked += (out[sel] == MASK).sum().item()
        kept += (out[sel] == ids[sel]).sum().item()
        other += ((out[sel] != MASK) & (out[sel] != ids[sel])).sum().item()
    assert chosen / eligible == pytest.approx(0.15, abs=0.005)
    # a random id can hit [MASK] or the original one (1/V each)
    assert masked / chosen == pytest.approx(0.8 + 0.1 / V, abs=0.01)
    assert kept / chosen == pytest.approx(0.1 + 0.1 / V, abs=0.01)
    assert other / chosen == pytest.approx(0.1 * (1 - 2 / V), abs=0.01)


# ----------------------------------------------------------------------------------------------
# ITM hard negatives
# ----------------------------------------------------------------------------------------------
@pytest.mark.method
def test_hard_negatives_are_never_the_positive():
    torch.manual_seed(0)
    n = 8
    sims = [torch.randn(n, n) * s for s in (0.1, 1.0, 10.0)]
    # the positive dominates: every off-diagonal softmax weight underflows to exactly 0 before the +ε
    sims.append(torch.full((n, n), -100.0).fill_diagonal_(100.0))
    for s in sims:
        for _ in range(50):
            neg_text, neg_image = albef.hard_negatives(s, s.t().contiguous())
            assert (neg_text != torch.arange(n)).all() and (neg_image != torch.arange(n)).all()
    # with a 'same image' mask, another caption of the same image is never a negative either
    index = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])
    same = index[:, None] == index[None, :]
    for _ in range(50):
        neg_text, neg_image = albef.hard_negatives(sims[1], sims[1].t(), same)
        assert (index[neg_text] != index).all() and (index[neg_image] != index).all()


@pytest.mark.method
def test_hard_negatives_follow_the_softmax():
    """Row 0 has one very similar negative (column 3): it is drawn almost always; uniform rows spread out."""
    torch.manual_seed(0)
    s = torch.zeros(6, 6)
    s[0, 3] = 8.0
    draws = torch.stack([albef.hard_negatives(s, s)[0] for _ in range(400)])   # (400, 6)
    assert (draws[:, 0] == 3).float().mean() > 0.95
    counts = torch.bincount(draws[:, 1], minlength=6)
    assert counts[1] == 0 and (counts[[0, 2, 3, 4, 5]] > 40).all()


# ----------------------------------------------------------------------------------------------
# distillation targets and the three losses against loops
# ----------------------------------------------------------------------------------------------
@pytest.mark.method
def test_distill_targets_formula():
    torch.manual_seed(0)
    s_m = torch.randn(4, 4 + 6, dtype=torch.float64) * 3
    for alpha in (0.0, 0.25, 0.4, 1.0):
        y = albef.distill_targets(s_m, alpha)
        assert torch.allclose(y.sum(1), torch.ones(4, dtype=torch.float64))
        for j in range(4):
            den = sum(math.exp(v) for v in s_m[j].tolist())
            for k in range(10):
                want = alpha * math.exp(s_m[j, k].item()) / den + (1 - alpha) * (j == k)
                assert y[j, k].item() == pytest.approx(want, abs=1e-12)


def distilled_nce_loop(a, a_m, keys, tau, alpha):
    """H(y, p) of one ITC direction, one term at a time; keys = [momentum batch ; queue], query j's positive is key j."""
    total = 0.0
    for j in range(len(a)):
        s = [float(a[j] @ k) / tau for k in keys]
        s_m = [float(a_m[j] @ k) / tau for k in keys]
        p = [math.exp(x) / sum(math.exp(y) for y in s) for x in s]
        p_m = [math.exp(x) / sum(math.exp(y) for y in s_m) for x in s_m]
        y = [alpha * p_m[k] + (1 - alpha) * (k == j) for k in range(len(keys))]
        total += -sum(y[k] * math.log(p[k]) for k in range(len(keys)))
    return total / len(a)


@pytest.mark.method
def test_loss_itc_matches_loop():
    n, m, e, tau, alpha = 3, 6, 5, 0.1, 0.4
    z_v, z_t, z_v_m, z_t_m = (unit(n, e, seed=s) for s in range(4))
    q_img, q_txt = unit(m, e, seed=5), unit(m, e, seed=6)
    loss, s_i2t, _ = albef.loss_itc(z_v, z_t, z_v_m, z_t_m, q_img, q_txt, torch.tensor(tau, dtype=torch.float64),
                                    alpha)

    want = 0.5 * (distilled_nce_loop(z_v, z_v_m, list(z_t_m) + list(q_txt), tau, alpha)
                  + distilled_nce_loop(z_t, z_t_m, list(z_v_m) + list(q_img), tau, alpha))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert s_i2t.shape == (n, n + m)


@pytest.mark.method
def test_loss_itc_is_fp32_under_autocast():
    z_v, z_t, z_v_m, z_t_m, q_img, q_txt = (unit(4 if s < 4 else 8, 16, seed=s).float() for s in range(6))
    temp = torch.tensor(0.07)
    want, _, _ = albef.loss_itc(z_v, z_t, z_v_m, z_t_m, q_img, q_txt, temp, 0.4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, s_i2t, _ = albef.loss_itc(z_v, z_t, z_v_m, z_t_m, q_img, q_txt, temp, 0.4)
    assert got.dtype == s_i2t.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.method
def test_loss_mlm_and_itm_match_formulas():
    torch.manual_seed(0)
    logits, logits_m, labels = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7), torch.randint(7, (5,))
    alpha = 0.4
    ce = -torch.log_softmax(logits, -1)[torch.arange(5), labels].mean()
    distill = -(torch.softmax(logits_m.double(), -1) * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert albef.loss_mlm(logits, logits_m, labels, alpha).item() == pytest.approx(
        ((1 - alpha) * ce + alpha * distill).item(), rel=1e-6)
    itm = torch.randn(6, 2, dtype=torch.float64)  # N = 2: rows 0-1 positives, 2-5 negatives
    p = torch.softmax(itm, -1)
    want = -(torch.log(p[:2, 1]).sum() + torch.log(p[2:, 0]).sum()) / 6
    assert albef.loss_itm(itm, 2).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.method
def test_alpha_ramp():
    args = albef.Args(alpha=0.4, alpha_ramp=100)
    assert [albef.alpha_at(s, args, 1000) for s in (0, 50, 100, 500)] == pytest.approx([0, 0.2, 0.4, 0.4])
    args.alpha_ramp = -1  # one epoch
    assert albef.alpha_at(500, args, 1000) == pytest.approx(0.2)
    args.alpha_ramp = 0   # constant
    assert albef.alpha_at(0, args, 1000) == pytest.approx(0.4)


# ----------------------------------------------------------------------------------------------
# the encoders: bidirectional attention, the contract, pretrained weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.method
def test_text_and_fusion_encoders_are_bidirectional(tokenizer):
    """The trap of HF BertModel's cross-attention (is_decoder=True = causal): changing the LAST token must
    change the [CLS] output of the text encoder and of the fusion encoder."""
    model, _ = tiny_model(tokenizer)
    bert = model.bert
    ids, mask = tokens(tokenizer, ["a red metal circle on the left"] * 2)
    last = int(mask[0].sum()) - 2                                 # the last word, just before [SEP]
    ids[1, last] = tokenizer.convert_tokens_to_ids("right")
    assert ids[0, last] != ids[1, last] and torch.equal(ids[0, :last], ids[1, :last])
    image = model.visual(torch.randn(1, 3, 32, 32)).expand(2, -1, -1)
    with torch.no_grad():
        w = bert.encode_text(ids, mask)
        h = bert.fuse(w, mask, image)
    assert not torch.allclose(w[0, 0], w[1, 0], atol=1e-4)        # text encoder [CLS]
    assert not torch.allclose(h[0, 0], h[1, 0], atol=1e-4)        # fusion encoder [CLS]
    # padding is invisible, and the fusion [CLS] (not the text one) sees the image
    ids_p, mask_p = F.pad(ids, (0, 5)), F.pad(mask, (0, 5))
    with torch.no_grad():
        assert torch.allclose(bert.fuse(bert.encode_text(ids_p, mask_p), mask_p, image)[:, 0], h[:, 0], atol=1e-5)
        other = model.visual(torch.randn(1, 3, 32, 32)).expand(2, -1, -1)
        assert not torch.allclose(bert.fuse(w, mask, other)[:, 0], h[:, 0], atol=1e-4)


@pytest.mark.method
def test_contract_shapes_and_itm_score(tokenizer):
    model, _ = tiny_model(tokenizer)
    images = torch.randn(3, 3, 32, 32)
    ids, mask = tokens(tokenizer, ["a red circle.", "a blue star on the left.", "a big green ring."])
    with torch.no_grad():
        zi, zt = model.encode_image(images), model.encode_text(ids, mask)
        assert zi.shape == zt.shape == (3, 16)
        assert torch.allclose(zi.norm(dim=-1), torch.ones(3)) and torch.allclose(zt.norm(dim=-1), torch.ones(3))
        s = model.itm_score(images, ids, mask)
        assert s.shape == (3,)
        # logit_match − logit_no_match; repeated images (encoded once) give the same scores as distinct calls
        h = model.bert.fuse(model.bert.encode_text(ids, mask), mask, model.visual(images))
        logits = model.itm_head(h[:, 0])
        assert torch.allclose(s, logits[:, 1] - logits[:, 0], atol=1e-5)
        rep = model.itm_score(images[[0, 0, 0]], ids, mask)
        one = torch.cat([model.itm_score(images[:1], ids[i:i + 1], mask[i:i + 1]) for i in range(3)])
        assert torch.allclose(rep, one, atol=1e-5)


def test_load_hf_bert_matches_transformers(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertModel
    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=48, max_position_embeddings=40)).eval()
    hf.save_pretrained(tmp_path / "bert")
    args = albef.Args(text_model=str(tmp_path / "bert"), text_layers=2)
    bert = albef.build_bert(args, vocab_size=0, image_width=24).eval()
    assert len(bert.text_layers) == 2 and len(bert.fusion_layers) == 1
    assert bert.fusion_layers[0].cross_attn.k.in_features == 24                # keys/values from the image width
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 4:] = 0, 0
    with torch.no_grad():
        ref = BertModel.from_pretrained(tmp_path / "bert", add_pooling_layer=False).eval()
        hs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = bert.encode_text(ids, mask)
        real = mask.bool()
        assert torch.allclose(ours[real], hs[2][real], atol=1e-5)       # = HF after its first 2 layers
        assert torch.allclose(bert.mlm_logits(hs[3]), hf(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    with pytest.raises(ValueError, match="has 3 layers"):
        albef.build_bert(albef.Args(text_model=str(tmp_path / "bert"), text_layers=3), 0, 24)


def test_load_torchvision_vit_matches_torchvision():
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                              mlp_dim=64).eval()
    vit = albef.ViT(32, 8, 16, 2, 2).eval()
    albef.load_torchvision_vit(vit, tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = tv._process_input(x)
        ref = tv.encoder(torch.cat([tv.class_token.expand(2, -1, -1), t], 1))
        assert torch.allclose(vit(x), ref, atol=1e-5)
        big = albef.ViT(48, 8, 16, 2, 2)                                # another resolution: positions resized
        albef.load_torchvision_vit(big, tv.state_dict())
        assert big(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 36, 16)


# ----------------------------------------------------------------------------------------------
# eval.py: ITM reranking against a brute force
# ----------------------------------------------------------------------------------------------
class GridPairSet(data.PairSet):
    """Image i is a solid grey of level i; caption t is the word 'c<t>'."""

    def __init__(self, n_captions):
        starts = np.cumsum([0] + n_captions[:-1]).tolist()
        super().__init__("grid", range(len(n_captions)), [[f"c{t}" for t in range(s, s + c)]
                                                          for s, c in zip(starts, n_captions)])

    def load_image(self, i):
        return Image.new("L", (2, 2), i)


class GridTokenizer:
    def __call__(self, texts, padding=True, truncation=True, max_length=8, return_tensors="pt"):
        ids = torch.tensor([[int(t[1:])] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class TableScorer(nn.Module):
    """itm_score(image i, caption t) = table[i, t]; counts the pairs it scores."""

    def __init__(self, table):
        super().__init__()
        self.table, self.calls = table, []

    def itm_score(self, images, input_ids, attention_mask):
        i, t = images[:, 0, 0, 0].round().long(), input_ids[:, 0]
        self.calls += list(zip(i.tolist(), t.tolist()))
        return self.table[i, t]


def brute_force_rerank(sim, itm, positives, k, ks=(1, 5, 10)):
    """Build each query's full candidate order, then R@r = fraction with a positive among the first r."""
    hits = {r: 0 for r in ks}
    for q in range(len(sim)):
        itc_order = sorted(range(sim.shape[1]), key=lambda c: -sim[q, c].item())
        head = sorted(itc_order[:k], key=lambda c: -itm[q, c].item())   # top k by ITM ...
        order = head + itc_order[k:]                                    # ... then the rest in ITC order
        first = min(order.index(c) for c in positives[q])
        for r in ks:
            hits[r] += first < r
    return {r: 100.0 * h / len(sim) for r, h in hits.items()}


@pytest.mark.parametrize("k", [1, 3, 7, 100])
def test_rerank_retrieval_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    ps = GridPairSet([2, 3, 1, 4, 2, 3, 1, 2, 2, 3, 2, 1])              # 12 images, 26 captions
    n, m = len(ps), len(ps.texts)
    img, txt = F.normalize(torch.randn(n, 5, generator=g), dim=-1), F.normalize(torch.randn(m, 5, generator=g), dim=-1)
    table = torch.randn(n, m, generator=g)
    model = TableScorer(table)
    out = ev.rerank_retrieval(model, ps, img, txt, lambda im: torch.from_numpy(np.asarray(im, np.float32))[None]
                              .expand(3, 2, 2), GridTokenizer(), "cpu", 8, k=k)
    sim, t2i = img @ txt.T, ps.txt2img
    i2t = brute_force_rerank(sim, table, [[t for t in range(m) if t2i[t] == i] for i in range(n)], min(k, m))
    t2i_ = brute_force_rerank(sim.T, table.T, [[t2i[t]] for t in range(m)], min(k, n))
    for r in (1, 5, 10):
        assert out[f"i2t_R@{r}"] == pytest.approx(i2t[r]) and out[f"t2i_R@{r}"] == pytest.approx(t2i_[r]), r
    # every needed pair was scored exactly once
    assert len(model.calls) == len(set(model.calls))
    needed = {(i, t) for i in range(n) for t in sim[i].topk(min(k, m)).indices.tolist()}
    needed |= {(i, t) for t in range(m) for i in sim[:, t].topk(min(k, n)).indices.tolist()}
    assert set(model.calls) == needed
    itc = ev.retrieval_metrics(img, txt, ps.txt2img)
    if k == 1:   # only the ITC top-1 is "reranked": the ITC order everywhere
        assert all(out[key] == pytest.approx(itc[key]) for key in itc)
    if k >= m:   # every candidate reranked: the pure ITM ranking
        pure = ev.retrieval_metrics(torch.eye(n), table.T.contiguous(), ps.txt2img)   # sim = table
        assert all(out[key] == pytest.approx(pure[key]) for key in pure)


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
def test_args_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        albef.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--queue-size", "--momentum", "--alpha-ramp", "--itm-k", "--mlm-prob", "--fusion-layers", "--vit-stem",
                 "--data-root"):
        assert flag in out, flag
    assert "65,536" in out and "reranked by ITM" in out


@pytest.mark.slow
def test_smoke_subprocess_and_eval_cli(tmp_path):
    run, rows, metrics = smoke_run("albef_fusion.py", tiny_albef(tmp_path), tmp_path,
                                   ("loss", "loss_itc", "loss_mlm", "loss_itm", "logit_scale", "alpha", "lr",
                                    "samples_per_s"))
    assert all(r["loss"] == pytest.approx(r["loss_itc"] + r["loss_mlm"] + r["loss_itm"], rel=1e-5) for r in rows)
    assert [r["alpha"] for r in rows] == pytest.approx([0.4 / 3, 0.4, 0.4])   # the α seen by steps 2, 4, 6
    for key in ("retrieval/t2i_R@1", "retrieval_itm/i2t_R@1", "retrieval_itm/t2i_R@10", "retrieval_itm/rsum"):
        assert 0 <= metrics[key] <= 600, key
    assert metrics["zeroshot/shape/n_classes"] == 8
    out = eval_cli_agrees(run, metrics, ("retrieval/i2t_R@1", "retrieval_itm/i2t_R@1", "retrieval_itm/t2i_R@5",
                                         "zeroshot/colour/top1"))
    assert "retrieval_itm/i2t_R@1" in out and "retrieval_itm/t2i_R@10" in out


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """6 steps straight, or 3 + resume to 6: bit-identical weights, momentum model, queues and losses (CPU)."""
    state = resume_is_exact(albef.main, tiny_albef, tmp_path)
    assert any(k.startswith("visual_m.") for k in state) and "image_queue" in state


def test_resume_rejects_another_scripts_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"script": "clip_base", "args": {}, "step": 1}, path)
    with pytest.raises(ValueError, match="clip_base.py"):
        albef.main(["--resume", str(path)])
