"""The int8 copy of a table for the fused native screen, its candidates and its error bound.

Rows are the table's float32 unit rows x, quantised with one scale per dimension (the largest
|x_d| over the table / 127): x~_d = s_d * i_d, i_d int8. A scale per row would round most rows
more finely, but it is one more random read per row in a pass bound by its bytes; a scale per
dimension folds into the candidates instead. A candidate's unit vector q becomes q'_d = q_d * s_d,
quantised with a scale of its own t = max |q'| / 127: j_d int8. The screen's int32 sum times t is

    t * sum_d j_d i_d = q~ . x~,    with q~_d = t * j_d / s_d,

so |screened - x.q| <= ||x~ - x|| ||q~|| + ||q~ - q|| (Cauchy-Schwarz), where ||x~ - x|| is
measured for every row once (its maximum kept) and ||q~ - q||, ||q~|| for every call's candidates.
On random unit rows of D = 128 that is ~0.02, against ~0.005 for the bf16 screen: a window four
times wider, which keeps about four times as many survivors for the exact re-scoring, for half
the bytes of the gather and half the tile products (docs/gsu.md).

Rows are int8 [N+1, D'] with D' = D rounded up to even (the kernel reads them as 16-bit pairs);
candidates int8 [B, C', D''] with C' a multiple of 16 and D'' of 64 (one tile's depth).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.hugepages import empty_huge
from kernels.scratch import scratch

__all__ = ["Int8Candidates", "Int8Screen", "build_int8_screen", "int8_screen_error", "quantize_candidates"]

LEVELS = 127  # int8 codes in [-127, 127]: symmetric, so a sign flip never overflows


class Int8Screen(NamedTuple):
    """A table's int8 screen copy (see the module docstring)."""

    rows: torch.Tensor  # int8 [N+1, D'] codes of the unit rows (zero rows stay zero), on huge pages
    dim_scale: torch.Tensor  # float32 [D]: s_d, the value of one code step in dimension d
    row_error: float  # max over rows of ||x~ - x||


class Int8Candidates(NamedTuple):
    """One call's candidates for the int8 screen."""

    codes: torch.Tensor  # int8 [B, C', D''] zero padded (the hi part, with two parts)
    scale: torch.Tensor  # float32 [B, C']: a candidate's score per unit of int32 sum (of lo units)
    error: float  # max over candidates of ||q~ - q||
    norm: float  # max over candidates of ||q~||
    lo: torch.Tensor | None = None  # int8 [B, C', D'']: the lo part's codes, or None (one part)
    mark_slack: float = 0.0  # two parts: the most the lo part moves a screened score
    # float32 [B, C]: each candidate's own screen error (`int8_screen_error` of its own rounding
    # and norm, rounded up), at most the call's int8_screen_error(error, norm)
    errors: torch.Tensor | None = None


def build_int8_screen(table: torch.Tensor, inv_norm: torch.Tensor, chunk_rows: int) -> Int8Screen:
    """The int8 copy of `table` [N+1, D] whose rows times `inv_norm` [N+1] are the unit rows, in
    two passes of `chunk_rows` rows (the scales need every row first)."""
    n_rows, dim = table.shape
    peak = torch.zeros(dim)
    for r0 in range(0, n_rows, chunk_rows):
        unit = _unit_rows(table, inv_norm, r0, chunk_rows)
        torch.maximum(peak, unit.abs_().amax(0), out=peak)
    # a dimension that is zero in every row: any scale codes it as 0 exactly
    dim_scale = torch.where(peak > 0, peak / LEVELS, 1.0)
    rows = empty_huge((n_rows, dim + dim % 2), torch.int8)
    rows[:, dim:] = 0
    row_error = 0.0
    for r0 in range(0, n_rows, chunk_rows):
        unit = _unit_rows(table, inv_norm, r0, chunk_rows)
        codes = unit.div(dim_scale).round_().clamp_(-LEVELS, LEVELS)
        rows[r0 : r0 + chunk_rows, :dim] = codes
        error = torch.linalg.vector_norm(codes.mul_(dim_scale).sub_(unit), dim=1)
        if error.numel():
            row_error = max(row_error, float(error.max()))
    if n_rows:
        rows[0] = 0  # id 0 is never eligible: the fused screen reads row 0 for padding and unknown items
    return Int8Screen(rows, dim_scale, row_error)


