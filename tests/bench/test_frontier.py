"""bench/frontier.py on synthetic bench/quality.py rows: the Pareto front, seed averaging, the table and the files."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import frontier  # noqa: E402

NAN = float("nan")


def test_pareto_front_by_hand():
    pairs = [(0.22, 240.0),   # fewest bytes: on the front however bad
             (0.22, 260.0),   # same bytes, worse: dominated
             (0.28, 35.6),    # on
             (0.28, 38.7),    # dominated by the 35.6 at the same bytes
             (0.40, 41.0),    # more bytes and worse than 0.28's 35.6: dominated
             (0.50, 27.4),    # on
             (0.50, 27.4),    # an equal twin: neither dominates, both on
             (0.85, 30.0),    # dominated by 0.50
             (1.00, 27.3),    # better than everything: on
             (0.30, NAN)]     # not measured: never on
    assert frontier.pareto_front(pairs) == [True, False, True, False, False, True, True, False, True, False]


def test_pareto_front_agrees_with_a_brute_force_definition():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=12))
    def check(pairs):
        on = frontier.pareto_front([(float(b), float(p)) for b, p in pairs])
        for (b, p), flag in zip(pairs, on):
            better = [(ob, op) for ob, op in pairs if ob <= b and op <= p and (ob, op) != (b, p)]
            assert flag == (not better)
        # the front's perplexity falls strictly as its bytes grow
        front = sorted({pair for pair, flag in zip(pairs, on) if flag})
        assert all(p1 > p2 and b1 < b2 for (b1, p1), (b2, p2) in zip(front, front[1:]))

    check()


def _rows():
    dense = {"dense": True, "ppl": {"wikitext2": 27.4, "pydoc": 17.4}}
    rtn3 = {"baseline": "rtn-int3-g64", "method": "rtn", "bits": 3, "group": 64, "bytes_ratio": 0.21875,
            "ppl": {"wikitext2": 241.0, "pydoc": 143.0}}
    rtn4 = {**rtn3, "baseline": "rtn-int4-g64", "bits": 4, "bytes_ratio": 0.28125, "ppl": {"wikitext2": 38.7, "pydoc": 22.6}}
    zs = [{"seed": s, "storage": "remap", "strategy": "zero-sum", "ordered": True, "corrections": 0, "ratio": 0.4,
           "achieved_ratio": 0.4, "bytes_ratio": b, "calib_source": "files:valid.txt", "ppl": {"wikitext2": w, "pydoc": 99.0}}
          for s, b, w in ((0, 0.20, 100.0), (1, 0.22, 200.0))]
    legacy = {"seed": 0, "storage": "dense", "strategy": "uniform", "ordered": True, "corrections": 0, "ratio": 0.6,
              "achieved_ratio": 0.6, "achieved_bytes_ratio": 1.2, "calib_source": "valid.txt",  # float32 count
              "ppl": {"wikitext2": 150.0, "pydoc": 20.0}}
    other_setting = {**rtn4, "bos": True, "ppl": {"wikitext2": 1.0, "pydoc": 1.0}}
    flips = {"seed": 0, "signflip": {"other": "@pydoc"}}
    return [dense, rtn3, rtn4, *zs, legacy, other_setting, flips]


def test_points_average_seeds_and_keep_one_setting():
    dense, pts, chosen = frontier.points(_rows())
    assert chosen == "no-bos" and dense.ppl == {"wikitext2": 27.4, "pydoc": 17.4}
    by_label = {p.label: p for p in pts}
    assert set(by_label) == {"rtn-int3-g64", "rtn-int4-g64", "ZS-SVD remap zero-sum 0.4", "ZS-SVD dense uniform 0.6"}
    zs = by_label["ZS-SVD remap zero-sum 0.4"]
    assert zs.seeds == 2 and zs.bytes == pytest.approx(0.21) and zs.ppl["wikitext2"] == pytest.approx(150.0)
    assert by_label["ZS-SVD dense uniform 0.6"].bytes == 0.6  # legacy dense rows: 16-bit factors, quality.bytes_ratio
    assert by_label["rtn-int4-g64"].ppl["wikitext2"] == 38.7  # the BOS row is not mixed in
    assert by_label["rtn-int3-g64"].series == "RTN g64" and zs.series == "ZS-SVD remap zero-sum"
    _, bos_pts, _ = frontier.points(_rows(), "bos")
    assert [p.label for p in bos_pts] == ["rtn-int4-g64"]


def test_a_measured_group_size_is_its_own_series_and_a_copied_row_counts_once():
    zs = {"key": "int4 0.22 seed 0", "seed": 0, "storage": "int4", "strategy": "zero-sum", "ordered": True, "corrections": 0, "ratio": 0.22,
          "achieved_ratio": 0.22, "bytes_ratio": 0.22, "calib_source": "files:valid.txt",
          "ppl": {"wikitext2": 68.0, "pydoc": 168.0}}
    auto = {**zs, "key": "int4 0.22 auto seed 0", "group_size": "auto", "ppl": {"wikitext2": 59.0, "pydoc": 152.0}}
    seed1 = {**zs, "key": "int4 0.22 seed 1", "seed": 1, "group_size": 64, "ppl": {"wikitext2": 70.0, "pydoc": 170.0}}
    _, pts, _ = frontier.points([zs, dict(zs), auto, seed1])  # dict(zs): the row copied into a second file
    by_label = {p.label: p for p in pts}
    assert set(by_label) == {"ZS-SVD int4 zero-sum 0.22", "ZS-SVD int4 zero-sum g=auto 0.22"}
    g64 = by_label["ZS-SVD int4 zero-sum 0.22"]  # group_size 64 written out or not: one configuration
    assert g64.seeds == 2 and g64.ppl["wikitext2"] == pytest.approx(69.0)  # zs once, seed 1 once
    assert by_label["ZS-SVD int4 zero-sum g=auto 0.22"].ppl == {"pydoc": 152.0, "wikitext2": 59.0}


def test_table_marks_each_texts_front():
    dense, pts, chosen = frontier.points(_rows())
    lines = frontier.table([dense] + pts, ["wikitext2", "pydoc"], chosen).splitlines()
    row = {line.split(" | ")[1]: line for line in lines if line.startswith("| 0.") or line.startswith("| 1.")}
    # wikitext2: ZS-SVD (0.21, 150) -> int4 (38.7) -> dense (27.4); int3 (0.219, 241) and 0.6 (150) dominated
    assert "**150.00**" in row["ZS-SVD remap zero-sum 0.4"] and "| 241.00 |" in row["rtn-int3-g64"]
    assert "**38.70**" in row["rtn-int4-g64"] and "**27.40**" in row[frontier.DENSE]
    # pydoc: ZS-SVD (99) -> int4 (22.6) -> dense uniform 0.6 (20.0) -> dense model (17.4)
    assert "**20.00**" in row["ZS-SVD dense uniform 0.6"] and "| 150.00 |" in row["ZS-SVD dense uniform 0.6"]
    fronts = [line for line in lines if line.startswith("| wikitext2 |") or line.startswith("| pydoc |")]
    assert fronts[0].count("->") == 2 and fronts[1].count("->") == 3


def test_main_writes_the_table_and_the_plot(tmp_path):
    results = tmp_path / "quality.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    out = tmp_path / "frontier"
    no_plot = [] if _has_matplotlib() else ["--no-plot"]
    assert frontier.main(["--results", str(results), "--out", str(out), *no_plot]) == 0
    assert "| 0.2812 | rtn-int4-g64 | 1 | **38.70** | **22.60** |" in out.with_suffix(".md").read_text()
    if not no_plot:  # drawn
        assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no result file"):
        frontier.main(["--results", str(tmp_path / "missing.jsonl"), "--no-plot"])


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
