"""Every assignment in one place: what the student writes, what it teaches, how long it takes.

An assignment names qualified functions ("sep.loss_ortho": function loss_ortho of sep.py; "Class.method" is
accepted after the module). make_assignment.py blanks exactly these (plus any byte-identical copy of one of them
in another project file, which would give the answer away); grade.py runs the checks that graders.py registers
for them, then the method's learning check (`learning`: the script whose tiny model trains for a few dozen
steps). To add an assignment: add an entry here, make sure every function has checks in graders.py, and add at
least eight plausible wrong answers to mutants.py; tests/test_course.py then proves that the grader rejects
each of them and gives the reference full marks.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Function:
    name: str       # qualified name, module.function
    equation: str   # what the student implements: quoted in the NotImplementedError of the blanked body


@dataclass(frozen=True)
class Assignment:
    key: str
    title: str
    goals: tuple            # learning goals, one line each
    functions: tuple        # Function, in the order a student should write them
    minutes: int            # time estimate for a student who has read the method's docstring
    learning: str = ""      # method script whose learning check runs after the function checks ("" = none)
    default_run: str = ""   # the command whose printed numbers course/README.md quotes

    @property
    def names(self):
        return [f.name for f in self.functions]

    @property
    def modules(self):
        return sorted({f.name.split(".")[0] for f in self.functions} | ({self.learning} - {""}))


ASSIGNMENTS = {a.key: a for a in [
    Assignment(
        "A1", "InfoNCE and the four-term contrastive loss L_con (clip_base.py)",
        ("write CLIP's InfoNCE as a cross-entropy over a similarity matrix, with a learned temperature",
         "see that NCE(a, b) ≠ NCE(b, a): the softmax runs over the second argument's batch",
         "add the intra-modal terms: each input against its augmented view, the other view's batch as negatives",
         "keep the logits in fp32 under bf16 autocast"),
        (Function("clip_base.nce", "NCE(a, b) = −1/N Σ_j log( exp(⟨a_j, b_j⟩/τ) / Σ_k exp(⟨a_j, b_k⟩/τ) ), "
                                   "τ = exp(−logit_scale)"),
         Function("clip_base.loss_con", "L_con = ¼ (L_V2T + L_T2V + L_V2V + L_T2T), or ½ (L_V2T + L_T2V) for "
                                        "plain CLIP; return every term and 'con'")),
        minutes=60, learning="clip_base", default_run="python clip_base.py"),
    Assignment(
        "A2", "Deep feature separation: L_ortho, L_con^i and the uniformity L_uni^i (sep.py)",
        ("make a second feature orthogonal to the aligned one: a squared cosine per pair",
         "keep it meaningful with a contrastive term between two augmented views",
         "spread it out with Wang & Isola's uniformity, one log per modality, without the j = k pairs",
         "compute a pairwise potential without a square root, so its gradient stays finite",
         "write the same uniformity as an evaluation metric (a Python float, on a fixed subset of points)"),
        (Function("sep.loss_ortho", "L_ortho = 1/N Σ_j (⟨z_Vj, z_Vj^i⟩² + ⟨z_Tj, z_Tj^i⟩²)"),
         Function("sep.loss_con_i", "L_con^i = NCE(z_V^i, z_V^{a,i}) + NCE(z_T^i, z_T^{a,i})"),
         Function("sep.uniformity", "log mean_{j≠k} exp(−t‖z_j − z_k‖²)"),
         Function("sep.loss_uni", "L_uni^i = log mean_{j≠k} G_t(z_Vj^i, z_Vk^i) + log mean_{j≠k} G_t(z_Tj^i, "
                                  "z_Tk^i), G_t(u, v) = exp(−t‖u − v‖²)"),
         Function("eval.uniformity", "log mean_{i≠j} exp(−2‖u_i − u_j‖²) as a float, on a fixed random subset of "
                                     "at most max_points rows")),
        minutes=75, learning="sep", default_run="python sep.py"),
    Assignment(
        "A3", "The Brownian bridge L_Br (bridge.py)",
        ("project the mean of a Brownian bridge from z_V to z_T back onto the unit sphere",
         "check a squared distance against its closed form for unit vectors",
         "see why the printed expansion of the paper, minimized, pushes z^a away from the bridge",
         "let the gradient reach the augmented view and both ends of the bridge"),
        (Function("bridge.loss_bridge", "μ = (t z_V + (1−t) z_T) / ‖t z_V + (1−t) z_T‖,  "
                                        "L_Br = 1/N Σ_j ‖z_Vj^a − μ_j‖²"),),
        minutes=40, learning="bridge", default_run="python bridge.py"),
    Assignment(
        "A4", "Geometric consistency L_GC and L_GC^a (geocons.py)",
        ("express cross-modal and in-modal symmetry as differences of similarity matrices",
         "keep CyCLIP's 1/N normalization of a sum over N² pairs, and know that it grows with the batch",
         "make the augmented views keep the originals' geometry, and read a misprinted term sensibly"),
        (Function("geocons.loss_gc", "L_GC = 1/N Σ_j Σ_k [ (⟨z_Vj, z_Tk⟩ − ⟨z_Vk, z_Tj⟩)² + "
                                     "(⟨z_Vj, z_Vk⟩ − ⟨z_Tj, z_Tk⟩)² ]"),
         Function("geocons.loss_gc_aug", "L_GC^a = 1/N Σ_j Σ_k [ (⟨z_Vj, z_Vk⟩ − ⟨z_Vj^a, z_Vk^a⟩)² + "
                                         "(⟨z_Tj, z_Tk⟩ − ⟨z_Tj^a, z_Tk^a⟩)² ] + 1/N Σ_j (⟨z_Vj, z_Tj⟩ − "
                                         "⟨z_Vj^a, z_Tj^a⟩)²")),
        minutes=45, learning="geocons", default_run="python geocons.py"),
    Assignment(
        "A5", "ALBEF: momentum model, queues, distillation, MLM masking and hard negatives (albef_fusion.py)",
        ("keep a momentum copy of a model with an exponential moving average, outside the optimizer",
         "keep a FIFO queue of momentum features as a ring buffer",
         "build soft pseudo-labels from the momentum model and train against them (momentum distillation)",
         "mask tokens with BERT's 80/10/10 rule, never the special tokens",
         "sample hard negatives in proportion to the in-batch similarity, never a positive"),
        (Function("albef_fusion.momentum_update", "θ_m ← m θ_m + (1 − m) θ for every (online, momentum) pair"),
         Function("albef_fusion.dequeue_and_enqueue", "the N new momentum features overwrite the N oldest queue "
                                                      "rows; the pointer moves on by N, modulo M"),
         Function("albef_fusion.distill_targets", "y = α·softmax(s_m) + (1 − α)·onehot, row j's positive in "
                                                  "column j"),
         Function("albef_fusion.distilled_nce", "H(y, p) = −1/N Σ_j Σ_m y_jm log p_jm, p = softmax(z keysᵀ/τ), y "
                                                "from the momentum queries z_m; return (H, s detached)"),
         Function("albef_fusion.mask_tokens", "choose each non-special token with probability prob; of those "
                                              "80% [MASK], 10% a random id, 10% kept; labels −100 elsewhere"),
         Function("albef_fusion.hard_negatives", "draw one negative per row with weights softmax(s) + ε, "
                                                 "zero where `same`")),
        minutes=120, learning="albef_fusion", default_run="python albef_fusion.py"),
    Assignment(
        "A6", "CODIS: IPOT optimal transport, swapped prediction and the codebook loss (codis.py)",
        ("write the inexact proximal point method for optimal transport step by step (Xie et al. 2019)",
         "see that its plan reaches the exact optimum where Sinkhorn's stays blurred",
         "predict one modality's transport plan from the other modality's features (swapped prediction)",
         "send each loss's gradient only where it belongs: ⟨T, D⟩ to the codebook, never to the teacher"),
        (Function("codis.ipot", "repeat: Q = A ⊙ T, δ = μ / (Q σ), σ = ν / (Qᵀ δ), T = diag(δ) Q diag(σ), "
                                "with A = exp(−D/β)"),
         Function("codis.swapped_prediction", "H(T̂, P) = −1/N Σ_j Σ_k T̂_jk log P_jk, P = softmax(z Cᵀ/γ), "
                                              "T̂ = the plan's rows renormalized"),
         Function("codis.loss_code", "D = 1 − f Cᵀ (features fixed), T = IPOT(D, 1/N, 1/K); ot = ⟨T, D⟩ per "
                                     "modality; t2p = H(T_i2p, P_t2p), i2p = H(T_t2p, P_i2p)")),
        minutes=90, learning="codis", default_run="python codis.py"),
    Assignment(
        "A7", "Retrieval evaluation with several captions per image, with and without ITM reranking (eval.py)",
        ("rank a query by the negatives scoring at least as high as its best positive (ties go against the query)",
         "count an image→text hit when any of the image's captions is in the top k",
         "rerank each query's top k by a second score without ever holding the full similarity matrix",
         "score each distinct (image, caption) pair once"),
        (Function("eval._ranks", "rank of each query = number of negatives scoring at least as high as its best "
                                 "positive (same group id = positive)"),
         Function("eval.retrieval_metrics", "i2t_R@k, t2i_R@k = 100 · mean(rank < k), rsum = their sum"),
         Function("eval._reranked_ranks", "rank of the best positive in the order: the top k by rescore, then the "
                                          "rest by first-stage score, a negative tied with a positive first"),
         Function("eval.rerank_retrieval", "each query's top k ITC candidates reordered by itm_score (each distinct "
                                           "pair scored once), then R@k and rsum as in retrieval_metrics")),
        minutes=90, default_run="python eval.py RUN_DIR"),
    Assignment(
        "A8", "Zero-shot classification: the prompt ensemble, top-k and balanced accuracy (eval.py)",
        ("build a zero-shot classifier by averaging normalized prompt features over templates",
         "measure top-k accuracy, a tie with the true class counting against it",
         "measure balanced accuracy: the mean recall over the classes present"),
        (Function("eval.zeroshot_classifier", "w_c = normalize(mean_t normalize(f(template_t.format(c))))"),
         Function("eval.topk_accuracy", "top{k} = percent of rows with fewer than k other classes scoring at "
                                        "least the true class's logit (a tie is not a hit)"),
         Function("eval.balanced_accuracy", "mean over the classes present of the recall, in percent")),
        minutes=45, default_run="python eval.py RUN_DIR"),
]}
