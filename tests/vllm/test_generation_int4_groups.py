"""vLLM serves an int4 checkpoint whose matrices have different group sizes exactly like ``zssvd.load`` + HF.

``--group-size auto`` gives every stored int4 matrix its own group size: V^T and U of a factor pair
differ, matrices kept dense take any of 32 ... 256. The checkpoint here is built directly with such a
mix (deterministic, unlike a measured choice) from SmolLM2 cut to two layers (real weights, so the
greedy tokens are not near-ties), and served at tensor-parallel size 3: o_proj's 576 inputs split into
slices of 192, inside its groups of 128 / 256, which the loader splits exactly (``io.vllm.sharding``).
"""
import copy

import pytest
import torch

from serving_helpers import PROMPTS, need_vllm
from zssvd.io.vllm.check import compare, hf_greedy, vllm_greedy

need_vllm()

LOGPROB_ATOL = 2e-3  # as test_generation.py: fp32 on both sides, summation order only
# Few: the reference's fp32 int4 CPU path de-quantises every matrix per call (half a second a token on
# 2 cores); vLLM's engine start at tp 3 (about a minute) is the rest of this test's time.
PROMPTS_USED, NEW_TOKENS = PROMPTS[:2], 16
LAYERS = 2
# Per projection: ("lowrank", V^T's group, U's group) or ("dense", the weight's group).
GROUPS = {
    "q_proj": ("lowrank", 32, 128), "k_proj": ("lowrank", 256, 32), "v_proj": ("lowrank", 64, 256),
    "o_proj": ("lowrank", 256, 32), "gate_proj": ("lowrank", 128, 64), "up_proj": ("dense", 256),
    "down_proj": ("lowrank", 32, 256),
}
# o_proj of the second layer kept dense in groups of 128: tp 3 cuts those too.
OVERRIDES = {"model.layers.1.self_attn.o_proj": ("dense", 128)}


def _int4_module(linear: torch.nn.Linear, choice: tuple):
    """``linear`` as int4: dense with one group size, or factors of half its rank with V^T's and U's own."""
    from zssvd.nn.packed_linear import PackedDenseLinear
    from zssvd.stages.packing import pack_lowrank

    weight = linear.weight.detach().float()
    if choice[0] == "dense":
        return PackedDenseLinear.from_weight(weight, storage="int4", group_size=choice[1])
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    k = min(weight.shape) // 2
    return pack_lowrank(U[:, :k] * S[:k], Vh[:k].T.contiguous(), None, "int4",
                        {"group_size": choice[1], "u_group_size": choice[2]})


@pytest.fixture(scope="module")
def mixed_groups_checkpoint(smollm2, tmp_path_factory):
    import zssvd

    model, tokenizer = smollm2
    small = copy.deepcopy(model).float()
    small.model.layers = small.model.layers[:LAYERS]
    small.config.num_hidden_layers = LAYERS
    for name, linear in list(small.named_modules()):
        choice = OVERRIDES.get(name) or GROUPS.get(name.rsplit(".", 1)[-1])
        if choice and isinstance(linear, torch.nn.Linear):
            parent, child = name.rsplit(".", 1)
            setattr(small.get_submodule(parent), child, _int4_module(linear, choice))
    return zssvd.save_compressed(small, tmp_path_factory.mktemp("int4-mixed") / "ckpt", tokenizer=tokenizer)


@pytest.mark.slow
def test_mixed_group_sizes_serve_like_hf_at_tp3(mixed_groups_checkpoint, engines):
    expected = hf_greedy(mixed_groups_checkpoint, PROMPTS_USED, NEW_TOKENS)
    result = compare(expected, vllm_greedy(engines.get(mixed_groups_checkpoint, 3), PROMPTS_USED, NEW_TOKENS))
    assert result["same_tokens"], f"vLLM's greedy tokens differ from Hugging Face's ({result})"
    assert result["max_logprob_diff"] < LOGPROB_ATOL, result
