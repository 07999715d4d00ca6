"""Latency calibration: root-finding on the latency table's target until the timed student meets the timed one.

The per-layer table (:mod:`crossdistill.latency`) misses what does not
shrink with channels (activations, residual sums, pooling, per-module
overhead), so a student planned to the table's 0.5 times slower than 0.5
end to end (ResNet-56 at batch 16, one thread: table 0.51 -> timed 0.53 with
every layer at 0.1 of its channels; ``benchmarks/probe_latency_bound.py``).
:func:`calibrate` therefore treats "table target asked -> timed ratio" as a
noisy increasing function and finds its root at the timed target:

- the first try asks the table for the target itself; the next, while only one
  side of the target has been timed, steps along a line through every timed
  point (least squares; through the origin with one point), so a table that
  under-predicts is corrected in one or two steps;
- once students on both sides are timed, regula falsi between the nearest pair
  (kept inside the bracket's middle 80 %, so noise cannot stall it at one end);
- a timing noisier than ``MAX_NOISE`` (a load spike in one of its 3 alternate
  ratios) is taken again, up to ``RETIMES`` times, the least noisy kept;
- it stops when a timed ratio lies within ``max(noise, 0.01)`` of the target
  (half the window that counts as met, ``max(2 x noise, 0.02)``: on a loaded
  machine the same student re-timed later moved by up to 0.03, more than one
  timing's own noise, so it aims at the middle), when the proposer is at its limit (it cannot go below the table
  ratio asked, e.g. every layer at the lowest floor) and the student is still
  slower than the target (the target is out of reach: the timed ratio there is
  the ``bound``), when the bracket is narrower than a proposal can resolve, or
  after ``rounds`` timed students (the time bound; a repeated proposal is not
  timed again).

The student returned is the timed one nearest the target.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["calibrate", "steady_timing", "MIN_TOLERANCE", "MAX_NOISE"]

MIN_TOLERANCE = 0.02  # a timed ratio within max(2 x noise, this) of the target meets it
# a timing noisier than this is taken again (up to RETIMES times, the least noisy kept): on a loaded machine one
# of the 3 alternate ratios can be a load spike (seen: noise 0.145 where the same student re-timed at 0.02), and
# max(2 x noise, ...) would then accept any student. 0.02: the noise of most timings of ResNet-56 / VGG-16 at
# batch 16 on the loaded 2-core machine lay at 0.003-0.02 (benchmarks/results/latency_bound_fashion-mnist.jsonl)
MAX_NOISE = 0.02
RETIMES = 2


def _next_asked(points: list[dict[str, Any]], fraction: float) -> float:
    """The table target to try next from every timed point so far (module docstring)."""
    below = [p for p in points if p["timed"] < fraction]
    above = [p for p in points if p["timed"] > fraction]
    if below and above:
        lo = max(below, key=lambda p: p["asked"])
        hi = min(above, key=lambda p: p["asked"])
        if lo["asked"] < hi["asked"]:
            width = hi["asked"] - lo["asked"]
            t = (fraction - lo["timed"]) / max(hi["timed"] - lo["timed"], 1e-9)
            return lo["asked"] + width * min(max(t, 0.1), 0.9)
        # noise inverted the order: fall through to the line fit over all points
    xs, ys = [p["asked"] for p in points], [p["timed"] for p in points]
    near = min(points, key=lambda p: abs(p["timed"] - fraction))
    slope = 0.0
    if len(set(xs)) > 1:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope <= 0.1:  # one point, or too flat / noisy a fit: timed taken as proportional to the table
        slope = near["timed"] / max(near["asked"], 1e-9)
    return near["asked"] + (fraction - near["timed"]) / slope


def steady_timing(timer: Callable[[Any], tuple[float, float]], candidate: Any) -> tuple[float, float]:
    """(timed ratio, noise) of ``candidate``, re-timed while noisier than MAX_NOISE (the least noisy kept)."""
    best = timer(candidate)
    for _ in range(RETIMES):
        if best[1] <= MAX_NOISE:
            break
        again = timer(candidate)
        best = min(best, again, key=lambda t: t[1])
    return best


def calibrate(
    fraction: float,
    propose: Callable[[float], tuple[Any, float, Hashable, bool]],
    timer: Callable[[Any], tuple[float, float]],
    rounds: int,
) -> tuple[Any, dict[str, Any]]:
    """Root-find the table target whose student times at ``fraction`` of the teacher (module docstring).

    ``propose(asked)``: the student planned to table ratio ``asked``, as (candidate, table ratio reached,
    a key naming it, at_limit: it could not go as low as asked). ``timer(candidate)``: (timed ratio, noise).
    Returns the candidate timed nearest ``fraction`` and a record: ``timed_ratio``, ``noise``,
    ``table_ratio``, ``rounds`` (students timed), ``met``, and ``bound`` (the timed ratio at the
    proposer's limit) where the target is out of reach."""
    points: list[dict[str, Any]] = []
    timed_by_key: dict[Hashable, tuple[float, float]] = {}
    asked, bound = fraction, None
    for _ in range(rounds * 2):  # repeated proposals cost no timing; the loop is bounded by timed students
        candidate, table, key, at_limit = propose(asked)
        if key not in timed_by_key:
            if len(timed_by_key) >= rounds:
                break
            timed_by_key[key] = steady_timing(timer, candidate)
        timed, noise = timed_by_key[key]
        points.append({"asked": asked, "table": table, "timed": timed, "noise": noise, "candidate": candidate})
        if abs(timed - fraction) <= max(noise, MIN_TOLERANCE / 2):  # aim at half the window: a re-timing moves
            break
        if at_limit and timed > fraction:
            bound = timed
            break
        nxt = min(max(_next_asked(points, fraction), 0.01), 0.99)
        if any(abs(nxt - p["asked"]) < 1e-3 for p in points):
            break  # the bracket is narrower than a proposal can resolve
        asked = nxt
    best = min(points, key=lambda p: abs(p["timed"] - fraction))
    tolerance = max(2 * best["noise"], MIN_TOLERANCE)
    info: dict[str, Any] = {
        "timed_ratio": best["timed"],
        "noise": best["noise"],
        "table_ratio": best["table"],
        "rounds": len(timed_by_key),
        "met": abs(best["timed"] - fraction) <= tolerance,
    }
    if bound is not None:
        info["bound"] = bound
    return best["candidate"], info
