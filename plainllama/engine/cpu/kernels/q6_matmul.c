/* Products with Q6_K weights kept as stored (6.56 bits per weight), and Q2_K's (2.625: at the end of
 * the file; they share the activations' arrangement and the step order), for decoding: a few rows of
 * activations x [M, K] times W [N, K]. Q6_K is in nearly every file people download (the output
 * projection, value and down projections of Q4_K_M and Q5_K_M, all of Q6_K); requantized to Q8_0
 * it read 1.3x the bytes per token and rounded a second time.
 *
 * Layout "q6" (engine/cpu/packed.py's _pack_q6_k), per row, super-blocks of 256 weights: sub-block
 * j (0..15) is weights 16j..16j+15 with an int8 scale sc[j]; weight = d * sc[j] * (q - 32) with
 * q 0..63, Q6_K's own numbers. The 6-bit values are regrouped at load so that one 64-byte vector
 * holds four consecutive weights of each of the 16 sub-blocks: "step" s (0..3) is weights
 * 16j + 4s .. 16j + 4s + 3 in bytes 4j .. 4j + 3. A super-block's 192 bytes are
 *   a[64]  step 0 in bits 0-5, bits 0-1 of step 3 in bits 6-7
 *   b[64]  step 1 in bits 0-5, bits 2-3 of step 3 in bits 6-7
 *   c[64]  step 2 in bits 0-5, bits 4-5 of step 3 in bits 6-7
 * so that steps 0-2 are one AND each and step 3 three shifts and three bitwise steps (9 operations
 * a super-block at AVX-512, 11 at AVX2; the earlier split into low nibbles and high bits took 13
 * and 21: decode products 1.10-1.14x faster per super-block in L2 and L3, docs/performance.md)
 * then sc [N, K/16] int8 and d [N, K/256] float16 beside them.
 *
 * x is quantized to int8 per 32 as in cpu_matmul.c (scale max|x| / 127, rounded to nearest even)
 * and arranged in the same step order, so each int32 lane of a vpdpbusd follows one sub-block:
 * four steps give the 16 sub-blocks' integer dot products, q's +32 offset is taken out with x's
 * sub-block sums, then one convert and one multiply-add per 256 weights. AVX2 takes the 16 lanes as
 * two halves of 8 (bytes 0-31 and 32-63 of each step), with vpmaddubsw + vpmaddwd (or AVX-VNNI).
 * The integer products are exact (2 * 63 * 127 < 32767); a (weight row, x row) pair's arithmetic is
 * the same in any company (batch invariance), as in cpu_matmul.c.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plainllama.h"
#include "unpack.h"
#include "row_groups.h"
#include "vectors.h"

#define SUPER 256         /* weights per super-block */
#define SUPER_BYTES 192   /* bytes of 6-bit values per super-block */
#define SUBS 16           /* sub-blocks of 16 weights per super-block */
#define Q6_ROWS 4         /* weight rows per work item */
#define Q6_MANY_ROWS 16   /* rows of x from which a work item's rows are unpacked once (q6_group) */
#if KERNELS_AVX512
#define Q6_X_TILE 4       /* rows of x per unpacking of a weight row's super-block */
#else
#define Q6_X_TILE 2
#endif

/* x quantized per 32 and arranged like the weights: xq [M, S, 4 steps, 16 lanes, 4 bytes]; per
 * (row, super-block, lane): dx, the scale of the 32-block the sub-block lies in, and sum32 =
 * 32 * the sum of the sub-block's int8 values. */
typedef struct {
    int8_t *xq;
    float *dx;
    int32_t *sum32;
} Q6Activations;

static void free_q6_activations(Q6Activations *a) {
    free(a->xq);
    free(a->dx);
    free(a->sum32);
}

static int arrange_q6_activations(const float *x, int M, int K, Q6Activations *a) {
    size_t supers = (size_t)M * (K / SUPER);
    a->xq = aligned_alloc(64, supers * SUPER);
    a->dx = aligned_alloc(64, supers * SUBS * sizeof(float));
    a->sum32 = aligned_alloc(64, supers * SUBS * sizeof(int32_t));
    if (!a->xq || !a->dx || !a->sum32) return STATUS_OUT_OF_MEMORY;
#pragma omp parallel for schedule(static) if (M >= 16) /* a prompt's rows on every thread */
    for (size_t sb = 0; sb < supers; sb++) {
        const float *xs = x + sb * SUPER; /* rows are whole super-blocks */
        int8_t *dst = a->xq + sb * SUPER;
        for (int b = 0; b < SUPER / 32; b++) { /* the 32-blocks: sub-blocks 2b and 2b + 1 */
            const float *xb = xs + 32 * b;
            __m256 v[4];
            __m256 amax8 = _mm256_setzero_ps();
            for (int k = 0; k < 4; k++) {
                v[k] = _mm256_loadu_ps(xb + 8 * k);
                amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[k])); /* |x| */
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            float d = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
            for (int half = 0; half < 2; half++) { /* sub-block j: 16 values, 4 steps of 4 bytes */
                int j = 2 * b + half;
                __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * half], _mm256_set1_ps(inv))); /* round to nearest even */
                __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * half + 1], _mm256_set1_ps(inv)));
                __m256i sum8 = _mm256_add_epi32(lo, hi);
                __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
                sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4E));
                sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xB1));
                /* 16 int32 (|q| <= 127) -> 16 bytes in order: packs work within 128-bit halves */
                __m256i words = _mm256_packs_epi32(lo, hi);  /* lo0-3 hi0-3 | lo4-7 hi4-7 */
                __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
                bytes = _mm_shuffle_epi32(bytes, 0xD8); /* lo0-3 lo4-7 hi0-3 hi4-7: values 0..15 */
                int32_t steps[4];
                _mm_storeu_si128((__m128i *)steps, bytes);
                for (int step = 0; step < 4; step++) memcpy(dst + 64 * step + 4 * j, &steps[step], 4); /* values 4s..4s+3 in lane j */
                a->dx[sb * SUBS + j] = d;
                a->sum32[sb * SUBS + j] = 32 * _mm_cvtsi128_si32(sum4);
            }
        }
    }
    return STATUS_OK;
}

typedef struct {
    int M, K, N, supers;
    const uint8_t *qs;
    const int8_t *sc;
    const uint16_t *d;
    Q6Activations xa;
    float *out;
    int ahead; /* rows fetched ahead (ahead_rows) */
} Q6Product;

#if KERNELS_AVX512

/* A super-block's four steps as unsigned bytes q = 0..63 */
static inline void q6_steps(const uint8_t *src, __m512i w[4]) {
    const __m512i low6 = _mm512_set1_epi8(0x3F), bits01 = _mm512_set1_epi8(0x03), bits23 = _mm512_set1_epi8(0x0C),
                  bits45 = _mm512_set1_epi8(0x30);
    __m512i a = _mm512_loadu_si512(src), b = _mm512_loadu_si512(src + 64), c = _mm512_loadu_si512(src + 128);
    w[0] = _mm512_and_si512(a, low6);
    w[1] = _mm512_and_si512(b, low6);
    w[2] = _mm512_and_si512(c, low6);
    /* step 3 from the top two bits of a, b, c: each 16-bit shift brings them to their place, and a
     * vpternlog "mask ? first : second" (0xE4) keeps only those bits (the shifts carry neighbouring
     * bits in around them) */
    __m512i bits = _mm512_and_si512(_mm512_srli_epi16(c, 2), bits45);
    bits = _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 4), bits, bits23, 0xE4);
    w[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(a, 6), bits, bits01, 0xE4);
}

