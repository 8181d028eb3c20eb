"""Every dataset, tokenizer and augmentation the method scripts use.

Contents, top to bottom:

1. Command-line flags: `DataArgs` (the data flags every script shares) and `parse_args`, which
   turns any `@dataclass` of flags into an argparse parser whose `--help` shows each field's doc.
2. `PairSet`: images with several captions each, the one structure every loader returns, and
   `EvalSuite` / `LabelSet` / `ProbeTask`: what `eval.py` measures (retrieval, zero-shot, probes).
3. The synthetic benchmark (the offline default): procedurally drawn shapes with five captions each,
   generated on the fly from (seed, split, index). See `SYNTH_*` tables and `SynthPairSet`.
4. Real data loaders: Karpathy split JSON (COCO / Flickr30k / Flickr8k), ALBEF JSON lists,
   img2dataset / webdataset output (tar shards or extracted folders), CSV/TSV, ImageFolder, CIFAR.
   Indexing reads no image: tar headers are parsed in parallel over shards, a folder is walked once.
   Broken inputs are skipped, counted and reported once: at start, what needs no decoding (a missing
   file, an empty caption, a caption without its image); evaluation images are also decoded at start;
   training images are decoded when a batch first needs them (a failure is substituted and counted in
   the batch's "skipped"), or all at start with --verify-images. Image paths that resolve outside
   --data-root (symlinks followed) are skipped and counted too, unless --allow-outside-root. An annotation
   file of the wrong shape, or a split the run evaluates without any image (`check_eval_suite`), is one
   error at start naming the file and the layout expected.
5. Tokenizers: any Hugging Face name or directory, or a word-level vocabulary generated offline
   (from the synthetic word list, or from the training captions of a real dataset).
6. Augmentations: image train / second-view / eval transforms, and EDA for text. The training
   transforms end in uint8 tensors; `to_device` normalizes them on the device the model runs on.
7. Training input pipeline: `TrainPairs` + `StepSampler` (deterministic by (seed, step), so a
   resumed run sees exactly the batches an uninterrupted run would) + `Collate` + `train_loader`
   (persistent workers that ignore Ctrl-C; `loader.close()` stops them) + `to_device`.
8. `python data.py export --out DIR` writes the synthetic benchmark in the Karpathy layout;
   `python data.py bench` measures the generator's images/s.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import colorsys
import csv
import contextlib
import dataclasses
import gc
import glob
import inspect
import io
import json
import math
import multiprocessing
import multiprocessing.util  # its exit handler is registered before _close_loaders' (atexit runs them in reverse)
import os
import random
import re
import signal
import sys
import tarfile
import tempfile
import textwrap
import time
import weakref
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFile
from torch.utils.data import DataLoader, Dataset, Sampler


# ----------------------------------------------------------------------------------------------
# 1. Flags
# ----------------------------------------------------------------------------------------------
@dataclass
class DataArgs:
    data: str = "synthetic"
    """dataset: synthetic | karpathy | albef | wds | csv"""
    data_root: str = ""
    """folder holding the images (and the annotation file); ignored for synthetic"""
    ann_file: str = ""
    """annotation file (karpathy/albef JSON, CSV/TSV); default: looked up in --data-root"""
    image_col: str = "filepath"
    """CSV/TSV column holding the image path (relative to --data-root)"""
    caption_col: str = "title"
    """CSV/TSV column holding the caption"""
    allow_outside_root: bool = False
    """use image paths (and, in a webdataset folder, symlinked files) that resolve outside --data-root; by
    default they are skipped and counted"""
    max_samples: int = 0
    """use a deterministic subset of this many training images (0 = all)"""
    max_eval: int = 0
    """evaluate retrieval on at most this many images of the evaluation split (0 = all)"""
    eval_split: str = "test"
    """split that retrieval, zero-shot and the probes' held-out part use: test | val"""
    verify_images: bool = False
    """decode every training image at start and drop unreadable ones (default: decode when first used,
    substituting and counting failures)"""
    image_size: int = 32
    """input resolution in pixels (the synthetic images are drawn at this size)"""
    max_len: int = 32
    """maximum caption length in tokens"""
    tokenizer: str = "auto"
    """'auto' (offline word vocabulary built from the data) or a Hugging Face name / local folder"""
    num_workers: int = -1
    """DataLoader worker processes (-1 = auto: min(CPU cores - 1, 8); 0 = load in the main process)"""
    classify: str = ""
    """extra zero-shot + probe benchmarks, comma-separated: cifar10=DIR, cifar100=DIR, folder=DIR"""
    data_seed: int = 0
    """seed of the synthetic benchmark (fixed, so runs with different --seed share one test set)"""
    synth_train: int = 50000
    """synthetic: number of training images"""
    synth_texture_contrast: float = 0.18
    """synthetic: contrast of the image-only background texture (0 = invisible, 1 = black/white)"""
    probe_train: int = 2000
    """training images used to fit the linear probes"""
    classnames: str = ""
    """zero-shot class names file for --classify / --zeroshot-folder, one per line in class order (sorted
    folder names; CIFAR's class order), as CLIP_benchmark's; default: the folder names"""
    templates: str = ""
    """zero-shot prompt templates file, one per line with one {} where the class name goes (CLIP_benchmark's
    {c} is read as {}); default: four 'a photo of a {}.'-style templates"""
    allow_repeats: bool = False
    """allow a --batch-size larger than the training set (a batch then holds some images twice: false
    negatives for a contrastive loss)"""
    synth_hard: bool = False
    """synthetic: the harder variant, for long budgets where the default saturates: every object drawn at
    SYNTH_HARD_SCALE of its size, and SYNTH_HARD_DISTRACTORS tiny unnamed objects (any shape and colour) under
    the named ones; captions and labels unchanged (off: the default data, bit-identical)"""


def _field_docs(cls) -> dict:
    """Docstrings written under dataclass fields (CleanRL style), read from the source with `ast`."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls, defaults=True) -> argparse.ArgumentParser:
    """One `--flag-name` per field of `cls`; bools become `--flag/--no-flag`.

    With defaults=False every default is argparse.SUPPRESS, so only flags the user gave appear.
    """
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=default if defaults else argparse.SUPPRESS,
                  help=f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%"))
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=type(default), **kw)
    return parser


def parse_args(cls, argv=None):
    """Parse the command line into an instance of the dataclass `cls` (its docstring is the help), then check
    every flag against FLAG_RULES: a value out of range stops here, before any data is read, with a one-line
    error naming the flag (exit status 2, as argparse's own errors)."""
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                                     epilog=RESUME_HELP)
    args = cls(**vars(add_dataclass_args(parser, cls).parse_args(argv)))
    check_flags(args)
    return args


