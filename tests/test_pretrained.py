"""Pretrained CLIPs in eval.py (--clip, load_hf_clip, the tower parts for --init-clip), export (--export),
live curves (open_reporter) and zero-shot class-name / template files (data.read_classnames / read_templates).

A tiny random transformers.CLIPModel (32 px images, 8 px patches, width 32, 2 layers, 16-d projections) with a
generated word-level tokenizer and a CLIP preprocessor config, saved to a temporary folder, stands in for a
model from the Hugging Face hub: nothing here uses the network.
"""
import dataclasses
import json
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import eval as ev

transformers = pytest.importorskip("transformers")
try:    # transformers 5 names the PIL-based processor apart; 4.x's CLIPImageProcessor is the PIL one
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
except ImportError:
    CLIPImageProcessorPil = transformers.CLIPImageProcessor

CLASSNAMES = ["crimson thing", "leafy thing", "sky thing"]            # --classnames: not the folder names
TEMPLATES = ["a photo of a {c}.", "", "a {} square , a block"]      # CLIP_benchmark's {c}, a blank line, {}
COLOURS = [(220, 30, 30), (30, 180, 40), (40, 60, 220)]


TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny_config(cls, tokenizer, max_len=32, **kw):
    """A CLIPConfig / SiglipConfig of 32 px images, 8 px patches, width 32 and 2 layers per tower; the text
    model's end-of-text token is the tokenizer's [SEP]."""
    text = dict(TOWER, vocab_size=len(tokenizer), max_position_embeddings=max_len, eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id)
    return cls(text_config=text, vision_config=dict(TOWER, image_size=32, patch_size=8), **kw)


