/* Small vector helpers shared by the product files (cpu_matmul.c, cpu_matmul_avx2.c, q6_matmul.c),
 * at the width of the level a build is for (KERNELS_AVX512 in plainllama.h). */

#ifndef VECTORS_H
#define VECTORS_H

#include <immintrin.h>

#include "plainllama.h"

#if KERNELS_AVX512

/* 16 floats -> bfloat16, rounded to nearest even: one instruction with AVX-512 BF16; Ice Lake and
 * Tiger Lake have VNNI without it, so there the rounding is done on the bits (the same result for
 * finite values). */
static inline __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16));
#endif
}

/* 16 floats stored at out + i as float32 (f32) or rounded to bfloat16: the unpacking functions
 * write either, for prompts multiplied in float32 or in bfloat16 */
static inline void store16(void *out, size_t i, __m512 v, int f32) {
    if (f32)
        _mm512_storeu_ps((float *)out + i, v);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), to_bf16(v));
}

#else /* AVX2 */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* int32 [8] sums of u[j] * s[j] over groups of four bytes: unsigned u, signed s */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* 8 floats -> bfloat16, rounded to nearest even on the bits, as vcvtneps2bf16 and PyTorch do
 * (finite values) */
static inline __m128i to_bf16_8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* 8 floats stored at out + i as float32 (f32) or rounded to bfloat16 */
static inline void store8(void *out, size_t i, __m256 v, int f32) {
    if (f32)
        _mm256_storeu_ps((float *)out + i, v);
    else
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), to_bf16_8(v));
}

#endif

#endif
