"""CPU fast path of cosine top-K.

Two strategies, chosen per block of users (details and measurements in docs/gsu.md):

- exact: float32 matmul of unit vectors, chunk by chunk, and a running top-k on int64 keys that
  pack (score, position), so ties go to the more recent behaviour. Used when there are few
  candidates (C < BF16_MIN_CANDIDATES: the matmul is cheap next to gathering) or the history is
  short next to the survivors a screen would keep (re-scoring them would cost as much).
- screened: a bfloat16 matmul (several times faster than float32 on AVX512-BF16 CPUs) picks
  `keep = k + margin` survivors per candidate, which are re-scored exactly in float32:

  1. Each history chunk is gathered once (from a normalised bfloat16 copy of the table, built
     once per table, see `_screen_copy`) and scored against all C candidates with one matmul into
     a reused buffer (fresh large allocations cost a page fault per 4 KiB on every chunk).
  2. Selection in a long chunk is two-level: its rows are split into strided groups, the maximum
     of each group is taken on the bf16 bits read as int16 (the same order as the floats for
     positive values, and a native integer max, ~10x faster than a bf16 reduction), the best
     `keep` groups per candidate are kept and only their members go through `torch.topk`. The top
     `keep` items lie in the top `keep` groups, so nothing is lost; candidates whose `keep`-th
     group maximum is not positive (where int16 order is not float order) are not trusted.
  3. Completeness is proven, not hoped for: every approximate score a is within
     eps(a) = absolute + relative * |a| of the exact one (`screen_error_bound`), so the exact
     top-k lies among the survivors when every eligible behaviour survived, or when the lowest
     survivor's score plus its eps is below the k-th eligible survivor's score minus its eps.
     Unproven candidates are screened again with KEEP_GROWTH times more survivors; past MAX_KEEP
     the exact strategy takes over for them.

  Ineligible behaviours (padding, id 0, zero rows) score as zero vectors in the screen and are
  dropped at re-scoring; the proof counts eligible survivors only, so they may take a survivor
  slot but never the place of an eligible behaviour.

Either way the result is an exact float32 evaluation; it differs from `kernels.reference` only by
float32 rounding (summation order), i.e. positions can swap only between behaviours whose cosines
agree to ~1e-6. Users are processed in blocks of similar length (longest first) and histories in
chunks, so memory stays within fixed element budgets whatever B, L and C are. torch's intra-op
threads (torch.set_num_threads) parallelise the matmuls, gathers and reductions.
"""
from __future__ import annotations

import math
import weakref

import torch

from kernels._keys import pack_keys, unpack_keys

__all__ = ["cosine_topk_cpu", "screen_error_bound"]

