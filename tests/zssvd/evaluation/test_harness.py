"""lm-evaluation-harness on a compressed checkpoint, with a task whose data is a local file."""
import importlib.util
import json

import pytest
import torch

import zssvd
from tiny_models import random_windows, tiny_model, tiny_tokenizer
from zssvd.config import CompressionConfig
from zssvd.stages.calibration import CalibrationSet
from zssvd.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install 'zssvd[eval]'")

def _best_choice(model, tokenizer, row) -> int:
    """Index of the choice with the highest total log-probability after the question."""
    context = tokenizer(row["question"])["input_ids"]
    scores = []
    for choice in row["choices"]:
        ids = torch.tensor([context + tokenizer(choice)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(len(context), ids.shape[1])))
    return max(range(len(scores)), key=scores.__getitem__)


TASK = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_zero_shot_on_a_compressed_checkpoint_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": "the river", "choices": [" flows", " xq"], "label": 0},
            {"question": "the king", "choices": [" zz", " was"], "label": 1},
            {"question": "north and", "choices": [" south", " qqq"], "label": 0}]
    (tasks / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / "local_mc.yaml").write_text(TASK.format(data=tasks / "data.jsonl"))
    model, report = zssvd.compress(tiny_model(), CalibrationSet(random_windows(4, 16), "random"),
                                   CompressionConfig(ratio=0.6))
    zssvd.save_compressed(model, tmp_path / "ckpt", tokenizer=tiny_tokenizer(), report=report)

    code = main(["lm-eval", str(tmp_path / "ckpt"), "--tasks", "local_mc", "--include-path", str(tasks),
                 "--batch-size", "2", "--quiet"])
    assert code == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The harness scored the packed model itself: same accuracy as our own log-likelihood ranking.
    loaded, tokenizer = zssvd.load(tmp_path / "ckpt"), tiny_tokenizer()
    assert results["local_mc"]["acc,none"] == pytest.approx(
        sum(_best_choice(loaded, tokenizer, r) == r["label"] for r in rows) / len(rows))

    code = main(["lm-eval", str(tmp_path / "ckpt"), "--tasks", "nonexistent_task", "--quiet"])
    assert code == 2 and "unknown lm-eval tasks" in capsys.readouterr().err