def flag_error(message):
    """Stop with a one-line error about the command line: exit status 2, as argparse's own errors."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _at_least(low):
    return f"≥ {low}", lambda v: v >= low


def _above(low):
    return f"> {low}", lambda v: v > low


def _within(low, high):
    return f"in [{low}, {high}]", lambda v: low <= v <= high


def _one_of(*choices):
    return "one of " + ", ".join(choices), lambda v: v in choices


# What each flag allows (only the flags a script has are checked). Zero means "off" or "all" where the flag's
# help says so; a negative count never means anything.
FLAG_RULES = {
    # data
    "max_samples": _at_least(0), "max_eval": _at_least(0), "image_size": _at_least(8), "max_len": _at_least(3),
    "num_workers": _at_least(-1), "synth_train": _at_least(1), "synth_texture_contrast": _within(0, 1),
    "probe_train": _at_least(1), "eval_split": _one_of("test", "val"),
    "data": _one_of("synthetic", "karpathy", "albef", "wds", "csv"),
    # training
    "precision": _one_of("fp32", "bf16", "fp16"), "steps": _at_least(1), "epochs": _at_least(0),
    "batch_size": _at_least(2), "lr": _above(0), "warmup": _at_least(0), "weight_decay": _at_least(0),
    "log_every": _at_least(1), "save_every": _at_least(0), "save_minutes": _at_least(0),
    "eval_every": _at_least(0), "stop_at": _at_least(0),
    # encoders
    "cnn_width": _at_least(1), "text_layers": _at_least(1), "text_width": _at_least(1), "embed_dim": _at_least(1),
    "vit_patch": _at_least(1), "vit_width": _at_least(1), "vit_depth": _at_least(1), "vit_heads": _at_least(1),
    "fusion_layers": _at_least(1), "text_heads": _at_least(1), "dropout": _within(0, 0.99),
    # the methods' own weights and constants
    "sep_weight": _at_least(0), "sep_con_weight": _at_least(0), "bridge_weight": _at_least(0),
    "bridge_t": _within(0, 1), "gc_weight": _at_least(0), "queue_size": _at_least(0), "momentum": _within(0, 1),
    "alpha": _within(0, 1), "alpha_ramp": _at_least(0), "temp": _within(0.001, 0.5), "mlm_prob": _within(0.01, 1),
    "itm_k": _at_least(0), "codebook_size": _at_least(1), "code_temp": _above(0), "ipot_beta": _above(0),
    "ipot_outer": _at_least(1), "ipot_inner": _at_least(1), "code_weight": _at_least(0),
    "plan_features": _one_of("teacher", "student"), "pool": _one_of("mean", "cls"),
    "vit_stem": _one_of("conv", "linear"), "dist_timeout": _above(0), "report_to": _one_of("", "tensorboard", "wandb"),
}


def check_flags(args):
    """Every flag in its range (FLAG_RULES), then the combinations no single range can say."""
    for name, value in vars(args).items():
        if name in FLAG_RULES:
            allowed, ok = FLAG_RULES[name]
            if not ok(value):
                shown = f"{value:g}" if isinstance(value, float) else value
                flag_error(f"--{name.replace('_', '-')} {shown}: must be {allowed}")
    queue, batch = getattr(args, "queue_size", 0), getattr(args, "batch_size", 1)
    if queue % batch:  # each step replaces the oldest batch of the queue
        flag_error(f"--queue-size {queue} is not a multiple of --batch-size {batch}: each step replaces the "
                   f"oldest {batch} entries (e.g. --queue-size {max(1, round(queue / batch)) * batch})")
    patch = getattr(args, "vit_patch", 0)
    if patch and getattr(args, "vision", "") == "vit" and args.image_size % patch:
        flag_error(f"--image-size {args.image_size} is not a multiple of --vit-patch {patch}")


# ---- --resume: which flags a resumed run takes from the command line
RESUME_SAFE = ("steps", "stop_at", "num_workers", "eval_every", "save_every", "save_minutes", "log_every",
               "device", "compile", "resume")
RESUME_HELP = ("--resume CHECKPOINT continues a run with the flags it was started with. Of the flags given with "
               "it, only these are applied: --steps (to extend the run: the cosine schedule then ends at the new "
               "step), --stop-at, --num-workers, --eval-every, --save-every, --save-minutes, --log-every, "
               "--device, --compile; any other flag whose value differs from the run's is refused (start a new "
               "run instead). A finished run is not trained again: its metrics.json is named.")


def resume_args(cls, ckpt, argv=None):
    """The flags of a resumed run: the checkpoint's, plus those of RESUME_SAFE given on the command line.
    Any other flag given with a value that differs from the run's stops here (exit status 2) with the list, so
    nothing the user typed is silently dropped."""
    given = vars(add_dataclass_args(argparse.ArgumentParser(add_help=False), cls, defaults=False)
                 .parse_known_args(argv)[0])
    run = {**ckpt["args"], "stop_at": 0}                       # --stop-at is never inherited: run to the end
    changed = [k for k, v in given.items() if k not in RESUME_SAFE and run.get(k, v) != v]
    if changed:
        flag_error("--resume continues a run with its own flags; these would change it: "
                   + ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run has {run[k]})" for k in changed)
                   + ". Drop them, or start a new run without --resume.")
    step = ckpt["step"]
    if "steps" in given:
        if given["steps"] < step:
            flag_error(f"--steps {given['steps']}: the checkpoint is at step {step} already")
        if given["steps"] != run["steps"]:
            print(f"--resume: --steps {given['steps']} (the run had {run['steps']}): the cosine schedule now "
                  f"ends at step {given['steps']}")
        run["epochs"] = 0.0                                    # --steps now counts, not the run's --epochs
    if given.get("stop_at") and given["stop_at"] <= step:
        flag_error(f"--stop-at {given['stop_at']}: the checkpoint is at step {step} already; give a later step")
    return cls(**{**run, **{k: v for k, v in given.items() if k in RESUME_SAFE or k not in run}})


# ----------------------------------------------------------------------------------------------
# 2. The shared structures
# ----------------------------------------------------------------------------------------------
class PairSet:
    """Images with one or more captions each (image-major), plus optional per-image labels.

    Subclasses implement `_load(ref) -> PIL.Image`. `refs[i]` says where image i comes from.
    """

    def __init__(self, name, refs, captions, labels=None):
        assert len(refs) == len(captions)
        self.name, self.refs, self.captions = name, list(refs), [list(c) for c in captions]
        self.labels = {k: list(v) for k, v in (labels or {}).items()}

    def __len__(self):
        return len(self.refs)

    def load_image(self, i) -> Image.Image:
        return to_rgb(self._load(self.refs[i]))

    @property
    def texts(self):
        return [c for caps in self.captions for c in caps]

    @property
    def txt2img(self):
        return [i for i, caps in enumerate(self.captions) for _ in caps]

    @property
    def img2txt(self):
        out, k = [], 0
        for caps in self.captions:
            out.append(list(range(k, k + len(caps))))
            k += len(caps)
        return out

    def subset(self, indices):
        idx = list(indices)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.refs = [self.refs[i] for i in idx]
        new.captions = [self.captions[i] for i in idx]
        new.labels = {k: [v[i] for i in idx] for k, v in self.labels.items()}
        return new

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {len(self.texts)} captions)"


@dataclass
class LabelSet:
    """One zero-shot classification task: class names, prompt templates, labelled images."""
    classnames: list
    templates: list
    images: PairSet
    target: str


@dataclass
class ProbeTask:
    """One linear-probe task on frozen features of one modality ('image' or 'text')."""
    target: str
    classes: list
    modality: str
    train: PairSet
    val: PairSet
    test: PairSet


@dataclass
class EvalSuite:
    retrieval: PairSet | None = None
    zeroshot: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)

    def merge(self, other: "EvalSuite") -> "EvalSuite":
        return EvalSuite(self.retrieval or other.retrieval, {**self.zeroshot, **other.zeroshot},
                         {**self.probes, **other.probes})


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, 16-bit: converted; RGBA/LA: composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


# ----------------------------------------------------------------------------------------------
# 3. The synthetic benchmark
# ----------------------------------------------------------------------------------------------
# Each image shows one main object (shape, colour, size, position) on a gray textured background,
# and in half of the images a tiny second object in the other half of the canvas (a relation).
#   shared attributes:  shape, colour (named in captions and drawn)
#   image-only:         background texture (drawn, never named: no caption word for it exists)
#   text-only:          material (named in every caption, never drawn)
#   held-out:           SYNTH_HELDOUT (colour, shape) pairs never appear in train; 15% of the
#                       val/test main objects use them (compositional generalization).
SYNTH_SHAPES = {"circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle"],
                "star": ["star"], "cross": ["cross", "plus"], "bar": ["bar", "rod"],
                "crescent": ["crescent", "moon"], "ring": ["ring", "hoop"]}
# colour name -> (hue in degrees, saturation); each object's hue is drawn around its centre with
# SYNTH_HUE_JITTER degrees of spread, so neighbouring names overlap a little, as in real captions
SYNTH_COLOURS = {"red": (0, 0.85), "orange": (28, 0.9), "yellow": (55, 0.85), "green": (120, 0.75),
                 "cyan": (182, 0.8), "blue": (228, 0.8), "purple": (275, 0.7), "pink": (322, 0.45)}
SYNTH_HUE_JITTER = 12.0
SYNTH_COLOUR_WORDS = {"red": ["red", "scarlet"], "orange": ["orange"], "yellow": ["yellow"],
                      "green": ["green"], "cyan": ["cyan", "turquoise"], "blue": ["blue"],
                      "purple": ["purple", "violet"], "pink": ["pink"]}
SYNTH_SIZES = {"small": (0.17, ["small", "little"]), "large": (0.27, ["large", "big"])}
SYNTH_SECOND_SIZE = 0.09          # the second object is always tiny, so the main one is the larger
SYNTH_TEXTURES = ["plain", "stripes", "dots", "checker"]
SYNTH_MATERIALS = {"wooden": ["wooden"], "metal": ["metal", "metallic"], "plastic": ["plastic"],
                   "glass": ["glass"], "paper": ["paper"]}
SYNTH_POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom"}
# relation of the main object to the second one (the second sits in the opposite half)
SYNTH_RELATIONS = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
SYNTH_HELDOUT = [("red", "star"), ("orange", "ring"), ("yellow", "circle"), ("green", "triangle"),
                 ("cyan", "square"), ("blue", "cross"), ("purple", "crescent"), ("pink", "bar")]
SYNTH_TEMPLATES = ["a {np}.", "a photo of a {np}.", "a {np} {pos}.", "there is a {np} {pos}.",
                   "{pos} there is a {np}.", "a picture of a {np}."]
SYNTH_TEMPLATES_PAIR = ["a {np} {rel} a {np2}.", "a {np2} and a {np}.", "a {np} next to a {np2}.",
                        "a picture of a {np} {rel} a {np2}."]
SYNTH_PROMPTS = {"shape": ["a {}.", "a photo of a {}.", "a picture of a {}.", "there is a {}."],
                 "colour": ["a {} object.", "a photo of a {} thing.", "there is a {} object."]}
SYNTH_SPLITS = {"train": None, "val": 1000, "test": 1000}
# --synth-hard, fixed before any run on it: objects at 60% of their size, two unnamed distractors per image
SYNTH_HARD_SCALE, SYNTH_HARD_DISTRACTORS = 0.6, 2
_SHAPE_NAMES, _COLOUR_NAMES = list(SYNTH_SHAPES), list(SYNTH_COLOURS)
_MATERIAL_NAMES, _POS_NAMES = list(SYNTH_MATERIALS), list(SYNTH_POSITIONS)


def synth_attributes(seed: int, split: str, index: int) -> dict:
    """Attributes of synthetic image `index` of `split`: a pure function of its arguments."""
    rng = random.Random(f"synth-{seed}-{split}-{index}")
    heldout = split != "train" and rng.random() < 0.15
    while True:
        colour, shape = rng.choice(_COLOUR_NAMES), rng.choice(_SHAPE_NAMES)
        if ((colour, shape) in SYNTH_HELDOUT) == heldout:
            break
    a = dict(shape=shape, colour=colour, size=rng.choice(list(SYNTH_SIZES)),
             pos=rng.choice(_POS_NAMES), texture=rng.choice(SYNTH_TEXTURES),
             material=rng.choice(_MATERIAL_NAMES), heldout=heldout, second=None)
    if rng.random() < 0.5:
        while True:
            c2, s2 = rng.choice(_COLOUR_NAMES), rng.choice(_SHAPE_NAMES)
            if (c2, s2) not in SYNTH_HELDOUT and (c2, s2) != (colour, shape):
                break
        a["second"] = (c2, s2)
    return a


def synth_captions(a: dict, seed: int, split: str, index: int, n: int = 5) -> list:
    """Five captions from varied templates and synonyms; some leave the size, colour or shape out."""
    rng = random.Random(f"caps-{seed}-{split}-{index}")
    templates = SYNTH_TEMPLATES + (SYNTH_TEMPLATES_PAIR if a["second"] else [])
    caps = []
    for t in rng.sample(templates, n):
        r = rng.random()  # 10%: no colour, 10%: no shape ("object"/"thing"), else both
        words = [rng.choice(SYNTH_SIZES[a["size"]][1])] if rng.random() < 0.5 else []
        words += [] if r < 0.1 else [rng.choice(SYNTH_COLOUR_WORDS[a["colour"]])]
        words += [rng.choice(SYNTH_MATERIALS[a["material"]])]
        words += [rng.choice(["object", "thing"]) if 0.1 <= r < 0.2 else rng.choice(SYNTH_SHAPES[a["shape"]])]
        np2 = ""
        if a["second"]:
            c2, s2 = a["second"]
            np2 = f"tiny {rng.choice(SYNTH_COLOUR_WORDS[c2])} {rng.choice(SYNTH_SHAPES[s2])}"
        caps.append(t.format(np=" ".join(words), np2=np2, pos=SYNTH_POSITIONS[a["pos"]],
                             rel=SYNTH_RELATIONS[a["pos"]]))
    return caps


def _shape_polygon(shape, cx, cy, r, rot):
    """Vertices of a polygonal shape (circle and ring are drawn as ellipses)."""
    def ring_pts(k, radius, offset=0.0):
        return [(cx + radius * math.cos(rot + offset + 2 * math.pi * i / k),
                 cy + radius * math.sin(rot + offset + 2 * math.pi * i / k)) for i in range(k)]
    if shape == "square":
        return ring_pts(4, r * 1.25, math.pi / 4)
    if shape == "triangle":
        return ring_pts(3, r * 1.3, -math.pi / 2)
    if shape == "bar":
        pts = [(-1.4 * r, -0.4 * r), (1.4 * r, -0.4 * r), (1.4 * r, 0.4 * r), (-1.4 * r, 0.4 * r)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    if shape == "star":
        outer, inner = ring_pts(5, r * 1.35, -math.pi / 2), ring_pts(5, r * 0.55, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        w = r * 0.38
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(shape)


def _draw_shape(img, shape, cx, cy, r, fill, rot):
    """Paint one shape: drawn as a mask first, so holes (ring, crescent) show the textured background."""
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse([cx - 1.1 * r, cy - 1.1 * r, cx + 1.1 * r, cy + 1.1 * r], fill=255)
        if shape == "ring":
            draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
        elif shape == "crescent":  # a disc with an offset disc cut out of it
            ox, oy = cx + 0.6 * r * math.cos(rot), cy + 0.6 * r * math.sin(rot) - 0.2 * r
            draw.ellipse([ox - 0.95 * r, oy - 0.95 * r, ox + 0.95 * r, oy + 0.95 * r], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, rot), fill=255)
    img.paste(fill, mask=mask)


def synth_render(a: dict, size: int, seed: int, split: str, index: int, texture_contrast: float,
                 hard: bool = False) -> Image.Image:
    """Draw the image of attributes `a` (the material is deliberately not drawn). hard: the --synth-hard
    variant (smaller objects, unnamed distractors drawn from a random stream of their own, so that the
    default images do not change)."""
    rng = random.Random(f"render-{seed}-{split}-{index}")
    S = 2 * size  # draw at 2x and downsample: cheap anti-aliasing
    base = rng.randint(95, 165)
    img = Image.new("RGB", (S, S), (base,) * 3)
    draw = ImageDraw.Draw(img)
    delta = int(round(255 * texture_contrast)) * rng.choice([-1, 1])
    tex = (max(0, min(255, base + delta)),) * 3
    step = S / rng.uniform(5.0, 7.0)
    if a["texture"] == "stripes":
        for k in range(-S, 2 * S, int(step)):
            draw.line([(k, 0), (k + S * 0.5, S)], fill=tex, width=max(1, int(step / 3)))
    elif a["texture"] == "dots":
        rd = step / 6
        for x in range(int(step / 2), S, int(step)):
            for y in range(int(step / 2), S, int(step)):
                draw.ellipse([x - rd, y - rd, x + rd, y + rd], fill=tex)
    elif a["texture"] == "checker":
        st = int(step)
        for i, x in enumerate(range(0, S, st)):
            for j, y in enumerate(range(0, S, st)):
                if (i + j) % 2:
                    draw.rectangle([x, y, x + st - 1, y + st - 1], fill=tex)

    def colour_of(name):  # per-object jitter: colour names are a little fuzzy, as in real photos
        hue, sat = SYNTH_COLOURS[name]
        h = (hue + rng.gauss(0, SYNTH_HUE_JITTER)) % 360 / 360
        rgb = colorsys.hsv_to_rgb(h, min(1.0, sat * rng.uniform(0.85, 1.15)), rng.uniform(0.7, 1.0))
        return tuple(int(255 * v) for v in rgb)

    scale = SYNTH_HARD_SCALE if hard else 1.0
    if hard:  # distractors first, so the named objects are drawn over them
        drng = random.Random(f"distract-{seed}-{split}-{index}")
        for _ in range(SYNTH_HARD_DISTRACTORS):
            hue = SYNTH_COLOURS[drng.choice(_COLOUR_NAMES)][0] / 360
            fill = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, drng.uniform(0.5, 0.9), drng.uniform(0.7, 1.0)))
            _draw_shape(img, drng.choice(_SHAPE_NAMES), drng.uniform(0.1, 0.9) * S, drng.uniform(0.1, 0.9) * S,
                        SYNTH_SECOND_SIZE * scale * S, fill, drng.uniform(-0.3, 0.3))
    r = SYNTH_SIZES[a["size"]][0] * scale * S
    # the main object sits in the half named by its position, the second one in the other half
    jit = lambda: rng.uniform(-0.06, 0.06) * S
    centre = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    cx, cy = [v * S for v in centre[a["pos"]]]
    if a["pos"] in ("left", "right"):
        cy += jit() * 2
    else:
        cx += jit() * 2
    cx, cy = cx + jit(), cy + jit()
    _draw_shape(img, a["shape"], cx, cy, r, colour_of(a["colour"]), rng.uniform(-0.3, 0.3))
    if a["second"]:
        c2, s2 = a["second"]
        ox, oy = [v * S for v in centre[opposite[a["pos"]]]]
        _draw_shape(img, s2, ox + jit(), oy + jit(), SYNTH_SECOND_SIZE * scale * S, colour_of(c2),
                    rng.uniform(-0.3, 0.3))
    img = img.resize((size, size), Image.BILINEAR)
    # mild sensor noise so the texture is not trivially readable from a single pixel
    noise = torch.Generator().manual_seed(rng.getrandbits(62))
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float()
    t = (t + torch.randn(t.shape, generator=noise) * 6).clamp(0, 255).to(torch.uint8)
    return Image.frombytes("RGB", (size, size), t.numpy().tobytes())


class SynthPairSet(PairSet):
    """One split of the synthetic benchmark; images are drawn on the fly when loaded."""

    def __init__(self, split, n, size=64, seed=0, texture_contrast=0.18, hard=False):
        attrs = [synth_attributes(seed, split, i) for i in range(n)]
        caps = [synth_captions(a, seed, split, i) for i, a in enumerate(attrs)]
        labels = {"shape": [_SHAPE_NAMES.index(a["shape"]) for a in attrs],
                  "colour": [_COLOUR_NAMES.index(a["colour"]) for a in attrs],
                  "object": [_COLOUR_NAMES.index(a["colour"]) * len(_SHAPE_NAMES) + _SHAPE_NAMES.index(a["shape"])
                             for a in attrs],
                  "texture": [SYNTH_TEXTURES.index(a["texture"]) for a in attrs],
                  "material": [_MATERIAL_NAMES.index(a["material"]) for a in attrs],
                  "heldout": [int(a["heldout"]) for a in attrs]}
        super().__init__(f"synthetic-{split}", [(split, i) for i in range(n)], caps, labels)
        self.attrs, self.size, self.seed, self.texture_contrast = attrs, size, seed, texture_contrast
        self.hard = hard

    def load_image(self, i):
        split, index = self.refs[i]
        return synth_render(self.attrs[i], self.size, self.seed, split, index, self.texture_contrast, self.hard)

    def subset(self, indices):
        idx = list(indices)
        new = super().subset(idx)
        new.attrs = [self.attrs[i] for i in idx]
        return new


def synth_vocabulary() -> list:
    """Every word the synthetic captions and prompts can contain (plus the EDA table's words)."""
    text = " ".join(SYNTH_TEMPLATES + SYNTH_TEMPLATES_PAIR + sum(SYNTH_PROMPTS.values(), [])
                    + list(SYNTH_POSITIONS.values()) + list(SYNTH_RELATIONS.values()))
    words = set(_words(text.replace("{np}", "").replace("{np2}", "").replace("{pos}", "").replace("{rel}", "")
                       .replace("{}", "")))
    for table in (SYNTH_SHAPES, SYNTH_COLOUR_WORDS, SYNTH_MATERIALS):
        words |= {w for ws in table.values() for phrase in ws for w in phrase.split()}
    words |= {w for _, ws in SYNTH_SIZES.values() for w in ws} | {"tiny", "object", "thing"}
    words |= set(_words(" ".join(_COLOUR_NAMES + _SHAPE_NAMES)))
    words |= {w for group in EDA_SYNONYMS for phrase in group for w in phrase.split()}
    return sorted(words)


def synthetic_suite(args, split: str = "test", with_train: bool = True) -> tuple:
    """(train PairSet or None, EvalSuite on `split`) of the synthetic benchmark for `args` (a DataArgs).

    split="test": retrieval, zero-shot and the probes' held-out part use the test split (at most
    --max-eval images); the probes choose their weight decay on the val split.
    split="val" (validation while training, the test split untouched): retrieval and zero-shot use the
    val split (at most --max-eval images); the probes choose their weight decay on the val images of
    even index and report on those of odd index among the evaluated ones, so the two never overlap.
    with_train=False skips building the training set (its first --probe-train images are built alone).
    """
    split = check_eval_split(split)
    kw = dict(size=args.image_size, seed=args.data_seed, texture_contrast=args.synth_texture_contrast,
              hard=getattr(args, "synth_hard", False))
    n_train = args.max_samples or args.synth_train
    train = SynthPairSet("train", n_train, **kw) if with_train else None
    val = SynthPairSet("val", SYNTH_SPLITS["val"], **kw)
    ev = SynthPairSet(split, SYNTH_SPLITS[split], **kw) if split != "val" else val
    if args.max_eval:
        ev = ev.subset(range(min(args.max_eval, len(ev))))
    probe_val, probe_test = (val, ev) if split != "val" else (_half(val, 0), _half(ev, 1))
    seen = ev.subset([i for i, h in enumerate(ev.labels["heldout"]) if not h])
    held = ev.subset([i for i, h in enumerate(ev.labels["heldout"]) if h])
    objects = [f"{c} {s}" for c in _COLOUR_NAMES for s in _SHAPE_NAMES]
    zeroshot = {"shape": LabelSet(_SHAPE_NAMES, SYNTH_PROMPTS["shape"], ev, "shape"),
                "colour": LabelSet(_COLOUR_NAMES, SYNTH_PROMPTS["colour"], ev, "colour"),
                "object": LabelSet(objects, SYNTH_PROMPTS["shape"], seen, "object"),
                "object_heldout": LabelSet(objects, SYNTH_PROMPTS["shape"], held, "object")}
    n_probe = min(args.probe_train, n_train)
    probe_train = train.subset(range(n_probe)) if train is not None else SynthPairSet("train", n_probe, **kw)
    classes = {"shape": _SHAPE_NAMES, "colour": _COLOUR_NAMES, "texture": SYNTH_TEXTURES,
               "material": _MATERIAL_NAMES}
    modality = {"shape": "image", "colour": "image", "texture": "image", "material": "text"}
    probes = {t: ProbeTask(t, classes[t], modality[t], probe_train, probe_val, probe_test) for t in classes}
    return train, EvalSuite(ev, zeroshot, probes)


def _half(ps: PairSet, parity: int) -> PairSet:
    """The images of even (parity 0) or odd (parity 1) index: two disjoint halves of a split."""
    return ps.subset(range(parity, len(ps), 2))


def export_karpathy(out_dir, n_train=5000, n_val=1000, n_test=1000, size=64, seed=0, texture_contrast=0.18):
    """Write the synthetic benchmark to disk in the Karpathy layout (PNG files + dataset JSON)."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    images, sentid = [], 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        ps = SynthPairSet(split, n, size=size, seed=seed, texture_contrast=texture_contrast)
        for i in range(n):
            name = f"{split}_{i:06d}.png"
            ps.load_image(i).save(os.path.join(out_dir, "images", name))
            sents = [{"raw": c, "sentid": sentid + k} for k, c in enumerate(ps.captions[i])]
            sentid += len(sents)
            images.append({"filepath": "images", "filename": name, "split": split, "sentences": sents,
                           "attributes": ps.attrs[i]})
    with open(os.path.join(out_dir, "dataset_synthetic.json"), "w") as f:
        json.dump({"dataset": "synthetic", "images": images}, f)


# ----------------------------------------------------------------------------------------------
# 4. Real data
# ----------------------------------------------------------------------------------------------
DOWNLOAD_HINTS = {
    "karpathy": "a Karpathy-split JSON (dataset_coco.json / dataset_flickr30k.json / dataset_flickr8k.json, "
                "from the 'caption_datasets' archive of Karpathy & Fei-Fei's NeuralTalk) in --data-root or "
                "given by --ann-file, with the images under --data-root/<filepath>/<filename> "
                "(COCO: train2014/ and val2014/ from cocodataset.org; Flickr30k: flickr30k-images/)",
    "albef": "ALBEF-style JSON lists (e.g. coco_train.json, coco_test.json from the ALBEF repository's data "
             "archive): training entries {'image': path, 'caption': str}, evaluation entries "
             "{'image': path, 'caption': [str, ...]}; give the training file with --ann-file, image paths "
             "relative to --data-root",
    "wds": "img2dataset output (e.g. CC3M: `img2dataset --url_list cc3m.tsv --output_format webdataset`): "
           "a folder of webdataset .tar shards or of extracted {key}.jpg + {key}.txt files",
    "csv": "a CSV or TSV file (--ann-file) with an image-path column (--image-col) and a caption column "
           "(--caption-col), paths relative to --data-root",
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error we count, not a gray stripe


def missing(kind, what):
    return FileNotFoundError(f"{what} not found. --data {kind} expects {DOWNLOAD_HINTS[kind]}.")


class FilePairSet(PairSet):
    """Images referenced by path, or by (tar path, byte offset, size) inside a webdataset shard."""

    def __init__(self, name, refs, captions, labels=None, draft=0):
        super().__init__(name, refs, captions, labels)
        self.draft = draft  # decode JPEGs at reduced scale when the model input is small

    def _load(self, ref):
        if isinstance(ref, tuple):  # (tar, offset, size)
            with open(ref[0], "rb") as f:
                f.seek(ref[1])
                img = Image.open(io.BytesIO(f.read(ref[2])))
        else:
            img = Image.open(ref)
        if self.draft and img.format == "JPEG":
            img.draft("RGB", (self.draft, self.draft))
        img.load()
        return img


def _count(report: Counter, key: str, n: int):
    if n:
        report[key] += n


START_SAMPLE = 32  # training images decoded at start without --verify-images (evenly spaced)


def clean_pairs(name, refs, captions, labels=None, draft=0, verify=True, workers=8, report=None, sample=None,
                listed=False, root=None):
    """Build a FilePairSet, dropping empty captions, missing and unreadable images; report counts once.

    Always, without decoding anything: captions empty after stripping are dropped, images left without a
    caption are skipped, and so are missing files (found from one directory listing per folder, not one
    `stat` per file). verify=True: every remaining image is then opened and fully decoded (at reduced JPEG
    scale) in a thread pool, so a corrupt or truncated file is found here, and dropped. verify=False (the
    training split without --verify-images): only `sample` (default START_SAMPLE) evenly spaced images are
    decoded now (an unreadable one is dropped; all of them unreadable is an error, see `_require_images`),
    the others when a batch first needs them (`TrainPairs` substitutes and counts any that fail then).
    `report`: counts the caller already made (e.g. a caption file without its image), merged in.
    listed=True: the refs were just found by listing their folders, so the missing-file check is skipped.
    root (a folder, or None for no check): image paths that resolve outside it, symlinks followed, are
    skipped and counted as well (`_existing`).
    """
    report = Counter(report or {})
    keep_caps = []
    for caps in captions:
        good = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        _count(report, "empty captions dropped", len(caps) - len(good))
        keep_caps.append(good)
    ps = FilePairSet(name, refs, keep_caps, labels, draft=draft or 64)
    todo = [i for i in range(len(ps)) if ps.captions[i]]
    _count(report, "images without a caption skipped", len(ps) - len(todo))
    found = [FOUND] * len(todo) if listed else _existing([ps.refs[i] for i in todo], workers, root)
    _count(report, "missing images skipped", found.count(MISSING))
    _count(report, OUTSIDE_SKIPPED, found.count(OUTSIDE))
    todo = [i for i, ok in zip(todo, found) if ok == FOUND]
    n_sample = START_SAMPLE if sample is None else sample
    check = todo if verify else [todo[k] for k in _spread(len(todo), n_sample)]

    def mode(i):
        try:
            return ps._load(ps.refs[i]).mode
        except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
            return f"error: {type(e).__name__}"
    with ThreadPoolExecutor(workers) as pool:
        modes = dict(zip(check, pool.map(mode, check)))
    keep, unreadable = [], 0
    for i in todo:
        m = modes.get(i, "RGB")
        if m.startswith("error"):
            report[f"unreadable images skipped ({m[7:]})"] += 1
            unreadable += 1
        else:
            keep.append(i)
            if m != "RGB" and len(check) == len(todo):  # counted when every image was decoded
                report[f"{m} images converted to RGB"] += 1
    ps = ps.subset(keep)
    ps.draft = draft
    ps.n_decoded, ps.n_unreadable = len(check), unreadable  # for _require_images
    if report:
        lazy = "" if len(check) == len(todo) else (f"; {len(check)} of {len(todo)} decoded now, the others "
                                                    f"when first used (--verify-images: all now)")
        counts = "; ".join(f"{v} {k}" for k, v in sorted(report.items()))
        print(f"[data] {name}: {len(ps)} images kept; {counts}{lazy}", file=sys.stderr)
    ps.report = dict(report)
    return ps


def _spread(n, k):
    """min(n, k) evenly spaced indices of range(n), the first and the last included."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [0] * k
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


FOUND, MISSING, OUTSIDE = "found", "missing", "outside"
OUTSIDE_SKIPPED = "images outside --data-root skipped (--allow-outside-root to use them)"


def _inside(path, base) -> bool:
    """Whether the resolved `path` is `base` or lies under it (both already passed through os.path.realpath)."""
    return path == base or path.startswith(base if base.endswith(os.sep) else base + os.sep)


def _existing(refs, workers=8, root=None) -> list:
    """FOUND, MISSING or OUTSIDE for each image ref: one directory listing per folder instead of one `stat`
    per file. With `root`, a path whose folder resolves outside root (../, an absolute path elsewhere, a
    symlinked folder) is OUTSIDE without being looked at, and so is a symlinked file whose target does (only
    symlinks are resolved one by one; the listing says which entries are). (tar, offset, size) refs were
    read from their shard's headers, so they are FOUND."""
    split = os.path.split if os.altsep else lambda p: p.rpartition(os.sep)[::2]  # rpartition: faster
    paths = [split(os.fspath(r)) if isinstance(r, (str, os.PathLike)) else None for r in refs]
    folders = sorted({p[0] for p in paths if p is not None})
    base = None if root is None else os.path.realpath(root or ".")

    def listing(d):   # {name: is a symlink}, or None for a folder outside the root
        if base is not None and not _inside(os.path.realpath(d or "."), base):
            return None
        try:
            with os.scandir(d or ".") as entries:
                return {e.name: e.is_symlink() for e in entries}
        except OSError:
            return {}
    with ThreadPoolExecutor(workers) as pool:
        names = dict(zip(folders, pool.map(listing, folders)))

    def status(p):
        if p is None:
            return FOUND
        listed = names[p[0]]
        if listed is None:
            return OUTSIDE
        if p[1] not in listed:
            return MISSING
        if base is not None and listed[p[1]] and not _inside(os.path.realpath(os.path.join(*p)), base):
            return OUTSIDE
        return FOUND
    return [status(p) for p in paths]


def _find_ann(args, kind, patterns):
    if args.ann_file:
        path = args.ann_file if os.path.isabs(args.ann_file) or os.path.exists(args.ann_file) \
            else os.path.join(args.data_root, args.ann_file)
        if not os.path.exists(path):
            raise missing(kind, f"annotation file {path!r}")
        return path
    if not os.path.isdir(args.data_root or ""):
        raise missing(kind, f"--data-root {args.data_root!r}")
    for p in patterns:
        hits = sorted(glob.glob(os.path.join(args.data_root, p)))
        if hits:
            return hits[0]
    raise missing(kind, f"an annotation file ({' or '.join(patterns)}) in {args.data_root!r} was")


def _require_images(kind, ps, refs):
    """A training set whose images are all missing or unreadable (every one, or every one decoded at start):
    fail here, naming the layout."""
    if refs and (not len(ps) or ps.n_unreadable == ps.n_decoded > 0):
        what = f"none of the {len(refs)} images" if not len(ps) else \
            f"none of the {ps.n_decoded} images decoded at start (of {len(refs)})"
        raise FileNotFoundError(f"{ps.name}: {what} could be read (the first is expected at {refs[0]!r}; "
                                f"{ps.report}). --data {kind} expects {DOWNLOAD_HINTS[kind]}.")
    return ps


def _subsample(items, n, seed=0):
    """A deterministic subset of n items (order preserved); n = 0 keeps everything."""
    if not n or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("test", "val")
VAL_SOURCES = {"karpathy": 'images with "split": "val" in the Karpathy JSON',
               "albef": "a *val*.json file beside the training file (its name, 'train' replaced by 'val')",
               "wds": "a holdout of at least 3 image-caption pairs", "csv": "a holdout of at least 3 rows"}
TEST_SOURCES = {"karpathy": 'images with "split": "test" in the Karpathy JSON',
                "albef": "a *test*.json file beside the training file (its name, 'train' replaced by 'test')",
                "wds": "at least 2 image-caption pairs", "csv": "at least 2 rows"}
EVAL_SOURCES = {"val": VAL_SOURCES, "test": TEST_SOURCES}


def _finish(kind, name, raw, args, splits, report=None, read=None, listed=False, root="", source="", evaluate=()):
    """FilePairSets of the asked `splits` of raw {split: [(image ref, captions)]}.

    --max-samples picks the training subset and --max-eval caps the evaluation splits before any file is
    touched (`read`, if given, turns the chosen items' caption sources into caption lists). Training images
    get the checks that need no decoding (all of them decoded too with --verify-images), evaluation images
    are decoded now (the evaluation has no substitute for an unreadable image). `report`: indexing counts,
    reported with the training split; listed: see `clean_pairs`. Image paths must resolve under `root`
    (default --data-root, or the current folder without one), unless --allow-outside-root. A split in
    `evaluate` (the ones the run evaluates) without any image is an error naming `source` (the annotation
    file or folder), raised before any training.
    """
    out, root = {}, None if args.allow_outside_root else (root or args.data_root or ".")
    for split in splits:
        items = raw.get(split) or []
        if split == "train":
            items = _subsample(items, args.max_samples)
            if not items:
                raise missing(kind, f"training pairs ({name})")
        elif args.max_eval:
            items = items[:args.max_eval]
        if not items and split in evaluate:
            raise ValueError(f"{source}: this --data {kind} dataset has no {split} split (it needs "
                             f"{EVAL_SOURCES[split][kind]}), and the run evaluates that split"
                             f"{'; use --eval-split test' if split == 'val' else ''}")
        if not items:
            continue
        refs = [r for r, _ in items]
        caps = [c for _, c in items] if read is None else read([c for _, c in items])
        out[split] = clean_pairs(f"{name}-{split}", refs, caps, draft=2 * args.image_size,
                                 verify=split != "train" or args.verify_images,
                                 report=report if split == "train" else None, listed=listed, root=root)
        if split == "train":
            _require_images(kind, out[split], refs)
    return out


KARPATHY_LAYOUT = ('a JSON object {"images": [{"split": "train" | "restval" | "val" | "test", "filename": "x.jpg", '
                   '"filepath": "folder" (optional), "sentences": [{"raw": "a caption"}, ...]}, ...]}')
ALBEF_LAYOUT = ('a JSON list of entries {"image": "path/x.jpg", "caption": "a caption"} (training file) or '
                '{"image": "path/x.jpg", "caption": ["a caption", ...]} (val/test files)')


def _bad_file(path, problem, layout) -> ValueError:
    """The one error for a data file of the wrong shape: the file, what is wrong, and the layout expected."""
    return ValueError(f"{path}: {problem}; expected {layout}")


def _bad_entry(path, n, entry, err, layout) -> ValueError:
    """_bad_file for entry n of a JSON list that lacks a key or holds a value of the wrong type."""
    what = f"has no {err.args[0]!r}" if isinstance(err, KeyError) else f"is not laid out as expected ({err})"
    shown = json.dumps(entry)
    return _bad_file(path, f"entry {n} {what}: {shown[:150]}{' ...' if len(shown) > 150 else ''}", layout)


def _first_non_utf8(path) -> str:
    """'line L: byte 0x..' for the first line of the file that is not UTF-8 text."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {n}: byte {line[e.start]:#04x} at column {e.start + 1}"
    return "a byte sequence cut at the end of the file"


def _read_json(path, layout):
    """json.load of a UTF-8 file; a file cut short, not JSON or not UTF-8 is one error naming it and `layout`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise _bad_file(path, f"not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}): the file is cut "
                              f"short or is not JSON", layout) from None
    except UnicodeDecodeError:
        raise _bad_file(path, f"not UTF-8 text ({_first_non_utf8(path)})", layout) from None


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")


def load_karpathy(args, splits=SPLITS, evaluate=()):
    """Karpathy split JSON: train = train + restval, val, test (images of other splits are ignored)."""
    path = _find_ann(args, "karpathy", ["dataset_*.json", "*.json"])
    doc = _read_json(path, KARPATHY_LAYOUT)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        found = f"an object with the keys {sorted(doc)[:10]}" if isinstance(doc, dict) else _json_type(doc)
        raise _bad_file(path, f'the top level is {found}, not an object with an "images" list', KARPATHY_LAYOUT)
    raw, folders = {}, {}
    # dataset_flickr30k.json / dataset_flickr8k.json name no folder: find the one that holds the images
    folders_tried = ("", "flickr30k-images", "Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
    n = 0
    try:
        default_dir = next((d for d in folders_tried
                            if images and os.path.exists(os.path.join(args.data_root, d, images[0]["filename"]))),
                           "")
        for n, im in enumerate(images):
            split = "train" if im["split"] == "restval" else im["split"]
            folder = im.get("filepath", default_dir)
            if folder not in folders:  # DATA_ROOT/filepath/ once per folder (os.path.join per image is slow)
                folders[folder] = os.path.join(args.data_root, folder, "")
            caps = [s["raw"] for s in im["sentences"]]
            raw.setdefault(split, []).append((folders[folder] + im["filename"], caps))
    except (KeyError, TypeError, AttributeError) as e:
        raise _bad_entry(path, f'{n} of "images"', images[n], e, KARPATHY_LAYOUT) from None
    name = os.path.splitext(os.path.basename(path))[0].replace("dataset_", "")
    return _finish("karpathy", name, raw, args, splits, source=path, evaluate=evaluate)


def load_albef(args, splits=SPLITS, evaluate=()):
    """ALBEF JSON lists: the training file has one entry per caption; *_test/*_val have caption lists."""
    path = _find_ann(args, "albef", ["*train*.json"])
    raw = {}
    for split in splits:
        p = path if split == "train" else \
            os.path.join(os.path.dirname(path), os.path.basename(path).replace("train", split))
        if not os.path.exists(p):
            continue
        entries = _read_json(p, ALBEF_LAYOUT)
        if not isinstance(entries, list):
            raise _bad_file(p, f"the top level is {_json_type(entries)}, not a list", ALBEF_LAYOUT)
        grouped, n = {}, 0
        try:
            for n, e in enumerate(entries):  # group the one-caption entries of each image
                caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
                if not isinstance(e["image"], str):
                    raise TypeError(f"'image' is {_json_type(e['image'])}, not a path")
                grouped.setdefault(e["image"], []).extend(caps)
        except (KeyError, TypeError, AttributeError) as err:
            raise _bad_entry(p, n, entries[n], err, ALBEF_LAYOUT) from None
        raw[split] = [(os.path.join(args.data_root, k), caps) for k, caps in grouped.items()]
    return _finish("albef", "albef", raw, args, splits, source=path, evaluate=evaluate)


def _read_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def _cores() -> int:
    """CPU cores this process may run on (the affinity mask: a container's or `taskset`'s share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parallel_map(fn, items, processes):
    """list(map(fn, items)) in `processes` forked processes (sequential for one, or where fork is missing)."""
    if processes <= 1 or len(items) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return list(map(fn, items))
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(processes, len(items)), mp_context=fork) as ex:
        return list(ex.map(fn, items, chunksize=max(1, len(items) // (8 * processes))))


class _NotPlainTar(Exception):
    """A shard _tar_members does not parse (no ustar magic, e.g. compressed; sparse files): `tarfile` reads it."""


_TAR_FILE_TYPES, _TAR_SKIP_TYPES = (b"0", b"\0", b"7"), (b"1", b"2", b"3", b"4", b"5", b"6", b"K", b"g")
_TAR_ZERO_BLOCK, _TAR_READ = bytes(512), 4096


def _tar_members(path):
    """([(name, data offset, size, content if .txt else None)] of the regular files of an uncompressed tar,
    whether the file is cut short (the members before the cut are returned)).

    Reads the 512-byte headers, not the images: one 4 KiB `pread` at a header, which also holds the
    next headers and small members (captions) when they are near. Handles ustar prefixes, GNU long names
    and pax path/size records; raises _NotPlainTar for anything else (the caller then uses `tarfile`).
    """
    out, long_name, pax = [], None, {}
    fd = os.open(path, os.O_RDONLY)
    try:
        end, off, cut = os.fstat(fd).st_size, 0, False
        buf, buf_off = b"", 0
        while off + 512 <= end:
            if off + 512 > buf_off + len(buf):
                buf, buf_off = os.pread(fd, _TAR_READ, off), off
            head, data = buf[off - buf_off:off - buf_off + 512], off + 512
            if head == _TAR_ZERO_BLOCK:
                break  # end-of-archive marker
            if head[257:262] != b"ustar":
                raise _NotPlainTar(path)
            raw_size = head[124:136]  # octal digits, or base-256 (first byte 0x80) for 8 GiB and more
            size = int.from_bytes(raw_size[1:], "big") if raw_size[0] & 0x80 \
                else int(raw_size.strip(b"\0 ") or b"0", 8)
            kind = head[156:157]
            if kind in _TAR_FILE_TYPES and "size" in pax:
                size = int(pax["size"])
            if data + size > end:
                cut = True
                break
            if kind == b"L":
                long_name = _tar_payload(fd, buf, buf_off, data, size).split(b"\0", 1)[0]
            elif kind == b"x":
                pax = _pax_records(_tar_payload(fd, buf, buf_off, data, size))
            elif kind in _TAR_FILE_TYPES:
                name = head[:100].split(b"\0", 1)[0]
                prefix = head[345:500].split(b"\0", 1)[0]
                name = long_name or (pax["path"].encode("utf-8", "surrogateescape") if "path" in pax
                                     else prefix + b"/" + name if prefix else name)
                out.append((name.decode("utf-8", "surrogateescape"), data, size,
                            _tar_payload(fd, buf, buf_off, data, size) if name.endswith(b".txt") else None))
                long_name, pax = None, {}
            elif kind in _TAR_SKIP_TYPES:  # links, devices, folders; a GNU long link name; global pax records
                if kind not in (b"K", b"g"):
                    long_name, pax = None, {}
            else:
                raise _NotPlainTar(path)
            off = data + (size + 511) // 512 * 512
        else:  # no end-of-archive marker: fine at the end of the file, a cut if a partial header is left
            cut = off < end and os.pread(fd, end - off, off).strip(b"\0") != b""
    finally:
        os.close(fd)
    return out, cut


def _tar_payload(fd, buf, buf_off, data, size) -> bytes:
    """A member's content (at `data`): from the last read when it holds it, else one more `pread`."""
    if data + size <= buf_off + len(buf):
        return buf[data - buf_off:data - buf_off + size]
    return os.pread(fd, size, data)


def _pax_records(block: bytes) -> dict:
    """The 'LEN key=value\\n' records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(block) and block[pos:pos + 1] not in (b"", b"\0"):
        length = int(block[pos:block.index(b" ", pos)])
        key, _, value = block[block.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _index_shard(shard):
    """One webdataset shard -> ([(image ref (shard, offset, size), caption)], indexing counts), by key."""
    report = Counter()
    try:
        try:
            members, cut = _tar_members(shard)
        except (_NotPlainTar, ValueError):
            with tarfile.open(shard) as tf:
                members = [(m.name, m.offset_data, m.size,
                            tf.extractfile(m).read() if m.name.endswith(".txt") else None)
                           for m in tf.getmembers() if m.isfile()]
            cut = False
    except (OSError, tarfile.TarError) as e:
        report[f"unreadable shards skipped ({type(e).__name__})"] += 1
        print(f"[data] {shard}: not a readable tar file ({e}); skipped", file=sys.stderr)
        return [], report
    if cut:
        report["shards cut short (the members before the cut are used)"] += 1
        print(f"[data] {shard}: cut short after {len(members)} complete files; those are used",
              file=sys.stderr)
    groups = {}
    for name, offset, size, text in members:
        dot = name.rfind(".")  # os.path.splitext's split, without its cost per member
        key, ext = (name[:dot], name[dot:].lower()) if dot > name.rfind("/") + 1 else (name, "")
        g = groups.get(key)
        if g is None:
            g = groups[key] = {}
        g[ext] = (offset, size, text)
    pairs = []
    for key in sorted(groups):
        g = groups[key]
        img, txt = g.get(".jpg"), g.get(".txt")
        if img is None:
            img = next((g[e] for e in IMAGE_EXTS if e in g), None)
        if img is not None and txt is not None:
            pairs.append(((shard, img[0], img[1]), _read_text(txt[2])))
        elif img is not None:
            report["images without a caption skipped"] += 1
        elif txt is not None:
            report["captions without an image skipped"] += 1
    return pairs, report


def _walk_files(root, report, allow_outside=False):
    """(folder, [file names]) of every folder under root, as os.walk gives them (symlinked folders and hidden
    files and folders skipped), except that a symlinked file whose target lies outside root is left out and
    counted in `report`, unless allow_outside. Only the symlinks are resolved (the listing says which)."""
    base, todo = os.path.realpath(root), [root]
    while todo:
        folder, files = todo.pop(), []
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                if not e.is_symlink():
                    todo.append(e.path)
            elif e.is_symlink() and not allow_outside and not _inside(os.path.realpath(e.path), base):
                report[OUTSIDE_FILES] += 1
            else:
                files.append(e.name)
        yield folder, files


OUTSIDE_FILES = "symlinked files outside --data-root skipped (--allow-outside-root to use them)"


def _index_folder(root, allow_outside=False):
    """One walk of an extracted img2dataset folder: (tar shards found, sorted [(caption path, image path)],
    counts). A caption pairs with the image of the same stem in the same folder (case-insensitive
    extensions; .jpg before .jpeg, .png, ... when several exist). Hidden files and folders are ignored, and
    so are symlinks to files outside root (counted; see `_walk_files`)."""
    shards, pairs, report = [], [], Counter()
    for folder, files in _walk_files(root, report, allow_outside):
        stems, prefix = {}, os.path.join(folder, "")
        for f in files:
            stem, dot, ext = f.rpartition(".")
            if not dot:
                continue
            ext = "." + ext.lower()
            if ext == ".tar":
                shards.append(prefix + f)
            elif ext == ".txt" or ext in IMAGE_EXTS:
                stems.setdefault(stem, {})[ext] = f
        for g in stems.values():
            img = next((g[e] for e in IMAGE_EXTS if e in g), None)
            if img and ".txt" in g:
                pairs.append((prefix + g[".txt"], prefix + img))
            elif img:
                report["images without a caption skipped"] += len(g)
            else:
                report["captions without an image skipped"] += 1
    return sorted(shards), sorted(pairs), report


def _read_caption_files(paths) -> list:
    """The stripped text of each file ("" for a file that cannot be read)."""
    out = []
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                data = b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
            finally:
                os.close(fd)
        except OSError:
            data = b""
        out.append(_read_text(data))
    return out


def _read_captions(paths) -> list:
    """[[caption]] of each text file, in parallel over the cores (a file that cannot be read gives an empty
    caption, counted as such)."""
    chunks = [paths[i:i + 8192] for i in range(0, len(paths), 8192)]
    return [[c] for part in _parallel_map(_read_caption_files, chunks, _cores()) for c in part]


def load_wds(args, splits=SPLITS, evaluate=()):
    """img2dataset output: .tar shards (headers parsed in parallel, one process per core) or extracted
    {key}.jpg/{key}.txt files (one walk; only the chosen pairs' captions are read)."""
    root = args.data_root
    if not os.path.isdir(root or ""):
        raise missing("wds", f"--data-root {root!r}")
    shards, pairs, report = _index_folder(root, args.allow_outside_root)
    if shards:  # shards present: the loose files are not read
        report = Counter({k: v for k, v in report.items() if k == OUTSIDE_FILES})
        refs, caps = [], []
        for shard_pairs, shard_report in _parallel_map(_index_shard, shards, _cores()):
            refs += [r for r, _ in shard_pairs]
            caps += [[c] for _, c in shard_pairs]
            report.update(shard_report)
        read = None
    else:
        refs, caps, read = [img for _, img in pairs], [txt for txt, _ in pairs], _read_captions
    if not refs:
        raise missing("wds", f"image/caption pairs ({{key}}.jpg + {{key}}.txt, or .tar shards) under {root!r} were")
    return _holdout_split("wds", refs, caps, args, splits, report=report, read=read, listed=not shards,
                          source=root, evaluate=evaluate)


def load_csv(args, splits=SPLITS, evaluate=()):
    """CSV/TSV with explicit image and caption columns; the delimiter is sniffed."""
    path = _find_ann(args, "csv", ["*.csv", "*.tsv"])
    layout = (f"a UTF-8 CSV or TSV file whose first row names the columns, among them --image-col "
              f"{args.image_col!r} (image paths relative to --data-root) and --caption-col {args.caption_col!r}")
    try:
        grouped, report = _read_csv(path, args, layout)
    except UnicodeDecodeError:
        raise _bad_file(path, f"not UTF-8 text ({_first_non_utf8(path)}); save it as UTF-8", layout) from None
    refs = [p if os.path.isabs(p) else os.path.join(args.data_root or os.path.dirname(path), p) for p in grouped]
    return _holdout_split("csv", refs, list(grouped.values()), args, splits, report=report,
                          root=args.data_root or os.path.dirname(path), source=path, evaluate=evaluate)


def _read_csv(path, args, layout) -> tuple:
    """({image path: [captions]} in row order, counts) of a CSV/TSV file; its delimiter is sniffed."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        head = f.read(65536)
        f.seek(0)
        try:
            dialect = csv.Sniffer().sniff(head, delimiters=",\t;|")
        except csv.Error:
            dialect = csv.excel_tab if path.endswith(".tsv") else csv.excel
        reader = csv.reader(f, dialect=dialect)
        cols = next(reader, [])
        for c in (args.image_col, args.caption_col):
            if c not in cols:
                raise _bad_file(path, f"no column {c!r} (the columns of its first row are {cols}); choose them "
                                      f"with --image-col and --caption-col", layout)
        ic, cc = cols.index(args.image_col), cols.index(args.caption_col)
        grouped, report = {}, Counter()
        for row in reader:
            if len(row) > max(ic, cc):
                grouped.setdefault(row[ic], []).append(row[cc])
            elif len(row) > ic:  # the caption cell is missing: an empty caption, dropped and counted later
                grouped.setdefault(row[ic], []).append("")
            elif row:
                report["rows without an image path skipped"] += 1
    return grouped, report


def _holdout_split(kind, refs, caps, args, splits=SPLITS, n_test=1000, report=None, read=None, listed=False,
                   root="", source="", evaluate=()):
    """For sources without splits, in the loader's order: the last k = min(1000, 5%) pairs (at least 1) are
    the test split, the k before them the val split (none for fewer than 3 pairs), the rest is train."""
    n = len(refs)
    k = min(n_test, max(1, n // 20)) if n > 1 else 0
    v = k if n >= 2 * k + 1 else 0
    items = list(zip(refs, caps))
    raw = {"train": items[:n - k - v], "val": items[n - k - v:n - k], "test": items[n - k:]}
    return _finish(kind, kind, raw, args, splits, report=report, read=read, listed=listed, root=root,
                   source=source, evaluate=evaluate)


LOADERS = {"karpathy": load_karpathy, "albef": load_albef, "wds": load_wds, "csv": load_csv}
CLASSIFY_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}."]


def _read_lines(path, flag) -> list:
    """The non-blank lines of a UTF-8 text file, stripped; clear errors for a missing or empty file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{flag} {path!r} is empty: expected one entry per line")
    return lines


def read_classnames(path, n_classes: int | None = None) -> list:
    """Class names from a file, one per line in class order; n_classes (when given) must equal their count."""
    names = _read_lines(path, "--classnames")
    if n_classes is not None and len(names) != n_classes:
        raise ValueError(f"--classnames {path!r} lists {len(names)} class names, but the dataset has {n_classes} "
                         f"classes: one line per class, in class order (sorted folder names for an ImageFolder)")
    return names


def read_templates(path) -> list:
    """Prompt templates from a file, one per line, each with exactly one {} (CLIP_benchmark's {c} is read as
    {}) where the class name goes and no other braces: template.format(class name) is the prompt."""
    templates = [t.replace("{c}", "{}") for t in _read_lines(path, "--templates")]
    for i, t in enumerate(templates, 1):
        try:
            ok = t.count("{}") == 1 and t.format("x") != t
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"--templates {path!r}, line {i} {t!r}: a template needs exactly one {{}} where the "
                             f"class name goes (e.g. 'a photo of a {{}}.') and no other braces")
    return templates


def zeroshot_prompts(args, classnames) -> tuple:
    """(class names, templates) of a classification task whose dataset names its classes `classnames`:
    --classnames / --templates files when args sets them, else classnames and CLASSIFY_TEMPLATES."""
    names = read_classnames(args.classnames, len(classnames)) if getattr(args, "classnames", "") else classnames
    return names, read_templates(args.templates) if getattr(args, "templates", "") else CLASSIFY_TEMPLATES


def folder_suite(root, args, name=None, templates=None, split=None) -> EvalSuite:
    """Any ImageFolder (root/<class>/<image>) as a zero-shot task and a linear probe.

    Deterministic split per class: 60% probe-train, 20% probe-val, 20% test (zero-shot uses test; with
    split="val", see `_classification_suite`). split=None: args.eval_split. Class names and templates: see
    `zeroshot_prompts` (--classnames / --templates, else the folder names and CLASSIFY_TEMPLATES); templates
    given here win.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageFolder {root!r} not found: expected {root}/<class name>/<image files>")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise FileNotFoundError(f"ImageFolder {root!r} has no class sub-folders")
    parts = {"train": [], "val": [], "test": []}
    for ci, c in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTS))
        for j, fn in enumerate(files):
            part = "train" if j % 5 < 3 else ("val" if j % 5 == 3 else "test")
            parts[part].append((os.path.join(root, c, fn), ci))
    name = name or os.path.basename(os.path.normpath(root))
    names, file_templates = zeroshot_prompts(args, [c.replace("_", " ") for c in classes])
    templates = templates or file_templates
    sets = {p: clean_pairs(f"{name}-{p}", [r for r, _ in v], [[names[y]] for _, y in v], {name: [y for _, y in v]},
                           draft=2 * args.image_size) for p, v in parts.items()}
    found = ", ".join(f"{p} {len(ps)}" for p, ps in sets.items())
    return check_eval_suite(_classification_suite(name, names, templates, sets, split or args.eval_split),
                            f"ImageFolder {root!r}: usable images of its {len(classes)} class folders per part: "
                            f"{found}. Each class's images ({', '.join(IMAGE_EXTS)}) are dealt out in file-name "
                            f"order 3 : 1 : 1 to train, val and test, so a class needs 5 images to reach every "
                            f"part; expected {root}/<class name>/<image files>")


def _classification_suite(name, classnames, templates, sets, split="test"):
    """Zero-shot on sets[split]; the probe trains on sets["train"] and reports on the test part. split="val"
    (validation, the test part untouched): zero-shot on the val part, and the probe chooses its weight decay
    on the val images of even index and reports on those of odd index."""
    if check_eval_split(split) == "val":
        return EvalSuite(None, {name: LabelSet(classnames, templates, sets["val"], name)},
                         {name: ProbeTask(name, classnames, "image", sets["train"], _half(sets["val"], 0),
                                          _half(sets["val"], 1))})
    return EvalSuite(None, {name: LabelSet(classnames, templates, sets["test"], name)},
                     {name: ProbeTask(name, classnames, "image", sets["train"], sets["val"], sets["test"])})


class ArrayPairSet(PairSet):
    """In-memory uint8 images (CIFAR); the caption is the class name."""

    def __init__(self, name, arrays, targets, classnames, target):
        super().__init__(name, list(range(len(targets))), [[classnames[y]] for y in targets], {target: list(targets)})
        self.arrays = arrays

    def _load(self, ref):
        return Image.fromarray(self.arrays[ref])


def cifar_suite(kind, root, args, split=None) -> EvalSuite:
    """CIFAR-10/100 via torchvision (never downloads): probe-train 5000 / probe-val 1000 of train, test 10000
    (split=None: args.eval_split; "val": see `_classification_suite`)."""
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[kind]
    try:
        tr, te = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(f"{kind} not found under {root!r} ({e}). Download it once with "
                                f"torchvision.datasets.{cls.__name__}({root!r}, download=True).") from e
    names, templates = zeroshot_prompts(args, [c.replace("_", " ") for c in tr.classes])
    idx = _subsample(list(range(len(tr))), 6000, seed=1)
    parts = {"train": (tr, idx[:5000]), "val": (tr, idx[5000:]), "test": (te, list(range(len(te))))}
    sets = {p: ArrayPairSet(f"{kind}-{p}", ds.data[ix], [ds.targets[i] for i in ix], names, kind)
            for p, (ds, ix) in parts.items()}
    return _classification_suite(kind, names, templates, sets, split or args.eval_split)


def classify_suites(spec, args, split=None) -> EvalSuite:
    """Parse --classify 'cifar10=DIR,folder=DIR' into one EvalSuite (split=None: args.eval_split)."""
    suite = EvalSuite()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, root = item.partition("=")
        if kind in ("cifar10", "cifar100"):
            suite = suite.merge(cifar_suite(kind, root, args, split))
        elif kind == "folder":
            suite = suite.merge(folder_suite(root, args, split=split))
        else:
            raise ValueError(f"--classify item {item!r}: expected cifar10=DIR, cifar100=DIR or folder=DIR")
    return suite


def check_eval_split(split: str) -> str:
    if split not in EVAL_SPLITS:
        raise ValueError(f"--eval-split {split!r}: choose test or val")
    return split


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector paused while the (cycle-free) lists of refs and captions are built,
    and those frozen afterwards: it would otherwise scan the millions of new objects over and over
    (measured: 11 s -> 5 s for a million Karpathy pairs), and a forked loader worker's collector would
    touch, so copy, every page that holds them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _build(args, split, with_train):
    with _gc_paused():
        return _build_splits(args, check_eval_split(split), with_train)


def _build_splits(args, split, with_train):
    if args.data == "synthetic":
        train, suite = synthetic_suite(args, split, with_train)
    elif args.data in LOADERS:
        parts = LOADERS[args.data](args, ("train", split) if with_train else (split,), evaluate=(split,))
        train, suite = parts.get("train"), EvalSuite(parts.get(split))
        if suite.retrieval is not None and not len(suite.retrieval):
            raise ValueError(f"{suite.retrieval.name}: no image of the {split} split can be used "
                             f"({suite.retrieval.report}); --data {args.data} expects "
                             f"{DOWNLOAD_HINTS[args.data]}")
    else:
        raise ValueError(f"--data {args.data!r}: choose synthetic, karpathy, albef, wds or csv")
    if args.classify:
        suite = suite.merge(classify_suites(args.classify, args, split))
    return train, check_eval_suite(suite, f"--max-eval {args.max_eval} (0 = all) and --probe-train "
                                          f"{args.probe_train} must leave an image in every set")


def check_eval_suite(suite: EvalSuite, hint: str = "") -> EvalSuite:
    """`suite` itself when every image set its evaluation reads holds an image: the retrieval set, each
    zero-shot set, each probe's train, val and test part. Else a ValueError naming the empty ones (and
    `hint`), so that a run fails at start rather than after training. build_data, build_eval_suite and
    folder_suite return only suites that pass."""
    sets = {"retrieval": suite.retrieval} if suite.retrieval is not None else {}
    sets.update({f"zero-shot {k}": ls.images for k, ls in suite.zeroshot.items()})
    sets.update({f"probe {k} ({part})": getattr(task, part) for k, task in suite.probes.items()
                 for part in ("train", "val", "test")})
    empty = [f"{what} [{ps.name}]" for what, ps in sets.items() if not len(ps)]
    if empty:
        raise ValueError(f"nothing to evaluate on: no usable image in {', '.join(empty)}"
                         f"{'; ' + hint if hint else ''}")
    return suite


def build_data(args) -> tuple:
    """(training PairSet, EvalSuite of args.eval_split) for the data flags in `args`."""
    return _build(args, args.eval_split, with_train=True)


def build_eval_suite(args, split=None) -> EvalSuite:
    """The EvalSuite of `split` (default args.eval_split: test | val), without building the training set."""
    return _build(args, args.eval_split if split is None else split, with_train=False)[1]


# ----------------------------------------------------------------------------------------------
# 5. Tokenizers
# ----------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _words(text: str) -> list:
    """Lower-cased words and punctuation marks, the way BERT's basic tokenizer splits them."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def word_tokenizer(words):
    """A real `BertTokenizerFast` whose vocabulary is exactly `words` (one token per word)."""
    from transformers import BertTokenizerFast
    vocab = SPECIAL_TOKENS + [w for w in dict.fromkeys(words) if w not in SPECIAL_TOKENS]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(vocab) + "\n")
        return BertTokenizerFast.from_pretrained(d, do_lower_case=True)


