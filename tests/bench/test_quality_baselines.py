"""Weight-quantisation baselines of bench/quality.py: RTN against a float64 hand computation, byte counts,
and a ``--suite baselines`` run on a tiny model."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import english_text, save_tiny_model_dir, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality  # noqa: E402


def test_rtn_per_row_int8_matches_a_hand_computation():
    w = torch.tensor([[0.5, -1.27, 0.013, 0.0], [2.0, 1.0, -0.5, 0.25], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    out = quality.rtn_rows(w, 8)
    for i, row in enumerate(w.tolist()):
        peak = max(abs(v) for v in row)
        scale = float(torch.tensor(peak / 127).half()) or 1.0  # stored as float16; a zero row keeps scale 1
        expected = [max(-127, min(127, round(v / scale))) * scale for v in row]
        assert out[i].tolist() == pytest.approx(expected, abs=1e-15)
    assert out[0, 1].item() == pytest.approx(-1.27, rel=1e-3)  # the row's peak maps to code -127


def test_rtn_groupwise_matches_a_hand_computation_and_stays_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, generator=g, dtype=torch.float64)
    w[2, 4:] = 0.7  # a constant group: reproduced exactly (up to its 16-bit offset)
    for bits in (3, 4):
        out = quality.rtn_groups(w, bits, group=4)
        top = 2 ** bits - 1
        for r in range(3):
            for start in (0, 4):
                chunk = w[r, start:start + 4].tolist()
                lo = float(torch.tensor(min(chunk)).half())
                scale = float(torch.tensor((max(chunk) - lo) / top).half())
                scale = scale if scale > 0 else 1.0  # a constant group: every code 0, the value is the offset
                expected = [min(top, max(0, round((v - lo) / scale))) * scale + lo for v in chunk]
                assert out[r, start:start + 4].tolist() == pytest.approx(expected, abs=1e-12)
                # rounding error: half a step, plus the 16-bit rounding of the offset and of the scale
                slack = scale / 2 + abs(min(chunk) - lo) + top * abs(scale - (max(chunk) - min(chunk)) / top)
                assert max(abs(a - b) for a, b in zip(out[r, start:start + 4].tolist(), chunk)) <= slack + 1e-12
        assert len(set(out[0, :4].tolist())) <= 2 ** bits


def test_byte_counts_include_codes_scales_and_zero_points():
    assert quality.quantised_bytes((576, 1536), 8, None) == 576 * 1536 + 2 * 576
    assert quality.quantised_bytes((576, 1536), 4, 64) == 576 * 1536 // 2 + 4 * 576 * 24
    assert quality.quantised_bytes((3, 64), 3, 64) == math.ceil(3 * 64 * 3 / 8) + 4 * 3
    # as a fraction of 16-bit bytes: 4 + 32/64 bits and 3 + 32/64 bits per weight over 16
    assert quality.quantised_bytes((64, 640), 4, 64) / (2 * 64 * 640) == pytest.approx(0.28125)
    assert quality.quantised_bytes((64, 640), 3, 64) / (2 * 64 * 640) == pytest.approx(0.21875)
    with pytest.raises(ValueError, match="groups of 64"):
        quality.quantised_bytes((4, 100), 4, 64)


def test_fake_quantise_changes_only_the_targets_and_reports_their_bytes():
    from zssvd.io.models import find_targets
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = [t.shape for t in find_targets(model)]
    ratio = quality.fake_quantise_(model, "rtn-int8-row")
    assert ratio == pytest.approx(sum(m * n + 2 * m for m, n in shapes) / sum(2 * m * n for m, n in shapes))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert len(changed) == len(shapes) and all(".layers." in n and n.endswith("proj.weight") for n in changed)


@pytest.mark.parametrize("with_hqq", [False, True])
def test_baselines_suite_records_bytes_and_tabulates_with_the_zs_svd_rows(tmp_path, capsys, monkeypatch, with_hqq):
    if with_hqq:
        pytest.importorskip("hqq.core.quantize")
    # the tiny model has 32 or 64 inputs per target: groups of 16 stand in for the real suite's 64
    suite = {"rtn-int8-row": ("rtn", 8, None), "rtn-int4-g16": ("rtn", 4, 16), "hqq-int3-g16": ("hqq", 3, 16)}
    monkeypatch.setattr(quality, "BASELINES", suite if with_hqq else {k: v for k, v in suite.items() if "hqq" not in k})
    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "eval.txt").write_text(english_text(1500, seed=3))
    results = tmp_path / "q.jsonl"
    argv = ["--model", str(tmp_path / "model"), "--calib-file", str(tmp_path / "eval.txt"),
            "--eval", f"held={tmp_path / 'eval.txt'}", "--suite", "baselines", "--seq-len", "32", "--windows", "3",
            "--cache-dir", str(tmp_path / "cache"), "--results", str(results)]
    assert quality.main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    dense = next(r for r in rows if r.get("dense"))
    baselines = {r["baseline"]: r for r in rows if "baseline" in r}
    assert set(baselines) == set(quality.available_baselines())
    int4 = baselines["rtn-int4-g16"]
    assert int4["bytes_ratio"] == pytest.approx((4 + 32 / 16) / 16, abs=1e-5)
    assert 0.5 < baselines["rtn-int8-row"]["bytes_ratio"] < 0.6
    # 8 bits barely move a model; fewer bits do
    assert baselines["rtn-int8-row"]["ppl"]["held"] == pytest.approx(dense["ppl"]["held"], rel=0.05)
    assert int4["ppl"]["held"] != dense["ppl"]["held"]
    table = capsys.readouterr().out
    assert f"| {int4['bytes_ratio']:.4f} | rtn-int4-g16 |" in table  # the bytes-sorted frontier table
    assert "| | rtn-int4-g16 | (weight quantisation) |" in table