/* Super-block sb of weight row n + r times x rows i0 .. i0+XT-1, added to acc[i] */
static inline __attribute__((always_inline)) void q6_super(const Q6Product *p, int n, int r, int sb, int i0, int XT,
                                                           const uint8_t *ahead, __m512 acc[Q6_X_TILE]) {
    int S = p->supers;
    size_t row_bytes = (size_t)S * SUPER_BYTES;
    const uint8_t *src = p->qs + (size_t)(n + r) * row_bytes + (size_t)sb * SUPER_BYTES;
    if (ahead) { /* this super-block of the row p->ahead rows further on, and its scales */
        for (int line = 0; line < SUPER_BYTES; line += 64)
            _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + (size_t)sb * SUPER_BYTES + line), PREFETCH_HINT);
        size_t later = (size_t)(n + r + p->ahead) * S + sb;
        _mm_prefetch((const char *)(p->sc + later * SUBS), PREFETCH_HINT);
        _mm_prefetch((const char *)(p->d + later), PREFETCH_HINT);
    }
    __m512i w[4];
    q6_steps(src, w);
    __m512 scales = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p->sc + ((size_t)(n + r) * S + sb) * SUBS)))),
        _mm512_set1_ps(_cvtsh_ss(p->d[(size_t)(n + r) * S + sb]))); /* d * sc, as ggml computes it */
    for (int i = 0; i < XT; i++) {
        size_t at = (size_t)(i0 + i) * S + sb;
        const __m512i *xg = (const __m512i *)(p->xa.xq + at * SUPER);
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_load_si512(xg));
        __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_load_si512(xg + 1));
        a = _mm512_dpbusd_epi32(a, w[2], _mm512_load_si512(xg + 2));
        b = _mm512_dpbusd_epi32(b, w[3], _mm512_load_si512(xg + 3));
        __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(a, b), _mm512_load_si512(p->xa.sum32 + at * SUBS)); /* sum (q - 32) x */
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scales, _mm512_load_ps(p->xa.dx + at * SUBS)), acc[i]);
    }
}

static inline __attribute__((always_inline)) void q6_tile(const Q6Product *p, int n, int R, int i0, int XT,
                                                          const uint8_t *ahead) {
    int S = p->supers;
    __m512 acc[Q6_ROWS][Q6_X_TILE];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < XT; i++) acc[r][i] = _mm512_setzero_ps();
    /* The rows unrolled: left a loop (R is a constant, but the body is long), acc[r][i] was kept in
     * memory and updated there per super-block; unrolled, it stays in registers: 1.15x (q6), 1.17x
     * (q3), 1.23x (q2) less time per block in L2, one row, AVX-512; 1.0-1.1x at AVX2. Every tile
     * below does the same. One row of x (decoding): a row at a time, the order of reads that streams
     * best (cpu_matmul.c's quantized_tile: why); more rows of x: a super-block of every row in turn,
     * so that x's super-block is read from L1 by all R rows. */
    if (XT == 1) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            for (int sb = 0; sb < S; sb++) q6_super(p, n, r, sb, i0, XT, ahead, acc[r]);
    } else {
        for (int sb = 0; sb < S; sb++)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) q6_super(p, n, r, sb, i0, XT, ahead, acc[r]);
    }
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = sum16(acc[r][i]);
}

#else /* AVX2 */

/* Half h of a super-block's four steps (lanes 8h..8h+7) as unsigned bytes q = 0..63 */
static inline void q6_half_steps(const uint8_t *src, int h, __m256i w[4]) {
    const __m256i low6 = _mm256_set1_epi8(0x3F), bits01 = _mm256_set1_epi8(0x03), bits23 = _mm256_set1_epi8(0x0C),
                  bits45 = _mm256_set1_epi8(0x30);
    __m256i a = _mm256_loadu_si256((const __m256i *)(src + 32 * h));
    __m256i b = _mm256_loadu_si256((const __m256i *)(src + 64 + 32 * h));
    __m256i c = _mm256_loadu_si256((const __m256i *)(src + 128 + 32 * h));
    w[0] = _mm256_and_si256(a, low6);
    w[1] = _mm256_and_si256(b, low6);
    w[2] = _mm256_and_si256(c, low6);
    w[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 6), bits01),
                           _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), bits23), _mm256_and_si256(_mm256_srli_epi16(c, 2), bits45)));
}

/* start + the 8 lanes' integer dot products of a half's four steps w with x's (xg: step 0, the
 * others 64 bytes apart), exact. With AVX-VNNI the steps accumulate into one register from `start`
 * (the offset the weights carry, negated); without it, two chains of vpmaddubsw/vpmaddwd added at
 * the end (one chain of four adds made Q2_K 3-6% slower there). */
static inline __m256i four_steps(__m256i start, const __m256i w[4], const int8_t *xg) {
#if defined(__AVXVNNI__)
    for (int s = 0; s < 4; s++) start = dot_u8s8_add(start, w[s], _mm256_load_si256((const __m256i *)(xg + 64 * s)));
    return start;
#else
    __m256i a = dot_u8s8_add(start, w[0], _mm256_load_si256((const __m256i *)xg));
    __m256i b = dot_u8s8(w[1], _mm256_load_si256((const __m256i *)(xg + 64)));
    a = dot_u8s8_add(a, w[2], _mm256_load_si256((const __m256i *)(xg + 128)));
    b = dot_u8s8_add(b, w[3], _mm256_load_si256((const __m256i *)(xg + 192)));
    return _mm256_add_epi32(a, b);
#endif
}

/* Half h of a super-block of one row as the AVX2 tiles multiply it: its steps and d * sc */
typedef struct {
    __m256i w[4];
    __m256 scales;
} UnpackedHalf;

/* `unpacked`: the work item's halves already unpacked (many rows of x: q6_group), or NULL to unpack
 * them here; `store`: where to keep what is unpacked (the first tile of many rows), or NULL */
static inline __attribute__((always_inline)) void q6_tile(const Q6Product *p, int n, int R, int i0, int XT,
                                                          const uint8_t *ahead, const UnpackedHalf *unpacked,
                                                          UnpackedHalf *store) {
    int S = p->supers;
    size_t row_bytes = (size_t)S * SUPER_BYTES;
    __m256 acc[Q6_ROWS][Q6_X_TILE];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < XT; i++) acc[r][i] = _mm256_setzero_ps();
    for (int sb = 0; sb < S; sb++) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const uint8_t *src = p->qs + (size_t)(n + r) * row_bytes + (size_t)sb * SUPER_BYTES;
            if (ahead) { /* this super-block of the row p->ahead rows further on, and its scales */
                for (int line = 0; line < SUPER_BYTES; line += 64)
                    _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + (size_t)sb * SUPER_BYTES + line), PREFETCH_HINT);
                size_t later = (size_t)(n + r + p->ahead) * S + sb;
                _mm_prefetch((const char *)(p->sc + later * SUBS), PREFETCH_HINT);
                _mm_prefetch((const char *)(p->d + later), PREFETCH_HINT);
            }
            const int8_t *sc = p->sc + ((size_t)(n + r) * S + sb) * SUBS;
            for (int h = 0; h < 2; h++) {
                __m256i w[4];
                __m256 scales;
                size_t half = ((size_t)r * S + sb) * 2 + h;
                if (unpacked) {
                    for (int s = 0; s < 4; s++) w[s] = unpacked[half].w[s];
                    scales = unpacked[half].scales;
                } else {
                    q6_half_steps(src, h, w);
                    __m256 d = _mm256_set1_ps(_cvtsh_ss(p->d[(size_t)(n + r) * S + sb]));
                    scales = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sc + 8 * h)))), d);
                    if (store) {
                        for (int s = 0; s < 4; s++) store[half].w[s] = w[s];
                        store[half].scales = scales;
                    }
                }
                for (int i = 0; i < XT; i++) {
                    size_t at = (size_t)(i0 + i) * S + sb;
                    const int8_t *xg = p->xa.xq + at * SUPER + 32 * h;
                    __m256i dot = four_steps(_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_load_si256((const __m256i *)(p->xa.sum32 + at * SUBS + 8 * h))),
                                             w, xg); /* sum (q - 32) x */
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scales, _mm256_load_ps(p->xa.dx + at * SUBS + 8 * h)), acc[r][i]);
                }
            }
        }
    }
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = hsum8(acc[r][i]);
}

