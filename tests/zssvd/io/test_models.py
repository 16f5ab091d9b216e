"""Finding targets and input groups across architectures; unsupported structures."""
import pytest
import torch
from torch import nn

from tiny_models import ARCHS, random_windows, tiny_model
from zssvd.io.models import UnsupportedModelError, assign_input_groups, find_targets

EXPECTED_GROUPS = {  # per block: the sets of linears that share an input
    "llama": [{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}],
    "mistral": [{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}],
    "qwen2": [{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}],
    "qwen3": [{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}],
    "opt": [{"q_proj", "k_proj", "v_proj"}, {"out_proj"}, {"fc1"}, {"fc2"}],
    "gpt_neox": [{"query_key_value"}, {"dense"}, {"dense_h_to_4h"}, {"dense_4h_to_h"}],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_and_input_groups(arch):
    model = tiny_model(arch)
    targets = assign_input_groups(model, find_targets(model), random_windows(1, 8))
    assert all(isinstance(t.module, nn.Linear) for t in targets)
    names = {t.name for t in targets}
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    for block in range(2):
        prefix = f"{targets.blocks_path}.{block}."
        groups = [{m.rsplit(".", 1)[1] for m in members}
                  for leader, members in targets.groups.items() if leader.startswith(prefix)]
        assert sorted(map(sorted, groups)) == sorted(map(sorted, EXPECTED_GROUPS[arch]))


def test_gpt2_conv1d_is_rejected_by_name():
    with pytest.raises(UnsupportedModelError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D.*nn.Linear"):
        find_targets(tiny_model("gpt2"))


class Strange(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
        self.config = type("Cfg", (), {"model_type": "strange"})()

    def forward(self, ids):
        x = torch.nn.functional.one_hot(ids, 4).float()
        for block in self.stack:
            x = block(x)
        return x


def test_unknown_architecture_lists_what_was_found_and_accepts_an_override():
    model = Strange()
    with pytest.raises(UnsupportedModelError, match=r"unknown architecture 'strange'.*stack \(3 x Sequential\)"):
        find_targets(model)
    targets = find_targets(model, blocks_path="stack")
    assert [t.name for t in targets] == ["stack.0.0", "stack.1.0", "stack.2.0"]
    with pytest.raises(UnsupportedModelError, match="'nowhere' is not a non-empty ModuleList"):
        find_targets(model, blocks_path="nowhere")


def test_nan_weights_are_refused_before_any_work():
    from zssvd.stages.calibration import CalibrationSet
    from zssvd.pipeline import analyze

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight contains NaN"):
        analyze(model, CalibrationSet(random_windows(2, 8), "random"))


def _tiny_bert(is_decoder: bool):
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, is_decoder=is_decoder)
    return BertLMHeadModel(config)


@pytest.mark.parametrize("make, message", [
    (lambda: _tiny_bert(is_decoder=False), r"BertLMHeadModel \(bert, is_decoder=False\) is an encoder"),
    (lambda: nn.ModuleDict({"inner": tiny_model("llama")}), r"not a Hugging Face causal LM: it has no "
                                                            r"get_input_embeddings.*pass the wrapped"),
], ids=["bert-encoder", "wrapper"])
def test_what_is_not_a_causal_lm_is_refused_before_any_work(make, message):
    from zssvd.config import CompressionConfig
    from zssvd.pipeline import AnalysisOptions, analyze, compress
    from zssvd.stages.calibration import CalibrationSet

    model = make()
    blocks = "bert.encoder.layer" if "bert" in type(model).__name__.lower() else "inner.model.layers"
    calib = CalibrationSet(random_windows(2, 8), "random")
    with pytest.raises(UnsupportedModelError, match=message):
        analyze(model, calib, AnalysisOptions(blocks_path=blocks))
    with pytest.raises(UnsupportedModelError, match=message):
        compress(model, calib, CompressionConfig(ratio=0.6), options=AnalysisOptions(blocks_path=blocks))


def test_a_bert_used_as_a_decoder_is_a_causal_lm():
    from zssvd.io.models import check_causal_lm

    check_causal_lm(_tiny_bert(is_decoder=True))  # causal attention: accepted
    check_causal_lm(tiny_model("llama"))
