/* A call's candidates for the fused screen, made in one native call each instead of ~10 torch
 * ops (~10 us apiece here; with the other per-call savings of the same change a call at
 * L = 1,000, C = 100 spends 0.23 ms in Python instead of 0.28, of ~0.5 ms in all).
 *
 * muse_unit_candidates: rows `ids` of a table of any stored dtype as float32 times their
 *   reciprocal norms, one multiply per value (the arithmetic of the table's bf16 copy, so its
 *   measured rounding holds for them), and the largest of `row_error` over the ids.
 * muse_bf16_candidates: float32 [n_users, n_cands, dim] -> bf16 bits [n_users, cand_pad, dim_pad],
 *   rounded to nearest even (as torch's conversion), zero padded: the tile operand of the screen.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "table_rows.h"

/* Below this many candidates one thread does it: starting the others costs more. */
#define PARALLEL_ROWS 4096

/* Lanes [d, d + 16) of a row of `dim` values. */
static inline __mmask16 row_lanes(int64_t dim, int64_t d) {
    return d + 16 <= dim ? 0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
}

/* out [n, dim] = table[ids] * inv_norm[ids]; returns the largest row_error[ids] (0 for n = 0;
 * row_error may be NULL: 0). */
float muse_unit_candidates(const void *table, int64_t dtype, int64_t dim, const float *inv_norm, const float *row_error,
                           const int64_t *ids, int64_t n, float *out) {
    float worst = 0.0f;
    /* many candidates (B = 100, C = 1,000: 100K random rows) on every thread: ~2x */
#pragma omp parallel for reduction(max : worst) schedule(static) if (n >= PARALLEL_ROWS)
    for (int64_t i = 0; i < n; i++) {
        const int64_t id = ids[i];
        const __m512 scale = _mm512_set1_ps(inv_norm[id]);
        for (int64_t d = 0; d < dim; d += 16) {
            const __mmask16 lanes = row_lanes(dim, d);
            _mm512_mask_storeu_ps(out + i * dim + d, lanes, _mm512_mul_ps(load_row16(table, dtype, dim, id, d, lanes), scale));
        }
        if (row_error && row_error[id] > worst) worst = row_error[id];
    }
    return worst;
}

void muse_bf16_candidates(const float *unit, int64_t n_users, int64_t n_cands, int64_t dim, int64_t cand_pad,
                          int64_t dim_pad, uint16_t *out) {
#pragma omp parallel for collapse(2) schedule(static) if (n_users * cand_pad >= PARALLEL_ROWS)
    for (int64_t u = 0; u < n_users; u++) {
        for (int64_t c = 0; c < cand_pad; c++) {
            uint16_t *row = out + (u * cand_pad + c) * dim_pad;
            if (c >= n_cands) {
                memset(row, 0, (size_t)dim_pad * sizeof(uint16_t));
                continue;
            }
            const float *q = unit + (u * n_cands + c) * dim;
            for (int64_t d = 0; d < dim_pad; d += 16) {
                /* lanes past dim load as 0.0, whose bf16 bits are 0: the padding */
                const __m512 v = d < dim ? _mm512_maskz_loadu_ps(row_lanes(dim, d), q + d) : _mm512_setzero_ps();
                _mm256_storeu_si256((__m256i *)(row + d), (__m256i)_mm512_cvtneps_pbh(v));
            }
        }
    }
}
