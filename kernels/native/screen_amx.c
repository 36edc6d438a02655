/* Fused bf16 screen for cosine top-K on CPUs with AMX (Intel Sapphire Rapids and later).
 *
 * One pass over each history: gather the rows of a 32-row group from the normalised bf16 copy of
 * the table (prefetching groups ahead, the rows are random 256-byte reads), score them against
 * every candidate with AMX tile products (fp32 accumulation), and keep, per candidate, the
 * behaviours scoring above a running threshold in a small buffer. When a buffer fills, it is cut
 * back to its `keep` best with a selection, and the threshold rises to the `keep`-th score. The
 * [L, C] score matrix never exists: scores live in one 4 KiB tile buffer per thread.
 *
 * Invariant given to the caller: every eligible behaviour that is not returned scored at most
 * `bound[b, c]` in this screen (-inf when nothing was left out). The caller re-scores survivors
 * exactly and proves completeness with the screen's error bound (kernels/cpu_topk.py).
 *
 * Layouts (all row-major, contiguous):
 *   screen    uint16 (bf16 bits) [n_rows, dim], unit rows, zero rows for ineligible items;
 *   history   int64 [n_users, hist_stride]; lengths int64 [n_users];
 *   cands     uint16 (bf16) VNNI tiles [n_users, dim_pad / 32, cand_pad / 16, 16, 16, 2]:
 *             tile (kk, j) row p holds, for n = 0..15, dims kk*32 + 2p and + 1 of candidate
 *             j*16 + n (the B-operand layout of TDPBF16PS); cand_pad is a multiple of 32;
 *   outputs   scores float [n_users, n_cands, keep], positions int64 [same] (-inf / -1 in unused
 *             slots, unordered), bound float [n_users, n_cands], n_valid int64 [n_users].
 */
#include <cpuid.h>
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#define GROUP_ROWS 32      /* two 16-row A tiles */
#ifndef PREFETCH_GROUPS
#define PREFETCH_GROUPS 3  /* rows are requested this many groups before they are scored */
#endif
#ifndef CAPACITY_FACTOR
#define CAPACITY_FACTOR 2
#endif

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

typedef struct {
    const uint16_t *screen;
    int64_t n_rows, dim, dim_pad;
    const int64_t *history;
    int64_t hist_stride;
    const int64_t *lengths;
    int64_t n_users;
    const uint16_t *cands;
    int64_t n_cands, cand_pad, keep, capacity;
    /* work items: user and row range; items of one user are contiguous */
    const int64_t *item_user, *item_start, *item_end;
    int64_t n_items;
    /* per item results (a user split in several items is merged afterwards) */
    float *item_scores;      /* [n_items, n_cands, keep] */
    int32_t *item_positions; /* [n_items, n_cands, keep] */
    int64_t *item_count;     /* [n_items, n_cands] */
    float *item_bound;       /* [n_items, n_cands] */
    int64_t *item_valid;     /* [n_items] */
    int64_t next_item;       /* shared counter */
    int failed;
} Job;

typedef struct {
    uint16_t *rows;     /* [2, GROUP_ROWS, dim_pad] gathered bf16 rows, double buffered */
    float *tiles;       /* [2, cand_pad / 32, 4, 16, 16] scores of a group, double buffered */
    float *threshold;   /* [cand_pad] */
    float *scores;      /* [n_cands, capacity] */
    int32_t *positions; /* [n_cands, capacity] */
    int64_t *count;     /* [n_cands] */
} Workspace;

/* Order-preserving int32 images of 16 floats (negative floats have their magnitude bits flipped). */
static inline __m512i order_keys(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i sign = _mm512_srai_epi32(bits, 31);
    return _mm512_xor_si512(bits, _mm512_and_si512(sign, _mm512_set1_epi32(0x7FFFFFFF)));
}

/* Cuts entries [0, n) down to the `keep` best (keep < n); returns the cut value: every entry
 * dropped is <= it, every entry kept is >= it. The keep-th largest is found by bisection on the
 * order-preserving integer images, each probe a vectorised count: no data-dependent branches,
 * which made a quickselect here cost ~20K cycles a cut (mispredictions). */
