"""CPU fast path of cosine top-K: screen in low precision, re-score the survivors exactly.

Strategy (details and measurements in docs/gsu.md):

1. Users are processed in blocks of similar length (sorted by length, longest first), and each
   block's histories in chunks of columns, so the gathered rows [Bb, n, D] and the score chunk
   [Bb, C, n] stay within fixed element budgets whatever L, C and B are. Each history chunk is
   gathered and normalised once and scored against all C candidates with one batched matmul.
   All chunk buffers are allocated once per call and reused (fresh large allocations cost a page
   fault per 4 KiB on every chunk).
2. Screening: the matmul runs in bfloat16 when C is large enough for it to dominate (bf16 is
   several times faster than fp32 on AVX512-BF16 CPUs), in float32 otherwise. Selection inside a
   long chunk is two-level: the chunk's columns are split into g strided groups, the maximum of each
   group is taken on the bf16 bits read as int16 (same order as the floats for positive values; a
   native integer max, ~10x faster than a bf16 reduction), the best `keep` groups per candidate are
   kept and only their members go through `torch.topk`. The top `keep` items lie in the top `keep`
   groups, so nothing is lost; rows whose `keep`-th group maximum is not positive (where the int16
   order is not the float order) are marked for the exact fallback. Short chunks use `torch.topk`
   directly. Either way, each chunk's `keep = k + margin` best are merged into a running set.
3. Exact re-scoring: the survivors' rows are gathered again and scored in float32; the final
   top-k is taken on int64 keys that pack (score, position), so ties go to the more recent
   behaviour exactly as in the reference.
4. Completeness is proven, not hoped for: every approximate score a is within
   eps(a) = absolute + relative * |a| of the exact one (a rounding-error bound,
   `screen_error_bound`), so the exact top-k lies inside the screened set whenever every eligible
   behaviour survived, or the set's lowest approximate score plus its eps is below the k-th
   eligible one minus its eps. Candidates where neither holds (many near-ties at the boundary)
   are screened again with KEEP_GROWTH times more survivors until it holds (it must once every
   behaviour survives); past MAX_KEEP survivors an exact scan of the history takes over.

Ineligible behaviours (padding, id 0, zero rows) are scored as zero vectors during the screen (no
masking pass over the scores) and dropped at re-scoring; the completeness test counts eligible
survivors only, so they can take a screen slot but never the place of an eligible behaviour.

Hence the result equals an exact float32 evaluation; it differs from `kernels.reference` only by
float32 rounding (different summation order), i.e. positions can swap only between behaviours
whose cosines agree to ~1e-6. torch's intra-op threads (torch.set_num_threads) parallelise the
matmuls, gathers and reductions; the Python loop over chunks is serial.
"""
from __future__ import annotations

import math
import weakref

import torch

from kernels._keys import pack_keys, unpack_keys

__all__ = ["cosine_topk_cpu", "screen_error_bound"]

# Element budgets that bound memory whatever the input size: the score chunk [Bb, C, n] and the
# gathered rows [Bb, n, D]. 8M bf16 scores (16 MiB) let C = 1,000 still use chunks of 8,192
# columns, long enough for the grouped selection.
SCORE_BUDGET = 1 << 23
ROW_BUDGET = 1 << 22
# Below this many candidates the matmul is cheap next to gathering and top-k: screen in float32.
BF16_MIN_CANDIDATES = 8
# When a screen cannot prove its survivors complete, it is redone for those candidates with
# KEEP_GROWTH times more survivors; beyond MAX_KEEP an exact scan per candidate takes over.
KEEP_GROWTH = 4
MAX_KEEP = 4096
# Tables up to this many elements get a normalised bfloat16 copy for screening (see _screen_copy).
SCREEN_COPY_MAX_ELEMENTS = 1 << 28
_SCREEN_COPY: list = []  # [weakref to the table, its version, bf16 unit rows, nonzero rows]
# The grouped selection pays off once a chunk has this many columns per kept item.
GROUPED_MIN_COLUMNS_PER_KEPT = 32
_TINY = torch.finfo(torch.float32).tiny


