"""Run under `torchrun --nproc_per_node K` by tests/test_distributed.py (not a test file itself).

    features OUT           every method's loss functions on this process's slice of fixed features: saves the
                           losses and the gradients (inputs and parameters) to OUT/rank{R}.pt
    train-unsynced ...     the same without DistributedDataParallel: the processes' weights drift apart
    train SCRIPT OUT ARGS  SCRIPT.main(ARGS) with BatchNorm statistics and BERT's dropout switched off (so that the one-process
                           and the K-process runs see the same numbers), then saves this process's weights to
                           OUT/weights{R}.pt

CASES is imported by the test too: it computes the one-process reference from the same definitions.
"""
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

N, E = 8, 6          # the global batch and the feature width of the feature cases


def features(seed, n=N, e=E):
    """Fixed unit features of the global batch (the same on every process)."""
    return F.normalize(torch.randn(n, e, generator=torch.Generator().manual_seed(seed)), dim=-1)


def cases():
    """name -> (loss of (rows, shared), number of row tensors, shared tensors). `rows` are this process's rows of
    each fixed feature tensor (all of them on one process); `shared` are the same on every process (a
    temperature, queues, a codebook: their gradients are averaged over the processes, as DDP does)."""
    import bridge
    import clip_base
    import codis
    import geocons
    import sep
    from types import SimpleNamespace
    scale = lambda: [torch.tensor(2.5, requires_grad=True)]                      # noqa: E731
    queues = lambda: [torch.tensor(0.1, requires_grad=True), features(100, 12), features(101, 12)]  # noqa: E731
    code_args = SimpleNamespace(ipot_beta=0.5, ipot_outer=50, ipot_inner=1, code_temp=0.1)
    codebook = lambda: [features(200, 5).requires_grad_()]                       # noqa: E731
    return {
        "clip_base.loss_con": (lambda r, s: clip_base.loss_con({"v": r[0], "t": r[1]}, {"v": r[2], "t": r[3]},
                                                               s[0])["con"], 4, scale),
        "clip_base.loss_con plain": (lambda r, s: clip_base.loss_con({"v": r[0], "t": r[1]}, None, s[0],
                                                                     plain_clip=True)["con"], 2, scale),
        "sep.loss_ortho": (lambda r, s: sep.loss_ortho(*r), 4, list),
        "sep.loss_con_i": (lambda r, s: sep.loss_con_i(*r, s[0]), 4, scale),
        "sep.loss_uni": (lambda r, s: sep.loss_uni(*r), 2, list),
        "bridge.loss_bridge": (lambda r, s: bridge.loss_bridge(*r, 0.25), 3, list),
        "geocons.loss_gc": (lambda r, s: geocons.loss_gc(*r), 2, list),
        "geocons.loss_gc_aug": (lambda r, s: geocons.loss_gc_aug(*r), 4, list),
        "albef_fusion.loss_itc": (lambda r, s: codis.loss_itc(*r, s[1], s[2], s[0], 0.4)[0], 4, queues),
        "codis.loss_ica": (lambda r, s: codis.loss_ica(*r, s[1], s[2], s[0], 0.4)[0], 4, queues),
        "codis.loss_code": (lambda r, s: sum(codis.loss_code(*r, F.normalize(s[0], dim=-1), code_args).values()),
                            4, codebook),
    }


def evaluate_cases(rank, world):
    """{case: (loss, [gradient of each row tensor's rows], [gradient of each shared tensor])} on this process."""
    out = {}
    n = N // world
    for name, (fn, k, make_shared) in cases().items():
        rows = [features(seed)[rank * n:(rank + 1) * n].clone().requires_grad_() for seed in range(k)]
        shared = make_shared()
        loss = fn(rows, shared)
        loss.backward()
        out[name] = (loss.detach(), [r.grad for r in rows], [t.grad for t in shared])
    return out


def main():
    import torch.distributed as dist
    mode = sys.argv[1]
    if mode == "features":
        dist.init_process_group("gloo")
        torch.save(evaluate_cases(dist.get_rank(), dist.get_world_size()),
                   os.path.join(sys.argv[2], f"rank{dist.get_rank()}.pt"))
        dist.destroy_process_group()
    elif mode in ("train", "train-unsynced"):
        import importlib
        if mode == "train-unsynced":      # the trap: no DDP, so each process keeps its own gradients
            torch.nn.parallel.DistributedDataParallel = lambda module, *a, **k: module
        script, out = importlib.import_module(sys.argv[2]), sys.argv[3]
        # BatchNorm's affine part only (no batch statistics) and no dropout: the same numbers on 1 and K processes
        torch.nn.BatchNorm2d.forward = lambda self, x: x * self.weight[:, None, None] + self.bias[:, None, None]
        import transformers
        bert_init = transformers.BertConfig.__init__
        transformers.BertConfig.__init__ = lambda self, *a, **k: bert_init(
            self, *a, **{**k, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
        import eval as ev
        captured, real = {}, ev.check_in_sync

        def keep(model, device):                                             # the weights each process ends with
            captured["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            real(model, device)
        ev.check_in_sync = keep
        script.main(sys.argv[4:])
        rank = int(os.environ.get("RANK", "0"))
        if "state" in captured:
            torch.save(captured["state"], os.path.join(out, f"weights{rank}.pt"))


if __name__ == "__main__":
    main()