def caption_vocabulary(texts, min_count=2, max_size=30000) -> list:
    """Words seen at least `min_count` times in `texts`, most frequent first (ties alphabetical)."""
    counts = Counter(_words("\n".join(texts)))  # one pass over all: no word spans a line break
    punct = sorted({c for c in "".join(counts) if not c.isalnum()})
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return punct + words[:max_size]


def build_tokenizer(args, train: PairSet | None = None):
    """--tokenizer auto: the synthetic word list, or a vocabulary built from the training captions;
    otherwise any Hugging Face model name or local folder (AutoTokenizer)."""
    if args.tokenizer != "auto":
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(args.tokenizer)
        except OSError as e:
            raise OSError(f"tokenizer {args.tokenizer!r} could not be loaded ({e}). Pass a local folder "
                          f"(save_pretrained output), download the model once with network access, or use "
                          f"--tokenizer auto.") from e
    if args.data == "synthetic":
        return word_tokenizer(synth_vocabulary())
    train = train if train is not None else build_data(args)[0]
    return word_tokenizer(caption_vocabulary(train.texts))


# ----------------------------------------------------------------------------------------------
# 6. Augmentations
# ----------------------------------------------------------------------------------------------
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def eval_transform(image_size: int):
    from torchvision import transforms as T
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(MEAN, STD)])


