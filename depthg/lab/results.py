"""Reading the results the tables and figures notebooks show, without assuming what a file holds.

- :func:`reports_in`: every ablation report in a results file (one world, or several under any key), with
  a label; a report is any dict with ``seeds`` and ``summary``, whatever variants its summary holds.
- :func:`median_seed`: the seed (and world) whose paired difference of a variant to the base is the median
  of all seeds: the representative run to draw, instead of a favourable one.
- :func:`verdicts` / :func:`verdict_sentences`: which variants the paired 95 % intervals put above, below
  or indistinguishable from the base, as sentences with the numbers.
- :func:`read_published`: the published numbers of ``docs/published.md``, one dict per table row with its
  source.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
from pathlib import Path
from typing import Any, Iterator

from depthg.utils import DepthGError

__all__ = ["reports_in", "load_reports", "world_of", "worlds_of", "world_label", "command_overrides", "median_seed",
           "verdicts", "verdict_sentences", "PUBLISHED_COLUMNS", "read_published", "published_numbers", "ResultsError"]


class ResultsError(DepthGError, ValueError):
    """A results file or docs/published.md that cannot be read as expected."""


def _walk(node: Any, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict) and "summary" in node and "seeds" in node:
        yield label, node
        # a report may carry further reports under its own keys (e.g. the same table over more variants)
        children = ((k, v) for k, v in node.items() if k not in ("summary", "runs", "protocol", "variants"))
    else:
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        if isinstance(child, (dict, list)):
            yield from _walk(child, f"{label}/{key}" if label else str(key))


def reports_in(data: dict[str, Any] | list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every ablation report in ``data`` as (label, report): the file itself when it is one report (label
    ``""``), and each report nested in it (label: its key path, e.g. ``"worlds/2"``)."""
    return list(_walk(data, ""))


