/* The kernels of cpu_matmul.c for CPUs with AVX2 but without AVX-512 VNNI: nearly every Intel laptop
 * and desktop CPU, AMD before Zen 4, and AVX-512 CPUs capped by PLAINLLAMA_ISA=avx2. Same layouts,
 * same functions, same results up to float rounding; cpu_matmul.c's comments say what each does.
 *
 * What differs from AVX-512 is the width (8 float or int32 lanes) and the integer dot product:
 * without VNNI, a block's 32 byte products are vpmaddubsw (pairs of unsigned x signed bytes summed
 * into int16) and vpmaddwd by ones (pairs of int16 into int32), as llama.cpp does. No sum can
 * saturate: q4/q5 weights are 0..31 and x's int8 are within +-127 (2 * 31 * 127 < 32767); q8 weights
 * are multiplied as |w| (0..128) by x with w's sign (2 * 128 * 127 < 32767). Where the CPU has
 * AVX-VNNI (Intel since Alder Lake), vpdpbusd does both steps. So the integer dot products are exact
 * and equal to cpu_matmul.c's; the float steps differ in order (8 lanes: half a group at a time).
 *
 * Each (weight row, x row) pair runs the same arithmetic in the same order whatever the number of
 * rows and the tile it falls in, so a row's result does not depend on its company (batch invariance),
 * as in cpu_matmul.c.
 */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plainllama.h"
#include "q4_lanes.h"
#include "q8_lanes.h"

#if !KERNELS_AVX512 /* else cpu_matmul.c holds these functions */

#if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "the C kernels need AVX2, FMA and F16C at least; plainllama uses its PyTorch path on other CPUs"
#endif

#include "row_groups.h"
#include "vectors.h"

int kernel_level(void) { return 2; }

/* ---- q4, q5 and q8: x in int8 blocks, eight blocks' scales in one vector --------------------- */

#define GROUP_BLOCKS 8 /* blocks whose scales are converted and multiplied together */
#define W_ROWS 4       /* q8 weight rows per thread work item (q4/q5: Q4_ROWS below) */
#define X_TILE 2       /* rows of x that share one unpacking of a weight block */

/* x quantized to int8 blocks of 32 as cpu_matmul.c does (scale = max|x| / 127, rounded to nearest
 * even), in its natural order: xq [M, nb, 32], dx [M, nb], sx [M, nb] = dx * sum(q). */
typedef struct {
    int8_t *xq;
    float *dx, *sx;
    int8_t *xl; /* q8 only: xq with each whole group's halves in q8_lanes.h's order (arrange_lanes); or NULL */
    float *dxl; /* dx in the same order */
    int8_t *xs; /* q4/q5 only: x arranged as q4 rows are held (arrange_steps); or NULL */
    float *dxs, *sxs;
} QuantizedActivations;

static void free_activations(QuantizedActivations *a) {
    free(a->xq);
    free(a->dx);
    free(a->sx);
    free(a->xl);
    free(a->dxl);
    free(a->xs);
    free(a->dxs);
    free(a->sxs);
}

static int quantize_activations(const float *x, int M, int K, QuantizedActivations *a) {
    int nb = K / 32;
    size_t blocks = (size_t)M * nb;
    a->xq = aligned_alloc(64, blocks * 32);
    a->dx = aligned_alloc(64, (blocks * sizeof(float) + 63) / 64 * 64);
    a->sx = aligned_alloc(64, (blocks * sizeof(float) + 63) / 64 * 64);
    if (!a->xq || !a->dx || !a->sx) return STATUS_OUT_OF_MEMORY;
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
#pragma omp parallel for schedule(static) if (M >= 16) /* a prompt's rows on every thread */
    for (size_t blk = 0; blk < blocks; blk++) {
        const float *xb = x + 32 * blk; /* rows are whole blocks: block blk of the [M, K] matrix */
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(xb + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        float d = top / 127.0f, inv = top > 0 ? 127.0f / top : 0.0f;
        __m256i q[4], total = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv))); /* round to nearest even */
            total = _mm256_add_epi32(total, q[j]);
        }
        /* int32 -> int8 packs within 128-bit lanes; the permute puts the 32 bytes back in order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_store_si256((__m256i *)(a->xq + 32 * blk), _mm256_permutevar8x32_epi32(packed, order));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_hadd_epi32(t, t);
        t = _mm_hadd_epi32(t, t);
        a->dx[blk] = d;
        a->sx[blk] = d * (float)_mm_cvtsi128_si32(t);
    }
    return STATUS_OK;
}

typedef struct {
    int M, K, N, nb;
    const void *qs;
    const uint16_t *d, *m; /* m: q4 minimums, or NULL */
    const uint8_t *sc, *mn; /* K-quant scales (cpu_matmul.c): d and m are then per 256 weights; or NULL */
    const uint32_t *qh;    /* q5: each block's fifth bits (bit k: weight k), or NULL for q4 */
    QuantizedActivations xa;
    float *out;
    int ahead; /* rows fetched ahead */
} QuantizedProduct;

/* eight float16 values from p (only the first `count`; the rest zero) as floats */
static inline __m256 load_halves(const uint16_t *p, int count) {
    if (count >= GROUP_BLOCKS) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t part[GROUP_BLOCKS] = {0};
    memcpy(part, p, sizeof(uint16_t) * count);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)part));
}

/* q5: a block's fifth bits (bit k: weight k) as 32 bytes of 0 or 16 in weight order: byte k / 8 of
 * the word copied into bytes 8 (k / 8) .. 8 (k / 8) + 7, each tested against its own bit. */
static inline __m256i fifth_bits(uint32_t word) {
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3,
                                          3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)word), pick), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, bit), _mm256_set1_epi8(16));
}

/* ---- q4 and q5: a block in each lane ------------------------------------------------------ */

