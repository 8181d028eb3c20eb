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
import sys
import tempfile
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
          ("torch.arange(len(a), device=a.device)", "torch.arange(1, len(a) + 1, device=a.device) % len(a)")),
        M("clip_base.nce", "the softmax over the wrong axis (the columns)",
          ("F.cross_entropy(logits,", "F.cross_entropy(logits.t(),")),
        M("clip_base.nce", "the second argument detached", ("b.float().t()", "b.detach().float().t()")),
        M("clip_base.nce", "a sum over the batch instead of the mean",
          ("torch.arange(len(a), device=a.device))", "torch.arange(len(a), device=a.device), reduction='sum')")),
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
          ("uniformity(zv_i.float(), t) + uniformity(zt_i.float(), t)",
           "uniformity(torch.cat([zv_i.float(), zt_i.float()]), t)")),
        M("sep.loss_uni", "t ignored (always 2)",
          ("uniformity(zv_i.float(), t) + uniformity(zt_i.float(), t)",
           "uniformity(zv_i.float()) + uniformity(zt_i.float())")),
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
          ("zv, zt = zv.float(), zt.float()", "zv, zt = zv.float(), zt.detach().float()")),
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
          ('"t2p": swapped_prediction(z_t, codebook, t_i2p,', '"t2p": swapped_prediction(z_t, codebook, t_t2p,'),
          ('"i2p": swapped_prediction(z_v, codebook, t_t2p,', '"i2p": swapped_prediction(z_v, codebook, t_i2p,')),
        M("codis.loss_code", "the features in the cost not detached",
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
        M("eval._ranks", "ties counted against the query (≥ instead of >)", ("(sim > best)", "(sim >= best)")),
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
        M("eval._reranked_ranks", "a negative tied with the best positive's rescore counted",
          ("(ts > best_top)", "(ts >= best_top)")),
        M("eval._reranked_ranks", "a positive outside the top k ranked among the top k",
          ("rank_rest = k + (rest > best_rest).sum(1)", "rank_rest = (rest > best_rest).sum(1)")),
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
        M("eval.topk_accuracy", "a hit only at rank k exactly", ("hit[:, :k].any(1)", "hit[:, k - 1]")),
        M("eval.topk_accuracy", "k not clipped to the number of classes",
          ("logits.topk(min(max(ks), logits.shape[1]), dim=1)", "logits.topk(max(ks), dim=1)")),
        M("eval.topk_accuracy", "fractions instead of percent", ("100.0 * hit", "hit")),
        M("eval.balanced_accuracy", "absent classes counted with recall 0",
          ("(correct[present] / count[present]).mean()", "(correct / count.clamp_min(1)).mean()")),
        M("eval.balanced_accuracy", "plain accuracy", ("(correct[present] / count[present]).mean()",
                                                       "correct.sum() / count.sum()")),
    ],
}


# ============================== the mutation run ======================================================
def filled_copy(key, folder):
    """A student copy of `key` written to `folder`, then filled with the reference: the mutants' starting point."""
    plan = make_assignment([key], folder, force=True)
    fill_functions(folder, plan)
    return plan


def kill(key, base, reference, mutant):
    """Grade one mutant (a loader.Copy `base` of the filled copy); returns (killed, first failing result)."""
    from course.grade import grade   # here: grade.py imports the graders, which the listing above does not need
    module = mutant.function.split(".")[0]
    mutated = base.with_source(module, mutate((base.root / f"{module}.py").read_text(), mutant))
    results = grade(key, mutated, reference, functions=[mutant.function], learning=True, fail_fast=True)
    failed = [x for x in results if not x.passed]
    return bool(failed), (failed[0] if failed else None)


def main(argv=None):
    from course.grade import full_marks, grade
    from course.loader import Copy
    import torch
    p = argparse.ArgumentParser(description="kill rate of the mutants of each assignment")
    p.add_argument("assignments", nargs="*", default=list(MUTANTS))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    reference, summary = Copy(ROOT, "reference"), []
    for key in a.assignments:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            filled_copy(key, tmp)
            base = Copy(tmp, "filled")
            ok = full_marks(grade(key, base, reference))
            print(f"{key}: the copy filled with the reference gets {'full marks' if ok else 'LESS THAN FULL MARKS'}")
            killed = 0
            for m in MUTANTS[key]:
                dead, why = kill(key, base, reference, m)
                killed += dead
                print(f"  {'killed' if dead else 'SURVIVED'}  {m.function}: {m.mistake}"
                      + (f"\n          by: {why.check} -> {why.reason}" if dead else ""))
        summary.append((key, killed, len(MUTANTS[key]), time.perf_counter() - start))
    print("\n| assignment | mutants | killed | kill rate | seconds |\n| --- | ---: | ---: | ---: | ---: |")
    for key, killed, total, seconds in summary:
        print(f"| {key} | {total} | {killed} | {100 * killed / total:.0f}% | {seconds:.1f} |")
    return 0 if all(k == t for _, k, t, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