#endif

/* Every (R, XT) with its constants */
#if KERNELS_AVX512
#define NOT_UNPACKED
#else
#define NOT_UNPACKED , NULL, NULL /* the AVX2 tiles' `unpacked` and `store` */
#endif
typedef void Q6TileFn(const Q6Product *p, int n, int i0, const uint8_t *ahead);
#define Q6_TILE(R, XT) \
    static void q6_tile_##R##_##XT(const Q6Product *p, int n, int i0, const uint8_t *ahead) { q6_tile(p, n, R, i0, XT, ahead NOT_UNPACKED); }
#if KERNELS_AVX512
#define Q6_TILES_FOR(R) Q6_TILE(R, 1) Q6_TILE(R, 2) Q6_TILE(R, 3) Q6_TILE(R, 4)
#define Q6_TILE_ROW(R) {q6_tile_##R##_1, q6_tile_##R##_2, q6_tile_##R##_3, q6_tile_##R##_4}
#else
#define Q6_TILES_FOR(R) Q6_TILE(R, 1) Q6_TILE(R, 2)
#define Q6_TILE_ROW(R) {q6_tile_##R##_1, q6_tile_##R##_2}
#endif
Q6_TILES_FOR(1) Q6_TILES_FOR(2) Q6_TILES_FOR(3) Q6_TILES_FOR(4)
static Q6TileFn *const Q6_TILES[Q6_ROWS][Q6_X_TILE] = {Q6_TILE_ROW(1), Q6_TILE_ROW(2), Q6_TILE_ROW(3), Q6_TILE_ROW(4)};

#if !KERNELS_AVX512
/* Many rows of x at the AVX2 level: the first tile of x rows unpacks a work item's halves into a
 * per-thread buffer, the later tiles read them from there (the same arithmetic: the same bits) */
static void q6_many(const Q6Product *p, int n, int i0, const UnpackedHalf *unpacked, UnpackedHalf *store) {
    q6_tile(p, n, Q6_ROWS, i0, Q6_X_TILE, NULL, unpacked, store);
}
#endif

#if KERNELS_AVX512
/* Many rows of x (a prompt's products where there is no bfloat16 arithmetic), as cpu_matmul.c's
 * arranged_tile: a work item's Q6_ROWS weight rows are unpacked once into a per-thread buffer (their
 * steps and d * sc per super-block), then a register tile of Q6_ROWS weight rows by Q6_X_TILE x rows
 * walks the steps. Each pair's arithmetic is q6_tile's (exact integer sums per sub-block, then the
 * same float steps in the same order), so the bits are the same. From Q6_MANY_ROWS rows of x on. */

typedef struct {
    __m512i w[4];
    __m512 scales, mins; /* mins: q2 only */
} UnpackedSuper;

static void q6_unpack_rows(const Q6Product *p, int n, UnpackedSuper *rows) {
    int S = p->supers;
    for (int r = 0; r < Q6_ROWS; r++)
        for (int sb = 0; sb < S; sb++) {
            UnpackedSuper *u = rows + (size_t)r * S + sb;
            q6_steps(p->qs + ((size_t)(n + r) * S + sb) * SUPER_BYTES, u->w);
            u->scales = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p->sc + ((size_t)(n + r) * S + sb) * SUBS)))),
                _mm512_set1_ps(_cvtsh_ss(p->d[(size_t)(n + r) * S + sb]))); /* as q6_tile computes it */
        }
}

/* Arranged weight rows n .. n + Q6_ROWS - 1 times x rows i0 .. i0 + Q6_X_TILE - 1 -> out [M, N],
 * x as `xa` holds it, S super-blocks a row. q6 and q3 (q2 = 0): the weights' offset is sum32 >>
 * shift (q6: q - 32, shift 0; q3: q - 4, shift 3), as q6_tile and q3_tile take it out; q2 (q2 = 1):
 * q2_tile's scales and minimums. */
static inline __attribute__((always_inline)) void unpacked_tile(const Q6Activations *xa, int S, int N, float *out,
                                                                const UnpackedSuper *rows, int n, int i0, int shift, int q2) {
    __m512 acc[Q6_ROWS][Q6_X_TILE];
    for (int r = 0; r < Q6_ROWS; r++)
        for (int i = 0; i < Q6_X_TILE; i++) acc[r][i] = _mm512_setzero_ps();
    for (int sb = 0; sb < S; sb++) {
        const __m512i *xg[Q6_X_TILE];
        for (int i = 0; i < Q6_X_TILE; i++) xg[i] = (const __m512i *)(xa->xq + ((size_t)(i0 + i) * S + sb) * SUPER);
        __m512i dot[Q6_ROWS][Q6_X_TILE];
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            __m512i w[Q6_ROWS], x[Q6_X_TILE];
            for (int r = 0; r < Q6_ROWS; r++) w[r] = _mm512_load_si512(&rows[(size_t)r * S + sb].w[s]);
            for (int i = 0; i < Q6_X_TILE; i++) x[i] = load_held(xg[i] + s); /* vectors.h: why */
            for (int r = 0; r < Q6_ROWS; r++)
                for (int i = 0; i < Q6_X_TILE; i++)
                    dot[r][i] = _mm512_dpbusd_epi32(s ? dot[r][i] : _mm512_setzero_si512(), w[r], x[i]);
        }
        for (int i = 0; i < Q6_X_TILE; i++) { /* the decode tiles' float steps; x's numbers loaded once per row */
            size_t at = (size_t)(i0 + i) * S + sb;
            __m512 dx = _mm512_load_ps(xa->dx + at * SUBS);
            if (q2) {
                __m512 sums = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_load_si512(xa->sum32 + at * SUBS), 5));
                for (int r = 0; r < Q6_ROWS; r++) {
                    const UnpackedSuper *u = &rows[(size_t)r * S + sb];
                    __m512 t = _mm512_fmsub_ps(u->scales, _mm512_cvtepi32_ps(dot[r][i]), _mm512_mul_ps(u->mins, sums));
                    acc[r][i] = _mm512_fmadd_ps(t, dx, acc[r][i]);
                }
            } else {
                __m512i offset = _mm512_srai_epi32(_mm512_load_si512(xa->sum32 + at * SUBS), shift);
                for (int r = 0; r < Q6_ROWS; r++) {
                    __m512 scale = _mm512_mul_ps(rows[(size_t)r * S + sb].scales, dx);
                    acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r][i], offset)), scale, acc[r][i]);
                }
            }
        }
    }
    sums16_4x4(acc, out + (size_t)i0 * N + n, N);
}
static void q6_unpacked_tile(const Q6Product *p, const UnpackedSuper *rows, int n, int i0) {
    unpacked_tile(&p->xa, p->supers, p->N, p->out, rows, n, i0, 0, 0);
}
#endif

/* Many rows of x for q6 and q3 (one product struct): a work item's rows are unpacked once, then the
 * x rows go tile after tile (AVX-512: unpack, then unpacked_tile; AVX2: the first tile unpacks and
 * keeps, the later ones read), and the last rows, fewer than a tile, take `tiles`. Returns 0 where
 * the work item does not take this path (few rows of x, a partial row group, no buffer). */
#if KERNELS_AVX512
/* The rows of the work item after rows n .. n + Q6_ROWS - 1, for fetch_part (row_groups.h: why) while
 * this one's tiles run, or NULL after the last whole one; its scales (SUBS bytes and a d, and q2's
 * m, a super-block) are fetched at once. */
static const uint8_t *next_item(const uint8_t *qs, const void *sc, const uint16_t *d, const uint16_t *m, int n, int N,
                                int supers, int super_bytes) {
    if (n + 2 * Q6_ROWS > N) return NULL;
    size_t first = (size_t)(n + Q6_ROWS) * supers, count = (size_t)Q6_ROWS * supers;
    fetch_part((const uint8_t *)sc + first * SUBS, count * SUBS, 0, 1);
    fetch_part(d + first, count * 2, 0, 1);
    if (m) fetch_part(m + first, count * 2, 0, 1);
    return qs + first * super_bytes;
}

