"""Regenerate every result table of docs/results.md from scratch (the CleanRL-style benchmark script).

    python docs/reproduce.py synthetic                 # 5 two-tower methods x 3 seeds, default budget (CPU)
    python docs/reproduce.py flickr8k --data-root DIR    # 5 methods x 1 seed (DIR: see docs/real_data.md)
    python docs/reproduce.py theorem1                  # texture visibility sweep (Theorem 1)
    python docs/reproduce.py fusion                    # ALBEF and CODIS x 3 seeds
    python docs/reproduce.py fusion-flickr8k --data-root DIR   # ALBEF and CODIS on Flickr8k, 1 seed
    python docs/reproduce.py codis-ablation            # codebook size, plan features, intra terms (seed 1)
    python docs/reproduce.py ablation-table            # its table, beside ALBEF and CODIS at their defaults
    python docs/reproduce.py codebook RUN_DIR          # docs/codebook.png from a CODIS run (e.g. python codis.py)
    python docs/reproduce.py gc-sweep                  # geocons' λ on the validation split (3 seeds each)
    python docs/reproduce.py sweep-table runs/results/gc_sweep               # its table
    python docs/reproduce.py tables runs/results/synthetic                   # print the Markdown tables
    python docs/reproduce.py figures runs/results/synthetic                  # docs/latent_structure.png, curves

Each run is a plain subprocess call of a method script, so every number can be re-checked by hand with
the command printed before it. Runs go to runs/results/<experiment>/; `tables` reads their metrics.json.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# row label -> (script, extra flags); the exp-name is the folder prefix the tables group by
METHODS = {"CLIP (2-term)": ("clip_base.py", ["--plain-clip", "--exp-name", "clip_plain"]),
           "L_con baseline": ("clip_base.py", ["--exp-name", "clip_base"]),
           "OURS_Sep": ("sep.py", ["--exp-name", "sep"]),
           "OURS_Br": ("bridge.py", ["--exp-name", "bridge"]),
           "OURS_GC": ("geocons.py", ["--exp-name", "geocons"])}
# the fusion models, and CODIS's ablation (codebook size, plan features, intra-modal terms)
FUSION = {"ALBEF": ("albef_fusion.py", ["--exp-name", "albef_fusion"]),
          "CODIS": ("codis.py", ["--exp-name", "codis"])}
CODIS_ABLATION = {"CODIS, K = 32": ("codis.py", ["--exp-name", "codis_k32", "--codebook-size", "32"]),
                  "CODIS, K = 512": ("codis.py", ["--exp-name", "codis_k512", "--codebook-size", "512"]),
                  "CODIS, student plans": ("codis.py", ["--exp-name", "codis_student", "--plan-features", "student"]),
                  "CODIS, no i2i/t2t": ("codis.py", ["--exp-name", "codis_nointra", "--no-intra"]),
                  "CODIS, no codebook (λ_code = 0)": ("codis.py", ["--exp-name", "codis_nocode", "--code-weight", "0"]),
                  "CODIS, λ_code = 1 (the paper's sum)": ("codis.py", ["--exp-name", "codis_cw1", "--code-weight", "1"])}
# geometric consistency's weight chosen on the validation split: the L_con baseline (λ = 0) and six λ
GC_WEIGHTS = ["0.0025", "0.01", "0.025", "0.05", "0.1", "0.25"]
GC_SWEEP = {"L_con baseline (λ = 0)": ("clip_base.py", ["--exp-name", "lcon"]),
            **{f"OURS_GC, λ = {w}": ("geocons.py", ["--exp-name", f"gc{w}", "--gc-weight", w]) for w in GC_WEIGHTS}}
LABELS = {extra[extra.index("--exp-name") + 1]: label
          for label, (_, extra) in {**METHODS, **FUSION, **CODIS_ABLATION, **GC_SWEEP}.items()}
FLICKR = ["--data", "karpathy", "--image-size", "64", "--epochs", "5"]
FLICKR_FUSION = [*FLICKR, "--vit-patch", "16", "--itm-k", "16"]  # 64 px / 16 = 4×4 tokens, as 32 px / 8 on the
# synthetic data; the top 16 reranked by ITM


def run(script, flags, out):
    cmd = [sys.executable, script, "--out", out, *flags]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def experiment(name, flags, seeds, methods=METHODS):
    out = os.path.join("runs", "results", name)
    for seed in seeds:
        for script, extra in methods.values():
            run(script, [*extra, "--seed", str(seed), *flags], out)
    print(tables(os.path.join(ROOT, out)))


def load(folder):
    """{exp-name: [metrics of each seed]} of the runs under folder."""
    groups = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "metrics.json"))):
        exp = os.path.basename(os.path.dirname(path)).split("-")[0]
        groups.setdefault(exp, []).append(json.load(open(path)))
    return groups


def cell(values, digits=1):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(groups, title, columns, digits=1):
    """One Markdown table: a row per method, `columns` = [(header, metric key)], mean ± std over seeds."""
    names = LABELS
    lines = [f"**{title}**", "", "| method | n | " + " | ".join(h for h, _ in columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    order = [e for e in names if e in groups] + [e for e in groups if e not in names]
    for exp, runs in ((e, groups[e]) for e in order):
        cells = [cell([r[k] for r in runs if k in r], 0 if k == "train/seconds" else digits) for _, k in columns]
        lines.append(f"| {names.get(exp, exp)} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_score(m):
    """The validation score weights are chosen by, fixed before the sweep: the mean of (mean zero-shot top-1
    over the label sets, retrieval rsum / 6), in percent (eval.validate's val/score on the whole split)."""
    top1 = [v for k, v in m.items() if k.startswith("zeroshot/") and k.endswith("/top1")]
    return (sum(top1) / len(top1) + m["retrieval/rsum"] / 6) / 2


def sweep_table(folder):
    """The selection score and its parts, a row per weight, mean ± std over seeds (validation split)."""
    groups = {e: [dict(r, score=selection_score(r)) for r in runs] for e, runs in load(folder).items()}
    return table(groups, "Validation split: selection score and its parts (%)",
                 [("score", "score"), ("shape top1", "zeroshot/shape/top1"), ("colour top1", "zeroshot/colour/top1"),
                  ("object top1", "zeroshot/object/top1"), ("held-out top1", "zeroshot/object_heldout/top1"),
                  ("rsum", "retrieval/rsum"), ("modality gap", "structure/modality_gap")], digits=2)


def tables(folder):
    groups = load(folder)
    if not groups:
        return f"no runs with metrics.json under {folder}"
    keys = set().union(*(r.keys() for runs in groups.values() for r in runs))
    sets = sorted({k.split("/")[1] for k in keys if k.startswith("zeroshot/")})
    probes = sorted({k.split("/")[1] for k in keys if k.startswith("probe/")})
    out = []
    if sets:
        out.append(table(groups, "Zero-shot classification, top-1 / top-3 / top-5 (%)",
                         [(f"{s} top{k}", f"zeroshot/{s}/top{k}") for s in sets for k in (1, 3, 5)]))
    out.append(table(groups, "Retrieval (%), 1,000 test images x 5 captions",
                     [(f"{d} R@{k}", f"retrieval/{d}_R@{k}") for d in ("i2t", "t2i") for k in (1, 5, 10)]
                     + [("rsum", "retrieval/rsum")]))
    if "retrieval_itm/rsum" in keys:
        out.append(table(groups, "Retrieval reranked by ITM (%): the top k ITC candidates of each query rescored",
                         [(f"{d} R@{k}", f"retrieval_itm/{d}_R@{k}") for d in ("i2t", "t2i") for k in (1, 5, 10)]
                         + [("rsum", "retrieval_itm/rsum")]))
    if probes:
        out.append(table(groups, "Linear probe, test accuracy (%)",
                         [(f"{p} ({f})", f"probe/{p}/{f}/acc") for p in probes for f in ("z", "z+zi")
                          if any(f"probe/{p}/{f}/acc" in r for runs in groups.values() for r in runs)]))
    out.append(table(groups, "Structure of the test embeddings, and cost",
                     [("modality gap", "structure/modality_gap"), ("alignment", "structure/alignment"),
                      ("uniformity (image)", "structure/uniformity_image"),
                      ("uniformity (text)", "structure/uniformity_text"),
                      ("matched cosine", "structure/matched_cosine"), ("train s (shared CPU)", "train/seconds")],
                     digits=2))
    return "\n\n".join(out)


def theorem1_table(results=os.path.join(ROOT, "runs", "results")):
    """Texture visibility against what each method's features keep of it (seed 1): the image-only texture's
    probe accuracy on z (and [z, z^i] for Sep), beside shape zero-shot, per texture contrast."""
    sources = {"0.05": "theorem1-contrast0.05", "0.18 (default)": "synthetic", "0.5": "theorem1-contrast0.5"}
    lines = ["| texture contrast | method | texture probe, z | texture probe, [z, z^i] | shape zero-shot top-1 "
             "| modality gap |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for contrast, sub in sources.items():
        for exp in ("clip_base", "sep"):
            found = sorted(glob.glob(os.path.join(results, sub, f"{exp}-*-1-*", "metrics.json")))
            if not found:
                continue
            r = json.load(open(found[0]))
            zz = r.get("probe/texture/z+zi/acc")
            lines.append(f"| {contrast} | {LABELS[exp]} | {r['probe/texture/z/acc']:.1f} | "
                         f"{'–' if zz is None else f'{zz:.1f}'} | {r['zeroshot/shape/top1']:.1f} | "
                         f"{r['structure/modality_gap']:.2f} |")
    return "\n".join(lines)


def ablation_table(results=os.path.join(ROOT, "runs", "results")):
    """CODIS's ablation (seed 1): ALBEF and CODIS at their defaults (the `fusion` runs) beside each ablation run,
    with the codebook's health at the last logged step (codewords in use, perplexity of the assignments)."""
    cols = [("shape", "zeroshot/shape/top1"), ("colour", "zeroshot/colour/top1"), ("object", "zeroshot/object/top1"),
            ("held-out", "zeroshot/object_heldout/top1"), ("i2t R@1", "retrieval/i2t_R@1"),
            ("t2i R@1", "retrieval/t2i_R@1"), ("rsum", "retrieval/rsum"), ("rsum ITM", "retrieval_itm/rsum"),
            ("gap", "structure/modality_gap")]
    lines = ["| run | " + " | ".join(h for h, _ in cols) + " | codes used | perplexity |",
             "| --- |" + " ---: |" * (len(cols) + 2)]
    runs = [("fusion", exp) for exp in ("albef_fusion", "codis")] + [
        ("codis-ablation", extra[extra.index("--exp-name") + 1]) for _, extra in CODIS_ABLATION.values()]
    for sub, exp in runs:
        found = sorted(glob.glob(os.path.join(results, sub, f"{exp}-*-1-*", "metrics.json")))
        if not found:
            continue
        r = json.load(open(found[0]))
        last = [json.loads(line) for line in open(os.path.join(os.path.dirname(found[0]), "log.jsonl"))][-1]
        code = (f"{last['codes_used']} | {last['code_perplexity']:.0f}" if "codes_used" in last else "– | –")
        lines.append(f"| {LABELS[exp]} | " + " | ".join(f"{r[k]:.{2 if k.startswith('structure') else 1}f}"
                                                         for _, k in cols) + f" | {code} |")
    return "\n".join(lines)


def figures(folder, seed=1):
    """docs/latent_structure.png (2-D PCA of both modalities per method, the paper's latent-structure
    visualization) and docs/training_curves.png (L_con of every method against step), from seed `seed`."""
    sys.path.insert(0, ROOT)
    import data
    import eval as ev
    from matplotlib.figure import Figure
    names = {extra[extra.index("--exp-name") + 1]: label for label, (_, extra) in METHODS.items()}
    runs = {exp: d for exp in names for d in sorted(glob.glob(os.path.join(folder, f"{exp}-*-{seed}-*")))}
    panels, fig = {}, Figure(figsize=(7, 4))
    ax = fig.subplots()
    for exp, run_dir in runs.items():
        model, tokenizer, args, _ = ev.load_run(run_dir, "cpu")
        test = data.build_eval_suite(args).retrieval
        img = ev.encode_images(model, test, data.eval_transform(args.image_size), "cpu")
        txt = ev.encode_texts(model, tokenizer, test.texts, "cpu", args.max_len)
        panels[names[exp]] = (img, txt, test.txt2img)
        log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
        ax.plot([r["step"] for r in log], [r["loss_con"] for r in log], label=names[exp])
    ev.plot_embeddings_grid(panels, os.path.join(ROOT, "docs", "latent_structure.png"), ncols=len(panels))
    ax.set(xlabel="step", ylabel="L_con (the shared contrastive loss)", title=f"training curves, seed {seed}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", "training_curves.png"), dpi=120)
    print("wrote docs/latent_structure.png and docs/training_curves.png")


def codebook_figure(run_dir, n_codes=6, n_images=6, n_words=5):
    """docs/codebook.png: for the most used codewords of a CODIS run, the test images and the caption words
    assigned to them most strongly (the paper's qualitative analysis). Images: the highest P_i2p(k) of the
    test images; words: those most over-represented in the captions whose nearest codeword is k."""
    sys.path.insert(0, ROOT)
    import collections
    import torch
    import data
    import eval as ev
    from matplotlib.figure import Figure
    model, tokenizer, args, _ = ev.load_run(run_dir, "cpu")
    test = data.build_eval_suite(args).retrieval
    img = ev.encode_images(model, test, data.eval_transform(args.image_size), "cpu")
    txt = ev.encode_texts(model, tokenizer, test.texts, "cpu", args.max_len)
    codebook = torch.nn.functional.normalize(model.codebook.detach(), dim=-1)      # (K, E)
    p_img = torch.softmax(img @ codebook.T / args.code_temp, dim=1)                 # (N_img, K) P_i2p
    near_img, near_txt = p_img.argmax(1), (txt @ codebook.T).argmax(1)
    usage = torch.bincount(torch.cat([near_img, near_txt]), minlength=len(codebook))
    words_all = collections.Counter(w for t in test.texts for w in set(t.lower().strip(".").split()))
    fig = Figure(figsize=(1.3 * n_images + 3.2, 1.35 * n_codes))
    axes = fig.subplots(n_codes, n_images + 1, squeeze=False)
    for row, k in enumerate(usage.argsort(descending=True)[:n_codes].tolist()):
        mine = [t for t, c in zip(test.texts, near_txt.tolist()) if c == k]
        counts = collections.Counter(w for t in mine for w in set(t.lower().strip(".").split()))
        lift = {w: (c / len(mine)) / (words_all[w] / len(test.texts)) for w, c in counts.items() if c >= 3}
        top = sorted(lift, key=lambda w: (-lift[w], w))[:n_words]
        for col, i in enumerate(p_img[:, k].topk(n_images).indices.tolist()):
            axes[row, col].imshow(test.load_image(i))
            axes[row, col].set_title(f"{p_img[i, k]:.2f}", fontsize=7)
        axes[row, -1].text(0, 0.5, f"codeword {k}\n{int(usage[k])} test features\n" + "\n".join(top),
                           fontsize=7, va="center")
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle("CODIS codewords: the test images with the highest P_i2p, and the most over-represented caption "
                 "words of the captions nearest to each", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", "codebook.png"), dpi=120)
    print("wrote docs/codebook.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["synthetic", "flickr8k", "theorem1", "fusion", "fusion-flickr8k",
                                    "codis-ablation", "codebook", "theorem1-table", "ablation-table", "tables",
                                    "figures", "gc-sweep", "sweep-table"])
    p.add_argument("folder", nargs="?", help="tables, figures: the folder of runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--data-root", default="", help="flickr8k experiments: the Flickr8k folder (docs/real_data.md)")
    a = p.parse_args()
    if "flickr8k" in a.what and not a.data_root:
        p.error(f"{a.what} needs --data-root DIR: the Flickr8k images and dataset_flickr8k.json (docs/real_data.md)")
    if a.what == "synthetic":
        experiment("synthetic", [], a.seeds)
    elif a.what == "flickr8k":
        experiment("flickr8k", [*FLICKR, "--data-root", a.data_root], a.seeds[:1])
    elif a.what == "theorem1":
        # the default contrast (0.18) is the `synthetic` experiment's seed-1 runs; this adds a fainter and a
        # stronger texture for the two methods the theorem contrasts: aligned features alone, and separation
        picked = {k: METHODS[k] for k in ("L_con baseline", "OURS_Sep")}
        for contrast in ("0.05", "0.5"):
            experiment(f"theorem1-contrast{contrast}", ["--synth-texture-contrast", contrast], a.seeds[:1], picked)
    elif a.what == "fusion":
        experiment("fusion", [], a.seeds, FUSION)
    elif a.what == "fusion-flickr8k":
        experiment("fusion-flickr8k", [*FLICKR_FUSION, "--data-root", a.data_root], a.seeds[:1], FUSION)
    elif a.what == "codis-ablation":
        experiment("codis-ablation", [], a.seeds[:1], CODIS_ABLATION)
    elif a.what == "gc-sweep":
        experiment("gc_sweep", ["--eval-split", "val"], a.seeds, GC_SWEEP)
        print(sweep_table(os.path.join(ROOT, "runs", "results", "gc_sweep")))
    elif a.what == "sweep-table":
        print(sweep_table(a.folder))
    elif a.what == "theorem1-table":
        print(theorem1_table())
    elif a.what == "ablation-table":
        print(ablation_table())
    elif a.what == "codebook":
        codebook_figure(a.folder)
    elif a.what == "figures":
        figures(a.folder, a.seeds[0])
    else:
        print(tables(a.folder))


if __name__ == "__main__":
    main()
