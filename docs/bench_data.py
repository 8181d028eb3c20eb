"""Start-up and input-pipeline benchmarks of data.py (the numbers of docs/benchmarks.md, "Start-up and input
pipeline (CPU)").

    python docs/bench_data.py startup --sizes 10000,100000,1000000   # launch to first step, 4 layouts, old vs new
    python docs/bench_data.py loader                                # loader pairs/s at 224 px, bytes per batch
    python docs/bench_data.py estimate                              # pairs/s a GPU step would consume (estimate)
    python docs/bench_data.py generate --n 10000 --out DIR          # one synthetic dataset in every layout

`startup` writes synthetic datasets of N pairs (one caption each, 32-px JPEGs: one encoded JPEG per colour,
so writing a million takes a minute or two) under --work (default /tmp/bench_data, never the repository), in
all four on-disk layouts the loaders read:

    DIR/files/SSSSS/KKKKKKKKK.{jpg,txt}   img2dataset output extracted to files (`--data wds`, 10,000 per folder)
    DIR/shards/SSSSS.tar                  the same pairs as webdataset shards (`--data wds`), .jpg/.txt/.json
    DIR/karpathy/dataset_bench.json       Karpathy split JSON over DIR/files (`--data karpathy`); the last
                                          min(5,000, 5%) images are test, the min(5,000, 5%) before them val
    DIR/csv/captions.csv                  filepath,title rows over DIR/files (`--data csv`)

and times, in a fresh Python process per measurement, launch to the first optimizer step of `clip_base.py`'s
model at its defaults (32 px, batch 128, `--num-workers 1`): interpreter start + imports, `build_data`
(indexing and checks), `build_tokenizer` (the `auto` vocabulary from the training captions), building the model
and optimizer, the first batch from `train_loader`, and one training step. It is measured in-process (the same
calls, in the same order, as the script's main()) rather than as `python clip_base.py`, which would also run
the final evaluation. "old" is data.py as of commit 677adcd (`git show 677adcd:data.py`: every image decoded
at start, `tarfile` and `glob` indexing, float32 workers), imported from a temporary file as a separate
module; "new" is the working tree's data.py. The generated data is deleted at the end (`--keep` keeps it).
Every file is read once (untimed) before a size's measurements, so old and new start from a warm page cache.

`loader` saves --n-files synthetic renders as 256-px JPEGs under --work and measures `train_loader`'s pairs/s
at 224 px (two views, as the two-tower scripts load them), old and new, from those files and from the
synthetic generator, for each of --workers; the timed batches come after the prefetch queue has drained once
(the steady state). It also prints the bytes of a two-view batch of 256 (uint8 vs float32), the host memory
in flight with 8 workers, the old start-up check's cost per image, and `to_device`'s cost on the CPU.
`estimate` prints the pairs/s a ResNet-50 + BERT-base step would consume on an H100 (arithmetic, no run).
"""
import argparse
import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

T_LAUNCH = time.perf_counter()  # as early as possible: the child's clock starts here (the parent's at spawn)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LAYOUTS = {  # layout -> (DataArgs for a dataset written by generate() under DIR)
    "karpathy": lambda d: dict(data="karpathy", data_root=d, ann_file=os.path.join(d, "karpathy", "dataset_bench.json")),
    "wds-tar": lambda d: dict(data="wds", data_root=os.path.join(d, "shards")),
    "wds-files": lambda d: dict(data="wds", data_root=os.path.join(d, "files")),
    "csv": lambda d: dict(data="csv", data_root=d, ann_file=os.path.join(d, "csv", "captions.csv")),
}
PER_FOLDER = 10_000
COLOURS = [(220, 30, 30), (30, 180, 40), (40, 60, 220), (230, 210, 40), (200, 40, 200), (40, 200, 210),
           (250, 140, 20), (120, 70, 20), (20, 20, 20), (240, 240, 240), (128, 128, 128), (150, 200, 90)]


# ============================== synthetic datasets in every layout ===========================
def _jpegs(size=32):
    from PIL import Image
    out = []
    for c in COLOURS:
        buf = io.BytesIO()
        Image.new("RGB", (size, size), c).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _words(n=3000, seed=0):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _caption(rng, words, cum):
    # Zipf word frequencies (p ∝ 1/rank), 6-14 words: roughly a CC3M caption's length
    return " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(6, 14)))


def _tar_member(name, payload):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 1_700_000_000, 0o644
    return info.tobuf(tarfile.GNU_FORMAT) + payload + b"\0" * (-len(payload) % 512)