typedef void UnpackRowsFn(const Q6Product *p, int n, UnpackedSuper *rows);
typedef void UnpackedTileFn(const Q6Product *p, const UnpackedSuper *rows, int n, int i0);
static int many_rows(const Q6Product *p, int n, int R, int super_bytes, UnpackRowsFn *unpack, UnpackedTileFn *tile,
                     Q6TileFn *const tiles[Q6_ROWS][Q6_X_TILE]) {
    UnpackedSuper *rows;
    if (p->M < Q6_MANY_ROWS || R < Q6_ROWS || !(rows = thread_buffer(sizeof(UnpackedSuper) * Q6_ROWS * p->supers))) return 0;
    unpack(p, n, rows);
    const uint8_t *next = next_item(p->qs, p->sc, p->d, NULL, n, p->N, p->supers, super_bytes);
    int i0 = 0, count = p->M / Q6_X_TILE;
    for (; i0 + Q6_X_TILE <= p->M; i0 += Q6_X_TILE) {
        tile(p, rows, n, i0);
        if (next) fetch_part(next, (size_t)Q6_ROWS * p->supers * super_bytes, i0 / Q6_X_TILE, count);
    }
    if (i0 < p->M) tiles[R - 1][p->M - i0 - 1](p, n, i0, NULL);
    return 1;
}
#else
typedef void ManyFn(const Q6Product *p, int n, int i0, const UnpackedHalf *unpacked, UnpackedHalf *store);
static int many_rows(const Q6Product *p, int n, int R, ManyFn *many, Q6TileFn *const tiles[Q6_ROWS][Q6_X_TILE]) {
    UnpackedHalf *halves;
    if (p->M < Q6_MANY_ROWS || R < Q6_ROWS || !(halves = thread_buffer(sizeof(UnpackedHalf) * 2 * Q6_ROWS * p->supers))) return 0;
    many(p, n, 0, NULL, halves);
    int i0 = Q6_X_TILE;
    for (; i0 + Q6_X_TILE <= p->M; i0 += Q6_X_TILE) many(p, n, i0, halves, NULL);
    if (i0 < p->M) tiles[R - 1][p->M - i0 - 1](p, n, i0, NULL);
    return 1;
}
#endif

static void q6_group(const void *product, int gi) {
    const Q6Product *p = product;
    int n = gi * Q6_ROWS, R = p->N - n < Q6_ROWS ? p->N - n : Q6_ROWS;
#if KERNELS_AVX512
    if (many_rows(p, n, R, SUPER_BYTES, q6_unpack_rows, q6_unpacked_tile, Q6_TILES)) return;
#else
    if (many_rows(p, n, R, q6_many, Q6_TILES)) return;
#endif
    size_t row_bytes = (size_t)p->supers * SUPER_BYTES;
    const uint8_t *ahead = /* the rows p->ahead on */
        n + p->ahead + Q6_ROWS <= p->N ? p->qs + (size_t)(n + p->ahead) * row_bytes : NULL;
    for (int i0 = 0; i0 < p->M; i0 += Q6_X_TILE) {
        int XT = p->M - i0 < Q6_X_TILE ? p->M - i0 : Q6_X_TILE;
        Q6_TILES[R - 1][XT - 1](p, n, i0, i0 == 0 ? ahead : NULL);
    }
}

int q6_matmul(const float *x, int M, int K, const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, float *out) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    Q6Product p = {M, K, N, K / SUPER, qs, sc, d, {0}, out, ahead_rows(Q6_ROWS, (size_t)(K / SUPER) * SUPER_BYTES)};
    int status = arrange_q6_activations(x, M, K, &p.xa);
    if (status == STATUS_OK) for_each_group((N + Q6_ROWS - 1) / Q6_ROWS, q6_group, &p);
    free_q6_activations(&p.xa);
    return status;
}

/* ---- unpacking to bfloat16 or float32 (f32), for prompts (oneDNN multiplies them) --------------- */

/* A super-block's steps back in weight order: within each 128-bit lane, a 4x4 transpose of the
 * 4-byte pieces of the four step vectors gives, in t[p]'s lane L, the 16 values of sub-block
 * 4L + p (steps 0..3, 4 weights each). Each is then d * sc * (q - 32), stored as float32 or rounded
 * to bfloat16 (vectors.h). */
#if KERNELS_AVX512

/* Super-blocks sb0 .. sb0 + count - 1 (counted over the whole matrix, row by row) into out
 * [256 * count]: also how AMX's products (amx_matmul.c) unpack Q6_K. */
void q6_unpack_supers(const uint8_t *qs, const int8_t *sc, const uint16_t *d, size_t sb0, size_t count, void *out, int f32) {
    for (size_t i = 0; i < count; i++) {
        size_t sb = sb0 + i;
        __m512i w[4], t[4];
        q6_steps(qs + sb * SUPER_BYTES, w);
        __m512i a = _mm512_unpacklo_epi32(w[0], w[1]), b = _mm512_unpackhi_epi32(w[0], w[1]);
        __m512i c = _mm512_unpacklo_epi32(w[2], w[3]), e = _mm512_unpackhi_epi32(w[2], w[3]);
        t[0] = _mm512_unpacklo_epi64(a, c);
        t[1] = _mm512_unpackhi_epi64(a, c);
        t[2] = _mm512_unpacklo_epi64(b, e);
        t[3] = _mm512_unpackhi_epi64(b, e);
        float dd = _cvtsh_ss(d[sb]);
        for (int p = 0; p < 4; p += 2)
#pragma GCC unroll 4
            for (int L = 0; L < 4; L++) { /* sub-blocks j = 4L + p and j + 1, side by side in out (L: an immediate) */
                __m512 v[2];
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    int j = 4 * L + p + h;
                    __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(t[p + h], L)), _mm512_set1_epi32(32)));
                    v[h] = _mm512_mul_ps(_mm512_set1_ps(dd * (float)sc[sb * SUBS + j]), q);
                }
                store32(out, i * SUPER + 16 * (4 * L + p), v[0], v[1], f32);
            }
    }
}

static int q6_unpack(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, void *out, int f32) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    size_t row = K / SUPER, row_bytes = (size_t)K * (f32 ? 4 : 2);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) q6_unpack_supers(qs, sc, d, n * row, row, (char *)out + n * row_bytes, f32);
    return 0;
}

#else

static int q6_unpack(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, void *out, int f32) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    size_t supers = (size_t)N * (K / SUPER);
#pragma omp parallel for schedule(static)
    for (size_t sb = 0; sb < supers; sb++) {
        float dd = _cvtsh_ss(d[sb]);
        for (int h = 0; h < 2; h++) {
            __m256i w[4], t[4];
            q6_half_steps(qs + sb * SUPER_BYTES, h, w);
            __m256i a = _mm256_unpacklo_epi32(w[0], w[1]), b = _mm256_unpackhi_epi32(w[0], w[1]);
            __m256i c = _mm256_unpacklo_epi32(w[2], w[3]), e = _mm256_unpackhi_epi32(w[2], w[3]);
            t[0] = _mm256_unpacklo_epi64(a, c);
            t[1] = _mm256_unpackhi_epi64(a, c);
            t[2] = _mm256_unpacklo_epi64(b, e);
            t[3] = _mm256_unpackhi_epi64(b, e);
            for (int p = 0; p < 4; p++)
                for (int L = 0; L < 2; L++) {
                    int j = 8 * h + 4 * L + p;
                    __m128i bytes = L ? _mm256_extracti128_si256(t[p], 1) : _mm256_castsi256_si128(t[p]);
                    __m256 scale = _mm256_set1_ps(dd * (float)sc[sb * SUBS + j]), offset = _mm256_set1_ps(32.0f);
                    __m256 lo = _mm256_mul_ps(scale, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), offset));
                    __m256 hi = _mm256_mul_ps(scale, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))), offset));
                    store8(out, sb * SUPER + 16 * j, lo, f32);
                    store8(out, sb * SUPER + 16 * j + 8, hi, f32);
                }
        }
    }
    return 0;
}

