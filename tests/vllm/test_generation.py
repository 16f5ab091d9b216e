"""vLLM (CPU build, fp32) serves zssvd checkpoints exactly like ``zssvd.load`` + Hugging Face.

For each storage (dense factors at 0.8, remap at 0.8, hq at 0.4, int4 at 0.25) and tensor-parallel size 1 and 3:
greedy decoding of 64 new tokens for several prompts gives the same tokens, and each token's
log-probability agrees within LOGPROB_ATOL (fp32 on both sides; the difference is summation order).
Engines run eager, except one case in vLLM's default compiled mode: hq, whose CPU path (fp8 re-encoded
to int8) is not the reference's arithmetic, so compiled code that traced the reference would differ.
"""
import pytest

from serving_helpers import CHECKPOINTS, NEW_TOKENS, PROMPTS, need_vllm
from zssvd.io.vllm.check import compare, hf_greedy, vllm_greedy

need_vllm()

LOGPROB_ATOL = 2e-3
_HF = {}


def _reference(directory):
    if directory not in _HF:  # once per checkpoint: tp 1 and 3 compare with the same run
        _HF[directory] = hf_greedy(directory, PROMPTS, NEW_TOKENS)
    return _HF[directory]


CASES = [pytest.param(name, tp, id=f"{name}-{tp}") for name in CHECKPOINTS for tp in (1, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("name, tp", CASES)
def test_vllm_greedy_equals_hf(name, tp, checkpoints, engines):
    result = compare(_reference(checkpoints[name]), vllm_greedy(engines.get(checkpoints[name], tp), PROMPTS,
                                                                NEW_TOKENS))
    assert result["same_tokens"], f"{name} tp={tp}: vLLM's greedy tokens differ from Hugging Face's ({result})"
    assert result["max_logprob_diff"] < LOGPROB_ATOL, f"{name} tp={tp}: {result}"


@pytest.mark.slow
def test_vllm_compiled_mode_equals_hf(checkpoints, engines):
    """vLLM's default (torch.compile) runs zskernels' CPU paths as opaque ops: the same numbers as eager."""
    directory = checkpoints["hq"]
    result = compare(_reference(directory), vllm_greedy(engines.get(directory, 1, eager=False), PROMPTS, NEW_TOKENS))
    assert result["same_tokens"], f"hq compiled: vLLM's greedy tokens differ from Hugging Face's ({result})"
    assert result["max_logprob_diff"] < LOGPROB_ATOL, f"hq compiled: {result}"