def screen_error_bound(screen_dtype: torch.dtype, dim: int) -> tuple[float, float]:
    """(absolute, relative): |approximate - exact cosine| <= absolute + relative * |approximate|.

    For unit vectors x, y of `dim` scored in bfloat16 (unit roundoff u = 2**-8) with float32
    accumulation and a bfloat16 result: rounding both operands moves each product by at most
    (2u + u^2)|x_i y_i|, i.e. the sum by (2u + u^2) * sum|x_i y_i| <= 2u + u^2 (Cauchy-Schwarz);
    the float32 accumulation adds at most dim * 2**-24 (1 + u)^2; rounding the result adds
    u * |result| <= u / (1 - u) * |approximate|. In float32 the screening matmul and the exact
    re-scoring are two float32 evaluations of the same cosine: each within (dim + 2) * 2**-24.
    A 1% slack covers the norms of the rounded unit vectors (1 +- 2**-24 * dim).
    """
    accumulation = dim * 2.0**-24
    if screen_dtype == torch.bfloat16:
        u = 2.0**-8
        return 1.01 * (2 * u + u * u + accumulation * (1 + u) ** 2), 1.01 * u / (1 - u)
    if screen_dtype == torch.float32:
        return 1.01 * 2 * (accumulation + 2 * 2.0**-24), 0.0
    raise ValueError(f"screen_dtype must be torch.bfloat16 or torch.float32, got {screen_dtype}")


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows [..., D] divided by their norm (zero rows stay zero)."""
    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return rows / norms.clamp_min(_TINY)


def _exact_scores(rows: torch.Tensor, unit_cands: torch.Tensor) -> torch.Tensor:
    """Float32 cosine of `rows` [..., m, D] with `unit_cands` [..., 1, D] -> [..., m].

    The one definition of an exact score on this path, used for re-scoring and for the fallback,
    so both give bit-identical scores to identical rows (and ties break by position alone).
    """
    return (_unit(rows.float()) * unit_cands).sum(-1)


class _Buffers:
    """Chunk buffers reused across the chunks and blocks of one call (flat, viewed per chunk)."""

    def __init__(self, table: torch.Tensor, screen_dtype: torch.dtype, n_rows: int, n_scores: int):
        dim = table.shape[1]
        self.stored = torch.empty(n_rows, dim, dtype=table.dtype) if table.dtype != torch.float32 else None
        self.rows = torch.empty(n_rows, dim)
        self.screen_rows = torch.empty(n_rows, dim, dtype=screen_dtype) if screen_dtype != torch.float32 else self.rows
        self.scores = torch.empty(n_scores, dtype=screen_dtype)


def _screen_copy(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(unit rows of `table` in bfloat16 [N+1, D], nonzero BoolTensor [N+1]), or None if too large.

    Built once and kept for the last table seen, while that very tensor is unmodified (identity
    and version counter): re-normalising the gathered rows of every call costs several passes
    over them, more than the matmul. Tables above SCREEN_COPY_MAX_ELEMENTS are prepared per chunk.
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


@torch.no_grad()
def cosine_topk_cpu(
    table: torch.Tensor,
    candidates: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    k: int = 50,
    *,
    screen_dtype: torch.dtype | None = None,
    margin: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K history positions by cosine to each candidate (same contract as `kernels.cosine_topk`).

    Args:
        table: [N+1, D] embeddings (float32 / float16 / bfloat16 / int8).
        candidates: [B, C] item ids.
        history: [B, L] item ids, chronological, left-aligned, 0 = padding.
        lengths: [B] behaviours per row.
        k: positions kept per (user, candidate).
        screen_dtype: precision of the screening matmul; default bfloat16 when C >= 8, else float32.
        margin: extra survivors kept by the first screen; default 2k for bfloat16, 8 for float32.

    Returns:
        scores float32 [B, C, k], positions int64 [B, C, k] (-inf / -1 beyond the valid behaviours).
    """
    batch, length = history.shape
    n_cands = candidates.shape[1]
    dim = table.shape[1]
    if screen_dtype is None:
        screen_dtype = torch.bfloat16 if n_cands >= BF16_MIN_CANDIDATES else torch.float32
    bound = screen_error_bound(screen_dtype, dim)
    if margin is None:
        margin = 2 * k if screen_dtype == torch.bfloat16 else 8
    keep = k + margin

    out_scores = torch.full((batch, n_cands, k), float("-inf"))
    out_positions = torch.full((batch, n_cands, k), -1, dtype=torch.int64)
    if batch == 0 or n_cands == 0 or length == 0:
        return out_scores, out_positions

    lengths = lengths.clamp(0, length)
    unit_cands = _unit(table[candidates].float())  # [B, C, D]
    order = torch.argsort(lengths, descending=True)
    sorted_lengths = lengths[order].tolist()

    plans = []  # (block users, block length, chunk columns)
    start = 0
    while start < batch and sorted_lengths[start] > 0:
        block_len = sorted_lengths[start]
        cols = min(block_len, max(keep, min(SCORE_BUDGET // n_cands, ROW_BUDGET // dim)))
        users = max(1, min(SCORE_BUDGET // (n_cands * cols), ROW_BUDGET // (dim * cols)))
        plans.append((order[start : start + users], block_len, cols))
        start += users
    if not plans:
        return out_scores, out_positions
    buffers = _Buffers(
        table,
        screen_dtype,
        max(len(users) * cols for users, _, cols in plans),
        max(len(users) * n_cands * cols for users, _, cols in plans),
    )
    for block, block_len, cols in plans:
        scores, positions, complete = _select(
            table, unit_cands[block], history[block, :block_len], lengths[block], k, keep, cols, bound, buffers
        )
        out_scores[block] = scores
        out_positions[block] = positions
        for b in (~complete).any(1).nonzero().flatten().tolist():
            user = int(block[b])
            _widen(
                table, unit_cands[user], history[user, : lengths[user]], (~complete[b]).nonzero().flatten(),
                k, keep * KEEP_GROWTH, cols, bound, buffers, out_scores[user], out_positions[user],
            )
    return out_scores, out_positions


def _select(
    table: torch.Tensor,
    unit_cands: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    keep: int,
    cols: int,
    bound: tuple[float, float],
    buffers: _Buffers,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Screen, re-score and select for one block of users.

    Args: unit_cands [Bb, C, D] float32; history [Bb, Lb]; lengths [Bb].
    Returns: scores float32 [Bb, C, k], positions int64 [Bb, C, k], and complete BoolTensor
    [Bb, C]: True where the result is proven to be the exact top-k.
    """
    approx, positions, n_valid, trusted = _screen(table, unit_cands, history, lengths, keep, cols, buffers)
    kept = approx.shape[-1]

    ids = history.gather(1, positions.flatten(1)).view_as(positions)  # [Bb, C, kept]
    exact = torch.empty(approx.shape, dtype=torch.float32)
    eligible = torch.empty(approx.shape, dtype=torch.bool)
    step = max(1, ROW_BUDGET // (ids.shape[0] * kept * table.shape[1]))
    for c0 in range(0, ids.shape[1], step):
        rows = table[ids[:, c0 : c0 + step]]
        exact[:, c0 : c0 + step] = _exact_scores(rows, unit_cands[:, c0 : c0 + step].unsqueeze(2))
        eligible[:, c0 : c0 + step] = rows.ne(0).any(-1)
    eligible &= (ids != 0) & (positions < lengths.view(-1, 1, 1))

    # Completeness (see the module docstring): every eligible behaviour left out scores at most
    # the set's lowest approximate score, ineligible survivors included (they scored as zero).
    complete = eligible.sum(-1) == n_valid.unsqueeze(1)
    if kept > k:
        absolute, relative = bound
        approx = approx.float()
        kth = approx.masked_fill(~eligible, float("-inf")).topk(k, dim=-1).values[..., -1]
        last = approx.amin(-1)
        complete |= last + absolute + relative * last.abs() < kth - absolute - relative * kth.abs()
    complete &= trusted

    exact.masked_fill_(~eligible, float("-inf"))
    top_keys = pack_keys(exact, positions).topk(min(k, kept), dim=-1).values
    scores, top_positions = unpack_keys(top_keys)
    missing = k - scores.shape[-1]
    scores = torch.nn.functional.pad(scores, (0, missing), value=float("-inf"))
    top_positions = torch.nn.functional.pad(top_positions, (0, missing), value=-1)
    return scores, top_positions, complete


def _widen(
    table: torch.Tensor,
    unit_cands: torch.Tensor,
    history: torch.Tensor,
    cand_index: torch.Tensor,
    k: int,
    keep: int,
    cols: int,
    bound: tuple[float, float],
    buffers: _Buffers,
    out_scores: torch.Tensor,
    out_positions: torch.Tensor,
) -> None:
    """Redo one user's unproven candidates with ever more survivors until each result is proven.

    Args: unit_cands [C, D]; history [n] (the user's prefix); cand_index [C'] candidates to redo;
    out_scores / out_positions [C, k], written in place. Once `keep` covers the whole history every
    behaviour survives, which proves completeness; past MAX_KEEP an exact scan per candidate is
    cheaper than re-scoring that many survivors.
    """
    lengths = torch.tensor([history.shape[0]])
    while cand_index.numel():
        if keep > MAX_KEEP:
            for c in cand_index.tolist():
                out_scores[c], out_positions[c] = _exact_topk(table, history, unit_cands[c], k, cols)
            return
        scores, positions, complete = _select(
            table, unit_cands[cand_index].unsqueeze(0), history.unsqueeze(0), lengths, k, keep, cols, bound, buffers
        )
        done = cand_index[complete[0]]
        out_scores[done] = scores[0, complete[0]]
        out_positions[done] = positions[0, complete[0]]
        cand_index = cand_index[~complete[0]]
        keep *= KEEP_GROWTH


def _screen(
    table: torch.Tensor,
    unit_cands: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    keep: int,
    cols: int,
    buffers: _Buffers,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-`keep` of one block.

    Args: unit_cands [Bb, C, D] float32; history [Bb, Lb]; lengths [Bb].
    Returns: approximate scores [Bb, C, kept] (screen dtype), their positions [Bb, C, kept] int64,
    the number of eligible behaviours per user [Bb], and trusted [Bb, C] (False where the grouped
    selection could not guarantee its result).
    """
    n_users, block_len = history.shape
    n_cands, dim = unit_cands.shape[1], unit_cands.shape[2]
    screen_dtype = buffers.scores.dtype
    prepared = _screen_copy(table) if screen_dtype == torch.bfloat16 else None
    cands = unit_cands.transpose(1, 2).to(screen_dtype).contiguous()  # [Bb, D, C]
    n_valid = torch.zeros(n_users, dtype=torch.int64)
    trusted = torch.ones(n_users, n_cands, dtype=torch.bool)
    best_scores = best_positions = None
    for c0 in range(0, block_len, cols):
        ids = history[:, c0 : c0 + cols]  # [Bb, n]
        n = ids.shape[1]
        flat_ids = ids.reshape(-1)
        screen_rows = buffers.screen_rows[: n_users * n]
        valid = (ids != 0) & (torch.arange(c0, c0 + n) < lengths.unsqueeze(1))
        if prepared is not None:
            torch.index_select(prepared[0], 0, flat_ids, out=screen_rows)
            valid &= prepared[1][ids]
        else:
            valid &= _normalised_rows(table, flat_ids, buffers, n_users * n).view(n_users, n)
        n_valid += valid.sum(1)
        scores = buffers.scores[: n_users * n * n_cands].view(n_users, n, n_cands)
        torch.bmm(screen_rows.view(n_users, n, dim), cands, out=scores)
        top_scores, top_positions, sure = _chunk_topk(scores, keep)
        trusted &= sure
        top_positions += c0
        if best_scores is None:
            best_scores, best_positions = top_scores, top_positions
        else:
            merged_scores = torch.cat([best_scores, top_scores], dim=-1)
            merged_positions = torch.cat([best_positions, top_positions], dim=-1)
            top = merged_scores.topk(min(keep, merged_scores.shape[-1]), dim=-1, sorted=False)
            best_scores = top.values
            best_positions = merged_positions.gather(-1, top.indices)
    return best_scores, best_positions, n_valid, trusted


def _normalised_rows(table: torch.Tensor, ids: torch.Tensor, buffers: _Buffers, m: int) -> torch.Tensor:
    """Gathers rows `ids` [m] into buffers.screen_rows as unit vectors; returns nonzero [m].

    Every step is a same-dtype float32 pass: torch's mixed-dtype kernels (fp16 * fp32 -> bf16, or
    a norm of fp16 rows) are several times slower than converting once and working in float32.
    """
    rows = buffers.rows[:m]
    if buffers.stored is None:
        torch.index_select(table, 0, ids, out=rows)
    else:
        torch.index_select(table, 0, ids, out=buffers.stored[:m])
        rows.copy_(buffers.stored[:m])
    norms = torch.linalg.vector_norm(rows, dim=1)
    nonzero = norms > 0
    rows.mul_(norms.clamp_min(_TINY).reciprocal().unsqueeze(1))
    if buffers.screen_rows is not buffers.rows:
        buffers.screen_rows[:m].copy_(rows)
    return nonzero


def _chunk_topk(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`keep` of scores [Bb, n, C] along n: values and row indices [Bb, C, kept], trusted [Bb, C]."""
    n_users, n, n_cands = scores.shape
    keep = min(keep, n)
    groups = 1 << max(2, round(math.log2(max(1.0, math.sqrt(n / keep)))))
    width = n // groups
    if scores.dtype != torch.bfloat16 or n % groups or n < GROUPED_MIN_COLUMNS_PER_KEPT * keep or width < keep:
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


def _exact_topk(
    table: torch.Tensor, ids: torch.Tensor, unit_cand: torch.Tensor, k: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over one user's whole history for one candidate, in chunks of `cols`.

    Args: ids [n] (the user's valid prefix), unit_cand [D]. Returns scores [k], positions [k].
    """
    best = torch.empty(0, dtype=torch.int64)
    for c0 in range(0, ids.shape[0], cols):
        chunk = ids[c0 : c0 + cols]
        rows = table[chunk]
        scores = _exact_scores(rows, unit_cand)
        scores.masked_fill_((chunk == 0) | rows.eq(0).all(-1), float("-inf"))
        keys = torch.cat([best, pack_keys(scores, torch.arange(c0, c0 + chunk.shape[0]))])
        best = keys.topk(min(k, keys.shape[0])).values
    scores, positions = unpack_keys(best)
    missing = k - scores.shape[0]
    scores = torch.nn.functional.pad(scores, (0, missing), value=float("-inf"))
    positions = torch.nn.functional.pad(positions, (0, missing), value=-1)
    return scores, positions
