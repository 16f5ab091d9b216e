"""PNG plots of a compression report: the data behind them, the files, and the command line."""
import copy
import json
import math
import sys

import numpy as np
import pytest

import zssvd
from tiny_models import english_text, random_windows, save_tiny_model_dir, tiny_model
from zssvd.config import CompressionConfig
from zssvd.stages.calibration import CalibrationSet
from zssvd.cli import main
from zssvd.pipeline import analyze
from zssvd.evaluation.plots import (FILES, kept_rank_matrix, plot_kept_ranks, plot_running_sum, plot_scores,
                         positive_fraction, removal_steps, write_plots)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def reports():
    """Real reports of a tiny LLaMA: zero-sum at 0.8 (some matrices stay dense) and uniform."""
    model = tiny_model("llama")
    calib = CalibrationSet(random_windows(4, 16, seed=1), "random")
    analysis = analyze(model, calib)
    return {strategy: zssvd.compress(copy.deepcopy(model), calib,
                                     CompressionConfig(ratio=0.8, strategy=strategy), analysis=analysis)[1]
            for strategy in ("zero-sum", "uniform")}


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert 5_000 < len(data) < 2_000_000, (path, len(data))


def test_kept_rank_matrix_matches_the_report(reports):
    report = reports["zero-sum"]
    assert report["kept_dense"], "the setting must keep some matrix dense to test its marking"
    data = kept_rank_matrix(report)
    assert data.kinds == KINDS and data.blocks == [0, 1]
    assert data.values.shape == data.dense.shape == (7, 2)
    for name, kept in report["ranks"].items():
        i, j = KINDS.index(name.rsplit(".", 1)[-1]), int(name.split(".")[2])
        if name in report["kept_dense"]:
            assert data.values[i, j] == 1.0 and data.dense[i, j]
        else:
            assert data.values[i, j] == kept / report["full_ranks"][name] and not data.dense[i, j]
    assert data.dense.sum() == len(report["kept_dense"])


def test_kept_rank_matrix_by_hand():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_proj",
             "model.layers.2.mlp.down_proj", "model.layers.10.mlp.down_proj"]
    report = {"ranks": dict(zip(names, [8, 30, 4, 50, 64])), "full_ranks": dict.fromkeys(names, 64),
              "kept_dense": ["model.layers.2.mlp.down_proj"]}
    data = kept_rank_matrix(report)
    assert data.kinds == ["q_proj", "down_proj"] and data.blocks == [0, 2, 10]
    expected = np.array([[8 / 64, 4 / 64, np.nan], [30 / 64, 1.0, 1.0]])
    np.testing.assert_array_equal(data.values, expected)  # NaN: block 10 has no q_proj
    np.testing.assert_array_equal(data.dense, [[False, False, False], [False, True, False]])


def test_a_kind_named_twice_in_one_block_keeps_its_path():
    names = ["gpt_neox.layers.0.attention.dense", "gpt_neox.layers.0.mlp.dense", "gpt_neox.layers.0.mlp.fc"]
    report = {"ranks": dict(zip(names, [1, 2, 3])), "full_ranks": dict.fromkeys(names, 4), "kept_dense": []}
    data = kept_rank_matrix(report)
    assert data.kinds == ["attention.dense", "mlp.dense", "fc"]
    np.testing.assert_array_equal(data.values[:, 0], [0.25, 0.5, 0.75])


def test_removal_steps_come_from_the_report(reports):
    from zssvd.pipeline import sampled_steps

    report = reports["zero-sum"]
    total = sum(report["full_ranks"][n] - report["ranks"][n] for n in report["ranks"])
    steps = removal_steps(report)
    assert steps is not None and len(steps) == len(report["selection_running_sum"])
    assert steps[0] == 1 and steps[-1] == total
    assert removal_steps({**report, "selection_steps": [1, 2]}) is None  # inconsistent: spread evenly
    assert removal_steps(reports["uniform"]) is None


