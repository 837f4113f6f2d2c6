/* Matrix products for decoding on the CPU: a few rows of activations times a weight matrix kept in
 * its stored, compressed form.
 *
 * Why this file exists: a decode step reads every weight once for one token, so its speed is the
 * speed at which weights come out of memory. PyTorch's stock CPU kernels read [1 x K] x [K x N]
 * products at 7-17 GB/s here, a third to two thirds of what the memory gives; these loops read at
 * close to the memory's speed, and read 4- or 8-bit weights instead of floats.
 *
 * Layouts (all row-major, one row per output feature; K = input width, a multiple of 64):
 *   q4:  nibbles [N, K/2] in GGUF's order (byte j of a 32-weight block holds weights j and j+16),
 *        scales d [N, K/32] float16, optional minimums m [N, K/32] float16:
 *        weight = d * q + m, or d * (q - 8) without m (Q4_0).
 *        K-quant scales (Q4_K, Q5_K as stored): uint8 sc and mn [N, K/32], float16 d and m [N, K/256]:
 *        a block's scale is d * sc and its minimum m * mn (m = -dmin), products of an 11-bit and a
 *        6-bit number, so exact in float32.
 *   q8:  int8 [N, K], scales d [N, K/32] float16: weight = d * q (Q8_0).
 *   f16, bf16: [N, K] 16-bit floats.
 * The activations x are float32 [M, K]; the result is float32 [M, N].
 *
 * The quantized products follow llama.cpp's scheme: x is itself quantized to int8 in blocks of 32
 * (scale = max|x| / 127), so that a block's dot product is one integer instruction (AVX-512 VNNI's
 * vpdpbusd multiplies 64 unsigned by 64 signed bytes and adds groups of four into 16 int32 lanes),
 * scaled once per block by d_weight * d_x. This costs ~0.4% relative error per block of x.
 *
 * Threads: OpenMP, linked against the same libgomp as PyTorch so both share one thread pool and
 * torch.set_num_threads applies to both.
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
#include "unpack.h"

#if KERNELS_AVX512 /* else cpu_matmul_avx2.c holds these functions */

#include "row_groups.h"
#include "vectors.h"

int kernel_level(void) { return 3; }

/* ---- q4 and q8: sixteen blocks side by side ------------------------------------------------- */

/* The quantized products work on sixteen 32-weight blocks at a time (a "group", 512 weights), with
 * each of the sixteen int32 lanes of a vector following one block: step s of a group multiplies
 * weights 4s..4s+3 of every block (vpdpbusd adds the four products into the block's lane), so after
 * eight steps each lane holds one block's whole integer dot product, and the group's sixteen blocks
 * are scaled with one convert and one multiply-add. (Lanes that mix blocks, as a plain load gives,
 * need a convert, a lane-spreading permute and a multiply-add per 64 weights: 3.5x the work.)
 *
 * The rows are held with each group's blocks side by side (q4_lanes.h, q8_lanes.h), so a step is a
 * load (q8) or a load's low or high nibbles (q4), and a row's group serves X_TILE rows of x. The x
 * side is arranged in the same order when it is quantized. q4 holds block b in lane b, and its scales
 * load in place; q8 holds its whole groups in the order an earlier transpose left them (Q8_LANES),
 * and its scales are permuted to match.
 *
 * Batch invariance: the arithmetic for a (weight row, x row) pair is the same whatever the number
 * of rows of x and whichever tile the row falls in (integer products are exact; the float steps run
 * in one fixed order per group), so a row's result is the same alone or beside others. */

#define GROUP_BLOCKS 16
#define GROUP_STEPS 8 /* 4-byte steps per 32-weight block */
#define W_ROWS 4      /* weight rows per thread work item (and per prefetch distance) */
#define X_TILE 4      /* rows of x that share one unpacking of a weight row's group */

/* What a product's rows carry besides their numbers: each kind's loops are compiled apart (the tiles
 * below), so that the tests for minimums, fifth bits and K-quant scales are settled at compile time
 * and the loop over a work item's rows is unrolled with its accumulators in registers. A loop that
 * tested them at run time kept the accumulators in memory: 1.2x the time per block in L2. */
enum {
    KIND_Q8 = 1, /* q8 (else q4 or q5) */
    KIND_M = 2,  /* minimums m (Q4_1, Q5_1; K-quants) */
    KIND_QH = 4, /* fifth bits qh (q5) */
    KIND_SC = 8, /* K-quant scales sc, mn (d and m per 256 weights) */
};

/* lane -> block within a group: q4 block b in lane b (q4_lanes.h); Q8_LANES: q8_lanes.h, the order
 * q8 rows' groups are held in (a last, shorter q8 group is transposed into the same order) */
