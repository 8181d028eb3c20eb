"""Plausible wrong answers, per assignment: each must fail its grader (the proof that a wrong answer cannot pass).

A mutant is a source edit of one graded function: every `old` string must occur exactly once in that function's
source and is replaced by `new`. It is applied to a student copy filled with the reference, which is then
graded (that function's checks, then the learning check, stopping at the first failure). The reference itself
must get full marks. tests/test_course.py runs all of them;

    python course/mutants.py [A1 A5 ...]

prints the kill rate per assignment and the first check that rejected each mutant. When a reference function
is rewritten, an edit that no longer matches is reported as outdated (the test fails): update it here.
"""
import argparse
import contextlib
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from course.make_assignment import fill_functions, function_lines, make_assignment  # noqa: E402


@dataclass(frozen=True)
class Mutant:
    function: str    # qualified graded function
    mistake: str     # what a student got wrong
    edits: tuple     # ((old, new), ...) inside that function's source


def M(function, mistake, *edits):
    """M('sep.loss_ortho', 'abs, not the square', (old, new), ...)."""
    return Mutant(function, mistake, tuple(edits))


class OutdatedMutant(ValueError):
    pass


def mutate(source, mutant):
    """The module source with the mutant's edits applied inside its function."""
    qualname = mutant.function.split(".", 1)[1]
    first, last = function_lines(source, qualname)
    lines = source.splitlines(keepends=True)
    segment = "".join(lines[first - 1:last])
    for old, new in mutant.edits:
        if segment.count(old) != 1:
            raise OutdatedMutant(f"mutant '{mutant.mistake}' of {mutant.function}: {old!r} occurs "
                                 f"{segment.count(old)} times in the function, not once: update course/mutants.py")
        segment = segment.replace(old, new)
    return "".join(lines[:first - 1]) + segment + "".join(lines[last:])


