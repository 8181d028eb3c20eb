"""docs/reproduce.py: the selection rule of the weight sweeps, the tables and the resumable experiments,
on metrics.json files written here (no training)."""
import importlib.util
import json

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
    done = tmp_path / "runs" / "results" / "sweep"
    write_run(done, "lcon", 1, metrics(1, 1, 1, 1, 1))
    calls = []
    monkeypatch.setattr(reproduce, "run",
                        lambda script, flags, out: calls.append((script, flags[flags.index("--seed") + 1])))
    reproduce.experiment("sweep", ["--eval-split", "val"], [1, 2], reproduce.LCON, show=False)
    assert calls == [("clip_base.py", "2")]


def test_budget_and_transfer_rename_every_run():
    names = [e[e.index("--exp-name") + 1] for _, e in reproduce.BUDGET.values()]
    assert len(set(names)) == len(names) == 2 * 5
    steps = {e[e.index("--steps") + 1] for _, e in reproduce.BUDGET.values()}
    assert steps == {"450", "1800"}
    assert reproduce.renamed(["--plain-clip", "--exp-name", "clip_plain", "--x"], "_s1") == [
        "--plain-clip", "--exp-name", "clip_plain_s1", "--x"]


def test_verdict_counts_a_difference_only_beyond_two_standard_deviations():
    # mine 11 ± 1.41; the other 5.5 ± 0.71: Δ = 5.5 > 2 × 1.41
    assert reproduce.verdict([10, 12], [[5, 6]]) == ("holds", pytest.approx(5.5), 11, 5.5)
    assert reproduce.verdict([10, 12], [[10, 11]])[0] == "noise"              # Δ = 0.5
    # "best": ahead of one beyond noise, behind the other within noise (Δ = −2.5 > −2.83); Δ is to the strongest
    assert reproduce.verdict([10, 12], [[5, 6], [13, 14]])[:2] == ("noise", pytest.approx(-2.5))
    assert reproduce.verdict([10, 12], [[5, 6], [20, 21]])[0] == "does not hold"


def test_probe_and_zero_shot_metrics_of_the_claims():
    synthetic = {"probe/shape/z/acc": 80, "probe/colour/z/acc": 90, "probe/texture/z/acc": 30,
                 "probe/texture/z+zi/acc": 70, "probe/material/z/acc": 100, "zeroshot/shape/top1": 55,
                 "zeroshot/colour/top1": 90}
    assert reproduce.linear_probe(synthetic) == pytest.approx((80 + 90 + 70) / 3)  # [z, z^i] where there is z^i
    assert reproduce.zero_shot(synthetic) == 55
    photos = {"probe/photos/z/acc": 40, "zeroshot/photos/top1": 30, "zeroshot/photos/top3": 60}
    assert (reproduce.linear_probe(photos), reproduce.zero_shot(photos)) == (40, 30)


def test_claims_table_cells(tmp_path):
    shape = {"clip_plain": (50, 50.5, 51), "clip_base": (66, 67, 68), "sep": (60, 61, 62), "bridge": (64, 65, 66),
             "geocons": (40, 42, 44)}
    gap = {"clip_plain": 0.2, "clip_base": 0.2, "sep": 0.15, "bridge": 0.09, "geocons": 0.9}
    for exp, values in shape.items():
        for seed, v in enumerate(values, start=1):
            m = metrics(v, 90, v, v, 300, gap[exp] + 0.01 * (seed - 2))
            write_run(tmp_path / "synthetic", exp, seed, m)
    lines = reproduce.claims_table(str(tmp_path)).splitlines()
    row = next(line for line in lines if line.startswith("| Sep beats CLIP on zero-shot"))
    assert row.split(" | ")[2] == "holds: +10.5 (61.0 vs 50.5)"              # 61.0 − 50.5, spreads 1 and 0.5
    assert "pending (`budget`)" in row.split(" | ")[3]
    row = next(line for line in lines if line.startswith("| GC is best on zero-shot"))
    assert row.split(" | ")[2] == "does not hold: -25.0 (42.0 vs 67.0)"      # behind L_con, the strongest
    row = next(line for line in lines if line.startswith("| Br closes the modality gap"))
    assert row.split(" | ")[2] == "holds: -0.11 (0.09 vs 0.20)"
    # two seeds are not enough for a verdict: the cell waits for the third
    for exp in shape:
        next((tmp_path / "synthetic").glob(f"{exp}-synthetic-3-*/metrics.json")).unlink()
    assert "| noise" not in reproduce.claims_table(str(tmp_path)) and "holds" not in reproduce.claims_table(str(tmp_path))


def test_write_claims_replaces_only_the_marked_tables(tmp_path):
    for seed, v in enumerate((60, 61, 62), start=1):
        for exp in reproduce.CLAIM_METHODS.values():
            write_run(tmp_path / "results" / "synthetic", exp, seed, metrics(v, 90, v, v, 300))
    docs = tmp_path / "docs"
    docs.mkdir()
    for only, page in reproduce.CLAIM_PAGES.items():
        marker = f"<!-- claims{' ' + only if only else ''} -->"
        (docs / page).write_text(f"before\n{marker}\nold table\n<!-- /claims -->\nafter\n")
    reproduce.write_claims(str(tmp_path / "results"), str(docs))
    sep = (docs / "sep.md").read_text()
    assert sep.startswith("before\n<!-- claims Sep -->\n| claim |") and sep.endswith("<!-- /claims -->\nafter\n")
    assert "old table" not in sep and "Sep beats CLIP on zero-shot" in sep and "Br beats" not in sep
    every = (docs / "results.md").read_text()
    assert all(claim in every for claim, *_ in reproduce.CLAIMS)
    assert "noise: +0.0 (61.0 vs 61.0)" in every   # identical runs: no difference


def test_transfer_table_names_the_photo_classes_generically(tmp_path):
    for seed, (top1, probe) in enumerate([(20.0, 40.0), (30.0, 50.0)], start=1):
        write_run(tmp_path, "sep_minilm", seed, {"zeroshot/my_cifar/top1": top1, "probe/my_cifar/z/acc": probe,
                                                 "probe/my_cifar/z+zi/acc": probe + 1, "retrieval/rsum": 50.0})
    row = reproduce.transfer_table(tmp_path).splitlines()[-1]
    # mean ± std of (20, 30) and (40, 50): 25 ± 7.07 and 45 ± 7.07; no zero-shot top-3 in these runs
    assert row == ("| OURS_Sep, validated default, minilm text | 2 | 25.00 ± 7.07 | – | – | 45.00 ± 7.07 | "
                   "46.00 ± 7.07 | 50.00 ± 0.00 | – |")
