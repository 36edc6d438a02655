/* Reading rows of an embedding table in its stored dtype, shared by the native kernels. */
#ifndef MUSE_TABLE_ROWS_H
#define MUSE_TABLE_ROWS_H

#include <immintrin.h>
#include <stdint.h>

/* Row `id` of a table of `dtype` (0 float32, 1 float16, 2 bfloat16, 3 int8), dims [d, d + 16)
 * masked to `lanes`, as float32 (exactly: every stored value is a float32). */
static inline __m512 load_row16(const void *table, int64_t dtype, int64_t dim, int64_t id, int64_t d, __mmask16 lanes) {
    const int64_t at = id * dim + d;
    switch (dtype) {
    case 0: return _mm512_maskz_loadu_ps(lanes, (const float *)table + at);
    case 1: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)table + at));
    case 2: return _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)table + at)), 16));
    default: return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lanes, (const int8_t *)table + at)));
    }
}

#endif
