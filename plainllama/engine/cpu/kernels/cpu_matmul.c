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

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__F16C__))
#error "cpu_matmul.c needs AVX-512 (F, BW, VL, VNNI); plainllama uses its PyTorch path on other CPUs"
#endif

/* ---- splitting a matrix's rows between threads ------------------------------------------- */

/* Each thread owns a contiguous range of row groups, as OpenMP's static schedule would give it (so it
 * streams its own part of the matrix and its prefetches serve itself), but takes its range a few
 * groups at a time from a counter, and a thread that finishes its range takes what is left of the
 * others'. Why: two cores do not read memory at the same speed from one moment to the next (other
 * guests, interrupts), and with a static split one thread waits for the other at the end of every
 * product (measurements: docs/performance.md). */
#define CHUNK_GROUPS 4

typedef struct {
    int next;
    int pad[15]; /* one counter per cache line, so taking groups does not bounce a shared line */
} GroupCounter;

typedef struct {
    GroupCounter *counters;
    int groups, threads, thread, visited; /* visited: owners whose ranges this thread has emptied */
} GroupSplit;

/* Before the parallel region, with counters for omp_get_max_threads() threads: thread t's range
 * starts at groups * t / threads. Returns the number of counters. */
static int split_groups(GroupCounter *counters, int groups) {
    int threads = omp_get_max_threads();
    for (int t = 0; t < threads; t++) counters[t].next = (int)((long)groups * t / threads);
    return threads;
}

/* The next groups [*first, *end) for the calling thread; 0 when none are left. Every thread visits
 * every owner's range, so all groups are taken even if the region runs fewer threads than counters. */
static int take_groups(GroupSplit *s, int *first, int *end) {
    while (s->visited < s->threads) {
        int owner = (s->thread + s->visited) % s->threads;
        int owner_end = (int)((long)s->groups * (owner + 1) / s->threads);
        int g = __atomic_fetch_add(&s->counters[owner].next, CHUNK_GROUPS, __ATOMIC_RELAXED);
        if (g < owner_end) {
            *first = g;
            *end = g + CHUNK_GROUPS < owner_end ? g + CHUNK_GROUPS : owner_end;
            return 1;
        }
        s->visited++;
    }
    return 0;
}

typedef void GroupFn(const void *product, int gi);

/* group(product, gi) for every group gi in [0, groups), split between the threads as above. */
static void for_each_group(int groups, GroupFn *group, const void *product) {
    GroupCounter counters[omp_get_max_threads()];
    int threads = split_groups(counters, groups);
#pragma omp parallel
    {
        GroupSplit split = {counters, groups, threads, omp_get_thread_num(), 0};
        for (int first, end; take_groups(&split, &first, &end);)
            for (int gi = first; gi < end; gi++) group(product, gi);
    }
}

/* ---- activations -> int8 blocks ------------------------------------------------------------ */

/* One row of x [K] -> xq [K] int8, dx [K/32] scales, sx [K/32] = dx * sum(xq) of each block.
 * `pair_order`: store each pair of blocks as (b lo16, b+1 lo16, b hi16, b+1 hi16), the order in which
 * the q4 loop unpacks nibbles, so no shuffle is needed there. */
static void quantize_row(const float *x, int K, int8_t *xq, float *dx, float *sx, int pair_order) {
    int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        __m512 a0 = _mm512_loadu_ps(x + 32 * b), a1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
        float d = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
        __m512 vinv = _mm512_set1_ps(inv);
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, vinv)); /* round to nearest even */
        __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, vinv));
        __m128i q0 = _mm512_cvtsepi32_epi8(i0), q1 = _mm512_cvtsepi32_epi8(i1);
        dx[b] = d;
        sx[b] = d * (float)(_mm512_reduce_add_epi32(i0) + _mm512_reduce_add_epi32(i1));
        if (pair_order) {
            int pair = b / 2, second = b % 2;
            int8_t *base = xq + 64 * pair + 16 * second;
            _mm_storeu_si128((__m128i *)base, q0);        /* weights 0..15 of block b */
            _mm_storeu_si128((__m128i *)(base + 32), q1); /* weights 16..31 */
        } else {
            _mm_storeu_si128((__m128i *)(xq + 32 * b), q0);
            _mm_storeu_si128((__m128i *)(xq + 32 * b + 16), q1);
        }
    }
}