static const int Q4_LANES[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* x quantized to int8 blocks of 32 (scale = max|x| / 127) and arranged by group, step and lane:
 * xq [M, groups, 8 steps, 16 lanes, 4 bytes]; per lane, dx (the block's scale) and a sum for the
 * weights' offset: sx = dx * sum(q) (q4), or sum128 = 128 * sum(q) (q8). Lanes past the last block
 * are zero. */
typedef struct {
    int8_t *xq;
    float *dx, *sx;
    int32_t *sum128;
} ArrangedActivations;

static void free_activations(ArrangedActivations *a) {
    free(a->xq);
    free(a->dx);
    free(a->sx);
    free(a->sum128);
}

static int arrange_activations(const float *x, int M, int K, const int *lanes, ArrangedActivations *a) {
    int nb = K / 32, groups = (nb + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
    size_t lanes_total = (size_t)M * groups * GROUP_BLOCKS;
    a->xq = aligned_alloc(64, lanes_total * 32);
    a->dx = aligned_alloc(64, lanes_total * sizeof(float));
    a->sx = aligned_alloc(64, lanes_total * sizeof(float));
    a->sum128 = aligned_alloc(64, lanes_total * sizeof(int32_t));
    if (!a->xq || !a->dx || !a->sx || !a->sum128) return STATUS_OUT_OF_MEMORY;
    /* a prompt's rows on every thread (64 rows of 8192: 0.22 ms on one, 8% of the product) */
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int r = 0; r < M; r++)
        for (int g = 0; g < groups; g++)
            for (int lane = 0; lane < GROUP_BLOCKS; lane++) {
                int b = g * GROUP_BLOCKS + lanes[lane];
                size_t at = ((size_t)r * groups + g) * GROUP_BLOCKS + lane;
                int8_t *dst = a->xq + ((size_t)r * groups + g) * GROUP_BLOCKS * 32 + 4 * lane;
                if (b >= nb) {
                    a->dx[at] = a->sx[at] = 0;
                    a->sum128[at] = 0;
                    for (int s = 0; s < GROUP_STEPS; s++) memset(dst + 64 * s, 0, 4);
                    continue;
                }
                const float *xb = x + (size_t)r * K + 32 * b;
                __m512 a0 = _mm512_loadu_ps(xb), a1 = _mm512_loadu_ps(xb + 16);
                float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
                float d = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
                __m512 vinv = _mm512_set1_ps(inv);
                __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, vinv)); /* round to nearest even */
                __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, vinv));
                int8_t q[32];
                _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(i0));
                _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(i1));
                int sum = _mm512_reduce_add_epi32(i0) + _mm512_reduce_add_epi32(i1);
                a->dx[at] = d;
                a->sx[at] = d * (float)sum;
                a->sum128[at] = 128 * sum;
                for (int s = 0; s < GROUP_STEPS; s++) memcpy(dst + 64 * s, q + 4 * s, 4); /* step s: weights 4s..4s+3 */
            }
    return STATUS_OK;
}

typedef struct {
    int M, K, N, nb, groups;
    const void *qs;
    const uint16_t *d, *m; /* m: q4 minimums, or NULL */
    const uint8_t *sc, *mn; /* K-quant scales: d and m are then per 256 weights; or NULL */
    const uint32_t *qh;    /* q5: each block's fifth bits (bit k: weight k), or NULL for q4 */
    int kind;              /* KIND_ bits (above): what the rows carry */
    ArrangedActivations xa;
    float *out;
    int ahead; /* rows fetched ahead (ahead_rows) */
} QuantizedProduct;

/* q5: the fifth bits of a group's 16 blocks added to its steps (block b's 32-bit word in lane b, as
 * its values). For step s (weights 4s..4s+3 of each block), byte s / 2 of each word is copied into the
 * word's 4 bytes and its nibble s % 2 tested bit by bit: a 64-bit mask, one bit per byte of w[s],
 * where 16 is added. */
static inline void add_fifth_bits(const uint32_t *qh_row, int g, int blocks, __m512i w[GROUP_STEPS]) {
    __mmask16 mask = blocks >= GROUP_BLOCKS ? 0xFFFF : (__mmask16)((1u << blocks) - 1);
    __m512i words = _mm512_maskz_loadu_epi32(mask, qh_row + GROUP_BLOCKS * g);
    const __m512i sixteen = _mm512_set1_epi8(16);
#if defined(__AVX512BITALG__)
    /* One vpshufbitqmb a step: each 64-bit lane holds blocks 2q and 2q + 1, and mask bit 8q + j
     * (block 2q + j / 4, weight 4s + j % 4) is bit 32 (j / 4) + 4s + j % 4 of that lane; the same
     * selection in every lane. The same masks as below in 8 operations instead of 12: Q5_K decode
     * products 1.08-1.18x faster in L2/L3 (one thread, K = 2048). Where the CPU lacks BITALG (Cascade
     * Lake, Skylake-X), the shuffles and tests below. */
    for (int s = 0; s < GROUP_STEPS; s++) {
        const __m512i bits = _mm512_set1_epi64((long long)(0x2322212003020100ULL + 0x0404040404040404ULL * (uint64_t)s));
        w[s] = _mm512_mask_add_epi8(w[s], _mm512_bitshuffle_epi64_mask(words, bits), w[s], sixteen);
    }
#else
    const __m512i low_bits = _mm512_set1_epi32(0x08040201), high_bits = _mm512_set1_epi32((int)0x80402010);
    for (int s = 0; s < GROUP_STEPS; s++) {
        int k = s / 2; /* vpshufb picks within 128-bit lanes: dword i of a lane is bytes 4i..4i+3 */
        __m512i byte = _mm512_shuffle_epi8(
            words, _mm512_set4_epi32(0x01010101 * (12 + k), 0x01010101 * (8 + k), 0x01010101 * (4 + k), 0x01010101 * k));
        __mmask64 set = _mm512_test_epi8_mask(byte, s % 2 ? high_bits : low_bits);
        w[s] = _mm512_mask_add_epi8(w[s], set, w[s], sixteen);
    }
#endif
}

/* A row's sixteen float16 block values of group g, block b in lane b (zeros past the last block). */
static inline __m512 group_halves(const uint16_t *row, int g, int blocks) {
    __mmask16 mask = blocks >= GROUP_BLOCKS ? 0xFFFF : (__mmask16)((1u << blocks) - 1);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, row + GROUP_BLOCKS * g));
}

/* K-quant scales: a row's sixteen blocks of group g (two super-blocks), each its uint8 `scales` entry
 * times its super-block's float16 `factors` entry (exact in float32), block b in lane b */
