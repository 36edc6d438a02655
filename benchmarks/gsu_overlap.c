/* Does the fused GSU screen's memory traffic overlap its tile products on this CPU?
 *
 * One core, the screen's own pattern without its selection: 100,000 random 256-byte rows of a
 * table on huge pages, gathered 32 at a time and transposed into the pair layout of the tile
 * product by the screen's own gather_group (rows prefetched AHEAD rows ahead), and AMX-BF16 tile
 * products of each group against `tiles` tiles of 16 candidates (2 x 2 blocks, as the screen).
 * Timed apart and together:
 *   gather    the gather and transposes alone;
 *   tiles     the tile products alone, on one L1-resident group;
 *   both      the two interleaved as in the screen (a group gathered, the previous one scored,
 *             the prefetches spread between the tile products);
 *   fma       a vector-FMA loop of similar length alone, and fma_tiles: the same FMAs between
 *             the tile products, to show that arithmetic does overlap them;
 *   prefetch  the screen's prefetches of every row alone (no loads of the rows), and
 *             prefetch_tiles: the same prefetches spread between the tile products, again without
 *             the gather: what the memory requests alone do to the tile products;
 *   products  the tile products with each unit's operand tiles loaded once instead of before
 *             every product (wrong sums, the same products), alone, and prefetch_products: with
 *             the prefetches between them: whether the tile loads are what waits while the
 *             misses are outstanding;
 *   loads     the tile loads of every product without the products, alone, and loads_prefetch:
 *             with the prefetches between them: the tile loads alone against the misses;
 *   small     the tile products with every unit reading the first two candidate tiles (8 KiB of
 *             operands, resident in L1; wrong sums, the same tile loads and products), alone,
 *             and small_prefetch: with the prefetches between them: whether it is the number
 *             of tile loads that waits, or the L1 misses of a larger candidate set;
 *   int8      `both` for the int8 screen: 128-byte rows of an int8 copy of the table, gathered
 *             by the same code (as 16-bit pairs) and scored with AMX-INT8 (64 dims a tile, so
 *             half the tile products), and int8_gather: its gather alone.
 * Prints one line of JSON: best of `repeats` seconds for each. Built and run by gsu_overlap.py. */
#define _GNU_SOURCE
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>

/* the screen's own gather, transposes and prefetches (gather_group, prefetch_row, configure_tiles) */
#include "../kernels/native/screen_amx.c"

#define ROWS 100000
#define TABLE_ROWS 1000000
#define DIM 128
#define AHEAD 96 /* rows prefetched ahead of the gather, as the screen's PREFETCH_GROUPS */

static Job job, job8;        /* only the fields gather_group and prefetch_row read; job8: the int8 copy */
static int64_t *ids;
static uint32_t *group_rows; /* [2 groups][2 blocks][4 slices][16][16] */
static uint16_t *cands;      /* [tiles * 16][DIM] */
static float *scores;        /* [4][16][16] */
static int n_tiles;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Gathers rows [first, first + 32) in pair layout; with `prefetch`, requests rows AHEAD further
 * on first (the screen spreads those between its tile products instead). */
static void gather(const Job *from, int64_t first, uint32_t *out, int prefetch) {
    for (int64_t i = first + AHEAD; prefetch && i < first + AHEAD + 32 && i < ROWS; i++) prefetch_row(from, ids[i]);
    gather_group(from, ids, first, ROWS, out);
}

static __m512 fma_work(int steps, __m512 acc) {
    const __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
    __m512 c0 = acc, c1 = acc, c2 = acc, c3 = acc;
    for (int i = 0; i < steps; i++) {
        c0 = _mm512_fmadd_ps(a, c0, b);
        c1 = _mm512_fmadd_ps(a, c1, b);
        c2 = _mm512_fmadd_ps(a, c2, b);
        c3 = _mm512_fmadd_ps(a, c3, b);
    }
    return _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3));
}

