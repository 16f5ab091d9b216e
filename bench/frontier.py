"""Perplexity against bytes for every method ``bench/quality.py`` measured: a plot and a Pareto table (issue 15).

    python bench/frontier.py                      # reads bench/results/quality.jsonl
    python bench/frontier.py --results bench/results/quality.jsonl other.jsonl --setting bos

Reads the JSON lines ``bench/quality.py`` appends (the dense model, the weight-quantisation baselines
and the ZS-SVD configurations; sign-flip rows are skipped), averages each configuration over its seeds,
and writes, next to ``--out`` (default ``bench/results/frontier``):

* ``frontier.png``: one panel per evaluation text, perplexity (log axis) against the stored bytes of
  the target linears as a fraction of their 16-bit bytes (scales and zero points included, as
  quality.py counts them), one series per method, the dense model as a dotted line, and the Pareto
  front (no other point has fewer or equal bytes and lower or equal perplexity) as a dashed step line;
* ``frontier.md``: every configuration sorted by bytes, its perplexities with the Pareto-front ones in
  bold, then each text's front from fewest bytes to most.

Rows evaluated with and without the BOS token at the start of each window are not comparable (the
dense perplexity differs); ``--setting`` picks one, by default the one with the most rows. Nothing is
measured here: every number comes from the result files.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from quality import bytes_ratio  # noqa: E402  (quality.py's own byte count of a row)

DENSE = "dense model (16-bit)"


class Point(NamedTuple):
    """One configuration, averaged over its seeds."""

    series: str              # the plot's series: "RTN g64", "ZS-SVD remap zero-sum-2nd"
    label: str               # the table's name: "rtn-int4-g64", "ZS-SVD remap zero-sum-2nd 0.8"
    bytes: float             # stored bytes / 16-bit bytes of the targets
    ppl: dict[str, float]    # text -> mean perplexity over the seeds
    seeds: int


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"frontier: no result file {path}; run bench/quality.py first (its --results)")
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def setting(row: dict) -> str:
    return "bos" if row.get("bos") else "no-bos"


def _calib(row: dict) -> str:
    return row.get("calib_source", "").removeprefix("files:")


def _names(row: dict, usual_calib: str) -> tuple[str, str]:
    """(series, label) of a baseline or ZS-SVD row."""
    if "baseline" in row:
        group = f"g{row['group']}" if row.get("group") else "per row"
        return f"{row['method'].upper()} {group}", row["baseline"]
    series = f"ZS-SVD {row['storage']} {row['strategy']}"
    series += f" g={row['group_size']}" if row.get("group_size", 64) != 64 else ""  # int4's group size (64 unless set)
    series += "" if row.get("ordered", True) else " unordered"
    series += f" +{row['corrections']} corrections" if row.get("corrections") else ""
    series += "" if _calib(row) == usual_calib else f" (calibrated on {_calib(row)})"
    return series, f"{series} {row['ratio']}"


def points(rows: list[dict], chosen: str | None = None) -> tuple[Point | None, list[Point], str]:
    """(the dense model's point, every other configuration's, the setting used); rows without
    perplexities (quality.py's sign-flip rows) are skipped."""
    rows = [r for r in rows if "signflip" not in r and "ppl" in r]
    # A row copied from one result file into another (same configuration and seed: quality.py's "key")
    # is one measurement, not a second seed.
    rows = list({r.get("key") or json.dumps(r, sort_keys=True): r for r in rows}.values())
    if not rows:
        raise SystemExit("frontier: the result files hold no perplexity rows")
    chosen = chosen or Counter(setting(r) for r in rows if not r.get("dense")).most_common(1)[0][0]
    rows = [r for r in rows if setting(r) == chosen]
    dense_rows = [r for r in rows if r.get("dense")]
    dense = Point(DENSE, DENSE, 1.0, dense_rows[-1]["ppl"], 1) if dense_rows else None
    calibs = Counter(_calib(r) for r in rows if "storage" in r)
    usual = calibs.most_common(1)[0][0] if calibs else ""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if not r.get("dense"):
            groups.setdefault(_names(r, usual), []).append(r)
    found = []
    for (series, label), group in groups.items():
        texts = set.intersection(*(set(g["ppl"]) for g in group))
        ppl = {t: statistics.mean(g["ppl"][t] for g in group) for t in sorted(texts)}
        found.append(Point(series, label, statistics.mean(bytes_ratio(g) for g in group), ppl, len(group)))
    return dense, sorted(found, key=lambda p: (p.bytes, p.label)), chosen


def pareto_front(pairs: list[tuple[float, float]]) -> list[bool]:
    """Whether each (bytes, perplexity) pair is on the Pareto front: no other pair has bytes <= and
    perplexity <= with one of them strictly smaller. Equal pairs are both on it; NaN is never."""
    def dominated(b: float, p: float) -> bool:
        return any(ob <= b and op <= p and (ob < b or op < p) for ob, op in pairs)

    return [not (math.isnan(b) or math.isnan(p)) and not dominated(b, p) for b, p in pairs]


def fronts(pts: list[Point], texts: list[str]) -> dict[str, list[bool]]:
    """text -> whether each point is on that text's front (points without the text are not)."""
    return {t: pareto_front([(p.bytes, p.ppl.get(t, math.nan)) for p in pts]) for t in texts}


def table(pts: list[Point], texts: list[str], chosen: str) -> str:
    on = fronts(pts, texts)
    lines = [f"Windows {'with' if chosen == 'bos' else 'without'} the BOS token. Bold: on that text's Pareto "
             "front (nothing else has fewer or equal bytes and lower or equal perplexity).", "",
             "| bytes | method | seeds | " + " | ".join(texts) + " |", "|---|---|---|" + "---|" * len(texts)]
    for i, p in enumerate(pts):
        cells = [("-" if t not in p.ppl else f"**{p.ppl[t]:.2f}**" if on[t][i] else f"{p.ppl[t]:.2f}") for t in texts]
        lines.append(f"| {p.bytes:.4f} | {p.label} | {p.seeds} | " + " | ".join(cells) + " |")
    lines += ["", "| text | Pareto front, fewest bytes first: bytes method (perplexity) |", "|---|---|"]
    for t in texts:
        front = [f"{p.bytes:.3f} {p.label} ({p.ppl[t]:.2f})" for i, p in enumerate(pts) if on[t][i]]
        lines.append(f"| {t} | " + " -> ".join(front) + " |")
    return "\n".join(lines)


def _styles(series: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """A colour per family (the quantiser, or ZS-SVD with its storage) and a marker per variant (group
    size, strategy, corrections), so that related series look related."""
    def split(s: str) -> tuple[str, str]:
        n = 2 if s.startswith("ZS-SVD") else 1
        words = s.split(" ")
        return " ".join(words[:n]), " ".join(words[n:])

    families = list(dict.fromkeys(split(s)[0] for s in series))
    variants = list(dict.fromkeys(split(s)[1] for s in series))
    colours = {s: f"C{families.index(split(s)[0]) % 10}" for s in series}
    markers = {s: "os^Dv<>ph*"[variants.index(split(s)[1]) % 10] for s in series}
    return colours, markers


def plot(pts: list[Point], texts: list[str], path: Path) -> Path:
    from zssvd.evaluation.plots import _new_figure, _save

    on = fronts(pts, texts)
    series = list(dict.fromkeys(p.series for p in pts if p.series != DENSE))
    colours, markers = _styles(series)
    fig = _new_figure((5.2 * len(texts), 5.6))
    axes = fig.subplots(1, len(texts), squeeze=False)[0]
    for ax, text in zip(axes, texts):
        for s in series:
            mine = sorted((p.bytes, p.ppl[text]) for p in pts if p.series == s and text in p.ppl)
            if mine:
                ax.plot(*zip(*mine), marker=markers[s], color=colours[s], label=s, lw=1, ms=5)
        front = sorted((p.bytes, p.ppl[text]) for i, p in enumerate(pts) if on[text][i])
        ax.step(*zip(*front), where="post", color="black", ls="--", lw=1, label="Pareto front")
        for p in pts:
            if p.series == DENSE and text in p.ppl:
                ax.axhline(p.ppl[text], color="grey", ls=":", lw=1, label=DENSE)
        ax.set_yscale("log")
        ax.set_title(text)
        ax.set_xlabel("stored bytes / 16-bit bytes of the target linears")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize="small")
    return _save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", type=Path, default=[Path("bench/results/quality.jsonl")],
                   help="JSON-lines files written by bench/quality.py (default: bench/results/quality.jsonl)")
    p.add_argument("--setting", choices=("bos", "no-bos"), default=None,
                   help="evaluation windows with or without BOS (default: the setting with the most rows)")
    p.add_argument("--out", type=Path, default=Path("bench/results/frontier"),
                   help="writes OUT.png and OUT.md (default bench/results/frontier)")
    p.add_argument("--no-plot", action="store_true", help="only the table (no matplotlib needed)")
    args = p.parse_args(argv)
    dense, pts, chosen = points(load_rows(args.results), args.setting)
    pts = ([dense] if dense else []) + pts
    texts = list(dense.ppl) if dense else sorted({t for q in pts for t in q.ppl})
    text = table(sorted(pts, key=lambda q: (q.bytes, q.label)), texts, chosen)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    if not args.no_plot:
        print(f"wrote {plot(pts, texts, args.out.with_suffix('.png'))}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
