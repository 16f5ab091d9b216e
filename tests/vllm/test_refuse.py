"""vLLM refuses an altered or edited zssvd checkpoint with zssvd's own CheckpointError, before serving."""
import json
import os
import shutil

import pytest

from serving_helpers import MAX_MODEL_LEN, need_vllm

need_vllm()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _load(directory):
    from vllm import LLM

    return LLM(str(directory), dtype="float32", max_model_len=MAX_MODEL_LEN)


def _edit_rank(directory):
    config = json.loads((directory / "config.json").read_text())
    name, desc = next((n, d) for n, d in config["quantization_config"]["modules"].items() if d["kind"] == "lowrank")
    desc["rank"] += 1
    (directory / "config.json").write_text(json.dumps(config, indent=1))


def _flip_a_byte(directory):
    path = directory / "model.safetensors"
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 1000)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_edit_rank, _flip_a_byte], ids=["edited-config", "flipped-byte"])
def test_damaged_checkpoint_is_refused(damage, checkpoints, tmp_path):
    from zssvd.io.checkpoint import CheckpointError

    directory = _copy(checkpoints["dense"], tmp_path / "ckpt")
    damage(directory)
    # vLLM builds its config in a pydantic validator, which re-raises our CheckpointError as its own
    # ValidationError carrying our message; the message is what the user reads.
    with pytest.raises(Exception) as refused:
        _load(directory)
    assert isinstance(refused.value, CheckpointError) or "re-create" in str(refused.value), refused.value
    assert "re-create" in str(refused.value) and str(directory) in str(refused.value)