/* The rows are held with each group's blocks side by side (q4_lanes.h): 32 bytes of piece p give
 * weights 4p..4p+3 (low nibbles) and 16+4p.. (high) of 8 blocks, block b in int32 lane b, so eight
 * integer dot products per half group (8 blocks) and row of x leave each block's exact sum in its
 * lane, and one convert and two multiply-adds per 8 blocks scale them (by d dx, and the minimum or
 * -8 d / -16 d by dx sum(x)). x is arranged in the same order (arrange_steps).
 *
 * Measured (an Intel Xeon with AMX capped at AVX2, one thread, [512 x 2048] in L2, TSC ticks per
 * block and weight row): the earlier loop, which kept eight weight rows side by side (one row per
 * lane, GGUF's order, vphaddw and vphaddd to sum a block's products), Q4_0 2.26, Q4_K 2.69, Q5_K
 * 5.63 with AVX-VNNI; this one 1.54, 1.87, 2.97 (without AVX-VNNI 1.71, 2.09, 3.65). Two threads
 * from L3: Q4_0 34 -> 48 GB/s, as the AVX-512 loop. docs/performance.md. */
#define Q4_ROWS 4         /* weight rows per q4/q5 work item */

/* x arranged like the held rows: xs [M, groups, 8 steps, 16 lanes, 4 bytes] (step s, lane l: weights
 * 4s..4s+3 of block 16 g + l), dxs and sxs [M, groups * 16] (dx and dx sum(q) of that block); lanes
 * past the last block zero */
static int arrange_steps(QuantizedActivations *a, int M, int K) {
    int nb = K / 32, groups = (nb + 15) / 16;
    a->xs = aligned_alloc(32, (size_t)M * groups * 512);
    a->dxs = aligned_alloc(32, (size_t)M * groups * 16 * sizeof(float));
    a->sxs = aligned_alloc(32, (size_t)M * groups * 16 * sizeof(float));
    if (!a->xs || !a->dxs || !a->sxs) return STATUS_OUT_OF_MEMORY;
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int r = 0; r < M; r++)
        for (int g = 0; g < groups; g++)
            for (int l = 0; l < 16; l++) {
                int b = 16 * g + l;
                size_t at = ((size_t)r * groups + g) * 16 + l;
                int8_t *dst = a->xs + ((size_t)r * groups + g) * 512 + 4 * l;
                for (int s = 0; s < 8; s++) {
                    if (b < nb)
                        memcpy(dst + 64 * s, a->xq + ((size_t)r * nb + b) * 32 + 4 * s, 4);
                    else
                        memset(dst + 64 * s, 0, 4);
                }
                a->dxs[at] = b < nb ? a->dx[(size_t)r * nb + b] : 0.0f;
                a->sxs[at] = b < nb ? a->sx[(size_t)r * nb + b] : 0.0f;
            }
    return STATUS_OK;
}

/* K-quant scales of one super-block (eight blocks): uint8 `scales` times the float16 `factor`, exact
 * in float32 (an 11-bit times a 6-bit number) */
static inline __m256 load_k_scales(const uint8_t *scales, const uint16_t *factor) {
    __m256 s = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)scales)));
    return _mm256_mul_ps(s, _mm256_set1_ps(_cvtsh_ss(*factor)));
}

/* The first `count` lanes set (for vpmaskmov) */
static inline __m256i first_lanes(int count) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

/* Half a group of one row, as the tiles multiply it: its 8 steps (uint8 values 0..15, or 0..31 with
 * fifth bits), and per lane the block's scale and offset term */
typedef struct {
    __m256i w[8];
    __m256 wd, wm;
} UnpackedHalf;

/* Piece k of half h of a group (B blocks) of a held row (`group`: its first byte), `valid` its
 * blocks' lanes: steps k (low nibbles) and k + 4 (high) as uint8 0..15 */
static inline void q4_half_piece(const uint8_t *group, int B, int h, int k, __m256i valid, __m256i *low, __m256i *high) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i piece = B == 16 ? _mm256_loadu_si256((const __m256i *)(group + 64 * k + 32 * h))
                            : _mm256_maskload_epi32((const int *)(group + 4 * B * k + 32 * h), valid);
    *low = _mm256_and_si256(piece, low4);
    *high = _mm256_and_si256(_mm256_srli_epi16(piece, 4), low4);
}

/* q5: 16 in each byte of step s whose weight's fifth bit is set (`words`: the 8 blocks' 32-bit words,
 * block b's in lane b): byte s / 2 of each word copied into its 4 bytes, nibble s % 2 tested bit by bit */
static inline __m256i fifth_bits_step(__m256i words, int s) {
    int k = s / 2;
    __m256i byte = _mm256_shuffle_epi8(words, _mm256_setr_epi32(0x01010101 * k, 0x01010101 * (4 + k), 0x01010101 * (8 + k),
                                                                0x01010101 * (12 + k), 0x01010101 * k, 0x01010101 * (4 + k),
                                                                0x01010101 * (8 + k), 0x01010101 * (12 + k)));
    __m256i bits = _mm256_set1_epi32(s % 2 ? (int)0x80402010 : 0x08040201);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(byte, bits), bits), _mm256_set1_epi8(16));
}

/* A half's per-block scale wd and offset term wm (the minimum, or -8 d for Q4_0, -16 d for Q5_0);
 * `at`: the half's first block in the matrix's blocks */
static inline void q4_half_scales(const QuantizedProduct *p, size_t at, int hb, int has_m, int has_qh, int has_sc, __m256 *wd,
                                  __m256 *wm) {
    if (has_sc) { /* K-quants: the half is one super-block (K is a multiple of 256) */
        *wd = load_k_scales(p->sc + at, p->d + at / 8);
        *wm = load_k_scales(p->mn + at, p->m + at / 8);
    } else {
        *wd = load_halves(p->d + at, hb);
        *wm = has_m ? load_halves(p->m + at, hb) : _mm256_mul_ps(*wd, _mm256_set1_ps(has_qh ? -16.0f : -8.0f));
    }
}