MUTANTS = {
    "A1": [
        M("clip_base.nce", "logit_scale used as 1/τ, without exp",
          ("logit_scale.exp().float() *", "logit_scale.float() *")),
        M("clip_base.nce", "the similarities divided by 1/τ instead of multiplied",
          ("logit_scale.exp().float() * (a.float() @ b.float().t())",
           "(a.float() @ b.float().t()) / logit_scale.exp().float()")),
        M("clip_base.nce", "off by one: row j's positive taken as b_{j+1}",
          ("torch.arange(o, o + len(a), device=a.device)",
           "(torch.arange(o, o + len(a), device=a.device) + 1) % len(a)")),
        M("clip_base.nce", "the softmax over the wrong axis (the columns)",
          ("F.cross_entropy(logits,", "F.cross_entropy(logits.t(),")),
        M("clip_base.nce", "the second argument detached", ("b.float().t()", "b.detach().float().t()")),
        M("clip_base.nce", "a sum over the batch instead of the mean",
          ("torch.arange(o, o + len(a), device=a.device))",
           "torch.arange(o, o + len(a), device=a.device), reduction='sum')")),
        M("clip_base.nce", "bf16 logits under autocast", ("enabled=False", "enabled=True")),
        M("clip_base.loss_con", "L_V2V ignores the augmented view",
          ('terms["v2v"] = nce(f["v"], f_a["v"], logit_scale)', 'terms["v2v"] = nce(f["v"], f["v"], logit_scale)')),
        M("clip_base.loss_con", "L_T2V with the arguments in the order of L_V2T",
          ('"t2v": nce(f["t"], f["v"], logit_scale)', '"t2v": nce(f["v"], f["t"], logit_scale)')),
        M("clip_base.loss_con", "L_T2T against the image view",
          ('terms["t2t"] = nce(f["t"], f_a["t"], logit_scale)', 'terms["t2t"] = nce(f["t"], f_a["v"], logit_scale)')),
        M("clip_base.loss_con", "a constant 4 in the mean (plain CLIP gets ¼ of two terms)",
          ("sum(terms.values()) / len(terms)", "sum(terms.values()) / 4")),
        M("clip_base.loss_con", "the intra-modal terms whenever views are given, even for plain CLIP",
          ("if not plain_clip:", "if f_a is not None:")),
    ],
    "A2": [
        M("sep.loss_ortho", "|cos| instead of cos²",
          ("(zv * zv_i).sum(-1).square() + (zt * zt_i).sum(-1).square()",
           "(zv * zv_i).sum(-1).abs() + (zt * zt_i).sum(-1).abs()")),
        M("sep.loss_ortho", "a sum over the batch instead of the mean", (".square()).mean()", ".square()).sum()")),
        M("sep.loss_ortho", "the text term paired with the image's z^i", ("(zt * zt_i)", "(zt * zv_i)")),
        M("sep.loss_ortho", "the aligned features detached",
          ("zv, zv_i, zt, zt_i = zv.float(),", "zv, zv_i, zt, zt_i = zv.detach().float(),")),
        M("sep.loss_con_i", "the printed numerator: z^i against itself, not its augmented view",
          ("nce(zv_i, zv_ai, logit_scale)", "nce(zv_i, zv_i, logit_scale)")),
        M("sep.loss_con_i", "the text term against the image's view", ("nce(zt_i, zt_ai,", "nce(zt_i, zv_ai,")),
        M("sep.uniformity", "the diagonal j = k kept in the mean",
          ("(g.sum() - g.diagonal().sum()) / (n * (n - 1))", "g.sum() / (n * n)")),
        M("sep.uniformity", "the mean of the potentials without the log", (").log()", ")")),
        M("sep.uniformity", "‖u − v‖² taken as 1 − ⟨u, v⟩", ("(2 - 2 * z @ z.t())", "(1 - z @ z.t())")),
        M("sep.uniformity", "the sign of t: an attraction", ("torch.exp(-t *", "torch.exp(t *")),
        M("sep.loss_uni", "one log over both modalities pooled",
          ("uniformity(zv_i, t) + uniformity(zt_i, t)", "uniformity(torch.cat([zv_i, zt_i]), t)")),
        M("sep.loss_uni", "t ignored (always 2)",
          ("uniformity(zv_i, t) + uniformity(zt_i, t)", "uniformity(zv_i) + uniformity(zt_i)")),
        M("eval.uniformity", "the distance, not its square",
          ("torch.pdist(u.float()).pow(2)", "torch.pdist(u.float())")),
        M("eval.uniformity", "t = 1 instead of 2", ("torch.logsumexp(-2 * sq, 0)", "torch.logsumexp(-sq, 0)")),
    ],
    "A3": [
        M("bridge.loss_bridge", "t and 1 − t swapped in μ", ("t * zv + (1 - t) * zt", "(1 - t) * zv + t * zt")),
        M("bridge.loss_bridge", "μ left off the sphere (not normalized)",
          ("mu = F.normalize(t * zv + (1 - t) * zt, dim=-1)", "mu = t * zv + (1 - t) * zt")),
        M("bridge.loss_bridge", "the distance, not its square",
          ("(zv_a - mu).square().sum(-1).mean()", "(zv_a - mu).square().sum(-1).sqrt().mean()")),
        M("bridge.loss_bridge", "a mean over the coordinates too",
          ("(zv_a - mu).square().sum(-1).mean()", "(zv_a - mu).square().mean()")),
        M("bridge.loss_bridge", "the printed expansion: the cosine to μ",
          ("(zv_a - mu).square().sum(-1).mean()", "(zv_a * mu).sum(-1).mean()")),
        M("bridge.loss_bridge", "a stop-gradient on the bridge's ends",
          ("mu = F.normalize(t * zv + (1 - t) * zt, dim=-1)",
           "mu = F.normalize(t * zv + (1 - t) * zt, dim=-1).detach()")),
        M("bridge.loss_bridge", "the original image feature instead of the augmented one",
          ("(zv_a - mu).square()", "(zv - mu).square()")),
        M("bridge.loss_bridge", "a sum over the batch instead of the mean",
          (".square().sum(-1).mean()", ".square().sum()")),
        M("bridge.loss_bridge", "μ normalized along the batch axis",
          ("(1 - t) * zt, dim=-1)", "(1 - t) * zt, dim=0)")),
    ],
    "A4": [
        M("geocons.loss_gc", "the transpose forgotten: ⟨z_Vj, z_Tk⟩ − ⟨z_Vj, z_Tk⟩",
          ("(s_vt - s_vt.t())", "(s_vt - s_vt)")),
        M("geocons.loss_gc", "a mean over the N² pairs instead of CyCLIP's sum / N",
          (").sum() / len(zv)", ").mean()")),
        M("geocons.loss_gc", "the in-modal term against the cross-modal similarities",
          ("(s_vv - s_tt)", "(s_vv - s_vt)")),
        M("geocons.loss_gc", "|difference| instead of its square",
          ("(s_vt - s_vt.t()).square() + (s_vv - s_tt).square()", "(s_vt - s_vt.t()).abs() + (s_vv - s_tt).abs()")),
        M("geocons.loss_gc", "the text features detached",
          ("all_gather_with_grad(zt.float())", "all_gather_with_grad(zt.detach().float())")),
        M("geocons.loss_gc_aug", "the text views' pair sum dropped",
          (" + (zt @ zt.t() - zt_a @ zt_a.t()).square()).sum() / n", ").sum() / n")),
        M("geocons.loss_gc_aug", "the printed ⟨z_Tj, z_Tj⟩ (a constant) in the matched term",
          ("((zv * zt).sum(-1) - (zv_a * zt_a).sum(-1))", "((zt * zt).sum(-1) - (zt_a * zt_a).sum(-1))")),
        M("geocons.loss_gc_aug", "the matched term summed instead of averaged",
          ("(zv_a * zt_a).sum(-1)).square().mean()", "(zv_a * zt_a).sum(-1)).square().sum()")),
        M("geocons.loss_gc_aug", "the pair sums divided by N² instead of N", (").sum() / n", ").sum() / n ** 2")),
        M("geocons.loss_gc_aug", "the augmented image view compared across modalities",
          ("zv_a @ zv_a.t()", "zv_a @ zt_a.t()")),
    ],
    "A5": [
        M("albef_fusion.momentum_update", "m and 1 − m swapped",
          ("torch._foreach_mul_(momentum, m)", "torch._foreach_mul_(momentum, 1 - m)"), ("alpha=1 - m", "alpha=m")),
        M("albef_fusion.momentum_update", "written backwards: the online model pulled towards the momentum model",
          ("torch._foreach_mul_(momentum, m)\n    torch._foreach_add_(momentum, online, alpha=1 - m)",
           "torch._foreach_mul_(online, m)\n    torch._foreach_add_(online, momentum, alpha=1 - m)")),
        M("albef_fusion.momentum_update", "only the first (online, momentum) pair updated",
          ("for o, _ in pairs for p", "for o, _ in pairs[:1] for p"),
          ("for _, o_m in pairs for p", "for _, o_m in pairs[:1] for p")),
        M("albef_fusion.dequeue_and_enqueue", "the pointer never moves",
          ("queue_ptr.add_(n).remainder_(", "queue_ptr.remainder_(")),
        M("albef_fusion.dequeue_and_enqueue", "the pointer without the wrap-around",
          ("queue_ptr.add_(n).remainder_(len(image_queue))", "queue_ptr.add_(n)")),
        M("albef_fusion.dequeue_and_enqueue", "the text queue fed the image features",
          ("text_queue.index_copy_(0, rows, text_feat_m", "text_queue.index_copy_(0, rows, image_feat_m")),
        M("albef_fusion.dequeue_and_enqueue", "the newest rows overwritten instead of the oldest",
          ("rows = queue_ptr + torch.arange(n, device=queue_ptr.device)",
           "rows = (queue_ptr - n + torch.arange(n, device=queue_ptr.device)) % len(image_queue)")),
        M("albef_fusion.distill_targets", "α and 1 − α swapped",
          ("alpha * F.softmax(s_m, dim=1) + (1 - alpha) * onehot",
           "(1 - alpha) * F.softmax(s_m, dim=1) + alpha * onehot")),
        M("albef_fusion.distill_targets", "the softmax over the batch axis",
          ("F.softmax(s_m, dim=1)", "F.softmax(s_m, dim=0)")),
        M("albef_fusion.distill_targets", "every positive in column 0",
          ("onehot.fill_diagonal_(1)", "onehot[:, 0] = 1")),
        M("albef_fusion.distilled_nce", "the wrong model distils: soft labels from the online queries",
          ("distill_targets(z_m.float() @", "distill_targets(z.float() @")),
        M("albef_fusion.distilled_nce", "the soft labels keep their graph",
          ("with torch.no_grad():  # the momentum", "with torch.enable_grad():  # the momentum")),
        M("albef_fusion.distilled_nce", "log-softmax over the batch axis",
          ("F.log_softmax(s, 1)", "F.log_softmax(s, 0)")),
        M("albef_fusion.distilled_nce", "τ multiplies the similarities",
          ("s = z.float() @ keys.float().t() / temp", "s = z.float() @ keys.float().t() * temp")),
        M("albef_fusion.mask_tokens", "special tokens can be masked",
          ("(torch.rand(ids.shape, device=device) < prob) & ~special",
           "torch.rand(ids.shape, device=device) < prob")),
        M("albef_fusion.mask_tokens", "labels 0 instead of −100 at the unchosen tokens",
          ("ids.masked_fill(~chosen, -100)", "ids.masked_fill(~chosen, 0)")),
        M("albef_fusion.mask_tokens", "20% random ids and none kept",
          ("chosen & (r >= 0.8) & (r < 0.9)", "chosen & (r >= 0.8)")),
        M("albef_fusion.mask_tokens", "prob ignored (always 15%)", ("< prob)", "< 0.15)")),
        M("albef_fusion.hard_negatives", "the positives not excluded",
          ("(F.softmax(s_i2t.float(), dim=1) + eps).masked_fill(same, 0)", "F.softmax(s_i2t.float(), dim=1) + eps")),
        M("albef_fusion.hard_negatives", "the two results swapped",
          ("return sample_rows(w_i2t), sample_rows(w_t2i)", "return sample_rows(w_t2i), sample_rows(w_i2t)")),
        M("albef_fusion.hard_negatives", "the hardest negative every time instead of a draw",
          ("return sample_rows(w_i2t), sample_rows(w_t2i)", "return w_i2t.argmax(1), w_t2i.argmax(1)")),
        M("albef_fusion.hard_negatives", "ε added before the softmax (underflowing rows have nothing to draw)",
          ("(F.softmax(s_i2t.float(), dim=1) + eps)", "F.softmax(s_i2t.float() + eps, dim=1)"),
          ("(F.softmax(s_t2i.float(), dim=1) + eps)", "F.softmax(s_t2i.float() + eps, dim=1)")),
        M("albef_fusion.hard_negatives", "the softmax over the wrong axis",
          ("F.softmax(s_i2t.float(), dim=1)", "F.softmax(s_i2t.float(), dim=0)")),
    ],
    "A6": [
        M("codis.ipot", "Sinkhorn, not the proximal point: Q = A instead of A ⊙ T",
          ("Q = T.mul_(A)", "Q = A.clone()")),
        M("codis.ipot", "the kernel's sign: exp(+D/β)", ("torch.exp(-(D - D.min(1, keepdim=True).values) / beta)",
                                                        "torch.exp((D - D.min(1, keepdim=True).values) / beta)")),
        M("codis.ipot", "no row shift before exp (a far row underflows)",
          ("torch.exp(-(D - D.min(1, keepdim=True).values) / beta)", "torch.exp(-D / beta)")),
        M("codis.ipot", "σ left out of T = diag(δ) Q diag(σ)",
          ("T = Q.mul_(a[:, None]).mul_(b)", "T = Q.mul_(a[:, None])")),
        M("codis.ipot", "the two marginals swapped",
          ("a = mu / (Q @ b)", "a = nu / (Q @ b)"), ("b = nu / (a @ Q)", "b = mu / (a @ Q)")),
        M("codis.swapped_prediction", "the plan's rows not renormalized",
          ("target = plan / plan.sum(1, keepdim=True)", "target = plan")),
        M("codis.swapped_prediction", "the softmax over the batch axis", ("/ gamma, dim=1)", "/ gamma, dim=0)")),
        M("codis.swapped_prediction", "γ multiplies the similarities", ("/ gamma, dim=1)", "* gamma, dim=1)")),
        M("codis.swapped_prediction", "a sum over the batch instead of the mean", (".sum(1).mean()", ".sum()")),
        M("codis.loss_code", "the plans not swapped",
          ("t_i2p[o:o + len(z_t)]", "t_t2p[o:o + len(z_t)]"), ("t_t2p[o:o + len(z_v)]", "t_i2p[o:o + len(z_v)]")),
        M("codis.loss_code", "the features in the cost not detached",
          ("all_gather_rows(f_v.detach()), all_gather_rows(f_t.detach())",
           "all_gather_rows(f_v), all_gather_rows(f_t)"),
          ("1 - f_v.detach().float() @ codebook.t(), 1 - f_t.detach().float() @ codebook.t()",
           "1 - f_v.float() @ codebook.t(), 1 - f_t.float() @ codebook.t()")),
        M("codis.loss_code", "the wrong model makes the plans: the students' z, not f",
          ("1 - f_v.detach().float() @ codebook.t(), 1 - f_t.detach().float() @ codebook.t()",
           "1 - z_v.detach().float() @ codebook.t(), 1 - z_t.detach().float() @ codebook.t()")),
        M("codis.loss_code", "⟨T, D⟩ as a mean instead of a sum",
          ('"ot_v": (t_i2p * d_v).sum(), "ot_t": (t_t2p * d_t).sum()',
           '"ot_v": (t_i2p * d_v).mean(), "ot_t": (t_t2p * d_t).mean()')),
        M("codis.loss_code", "the codebook detached in the cost (L_ot trains nothing)",
          ("1 - f_v.detach().float() @ codebook.t(), 1 - f_t.detach().float() @ codebook.t()",
           "1 - f_v.detach().float() @ codebook.detach().t(), 1 - f_t.detach().float() @ codebook.detach().t()")),
    ],
    "A7": [
        M("eval._ranks", "the other positives tied with the best counted as ahead of it",
          ("((sim >= best) & ~pos).sum(1)", "(sim >= best).sum(1) - 1")),
        M("eval._ranks", "the worst positive instead of the best",
          (".amax(1, keepdim=True)", ".amin(1, keepdim=True)")),
        M("eval._ranks", "the group ids of the first chunk for every chunk",
          ("q_group[s:s + chunk, None]", "q_group[:chunk, None]")),
        M("eval.retrieval_metrics", "off by one: rank ≤ k counted as a hit", ("(r < k)", "(r <= k)")),
        M("eval.retrieval_metrics", "fractions instead of percent", ("100.0 * (r < k)", "(r < k)")),
        M("eval.retrieval_metrics", "the directions swapped",
          ('{"i2t": _ranks(img_feats', '{"t2i": _ranks(img_feats'),
          ('"t2i": _ranks(txt_feats', '"i2t": _ranks(txt_feats')),
        M("eval.retrieval_metrics", "an image without captions accepted", (".min() == 0:", ".min() < 0:")),
        M("eval.retrieval_metrics", "rsum of the image→text recalls only",
          ('out["rsum"] = sum(out.values())', 'out["rsum"] = sum(v for k, v in out.items() if k.startswith("i2t"))')),
        M("eval._reranked_ranks", "a negative tied with the best positive's rescore not counted",
          ("(ts >= best_top) & ~pos_top", "(ts > best_top) & ~pos_top")),
        M("eval._reranked_ranks", "a positive outside the top k ranked among the top k",
          ("rank_rest = k + ((rest >= best_rest) & ~pos).sum(1)", "rank_rest = ((rest >= best_rest) & ~pos).sum(1)")),
        M("eval._reranked_ranks", "the top k left in the rest (counted twice)",
          ('rest = sc.scatter(1, tp, float("-inf"))', "rest = sc")),
        M("eval._reranked_ranks", "the better of the two ranks instead of the top k first",
          ("torch.where(pos_top.any(1), rank_top, rank_rest)", "torch.minimum(rank_top, rank_rest)")),
        M("eval.rerank_retrieval", "the bottom k reranked instead of the top k",
          (".topk(min(k, c), dim=1)", ".topk(min(k, c), dim=1, largest=False)")),
        M("eval.rerank_retrieval", "off by one: rank ≤ r counted as a hit", ("(rk < r)", "(rk <= r)")),
        M("eval.rerank_retrieval", "text→image queries grouped like image→text ones",
          ("s_t2i, txt2img, img_ids, chunk)", "s_t2i, img_ids, txt2img, chunk)")),
    ],
    "A8": [
        M("eval.zeroshot_classifier", "prompt features averaged without normalizing them first",
          ("z = F.normalize(z, dim=-1).view(", "z = z.view(")),
        M("eval.zeroshot_classifier", "the mean left unnormalized",
          ("return F.normalize(z.mean(1), dim=-1)", "return z.mean(1)")),
        M("eval.zeroshot_classifier", "the prompts viewed template-major",
          (".view(len(classnames), len(templates), -1)", ".view(len(templates), len(classnames), -1)")),
        M("eval.zeroshot_classifier", "the mean over the classes instead of the templates",
          ("z.mean(1)", "z.mean(0)")),
        M("eval.zeroshot_classifier", "the prompts built template-major",
          ("for c in classnames for t in templates", "for t in templates for c in classnames")),
        M("eval.topk_accuracy", "a hit only at rank k exactly", ("(rank < k)", "(rank == k - 1)")),
        M("eval.topk_accuracy", "off by one: rank ≤ k counted as a hit", ("(rank < k)", "(rank <= k)")),
        M("eval.topk_accuracy", "fractions instead of percent", ("100.0 * (rank < k)", "(rank < k)")),
        M("eval.balanced_accuracy", "absent classes counted with recall 0",
          ("(correct[present] / count[present]).mean()", "(correct / count.clamp_min(1)).mean()")),
        M("eval.balanced_accuracy", "plain accuracy", ("(correct[present] / count[present]).mean()",
                                                       "correct.sum() / count.sum()")),
    ],
}