PIL_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}  # PIL's numbers


class FloorCenterCrop:
    """Center crop to (height, width) with the top-left corner at floor((size - crop) / 2), the rounding of
    Hugging Face's image processors (torchvision's CenterCrop rounds half to even, one pixel off at times)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left = (img.height - self.height) // 2, (img.width - self.width) // 2
        return img.crop((left, top, left + self.width, top + self.height))


def _size_of(v) -> dict:
    """A processor size entry (an int, {"shortest_edge": n} or {"height": h, "width": w}) as a dict."""
    return {"shortest_edge": v} if isinstance(v, int) else dict(v)


def preprocess_transform(config: dict, mean=MEAN, std=STD):
    """The eval transform a Hugging Face image processor config (preprocessor_config.json, as a dict)
    describes, on PIL images: resize (the shortest edge to size["shortest_edge"], or to size["height"] x
    size["width"]) with its resampling filter (PIL's numbering; default bicubic), center crop to crop_size
    (when do_center_crop), then ToTensor + Normalize(mean, std). mean/std default to this project's (CLIP's)
    constants, which every model input of the project uses (eval.VisionTower maps them to another model's)."""
    from torchvision import transforms as T
    size = _size_of(config.get("size", 224))
    mode = T.InterpolationMode[PIL_FILTERS[int(config.get("resample", 3))]]
    ops = []
    if config.get("do_resize", True):
        target = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
        ops.append(T.Resize(target, interpolation=mode))
    if config.get("do_center_crop", "crop_size" in config):
        crop = _size_of(config.get("crop_size", size.get("shortest_edge", 224)))
        crop = {"height": crop["shortest_edge"], "width": crop["shortest_edge"]} if "shortest_edge" in crop else crop
        ops.append(FloorCenterCrop(crop["height"], crop["width"]))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def train_transform(image_size: int, strong: bool = False):
    """Training views, PIL image -> uint8 tensor (3, H, W); `to_device` normalizes them on the device.
    No horizontal flip (captions say left/right), no hue jitter (they name colours).

    strong=False: the main view (mild crop); strong=True: the second view for the intra-modal terms
    (wider crop range, brightness/contrast/saturation jitter, occasional blur). Every step works on the PIL
    image, whose pixels are uint8, so `to_device`'s float values are exactly those of ToTensor + Normalize
    at the end of these steps (the pipeline before the images moved to the device, same random draws).
    """
    from torchvision import transforms as T
    ops = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0) if strong else (0.8, 1.0), ratio=(0.85, 1.18))]
    if strong:
        ops += [T.RandomApply([T.ColorJitter(0.3, 0.3, 0.2, hue=0.0)], p=0.8),
                T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.3)]
    return T.Compose(ops + [T.PILToTensor()])


