"""CPU fast path of cosine top-K.

Two strategies, chosen per block of users (details and measurements in docs/gsu.md):

- exact: float32 dot products of the gathered rows with the unit candidates (one matmul over the
  distinct items of a short block, else a product and sum per candidate over cache-sized slices),
  scaled by the reciprocal row norms the table prepared once (`_table_prep`), and a running top-k
  on int64 keys that pack (score, position), so ties go to the more recent behaviour. Used when there are few
  candidates (C < BF16_MIN_CANDIDATES: the torch screen's matmul is cheap next to gathering) or
  the history is short next to the survivors a screen would keep (re-scoring them would cost as
  much); with the fused native screen, only for histories no longer than the survivors.
- screened: a bfloat16 matmul (several times faster than float32 on AVX512-BF16 CPUs) picks
  `keep = k + margin` survivors per candidate, which are re-scored exactly in float32:

  1. Each history chunk is gathered once (from a normalised bfloat16 copy of the table, built
     once per table, see `_table_prep`) and scored against all C candidates with one matmul into
     a reused buffer of this thread (`kernels.scratch`: fresh large allocations fault in a page
     per 4 KiB on every call).
  2. Selection in a long chunk goes through group maxima: its rows are split into strided
     groups, the maximum of each group is taken on the bf16 bits read as int16 (the same order as
     the floats for positive values, and a native integer max, ~10x faster than a bf16
     reduction), the best `keep` groups per candidate are found the same way one level down, and
     only their members go through `torch.topk` (a plain top-k over the chunk cost ~3x more). The
     top `keep` items lie in the top `keep` groups, so nothing is lost; candidates whose
     `keep`-th value is not positive (where int16 order is not float order) are not trusted.
  3. Completeness is proven, not hoped for: every approximate score a is within
     eps(a) = absolute + relative * |a| of the exact one (`measured_screen_error` from the bf16
     rounding the table's copy and the candidates actually got, or the worst case
     `screen_error_bound` where rows are normalised per chunk), so the exact
     top-k lies among the survivors when every eligible behaviour survived, or when the lowest
     survivor's score plus its eps is below the k-th eligible survivor's score minus its eps.
     Unproven candidates get one more pass (`_Screener.widen`) that keeps every behaviour whose
     screened score plus its eps reaches the k-th exact score found so far, and re-scores them
     all exactly.

  Steps 1-2 and the re-scoring run in one fused C kernel where the CPU has AMX
  (`kernels.native`: gather, tile products and a running selection in one pass, ~3x faster);
  it returns, instead of "the lowest survivor", a bound on every score it left out, which the
  proof of step 3 uses the same way (with no relative term: its scores are float32 sums), its
  buffers drop what screens more than twice that error below the running k-th best (it cannot
  be in the top-k), and an unproven candidate is first screened again with NATIVE_REGROW times
  more survivors (a pass is cheap there). USE_NATIVE = False forces the torch screen. Where the
  CPU also has AMX-INT8 and few candidates share a long history (`_int8_pays`), the fused screen
  reads an int8 copy of the table instead (`kernels.int8_screen`: half the bytes, a wider
  window from its own measured rounding, the same proof). USE_INT8 = False keeps the bf16 copy.

  Ineligible behaviours (padding, id 0, zero rows) score as zero vectors in the screen and are
  dropped at re-scoring; the proof counts eligible survivors only, so they may take a survivor
  slot but never the place of an eligible behaviour.

Either way the result is an exact float32 evaluation; it differs from `kernels.reference` only by
float32 rounding (summation order), i.e. positions can swap only between behaviours whose cosines
agree to ~1e-6. Users are processed in blocks of similar length (longest first) and histories in
chunks, so memory stays within fixed element budgets whatever B, L and C are; each calling thread
keeps its chunk buffers between calls (tens of MB at the largest shapes). torch's intra-op threads
(torch.set_num_threads) parallelise the matmuls, gathers and reductions.
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field

import torch

from kernels import native
from kernels._keys import pack_keys, unpack_keys
from kernels.hugepages import collapse_to_huge, empty_huge
from kernels.int8_screen import Int8Screen, build_int8_screen, int8_screen_error, quantize_candidates
from kernels.scratch import scratch
from kernels.screen_precision import BF16, TWO_PARTS, ScreenPrecision, rescreen_level

__all__ = ["cosine_topk_cpu", "prepare_table_cpu", "screen_error_bound"]

# Element budgets that bound memory whatever the input size: the score chunk [Bb, C, n] and the
# gathered rows [Bb, n, D]; 8M row elements are 65,536 rows of D = 128.
SCORE_BUDGET = 1 << 23
ROW_BUDGET = 1 << 23
# The screen's bf16 score chunk may be larger (64 MiB): with C = 1,000 its chunks then hold 32,768
# rows, so the grouped selection keeps ~1/7 of the scores instead of ~1/3.
SCREEN_SCORE_BUDGET = 1 << 25
# The fused native screen streams the history and holds no score chunk or rows, only each pair's
# survivors: a block of its users is bounded by FUSED_KEPT_BUDGET survivor slots (users x C x
# kept, 12 bytes each with their positions) and takes the users down to half the block's length
# (its per-length choices: the int8 copy, the sampled start). One call for many users instead of
# one per user, as the row budget gave (65,536 rows): at B = 256, C = 1 (a training batch) L =
# 100K 392 -> 344 ms, L = 10K 36 -> 30 ms with lengths from 5K to 10K; B = 64, L = 10K 9.2 -> 7.8.
# Users not already longest first are gathered into a block's own copy of their histories: at most
# FUSED_GATHER_BUDGET ids (128 MB; 167 users of 100K behaviours) a block.
FUSED_KEPT_BUDGET = 1 << 23
FUSED_GATHER_BUDGET = 1 << 24
# Below this many candidates the matmul is cheap next to gathering and selecting: no screen.
BF16_MIN_CANDIDATES = 8
# A history no longer than this many survivors is scored exactly: re-scoring would cost as much.
# The fused native screen and its native re-scoring are cheap enough to screen anything longer
# than the survivors, whatever C (C = 1, L = 1,000: 14.5 -> 3.2 ms; L = 100,000: 11 -> 1.5 ms).
EXACT_MAX_LENGTH_PER_KEPT = 8
FUSED_EXACT_MAX_LENGTH_PER_KEPT = 1
# The grouped selection splits rows into this many groups per level, while each group keeps at
# least GROUPED_MIN_WIDTH_PER_KEPT rows per survivor.
SELECTION_GROUPS = 8
GROUPED_MIN_WIDTH_PER_KEPT = 2
# Tables up to this many elements get a normalised bfloat16 copy for screening (see _table_prep).
SCREEN_COPY_MAX_ELEMENTS = 1 << 28
# Exact scoring works through rows in slices of this many, small enough to stay in cache.
EXACT_SLICE_ROWS = 8192
# Screen with the fused native kernel (kernels/native) where it can run; False forces the torch
# screen (tests run both).
USE_NATIVE = True
# Candidates the fused screen cannot prove are screened again with NATIVE_REGROW times more
# survivors, up to NATIVE_REGROW_MAX_KEEP, before the one-pass widening of the torch path.
NATIVE_REGROW = 4
NATIVE_REGROW_MAX_KEEP = 16_384
# The fused screen's window in screen errors: a behaviour screened 2 x error below a k-th best
# screened score is below the k-th exact one; the 1% more keeps the proof's inequality strict.
WINDOW_ERRORS = 2.02
# Where the CPU has AMX-INT8, histories of at least INT8_MIN_LENGTH rows, with one candidate or
# with INT8_MIN_ROWS_PER_CANDIDATE rows per candidate, are screened from the table's int8 copy
# (kernels/int8_screen.py): half the bytes of the bf16 pass, but a window ~3x wider (candidates
# in two parts; ~4.5x in one: kernels.screen_precision learns which per table), so more survivors to re-score
# (INT8_KEEP_FACTOR x `keep` may be kept). The pass pays where it is most of the call, with few
# candidates (side by side, 100K rows in all, bf16 / int8 in one part / in two: L = 100K, C = 1
# 1.54 / 0.97 / 1.01 ms, C = 32 2.07 / 1.65 / 1.50, C = 64 2.30 / 2.40 / 2.18, C = 80 2.32 /
# 2.81 / 2.34, C = 100 2.97 / 3.40 / 3.18; L = 20K, C = 16 2.49 / 2.08 / 2.04; L = 10K, C = 6
# 2.05 / 1.79 / 1.79; one candidate (one part), L = 1,000 2.26 -> 2.07, L = 500 2.78 -> 2.51).
# Since a split user's pieces pool their samples, whole calls, int8 (two parts) over bf16, best
# of 20 on random rows: 1,000 rows a candidate 0.85-0.99 (L = 100K, C = 100, B = 1 and 4;
# L = 10K, C = 10), 1,428 0.85, 500 1.06-1.08; but at L = 100K, C = 100 on clustered catalogues
# (benchmarks/gsu.py --catalogue) 3.8 against 3.3 ms (clusters) and 12.9 against 8.7 ms (near
# duplicates, where the int8 window holds thousands of behaviours). Since the re-scoring takes
# many survivors cheaply (eight rows at a time, no sort of the rest), at 1,000 rows a candidate
# (7 rounds of best-of-15 calls, int8 / bf16): B = 1, L = 100K, C = 100 0.96 / 0.93 / 1.10
# (random / clusters / near duplicates), B = 4 0.83 / 0.84 / 0.97, B = 1 and 10, L = 10K, C = 10
# 0.73-0.81; at 800 rows B = 1 1.00-1.07, at 625 1.03-1.34: the threshold is 1,000.
USE_INT8 = True
INT8_MIN_LENGTH = 512
INT8_MIN_ROWS_PER_CANDIDATE = 1_000
INT8_KEEP_FACTOR = 3
# Prepared tables, most recently used last: [weakref to the table, its version, its _TablePrep].
# Two, so that a service reloading its model (a new table next to the old one, both in use for a
# while) does not rebuild each table on every alternation.
_PREP: list = []
_PREP_LOCK = threading.RLock()  # re-entrant: a table freed inside the lock calls _forget_prep
PREPARED_TABLES = 2
_TINY = torch.finfo(torch.float32).tiny


def screen_error_bound(dim: int) -> tuple[float, float]:
    """(absolute, relative): |bf16-screened - exact cosine| <= absolute + relative * |screened|.

    For unit vectors x, y of `dim` scored in bfloat16 (unit roundoff u = 2**-8) with float32
    accumulation and a bfloat16 result: rounding both operands moves each product by at most
    (2u + u^2)|x_i y_i|, i.e. the sum by (2u + u^2) * sum|x_i y_i| <= 2u + u^2 (Cauchy-Schwarz);
    the float32 accumulation adds at most dim * 2**-24 (1 + u)^2; rounding the result adds
    u * |result| <= u / (1 - u) * |screened|. The exact side (float32 re-scoring) is within
    (dim + 2) * 2**-24 of the true cosine. A 1% slack covers the norms of the rounded unit
    vectors (1 +- dim * 2**-24).
    """
    u = 2.0**-8
    absolute = 2 * u + u * u + dim * 2.0**-24 * (1 + u) ** 2 + (dim + 2) * 2.0**-24
    return 1.01 * absolute, 1.01 * u / (1 - u)


def measured_screen_error(dim: int, row_error: float, cand_error: float, rounded: bool) -> tuple[float, float]:
    """(absolute, relative) as `screen_error_bound`, from the bf16 rounding actually done.

    Instead of the worst case of bf16 rounding (u per vector) it uses row_error = max over the
    table of ||x~ - x|| (measured once per table with its bf16 copy, `_table_prep`: about 0.6 u
    on random rows) and cand_error = max over the candidates of ||q~ - q||, x and q the float32
    unit vectors, x~ and q~ their bf16 roundings. With x*, q* the true unit vectors,
    ||x - x*||, ||q - q*|| <= d = (dim + 2) 2**-24, and x~.q~ - x*.q* = (x~ - x*).q~ + x*.(q~ - q*),
    so the product is off by at most (row_error + d)(1 + cand_error + d) + cand_error + d; the
    float32 accumulation adds dim 2**-24 (1 + u)^2 and the exact float32 re-scoring (dim + 2) 2**-24.
    `rounded`: the scores are rounded to bf16 (the torch screen), which adds u / (1 - u) *
    |screened|; the fused native screen returns float32 sums (relative 0). A 1% slack covers the
    rounding of these norms themselves.
    """
    u, d = 2.0**-8, (dim + 2) * 2.0**-24
    product = (row_error + d) * (1 + cand_error + d) + cand_error + d
    absolute = 1.01 * (product + dim * 2.0**-24 * (1 + u) ** 2 + d)
    return absolute, (1.01 * u / (1 - u) if rounded else 0.0)


def _int8_pays(length: int, n_cands: int) -> bool:
    """Whether histories of `length` rows screened for `n_cands` candidates use the int8 copy."""
    return length >= INT8_MIN_LENGTH and (n_cands == 1 or length >= INT8_MIN_ROWS_PER_CANDIDATE * n_cands)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows [..., D] divided by their norm (zero rows stay zero)."""
    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return rows / norms.clamp_min(_TINY)


