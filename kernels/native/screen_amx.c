/* Fused bf16 screen for cosine top-K on CPUs with AMX (Intel Sapphire Rapids and later).
 *
 * One pass over each history, in groups of 32 rows: the rows are gathered from the normalised
 * bf16 copy of the table (prefetched a few groups ahead: they are random 256-byte reads) and
 * transposed into the pair layout of the tile product, scored against every candidate with AMX
 * tile products (fp32 accumulation), and each candidate keeps the behaviours scoring above its
 * running threshold in a small buffer. When a buffer fills it is cut back to the behaviours within
 * a window (twice the screen's error) of its k-th best, `keep` at most, and the threshold rises
 * to the cut. Thresholds start at -inf, or, with many candidates, from a sample of the rows
 * (`start_from_samples`). The [L, C] score matrix never exists: a group's scores live in a few KiB
 * of tiles.
 *
 * Scores come out as tiles [16 candidates x 16 rows], so one vector holds a candidate's scores of
 * 16 rows: a single compare against its threshold, and a compress and store append the hits to
 * its buffer. (With rows x candidates tiles every hit was handled alone, which cost more than
 * the tile products; the transpose this layout needs is cheap next to that.)
 *
 * Invariant given to the caller: every eligible behaviour that is not returned scored at most
 * `bound[b, c]` in this screen (-inf when nothing was left out), every returned one at least
 * that. The caller re-scores survivors exactly and proves completeness with the screen's error
 * bound (kernels/cpu_topk.py).
 *
 * Layouts (row-major, contiguous):
 *   screen    uint16 (bf16 bits) [n_rows, dim], unit rows, zero rows for ineligible items, row 0
 *             among them (read in place of padding);
 *   history   int64 [n_users, hist_stride]; lengths int64 [n_users];
 *   cands     uint16 (bf16) [n_users, cand_pad, dim_pad] unit candidates, zero padded
 *             (cand_pad a multiple of 16, dim_pad = dim rounded up to 32);
 *   outputs   scores float [n_users, n_cands, keep], positions int64 [same] (-inf / -1 in unused
 *             slots, unordered), bound float [n_users, n_cands], n_valid int64 [n_users].
 *
 * The int8 screen (`int8`, AMX-INT8) is the same pass on rows of half the bytes: screen int8
 * [n_rows, 2 * dim] and cands int8 [n_users, cand_pad, 2 * dim_pad], both read as 16-bit pairs
 * (`dim` counts pairs), so the gather, the transposes (4-byte groups, the layout of both tile
 * products) and the tile loads are the bf16 screen's own; the products give exact int32 sums,
 * which a candidate's scale turns into its scores where they are read (`tile_scores`, and only the
 * maxima in `marks16`). Half the bytes and half the tile products: benchmarks/gsu_overlap.py
 * runs the pass without selection on one core in 1.51 against 3.78 ms (100K random rows, 128
 * candidates); its wider window costs more survivors (kernels/int8_screen.py, docs/gsu.md).
 */
#include <cpuid.h>
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "table_rows.h"

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#define GROUP_ROWS 32      /* two 16-row B tiles */
#define PREFETCH_GROUPS 3  /* rows are requested this many groups before they are scored */
#define SLACK 32           /* a buffer takes one group's hits past its cut point */

typedef struct __attribute__((aligned(64))) {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* 1 when AMX-BF16 can run in this process (CPU support and the kernel's permission). */
int muse_amx_available(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int avx512 = ((b >> 16) & 1) && ((b >> 30) & 1);  /* AVX512F, AVX512BW */
    int amx = ((d >> 24) & 1) && ((d >> 22) & 1);     /* AMX-TILE, AMX-BF16 */
    if (!avx512 || !amx) return 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    unsigned long permitted = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &permitted) != 0) return 0;
    return (int)((permitted >> XFEATURE_XTILEDATA) & 1);
}

/* 1 when the CPU also has AMX-INT8 (the int8 screen); call after muse_amx_available. */
int muse_amx_int8_available(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (int)((d >> 25) & 1);
}

typedef struct {
    const uint16_t *screen;  /* int8 screen: rows of 2 * dim int8 values, read as dim 16-bit pairs */
    int64_t n_rows, dim, dim_pad;
    int int8;                /* rows and candidates are int8 (AMX-INT8 products, int32 sums) */
    const float *cand_scale; /* int8: [n_users, cand_pad] a candidate's score per unit of int32 sum */
    /* int8 with candidates in two parts: hi codes in `cands`, lo codes (1/128 of a hi step) here,
     * same layout; a unit is then one candidate tile, its hi and lo parts, and a score is
     * (hi sum * 128 + lo sum) * scale. NULL: one part. */
    const uint16_t *cands_lo;
    float mark_slack;        /* two parts: the most the lo part moves a score (marks use hi alone) */
    int64_t unit_tiles;      /* candidate tiles a unit scores: 2, or 1 with two parts */
    const int64_t *history;
    int64_t hist_stride;
    const int64_t *lengths;
    int64_t n_users;
    const uint16_t *cands;
    int64_t n_cands, cand_pad, keep, capacity;
    int64_t k;     /* the final top-k: rows far below a candidate's k-th best are dropped */
    float window;  /* ... when they screen more than this below it (twice the screen's error) */
    const float *windows;  /* [n_users, n_cands] each candidate's own window, or NULL: `window` for all */
    float window_factor;   /* ... in units of this: a candidate's window is window_factor x windows[...] */
    int64_t sample_every;  /* thresholds start from a sample of every this-many-th row (0: from -inf) */
    int64_t sample_rank;   /* ... at the sample's this-th best (`start_from_samples`) */
    /* users split in row ranges: each item's sampled bests [n_items, n_cands, SAMPLE_VALUES], from
     * a first pass over the items (`worker`), so that every piece starts from the whole user's
     * sample; NULL: an item samples its own rows just before screening them */
    float *sample_bests;
    /* work items: user, row range and candidate tiles [tile_begin, tile_end) of 16; items of one
     * user are contiguous, and only the first of a row range counts its eligible rows */
    const int64_t *item_user, *item_start, *item_end, *item_tile_begin, *item_tile_end, *item_counts_rows;
    const int64_t *item_piece;  /* the item's row range: item = (user * splits + piece) * cand_splits + t */
    int64_t n_items, splits, cand_splits;
    /* final results [n_users, n_cands, (keep)], written by the items themselves where a user's rows
     * are not split (`direct`: its items hold disjoint candidates), else merged from ... */
    float *out_scores;
    int64_t *out_positions;
    float *out_bound;
    int64_t *out_count;  /* [n_users, n_cands] or NULL: survivors written to the first slots only, counted here */
    int direct;
    /* ... per item results (a user split in several row ranges is merged afterwards) */
    float *item_scores;      /* [n_items, n_cands, keep] */
    int32_t *item_positions; /* [n_items, n_cands, keep] */
    int64_t *item_count;     /* [n_items, n_cands] */
    float *item_bound;       /* [n_items, n_cands] */
    int64_t *item_valid;     /* [n_items] */
    int64_t next_sample, next_item;  /* shared counters of the two passes over the items */
    int failed;
} Job;

typedef struct {
    uint32_t *rows;     /* [2, 2, dim_pad / 32, 16, 16] gathered rows in pair layout, double buffered */
    float *tiles;       /* [2, 4, 16, 16] scores of one block of (up to) 32 candidates, double buffered
                         * (int8 screen: int32 sums, scaled to scores as they are read) */
    const float *scale; /* int8 screen: the current user's cand_scale row, else NULL */
    const float *windows; /* the current user's row of Job.windows, or NULL */
    int two_parts;      /* int8 screen with candidates in two parts (Job.cands_lo) */
    float *lane_best;   /* [n_cands, SAMPLE_VALUES] an unsplit user's sampled bests (sample_rows) */
    float *pool;        /* [splits, SAMPLE_VALUES] scratch of start_from_samples */
    float *threshold;   /* [n_cands] */
    float *scores;      /* [n_cands, capacity + SLACK] */
    int32_t *positions; /* [n_cands, capacity + SLACK] */
    int64_t *count;     /* [n_cands] */
    int64_t *limit;     /* [n_cands] a buffer is cut when it holds more than this */
} Workspace;

/* Candidate c's window (of the workspace's current user). */
static inline float window_of(const Job *job, const Workspace *ws, int64_t c) {
    return ws->windows ? job->window_factor * ws->windows[c] : job->window;
}

/* Order-preserving int32 images of 16 floats (negative floats have their magnitude bits flipped). */
static inline __m512i order_keys(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i sign = _mm512_srai_epi32(bits, 31);
    return _mm512_xor_si512(bits, _mm512_and_si512(sign, _mm512_set1_epi32(0x7FFFFFFF)));
}

static inline int32_t order_key(float v) {
    int32_t bits;
    memcpy(&bits, &v, sizeof(bits));
    return bits < 0 ? bits ^ 0x7FFFFFFF : bits;
}

/* The float whose order_key is `key`. */
static inline float key_value(int32_t key) {
    int32_t bits = key < 0 ? key ^ 0x7FFFFFFF : key;
    float v;
    memcpy(&v, &bits, sizeof(v));
    return v;
}

/* Lanes of entries [i, i + 16) that lie inside n. */
static inline __mmask16 entry_lanes(int64_t n, int64_t i) {
    return i + 16 <= n ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
}

/* Number of entries of keys(scores[0, n)) >= t (`cmp` = _MM_CMPINT_NLT) or > t (_MM_CMPINT_NLE). */
static inline int64_t count_keys(const float *scores, int64_t n, int32_t t, int cmp) {
    const __m512i threshold = _mm512_set1_epi32(t);
    int64_t count = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = entry_lanes(n, i);
        __m512i key = order_keys(_mm512_maskz_loadu_ps(lanes, scores + i));
        count += __builtin_popcount(cmp == _MM_CMPINT_NLT ? _mm512_mask_cmp_epi32_mask(lanes, key, threshold, _MM_CMPINT_NLT)
                                                          : _mm512_mask_cmp_epi32_mask(lanes, key, threshold, _MM_CMPINT_NLE));
    }
    return count;
}

/* The key t of a cut of scores[0, n) (n > keep): at least `keep` entries have a key >= t, and at
 * most keep + extra do, unless ties at t make that impossible. The cut is searched on the
 * order-preserving integer images of the scores, a vectorised count per probe (a sort or a
 * quickselect paid ~20K cycles of mispredicted branches here). It lies in [lo, hi):
 * count(key >= lo) >= keep, count(key >= hi) < keep. Each probe interpolates where the count
 * crosses keep + extra / 2 (scores near a cut are spread evenly enough that this takes a few
 * probes) and falls back to halving the interval after a probe that did not halve it, so the
 * worst case stays that of a bisection. */
