"""docs/reproduce.py: the selection rule of the weight sweeps, the tables, the resumable experiments, the run
records and the claims' statistics (the t distribution, Welch's test, Holm's correction), on metrics.json files
written here (no training)."""
import importlib.util
import json
import math
import os

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("reproduce", ROOT / "docs" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def metrics(shape, colour, obj, held, rsum, gap=0.2):
    return {"zeroshot/shape/top1": shape, "zeroshot/colour/top1": colour, "zeroshot/object/top1": obj,
            "zeroshot/object_heldout/top1": held, "retrieval/rsum": rsum, "structure/modality_gap": gap}


def write_run(folder, exp, seed, m):
    run = folder / f"{exp}-synthetic-{seed}-20260101-000000"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(m))


def test_selection_score_by_hand():
    # mean top-1 over the four label sets = (60 + 90 + 40 + 30) / 4 = 55; rsum / 6 = 300 / 6 = 50
    assert reproduce.selection_score(metrics(60, 90, 40, 30, 300)) == pytest.approx((55 + 50) / 2)


def test_select_takes_the_highest_mean_score_and_scores_weight_zero_beside_it(tmp_path):
    # scores per seed: lcon 53.75, 54.75 (mean 54.25); gc0.01 57.5, 37.5 (mean 47.5, despite the best single
    # seed); gc0.1 40, 45 (mean 42.5)
    for seed, (lcon, gc001, gc01) in enumerate([(300, 390, 240), (312, 150, 300)], start=1):
        write_run(tmp_path, "lcon", seed, metrics(60, 60, 60, 60, lcon - 15))
        write_run(tmp_path, "gc0.01", seed, metrics(50, 50, 50, 50, gc001))
        write_run(tmp_path, "gc0.1", seed, metrics(45, 45, 45, 45, gc01 - 30))
    best, stats = reproduce.select(reproduce.load(tmp_path), reproduce.SWEEPS["gc"])
    assert best == "gc0.01"  # the best nonzero weight becomes the default; here weight 0 scores higher still
    assert stats["lcon"][0] == pytest.approx(((60 + 47.5) / 2 + (60 + 49.5) / 2) / 2)
    assert stats["gc0.01"][0] == pytest.approx(((50 + 65) / 2 + (50 + 25) / 2) / 2)
    table = reproduce.sweep_table(tmp_path, "gc")
    assert "selected: OURS_GC, λ = 0.01 (score 47.50 ± 14.14; weight 0, L_con alone: 54.25 ± 0.71)" in table
    assert table.index("L_con baseline") < table.index("λ = 0.01") < table.index("λ = 0.1 ")


def test_experiment_skips_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "ROOT", str(tmp_path))
    monkeypatch.setattr(reproduce, "RECORDS", str(tmp_path / "records"))
    write_run(tmp_path / "records" / "sweep", "lcon", 3, metrics(1, 1, 1, 1, 1))  # recorded, its folder gone
    done = tmp_path / "runs" / "results" / "sweep"
    write_run(done, "lcon", 1, metrics(1, 1, 1, 1, 1))
    calls = []
    monkeypatch.setattr(reproduce, "run",
                        lambda script, flags, out: calls.append((script, flags[flags.index("--seed") + 1])))
    reproduce.experiment("sweep", ["--eval-split", "val"], [1, 2, 3], reproduce.LCON, show=False)
    assert calls == [("clip_base.py", "2")]


def test_the_harder_variant_changes_the_images_only(tmp_path):
    import data
    assert data.DataArgs().synth_hard is False and data.parse_args(data.DataArgs, ["--synth-hard"]).synth_hard
    plain, default = data.SynthPairSet("test", 3, size=32), data.SynthPairSet("test", 3, size=32, hard=False)
    hard = data.SynthPairSet("test", 3, size=32, hard=True)
    assert hard.captions == plain.captions and hard.labels == plain.labels
    for i in range(3):
        assert plain.load_image(i).tobytes() == default.load_image(i).tobytes() != hard.load_image(i).tobytes()
    flags = {e[e.index("--exp-name") + 1]: e for _, e in reproduce.BUDGET_HARD.values()}
    assert len(flags) == 5 and all("--synth-hard" in e and e[e.index("--steps") + 1] == "1800" for e in flags.values())


