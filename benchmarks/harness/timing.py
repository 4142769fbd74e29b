"""The one latency definition of ``benchmarks/``: the median over interleaved rounds of wall-clock calls.

Every script times through ``interleaved_wall_times`` (raw seconds) or ``median_latencies_ms`` (the figure that is
reported). Several calls are timed in turn each round, so a load burst on a shared machine hits them alike; one call
alone is the same loop with a single entry.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

__all__ = ["interleaved_wall_times", "median_latencies_ms", "median_ms"]


def interleaved_wall_times(
    calls: Sequence[Callable[[], object]],
    warmup: int = 2,
    repeats: int = 7,
    before_round: Callable[[], object] | None = None,
    min_seconds: float = 0.0,
    max_repeats: int | None = None,
) -> list[list[float]]:
    """Seconds per call of each of ``calls``, one list per call, after ``warmup`` untimed rounds.

    Timed rounds run until there are at least ``repeats`` of them and the first call's times add up to
    ``min_seconds``, but never more than ``max_repeats`` (``None``: no cap). ``before_round`` runs untimed before
    every timed round. The order reverses every round: a call that follows another model's pass finds the cache
    filled with that model's data, so a fixed order would always handicap the same call.
    """
    if not calls:
        msg = "calls must hold at least one callable, got none."
        raise ValueError(msg)
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    round_index = 0
    while (max_repeats is None or round_index < max_repeats) and (round_index < repeats
                                                                   or sum(times[0]) < min_seconds):
        if before_round is not None:
            before_round()
        for index in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            calls[index]()
            times[index].append(time.perf_counter() - start)
        round_index += 1
    return times


def median_ms(times: Sequence[float]) -> float:
    """The reported latency of raw ``times`` in seconds: their median, in milliseconds."""
    return 1000.0 * statistics.median(times)


def median_latencies_ms(calls: Sequence[Callable[[], object]], warmup: int = 2, repeats: int = 7) -> list[float]:
    """Latency in ms of each of ``calls``: the median of its ``repeats`` interleaved timed rounds."""
    return [median_ms(times) for times in interleaved_wall_times(calls, warmup=warmup, repeats=repeats)]