static int32_t find_cut(const float *scores, int64_t n, int64_t keep, int64_t extra) {
    __m512i low = _mm512_set1_epi32(INT32_MAX), high = _mm512_set1_epi32(INT32_MIN);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = entry_lanes(n, i);
        __m512i key = order_keys(_mm512_maskz_loadu_ps(lanes, scores + i));
        low = _mm512_mask_min_epi32(low, lanes, low, key);
        high = _mm512_mask_max_epi32(high, lanes, high, key);
    }
    int64_t lo = _mm512_reduce_min_epi32(low), hi = (int64_t)_mm512_reduce_max_epi32(high) + 1;
    int64_t count_lo = n, count_hi = 0;
    const int64_t target = keep + extra / 2;
    int bisect = 0;
    while (hi - lo > 1 && count_lo > keep + extra) {
        int64_t mid;
        if (bisect) {
            mid = lo + (hi - lo) / 2;
        } else {
            mid = lo + (int64_t)((double)(hi - lo) * (double)(count_lo - target) / (double)(count_lo - count_hi));
            mid = mid <= lo ? lo + 1 : mid >= hi ? hi - 1 : mid;
        }
        const int64_t width = hi - lo;
        int64_t count = count_keys(scores, n, (int32_t)mid, _MM_CMPINT_NLT);
        if (count < keep) {
            hi = mid;
            count_hi = count;
        } else {
            lo = mid;
            count_lo = count;
        }
        bisect = !bisect && 2 * (hi - lo) > width;
    }
    return (int32_t)lo;
}

/* The lowest of scores[0, n) whose key is at least t (one is): with t from find_cut(.., keep, 0),
 * the keep-th best itself, where find_cut's key may lie anywhere above the next one. */
static float lowest_from(const float *scores, int64_t n, int32_t t) {
    const __m512i floor = _mm512_set1_epi32(t);
    __m512i low = _mm512_set1_epi32(INT32_MAX);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 lanes = entry_lanes(n, i);
        const __m512i key = order_keys(_mm512_maskz_loadu_ps(lanes, scores + i));
        low = _mm512_mask_min_epi32(low, _mm512_mask_cmp_epi32_mask(lanes, key, floor, _MM_CMPINT_NLT), low, key);
    }
    return key_value(_mm512_reduce_min_epi32(low));
}

/* Cuts entries [0, *n) (*n > keep) down to between `keep` and `keep + extra` of the best, in
 * place, and sets *n to their number; returns the cut value: every entry dropped is <= it,
 * every entry kept is >= it. Entries above the cut stay; of those equal to it, the first ones. */
static float cut_to_best(float *scores, int32_t *positions, int64_t *count_io, int64_t keep, int64_t extra) {
    const int64_t n = *count_io;
    const int32_t t = find_cut(scores, n, keep, extra);
    const __m512i cut = _mm512_set1_epi32(t);
    int64_t ties = keep + extra - count_keys(scores, n, t, _MM_CMPINT_NLE), out = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = entry_lanes(n, i);
        __m512 v = _mm512_maskz_loadu_ps(lanes, scores + i);
        __m512i p = _mm512_maskz_loadu_epi32(lanes, positions + i);
        __m512i key = order_keys(v);
        __mmask16 take = _mm512_mask_cmpgt_epi32_mask(lanes, key, cut);
        __mmask16 equal = _mm512_mask_cmpeq_epi32_mask(lanes, key, cut);
        while (equal && ties > 0) {
            take |= equal & -equal;
            equal &= equal - 1;
            ties--;
        }
        /* register compresses and full stores (a compress straight to memory is several times
         * slower); in place, out <= i, so a store reaches at most the lanes already loaded, but
         * the last, partial vector is stored masked: the buffer may end with it */
        if (lanes == 0xFFFF) {
            _mm512_storeu_ps(scores + out, _mm512_maskz_compress_ps(take, v));
            _mm512_storeu_si512(positions + out, _mm512_maskz_compress_epi32(take, p));
        } else {
            _mm512_mask_compressstoreu_ps(scores + out, take, v);
            _mm512_mask_compressstoreu_epi32(positions + out, take, p);
        }
        out += __builtin_popcount(take);
    }
    *count_io = out;
    return key_value(t);
}

/* Drops, in place, the entries [0, *n) that score below `floor`; sets *n to those kept. */
static void drop_below(float *scores, int32_t *positions, int64_t *count_io, float floor) {
    const int64_t n = *count_io;
    const __m512 low = _mm512_set1_ps(floor);
    int64_t out = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = entry_lanes(n, i);
        __m512 v = _mm512_maskz_loadu_ps(lanes, scores + i);
        __m512i p = _mm512_maskz_loadu_epi32(lanes, positions + i);
        __mmask16 take = _mm512_mask_cmp_ps_mask(lanes, v, low, _CMP_GE_OQ);
        _mm512_mask_compressstoreu_ps(scores + out, take, v);
        _mm512_mask_compressstoreu_epi32(positions + out, take, p);
        out += __builtin_popcount(take);
    }
    *count_io = out;
}

/* Shrinks a candidate's buffer [0, *n) and returns its new threshold: every entry dropped scored
 * at most it. Two cuts, the higher one wins: the best `keep` (+ up to `extra`), and everything
 * more than the window below the k-th best. The second is the one that binds on most data: an
 * entry that far below the k-th screened score is, exactly, below the k-th exact score (the
 * screen's error is at most half the window), so it can never enter the top-k, and the
 * threshold rises faster than with `keep` alone (about half the hits on random rows). */
static float tighten(const Job *job, float window, float *scores, int32_t *positions, int64_t *count_io,
                     int64_t extra) {
    float cut = -INFINITY;
    if (*count_io > job->keep) cut = cut_to_best(scores, positions, count_io, job->keep, extra);
    if (*count_io > job->k) {
        /* find_cut's key has at least k entries at or above it: at most the k-th best */
        const float floor = key_value(find_cut(scores, *count_io, job->k, 8)) - window;
        if (floor > cut) {
            drop_below(scores, positions, count_io, floor);
            cut = floor;
        }
    }
    return cut;
}

/* Transposes 16 rows of 16 32-bit values in place (r[i][j] -> r[j][i]). */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    }
}

/* Gathers the rows ids[first, first + GROUP_ROWS) (zero past `end` and for id 0) in pair layout:
 * for each 16-row block and each 32-dim slice kk, a tile whose row p holds dims (2p, 2p + 1) of
 * the 16 rows, the B operand of TDPBF16PS. Returns the mask of eligible rows (non-zero rows). */
static uint32_t gather_group(const Job *job, const int64_t *ids, int64_t first, int64_t end, uint32_t *rows) {
    const int64_t dim = job->dim, k_tiles = job->dim_pad / 32;
    uint32_t valid = 0;
    for (int block = 0; block < 2; block++) {
        const uint16_t *src[16];
        for (int n = 0; n < 16; n++) {
            const int64_t p = first + block * 16 + n;
            src[n] = job->screen + (p < end ? ids[p] : 0) * dim;  /* past the end: row 0, a zero row */
        }
        __m512i any = _mm512_setzero_si512();
        for (int64_t kk = 0; kk < k_tiles; kk++) {
            int64_t width = dim - kk * 32 < 32 ? dim - kk * 32 : 32;
            __mmask32 lanes = width == 32 ? 0xFFFFFFFFu : (__mmask32)((1u << width) - 1);
            __m512i r[16];
            for (int n = 0; n < 16; n++) r[n] = _mm512_maskz_loadu_epi16(lanes, src[n] + kk * 32);
            transpose16(r);
            uint32_t *tile = rows + (block * k_tiles + kk) * 256;
            for (int q = 0; q < 16; q++) {
                _mm512_store_si512(tile + q * 16, r[q]);
                any = _mm512_or_si512(any, r[q]);
            }
        }
        /* lane n of `any` ORs row n's values; the sign bits are ignored (-0.0 is zero) */
        valid |= (uint32_t)_mm512_test_epi32_mask(any, _mm512_set1_epi32(0x7FFF7FFF)) << (16 * block);
    }
    return valid;
}

/* Bit c set where candidate c (< n) of a tile of 16 scores a row above threshold[c]: tile
 * [2, 16, 16] (row block, candidate, row), rows outside valid0 / valid1 left out. The 16 candidates' maxima
 * over their 32 rows are reduced across lanes together, by shuffles between pairs of vectors
 * (4 levels), and compared with one vector of thresholds: ~5 instructions a candidate, where a
 * compare, a mask test, a shift and an or per candidate took ~9. */
/* Lane-wise max of float scores, or of int32 sums (int8 screen) carried in float registers. */
static inline __m512 max16(__m512 a, __m512 b, int ints) {
    return ints ? _mm512_castsi512_ps(_mm512_max_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b))) : _mm512_max_ps(a, b);
}

/* Scores of one candidate's 16 lanes of a tile, -inf outside `valid`: the stored floats, or, with
 * the int8 screen, the int32 sums times the candidate's scale (with two parts, the hi sums here
 * times 128 plus the lo sums two tiles on). */
static inline __m512 tile_scores(const Workspace *ws, const float *row, __mmask16 valid, int64_t c) {
    const __m512 low = _mm512_set1_ps(-INFINITY);
    if (!ws->scale) return _mm512_mask_load_ps(low, valid, row);
    __m512i sums = _mm512_load_si512(row);
    if (ws->two_parts) sums = _mm512_add_epi32(_mm512_slli_epi32(sums, 7), _mm512_load_si512(row + 512));
    return _mm512_mask_mul_ps(low, valid, _mm512_cvtepi32_ps(sums), _mm512_set1_ps(ws->scale[c]));
}

/* Bit c set where candidate c (< n) of a tile of 16 scores a row above threshold[c]: tile
 * [2, 16, 16] (row block, candidate, row), rows outside valid0 / valid1 left out (at least one
 * lane is valid). The 16 candidates' maxima over their 32 rows are reduced across lanes
 * together, by shuffles between pairs of vectors (4 levels), and compared with one vector of
 * thresholds: ~5 instructions a candidate, where a compare, a mask test, a shift and an or per
 * candidate took ~9. With the int8 screen (`scale`: the 16 candidates' scales) the maxima are
 * taken on the int32 sums and only they are scaled: the scaling is increasing, so it commutes
 * with the max. */