#endif

int q6_to_bf16(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, uint16_t *out) { return q6_unpack(qs, sc, d, N, K, out, 0); }
int q6_to_f32(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, float *out) { return q6_unpack(qs, sc, d, N, K, out, 1); }

/* ==== Q2_K kept as stored (layout "q2", packed.py's _pack_q2_k) ================================
 * Per super-block of 256: the 2-bit values in one 64-byte vector, in the steps above (step s in bits
 * 2s..2s+1 of every byte: byte 4j + t holds weights 16j + 4s + t); sc [N, K/16] uint8, a 4-bit
 * scale (low nibble) and a 4-bit minimum (high nibble) per sub-block; d and m [N, K/256] float16.
 * weight = d * (sc & 15) * q - m * (sc >> 4), Q2_K's own numbers (2.625 bits a weight, as in the file;
 * requantized to Q8_0 it took 8.5). Over a sub-block j, with x's int8 values and scale dx:
 *   sum w x = dx * (d * scale_j * sum q x  -  m * min_j * sum x),
 * both sums integer: one vpdpbusd per step gives the first, Q6Activations' sum32 / 32 the second. */

#define Q2_BYTES 64

typedef struct {
    int M, K, N, supers;
    const uint8_t *qs, *sc;
    const uint16_t *d, *m;
    Q6Activations xa;
    float *out;
    int ahead;
} Q2Product;

#if KERNELS_AVX512

static inline void q2_steps(const uint8_t *src, __m512i w[4]) {
    const __m512i low2 = _mm512_set1_epi8(0x03);
    __m512i v = _mm512_loadu_si512(src);
    w[0] = _mm512_and_si512(v, low2);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), low2);
    w[2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low2);
    w[3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), low2);
}

/* Super-block sb of weight row n + r times x rows i0 .. i0+XT-1, added to acc[i] */
static inline __attribute__((always_inline)) void q2_super(const Q2Product *p, int n, int r, int sb, int i0, int XT,
                                                           const uint8_t *ahead, __m512 acc[Q6_X_TILE]) {
    int S = p->supers;
    size_t row_bytes = (size_t)S * Q2_BYTES;
    size_t at_w = (size_t)(n + r) * S + sb;
    if (ahead) { /* this super-block of the row p->ahead rows further on, and its scales */
        _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + (size_t)sb * Q2_BYTES), PREFETCH_HINT);
        size_t later = at_w + (size_t)p->ahead * S;
        _mm_prefetch((const char *)(p->sc + later * SUBS), PREFETCH_HINT);
        _mm_prefetch((const char *)(p->d + later), PREFETCH_HINT);
        _mm_prefetch((const char *)(p->m + later), PREFETCH_HINT);
    }
    __m512i w[4];
    q2_steps(p->qs + at_w * Q2_BYTES, w);
    __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p->sc + at_w * SUBS)));
    __m512 scales = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(p->d[at_w])),
                                  _mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(15))));
    __m512 mins = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(p->m[at_w])), _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 4)));
    for (int i = 0; i < XT; i++) {
        size_t at = (size_t)(i0 + i) * S + sb;
        const __m512i *xg = (const __m512i *)(p->xa.xq + at * SUPER);
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_load_si512(xg));
        __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_load_si512(xg + 1));
        a = _mm512_dpbusd_epi32(a, w[2], _mm512_load_si512(xg + 2));
        b = _mm512_dpbusd_epi32(b, w[3], _mm512_load_si512(xg + 3));
        __m512 sums = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_load_si512(p->xa.sum32 + at * SUBS), 5));
        __m512 t = _mm512_fmsub_ps(scales, _mm512_cvtepi32_ps(_mm512_add_epi32(a, b)), _mm512_mul_ps(mins, sums));
        acc[i] = _mm512_fmadd_ps(t, _mm512_load_ps(p->xa.dx + at * SUBS), acc[i]);
    }
}

static inline __attribute__((always_inline)) void q2_tile(const Q2Product *p, int n, int R, int i0, int XT,
                                                          const uint8_t *ahead) {
    int S = p->supers;
    __m512 acc[Q6_ROWS][Q6_X_TILE];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < XT; i++) acc[r][i] = _mm512_setzero_ps();
    if (XT == 1) { /* decoding: a row at a time (cpu_matmul.c's quantized_tile: why) */
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            for (int sb = 0; sb < S; sb++) q2_super(p, n, r, sb, i0, XT, ahead, acc[r]);
    } else {
        for (int sb = 0; sb < S; sb++)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) q2_super(p, n, r, sb, i0, XT, ahead, acc[r]);
    }
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = sum16(acc[r][i]);
}

/* Many rows of x: q6's path with q2's steps, scales and minimums */
static void q2_unpack_rows(const Q2Product *p, int n, UnpackedSuper *rows) {
    int S = p->supers;
    for (int r = 0; r < Q6_ROWS; r++)
        for (int sb = 0; sb < S; sb++) {
            size_t at_w = (size_t)(n + r) * S + sb;
            UnpackedSuper *u = rows + (size_t)r * S + sb;
            q2_steps(p->qs + at_w * Q2_BYTES, u->w);
            __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p->sc + at_w * SUBS)));
            u->scales = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(p->d[at_w])), _mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(15))));
            u->mins = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(p->m[at_w])), _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 4)));
        }
}

static void q2_unpacked_tile(const Q2Product *p, const UnpackedSuper *rows, int n, int i0) {
    unpacked_tile(&p->xa, p->supers, p->N, p->out, rows, n, i0, 0, 1);
}

#else /* AVX2 */

static inline __attribute__((always_inline)) void q2_tile(const Q2Product *p, int n, int R, int i0, int XT,
                                                          const uint8_t *ahead) {
    int S = p->supers;
    size_t row_bytes = (size_t)S * Q2_BYTES;
    const __m256i low2 = _mm256_set1_epi8(0x03);
    __m256 acc[Q6_ROWS][Q6_X_TILE];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < XT; i++) acc[r][i] = _mm256_setzero_ps();
    for (int sb = 0; sb < S; sb++) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            size_t at_w = (size_t)(n + r) * S + sb;
            if (ahead) {
                _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + (size_t)sb * Q2_BYTES), PREFETCH_HINT);
                size_t later = at_w + (size_t)p->ahead * S;
                _mm_prefetch((const char *)(p->sc + later * SUBS), PREFETCH_HINT);
                _mm_prefetch((const char *)(p->d + later), PREFETCH_HINT);
                _mm_prefetch((const char *)(p->m + later), PREFETCH_HINT);
            }
            __m256 d = _mm256_set1_ps(_cvtsh_ss(p->d[at_w])), m = _mm256_set1_ps(_cvtsh_ss(p->m[at_w]));
            for (int h = 0; h < 2; h++) { /* lanes 8h .. 8h + 7: bytes 32h .. 32h + 31 */
                __m256i v = _mm256_loadu_si256((const __m256i *)(p->qs + at_w * Q2_BYTES + 32 * h));
                __m256i w[4] = {_mm256_and_si256(v, low2), _mm256_and_si256(_mm256_srli_epi16(v, 2), low2),
                                _mm256_and_si256(_mm256_srli_epi16(v, 4), low2), _mm256_and_si256(_mm256_srli_epi16(v, 6), low2)};
                __m256i sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p->sc + at_w * SUBS + 8 * h)));
                __m256 scales = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(sc, _mm256_set1_epi32(15))));
                __m256 mins = _mm256_mul_ps(m, _mm256_cvtepi32_ps(_mm256_srli_epi32(sc, 4)));
                for (int i = 0; i < XT; i++) {
                    size_t at = (size_t)(i0 + i) * S + sb;
                    const int8_t *xg = p->xa.xq + at * SUPER + 32 * h;
                    __m256i dot = four_steps(_mm256_setzero_si256(), w, xg);
                    __m256 sums = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_load_si256((const __m256i *)(p->xa.sum32 + at * SUBS + 8 * h)), 5));
                    __m256 t = _mm256_fmsub_ps(scales, _mm256_cvtepi32_ps(dot), _mm256_mul_ps(mins, sums));
                    acc[r][i] = _mm256_fmadd_ps(t, _mm256_load_ps(p->xa.dx + at * SUBS + 8 * h), acc[r][i]);
                }
            }
        }
    }
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = hsum8(acc[r][i]);
}