typedef struct {
    int8_t *xq;
    float *dx, *sx;
} QuantizedActivations;

static int quantize_activations(const float *x, int M, int K, int pair_order, QuantizedActivations *qa) {
    int nb = K / 32;
    qa->xq = aligned_alloc(64, (size_t)M * K + 64);
    qa->dx = malloc(sizeof(float) * (size_t)M * nb + 64);
    qa->sx = malloc(sizeof(float) * (size_t)M * nb + 64);
    if (!qa->xq || !qa->dx || !qa->sx) return STATUS_OUT_OF_MEMORY;
    for (int r = 0; r < M; r++)
        quantize_row(x + (size_t)r * K, K, qa->xq + (size_t)r * K, qa->dx + (size_t)r * nb, qa->sx + (size_t)r * nb, pair_order);
    return STATUS_OK;
}

/* A q4 or q8 product in progress, what each group of rows reads. */
typedef struct {
    int M, K, N, nb;
    const void *qs;
    const uint16_t *d, *m; /* m: q4 minimums, or NULL */
    QuantizedActivations qa;
    float *out;
} QuantizedProduct;

static void free_activations(QuantizedActivations *qa) {
    free(qa->xq);
    free(qa->dx);
    free(qa->sx);
}

/* Lane -> block maps for spreading 16 per-block scales over the int32 lanes of one 64-byte step. */
static inline __m512 scales_for_pair(__m512 s16, int pair, int pair_order) {
    /* pair_order (q4): lanes 0-3 block 2p, 4-7 block 2p+1, 8-11 block 2p, 12-15 block 2p+1.
     * natural (q8):    lanes 0-7 block 2p, 8-15 block 2p+1. */
    const __m512i q4_idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    const __m512i q8_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512i idx = _mm512_add_epi32(pair_order ? q4_idx : q8_idx, _mm512_set1_epi32(2 * pair));
    return _mm512_permutexvar_ps(idx, s16);
}

/* ---- q4 ------------------------------------------------------------------------------------ */

/* Ask for the next group's weights while this group's are multiplied: each row is read once per
 * token, usually from L3 or DRAM, and the hardware prefetcher alone leaves the core waiting. The
 * requests are spread through the inner loop, a line per row at a time: a burst of a whole group's
 * lines at its start stalls on the core's few fill buffers before any arithmetic runs. (The distances
 * tried: docs/performance.md.) */
#define PREFETCH_ROWS 4

#define ROWS 4 /* weight rows per inner loop: one load of x serves four rows, and four independent
                  accumulator chains keep the FMA units busy */

/* Dot products of `rows` (<= ROWS) consecutive q4 weight rows with one quantized activation row
   -> out[0..rows). */
static inline void q4_dot_rows(const uint8_t *qs, const uint16_t *d, const uint16_t *m, size_t row_bytes, int nb,
                               int rows, const int8_t *xq, const float *dx, const float *sx, const uint8_t *ahead, float *out) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    /* shift the upper 256 bits (the copy holding high nibbles) right by 4 */
    const __m512i shifts = _mm512_setr_epi64(0, 0, 0, 0, 0x0004000400040004LL, 0x0004000400040004LL,
                                             0x0004000400040004LL, 0x0004000400040004LL);
    __m512 acc[ROWS], acc_min[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = acc_min[r] = _mm512_setzero_ps();
    for (int g = 0; g < nb; g += 16) { /* 16 blocks share one load of scales */
        int n = nb - g < 16 ? nb - g : 16;
        __mmask16 mask = (__mmask16)((1u << n) - 1);
        __m512 vdx = _mm512_maskz_loadu_ps(mask, dx + g), vsx = _mm512_maskz_loadu_ps(mask, sx + g);
        __m512 s16[ROWS];
        for (int r = 0; r < ROWS; r++) {
            if (r >= rows) break;
            __m512 wd = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, d + (size_t)r * nb + g));
            s16[r] = _mm512_mul_ps(wd, vdx);
            __m512 wm = m ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, m + (size_t)r * nb + g)) : _mm512_mul_ps(wd, _mm512_set1_ps(-8.0f));
            acc_min[r] = _mm512_fmadd_ps(wm, vsx, acc_min[r]);
        }
        for (int p = 0; p < n / 2; p++) {
            int b = g + 2 * p;
            if (ahead && p % 2 == 0) /* one line (4 blocks) of each later row per two steps */
                for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(ahead + r * row_bytes + 16 * b), _MM_HINT_T0);
            __m512i xv = _mm512_loadu_si512((const void *)(xq + 32 * b));
            for (int r = 0; r < ROWS; r++) {
                if (r >= rows) break;
                __m512i packed = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + r * row_bytes + 16 * b)));
                __m512i w = _mm512_and_si512(_mm512_srlv_epi16(packed, shifts), low4);
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales_for_pair(s16[r], p, 1), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc_min[r]));
}