static inline __m512 group_k_scales(const uint8_t *scales, const uint16_t *factors, int g, int blocks) {
    __mmask16 mask = blocks >= GROUP_BLOCKS ? 0xFFFF : (__mmask16)((1u << blocks) - 1);
    __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, scales + GROUP_BLOCKS * g)));
    __m128 f = _mm_cvtph_ps(_mm_maskz_loadu_epi16(blocks > 8 ? 3 : 1, factors + 2 * g)); /* lanes 0, 1 */
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_mul_ps(s, _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(f)));
}

/* 64 bytes at p, only the first `valid` of them (the rest zero) */
static inline __m512i load_part(const void *p, int valid) {
    if (valid >= 64) return _mm512_loadu_si512(p);
    if (valid <= 0) return _mm512_setzero_si512();
    return _mm512_maskz_loadu_epi8(valid >= 64 ? ~0ULL : ((1ULL << valid) - 1), p);
}

/* 4x4 transposes of 32-bit pieces inside each 128-bit lane of four registers */
static inline void transpose4(__m512i r0, __m512i r1, __m512i r2, __m512i r3, __m512i t[4]) {
    __m512i a = _mm512_unpacklo_epi32(r0, r1), b = _mm512_unpackhi_epi32(r0, r1);
    __m512i c = _mm512_unpacklo_epi32(r2, r3), e = _mm512_unpackhi_epi32(r2, r3);
    t[0] = _mm512_unpacklo_epi64(a, c);
    t[1] = _mm512_unpackhi_epi64(a, c);
    t[2] = _mm512_unpacklo_epi64(b, e);
    t[3] = _mm512_unpackhi_epi64(b, e);
}

/* One group of a held q4 row (q4_lanes.h: piece p of every block side by side, 4 * blocks bytes at
 * 4 * blocks * p) -> w[s] step s = weights 4s..4s+3 of each block as uint8 0..15, block b in lane b.
 * GGUF's byte j of a block holds weight j (low nibble) and j + 16 (high nibble), so piece p gives
 * steps p (low) and p + 4 (high). */
static inline void q4_group_steps(const uint8_t *src, int blocks, __m512i w[GROUP_STEPS]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 4; p++) {
        __m512i piece = blocks == GROUP_BLOCKS ? _mm512_loadu_si512(src + 64 * p) : load_part(src + 4 * blocks * p, 4 * blocks);
        w[p] = _mm512_and_si512(piece, low4);
        w[p + 4] = _mm512_and_si512(_mm512_srli_epi16(piece, 4), low4);
    }
}

/* One group of a q8 row (16 blocks x 32 bytes) -> w[s] = weights 4s..4s+3 of each block, + 128 as
 * uint8 (vpdpbusd multiplies unsigned by signed bytes; the x side subtracts 128 * sum(x)). A whole
 * group is held in that order (q8_lanes.h); a last, shorter one is transposed here. */
static inline void q8_group_steps(const int8_t *src, int blocks, __m512i w[GROUP_STEPS]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    if (blocks == GROUP_BLOCKS) {
        for (int s = 0; s < GROUP_STEPS; s++) w[s] = _mm512_xor_si512(_mm512_loadu_si512(src + 64 * s), flip);
        return;
    }
    int valid = 32 * blocks;
    __m512i r[8], lo[4], hi[4];
    for (int i = 0; i < 8; i++) r[i] = load_part(src + 64 * i, valid - 64 * i);
    transpose4(r[0], r[1], r[2], r[3], lo); /* 128-bit lane L of lo[d]: blocks 0,2,4,6 (L=0) or 1,3,5,7 (L=2), piece d; L=1,3: piece 4+d */
    transpose4(r[4], r[5], r[6], r[7], hi); /* the same for blocks 8..15 */
    for (int s = 0; s < 4; s++) {
        w[s] = _mm512_xor_si512(_mm512_shuffle_i32x4(lo[s], hi[s], 0x88), flip);     /* lanes 0, 2 of each */
        w[s + 4] = _mm512_xor_si512(_mm512_shuffle_i32x4(lo[s], hi[s], 0xDD), flip); /* lanes 1, 3 */
    }
}

/* int32 dot product per lane of one group: 8 steps in two chains (integers: the order is exact) */
static inline __m512i group_dot(const __m512i w[GROUP_STEPS], const int8_t *xg) {
    const __m512i *x = (const __m512i *)xg;
    __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_load_si512(x + 0));
    __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], _mm512_load_si512(x + 4));
    for (int s = 1; s < 4; s++) {
        a = _mm512_dpbusd_epi32(a, w[s], _mm512_load_si512(x + s));
        b = _mm512_dpbusd_epi32(b, w[s + 4], _mm512_load_si512(x + s + 4));
    }
    return _mm512_add_epi32(a, b);
}

/* Group g of weight row `row` (its bytes at src): its eight steps w, and per lane the block's scale
 * wd and the term for the weights' offset wm (q4: the minimum, or d * -8 / -16; q8: unused). */
static inline __attribute__((always_inline)) void row_group(const QuantizedProduct *p, int kind, const uint8_t *src, int row,
                                                            int g, int blocks, __m512i w[GROUP_STEPS], __m512 *wd, __m512 *wm) {
    size_t at = (size_t)row * p->nb;
    if (kind & KIND_Q8)
        q8_group_steps((const int8_t *)src, blocks, w);
    else
        q4_group_steps(src, blocks, w);
    if (kind & KIND_QH) add_fifth_bits(p->qh + at, g, blocks, w);
    if (kind & KIND_SC) {
        *wd = group_k_scales(p->sc + at, p->d + at / 8, g, blocks);
        *wm = group_k_scales(p->mn + at, p->m + at / 8, g, blocks);
    } else if (kind & KIND_Q8) {
        *wd = *wm = _mm512_permutexvar_ps(_mm512_loadu_si512(Q8_LANES), group_halves(p->d + at, g, blocks));
    } else {
        *wd = group_halves(p->d + at, g, blocks);
        *wm = kind & KIND_M ? group_halves(p->m + at, g, blocks)
                              : _mm512_mul_ps(*wd, _mm512_set1_ps(kind & KIND_QH ? -16.0f : -8.0f)); /* Q4_0: d (q - 8), Q5_0: d (q - 16) */
    }
}