def _unit_rows(table: torch.Tensor, inv_norm: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """A new float32 tensor [count, D] of rows start.. times their reciprocal norms (never the
    table itself: a float32 table's .float() is the table)."""
    return table[start : start + count].float() * inv_norm[start : start + count].unsqueeze(1)


# The lo part of a two-part candidate counts in 1/LO_STEPS of a hi code: its codes, the rounding
# of the hi part (at most half a step) times LO_STEPS, stay within +-LO_STEPS / 2.
LO_STEPS = 128
# Two parts add hi sums x LO_STEPS and lo sums in int32: exact while dims x 127^2 x 128 < 2^31.
TWO_PARTS_MAX_DIM = 1_024


def quantize_candidates(unit_cands: torch.Tensor, screen: Int8Screen, two_parts: bool = False) -> Int8Candidates:
    """float32 unit candidates [B, C, D] -> their int8 codes for `screen` (in this thread's scratch
    buffers, until its next call), scales and measured rounding, in one native call
    (`kernels.native.quantize_int8_candidates`; needs the native kernels).

    Each candidate's unit vector q becomes q'_d = q_d * s_d, quantised with a scale of its own
    t = max |q'| / 127: codes j_d. two_parts: each candidate as hi codes j plus lo codes l of the
    remainder in steps of t / LO_STEPS, q~_d = t (j_d + l_d / LO_STEPS) / s_d: twice the tile
    products, but the candidate's rounding, ~40% of the screen's error with one part, all but
    disappears. The screen marks a candidate for a group by its hi sums alone, `mark_slack` below
    its threshold: |x~.(q~ - q~hi)| <= ||x~|| ||q~ - q~hi|| with ||x~|| <= 1 + row_error."""
    from kernels import native  # native imports this module's types

    n_users, n_cands, dim = unit_cands.shape
    two_parts = two_parts and dim <= TWO_PARTS_MAX_DIM
    shape = (n_users, -(-n_cands // 16) * 16, -(-dim // 64) * 64)
    codes = scratch("int8-candidates", shape, torch.int8)
    lo = scratch("int8-candidates-lo", shape, torch.int8) if two_parts else None
    scale = scratch("int8-candidate-scales", shape[:2], torch.float32)
    errors = scratch("int8-candidate-errors", (n_users, n_cands), torch.float32)
    error, norm, reach = native.quantize_int8_candidates(unit_cands, screen.dim_scale, LO_STEPS, codes, lo, scale,
                                                         error_terms(dim, screen.row_error), errors)
    # + the float rounding of both sides
    mark_slack = 1.01 * (1 + screen.row_error) * reach + 1e-6 if two_parts and unit_cands.numel() else 0.0
    return Int8Candidates(codes, scale, error, norm, lo, mark_slack, errors)


def int8_screen_error(dim: int, row_error: float, cand_error: float, cand_norm: float) -> float:
    """Absolute bound of |int8-screened - exact float32 cosine| for candidates whose rounding
    ||q~ - q|| is at most `cand_error` and ||q~|| at most `cand_norm`.

    x, q are the float32 unit vectors, within d = (dim + 2) 2**-24 of the true ones x*, q*:
    x~.q~ - x*.q* = (x~ - x*).q~ + x*.(q~ - q*), at most (row_error + d) cand_norm +
    cand_error + d. The int32 sum is exact; converting it and multiplying by t round twice,
    2**-23 relative on a score below ~1.1 (< 2**-22); the exact float32 re-scoring is within d of
    the truth. A 1% slack covers the float32 evaluation of the measured norms themselves.
    """
    slack, row_term, constant = error_terms(dim, row_error)
    return slack * (row_term * cand_norm + cand_error + constant)


def error_terms(dim: int, row_error: float) -> tuple[float, float, float]:
    """(slack, row_term, constant) of `int8_screen_error` = slack * (row_term * cand_norm +
    cand_error + constant), for the native quantisation to apply to each candidate's own rounding."""
    d = (dim + 2) * 2.0**-24
    return 1.01, row_error + d, d + 2.0**-22 + d