/* The 8 blocks' integer dot products of a half's 8 steps w with x's (step s at xg + 64 s), exact.
 * With AVX-VNNI, vpdpbusd in two chains. Without it, vpmaddubsw's int16 pair sums are added as int16
 * before one vpmaddwd: q4's 8 steps (8 * 2 * 15 * 127 = 30480) or q5's 4 (4 * 2 * 31 * 127 = 31496)
 * stay below 32767, where a vpmaddwd and an add per step took half as many instructions again. */
static inline __m256i half_dot(const __m256i w[8], const int8_t *xg, int has_qh) {
#define X_STEP(s) _mm256_load_si256((const __m256i *)(xg + 64 * (s)))
#if defined(__AVXVNNI__)
    __m256i a = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[0], X_STEP(0));
    __m256i b = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[4], X_STEP(4));
    for (int s = 1; s < 4; s++) {
        a = _mm256_dpbusd_avx_epi32(a, w[s], X_STEP(s));
        b = _mm256_dpbusd_avx_epi32(b, w[s + 4], X_STEP(s + 4));
    }
    (void)has_qh;
    return _mm256_add_epi32(a, b);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a = _mm256_maddubs_epi16(w[0], X_STEP(0)), b = _mm256_maddubs_epi16(w[4], X_STEP(4));
    for (int s = 1; s < 4; s++) {
        a = _mm256_add_epi16(a, _mm256_maddubs_epi16(w[s], X_STEP(s)));
        b = _mm256_add_epi16(b, _mm256_maddubs_epi16(w[s + 4], X_STEP(s + 4)));
    }
    if (has_qh) return _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones));
    return _mm256_madd_epi16(_mm256_add_epi16(a, b), ones);
#endif
#undef X_STEP
}

/* Half h (blocks 8h .. 8h + hb - 1) of group g of weight row `row`, its group B blocks long */
static inline __attribute__((always_inline)) void q4_unpack_half(const QuantizedProduct *p, size_t row, int g, int B, int h,
                                                                 int hb, int has_m, int has_qh, int has_sc, UnpackedHalf *u) {
    const uint8_t *group = (const uint8_t *)p->qs + row * (p->K / 2) + (size_t)256 * g;
    size_t at = row * p->nb + 16 * g + 8 * h; /* the half's first block */
    __m256i valid = first_lanes(hb);
    for (int k = 0; k < 4; k++) q4_half_piece(group, B, h, k, valid, &u->w[k], &u->w[k + 4]);
    if (has_qh) {
        __m256i words = _mm256_maskload_epi32((const int *)(p->qh + at), valid);
        for (int s = 0; s < 8; s++) u->w[s] = _mm256_or_si256(u->w[s], fifth_bits_step(words, s));
    }
    q4_half_scales(p, at, hb, has_m, has_qh, has_sc, &u->wd, &u->wm);
}

/* Group g (B blocks) of weight row n + r times x rows i0 .. i0+XT-1, half by half, added to acc[r].
 * `ahead`, `unpacked`, `store`: as q4_tile's. */
static inline __attribute__((always_inline)) void q4_row_group(const QuantizedProduct *p, int n, int r, int i0, int XT,
                                                               const uint8_t *ahead, int has_m, int has_qh, int has_sc,
                                                               const UnpackedHalf *unpacked, UnpackedHalf *store, int g,
                                                               int B, __m256 acc[Q4_ROWS][X_TILE]) {
    int nb = p->nb, groups = (nb + 15) / 16;
    size_t row_bytes = (size_t)p->K / 2;
    if (ahead) { /* this group of the row p->ahead rows further on, and its scales */
        for (size_t line = 0; line < (size_t)16 * B; line += 64)
            _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + 256 * (size_t)g + line), PREFETCH_HINT);
        size_t later = (size_t)(n + r + p->ahead) * nb + 16 * g;
        _mm_prefetch((const char *)(p->d + (has_sc ? later / 8 : later)), PREFETCH_HINT);
        if (has_m) _mm_prefetch((const char *)(p->m + (has_sc ? later / 8 : later)), PREFETCH_HINT);
        if (has_sc) {
            _mm_prefetch((const char *)(p->sc + later), PREFETCH_HINT);
            _mm_prefetch((const char *)(p->mn + later), PREFETCH_HINT);
        }
        if (has_qh) _mm_prefetch((const char *)(p->qh + later), PREFETCH_HINT);
    }
    for (int h = 0; 8 * h < B; h++) {
        int hb = B - 8 * h < 8 ? B - 8 * h : 8;
        if (XT == 1 && !unpacked && !store) { /* one row of x (decoding): each piece multiplied as it is unpacked */
            size_t row = (size_t)(n + r), at = row * nb + 16 * g + 8 * h;
            const uint8_t *group = (const uint8_t *)p->qs + row * row_bytes + (size_t)256 * g;
            const int8_t *xg = p->xa.xs + ((size_t)i0 * groups + g) * 512 + 32 * h;
            __m256i valid = first_lanes(hb), words = has_qh ? _mm256_maskload_epi32((const int *)(p->qh + at), valid) : valid;
            __m256i w[8];
#if defined(__AVXVNNI__) /* each piece multiplied as it is unpacked (all eight steps first: 1.1x the time) */
            __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
#endif
            for (int k = 0; k < 4; k++) {
                q4_half_piece(group, B, h, k, valid, &w[k], &w[k + 4]);
                if (has_qh) {
                    w[k] = _mm256_or_si256(w[k], fifth_bits_step(words, k));
                    w[k + 4] = _mm256_or_si256(w[k + 4], fifth_bits_step(words, k + 4));
                }
#if defined(__AVXVNNI__)
                a = _mm256_dpbusd_avx_epi32(a, w[k], _mm256_load_si256((const __m256i *)(xg + 64 * k)));
                b = _mm256_dpbusd_avx_epi32(b, w[k + 4], _mm256_load_si256((const __m256i *)(xg + 64 * (k + 4))));
#endif
            }
#if defined(__AVXVNNI__)
            __m256i dot = _mm256_add_epi32(a, b);
#else
            __m256i dot = half_dot(w, xg, has_qh);
#endif
            __m256 wd, wm;
            q4_half_scales(p, at, hb, has_m, has_qh, has_sc, &wd, &wm);
            size_t xat = ((size_t)i0 * groups + g) * 16 + 8 * h;
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wd, _mm256_load_ps(p->xa.dxs + xat)), acc[r][0]);
            acc[r][0] = _mm256_fmadd_ps(wm, _mm256_load_ps(p->xa.sxs + xat), acc[r][0]);
            continue;
        }
        UnpackedHalf u;
        size_t half = ((size_t)r * groups + g) * 2 + h;
        if (unpacked)
            u = unpacked[half];
        else
            q4_unpack_half(p, (size_t)(n + r), g, B, h, hb, has_m, has_qh, has_sc, &u);
        if (store) store[half] = u;
        for (int i = 0; i < XT; i++) {
            size_t at = ((size_t)(i0 + i) * groups + g) * 16 + 8 * h;
            const int8_t *xg = p->xa.xs + ((size_t)(i0 + i) * groups + g) * 512 + 32 * h; /* the half's step 0 */
            __m256i dot = half_dot(u.w, xg, has_qh);
            __m256 dx = _mm256_load_ps(p->xa.dxs + at), sx = _mm256_load_ps(p->xa.sxs + at);
            acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(u.wd, dx), acc[r][i]);
            acc[r][i] = _mm256_fmadd_ps(u.wm, sx, acc[r][i]);
        }
    }
}

