"""Side-by-side step timing shared by the overhead benchmarks.

Copies of one model train in the same process, one step each in turn, the order rotating every step,
so that machine noise (other jobs, frequency changes, cache pressure) hits every copy alike. Steps are
summed per block; a block spans whole logging/measurement intervals so amortised work (logging,
probes) lands in every block equally. The median of the per-block ratios drops bursts, and a second
copy identical to the baseline gives the noise floor of the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

CLOCKS: dict[str, Callable[[], float]] = {"process": time.process_time, "wall": time.perf_counter}


def interleaved_block_times(
    steps: dict[str, Callable[[object], None]],
    batches: Sequence[object],
    rounds: int,
    clock: Callable[[], float] = time.process_time,
    warmup: int = 0,
) -> dict[str, list[float]]:
    """``{name: [seconds per block]}``: ``rounds`` blocks of ``len(batches)`` steps of every copy, interleaved.

    Args:
        steps: one training-step function per copy, called with a batch.
        batches: the batches of one block (every copy sees the same ones).
        rounds: number of blocks.
        clock: ``time.process_time`` (robust on a shared CPU machine) or a synchronised wall clock.
        warmup: untimed steps of every copy before the first block.
    """
    names = list(steps)
    for batch in list(batches)[:warmup]:
        for name in names:
            steps[name](batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        block = dict.fromkeys(names, 0.0)
        for i, batch in enumerate(batches):
            for j in range(len(names)):  # rotate who goes first, so no copy always runs in the same slot
                name = names[(i + j) % len(names)]
                start = clock()
                steps[name](batch)
                block[name] += clock() - start
        for name, value in block.items():
            times[name].append(value)
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float]:
    """Median, min and max over blocks of ``times[a] / times[b]``."""
    ratios = sorted(x / y for x, y in zip(times[a], times[b]))
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])
    return median, ratios[0], ratios[-1]
