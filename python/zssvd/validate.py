"""Checks of user input (numeric options, text files), shared by the Python API and the command line.

The API raises ``ValueError`` naming the argument (``micro_batch must be an integer >= 1, got 0``);
the CLI uses the same rule as an argparse ``type`` (``--micro-batch: ...``), so an option is checked
once, at the boundary, and means the same thing in both.
"""
from __future__ import annotations

import argparse
import numbers
from pathlib import Path


def _int_problem(value, minimum: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return f"must be an integer >= {minimum}, got {value!r}"
    if value < minimum:
        return f"must be an integer >= {minimum}, got {value}"
    return None


def require_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an integer >= ``minimum``; else a ValueError naming ``name``."""
    problem = _int_problem(value, minimum)
    if problem:
        raise ValueError(f"{name} {problem}")
    return int(value)


def optional_int(name: str, value, minimum: int) -> int | None:
    """None (the default behaviour) or an integer >= ``minimum``."""
    return None if value is None else require_int(name, value, minimum)


def int_at_least(minimum: int):
    """An argparse ``type`` for integers >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        problem = _int_problem(value, minimum)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def int_list_at_least(minimum: int):
    """An argparse ``type`` for comma-separated integers >= ``minimum`` (``--batch 1,8``)."""
    single = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        values = [single(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"give comma-separated integers >= {minimum}, got {text!r}")
        return values

    parse.__name__ = f"comma-separated integers >= {minimum}"
    return parse


def require_windows(num_samples, seq_len) -> None:
    """Calibration windows: at least one, of at least 2 tokens (one to read, one to predict)."""
    require_int("num_samples", num_samples, 1)
    require_int("seq_len", seq_len, 2)


def require_text(name: str, value) -> str:
    """A non-empty string (a prompt): an empty one would reach the model as a 0-token sequence."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} is empty; give some text to continue")
    return value


# Decoding errors tolerated in a text file: a stray byte of another encoding is noise, more is a
# binary file or a file in another encoding, whose "text" would be mostly replacement characters.
MAX_UNDECODABLE = 0.01
_REPLACEMENT = "\ufffd"


def read_text_file(path) -> str:
    """The UTF-8 text of a user's text file (--calib-file, --text-file, --eval-file, the Python API).

    Refused with one line naming the file and the fix: a missing path, a directory, an unreadable
    file, a binary file (NUL bytes), or one whose bytes are more than ``MAX_UNDECODABLE`` undecodable
    as UTF-8. Isolated undecodable bytes become U+FFFD, as before.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a text file; pass the text files inside it "
                                f"(e.g. {path / '*.txt'})")
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}; check the path")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise OSError(f"cannot read the text file {path} ({err.strerror or err}); check its permissions") from err
    if b"\0" in data:
        raise ValueError(f"{path} is not a text file (it contains NUL bytes: a binary file?); "
                         "pass a UTF-8 text file")
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count(_REPLACEMENT) - data.count(_REPLACEMENT.encode())  # U+FFFD the file itself holds
    if undecodable > MAX_UNDECODABLE * max(len(text), 1):
        raise ValueError(f"{path} is not UTF-8 text ({undecodable} of {len(text)} characters undecodable); "
                         "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or pass another file")
    return text