/* q4/q5 weight rows n .. n+R-1 times x rows i0 .. i0+XT-1 -> out. Per (weight row, x row) the
 * arithmetic is the same whatever M and the tile (batch invariance): per half group, the exact
 * integer sums, then d dx and the offset term in one fixed order. `unpacked`: the work item's halves
 * already unpacked (many rows of x: q4_group), or NULL to unpack them here; `store`: where to keep
 * what is unpacked (the first tile of many rows), or NULL. Whole groups with their sizes constant,
 * then a last, shorter one. */
static inline __attribute__((always_inline)) void q4_tile(const QuantizedProduct *p, int n, int R, int i0, int XT,
                                                          const uint8_t *ahead, int has_m, int has_qh, int has_sc,
                                                          const UnpackedHalf *unpacked, UnpackedHalf *store) {
    int nb = p->nb, whole = nb / 16;
    __m256 acc[Q4_ROWS][X_TILE];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < XT; i++) acc[r][i] = _mm256_setzero_ps();
    for (int g = 0; g < whole; g++)
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) q4_row_group(p, n, r, i0, XT, ahead, has_m, has_qh, has_sc, unpacked, store, g, 16, acc);
    if (whole * 16 < nb)
        for (int r = 0; r < R; r++) q4_row_group(p, n, r, i0, XT, ahead, has_m, has_qh, has_sc, unpacked, store, whole, nb - 16 * whole, acc);
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = hsum8(acc[r][i]);
}

/* ---- q8: four weight rows at a time ------------------------------------------------------- */

/* Half of a whole q8 group as held (q8_lanes.h: `half` at the group's start plus 32 bytes for the second
 * half): its 8 blocks, 32 bytes each in GGUF's order, into out [8 * 32]. The 8 steps of 4 bytes of
 * 8 lanes are a transpose of the 8 blocks' 8 pieces; lane l holds block Q8_LANES[l] (mod 8). */
static inline void q8_natural_blocks(const int8_t *half, int8_t *out) {
    __m256 steps[8], blocks[8];
    for (int s = 0; s < 8; s++) steps[s] = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(half + 64 * s)));
    transpose8(steps, blocks);
    for (int l = 0; l < 8; l++) _mm256_store_ps((float *)(out + 32 * (Q8_LANES[l] % 8)), blocks[l]);
}

/* x for q8 (M rows of K): each whole group's halves of 8 blocks in the order q8 rows hold them
 * (q8_lanes.h: step s of the 8 blocks at 32 s, lane l from block Q8_LANES[l] mod 8), dx alike, so
 * that a step of x meets the same step of the weights lane by lane. The last, shorter group is not
 * read from here (the tiles take it from xq). */
static int arrange_lanes(QuantizedActivations *a, int M, int K) {
    int nb = K / 32, whole = K / 512 * 16;
    a->xl = aligned_alloc(32, (size_t)M * nb * 32);
    a->dxl = aligned_alloc(32, ((size_t)M * nb * sizeof(float) + 31) / 32 * 32);
    if (!a->xl || !a->dxl) return STATUS_OUT_OF_MEMORY;
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int r = 0; r < M; r++)
        for (int g = 0; g < whole; g += 8) {
            size_t at = (size_t)r * nb + g;
            for (int l = 0; l < 8; l++) {
                int b = Q8_LANES[l] % 8;
                a->dxl[at + l] = a->dx[at + b];
                for (int s = 0; s < 8; s++) memcpy(a->xl + 32 * at + 32 * s + 4 * l, a->xq + 32 * (at + b) + 4 * s, 4);
            }
        }
    return STATUS_OK;
}

