"""No host-device synchronization inside a training step, for each of the six methods.

On a GPU the host queues kernels ahead of the device. An operation whose result the host must read (a Python
number from a tensor, an output whose size depends on the data, a tensor built from Python data and copied
over) makes the host wait until everything queued before it has run, and the device then idles while the host
catches up. These tests record, on the CPU, every ATen operation of one training step as main() runs it (the
batch as data.to_device hands it over, compute_losses with autocast off, backward, the optimizer as main()
builds it on a GPU (fused AdamW), the scheduler, the temperature clamp, the momentum update; not the logging)
with a TorchDispatchMode, and the Python-level reads (.tolist(), .numpy(), .cpu()) and the tensors that method
code builds on the host with a TorchFunctionMode, and fail on any that would synchronize on a GPU.

Also here: the sync-free forms the methods use, each against the form it replaced or a closed form
(Gumbel-max sampling, MLM over every token, the queue, the foreach momentum update, the codebook histogram,
the two-tower text encoder's mask).
"""
import importlib
import math
import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import albef_fusion
import clip_base
import codis
import data
from tiny import ROOT, TINY, TINY_ALBEF

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SCRIPTS = ["clip_base", "sep", "bridge", "geocons", "albef_fusion", "codis"]
PROJECT = {os.path.join(ROOT, f"{name}.py") for name in SCRIPTS + ["data", "eval"]}

# ATen operations that make the host wait for the device (on a GPU), and why
SYNCING = {
    "aten._local_scalar_dense": "copies a value to the host (.item(), int(t), float(t), bool(t), `if t:`)",
    "aten.item": "copies a value to the host",
    "aten.is_nonzero": "copies a value to the host (bool(t))",
    "aten.equal": "returns a Python bool",
    "aten.nonzero": "output size depends on the data",
    "aten.argwhere": "output size depends on the data",
    "aten.masked_select": "output size depends on the data",
    "aten._unique": "output size depends on the data",
    "aten._unique2": "output size depends on the data",
    "aten.unique_dim": "output size depends on the data",
    "aten.unique_consecutive": "output size depends on the data",
    "aten.unique_dim_consecutive": "output size depends on the data",
    "aten.bincount": "output size = the largest value + 1, read on the host",
    "aten.multinomial": "checks the weights on the host (two .item() calls)",
}
INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
# Python-level reads the dispatcher never sees
HOST_READS = {"tolist": "copies the tensor to a Python list", "numpy": "a host array",
              "cpu": "a device-to-host copy"}
# tensors made from host data (a blocking host-to-device copy on a GPU, device= or not), and factories that
# build the tensor on the host when called without device= (then copied over)
FROM_HOST = {"tensor", "as_tensor", "from_numpy"}
FACTORIES = {"ones", "zeros", "full", "empty", "arange", "eye", "rand", "randn", "randint", "randperm",
             "linspace", "logspace"}

# (operation, the file and function it is called from, why it is harmless on a GPU or what it costs there)
ALLOWED = [
    ("aten._local_scalar_dense", os.path.join("torch", "optim", "optimizer.py"), "_get_value",
     "AdamW without fused=True or capturable=True keeps its step counter on the host on purpose "
     "(torch/optim/adam.py) and reads it with .item(): a host tensor, no device sync. main() builds a fused "
     "AdamW on a GPU (step counter on the device, read by the fused kernel), so this is only seen on the CPU; "
     "capturable=True would also keep it on the device but is only needed for CUDA graphs."),
]


def where(stack):
    """'file:line function' of the innermost project frame and, if deeper, of the innermost frame."""
    frames = [f for f in stack if not f.filename.startswith(os.path.dirname(torch.__file__))
              and f.name not in ("__torch_function__", "__torch_dispatch__")] or stack
    ours = [f for f in frames if f.filename in PROJECT]
    fmt = lambda f: f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"  # noqa: E731
    return " <- ".join(dict.fromkeys(fmt(f) for f in [frames[-1], *ours[-1:]]))