static inline __attribute__((always_inline)) __mmask16 marks16_of(const float *tile, const float *threshold,
                                                                   const float *scale, float factor, float slack,
                                                                   int64_t n, __mmask16 valid0, __mmask16 valid1,
                                                                   const int ints, const int full) {
    /* rows of an ineligible lane score as -inf in the max: zero rows score 0, which a threshold below 0 would take */
    const __m512 low = ints ? _mm512_castsi512_ps(_mm512_set1_epi32(INT32_MIN)) : _mm512_set1_ps(-INFINITY);
    __m512 m[16];
    for (int c = 0; c < 16; c++)
        m[c] = full ? max16(_mm512_load_ps(tile + c * 16), _mm512_load_ps(tile + 256 + c * 16), ints)
                    : max16(_mm512_mask_load_ps(low, valid0, tile + c * 16), _mm512_mask_load_ps(low, valid1, tile + 256 + c * 16), ints);
    /* 16 -> 8: quarters 0-1 of p[i] hold candidate i's partial maxima, 2-3 candidate i + 8's */
    __m512 p[8];
    for (int i = 0; i < 8; i++)
        p[i] = max16(_mm512_shuffle_f32x4(m[i], m[i + 8], 0x44), _mm512_shuffle_f32x4(m[i], m[i + 8], 0xEE), ints);
    /* 8 -> 4: quarters of q[i] hold candidates i, i + 8, i + 4, i + 12 (4 partials each) */
    __m512 q[4];
    for (int i = 0; i < 4; i++)
        q[i] = max16(_mm512_shuffle_f32x4(p[i], p[i + 4], 0x88), _mm512_shuffle_f32x4(p[i], p[i + 4], 0xDD), ints);
    /* 4 -> 2 -> 1, inside quarters: lane 4j + (0, 1, 2, 3) of r ends up with candidate
     * (a, a + 2, a + 1, a + 3) for a = 0, 8, 4, 12 in quarters j = 0..3 */
    const __m512 s0 = max16(_mm512_shuffle_ps(q[0], q[2], 0x44), _mm512_shuffle_ps(q[0], q[2], 0xEE), ints);
    const __m512 s1 = max16(_mm512_shuffle_ps(q[1], q[3], 0x44), _mm512_shuffle_ps(q[1], q[3], 0xEE), ints);
    const __m512 r = max16(_mm512_shuffle_ps(s0, s1, 0x88), _mm512_shuffle_ps(s0, s1, 0xDD), ints);
    /* lane l of r is candidate order[l]; the order is its own inverse */
    const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    const __mmask16 lanes = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
    __m512 best = _mm512_permutexvar_ps(order, r);
    if (ints)
        best = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_castps_si512(best)),
                             _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, scale), _mm512_set1_ps(factor)));
    const __m512 bar = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, threshold), _mm512_set1_ps(slack));
    return _mm512_mask_cmp_ps_mask(lanes, best, bar, _CMP_GT_OQ);
}

/* marks16_of compiled for each kind of sums and for groups whose rows are all eligible (most of
 * them), where plain loads replace the masked ones, each of which also copies its fill value
 * (0.98x a call at L = 100K, C = 100). */
static __mmask16 marks16(const float *tile, const float *threshold, const float *scale, float factor, float slack,
                         int64_t n, __mmask16 valid0, __mmask16 valid1) {
    const int full = (valid0 & valid1) == 0xFFFF;
    if (scale)
        return full ? marks16_of(tile, threshold, scale, factor, slack, n, valid0, valid1, 1, 1)
                    : marks16_of(tile, threshold, scale, factor, slack, n, valid0, valid1, 1, 0);
    return full ? marks16_of(tile, threshold, scale, factor, slack, n, valid0, valid1, 0, 1)
                : marks16_of(tile, threshold, scale, factor, slack, n, valid0, valid1, 0, 0);
}

/* Appends, for candidates [c_begin, c_end) (at most 32, from a multiple of 16), the rows of one
 * scored group above their thresholds. tiles: [4, 16, 16]: tile 2t + b holds candidates
 * c_begin + t * 16 + 0..15 (tile rows) x group rows first + b * 16 + 0..15 (lanes).
 * Two passes: `marks16` marks the candidates with a hit, without a branch or a store; then the
 * marked ones (few, once thresholds have settled) are compared again in full and their hits
 * appended. A branch per candidate on
 * "any hit" was mispredicted on most hits (a candidate's hits thin out along the history, so
 * the branch is taken at no steady rate), ~20 cycles each time. */
static void select_unit(const Job *job, Workspace *ws, const float *tiles, uint32_t valid, int64_t first,
                        int64_t c_begin, int64_t c_end) {
    const int64_t capacity = job->capacity;
    const __mmask16 valid0 = (__mmask16)(valid & 0xFFFF), valid1 = (__mmask16)(valid >> 16);
    uint32_t marked = 0;
    for (int64_t t = 0; 16 * t < c_end - c_begin; t++)
        /* with two parts, marked on the hi sums alone (x 128: the scale is per lo unit), a slack
         * below the thresholds: the lo part moves a score by at most that */
        marked |= (uint32_t)marks16(tiles + t * 512, ws->threshold + c_begin + 16 * t,
                                    ws->scale ? ws->scale + c_begin + 16 * t : NULL, ws->two_parts ? 128.0f : 1.0f,
                                    ws->two_parts ? job->mark_slack : 0.0f, c_end - c_begin - 16 * t,
                                    valid0, valid1) << (16 * t);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i at0 = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)first));
    const __m512i at1 = _mm512_add_epi32(at0, _mm512_set1_epi32(16));
    for (; marked; marked &= marked - 1) {
        const int64_t c = c_begin + __builtin_ctz(marked);
        const float *row = tiles + ((c - c_begin) / 16) * 512 + (c & 15) * 16;
        const __m512 thr = _mm512_set1_ps(ws->threshold[c]);
        const __m512 v0 = tile_scores(ws, row, valid0, c), v1 = tile_scores(ws, row + 256, valid1, c);
        const __mmask16 hit0 = _mm512_mask_cmp_ps_mask(valid0, v0, thr, _CMP_GT_OQ);
        const __mmask16 hit1 = _mm512_mask_cmp_ps_mask(valid1, v1, thr, _CMP_GT_OQ);
        int64_t n = ws->count[c];
        float *cs = ws->scores + c * (capacity + SLACK);
        int32_t *cp = ws->positions + c * (capacity + SLACK);
        /* register compresses and stores: the buffer's slack takes the lanes past the hits. A
         * candidate marked for a group mostly has one or two hits in it: 16-byte stores (where
         * each half has at most four) cross a cache line less often than 64-byte ones, which
         * always do (0.97-0.98x a call at L = 100K, C = 100) */
        const __m512 s0 = _mm512_maskz_compress_ps(hit0, v0), s1 = _mm512_maskz_compress_ps(hit1, v1);
        const __m512i p0 = _mm512_maskz_compress_epi32(hit0, at0), p1 = _mm512_maskz_compress_epi32(hit1, at1);
        const int h0 = __builtin_popcount(hit0), h1 = __builtin_popcount(hit1);
        if (h0 <= 4 && h1 <= 4) {
            _mm_storeu_ps(cs + n, _mm512_castps512_ps128(s0));
            _mm_storeu_si128((__m128i *)(cp + n), _mm512_castsi512_si128(p0));
            n += h0;
            _mm_storeu_ps(cs + n, _mm512_castps512_ps128(s1));
            _mm_storeu_si128((__m128i *)(cp + n), _mm512_castsi512_si128(p1));
            n += h1;
        } else {
            _mm512_storeu_ps(cs + n, s0);
            _mm512_storeu_si512(cp + n, p0);
            n += h0;
            _mm512_storeu_ps(cs + n, s1);
            _mm512_storeu_si512(cp + n, p1);
            n += h1;
        }
        if (n > ws->limit[c]) {
            /* never lowered: what was left out below it stays below the final bound (an approximate
             * k-th, or a sampled start, can put a cut under the threshold) */
            const float cut = tighten(job, window_of(job, ws, c), cs, cp, &n, job->keep / 2);  /* approximate keep cut: cheaper */
            if (cut > ws->threshold[c]) ws->threshold[c] = cut;
            /* the next cut when the buffer has doubled: fewer cuts where the window holds many */
            ws->limit[c] = 2 * n < 2 * job->k ? 2 * job->k : 2 * n > capacity ? capacity : 2 * n;
        }
        ws->count[c] = n;
    }
}

static inline void prefetch_row(const Job *job, int64_t id) {
    const char *row = (const char *)(job->screen + id * job->dim);
    for (int64_t off = 0; off < job->dim * 2; off += 64) _mm_prefetch(row + off, _MM_HINT_T1);
}

/* Rows ids[next, end) not yet prefetched; `per_step` of them are requested in each step of
 * tile products (0: none). */
typedef struct {
    const int64_t *ids;
    int64_t next, end, per_step;
} Fetch;

/* Requests up to n more rows of `fetch`; returns how many it did. */
static inline int64_t request_rows(const Job *job, Fetch *fetch, int64_t n) {
    int64_t done = 0;
    for (; done < n && fetch->next < fetch->end; done++) prefetch_row(job, fetch->ids[fetch->next++]);
    return done;
}

/* Scores one gathered group (`rows`, pair layout) against candidate tiles `tile` and, with
 * `pair`, tile + 1 (or, given `lo`, the lo parts of tile), into quartet [4, 16, 16] (tile 2t + b:
 * candidate tile t (or part t) x row block b). */
static inline void score_unit(const Job *job, const uint16_t *cands, const uint16_t *lo, int64_t tile, int pair,
                              const uint32_t *rows, Fetch *fetch, float *quartet) {
    const int64_t dim_pad = job->dim_pad, k_tiles = dim_pad / 32;
    const uint16_t *a0 = cands + tile * 16 * dim_pad, *a1 = lo ? lo + tile * 16 * dim_pad : a0 + 16 * dim_pad;
    const int int8 = job->int8;
/* bf16 pairs into float32 sums, or int8 quartets into int32 sums (exact) */
#define TILE_PRODUCT(acc, a, b) do { if (int8) _tile_dpbssd(acc, a, b); else _tile_dpbf16ps(acc, a, b); } while (0)
    _tile_zero(0); _tile_zero(1);
    if (pair) { _tile_zero(2); _tile_zero(3); }
    for (int64_t kk = 0; kk < k_tiles; kk++) {
        _tile_loadd(4, a0 + kk * 32, dim_pad * 2);
        _tile_loadd(6, rows + kk * 256, 64);
        _tile_loadd(7, rows + (k_tiles + kk) * 256, 64);
        TILE_PRODUCT(0, 4, 6);
        /* one of the step's rows after its first product, the rest after its last: the requests
         * wait for the core's fill buffers, and one at a time they hold up fewer tile loads
         * (the screen ~2% faster at L = 100K, C = 100 than with all of them after the last) */
        const int64_t requested = fetch->per_step ? request_rows(job, fetch, 1) : 0;
        TILE_PRODUCT(1, 4, 7);
        if (pair) {
            _tile_loadd(5, a1 + kk * 32, dim_pad * 2);
            TILE_PRODUCT(2, 5, 6);
            TILE_PRODUCT(3, 5, 7);
        }
#undef TILE_PRODUCT
        request_rows(job, fetch, fetch->per_step - requested);
    }
    _tile_stored(0, quartet, 64);
    _tile_stored(1, quartet + 256, 64);
    if (pair) {
        _tile_stored(2, quartet + 512, 64);
        _tile_stored(3, quartet + 768, 64);
    }
}