#endif

typedef void Q2TileFn(const Q2Product *p, int n, int i0, const uint8_t *ahead);
#define Q2_TILE(R, XT) \
    static void q2_tile_##R##_##XT(const Q2Product *p, int n, int i0, const uint8_t *ahead) { q2_tile(p, n, R, i0, XT, ahead); }
#if KERNELS_AVX512
#define Q2_TILES_FOR(R) Q2_TILE(R, 1) Q2_TILE(R, 2) Q2_TILE(R, 3) Q2_TILE(R, 4)
#define Q2_TILE_ROW(R) {q2_tile_##R##_1, q2_tile_##R##_2, q2_tile_##R##_3, q2_tile_##R##_4}
#else
#define Q2_TILES_FOR(R) Q2_TILE(R, 1) Q2_TILE(R, 2)
#define Q2_TILE_ROW(R) {q2_tile_##R##_1, q2_tile_##R##_2}
#endif
Q2_TILES_FOR(1) Q2_TILES_FOR(2) Q2_TILES_FOR(3) Q2_TILES_FOR(4)
static Q2TileFn *const Q2_TILES[Q6_ROWS][Q6_X_TILE] = {Q2_TILE_ROW(1), Q2_TILE_ROW(2), Q2_TILE_ROW(3), Q2_TILE_ROW(4)};

static void q2_group(const void *product, int gi) {
    const Q2Product *p = product;
    int n = gi * Q6_ROWS, R = p->N - n < Q6_ROWS ? p->N - n : Q6_ROWS;
#if KERNELS_AVX512
    UnpackedSuper *rows;
    if (p->M >= Q6_MANY_ROWS && R == Q6_ROWS && (rows = thread_buffer(sizeof(UnpackedSuper) * Q6_ROWS * p->supers))) {
        q2_unpack_rows(p, n, rows);
        const uint8_t *next = next_item(p->qs, p->sc, p->d, p->m, n, p->N, p->supers, Q2_BYTES); /* as many_rows */
        int i0 = 0, count = p->M / Q6_X_TILE;
        for (; i0 + Q6_X_TILE <= p->M; i0 += Q6_X_TILE) {
            q2_unpacked_tile(p, rows, n, i0);
            if (next) fetch_part(next, (size_t)Q6_ROWS * p->supers * Q2_BYTES, i0 / Q6_X_TILE, count);
        }
        if (i0 < p->M) Q2_TILES[R - 1][p->M - i0 - 1](p, n, i0, NULL);
        return;
    }
#endif
    size_t row_bytes = (size_t)p->supers * Q2_BYTES;
    const uint8_t *ahead = n + p->ahead + Q6_ROWS <= p->N ? p->qs + (size_t)(n + p->ahead) * row_bytes : NULL;
    for (int i0 = 0; i0 < p->M; i0 += Q6_X_TILE) {
        int XT = p->M - i0 < Q6_X_TILE ? p->M - i0 : Q6_X_TILE;
        Q2_TILES[R - 1][XT - 1](p, n, i0, i0 == 0 ? ahead : NULL);
    }
}

int q2_matmul(const float *x, int M, int K, const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m,
              int N, float *out) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    Q2Product p = {M, K, N, K / SUPER, qs, sc, d, m, {0}, out, ahead_rows(Q6_ROWS, (size_t)(K / SUPER) * Q2_BYTES)};
    int status = arrange_q6_activations(x, M, K, &p.xa);
    if (status == STATUS_OK) for_each_group((N + Q6_ROWS - 1) / Q6_ROWS, q2_group, &p);
    free_q6_activations(&p.xa);
    return status;
}

/* Unpacking for prompts: the steps back in weight order as q6's (the same 4x4 transposes), then
 * d * (sc & 15) * q - m * (sc >> 4): each term exact in float32, one rounding, as gguf's. */
#if KERNELS_AVX512

void q2_unpack_supers(const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m, size_t sb0, size_t count,
                      void *out, int f32) {
    for (size_t i = 0; i < count; i++) {
        size_t sb = sb0 + i;
        __m512i w[4], t[4];
        q2_steps(qs + sb * Q2_BYTES, w);
        __m512i a = _mm512_unpacklo_epi32(w[0], w[1]), b = _mm512_unpackhi_epi32(w[0], w[1]);
        __m512i c = _mm512_unpacklo_epi32(w[2], w[3]), e = _mm512_unpackhi_epi32(w[2], w[3]);
        t[0] = _mm512_unpacklo_epi64(a, c);
        t[1] = _mm512_unpackhi_epi64(a, c);
        t[2] = _mm512_unpacklo_epi64(b, e);
        t[3] = _mm512_unpackhi_epi64(b, e);
        float dd = _cvtsh_ss(d[sb]), dm = _cvtsh_ss(m[sb]);
        for (int p = 0; p < 4; p++)
            for (int L = 0; L < 4; L++) {
                int j = 4 * L + p;
                uint8_t s = sc[sb * SUBS + j];
                __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(t[p], L)));
                __m512 v = _mm512_fmsub_ps(_mm512_set1_ps(dd * (float)(s & 15)), q, _mm512_set1_ps(dm * (float)(s >> 4)));
                store16(out, i * SUPER + 16 * j, v, f32);
            }
    }
}

static int q2_unpack(const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m, int N, int K, void *out, int f32) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    size_t row = K / SUPER, row_bytes = (size_t)K * (f32 ? 4 : 2);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) q2_unpack_supers(qs, sc, d, m, n * row, row, (char *)out + n * row_bytes, f32);
    return 0;
}

#else

static int q2_unpack(const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m, int N, int K, void *out, int f32) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    const __m256i low2 = _mm256_set1_epi8(0x03);
    size_t supers = (size_t)N * (K / SUPER);
#pragma omp parallel for schedule(static)
    for (size_t sb = 0; sb < supers; sb++) {
        float dd = _cvtsh_ss(d[sb]), dm = _cvtsh_ss(m[sb]);
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + sb * Q2_BYTES + 32 * h));
            __m256i w[4] = {_mm256_and_si256(v, low2), _mm256_and_si256(_mm256_srli_epi16(v, 2), low2),
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), low2), _mm256_and_si256(_mm256_srli_epi16(v, 6), low2)};
            __m256i t[4];
            __m256i a = _mm256_unpacklo_epi32(w[0], w[1]), b = _mm256_unpackhi_epi32(w[0], w[1]);
            __m256i c = _mm256_unpacklo_epi32(w[2], w[3]), e = _mm256_unpackhi_epi32(w[2], w[3]);
            t[0] = _mm256_unpacklo_epi64(a, c);
            t[1] = _mm256_unpackhi_epi64(a, c);
            t[2] = _mm256_unpacklo_epi64(b, e);
            t[3] = _mm256_unpackhi_epi64(b, e);
            for (int p = 0; p < 4; p++)
                for (int L = 0; L < 2; L++) {
                    int j = 8 * h + 4 * L + p;
                    uint8_t s = sc[sb * SUBS + j];
                    __m128i bytes = L ? _mm256_extracti128_si256(t[p], 1) : _mm256_castsi256_si128(t[p]);
                    __m256 scale = _mm256_set1_ps(dd * (float)(s & 15)), minimum = _mm256_set1_ps(dm * (float)(s >> 4));
                    __m256 lo = _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), minimum);
                    __m256 hi = _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))), minimum);
                    store8(out, sb * SUPER + 16 * j, lo, f32);
                    store8(out, sb * SUPER + 16 * j + 8, hi, f32);
                }
        }
    }
    return 0;
}

