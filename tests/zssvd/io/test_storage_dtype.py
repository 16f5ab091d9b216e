"""16-bit storage: a checkpoint stores float data in the 16-bit type of its source, whatever dtype the
compression computed in, and is no larger than the source's 16-bit size at the achieved ratio plus scales."""
import json
import struct

import pytest
import torch
from safetensors import safe_open

import zssvd
from checkpoint_helpers import compress_tiny, logits
from tiny_models import tiny_model, tiny_tokenizer
from zssvd.io.checkpoint import storage_dtype
from zssvd.io.models import load_model


def _source_dir(tmp_path, dtype=torch.bfloat16):
    """A model directory (weights stored in ``dtype``, tokenizer) that ``load_model`` reads."""
    tiny_model("llama", dtype=dtype).save_pretrained(tmp_path / "source")
    tiny_tokenizer().save_pretrained(tmp_path / "source")
    return tmp_path / "source"


@pytest.mark.parametrize("stored, expected", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.float32, torch.bfloat16)])
def test_the_storage_dtype_follows_the_source_file_not_the_compute_dtype(stored, expected, tmp_path):
    source = _source_dir(tmp_path, stored)
    model, _, _ = load_model(source, dtype="float32")  # computed in float32
    assert next(model.parameters()).dtype == torch.float32
    assert storage_dtype(model.config) == expected


def _payload_bytes(path) -> int:
    """A safetensors file's size without its JSON header."""
    data = path.read_bytes()
    return len(data) - 8 - struct.unpack("<Q", data[:8])[0]


def _scale_bytes(modules: dict) -> int:
    return sum(4 * torch.Size(spec["shape"]).numel() for desc in modules.values()
               for name, spec in desc["tensors"].items() if name.endswith("scale"))


@pytest.mark.parametrize("compute", ["bfloat16", "float32 from a bfloat16 file"])
def test_a_checkpoint_is_no_larger_than_the_16_bit_size_at_the_achieved_ratio(compute, storage, tmp_path):
    if compute == "bfloat16":
        model, report = compress_tiny(storage=storage, dtype=torch.bfloat16)
        source_files = None
    else:
        source = _source_dir(tmp_path)
        model, _, _ = load_model(source, dtype="float32")
        model, report = compress_tiny(storage=storage, model=model)
        source_files = (source / "model.safetensors").stat().st_size
    assert next(p for p in model.parameters() if p.is_floating_point()).dtype == getattr(torch, compute.split()[0])
    out = zssvd.save_compressed(model, tmp_path / "out", report=report)
    manifest = json.loads((out / "zssvd.json").read_text())
    assert manifest["dtype"] == "bfloat16"

    sizes = json.loads((out / "report.json").read_text())["bytes"]
    assert sizes["checkpoint"] == (out / "model.safetensors").stat().st_size
    assert sizes["source_16bit"] == 2 * sum(p.numel() for p in tiny_model("llama").parameters())
    assert sizes["source_files"] == source_files
    untouched = sizes["source_16bit"] - report["target_bytes_16bit"]
    bound = untouched + report["achieved_ratio"] * report["target_bytes_16bit"] + _scale_bytes(manifest["modules"])
    assert _payload_bytes(out / "model.safetensors") <= bound
    scales = _scale_bytes(manifest["modules"])
    assert report["target_bytes_stored"] <= report["achieved_ratio"] * report["target_bytes_16bit"] + scales
    assert sizes["checkpoint"] < sizes["source_16bit"]


def test_load_casts_float_data_only(tmp_path, ids):
    model, report = compress_tiny(storage="remap")
    zssvd.save_compressed(model, tmp_path, report=report)
    stored, computed = zssvd.load(tmp_path), zssvd.load(tmp_path, dtype=torch.float32)
    assert stored.model.embed_tokens.weight.dtype == torch.bfloat16
    assert computed.model.embed_tokens.weight.dtype == torch.float32
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for name, module in computed.named_modules():
            if hasattr(module, "packed") and callable(module.packed):
                for key, tensor in module.packed().items():  # int8 heads, 16-bit tails, fp32 scales: as stored
                    assert torch.equal(tensor, f.get_tensor(f"{name}.{key}"))
                    if key.endswith("_tail"):  # tails are float factors: in the checkpoint's 16-bit type
                        assert tensor.dtype == torch.bfloat16, (name, key)
    # a 16-bit compute dtype takes the tails too (no per-call conversion), losslessly here
    half = zssvd.load(tmp_path, dtype=torch.float16)
    tails = [t for m in half.modules() if hasattr(m, "packed") and callable(m.packed)
             for k, t in m.packed().items() if k.endswith("_tail") and t.numel()]
    assert tails and all(t.dtype == torch.float16 for t in tails)
    # float32 compute of bf16-stored weights: close to the bf16 model, not bit-equal
    assert torch.allclose(logits(computed, ids), logits(stored, ids).float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("storage", ["dense", "remap", "hq", "int4"])
def test_a_loaded_checkpoint_cast_with_float_computes_like_loading_it_in_float32(storage, tmp_path):
    """``zssvd.load(DIR).float()`` (the Hugging Face idiom) keeps the packed buffers as stored and computes
    exactly what ``zssvd.load(DIR, dtype=torch.float32)`` computes; ``.half()`` leaves them intact too."""
    model, report = compress_tiny(storage=storage)
    zssvd.save_compressed(model, tmp_path / "ckpt", report=report)  # 16-bit checkpoint
    x = torch.arange(8)[None] % 16
    reference = zssvd.load(tmp_path / "ckpt", dtype=torch.float32)(x).logits
    cast = zssvd.load(tmp_path / "ckpt").float()
    assert torch.equal(cast(x).logits, reference)
    half = zssvd.load(tmp_path / "ckpt").half()
    assert torch.isfinite(half(x).logits).all()