# ============================== written after the checks: mistakes by kind, right answers, cheats ==========
# These were written from a list of mistake kinds (partial detaches, wrong dtype paths, off-by-ε samplers,
# ignored arguments, first-k instead of random subsets, mirrored tie orders), as whole functions rather than
# edits of the reference's lines, after the checks: a test set the checks were not tuned on.
@dataclass(frozen=True)
class Written:
    function: str    # qualified graded function
    what: str        # the mistake, the alternative, or the cheat
    source: str      # the whole definition that replaces the function (module-level lines may come first)


def W(function, what, source):
    return Written(function, what, textwrap.dedent(source).strip("\n") + "\n")


HIDDEN = {
    "A1": [
        W("clip_base.nce", "wrong dtype path: the logits in bf16 under autocast (no fp32 block)", '''
            def nce(a, b, logit_scale):
                logits = logit_scale.exp() * (a @ b.t())
                return F.cross_entropy(logits.float(), torch.arange(len(a), device=a.device))
            '''),
        W("clip_base.nce", "partial detach: the temperature detached", '''
            def nce(a, b, logit_scale):
                with torch.autocast(a.device.type, enabled=False):
                    logits = logit_scale.detach().exp().float() * (a.float() @ b.float().t())
                return F.cross_entropy(logits, torch.arange(len(a), device=a.device))
            '''),
        W("clip_base.loss_con", "ignored argument: plain_clip only drops the views' terms from the mean", '''
            def loss_con(f, f_a, logit_scale, plain_clip=False):
                terms = {"v2t": nce(f["v"], f["t"], logit_scale), "t2v": nce(f["t"], f["v"], logit_scale),
                         "v2v": nce(f["v"], f_a["v"], logit_scale), "t2t": nce(f["t"], f_a["t"], logit_scale)}
                terms["con"] = (terms["v2t"] + terms["t2v"]) / 2 if plain_clip else sum(terms.values()) / 4
                return terms
            '''),
    ],
    "A2": [
        W("sep.loss_ortho", "partial detach: the text's independent feature detached", '''
            def loss_ortho(zv, zv_i, zt, zt_i):
                return ((zv * zv_i).sum(-1).square() + (zt * zt_i.detach()).sum(-1).square()).mean()
            '''),
        W("sep.uniformity", "partial detach: one side of the Gram matrix detached", '''
            def uniformity(z, t=2.0):
                n = len(z)
                g = torch.exp(-t * (2 - 2 * z @ z.detach().t()))
                return ((g.sum() - g.diagonal().sum()) / (n * (n - 1))).log()
            '''),
        W("eval.uniformity", "first k instead of a random subset: the first max_points rows", '''
            def uniformity(u, max_points=2000) -> float:
                u = u[:max_points]
                sq = torch.pdist(u.float()).pow(2)
                return (torch.logsumexp(-2 * sq, 0) - math.log(len(sq))).item()
            '''),
        W("eval.uniformity", "first k instead of a random subset: the last max_points rows", '''
            def uniformity(u, max_points=2000) -> float:
                u = u[-max_points:]
                sq = torch.pdist(u.float()).pow(2)
                return (torch.logsumexp(-2 * sq, 0) - math.log(len(sq))).item()
            '''),
    ],
    "A3": [
        W("bridge.loss_bridge", "partial detach: the norm of the bridge's mean detached", '''
            def loss_bridge(zv_a, zv, zt, t):
                m = t * zv.float() + (1 - t) * zt.float()
                mu = m / m.norm(dim=-1, keepdim=True).detach()
                return (zv_a.float() - mu).square().sum(-1).mean()
            '''),
        W("bridge.loss_bridge", "partial detach: the text end of the bridge detached", '''
            def loss_bridge(zv_a, zv, zt, t):
                mu = F.normalize(t * zv.float() + (1 - t) * zt.float().detach(), dim=-1)
                return (zv_a.float() - mu).square().sum(-1).mean()
            '''),
    ],
    "A4": [
        W("geocons.loss_gc", "partial detach: the text's in-modal similarities detached", '''
            def loss_gc(zv, zt):
                zv, zt = zv.float(), zt.float()
                s_vt, s_vv, s_tt = zv @ zt.t(), zv @ zv.t(), zt @ zt.t()
                return len(zv) * (F.mse_loss(s_vt, s_vt.t()) + F.mse_loss(s_vv, s_tt.detach()))
            '''),
        W("geocons.loss_gc_aug", "partial detach: the augmented views' Gram matrices detached", '''
            def loss_gc_aug(zv, zt, zv_a, zt_a):
                zv, zt, zv_a, zt_a = (x.float() for x in (zv, zt, zv_a, zt_a))
                n = len(zv)
                intra = ((zv @ zv.t() - (zv_a @ zv_a.t()).detach()).square()
                         + (zt @ zt.t() - (zt_a @ zt_a.t()).detach()).square()).sum() / n
                return intra + ((zv * zt).sum(-1) - (zv_a * zt_a).sum(-1)).square().mean()
            '''),
    ],
    "A5": [
        W("albef_fusion.hard_negatives", "off by ε: the positive masked before the softmax, then ε added "
                                         "everywhere (multinomial)", '''
            @torch.no_grad()
            def hard_negatives(s_i2t, s_t2i, same=None, eps=1e-4):
                same = torch.eye(len(s_i2t), dtype=torch.bool) if same is None else same
                w_i2t = F.softmax(s_i2t.float().masked_fill(same, float("-inf")), dim=1) + eps
                w_t2i = F.softmax(s_t2i.float().masked_fill(same, float("-inf")), dim=1) + eps
                return torch.multinomial(w_i2t, 1).squeeze(1), torch.multinomial(w_t2i, 1).squeeze(1)
            '''),
        W("albef_fusion.hard_negatives", "off by ε: the positive zeroed before ε is added (Gumbel-max draw)", '''
            @torch.no_grad()
            def hard_negatives(s_i2t, s_t2i, same=None, eps=1e-4):
                same = torch.eye(len(s_i2t), dtype=torch.bool) if same is None else same

                def draw(s):
                    w = F.softmax(s.float(), dim=1).masked_fill(same, 0) + eps
                    gumbel = -torch.log(-torch.log(torch.rand_like(w)))
                    return (w.log() + gumbel).argmax(1)
                return draw(s_i2t), draw(s_t2i)
            '''),
        W("albef_fusion.distilled_nce", "partial detach: the temperature detached in the online logits", '''
            def distilled_nce(z, z_m, keys, temp, alpha):
                with torch.autocast(z.device.type, enabled=False):
                    with torch.no_grad():
                        y = distill_targets(z_m.float() @ keys.float().t() / temp, alpha)
                    s = z.float() @ keys.float().t() / temp.detach()
                    return -(y * F.log_softmax(s, 1)).sum(1).mean(), s.detach()
            '''),
        W("albef_fusion.distilled_nce", "wrong dtype path: the online logits in bf16 under autocast", '''
            def distilled_nce(z, z_m, keys, temp, alpha):
                with torch.no_grad():
                    y = distill_targets(z_m.float() @ keys.float().t() / temp, alpha)
                s = z @ keys.t() / temp
                return -(y * F.log_softmax(s.float(), 1)).sum(1).mean(), s.detach().float()
            '''),
    ],
    "A6": [
        W("codis.loss_code", "partial detach: the codebook detached in the swapped predictions", '''
            def loss_code(z_v, z_t, f_v, f_t, codebook, args):
                mu, nu = torch.full((len(f_v),), 1 / len(f_v)), torch.full((len(codebook),), 1 / len(codebook))
                plans, terms = {}, {}
                for m, f in (("v", f_v), ("t", f_t)):
                    d = 1 - f.detach().float() @ codebook.float().t()
                    plans[m] = ipot(d, mu, nu, args.ipot_beta, args.ipot_outer, args.ipot_inner)
                    terms[f"ot_{m}"] = (plans[m] * d).sum()
                fixed = codebook.detach().float()
                terms["t2p"] = swapped_prediction(z_t, fixed, plans["v"], args.code_temp)
                terms["i2p"] = swapped_prediction(z_v, fixed, plans["t"], args.code_temp)
                return terms
            '''),
        W("codis.loss_code", "wrong dtype path: the costs and plans under bf16 autocast", '''
            def loss_code(z_v, z_t, f_v, f_t, codebook, args):
                n, k = len(f_v), len(codebook)
                mu, nu = torch.full((n,), 1 / n), torch.full((k,), 1 / k)
                d_v, d_t = 1 - f_v.detach() @ codebook.t(), 1 - f_t.detach() @ codebook.t()
                t_i2p = ipot(d_v, mu, nu, args.ipot_beta, args.ipot_outer, args.ipot_inner)
                t_t2p = ipot(d_t, mu, nu, args.ipot_beta, args.ipot_outer, args.ipot_inner)
                return {"ot_v": (t_i2p * d_v).sum().float(), "ot_t": (t_t2p * d_t).sum().float(),
                        "t2p": swapped_prediction(z_t, codebook, t_i2p, args.code_temp),
                        "i2p": swapped_prediction(z_v, codebook, t_t2p, args.code_temp)}
            '''),
        W("codis.ipot", "ignored argument: one inner step whatever n_inner says", '''
            @torch.no_grad()
            def ipot(cost, mu, nu, beta=0.5, n_outer=50, n_inner=1):
                D, mu, nu = cost.float(), mu.float(), nu.float()
                b, T = torch.full_like(nu, 1.0 / len(nu)), torch.ones_like(D)
                A = torch.exp(-(D - D.min(1, keepdim=True).values) / beta)
                for _ in range(n_outer):
                    Q = T * A
                    a = mu / (Q @ b)
                    b = nu / (a @ Q)
                    T = a[:, None] * Q * b
                return T
            '''),
    ],
    "A7": [
        W("eval._ranks", "mirrored tie order: a tied negative counts only when it comes before the positive", '''
            def _ranks(queries, cands, q_group, c_group, chunk):
                ranks, index = [], torch.arange(len(cands))
                for s in range(0, len(queries), chunk):
                    sim = queries[s:s + chunk] @ cands.T
                    pos = q_group[s:s + chunk, None] == c_group[None, :]
                    best = sim.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
                    first = torch.where(pos & (sim == best), index, len(cands)).amin(1, keepdim=True)
                    ahead = (sim > best) | ((sim == best) & (index < first))
                    ranks.append((ahead & ~pos).sum(1))
                return torch.cat(ranks)
            '''),
        W("eval._ranks", "mirrored tie rule: ties go to the query (strictly above only)", '''
            def _ranks(queries, cands, q_group, c_group, chunk):
                ranks = []
                for s in range(0, len(queries), chunk):
                    sim = queries[s:s + chunk] @ cands.T
                    pos = q_group[s:s + chunk, None] == c_group[None, :]
                    best = sim.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
                    ranks.append((sim > best).sum(1))
                return torch.cat(ranks)
            '''),
        W("eval._ranks", "ignored argument: the whole similarity matrix at once, chunk unused", '''
            def _ranks(queries, cands, q_group, c_group, chunk):
                sim = queries @ cands.T
                pos = q_group[:, None] == c_group[None, :]
                best = sim.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
                return ((sim >= best) & ~pos).sum(1)
            '''),
        W("eval.retrieval_metrics", "ignored argument: ks hard-coded to (1, 5, 10)", '''
            def retrieval_metrics(img_feats, txt_feats, txt2img, ks=(1, 5, 10), chunk=1024) -> dict:
                img_feats, txt_feats = img_feats.float(), txt_feats.float()
                txt2img = torch.as_tensor(txt2img, dtype=torch.long)
                img_ids = torch.arange(len(img_feats))
                if torch.bincount(txt2img, minlength=len(img_feats)).min() == 0:
                    raise ValueError("every image needs a caption")
                ranks = {"i2t": _ranks(img_feats, txt_feats, img_ids, txt2img, chunk),
                         "t2i": _ranks(txt_feats, img_feats, txt2img, img_ids, chunk)}
                out = {f"{d}_R@{k}": 100.0 * (r < k).float().mean().item() for d, r in ranks.items()
                       for k in (1, 5, 10)}
                out["rsum"] = sum(out.values())
                return out
            '''),
        W("eval._reranked_ranks", "mirrored tie rule: outside the top k, a first-stage score tied with the "
                                  "positive's does not count", '''
            def _reranked_ranks(rows, n_queries, top, top_scores, q_group, c_group, chunk):
                ranks, k = [], top.shape[1]
                for s in range(0, n_queries, chunk):
                    sc, tp, ts = rows(s, s + chunk), top[s:s + chunk], top_scores[s:s + chunk]
                    pos = q_group[s:s + chunk, None] == c_group[None, :]
                    pos_top = pos.gather(1, tp)
                    best_top = ts.masked_fill(~pos_top, float("-inf")).amax(1, keepdim=True)
                    rank_top = ((ts >= best_top) & ~pos_top).sum(1)
                    rest = sc.scatter(1, tp, float("-inf"))
                    best_rest = rest.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
                    rank_rest = k + ((rest > best_rest) & ~pos).sum(1)
                    ranks.append(torch.where(pos_top.any(1), rank_top, rank_rest))
                return torch.cat(ranks)
            '''),
    ],
    "A8": [
        W("eval.topk_accuracy", "mirrored tie rule: a tie with the true class counts as a hit", '''
            def topk_accuracy(logits, targets, ks=(1, 3, 5)) -> dict:
                rank = (logits > logits.gather(1, targets[:, None])).sum(1)
                return {f"top{k}": 100.0 * (rank < k).float().mean().item() for k in ks}
            '''),
        W("eval.zeroshot_classifier", "ignored argument: only the first template", '''
            def zeroshot_classifier(model, tokenizer, classnames, templates, device, max_len, precision="fp32"):
                prompts = [templates[0].format(c) for c in classnames]
                z = encode_texts(model, tokenizer, prompts, device, max_len, precision=precision, name="prompts")
                return F.normalize(z, dim=-1)
            '''),
    ],
}