/* Scores, per candidate, of sampled behaviours: the SAMPLE_DEPTH best per lane of the 32 row
 * lanes of a group, SAMPLE_VALUES different behaviours in all, -inf where fewer were sampled. */
#define SAMPLE_DEPTH 2
#define SAMPLE_VALUES (32 * SAMPLE_DEPTH)

/* Scores every job->sample_every-th row of rows [start, end) of one user for candidates
 * [tile_begin * 16, c_last) and keeps, per candidate, its SAMPLE_VALUES sampled bests in
 * bests[c * SAMPLE_VALUES ...] ([depth][32 lanes]): an insertion into a sorted column per lane,
 * branch-free. */
static void sample_rows(const Job *job, Workspace *ws, const int64_t *ids, int64_t start, int64_t end,
                        int64_t tile_begin, int64_t tile_end, int64_t c_last, const uint16_t *cands,
                        const uint16_t *lo, float *bests) {
    const int64_t every = job->sample_every;
    const int64_t n_sampled = end > start ? (end - start + every - 1) / every : 0;
    const __m512 low = _mm512_set1_ps(-INFINITY);
    for (int64_t c = tile_begin * 16; c < c_last; c++)
        for (int i = 0; i < SAMPLE_VALUES; i += 16) _mm512_storeu_ps(bests + c * SAMPLE_VALUES + i, low);
    if (n_sampled == 0) return;
    int64_t *sampled = malloc((size_t)(n_sampled + GROUP_ROWS) * sizeof(int64_t));
    if (!sampled) return;  /* no sampled bests: thresholds start at -inf, slower, same result */
    for (int64_t j = 0; j < n_sampled; j++) sampled[j] = ids[start + j * every];
    Fetch fetch = {sampled, 0, 0, 0};
    for (; fetch.next < n_sampled && fetch.next < PREFETCH_GROUPS * GROUP_ROWS; fetch.next++) prefetch_row(job, sampled[fetch.next]);
    for (int64_t g = 0; g < n_sampled; g += GROUP_ROWS) {
        const uint32_t valid = gather_group(job, sampled, g, n_sampled, ws->rows);
        const int64_t fetch_to = g + (PREFETCH_GROUPS + 1) * GROUP_ROWS < n_sampled ? g + (PREFETCH_GROUPS + 1) * GROUP_ROWS : n_sampled;
        for (; fetch.next < fetch_to; fetch.next++) prefetch_row(job, sampled[fetch.next]);
        if (!valid) continue;
        const __mmask16 valid0 = (__mmask16)(valid & 0xFFFF), valid1 = (__mmask16)(valid >> 16);
        for (int64_t tile = tile_begin; tile < tile_end; tile += job->unit_tiles) {
            score_unit(job, cands, lo, tile, lo || tile + 1 < tile_end, ws->rows, &fetch, ws->tiles);
            const int64_t c1 = tile * 16 + 16 * job->unit_tiles < c_last ? tile * 16 + 16 * job->unit_tiles : c_last;
            for (int64_t c = tile * 16; c < c1; c++) {
                const float *row = ws->tiles + ((c - tile * 16) / 16) * 512 + (c & 15) * 16;
                float *column = bests + c * SAMPLE_VALUES;
                for (int half = 0; half < 2; half++) {
                    __m512 v = tile_scores(ws, row + 256 * half, half ? valid1 : valid0, c);
                    for (int d = 0; d < SAMPLE_DEPTH; d++) {
                        const __m512 held = _mm512_loadu_ps(column + d * 32 + half * 16);
                        _mm512_storeu_ps(column + d * 32 + half * 16, _mm512_max_ps(held, v));
                        v = _mm512_min_ps(held, v);
                    }
                }
            }
        }
    }
    free(sampled);
}

/* Starting thresholds of candidates [c_first, c_last) from the sampled bests of `n_sources`
 * pieces (bests[s] laid out as in sample_rows; all the pieces of the user that sampled): the
 * job->sample_rank-th best of them all is reached by at least that many sampled behaviours,
 * so, where at most sample_rank - 1 of the user's k - 1 best behaviours were sampled (the
 * caller picks a rank past which that is unlikely: `kernels.native.sample_rank`), by at least k
 * of its behaviours. The threshold starts a window below it. That keeps the caller's proof of
 * completeness (kernels/cpu_topk.py) whenever at least k behaviours of the user screen at or
 * above the value: the k-th best screened is then at least the value, and a behaviour left out
 * screened more than twice the error below it. Where fewer do (a rare sample), the proof fails
 * and the caller screens again without one. `pool`: scratch of n_sources x SAMPLE_VALUES.
 * Why: a threshold that starts at -inf takes every early row of a piece. At L = 100K, C = 100
 * on random rows a sample of one row in 50 ranked 8th halves the hits and the cuts (141K -> 72K,
 * 1,765 -> 812, with the lowest of 8 lane maxima as the value); pooling the samples of a split
 * user's two pieces, so that each starts from the user's value rather than its own (a lower one:
 * half the rows), took the int8 screen's hits from 94K to 70K, 5-8% of its time. */
static void start_from_samples(const Job *job, Workspace *ws, const float *const *bests, int64_t n_sources,
                               int64_t c_first, int64_t c_last, float *pool) {
    const int64_t n = n_sources * SAMPLE_VALUES;
    for (int64_t c = c_first; c < c_last; c++) {
        for (int64_t s = 0; s < n_sources; s++)
            memcpy(pool + s * SAMPLE_VALUES, bests[s] + c * SAMPLE_VALUES, SAMPLE_VALUES * sizeof(float));
        const float value = lowest_from(pool, n, find_cut(pool, n, job->sample_rank, 0));  /* the rank-th best */
        if (value > -INFINITY) ws->threshold[c] = value - window_of(job, ws, c);
    }
}

/* A candidate's survivors scores[0, n), positions[0, n) into its `keep` output slots, the rest
 * -inf / -1, 16 slots at a time; or, given `count`, into the first slots only, their number
 * written to *count (the re-scoring of the same native call reads no further). */
static void write_survivors(const float *scores, const int32_t *positions, int64_t n, int64_t keep,
                            float *out_scores, int64_t *out_positions, int64_t *count) {
    const int64_t slots = count ? (n < keep ? n : keep) : keep;
    if (count) *count = slots;
    for (int64_t e = 0; e < slots; e += 16) {
        const __mmask16 lanes = entry_lanes(slots, e), taken = lanes & entry_lanes(n > e ? n : e, e);
        _mm512_mask_storeu_ps(out_scores + e, lanes, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), taken, scores + e));
        const __m512i p = _mm512_mask_loadu_epi32(_mm512_set1_epi32(-1), taken, positions + e);
        _mm512_mask_storeu_epi64(out_positions + e, (__mmask8)lanes, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(p)));
        _mm512_mask_storeu_epi64(out_positions + e + 8, (__mmask8)(lanes >> 8), _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(p, 1)));
    }
}

/* Scores rows [start, end) of one user and keeps their survivors (see the file comment).
 * Candidates are taken 32 at a time (a last odd tile of 16 alone), as 2 x 2 tile products.
 * A software pipeline: the next group is gathered before this one is scored, because a tile
 * load cannot take data from stores that have not retired (copying it slice by slice between
 * the tile products instead was slower: 3.6 against 3.2 ms); and the selection of each
 * candidate unit runs after the next unit's tile products are issued, so it overlaps them and
 * its vector loads read tiles stored a unit earlier (selecting a whole group after all its
 * products took 3.8 ms). The rows of group g + PREFETCH_GROUPS are prefetched a few at a time
 * between tile products: random rows are bound by the core's outstanding misses, and a burst of
 * a whole group's prefetches stalled the core. */