def load_reports(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """:func:`reports_in` of a JSON file; an error when the file holds no report."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        found = reports_in(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path} is not valid JSON ({err.msg})") from None
    if not found:
        raise ResultsError(f"{path} holds no ablation report (a dict with 'seeds' and 'summary')")
    return found


def world_label(report: dict[str, Any]) -> str:
    """'world 1' or 'worlds 101, 202, 303' (empty when the report does not say)."""
    worlds = worlds_of(report)
    return f"world{'s' if len(worlds) > 1 else ''} {', '.join(map(str, worlds))}" if worlds else ""


def world_of(report: dict[str, Any]) -> int | None:
    """The synthetic world seed a report was run on, when it says (several worlds: the first; see worlds_of)."""
    worlds = worlds_of(report)
    return worlds[0] if worlds else None


def worlds_of(report: dict[str, Any]) -> list[int]:
    """Every synthetic world seed a report was run on, when it says."""
    protocol = report.get("protocol", {})
    worlds = protocol.get("test_world_seeds") or protocol.get("world_seeds")
    if worlds:
        return [int(w) for w in worlds]
    world = protocol.get("world_seed", protocol.get("test_world_seed"))
    return [] if world is None else [int(world)]


def _runs(row: dict[str, Any], report: dict[str, Any]) -> list[list[Any]]:
    """A summary row's runs as [world, seed], in the order of its values (a one-world report lists seeds only)."""
    return row.get("runs") or [[world_of(report), s] for s in row["seeds"]]


def median_seed(reports: list[tuple[str, dict[str, Any]]], variant: str = "depthg", base: str = "stego",
                metric: str = "cluster_miou") -> dict[str, Any]:
    """The (world, seed) whose paired difference ``variant - base`` in ``metric`` is the lower median over
    every seed of every report holding both; with the mean and all differences."""
    pairs = []
    for _, report in reports:
        summary = report["summary"]
        if variant in summary and base in summary:
            a, b = summary[variant], summary[base]
            runs = _runs(a, report)
            if runs == _runs(b, report):
                for (world, seed), x, y in zip(runs, a[metric]["values"], b[metric]["values"]):
                    pairs.append((x - y, None if world is None else int(world), int(seed), report))
    if not pairs:
        raise ResultsError(f"no report holds both {variant!r} and {base!r} over the same seeds")
    diffs = [p[0] for p in pairs]
    delta, world, seed, report = next(p for p in pairs if p[0] == statistics.median_low(diffs))
    return {"world_seed": world, "seed": seed, "overrides": command_overrides(report), "delta": delta,
            "mean": statistics.fmean(diffs),
            "median": statistics.median(diffs), "n": len(pairs), "min": min(diffs), "max": max(diffs)}


#: keys of a command's key=value changes that say where a run runs, not what it computes
_WHERE_KEYS = ("cache_dir", "device", "num_workers", "threads", "output_dir", "data_dir")


def command_overrides(report: dict[str, Any]) -> list[str]:
    """The key=value changes a report's command gave every run (not the ones that only say where it runs)."""
    tokens = shlex.split(report.get("command", ""))
    return [t for t in tokens if "=" in t and not t.startswith("-") and t.split("=", 1)[0] not in _WHERE_KEYS]


def verdicts(report: dict[str, Any], metric: str = "cluster_miou") -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Variants whose paired 95 % interval to the base lies above 0 (``better``), below (``worse``) or
    contains 0 (``unclear``), each with its paired-difference dict."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {"better": [], "worse": [], "unclear": []}
    for variant, row in report["summary"].items():
        d = row.get("paired_vs_stego", {}).get(metric)
        if not d or math.isnan(d.get("half_width", math.nan)):
            continue
        lo, hi = d["ci"]
        out["better" if lo > 0 else "worse" if hi < 0 else "unclear"].append((variant, d))
    return out


def _fmt(variant: str, d: dict[str, Any]) -> str:
    holm = f" (Holm-adjusted p {d['holm_p']:.3g})" if d.get("holm_p") is not None else ""
    return f"`{variant}` {_interval(d)}{holm}"


def verdict_sentences(report: dict[str, Any], metric: str = "cluster_miou", label: str = "") -> list[str]:
    """Plain sentences of :func:`verdicts`, with the base's mean and every interval (points)."""
    names = {"cluster_miou": "unsupervised mIoU", "cluster_accuracy": "unsupervised accuracy",
             "linear_miou": "linear-probe mIoU", "linear_accuracy": "linear-probe accuracy"}
    v = verdicts(report, metric)
    stego = report["summary"].get("stego", {})
    base = stego.get(metric, {})
    worlds = worlds_of(report)
    n = (f"{len(stego['runs'])} runs ({len(worlds)} worlds × {len(report['seeds'])} seeds)"
         if len(worlds) > 1 and stego.get("runs") else f"{len(report['seeds'])} seeds")
    where = f"{label}: " if label else ""
    head = (f"{where}{names.get(metric, metric)} of STEGO is {base['mean']:.2f} % over {n}; "
            if base else f"{where}{names.get(metric, metric)}, {n}: ")
    parts = [f"above it (95 % paired interval above 0): {', '.join(_fmt(*x) for x in v['better'])}" if v["better"] else
             "no variant is above it with 95 % confidence",
             f"below it: {', '.join(_fmt(*x) for x in v['worse'])}" if v["worse"] else "none is below it",
             "not distinguishable from it: " + ", ".join(f"`{name}`" for name, _ in v["unclear"]) if v["unclear"] else ""]
    found = [head + "; ".join(p for p in parts if p) + "."]
    # STEGO's own effect: the gap over k-means of the frozen features it distils
    km = stego.get("paired_vs_kmeans", {}).get(metric)
    if km and not math.isnan(km.get("half_width", math.nan)):
        lo, hi = km["ci"]
        found.append(f"{where}STEGO − k-means of the frozen features: {_fmt('stego', km)[len('`stego` '):]} points, "
                     + ("so the baseline the depth variants are compared against works here." if lo > 0 else
                        "so STEGO is not shown to beat its own starting point here." if hi >= 0 else
                        "STEGO is below its own starting point here."))
    # that gap split run by run: the head with the clusterer held fixed, and the clusterer alone
    head = stego.get("paired_vs_frozen_probe", {}).get(metric)
    probe = report["summary"].get("frozen_probe", {}).get("paired_vs_kmeans", {}).get(metric)
    if head and probe and not math.isnan(head.get("half_width", math.nan)):
        found.append(f"{where}Of that gap, the head adds {_interval(head)} points with the clusterer held fixed "
                     f"(STEGO − its cluster probe fitted on the frozen features) and the clusterer "
                     f"{_interval(probe)} (that probe − k-means; both descriptive).")
    return found


def _interval(d: dict[str, Any]) -> str:
    return f"{d['mean']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


#: the columns of every table in docs/published.md, in order
PUBLISHED_COLUMNS = ("method", "backbone", "unsup. Acc", "unsup. mIoU", "linear Acc", "linear mIoU", "source",
                     "seen via")
_KEYS = ("method", "backbone", "unsup_acc", "unsup_miou", "linear_acc", "linear_miou", "source", "seen_via")


def _cell(text: str, key: str, where: str) -> Any:
    text = text.strip()
    if key in ("method", "backbone", "source", "seen_via"):
        return text
    if text in ("", "–", "-", "n/a"):
        return None
    try:
        return float(text.strip("*"))
    except ValueError:
        raise ResultsError(f"{where}: {key} must be a number or '–', got {text!r}") from None


def read_published(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of the published-numbers tables of ``docs/published.md``: one dict per row with ``benchmark``
    (the ``## `` heading above the table), the numbers (percent, None where none was published or found)
    and ``source`` / ``seen_via``. Only tables whose header is :data:`PUBLISHED_COLUMNS` are read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it lists the published numbers with their sources")
    rows, benchmark, in_table = [], None, False
    header = "| " + " | ".join(PUBLISHED_COLUMNS) + " |"
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("## "):
            benchmark, in_table = line[3:].strip(), False
        elif line.strip() == header:
            in_table = True
        elif in_table and line.startswith("|") and not re.fullmatch(r"\|[-| :]+\|", line.strip()):
            cells = [c for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if len(cells) != len(_KEYS):
                raise ResultsError(f"{path}:{n}: expected {len(_KEYS)} cells, got {len(cells)}")
            rows.append({"benchmark": benchmark, **{k: _cell(c, k, f"{path}:{n}") for k, c in zip(_KEYS, cells)}})
        elif in_table and not line.startswith("|"):
            in_table = False
    if not rows:
        raise ResultsError(f"{path} has no table with the header {header}")
    return rows


def published_numbers(rows: list[dict[str, Any]]) -> list[float]:
    """Every number of the published rows, in order."""
    return [r[k] for r in rows for k in ("unsup_acc", "unsup_miou", "linear_acc", "linear_miou") if r[k] is not None]