/* Group g (`blocks` of its 16 blocks) of weight row n times x rows i0 .. i0+XT-1, added to acc[i].
 * `ahead`: this row's bytes p->ahead rows further on, to prefetch, or NULL. */
static inline __attribute__((always_inline)) void tile_group(const QuantizedProduct *p, int kind, int n, int i0, int XT,
                                                             const uint8_t *ahead, int g, int blocks, __m512 acc[X_TILE]) {
    int nb = p->nb, groups = p->groups, K = p->K, q8 = kind & KIND_Q8;
    size_t row_bytes = q8 ? (size_t)K : (size_t)K / 2, group_bytes = q8 ? 512 : 256;
    const uint8_t *src = (const uint8_t *)p->qs + (size_t)n * row_bytes + g * group_bytes;
    if (ahead) { /* this group of the row p->ahead rows further on, and its scales */
        for (size_t line = 0; line < group_bytes; line += 64) _mm_prefetch((const char *)(ahead + g * group_bytes + line), PREFETCH_HINT);
        size_t later = (size_t)(n + p->ahead) * nb + GROUP_BLOCKS * g;
        size_t scale_at = kind & KIND_SC ? later / 8 : later;
        _mm_prefetch((const char *)(p->d + scale_at), PREFETCH_HINT);
        if (kind & KIND_M) _mm_prefetch((const char *)(p->m + scale_at), PREFETCH_HINT);
        if (kind & KIND_SC) {
            _mm_prefetch((const char *)(p->sc + later), PREFETCH_HINT);
            _mm_prefetch((const char *)(p->mn + later), PREFETCH_HINT);
        }
        if (kind & KIND_QH) _mm_prefetch((const char *)(p->qh + later), PREFETCH_HINT);
    }
    __m512i w[GROUP_STEPS];
    __m512 wd, wm;
    row_group(p, kind, src, n, g, blocks, w, &wd, &wm);
    for (int i = 0; i < XT; i++) {
        size_t at = ((size_t)(i0 + i) * groups + g) * GROUP_BLOCKS;
        __m512i dot = group_dot(w, p->xa.xq + at * 32);
        __m512 dx = _mm512_load_ps(p->xa.dx + at);
        if (q8) { /* sum (w + 128) x - 128 sum x */
            dot = _mm512_sub_epi32(dot, _mm512_load_si512(p->xa.sum128 + at));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd, dx), acc[i]);
        } else { /* d dx sum(q x) + m dx sum(x) */
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd, dx), acc[i]);
            acc[i] = _mm512_fmadd_ps(wm, _mm512_load_ps(p->xa.sx + at), acc[i]);
        }
    }
}

/* Weight rows n .. n+R-1 times x rows i0 .. i0+XT-1 -> out. R and XT are constants at each call
 * (always_inline), so the accumulators stay in registers; so is the number of blocks of every group
 * but a last, shorter one (no masks or tests for it per load; 7% of the q8 loop's time with K = 2048).
 * One row of x (decoding): a row at a time, all its groups, so that a thread reads its rows as one
 * stream instead of group by group across the R rows (four streams a row's length apart, and four
 * of the rows `ahead`): ~1.04x on average from memory (benchmarks/kernels_ab.py --rows 1 --layers
 * 16, q4, q8, q6, four runs: 0.98-1.09x, where two identical builds measure 0.96-1.05x; the same
 * bits, as each row's float steps keep their order). More rows of x: group by group, so that x's
 * group is read from L1 by all R rows (a row at a time, 4 rows of x measured 0.85-0.89x in one run). */
static inline __attribute__((always_inline)) void quantized_tile(const QuantizedProduct *p, int kind, int n, int R,
                                                                 int i0, int XT, const uint8_t *ahead) {
    int whole = p->nb / GROUP_BLOCKS, last = p->nb - whole * GROUP_BLOCKS;
    size_t row_bytes = kind & KIND_Q8 ? (size_t)p->K : (size_t)p->K / 2;
    __m512 acc[W_ROWS][X_TILE];
    const uint8_t *later[W_ROWS]; /* each row's bytes `ahead`, or NULL */
    for (int r = 0; r < R; r++) {
        for (int i = 0; i < XT; i++) acc[r][i] = _mm512_setzero_ps();
        later[r] = ahead ? ahead + r * row_bytes : NULL;
    }
    if (XT == 1) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            for (int g = 0; g < whole; g++) tile_group(p, kind, n + r, i0, XT, later[r], g, GROUP_BLOCKS, acc[r]);
            if (last) tile_group(p, kind, n + r, i0, XT, later[r], whole, last, acc[r]);
        }
    } else {
        for (int g = 0; g < whole; g++)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) tile_group(p, kind, n + r, i0, XT, later[r], g, GROUP_BLOCKS, acc[r]);
        if (last)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) tile_group(p, kind, n + r, i0, XT, later[r], whole, last, acc[r]);
    }
    for (int i = 0; i < XT; i++)
        for (int r = 0; r < R; r++) p->out[(size_t)(i0 + i) * p->N + n + r] = sum16(acc[r][i]);
}

