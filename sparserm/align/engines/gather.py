"""Work sent to an actor in chunks, so that the driver's one progress bar moves while the actor works.

An actor runs its calls one after another in the order they were sent, so sending every chunk at once keeps
the actor busy exactly as one big call would; the driver waits on them as they finish and advances the bar
by each chunk's item count. Results come back in the order of the items.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import ray

CHUNKS_PER_CALL = 16  # a call's items go in at most this many chunks: a bar step per ~6% of the work


def spans(n: int, min_size: int, max_chunks: int = CHUNKS_PER_CALL) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges covering ``range(n)``: at least ``min_size`` items each (the last may
    hold fewer), and at most ``max_chunks`` of them."""
    if n <= 0:
        return []
    size = max(1, min_size, -(-n // max(1, max_chunks)))
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def gather(calls: Sequence[tuple[Any, int]], bar=None) -> list:
    """The results of ``calls`` (``(object_ref, n_items)``) in order; ``bar`` (a tqdm bar or None) advances by
    a call's ``n_items`` when it finishes, in whatever order they finish."""
    sizes = {ref: n for ref, n in calls}
    pending = list(sizes)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        if bar is not None:
            bar.update(sizes[done[0]])
    return ray.get([ref for ref, _ in calls])


def chunked_call(method: Callable, items: list, *args, min_size: int = 1, bar=None) -> list:
    """``method.remote(chunk, *args)`` for each chunk of ``items``; the chunks' result lists joined in order.
    For methods whose result for an item depends on that item alone (log-probs, scores)."""
    parts = gather([(method.remote(items[s:e], *args), e - s) for s, e in spans(len(items), min_size)], bar)
    return [x for part in parts for x in part]
