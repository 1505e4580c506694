"""Reading results for the tables and figures notebooks: reports wherever a file holds them (one world or
several, any variants), the median seed, the verdicts of paired intervals, and docs/published.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from depthg.lab import results

ROOT = Path(__file__).resolve().parents[1]


def _report(world: int, deltas: list[float], extra: str | None = None) -> dict:
    seeds = list(range(len(deltas)))
    base = [10.0 + s for s in seeds]

    def row(values):
        return {"seeds": seeds, **{m: {"mean": sum(values) / len(values), "std": 0.0, "values": values}
                                   for m in ("cluster_miou", "cluster_accuracy", "linear_miou", "linear_accuracy")}}

    summary = {"stego": row(base), "depthg": row([b + d for b, d in zip(base, deltas)])}
    summary["depthg"]["paired_vs_stego"] = {"cluster_miou": {"mean": sum(deltas) / len(deltas), "half_width": 0.1,
                                                             "ci": [min(deltas), max(deltas)]}}
    if extra:  # a baseline with only a cluster metric
        summary[extra] = {"seeds": seeds, "cluster_miou": {"mean": 5.0, "std": 0.0, "values": [5.0] * len(seeds)}}
    return {"command": "x", "seeds": seeds, "protocol": {"world_seed": world}, "summary": summary}


def test_reports_are_found_wherever_the_file_holds_them(tmp_path):
    one = _report(1, [0.5, -0.5, 0.1])
    assert [label for label, _ in results.reports_in(one)] == [""]
    several = {"note": "two test worlds", "worlds": {"1": one, "2": _report(2, [1.0, 2.0, 3.0], extra="kmeans")}}
    found = results.reports_in(several)
    assert [label for label, _ in found] == ["worlds/1", "worlds/2"] and results.world_of(found[1][1]) == 2
    # a report that carries another one under its own key: both are found
    nested = {**one, "all_variants": _report(1, [0.2, 0.1], extra="kmeans")}
    assert [label for label, _ in results.reports_in(nested)] == ["", "all_variants"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(several))
    assert len(results.load_reports(path)) == 2
    path.write_text(json.dumps({"no": "report"}))
    with pytest.raises(results.ResultsError, match="no ablation report"):
        results.load_reports(path)


def test_median_seed_is_the_lower_median_over_every_world():
    reports = [("a", _report(1, [1.08, -0.33, -0.19, 0.7])), ("b", _report(2, [-1.6, 0.0]))]
    pick = results.median_seed(reports)
    assert (pick["world_seed"], pick["seed"], pick["delta"]) == (1, 2, pytest.approx(-0.19)) and pick["n"] == 6
    assert pick["mean"] == pytest.approx((1.08 - 0.33 - 0.19 + 0.7 - 1.6 + 0.0) / 6)
    committed = results.load_reports(ROOT / "benchmarks/results/miniature_reproduction.json")
    real = results.median_seed(committed)
    stego = committed[0][1]["summary"]["stego"]
    assert real["min"] <= real["delta"] <= real["max"] and real["n"] == len(stego.get("runs", stego["seeds"]))


def test_median_seed_of_a_report_over_several_worlds_names_its_world_and_changes():
    # ablate --world-seed 101 202: values world-major, runs as [world, seed]
    deltas = {(101, 0): 0.5, (101, 1): -0.2, (202, 0): 0.1, (202, 1): 0.9}
    runs = [list(k) for k in deltas]
    base = [10.0, 11.0, 12.0, 13.0]
    row = lambda vals: {"seeds": [0, 1], "runs": runs, "cluster_miou": {"mean": 0.0, "values": vals}}
    report = {"command": "python -m depthg ablate --world-seed 101 202 --out-dir runs/t cache_dir=/x world_n_val=200 "
                         "eval_every=0", "seeds": [0, 1], "protocol": {"test_world_seeds": [101, 202]},
              "summary": {"stego": row(base), "depthg": row([b + d for b, d in zip(base, deltas.values())])}}
    pick = results.median_seed([("", report)])
    # sorted differences -0.2, 0.1, 0.5, 0.9: the lower median 0.1 is world 202, seed 0
    assert (pick["world_seed"], pick["seed"], pick["n"]) == (202, 0, 4) and pick["delta"] == pytest.approx(0.1)
    assert pick["overrides"] == ["world_n_val=200", "eval_every=0"]
    assert results.world_label(report) == "worlds 101, 202" and results.world_of(report) == 101


def test_verdicts_read_the_paired_intervals():
    report = _report(1, [0.2, 0.3, 0.4])
    assert [v for v, _ in results.verdicts(report)["better"]] == ["depthg"]
    text = results.verdict_sentences(report, label="Test world 1")[0]
    assert text.startswith("Test world 1: unsupervised mIoU of STEGO is 11.00 % over 3 seeds")
    # STEGO's own gap over k-means of the frozen features gets its sentence, Holm-adjusted p included
    report["summary"]["stego"]["paired_vs_kmeans"] = {"cluster_miou": {"mean": 3.0, "half_width": 1.0,
                                                                       "ci": [2.0, 4.0], "holm_p": 0.004}}
    found = results.verdict_sentences(report)
    assert len(found) == 2 and "+3.00 [+2.00, +4.00] (Holm-adjusted p 0.004)" in found[1]
    assert "the baseline the depth variants are compared against works here" in found[1]
    assert "`depthg` +0.30 [+0.20, +0.40]" in text and "none is below it" in text
    # with the cluster-probe baseline, the gap is split into the head's part and the clusterer's part
    report["summary"]["stego"]["paired_vs_frozen_probe"] = {"cluster_miou": {"mean": 1.0, "half_width": 0.5,
                                                                             "ci": [0.5, 1.5]}}
    report["summary"]["frozen_probe"] = {"paired_vs_kmeans": {"cluster_miou": {"mean": 2.0, "half_width": 0.25,
                                                                               "ci": [1.75, 2.25]}}}
    split = results.verdict_sentences(report)[2]
    assert "the head adds +1.00 [+0.50, +1.50] points" in split and "the clusterer +2.00 [+1.75, +2.25]" in split


def test_published_numbers_come_from_docs_with_their_sources(tmp_path):
    rows = results.read_published(ROOT / "docs/published.md")
    assert {r["benchmark"] for r in rows} >= {"Cityscapes-27", "COCO-Stuff-27", "Potsdam-3"}
    assert all(r["source"] and r["seen_via"] for r in rows)
    depthg = next(r for r in rows if r["benchmark"] == "Cityscapes-27" and r["method"] == "DepthG")
    assert (depthg["unsup_acc"], depthg["unsup_miou"], depthg["linear_miou"]) == (81.6, 23.1, None)
    assert "Table 2" in depthg["source"] and len(results.published_numbers(rows)) >= 40
    bad = tmp_path / "p.md"
    bad.write_text("## X\n\n| " + " | ".join(results.PUBLISHED_COLUMNS) + " |\n|---|\n| a | b | 1 | two | – | – | s | v |\n")
    with pytest.raises(results.ResultsError, match="must be a number"):
        results.read_published(bad)
