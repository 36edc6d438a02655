"""Which copy of a table the fused screen reads, learnt per table from the proofs it fails.

Where the int8 copy pays (`kernels.cpu_topk._int8_pays`) the fused native screen reads it with
each candidate in one int8 part or in two (a hi and a lo part); elsewhere it reads the bf16 copy
(docs/gsu.md). One part halves the tile products but widens the window (~0.044 on random rows of
D = 128, against ~0.026 with two parts and ~0.0094 from bf16). Both give the exact result (the
re-scoring proves it, or screens again), so the choice is only about speed, and what decides it
is how many behaviours a window holds around a candidate's K-th: few on most catalogues, where
one part is faster (L = 100K, C = 100: 0.93x the time of two parts on random rows, 0.83-0.91x on
topic clusters, 0.90x for four users), but thousands where items come in near-identical
variants, and there one part's window overflows the survivors the screen keeps, so proofs fail
and the screen runs again (one part throughout: 1.66x two parts). So with
ONE_PART_MIN_CANDIDATES candidates or more, a table's `ScreenPrecision` starts at one part and
goes to two parts once a first screen leaves more than UNPROVEN_SHARE of its pairs unproven;
every PROBE_EVERY calls after that it tries one part again and goes back to it if it proves.
Fewer candidates always read two parts: one part's tile products saved are per candidate and its
wider window costs survivors per candidate too (at L = 100K one part is 1.05x two parts at
C = 32-48, 1.0x at 64, 0.98x at 80). The bf16 copy is not among the choices: its narrower window
wins on near-duplicates at C = 100 (0.89x two parts) but loses at C = 80 (1.07x) and for a
training sample (C = 1: 1.51x), where a proof failed for one candidate costs less than a pass of
twice the bytes.

The state is two integers per table, updated without a lock: calls from several threads may
race on it, which can only cost speed.
"""
from __future__ import annotations

ONE_PART, TWO_PARTS, BF16 = 0, 1, 2  # BF16: where the int8 copy does not pay
LEVEL_NAMES = ("int8, one part", "int8, two parts", "bf16")
ONE_PART_MIN_CANDIDATES = 80
UNPROVEN_SHARE = 0.01
PROBE_EVERY = 64

__all__ = ["BF16", "LEVEL_NAMES", "ONE_PART", "ONE_PART_MIN_CANDIDATES", "PROBE_EVERY", "ScreenPrecision",
           "TWO_PARTS", "UNPROVEN_SHARE", "rescreen_level"]


class ScreenPrecision:
    """The level a table's first screens use (see the module docstring)."""

    def __init__(self) -> None:
        self.level = ONE_PART  # ONE_PART, or TWO_PARTS once one part failed to prove
        self.calls = 0  # first screens at `level` since it was set or last probed

    def level_for(self, n_cands: int) -> int:
        """The level first screens of `n_cands` candidates read now (probes aside)."""
        return TWO_PARTS if n_cands < ONE_PART_MIN_CANDIDATES else self.level

    def choose(self, n_cands: int) -> tuple[int, bool]:
        """(level for a first screen of `n_cands` candidates, whether it probes one part again)."""
        if n_cands < ONE_PART_MIN_CANDIDATES:
            return TWO_PARTS, False
        if self.level == TWO_PARTS and self.calls >= PROBE_EVERY:
            self.calls = 0
            return ONE_PART, True
        self.calls += 1
        return self.level, False

    def record(self, level: int, probing: bool, unproven: int, n_users: int, n_cands: int) -> None:
        """What a first screen at `level` of `n_users` x `n_cands` pairs proved: all but `unproven`."""
        if n_cands < ONE_PART_MIN_CANDIDATES:
            return
        failed = unproven > UNPROVEN_SHARE * n_users * n_cands
        if probing:
            if not failed:  # one part proves again: go back to it
                self.level, self.calls = level, 0
        elif failed and level == self.level == ONE_PART:
            self.level, self.calls = TWO_PARTS, 0


def rescreen_level(level: int) -> int:
    """The level a screen run again after a failed proof uses (with more survivors): two parts
    after one part, whose wider window is the likelier cause, else the same."""
    return max(level, TWO_PARTS)