/* q8 weight rows n .. n+R-1 times x rows i0 .. i0+XT-1 -> out; R and XT constants at each call.
 * Whole groups as held (q8_lanes.h), lane by lane: a half of 8 blocks is 8 steps of 32 bytes, lane
 * l of each one block's 4 weights, so 8 integer dot products leave each block's sum in its lane, and
 * one convert and one multiply-add per 8 blocks and row of x scale them (x and its scales arranged
 * alike, arrange_lanes). The last, shorter group in GGUF's order: one multiply-add per block, the
 * rows interleaved within a block so that R x XT independent chains hide its latency (rows one after
 * another, a single chain ran at one block per ~6 cycles). */
static inline __attribute__((always_inline)) void q8_tile(const QuantizedProduct *p, int n, int R, int i0, int XT,
                                                          const uint8_t *ahead) {
    int nb = p->nb, whole = p->K / 512 * 16;
    size_t row_bytes = (size_t)p->K;
    const __m256i lane_blocks = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); /* Q8_LANES mod 8 */
    __m256 acc[W_ROWS][X_TILE];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < XT; i++) acc[r][i] = _mm256_setzero_ps();
    for (int g = 0; g < whole; g += GROUP_BLOCKS) {
        size_t half = (size_t)512 * (g / 16) + 32 * (g / 8 % 2);
        for (int r = 0; r < R; r++) {
            if (ahead) { /* the same bytes of the row p->ahead rows further on (two halves: the group), and scales */
                for (size_t line = 0; line < GROUP_BLOCKS * 32; line += 64)
                    _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + g * 32 + line), PREFETCH_HINT);
                _mm_prefetch((const char *)(p->d + (size_t)(n + r + p->ahead) * nb + g), PREFETCH_HINT);
            }
            const int8_t *w = (const int8_t *)p->qs + (size_t)(n + r) * row_bytes + half;
            __m256 wd = _mm256_permutevar8x32_ps(load_halves(p->d + (size_t)(n + r) * nb + g, GROUP_BLOCKS), lane_blocks);
            __m256i dot[X_TILE];
            for (int i = 0; i < XT; i++) dot[i] = _mm256_setzero_si256();
            for (int s = 0; s < 8; s++) {
                __m256i ws = _mm256_loadu_si256((const __m256i *)(w + 64 * s)), magnitude = _mm256_abs_epi8(ws);
                for (int i = 0; i < XT; i++) { /* |w| times x with w's sign */
                    __m256i xs = _mm256_load_si256((const __m256i *)(p->xa.xl + ((size_t)(i0 + i) * nb + g) * 32 + 32 * s));
                    dot[i] = dot_u8s8_add(dot[i], magnitude, _mm256_sign_epi8(xs, ws));
                }
            }
            for (int i = 0; i < XT; i++)
                acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i]), _mm256_mul_ps(wd, _mm256_loadu_ps(p->xa.dxl + (size_t)(i0 + i) * nb + g)),
                                            acc[r][i]);
        }
    }
    for (int g = whole; g < nb; g += GROUP_BLOCKS) {
        int blocks = nb - g < GROUP_BLOCKS ? nb - g : GROUP_BLOCKS;
        float scale[W_ROWS][X_TILE][GROUP_BLOCKS] __attribute__((aligned(32)));
        for (int r = 0; r < R; r++) {
            if (ahead) {
                for (size_t line = 0; line < (size_t)blocks * 32; line += 64)
                    _mm_prefetch((const char *)(ahead + (size_t)r * row_bytes + g * 32 + line), PREFETCH_HINT);
                _mm_prefetch((const char *)(p->d + (size_t)(n + r + p->ahead) * nb + g), PREFETCH_HINT);
            }
            __m256 wd = load_halves(p->d + (size_t)(n + r) * nb + g, blocks);
            for (int i = 0; i < XT; i++) {
                size_t at = (size_t)(i0 + i) * nb + g;
                __m256 dx = blocks == GROUP_BLOCKS ? _mm256_loadu_ps(p->xa.dx + at)
                                                   : _mm256_maskload_ps(p->xa.dx + at, _mm256_cmpgt_epi32(_mm256_set1_epi32(blocks), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
                _mm256_store_ps(scale[r][i], _mm256_mul_ps(wd, dx));
            }
        }
        for (int b = 0; b < blocks; b++) {
            __m256i xq[X_TILE];
            for (int i = 0; i < XT; i++) xq[i] = _mm256_load_si256((const __m256i *)(p->xa.xq + ((size_t)(i0 + i) * nb + g + b) * 32));
            for (int r = 0; r < R; r++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)((const int8_t *)p->qs + (size_t)(n + r) * row_bytes + (size_t)(g + b) * 32));
                for (int i = 0; i < XT; i++) /* |w| times x with w's sign */
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_abs_epi8(w), _mm256_sign_epi8(xq[i], w))),
                                                _mm256_set1_ps(scale[r][i][b]), acc[r][i]);
            }
        }
    }
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = hsum8(acc[r][i]);
}

typedef void TileFn(const QuantizedProduct *p, int n, int i0, const uint8_t *ahead);
#define Q8_TILE(R, XT)                                                                               \
    static void q8_tile_##R##_##XT(const QuantizedProduct *p, int n, int i0, const uint8_t *ahead) { \
        q8_tile(p, n, R, i0, XT, ahead);                                                             \
    }
#define Q8_TILES_FOR(R) Q8_TILE(R, 1) Q8_TILE(R, 2)
Q8_TILES_FOR(1) Q8_TILES_FOR(2) Q8_TILES_FOR(3) Q8_TILES_FOR(4)
#define Q8_TILE_ROW(R) {q8_tile_##R##_1, q8_tile_##R##_2}
static TileFn *const Q8_TILES[W_ROWS][X_TILE] = {Q8_TILE_ROW(1), Q8_TILE_ROW(2), Q8_TILE_ROW(3), Q8_TILE_ROW(4)};

