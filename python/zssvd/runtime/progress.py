"""Progress bars for long stages (tqdm), silenced with ``ZSSVD_QUIET=1`` or ``set_quiet(True)``."""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def quiet_by_environment() -> bool:
    return os.environ.get("ZSSVD_QUIET", "0") == "1"


_quiet = quiet_by_environment()


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def progress(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` unless progress output is switched off."""
    return tqdm(iterable, disable=_quiet, dynamic_ncols=True, **kwargs)