ALTERNATIVES = {
    "A1": [
        W("clip_base.nce", "F.cross_entropy with soft (one-hot probability) targets", '''
            def nce(a, b, logit_scale):
                with torch.autocast(a.device.type, enabled=False):
                    logits = logit_scale.exp().float() * (a.float() @ b.float().t())
                    return F.cross_entropy(logits, torch.eye(len(a), len(b), device=a.device))
            '''),
        W("clip_base.nce", "a loop over the rows with log_softmax, inputs re-normalized (a no-op)", '''
            def nce(a, b, logit_scale):
                a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
                with torch.autocast(a.device.type, enabled=False):
                    rows = [-F.log_softmax(logit_scale.exp().float() * (b @ a[j]), 0)[j] for j in range(len(a))]
                return torch.stack(rows).mean()
            '''),
        W("clip_base.loss_con", "the terms as a loop over (query, key) pairs", '''
            def loss_con(f, f_a, logit_scale, plain_clip=False):
                pairs = {"v2t": (f["v"], f["t"]), "t2v": (f["t"], f["v"])}
                if not plain_clip:
                    pairs.update(v2v=(f["v"], f_a["v"]), t2t=(f["t"], f_a["t"]))
                terms = {k: nce(x, y, logit_scale) for k, (x, y) in pairs.items()}
                terms["con"] = torch.stack(list(terms.values())).mean()
                return terms
            '''),
    ],
    "A2": [
        W("sep.loss_ortho", "cosine_similarity", '''
            def loss_ortho(zv, zv_i, zt, zt_i):
                return (F.cosine_similarity(zv.float(), zv_i.float(), dim=-1).square()
                        + F.cosine_similarity(zt.float(), zt_i.float(), dim=-1).square()).mean()
            '''),
        W("sep.uniformity", "squared distances by broadcasting, the j ≠ k pairs picked by a mask", '''
            def uniformity(z, t=2.0):
                sq = (z[:, None, :] - z[None, :, :]).square().sum(-1)
                off = ~torch.eye(len(z), dtype=torch.bool)
                return torch.exp(-t * sq[off]).mean().log()
            '''),
        W("eval.uniformity", "torch.pdist on another fixed random subset", '''
            def uniformity(u, max_points=2000) -> float:
                if len(u) > max_points:
                    u = u[torch.randperm(len(u), generator=torch.Generator().manual_seed(123))[:max_points]]
                d2 = torch.pdist(u.double()).square()
                return math.log(torch.exp(-2 * d2).mean().item())
            '''),
    ],
    "A3": [
        W("bridge.loss_bridge", "the closed form for unit vectors, inputs re-normalized (a no-op)", '''
            def loss_bridge(zv_a, zv, zt, t):
                zv_a, zv, zt = (F.normalize(x.float(), dim=-1) for x in (zv_a, zv, zt))
                num = t * (zv_a * zv).sum(-1, keepdim=True) + (1 - t) * (zv_a * zt).sum(-1, keepdim=True)
                den = (t * t + (1 - t) ** 2 + 2 * t * (1 - t) * (zv * zt).sum(-1, keepdim=True)).sqrt()
                return (2 - 2 * num / den).mean()
            '''),
    ],
    "A4": [
        W("geocons.loss_gc", "N times the mean of F.mse_loss", '''
            def loss_gc(zv, zt):
                zv, zt = zv.float(), zt.float()
                s_vt, s_vv, s_tt = zv @ zt.t(), zv @ zv.t(), zt @ zt.t()
                return len(zv) * (F.mse_loss(s_vt, s_vt.t()) + F.mse_loss(s_vv, s_tt))
            '''),
    ],
    "A5": [
        W("albef_fusion.momentum_update", "a loop over the parameter pairs", '''
            @torch.no_grad()
            def momentum_update(pairs, m):
                for online, momentum in pairs:
                    for p, p_m in zip(online.parameters(), momentum.parameters()):
                        p_m.copy_(m * p_m + (1 - m) * p)
            '''),
        W("albef_fusion.hard_negatives", "a Gumbel-max draw with the positives at weight exactly 0", '''
            @torch.no_grad()
            def hard_negatives(s_i2t, s_t2i, same=None, eps=1e-4):
                same = torch.eye(len(s_i2t), dtype=torch.bool) if same is None else same

                def draw(s):
                    w = (F.softmax(s.float(), dim=1) + eps).masked_fill(same, 0)
                    gumbel = -torch.log(-torch.log(torch.rand_like(w).clamp_min(1e-12)))
                    return (w.log() + gumbel).argmax(1)
                return draw(s_i2t), draw(s_t2i)
            '''),
        W("albef_fusion.distill_targets", "torch.eye for the one-hot", '''
            def distill_targets(s_m, alpha):
                return alpha * s_m.softmax(1) + (1 - alpha) * torch.eye(*s_m.shape, dtype=s_m.dtype)
            '''),
    ],
    "A6": [
        W("codis.loss_code", "the codebook re-normalized on the way in (a no-op on unit rows)", '''
            def loss_code(z_v, z_t, f_v, f_t, codebook, args):
                codebook = F.normalize(codebook.float(), dim=-1)
                n, k = len(f_v), len(codebook)
                mu, nu = torch.full((n,), 1 / n), torch.full((k,), 1 / k)
                with torch.autocast(f_v.device.type, enabled=False):
                    d_v, d_t = 1 - f_v.detach().float() @ codebook.t(), 1 - f_t.detach().float() @ codebook.t()
                    t_i2p = ipot(d_v, mu, nu, args.ipot_beta, args.ipot_outer, args.ipot_inner)
                    t_t2p = ipot(d_t, mu, nu, args.ipot_beta, args.ipot_outer, args.ipot_inner)
                    return {"ot_v": (t_i2p * d_v).sum(), "ot_t": (t_t2p * d_t).sum(),
                            "t2p": swapped_prediction(z_t, codebook, t_i2p, args.code_temp),
                            "i2p": swapped_prediction(z_v, codebook, t_t2p, args.code_temp)}
            '''),
        W("codis.swapped_prediction", "F.cross_entropy with soft targets", '''
            def swapped_prediction(z, codebook, plan, gamma):
                logits = z.float() @ codebook.float().t() / gamma
                return F.cross_entropy(logits, (plan / plan.sum(1, keepdim=True)).float())
            '''),
    ],
    "A7": [
        W("eval._ranks", "a loop over the queries of each chunk", '''
            def _ranks(queries, cands, q_group, c_group, chunk):
                out = []
                for s in range(0, len(queries), chunk):
                    sim = queries[s:s + chunk] @ cands.T
                    for row, group in zip(sim, q_group[s:s + chunk]):
                        pos = c_group == group
                        out.append(int((row[~pos] >= row[pos].max()).sum()))
                return torch.tensor(out, dtype=torch.long)
            '''),
    ],
    "A8": [
        W("eval.topk_accuracy", "counting the classes at least as high, one row at a time", '''
            def topk_accuracy(logits, targets, ks=(1, 3, 5)) -> dict:
                ahead = torch.tensor([int((row >= row[y]).sum()) - 1 for row, y in zip(logits, targets)])
                return {f"top{k}": 100.0 * (ahead < k).double().mean().item() for k in ks}
            '''),
    ],
}