static void q8_group(const void *product, int gi) {
    const QuantizedProduct *p = product;
    int n = gi * W_ROWS, R = p->N - n < W_ROWS ? p->N - n : W_ROWS;
    const uint8_t *ahead = /* the rows p->ahead on */
        n + p->ahead + W_ROWS <= p->N ? (const uint8_t *)p->qs + (size_t)(n + p->ahead) * p->K : NULL;
    for (int i0 = 0; i0 < p->M; i0 += X_TILE) {
        int XT = p->M - i0 < X_TILE ? p->M - i0 : X_TILE;
        Q8_TILES[R - 1][XT - 1](p, n, i0, i0 == 0 ? ahead : NULL);
    }
}

/* q4: Q4_ROWS rows with the loops unrolled, for each kind of block (with or without minimums, fifth
 * bits and K-quant scales: constants, so that the compiler keeps the sums in registers), or a
 * matrix's last rows when N is not a multiple of Q4_ROWS. K-quant scales come with minimums. */
#define Q4_TILE(XT, M, QH, SC)                                                                                \
    static void q4_tile_##XT##_##M##QH##SC(const QuantizedProduct *p, int n, int i0, const uint8_t *ahead) { \
        q4_tile(p, n, Q4_ROWS, i0, XT, ahead, M, QH, SC, NULL, NULL);                                       \
    }
