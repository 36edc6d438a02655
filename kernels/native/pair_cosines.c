/* Cosines between rows of a table, for the feature builder (recsys/features.py `_cosines`).
 *
 * out[b, c, m] = (<t, r> * inv(t)) * inv(r), with t = row targets[b, c] and r = row ids[b, m]
 * (rows shared by a user's targets) or ids[b, c, m] (rows of their own); inv(v) = 1 / sqrt(<v, v>),
 * 0 for a zero row or an id outside [0, n_rows) (so such pairs score 0). Every sum is float32,
 * 16 dims at a time in order, its lanes then added by _mm512_reduce_add_ps: each pair and each
 * norm is computed on its own in one fixed order, so its bits never depend on the batch it comes
 * in (a candidate scored online gets the feature it got offline). The table's scale (int8) cancels
 * in a cosine and is not needed.
 *
 * Layouts (row-major, contiguous): table [n_rows, dim] of dtype 0 float32 / 1 float16 /
 * 2 bfloat16 / 3 int8; targets int64 [n_users, n_targets]; ids int64 [n_users, n_ids] or
 * [n_users, n_targets, n_ids] (`per_target`); out float32 [n_users, n_targets, n_ids]. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "table_rows.h"

static inline __mmask16 dim_lanes(int64_t dim, int64_t d) {
    return d + 16 <= dim ? 0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
}

static inline int64_t known(int64_t id, int64_t n_rows) {
    return id >= 0 && id < n_rows ? id : -1;
}

/* 1 / |row id| (0 for a zero row or an unknown id). */
static float inverse_norm(const void *table, int64_t dtype, int64_t dim, int64_t id) {
    if (id < 0) return 0.0f;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        const __m512 v = load_row16(table, dtype, dim, id, d, dim_lanes(dim, d));
        sum = _mm512_fmadd_ps(v, v, sum);
    }
    const float squares = _mm512_reduce_add_ps(sum);
    return squares > 0.0f ? 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(squares))) : 0.0f;
}

/* <row a, row b>, both known ids. */
static float row_dot(const void *table, int64_t dtype, int64_t dim, int64_t a, int64_t b) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        const __mmask16 lanes = dim_lanes(dim, d);
        sum = _mm512_fmadd_ps(load_row16(table, dtype, dim, a, d, lanes), load_row16(table, dtype, dim, b, d, lanes), sum);
    }
    return _mm512_reduce_add_ps(sum);
}

/* See the file comment. Returns 0, or -1 when its scratch could not be allocated. */
int muse_pair_cosines(const void *table, int64_t dtype, int64_t n_rows, int64_t dim, const int64_t *targets,
                      int64_t n_users, int64_t n_targets, const int64_t *ids, int64_t n_ids, int64_t per_target,
                      int64_t n_threads, float *out) {
    /* the rows' inverse norms once per row slot (a shared row serves every target of its user) */
    const int64_t slots = n_users * (per_target ? n_targets : 1) * n_ids;
    float *row_inv = malloc((size_t)(slots > 0 ? slots : 1) * sizeof(float));
    if (!row_inv) return -1;
#pragma omp parallel num_threads((int)n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t s = 0; s < slots; s++) row_inv[s] = inverse_norm(table, dtype, dim, known(ids[s], n_rows));
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < n_users * n_targets; pair++) {
            const int64_t target = known(targets[pair], n_rows);
            const float target_inv = inverse_norm(table, dtype, dim, target);
            const int64_t first = (per_target ? pair : pair / n_targets) * n_ids;
            float *row_out = out + pair * n_ids;
            for (int64_t m = 0; m < n_ids; m++) {
                const int64_t id = known(ids[first + m], n_rows);
                const float inv = row_inv[first + m];
                row_out[m] = target_inv > 0.0f && inv > 0.0f ? row_dot(table, dtype, dim, target, id) * target_inv * inv : 0.0f;
            }
        }
    }
    free(row_inv);
    return 0;
}