# cheats: each wraps an empty answer in a trick that fooled the in-process grader; each must score zero on the
# functions it touches and never make grade.py exit 0
CHEATS = [
    W("clip_base.nce", "calls the reference through sys.modules['clip_base']", '''
        def nce(a, b, logit_scale):
            import sys
            return sys.modules["clip_base"].nce(a, b, logit_scale)
        '''),
    W("eval.retrieval_metrics", "loads the instructor's eval.py from the path of the course package", '''
        def retrieval_metrics(img_feats, txt_feats, txt2img, ks=(1, 5, 10), chunk=1024) -> dict:
            import importlib.util
            from pathlib import Path
            import course
            spec = importlib.util.spec_from_file_location("ref_eval", Path(course.__file__).parents[1] / "eval.py")
            ref = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ref)
            return ref.retrieval_metrics(img_feats, txt_feats, txt2img, ks, chunk)
        '''),
    W("eval._ranks", "imports the grader's oracle from tests/test_eval.py", '''
        def _ranks(queries, cands, q_group, c_group, chunk):
            from test_eval import brute_force_recall  # noqa: F401
            from course.graders import ranks_loop
            return ranks_loop(queries, cands, q_group, c_group)
        '''),
    W("sep.loss_ortho", "replaces the grader's close / require / tensors_close with no-ops", '''
        def loss_ortho(zv, zv_i, zt, zt_i):
            import course.graders as g
            g.close = g.require = g.tensors_close = lambda *a, **k: None
            return None
        '''),
    W("bridge.loss_bridge", "math.isclose = lambda *a, **k: True at import", '''
        import math
        math.isclose = lambda *a, **k: True


        def loss_bridge(zv_a, zv, zt, t):
            return None
        '''),
    W("eval.topk_accuracy", "patches torch.Tensor.max and returns nothing useful", '''
        torch.Tensor.max = lambda self, *a, **k: torch.tensor(0.0)


        def topk_accuracy(logits, targets, ks=(1, 3, 5)) -> dict:
            return {f"top{k}": float("nan") for k in ks}
        '''),
    W("geocons.loss_gc", "raise SystemExit(0) inside the graded function", '''
        def loss_gc(zv, zt):
            raise SystemExit(0)
        '''),
    W("geocons.loss_gc_aug", "prints a full-marks table, then os._exit(0)", '''
        def loss_gc_aug(zv, zt, zv_a, zt_a):
            import os
            print("geocons.loss_gc_aug   4/4")
            print("total 15/15  (full marks)", flush=True)
            os._exit(0)
        '''),
    W("sep.loss_uni", "an endless loop that swallows the TimeoutError and cancels the alarm", '''
        def loss_uni(zv_i, zt_i, t=2.0):
            import signal
            import time
            while True:
                try:
                    signal.alarm(0)
                    time.sleep(0.05)
                except BaseException:
                    pass
        '''),
    W("albef_fusion.distilled_nce", "returns a float subclass that compares equal to anything", '''
        class Equal(float):
            def __eq__(self, other):
                return True
            __le__ = __ge__ = __eq__

            def __lt__(self, other):
                return False
            __gt__ = __lt__

            def __sub__(self, other):
                return Equal(0.0)
            __rsub__ = __sub__

            def __abs__(self):
                return Equal(0.0)

            def __hash__(self):
                return 0


        def distilled_nce(z, z_m, keys, temp, alpha):
            return Equal(0.0), torch.zeros(len(z), len(keys))
        '''),
    W("albef_fusion.dequeue_and_enqueue", "kills the fork server that starts the children, then does nothing", '''
        def dequeue_and_enqueue(image_queue, text_queue, queue_ptr, image_feat_m, text_feat_m):
            import os
            import signal
            if os.getppid() > 1:                   # the fork server, while it lives
                os.kill(os.getppid(), signal.SIGKILL)
        '''),
    W("codis.ipot", "returns a torch.Tensor subclass whose comparisons always say 'equal'", '''
        class Agreeable(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                if func in (torch.allclose, torch.equal, torch.Tensor.equal):
                    return True
                if func in (torch.isclose, torch.eq, torch.Tensor.__eq__, torch.Tensor.eq):
                    return torch.ones(args[0].shape, dtype=torch.bool)
                if func in (torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__):
                    return torch.zeros(args[0].shape)
                return super().__torch_function__(func, types, args, kwargs)


        def ipot(cost, mu, nu, beta=0.5, n_outer=50, n_inner=1):
            return torch.zeros(cost.shape).as_subclass(Agreeable)
        '''),
    W("codis.swapped_prediction", "returns the expected value it finds in its callers' frames", '''
        def swapped_prediction(z, codebook, plan, gamma):
            import inspect
            for frame in inspect.stack()[1:]:
                for name in ("expected", "want", "reference", "ref", "target"):
                    if name in frame.frame.f_locals:
                        return frame.frame.f_locals[name]
            return torch.tensor(0.0)
        '''),
]