#define Q4_TILES_FOR(M, QH, SC) Q4_TILE(1, M, QH, SC) Q4_TILE(2, M, QH, SC)
Q4_TILES_FOR(0, 0, 0) Q4_TILES_FOR(0, 1, 0) Q4_TILES_FOR(1, 0, 0) Q4_TILES_FOR(1, 1, 0) Q4_TILES_FOR(1, 0, 1) Q4_TILES_FOR(1, 1, 1)
#define Q4_TILE_KINDS(XT)                                                                                  \
    {{{q4_tile_##XT##_000, NULL}, {q4_tile_##XT##_010, NULL}}, {{q4_tile_##XT##_100, q4_tile_##XT##_101}, \
                                                               {q4_tile_##XT##_110, q4_tile_##XT##_111}}}
static TileFn *const Q4_TILES[X_TILE][2][2][2] = {Q4_TILE_KINDS(1), Q4_TILE_KINDS(2)}; /* [XT - 1][m][qh][sc] */
static void q4_tile_rest(const QuantizedProduct *p, int n, int R, int i0, int XT) {
    q4_tile(p, n, R, i0, XT, NULL, p->m != NULL, p->qh != NULL, p->sc != NULL, NULL, NULL);
}

/* Many rows of x (a prompt's products where there is no bfloat16 arithmetic): a work item's rows are
 * unpacked once, by the first tile of x rows, into a per-thread buffer, and every later tile reads
 * them from there instead of unpacking them again. The arithmetic per (weight row, x row) pair is
 * q4_tile's either way: the same bits. */
#define MANY_ROWS 16
typedef void ManyFn(const QuantizedProduct *p, int n, int i0, const UnpackedHalf *unpacked, UnpackedHalf *store);
#define Q4_MANY(M, QH, SC)                                                                                 \
    static void q4_many_##M##QH##SC(const QuantizedProduct *p, int n, int i0, const UnpackedHalf *unpacked, \
                                    UnpackedHalf *store) {                                                 \
        q4_tile(p, n, Q4_ROWS, i0, X_TILE, NULL, M, QH, SC, unpacked, store);                              \
    }
Q4_MANY(0, 0, 0) Q4_MANY(0, 1, 0) Q4_MANY(1, 0, 0) Q4_MANY(1, 1, 0) Q4_MANY(1, 0, 1) Q4_MANY(1, 1, 1)
static ManyFn *const Q4_MANY[2][2][2] = {{{q4_many_000, NULL}, {q4_many_010, NULL}},
                                         {{q4_many_100, q4_many_101}, {q4_many_110, q4_many_111}}}; /* [m][qh][sc] */

static void q4_group(const void *product, int gi) {
    const QuantizedProduct *p = product;
    int n = gi * Q4_ROWS, R = p->N - n < Q4_ROWS ? p->N - n : Q4_ROWS;
    int m = p->m != NULL, qh = p->qh != NULL, sc = p->sc != NULL; /* sc: m too (K-quants' minimums) */
    size_t halves = (size_t)Q4_ROWS * (p->nb + 15) / 16 * 2;
    UnpackedHalf *unpacked;
    if (p->M >= MANY_ROWS && R == Q4_ROWS && (unpacked = thread_buffer(sizeof(UnpackedHalf) * halves))) {
        ManyFn *many = Q4_MANY[m][qh][sc];
        many(p, n, 0, NULL, unpacked); /* the first X_TILE rows unpack and keep the halves */
        int i0 = X_TILE;
        for (; i0 + X_TILE <= p->M; i0 += X_TILE) many(p, n, i0, unpacked, NULL);
        if (i0 < p->M) Q4_TILES[p->M - i0 - 1][m][qh][sc](p, n, i0, NULL);
        return;
    }
    const uint8_t *ahead = /* the rows p->ahead on */
        n + p->ahead + Q4_ROWS <= p->N ? (const uint8_t *)p->qs + (size_t)(n + p->ahead) * (p->K / 2) : NULL;
    for (int i0 = 0; i0 < p->M; i0 += X_TILE) {
        int XT = p->M - i0 < X_TILE ? p->M - i0 : X_TILE;
        if (R < Q4_ROWS)
            q4_tile_rest(p, n, R, i0, XT);
        else
            Q4_TILES[XT - 1][m][qh][sc](p, n, i0, i0 == 0 ? ahead : NULL);
    }
}

static int quantized_matmul(const float *x, int M, int K, const void *qs, const uint32_t *qh, const uint16_t *d,
                            const uint16_t *m, const uint8_t *sc, const uint8_t *mn, int N, float *out, int q8) {
    if (K % 64 || (sc && K % 256)) return STATUS_BAD_WIDTH;
    if (sc && !(mn && m)) return STATUS_BAD_LAYOUT; /* K-quant scales come with their minimums */
    QuantizedProduct p = {M, K, N, K / 32, qs, d, m, sc, mn, qh, {0}, out};
    /* q4: twice as far as ahead_rows (the q4 loop measured 16 rows of 1 KB best of 8, 16 and 32) */
    p.ahead = q8 ? ahead_rows(W_ROWS, (size_t)K) : 2 * ahead_rows(Q4_ROWS, (size_t)K / 2);
    int status = quantize_activations(x, M, K, &p.xa);
    if (status == STATUS_OK) status = q8 ? arrange_lanes(&p.xa, M, K) : arrange_steps(&p.xa, M, K);
    if (status == STATUS_OK) for_each_group(q8 ? (N + W_ROWS - 1) / W_ROWS : (N + Q4_ROWS - 1) / Q4_ROWS, q8 ? q8_group : q4_group, &p);
    free_activations(&p.xa);
    return status;
}

int q4_matmul(const float *x, int M, int K, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
              const uint8_t *mn, int N, float *out) {
    return quantized_matmul(x, M, K, qs, NULL, d, m, sc, mn, N, out, 0);
}

int q5_matmul(const float *x, int M, int K, const uint8_t *qs, const uint32_t *qh, const uint16_t *d,
              const uint16_t *m, const uint8_t *sc, const uint8_t *mn, int N, float *out) {
    return quantized_matmul(x, M, K, qs, qh, d, m, sc, mn, N, out, 0);
}

int q8_matmul(const float *x, int M, int K, const int8_t *qs, const uint16_t *d, int N, float *out) {
    return quantized_matmul(x, M, K, qs, NULL, d, NULL, NULL, NULL, N, out, 1);
}

/* ---- 16-bit floats ------------------------------------------------------------------------- */

static inline __m256 load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

static inline __m256 load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* HALF_ROWS weight rows share each load of x; two sums per row (16 weights a step) keep eight FMA
 * chains in flight within AVX2's sixteen registers. Rows are prefetched HALF_PREFETCH weights ahead,
 * as in cpu_matmul.c. */
#define HALF_ROWS 4
#define HALF_PREFETCH 512
typedef struct {
    const float *x;
    int M, K, N;
    const uint16_t *w;
    float *out;
} HalfProduct;

#define HALF_GROUP(NAME, LOAD)                                                                       \
    static void NAME(const void *product, int gi) {                                                  \
        const HalfProduct *p = product;                                                              \
        int M = p->M, K = p->K, N = p->N;                                                            \
        int n0 = gi * HALF_ROWS, rows = N - n0 < HALF_ROWS ? N - n0 : HALF_ROWS;                     \
        const uint16_t *row = p->w + (size_t)n0 * K;                                                 \
        const uint16_t *next = n0 + 2 * HALF_ROWS <= N ? row + (size_t)HALF_ROWS * K : row;          \
        for (int r = 0; r < M; r++) {                                                                \
            const float *xr = p->x + (size_t)r * K;                                                  \
            __m256 acc[HALF_ROWS], acc2[HALF_ROWS];                                                  \
            for (int j = 0; j < HALF_ROWS; j++) acc[j] = acc2[j] = _mm256_setzero_ps();              \
            for (int k = 0; k < K; k += 16) {                                                        \
                if (r == 0 && k % 32 == 0) {                                                         \
                    const uint16_t *ahead = row;                                                     \
                    int at = k + HALF_PREFETCH;                                                      \
                    if (at >= K) ahead = next, at -= K;                                              \
                    if (at >= K) at = k;                                                             \
                    for (int j = 0; j < rows; j++) _mm_prefetch((const char *)(ahead + (size_t)j * K + at), PREFETCH_HINT); \
                }                                                                                    \
                __m256 xv = _mm256_loadu_ps(xr + k), xv2 = _mm256_loadu_ps(xr + k + 8);             \
                if (rows == HALF_ROWS)                                                               \
                    for (int j = 0; j < HALF_ROWS; j++) {                                            \
                        acc[j] = _mm256_fmadd_ps(LOAD(row + (size_t)j * K + k), xv, acc[j]);         \
                        acc2[j] = _mm256_fmadd_ps(LOAD(row + (size_t)j * K + k + 8), xv2, acc2[j]);  \
                    }                                                                                \
                else                                                                                 \
                    for (int j = 0; j < rows; j++) {                                                 \
                        acc[j] = _mm256_fmadd_ps(LOAD(row + (size_t)j * K + k), xv, acc[j]);         \
                        acc2[j] = _mm256_fmadd_ps(LOAD(row + (size_t)j * K + k + 8), xv2, acc2[j]);  \
                    }                                                                                \
            }                                                                                        \
            for (int j = 0; j < rows; j++) p->out[(size_t)r * N + n0 + j] = hsum8(_mm256_add_ps(acc[j], acc2[j])); \
        }                                                                                            \
    }

HALF_GROUP(f16_group, load_f16)
HALF_GROUP(bf16_group, load_bf16)

static int half_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *out, GroupFn *group) {
    if (K % 32) return STATUS_BAD_WIDTH;
    HalfProduct p = {x, M, K, N, w, out};
    for_each_group((N + HALF_ROWS - 1) / HALF_ROWS, group, &p);
    return STATUS_OK;
}

int f16_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *out) { return half_matmul(x, M, K, w, N, out, f16_group); }
int bf16_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *out) { return half_matmul(x, M, K, w, N, out, bf16_group); }

/* ---- unpacking, for products with many rows (prefill): bfloat16 (f32 = 0) or float32 (f32 = 1) -- */

