"""Tiny random-weight causal LMs of several architectures, built from configs (no downloads)."""
from __future__ import annotations

import copy
import functools

import torch

VOCAB = 96


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=128)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=8, **llama_like)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, dropout=0.1, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt_neox")


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # Initialised in float32 and then cast, so every dtype gets the same weights (rounded): a
    # 16-bit initialisation draws different numbers in some torch / transformers versions.
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).to(dtype)
    # Larger-than-default weights make the tiny model's loss surface less flat, so first-order
    # effects are clearly measurable in the tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return model.eval()


def random_windows(num: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (num, length), generator=g)


def tiny_tokenizer(bos: bool = False):
    """A character-level fast tokenizer over printable ASCII (VOCAB ids), built offline.

    ``bos=True``: the last character's id becomes ``<s>``, a BOS token it adds to every encoding
    (``add_bos_token``, as LLaMA-family tokenizers do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 2 - bos)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    if bos:
        vocab["<s>"] = VOCAB - 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    special = dict(bos_token="<s>", add_bos_token=True) if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", **special)


def save_tiny_model_dir(path, arch: str = "llama"):
    """A Hugging Face model directory (config, safetensors weights, tokenizer) of a tiny model."""
    model = tiny_model(arch)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def english_text(words: int = 3000, seed: int = 0) -> str:
    """Pseudo-English text from a small word list (deterministic)."""
    import random

    vocab = ("the of and to in is was for on that with as by at from his her it an were are which this be "
             "model layer weight rank value matrix river city music history north south king war year").split()
    rnd = random.Random(seed)
    return " ".join(rnd.choice(vocab) for _ in range(words)) + "\n"


def text_windows(num: int, length: int, seed: int = 0) -> torch.Tensor:
    """Windows of character ids of ``english_text`` (what ``trained_tiny_model`` learned)."""
    ids = tiny_tokenizer()(english_text(num * length // 4 + 100, seed=seed))["input_ids"]
    stream = torch.tensor(ids[: num * length])
    return stream.view(num, length)


def trained_tiny_model(arch: str = "llama", steps: int = 150, seed: int = 0):
    """A tiny model briefly trained on ``english_text``: unlike a random one, its loss surface has
    real structure, so compression hurts it and first-order effects are clearly measurable.
    Trained once per process and settings; every caller gets its own copy."""
    return copy.deepcopy(_trained(arch, steps, seed))


@functools.lru_cache(maxsize=None)
def _trained(arch: str, steps: int, seed: int):
    model = tiny_model(arch, seed=seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = text_windows(64, 32, seed=seed + 100)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=g)]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