def test_each_experiment_runs_the_rows_and_seeds_asked_for(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(reproduce, "experiment", lambda name, flags, seeds, methods, show=True: calls.append(
        (name, seeds, sorted(reproduce.exp_of(e) for _, e in methods.values()))))
    monkeypatch.setattr(reproduce, "load_records", lambda experiment: {})
    monkeypatch.setattr(reproduce, "transfer_table", lambda folder: "")
    transfer = ["transfer", "--data-root", "F", "--classify-root", "C", "--seeds", "4"]
    for argv in (["fresh"], ["fresh", "--seeds", "7", "8", "--rows", "Sep", "L_con"],
                 ["synthetic", "--seeds", "4", "--rows", "Sep", "Br", "GC"], ["budget-hard", "--seeds", "6", "--rows", "CLIP"],
                 transfer, [*transfer, "--rows", "CLIP", "Br"]):
        monkeypatch.setattr(reproduce.sys, "argv", ["reproduce.py", *argv])
        reproduce.main()
    two_tower = ["bridge_scratch", "clip_base_scratch", "clip_plain_scratch", "geocons_scratch", "sep_scratch"]
    assert calls == [("budget", [4, 5, 6], ["bridge_s450", "clip_base_s450", "clip_plain_s450", "geocons_s450",
                                            "sep_s450"]),
                     ("budget", [7, 8], ["clip_base_s450", "sep_s450"]),
                     ("synthetic", [4], ["bridge", "geocons", "sep"]),
                     ("budget-hard", [6], ["clip_plain_hard_s1800"]),
                     # the whole transfer experiment, then only the two asked-for rows and no fusion script
                     ("transfer", [4], two_tower), ("transfer", [4], ["albef_fusion_scratch", "codis_scratch"]),
                     ("transfer", [4], ["bridge_scratch", "clip_plain_scratch"])]


def test_budget_and_transfer_rename_every_run():
    names = [e[e.index("--exp-name") + 1] for _, e in reproduce.BUDGET.values()]
    assert len(set(names)) == len(names) == 2 * 5
    steps = {e[e.index("--steps") + 1] for _, e in reproduce.BUDGET.values()}
    assert steps == {"450", "1800"}
    assert reproduce.renamed(["--plain-clip", "--exp-name", "clip_plain", "--x"], "_s1") == [
        "--plain-clip", "--exp-name", "clip_plain_s1", "--x"]


def test_incomplete_beta_against_closed_forms():
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b, on both sides of the continued fraction's switch point
    for x in (0.1, 0.5, 0.9):
        assert reproduce.betainc(2.5, 1, x) == pytest.approx(x ** 2.5, rel=1e-10)
        assert reproduce.betainc(1, 3.5, x) == pytest.approx(1 - (1 - x) ** 3.5, rel=1e-10)
    assert reproduce.betainc(2, 3, 0) == 0 and reproduce.betainc(2, 3, 1) == 1


def test_t_p_values_against_tables_and_closed_forms():
    p = reproduce.t_two_sided_p
    assert p(2.0, 4) == pytest.approx(0.1161, abs=1e-4)             # t tables
    assert p(2.776, 4) == pytest.approx(0.05, abs=1e-4)
    assert p(2.228, 10) == pytest.approx(0.05, abs=1e-4)
    assert p(1.0, 1) == pytest.approx(0.5, rel=1e-10)               # df = 1 (Cauchy): 1 - 2 atan(t) / π
    assert p(3.0, 1) == pytest.approx(1 - 2 * math.atan(3.0) / math.pi, rel=1e-10)
    assert p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-10)  # df = 2: 1 - t / sqrt(2 + t²)
    assert p(1.959964, 1e7) == pytest.approx(0.05, abs=1e-5)         # the normal limit
    assert p(-2.0, 4) == p(2.0, 4) and p(0.0, 4) == pytest.approx(1.0)
    assert reproduce.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert reproduce.t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)