static float cut_to_best(float *scores, int32_t *positions, int64_t n, int64_t keep) {
    int64_t lo = INT32_MIN, hi = INT32_MAX;  /* largest t with count(key >= t) >= keep */
    int64_t full = n / 16 * 16;
    __mmask16 tail = (__mmask16)((1u << (n - full)) - 1);
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        __m512i t = _mm512_set1_epi32((int32_t)mid);
        int64_t count = 0;
        for (int64_t i = 0; i < full; i += 16)
            count += __builtin_popcount(_mm512_cmpge_epi32_mask(order_keys(_mm512_loadu_ps(scores + i)), t));
        if (tail)
            count += __builtin_popcount(
                _mm512_mask_cmpge_epi32_mask(tail, order_keys(_mm512_maskz_loadu_ps(tail, scores + full)), t));
        if (count >= keep) lo = mid;
        else hi = mid - 1;
    }
    __m512i t = _mm512_set1_epi32((int32_t)lo);
    int64_t above = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = i + 16 <= n ? 0xFFFF : tail;
        above += __builtin_popcount(_mm512_mask_cmpgt_epi32_mask(lanes, order_keys(_mm512_maskz_loadu_ps(lanes, scores + i)), t));
    }
    int64_t ties = keep - above, out = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = i + 16 <= n ? 0xFFFF : tail;
        __m512 v = _mm512_maskz_loadu_ps(lanes, scores + i);
        __m512i p = _mm512_maskz_loadu_epi32(lanes, positions + i);
        __m512i key = order_keys(v);
        __mmask16 take = _mm512_mask_cmpgt_epi32_mask(lanes, key, t);
        __mmask16 equal = _mm512_mask_cmpeq_epi32_mask(lanes, key, t);
        while (equal && ties > 0) {  /* the first ties at the cut fill the last places */
            take |= equal & -equal;
            equal &= equal - 1;
            ties--;
        }
        _mm512_mask_compressstoreu_ps(scores + out, take, v);
        _mm512_mask_compressstoreu_epi32(positions + out, take, p);
        out += __builtin_popcount(take);
    }
    int32_t cut_bits = (int32_t)lo;
    cut_bits = cut_bits < 0 ? cut_bits ^ 0x7FFFFFFF : cut_bits;
    float cut;
    memcpy(&cut, &cut_bits, sizeof(cut));
    return cut;
}

/* Appends the scores above the running thresholds of one scored group to the survivor buffers.
 * tiles: [cand_pad / 32, 4, 16, 16] (tile quartet of each candidate pair: rows 0-15 x candidates
 * 2p*16.., rows 0-15 x (2p+1)*16.., rows 16-31 x 2p*16.., rows 16-31 x (2p+1)*16..). */
static void select_group(const Job *job, Workspace *ws, const float *tiles, uint32_t valid, int64_t first) {
    const int64_t pair_count = job->cand_pad / 32, keep = job->keep, capacity = job->capacity;
    for (int64_t pair = 0; pair < pair_count; pair++) {
        for (int quarter = 0; quarter < 4; quarter++) {
            int half = quarter >> 1;
            int64_t tile_col = 2 * pair + (quarter & 1);
            uint32_t rows_valid = (valid >> (16 * half)) & 0xFFFF;
            const float *tile = tiles + (pair * 4 + quarter) * 256;
            __m512 thr = _mm512_loadu_ps(ws->threshold + tile_col * 16);
            while (rows_valid) {
                int r = __builtin_ctz(rows_valid);
                rows_valid &= rows_valid - 1;
                __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(tile + r * 16), thr, _CMP_GT_OQ);
                if (!hit) continue;
                int32_t position = (int32_t)(first + 16 * half + r);
                while (hit) {
                    int lane = __builtin_ctz(hit);
                    hit &= hit - 1;
                    int64_t c = tile_col * 16 + lane;
                    int64_t n = ws->count[c];
                    float *cs = ws->scores + c * capacity;
                    int32_t *cp = ws->positions + c * capacity;
                    cs[n] = tile[r * 16 + lane];
                    cp[n] = position;
                    if (++n == capacity) {
                        ws->threshold[c] = cut_to_best(cs, cp, n, keep);
                        n = keep;
                        thr = _mm512_loadu_ps(ws->threshold + tile_col * 16);
                    }
                    ws->count[c] = n;
                }
            }
        }
    }
}

/* Copies the rows of ids[first, first + GROUP_ROWS) (0 past `end`) into rows; returns the bit
 * mask of the eligible ones (id not 0, row not zero). */
