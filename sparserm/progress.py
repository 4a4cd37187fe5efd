"""The one progress bar a long step shows (tqdm, on stderr). Where stderr is not a terminal (a Ray job's log,
CI, a file) it redraws at most every ``LOG_INTERVAL_S`` seconds, so a log gets a line per half minute rather
than one per update; at a terminal it redraws in place as tqdm does."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["progress_bar", "LOG_INTERVAL_S"]

LOG_INTERVAL_S = 30.0


def progress_bar(*args, **kwargs) -> tqdm:
    """``tqdm(*args, **kwargs)``, with ``mininterval`` and ``maxinterval`` (unless given) from where stderr goes
    (tqdm's monitor thread redraws a bar every ``maxinterval``, 10 s by default, whatever ``mininterval`` says)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]))
    return tqdm(*args, **kwargs)