/* One group (32 rows) against every candidate tile, 2 x 2 blocks; `fma_steps` of FMAs after each
 * pair; rows [fetch, fetch + 32) are prefetched a few at a time between the tile products when
 * fetch >= 0, as the screen does; `reload` 0: the operand tiles are loaded for a unit's first
 * slice only; `small`: every unit reads the first two candidate tiles; `loads_only`: the operand
 * tiles are loaded and no product is taken. */
static __m512 score_group(const uint32_t *rows, int fma_steps, __m512 acc, int64_t fetch, int reload, int int8,
                          int small, int loads_only) {
    /* a tile's depth is 32 bf16 or 64 int8 dims: 64 bytes of a row either way */
    const int slices = int8 ? DIM / 64 : DIM / 32, row_bytes = int8 ? DIM : DIM * 2;
    const int steps = n_tiles / 2 * slices, per_step = (32 + steps - 1) / steps;
    int64_t fetched = 0;
    for (int t = 0; t < n_tiles; t += 2) {
        const char *a0 = (const char *)cands + (small ? 0 : t) * 16 * row_bytes, *a1 = a0 + 16 * row_bytes;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int kk = 0; kk < slices; kk++) {
            if (reload || kk == 0) {
                _tile_loadd(4, a0 + kk * 64, row_bytes);
                _tile_loadd(5, a1 + kk * 64, row_bytes);
                _tile_loadd(6, rows + kk * 256, 64);
                _tile_loadd(7, rows + (slices + kk) * 256, 64);
            }
            if (loads_only) {
            } else if (int8) {
                _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
            } else {
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
            for (int i = 0; fetch >= 0 && i < per_step && fetched < 32 && fetch + fetched < ROWS; i++, fetched++)
                prefetch_row(int8 ? &job8 : &job, ids[fetch + fetched]);
        }
        _tile_stored(0, scores, 64);
        _tile_stored(1, scores + 256, 64);
        _tile_stored(2, scores + 512, 64);
        _tile_stored(3, scores + 768, 64);
        if (fma_steps) acc = fma_work(fma_steps, acc);
    }
    return acc;
}

enum { GATHER, TILES, BOTH, FMA, FMA_TILES, PREFETCH, PREFETCH_TILES, PRODUCTS, PREFETCH_PRODUCTS, LOADS, LOADS_PREFETCH,
       SMALL, SMALL_PREFETCH, INT8_GATHER, INT8, MODES };

/* Seconds of one pass of `mode` over the history. */
static double run(int mode, int fma_steps) {
    __m512 acc = _mm512_setzero_ps();
    {
        double start = now();
        for (int64_t g = 0, step = 0; g < ROWS; g += 32, step++) {
            uint32_t *next = group_rows + ((step + 1) & 1) * 2048;
            if ((mode == GATHER || mode == BOTH) && g + 32 < ROWS) gather(&job, g + 32, next, mode == GATHER);
            if ((mode == INT8_GATHER || mode == INT8) && g + 32 < ROWS) gather(&job8, g + 32, next, mode == INT8_GATHER);
            if (mode == TILES) acc = score_group(group_rows, 0, acc, -1, 1, 0, 0, 0);
            if (mode == BOTH) acc = score_group(group_rows + (step & 1) * 2048, 0, acc, g + 32 + AHEAD, 1, 0, 0, 0);
            if (mode == INT8) acc = score_group(group_rows + (step & 1) * 2048, 0, acc, g + 32 + AHEAD, 1, 1, 0, 0);
            if (mode == FMA_TILES) acc = score_group(group_rows, fma_steps, acc, -1, 1, 0, 0, 0);
            if (mode == PREFETCH)
                for (int64_t i = g + 32 + AHEAD; i < g + 64 + AHEAD && i < ROWS; i++) prefetch_row(&job, ids[i]);
            if (mode == PRODUCTS) acc = score_group(group_rows, 0, acc, -1, 0, 0, 0, 0);
            if (mode == PREFETCH_TILES || mode == PREFETCH_PRODUCTS)
                acc = score_group(group_rows, 0, acc, g + 32 + AHEAD, mode == PREFETCH_TILES, 0, 0, 0);
            if (mode == LOADS || mode == LOADS_PREFETCH)
                acc = score_group(group_rows, 0, acc, mode == LOADS ? -1 : g + 32 + AHEAD, 1, 0, 0, 1);
            if (mode == SMALL) acc = score_group(group_rows, 0, acc, -1, 1, 0, 1, 0);
            if (mode == SMALL_PREFETCH) acc = score_group(group_rows, 0, acc, g + 32 + AHEAD, 1, 0, 1, 0);
            if (mode == FMA) for (int t = 0; t < n_tiles; t += 2) acc = fma_work(fma_steps, acc);
        }
        double elapsed = now() - start;
        float sink[16];
        _mm512_storeu_ps(sink, acc);
        return elapsed + (sink[0] == 12345.0f ? 1e-12 : 0.0);
    }
}