def allowed(op, stack):
    return any(op == a_op and any(f.filename.endswith(a_file) and f.name == a_fn for f in stack)
               for a_op, a_file, a_fn, _ in ALLOWED)


class SyncRecorder(TorchDispatchMode):
    """Every ATen operation that would force a host-device sync on a GPU, as (op, where, why)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op, why = str(func.overloadpacket), None
        if op in SYNCING:
            why = SYNCING[op]
        elif op in INDEXING and any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1]):
            why = "boolean-mask indexing: the output size (or the written rows) depends on the data"
        elif str(func) == "aten.repeat_interleave.Tensor" and (kwargs or {}).get("output_size") is None:
            why = "output size = the sum of the repeats"
        if why is not None:
            stack = traceback.extract_stack()[:-1]
            if not allowed(op, stack):
                self.syncs.append((op, where(stack), why))
        return func(*args, **(kwargs or {}))


class HostRecorder(TorchFunctionMode):
    """Python-level host reads anywhere, and tensors built on the host by code in `files`, as (op, where, why)."""

    def __init__(self, syncs, files):
        super().__init__()
        self.syncs, self.files = syncs, files

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name, ours = getattr(func, "__name__", ""), sys._getframe(1).f_code.co_filename in self.files
        why = None
        if name in HOST_READS and getattr(func, "__qualname__", "").startswith("TensorBase."):
            why = HOST_READS[name]
        elif ours and name in FROM_HOST and not isinstance(args[0], torch.Tensor):
            why = "a tensor from host data: a blocking host-to-device copy on a GPU (build it once)"
        elif ours and name in FACTORIES and "device" not in (kwargs or {}):
            why = "built on the host (no device=): a blocking host-to-device copy on a GPU"
        if why is not None:
            self.syncs.append((f"Tensor.{name}" if name in HOST_READS else f"torch.{name}",
                               where(traceback.extract_stack()[:-1]), why))
        return func(*args, **(kwargs or {}))


class record_syncs:
    """with record_syncs() as syncs: ...  -> syncs, a list of (op, where, why); `files`: the code whose
    host-built tensors count (the project's scripts)."""

    def __init__(self, files=PROJECT):
        self.files = files

    def __enter__(self):
        self.syncs = []
        self.modes = [HostRecorder(self.syncs, self.files), SyncRecorder()]
        for m in self.modes:
            m.__enter__()
        return self.syncs

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)
        self.syncs += self.modes[1].syncs


def report(syncs):
    return "\n".join(f"  {op} at {at}: {why}" for op, at, why in syncs)


# ----------------------------------------------------------------------------------------------
# one training step of each method, as main() runs it
# ----------------------------------------------------------------------------------------------
def on_device(batch):
    """The batch as main() hands it to compute_losses: data.to_device (uint8 images to normalized floats), or,
    where it does not exist yet, the loader's float images as they are. Not recorded."""
    if hasattr(data, "to_device"):
        return data.to_device(batch, torch.device("cpu"), False)[0]
    return {k: v.float() / 255 if v.dtype == torch.uint8 else v for k, v in batch.items()}


def setup(script):
    """(module, model, args, batch, optimizer, scheduler, scaler) of a tiny run of `script` (train mode)."""
    mod = importlib.import_module(script)
    fusion = hasattr(mod, "momentum_update")
    args = data.parse_args(mod.Args, list(TINY_ALBEF if fusion else TINY))
    torch.manual_seed(0)
    train_set, _ = data.build_data(args)
    tokenizer = data.build_tokenizer(args, train_set)
    model = mod.build_model(args, tokenizer).train()
    loader = data.train_loader(train_set, tokenizer, args, args.batch_size, args.seed,
                               second_view=not fusion and not args.plain_clip)
    batch = on_device(next(iter(loader)))
    optimizer, scheduler = mod.make_optimizer(model, args, torch.device("cuda"))  # fused AdamW, as on a GPU
    scaler = torch.amp.GradScaler("cpu", enabled=False)                         # fp32: no gradient scaling
    return mod, model, args, batch, optimizer, scheduler, scaler


