"""Checkpoints are reproducible byte for byte, and written so that no reader ever sees half a file."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zssvd
import zssvd.io.checkpoint as checkpoint
from checkpoint_helpers import compress_tiny
from tiny_models import tiny_model, tiny_tokenizer
from zssvd.io.checkpoint import MANIFEST, WEIGHTS, CheckpointError, remove_stale_temporaries, write_atomically


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saving_the_same_model_twice_gives_the_same_bytes(tmp_path):
    model, report = compress_tiny(storage="remap")
    # safetensors writes its metadata map in hash order: with two keys, 6 saves differ with probability 31/32
    digests = set()
    for i in range(6):
        zssvd.save_compressed(model, tmp_path / f"run{i}", tokenizer=tiny_tokenizer(), report=dict(report))
        digests.add(tuple(_sha256(tmp_path / f"run{i}" / name) for name in (WEIGHTS, MANIFEST, "config.json")))
    assert len(digests) == 1
    header = (tmp_path / "run0" / WEIGHTS).read_bytes()[8:200]
    assert b'"__metadata__":{"format":"pt"}' in header  # transformers needs format=pt; one key keeps the order


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.json"
    target.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_a_save_that_fails_midway_leaves_a_directory_every_loader_refuses(tmp_path, monkeypatch):
    model, report = compress_tiny()
    zssvd.save_compressed(model, tmp_path, report=dict(report))  # a complete checkpoint, then a failed re-save

    def fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fails)
    with pytest.raises(OSError, match="disk full"):
        zssvd.save_compressed(model, tmp_path, report=dict(report))
    with pytest.raises(CheckpointError, match=r"zssvd\.json is missing"):
        zssvd.load(tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free (reuse within this test is vanishingly unlikely)
    (tmp_path / f"{WEIGHTS}.tmp{dead_pid}").write_bytes(b"half")
    (tmp_path / f"factors-abc.tmp{dead_pid}").mkdir()
    (tmp_path / f"factors-abc.tmp{dead_pid}" / "a.safetensors").write_bytes(b"half")
    live = tmp_path / f"{WEIGHTS}.tmp{os.getppid()}"  # our parent is alive
    live.write_bytes(b"in progress")
    (tmp_path / "notes.tmp").write_text("not ours")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "notes.tmp"])


def test_the_tokenizer_files_are_complete_json(tmp_path):
    model, report = compress_tiny()
    zssvd.save_compressed(model, tmp_path, tokenizer=tiny_tokenizer(), report=dict(report))
    for path in tmp_path.glob("*.json"):
        json.loads(path.read_text())
    assert (tmp_path / "tokenizer.json").is_file() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("edit", [
    lambda m: m["tied"].update({"lm_head.weight": "model.embed_tokens.weight"}),
    lambda m: m.update(dtype="float16"),
    lambda m: m.update(architecture="MistralForCausalLM"),
], ids=["tied", "dtype", "architecture"])
def test_a_manifest_edited_outside_its_module_descriptions_is_refused(tmp_path, loader, edit):
    model, report = compress_tiny()
    zssvd.save_compressed(model, tmp_path, report=dict(report))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    edit(manifest)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with pytest.raises(CheckpointError, match=r"zssvd\.json does not match its own SHA-256"):
        loader(tmp_path)


WRITER = """
import sys, torch, zssvd
sys.path[:0] = sys.argv[3].split("|")
from checkpoint_helpers import compress_tiny
from tiny_models import tiny_model
model, report = compress_tiny(storage=sys.argv[2], model=tiny_model(seed=int(sys.argv[4])))
for _ in range(3):
    zssvd.save_compressed(model, sys.argv[1], report=report)
"""


def test_two_writers_at_once_never_leave_a_checkpoint_that_loads_wrong(tmp_path):
    """Two processes save two different models into one directory at the same time, three times each: the
    directory then loads as exactly one of the two models, or is refused; never as a mix."""
    out = tmp_path / "ckpt"
    tests_dir = Path(__file__).parents[2]
    paths = "|".join(str(p) for p in (tests_dir, tests_dir / "zssvd" / "io"))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), "remap", paths, str(seed)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (1, 2)]
    for w in writers:
        assert w.wait(timeout=300) == 0, w.stderr.read().decode()[-2000:]
    x = torch.arange(8)[None] % 16  # token ids every tiny vocabulary has
    expected = []
    for seed in (1, 2):
        model, report = compress_tiny(storage="remap", model=tiny_model(seed=seed))
        zssvd.save_compressed(model, tmp_path / f"alone{seed}", report=report)
        expected.append(zssvd.load(tmp_path / f"alone{seed}")(x).logits)
    try:
        logits = zssvd.load(out)(x).logits
    except CheckpointError:
        return  # a mix of the two saves is detected and refused
    assert any(torch.equal(logits, e) for e in expected)
    assert not list(out.glob("*.tmp*"))
