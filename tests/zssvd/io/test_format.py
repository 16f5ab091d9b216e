"""The format-2 layout that transformers and vLLM read: config.json, zssvd.json, model.safetensors."""
import json

import torch
from safetensors import safe_open

import zssvd
from checkpoint_helpers import compress_tiny, save_v1
from zssvd.io.checkpoint import block_sha256, verify_checkpoint


def test_config_is_the_source_architecture_with_a_quantization_config(storage, tmp_path):
    model, report = compress_tiny(storage=storage)
    zssvd.save_compressed(model, tmp_path, report=report)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16" and "auto_map" not in config
    block = config["quantization_config"]
    assert {k: block[k] for k in ("quant_method", "format_version", "dtype")} == {
        "quant_method": "zssvd", "format_version": 2, "dtype": "bfloat16"}
    assert set(block["modules"]) == {name for name in report["ranks"] if name not in report["kept_dense"]
                                     or storage in ("hq", "int4")}
    for desc in block["modules"].values():
        expected = {"dense": "bf16", "remap": "remap", "hq": "fp8", "int4": "int4"}[storage]
        assert desc["storage"] == expected and desc["kind"] in ("lowrank", "dense")
    assert not list(tmp_path.glob("*.py"))  # no remote code

    manifest = verify_checkpoint(tmp_path)
    assert manifest["format_version"] == 2 and manifest["modules"] == block["modules"]
    assert manifest["quantization_config_sha256"] == block_sha256(block)
    assert manifest["config_sha256"] == block_sha256(config)


def test_tensors_are_stored_under_module_names_with_the_described_layout(storage, tmp_path):
    model, report = compress_tiny(storage=storage)
    zssvd.save_compressed(model, tmp_path, report=report)
    modules = verify_checkpoint(tmp_path)["modules"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, desc in modules.items():
            for tensor, spec in desc["tensors"].items():
                stored = f.get_tensor(f"{name}.{tensor}")
                assert list(stored.shape) == spec["shape"]
                assert str(stored.dtype) == f"torch.{spec['dtype']}"
        untouched = [k for k in keys if not k.startswith(tuple(modules))]
        assert untouched and all(f.get_tensor(k).dtype == torch.bfloat16 for k in untouched)


def test_saving_over_a_format_1_checkpoint_removes_its_remote_code(tmp_path):
    model, report = compress_tiny()
    save_v1(model, tmp_path)
    assert (tmp_path / "modeling_zssvd.py").is_file()
    zssvd.save_compressed(model, tmp_path, report=report)
    assert not list(tmp_path.glob("*.py"))
    assert verify_checkpoint(tmp_path)["format_version"] == 2


def test_transformers_reads_the_source_architecture(tmp_path):
    from transformers import AutoConfig

    model, report = compress_tiny(storage="remap")
    zssvd.save_compressed(model, tmp_path, report=report)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "llama" and config.quantization_config["quant_method"] == "zssvd"
