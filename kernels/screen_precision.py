"""Which candidates the fused screen's int8 copy is read with, learnt per table from the proofs it fails.

Where the int8 copy pays (`kernels.cpu_topk._int8_pays`) the fused native screen reads it with
each candidate in one int8 part or in two (a hi and a lo part); elsewhere it reads the bf16 copy
(docs/gsu.md). One part halves the tile products but widens the window (~0.039 on average on
random rows of D = 128, each candidate's own: against ~0.026 with two parts and ~0.0094 from
bf16). Both give the exact result (the re-scoring proves it, or screens again), so the choice is
only about speed, and what decides it is how many behaviours a window holds around a candidate's
K-th: few on most catalogues, where one part is as fast or faster (forced one part against forced
two, L = 100K: random rows 1.00x at C = 32, 0.99x at 48, 0.92x at 64, 0.90x at 80, 0.87x at 100;
topic clusters 0.90-0.97x from C = 1 to 64; 100 users of 1,000 rows, C = 1, 0.96x), but
thousands where items come in near-identical variants, and there one part's window overflows the
survivors the screen keeps, so proofs fail and the screen runs again (near-duplicates at L = 100K:
1.24x at C = 64, 1.66x at C = 100; at C = 1 the same). So a table's `ScreenPrecision` starts at one
part and goes to two parts once a first screen leaves more than UNPROVEN_SHARE of its pairs
unproven; every PROBE_EVERY calls after that it tries one part again and goes back to it if it
proves. The bf16 copy is not among the choices: its narrower window wins on near-duplicates at
C = 100 (0.89x two parts) but loses at C = 80 (1.07x) and for a training sample (C = 1: 1.51x),
where a proof failed for one candidate costs less than a pass of twice the bytes.

The state is two integers per table, updated without a lock: calls from several threads may
race on it, which can only cost speed.
"""
from __future__ import annotations

ONE_PART, TWO_PARTS, BF16 = 0, 1, 2  # BF16: where the int8 copy does not pay
LEVEL_NAMES = ("int8, one part", "int8, two parts", "bf16")
UNPROVEN_SHARE = 0.01
PROBE_EVERY = 64

__all__ = ["BF16", "LEVEL_NAMES", "ONE_PART", "PROBE_EVERY", "ScreenPrecision", "TWO_PARTS", "UNPROVEN_SHARE",
           "rescreen_level"]


class ScreenPrecision:
    """The level a table's first screens from the int8 copy use (see the module docstring)."""

    def __init__(self) -> None:
        self.level = ONE_PART  # ONE_PART, or TWO_PARTS once one part failed to prove
        self.calls = 0  # first screens at `level` since it was set or last probed

    def choose(self) -> tuple[int, bool]:
        """(level for a first screen, whether it probes one part again)."""
        if self.level == TWO_PARTS and self.calls >= PROBE_EVERY:
            self.calls = 0
            return ONE_PART, True
        self.calls += 1
        return self.level, False

    def record(self, level: int, probing: bool, unproven: int, pairs: int) -> None:
        """What a first screen at `level` of `pairs` (user, candidate) pairs proved: all but `unproven`."""
        failed = unproven > UNPROVEN_SHARE * pairs
        if probing:
            if not failed:  # one part proves again: go back to it
                self.level, self.calls = level, 0
        elif failed and level == self.level == ONE_PART:
            self.level, self.calls = TWO_PARTS, 0


def rescreen_level(level: int) -> int:
    """The level a screen run again after a failed proof uses (with more survivors): two parts
    after one part, whose wider window is the likelier cause, else the same."""
    return max(level, TWO_PARTS)
