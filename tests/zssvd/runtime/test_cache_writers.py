"""Two runs writing the same stage-cache entry at once: one complete entry wins, the other run goes on."""
import torch

from zssvd.runtime.cache import StageCache


def test_a_second_writer_of_an_entry_keeps_the_first_and_leaves_no_temporary(tmp_path):
    cache = StageCache(tmp_path)
    first, second = {"stats": {"a": torch.zeros(4)}}, {"stats": {"a": torch.ones(4)}}
    cache.store("factors", "k", first, {"n": 1})
    cache.store("factors", "k", second, {"n": 2})  # lost the race: the rename onto a full entry fails quietly
    files, meta = cache.load("factors", "k")
    assert torch.equal(files["stats"]["a"], first["stats"]["a"]) and meta["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["factors-k"]

