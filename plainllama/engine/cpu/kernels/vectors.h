/* Small vector helpers shared by the product files (cpu_matmul.c, cpu_matmul_avx2.c, q6_matmul.c),
 * at the width of the level a build is for (KERNELS_AVX512 in plainllama.h). */

#ifndef VECTORS_H
#define VECTORS_H

#include <immintrin.h>

#include "plainllama.h"

#if KERNELS_AVX512

/* 64 aligned bytes at p, loaded by an instruction of their own. In the prompt tiles (a few weight
 * rows by a few rows of x, every pair one vpdpbusd a step) GCC folds each use of x's step into its
 * vpdpbusd as a memory operand, W_ROWS loads of the same bytes instead of one: 20 loads a step for
 * 16 vpdpbusd, and a Zen 4 core loads one 512-bit vector a cycle. The empty asm gives the value a
 * register of its own. On a Zen 4 (benchmarks/products.py --prompt): 1.3-1.5x the int8 products. */
static inline __m512i load_held(const void *p) {
    __m512i v = _mm512_load_si512(p);
    __asm__("" : "+v"(v));
    return v;
}

/* r[c] = row c of a 16 x 16 matrix of dwords -> r[i] = column i */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) { /* interleave dwords of row pairs */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* then qwords of row quads: 4 x 4 blocks within each 128-bit lane */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) { /* then move the 128-bit lanes: two rounds of a 4 x 4 lane transpose */
        t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
        t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
        r[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd);
    }
}

/* acc[i] (i < n rows, 32 columns as two vectors) = the sum over j < J of a[i * a_stride + j] times
 * b[j * b_stride .. + 31], one FMA chain per output in order of j: per j two loads of b and one
 * broadcast of each row's a. The float32 products of prompts: float32_rows.c (a: x, b: a panel of
 * weight rows), prompt_attention_f32.c (q K^T and P V). n a constant at each call (<= 14: 28
 * accumulators); J >= 1, a do-while: as a for loop that may run no step, gcc -O3 stored the sums to
 * memory at every step (float32_rows.c at AVX2: 144 -> 207 GFLOP/s). */
static inline __attribute__((always_inline)) void rows_times_32(const float *a, long a_stride, const float *b, long b_stride,
                                                                int J, int n, __m512 acc[][2]) {
    for (int i = 0; i < n; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    int j = 0;
    do {
        __m512 b0 = _mm512_loadu_ps(b + j * b_stride), b1 = _mm512_loadu_ps(b + j * b_stride + 16);
        for (int i = 0; i < n; i++) {
            __m512 aij = _mm512_set1_ps(a[i * a_stride + j]);
            acc[i][0] = _mm512_fmadd_ps(aij, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(aij, b1, acc[i][1]);
        }
    } while (++j < J);
}

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

/* 32 floats (lo: the first 16, hi: the next 16) stored at out + i as store16 stores them: with AVX-512
 * BF16 one rounding instruction and one store for both (the same round-to-nearest-even bits) */
static inline void store32(void *out, size_t i, __m512 lo, __m512 hi, int f32) {
#if defined(__AVX512BF16__)
    if (!f32) {
        _mm512_storeu_si512((uint16_t *)out + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        return;
    }
#endif
    store16(out, i, lo, f32);
    store16(out, i + 16, hi, f32);
}

/* The sum of v's 16 lanes, added as a tree: lanes i and i + 8, then i and i + 4, i and i + 2, and
 * the last two (the tree GCC's _mm512_reduce_add_ps uses, written out so that sums16_4x4 below gives
 * the same bits whatever the compiler). A product's decode tiles and many-rows tiles sum their
 * accumulators with one or the other, so a row's result is the same in any company. */
static inline float sum16(__m512 v) {
    __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    return _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)));
}

/* sum16 of the 16 accumulators acc[r][i] of a 4 x 4 tile at once (a fifth of the instructions of 16
 * calls), the same tree on all 16 side by side; out[i * stride + r] = sum16(acc[r][i]). */
static inline void sums16_4x4(__m512 acc[4][4], float *out, size_t stride) {
    __m512 halves[8], fourths[4], eighths[2];
    for (int k = 0; k < 8; k++) { /* v = acc[r][i], v(4r + i): lanes i + i + 8, two v a vector */
        __m512 a = acc[(2 * k) / 4][(2 * k) % 4], b = acc[(2 * k + 1) / 4][(2 * k + 1) % 4];
        halves[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    } /* halves[k]: 128-bit chunks [v(2k) 0-3, v(2k) 4-7, v(2k+1) 0-3, v(2k+1) 4-7] */
    for (int k = 0; k < 4; k++) /* lanes i + i + 4: chunks [v(4k), v(4k+1), v(4k+2), v(4k+3)] */
        fourths[k] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * k], halves[2 * k + 1], 0x88),
                                   _mm512_shuffle_f32x4(halves[2 * k], halves[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++) { /* lanes i + i + 2: chunk c = [v(8k+c) 2 lanes, v(8k+4+c) 2 lanes] */
        __m512d a = _mm512_castps_pd(fourths[2 * k]), b = _mm512_castps_pd(fourths[2 * k + 1]);
        eighths[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* the last two lanes: chunk c = [v(c), v(4+c), v(8+c), v(12+c)] = [acc[0][c], acc[1][c], acc[2][c], acc[3][c]] */
    __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88), _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
    _mm_storeu_ps(out, _mm512_castps512_ps128(sums));
    _mm_storeu_ps(out + stride, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(out + 2 * stride, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(out + 3 * stride, _mm512_extractf32x4_ps(sums, 3));
}

#else /* AVX2 */

/* eight vectors of eight floats transposed: out[j] lane i = in[i] lane j (out may be in: every input
 * is read before any output is written) */
static inline void transpose8(const __m256 in[8], __m256 out[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(in[i], in[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(in[i], in[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        out[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
        out[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
    }
}

/* rows_times_32 at AVX2's width: acc[i] (i < n rows, 16 columns as two vectors) = the sum over j < J
 * of a[i * a_stride + j] times b[j * b_stride .. + 15], one FMA chain per output in order of j. n a
 * constant at each call (<= 6: 12 accumulators of the 16 registers); J >= 1, a do-while (the same
 * reason as above). float32_rows.c (a: x, b: a panel), prompt_attention_f32.c (q K^T and P V). */
static inline __attribute__((always_inline)) void rows_times_16(const float *a, long a_stride, const float *b, long b_stride,
                                                                int J, int n, __m256 acc[][2]) {
    for (int i = 0; i < n; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    int j = 0;
    do {
        __m256 b0 = _mm256_loadu_ps(b + j * b_stride), b1 = _mm256_loadu_ps(b + j * b_stride + 8);
        for (int i = 0; i < n; i++) {
            __m256 aij = _mm256_broadcast_ss(a + i * a_stride + j);
            acc[i][0] = _mm256_fmadd_ps(aij, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(aij, b1, acc[i][1]);
        }
    } while (++j < J);
}

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

/* acc + dot_u8s8(u, s): with AVX-VNNI one instruction (the sums chained in the accumulator, where
 * dot_u8s8 from zero then an add took a register copy and an add per step) */
static inline __m256i dot_u8s8_add(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
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
