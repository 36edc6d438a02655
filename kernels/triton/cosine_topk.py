"""Fused cosine top-K in Triton: gather, score and select in one pass; scores never hit memory.

Design (written for an H100; correctness is tested here under TRITON_INTERPRET=1)
-------------------------------------------------------------------------------
Grid: (B users, ceil(C / BLOCK_C) candidate tiles, S history splits), candidate tiles fastest, so
the programs of one user run side by side and share its history through L2 (50 MB holds a
100K x 128 fp16 history, 25.6 MB). With few users (one ranking request: B = 1, C = 100 is two
candidate tiles) the users x tiles alone would leave most of the GPU's SMs idle and walk 100K
rows in one program, so each user's history is split into S ranges of whole tiles
(`history_splits`: about 4 programs per SM, ranges of at least MIN_SPLIT_ROWS rows), each range's
top K_PAD keys are written apart, and one torch top-k over the S x K_PAD keys of a (user,
candidate) merges them: keys carry their absolute positions, so the merge is exact.

Each program:
  1. loads its BLOCK_C candidate rows once (ids -> rows, any storage dtype -> fp32), normalises;
  2. walks its range of the history in tiles of BLOCK_L: loads BLOCK_L ids, gathers their rows
     [BLOCK_L, D], normalises them, scores the tile against all BLOCK_C candidates with one tl.dot
     ([BLOCK_C, D] x [D, BLOCK_L], fp32 accumulation), masks padding / id 0 / zero rows to -inf;
  3. keeps a running top-K per candidate row as int64 keys [BLOCK_C, K_PAD]:
     key = (order-preserving int32 of the score) << 32 | position, so "larger key" is "higher
     score, then more recent" and positions ride along with the values (tl.topk and tl.sort
     return values only). A tile is merged only if one of its keys beats some row's current
     K-th key (after the first tiles most tiles are skipped); merging = tl.topk of the tile to
     K_PAD (bitonic), then the two sorted lists are combined with the bitonic split
     max(best[i], tile_reversed[i]) (exactly the top K_PAD of the union, as a bitonic sequence)
     and one tl.bitonic_merge restores descending order: log2(K_PAD) compare-swap stages.
  4. writes the K_PAD keys of each candidate for its range; the host merges the ranges (S > 1),
     decodes (score, position) and trims to K.

Tile sizes on H100: BLOCK_C = 64, BLOCK_L = 128, D = 128 (BLOCK_D = D padded to a power of two
>= 16), K_PAD = 64 for K = 50. Registers: the score tile 64 x 128 fp32 (32 KB) and two int64 key
tiles dominate; 4 warps. The gather is row-wise (D contiguous elements per id), so each row is
one 256-byte coalesced load in fp16.

Bytes moved per user (L = 100K, C = 1000, D = 128, fp16 table): history ids 0.8 MB + rows
25.6 MB from HBM once (re-read by the C / BLOCK_C = 16 candidate tiles from L2), candidates
0.26 MB, output keys C x K_PAD x 8 = 0.5 MB: ~27 MB of HBM traffic, about 10 us at 3 TB/s.
Split in S ranges (S = 33 for one user at C = 1,000 on 132 SMs: 528 programs instead of 16), the
ranges' keys add C x S x K_PAD x 8 bytes written and read back by the merge (17 MB there, 5 MB
at C = 100 with S = 97): a few us, next to the compute.
FLOPs: 2 C L D = 25.6 GFLOP; with input_precision="ieee" (exact fp32 FMA, no tensor cores,
~60 TFLOP/s) about 0.4 ms, so at C ~ 1000 the kernel is compute bound and the knob is a
bf16/tf32 tensor-core dot (10x faster) followed by the CPU path's proven-margin exact re-score;
at C = 1 to 100 it is latency/merge bound, dominated by the bitonic merges of the tiles that
improve the running top-K (K ln(L / K) expected improving tiles per candidate row).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._keys import unpack_keys

__all__ = ["cosine_topk_triton", "history_splits"]

# A history range is at least this many rows: its K_PAD keys, written and merged, stay small next
# to the range's gather and products, and its running top-K has rows enough to settle.
MIN_SPLIT_ROWS = 1_024
# Programs wanted per SM: enough resident warps to hide the gathers' latency.
PROGRAMS_PER_SM = 4


def history_splits(batch: int, cand_tiles: int, length: int, block_l: int, sms: int) -> int:
    """Ranges S each user's history is split into: enough programs (batch x cand_tiles x S) to give
    every one of `sms` SMs PROGRAMS_PER_SM of them, while each range keeps at least MIN_SPLIT_ROWS
    rows (rounded up to whole tiles of `block_l`); 1 where users and candidate tiles already fill
    the GPU or the history is short. `sms` 0 (no GPU: the interpreter): 1."""
    if sms <= 0 or batch * cand_tiles <= 0:
        return 1
    wanted = math.ceil(PROGRAMS_PER_SM * sms / (batch * cand_tiles))
    min_tiles = max(1, math.ceil(MIN_SPLIT_ROWS / block_l))
    most = max(1, math.ceil(length / block_l) // min_tiles)
    return max(1, min(wanted, most))


@triton.jit
def _pack(scores, positions):
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | positions.to(tl.int64)


@triton.jit
def _cosine_topk_kernel(
    table_ptr, cand_ptr, hist_ptr, len_ptr, out_ptr,
    n_cands, cand_stride, hist_stride, split_len, n_splits,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    K_PAD: tl.constexpr,
):
    user = tl.program_id(0)
    split = tl.program_id(2)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = offs_c < n_cands
    d_ok = offs_d < D

    cand_ids = tl.load(cand_ptr + user * cand_stride + offs_c, mask=c_ok, other=0).to(tl.int64)
    cands = tl.load(
        table_ptr + cand_ids[:, None] * D + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0
    ).to(tl.float32)
    cand_norm = tl.sqrt(tl.sum(cands * cands, axis=1))
    cands = cands / tl.maximum(cand_norm, 1e-30)[:, None]

    length = tl.load(len_ptr + user)
    first = split * split_len
    end = tl.minimum(length, first + split_len)
    neg_inf = tl.full([BLOCK_C, K_PAD], float("-inf"), tl.float32)
    best = _pack(neg_inf, tl.zeros([BLOCK_C, K_PAD], tl.int64))  # sorted descending
    for start in range(first, end, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < end
        ids = tl.load(hist_ptr + user * hist_stride + offs_l, mask=l_ok, other=0).to(tl.int64)
        rows = tl.load(
            table_ptr + ids[:, None] * D + offs_d[None, :], mask=l_ok[:, None] & d_ok[None, :], other=0
        ).to(tl.float32)  # fp32 before tl.dot: bf16 dots are wrong under the interpreter
        row_norm = tl.sqrt(tl.sum(rows * rows, axis=1))
        valid = l_ok & (ids != 0) & (row_norm > 0)
        rows = rows / tl.maximum(row_norm, 1e-30)[:, None]
        scores = tl.dot(cands, tl.trans(rows), input_precision="ieee")  # [BLOCK_C, BLOCK_L]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        keys = _pack(scores, offs_l[None, :] + tl.zeros([BLOCK_C, BLOCK_L], tl.int64))
        kth = tl.min(best, axis=1)
        if tl.max(tl.where(keys > kth[:, None], 1, 0)) > 0:
            tile_best = tl.topk(keys, K_PAD, dim=1)
            best = tl.bitonic_merge(tl.maximum(best, tl.flip(tile_best, 1)), 1, True)
    out = out_ptr + ((user * n_cands + offs_c) * n_splits + split)[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
    tl.store(out, best, mask=c_ok[:, None])


def _tile_sizes(n_cands: int, length: int, k: int, block_c: int, block_l: int) -> tuple[int, int]:
    """BLOCK_C and BLOCK_L shrunk to fit small inputs (powers of two, at least 16 and K_PAD rows)."""
    block_c = max(16, min(block_c, triton.next_power_of_2(max(n_cands, 1))))
    block_l = max(16, triton.next_power_of_2(k), min(block_l, triton.next_power_of_2(max(length, 1))))
    return block_c, block_l


def launch_splits(
    table: torch.Tensor, batch: int, n_cands: int, length: int, k: int, *, block_c: int = 64, block_l: int = 128,
    splits: int | None = None,
) -> int:
    """The history ranges per user a call of `cosine_topk_triton` with these sizes launches:
    `splits` (None: `history_splits` for the table's GPU), at most the history's tiles, and no
    range left empty by rounding ranges to whole tiles."""
    return _ranges(table, batch, n_cands, length, k, block_c, block_l, splits)[0]


def _ranges(
    table: torch.Tensor, batch: int, n_cands: int, length: int, k: int, block_c: int, block_l: int, splits: int | None
) -> tuple[int, int]:
    """(ranges per user, rows per range: whole tiles) for `launch_splits`."""
    if splits is not None and splits < 1:
        raise ValueError(f"cosine_topk_triton: `splits` must be >= 1, got {splits}")
    block_c, block_l = _tile_sizes(n_cands, length, k, block_c, block_l)
    tiles = max(1, triton.cdiv(length, block_l))
    if splits is None:
        sms = torch.cuda.get_device_properties(table.device).multi_processor_count if table.is_cuda else 0
        splits = history_splits(batch, triton.cdiv(n_cands, block_c), length, block_l, sms)
    per_range = triton.cdiv(tiles, min(splits, tiles))
    return triton.cdiv(tiles, per_range), per_range * block_l


@torch.no_grad()
def cosine_topk_triton(
    table: torch.Tensor,
    candidates: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    k: int = 50,
    *,
    block_c: int = 64,
    block_l: int = 128,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.cosine_topk` (padded history). Tiles shrink to fit small inputs.

    splits: history ranges per user (None: `history_splits` for this GPU's SM count; 1 on the
    interpreter); each is at most the history's tiles.

    Returns scores float32 [B, C, k], positions int64 [B, C, k] (-inf / -1 beyond the eligible).
    """
    batch, n_cands = candidates.shape
    dim, length = table.shape[1], history.shape[1]
    k_pad = triton.next_power_of_2(k)
    block_c, block_l = _tile_sizes(n_cands, length, k, block_c, block_l)
    cand_tiles = triton.cdiv(n_cands, block_c)
    splits, split_len = _ranges(table, batch, n_cands, length, k, block_c, block_l, splits)
    keys = torch.empty(batch, n_cands, splits, k_pad, dtype=torch.int64, device=table.device)
    if batch and n_cands:
        _cosine_topk_kernel[(batch, cand_tiles, splits)](
            table.contiguous(), candidates.contiguous(), history.contiguous(),
            lengths.to(torch.int64).contiguous(), keys,
            n_cands, n_cands, length, split_len, splits,
            D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_C=block_c, BLOCK_L=block_l,
            K_PAD=k_pad,
        )
    if splits == 1:
        best = keys[:, :, 0, :k]  # each range's keys are sorted descending
    else:
        best = keys.view(batch, n_cands, splits * k_pad).topk(k, dim=-1).values
    return unpack_keys(best)
