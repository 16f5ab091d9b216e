"""The public API: a serialisable config recorded in report.json, filter_fn, the deprecated call forms."""
import copy
import json

import pytest
from torch import nn

import zssvd
from tiny_models import random_windows, tiny_model
from zssvd.config import AnalysisOptions, CompressionConfig
from zssvd.stages.calibration import CalibrationSet


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    calib = CalibrationSet(random_windows(4, 16), "random")
    return model, calib, zssvd.analyze(model, calib, AnalysisOptions(score_backend="torch"))


def test_the_config_is_recorded_in_the_report_and_round_trips(setup):
    model, calib, analysis = setup
    config = CompressionConfig(ratio=0.6, strategy="uniform")
    _, report = zssvd.compress_(copy.deepcopy(model), calib, config, analysis=analysis)
    recorded = json.loads(json.dumps(report))["config"]
    assert CompressionConfig.from_dict(recorded) == config
    assert report["target_ratio"] == 0.6 and report["strategy"] == "uniform"
    with pytest.raises(ValueError, match="unknown CompressionConfig fields"):
        CompressionConfig.from_dict({**recorded, "ratoi": 0.5})


@pytest.mark.parametrize("call", [
    pytest.param(lambda m, c, a: zssvd.compress(m, c, ratio=0.6, strategy="uniform", analysis=a), id="keywords"),
    pytest.param(lambda m, c, a: zssvd.compress(m, c, 0.6, "dense", "uniform", analysis=a), id="positional"),
])
def test_the_old_call_forms_still_work_and_warn(setup, call):
    model, calib, analysis = setup
    with pytest.warns(DeprecationWarning, match="CompressionConfig"):
        _, old = call(copy.deepcopy(model), calib, analysis)
    _, new = zssvd.compress_(copy.deepcopy(model), calib, CompressionConfig(ratio=0.6, strategy="uniform"),
                             analysis=analysis)
    assert old["ranks"] == new["ranks"] and old["config"] == new["config"]


def test_the_in_place_name_and_the_prepare_convert_names_are_one_function():
    assert zssvd.compress is zssvd.compress_ is zssvd.convert and zssvd.prepare is zssvd.analyze


def test_filter_fn_chooses_the_targets(setup):
    model, calib, _ = setup
    only_mlp = lambda module, fqn: isinstance(module, nn.Linear) and ".mlp." in fqn  # noqa: E731
    targets = zssvd.find_targets(model, filter_fn=only_mlp)
    assert targets.targets and all(".mlp." in t.name for t in targets)
    out, report = zssvd.compress_(copy.deepcopy(model), calib, CompressionConfig(ratio=0.7), filter_fn=only_mlp,
                                  options=AnalysisOptions(score_backend="torch"))
    assert set(report["ranks"]) == {t.name for t in targets}
    assert all(".mlp." in name for name in zssvd.nn.describe_packed(out))
    with pytest.raises(zssvd.io.models.UnsupportedModelError, match="nn.Linear"):
        zssvd.find_targets(model, filter_fn=lambda module, fqn: fqn.endswith("input_layernorm"))


def test_public_names_of_earlier_versions_remain():
    for name in ("load", "load_model", "save_compressed", "compress", "analyze", "perplexity", "calibration",
                 "find_targets", "CheckpointError", "AnalysisOptions", "Analysis"):
        assert getattr(zssvd, name) is not None
