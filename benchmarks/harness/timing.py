"""Wall-clock timing loops shared by the benchmark harness and the scripts in ``benchmarks/``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

__all__ = ["interleaved_wall_times", "wall_times"]


def wall_times(
    run_once: Callable[[], object],
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int | None = None,
    min_seconds: float = 0.0,
) -> list[float]:
    """Seconds per call of ``run_once`` after ``warmup`` calls: at least ``min_repeats`` calls and ``min_seconds``
    in total, at most ``max_repeats`` calls (``None``: no cap)."""
    for _ in range(warmup):
        run_once()
    times: list[float] = []
    while (max_repeats is None or len(times) < max_repeats) and (len(times) < min_repeats
                                                                  or sum(times) < min_seconds):
        start = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - start)
    return times


def interleaved_wall_times(
    calls: Sequence[Callable[[], object]],
    warmup: int = 2,
    repeats: int = 7,
    before_round: Callable[[], object] | None = None,
) -> list[list[float]]:
    """Seconds per call of each of ``calls``, called in turn each round (a load burst on a shared machine hits them
    alike) after ``warmup`` rounds; ``before_round`` runs untimed before every timed round.

    The order reverses every round: a call that follows another model's pass finds the cache filled with that
    model's data, so a fixed order would always handicap the same call.
    """
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for round_index in range(repeats):
        if before_round is not None:
            before_round()
        for index in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            calls[index]()
            times[index].append(time.perf_counter() - start)
    return times