#endif

int q2_to_bf16(const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m, int N, int K, uint16_t *out) {
    return q2_unpack(qs, sc, d, m, N, K, out, 0);
}
int q2_to_f32(const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m, int N, int K, float *out) {
    return q2_unpack(qs, sc, d, m, N, K, out, 1);
}

/* ==== Q3_K kept as stored (layout "q3", packed.py's _pack_q3_k) ================================
 * Per super-block of 256, 96 bytes: q2's 64 bytes of low 2 bits (step s in bits 2s..2s+1), then the
 * third bits as four 64-bit words, word s bit 4j + t for weight 16j + 4s + t; sc [N, K/16] int8
 * (Q3_K's 6-bit scales less 32), d [N, K/256] float16. weight = d * sc * (q - 4), q = 0..7: q6's
 * arithmetic with an offset of 4 instead of 32 (sum32 / 8), in 3.56 bits a weight (the file: 3.44;
 * held in q6's layout it took 6.56). */

#define Q3_BYTES 96

typedef Q6Product Q3Product; /* the same parts: values, int8 scales, d */

#if KERNELS_AVX512

static inline void q3_steps(const uint8_t *src, __m512i w[4]) {
    q2_steps(src, w);
    const __m512i four = _mm512_set1_epi8(4);
    for (int s = 0; s < 4; s++) {
        uint64_t third;
        memcpy(&third, src + Q2_BYTES + 8 * s, 8);
        w[s] = _mm512_mask_add_epi8(w[s], (__mmask64)third, w[s], four);
    }
}

/* Super-block sb of weight row n + r times x rows i0 .. i0+XT-1, added to acc[i] */
static inline __attribute__((always_inline)) void q3_super(const Q3Product *p, int n, int r, int sb, int i0, int XT,
                                                           const uint8_t *ahead, __m512 acc[Q6_X_TILE]) {
    int S = p->supers;
    size_t row_bytes = (size_t)S * Q3_BYTES;
    size_t at_w = (size_t)(n + r) * S + sb;
    if (ahead) { /* this super-block of the row p->ahead rows further on, and its scales */
        for (int line = 0; line < Q3_BYTES; line += 64)
            _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + (size_t)sb * Q3_BYTES + line), PREFETCH_HINT);
        size_t later = at_w + (size_t)p->ahead * S;
        _mm_prefetch((const char *)(p->sc + later * SUBS), PREFETCH_HINT);
        _mm_prefetch((const char *)(p->d + later), PREFETCH_HINT);
    }
    __m512i w[4];
    q3_steps(p->qs + at_w * Q3_BYTES, w);
    __m512 scales = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p->sc + at_w * SUBS)))),
                                  _mm512_set1_ps(_cvtsh_ss(p->d[at_w]))); /* d * sc, as ggml computes it */
    for (int i = 0; i < XT; i++) {
        size_t at = (size_t)(i0 + i) * S + sb;
        const __m512i *xg = (const __m512i *)(p->xa.xq + at * SUPER);
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_load_si512(xg));
        __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_load_si512(xg + 1));
        a = _mm512_dpbusd_epi32(a, w[2], _mm512_load_si512(xg + 2));
        b = _mm512_dpbusd_epi32(b, w[3], _mm512_load_si512(xg + 3));
        __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(a, b), _mm512_srai_epi32(_mm512_load_si512(p->xa.sum32 + at * SUBS), 3)); /* sum (q - 4) x */
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scales, _mm512_load_ps(p->xa.dx + at * SUBS)), acc[i]);
    }
}

static inline __attribute__((always_inline)) void q3_tile(const Q3Product *p, int n, int R, int i0, int XT,
                                                          const uint8_t *ahead) {
    int S = p->supers;
    __m512 acc[Q6_ROWS][Q6_X_TILE];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < XT; i++) acc[r][i] = _mm512_setzero_ps();
    if (XT == 1) { /* decoding: a row at a time (cpu_matmul.c's quantized_tile: why) */
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            for (int sb = 0; sb < S; sb++) q3_super(p, n, r, sb, i0, XT, ahead, acc[r]);
    } else {
        for (int sb = 0; sb < S; sb++)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) q3_super(p, n, r, sb, i0, XT, ahead, acc[r]);
    }
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = sum16(acc[r][i]);
}

/* Many rows of x: q6's path (unpacked_tile) with q3's steps and offset */
static void q3_unpack_rows(const Q3Product *p, int n, UnpackedSuper *rows) {
    int S = p->supers;
    for (int r = 0; r < Q6_ROWS; r++)
        for (int sb = 0; sb < S; sb++) {
            size_t at_w = (size_t)(n + r) * S + sb;
            UnpackedSuper *u = rows + (size_t)r * S + sb;
            q3_steps(p->qs + at_w * Q3_BYTES, u->w);
            u->scales = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p->sc + at_w * SUBS)))),
                                      _mm512_set1_ps(_cvtsh_ss(p->d[at_w]))); /* as q3_tile computes it */
        }
}
static void q3_unpacked_tile(const Q3Product *p, const UnpackedSuper *rows, int n, int i0) {
    unpacked_tile(&p->xa, p->supers, p->N, p->out, rows, n, i0, 3, 0);
}

#else /* AVX2 */

/* 32 bits -> 32 bytes, 4 where the bit is set: each byte picks its bit's byte of the word, then tests its bit */
static inline __m256i third_bits(uint32_t bits) {
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), pick);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(4));
}

/* Half h (lanes 8h .. 8h + 7: bytes 32h .. 32h + 31 of each step) of a super-block's steps, q = 0..7 */
static inline void q3_half_steps(const uint8_t *src, int h, __m256i w[4]) {
    const __m256i low2 = _mm256_set1_epi8(0x03);
    __m256i v = _mm256_loadu_si256((const __m256i *)(src + 32 * h));
    for (int s = 0; s < 4; s++) {
        uint32_t bits;
        memcpy(&bits, src + Q2_BYTES + 8 * s + 4 * h, 4);
        w[s] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 2 * s), low2), third_bits(bits));
    }
}

static inline __attribute__((always_inline)) void q3_tile(const Q3Product *p, int n, int R, int i0, int XT,
                                                          const uint8_t *ahead, const UnpackedHalf *unpacked,
                                                          UnpackedHalf *store) {
    int S = p->supers;
    size_t row_bytes = (size_t)S * Q3_BYTES;
    __m256 acc[Q6_ROWS][Q6_X_TILE];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < XT; i++) acc[r][i] = _mm256_setzero_ps();
    for (int sb = 0; sb < S; sb++) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            size_t at_w = (size_t)(n + r) * S + sb;
            if (ahead) {
                for (int line = 0; line < Q3_BYTES; line += 64)
                    _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + (size_t)sb * Q3_BYTES + line), PREFETCH_HINT);
                size_t later = at_w + (size_t)p->ahead * S;
                _mm_prefetch((const char *)(p->sc + later * SUBS), PREFETCH_HINT);
                _mm_prefetch((const char *)(p->d + later), PREFETCH_HINT);
            }
            const int8_t *sc = p->sc + at_w * SUBS;
            for (int h = 0; h < 2; h++) {
                __m256i w[4];
                __m256 scales;
                size_t half = ((size_t)r * S + sb) * 2 + h;
                if (unpacked) {
                    for (int s = 0; s < 4; s++) w[s] = unpacked[half].w[s];
                    scales = unpacked[half].scales;
                } else {
                    q3_half_steps(p->qs + at_w * Q3_BYTES, h, w);
                    __m256 d = _mm256_set1_ps(_cvtsh_ss(p->d[at_w]));
                    scales = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sc + 8 * h)))), d);
                    if (store) {
                        for (int s = 0; s < 4; s++) store[half].w[s] = w[s];
                        store[half].scales = scales;
                    }
                }
                for (int i = 0; i < XT; i++) {
                    size_t at = (size_t)(i0 + i) * S + sb;
                    const int8_t *xg = p->xa.xq + at * SUPER + 32 * h;
                    __m256i dot = four_steps(_mm256_sub_epi32(_mm256_setzero_si256(),
                                                              _mm256_srai_epi32(_mm256_load_si256((const __m256i *)(p->xa.sum32 + at * SUBS + 8 * h)), 3)),
                                             w, xg); /* sum (q - 4) x */
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scales, _mm256_load_ps(p->xa.dx + at * SUBS + 8 * h)), acc[r][i]);
                }
            }
        }
    }
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = hsum8(acc[r][i]);
}

