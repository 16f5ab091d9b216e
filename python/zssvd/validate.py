"""Checks of numeric options, shared by the Python API and the command line.

The API raises ``ValueError`` naming the argument (``micro_batch must be an integer >= 1, got 0``);
the CLI uses the same rule as an argparse ``type`` (``--micro-batch: ...``), so an option is checked
once, at the boundary, and means the same thing in both.
"""
from __future__ import annotations

import argparse
import numbers


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