/* The kind of a product's rows (K-quant scales come with their minimums) */
static inline int kind_of(const QuantizedProduct *p, int q8) {
    if (q8) return KIND_Q8;
    return (p->m ? KIND_M : 0) | (p->qh ? KIND_QH : 0) | (p->sc ? KIND_SC | KIND_M : 0);
}

/* Whole work items (W_ROWS weight rows) of every kind, times XT = 1 .. X_TILE rows of x, each with
 * its constants: TILES[kind][XT - 1]. A matrix's last, shorter work item (R < W_ROWS rows) takes
 * PARTIAL_TILES[R - 1][XT - 1], which tests the kind at run time (one per matrix: not worth the
 * code of 7 kinds x 12 more functions, which doubled the library's build time). */
typedef void TileFn(const QuantizedProduct *p, int n, int i0, const uint8_t *ahead);
#define TILE(KIND, XT)                                                                               \
    static void tile_##KIND##_##XT(const QuantizedProduct *p, int n, int i0, const uint8_t *ahead) { \
        quantized_tile(p, KIND, n, W_ROWS, i0, XT, ahead);                                           \
    }
#define TILES_OF(KIND) TILE(KIND, 1) TILE(KIND, 2) TILE(KIND, 3) TILE(KIND, 4)
#define TILES_ENTRY(KIND) [KIND] = {tile_##KIND##_1, tile_##KIND##_2, tile_##KIND##_3, tile_##KIND##_4}
/* q4: Q4_0, Q4_1, Q4_K; q5: Q5_0, Q5_1, Q5_K; q8 (the enum's values written out: names paste) */
TILES_OF(0) TILES_OF(2) TILES_OF(10) TILES_OF(4) TILES_OF(6) TILES_OF(14) TILES_OF(1)
_Static_assert(KIND_Q8 == 1 && KIND_M == 2 && KIND_QH == 4 && KIND_SC == 8 && W_ROWS == 4 && X_TILE == 4,
               "the tiles written out above are these kinds and sizes");
static TileFn *const TILES[16][X_TILE] = {
    TILES_ENTRY(0), TILES_ENTRY(2), TILES_ENTRY(10), TILES_ENTRY(4), TILES_ENTRY(6), TILES_ENTRY(14), TILES_ENTRY(1),
};
#define PARTIAL(R, XT)                                                                                  \
    static void partial_##R##_##XT(const QuantizedProduct *p, int n, int i0, const uint8_t *ahead) {  \
        quantized_tile(p, p->kind, n, R, i0, XT, ahead);                                              \
    }
#define PARTIALS_FOR(R) PARTIAL(R, 1) PARTIAL(R, 2) PARTIAL(R, 3) PARTIAL(R, 4)
PARTIALS_FOR(1) PARTIALS_FOR(2) PARTIALS_FOR(3)
#define PARTIAL_ROW(R) {partial_##R##_1, partial_##R##_2, partial_##R##_3, partial_##R##_4}
static TileFn *const PARTIAL_TILES[W_ROWS - 1][X_TILE] = {PARTIAL_ROW(1), PARTIAL_ROW(2), PARTIAL_ROW(3)};

/* The tile for R weight rows and XT rows of x */
static inline TileFn *tile_for(const QuantizedProduct *p, int R, int XT) {
    return R == W_ROWS ? TILES[p->kind][XT - 1] : PARTIAL_TILES[R - 1][XT - 1];
}

/* ---- many rows of x: a prompt's products where there is no bfloat16 arithmetic ---------------- */

/* quantized_tile arranges a weight row's group (the transposes, the scales) for every X_TILE rows of
 * x: a quarter of the work per x row, and in registers that leave the sixteen accumulators no room
 * (the compiler kept them in memory). With many rows of x, a work item's W_ROWS rows are arranged
 * once into a per-thread buffer, and then a register tile of W_ROWS weight rows by X_TILE x rows
 * walks the steps: per step W_ROWS + X_TILE loads feed W_ROWS * X_TILE vpdpbusd. Each (weight row,
 * x row) pair still gets quantized_tile's arithmetic (exact integer sums per block, then the same
 * float steps per group, in the same order), so the bits are the same: a prompt's row is the row a
 * decode step gives. From MANY_ROWS rows of x on. */
#define MANY_ROWS 16

typedef struct {
    __m512i w[GROUP_STEPS];
    __m512 wd, wm;
} ArrangedGroup;

/* Weight rows n .. n + W_ROWS - 1, arranged: rows[r * groups + g] */
static void arrange_rows(const QuantizedProduct *p, int q8, int n, ArrangedGroup *rows) {
    size_t row_bytes = q8 ? (size_t)p->K : (size_t)p->K / 2, group_bytes = q8 ? 512 : 256;
    for (int r = 0; r < W_ROWS; r++)
        for (int g = 0; g < p->groups; g++) {
            int blocks = p->nb - g * GROUP_BLOCKS < GROUP_BLOCKS ? p->nb - g * GROUP_BLOCKS : GROUP_BLOCKS;
            const uint8_t *src = (const uint8_t *)p->qs + (size_t)(n + r) * row_bytes + g * group_bytes;
            ArrangedGroup *a = rows + (size_t)r * p->groups + g;
            row_group(p, p->kind, src, n + r, g, blocks, a->w, &a->wd, &a->wm); /* kind tested at run time: once per row and group */
        }
}