static inline __attribute__((always_inline)) void screen_units(Job *job, Workspace *ws, int64_t item,
                                                                const int64_t unit_tiles) {
    const int64_t dim_pad = job->dim_pad, n_cands = job->n_cands;
    const int64_t keep = job->keep, capacity = job->capacity;
    const int64_t user = job->item_user[item];
    const int64_t length = job->lengths[user];
    const int64_t start = job->item_start[item];
    const int64_t end = job->item_end[item] < length ? job->item_end[item] : length;
    const int64_t *ids = job->history + user * job->hist_stride;
    const int64_t k_tiles = dim_pad / 32;
    const int64_t tile_begin = job->item_tile_begin[item], tile_end = job->item_tile_end[item];
    /* pairs of candidate tiles, the last maybe single (with two parts: single tiles) */
    const int64_t units = (tile_end - tile_begin + unit_tiles - 1) / unit_tiles;
    const int64_t c_first = tile_begin * 16, c_last = tile_end * 16 < n_cands ? tile_end * 16 : n_cands;
    const uint16_t *cands = job->cands + user * job->cand_pad * dim_pad;
    const uint16_t *lo = job->cands_lo ? job->cands_lo + user * job->cand_pad * dim_pad : NULL;
    const int64_t rows_per_group = 2 * k_tiles * 256;
    const int64_t per_step = (GROUP_ROWS + units * k_tiles - 1) / (units * k_tiles);
    int64_t n_valid = 0;
    uint32_t pending_valid = 0;  /* the unit scored last waits for its selection */
    int64_t pending_first = 0, pending_tile = 0;
    int64_t slot = 0;

    ws->scale = job->int8 ? job->cand_scale + user * job->cand_pad : NULL;
    ws->windows = job->windows ? job->windows + user * job->n_cands : NULL;
    ws->two_parts = lo != NULL;
    for (int64_t c = c_first; c < c_last; c++) {
        ws->threshold[c] = -INFINITY;
        ws->count[c] = 0;
        ws->limit[c] = 2 * job->k < capacity ? 2 * job->k : capacity;
    }
    /* from 16 sampled rows of the user on (B = 100, L = 1,000, C = 1,000: 221 -> 214 ms against 64) */
    if (job->sample_every > 0 && length / job->sample_every >= 16) {
        if (job->sample_bests) {
            /* the user's pieces: items (user, s, t) for every row range s, the same candidates t */
            const int64_t first_item = item - job->item_piece[item] * job->cand_splits;
            const float *sources[job->splits];
            for (int64_t s = 0; s < job->splits; s++)
                sources[s] = job->sample_bests + (first_item + s * job->cand_splits) * n_cands * SAMPLE_VALUES;
            start_from_samples(job, ws, sources, job->splits, c_first, c_last, ws->pool);
        } else {
            sample_rows(job, ws, ids, start, end, tile_begin, tile_end, c_last, cands, lo, ws->lane_best);
            const float *sources[1] = {ws->lane_best};
            start_from_samples(job, ws, sources, 1, c_first, c_last, ws->pool);
        }
    }
    Fetch fetch = {ids, start, end, per_step};
    for (; fetch.next < start + PREFETCH_GROUPS * GROUP_ROWS && fetch.next < end; fetch.next++) prefetch_row(job, ids[fetch.next]);

    uint32_t valid_next = start < end ? gather_group(job, ids, start, end, ws->rows) : 0;
    int64_t step = 0;
    for (int64_t g = start; g < end; g += GROUP_ROWS, step++) {
        const uint32_t *rows = ws->rows + (step & 1) * rows_per_group;
        uint32_t valid = valid_next;
        if (g + GROUP_ROWS < end)
            valid_next = gather_group(job, ids, g + GROUP_ROWS, end, ws->rows + ((step + 1) & 1) * rows_per_group);
        const int64_t fetch_to = g + (PREFETCH_GROUPS + 1) * GROUP_ROWS < end ? g + (PREFETCH_GROUPS + 1) * GROUP_ROWS : end;
        n_valid += __builtin_popcount(valid);
        if (valid) {
            for (int64_t tile = tile_begin; tile < tile_end; tile += unit_tiles) {
                fetch.end = fetch_to;
                score_unit(job, cands, lo, tile, lo || tile + 1 < tile_end, rows, &fetch, ws->tiles + (slot & 1) * 1024);
                if (pending_valid) {
                    const int64_t c0 = pending_tile * 16, c1 = c0 + 16 * unit_tiles < c_last ? c0 + 16 * unit_tiles : c_last;
                    select_unit(job, ws, ws->tiles + ((slot - 1) & 1) * 1024, pending_valid, pending_first, c0, c1);
                }
                pending_valid = valid;
                pending_first = g;
                pending_tile = tile;
                slot++;
            }
        }
        for (; fetch.next < fetch_to; fetch.next++) prefetch_row(job, ids[fetch.next]);
    }
    if (pending_valid) {
        const int64_t c0 = pending_tile * 16, c1 = c0 + 16 * unit_tiles < c_last ? c0 + 16 * unit_tiles : c_last;
        select_unit(job, ws, ws->tiles + ((slot - 1) & 1) * 1024, pending_valid, pending_first, c0, c1);
    }

    for (int64_t c = job->direct ? c_first : 0; c < (job->direct ? c_last : n_cands); c++) {
        if (c < c_first || c >= c_last) {  /* another item's candidates */
            job->item_count[item * n_cands + c] = 0;
            job->item_bound[item * n_cands + c] = -INFINITY;
            continue;
        }
        int64_t n = ws->count[c];
        float *cs = ws->scores + c * (capacity + SLACK);
        int32_t *cp = ws->positions + c * (capacity + SLACK);
        float bound = ws->threshold[c];
        float cut = tighten(job, window_of(job, ws, c), cs, cp, &n, 0);
        bound = cut > bound ? cut : bound;
        if (job->direct) {
            /* the user's only row range: these are its final survivors (a serial merge of every
             * pair after the parallel part took ~40% of the screen with 100 users of 1,000 rows) */
            write_survivors(cs, cp, n, keep, job->out_scores + (user * n_cands + c) * keep,
                            job->out_positions + (user * n_cands + c) * keep,
                            job->out_count ? job->out_count + user * n_cands + c : NULL);
            job->out_bound[user * n_cands + c] = bound;
        } else {
            memcpy(job->item_scores + (item * n_cands + c) * keep, cs, (size_t)n * sizeof(float));
            memcpy(job->item_positions + (item * n_cands + c) * keep, cp, (size_t)n * sizeof(int32_t));
            job->item_count[item * n_cands + c] = n;
            job->item_bound[item * n_cands + c] = bound;
        }
    }
    job->item_valid[item] = job->item_counts_rows[item] ? n_valid : 0;
}

/* screen_units with the unit width a constant: a variable step in its loops cost ~8% at
 * L = 100K, C = 100 (measured side by side). */
static void screen_item(Job *job, Workspace *ws, int64_t item) {
    if (job->unit_tiles == 1)
        screen_units(job, ws, item, 1);
    else
        screen_units(job, ws, item, 2);
}

/* The first pass over a split user (Job.sample_bests): its sampled bests of one item's rows. */
static void sample_item(Job *job, Workspace *ws, int64_t item) {
    const int64_t user = job->item_user[item], length = job->lengths[user];
    const int64_t end = job->item_end[item] < length ? job->item_end[item] : length;
    const int64_t tile_begin = job->item_tile_begin[item], tile_end = job->item_tile_end[item];
    const int64_t c_last = tile_end * 16 < job->n_cands ? tile_end * 16 : job->n_cands;
    const int64_t at = user * job->cand_pad * job->dim_pad;
    ws->scale = job->int8 ? job->cand_scale + user * job->cand_pad : NULL;
    ws->windows = job->windows ? job->windows + user * job->n_cands : NULL;
    ws->two_parts = job->cands_lo != NULL;
    sample_rows(job, ws, job->history + user * job->hist_stride, job->item_start[item], end, tile_begin, tile_end, c_last,
                job->cands + at, job->cands_lo ? job->cands_lo + at : NULL,
                job->sample_bests + item * job->n_cands * SAMPLE_VALUES);
}

/* Every tile register of this thread as 16 rows of 64 bytes. */
static void configure_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof(config));
    config.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    /* GCC 12 does not see the intrinsic read the row widths and drops their stores once this is
     * inlined into some callers (a zero width is an invalid configuration: SIGSEGV) */
    __asm__ volatile("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
}

/* The survivors of pair (user u, candidate c) of a split user, merged from its items: the best
 * `keep` of them all, none more than the window below their k-th best; the bound is the largest
 * of the items' and the cut's. merged, merged_pos: room for every item's `keep`. */
static void merge_pair(const Job *job, int64_t u, int64_t c, float *merged, int32_t *merged_pos) {
    const int64_t n_cands = job->n_cands, keep = job->keep, per_user = job->splits * job->cand_splits;
    int64_t n = 0;
    float bound = -INFINITY;
    for (int64_t s = 0; s < per_user; s++) {
        const int64_t i = u * per_user + s, cnt = job->item_count[i * n_cands + c];
        memcpy(merged + n, job->item_scores + (i * n_cands + c) * keep, cnt * sizeof(float));
        memcpy(merged_pos + n, job->item_positions + (i * n_cands + c) * keep, cnt * sizeof(int32_t));
        n += cnt;
        const float b = job->item_bound[i * n_cands + c];
        bound = b > bound ? b : bound;
    }
    const float window = job->windows ? job->window_factor * job->windows[u * n_cands + c] : job->window;
    const float cut = tighten(job, window, merged, merged_pos, &n, 0);
    bound = cut > bound ? cut : bound;
    /* a piece keeps what lies above its own bound, which can be below another piece's */
    drop_below(merged, merged_pos, &n, bound);
    write_survivors(merged, merged_pos, n, keep, job->out_scores + (u * n_cands + c) * keep,
                    job->out_positions + (u * n_cands + c) * keep, job->out_count ? job->out_count + u * n_cands + c : NULL);
    job->out_bound[u * n_cands + c] = bound;
}

static void *worker(void *arg) {
    Job *job = (Job *)arg;
    const int64_t n_cands = job->n_cands, capacity = job->capacity;
    Workspace ws;
    size_t rows_bytes = (size_t)2 * 2 * (job->dim_pad / 32) * 256 * sizeof(uint32_t);
    ws.rows = aligned_alloc(64, rows_bytes);
    ws.tiles = aligned_alloc(64, (size_t)2 * 1024 * sizeof(float));
    ws.lane_best = aligned_alloc(64, (size_t)n_cands * SAMPLE_VALUES * sizeof(float));
    ws.pool = malloc((size_t)job->splits * SAMPLE_VALUES * sizeof(float));
    ws.threshold = malloc((size_t)n_cands * sizeof(float));
    ws.scores = malloc((size_t)n_cands * (capacity + SLACK) * sizeof(float));
    ws.positions = malloc((size_t)n_cands * (capacity + SLACK) * sizeof(int32_t));
    ws.count = malloc((size_t)n_cands * sizeof(int64_t));
    ws.limit = malloc((size_t)n_cands * sizeof(int64_t));
    /* a split user's pairs are merged by every thread once all items are screened (one thread
     * after the parallel part took ~5% of the call at L = 100K, C = 100; 0.96x with two) */
    const size_t merge_room = job->direct ? 1 : (size_t)job->splits * job->cand_splits * job->keep;
    float *merged = malloc(merge_room * sizeof(float));
    int32_t *merged_pos = malloc(merge_room * sizeof(int32_t));
    const int ready = ws.rows && ws.tiles && ws.lane_best && ws.pool && ws.threshold && ws.scores && ws.positions &&
                      ws.count && ws.limit && merged && merged_pos;
    if (!ready) __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
    if (ready) configure_tiles();
    if (job->sample_bests) {
        /* every piece's sample first, so that each starts from the whole user's; every thread
         * reaches the barrier, ready or not (the others take its items) */
        for (int64_t item; ready && (item = __atomic_fetch_add(&job->next_sample, 1, __ATOMIC_RELAXED)) < job->n_items;)
            sample_item(job, &ws, item);
#pragma omp barrier
    }
    for (int64_t item; ready && (item = __atomic_fetch_add(&job->next_item, 1, __ATOMIC_RELAXED)) < job->n_items;)
        screen_item(job, &ws, item);
    if (ready) _tile_release();
    if (!job->direct) {
#pragma omp barrier
        /* contiguous shares: pairs handed out one at a time shared their output lines */
        const int64_t pairs = job->n_users * job->n_cands, threads = omp_get_num_threads(), t = omp_get_thread_num();
        for (int64_t pair = pairs * t / threads; !__atomic_load_n(&job->failed, __ATOMIC_RELAXED) && pair < pairs * (t + 1) / threads; pair++)
            merge_pair(job, pair / job->n_cands, pair % job->n_cands, merged, merged_pos);
    }
    free(merged); free(merged_pos);
    free(ws.rows); free(ws.tiles); free(ws.lane_best); free(ws.pool); free(ws.threshold); free(ws.scores);
    free(ws.positions); free(ws.count); free(ws.limit);
    return NULL;
}