def trivial_answers(key, folder):
    """Two answers per graded function of assignment `key`, written from the signatures in `folder`: a stub
    that does nothing (`return None`) and a constant (`return torch.tensor(0.0)`). Neither may earn a single
    point: a check whose property a constant also has (invariance under permuting or repeating the batch,
    0 on identical inputs, an online model left unchanged) must check the value itself as well."""
    import ast
    from course.assignments import ASSIGNMENTS
    from course.grade import definition
    answers = []
    for function in ASSIGNMENTS[key].names:
        module, qualname = function.split(".", 1)
        source = textwrap.dedent(definition((Path(folder) / f"{module}.py").read_text(), qualname))
        tree = ast.parse(source).body[0]
        head = "\n".join(source.splitlines()[:tree.body[0].lineno - 1])     # the decorators and the signature
        for what, body in (("a stub that does nothing", "return None"), ("a constant", "return torch.tensor(0.0)")):
            answers.append(Written(function, what, f"{head}\n    {body}\n"))
    return answers


# ============================== the mutation run ======================================================
def filled_copy(key, folder, root=ROOT):
    """A student copy of `key` (one key or several) written to `folder` from the working tree, then filled with
    the reference: the starting point of the mutants, the right answers and the cheats."""
    plan = make_assignment(key.split("+"), folder, root=root, force=True, from_worktree=True)
    fill_functions(folder, plan, root)
    return plan