/* One q4/q5 block (its 16 bytes in GGUF's order: `packed`; blk: its index in the matrix) as 32 weights
 * d q + m (vs: d, vm: m, broadcast) at out + 32 * blk */
static inline void q4_unpack_block(__m128i packed, const uint32_t *qh, __m256 vs, __m256 vm, size_t blk, void *out, int f32) {
    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
    if (qh) q = _mm256_or_si256(q, fifth_bits(qh[blk]));
    for (int h = 0; h < 2; h++) {
        __m128i half = h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
        __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(half)), vs, vm);
        __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(half, 8))), vs, vm);
        store8(out, 32 * blk + 16 * h, lo, f32);
        store8(out, 32 * blk + 16 * h + 8, hi, f32);
    }
}

/* Every row's blocks back in GGUF's order (q4_lanes.h), eight at a time where a whole group holds
 * them, and unpacked */
static int q4_unpack(const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
                     const uint8_t *mn, int N, int K, void *out, int f32) {
    int nb = K / 32, whole = K / 512 * 16;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = qs + (size_t)n * (K / 2);
        size_t first = (size_t)n * nb;
        int b = 0;
        for (; b < whole; b += 8) { /* the eight blocks' d and m side by side, as ggml computes them */
            size_t blk = first + b;
            __m128i eight[8];
            q4_blocks8(row, b, eight);
            __m256 scales, minimums;
            if (sc) {
                scales = load_k_scales(sc + blk, d + blk / 8);
                minimums = load_k_scales(mn + blk, m + blk / 8);
            } else {
                scales = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + blk)));
                minimums = m ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + blk))) : _mm256_mul_ps(scales, _mm256_set1_ps(qh ? -16.0f : -8.0f));
            }
            for (int j = 0; j < 8; j++) {
                __m256i lane = _mm256_set1_epi32(j);
                q4_unpack_block(eight[j], qh, _mm256_permutevar8x32_ps(scales, lane), _mm256_permutevar8x32_ps(minimums, lane), blk + j, out, f32);
            }
        }
        for (; b < nb; b++) {
            size_t blk = first + b;
            uint8_t natural[16];
            q4_natural_block(row, K, b, natural);
            float scale = sc ? _cvtsh_ss(d[blk / 8]) * sc[blk] : _cvtsh_ss(d[blk]);
            float minimum = sc ? _cvtsh_ss(m[blk / 8]) * mn[blk] : m ? _cvtsh_ss(m[blk]) : (qh ? -16.0f : -8.0f) * scale;
            q4_unpack_block(_mm_loadu_si128((const __m128i *)natural), qh, _mm256_set1_ps(scale), _mm256_set1_ps(minimum), blk, out, f32);
        }
    }
    return 0;
}

int q4_to_bf16(const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
               const uint8_t *mn, int N, int K, uint16_t *out) {
    return q4_unpack(qs, qh, d, m, sc, mn, N, K, out, 0);
}

int q4_to_f32(const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
              const uint8_t *mn, int N, int K, float *out) {
    return q4_unpack(qs, qh, d, m, sc, mn, N, K, out, 1);
}

static int q8_unpack(const int8_t *qs, const uint16_t *d, int N, int K, void *out, int f32) {
    int nb = K / 32, lanes = K / 512 * 16; /* blocks below `lanes` are held in q8_lanes.h's order */
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *row = qs + (size_t)n * K;
        int8_t natural[8 * 32] __attribute__((aligned(32)));
        for (int b = 0; b < nb; b++) {
            if (b < lanes && b % 8 == 0) q8_natural_blocks(row + (size_t)512 * (b / 16) + 32 * (b / 8 % 2), natural);
            const int8_t *block = b < lanes ? natural + 32 * (b % 8) : row + 32 * b;
            size_t blk = (size_t)n * nb + b;
            __m256 vs = _mm256_set1_ps(_cvtsh_ss(d[blk]));
            for (int h = 0; h < 2; h++) {
                __m128i q = _mm_loadu_si128((const __m128i *)(block + 16 * h));
                store8(out, 32 * blk + 16 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), vs), f32);
                store8(out, 32 * blk + 16 * h + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), vs), f32);
            }
        }
    }
    return 0;
}

int q8_to_bf16(const int8_t *qs, const uint16_t *d, int N, int K, uint16_t *out) { return q8_unpack(qs, d, N, K, out, 0); }
int q8_to_f32(const int8_t *qs, const uint16_t *d, int N, int K, float *out) { return q8_unpack(qs, d, N, K, out, 1); }

int f16_to_bf16(const uint16_t *w, size_t n, uint16_t *out) {
    /* n a multiple of 16 */
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n / 16; i++) {
        store8(out, 16 * i, load_f16(w + 16 * i), 0);
        store8(out, 16 * i + 8, load_f16(w + 16 * i + 8), 0);
    }
    return 0;
}

/* ---- the machine's read bandwidth ------------------------------------------------------------ */

double read_bytes(const uint8_t *buf, size_t n) {
    /* as cpu_matmul.c's: every 64-bit word summed by all threads, one stream each, 2 KB prefetch */
    size_t blocks = n / 256;
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
        __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma omp for schedule(static)
        for (size_t i = 0; i < blocks; i++) {
            const __m256i *p = (const __m256i *)(buf + 256 * i);
            if (i + 4 < blocks)
                for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(p + 64 + 2 * j), PREFETCH_HINT); /* 2 KB ahead */
            for (int j = 0; j < 8; j++) s[j % 4] = _mm256_add_epi64(s[j % 4], _mm256_loadu_si256(p + j));
        }
        __m256i all = _mm256_add_epi64(_mm256_add_epi64(s[0], s[1]), _mm256_add_epi64(s[2], s[3]));
        int64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, all);
        total += (double)(lanes[0] + lanes[1] + lanes[2] + lanes[3]);
    }
    return total;
}

#endif