_NORM_CONSTANTS = {}  # device -> (mean, std) as (1, 3, 1, 1) float32 tensors, made once per device


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> float32 (x / 255 - MEAN) / STD per channel, on their device, in their
    memory format: the same float32 operations, so the same values, as torchvision's ToTensor + Normalize."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize expects uint8 images (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if images.device not in _NORM_CONSTANTS:  # a small host->device copy, made once rather than every step
        _NORM_CONSTANTS[images.device] = tuple(
            torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(images.device) for v in (MEAN, STD))
    mean, std = _NORM_CONSTANTS[images.device]
    return images.float().div_(255).sub_(mean).div_(std)


def to_device(batch: dict, device, channels_last: bool = False) -> tuple:
    """A `train_loader` batch on `device`: (batch, skipped).

    Every tensor is copied with non_blocking=True (asynchronous from the loader's pinned memory on CUDA);
    4-D uint8 images are converted to normalized float32 there (`normalize`), in channels_last memory
    format if asked (any 4-D tensor). `skipped`, the count of images substituted in this batch, is read as
    a Python int from its CPU tensor (no device synchronization) and not copied.
    """
    device = torch.device(device)
    skipped = int(batch["skipped"]) if "skipped" in batch else 0
    out = {}
    for k, v in batch.items():
        if k == "skipped":
            continue
        v = v.to(device, non_blocking=True)
        if v.ndim == 4 and channels_last:
            v = v.contiguous(memory_format=torch.channels_last)  # on uint8: a quarter of the bytes to move
        out[k] = normalize(v) if v.ndim == 4 and v.dtype == torch.uint8 else v
    return out, skipped


