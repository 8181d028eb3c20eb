"""Every method's loss trains what it should: one compute_losses + backward on a tiny model gives a finite, nonzero
gradient to every trainable parameter (both towers' encoders and projections, the method's own parameters:
sep's independent heads, the temperature, CODIS's codebook, ALBEF's fusion encoder and ITM head) and none to
the momentum copy of the fusion models. A detached tower fails here (the negative control below shows it)."""
import pytest
import torch

import albef_fusion
import bridge
import clip_base
import codis
import geocons
import sep
from test_albef import tiny_model, toy_batch
from test_regularizers import TINY_MODEL, fake_batch

pytestmark = [pytest.mark.method, pytest.mark.usefixtures("one_thread")]  # one_thread: conftest.py

TWO_TOWER = {"clip_base": clip_base, "sep": sep, "bridge": bridge, "geocons": geocons}
FUSION = {"albef_fusion": (albef_fusion, {}), "codis": (codis, {"codebook_size": 8, "ipot_outer": 10})}
OWN = {"clip_base": ["logit_scale"], "sep": ["logit_scale", "image_proj_i.weight", "text_proj_i.weight"],
       "bridge": ["logit_scale"], "geocons": ["logit_scale"], "albef_fusion": ["temp", "itm_head.weight"],
       "codis": ["temp", "itm_head.weight", "codebook"]}


def two_tower(name, plain_clip=False):
    mod = TWO_TOWER[name]
    args = mod.Args(**TINY_MODEL, plain_clip=plain_clip)
    torch.manual_seed(0)
    return mod, mod.build_model(args, range(50)).train(), args


def without_gradient(model):
    """Names of the trainable parameters whose gradient is missing, zero or not finite."""
    return [n for n, p in model.named_parameters() if p.requires_grad and
            (p.grad is None or not p.grad.any() or not torch.isfinite(p.grad).all())]


@pytest.mark.parametrize("name", list(TWO_TOWER))
def test_two_tower_loss_reaches_every_parameter(name):
    mod, model, args = two_tower(name)
    terms = mod.compute_losses(model, fake_batch(6), args)
    terms["loss"].backward()
    assert without_gradient(model) == []
    names = [n for n, _ in model.named_parameters()]
    assert all(any(n.startswith(t) for n in names) for t in ("visual.", "text.", "image_proj", "text_proj"))
    assert set(OWN[name]) <= set(names)


@pytest.mark.parametrize("name", ["sep", "bridge", "geocons"])
def test_the_method_terms_alone_reach_both_towers(name):
    """The regularizer itself, not only L_con, trains both towers (a detach inside it would hide behind L_con)."""
    mod, model, args = two_tower(name)
    terms = mod.compute_losses(model, fake_batch(6), args)
    method = {"sep": ["sep"], "bridge": ["bridge"], "geocons": ["gc", "gc_a"]}[name]
    sum(terms[k] for k in method).backward()
    for tower in ("visual.", "text.", "image_proj.", "text_proj."):
        got = [p.grad for n, p in model.named_parameters() if n.startswith(tower)]
        assert any(g is not None and g.any() for g in got), f"{method} sends no gradient to {tower}"


def test_plain_clip_reaches_every_parameter():
    mod, model, args = two_tower("clip_base", plain_clip=True)
    batch = {k: v for k, v in fake_batch(6).items() if not k.endswith("_aug")}
    mod.compute_losses(model, batch, args)["loss"].backward()
    assert without_gradient(model) == []


@pytest.mark.parametrize("name", list(FUSION))
def test_fusion_loss_reaches_every_online_parameter_and_no_momentum_one(name, tokenizer):
    mod, extra = FUSION[name]
    model, args = tiny_model(tokenizer, mod, batch_size=8, queue_size=16, **extra)
    model.train()
    terms = mod.compute_losses(model, toy_batch(tokenizer), args, 0.4)
    terms["loss"].backward()
    assert without_gradient(model) == []
    momentum = model.momentum_parameters()
    assert momentum and all(not p.requires_grad and p.grad is None for p in momentum)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(OWN[name]) <= names
    assert any(n.startswith("bert.fusion_layers.") and ".cross_attn." in n for n in names)


def test_negative_control_a_detached_text_tower_is_caught():
    """What the tests above catch: the text encoder's output detached before its projection."""
    mod, model, args = two_tower("clip_base")
    model.text.register_forward_hook(lambda module, inputs, output: output.detach())
    mod.compute_losses(model, fake_batch(6), args)["loss"].backward()
    missing = without_gradient(model)
    assert missing and all(n.startswith("text.") for n in missing)