@pytest.mark.parametrize("n", [1, 2500, 3999, 5000, 12345])
def test_sampled_steps_keep_the_start_and_the_end_of_long_traces(n):
    from zssvd.pipeline import sampled_steps

    sampled = sampled_steps(n)
    assert sampled[0] == 0 and sampled[-1] == n - 1 and len(sampled) <= 2001
    assert sampled == sorted(set(sampled))


def test_positive_fraction_from_the_bins():
    summary = {"edges": [-2.0, -1.0, 0.0, 1.0, 2.0], "counts": {"a": [1, 1, 0, 2], "b": [0, 0, 3, 1]}}
    assert positive_fraction(summary) == 6 / 8
    assert positive_fraction({**summary, "positive_fraction": 0.25}) == 0.25


def test_write_plots_zero_sum(reports, tmp_path):
    written = write_plots(reports["zero-sum"], tmp_path)
    assert [p.name for p in written] == list(FILES)
    for path in written:
        _assert_png(path)


def test_uniform_has_no_running_sum_plot(reports, tmp_path):
    report = reports["uniform"]
    assert report["selection_running_sum"] == []
    assert plot_running_sum(report, tmp_path / "running_sum.png") is None
    written = write_plots(report, tmp_path / "sub")
    assert [p.name for p in written] == ["kept_ranks.png", "scores.png"]
    assert not (tmp_path / "sub" / "running_sum.png").exists()
    for path in written:
        _assert_png(path)


def test_single_plots_return_their_path(reports, tmp_path):
    report = reports["zero-sum"]
    assert plot_kept_ranks(report, tmp_path / "a.png") == tmp_path / "a.png"
    assert plot_scores(report, tmp_path / "b.png") == tmp_path / "b.png"
    assert plot_scores({k: v for k, v in report.items() if k != "score_summary"}, tmp_path / "c.png") is None
    assert math.isclose(positive_fraction(report["score_summary"]), report["score_summary"]["positive_fraction"])


def test_missing_matplotlib_is_a_clear_import_error(reports, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="plots need matplotlib: pip install matplotlib"):
        write_plots(reports["zero-sum"], tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots-cli")
    save_tiny_model_dir(root / "model")
    (root / "calib.txt").write_text(english_text(1500, seed=1))
    return root


def _compress(workspace, out, *extra):
    return main(["compress", str(workspace / "model"), "--ratio", "0.7", "--out", str(out), "--calib-file",
                 str(workspace / "calib.txt"), "--calib-samples", "4", "--seq-len", "32", "--cache-dir",
                 str(workspace / "cache"), "--quiet", *extra])


def test_cli_compress_writes_plots_and_plot_redraws_them(workspace, capsys):
    out = workspace / "out"
    assert _compress(workspace, out) == 0
    capsys.readouterr()
    for name in FILES:
        _assert_png(out / name)
        (out / name).unlink()
    assert main(["plot", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(printed["plots"]) == sorted(str(out / name) for name in FILES)
    for name in FILES:
        _assert_png(out / name)


def test_cli_no_plots_and_missing_matplotlib(workspace, capsys, caplog, monkeypatch):
    out = workspace / "no-plots"
    assert _compress(workspace, out, "--no-plots") == 0
    assert (out / "report.json").is_file() and not list(out.glob("*.png"))

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = workspace / "no-matplotlib"
    with caplog.at_level("INFO", logger="zssvd"):
        assert _compress(workspace, out) == 0
    assert (out / "report.json").is_file() and not list(out.glob("*.png"))
    skipped = [r.getMessage() for r in caplog.records if "plots skipped" in r.getMessage()]
    assert skipped == ["plots skipped: plots need matplotlib: pip install matplotlib"]
    capsys.readouterr()
    assert main(["plot", str(out)]) == 2
    assert "plots need matplotlib" in capsys.readouterr().err


def test_cli_plot_without_a_report(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "report.json not found" in capsys.readouterr().err