# EDA (Wei & Zou, EMNLP 2019, arXiv:1901.11196) with a small built-in synonym table instead of WordNet: each
# group is a set of interchangeable words. Words that carry the benchmark's labels are absent on purpose except
# where a true synonym exists, so synonym replacement keeps a caption's labels. The other operations can change
# what a caption says: a swap or an insertion can move an attribute word to the other side of the relation word
# ("a red circle left of a blue square" -> "a blue circle left of a red square") and a deletion can drop one.
# The augmented caption is a noisy view of the caption, not a paraphrase.
EDA_SYNONYMS = [["photo", "picture", "image"], ["small", "little"], ["large", "big"], ["tiny", "minute"],
                ["object", "thing"], ["circle", "disc"], ["square", "box"], ["cross", "plus"],
                ["bar", "rod"], ["crescent", "moon"], ["ring", "hoop"], ["red", "scarlet"], ["cyan", "turquoise"],
                ["purple", "violet"], ["metal", "metallic"], ["man", "guy"], ["woman", "lady"],
                ["child", "kid"], ["dog", "puppy"], ["running", "jogging"], ["street", "road"],
                ["looking", "staring"], ["sitting", "seated"], ["standing", "upright"], ["shirt", "tee"],
                ["grass", "lawn"], ["ocean", "sea"], ["boy", "lad"], ["girl", "lass"], ["people", "persons"],
                ["jumps", "leaps"], ["walking", "strolling"], ["near", "beside"]]