def train_step(mod, model, args, batch, optimizer, scheduler, scaler):
    """What main() does per step, without the logging."""
    fusion = hasattr(mod, "momentum_update")
    with torch.autocast("cpu", enabled=False):
        terms = mod.compute_losses(model, batch, args, *([args.alpha] if fusion else []))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    with torch.no_grad():
        if fusion:
            model.temp.clamp_(0.001, 0.5)
        else:
            model.logit_scale.clamp_(0, math.log(100))
    if fusion:
        mod.momentum_update(model.momentum_pairs(), args.momentum)
    return terms


def syncs_of_a_step(script):
    """The syncs of the second training step of `script` (the first creates the optimizer's state)."""
    run = setup(script)
    train_step(*run)
    with record_syncs() as syncs:
        terms = train_step(*run)
    assert torch.isfinite(terms["loss"])
    return syncs


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_training_step_never_syncs(script):
    syncs = syncs_of_a_step(script)
    assert not syncs, f"{script}: {len(syncs)} host-device syncs in one training step:\n{report(syncs)}"


def test_an_item_or_a_boolean_index_added_to_compute_losses_is_caught(monkeypatch):
    """The step test can fail: an .item() and a boolean-mask index inside compute_losses are both reported."""
    def loss_itm(itm_logits, n):
        scale = itm_logits[itm_logits > 0].mean().item()          # two syncs: a boolean index, then .item()
        return F.cross_entropy(itm_logits.float() * scale / scale, (torch.arange(3 * n) < n).long())
    monkeypatch.setattr(albef_fusion, "loss_itm", loss_itm)
    ops = [op for op, _, _ in syncs_of_a_step("albef_fusion")]
    assert "aten.index" in ops and "aten._local_scalar_dense" in ops, ops


def test_the_recorder_flags_each_kind_of_sync_and_nothing_else():
    x, w = torch.randn(6, 5), torch.rand(6, 5) + 0.1
    cases = {  # what a sync-free step must not do, and the op reported
        "aten._local_scalar_dense": lambda: x.sum().item(), "aten.nonzero": lambda: x.nonzero(),
        "aten.index": lambda: x[x > 0], "aten.index_put_": lambda: x.clone().__setitem__(x > 0, 0.0),
        "aten.masked_select": lambda: x.masked_select(x > 0), "aten._unique2": lambda: torch.unique(x),
        "aten.bincount": lambda: torch.bincount(x.argmax(1)), "aten.multinomial": lambda: torch.multinomial(w, 1),
        "aten.equal": lambda: torch.equal(x, x), "Tensor.tolist": lambda: x.tolist(),
        "aten.repeat_interleave": lambda: x.repeat_interleave(x.argmax(1), 0),
        "torch.tensor": lambda: torch.tensor([1, 2], device=x.device), "torch.ones": lambda: torch.ones(3),
    }
    for op, fn in cases.items():
        with record_syncs(PROJECT | {__file__}) as syncs:  # this file's host-built tensors count here
            fn()
        assert op in [s[0] for s in syncs], (op, syncs)
    with record_syncs(PROJECT | {__file__}) as syncs:  # the sync-free forms used instead
        y = torch.where(x > 0, x, 0).masked_fill(x < -1, 2.0)[torch.arange(3, device=x.device)]
        y.index_copy_(0, torch.arange(1, 2, device=x.device), x[:1])
        torch.zeros(5, device=x.device).index_add_(0, x.argmax(1), torch.ones_like(x[:, 0]))
        (w / torch.empty_like(w).exponential_()).argmax(1)
    assert not syncs, report(syncs)


