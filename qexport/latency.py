"""Latency statistics: warm up, time many runs, report the median and tail percentiles.

Timing discipline (``../shared/docs/numerics.md``): fix the thread count, warm up, take the median (and p90/p99) of many
runs, and compare engines as ratios measured in the same process. :func:`interleaved_compare` alternates the
engines round-robin so that a noisy machine slows them all alike. Benchmarks live in ``bench/``; the unit tests
inject a fake clock and never time anything real.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

Clock = Callable[[], float]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one engine at one batch size (times per batch, in milliseconds).

    Args:
        batch_size: images per call.
        p50_ms: median time of one call.
        p90_ms: 90th percentile.
        p99_ms: 99th percentile.
        mean_ms: mean time of one call.
        throughput_ips: images per second, ``batch_size / mean``.
        iters: number of timed calls.
    """

    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float
    iters: int

    def __post_init__(self):
        if self.batch_size < 1 or self.iters < 1:
            raise ValueError(f"LatencyStats needs batch_size >= 1 and iters >= 1, got {self.batch_size}, {self.iters}")

    def to_dict(self) -> dict:
        """Plain JSON-ready dictionary.

        Returns:
            The fields by name.
        """
        return asdict(self)


def stats_from_durations(durations_s: Sequence[float], batch_size: int) -> LatencyStats:
    """Summarize measured call durations.

    Args:
        durations_s: duration of each timed call, in seconds.
        batch_size: images per call.

    Returns:
        The LatencyStats (percentiles by linear interpolation, as ``numpy.percentile``).
    """
    if len(durations_s) == 0:
        raise ValueError("no durations to summarize")
    ms = np.asarray(durations_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    mean = float(ms.mean())
    thr = batch_size / (mean / 1e3) if mean > 0 else float("inf")
    return LatencyStats(batch_size=int(batch_size), p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=mean,
                        throughput_ips=thr, iters=len(ms))


def measure(fn: Callable[[], object], warmup: int = 10, iters: int = 100, min_time_s: float = 0.0, *,
            batch_size: int = 1, clock: Clock = time.perf_counter) -> LatencyStats:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``iters`` timed calls and at least ``min_time_s``.

    The clock is read exactly twice per timed call (before and after), never during warm-up, so a test can
    inject a deterministic clock.

    Args:
        fn: the call to time (must block until its work is done).
        warmup: untimed calls first.
        iters: minimum number of timed calls.
        min_time_s: keep timing until the timed calls add up to at least this long.
        batch_size: images per call, for the throughput.
        clock: seconds as a float; ``time.perf_counter`` by default.

    Returns:
        LatencyStats over the timed calls.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"measure needs iters >= 1 and warmup >= 0, got {iters}, {warmup}")
    for _ in range(warmup):
        fn()
    durations: list[float] = []
    total = 0.0
    while len(durations) < iters or total < min_time_s:
        t0 = clock()
        fn()
        t1 = clock()
        durations.append(t1 - t0)
        total += t1 - t0
    return stats_from_durations(durations, batch_size)


def interleaved_compare(runners: Mapping[str, Callable[[], object]], rounds: int, *, warmup: int = 5,
                        per_round: int = 1, settle: int = 1, batch_size: int | Mapping[str, int] = 1,
                        clock: Clock = time.perf_counter) -> dict[str, LatencyStats]:
    """Time several engines round-robin in one process, so that machine noise hits them equally.

    Each round calls every runner ``settle`` times untimed, then ``per_round`` times timed; the order of the
    runners rotates by one each round, so none is always first after another. The untimed call absorbs what
    the previous engine leaves behind (caches, a thread pool winding down). Runners must not spin-wait between
    calls: an ONNX Runtime pool that spins keeps a 2-core machine busy long after its call returned (the ORT
    runners of ``load_engine`` don't spin; see ``qexport.runtimes.onnxrt``).

    Args:
        runners: name -> call to time (each must block until done).
        rounds: number of rounds (each runner gets ``rounds * per_round`` timed calls).
        warmup: untimed calls of each runner before the first round.
        per_round: timed calls of a runner in a row within a round.
        settle: untimed calls of a runner at the start of its turn in every round (0 to time every call).
        batch_size: images per call, one for all or per name.
        clock: seconds as a float; read twice per timed call.

    Returns:
        name -> LatencyStats, in the order of ``runners``.
    """
    if not runners:
        raise ValueError("interleaved_compare needs at least one runner")
    if rounds < 1 or per_round < 1 or settle < 0:
        raise ValueError("interleaved_compare needs rounds >= 1, per_round >= 1 and settle >= 0, "
                         f"got {rounds}, {per_round}, {settle}")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    durations: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = runners[name]
            for _ in range(settle):
                fn()
            for _ in range(per_round):
                t0 = clock()
                fn()
                durations[name].append(clock() - t0)
    sizes = batch_size if isinstance(batch_size, Mapping) else {name: batch_size for name in names}
    return {name: stats_from_durations(durations[name], int(sizes[name])) for name in names}