/* Rows gi * ROWS ... of a q4 product times every row of x. */
static void q4_group(const void *product, int gi) {
    const QuantizedProduct *p = product;
    int K = p->K, N = p->N, nb = p->nb, n = gi * ROWS, rows = N - n < ROWS ? N - n : ROWS;
    size_t row_bytes = K / 2;
    const uint8_t *qs = p->qs;
    const uint8_t *ahead = n + PREFETCH_ROWS + ROWS <= N ? qs + (size_t)(n + PREFETCH_ROWS) * row_bytes : NULL;
    for (int r = 0; r < p->M; r++) {
        float res[ROWS];
        const uint8_t *w = qs + (size_t)n * row_bytes;
        const uint16_t *wd = p->d + (size_t)n * nb, *wm = p->m ? p->m + (size_t)n * nb : NULL;
        const int8_t *xr = p->qa.xq + (size_t)r * K;
        const float *dxr = p->qa.dx + (size_t)r * nb, *sxr = p->qa.sx + (size_t)r * nb;
        if (rows == ROWS) /* a constant row count, so the compiler unrolls the row loops */
            q4_dot_rows(w, wd, wm, row_bytes, nb, ROWS, xr, dxr, sxr, r == 0 ? ahead : NULL, res);
        else
            q4_dot_rows(w, wd, wm, row_bytes, nb, rows, xr, dxr, sxr, NULL, res);
        memcpy(p->out + (size_t)r * N + n, res, sizeof(float) * rows);
    }
}

int q4_matmul(const float *x, int M, int K, const uint8_t *qs, const uint16_t *d, const uint16_t *m, int N,
              float *out) {
    if (K % 64) return STATUS_BAD_WIDTH;
    QuantizedProduct p = {M, K, N, K / 32, qs, d, m, {0}, out};
    if (quantize_activations(x, M, K, 1, &p.qa)) return STATUS_OUT_OF_MEMORY;
    for_each_group((N + ROWS - 1) / ROWS, q4_group, &p);
    free_activations(&p.qa);
    return STATUS_OK;
}

/* ---- q8 ------------------------------------------------------------------------------------ */

static inline void q8_dot_rows(const int8_t *qs, const uint16_t *d, int K, int nb, int rows, const uint8_t *xu,
                               const float *dx, const int8_t *ahead, float *out) {
    /* vpdpbusd needs one unsigned operand: x + 128 as uint8, and subtract 128 * sum(w) */
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < nb; g += 16) {
        int n = nb - g < 16 ? nb - g : 16;
        __mmask16 mask = (__mmask16)((1u << n) - 1);
        __m512 vdx = _mm512_maskz_loadu_ps(mask, dx + g);
        __m512 s16[ROWS];
        for (int r = 0; r < ROWS; r++)
            if (r < rows) s16[r] = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, d + (size_t)r * nb + g)), vdx);
        for (int p = 0; p < n / 2; p++) {
            int b = g + 2 * p;
            if (ahead) /* one line (2 blocks) of each later row per step */
                for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(ahead + (size_t)r * K + 32 * b), _MM_HINT_T0);
            __m512i xv = _mm512_loadu_si512((const void *)(xu + 32 * b));
            for (int r = 0; r < ROWS; r++) {
                if (r >= rows) break;
                __m512i w = _mm512_loadu_si512((const void *)(qs + (size_t)r * K + 32 * b));
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, w);
                __m512i wsum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, w);
                dot = _mm512_sub_epi32(dot, _mm512_slli_epi32(wsum, 7));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales_for_pair(s16[r], p, 0), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* Rows gi * ROWS ... of a q8 product times every row of x (stored as uint8, x + 128). */