# ----------------------------------------------------------------------------------------------
# the optimizer, the gradient scaler, the scheduler
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused, scaled", [(True, False), (True, True), (False, False)])
def test_optimizer_scaler_and_scheduler_steps(fused, scaled):
    """Fused AdamW (main() on a GPU), with and without fp16's gradient scaler, and LambdaLR: no sync at all.
    Without fused=True AdamW reads its host-side step counter, one .item() per tensor (allow-listed: no device
    sync); with the scaler, a non-fused optimizer would also read found_inf on the host (a real sync)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    scaler = torch.amp.GradScaler("cpu", enabled=scaled)

    def step():
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(model(torch.randn(3, 4)).square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    step()
    before = [p.clone() for p in model.parameters()]
    with record_syncs() as syncs:
        step()
    assert not syncs, report(syncs)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the step did update


def test_allow_listed_step_counter_reads_are_there_without_fused():
    """The allow-list entry is live: unfused AdamW reads its step counter once per tensor (host tensors)."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert all(optimizer.state[p]["step"].device.type == "cpu" for p in model.parameters())
    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) == "aten._local_scalar_dense":
                seen.append(allowed("aten._local_scalar_dense", traceback.extract_stack()))
            return func(*args, **(kwargs or {}))
    with Count():
        optimizer.step()
    assert seen == [True, True]  # weight and bias


# ----------------------------------------------------------------------------------------------
# the sync-free forms, against what they replaced or a closed form
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mod", [albef_fusion, codis])
def test_sample_rows_follows_the_weights(mod):
    """Column k of a row comes up with probability w_k / Σ w (closed form); zero weights never."""
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 4.0])
    torch.manual_seed(0)
    draws = mod.sample_rows(w.expand(40_000, -1).contiguous())               # 40,000 independent draws
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    p = w.double() / w.sum()
    assert freq[w == 0].sum() == 0
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / len(draws)).sqrt() + 1e-12), (freq, p)