def _unit_candidates(
    table: torch.Tensor, prep: _TablePrep | None, candidates: torch.Tensor
) -> tuple[torch.Tensor, float | None]:
    """The candidates' unit vectors float32 [B, C, D] and, where the table has a bf16 copy, the
    largest ||bf16 - float32|| among them (None: measure it from the vectors).

    With the table's prepared reciprocal norms, a row times its reciprocal norm, the very
    arithmetic of the bf16 copy: its rounding error is then the one measured for that row at
    preparation. (Indexing [B, C] ids, converting and normalising anew took 48 ms of a 300 ms call
    at B = 100, C = 1,000: advanced indexing is 10x slower than index_select here, and the
    round trip through bf16 to measure the error made three more [B, C, D] tensors.) The vectors
    live in this thread's scratch buffer "unit-candidates" until its next call."""
    if prep is None:
        return _unit(table[candidates].float()), None
    unit = scratch("unit-candidates", (*candidates.shape, table.shape[1]), torch.float32)
    if native.available():  # one call instead of six torch ops, the same arithmetic
        worst = native.unit_candidates(table, prep.inv_norm, prep.row_error, candidates, unit)
        return unit, worst if prep.row_error is not None and candidates.numel() else None
    ids = candidates.reshape(-1)
    unit.view(-1, table.shape[1]).copy_(table.index_select(0, ids)).mul_(prep.inv_norm.index_select(0, ids).unsqueeze(1))
    cand_error = float(prep.row_error.index_select(0, ids).max()) if prep.row_error is not None and ids.numel() else None
    return unit, cand_error


