"""PNG figures of a compression report, written next to ``report.json``.

* ``kept_ranks.png``: kept-rank fraction (kept / full rank) per module kind and decoder block, as a
  heat map; a matrix listed in ``kept_dense`` (stored as its original dense weights) counts as 1.0
  and is hatched and marked "D";
* ``running_sum.png``: the running sum of predicted dL of the removed components during selection,
  against the fraction of the removal sequence done;
* ``scores.png``: the distribution of the component scores dL per module kind (stacked, symlog x).

A report without a running sum (the ``uniform`` strategy removes nothing greedily) gets no
``running_sum.png``: ``plot_running_sum`` returns None and ``write_plots`` lists only the files it
wrote. matplotlib is optional (``pip install 'zssvd[plots]'``); it is imported only when drawing,
through the Agg canvas directly, so pyplot and the user's chosen backend are never touched.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

MISSING_MATPLOTLIB = "plots need matplotlib: pip install matplotlib"
FILES = ("kept_ranks.png", "running_sum.png", "scores.png")


class KeptRankMatrix(NamedTuple):
    """The heat map's data: ``values[row, col]`` is the kept fraction of module kind ``kinds[row]`` in
    block ``blocks[col]`` (NaN where that block has no such module); ``dense`` marks kept-dense cells."""

    kinds: list[str]
    blocks: list[int]
    values: np.ndarray
    dense: np.ndarray


def _figure_tools():
    """(Figure, FigureCanvasAgg), or the ImportError that says how to get them."""
    try:
        import matplotlib  # noqa: F401  (checked first: a cached submodule must not hide its absence)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(MISSING_MATPLOTLIB) from err
    return Figure, FigureCanvasAgg


def _new_figure(size):
    Figure, FigureCanvasAgg = _figure_tools()
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _block_index(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"{name}: no decoder block index (no integer component) in the module name")


def _kinds(names: list[str]) -> dict[str, str]:
    """name -> kind: the last name part, or, where that part names two modules of one block (e.g.
    ``attention.dense`` and ``mlp.dense``), everything after the block index."""
    short = {name: name.rsplit(".", 1)[-1] for name in names}
    seen, clashing = set(), set()
    for name in names:
        key = (short[name], _block_index(name))
        if key in seen:
            clashing.add(short[name])
        seen.add(key)
    kinds = {}
    for name in names:
        if short[name] in clashing:
            kinds[name] = re.split(r"\.\d+\.", name, maxsplit=1)[-1]
        else:
            kinds[name] = short[name]
    return kinds


def kept_rank_matrix(report: dict) -> KeptRankMatrix:
    """Kept-rank fractions by module kind (rows, in order of first appearance) and block (columns)."""
    names = list(report["ranks"])
    kinds_of = _kinds(names)
    kinds = list(dict.fromkeys(kinds_of[n] for n in names))
    blocks = sorted({_block_index(n) for n in names})
    row = {k: i for i, k in enumerate(kinds)}
    col = {b: j for j, b in enumerate(blocks)}
    values = np.full((len(kinds), len(blocks)), np.nan)
    dense = np.zeros((len(kinds), len(blocks)), dtype=bool)
    kept_dense = set(report.get("kept_dense", ()))
    for name in names:
        i, j = row[kinds_of[name]], col[_block_index(name)]
        if name in kept_dense:
            values[i, j], dense[i, j] = 1.0, True
        else:
            values[i, j] = report["ranks"][name] / report["full_ranks"][name]
    return KeptRankMatrix(kinds, blocks, values, dense)


def _setting(report: dict) -> str:
    return f"{report.get('strategy', '?')}, {report.get('storage', '?')} storage"


def plot_kept_ranks(report: dict, path) -> Path:
    """Heat map of the kept-rank fractions; returns ``path``."""
    data = kept_rank_matrix(report)
    rows, cols = data.values.shape
    fig = _new_figure((min(24.0, 5.5 + 0.45 * cols), 1.8 + 0.42 * rows))
    from matplotlib.patches import Rectangle

    ax = fig.add_subplot()
    cmap = _colormap("viridis").with_extremes(bad="#dddddd")  # grey: no such module in that block
    image = ax.imshow(np.ma.masked_invalid(data.values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    for i, j in zip(*np.nonzero(data.dense)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="white", linewidth=0))
        ax.text(j, i, "D", ha="center", va="center", color="black", fontsize=8, fontweight="bold")
    ax.set_yticks(range(rows), data.kinds)
    step = max(1, cols // 32)
    ax.set_xticks(range(0, cols, step), [str(b) for b in data.blocks[::step]])
    ax.set_xlabel("decoder block")
    ax.set_ylabel("module kind")
    fig.colorbar(image, ax=ax, label="kept rank / full rank")
    title = (f"kept-rank fraction: {_setting(report)}\n"
             f"ratio target {report['target_ratio']:.3g}, achieved {report['achieved_ratio']:.4f}")
    if data.dense.any():
        title += "\nD, hatched: kept dense (counts as 1.0)"
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].copy()


def removal_steps(report: dict) -> np.ndarray | None:
    """The removal step (1-based) of each point of ``selection_running_sum``, as the report records
    it in ``selection_steps``; None when the report does not say (then points are spread evenly)."""
    steps = report.get("selection_steps")
    trace = report.get("selection_running_sum") or ()
    if not steps or len(steps) != len(trace):
        return None
    return np.asarray(steps, dtype=np.float64)


def plot_running_sum(report: dict, path) -> Path | None:
    """Running sum of predicted dL during selection against the fraction of removals done; returns
    ``path``, or None (and writes nothing) when the report has no running sum (e.g. ``uniform``)."""
    trace = np.asarray(report.get("selection_running_sum") or [], dtype=np.float64)
    if trace.size == 0:
        return None
    fig = _new_figure((7.0, 4.0))
    ax = fig.add_subplot()
    steps = removal_steps(report)
    if steps is not None:
        x = steps / steps[-1]
        xlabel = f"fraction of the removal sequence (removal step / {int(steps[-1])})"
    else:  # unknown sampling: spread the points evenly
        x = np.arange(1, trace.size + 1) / trace.size
        xlabel = f"fraction of the removal sequence ({trace.size} evenly spread points)"
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.plot(x, trace, linewidth=1.0, color="tab:blue")
    ax.plot([x[-1]], [trace[-1]], "o", color="tab:red", markersize=4)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sum of predicted dL of removed components")
    ax.set_title(f"selection running sum: {_setting(report)}, ratio {report['target_ratio']:.3g}\n"
                 f"final {trace[-1]:.4g}", fontsize=10)
    return _save(fig, path)


def positive_fraction(summary: dict) -> float:
    """Fraction of scores >= 0 (the report's value, else counted from the bins right of zero)."""
    if "positive_fraction" in summary:
        return float(summary["positive_fraction"])
    edges = np.asarray(summary["edges"])
    counts = np.sum([np.asarray(c) for c in summary["counts"].values()], axis=0)
    return float(counts[edges[:-1] >= 0].sum() / max(1, counts.sum()))


def _symlog_axis(ax, edges: np.ndarray) -> None:
    """Symlog x scale, linear inside the innermost bin, ticks at 0 and at most ~5 decades a side."""
    positive = edges[edges > 0]
    linthresh = float(positive.min()) if positive.size else 1e-12
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(float(edges[0]), float(edges[-1]))
    low = int(np.floor(np.log10(linthresh))) + 1  # one decade clear of 0, so labels do not collide
    high = int(np.floor(np.log10(float(np.abs(edges).max()))))
    decades = list(range(high, low - 1, -max(1, (high - low) // 5 + 1)))[::-1]
    ticks = sorted([-(10.0 ** d) for d in decades] + [0.0] + [10.0 ** d for d in decades])
    ax.set_xticks(ticks)
    ax.tick_params(axis="x", labelsize=8)


def plot_scores(report: dict, path) -> Path | None:
    """Stacked histogram of dL per module kind on a symlog x axis; returns ``path``, or None when the
    report has no ``score_summary``."""
    summary = report.get("score_summary")
    if not summary or not summary.get("counts"):
        return None
    edges = np.asarray(summary["edges"], dtype=np.float64)
    fig = _new_figure((8.0, 4.5))
    ax = fig.add_subplot()
    kinds = list(summary["counts"])
    palette = _colormap("tab10" if len(kinds) <= 10 else "tab20")
    bottom = np.zeros(edges.size - 1)
    for index, kind in enumerate(kinds):
        top = bottom + np.asarray(summary["counts"][kind], dtype=np.float64)
        ax.stairs(top, edges, baseline=bottom, fill=True, color=palette(index % palette.N), label=kind)
        bottom = top
    _symlog_axis(ax, edges)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("predicted dL per component (symlog)")
    ax.set_ylabel("components (stacked by kind)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="kind", title_fontsize=8)
    total = summary.get("total", int(bottom.sum()))
    ax.set_title(f"component scores: {_setting(report)}, {total} components\n"
                 f"positive (dL >= 0): {positive_fraction(summary):.1%}", fontsize=10)
    return _save(fig, path)


def write_plots(report: dict, out_dir) -> list[Path]:
    """Write ``kept_ranks.png``, ``running_sum.png`` and ``scores.png`` into ``out_dir``; returns the
    paths written (a plot without data, such as the running sum of ``uniform``, is skipped)."""
    _figure_tools()  # fail before writing anything when matplotlib is missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot(report, out / name)
               for plot, name in zip((plot_kept_ranks, plot_running_sum, plot_scores), FILES)]
    return [p for p in written if p is not None]


def plot_directory(directory) -> list[Path]:
    """Regenerate the plots of a compressed checkpoint from ``directory/report.json``."""
    report_path = Path(directory) / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found (a directory written by zssvd compress)")
    return write_plots(json.loads(report_path.read_text()), directory)