def test_sample_rows_draws_what_multinomial_draws():
    """The same draws as torch.multinomial(w, 1) from the same RNG state (its own algorithm, minus its checks)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        w = torch.rand(16, 16, generator=g).masked_fill(torch.rand(16, 16, generator=g) < 0.3, 0)
        w[:, 0] += 1e-4
        torch.manual_seed(7)
        ours = albef_fusion.sample_rows(w)
        torch.manual_seed(7)
        assert torch.equal(ours, torch.multinomial(w, 1).squeeze(1))


def test_sample_rows_refuses_a_row_with_nothing_to_draw():
    w = torch.ones(3, 4)
    w[1] = 0
    with pytest.raises(RuntimeError, match="nothing to draw"):
        albef_fusion.sample_rows(w)


def test_loss_mlm_over_every_token_equals_the_masked_tokens_only():
    """Scoring every token and ignoring labels −100 = the loss over the K masked tokens picked out by a boolean
    mask (the form it replaced); no masked token gives 0."""
    g = torch.Generator().manual_seed(0)
    logits, logits_m = torch.randn(3, 6, 11, generator=g), torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(11, (3, 6), generator=g).masked_fill(torch.rand(3, 6, generator=g) < 0.6, -100)
    at, alpha = labels != -100, 0.4
    ce = F.cross_entropy(logits[at], labels[at])
    distill = -(F.softmax(logits_m[at], -1) * F.log_softmax(logits[at], -1)).sum(-1).mean()
    for mod in (albef_fusion, codis):
        got = mod.loss_mlm(logits, logits_m, labels, alpha)
        assert got.item() == pytest.approx(((1 - alpha) * ce + alpha * distill).item(), rel=1e-6)
        assert mod.loss_mlm(logits, logits_m, torch.full_like(labels, -100), alpha).item() == 0


def test_queue_takes_low_precision_features():
    """Under autocast the momentum features arrive in bf16: the fp32 queue stores them (no dtype error)."""
    image_q, text_q, ptr = torch.zeros(8, 3), torch.zeros(8, 3), torch.zeros((), dtype=torch.long)
    feats = torch.randn(4, 3).bfloat16()
    albef_fusion.dequeue_and_enqueue(image_q, text_q, ptr, feats, -feats)
    assert torch.equal(image_q[:4], feats.float()) and torch.equal(text_q[:4], -feats.float())
    assert image_q.dtype == torch.float32 and ptr.item() == 4 and not image_q[4:].any()


def test_foreach_momentum_update_is_the_per_tensor_loop(tokenizer):
    """Bit for bit the loop it replaced, p_m.mul_(m).add_(p, alpha=1 − m), over a whole ALBEF model."""
    args = albef_fusion.Args(vit_width=32, vit_depth=1, vit_heads=2, text_width=32, text_layers=1, fusion_layers=1,
                             text_heads=2, embed_dim=16, queue_size=32)
    torch.manual_seed(0)
    model = albef_fusion.build_model(args, tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    want = []
    for online, momentum in model.momentum_pairs():
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            want.append(p_m.detach().clone().mul_(0.99).add_(p.detach(), alpha=0.01))
    albef_fusion.momentum_update(model.momentum_pairs(), 0.99)
    got = model.momentum_parameters()
    assert len(got) == len(want) > 50 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_codebook_counts_are_the_histogram_of_nearest_codewords(tokenizer):
    """index_add_ counts = torch.bincount of each student feature's nearest codeword (recomputed here)."""
    args = codis.Args(vit_width=32, vit_depth=1, vit_heads=2, text_width=32, text_layers=1, fusion_layers=1,
                      text_heads=2, embed_dim=16, queue_size=16, codebook_size=8)
    torch.manual_seed(0)
    model = codis.build_model(args, tokenizer).train()
    t = tokenizer([f"a red {s}." for s in ["circle", "square", "star", "ring"] * 2], padding=True,
                  return_tensors="pt")
    batch = {"image": torch.randn(8, 3, 32, 32), "input_ids": t["input_ids"], "attention_mask": t["attention_mask"],
             "index": torch.arange(8)}
    codis.compute_losses(model, batch, args, 0.4)
    with torch.no_grad():
        z = torch.cat([model.encode_image(batch["image"]), model.encode_text(t["input_ids"], t["attention_mask"])])
        nearest = (z @ F.normalize(model.codebook, dim=-1).t()).argmax(1)
    assert torch.equal(model.code_counts, torch.bincount(nearest, minlength=8).float())


def test_two_tower_text_encoder_mask(tmp_path):
    """The 4-D additive mask gives what transformers gives from the 2-D mask, padding stays invisible, and
    only the 2-D mask makes transformers read the mask on the host; a non-BERT model keeps the 2-D mask."""
    args = clip_base.Args(text_width=32, text_layers=2)
    torch.manual_seed(0)
    enc = clip_base.TextEncoder(args, 60).eval()
    assert enc.additive_mask
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 3:] = 0, 0
    with torch.no_grad():
        with record_syncs() as syncs:
            ours = enc(ids, mask)
        assert not syncs, report(syncs)
        with record_syncs() as syncs:
            h = enc.bert(input_ids=ids, attention_mask=mask).last_hidden_state        # the 2-D mask
        assert [op for op, _, _ in syncs] == ["aten._local_scalar_dense"]            # its mask.all() check
        ref = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert torch.allclose(ours, ref, atol=1e-6)
        padded = enc(F.pad(ids, (0, 4)), F.pad(mask, (0, 4)))
        assert torch.allclose(padded, ours, atol=1e-5)
    from transformers import DebertaV2Config, DebertaV2Model
    DebertaV2Model(DebertaV2Config(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64)).save_pretrained(tmp_path / "deberta")
    other = clip_base.TextEncoder(clip_base.Args(text_model=str(tmp_path / "deberta")), 60).eval()
    assert not other.additive_mask
    with torch.no_grad():
        out = other(ids, mask)
        ref = other.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(out, (ref * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), atol=1e-6)