_SYN = {w: [v for v in g if v != w] for g in EDA_SYNONYMS for w in g}
EDA_PROTECTED = {"left", "right", "above", "below", "top", "bottom", "not", "no"}


def eda(text: str, rng: random.Random, alpha: float = 0.1, n_ops: int = 1) -> str:
    """Easy Data Augmentation: synonym replacement, random insertion, random swap, random deletion.

    alpha is the fraction of words changed per operation (at least one); one operation is drawn per
    call. Spatial words are never swapped or deleted (they stay in place), but the words around them can move,
    so a view may pair an attribute with the other object; a caption is never emptied.
    """
    words = text.split()
    if len(words) < 2:
        return text
    for _ in range(n_ops):
        op = rng.choice(["synonym", "insert", "swap", "delete"])
        k = max(1, int(alpha * len(words)))
        if op == "synonym":
            cands = [i for i, w in enumerate(words) if w.strip(".,").lower() in _SYN
                     and w.strip(".,").lower() not in EDA_PROTECTED]
            for i in rng.sample(cands, min(k, len(cands))):
                core = words[i].strip(".,")
                words[i] = words[i].replace(core, rng.choice(_SYN[core.lower()]))
        elif op == "insert":
            cands = [w.strip(".,").lower() for w in words if w.strip(".,").lower() in _SYN]
            for _ in range(min(k, len(cands))):
                words.insert(rng.randrange(len(words) + 1), rng.choice(_SYN[rng.choice(cands)]))
        elif op == "swap":
            free = [i for i, w in enumerate(words) if w.strip(".,").lower() not in EDA_PROTECTED]
            for _ in range(k if len(free) >= 2 else 0):
                i, j = rng.sample(free, 2)
                words[i], words[j] = words[j], words[i]
        else:
            keep = [w for w in words if w.strip(".,").lower() in EDA_PROTECTED or rng.random() > alpha]
            words = keep if keep else [rng.choice(words)]
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# 7. Training input pipeline
# ----------------------------------------------------------------------------------------------
class StepSampler(Sampler):
    """An endless, deterministic stream of (image, caption, item seed) triples, from `start_step` on.

    Epoch e visits every image once in the order of a permutation seeded by (seed, e), each with
    one of its captions drawn from the same generator. Sample number s of the run (counted from
    step 0) always gets item seed `seed * 1_000_003 + s`, so augmentations are reproducible too, and
    a run resumed at step k sees exactly the batches an uninterrupted run sees from step k.
    """

    def __init__(self, pairs: PairSet, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world: int = 1):
        self.n_caps = [len(c) for c in pairs.captions]
        self.batch_size, self.seed, self.start = batch_size, seed, start_step * batch_size
        # K processes (torchrun): batch_size is the global batch; process `rank` takes its rank-th slice of
        # every step's batch, so the K slices together are exactly the one-process batch
        self.rank, self.world = rank, world

    def epoch(self, e):
        g = torch.Generator().manual_seed(self.seed * 7919 + e)
        order = torch.randperm(len(self.n_caps), generator=g).tolist()
        picks = torch.rand(len(order), generator=g).tolist()
        return [(i, int(p * self.n_caps[i])) for i, p in zip(order, picks)]

    def __iter__(self):
        n = len(self.n_caps)
        e, offset = divmod(self.start, n)
        s = self.start
        while True:
            for img, cap in self.epoch(e)[offset:]:
                if (s % self.batch_size) * self.world // self.batch_size == self.rank:  # this process's slice
                    yield img, cap, self.seed * 1_000_003 + s
                s += 1
            e, offset = e + 1, 0