class Batch:
    """One child process for many versions of an assignment's functions: each version's definition is sent to
    the child in place of the filled copy's, graded (grade.py, with this child), and the filled copy's sent back.
    A version that kills its child costs a restart, not the batch."""

    def __init__(self, key, folder, reference=None):
        from course.loader import Copy
        from course.sandbox import Child
        self.key, self.folder = key, Path(folder)
        self.reference = reference if reference is not None else Copy(ROOT, "reference")
        self.child = Child(folder)

    def _inject(self, module, source):
        """Send a definition; it stays in the child's setup (a restarted child gets it again) until replaced."""
        request = {"op": "inject", "module": module, "source": source}
        self.child.setup = [r for r in self.child.setup if not (r["op"] == "inject" and r["module"] == module
                                                              and r.get("function") == source_name(source))]
        request["function"] = source_name(source)
        self.child.setup.append(request)
        self.child.deadline, self.child.late = time.monotonic() + 120, "did not load the definition in 120 s"
        self.child.ask(request)

    @contextlib.contextmanager
    def replaced(self, function, source):
        """`function` (module.function, graded or not) runs `source` in the child while inside; yields why the
        source did not load ('' when it did)."""
        from course.grade import definition, reason_of
        module, qualname = function.split(".", 1)
        original = definition((self.folder / f"{module}.py").read_text(), qualname)
        try:
            try:
                self._inject(module, source)
                failed = ""
            except Exception as exc:   # noqa: BLE001 - a version that does not even load
                failed = reason_of(exc)
            yield failed
        finally:
            self._inject(module, original)

    def grade(self, function, source, **kwargs):
        """[Result] of `function` (its checks, then by default the learning check) with `source` as its code."""
        from course.grade import Result, grade
        with self.replaced(function, source) as failed:
            if failed:
                return [Result(function, "the definition loads", False, failed, 0, 0.0)]
            return grade(self.key, self.folder, self.reference, functions=[function],
                         **{"learning": True, **kwargs}, child=self.child)

    def close(self):
        self.child.close()