/* Screens every user; returns 0, or -1 when memory or threads could not be had. See the file
 * comment for layouts. For parallelism when users are fewer than threads, each user's work is
 * split into `splits` row ranges (long histories; each range warms its own thresholds up) times
 * `cand_splits` candidate ranges (each gathers the rows again: for histories too short to split),
 * and merged by the same threads (`merge_pair`). Each candidate keeps at most `keep` survivors, none more than `window` below
 * its k-th best screened score (window = infinity: `keep` alone decides). sample_every > 0 (with a
 * finite window): thresholds start a window below the sample_rank-th best of a sample of one row
 * in sample_every of the user (`start_from_samples`; a split user's pieces sample their own rows
 * in a first parallel pass and pool them; a user too short for 16 sampled rows starts from
 * -inf). With `int8`, the
 * screen and the candidates hold int8 values (see the file comment) and `cand_scale` [n_users,
 * cand_pad] turns each candidate's int32 sums into scores; with `cands_lo` (same layout as
 * cands) the candidates come in two parts, hi and lo codes, a score being (hi sum x 128 + lo sum)
 * x cand_scale, and a candidate is marked for a group by its hi sums alone, `mark_slack` below
 * its threshold. `windows` [n_users, n_cands] (or NULL) times `window_factor` gives each
 * candidate a window of its own instead of `window` (which must then be finite: a candidate's
 * own screen error, where its rounding is measured apart, makes its window narrower than the
 * call's largest; the factor lets the caller pass the errors themselves). `out_count`
 * [n_users, n_cands] (or NULL: every slot is written, -inf / -1 past the survivors): each pair's
 * survivors go to its first slots only, and their number here. */
int muse_screen_topk_amx(const uint16_t *screen, int64_t n_rows, int64_t dim,
                         const int64_t *history, int64_t hist_stride, const int64_t *lengths,
                         int64_t n_users, int64_t block_len, const uint16_t *cands,
                         int64_t n_cands, int64_t cand_pad, int64_t keep, int64_t k, double window,
                         int64_t sample_every, int64_t sample_rank, int64_t splits,
                         int64_t cand_splits, int64_t n_threads, float *out_scores, int64_t *out_positions,
                         float *out_bound, int64_t *out_valid, int64_t int8, const float *cand_scale,
                         const uint16_t *cands_lo, double mark_slack, const float *windows, double window_factor,
                         int64_t *out_count) {
    Job job;
    memset(&job, 0, sizeof(job));
    job.out_count = out_count;
    job.screen = screen; job.n_rows = n_rows; job.dim = dim; job.dim_pad = (dim + 31) / 32 * 32;
    job.int8 = int8 != 0; job.cand_scale = cand_scale;
    job.cands_lo = job.int8 ? cands_lo : NULL; job.mark_slack = (float)mark_slack;
    job.unit_tiles = job.cands_lo ? 1 : 2;
    job.history = history; job.hist_stride = hist_stride; job.lengths = lengths;
    job.n_users = n_users; job.cands = cands; job.n_cands = n_cands; job.cand_pad = cand_pad;
    job.keep = keep; job.k = k < keep ? k : keep; job.window = (float)window; job.windows = windows;
    job.window_factor = (float)window_factor;
    job.sample_every = isfinite(window) ? sample_every : 0;
    job.sample_rank = sample_rank < 1 ? 1 : sample_rank > SAMPLE_VALUES - 1 ? SAMPLE_VALUES - 1 : sample_rank;
    job.capacity = (2 * keep + 15) / 16 * 16;  /* a buffer is cut by the time it holds twice `keep` */
    if (splits < 1) splits = 1;
    int64_t span = (block_len + splits - 1) / splits;
    span = (span + GROUP_ROWS - 1) / GROUP_ROWS * GROUP_ROWS;
    if (span < GROUP_ROWS) span = GROUP_ROWS;
    splits = (block_len + span - 1) / span;
    if (splits < 1) splits = 1;
    /* candidates are split between units: pairs of tiles (single tiles with two parts) */
    const int64_t cand_units = (cand_pad / 16 + job.unit_tiles - 1) / job.unit_tiles;
    if (cand_splits > cand_units) cand_splits = cand_units;
    if (cand_splits < 1) cand_splits = 1;
    const int64_t per_user = splits * cand_splits;
    job.n_items = n_users * per_user;
    size_t per_item = (size_t)n_cands * keep;
    job.out_scores = out_scores; job.out_positions = out_positions; job.out_bound = out_bound;
    job.direct = splits == 1;
    job.splits = splits; job.cand_splits = cand_splits;
    int64_t *item_user = malloc(job.n_items * 7 * sizeof(int64_t));
    if (!job.direct && job.sample_every > 0)
        job.sample_bests = malloc((size_t)job.n_items * n_cands * SAMPLE_VALUES * sizeof(float));
    job.item_valid = malloc(job.n_items * sizeof(int64_t));
    if (!job.direct) {
        job.item_scores = malloc(job.n_items * per_item * sizeof(float));
        job.item_positions = malloc(job.n_items * per_item * sizeof(int32_t));
        job.item_count = malloc(job.n_items * n_cands * sizeof(int64_t));
        job.item_bound = malloc(job.n_items * n_cands * sizeof(float));
    }
    int status = -1;
    if (!item_user || !job.item_valid || (!job.direct && job.sample_every > 0 && !job.sample_bests) ||
        (!job.direct && (!job.item_scores || !job.item_positions || !job.item_count || !job.item_bound)))
        goto done;
    for (int64_t u = 0; u < n_users; u++) {
        for (int64_t s = 0; s < splits; s++) {
            for (int64_t t = 0; t < cand_splits; t++) {
                const int64_t i = (u * splits + s) * cand_splits + t;
                item_user[i] = u;
                item_user[job.n_items + i] = s * span;
                item_user[2 * job.n_items + i] = (s + 1) * span < block_len ? (s + 1) * span : block_len;
                item_user[3 * job.n_items + i] = job.unit_tiles * (t * cand_units / cand_splits);
                const int64_t tile_end = job.unit_tiles * ((t + 1) * cand_units / cand_splits);
                item_user[4 * job.n_items + i] = tile_end < cand_pad / 16 ? tile_end : cand_pad / 16;
                item_user[5 * job.n_items + i] = t == 0;
                item_user[6 * job.n_items + i] = s;
            }
        }
    }
    job.item_user = item_user;
    job.item_start = item_user + job.n_items;
    job.item_end = item_user + 2 * job.n_items;
    job.item_tile_begin = item_user + 3 * job.n_items;
    job.item_tile_end = item_user + 4 * job.n_items;
    job.item_counts_rows = item_user + 5 * job.n_items;
    job.item_piece = item_user + 6 * job.n_items;

    if (n_threads > job.n_items) n_threads = job.n_items;
    if (n_threads < 1) n_threads = 1;
    /* OpenMP, not threads of our own: this library binds to the libgomp torch already loaded
     * (same soname), so it shares torch's worker pool. A second pool would find torch's
     * workers still spinning after its last parallel op and run at half speed (measured). */
#pragma omp parallel num_threads((int)n_threads)
    worker(&job);
    if (job.failed) goto done;

    for (int64_t u = 0; u < n_users; u++) {
        int64_t valid = 0;
        for (int64_t s = 0; s < per_user; s++) valid += job.item_valid[u * per_user + s];
        out_valid[u] = valid;
    }
    status = 0;
done:
    free(item_user); free(job.item_scores); free(job.item_positions);
    free(job.item_count); free(job.item_bound); free(job.item_valid); free(job.sample_bests);
    return status;
}

/* Sums of 8 vectors of 16 lanes, one a row: lane pairs (i, i + 8), then (i, i + 4), (i, i + 2),
 * (i, i + 1) of each row's lanes added in that order, the same for every row (a row's bits do not
 * depend on its slot), into sums[0..8). Across 8 rows the shuffles are shared: ~23 instructions in
 * all, where a reduction per row took ~8 each. */
static inline void reduce8(const __m512 acc[8], float sums[8]) {
    __m512 half[4], quarter[2];
    for (int i = 0; i < 4; i++)  /* rows 2i, 2i + 1: 8 partials each (lanes 0-7, 8-15) */
        half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x44),
                                _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)  /* rows 4i .. 4i + 3: 4 partials each, one 128-bit quarter a row */
        quarter[i] = _mm512_add_ps(_mm512_shuffle_f32x4(half[2 * i], half[2 * i + 1], 0x88),
                                   _mm512_shuffle_f32x4(half[2 * i], half[2 * i + 1], 0xDD));
    /* quarter q: rows q (lanes 0, 1) and q + 4 (lanes 2, 3), 2 partials each */
    const __m512 pairs = _mm512_add_ps(_mm512_shuffle_ps(quarter[0], quarter[1], 0x88),
                                       _mm512_shuffle_ps(quarter[0], quarter[1], 0xDD));
    /* each quarter's lanes (0, 1) hold row q's two partials in the order above, (2, 3) row q + 4's */
    const __m512 total = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0xB1));
    /* lane 4q: row q, lane 4q + 2: row q + 4 */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm256_storeu_ps(sums, _mm512_castps512_ps256(_mm512_permutexvar_ps(order, total)));
}

/* <cand, row ids[q]> * inv_norm[ids[q]] in float32 for eight rows of a table of `dtype` (a
 * constant where this is inlined: one loop per dtype), each summed in one fixed order (dims in
 * order, one accumulator, then `reduce8`), so all copies of an item get the same bits for a
 * candidate (duplicates tie exactly) whichever rows share its call. Eight chains of multiply-adds
 * in flight: a row's alone waited on each step's latency. */
static inline __attribute__((always_inline)) void exact_scores8_of(const void *table, int dtype, int64_t dim,
                                                                   const float *inv_norm, const float *cand,
                                                                   const int64_t ids[8], float out[8]) {
    __m512 acc[8];
    for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        const __mmask16 lanes = d + 16 <= dim ? 0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
        const __m512 c = _mm512_maskz_loadu_ps(lanes, cand + d);
        for (int r = 0; r < 8; r++) acc[r] = _mm512_fmadd_ps(c, load_row16(table, dtype, dim, ids[r], d, lanes), acc[r]);
    }
    reduce8(acc, out);
    for (int r = 0; r < 8; r++) out[r] *= inv_norm[ids[r]];
}