# Element budgets that bound memory whatever the input size: the score chunk [Bb, C, n] and the
# gathered rows [Bb, n, D]; 8M row elements are 65,536 rows of D = 128.
SCORE_BUDGET = 1 << 23
ROW_BUDGET = 1 << 23
# The screen's bf16 score chunk may be larger (64 MiB): with C = 1,000 its chunks then hold 32,768
# rows, so the grouped selection keeps ~1/7 of the scores instead of ~1/3.
SCREEN_SCORE_BUDGET = 1 << 25
# Below this many candidates the matmul is cheap next to gathering and selecting: no screen.
BF16_MIN_CANDIDATES = 8
# A history no longer than this many survivors is scored exactly: re-scoring would cost as much.
EXACT_MAX_LENGTH_PER_KEPT = 8
# When a screen cannot prove its survivors complete, it is redone for those candidates with
# KEEP_GROWTH times more survivors; beyond MAX_KEEP the exact strategy takes over.
KEEP_GROWTH = 4
MAX_KEEP = 4096
# Re-scoring uses one matmul against the distinct survivors while they number at most this many
# per survivor slot (matmul FLOPs are ~30x cheaper than a gathered row-wise product's).
MATMUL_MAX_DISTINCT_PER_KEPT = 32
# The grouped selection pays off once a chunk has this many rows per survivor.
GROUPED_MIN_ROWS_PER_KEPT = 32
# Tables up to this many elements get a normalised bfloat16 copy for screening (see _screen_copy).
SCREEN_COPY_MAX_ELEMENTS = 1 << 28
_SCREEN_COPY: list = []  # [weakref to the table, its version, bf16 unit rows, nonzero rows]
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


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows [..., D] divided by their norm (zero rows stay zero)."""
    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return rows / norms.clamp_min(_TINY)


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
        screen: allow the bfloat16 screen (default: when C >= BF16_MIN_CANDIDATES); blocks of
            short histories are scored exactly regardless.
        margin: survivors kept by the first screen beyond k (default 2k).

    Returns:
        scores float32 [B, C, k], positions int64 [B, C, k] (-inf / -1 beyond the valid behaviours).
    """
    batch, length = history.shape
    n_cands = candidates.shape[1]
    dim = table.shape[1]
    if screen is None:
        screen = n_cands >= BF16_MIN_CANDIDATES
    keep = k + (2 * k if margin is None else margin)

    out_scores = torch.full((batch, n_cands, k), float("-inf"))
    out_positions = torch.full((batch, n_cands, k), -1, dtype=torch.int64)
    if batch == 0 or n_cands == 0 or length == 0:
        return out_scores, out_positions

    lengths = lengths.clamp(0, length)
    unit_cands = _unit(table[candidates].float())  # [B, C, D]
    order = torch.argsort(lengths, descending=True)
    sorted_lengths = lengths[order].tolist()
    plans = []  # (block users, block length, chunk rows, screened)
    start = 0
    while start < batch and sorted_lengths[start] > 0:
        block_len = sorted_lengths[start]
        screened = screen and block_len > EXACT_MAX_LENGTH_PER_KEPT * keep
        score_budget = SCREEN_SCORE_BUDGET if screened else SCORE_BUDGET
        cols = min(block_len, max(keep, min(score_budget // n_cands, ROW_BUDGET // dim)))
        if cols < block_len and cols >= 2048:  # whole chunks split evenly into selection groups
            cols -= cols % 1024
        users = max(1, min(score_budget // (n_cands * cols), ROW_BUDGET // (dim * cols)))
        plans.append((order[start : start + users], block_len, cols, screened))
        start += users

    screener = None
    for block, block_len, cols, screened in plans:
        hist, lens = history[block, :block_len], lengths[block]
        if not screened:
            out_scores[block], out_positions[block] = _exact_block(table, unit_cands[block], hist, lens, k, cols)
            continue
        if screener is None:
            screener = _Screener(
                table,
                max(len(u) * c for u, _, c, on in plans if on),
                max(len(u) * n_cands * c for u, _, c, on in plans if on),
            )
        scores, positions, complete = screener.select(unit_cands[block], hist, lens, k, keep, cols)
        out_scores[block], out_positions[block] = scores, positions
        for b in (~complete).any(1).nonzero().flatten().tolist():
            user = int(block[b])
            screener.widen(
                unit_cands[user], history[user, : lengths[user]], (~complete[b]).nonzero().flatten(),
                k, keep * KEEP_GROWTH, cols, out_scores[user], out_positions[user],
            )
    return out_scores, out_positions


def _exact_block(
    table: torch.Tensor, unit_cands: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, k: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a block, on packed (score, position) keys.

    The score of a behaviour must not depend on where it sits, or duplicates of one item could
    differ in the last bit and break the tie toward the wrong one; a BLAS matmul does not promise
    that across shapes (we saw it between chunks of 64 and 9 rows). So with many candidates a
    block that fits in one chunk is scored by one matmul over the distinct items of each user,
    mapped back to positions; otherwise (few candidates, long blocks, the rare fallback of
    `_Screener.widen`) by a row-wise product and sum, in chunks.

    Args: unit_cands [Bb, C, D] float32; history [Bb, Lb]; lengths [Bb].
    Returns: scores float32 [Bb, C, k], positions int64 [Bb, C, k].
    """
    n_users, block_len = history.shape
    n_cands = unit_cands.shape[1]
    position = torch.arange(block_len)
    valid = (history != 0) & (position < lengths.unsqueeze(1))
    if n_cands >= BF16_MIN_CANDIDATES and block_len <= cols:
        distinct, index = _distinct_rows(history)  # [Bb, U], [Bb, Lb]
        rows = _unit(table[distinct].float())
        valid &= rows.ne(0).any(-1).gather(1, index)
        by_item = torch.bmm(unit_cands, rows.transpose(1, 2))  # [Bb, C, U]
        scores = by_item.gather(2, index.unsqueeze(1).expand(n_users, n_cands, block_len))
        best = _top_keys(scores.masked_fill_(~valid.unsqueeze(1), float("-inf")), 0, k)
    else:
        best = None
        step = max(1, min(cols, ROW_BUDGET // (n_users * n_cands * table.shape[1])))
        for c0 in range(0, block_len, step):
            rows = _unit(table[history[:, c0 : c0 + step]].float())  # [Bb, n, D]
            ok = valid[:, c0 : c0 + step] & rows.ne(0).any(-1)
            scores = (rows.unsqueeze(1) * unit_cands.unsqueeze(2)).sum(-1)  # [Bb, C, n]
            keys = _top_keys(scores.masked_fill_(~ok.unsqueeze(1), float("-inf")), c0, k)
            best = keys if best is None else torch.cat([best, keys], dim=-1).topk(k, dim=-1).values
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


def _exact_scores(table: torch.Tensor, unit_cands: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cosines of candidates [Bb, C, D] with their own items ids [Bb, C, m] -> [Bb, C, m].

    Each distinct item among a group of candidates' survivors is gathered and normalised once.
    Where the survivors of different candidates overlap a lot, one matmul against the distinct
    items is cheapest; otherwise a row-wise product and sum over the gathered unit rows. Either way
    every item's score is computed once per candidate, from the same bits, so duplicates of one
    item tie exactly (see `_exact_block`). Also returns eligible [Bb, C, m]: id and row non-zero.
    """
    n_users, n_cands, m = ids.shape
    exact = torch.empty(ids.shape, dtype=torch.float32)
    eligible = torch.empty(ids.shape, dtype=torch.bool)
    step = max(1, min(ROW_BUDGET // (n_users * m * table.shape[1]), math.isqrt(SCORE_BUDGET // (n_users * m))))
    for c0 in range(0, n_cands, step):
        sub = ids[:, c0 : c0 + step]
        cands = unit_cands[:, c0 : c0 + step]
        distinct, index = _distinct_rows(sub.reshape(n_users, -1))
        rows = _unit(table[distinct].float())  # [Bb, U, D]
        if distinct.shape[1] <= MATMUL_MAX_DISTINCT_PER_KEPT * m:
            by_item = torch.bmm(cands, rows.transpose(1, 2))  # [Bb, c, U]
            exact[:, c0 : c0 + step] = by_item.gather(2, index.view_as(sub))
        else:
            flat = (index + distinct.shape[1] * torch.arange(n_users).unsqueeze(1)).flatten()
            picked = rows.flatten(0, 1).index_select(0, flat)  # [Bb * c * m, D]
            exact[:, c0 : c0 + step] = (picked.view(*sub.shape, -1) * cands.unsqueeze(2)).sum(-1)
        eligible[:, c0 : c0 + step] = (distinct != 0).logical_and_(rows.ne(0).any(-1)).gather(1, index).view_as(sub)
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


def _screen_copy(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(unit rows of `table` in bfloat16 [N+1, D], nonzero BoolTensor [N+1]), or None if too large.

    Built once and kept for the last table seen, while that very tensor is unmodified (identity
    and version counter): re-normalising the gathered rows on every call costs several passes
    over them (torch's mixed-dtype kernels are slow), more than the matmul itself. Tables above
    SCREEN_COPY_MAX_ELEMENTS are normalised chunk by chunk instead.
    """
    if table.numel() > SCREEN_COPY_MAX_ELEMENTS:
        return None
    try:
        version = table._version
    except RuntimeError:  # inference-mode tensors carry no version counter
        return None
    if _SCREEN_COPY and _SCREEN_COPY[0]() is table and _SCREEN_COPY[1] == version:
        return _SCREEN_COPY[2], _SCREEN_COPY[3]
    copy = torch.empty(table.shape, dtype=torch.bfloat16)
    nonzero = torch.empty(table.shape[0], dtype=torch.bool)
    step = max(1, ROW_BUDGET // max(1, table.shape[1]))
    for r0 in range(0, table.shape[0], step):
        rows = table[r0 : r0 + step].float()
        norms = torch.linalg.vector_norm(rows, dim=1)
        nonzero[r0 : r0 + step] = norms > 0
        copy[r0 : r0 + step] = rows * norms.clamp_min(_TINY).reciprocal().unsqueeze(1)
    _SCREEN_COPY[:] = [weakref.ref(table, _forget_screen_copy), version, copy, nonzero]
    return copy, nonzero


def _forget_screen_copy(dead: weakref.ref) -> None:
    """Frees the copy together with its table (unless a newer table's copy replaced it already)."""
    if _SCREEN_COPY and _SCREEN_COPY[0] is dead:
        _SCREEN_COPY.clear()


class _Screener:
    """The screened strategy for one call: the table, its bf16 source and reused chunk buffers."""

    def __init__(self, table: torch.Tensor, n_rows: int, n_scores: int):
        self.table = table
        self.bound = screen_error_bound(table.shape[1])
        self.prepared = _screen_copy(table)
        dim = table.shape[1]
        self.screen_rows = torch.empty(n_rows, dim, dtype=torch.bfloat16)
        self.scores = torch.empty(n_scores, dtype=torch.bfloat16)
        if self.prepared is None:  # staging buffers for per-chunk normalisation
            self.rows = torch.empty(n_rows, dim)
            self.stored = torch.empty(n_rows, dim, dtype=table.dtype) if table.dtype != torch.float32 else None

    def select(
        self, unit_cands: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, k: int, keep: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Screen, re-score and select for one block of users.

        Args: unit_cands [Bb, C, D] float32; history [Bb, Lb]; lengths [Bb].
        Returns: scores float32 [Bb, C, k], positions int64 [Bb, C, k], and complete BoolTensor
        [Bb, C]: True where the result is proven to be the exact top-k.
        """
        table = self.table
        approx, positions, n_valid, trusted = self._screen(unit_cands, history, lengths, keep, cols)
        kept = approx.shape[-1]

        ids = history.gather(1, positions.flatten(1)).view_as(positions)  # [Bb, C, kept]
        exact, eligible = _exact_scores(table, unit_cands, ids)
        eligible &= positions < lengths.view(-1, 1, 1)

        # Every eligible behaviour left out scores at most the lowest survivor's approximate
        # score, ineligible survivors included (the module docstring has the argument).
        complete = eligible.sum(-1) == n_valid.unsqueeze(1)
        if kept > k:
            absolute, relative = self.bound
            approx = approx.float()
            kth = approx.masked_fill(~eligible, float("-inf")).topk(k, dim=-1).values[..., -1]
            last = approx.amin(-1)
            complete |= last + absolute + relative * last.abs() < kth - absolute - relative * kth.abs()
        complete &= trusted

        exact.masked_fill_(~eligible, float("-inf"))
        scores, top_positions = unpack_keys(pack_keys(exact, positions).topk(min(k, kept), dim=-1).values)
        missing = k - scores.shape[-1]
        scores = torch.nn.functional.pad(scores, (0, missing), value=float("-inf"))
        top_positions = torch.nn.functional.pad(top_positions, (0, missing), value=-1)
        return scores, top_positions, complete

    def widen(
        self,
        unit_cands: torch.Tensor,
        history: torch.Tensor,
        cand_index: torch.Tensor,
        k: int,
        keep: int,
        cols: int,
        out_scores: torch.Tensor,
        out_positions: torch.Tensor,
    ) -> None:
        """Redo one user's unproven candidates with ever more survivors until each is proven.

        Args: unit_cands [C, D]; history [n] (the user's prefix); cand_index [C'] candidates to
        redo; out_scores / out_positions [C, k], written in place. Once `keep` covers the whole
        history every behaviour survives, which is a proof; past MAX_KEEP the exact strategy is
        cheaper than re-scoring that many survivors.
        """
        lengths = torch.tensor([history.shape[0]])
        while cand_index.numel():
            cands = unit_cands[cand_index].unsqueeze(0)
            if keep > MAX_KEEP:
                scores, positions = _exact_block(self.table, cands, history.unsqueeze(0), lengths, k, cols)
                out_scores[cand_index], out_positions[cand_index] = scores[0], positions[0]
                return
            scores, positions, complete = self.select(cands, history.unsqueeze(0), lengths, k, keep, cols)
            done = cand_index[complete[0]]
            out_scores[done] = scores[0, complete[0]]
            out_positions[done] = positions[0, complete[0]]
            cand_index = cand_index[~complete[0]]
            keep *= KEEP_GROWTH

    def _screen(
        self, unit_cands: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, keep: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Approximate top-`keep` of one block.

        Args: unit_cands [Bb, C, D] float32; history [Bb, Lb]; lengths [Bb].
        Returns: approximate scores [Bb, C, kept] (bfloat16), their positions [Bb, C, kept] int64,
        eligible behaviours per user [Bb], trusted [Bb, C] (False where the grouped selection
        could not guarantee its result).
        """
        n_users, block_len = history.shape
        n_cands, dim = unit_cands.shape[1], unit_cands.shape[2]
        cands = unit_cands.transpose(1, 2).to(torch.bfloat16).contiguous()  # [Bb, D, C]
        n_valid = torch.zeros(n_users, dtype=torch.int64)
        trusted = torch.ones(n_users, n_cands, dtype=torch.bool)
        chunk_scores, chunk_positions = [], []
        for c0 in range(0, block_len, cols):
            ids = history[:, c0 : c0 + cols]  # [Bb, n]
            n = ids.shape[1]
            valid = (ids != 0) & (torch.arange(c0, c0 + n) < lengths.unsqueeze(1))
            screen_rows = self.screen_rows[: n_users * n]
            if self.prepared is not None:
                torch.index_select(self.prepared[0], 0, ids.reshape(-1), out=screen_rows)
                valid &= self.prepared[1][ids]
            else:
                valid &= self._normalise_rows(ids.reshape(-1)).view(n_users, n)
            n_valid += valid.sum(1)
            scores = self.scores[: n_users * n * n_cands].view(n_users, n, n_cands)
            torch.bmm(screen_rows.view(n_users, n, dim), cands, out=scores)
            top_scores, top_positions, sure = _chunk_topk(scores, keep)
            trusted &= sure
            chunk_scores.append(top_scores)
            chunk_positions.append(top_positions + c0)
        if len(chunk_scores) == 1:
            return chunk_scores[0], chunk_positions[0], n_valid, trusted
        # One merge at the end: [Bb, C, chunks * keep] is small next to any score chunk.
        merged_scores = torch.cat(chunk_scores, dim=-1)
        top = merged_scores.topk(min(keep, merged_scores.shape[-1]), dim=-1, sorted=False)
        return top.values, torch.cat(chunk_positions, dim=-1).gather(-1, top.indices), n_valid, trusted

    def _normalise_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Gathers rows `ids` [m] into screen_rows as bf16 unit vectors; returns nonzero [m].

        Every step is a same-dtype float32 pass: torch's mixed-dtype kernels (fp16 * fp32 -> bf16,
        or the norm of fp16 rows) are several times slower than converting once.
        """
        m = ids.shape[0]
        rows = self.rows[:m]
        if self.stored is None:
            torch.index_select(self.table, 0, ids, out=rows)
        else:
            torch.index_select(self.table, 0, ids, out=self.stored[:m])
            rows.copy_(self.stored[:m])
        norms = torch.linalg.vector_norm(rows, dim=1)
        rows.mul_(norms.clamp_min(_TINY).reciprocal().unsqueeze(1))
        self.screen_rows[:m].copy_(rows)
        return norms > 0


def _chunk_topk(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`keep` of bf16 scores [Bb, n, C] along n: values, row indices [Bb, C, kept]; trusted [Bb, C]."""
    n_users, n, n_cands = scores.shape
    keep = min(keep, n)
    groups = 1 << max(2, round(math.log2(max(1.0, math.sqrt(n / keep)))))
    width = n // groups
    if n % groups or n < GROUPED_MIN_ROWS_PER_KEPT * keep or width < keep:
        top = scores.topk(keep, dim=1, sorted=False)
        trusted = torch.ones(n_users, n_cands, dtype=torch.bool)
        return top.values.transpose(1, 2), top.indices.transpose(1, 2), trusted
    # Group j holds rows j, j + width, j + 2*width, ...: the max over the group axis is an
    # elementwise max of `groups` contiguous slabs.
    group_max = scores.view(torch.int16).view(n_users, groups, width, n_cands).amax(dim=1)
    top_groups = group_max.transpose(1, 2).contiguous().topk(keep, dim=-1, sorted=False)  # [Bb, C, keep]
    trusted = top_groups.values.amin(-1) > 0  # positive bf16 bits order like the floats
    members = (top_groups.indices.unsqueeze(-1) + width * torch.arange(groups)).flatten(2)  # rows
    flat = members * n_cands + torch.arange(n_cands).view(1, -1, 1)
    member_scores = scores.view(n_users, -1).gather(1, flat.view(n_users, -1)).view_as(members)
    top = member_scores.topk(keep, dim=-1, sorted=False)
    return top.values, members.gather(-1, top.indices), trusted