static uint32_t gather_group(const Job *job, const int64_t *ids, int64_t first, int64_t end, uint16_t *rows) {
    const int64_t dim = job->dim, dim_pad = job->dim_pad, row_bytes = dim * 2;
    uint32_t valid = 0;
    for (int r = 0; r < GROUP_ROWS; r++) {
        int64_t p = first + r;
        uint16_t *dst = rows + r * dim_pad;
        int64_t id = p < end ? ids[p] : 0;
        if (id == 0) {
            memset(dst, 0, (size_t)row_bytes);
            continue;
        }
        const uint16_t *src = job->screen + id * dim;
        int nonzero = 0;
        if (dim % 32 == 0) {
            __m512i any = _mm512_setzero_si512();
            for (int64_t e = 0; e < dim; e += 32) {
                __m512i v = _mm512_loadu_si512(src + e);
                _mm512_storeu_si512(dst + e, v);
                any = _mm512_or_si512(any, v);
            }
            /* ignoring the sign bit: a row of -0.0 is a zero row */
            nonzero = _mm512_test_epi16_mask(any, _mm512_set1_epi16(0x7FFF)) != 0;
        } else {
            memcpy(dst, src, (size_t)row_bytes);
            for (int64_t e = 0; e < dim; e++) nonzero |= (src[e] & 0x7FFF) != 0;
        }
        if (nonzero) valid |= 1u << r;
    }
    return valid;
}

static void prefetch_group(const Job *job, const int64_t *ids, int64_t first, int64_t end) {
    const int64_t row_bytes = job->dim * 2;
    for (int64_t p = first; p < first + GROUP_ROWS && p < end; p++) {
        const char *row = (const char *)(job->screen + ids[p] * job->dim);
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T1);
    }
}

/* Scores rows [start, end) of one user and keeps their survivors (see the file comment).
 * A software pipeline: group g is gathered and scored (the tile products run in the matrix unit)
 * while the selection works through group g - 1, whose tiles were stored a group earlier, so
 * vector loads never wait on tile stores; rows are prefetched PREFETCH_GROUPS groups ahead. */