int main(int argc, char **argv) {
    n_tiles = argc > 1 ? atoi(argv[1]) : 8;
    int repeats = argc > 2 ? atoi(argv[2]) : 10;
    int fma_steps = argc > 3 ? atoi(argv[3]) : 24;
    n_tiles += n_tiles & 1;
    if (!muse_amx_available() || !muse_amx_int8_available()) {
        printf("{\"error\": \"this CPU or OS offers no AMX-BF16 and AMX-INT8\"}\n");
        return 1;
    }
    size_t bytes = (size_t)TABLE_ROWS * DIM * 2;
    uint16_t *table = aligned_alloc(1 << 21, bytes);
    madvise(table, bytes, MADV_HUGEPAGE);
    for (size_t i = 0; i < bytes / 2; i++) table[i] = (uint16_t)(0x3C00 + (i & 0xFF));
    job.screen = table;
    job.n_rows = TABLE_ROWS;
    job.dim = job.dim_pad = DIM;
    /* the int8 copy: rows of DIM bytes, read as DIM / 2 16-bit pairs */
    uint16_t *table8 = aligned_alloc(1 << 21, bytes / 2);
    madvise(table8, bytes / 2, MADV_HUGEPAGE);
    for (size_t i = 0; i < bytes / 4; i++) table8[i] = (uint16_t)(0x0101 + (i & 0x3F3F));
    job8.screen = table8;
    job8.n_rows = TABLE_ROWS;
    job8.dim = job8.dim_pad = DIM / 2;
    ids = malloc(ROWS * sizeof(int64_t));
    uint64_t state = 88172645463325252ull;
    for (int i = 0; i < ROWS; i++) {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17;
        ids[i] = (int64_t)(state % TABLE_ROWS);
    }
    group_rows = aligned_alloc(64, 2 * 2048 * sizeof(uint32_t));
    memset(group_rows, 0, 2 * 2048 * sizeof(uint32_t));
    cands = aligned_alloc(64, (size_t)n_tiles * 16 * DIM * 2);
    memset(cands, 0, (size_t)n_tiles * 16 * DIM * 2);
    scores = aligned_alloc(64, 1024 * sizeof(float));
    configure_tiles();
    const char *names[MODES] = {"gather", "tiles", "both", "fma", "fma_tiles", "prefetch", "prefetch_tiles",
                               "products", "prefetch_products", "loads", "loads_prefetch", "small", "small_prefetch", "int8_gather", "int8"};
    double seconds[MODES];
    for (int m = 0; m < MODES; m++) seconds[m] = 1e30;
    /* one untimed round (the first tile products of a process run slow), then the best of
     * `repeats` rounds taken in turn, so a drift of the machine touches every mode alike */
    for (int r = -1; r < repeats; r++)
        for (int m = 0; m < MODES; m++) {
            double s = run(m, fma_steps);
            if (r >= 0 && s < seconds[m]) seconds[m] = s;
        }
    _tile_release();
    printf("{\"rows\": %d, \"candidates\": %d, \"fma_steps\": %d", ROWS, n_tiles * 16, fma_steps);
    for (int m = 0; m < MODES; m++) printf(", \"%s_s\": %.6f", names[m], seconds[m]);
    printf("}\n");
    return 0;
}
