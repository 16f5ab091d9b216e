"""Calibration windows: seeded, non-overlapping, clear errors; data-free sampling."""
import pytest
import torch

from tiny_models import tiny_model
from zssvd.stages import calibration
class CharTokenizer:
    """One token per character: enough to test windowing without a real tokenizer."""

    all_special_ids = [0]

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) % 96 for c in text]}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(1000)))
    return path


def test_windows_are_seeded_and_do_not_overlap(text_file):
    a = calibration.from_files(CharTokenizer(), [text_file], num_samples=6, seq_len=50, seed=3)
    b = calibration.from_files(CharTokenizer(), [text_file], num_samples=6, seq_len=50, seed=3)
    c = calibration.from_files(CharTokenizer(), [text_file], num_samples=6, seq_len=50, seed=4)
    assert a.input_ids.shape == (6, 50)
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    stream = torch.tensor(CharTokenizer()(text_file.read_text())["input_ids"])
    starts = []
    for row in a.input_ids:  # every window is a slot-aligned slice of the stream
        matches = [s for s in range(0, 1000 - 49, 50) if torch.equal(stream[s:s + 50], row)]
        assert matches
        starts.append(matches[0])
    assert len(set(starts)) == 6


def test_several_files_are_corpora_of_equal_weight(tmp_path, text_file):
    other = tmp_path / "other.txt"
    other.write_text("z" * 500)  # 10 windows of 50, against the first file's 20
    calib = calibration.from_files(CharTokenizer(), [text_file, other], num_samples=15, seq_len=50)
    assert calib.num_samples == 15
    from_other = (calib.input_ids == ord("z") % 96).all(dim=1)
    assert int(from_other.sum()) == 7  # 8 + 7 windows: the long file cannot drown the short one
    assert "text.txt" in calib.source and "other.txt" in calib.source
    with pytest.raises(ValueError, match="other.txt has 500 tokens"):
        calibration.from_files(CharTokenizer(), [text_file, other], num_samples=30, seq_len=50)


def test_short_text_gives_a_clear_error(text_file):
    with pytest.raises(ValueError, match="enough for 10 windows of 100, but 11 were asked for"):
        calibration.from_files(CharTokenizer(), [text_file], num_samples=11, seq_len=100)


def test_missing_file_and_empty_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        calibration.from_files(CharTokenizer(), [tmp_path / "nope.txt"], 1, 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        calibration.from_files(CharTokenizer(), [empty], 1, 10)


def test_unknown_dataset_name_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset 'wikitext103'"):
        calibration.from_dataset(CharTokenizer(), "wikitext103", 1, 10)


def test_self_sampling_is_seeded_and_avoids_special_seeds():
    model = tiny_model("llama")
    a = calibration.from_model(model, CharTokenizer(), num_samples=3, seq_len=12, seed=1, batch_size=2)
    b = calibration.from_model(model, CharTokenizer(), num_samples=3, seq_len=12, seed=1, batch_size=2)
    assert a.input_ids.shape == (3, 12)
    assert torch.equal(a.input_ids, b.input_ids)
    assert (a.input_ids[:, 0] != 0).all()
    assert a.source.startswith("self-sampled")


def test_contiguous_windows_are_the_first_tokens_in_order():
    ids = torch.arange(100)
    windows = calibration.sample_windows(ids, 3, 10, seed=7, what="stream", contiguous=True)
    assert torch.equal(windows, torch.arange(30).view(3, 10))
    with pytest.raises(ValueError, match="enough for 10 windows of 10, but 11 were asked"):
        calibration.sample_windows(ids, 11, 10, seed=0, what="stream", contiguous=True)


def test_calibration_windows_start_with_bos_only_when_the_tokenizer_adds_one(tmp_path):
    from tiny_models import english_text, tiny_tokenizer
    path = tmp_path / "calib.txt"
    path.write_text(english_text(300, seed=5))
    with_bos, plain = tiny_tokenizer(bos=True), tiny_tokenizer()
    calib = calibration.from_files(with_bos, [path], num_samples=4, seq_len=20, seed=1)
    assert calib.bos and calib.input_ids.shape == (4, 20)
    assert (calib.input_ids[:, 0] == 95).all() and not (calib.input_ids[:, 1:] == 95).any()
    stream = calibration.tokenize_stream(with_bos, path.read_text())
    chunks = {tuple(stream[s:s + 19].tolist()) for s in range(0, stream.numel() - 18, 19)}
    assert all(tuple(w[1:].tolist()) in chunks for w in calib.input_ids)  # aligned 19-token text chunks
    no_bos = calibration.from_files(plain, [path], num_samples=4, seq_len=20, seed=1)
    assert not no_bos.bos and no_bos.input_ids.shape == (4, 20) and 95 not in no_bos.input_ids.tolist()
    sampled = calibration.from_model(tiny_model(), with_bos, num_samples=2, seq_len=8, seed=1)
    assert sampled.bos and (sampled.input_ids[:, 0] == 95).all() and sampled.input_ids.shape == (2, 8)


def test_bos_from_the_chat_template_only_when_it_names_bos_token():
    from tiny_models import tiny_tokenizer
    tokenizer = tiny_tokenizer(bos=True)
    tokenizer.add_bos_token = False  # encodings no longer carry BOS: only the template can say so
    assert tokenizer("ab")["input_ids"][0] != 95
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert calibration.bos_token_id(tokenizer) == 95
    # SmolLM2-style: the template's text begins with the bos_token's text as a role marker
    tokenizer.chat_template = "{% for m in messages %}{{ '<s>' + m['content'] }}{% endfor %}"
    assert calibration.bos_token_id(tokenizer) is None
    tokenizer.chat_template = "{{ bos_token }}{{ raise_exception('needs a system turn') }}"
    assert calibration.bos_token_id(tokenizer) is None