static void screen_item(Job *job, Workspace *ws, int64_t item) {
    const int64_t dim_pad = job->dim_pad, n_cands = job->n_cands;
    const int64_t cand_pad = job->cand_pad, keep = job->keep, capacity = job->capacity;
    const int64_t user = job->item_user[item];
    const int64_t length = job->lengths[user];
    const int64_t start = job->item_start[item];
    const int64_t end = job->item_end[item] < length ? job->item_end[item] : length;
    const int64_t *ids = job->history + user * job->hist_stride;
    const int64_t k_tiles = dim_pad / 32, pair_count = cand_pad / 32;
    const uint16_t *cands = job->cands + user * k_tiles * (cand_pad / 16) * 512;
    const int64_t tiles_per_group = pair_count * 4 * 256;
    int64_t n_valid = 0;
    uint32_t pending_valid = 0;
    int64_t pending_first = -1;

    for (int64_t c = 0; c < cand_pad; c++) ws->threshold[c] = c < n_cands ? -INFINITY : INFINITY;
    memset(ws->count, 0, (size_t)n_cands * sizeof(int64_t));
    for (int64_t d = 0; d < PREFETCH_GROUPS; d++) prefetch_group(job, ids, start + d * GROUP_ROWS, end);

    int64_t step = 0;
    for (int64_t g = start; g < end; g += GROUP_ROWS, step++) {
        uint16_t *rows = ws->rows + (step & 1) * GROUP_ROWS * dim_pad;
        float *tiles = ws->tiles + (step & 1) * tiles_per_group;
        uint32_t valid = gather_group(job, ids, g, end, rows);
        prefetch_group(job, ids, g + PREFETCH_GROUPS * GROUP_ROWS, end);
        n_valid += __builtin_popcount(valid);
        if (valid) {
            for (int64_t pair = 0; pair < pair_count; pair++) {
                const uint16_t *b0 = cands + (2 * pair) * 512;  /* a tile is 16 rows of 64 bytes */
                const uint16_t *b1 = b0 + 512;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t kk = 0; kk < k_tiles; kk++) {
                    _tile_loadd(4, rows + kk * 32, dim_pad * 2);
                    _tile_loadd(5, rows + 16 * dim_pad + kk * 32, dim_pad * 2);
                    _tile_loadd(6, b0 + kk * (cand_pad / 16) * 512, 64);
                    _tile_loadd(7, b1 + kk * (cand_pad / 16) * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                float *quartet = tiles + pair * 1024;
                _tile_stored(0, quartet, 64);
                _tile_stored(1, quartet + 256, 64);
                _tile_stored(2, quartet + 512, 64);
                _tile_stored(3, quartet + 768, 64);
            }
        }
        if (pending_valid)
            select_group(job, ws, ws->tiles + ((step - 1) & 1) * tiles_per_group, pending_valid, pending_first);
        pending_valid = valid;
        pending_first = g;
    }
    if (pending_valid)
        select_group(job, ws, ws->tiles + ((step - 1) & 1) * tiles_per_group, pending_valid, pending_first);

    float *out_scores = job->item_scores + item * n_cands * keep;
    int32_t *out_positions = job->item_positions + item * n_cands * keep;
    for (int64_t c = 0; c < n_cands; c++) {
        int64_t n = ws->count[c];
        float *cs = ws->scores + c * capacity;
        int32_t *cp = ws->positions + c * capacity;
        float bound = ws->threshold[c];
        if (n > keep) {
            float cut = cut_to_best(cs, cp, n, keep);
            bound = cut > bound ? cut : bound;
            n = keep;
        }
        memcpy(out_scores + c * keep, cs, (size_t)n * sizeof(float));
        memcpy(out_positions + c * keep, cp, (size_t)n * sizeof(int32_t));
        job->item_count[item * n_cands + c] = n;
        job->item_bound[item * n_cands + c] = bound;
    }
    job->item_valid[item] = n_valid;
}

static void *worker(void *arg) {
    Job *job = (Job *)arg;
    const int64_t n_cands = job->n_cands, capacity = job->capacity;
    Workspace ws;
    size_t rows_bytes = (size_t)2 * GROUP_ROWS * job->dim_pad * 2;
    ws.rows = aligned_alloc(64, rows_bytes);
    ws.tiles = aligned_alloc(64, (size_t)2 * (job->cand_pad / 32) * 4 * 256 * sizeof(float));
    ws.threshold = aligned_alloc(64, ((size_t)job->cand_pad * sizeof(float) + 63) / 64 * 64);
    ws.scores = malloc((size_t)n_cands * capacity * sizeof(float));
    ws.positions = malloc((size_t)n_cands * capacity * sizeof(int32_t));
    ws.count = malloc((size_t)n_cands * sizeof(int64_t));
    if (!ws.rows || !ws.tiles || !ws.threshold || !ws.scores || !ws.positions || !ws.count) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
    } else {
        memset(ws.rows, 0, rows_bytes);  /* the columns past dim stay zero */
        TileConfig config;
        memset(&config, 0, sizeof(config));
        config.palette_id = 1;
        for (int t = 0; t < 8; t++) {
            config.rows[t] = 16;
            config.colsb[t] = 64;
        }
        _tile_loadconfig(&config);
        for (;;) {
            int64_t item = __atomic_fetch_add(&job->next_item, 1, __ATOMIC_RELAXED);
            if (item >= job->n_items) break;
            screen_item(job, &ws, item);
        }
        _tile_release();
    }
    free(ws.rows); free(ws.tiles); free(ws.threshold); free(ws.scores);
    free(ws.positions); free(ws.count);
    return NULL;
}

/* Screens every user; returns 0, or -1 when memory or threads could not be had. See the file
 * comment for layouts. Users are split into `splits` row ranges each (for parallelism when users
 * are fewer than threads) and merged here. */