class TrainPairs(Dataset):
    """Item (image, caption, seed) -> dict(image, image_aug, text, text_aug, index, skipped).

    Images are uint8 tensors (3, H, W) (see `train_transform`). The item seed drives every random choice
    (crop, jitter, EDA), so the same stream gives the same tensors in any worker. An image that fails to
    load (corrupt, truncated, deleted since the start) is replaced by the next one, never a crash:
    `skipped` says how many were tried and failed for this item, and the first failures of each process
    are printed.
    """

    PRINT_FIRST = 10  # failures printed per process; every one is counted in the items' `skipped`

    def __init__(self, pairs: PairSet, image_size: int, second_view: bool = True, eda_alpha: float = 0.1):
        self.pairs, self.second_view, self.eda_alpha = pairs, second_view, eda_alpha
        self.t_main, self.t_aug = train_transform(image_size), train_transform(image_size, strong=True)
        self.failures = 0

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, item):
        i, c, seed = item
        for attempt in range(len(self.pairs)):
            j = (i + attempt) % len(self.pairs)
            try:
                img = self.pairs.load_image(j)
                break
            except Exception as e:  # noqa: BLE001
                self.failures += 1
                if self.failures <= self.PRINT_FIRST:
                    more = "" if self.failures < self.PRINT_FIRST else \
                        "; further failures in this process are only counted (the batches' 'skipped')"
                    print(f"[data] could not load image {j} of {self.pairs.name} ({type(e).__name__}: {e}); "
                          f"using the next one ({self.failures} failures so far{more})", file=sys.stderr)
        else:
            raise RuntimeError(f"no image of {self.pairs.name} can be loaded")
        caption = self.pairs.captions[j][c % len(self.pairs.captions[j])]  # the substitute's own caption
        rng = random.Random(seed)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU generator only (torch.manual_seed also seeds CUDA, slowly)
            out = {"image": self.t_main(img), "text": caption, "index": j, "skipped": attempt}
            if self.second_view:
                out["image_aug"] = self.t_aug(img)
                out["text_aug"] = eda(caption, rng, self.eda_alpha)
        return out


class Collate:
    """Stack images (uint8) and tokenize captions (and their EDA views) into padded id / mask tensors;
    "skipped": the images substituted in this batch (int64 scalar). pad_to_max=True pads every caption
    to max_len tokens (fixed shapes, e.g. so that torch.compile compiles once), else to the batch's
    longest."""

    def __init__(self, tokenizer, max_len: int, pad_to_max: bool = False):
        self.tokenizer, self.max_len, self.pad_to_max = tokenizer, max_len, pad_to_max

    def tokenize(self, texts):
        t = self.tokenizer(texts, padding="max_length" if self.pad_to_max else True, truncation=True,
                           max_length=self.max_len, return_tensors="pt")
        return t["input_ids"], t["attention_mask"]

    def __call__(self, items):
        batch = {"image": torch.stack([x["image"] for x in items]),
                 "index": torch.tensor([x["index"] for x in items]),
                 "skipped": torch.tensor(sum(x["skipped"] for x in items), dtype=torch.int64)}
        batch["input_ids"], batch["attention_mask"] = self.tokenize([x["text"] for x in items])
        if "image_aug" in items[0]:
            batch["image_aug"] = torch.stack([x["image_aug"] for x in items])
            batch["input_ids_aug"], batch["attention_mask_aug"] = self.tokenize([x["text_aug"] for x in items])
        return batch


def resolve_workers(num_workers: int) -> int:
    """--num-workers: n >= 0 as given; -1 = auto: min(CPU cores - 1, 8), at least 0 (the cores this process
    may use, so a container's or `taskset`'s share: one core is left to the training process)."""
    if num_workers == -1:
        return max(0, min(_cores() - 1, 8))
    if num_workers < 0:
        raise ValueError(f"--num-workers {num_workers}: use -1 (auto), 0 (load in the main process) or a "
                         f"count")
    return num_workers


def _worker_init(_worker_id):
    """DataLoader workers ignore SIGINT and SIGTERM: Ctrl-C (sent to the whole process group) or a scheduler's
    SIGTERM reaches the trainer alone, which finishes its step and checkpoints; the workers exit when the
    trainer closes the loader or exits (PyTorch's workers watch their parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainLoader(DataLoader):
    """A DataLoader with `close()`: stops its persistent workers (and frees their prefetched batches) now,
    e.g. before the final evaluation; iterating again afterwards starts new workers."""

    def __iter__(self):
        _OPEN_LOADERS.add(self)
        return super().__iter__()

    def close(self):
        it, self._iterator = getattr(self, "_iterator", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


_OPEN_LOADERS = weakref.WeakSet()


@atexit.register
def _close_loaders():
    """At interpreter exit, stop the workers of the loaders still open the normal way. Otherwise
    multiprocessing's exit handler would stop them with SIGTERM, which they ignore, and wait for them."""
    for loader in list(_OPEN_LOADERS):
        loader.close()


def train_loader(pairs, tokenizer, args, batch_size, seed, start_step=0, second_view=True, pad_to_max=False,
                 rank=0, world=1):
    """The DataLoader every trainer uses: endless, deterministic from (seed, start_step).

    Under torchrun (world = K processes), batch_size is the global batch: each process loads its
    batch_size / K pairs of every step, disjoint, and together the one-process batch (StepSampler).

    Batches: uint8 images (pinned when CUDA is available), token ids and masks, "index", "skipped"; move
    them with `to_device`. resolve_workers(args.num_workers) persistent worker processes, 2 batches
    prefetched each, Ctrl-C ignored in them (`_worker_init`); `loader.close()` stops them.
    """
    if batch_size > len(pairs) and not getattr(args, "allow_repeats", False):
        flag_error(f"--batch-size {batch_size} is larger than the {len(pairs)} training images: a batch would "
                   f"hold some images twice (false negatives). Lower --batch-size, or pass --allow-repeats")
    workers = resolve_workers(args.num_workers)
    return TrainLoader(TrainPairs(pairs, args.image_size, second_view), batch_size=batch_size // world,
                       sampler=StepSampler(pairs, batch_size, seed, start_step, rank, world),
                       collate_fn=Collate(tokenizer, args.max_len, pad_to_max), num_workers=workers,
                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, drop_last=True,
                       generator=torch.Generator().manual_seed(seed),  # never draws from the global RNG
                       prefetch_factor=2 if workers > 0 else None,
                       worker_init_fn=_worker_init if workers > 0 else None)


# ----------------------------------------------------------------------------------------------
# 8. Command line: export and benchmark the synthetic data
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="Synthetic benchmark tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the synthetic benchmark in the Karpathy JSON layout")
    ex.add_argument("--out", required=True)
    ex.add_argument("--n-train", type=int, default=5000)
    ex.add_argument("--image-size", type=int, default=64)
    be = sub.add_parser("bench", help="images/s of the synthetic generator alone")
    be.add_argument("--n", type=int, default=2000)
    be.add_argument("--image-size", type=int, default=DataArgs.image_size)
    a = p.parse_args(argv)
    if a.cmd == "export":
        export_karpathy(a.out, n_train=a.n_train, size=a.image_size)
        print(f"wrote {a.out}/dataset_synthetic.json and {a.out}/images/")
    else:
        t0 = time.perf_counter()
        ps = SynthPairSet("train", a.n, size=a.image_size)
        t1 = time.perf_counter()
        for i in range(a.n):
            ps.load_image(i)
        t2 = time.perf_counter()
        print(f"captions+attributes: {a.n / (t1 - t0):,.0f} images/s; rendering at {a.image_size}px: "
              f"{a.n / (t2 - t1):,.0f} images/s (one core)")


if __name__ == "__main__":
    main()
