"""transformers' from_pretrained on zssvd checkpoints: the registered quantizer (format 2) and the Auto
classes / remote code (format 1) give the same model as zssvd.load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zssvd
from checkpoint_helpers import compress_tiny, disk_env, hf_from_pretrained, logits, save_checkpoint
from zssvd.io.checkpoint import CheckpointError
from zssvd.nn import describe_packed


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["stored", "float32"])
def test_from_pretrained_gives_the_logits_of_zssvd_load(storage, version, dtype, tmp_path, ids):
    model, report = compress_tiny(storage=storage)
    save_checkpoint(model, tmp_path, version, report)
    ours = zssvd.load(tmp_path, dtype=dtype)
    theirs = hf_from_pretrained(tmp_path, **({"dtype": dtype} if dtype is not None else {}))
    assert type(theirs) is type(ours)
    assert describe_packed(theirs) == describe_packed(ours)
    assert torch.equal(logits(theirs, ids), logits(ours, ids))


def test_format_1_loads_through_its_remote_code(tmp_path, ids):
    from transformers import AutoConfig, AutoModelForCausalLM

    model, report = compress_tiny()
    save_checkpoint(model, tmp_path, 1)
    expected = logits(zssvd.load(tmp_path), ids)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)  # the checkpoint's own code
    assert torch.equal(logits(remote, ids), expected)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "zssvd"


def test_plain_transformers_cannot_mistake_format_1_for_the_base_model(tmp_path):
    model, _ = compress_tiny()
    save_checkpoint(model, tmp_path, 1)
    # Without zssvd imported and without trust_remote_code, transformers refuses instead of building a
    # LLaMA with random layers where the packed ones should be.
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "trust_remote_code" in run.stderr


def test_a_corrupted_checkpoint_is_refused_with_a_device_map(tmp_path):
    model, report = compress_tiny(storage="hq")
    zssvd.save_compressed(model, tmp_path, report=report)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        hf_from_pretrained(tmp_path, device_map="cpu")


def test_the_quantizer_loads_pre_quantized_checkpoints_only(tmp_path):
    from tiny_models import save_tiny_model_dir
    from zssvd.io.hf_quantizer import ZSSVDQuantizationConfig

    save_tiny_model_dir(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        hf_from_pretrained(tmp_path, quantization_config=ZSSVDQuantizationConfig())


OTHER = [p for p in os.environ.get("ZSSVD_OTHER_TRANSFORMERS", "").split(os.pathsep) if p]


@pytest.mark.skipif(not OTHER, reason="set ZSSVD_OTHER_TRANSFORMERS to folders holding other transformers "
                                      "installs (pip install --no-deps --target DIR transformers==4.57.6 ...)")
@pytest.mark.parametrize("other", OTHER)
def test_other_transformers_versions_load_the_same_model(other, tmp_path):
    directories = []
    for storage in ("dense", "remap", "hq"):
        model, report = compress_tiny(storage=storage)
        directories.append(str(zssvd.save_compressed(model, tmp_path / storage, report=report)))
    env = disk_env()
    env["PYTHONPATH"] = os.pathsep.join([other, env["PYTHONPATH"]])
    script = Path(__file__).with_name("hf_loads.py")
    run = subprocess.run([sys.executable, str(script), *directories], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 3
    for result in results:
        assert result["stored"] == {"equal": True, "dtype": "torch.bfloat16", "class": "LlamaForCausalLM"}, result
        assert result["float32"]["equal"] and result["float32"]["dtype"] == "torch.float32", result


def test_the_quantizer_is_registered_by_register_hf_only():
    code = ("import zssvd; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q, "
            "AUTO_QUANTIZATION_CONFIG_MAPPING as C; before = 'zssvd' in Q or 'zssvd' in C; zssvd.register_hf(); "
            "zssvd.register_hf(); print(before, Q['zssvd'].__name__, C['zssvd'].__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=disk_env())
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "ZSSVDHfQuantizer", "ZSSVDQuantizationConfig"]