/* Arranged weight rows n .. n + W_ROWS - 1 times x rows i0 .. i0 + X_TILE - 1 -> out */
static inline __attribute__((always_inline)) void arranged_tile(const QuantizedProduct *p, int q8, const ArrangedGroup *rows,
                                                                int n, int i0) {
    int groups = p->groups;
    __m512 acc[W_ROWS][X_TILE];
    for (int r = 0; r < W_ROWS; r++)
        for (int i = 0; i < X_TILE; i++) acc[r][i] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const int8_t *xg[X_TILE];
        for (int i = 0; i < X_TILE; i++) xg[i] = p->xa.xq + ((size_t)(i0 + i) * groups + g) * GROUP_BLOCKS * 32;
        __m512i dot[W_ROWS][X_TILE];
#pragma GCC unroll 8
        for (int s = 0; s < GROUP_STEPS; s++) {
            __m512i w[W_ROWS], x[X_TILE];
            for (int r = 0; r < W_ROWS; r++) w[r] = _mm512_load_si512(&rows[(size_t)r * groups + g].w[s]);
            for (int i = 0; i < X_TILE; i++) x[i] = load_held(xg[i] + 64 * s); /* vectors.h: why */
            for (int r = 0; r < W_ROWS; r++)
                for (int i = 0; i < X_TILE; i++)
                    dot[r][i] = _mm512_dpbusd_epi32(s ? dot[r][i] : _mm512_setzero_si512(), w[r], x[i]);
        }
        for (int i = 0; i < X_TILE; i++) { /* quantized_tile's float steps; x's numbers loaded once per row */
            size_t at = ((size_t)(i0 + i) * groups + g) * GROUP_BLOCKS;
            __m512 dx = _mm512_load_ps(p->xa.dx + at);
            __m512i sum128 = q8 ? _mm512_load_si512(p->xa.sum128 + at) : _mm512_setzero_si512();
            __m512 sx = q8 ? _mm512_setzero_ps() : _mm512_load_ps(p->xa.sx + at);
            for (int r = 0; r < W_ROWS; r++) {
                const ArrangedGroup *a = &rows[(size_t)r * groups + g];
                if (q8) {
                    __m512i d = _mm512_sub_epi32(dot[r][i], sum128);
                    acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(a->wd, dx), acc[r][i]);
                } else {
                    acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][i]), _mm512_mul_ps(a->wd, dx), acc[r][i]);
                    acc[r][i] = _mm512_fmadd_ps(a->wm, sx, acc[r][i]);
                }
            }
        }
    }
    sums16_4x4(acc, p->out + (size_t)i0 * p->N + n, p->N);
}
static void arranged_tile_q4(const QuantizedProduct *p, const ArrangedGroup *rows, int n, int i0) { arranged_tile(p, 0, rows, n, i0); }
static void arranged_tile_q8(const QuantizedProduct *p, const ArrangedGroup *rows, int n, int i0) { arranged_tile(p, 1, rows, n, i0); }

/* Weight rows gi * W_ROWS ... times every row of x, X_TILE rows of x at a time. */
static void quantized_group(const QuantizedProduct *p, int gi, int q8) {
    int n = gi * W_ROWS, R = p->N - n < W_ROWS ? p->N - n : W_ROWS;
    ArrangedGroup *rows;
    if (p->M >= MANY_ROWS && R == W_ROWS && (rows = thread_buffer(sizeof(ArrangedGroup) * W_ROWS * p->groups))) {
        arrange_rows(p, q8, n, rows);
        size_t row_bytes = q8 ? (size_t)p->K : (size_t)p->K / 2; /* row_groups.h's fetch_part: why */
        const uint8_t *next = n + 2 * W_ROWS <= p->N ? (const uint8_t *)p->qs + (size_t)(n + W_ROWS) * row_bytes : NULL;
        if (next) { /* the next item's smaller parts at once: fifth bits, scales, minimums */
            size_t at = (size_t)(n + W_ROWS) * p->nb, blocks = (size_t)W_ROWS * p->nb, per_scale = p->sc ? 8 : 1;
            if (p->qh) fetch_part(p->qh + at, blocks * 4, 0, 1);
            fetch_part(p->d + at / per_scale, blocks / per_scale * 2, 0, 1);
            if (p->m) fetch_part(p->m + at / per_scale, blocks / per_scale * 2, 0, 1);
            if (p->sc) fetch_part(p->sc + at, blocks, 0, 1), fetch_part(p->mn + at, blocks, 0, 1);
        }
        int i0 = 0, count = p->M / X_TILE;
        for (; i0 + X_TILE <= p->M; i0 += X_TILE) {
            (q8 ? arranged_tile_q8 : arranged_tile_q4)(p, rows, n, i0);
            if (next) fetch_part(next, W_ROWS * row_bytes, i0 / X_TILE, count);
        }
        if (i0 < p->M) tile_for(p, R, p->M - i0)(p, n, i0, NULL);
        return;
    }
    size_t row_bytes = q8 ? (size_t)p->K : (size_t)p->K / 2;
    const uint8_t *ahead = /* the rows p->ahead on */
        n + p->ahead + W_ROWS <= p->N ? (const uint8_t *)p->qs + (size_t)(n + p->ahead) * row_bytes : NULL;
    for (int i0 = 0; i0 < p->M; i0 += X_TILE) {
        int XT = p->M - i0 < X_TILE ? p->M - i0 : X_TILE;
        tile_for(p, R, XT)(p, n, i0, i0 == 0 ? ahead : NULL);
    }
}
static void q4_group(const void *product, int gi) { quantized_group(product, gi, 0); }
static void q8_group(const void *product, int gi) { quantized_group(product, gi, 1); }