def tiny_clip(tokenizer):
    """A random CLIPModel small enough for a CPU test, with 16-d projections."""
    torch.manual_seed(0)
    return transformers.CLIPModel(tiny_config(transformers.CLIPConfig, tokenizer, projection_dim=16)).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A save_pretrained folder: config.json + model.safetensors, the tokenizer, preprocessor_config.json."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    words = "a an the photo of picture image square block red green blue number plain colour thing crimson leafy sky"
    tokenizer = data.word_tokenizer(words.split() + [",", ".", "(", ")"])
    tiny_clip(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def hf_features(model, processor, tokenizer, images, texts):
    """Unit-norm features straight from transformers: the processor, get_image_features, get_text_features
    (None for an empty list)."""
    img = txt = None
    with torch.no_grad():
        if images:
            px = processor(images=images, return_tensors="pt")["pixel_values"]
            img = F.normalize(ev._pooled(model.get_image_features(pixel_values=px)), dim=-1)
        if texts:
            tok = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
            txt = F.normalize(ev._pooled(model.get_text_features(input_ids=tok["input_ids"],
                                                                 attention_mask=tok["attention_mask"])), dim=-1)
    return img, txt


# ----------------------------------------------------------------------------------------------
# Preprocessing and loading
# ----------------------------------------------------------------------------------------------
def test_transform_matches_clip_image_processor(hf_dir):
    """data.preprocess_transform equals the PIL processor exactly (same PIL bicubic resize, same floor-rounded
    crop, ToTensor + Normalize); the torchvision processor resizes tensors by its own bicubic kernel, within
    one 8-bit level (1/255 / std ~ 0.015) of PIL's."""
    config = json.loads((hf_dir / "preprocessor_config.json").read_text())
    transform, gen = data.preprocess_transform(config), torch.Generator().manual_seed(0)
    fast = transformers.CLIPImageProcessor.from_pretrained(hf_dir)
    pil = CLIPImageProcessorPil.from_pretrained(hf_dir)
    for h, w in [(45, 61), (61, 45), (32, 32), (33, 100)]:   # odd margins: where CenterCrop's rounding differs
        img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
        x = transform(img)
        assert x.shape == (3, 32, 32)
        assert (x - pil(images=img, return_tensors="pt")["pixel_values"][0]).abs().max() < 1e-6
        assert (x - fast(images=img, return_tensors="pt")["pixel_values"][0]).abs().max() < 0.02


def test_siglip_style_config_resizes_to_a_square_without_crop():
    siglip = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
    proc = siglip.SiglipImageProcessorPil(size={"height": 24, "width": 24})          # mean = std = 0.5, bilinear
    config = proc.to_dict()
    img = Image.fromarray(torch.randint(0, 256, (40, 70, 3), generator=torch.Generator().manual_seed(1),
                                        dtype=torch.uint8).numpy())
    x = data.preprocess_transform(config, config["image_mean"], config["image_std"])(img)
    assert x.shape == (3, 24, 24)
    assert (x - proc(images=img, return_tensors="pt")["pixel_values"][0]).abs().max() < 1e-5


def test_load_hf_clip_gives_the_models_own_features(hf_dir, one_thread):
    model, tokenizer, transform = ev.load_hf_clip(str(hf_dir))
    ref = tiny_clip(tokenizer)                                          # the same weights, built anew
    images = [Image.new("RGB", (40, 36), c) for c in COLOURS]
    texts = ["a red square", "the photo of a blue block , number 3", "green"]
    img_ref, txt_ref = hf_features(ref, CLIPImageProcessorPil.from_pretrained(hf_dir), tokenizer, images, texts)
    with torch.no_grad():
        img = model.encode_image(torch.stack([transform(i) for i in images]))
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        txt = model.encode_text(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(img, img_ref, atol=1e-6) and torch.allclose(txt, txt_ref, atol=1e-6)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and (model.image_size, model.max_len) == (32, 32)
    settings = ev.clip_settings(str(hf_dir))                            # what a script's --init-clip uses
    assert settings == {"image_size": 32, "max_len": 32, "embed_dim": 16, "tokenizer": str(hf_dir)}
    assert data.build_tokenizer(data.DataArgs(tokenizer=settings["tokenizer"]))(texts)["input_ids"] == \
        tokenizer(texts)["input_ids"]
    parts = ev.load_clip_parts(str(hf_dir))
    visual, text, image_proj, text_proj, logit_scale = parts[:5]
    assert (visual.out_dim, text.out_dim, parts.embed_dim) == (32, 32, 16)
    assert image_proj.bias is None and logit_scale == pytest.approx(ref.logit_scale.item())
    with torch.no_grad():
        assert torch.allclose(F.normalize(text_proj(text(tok["input_ids"], tok["attention_mask"])), dim=-1), txt_ref,
                              atol=1e-6)


def test_siglip_gives_its_own_features(tmp_path, one_thread):
    """SigLIP: its preprocessing (square resize, mean = std = 0.5) reached from the project's normalization, and
    its captions padded to the full length, unmasked, as in its training."""
    siglip = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
    tokenizer = data.word_tokenizer("a red square blue photo".split())
    torch.manual_seed(0)
    ref = transformers.SiglipModel(tiny_config(transformers.SiglipConfig, tokenizer, max_len=16)).eval()
    ref.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    siglip.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model, tokenizer, transform = ev.load_hf_clip(str(tmp_path))
    images = [Image.new("RGB", (40, 50), (200, 30, 40)), Image.new("RGB", (30, 30), (20, 30, 240))]
    texts = ["a red square", "blue photo"]
    with torch.no_grad():
        px = siglip.SiglipImageProcessorPil.from_pretrained(tmp_path)(images=images, return_tensors="pt")
        img_ref = F.normalize(ev._pooled(ref.get_image_features(pixel_values=px["pixel_values"])), dim=-1)
        full = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
        txt_ref = F.normalize(ev._pooled(ref.get_text_features(input_ids=full)), dim=-1)
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        assert torch.allclose(model.encode_image(torch.stack([transform(i) for i in images])), img_ref, atol=1e-6)
        assert torch.allclose(model.encode_text(tok["input_ids"], tok["attention_mask"]), txt_ref, atol=1e-6)
    assert model.max_len == 16 and not torch.allclose(txt_ref, F.normalize(
        ev._pooled(ref.get_text_features(input_ids=tok["input_ids"])), dim=-1), atol=1e-3)   # padding matters


def test_missing_model_says_what_to_download(hf_dir, tmp_path):
    with pytest.raises(OSError, match=r"(?s)no local folder.*download it once with network access.*save_pretrained"):
        ev.load_hf_clip(str(tmp_path / "clip-vit-base-patch32"))
    shutil.copytree(hf_dir, tmp_path / "no-preprocessing", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    with pytest.raises(OSError, match=r"the image preprocessing \(preprocessor_config.json\) of .*Give a local folder"):
        ev.load_hf_clip(str(tmp_path / "no-preprocessing"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="expected a CLIP or SigLIP model"):
        ev.load_clip_parts(str(tmp_path / "bert"))


# ----------------------------------------------------------------------------------------------
# eval.py --clip on every protocol, next to a run, and export
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def class_folder(tmp_path, imgs):
    """An ImageFolder of 3 classes x 5 solid-colour JPEGs, and --classnames / --templates files for it."""
    for ci, colour in enumerate(COLOURS):
        for j in range(5):
            imgs.jpeg(tmp_path / "colours" / f"c{ci}" / f"{j}.jpg", tuple(max(0, v - 9 * j) for v in colour))
    (tmp_path / "names.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return tmp_path


@pytest.fixture
def scratch_run(tmp_path, tokenizer):
    """A run folder as clip_base.py writes it (checkpoint.pt, tokenizer/) of a tiny from-scratch CLIP."""
    import clip_base
    args = clip_base.Args(image_size=32, cnn_width=8, text_width=32, text_layers=1, embed_dim=16, num_workers=0)
    torch.manual_seed(1)
    model = clip_base.build_model(args, tokenizer)
    run = tmp_path / "scratch-run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "args": dataclasses.asdict(args), "script": "clip_base", "step": 0},
               run / "checkpoint.pt")
    tokenizer.save_pretrained(run / "tokenizer")
    return run, model


def table_row(out, name) -> dict:
    """{column: value} of the row `name` of the Markdown table eval.main printed."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next(line for line in lines if line.startswith(f"| {name} |"))
    return dict(zip(heads[1:], (c.strip() for c in row.strip("|").split("|")[1:])))


def test_clip_cli_equals_direct_transformers_metrics(hf_dir, karpathy_dir, class_folder, scratch_run, capsys,
                                                     one_thread):
    run, _ = scratch_run
    classify = f"folder={class_folder / 'colours'}"
    overrides = {"data": "karpathy", "data_root": str(karpathy_dir), "num_workers": 0,
                 "classnames": str(class_folder / "names.txt"), "templates": str(class_folder / "templates.txt")}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()] + [f"--classify={classify}"]
    ev.main(["--clip", str(hf_dir), str(run), "--device", "cpu", *flags])
    out = capsys.readouterr().out
    got = ev.evaluate_pretrained(str(hf_dir), ev.build_parser().parse_args(["--clip", str(hf_dir), *flags]),
                                 dict(overrides, classify=classify), "cpu")

    # the same numbers another way: the processor, get_*_features, the prompts written out by hand
    suite = data.build_eval_suite(data.DataArgs(data="karpathy", data_root=str(karpathy_dir), num_workers=0,
                                                classify=classify))
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model, proc = tiny_clip(tokenizer), CLIPImageProcessorPil.from_pretrained(hf_dir)

    def feats(ps):
        return hf_features(model, proc, tokenizer, [ps.load_image(i) for i in range(len(ps))], ps.texts)
    ps = suite.retrieval
    img, txt = feats(ps)
    want = {f"retrieval/{k}": v for k, v in ev.retrieval_metrics(img, txt, ps.txt2img).items()}
    want.update({f"structure/{k}": v for k, v in ev.structure_metrics(img, txt, ps.txt2img).items()})
    ls = suite.zeroshot["colours"]
    prompts = [[f"a photo of a {c}.", f"a {c} square , a block"] for c in CLASSNAMES]
    _, w = hf_features(model, proc, tokenizer, [], sum(prompts, []))
    w = F.normalize(w.view(3, 2, -1).mean(1), dim=-1)
    clip, clip_tokenizer, _ = ev.load_hf_clip(str(hf_dir))            # the class names and prompts the CLI used
    used = data.build_eval_suite(data.DataArgs(**dict(overrides, classify=classify))).zeroshot["colours"]
    assert torch.allclose(ev.zeroshot_classifier(clip, clip_tokenizer, used.classnames, used.templates, "cpu", 32),
                          w, atol=1e-6)
    want.update({f"zeroshot/colours/{k}": v for k, v in
                 ev.zeroshot_metrics(feats(ls.images)[0], w, ls.images.labels["colours"]).items()})
    task = suite.probes["colours"]
    probe = [t for p in (task.train, task.val, task.test) for t in (feats(p)[0], p.labels["colours"])]
    want["probe/colours/z/acc"] = ev.linear_probe(*probe, 3)["acc"]

    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-4 if k.startswith("structure") else 1e-6), k
    row = table_row(out, str(hf_dir))                                    # what the command printed
    for k, v in want.items():
        head = k.split("/", 1)[1] if k.startswith(("retrieval/", "structure/")) else k
        if head in row:
            assert row[head] == f"{v:.2f}", k
    assert "zeroshot/colours/top1" in row and "probe/colours/z/acc" in row and "i2t_R@1" in row
    assert re.search(r"^\| scratch-run \| [-0-9.]+ \|", out, re.M)    # the run is a row of the same table


def test_open_clip_cli_equals_direct_open_clip(tmp_path, karpathy_dir, capsys, one_thread):
    open_clip = pytest.importorskip("open_clip", reason="--open-clip needs open_clip_torch (optional)")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                             "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "tiny-oc.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-oc.json")
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms("tiny-oc")
    torch.save(model.state_dict(), tmp_path / "weights.pt")              # a local checkpoint: no download
    spec, overrides = f"tiny-oc:{tmp_path / 'weights.pt'}", {"data": "karpathy", "data_root": str(karpathy_dir),
                                                            "num_workers": 0}
    ev.main(["--open-clip", spec, "--device", "cpu"] + [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()])
    got = ev.evaluate_pretrained(spec, ev.build_parser().parse_args([]), overrides, "cpu", ev.load_open_clip)
    ps = data.build_eval_suite(data.DataArgs(**overrides)).retrieval
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([transform(ps.load_image(i)) for i in range(len(ps))])), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer("tiny-oc")(ps.texts)), dim=-1)
    want = ev.retrieval_metrics(img, txt, ps.txt2img)
    assert {k: got[f"retrieval/{k}"] for k in want} == pytest.approx(want, abs=1e-6)
    assert got["structure/matched_cosine"] == pytest.approx((img[ps.txt2img] * txt).sum(1).mean().item(), abs=1e-5)
    assert f"| {spec} | " in capsys.readouterr().out


def test_open_clip_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        ev.load_open_clip("ViT-B-32:laion2b_s34b_b79k")


def test_export_clip_layout_loads_in_transformers(hf_dir, tmp_path, one_thread):
    """A model in the scripts' CLIP layout around pretrained towers (what --init-clip builds), with an extra
    head like sep.py's, changed by 'training': the export is a CLIPModel folder with the same features."""
    model, tokenizer, _ = ev.load_hf_clip(str(hf_dir))
    model.image_proj_i = torch.nn.Linear(32, 16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ev.export_model(model, tokenizer, tmp_path / "out", "sep", {"init_clip": str(hf_dir)})
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    px = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(["a red square", "sky"], padding=True,
                                                                       return_tensors="pt")
    with torch.no_grad():
        img, txt = ev._pooled(hf.get_image_features(pixel_values=px)), ev._pooled(hf.get_text_features(**tok))
        assert torch.equal(F.normalize(img, dim=-1), model.encode_image(px))
        assert torch.equal(F.normalize(txt, dim=-1), model.encode_text(tok["input_ids"], tok["attention_mask"]))
    assert hf.logit_scale.item() == model.logit_scale.item()
    state, script, args = ev.load_export(tmp_path / "out")
    assert (script, args) == ("sep", {"init_clip": str(hf_dir)}) and state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    from safetensors.torch import load_file
    assert list(load_file(tmp_path / "out" / "project_model.safetensors")) == ["image_proj_i.bias",
                                                                                "image_proj_i.weight"]
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()


def test_export_from_scratch_run_round_trips(scratch_run, tmp_path, capsys):
    run, model = scratch_run
    ev.main([str(run), "--export", str(tmp_path / "exp")])
    assert str(tmp_path / "exp") in capsys.readouterr().out
    state, script, args = ev.load_export(tmp_path / "exp")
    assert script == "clip_base" and args["embed_dim"] == 16 and state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again, tok, _, _ = ev.load_run(tmp_path / "exp", "cpu")              # eval.py reads an export like a run
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert tok("a red square")["input_ids"] == transformers.AutoTokenizer.from_pretrained(
        run / "tokenizer")("a red square")["input_ids"]
    meta = json.loads((tmp_path / "exp" / "project.json").read_text())
    assert not meta["hf_clip"] and not (tmp_path / "exp" / "config.json").exists()
    meta["script"] = "os"                                                # never imports another module
    (tmp_path / "exp" / "project.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not one of clip_base"):
        ev.load_run(tmp_path / "exp", "cpu")
    with pytest.raises(SystemExit):
        ev.main([str(run), str(run), "--export", str(tmp_path / "two")])


# ----------------------------------------------------------------------------------------------
# Live curves
# ----------------------------------------------------------------------------------------------
ROWS = [{"step": 2, "loss": 1.5, "lr": 1e-3, "note": "text", "flag": True},
        {"step": 4, "val/score": 40.0, "val/retrieval/rsum": 120.5},
        {"step": 6, "loss": 1.0, "lr": 5e-4}]


def test_reporter_tensorboard_writes_every_numeric_key(tmp_path):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rep = ev.open_reporter("tensorboard", tmp_path)
    for r in ROWS:
        rep.log(r)
    rep.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    want = {}
    for r in ROWS:
        for k, v in r.items():
            if k != "step" and type(v) in (int, float):
                want.setdefault(k, []).append((r["step"], v))
    assert sorted(acc.Tags()["scalars"]) == sorted(want) == ["loss", "lr", "val/retrieval/rsum", "val/score"]
    for k, pts in want.items():
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(k)] == pts, k


def test_reporter_none_and_errors(tmp_path, monkeypatch):
    rep = ev.open_reporter("", tmp_path)
    rep.log(ROWS[0])
    rep.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="choose tensorboard or wandb"):
        ev.open_reporter("mlflow", tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # as if tensorboard were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        ev.open_reporter("tensorboard", tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        ev.open_reporter("wandb", tmp_path)


# ----------------------------------------------------------------------------------------------
# Class-name and template files
# ----------------------------------------------------------------------------------------------
def test_classnames_and_templates_files(class_folder):
    args = data.DataArgs(image_size=32, num_workers=0, classnames=str(class_folder / "names.txt"),
                         templates=str(class_folder / "templates.txt"))
    suite = data.folder_suite(str(class_folder / "colours"), args)
    zs = suite.zeroshot["colours"]
    assert zs.classnames == CLASSNAMES and suite.probes["colours"].classes == CLASSNAMES
    assert zs.templates == ["a photo of a {}.", "a {} square , a block"]
    plain = data.folder_suite(str(class_folder / "colours"), data.DataArgs(image_size=32, num_workers=0))
    assert plain.zeroshot["colours"].classnames == ["c0", "c1", "c2"]
    assert plain.zeroshot["colours"].templates == data.CLASSIFY_TEMPLATES


@pytest.mark.parametrize("names, templates, error", [
    (["a", "b"], None, r"lists 2 class names, but the dataset has 3 classes"),
    (["", "  "], None, r"names.txt' is empty"),
    (None, ["a photo of a cat."], r"line 1 'a photo of a cat.': a template needs exactly one \{\}"),
    (None, ["a {}.", "a {0} and {x}"], r"line 2 'a \{0\} and \{x\}'"),
    (None, ["a {} {"], r"line 1"),
    (None, ["a {} and a {}"], r"exactly one"),
])
def test_classnames_and_templates_errors(class_folder, names, templates, error):
    if names is not None:
        (class_folder / "names.txt").write_text("\n".join(names))
    if templates is not None:
        (class_folder / "templates.txt").write_text("\n".join(templates))
    args = data.DataArgs(image_size=32, num_workers=0, classnames=str(class_folder / "names.txt"),
                         templates=str(class_folder / "templates.txt"))
    with pytest.raises(ValueError, match=error):
        data.folder_suite(str(class_folder / "colours"), args)


def test_missing_classnames_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--classnames .*no such file"):
        data.read_classnames(str(tmp_path / "none.txt"))
    with pytest.raises(FileNotFoundError, match="--templates .*no such file"):
        data.read_templates(str(tmp_path / "none.txt"))


# ----------------------------------------------------------------------------------------------
# The two-tower scripts from a pretrained CLIP (--init-clip), --report-to, --init-from
# ----------------------------------------------------------------------------------------------
INIT_CLIP_FLAGS = ["--synth-train", "64", "--steps", "3", "--batch-size", "8", "--log-every", "1", "--warmup", "1",
                   "--probe-train", "32", "--max-eval", "16", "--num-workers", "0", "--lr", "1e-3"]


@pytest.mark.parametrize("script", ["clip_base", "sep", "bridge", "geocons"])
def test_init_clip_trains_the_pretrained_towers_with_the_scripts_loss(script, hf_dir, tmp_path, one_thread):
    """The run takes the model's sizes and tokenizer, starts from its weights (the first logged temperature is the
    model's), trains them (the features move), and its export loads in transformers with the run's features."""
    import importlib
    mod = importlib.import_module(script)
    run = mod.main([*INIT_CLIP_FLAGS, "--init-clip", str(hf_dir), "--image-size", "64", "--out", str(tmp_path)])
    saved = json.load(open(f"{run}/args.json"))
    assert (saved["image_size"], saved["max_len"], saved["embed_dim"]) == (32, 32, 16)    # the model's, not 64
    trained, tok, args, _ = ev.load_run(run, "cpu")
    start, _, _ = ev.load_hf_clip(str(hf_dir))
    px = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(trained.encode_image(px), start.encode_image(px), atol=1e-4)    # trained
    terms = [k for k in json.loads(open(f"{run}/log.jsonl").readline()) if k.startswith("loss_")]
    assert {"sep": "loss_sep", "bridge": "loss_bridge", "geocons": "loss_gc"}.get(script, "loss_con") in terms
    if script == "sep":                                                    # its own fresh heads come along
        assert "image_proj_i.weight" in trained.state_dict()
    ev.main([run, "--export", str(tmp_path / "exp")])
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "exp").eval()
    with torch.no_grad():
        assert torch.allclose(F.normalize(ev._pooled(hf.get_image_features(pixel_values=px)), dim=-1),
                              trained.encode_image(px), atol=1e-6)


def test_report_to_tensorboard_mirrors_the_log(hf_dir, tmp_path, one_thread):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import clip_base
    from tiny import tiny_args
    run = clip_base.main(tiny_args(tmp_path, "--steps", 4, "--eval-every", 2, "--report-to", "tensorboard"))
    rows = [json.loads(line) for line in open(f"{run}/log.jsonl")]
    acc = EventAccumulator(str(run)).Reload()
    for row in rows:                                   # every numeric value of every row, training and val/...
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                events = {e.step: e.value for e in acc.Scalars(key)}
                assert events[row["step"]] == pytest.approx(value, rel=1e-6), key


def test_init_from_an_export_starts_from_its_weights(scratch_run, tmp_path, capsys, one_thread):
    import clip_base
    from tiny import tiny_args
    run, model = scratch_run
    ev.main([str(run), "--export", str(tmp_path / "exp")])
    flags = tiny_args(tmp_path / "runs", "--steps", 1, "--lr", 1e-12, "--warmup", 1, "--init-from", tmp_path / "exp")
    new = clip_base.main(flags)
    state = ev.load_checkpoint(f"{new}/checkpoint.pt")["model"]
    assert all(torch.allclose(state[k].float(), v.float(), atol=1e-6) for k, v in model.state_dict().items()
               if "running_" not in k and "num_batches" not in k)
    with pytest.raises(SystemExit) as e:
        import sep
        sep.main(tiny_args(tmp_path / "runs2", "--init-from", tmp_path / "exp"))
    assert e.value.code == 2 and "holds a run of clip_base.py, not sep.py" in capsys.readouterr().err