def test_welch_by_hand():
    # means 5 and 2, variances 1 and 1, n = 3 each: se = sqrt(2/3), t = 3 / se = 3.674, df = 4 (equal variances
    # and sizes: 2 (n - 1)); the 95% interval 3 ± 2.7764 × se
    w = reproduce.welch([4, 5, 6], [1, 2, 3])
    se = math.sqrt(2 / 3)
    assert (w["diff"], w["df"], w["t"]) == (pytest.approx(3), pytest.approx(4), pytest.approx(3 / se))
    assert w["p"] == pytest.approx(reproduce.t_two_sided_p(3 / se, 4)) and 0.02 < w["p"] < 0.022
    assert (w["low"], w["high"]) == (pytest.approx(3 - 2.7764 * se, abs=1e-3), pytest.approx(3 + 2.7764 * se, abs=1e-3))
    # unequal variances: df = (1/3 + 4/3)² / ((1/3)² / 2 + (4/3)² / 2) = 2.7778/0.9444 = 2.94
    assert reproduce.welch([4, 5, 6], [0, 2, 4])["df"] == pytest.approx((5 / 3) ** 2 / ((1 / 9 + 16 / 9) / 2))
    assert reproduce.welch([1, 1, 1], [1, 1, 1])["p"] == 1.0 and reproduce.welch([2, 2, 2], [1, 1, 1])["p"] == 0.0


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> non-decreasing 0.02, 0.03, 0.06, 0.06
    assert reproduce.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert reproduce.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_verdict_is_welchs_test_at_the_stated_level():
    word, test, rival, p = reproduce.verdict([10, 11, 12], {"CLIP": [5, 6, 7]})
    assert (word, rival, test["diff"]) == ("holds", "CLIP", 5) and p < 0.01
    # "best": ahead of both, but of L_con by 1 only (t = 1.22, p = 0.29): the decisive comparison is that one
    word, test, rival, p = reproduce.verdict([10, 11, 12], {"CLIP": [5, 6, 7], "L_con": [9, 10, 11]})
    assert (word, rival, test["diff"]) == ("not detected", "L_con", 1) and p == pytest.approx(0.2878, abs=1e-3)
    assert reproduce.verdict([10, 11, 12], {"CLIP": [5, 6, 7], "L_con": [20, 21, 22]})[:3:2] == ("reversed", "L_con")
    assert reproduce.verdict([12, 13, 14], {"CLIP": [10, 11, 12]})[0] == "borderline"  # t = 2.45, df 4: p = 0.07


def write_record(folder, exp, seed, m, args=None):
    run = folder / f"{exp}-synthetic-{seed}-20260101-000000"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(m))
    (run / "args.json").write_text(json.dumps(args or {"seed": seed}))
    return run


def test_record_copies_the_small_files_of_finished_runs_only(tmp_path, monkeypatch):
    run = write_record(tmp_path / "runs" / "results" / "budget", "sep_s450", 4, {"a": 1})
    (run / "log.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoint.pt").write_bytes(b"weights")
    unfinished = tmp_path / "runs" / "results" / "budget" / "sep_s450-synthetic-5-20260101-000000"
    unfinished.mkdir()
    (unfinished / "args.json").write_text("{}")
    done = reproduce.record_all(str(tmp_path / "runs" / "results" / "budget"), str(tmp_path / "records"))
    assert [os.path.relpath(d, tmp_path) for d in done] == [os.path.join("records", "budget", run.name)]
    assert sorted(os.listdir(done[0])) == ["args.json", "log.jsonl", "metrics.json"]  # never a checkpoint
    monkeypatch.setattr(reproduce, "RECORD_MAX_BYTES", 4)                            # a large log stays behind
    other = write_record(tmp_path / "runs" / "results" / "budget", "sep_s450", 6, {"a": 2})
    (other / "log.jsonl").write_text('{"step": 1}\n')
    assert sorted(os.listdir(reproduce.record(str(other), str(tmp_path / "records")))) == ["args.json",
                                                                                           "metrics.json"]


def test_load_records_prefers_run_folders_and_claims_use_fresh_seeds_only(tmp_path):
    results, records = tmp_path / "results", tmp_path / "records"
    write_record(records / "budget", "sep_s450", 4, {"zeroshot/shape/top1": 1.0})
    write_record(results / "budget", "sep_s450", 4, {"zeroshot/shape/top1": 2.0})
    write_record(records / "budget", "sep_s450", 1, {"zeroshot/shape/top1": 3.0})
    runs = reproduce.load_records("budget", str(results), str(records))
    assert runs == {"sep_s450": {4: {"zeroshot/shape/top1": 2.0}, 1: {"zeroshot/shape/top1": 3.0}}}
    assert reproduce.fresh_values(runs["sep_s450"], "zero-shot") == {4: 2.0}        # seed 1 chose the weights


