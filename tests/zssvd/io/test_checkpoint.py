"""Save -> load round trips (formats 1 and 2, every storage); damaged or edited checkpoints are refused
with CheckpointError by every loader (zssvd.load and transformers' from_pretrained)."""
import copy
import json

import pytest
import torch

import zssvd
from checkpoint_helpers import compress_tiny, logits, save_checkpoint
from tiny_models import ARCHS
from zssvd.io.checkpoint import CheckpointError, cast_model
from zssvd.nn import PackedLowRankLinear, describe_packed


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_gives_identical_logits(arch, tmp_path, ids):
    model, report = compress_tiny(arch)
    expected = logits(model, ids)
    zssvd.save_compressed(model, tmp_path, report=report, dtype=torch.float32)  # as computed: bit-exact
    loaded = zssvd.load(tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    assert any(isinstance(m, PackedLowRankLinear) for m in loaded.modules())
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("target_ratio", "achieved_ratio", "storage", "strategy", "ranks", "timings", "bytes"):
        assert key in saved


def test_round_trip_of_every_storage_and_format(storage, version, tmp_path, ids):
    model, report = compress_tiny(storage=storage)
    save_checkpoint(model, tmp_path, version, report)
    # Format 2 stores float data in 16 bits (bf16 for this float32 source); format 1 stored the model dtype.
    stored = cast_model(copy.deepcopy(model), torch.bfloat16) if version == 2 else model
    loaded = zssvd.load(tmp_path)
    assert torch.equal(logits(loaded, ids), logits(stored, ids))
    assert describe_packed(loaded) == describe_packed(stored)
    assert type(loaded).__name__ == "LlamaForCausalLM"


def test_saving_leaves_the_model_unchanged(tmp_path, ids):
    model, report = compress_tiny(storage="remap")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zssvd.save_compressed(model, tmp_path, report=report)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_tied_embeddings_are_stored_once(tmp_path):
    model, report = compress_tiny()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    zssvd.save_compressed(model, tmp_path, report=report)
    manifest = json.loads((tmp_path / "zssvd.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = zssvd.load(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.fixture
def saved(version, tmp_path):
    model, report = compress_tiny()
    return save_checkpoint(model, tmp_path / f"v{version}", version, report)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def test_truncated_weights_are_refused(saved, loader):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or was altered"):
        loader(saved)


def test_a_flipped_bit_is_refused(saved, loader):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        loader(saved)


def _widen_first_module(manifest_or_block):
    desc = next(iter(manifest_or_block["modules"].values()))
    desc["tensors"]["weight_u"]["shape"][1] += 1


def test_manifest_that_disagrees_with_the_weights_is_refused(saved, version, loader):
    _edit_json(saved / "zssvd.json", _widen_first_module)
    # Format 2 notices that config.json's copy of the descriptions differs; format 1 reaches the tensors.
    message = "quantization_config does not match" if version == 2 else "weight_u: stored"
    with pytest.raises(CheckpointError, match=message):
        loader(saved)


@pytest.mark.parametrize("edit, message", [
    (lambda c: _widen_first_module(c["quantization_config"]), "quantization_config does not match"),
    (lambda c: c["quantization_config"].update(dtype="float16"), "quantization_config does not match"),
    (lambda c: c.update(hidden_act="gelu"), "config.json was edited"),
    (lambda c: c.update(architectures=["MistralForCausalLM"]), "config.json was edited"),
], ids=["module", "dtype", "activation", "architecture"])
def test_an_edited_config_is_refused(edit, message, tmp_path, loader):
    model, report = compress_tiny()
    zssvd.save_compressed(model, tmp_path, report=report)
    _edit_json(tmp_path / "config.json", edit)
    with pytest.raises(CheckpointError, match=message):
        loader(tmp_path)


def test_a_config_without_the_zssvd_block_is_refused(tmp_path):
    # transformers alone cannot tell (it sees a plain LLaMA config): zssvd.load and the manifest can.
    model, report = compress_tiny()
    zssvd.save_compressed(model, tmp_path, report=report)
    _edit_json(tmp_path / "config.json", lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="no zssvd quantization_config"):
        zssvd.load(tmp_path)


def test_missing_or_foreign_manifest(saved, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CheckpointError, match="not a zssvd checkpoint"):
        zssvd.load(empty)
    _edit_json(saved / "zssvd.json", lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        zssvd.load(saved)
    (saved / "zssvd.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        zssvd.load(saved)