static int quantized_matmul(const float *x, int M, int K, const void *qs, const uint32_t *qh, const uint16_t *d,
                            const uint16_t *m, const uint8_t *sc, const uint8_t *mn, int N, float *out, int q8) {
    if (K % 64 || (sc && K % 256)) return STATUS_BAD_WIDTH;
    if (sc && !(mn && m)) return STATUS_BAD_LAYOUT; /* K-quant scales come with their minimums */
    int nb = K / 32;
    QuantizedProduct p = {M, K, N, nb, (nb + GROUP_BLOCKS - 1) / GROUP_BLOCKS, qs, d, m, sc, mn, qh, 0, {0}, out};
    p.kind = kind_of(&p, q8);
    p.ahead = ahead_rows(W_ROWS, q8 ? (size_t)K : (size_t)K / 2);
    int status = arrange_activations(x, M, K, q8 ? Q8_LANES : Q4_LANES, &p.xa);
    if (status == STATUS_OK) for_each_group((N + W_ROWS - 1) / W_ROWS, q8 ? q8_group : q4_group, &p);
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

static inline __m512 load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* HALF_ROWS weight rows per loop share each load of x, so the loads per weight are one 16-bit
 * weight and an eighth of an x float; two accumulators per row (32 weights a step) keep sixteen FMA
 * chains in flight. Each row is prefetched HALF_PREFETCH weights (1 KB) ahead of where it is read,
 * a line per row per step, running on into the next group's rows near a row's end: close enough
 * that the lines are still in L1 when they are used. (Measurements: docs/performance.md.) */
#define HALF_ROWS 8
#define HALF_PREFETCH 512
/* One group of HALF_ROWS weight rows (group gi) times all M rows of x, for one 16-bit format. */
typedef struct {
    const float *x;
    int M, K, N;
    const uint16_t *w;
    float *out;
} HalfProduct;

#define HALF_GROUP(NAME, LOAD)                                                                       \
    static void NAME(const void *product, int gi) {                                                  \
        const HalfProduct *p = product;                                                              \
        const float *x = p->x;                                                                       \
        const uint16_t *w = p->w;                                                                    \
        int M = p->M, K = p->K, N = p->N;                                                            \
        float *out = p->out;                                                                         \
        int n0 = gi * HALF_ROWS, rows = N - n0 < HALF_ROWS ? N - n0 : HALF_ROWS;                     \
        const uint16_t *row = w + (size_t)n0 * K;                                                    \
        /* the next group's rows, or this group's again (already cached) for the last groups */      \
        const uint16_t *next = n0 + 2 * HALF_ROWS <= N ? row + (size_t)HALF_ROWS * K : row;          \
        for (int r = 0; r < M; r++) {                                                                \
            const float *xr = x + (size_t)r * K;                                                     \
            __m512 acc[HALF_ROWS], acc2[HALF_ROWS];                                                  \
            for (int j = 0; j < HALF_ROWS; j++) acc[j] = acc2[j] = _mm512_setzero_ps();              \
            if (rows == HALF_ROWS) {                                                                 \
                for (int k = 0; k < K; k += 32) {                                                    \
                    if (r == 0) {                                                                    \
                        const uint16_t *ahead = row;                                                 \
                        int at = k + HALF_PREFETCH;                                                  \
                        if (at >= K) ahead = next, at -= K;                                          \
                        if (at >= K) at = k; /* rows shorter than the distance */                    \
                        for (int j = 0; j < HALF_ROWS; j++) _mm_prefetch((const char *)(ahead + (size_t)j * K + at), PREFETCH_HINT); \
                    }                                                                                \
                    __m512 xv = _mm512_loadu_ps(xr + k), xv2 = _mm512_loadu_ps(xr + k + 16);         \
                    for (int j = 0; j < HALF_ROWS; j++) {                                            \
                        acc[j] = _mm512_fmadd_ps(LOAD(row + (size_t)j * K + k), xv, acc[j]);         \
                        acc2[j] = _mm512_fmadd_ps(LOAD(row + (size_t)j * K + k + 16), xv2, acc2[j]); \
                    }                                                                                \
                }                                                                                    \
            } else {                                                                                 \
                for (int k = 0; k < K; k += 32) {                                                    \
                    __m512 xv = _mm512_loadu_ps(xr + k), xv2 = _mm512_loadu_ps(xr + k + 16);         \
                    for (int j = 0; j < rows; j++) {                                                 \
                        acc[j] = _mm512_fmadd_ps(LOAD(row + (size_t)j * K + k), xv, acc[j]);         \
                        acc2[j] = _mm512_fmadd_ps(LOAD(row + (size_t)j * K + k + 16), xv2, acc2[j]); \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
            for (int j = 0; j < rows; j++) out[(size_t)r * N + n0 + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j], acc2[j])); \
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

/* ---- unpacking, for products with many rows (prefill), done by oneDNN ------------------------ */
/* Rows written as bfloat16 (f32 = 0) where the CPU multiplies bfloat16 natively, as float32 (f32 = 1)
 * elsewhere: out is uint16_t or float [N, K]. */

/* One q4/q5 block (its 16 bytes in GGUF's order: `packed`; blk: its index in the matrix) as 32 weights
 * d q + m (vs: d, vm: m, broadcast) at out + 32 * at (bfloat16 or float32) */
static inline void q4_unpack_block(__m128i packed, const uint32_t *qh, size_t blk, __m512 vs, __m512 vm, void *out, int at,
                                   int f32) {
    __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(packed, _mm_set1_epi8(0x0F)));
    __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F)));
    if (qh) { /* q5: + 16 where the fifth bit is set (bit k: weight k) */
        lo = _mm512_mask_add_epi32(lo, (__mmask16)(qh[blk] & 0xFFFF), lo, _mm512_set1_epi32(16));
        hi = _mm512_mask_add_epi32(hi, (__mmask16)(qh[blk] >> 16), hi, _mm512_set1_epi32(16));
    }
    store32(out, 32 * at, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), vs, vm), _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), vs, vm), f32);
}