@torch.no_grad()
def cosine_topk_cpu(
    table: torch.Tensor,
    candidates: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    k: int = 50,
    *,
    screen: bool | None = None,
    margin: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K history positions by cosine to each candidate (same contract as `kernels.cosine_topk`).

    Args:
        table: [N+1, D] embeddings (float32 / float16 / bfloat16 / int8).
        candidates: [B, C] item ids.
        history: [B, L] item ids, chronological, left-aligned, 0 = padding.
        lengths: [B] behaviours per row.
        k: positions kept per (user, candidate).
        screen: allow the bfloat16 screen (default: when the fused native screen can run, or
            when C >= BF16_MIN_CANDIDATES); blocks of
            short histories are scored exactly regardless.
        margin: survivors kept by the first screen beyond k (default 2k).

    Returns:
        scores float32 [B, C, k], positions int64 [B, C, k] (-inf / -1 beyond the valid behaviours).
    """
    batch, length = history.shape
    n_cands = candidates.shape[1]
    dim = table.shape[1]
    prep = _table_prep(table)
    unit_cands, cand_error = _unit_candidates(table, prep, candidates)  # [B, C, D]
    screener = _Screener(table, prep, cand_error)
    if screen is None:
        screen = screener.fused or n_cands >= BF16_MIN_CANDIDATES
    keep = k + (2 * k if margin is None else margin)
    min_screened = (FUSED_EXACT_MAX_LENGTH_PER_KEPT if screener.fused else EXACT_MAX_LENGTH_PER_KEPT) * keep

    if batch == 0 or n_cands == 0 or length == 0:
        return torch.full((batch, n_cands, k), float("-inf")), torch.full((batch, n_cands, k), -1, dtype=torch.int64)

    # Each torch op costs ~10-20 us inside a call (its caches cold after a screen): the lengths
    # are clamped only where they need it (cosine_topk has checked them), and users already
    # longest first (one user, or a sorted batch) make blocks of runs of rows, taken as views
    # (a single block the whole input), whose results are the output itself.
    listed = lengths.tolist()
    if min(listed) < 0 or max(listed) > length:
        lengths = lengths.clamp(0, length)
        listed = lengths.tolist()
    in_order = batch == 1 or bool((lengths[1:] <= lengths[:-1]).all())
    order = None if in_order else torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = listed if in_order else lengths[order].tolist()
    plans = []  # (block users, block length, chunk rows, screened)
    start = 0
    while start < batch and sorted_lengths[start] > 0:
        block_len = sorted_lengths[start]
        screened = screen and block_len > min_screened
        score_budget = SCREEN_SCORE_BUDGET if screened else SCORE_BUDGET
        cols = min(block_len, max(keep, min(score_budget // n_cands, ROW_BUDGET // dim)))
        if cols < block_len and cols >= 2048:  # whole chunks split evenly into selection groups
            cols -= cols % 1024
        if screened and screener.fused:
            kept = keep * (INT8_KEEP_FACTOR if screener.int8 and _int8_pays(block_len, n_cands) else 1)
            most = FUSED_KEPT_BUDGET // (n_cands * kept)
            if not in_order:
                most = min(most, FUSED_GATHER_BUDGET // block_len)
            users = _fused_block_users(sorted_lengths, start, max(block_len // 2, min_screened), most)
        else:
            users = max(1, min(batch - start, score_budget // (n_cands * cols), ROW_BUDGET // (dim * cols)))
        plans.append((slice(start, start + users) if in_order else order[start : start + users], block_len, cols, screened))
        start += users

    if len(plans) == 1 and in_order and start == batch:
        out_scores = out_positions = None  # the block's results become the output
    elif in_order:
        # The fused re-scoring writes each block's rows in place (every slot); only users without
        # behaviours (past `start`) are filled here. (Filling the whole output and copying every
        # block into it took ~10 ms of a 270 ms call at B = 100, L = 1,000, C = 1,000.)
        out_scores = torch.empty(batch, n_cands, k)
        out_positions = torch.empty(batch, n_cands, k, dtype=torch.int64)
        out_scores[start:] = float("-inf")
        out_positions[start:] = -1
    else:
        out_scores = torch.full((batch, n_cands, k), float("-inf"))
        out_positions = torch.full((batch, n_cands, k), -1, dtype=torch.int64)
    for block, block_len, cols, screened in plans:
        whole = in_order and block == slice(0, batch)
        hist = history if whole and block_len == length else history[block, :block_len]
        lens, block_cands = (lengths, unit_cands) if whole else (lengths[block], unit_cands[block])
        in_place = out_scores is not None and in_order and screened and screener.fused
        if not screened:
            result = _exact_block(table, prep, block_cands, hist, lens, k, cols)
        else:
            out = (out_scores[block], out_positions[block]) if in_place else None
            level, probing = screener.first_level(block_len, n_cands)
            result = screener.select(block_cands, hist, lens, k, keep, cols, out=out, level=level)
            screener.record(level, probing, result[2], result[3])
        if out_scores is None:
            out_scores, out_positions = result[:2]
        elif not in_place:
            out_scores[block], out_positions[block] = result[:2]
        if not screened or result[3]:
            continue
        scores, complete = result[0], result[2]
        block_users = torch.arange(batch)[block]
        for b in (~complete).any(1).nonzero().flatten().tolist():
            user = int(block_users[b])
            redo = (~complete[b]).nonzero().flatten()
            user_hist, user_len = history[user : user + 1, : lengths[user]], lengths[user : user + 1]
            kth = scores[b, redo, k - 1]
            # A fused screen pass is cheap: first try again with more survivors (near-ties that
            # bf16 cannot order come in clusters of hundreds to thousands).
            grown = keep
            while screener.fused and len(redo) and grown * NATIVE_REGROW < min(int(user_len), NATIVE_REGROW_MAX_KEEP):
                grown *= NATIVE_REGROW
                s, p, done, _ = screener.select(
                    unit_cands[user : user + 1, redo], user_hist, user_len, k, grown, cols, sampled=False,
                    level=rescreen_level(level),
                )
                out_scores[user, redo[done[0]]], out_positions[user, redo[done[0]]] = s[0, done[0]], p[0, done[0]]
                redo, kth = redo[~done[0]], s[0, ~done[0], k - 1]
            if len(redo):
                out_scores[user, redo], out_positions[user, redo] = screener.widen(
                    unit_cands[user, redo], user_hist[0], kth, k, cols
                )
    return out_scores, out_positions


def _fused_block_users(sorted_lengths: list[int], start: int, floor: int, most: int) -> int:
    """Users from `start` of `sorted_lengths` (descending) in one fused-screen block: those longer
    than `floor`, at most `most`, at least one."""
    end = min(len(sorted_lengths), start + max(1, most))
    users = 1
    while start + users < end and sorted_lengths[start + users] > floor:
        users += 1
    return users


def _exact_block(
    table: torch.Tensor,
    prep: _TablePrep | None,
    unit_cands: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a block, on packed (score, position) keys.

    The score of a behaviour must not depend on where it sits, or duplicates of one item could
    differ in the last bit and break the tie toward the wrong one; a BLAS matmul does not promise
    that across shapes (we saw it between chunks of 64 and 9 rows). So with many candidates a
    block that fits in one chunk is scored by one matmul over the distinct items of each user,
    mapped back to positions; otherwise (few candidates, long blocks, the rare fallback of
    `_Screener.widen`) by a product and a sum per candidate over cache-sized slices of rows.
    Either way a row's dot product is scaled by its reciprocal norm afterwards, which is one
    multiply per score instead of a pass over the rows.

    Args: unit_cands [Bb, C, D] float32; history [Bb, Lb]; lengths [Bb].
    Returns: scores float32 [Bb, C, k], positions int64 [Bb, C, k].
    """
    n_users, block_len = history.shape
    n_cands, dim = unit_cands.shape[1], unit_cands.shape[2]
    position = torch.arange(block_len)
    valid = (history != 0) & (position < lengths.unsqueeze(1))
    if n_cands >= BF16_MIN_CANDIDATES and block_len <= cols:
        distinct, index = _distinct_rows(history)  # [Bb, U], [Bb, Lb]
        rows = _gather_float(table, distinct, "exact-rows")  # [Bb * U, D]
        scale = _scales(prep, distinct, rows).view(distinct.shape)
        valid &= scale.gt(0).gather(1, index)
        by_item = scratch("exact-by-item", (n_users, n_cands, distinct.shape[1]), torch.float32)
        torch.bmm(unit_cands, rows.view(n_users, -1, dim).transpose(1, 2), out=by_item).mul_(scale.unsqueeze(1))
        scores = scratch("exact-scores", (n_users, n_cands, block_len), torch.float32)
        torch.gather(by_item, 2, index.unsqueeze(1).expand(n_users, n_cands, block_len), out=scores)
        best = _top_keys(scores.masked_fill_(~valid.unsqueeze(1), float("-inf")), 0, k)
    else:
        best = None
        step = max(1, min(cols, EXACT_SLICE_ROWS // n_users))
        for c0 in range(0, block_len, step):
            ids = history[:, c0 : c0 + step]  # [Bb, n]
            n = ids.shape[1]
            rows = _gather_float(table, ids, "exact-rows").view(n_users, n, dim)
            scale = _scales(prep, ids, rows.view(-1, dim)).view(n_users, n)
            product = scratch("exact-product", (n_users, n, dim), torch.float32)
            by_cand = scratch("exact-scores", (n_cands, n_users, n), torch.float32)
            for c in range(n_cands):
                torch.sum(torch.mul(rows, unit_cands[:, c : c + 1], out=product), dim=-1, out=by_cand[c])
            scores = by_cand.permute(1, 0, 2).mul_(scale.unsqueeze(1))  # [Bb, C, n]
            ok = valid[:, c0 : c0 + n] & scale.gt(0)
            keys = _top_keys(scores.masked_fill_(~ok.unsqueeze(1), float("-inf")), c0, k)
            if best is not None:
                keys = torch.cat([best, keys], dim=-1)
                keys = keys.topk(min(k, keys.shape[-1]), dim=-1).values
            best = keys
    scores, positions = unpack_keys(best)
    missing = k - scores.shape[-1]
    scores = torch.nn.functional.pad(scores, (0, missing), value=float("-inf"))
    return scores, torch.nn.functional.pad(positions, (0, missing), value=-1)


def _top_keys(scores: torch.Tensor, offset: int, k: int, extra: int = 8) -> torch.Tensor:
    """Packed keys of the top-k of scores [..., n] (positions offset + column), ties to the recent.

    Packing every score costs several int64 passes; instead a float top-(k + extra) is packed,
    which holds every tie at the k-th value unless the tie runs past it: those rows are packed whole.
    """
    n = scores.shape[-1]
    columns = torch.arange(offset, offset + n)
    if n <= k + extra:
        return pack_keys(scores, columns.expand_as(scores)).topk(min(k, n), dim=-1).values
    top = scores.topk(k + extra, dim=-1)  # sorted, descending
    best = pack_keys(top.values, top.indices + offset).topk(k, dim=-1).values
    long_tie = top.values[..., -1] == top.values[..., k - 1]
    if bool(long_tie.any()):
        rows = scores[long_tie]
        best[long_tie] = pack_keys(rows, columns.expand_as(rows)).topk(k, dim=-1).values
    return best


def _exact_scores(
    table: torch.Tensor, prep: _TablePrep | None, unit_cands: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cosines of candidates [Bb, C, D] with their own items ids [Bb, C, m] -> [Bb, C, m].

    Each survivor's row is gathered and dotted with its candidate (a product and a sum, so every
    copy of an item gets the same bits for a candidate and duplicates tie exactly, see
    `_exact_block`), then scaled by the row's reciprocal norm. Also returns eligible [Bb, C, m]:
    id and row non-zero.
    """
    n_users, n_cands, m = ids.shape
    dim = table.shape[1]
    exact = torch.empty(ids.shape, dtype=torch.float32)
    eligible = torch.empty(ids.shape, dtype=torch.bool)
    step = max(1, EXACT_SLICE_ROWS // (n_users * m))
    for c0 in range(0, n_cands, step):
        sub = ids[:, c0 : c0 + step]  # [Bb, c, m]
        rows = _gather_float(table, sub, "rescore-rows").view(*sub.shape, dim)
        scale = _scales(prep, sub, rows.view(-1, dim)).view(sub.shape)
        product = scratch("rescore-product", rows.shape, torch.float32)
        torch.mul(rows, unit_cands[:, c0 : c0 + step].unsqueeze(2), out=product)
        exact[:, c0 : c0 + step] = product.sum(-1).mul_(scale)
        eligible[:, c0 : c0 + step] = sub.ne(0).logical_and_(scale.gt(0))
    return exact, eligible


def _distinct_rows(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids of each row of history [Bb, L] -> (distinct [Bb, U] padded with 0, index [Bb, L]).

    history[b, j] == distinct[b, index[b, j]]; U is the largest distinct count of a row.
    """
    ordered, order = history.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = starts.cumsum(1) - 1  # position of each sorted id among the distinct ones
    distinct = torch.zeros(history.shape[0], int(rank[:, -1].max()) + 1, dtype=history.dtype)
    distinct.scatter_(1, rank, ordered)
    index = torch.empty_like(rank).scatter_(1, order, rank)
    return distinct, index


@dataclass
class _TablePrep:
    """What a table needs once, not per call: see `_table_prep`."""

    inv_norm: torch.Tensor  # float32 [N+1]: 1 / row norm, 0 for zero rows (never eligible)
    screen: torch.Tensor | None  # bfloat16 [N+1, D] unit rows, None above SCREEN_COPY_MAX_ELEMENTS
    screen_error: float  # max over rows of ||screen row - float32 unit row|| (0 without a screen)
    row_error: torch.Tensor | None  # float32 [N+1]: that norm per row (None without a screen)
    int8: Int8Screen | None = None  # the int8 copy, once a call has screened from it (`_int8_copy`)
    precision: ScreenPrecision = field(default_factory=ScreenPrecision)  # one int8 part or two, for first screens


def _table_prep(table: torch.Tensor) -> _TablePrep | None:
    """The reciprocal row norms of `table` and (if small enough) its normalised bfloat16 copy;
    the table's own memory is moved onto huge pages (`collapse_to_huge`, best effort).

    Built once and kept for the last PREPARED_TABLES tables seen, while that very tensor is
    unmodified (identity and version counter): re-normalising the gathered rows on every call
    costs several passes over them, more than the matmul itself. Returns None for tensors created
    under `torch.inference_mode` (they carry no version counter, so an edit could not be
    noticed): their rows are then normalised as they are gathered.
    """
    try:
        version = table._version
    except RuntimeError:
        return None
    with_screen = table.numel() <= SCREEN_COPY_MAX_ELEMENTS
    with _PREP_LOCK:  # scoring threads share the cache
        for at, entry in enumerate(_PREP):
            if entry[0]() is table:
                del _PREP[at]  # stale, or moved to the end as the most recent
                if entry[1] == version and (entry[2].screen is not None) == with_screen:
                    _PREP.append(entry)
                    return entry[2]
                break
    inv_norm = torch.empty(table.shape[0])
    # Read at random rows on every call: huge pages spare most TLB misses (kernels/hugepages.py);
    # the table itself too, for the exact re-scoring.
    collapse_to_huge(table)
    screen = empty_huge(tuple(table.shape), torch.bfloat16) if with_screen else None
    row_error = torch.empty(table.shape[0]) if with_screen else None
    step = max(1, ROW_BUDGET // max(1, table.shape[1]))
    for r0 in range(0, table.shape[0], step):
        rows = table[r0 : r0 + step].float()
        scale = _reciprocal_norms(rows)
        inv_norm[r0 : r0 + step] = scale
        if screen is not None:
            unit = rows * scale.unsqueeze(1)  # not in place: rows may be the table
            screen[r0 : r0 + step] = unit
            torch.linalg.vector_norm(screen[r0 : r0 + step].float().sub_(unit), dim=1, out=row_error[r0 : r0 + step])
    if screen is not None and screen.shape[0]:
        # id 0 is never eligible: the fused screen reads row 0 for padding and unknown items
        screen[0] = 0
        row_error[0] = 0
    screen_error = float(row_error.max()) if row_error is not None and row_error.numel() else 0.0
    prep = _TablePrep(inv_norm, screen, screen_error, row_error)
    with _PREP_LOCK:
        _PREP.append([weakref.ref(table, _forget_prep), version, prep])
        del _PREP[:-PREPARED_TABLES]
    return prep


def prepare_table_cpu(table: torch.Tensor) -> bool:
    """Builds now what calls over `table` would otherwise build on first use: its reciprocal norms
    and normalised bf16 copy, and its int8 copy where this CPU screens from one. Returns False
    where nothing is kept for it (a tensor made under `torch.inference_mode`)."""
    prep = _table_prep(table)
    if prep is None:
        return False
    if _Screener(table, prep).int8:
        _int8_copy(table, prep)
    return True


def _int8_copy(table: torch.Tensor, prep: _TablePrep) -> Int8Screen:
    """The int8 copy of a prepared table, built by the first call that screens from it (two more
    passes over the table): a service that never does, ranking many candidates, spends neither
    that time nor its 1 byte x N x D of memory."""
    if prep.int8 is None:
        prep.int8 = build_int8_screen(table, prep.inv_norm, max(1, ROW_BUDGET // max(1, table.shape[1])))
    return prep.int8


def _forget_prep(dead: weakref.ref) -> None:
    """Frees the prepared arrays together with their table (unless newer tables displaced them)."""
    with _PREP_LOCK:
        _PREP[:] = [entry for entry in _PREP if entry[0] is not dead]  # identity: weakrefs compare referents


def _reciprocal_norms(rows: torch.Tensor) -> torch.Tensor:
    """float32 rows [M, D] -> [M]: 1 / norm, and 0 for zero rows."""
    norms = torch.linalg.vector_norm(rows, dim=1)
    return torch.where(norms > 0, norms.clamp_min(_TINY).reciprocal(), 0.0)


def _gather_float(table: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
    """Rows `ids` [M] of the table as float32 [M, D], in a scratch buffer called `name`."""
    shape = (ids.numel(), table.shape[1])
    rows = scratch(name, shape, torch.float32)
    if table.dtype == torch.float32:
        return torch.index_select(table, 0, ids.reshape(-1), out=rows)
    # Gather in the table's dtype, then convert: torch's mixed-dtype kernels are several times slower.
    stored = scratch(name + "-stored", shape, table.dtype)
    torch.index_select(table, 0, ids.reshape(-1), out=stored)
    return rows.copy_(stored)


def _scales(prep: _TablePrep | None, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """1 / norm of the rows `ids` [M] whose float32 values are `rows` [M, D] (0 for zero rows) -> [M]."""
    return prep.inv_norm[ids.reshape(-1)] if prep is not None else _reciprocal_norms(rows)


class _Screener:
    """The screened strategy for one call: the table, its bf16 source and reused chunk buffers."""

    def __init__(self, table: torch.Tensor, prep: _TablePrep | None, cand_error: float | None = None):
        self.table = table
        self.prep = prep
        self.cand_error = cand_error  # the call's candidates' bf16 rounding, where known
        # The fused native screen reads the normalised bf16 copy; without one (or without AMX)
        # the torch screen below does the same job in separate passes.
        self.fused = prep is not None and prep.screen is not None and USE_NATIVE and native.available()
        self.int8 = self.fused and USE_INT8 and native.int8_available()

    def error(self, unit_cands: torch.Tensor, rounded: bool) -> tuple[float, float]:
        """(absolute, relative) error of screened scores against these candidates [..., D]: measured
        (`measured_screen_error`) where the rows come from the prepared bf16 copy, else the worst
        case (`screen_error_bound`: rows normalised per chunk, their rounding not measured). The
        candidates' rounding is the call's (`_unit_candidates`) where given, else measured here.
        `rounded`: scores rounded to bf16 (torch matmuls), not float32 sums (the fused screen)."""
        dim = self.table.shape[1]
        if self.prep is None or self.prep.screen is None or unit_cands.numel() == 0:
            return screen_error_bound(dim)
        cand_error = self.cand_error
        if cand_error is None:
            cand_error = float(torch.linalg.vector_norm(unit_cands.bfloat16().float() - unit_cands, dim=-1).max())
        return measured_screen_error(dim, self.prep.screen_error, cand_error, rounded)

    def select(
        self,
        unit_cands: torch.Tensor,
        history: torch.Tensor,
        lengths: torch.Tensor,
        k: int,
        keep: int,
        cols: int,
        sampled: bool = True,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        level: int = TWO_PARTS,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Screen, re-score and select for one block of users.

        Args: unit_cands [Bb, C, D] float32; history [Bb, Lb]; lengths [Bb]; sampled: let the
        fused screen start its thresholds from a sample (`native.sampled_start`; a screen again
        after a failed proof does without); out: contiguous float32 and int64 tensors [Bb, C, k]
        to return the scores and positions in (the fused screen writes them there directly);
        level: the copy a fused screen reads where the int8 copy pays (`kernels.screen_precision`:
        `first_level` for a call's first screen).
        Returns: scores float32 [Bb, C, k], positions int64 [Bb, C, k], complete BoolTensor
        [Bb, C]: True where the result is proven to be the exact top-k, and whether all are.
        """
        table = self.table
        if self.fused:
            return self._fused(unit_cands, history, lengths, k, keep, sampled, out, level)
        absolute, relative = self.error(unit_cands, rounded=True)  # the torch screen rounds its scores to bf16
        approx, positions, bound, n_valid, trusted = self._screen(unit_cands, history, lengths, keep, cols)
        kept = approx.shape[-1]
        ids = history.gather(1, positions.flatten(1)).view_as(positions)  # [Bb, C, kept]
        exact, eligible = _exact_scores(table, self.prep, unit_cands, ids)
        eligible &= positions < lengths.view(-1, 1, 1)
        exact.masked_fill_(~eligible, float("-inf"))
        keys = pack_keys(exact, positions)
        scores, top_positions = unpack_keys(keys.topk(min(k, kept), dim=-1).values)

        # As above, with the lowest survivor as the bound (top-`keep` selection).
        complete = eligible.sum(-1) == n_valid.unsqueeze(1)
        if kept >= k:
            reach = torch.where(bound > float("-inf"), bound + absolute + relative * bound.abs(), bound)
            complete |= reach < scores[..., k - 1]
        complete &= trusted

        missing = k - scores.shape[-1]
        scores = torch.nn.functional.pad(scores, (0, missing), value=float("-inf"))
        top_positions = torch.nn.functional.pad(top_positions, (0, missing), value=-1)
        if out is not None:
            scores, top_positions = out[0].copy_(scores), out[1].copy_(top_positions)
        return scores, top_positions, complete, bool(complete.all())

    def first_level(self, length: int, n_cands: int) -> tuple[int, bool]:
        """(level, probing) for a call's first screen of `n_cands` candidates over histories of
        `length` rows: the table's `ScreenPrecision`'s where the int8 copy pays, else (BF16, False)."""
        if self.int8 and _int8_pays(length, n_cands):
            return self.prep.precision.choose()
        return BF16, False

    def record(self, level: int, probing: bool, complete: torch.Tensor, all_complete: bool) -> None:
        """Tells the table's `ScreenPrecision` what a first screen at `level` proved (`complete`
        [Bb, C]) where that screen read the int8 copy (a bf16 screen teaches it nothing)."""
        if level < BF16:
            unproven = 0 if all_complete else int((~complete).sum())
            self.prep.precision.record(level, probing, unproven, complete.numel())

    def _fused(self, unit_cands: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, k: int, keep: int,
               sampled: bool, into: tuple[torch.Tensor, torch.Tensor] | None = None, level: int = TWO_PARTS,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """`select` with the fused native screen: from the int8 copy where it pays (`_int8_pays`)
        and `level` asks for it (in one or two parts; INT8_KEEP_FACTOR x `keep` survivors at
        most), else from the bf16 copy. Either screen's error is absolute (relative 0: float32
        results); the int8 screen's is each candidate's own (`Int8Candidates.errors`: its
        rounding measured apart, on random rows of D = 128 ~0.0195 on average against ~0.0225 for
        the call's largest; the window and the re-scoring narrow with it: 0.95x a call's time at
        L = 100K, C = 100)."""
        n_users, n_cands = unit_cands.shape[:2]
        int8_cands = pair_error = None
        if self.int8 and level < BF16 and _int8_pays(history.shape[1], n_cands):
            int8 = _int8_copy(self.table, self.prep)
            int8_cands = quantize_candidates(unit_cands, int8, two_parts=level == TWO_PARTS)
            absolute = int8_screen_error(self.table.shape[1], int8.row_error, int8_cands.error, int8_cands.norm)
            pair_error = int8_cands.errors
            screen, keep = int8.rows, keep * INT8_KEEP_FACTOR
        else:
            absolute, _ = self.error(unit_cands, rounded=False)
            screen = self.prep.screen
        out = (
            scratch("fused-screened", (n_users, n_cands, keep), torch.float32),
            scratch("fused-positions", (n_users, n_cands, keep), torch.int64),
            scratch("fused-bound", (n_users, n_cands), torch.float32),
            scratch("fused-valid", (n_users,), torch.int64),
        )
        # The re-scoring is complete when nothing eligible was left out, or when whatever was
        # (screened at most `bound`, so exactly at most bound + error) scores below the k-th
        # exact survivor: the true k-th score is at least that (module docstring).
        return native.screen_rescore_topk(
            screen, self.table, self.prep.inv_norm, unit_cands, history, lengths, keep, k, WINDOW_ERRORS * absolute,
            (absolute, 0.0), out,
            sample_every=native.sampled_start(k, n_cands, history.shape[1], screen.shape[1] * screen.element_size())
            if sampled else 0,
            int8_cands=int8_cands, windows=pair_error, window_factor=WINDOW_ERRORS, pair_error=pair_error, out=into,
            checked=False,
        )

    def widen(
        self,
        unit_cands: torch.Tensor,
        history: torch.Tensor,
        kth: torch.Tensor,
        k: int,
        cols: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of one user's unproven candidates, in one more pass over the history.

        `kth` is the k-th exact score among a candidate's first survivors: the true k-th score is
        at least that. A behaviour screened at a with a + eps(a) < kth therefore scores below it
        exactly and cannot be in the top-k; this pass keeps every other eligible behaviour and
        re-scores them all exactly. However many behaviours sit within bf16 rounding of each
        other, one pass proves the result.

        Args: unit_cands [C', D] float32; history [n] (the user's prefix); kth [C'] float32.
        Returns: scores float32 [C', k], positions int64 [C', k] (-inf / -1 beyond the eligible).
        """
        absolute, relative = self.error(unit_cands, rounded=True)
        cands = unit_cands.t().to(torch.bfloat16).contiguous().unsqueeze(0)  # [1, D, C']
        lengths = torch.tensor([history.shape[0]])
        reachable = []  # (position, candidate) pairs
        for c0 in range(0, history.shape[0], cols):
            scores, valid = self._chunk_scores(cands, history[c0 : c0 + cols].unsqueeze(0), lengths, c0)
            approx = scores[0].float()  # [n, C']
            keep = (approx + absolute + relative * approx.abs() >= kth).logical_and_(valid[0].unsqueeze(1))
            pairs = keep.nonzero()
            pairs[:, 0] += c0
            reachable.append(pairs)
        pairs = torch.cat(reachable)
        n_cands = unit_cands.shape[0]
        # One row of positions per candidate, padded with -1.
        order = torch.argsort(pairs[:, 1], stable=True)
        position, cand = pairs[order, 0], pairs[order, 1]
        counts = torch.bincount(cand, minlength=n_cands)
        width = max(1, int(counts.max()))
        slot = torch.arange(len(cand)) - (torch.cumsum(counts, 0) - counts)[cand]
        positions = torch.full((n_cands, width), -1, dtype=torch.int64)
        positions[cand, slot] = position
        ids = torch.where(positions >= 0, history[positions.clamp_min(0)], 0)
        exact, eligible = _exact_scores(self.table, self.prep, unit_cands.unsqueeze(0), ids.unsqueeze(0))
        exact[0].masked_fill_(~eligible[0], float("-inf"))
        keys = pack_keys(exact[0], positions.clamp_min(0))
        scores, top_positions = unpack_keys(keys.topk(min(k, width), dim=-1).values)
        missing = k - scores.shape[-1]
        scores = torch.nn.functional.pad(scores, (0, missing), value=float("-inf"))
        return scores, torch.nn.functional.pad(top_positions, (0, missing), value=-1)

    def _screen(
        self, unit_cands: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, keep: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Approximate top-`keep` of one block (the torch screen).

        Args: unit_cands [Bb, C, D] float32; history [Bb, Lb]; lengths [Bb].
        Returns: approximate scores [Bb, C, kept] (bfloat16), their positions [Bb, C, kept] int64,
        bound [Bb, C] float32 (every eligible behaviour left out screened at most this: the lowest
        survivor), eligible behaviours per user [Bb], trusted [Bb, C] (False where the grouped
        selection could not guarantee its result).
        """
        n_users, block_len = history.shape
        n_cands = unit_cands.shape[1]
        cands = unit_cands.transpose(1, 2).to(torch.bfloat16).contiguous()  # [Bb, D, C]
        n_valid = torch.zeros(n_users, dtype=torch.int64)
        trusted = torch.ones(n_users, n_cands, dtype=torch.bool)
        chunk_scores, chunk_positions = [], []
        for c0 in range(0, block_len, cols):
            scores, valid = self._chunk_scores(cands, history[:, c0 : c0 + cols], lengths, c0)
            n_valid += valid.sum(1)
            top_scores, top_positions, sure = _chunk_topk(scores, keep)
            trusted &= sure
            chunk_scores.append(top_scores)
            chunk_positions.append(top_positions + c0)
        if len(chunk_scores) == 1:
            approx, positions = chunk_scores[0], chunk_positions[0]
        else:
            # One merge at the end: [Bb, C, chunks * keep] is small next to any score chunk.
            merged_scores = torch.cat(chunk_scores, dim=-1)
            top = merged_scores.topk(min(keep, merged_scores.shape[-1]), dim=-1, sorted=False)
            approx, positions = top.values, torch.cat(chunk_positions, dim=-1).gather(-1, top.indices)
        approx = approx.float()
        return approx, positions, approx.amin(-1), n_valid, trusted

    def _chunk_scores(
        self, cands: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 cosines of one history chunk against the candidates.

        Args: cands [Bb, D, C] bfloat16 unit vectors; ids [Bb, n], the chunk starting at history
        position `offset`; lengths [Bb].
        Returns: scores [Bb, n, C] bfloat16 (this thread's buffer: valid until the next chunk),
        valid [Bb, n] (inside the length, id and row non-zero).
        """
        n_users, n = ids.shape
        dim, n_cands = cands.shape[1], cands.shape[2]
        valid = (ids != 0) & (torch.arange(offset, offset + n) < lengths.unsqueeze(1))
        screen_rows = scratch("screen-rows", (n_users * n, dim), torch.bfloat16)
        if self.prep is not None and self.prep.screen is not None:
            torch.index_select(self.prep.screen, 0, ids.reshape(-1), out=screen_rows)
            valid &= self.prep.inv_norm[ids] > 0
        else:
            valid &= self._normalise_rows(ids.reshape(-1), screen_rows).view(n_users, n)
        # Row-major scores [Bb, n, C]: this product runs ~1.6x faster than the candidate-major one.
        scores = scratch("screen-scores", (n_users, n, n_cands), torch.bfloat16)
        torch.bmm(screen_rows.view(n_users, n, dim), cands, out=scores)
        return scores, valid

    def _normalise_rows(self, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Writes rows `ids` [m] as bfloat16 unit vectors into out [m, D]; returns nonzero [m]."""
        rows = _gather_float(self.table, ids, "screen-staging")
        scale = _scales(self.prep, ids, rows)
        out.copy_(rows.mul_(scale.unsqueeze(1)))
        return scale > 0


def _chunk_topk(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`keep` of bf16 scores [Bb, n, C] along n: values, row indices [Bb, C, kept]; trusted [Bb, C].

    Long chunks select on the bf16 bits read as int16 (see the module docstring), through the
    maxima of strided groups: group j holds rows j, j + width, j + 2*width, ..., so its maximum
    is an elementwise max of contiguous slabs, and the top `keep` rows lie in the `keep` groups
    with the largest maxima (rows past the last whole group always compete). Picking those groups
    is the same problem, one size smaller (`_top_indices`). int16 order is float order for
    positive values and puts every negative value below them, so the result is exact where the
    `keep`-th value is positive (trusted).
    """
    n_users, n, n_cands = scores.shape
    keep = min(keep, n)
    width = n // SELECTION_GROUPS
    if width < GROUPED_MIN_WIDTH_PER_KEPT * keep:
        top = scores.topk(keep, dim=1, sorted=False)
        trusted = torch.ones(n_users, n_cands, dtype=torch.bool)
        return top.values.transpose(1, 2), top.indices.transpose(1, 2), trusted
    bits = scores.view(torch.int16)
    grouped = bits[:, : SELECTION_GROUPS * width].unflatten(1, (SELECTION_GROUPS, width))
    group_max = grouped.amax(dim=1).transpose(1, 2).contiguous()  # [Bb, C, width]
    members = _group_members(_top_indices(group_max, keep), width, n)  # rows [Bb, C, m]
    member_bits = bits.gather(1, members.transpose(1, 2)).transpose(1, 2)
    top = member_bits.topk(keep, dim=-1, sorted=False)
    return top.values.view(torch.bfloat16), members.gather(-1, top.indices), top.values.amin(-1) > 0


def _top_indices(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [..., keep] (unordered) of the `keep` largest of int16 values [..., m] along the last axis.

    Strided groups as in `_chunk_topk`, level after level, until a plain top-k is cheap: each level
    costs one pass over its input and a top-k over about keep * SELECTION_GROUPS members.
    """
    m = values.shape[-1]
    width = m // SELECTION_GROUPS
    if width < GROUPED_MIN_WIDTH_PER_KEPT * keep:
        return values.topk(keep, dim=-1, sorted=False).indices
    group_max = values[..., : SELECTION_GROUPS * width].unflatten(-1, (SELECTION_GROUPS, width)).amax(-2)
    members = _group_members(_top_indices(group_max, keep), width, m)
    return members.gather(-1, values.gather(-1, members).topk(keep, dim=-1, sorted=False).indices)


def _group_members(groups: torch.Tensor, width: int, length: int) -> torch.Tensor:
    """Positions [..., g * SELECTION_GROUPS + rest] of the members of strided groups [..., g].

    Group j of `length` positions holds j, j + width, ...; the `rest` positions past the last
    whole group belong to no group and are always included.
    """
    members = (groups.unsqueeze(-1) + width * torch.arange(SELECTION_GROUPS)).flatten(-2)
    rest = torch.arange(SELECTION_GROUPS * width, length)
    if rest.numel() == 0:
        return members
    return torch.cat([members, rest.expand(*members.shape[:-1], -1)], dim=-1)