#endif

typedef void Q3TileFn(const Q3Product *p, int n, int i0, const uint8_t *ahead);
#define Q3_TILE(R, XT) \
    static void q3_tile_##R##_##XT(const Q3Product *p, int n, int i0, const uint8_t *ahead) { q3_tile(p, n, R, i0, XT, ahead NOT_UNPACKED); }
#if KERNELS_AVX512
#define Q3_TILES_FOR(R) Q3_TILE(R, 1) Q3_TILE(R, 2) Q3_TILE(R, 3) Q3_TILE(R, 4)
#define Q3_TILE_ROW(R) {q3_tile_##R##_1, q3_tile_##R##_2, q3_tile_##R##_3, q3_tile_##R##_4}
#else
#define Q3_TILES_FOR(R) Q3_TILE(R, 1) Q3_TILE(R, 2)
#define Q3_TILE_ROW(R) {q3_tile_##R##_1, q3_tile_##R##_2}
#endif
Q3_TILES_FOR(1) Q3_TILES_FOR(2) Q3_TILES_FOR(3) Q3_TILES_FOR(4)
static Q3TileFn *const Q3_TILES[Q6_ROWS][Q6_X_TILE] = {Q3_TILE_ROW(1), Q3_TILE_ROW(2), Q3_TILE_ROW(3), Q3_TILE_ROW(4)};
#if !KERNELS_AVX512
static void q3_many(const Q3Product *p, int n, int i0, const UnpackedHalf *unpacked, UnpackedHalf *store) {
    q3_tile(p, n, Q6_ROWS, i0, Q6_X_TILE, NULL, unpacked, store);
}
#endif

static void q3_group(const void *product, int gi) {
    const Q3Product *p = product;
    int n = gi * Q6_ROWS, R = p->N - n < Q6_ROWS ? p->N - n : Q6_ROWS;
#if KERNELS_AVX512
    if (many_rows(p, n, R, Q3_BYTES, q3_unpack_rows, q3_unpacked_tile, Q3_TILES)) return;
#else
    if (many_rows(p, n, R, q3_many, Q3_TILES)) return;
#endif
    size_t row_bytes = (size_t)p->supers * Q3_BYTES;
    const uint8_t *ahead = n + p->ahead + Q6_ROWS <= p->N ? p->qs + (size_t)(n + p->ahead) * row_bytes : NULL;
    for (int i0 = 0; i0 < p->M; i0 += Q6_X_TILE) {
        int XT = p->M - i0 < Q6_X_TILE ? p->M - i0 : Q6_X_TILE;
        Q3_TILES[R - 1][XT - 1](p, n, i0, i0 == 0 ? ahead : NULL);
    }
}

int q3_matmul(const float *x, int M, int K, const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, float *out) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    Q3Product p = {M, K, N, K / SUPER, qs, sc, d, {0}, out, ahead_rows(Q6_ROWS, (size_t)(K / SUPER) * Q3_BYTES)};
    int status = arrange_q6_activations(x, M, K, &p.xa);
    if (status == STATUS_OK) for_each_group((N + Q6_ROWS - 1) / Q6_ROWS, q3_group, &p);
    free_q6_activations(&p.xa);
    return status;
}

/* Unpacking for prompts: q6's transposes, then d * sc * (q - 4) */
#if KERNELS_AVX512

void q3_unpack_supers(const uint8_t *qs, const int8_t *sc, const uint16_t *d, size_t sb0, size_t count, void *out, int f32) {
    for (size_t i = 0; i < count; i++) {
        size_t sb = sb0 + i;
        __m512i w[4], t[4];
        q3_steps(qs + sb * Q3_BYTES, w);
        __m512i a = _mm512_unpacklo_epi32(w[0], w[1]), b = _mm512_unpackhi_epi32(w[0], w[1]);
        __m512i c = _mm512_unpacklo_epi32(w[2], w[3]), e = _mm512_unpackhi_epi32(w[2], w[3]);
        t[0] = _mm512_unpacklo_epi64(a, c);
        t[1] = _mm512_unpackhi_epi64(a, c);
        t[2] = _mm512_unpacklo_epi64(b, e);
        t[3] = _mm512_unpackhi_epi64(b, e);
        float dd = _cvtsh_ss(d[sb]);
        for (int p = 0; p < 4; p++)
            for (int L = 0; L < 4; L++) {
                int j = 4 * L + p;
                __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(t[p], L)), _mm512_set1_epi32(4)));
                store16(out, i * SUPER + 16 * j, _mm512_mul_ps(_mm512_set1_ps(dd * (float)sc[sb * SUBS + j]), q), f32);
            }
    }
}

static int q3_unpack(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, void *out, int f32) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    size_t row = K / SUPER, row_bytes = (size_t)K * (f32 ? 4 : 2);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) q3_unpack_supers(qs, sc, d, n * row, row, (char *)out + n * row_bytes, f32);
    return 0;
}

#else

static int q3_unpack(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, void *out, int f32) {
    if (K % SUPER) return STATUS_BAD_WIDTH;
    size_t supers = (size_t)N * (K / SUPER);
#pragma omp parallel for schedule(static)
    for (size_t sb = 0; sb < supers; sb++) {
        float dd = _cvtsh_ss(d[sb]);
        for (int h = 0; h < 2; h++) {
            __m256i w[4], t[4];
            q3_half_steps(qs + sb * Q3_BYTES, h, w);
            __m256i a = _mm256_unpacklo_epi32(w[0], w[1]), b = _mm256_unpackhi_epi32(w[0], w[1]);
            __m256i c = _mm256_unpacklo_epi32(w[2], w[3]), e = _mm256_unpackhi_epi32(w[2], w[3]);
            t[0] = _mm256_unpacklo_epi64(a, c);
            t[1] = _mm256_unpackhi_epi64(a, c);
            t[2] = _mm256_unpacklo_epi64(b, e);
            t[3] = _mm256_unpackhi_epi64(b, e);
            for (int p = 0; p < 4; p++)
                for (int L = 0; L < 2; L++) {
                    int j = 8 * h + 4 * L + p;
                    __m128i bytes = L ? _mm256_extracti128_si256(t[p], 1) : _mm256_castsi256_si128(t[p]);
                    __m256 scale = _mm256_set1_ps(dd * (float)sc[sb * SUBS + j]), offset = _mm256_set1_ps(4.0f);
                    __m256 lo = _mm256_mul_ps(scale, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), offset));
                    __m256 hi = _mm256_mul_ps(scale, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))), offset));
                    store8(out, sb * SUPER + 16 * j, lo, f32);
                    store8(out, sb * SUPER + 16 * j + 8, hi, f32);
                }
        }
    }
    return 0;
}

#endif

int q3_to_bf16(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, uint16_t *out) { return q3_unpack(qs, sc, d, N, K, out, 0); }
int q3_to_f32(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, float *out) { return q3_unpack(qs, sc, d, N, K, out, 1); }