def test_probe_and_zero_shot_metrics_of_the_claims():
    synthetic = {"probe/shape/z/acc": 80, "probe/colour/z/acc": 90, "probe/texture/z/acc": 30,
                 "probe/texture/z+zi/acc": 70, "probe/shape/z+zi/acc": 82, "probe/colour/z+zi/acc": 92,
                 "probe/material/z/acc": 100, "zeroshot/shape/top1": 55, "zeroshot/colour/top1": 90}
    assert reproduce.probe("mean", synthetic) == pytest.approx((80 + 90 + 30) / 3)   # material: a text attribute
    assert reproduce.probe("mean", synthetic, "z+zi") == pytest.approx((82 + 92 + 70) / 3)
    assert reproduce.probe("texture", synthetic, "z+zi") == 70 and reproduce.zero_shot(synthetic) == 55
    assert reproduce.probe("mean", {"probe/shape/z/acc": 80}, "z+zi") is None
    photos = {"probe/photos/z/acc": 40, "zeroshot/photos/top1": 30, "zeroshot/photos/top3": 60}
    assert (reproduce.probe("mean", photos), reproduce.zero_shot(photos)) == (40, 30)


def fresh_budget(records, skip=()):
    """Records of the 450-step validated column: zero-shot shape per method over seeds 4-6 (seed 1 far off,
    which must not count), gap and probes."""
    shape = {"clip_plain": (50, 51, 52), "clip_base": (66, 67, 68), "sep": (61, 62, 63), "bridge": (64, 65, 66),
             "geocons": (40, 42, 44)}
    gap = {"clip_plain": 0.2, "clip_base": 0.2, "sep": 0.15, "bridge": 0.09, "geocons": 0.9}
    for exp, values in shape.items():
        for seed, v in [(1, 0), *zip((4, 5, 6), values)]:
            if (exp, seed) not in skip:
                m = {**metrics(v, 90, v, v, 300, gap[exp] + 0.01 * (seed - 5)), "probe/shape/z/acc": v,
                     "probe/colour/z/acc": 90, "probe/texture/z/acc": 30, "probe/texture/z+zi/acc": v}
                write_record(records / "budget", exp + "_s450", seed, m)


def test_claims_cells_from_records(tmp_path):
    records = tmp_path / "records"
    fresh_budget(records)
    lines = reproduce.claims_report(str(tmp_path / "none"), str(records)).splitlines()

    def cell(claim, column=3):
        return next(line for line in lines if line.startswith(f"| {claim}")).split(" | ")[column]
    # 62 - 51 = 11, se = sqrt(2/3), df 4: the interval 11 ± 2.7764 × 0.8165 = [8.7, 13.3]; p < 0.001
    assert cell("Sep beats CLIP on zero-shot").startswith("holds, Holm ✓: +11.0 [+8.7, +13.3], p = 0.000")
    assert cell("Sep beats CLIP on zero-shot", 2).startswith("missing: `synthetic --seeds 4 5 6 --rows Sep Br GC`")
    assert cell("GC is best on zero-shot").startswith("reversed, Holm ✓: -25.0")       # behind L_con, the strongest
    # Br vs L_con on the gap: 0.09 vs 0.20 with identical spreads: Δ = -0.11
    assert cell("Br closes the modality gap").startswith("holds, Holm ✓: -0.11 [")
    assert any(line.startswith("**Source: synthetic, 450 steps, validated weights**") for line in lines)
    assert "| Sep | 4,5,6 | 62.0 ± 1.0 |" in "\n".join(lines)
    assert not any("synthetic, 450 steps, validated weights: missing" in line for line in lines)


def test_the_weight_1_column_shares_the_runs_of_the_rows_without_a_weight(tmp_path):
    """CLIP and L_con have no regularizer weight: the weight-1 column reads their 450-step validated runs, which
    are the same command (the flags but the run's name are equal, --steps 450 being the scripts' default)."""
    import clip_base
    strip = lambda extra: [f for i, f in enumerate(extra) if "--exp-name" not in extra[max(i - 1, 0):i + 1]]
    for row, (experiment, suffix) in reproduce.SAME_AS_450.items():
        exp = reproduce.CLAIM_METHODS[row]
        weight_1 = next(v for v in reproduce.METHODS.values() if reproduce.exp_of(v[1]) == exp)
        validated = next(v for v in reproduce.FRESH.values() if reproduce.exp_of(v[1]) == exp + suffix)
        assert experiment == "budget" and weight_1[0] == validated[0] == "clip_base.py"
        assert strip(validated[1]) == [*strip(weight_1[1]), "--steps", str(clip_base.Args().steps)]
    records = tmp_path / "records"
    fresh_budget(records)
    for exp, values in {"sep": (70, 71, 72), "bridge": (60, 61, 62), "geocons": (30, 31, 32)}.items():
        for seed, v in zip((4, 5, 6), values):
            write_record(records / "synthetic", exp, seed, {**metrics(v, 90, v, v, 300), "probe/shape/z/acc": v,
                                                           "probe/colour/z/acc": 90, "probe/texture/z/acc": 30,
                                                           "probe/texture/z+zi/acc": v})
    report = reproduce.claims_report(str(tmp_path / "none"), str(records))
    row = next(line for line in report.splitlines() if line.startswith("| Sep beats CLIP on zero-shot"))
    assert row.split(" | ")[2].startswith("holds, Holm ✓: +20.0 [")           # 71 against CLIP's 450-step 51
    row = next(line for line in report.splitlines() if line.startswith("| GC beats the L_con"))
    assert row.split(" | ")[2].startswith("reversed, Holm ✓: -36.0 [")         # 31 against L_con's 67
    assert "CLIP, L_con: the same runs as in `docs/records/budget`" in report
    assert "weight 1 (the paper gives none); GC at CyCLIP's λ: missing" not in report