static void exact_scores8(const void *table, int dtype, int64_t dim, const float *inv_norm, const float *cand,
                          const int64_t ids[8], float out[8]) {
    switch (dtype) {
    case 0: exact_scores8_of(table, 0, dim, inv_norm, cand, ids, out); break;
    case 1: exact_scores8_of(table, 1, dim, inv_norm, cand, ids, out); break;
    case 2: exact_scores8_of(table, 2, dim, inv_norm, cand, ids, out); break;
    default: exact_scores8_of(table, 3, dim, inv_norm, cand, ids, out); break;
    }
}

/* keys[0, n) (distinct) in descending order into out[0, n): each key goes to the rank given by
 * the number of keys above it, counted for 8 keys at once against every key in turn (a compare
 * and a masked add each), without a branch on the data, and scattered there. (Counting for one
 * key at a time, 8 keys a compare, a popcount and an add: ~1.6K of a pair's ~6K cycles with
 * k = 50.) */
static void sort_descending(const int64_t *keys, int64_t n, int64_t *out) {
    const __m512i one = _mm512_set1_epi64(1);
    for (int64_t i = 0; i < n; i += 8) {
        const __mmask8 lanes = i + 8 <= n ? 0xFF : (__mmask8)((1u << (n - i)) - 1);
        const __m512i mine = _mm512_maskz_loadu_epi64(lanes, keys + i);
        __m512i rank = _mm512_setzero_si512();
        for (int64_t j = 0; j < n; j++)
            rank = _mm512_mask_add_epi64(rank, _mm512_cmpgt_epi64_mask(_mm512_set1_epi64(keys[j]), mine), rank, one);
        _mm512_mask_i64scatter_epi64(out, lanes, rank, mine, 8);
    }
}

/* The k output slots of a pair from its `count` best keys sorted[0, count): scores (the keys'
 * high halves back to floats) and positions (their low halves), -inf / -1 past count; 8 at a time. */
static void write_top(const int64_t *sorted, int64_t count, int64_t k, float *scores, int64_t *positions) {
    const __m512i low_half = _mm512_set1_epi64(0xFFFFFFFFLL), magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    for (int64_t j = 0; j < k; j += 8) {
        const __mmask8 lanes = j + 8 <= k ? 0xFF : (__mmask8)((1u << (k - j)) - 1);
        const __mmask8 taken = lanes & (j >= count ? 0 : j + 8 <= count ? 0xFF : (__mmask8)((1u << (count - j)) - 1));
        const __m512i key = _mm512_maskz_loadu_epi64(taken, sorted + j);
        /* key_value on 8 lanes: the order key's bits, sign-flipped back where negative */
        __m256i bits = _mm512_cvtepi64_epi32(_mm512_srai_epi64(key, 32));
        bits = _mm256_xor_si256(bits, _mm256_and_si256(_mm256_srai_epi32(bits, 31), _mm512_castsi512_si256(magnitude)));
        _mm256_mask_storeu_ps(scores + j, lanes, _mm256_mask_blend_ps(taken, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(bits)));
        _mm512_mask_storeu_epi64(positions + j, lanes,
                                 _mm512_mask_blend_epi64(taken, _mm512_set1_epi64(-1), _mm512_and_si512(key, low_half)));
    }
}

/* The survivors of one (user, candidate) pair, ready for the exact re-scoring: those inside the
 * user's length with a non-zero id, their screened scores, positions and ids, in slot order;
 * `cut`: the k-th best screened score (-inf when there are at most k), so that the "firsts", the
 * k best screened (more where scores tie at the cut), are those at or above it. */
typedef struct {
    float *screened;
    int32_t *position;
    int64_t *id;
    int64_t n;
    float cut;
} Survivors;

/* 8 slots at a time, without a branch per slot: positions checked against the length, ids
 * gathered and checked, the eligible slots compressed in registers and stored whole (the lists
 * have room for 8 entries past m). No order is needed: the re-scoring takes the firsts, then
 * whatever else can still reach the k-th exact score (sorting the rest by screened score, to stop
 * at the first that cannot, cost ~1.4K of a pair's ~7K cycles with 1,000 behaviours). */
static void list_survivors(Survivors *list, const float *screened, const int64_t *pos, int64_t m, int64_t length,
                           const int64_t *ids, int64_t k) {
    int64_t n = 0;
    const __m512i limit = _mm512_set1_epi64(length), zero = _mm512_setzero_si512();
    for (int64_t j = 0; j < m; j += 8) {
        const __mmask8 lanes = j + 8 <= m ? 0xFF : (__mmask8)((1u << (m - j)) - 1);
        const __m512i p = _mm512_maskz_loadu_epi64(lanes, pos + j);
        __mmask8 take = _mm512_mask_cmpge_epi64_mask(lanes, p, zero) & _mm512_mask_cmplt_epi64_mask(lanes, p, limit);
        const __m512i id = _mm512_mask_i64gather_epi64(zero, take, p, ids, 8);
        take = _mm512_mask_cmpneq_epi64_mask(take, id, zero);
        _mm256_storeu_ps(list->screened + n, _mm256_maskz_compress_ps(take, _mm256_maskz_loadu_ps(lanes, screened + j)));
        _mm256_storeu_si256((__m256i *)(list->position + n), _mm512_cvtepi64_epi32(_mm512_maskz_compress_epi64(take, p)));
        _mm512_storeu_si512(list->id + n, _mm512_maskz_compress_epi64(take, id));
        n += __builtin_popcount(take);
    }
    list->n = n;
    list->cut = n > k ? key_value(find_cut(list->screened, n, k, 0)) : -INFINITY;
}

/* The survivors of `list` to score in one round, compressed into ids[0, n) and at[0, n) (8 more
 * slots of room), n returned; 8 entries at a time, without a branch per entry (their order in
 * the list is random, so a branch per entry was mispredicted about every other time): round 0,
 * the firsts (screened at least the cut); round 1, the others whose screened score a can still
 * reach `floor` (a + eps_abs + eps_rel |a| >= floor, in double). Either way only rows with a
 * non-zero reciprocal norm. */
static int64_t round_entries(const Survivors *list, int round, double floor, double eps_abs, double eps_rel,
                             const float *inv_norm, int64_t *ids, int32_t *at) {
    const __m512 cut = _mm512_set1_ps(list->cut);
    const __m512d bar = _mm512_set1_pd(floor), abs_eps = _mm512_set1_pd(eps_abs), rel_eps = _mm512_set1_pd(eps_rel);
    int64_t n = 0;
    for (int64_t j = 0; j < list->n; j += 8) {
        const __mmask8 lanes = j + 8 <= list->n ? 0xFF : (__mmask8)((1u << (list->n - j)) - 1);
        const __m256 a = _mm256_maskz_loadu_ps(lanes, list->screened + j);
        const __mmask8 first = _mm512_mask_cmp_ps_mask((__mmask16)lanes, _mm512_castps256_ps512(a), cut, _CMP_GE_OQ);
        __mmask8 take;
        if (round == 0) {
            take = first;
        } else {
            const __m512d wide = _mm512_cvtps_pd(a);
            const __m512d reach = _mm512_add_pd(_mm512_add_pd(wide, abs_eps), _mm512_mul_pd(rel_eps, _mm512_abs_pd(wide)));
            take = lanes & ~first & _mm512_cmp_pd_mask(reach, bar, _CMP_GE_OQ);
        }
        const __m512i id = _mm512_maskz_loadu_epi64(lanes, list->id + j);
        const __m256 inv = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), take, id, inv_norm, 4);
        take &= _mm256_cmp_ps_mask(inv, _mm256_setzero_ps(), _CMP_GT_OQ);
        _mm512_storeu_si512(ids + n, _mm512_maskz_compress_epi64(take, id));
        _mm256_storeu_si256((__m256i *)(at + n),
                            _mm256_maskz_compress_epi32(take, _mm256_maskz_loadu_epi32(lanes, list->position + j)));
        n += __builtin_popcount(take);
    }
    return n;
}

/* The exact scores of one pair's survivors, as they are found: scores and keys (order key of the
 * score << 32 | position) of the same entries. */
typedef struct {
    float *score;
    int64_t *key;
    int64_t n;
} Scored;

/* Scores `got` (1..8) survivors ids[0, got) at positions at[0, got) exactly and appends them. */
static inline void score_batch(const void *table, int dtype, int64_t dim, const float *inv_norm, const float *cand,
                               const int64_t *ids, const int32_t *at, int got, Scored *out) {
    int64_t eight[8];
    for (int q = 0; q < 8; q++) eight[q] = ids[q < got ? q : 0];  /* copies of the first: read, not kept */
    float scores[8];
    exact_scores8(table, dtype, dim, inv_norm, cand, eight, scores);
    for (int q = 0; q < got; q++) {
        out->score[out->n] = scores[q];
        out->key[out->n++] = (int64_t)order_key(scores[q]) * 4294967296LL + at[q];
    }
}

/* A history of up to this many bytes of rows, re-scored for at least as many survivors as it has
 * rows, is read whole before its pairs (see `warm_history`). */
#define WARM_HISTORY_BYTES (512 << 10)

/* Whether a history of `length` rows is read whole before its pairs: it fits the budget, and
 * its n_cands x k survivors (at most) can cover it. */
static inline int read_whole(int64_t length, int64_t row_bytes, int64_t n_cands, int64_t k) {
    return length * row_bytes <= WARM_HISTORY_BYTES && n_cands * k >= length;
}

/* Reads every row of a user's history (and its reciprocal norm) with plain loads, into the cache
 * for the pairs that follow: their survivors cover nearly every row, and each row, first read by
 * whichever pair needed it, was a miss that pair waited on, one at a time (~half of the
 * re-scoring with 1,000 behaviours); here the out-of-order core keeps many in flight. (Prefetch
 * instructions in place of the loads, or spread over the user before, were slower.) */
static void warm_history(const void *table, int64_t row_bytes, const float *inv_norm, const int64_t *ids, int64_t n) {
    int32_t sink = 0;
    for (int64_t p = 0; p < n; p++) {
        const char *row = (const char *)table + ids[p] * row_bytes;
        for (int64_t off = 0; off < row_bytes; off += 64) sink |= *(const volatile int32_t *)(row + off);
        sink |= *(const volatile int32_t *)(inv_norm + ids[p]);
    }
    (void)sink;
}

