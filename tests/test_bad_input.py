"""Bad data files and folders: each is refused at start with one error naming the file (or folder) and what was
expected, or skipped and counted, never turned into a silent wrong result or a crash after training.

- data files of the wrong shape: a Karpathy JSON cut short, a list, an entry without a key; ALBEF lists; a CSV
  that is not UTF-8 (the error names the file and the line);
- a split the run evaluates without any image (Karpathy test or val split, a --classify folder, the
  ImageFolder of eval.py --zeroshot-folder), refused before training;
- image paths outside --data-root (../, absolute paths, symlinks; in CSV, Karpathy and webdataset folders)
  skipped and counted unless --allow-outside-root.
A few cases run clip_base.py in a subprocess, as a user meets them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
from conftest import PALETTE, write_jpeg
from tiny import ONE_THREAD, ROOT, tiny_args


def dargs(**kw) -> data.DataArgs:
    return data.DataArgs(**{"image_size": 32, "num_workers": 0, **kw})


def edit_karpathy(root: Path, change) -> Path:
    """Rewrite root/dataset_tiny.json (the conftest karpathy_dir) as change(its parsed content) returns it."""
    path = root / "dataset_tiny.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return path


def run_clip_base(tmp_path, *flags):
    """clip_base.py with the tiny flags and 2 steps, as a user runs it: (exit status, stderr, files written)."""
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, "clip_base.py", *tiny_args(out, "--steps", 2, *flags)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    return done.returncode, done.stderr, sorted(p.name for p in out.rglob("*")) if out.exists() else []


# ----------------------------------------------------------------------------------------------
# Data files of the wrong shape
# ----------------------------------------------------------------------------------------------
def test_karpathy_file_cut_short_fails_the_run_naming_the_file(karpathy_dir, tmp_path):
    path = karpathy_dir / "dataset_tiny.json"
    path.write_bytes(path.read_bytes()[:700])
    code, err, written = run_clip_base(tmp_path, "--data", "karpathy", "--data-root", karpathy_dir)
    assert code != 0 and "checkpoint.pt" not in written
    last = err.strip().splitlines()[-1]
    assert str(path) in last and "cut short" in last and '"images"' in last


def bad_karpathy(spec):
    """(what the file holds, how to make it from the parsed good file)."""
    def drop(key, sentence=False):
        def change(doc):
            entry = doc["images"][3]
            del (entry["sentences"][0] if sentence else entry)[key]
            return doc
        return change
    return {"a top-level list": lambda doc: doc["images"],
            "no images key": lambda doc: {"dataset": "tiny"},
            "no split": drop("split"), "no filename": drop("filename"), "no sentences": drop("sentences"),
            "no raw": drop("raw", sentence=True), "sentences as strings": lambda doc: {
                "images": [{**im, "sentences": [s["raw"] for s in im["sentences"]]} for im in doc["images"]]}}[spec]


@pytest.mark.parametrize("spec, says", [("a top-level list", "the top level is a list"),
                                        ("no images key", "keys ['dataset']"),
                                        ("no split", "entry 3 of \"images\" has no 'split'"),
                                        ("no filename", "entry 3 of \"images\" has no 'filename'"),
                                        ("no sentences", "entry 3 of \"images\" has no 'sentences'"),
                                        ("no raw", "entry 3 of \"images\" has no 'raw'"),
                                        ("sentences as strings", "entry 0 of \"images\" is not laid out")])
def test_karpathy_file_of_the_wrong_shape_is_one_clear_error(karpathy_dir, spec, says):
    path = edit_karpathy(karpathy_dir, bad_karpathy(spec))
    with pytest.raises(ValueError) as e:
        data.load_karpathy(dargs(data_root=str(karpathy_dir)))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and says in msg and data.KARPATHY_LAYOUT in msg


def test_albef_file_of_the_wrong_shape_is_one_clear_error(tmp_path):
    write_jpeg(tmp_path / "images" / "0.jpg", PALETTE[0])
    good = {"image": "images/0.jpg", "caption": "a red square"}
    for content, says in (({"images": [good]}, "the top level is an object, not a list"),
                          ([good, {"image": "images/0.jpg"}], "entry 1 has no 'caption'"),
                          ([good, {"image": ["images/0.jpg"], "caption": "x"}], "'image' is a list, not a path"),
                          ('[{"image": "images/0.jpg", "capt', "not valid JSON at line 1")):
        path = tmp_path / "coco_train.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError) as e:
            data.load_albef(dargs(data_root=str(tmp_path)))
        assert str(e.value).startswith(f"{path}: ") and says in str(e.value) and data.ALBEF_LAYOUT in str(e.value)


def test_csv_that_is_not_utf8_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes(b"filepath,title\nimgs/a.jpg,a red square\nimgs/b.jpg,caf\xe9 au lait\n")
    with pytest.raises(ValueError) as e:
        data.load_csv(dargs(data_root=str(tmp_path)))
    assert str(e.value).startswith(f"{path}: not UTF-8 text (line 3: byte 0xe9 at column 15)")


# ----------------------------------------------------------------------------------------------
# A split the run evaluates without any image
# ----------------------------------------------------------------------------------------------
def test_karpathy_without_test_images_fails_before_training(karpathy_dir, tmp_path):
    path = edit_karpathy(karpathy_dir, lambda doc: {"images": [im for im in doc["images"] if im["split"] != "test"]})
    code, err, written = run_clip_base(tmp_path, "--data", "karpathy", "--data-root", karpathy_dir)
    assert code != 0 and "checkpoint.pt" not in written and "metrics.json" not in written
    assert f"{path}: this --data karpathy dataset has no test split" in err.strip().splitlines()[-1]


def test_karpathy_without_val_images_fails_with_eval_split_val(karpathy_dir):
    path = edit_karpathy(karpathy_dir, lambda doc: {"images": [im for im in doc["images"] if im["split"] != "val"]})
    for build in (data.build_data, data.build_eval_suite):
        with pytest.raises(ValueError, match=f"^{path}: this --data karpathy dataset has no val split .*"
                                             f"--eval-split test"):
            build(dargs(data="karpathy", data_root=str(karpathy_dir), eval_split="val"))
    data.build_eval_suite(dargs(data="karpathy", data_root=str(karpathy_dir)))   # the test split is there


def empty_image_folder(root: Path) -> Path:
    """Class folders that hold no image (a text file each)."""
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        (root / c / "readme.txt").write_text("no image here")
    return root


def test_classify_folder_without_images_fails_before_training(tmp_path):
    folder = empty_image_folder(tmp_path / "animals")
    code, err, written = run_clip_base(tmp_path, "--classify", f"folder={folder}")
    assert code != 0 and "checkpoint.pt" not in written
    last = err.strip().splitlines()[-1]
    assert "no usable image in zero-shot animals [animals-test]" in last and f"ImageFolder {str(folder)!r}" in last


def test_image_folder_checked_for_every_part_it_evaluates(tmp_path):
    # eval.py --zeroshot-folder DIR builds data.folder_suite(DIR, args): it fails as --classify does
    folder = empty_image_folder(tmp_path / "animals")
    with pytest.raises(ValueError, match="train 0, val 0, test 0"):
        data.folder_suite(str(folder), dargs())
    for j in range(4):   # 4 images per class: train and val, no test part
        write_jpeg(folder / "cat" / f"{j}.jpg", PALETTE[j])
    with pytest.raises(ValueError, match=r"no usable image in zero-shot animals \[animals-test\], "
                                         r"probe animals \(test\) \[animals-test\]; .*train 3, val 1, test 0"):
        data.folder_suite(str(folder), dargs())
    with pytest.raises(ValueError, match=r"probe animals \(test\)"):   # val: the odd half of 1 image is empty
        data.folder_suite(str(folder), dargs(eval_split="val"))
    write_jpeg(folder / "dog" / "0.jpg", PALETTE[5])
    for j in range(4, 10):   # 10 images: 2 val (one for each half) and 2 test
        write_jpeg(folder / "cat" / f"{j}.jpg", PALETTE[j])
    for split in ("test", "val"):
        suite = data.folder_suite(str(folder), dargs(eval_split=split))
        assert len(suite.zeroshot["animals"].images) == 2 and len(suite.probes["animals"].train) == 7


def test_check_eval_suite_names_every_empty_set():
    full, empty = data.PairSet("full", ["a"], [["x"]]), data.PairSet("none", [], [])
    ok = data.EvalSuite(full, {"c": data.LabelSet(["a"], ["{}"], full, "c")})
    assert data.check_eval_suite(ok) is ok
    bad = data.EvalSuite(empty, {"c": data.LabelSet(["a"], ["{}"], empty, "c")},
                         {"p": data.ProbeTask("p", ["a"], "image", full, empty, full)})
    with pytest.raises(ValueError, match=r"no usable image in retrieval \[none\], zero-shot c \[none\], "
                                         r"probe p \(val\) \[none\]; a hint$"):
        data.check_eval_suite(bad, "a hint")


# ----------------------------------------------------------------------------------------------
# Image paths outside --data-root
# ----------------------------------------------------------------------------------------------
def test_csv_paths_outside_the_data_root_are_skipped_and_counted(tmp_path):
    root, outside = tmp_path / "table", tmp_path / "elsewhere"
    for k in "abcdef":
        write_jpeg(root / "imgs" / f"{k}.jpg", PALETTE["abcdef".index(k)])
    for k in "xyz":
        write_jpeg(outside / f"{k}.jpg", PALETTE[8])
    (root / "imgs" / "link.jpg").symlink_to(outside / "z.jpg")
    (root / "imgs" / "inner.jpg").symlink_to(root / "imgs" / "a.jpg")            # a symlink inside: fine
    rows = ["imgs/a.jpg", "../elsewhere/x.jpg", str(outside / "y.jpg"), "imgs/link.jpg", "imgs/inner.jpg",
            "imgs/b.jpg", "imgs/c.jpg", "imgs/d.jpg", "imgs/e.jpg", "imgs/f.jpg"]
    (root / "t.csv").write_text("filepath,title\n" + "".join(f"{p},caption {i}\n" for i, p in enumerate(rows)))
    train = data.load_csv(dargs(data_root=str(root)))["train"]               # the last two rows: val, test
    assert [os.path.basename(r) for r in train.refs] == ["a.jpg", "inner.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert train.report == {data.OUTSIDE_SKIPPED: 3}
    allowed = data.load_csv(dargs(data_root=str(root), allow_outside_root=True))["train"]
    assert len(allowed) == 8 and allowed.report == {}


def test_karpathy_paths_outside_the_data_root_are_skipped_and_counted(karpathy_dir, tmp_path):
    write_jpeg(tmp_path / "secret.jpg", PALETTE[0])

    def escape(doc):
        doc["images"][0]["filename"] = "../../secret.jpg"                    # train2014/../../secret.jpg
        doc["images"][1]["filepath"] = str(tmp_path)                           # an absolute folder elsewhere
        doc["images"][1]["filename"] = "secret.jpg"
        return doc
    edit_karpathy(karpathy_dir, escape)
    train = data.load_karpathy(dargs(data_root=str(karpathy_dir)))["train"]
    assert len(train) == 5 and train.report == {data.OUTSIDE_SKIPPED: 2}
    assert len(data.load_karpathy(dargs(data_root=str(karpathy_dir), allow_outside_root=True))["train"]) == 7


def test_webdataset_symlinks_outside_the_folder_never_reach_the_tokenizer(tmp_path):
    root, outside = tmp_path / "wds", tmp_path / "private"
    outside.mkdir()
    (outside / "notes.txt").write_text("zyzzyva zyzzyva zyzzyva")
    write_jpeg(outside / "photo.jpg", PALETTE[1])
    for i in range(8):
        write_jpeg(root / "00000" / f"{i:03d}.jpg", PALETTE[i])
        (root / "00000" / f"{i:03d}.txt").write_text(f"square number {i} square")
    (root / "00000" / "000.txt").unlink()
    (root / "00000" / "000.txt").symlink_to(outside / "notes.txt")          # a caption file pointing outside
    (root / "00000" / "001.jpg").unlink()
    (root / "00000" / "001.jpg").symlink_to(outside / "photo.jpg")          # an image pointing outside
    splits = data.load_wds(dargs(data="wds", data_root=str(root)))
    assert splits["train"].report == {data.OUTSIDE_FILES: 2, "images without a caption skipped": 1,
                                      "captions without an image skipped": 1}
    words = set(data.caption_vocabulary(splits["train"].texts))
    assert "square" in words and "zyzzyva" not in words
    allowed = data.load_wds(dargs(data="wds", data_root=str(root), allow_outside_root=True))["train"]
    assert "zyzzyva" in data.caption_vocabulary(allowed.texts) and allowed.report == {}