static void q8_group(const void *product, int gi) {
    const QuantizedProduct *p = product;
    int K = p->K, N = p->N, nb = p->nb, n = gi * ROWS, rows = N - n < ROWS ? N - n : ROWS;
    const int8_t *qs = p->qs;
    const int8_t *ahead = n + PREFETCH_ROWS + ROWS <= N ? qs + (size_t)(n + PREFETCH_ROWS) * K : NULL;
    for (int r = 0; r < p->M; r++) {
        float res[ROWS];
        const uint8_t *xr = (const uint8_t *)p->qa.xq + (size_t)r * K;
        if (rows == ROWS) /* a constant row count, so the compiler unrolls the row loops */
            q8_dot_rows(qs + (size_t)n * K, p->d + (size_t)n * nb, K, nb, ROWS, xr, p->qa.dx + (size_t)r * nb, r == 0 ? ahead : NULL, res);
        else
            q8_dot_rows(qs + (size_t)n * K, p->d + (size_t)n * nb, K, nb, rows, xr, p->qa.dx + (size_t)r * nb, NULL, res);
        memcpy(p->out + (size_t)r * N + n, res, sizeof(float) * rows);
    }
}

int q8_matmul(const float *x, int M, int K, const int8_t *qs, const uint16_t *d, int N, float *out) {
    if (K % 64) return STATUS_BAD_WIDTH;
    QuantizedProduct p = {M, K, N, K / 32, qs, d, NULL, {0}, out};
    if (quantize_activations(x, M, K, 0, &p.qa)) return STATUS_OUT_OF_MEMORY;
    for (size_t i = 0; i < (size_t)M * K; i++) p.qa.xq[i] ^= (int8_t)0x80; /* two's complement + 128 */
    for_each_group((N + ROWS - 1) / ROWS, q8_group, &p);
    free_activations(&p.qa);
    return STATUS_OK;
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
                        for (int j = 0; j < HALF_ROWS; j++) _mm_prefetch((const char *)(ahead + (size_t)j * K + at), _MM_HINT_T0); \
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

/* ---- unpacking to bfloat16, for products with many rows (prefill), done by oneDNN ----------- */

static inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

int q4_to_bf16(const uint8_t *qs, const uint16_t *d, const uint16_t *m, int N, int K, uint16_t *out) {
    int nb = K / 32;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int b = 0; b < nb; b++) {
            size_t blk = (size_t)n * nb + b;
            __m128i packed = _mm_loadu_si128((const __m128i *)(qs + 16 * blk));
            __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(packed, _mm_set1_epi8(0x0F)));
            __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F)));
            float scale = _cvtsh_ss(d[blk]), minimum = m ? _cvtsh_ss(m[blk]) : -8.0f * scale;
            __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(minimum);
            _mm256_storeu_si256((__m256i *)(out + 32 * blk), to_bf16(_mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), vs, vm)));
            _mm256_storeu_si256((__m256i *)(out + 32 * blk + 16), to_bf16(_mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), vs, vm)));
        }
    }
    return 0;
}

int q8_to_bf16(const int8_t *qs, const uint16_t *d, int N, int K, uint16_t *out) {
    size_t nblocks = (size_t)N * (K / 32);
#pragma omp parallel for schedule(static)
    for (size_t blk = 0; blk < nblocks; blk++) {
        __m512 vs = _mm512_set1_ps(_cvtsh_ss(d[blk]));
        for (int h = 0; h < 2; h++) {
            __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 32 * blk + 16 * h)));
            _mm256_storeu_si256((__m256i *)(out + 32 * blk + 16 * h), to_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(q), vs)));
        }
    }
    return 0;
}

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
     * contiguous stream, four vector sums, lines prefetched 1 KB ahead. The fastest read loop found
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
                for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(p + 16 + j), _MM_HINT_T0);
            s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(p));
            s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(p + 1));
            s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(p + 2));
            s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(p + 3));
        }
        total += (double)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    }
    return total;
}