static int descending_keys(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

/* Up to 8 of the next pair's likely rows (screened at least `from`), from entry *at on: their
 * lines are requested while this pair's rows are scored. */
static inline void prefetch_likely(const void *table, int64_t row_bytes, const float *inv_norm, const Survivors *next,
                                   double from, int64_t *at) {
    for (int asked = 0; *at < next->n && asked < 8; (*at)++) {
        if (next->screened[*at] < from) continue;
        const char *row = (const char *)table + next->id[*at] * row_bytes;
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
        _mm_prefetch((const char *)(inv_norm + next->id[*at]), _MM_HINT_T0);
        asked++;
    }
}

/* Exact top-k of each (user, candidate) among its survivors, re-scoring only those that can be in it.
 *
 * positions [n_users, n_cands, m] (-1 = unused) index the users' histories [n_users, hist_stride],
 * with their screened scores `screened` [same] (within eps(a) = eps_abs + eps_rel * |a| of the
 * exact cosine, eps_abs replaced by pair_eps[user * n_cands + candidate] where pair_eps is not
 * NULL: a candidate's own screen error); bound [n_users, n_cands]: every eligible behaviour left out of the survivors
 * screened at most this (-inf: none was). A survivor is eligible when inside the user's length,
 * its id is not 0 and its row is not zero.
 *
 * In two rounds (`list_survivors`): the k best screened (the firsts) are scored exactly
 * (`exact_scores8`, the table's own values as float32, eight rows at a time) and their k-th exact
 * score is a lower bound of the final k-th; then every other survivor whose screened score plus
 * its error reaches that bound. On random rows that reads ~56-60 rows per pair, random rows of
 * the table. The k best of those scored are found by a cut on their scores (`find_cut`) and only
 * they are sorted. (One pair at a time, the rest sorted by screened score and scanned until the
 * first that could not reach a bound raised by every better score, each offered to a running
 * top-k: 6.9K cycles a pair at L = 1,000, C = 1,000, 1.4K of them listing and sorting the rest,
 * 4.2K scoring 56 rows four at a time, 1.4K the final sort.)
 * Ranked by the key (order-preserving int32 of the score) << 32 | position, the order of
 * kernels/_keys.py: highest score first, ties toward the more recent behaviour.
 *
 * Outputs: scores float [n_users, n_cands, k] descending and positions int64 [same] (-inf / -1
 * past the eligible ones); proven int8 [n_users, n_cands]: 1 where the result is provably the
 * exact top-k of the whole history (nothing eligible was left out, or whatever was, at most
 * bound + eps(bound) exactly, falls below the k-th exact score). Each pair's survivors are listed
 * a pair ahead, and the rows it will likely read prefetched while the pair before is scored:
 * those screened within one error of its k-th, i.e. its firsts and what the second round reads
 * when the firsts' exact k-th lands at their screened one (within two errors, the most the second
 * round can read, the extra lines crowded out the needed ones: re-scoring 13-15% slower at
 * L = 100K, C = 100). `counts` [n_users, n_cands] (or NULL: m each): a pair's survivors are its
 * first counts[pair] slots (muse_screen_topk_amx's out_count). Returns the number of pairs not
 * proven (the caller's test for a second screen, without a pass over `out_proven`), or -1 when
 * the per-thread buffers could not be allocated. */
int64_t muse_rescore_topk(const void *table, int64_t dtype, int64_t dim, const float *inv_norm, const float *cands,
                          const int64_t *history, int64_t hist_stride, const int64_t *lengths, const float *screened,
                          const int64_t *positions, const float *bound, int64_t n_users, int64_t n_cands, int64_t m,
                          int64_t k, double eps_abs, double eps_rel, const float *pair_eps, int64_t n_threads,
                          float *out_scores, int64_t *out_positions, int8_t *out_proven, const int64_t *counts) {
    const int64_t pairs = n_users * n_cands;
    const int64_t row_bytes = dim * (dtype == 0 ? 4 : dtype == 3 ? 1 : 2);
    int status = 0;
    int64_t unproven = 0;
#pragma omp parallel num_threads((int)n_threads) reduction(+ : unproven)
    {
        /* two lists (this pair's and the next one's) of m entries and 8 more: list_survivors
         * stores 8 lanes past its last entry; a pair's exact scores and keys, its k best, sorted */
        const int64_t room = m + 8;
        float *floats = malloc((size_t)3 * room * sizeof(float));
        int32_t *ints = malloc((size_t)3 * room * sizeof(int32_t));
        int64_t *longs = malloc((size_t)6 * room * sizeof(int64_t));
        if (!floats || !ints || !longs) {
            __atomic_store_n(&status, -1, __ATOMIC_RELAXED);
        } else {
            Survivors lists[2] = {{floats, ints, longs, 0, 0.0f}, {floats + room, ints + room, longs + room, 0, 0.0f}};
            int64_t *best = longs + 3 * room, *sorted = longs + 4 * room, *chosen = longs + 5 * room;
            int32_t *chosen_at = ints + 2 * room;  /* a round's survivors to score */
            int64_t listed = -1;  /* the pair whose survivors lists[listed & 1] holds */
            int64_t warmed = -1;  /* the user whose history was read whole last */
#pragma omp for schedule(static)
            for (int64_t bc = 0; bc < pairs; bc++) {
                const int64_t user = bc / n_cands;
                if (user != warmed && read_whole(lengths[user], row_bytes, n_cands, k)) {
                    warm_history(table, row_bytes, inv_norm, history + user * hist_stride, lengths[user]);
                    warmed = user;
                }
                /* a warm next pair needs no prefetch of its rows */
                const int next_warm = bc + 1 < pairs && read_whole(lengths[(bc + 1) / n_cands], row_bytes, n_cands, k);
                if (listed != bc)
                    list_survivors(&lists[bc & 1], screened + bc * m, positions + bc * m, counts ? counts[bc] : m, lengths[user],
                                   history + user * hist_stride, k);
                const Survivors *list = &lists[bc & 1];
                /* list the next pair now: its rows are prefetched while this one's are scored */
                Survivors *next = &lists[(bc + 1) & 1];
                double next_from = INFINITY;
                int64_t next_at = 0;
                if (bc + 1 < pairs) {
                    const int64_t next_user = (bc + 1) / n_cands;
                    list_survivors(next, screened + (bc + 1) * m, positions + (bc + 1) * m, counts ? counts[bc + 1] : m,
                                   lengths[next_user],
                                   history + next_user * hist_stride, k);
                    const double kth = next->cut;  /* -inf: every survivor is a first, all read */
                    const double next_abs = pair_eps ? pair_eps[bc + 1] : eps_abs;
                    next_from = next_warm ? INFINITY : kth == -INFINITY ? -INFINITY : kth - (next_abs + eps_rel * fabs(kth));
                    listed = bc + 1;
                }
                const float *cand = cands + bc * dim;
                const double pair_abs = pair_eps ? pair_eps[bc] : eps_abs;
                Scored done = {floats + 2 * room, longs + 2 * room, 0};
                double floor = -INFINITY;  /* the k-th exact score of the firsts, once they are scored */
                for (int round = 0; round < 2; round++) {
                    const int64_t n = round_entries(list, round, floor, pair_abs, eps_rel, inv_norm, chosen, chosen_at);
                    for (int64_t j = 0; j < n; j += 8) {
                        prefetch_likely(table, row_bytes, inv_norm, next, next_from, &next_at);
                        score_batch(table, (int)dtype, dim, inv_norm, cand, chosen + j, chosen_at + j,
                                    n - j < 8 ? (int)(n - j) : 8, &done);
                    }
                    if (round == 0 && done.n >= k) floor = lowest_from(done.score, done.n, find_cut(done.score, done.n, k, 0));
                }
                /* the k best (more where scores tie at the k-th), then sorted; a few more than k
                 * are sorted whole, cheaper than the cut */
                int64_t count = done.n;
                const int64_t *top = done.key;
                if (count > 2 * k) {
                    const int32_t t = find_cut(done.score, count, k, 0);
                    int64_t c = 0;
                    for (int64_t i = 0; i < count; i++) {  /* without a branch on the data */
                        best[c] = done.key[i];
                        c += order_key(done.score[i]) >= t;
                    }
                    top = best;
                    count = c;
                }
                if (count <= 256) {
                    sort_descending(top, count, sorted);
                } else {  /* thousands tied at the k-th (copies of one item): the count sort is quadratic */
                    memcpy(sorted, top, (size_t)count * sizeof(int64_t));
                    qsort(sorted, (size_t)count, sizeof(int64_t), descending_keys);
                }
                const float kth = count >= k ? key_value((int32_t)(sorted[k - 1] >> 32)) : -INFINITY;
                const double b = bound[bc];
                out_proven[bc] = b == -INFINITY || b + pair_abs + eps_rel * fabs(b) < (double)kth;
                unproven += !out_proven[bc];
                write_top(sorted, count, k, out_scores + bc * k, out_positions + bc * k);
            }
        }
        free(floats);
        free(ints);
        free(longs);
    }
    return status < 0 ? -1 : unproven;
}

/* muse_screen_topk_amx, then muse_rescore_topk of its survivors (its out_scores, out_positions,
 * out_bound and out_count must be the re-scoring's screened, positions, bound and counts), in one
 * call: the Python between two calls runs with the core's caches full of the screen's rows.
 * Returns the re-scoring's status, or -2 when the screen failed. */
int64_t muse_screen_rescore(const uint16_t *screen, int64_t n_rows, int64_t dim, const int64_t *history,
                            int64_t hist_stride, const int64_t *lengths, int64_t n_users, int64_t block_len,
                            const uint16_t *cands, int64_t n_cands, int64_t cand_pad, int64_t keep, int64_t k,
                            double window, int64_t sample_every, int64_t sample_rank, int64_t splits,
                            int64_t cand_splits, int64_t n_threads, float *out_scores, int64_t *out_positions,
                            float *out_bound, int64_t *out_valid, int64_t int8, const float *cand_scale,
                            const uint16_t *cands_lo, double mark_slack, const float *windows, double window_factor,
                            int64_t *out_count, const void *table, int64_t dtype, int64_t table_dim,
                            const float *inv_norm, const float *unit_cands, const int64_t *r_history,
                            int64_t r_hist_stride, const int64_t *r_lengths, const float *screened,
                            const int64_t *positions, const float *bound, int64_t r_users, int64_t r_cands, int64_t m,
                            int64_t r_k, double eps_abs, double eps_rel, const float *pair_eps, int64_t r_threads,
                            float *top_scores, int64_t *top_positions, int8_t *proven, const int64_t *counts) {
    if (muse_screen_topk_amx(screen, n_rows, dim, history, hist_stride, lengths, n_users, block_len, cands, n_cands,
                             cand_pad, keep, k, window, sample_every, sample_rank, splits, cand_splits, n_threads,
                             out_scores, out_positions, out_bound, out_valid, int8, cand_scale, cands_lo, mark_slack,
                             windows, window_factor, out_count) != 0)
        return -2;
    return muse_rescore_topk(table, dtype, table_dim, inv_norm, unit_cands, r_history, r_hist_stride, r_lengths,
                             screened, positions, bound, r_users, r_cands, m, r_k, eps_abs, eps_rel, pair_eps,
                             r_threads, top_scores, top_positions, proven, counts);
}
