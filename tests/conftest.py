"""Shared test helpers: tiny image writers and a small Karpathy-layout dataset in tmp_path.

Everything here is written by the tests themselves (never a real dataset).

Helpers (plain functions, also reachable through the `imgs` fixture):
    write_jpeg / write_png / write_gray_jpeg / write_cmyk_jpeg / write_rgba_png
    write_corrupt (random bytes) / write_truncated_jpeg (a real JPEG cut short)
    jpeg_bytes (encoded bytes, e.g. for tar shards), mean_colour (of a PIL image), PALETTE
Fixtures:
    imgs            namespace of the helpers above
    one_thread      torch on one thread for the test (tiny tensors: no contention on a shared machine)
    tokenizer       the synthetic benchmark's generated word-level tokenizer (module scope)
    karpathy_spec   what `karpathy_dir` writes: list of dicts (split, filepath, filename, colour, captions)
    karpathy_dir    a Karpathy split JSON (COCO style: train2014/ + val2014/) with 12 JPEGs of 32 px,
                    2-5 captions each, in train / restval / val / test; returns the data root (Path)
"""
import io
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# 12 clearly distinct colours (JPEG keeps a solid colour within a few levels)
PALETTE = [(220, 30, 30), (30, 180, 40), (40, 60, 220), (230, 210, 40), (200, 40, 200), (40, 200, 210),
           (250, 140, 20), (120, 70, 20), (20, 20, 20), (240, 240, 240), (128, 128, 128), (150, 200, 90)]


def jpeg_bytes(colour=(220, 30, 30), size=32, mode="RGB", quality=95) -> bytes:
    """A solid-colour JPEG, encoded (colour is a tuple for RGB/CMYK, an int for L)."""
    buf = io.BytesIO()
    Image.new(mode, (size, size), colour).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg(path, colour=(220, 30, 30), size=32, mode="RGB", quality=95) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(colour, size, mode, quality))
    return path


def write_png(path, colour=(220, 30, 30), size=32, mode="RGB") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(path, "PNG")
    return path


def write_gray_jpeg(path, level=100, size=32) -> Path:
    return write_jpeg(path, level, size, mode="L")


def write_cmyk_jpeg(path, cmyk=(0, 255, 255, 0), size=32) -> Path:
    """(0, 255, 255, 0) reads back (through data.to_rgb) as pure red."""
    return write_jpeg(path, cmyk, size, mode="CMYK")


def write_rgba_png(path, colour=(40, 60, 220), size=32) -> Path:
    """Left half fully transparent, right half opaque `colour` (composited on white: white | colour)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    img.paste((*colour, 255), (size // 2, 0, size, size))
    img.save(path, "PNG")
    return path


def write_corrupt(path, n=400, seed=0) -> Path:
    """Random bytes under an image name (PIL: UnidentifiedImageError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(n))
    return path


def write_truncated_jpeg(path, size=64) -> Path:
    """A real (noisy, so non-trivial) JPEG with its second half cut off (PIL: OSError on load)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    img = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    raw = buf.getvalue()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def mean_colour(img) -> tuple:
    """Mean (R, G, B) of a PIL image."""
    import numpy as np
    return tuple(float(v) for v in np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0))


@pytest.fixture
def imgs():
    return SimpleNamespace(jpeg=write_jpeg, png=write_png, gray_jpeg=write_gray_jpeg, cmyk_jpeg=write_cmyk_jpeg,
                           rgba_png=write_rgba_png, corrupt=write_corrupt, truncated_jpeg=write_truncated_jpeg,
                           jpeg_bytes=jpeg_bytes, mean_colour=mean_colour, palette=PALETTE)


_COLOUR_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "brown", "black", "white",
                 "gray", "olive"]
_SPLITS = ["train"] * 5 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 3
_N_CAPS = [2, 3, 4, 5, 3, 2, 5, 4, 3, 2, 5, 4]


@pytest.fixture
def karpathy_spec():
    """12 images: 5 train, 2 restval, 2 val, 3 test; image i is a solid PALETTE[i] square with
    _N_CAPS[i] (2-5) captions that all name its colour and its number."""
    spec = []
    for i, (split, n) in enumerate(zip(_SPLITS, _N_CAPS)):
        folder = "val2014" if split in ("val", "test") else "train2014"
        name = _COLOUR_NAMES[i]
        caps = [f"a {name} square number {i}.", f"a photo of a {name} block, number {i}.",
                f"the {name} picture {i} variant two", f"an image that is all {name} ({i})",
                f"plain {name} colour number {i} again"][:n]
        spec.append(dict(split=split, filepath=folder, filename=f"COCO_{folder}_{i:012d}.jpg",
                         colour=PALETTE[i], captions=caps))
    return spec


@pytest.fixture
def karpathy_dir(tmp_path, karpathy_spec):
    """tmp_path/karpathy/{dataset_tiny.json, train2014/*.jpg, val2014/*.jpg}; returns that root."""
    root = tmp_path / "karpathy"
    images, sentid = [], 0
    for i, s in enumerate(karpathy_spec):
        write_jpeg(root / s["filepath"] / s["filename"], s["colour"], size=32)
        sents = [{"raw": c, "tokens": c.lower().rstrip(".").split(), "imgid": i, "sentid": sentid + k}
                 for k, c in enumerate(s["captions"])]
        sentid += len(sents)
        images.append({"filepath": s["filepath"], "filename": s["filename"], "split": s["split"], "imgid": i,
                       "cocoid": 1000 + i, "sentids": [x["sentid"] for x in sents], "sentences": sents})
    (root / "dataset_tiny.json").write_text(json.dumps({"dataset": "tiny", "images": images}))
    return root


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    import data
    return data.build_tokenizer(data.DataArgs())