def test_a_missing_run_leaves_its_cells_missing_and_names_it(tmp_path):
    records = tmp_path / "records"
    fresh_budget(records, skip={("clip_plain", 6)})
    report = reproduce.claims_report(str(tmp_path / "none"), str(records))
    row = next(line for line in report.splitlines() if line.startswith("| Sep beats CLIP on zero-shot"))
    assert row.split(" | ")[3] == "missing: `fresh --seeds 4 5 6`"
    assert "- synthetic, 450 steps, validated weights: missing CLIP seed 6. `python docs/reproduce.py fresh " \
           "--seeds 4 5 6`" in report
    row = next(line for line in report.splitlines() if line.startswith("| Sep beats the L_con"))
    assert row.split(" | ")[3].startswith("not detected") or row.split(" | ")[3].startswith("reversed")


def test_write_claims_replaces_only_the_marked_tables(tmp_path):
    fresh_budget(tmp_path / "records")
    docs = tmp_path / "docs"
    docs.mkdir()
    for only, page in reproduce.CLAIM_PAGES.items():
        marker = f"<!-- claims{' ' + only if only else ''} -->"
        (docs / page).write_text(f"before\n{marker}\nold table\n<!-- /claims -->\nafter\n")
    reproduce.write_claims(str(tmp_path / "none"), str(docs), str(tmp_path / "records"))
    sep = (docs / "sep.md").read_text()
    assert sep.startswith("before\n<!-- claims Sep -->\n| claim |") and sep.endswith("<!-- /claims -->\nafter\n")
    assert "old table" not in sep and "Sep beats CLIP on zero-shot" in sep and "Br beats" not in sep
    every = (docs / "results.md").read_text()
    assert all(claim in every for claim, *_ in reproduce.CLAIMS) and " ".join(every.split()).count(reproduce.RULE) == 1


def test_transfer_table_names_the_photo_classes_generically(tmp_path):
    for seed, (top1, probe) in enumerate([(20.0, 40.0), (30.0, 50.0)], start=1):
        write_run(tmp_path, "sep_minilm", seed, {"zeroshot/my_cifar/top1": top1, "probe/my_cifar/z/acc": probe,
                                                 "probe/my_cifar/z+zi/acc": probe + 1, "retrieval/rsum": 50.0})
    row = reproduce.transfer_table(tmp_path).splitlines()[-1]
    # mean ± std of (20, 30) and (40, 50): 25 ± 7.07 and 45 ± 7.07; no zero-shot top-3 in these runs
    assert row == ("| OURS_Sep, validated default, minilm text | 2 | 25.00 ± 7.07 | – | – | 45.00 ± 7.07 | "
                   "46.00 ± 7.07 | 50.00 ± 0.00 | – |")


def test_the_published_claims_are_what_the_records_give(tmp_path):
    """Every claims table in docs/ is exactly what `claims` computes from the versioned run records: no cell
    typed by hand, none left stale after a record was added."""
    for only, page in reproduce.CLAIM_PAGES.items():
        text = (ROOT / "docs" / page).read_text(encoding="utf-8")
        start = f"<!-- claims{' ' + only if only else ''} -->\n"
        published = text[text.index(start) + len(start):text.index("<!-- /claims -->")]
        assert published == reproduce.claims_report(str(tmp_path / "no runs"), only=only) + "\n", page