def generate(out, n, seed=0):
    """Write n pairs in the four layouts under `out` (see the module docstring)."""
    rng, words, jpegs = random.Random(seed), _words(), _jpegs()
    cum = list(itertools.accumulate(1 / (r + 1) for r in range(len(words))))
    n_eval = min(5000, n // 20)
    images, rows = [], ["filepath,title"]
    for s in range(0, n, PER_FOLDER):
        shard = f"{s // PER_FOLDER:05d}"
        os.makedirs(os.path.join(out, "files", shard), exist_ok=True)
        os.makedirs(os.path.join(out, "shards"), exist_ok=True)
        with open(os.path.join(out, "shards", shard + ".tar"), "wb") as tf:
            for i in range(s, min(s + PER_FOLDER, n)):
                key, cap, jpg = f"{i:09d}", _caption(rng, words, cum), jpegs[i % len(jpegs)]
                base = os.path.join(out, "files", shard, key)
                with open(base + ".jpg", "wb") as f:
                    f.write(jpg)
                with open(base + ".txt", "w") as f:
                    f.write(cap)
                meta = json.dumps({"key": key, "status": "success", "caption": cap}).encode()
                tf.write(_tar_member(key + ".jpg", jpg) + _tar_member(key + ".txt", cap.encode())
                         + _tar_member(key + ".json", meta))
                split = "test" if i >= n - n_eval else ("val" if i >= n - 2 * n_eval else "train")
                images.append({"filepath": f"files/{shard}", "filename": key + ".jpg", "split": split,
                               "imgid": i, "sentences": [{"raw": cap, "imgid": i, "sentid": i}]})
                rows.append(f"files/{shard}/{key}.jpg,{cap}")
            tf.write(b"\0" * 1024)
    os.makedirs(os.path.join(out, "karpathy"), exist_ok=True)
    with open(os.path.join(out, "karpathy", "dataset_bench.json"), "w") as f:
        json.dump({"dataset": "bench", "images": images}, f)
    os.makedirs(os.path.join(out, "csv"), exist_ok=True)
    with open(os.path.join(out, "csv", "captions.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


# ============================== launch to first step (one child process per measurement) ==================
OLD_REV = "677adcd"  # the last commit before the lazy checks, the parallel index and the uint8 workers


def _import_old_data(path=""):
    """The old data.py (the file `path`, default: as committed in OLD_REV), imported as the module `data_old`."""
    if path:
        with open(path) as f:
            src = f.read()
    else:
        src = subprocess.run(["git", "show", f"{OLD_REV}:data.py"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="data_old_"), "data_old.py")
    with open(path, "w") as f:
        f.write(src)
    sys.path.insert(0, os.path.dirname(path))
    import data_old
    return data_old


def first_step(impl, layout, root, old_data=""):
    """In this fresh process: clip_base's start-up calls, in main()'s order, timed one by one (JSON on stdout)."""
    t = {"imports": time.perf_counter()}
    import torch
    D = _import_old_data(old_data) if impl == "old" else __import__("data")
    import clip_base
    args = clip_base.Args(**LAYOUTS[layout](root), num_workers=1)  # the old default; the new auto on 2 cores
    torch.manual_seed(args.seed)
    t["build_data"] = time.perf_counter()
    train, suite = D.build_data(args)
    t["build_tokenizer"] = time.perf_counter()
    tok = D.build_tokenizer(args, train)
    t["model"] = time.perf_counter()
    device = torch.device("cpu")
    model = clip_base.build_model(args, tok).to(device)
    optimizer, scheduler = clip_base.make_optimizer(model, args, device)
    t["first_batch"] = time.perf_counter()
    loader = D.train_loader(train, tok, args, args.batch_size, args.seed)
    batch = next(iter(loader))
    t["step"] = time.perf_counter()
    batch = D.to_device(batch, device)[0] if impl == "new" else {k: v.to(device) for k, v in batch.items()}
    terms = clip_base.compute_losses(model, batch, args)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    scheduler.step()
    t["end"] = time.perf_counter()
    keys = list(t)
    out = {k: t[n] - t[k] for k, n in zip(keys, keys[1:])}
    out.update(done=time.time(), launch_to_imports=t["imports"] - T_LAUNCH, n_train=len(train),
               n_eval=len(suite.retrieval) if suite.retrieval is not None else 0)
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # the measurement is over: no wait for the loader's worker to be torn down


def measure(impl, layout, root, timeout, old_data=""):
    """Spawn `first_step` and time launch -> first optimizer step done (the parent's clock at spawn)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "_first-step", impl, layout, root,
                        "--old-data", old_data], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{impl} {layout} {root}: exit {p.returncode}\n{p.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["launch_to_step"] = r["done"] - t0
    return r


def warm(root):
    """Read every file under root once (untimed), so that old and new code both start from a warm page cache."""
    n, size = 0, 0
    for folder, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(folder, f), "rb") as fh:
                while chunk := fh.read(1 << 20):
                    size += len(chunk)
            n += 1
    return n, size


def startup(a):
    sizes = [int(x) for x in a.sizes.split(",")]
    old_max = a.old_max or max(sizes)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; `df -h {a.work}` before: {shutil.disk_usage('/tmp').free / 2**30:.0f} GiB free",
          flush=True)
    rows = []
    for n in sizes:
        root = os.path.join(a.work, f"n{n}")
        if not os.path.isdir(root):
            t = time.perf_counter()
            generate(root, n)
            print(f"# generated {n} pairs in {time.perf_counter() - t:.0f} s under {root}", flush=True)
        t = time.perf_counter()
        files, size = warm(root)
        print(f"# read {files} files ({size / 2**30:.1f} GiB) once to warm the page cache: "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        for layout in LAYOUTS:
            for impl in ("old", "new"):
                if impl == "old" and n > old_max:
                    continue
                r = measure(impl, layout, root, a.timeout, a.old_data)
                rows.append(dict(n=n, layout=layout, impl=impl, **r))
                print(json.dumps(rows[-1]), flush=True)
        if not a.keep:
            shutil.rmtree(root)
    print(startup_table(rows))


def startup_table(rows):
    """Markdown: launch -> first step and its phases; 'start' = interpreter start and imports (torch, data,
    clip_base), 'step' = to_device (new) or the plain copy (old) + one forward/backward/optimizer step."""
    head = ("| pairs | layout | data.py | launch → first step (s) | start | build_data | tokenizer | model | "
            "first batch | step | training pairs |\n| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | "
            "---: | ---: |")
    lines = [f"| {r['n']:,} | {r['layout']} | {r['impl']} | **{r['launch_to_step']:.1f}** | "
             f"{r['launch_to_step'] - sum(r[k] for k in ('build_data', 'build_tokenizer', 'model', 'first_batch', 'step')):.1f} | "
             f"{r['build_data']:.1f} | {r['build_tokenizer']:.1f} | {r['model']:.1f} | {r['first_batch']:.1f} | "
             f"{r['step']:.1f} | {r['n_train']:,} |" for r in rows]
    return "\n".join([head] + lines)


# ============================== input pipeline at 224 px =====================================================
def loader_bench(a):
    """Pairs/s of train_loader at 224 px (two views, as the two-tower scripts load them), from JPEG files and
    from the synthetic generator, for each worker count; the bytes of one batch of 256, uint8 vs float32."""
    import torch
    import data
    torch.set_num_threads(1)  # as in the workers (PyTorch sets it there): no OpenMP spinning in the main process
    old = _import_old_data(a.old_data)
    tok = data.word_tokenizer(data.synth_vocabulary())
    work = os.path.join(a.work, "jpeg224")
    os.makedirs(work, exist_ok=True)
    synth = data.SynthPairSet("train", a.n_files, size=256)
    refs = []
    for i in range(a.n_files):  # synthetic renders (shapes, texture, sensor noise) saved as 256-px JPEGs
        path = os.path.join(work, f"{i:06d}.jpg")
        if not os.path.exists(path):
            synth.load_image(i).save(path, quality=90)
        refs.append(path)
    files = data.clean_pairs("jpeg224", refs, synth.captions, verify=False)
    t = time.perf_counter()
    files_old = old.clean_pairs("jpeg224", refs, synth.captions, verify=True)  # the old start-up decode pass
    check_ms = (time.perf_counter() - t) / len(refs) * 1e3
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; {a.n_files} 256-px JPEGs "
          f"({sum(os.path.getsize(r) for r in refs) / len(refs) / 1024:.1f} KiB each)", flush=True)
    print(f"the old start-up check (decode every image, 8 threads, draft at 64 px): {check_ms:.2f} ms per image")

    args = data.DataArgs(image_size=224, num_workers=0)
    item = data.TrainPairs(files, 224)[(0, 0, 0)]
    per_pair_u8 = item["image"].nbytes + item["image_aug"].nbytes
    mib = 256 * per_pair_u8 / 2**20
    print(f"bytes per two-view batch of 256 at 224 px: uint8 {mib:.1f} MiB, float32 {4 * mib:.1f} MiB; "
          f"in flight with 8 workers: new (uint8, prefetch 2) {8 * 2 * mib / 1024:.2f} GiB, "
          f"old (float32, prefetch 4) {8 * 4 * 4 * mib / 1024:.2f} GiB (each plus one pinned copy on CUDA)")
    rows = []
    sources = [("JPEG files", files, files_old, a.batches), ("synthetic generator", data.SynthPairSet(
        "train", 4096, size=224), old.SynthPairSet("train", 4096, size=224), a.synth_batches)]
    for name, ps, ps_old, n_batches in sources:
        for workers in [int(w) for w in a.workers.split(",")]:
            for impl, mod, pairs, prefetch in (("new (uint8)", data, ps, 2), ("old (float32)", old, ps_old, 4)):
                args = mod.DataArgs(image_size=224, num_workers=workers)
                loader = mod.train_loader(pairs, tok, args, a.batch_size, seed=0)
                it = iter(loader)
                # warm-up: the batches prefetched while the workers start, and one more round, so that the
                # timed batches are produced while timed (the steady state), not taken from a full queue
                for _ in range(max(1, workers * prefetch + workers)):
                    next(it)
                t = time.perf_counter()
                for _ in range(n_batches):
                    next(it)
                dt = time.perf_counter() - t
                if hasattr(loader, "close"):
                    loader.close()
                del loader, it
                rows.append((name, workers, impl, n_batches * a.batch_size / dt))
                print(f"{name} | {workers} | {impl} | {rows[-1][3]:.1f} pairs/s", flush=True)
    print("| source | workers | pipeline | pairs/s |\n| --- | ---: | --- | ---: |")
    for name, w, impl, v in rows:
        print(f"| {name} | {w} | {impl} | {v:.1f} |")
    big = {k: v.repeat(16, *[1] * (v.ndim - 1)) if v.ndim else v for k, v in
           next(iter(data.train_loader(files, tok, data.DataArgs(image_size=224, num_workers=0), 16, 0))).items()}
    t = time.perf_counter()
    for _ in range(3):
        data.to_device(big, "cpu")
    print(f"to_device on the CPU (one thread), batch of 256 two-view pairs at 224 px: "
          f"{(time.perf_counter() - t) / 3 * 1e3:.0f} ms (on a GPU: the copy, then the same on the device)")


def estimate():
    """Pairs/s a ResNet-50 + BERT-base two-tower step at 224 px, 32 tokens, would consume on one H100 (an estimate)."""
    peak, mfu = 989e12, 0.40
    bert = 2 * 110e6 * 32
    print(f"H100 SXM dense bf16 peak {peak / 1e12:.0f} TFLOP/s at {mfu:.0%} MFU = {peak * mfu / 1e12:.0f} TFLOP/s used")
    print("| ResNet-50 forward counted as | views per pair | GFLOP per pair (train = 3 × fwd) | pairs/s needed |")
    print("| --- | ---: | ---: | ---: |")
    for label, r50 in (("4.1 GFLOPs (the usual figure)", 4.1e9), ("8.2 GFLOPs (4.1 G multiply-adds × 2)", 8.2e9)):
        for views in (1, 2):
            per_pair = 3 * views * (r50 + bert)
            print(f"| {label} | {views} | {per_pair / 1e9:.1f} | {peak * mfu / per_pair:,.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="one synthetic dataset in every layout")
    g.add_argument("--n", type=int, required=True)
    g.add_argument("--out", required=True)
    s = sub.add_parser("startup", help="launch to first step, every layout, old vs new data.py")
    s.add_argument("--sizes", default="10000,100000,1000000")
    s.add_argument("--work", default="/tmp/bench_data")
    s.add_argument("--old-max", type=int, default=0, help="largest N the old code is measured at (0 = all)")
    s.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    s.add_argument("--keep", action="store_true", help="keep the generated datasets")
    s.add_argument("--old-data", default="", help=f"the old data.py (default: git show {OLD_REV}:data.py)")
    ld = sub.add_parser("loader", help="train_loader pairs/s at 224 px, bytes per batch")
    ld.add_argument("--work", default="/tmp/bench_data")
    ld.add_argument("--n-files", type=int, default=512)
    ld.add_argument("--batch-size", type=int, default=32)
    ld.add_argument("--batches", type=int, default=8, help="timed batches (JPEG files)")
    ld.add_argument("--synth-batches", type=int, default=4, help="timed batches (synthetic generator)")
    ld.add_argument("--workers", default="0,1,2")
    ld.add_argument("--old-data", default="", help=f"the old data.py (default: git show {OLD_REV}:data.py)")
    sub.add_parser("estimate", help="pairs/s a GPU training step would consume (an estimate)")
    c = sub.add_parser("_first-step")
    c.add_argument("impl", choices=["old", "new"])
    c.add_argument("layout", choices=list(LAYOUTS))
    c.add_argument("root")
    c.add_argument("--old-data", default="")
    a = p.parse_args(argv)
    if a.cmd == "generate":
        t = time.perf_counter()
        generate(a.out, a.n)
        print(f"wrote {a.n} pairs in 4 layouts under {a.out} in {time.perf_counter() - t:.1f} s")
    elif a.cmd == "startup":
        startup(a)
    elif a.cmd == "loader":
        loader_bench(a)
    elif a.cmd == "estimate":
        estimate()
    else:
        first_step(a.impl, a.layout, a.root, a.old_data)


if __name__ == "__main__":
    main()
