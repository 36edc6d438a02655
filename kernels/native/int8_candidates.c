/* Candidates of the int8 screen, quantised in one native call (kernels/int8_screen.py has the
 * method and the error bound). The same arithmetic in ~40 torch ops cost ~0.2 ms a call at
 * C = 100, most of it per-op overhead: 7% of a 100K-row screen.
 *
 * Per candidate q (float32 unit vector [dim]) and per-dimension scales s [dim]:
 *   q'_d = q_d s_d (float32), t = max |q'| / 127 (1 for a zero candidate),
 *   hi codes j_d = clamp(round(q'_d / t), -127, 127) (round half to even, as torch.round),
 *   with two parts also lo codes l_d = round((q'_d / t - j_d) * lo_steps),
 *   scale = t (one part) or t / lo_steps (two parts): a score per unit of int32 sum,
 *   q~_d = t (j_d + l_d / lo_steps) / s_d.
 * Measured in double: ||q~ - q||, ||q~||, and with two parts ||q~ - q~hi|| (q~hi: the hi codes
 * alone), the largest of each over the candidates written to stats[0..2]; and, where `terms`
 * (slack, row_term, constant: kernels.int8_screen.error_terms) is given, each candidate's own
 * screen error slack * (row_term * ||q~|| + ||q~ - q|| + constant), rounded up to float, into
 * cand_error [n_users, n_cands].
 *
 * Layouts: unit float32 [n_users, n_cands, dim]; codes and lo int8 [n_users, cand_pad, dim_pad]
 * (zero padded here); scale float32 [n_users, cand_pad] (1 in padding). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LEVELS 127

/* Lanes [d, d + 16) of a vector of `dim` floats. */
static inline __mmask16 lanes_at(int64_t dim, int64_t d) {
    return d + 16 <= dim ? 0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
}

/* The 16 floats of v as two vectors of 8 doubles (low half, high half). */
static inline void widen(__m512 v, __m512d *low, __m512d *high) {
    *low = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    *high = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, 0xEE)));
}

/* Codes of one candidate q [dim]; returns its scale and adds its squared norms to sums[0..2]
 * (||q~ - q||^2, ||q~||^2, ||q~ - q~hi||^2, as 8 double lanes each). */
static float quantize_one(const float *q, int64_t dim, const float *dim_scale, const double *unscale, int two_parts,
                          int64_t lo_steps, int8_t *hi_out, int8_t *lo_out, __m512d sums[3]) {
    __m512 peak = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        const __mmask16 m = lanes_at(dim, d);
        const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, dim_scale + d));
        peak = _mm512_max_ps(peak, _mm512_abs_ps(scaled));
    }
    float step = _mm512_reduce_max_ps(peak) / LEVELS;
    step = step > 0.0f ? step : 1.0f;
    const double lo_step = (double)step / (double)lo_steps;
    const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  /* half to even, as torch.round */
    for (int64_t d = 0; d < dim; d += 16) {
        const __mmask16 m = lanes_at(dim, d);
        const __m512 value = _mm512_maskz_loadu_ps(m, q + d);
        const __m512 exact = _mm512_div_ps(_mm512_mul_ps(value, _mm512_maskz_loadu_ps(m, dim_scale + d)), _mm512_set1_ps(step));
        __m512 hi = _mm512_roundscale_ps(exact, round);
        hi = _mm512_min_ps(_mm512_max_ps(hi, _mm512_set1_ps(-LEVELS)), _mm512_set1_ps(LEVELS));
        __m512 lo = _mm512_setzero_ps();
        if (two_parts) lo = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(exact, hi), _mm512_set1_ps((float)lo_steps)), round);
        _mm_mask_storeu_epi8(hi_out + d, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(hi)));
        if (two_parts) _mm_mask_storeu_epi8(lo_out + d, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(lo)));
        __m512d his[2], los[2], values[2];
        widen(hi, &his[0], &his[1]);
        widen(lo, &los[0], &los[1]);
        widen(value, &values[0], &values[1]);
        for (int h = 0; h < 2; h++) {  /* padding lanes are 0 in every operand: they add nothing */
            const __m512d unscaled = _mm512_loadu_pd(unscale + d + 8 * h);
            const __m512d hi_only = _mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd((double)step), his[h]), unscaled);
            const __m512d part = _mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(lo_step), los[h]), unscaled);
            const __m512d rounded = _mm512_add_pd(hi_only, part);
            const __m512d miss = _mm512_sub_pd(rounded, values[h]);
            sums[0] = _mm512_fmadd_pd(miss, miss, sums[0]);
            sums[1] = _mm512_fmadd_pd(rounded, rounded, sums[1]);
            sums[2] = _mm512_fmadd_pd(part, part, sums[2]);
        }
    }
    return two_parts ? step / (float)lo_steps : step;
}

void muse_quantize_candidates(const float *unit, int64_t n_users, int64_t n_cands, int64_t dim,
                              const float *dim_scale, int64_t cand_pad, int64_t dim_pad, int64_t two_parts,
                              int64_t lo_steps, int8_t *codes, int8_t *lo, float *scale, double *stats,
                              const double *terms, float *cand_error) {
    double worst[3] = {0, 0, 0};
    const int64_t dim16 = (dim + 15) / 16 * 16;
    double *unscale = calloc((size_t)dim16, sizeof(double));  /* 1 / s_d, 0 past dim */
    if (!unscale) {
        stats[0] = stats[1] = stats[2] = NAN;  /* the caller refuses them */
        return;
    }
    for (int64_t d = 0; d < dim; d++) unscale[d] = 1.0 / dim_scale[d];
    memset(codes, 0, (size_t)(n_users * cand_pad * dim_pad));
    if (two_parts) memset(lo, 0, (size_t)(n_users * cand_pad * dim_pad));
    for (int64_t u = 0; u < n_users; u++) {
        for (int64_t c = 0; c < cand_pad; c++) {
            const int64_t row = u * cand_pad + c;
            if (c >= n_cands) {
                scale[row] = 1.0f;
                continue;
            }
            __m512d sums[3] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
            scale[row] = quantize_one(unit + (u * n_cands + c) * dim, dim, dim_scale, unscale, (int)two_parts, lo_steps,
                                      codes + row * dim_pad, two_parts ? lo + row * dim_pad : NULL, sums);
            double sum[3];
            for (int i = 0; i < 3; i++) {
                sum[i] = _mm512_reduce_add_pd(sums[i]);
                worst[i] = sum[i] > worst[i] ? sum[i] : worst[i];
            }
            if (terms) {
                const double error = terms[0] * (terms[1] * sqrt(sum[1]) + sqrt(sum[0]) + terms[2]);
                float rounded = (float)error;
                if ((double)rounded < error) rounded = nextafterf(rounded, INFINITY);
                cand_error[u * n_cands + c] = rounded;
            }
        }
    }
    free(unscale);
    /* the roundings of these sums are ~1e-16 relative: the error bound's 1% slack covers them */
    for (int i = 0; i < 3; i++) stats[i] = sqrt(worst[i]);
}