/* Blocks b0 .. b0 + nb - 1 of weight row n (32 weights each) into out [32 * nb]: also how AMX's
 * products (amx_matmul.c) unpack q4 and q5. The row's bytes are put back in GGUF's order eight
 * blocks at a time where a whole group holds them (q4_lanes.h), with the eight blocks' scales and
 * minimums computed side by side; else block by block. */
void q4_unpack_blocks(const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
                      const uint8_t *mn, int K, size_t n, int b0, int nb, void *out, int f32) {
    const uint8_t *row = qs + n * (size_t)(K / 2);
    int whole = K / 512 * 16;
    size_t first = n * (K / 32) + b0;
    const __m256 offset = _mm256_set1_ps(qh ? -16.0f : -8.0f);
    for (int b = 0; b < nb;) {
        size_t blk = first + b;
        if ((b0 + b) % 8 == 0 && b0 + b + 8 <= whole && b + 8 <= nb) {
            __m128i eight[8];
            q4_blocks8(row, b0 + b, eight);
            __m256 scales, minimums; /* the eight blocks' d and m, as ggml computes them (K-quants: d * sc, exact) */
            if (sc) {
                __m256 factor = _mm256_set1_ps(_cvtsh_ss(d[blk / 8])), least = _mm256_set1_ps(_cvtsh_ss(m[blk / 8]));
                scales = _mm256_mul_ps(factor, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sc + blk)))));
                minimums = _mm256_mul_ps(least, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mn + blk)))));
            } else {
                scales = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + blk)));
                minimums = m ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + blk))) : _mm256_mul_ps(offset, scales);
            }
            for (int j = 0; j < 8; j++) {
                __m512i lane = _mm512_set1_epi32(j);
                q4_unpack_block(eight[j], qh, blk + j, _mm512_permutexvar_ps(lane, _mm512_castps256_ps512(scales)),
                                _mm512_permutexvar_ps(lane, _mm512_castps256_ps512(minimums)), out, b + j, f32);
            }
            b += 8;
        } else {
            uint8_t natural[16];
            q4_natural_block(row, K, b0 + b, natural);
            float scale = sc ? _cvtsh_ss(d[blk / 8]) * sc[blk] : _cvtsh_ss(d[blk]);
            float minimum = sc ? _cvtsh_ss(m[blk / 8]) * mn[blk] : m ? _cvtsh_ss(m[blk]) : (qh ? -16.0f : -8.0f) * scale;
            q4_unpack_block(_mm_loadu_si128((const __m128i *)natural), qh, blk, _mm512_set1_ps(scale), _mm512_set1_ps(minimum),
                            out, b, f32);
            b++;
        }
    }
}

static int q4_unpack(const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
                     const uint8_t *mn, int N, int K, void *out, int f32) {
    size_t row_bytes = (size_t)K * (f32 ? 4 : 2);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) q4_unpack_blocks(qs, qh, d, m, sc, mn, K, n, 0, K / 32, (char *)out + n * row_bytes, f32);
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

static inline void q8_unpack_block(const int8_t *q, uint16_t d, void *out, size_t at, int f32) {
    __m512 vs = _mm512_set1_ps(_cvtsh_ss(d));
    __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
    store32(out, at, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), vs), _mm512_mul_ps(_mm512_cvtepi32_ps(hi), vs), f32);
}

static int q8_unpack(const int8_t *qs, const uint16_t *d, int N, int K, void *out, int f32) {
    int nb = K / 32, groups = K / 512;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *row = qs + (size_t)n * K;
        size_t first = (size_t)n * nb; /* the row's first block in d and out */
        for (int g = 0; g < groups; g++) {
            int8_t natural[512] __attribute__((aligned(64)));
            q8_natural_group(row + 512 * g, natural);
            for (int b = 0; b < 16; b++) q8_unpack_block(natural + 32 * b, d[first + 16 * g + b], out, 32 * (first + 16 * g + b), f32);
        }
        for (int b = 16 * groups; b < nb; b++) q8_unpack_block(row + 32 * b, d[first + b], out, 32 * (first + b), f32);
    }
    return 0;
}

int q8_to_bf16(const int8_t *qs, const uint16_t *d, int N, int K, uint16_t *out) { return q8_unpack(qs, d, N, K, out, 0); }
int q8_to_f32(const int8_t *qs, const uint16_t *d, int N, int K, float *out) { return q8_unpack(qs, d, N, K, out, 1); }

int f16_to_bf16(const uint16_t *w, size_t n, uint16_t *out) {
    /* n a multiple of 16 */
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n / 16; i++)
        _mm256_storeu_si256((__m256i *)(out + 16 * i), to_bf16(load_f16(w + 16 * i)));
    return 0;
}

/* ---- the machine's read bandwidth, the bound for decoding ----------------------------------- */

double read_bytes(const uint8_t *buf, size_t n) {
    /* Sum every 64-bit word with all threads (so the compiler cannot skip the reads): each thread one
     * contiguous stream, four vector sums, lines prefetched 2 KB ahead into L2. The fastest read loop found
     * here (a horizontal sum per 256 bytes and no prefetch read ~10% slower): the bound must be the
     * best the memory gives, not what a slow loop gets. */
    size_t blocks = n / 256;
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
        __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
#pragma omp for schedule(static)
        for (size_t i = 0; i < blocks; i++) {
            const __m512i *p = (const __m512i *)(buf + 256 * i);
            if (i + 4 < blocks)
                for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(p + 32 + j), PREFETCH_HINT); /* 2 KB ahead */
            s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(p));
            s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(p + 1));
            s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(p + 2));
            s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(p + 3));
        }
        total += (double)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    }
    return total;
}

#endif