int muse_screen_topk_amx(const uint16_t *screen, int64_t n_rows, int64_t dim,
                         const int64_t *history, int64_t hist_stride, const int64_t *lengths,
                         int64_t n_users, int64_t block_len, const uint16_t *cands,
                         int64_t n_cands, int64_t cand_pad, int64_t keep, int64_t splits,
                         int64_t n_threads, float *out_scores, int64_t *out_positions,
                         float *out_bound, int64_t *out_valid) {
    Job job;
    memset(&job, 0, sizeof(job));
    job.screen = screen; job.n_rows = n_rows; job.dim = dim; job.dim_pad = (dim + 31) / 32 * 32;
    job.history = history; job.hist_stride = hist_stride; job.lengths = lengths;
    job.n_users = n_users; job.cands = cands; job.n_cands = n_cands; job.cand_pad = cand_pad;
    job.keep = keep; job.capacity = CAPACITY_FACTOR * keep;
    if (splits < 1) splits = 1;
    int64_t span = (block_len + splits - 1) / splits;
    span = (span + GROUP_ROWS - 1) / GROUP_ROWS * GROUP_ROWS;
    if (span < GROUP_ROWS) span = GROUP_ROWS;
    splits = (block_len + span - 1) / span;
    if (splits < 1) splits = 1;
    job.n_items = n_users * splits;
    size_t per_item = (size_t)n_cands * keep;
    int64_t *item_user = malloc(job.n_items * 3 * sizeof(int64_t));
    job.item_scores = malloc(job.n_items * per_item * sizeof(float));
    job.item_positions = malloc(job.n_items * per_item * sizeof(int32_t));
    job.item_count = malloc(job.n_items * n_cands * sizeof(int64_t));
    job.item_bound = malloc(job.n_items * n_cands * sizeof(float));
    job.item_valid = malloc(job.n_items * sizeof(int64_t));
    int status = -1;
    if (!item_user || !job.item_scores || !job.item_positions || !job.item_count || !job.item_bound || !job.item_valid)
        goto done;
    for (int64_t u = 0; u < n_users; u++) {
        for (int64_t s = 0; s < splits; s++) {
            int64_t i = u * splits + s;
            item_user[i] = u;
            item_user[job.n_items + i] = s * span;
            item_user[2 * job.n_items + i] = (s + 1) * span < block_len ? (s + 1) * span : block_len;
        }
    }
    job.item_user = item_user;
    job.item_start = item_user + job.n_items;
    job.item_end = item_user + 2 * job.n_items;

    if (n_threads > job.n_items) n_threads = job.n_items;
    if (n_threads < 1) n_threads = 1;
    /* OpenMP, not threads of our own: this library binds to the libgomp torch already loaded
     * (same soname), so it shares torch's worker pool. A second pool would find torch's
     * workers still spinning after its last parallel op and run at half speed (measured). */
#pragma omp parallel num_threads((int)n_threads)
    worker(&job);
    if (job.failed) goto done;

    /* Merge the items of each user: keep the best `keep`, the bound is the largest left out. */
    float *merged = malloc((size_t)splits * keep * sizeof(float));
    int32_t *merged_pos = malloc((size_t)splits * keep * sizeof(int32_t));
    if (!merged || !merged_pos) {
        free(merged); free(merged_pos);
        goto done;
    }
    for (int64_t u = 0; u < n_users; u++) {
        int64_t valid = 0;
        for (int64_t s = 0; s < splits; s++) valid += job.item_valid[u * splits + s];
        out_valid[u] = valid;
        for (int64_t c = 0; c < n_cands; c++) {
            int64_t n = 0;
            float bound = -INFINITY;
            for (int64_t s = 0; s < splits; s++) {
                int64_t i = u * splits + s;
                int64_t cnt = job.item_count[i * n_cands + c];
                memcpy(merged + n, job.item_scores + (i * n_cands + c) * keep, cnt * sizeof(float));
                memcpy(merged_pos + n, job.item_positions + (i * n_cands + c) * keep, cnt * sizeof(int32_t));
                n += cnt;
                float b = job.item_bound[i * n_cands + c];
                bound = b > bound ? b : bound;
            }
            if (n > keep) {
                float cut = cut_to_best(merged, merged_pos, n, keep);
                bound = cut > bound ? cut : bound;
                n = keep;
            }
            float *os = out_scores + (u * n_cands + c) * keep;
            int64_t *op = out_positions + (u * n_cands + c) * keep;
            for (int64_t e = 0; e < keep; e++) {
                os[e] = e < n ? merged[e] : -INFINITY;
                op[e] = e < n ? merged_pos[e] : -1;
            }
            out_bound[u * n_cands + c] = bound;
        }
    }
    free(merged); free(merged_pos);
    status = 0;
done:
    free(item_user); free(job.item_scores); free(job.item_positions);
    free(job.item_count); free(job.item_bound); free(job.item_valid);
    return status;
}