def source_name(source):
    """The name of the (last) function a definition defines."""
    import ast
    return [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)][-1]


def source_of(folder, mutant):
    """The whole definition of a mutant's function: written out, or the filled copy's with the edits applied."""
    if isinstance(mutant, Written):
        return mutant.source
    from course.grade import definition
    module, qualname = mutant.function.split(".", 1)
    return definition(mutate((Path(folder) / f"{module}.py").read_text(), mutant), qualname)


def kill(batch, mutant):
    """(killed, the first failing result) of one wrong answer, graded until its first failed check."""
    results = batch.grade(mutant.function, source_of(batch.folder, mutant), fail_fast=True)
    failed = [x for x in results if not x.passed]
    return bool(failed), (failed[0] if failed else None)


def right(batch, alternative):
    """(full marks, the failed results) of one correct alternative, checks and learning check."""
    results = batch.grade(alternative.function, alternative.source)
    return all(x.passed for x in results) and bool(results), [x for x in results if not x.passed]


def cheat_score(batch, cheat, timeout=3, total_timeout=20):
    """(points, results) of a cheat: its function's checks with short limits (an endless loop costs the cap)."""
    results = batch.grade(cheat.function, cheat.source, learning=False, timeout=timeout,
                          total_timeout=total_timeout)
    return sum(x.points for x in results), results


def assignment_of(function):
    from course.assignments import ASSIGNMENTS
    return next(k for k, a in ASSIGNMENTS.items() if function in a.names)


def main(argv=None):
    from course.grade import full_marks, grade
    from course.loader import Copy
    import torch
    p = argparse.ArgumentParser(description="kill rates of the wrong answers (own and written after the checks), "
                                            "the right answers' marks, the cheats' and the trivial answers' "
                                            "scores, per assignment")
    p.add_argument("assignments", nargs="*", default=list(MUTANTS))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    reference, summary = Copy(ROOT, "reference"), []
    for key in a.assignments:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            filled_copy(key, tmp)
            ok = full_marks(grade(key, tmp, reference))
            print(f"{key}: the copy filled with the reference gets {'full marks' if ok else 'LESS THAN FULL MARKS'}")
            batch, row = Batch(key, tmp, reference), [key]
            for name, cases in (("own", MUTANTS[key]), ("written after the checks", HIDDEN.get(key, []))):
                killed = 0
                for m in cases:
                    dead, why = kill(batch, m)
                    killed += dead
                    print(f"  {'killed' if dead else 'SURVIVED'}  ({name}) {m.function}: "
                          f"{getattr(m, 'mistake', getattr(m, 'what', ''))}"
                          + (f"\n          by: {why.check} -> {why.reason}" if dead else ""))
                row.append((killed, len(cases)))
            good = 0
            for alt in ALTERNATIVES.get(key, []):
                fine, failed = right(batch, alt)
                good += fine
                print(f"  {'full marks' if fine else 'REJECTED'}  (right answer) {alt.function}: {alt.what}"
                      + "".join(f"\n          {x.check} -> {x.reason}" for x in failed))
            row.append((good, len(ALTERNATIVES.get(key, []))))
            batch.close()
            cheats, zero = [c for c in CHEATS if assignment_of(c.function) == key], 0
            if cheats:
                batch = Batch(key, tmp, reference)
                for c in cheats:
                    points, _ = cheat_score(batch, c)
                    zero += points == 0
                    print(f"  {'zero' if points == 0 else f'{points} POINTS'}  (cheat) {c.function}: {c.what}")
                batch.close()
            row.append((zero, len(cheats)))
            trivial, zero = trivial_answers(key, tmp), 0
            batch = Batch(key, tmp, reference)
            for t in trivial:
                points, _ = cheat_score(batch, t)
                zero += points == 0
                if points:
                    print(f"  {points} POINTS  (trivial answer) {t.function}: {t.what}")
            batch.close()
            row.append((zero, len(trivial)))
        summary.append((*row, time.perf_counter() - start))
    print("\n| assignment | own wrong answers rejected | written after the checks, rejected | right answers with "
          "full marks | cheats with zero | trivial answers with zero | seconds |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, *counts, seconds in summary:
        print(f"| {key} | " + " | ".join(f"{n} / {t}" for n, t in counts) + f" | {seconds:.1f} |")
    return 0 if all(n == t for _, *counts, _ in summary for n, t in counts) else 1


if __name__ == "__main__":
    sys.exit(main())
