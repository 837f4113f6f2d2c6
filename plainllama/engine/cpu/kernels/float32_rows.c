/* 16-bit weights (float16 or bfloat16) times a prompt's rows in float32, for CPUs without bfloat16
 * arithmetic (Intel before Sapphire Rapids and Cooper Lake, AMD before Zen 4: there prompts of
 * quantized weights take the int8 kernels, and 16-bit weights come here). Hugging Face and Meta
 * checkpoints are all 16-bit, so on those CPUs every prompt product of such a model runs here.
 *
 * out [M, N] = x [M, K] W^T. Each output is one chain of fused multiply-adds over k = 0 .. K-1 in
 * order, so a row's result does not depend on M, on the other rows or on where the row sits (the
 * server's prefix cache and chunked prompts rely on that). PyTorch's float32 product does not give
 * that (its blocking changes with M), so these products ran it on tiles of exactly 64 rows padded
 * with zeros (packed.py's _float32_matmul), at ~50% of the FMA peak.
 *
 * How: a work item is a panel of PANEL weight rows (the output columns n0 .. n0 + PANEL - 1). Its rows
 * are converted to float32 and transposed once into a per-thread buffer [K][PANEL] (16 x 16 or 8 x 8
 * transposes), then X_ROWS rows of x at a time walk it: per k, PANEL / lanes vector loads of the panel
 * and one broadcast of each row's x[k] feed X_ROWS * PANEL / lanes FMAs into accumulators that stay in
 * registers for the whole K (AVX-512: 12 rows x 32 columns = 24 accumulators; AVX2: 6 x 16 = 12).
 * The fewer rows at the end run the same chains. The sequential sum's error is bounded by K * 2^-24
 * times the sum of |x_k w_k| (tests/test_packed.py checks that bound against float64). */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "plainllama.h"
#include "row_groups.h"
#include "vectors.h"

typedef struct {
    const float *x;
    int M, K, N, bf16;
    const uint16_t *w;
    float *out;
    int *out_of_memory; /* set by a work item that could not have its buffer */
} HalfRowsProduct;

#if KERNELS_AVX512

#define PANEL 32  /* weight rows per work item: two vectors of 16 columns */
#define X_ROWS 12 /* rows of x per pass over the panel: 24 accumulators of the 32 registers */

/* 16 weights of a row (k0 .. k0 + 15) as float32 bits */
static inline __m512i widened16(const uint16_t *w, int bf16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)w);
    return bf16 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16) : _mm512_castps_si512(_mm512_cvtph_ps(h));
}

/* Weight rows n0 .. n0 + PANEL - 1 (zeros past N) -> panel [K][PANEL] float32 */
static void fill_panel(const HalfRowsProduct *p, int n0, float *panel) {
    for (int k0 = 0; k0 < p->K; k0 += 16)
        for (int half = 0; half < 2; half++) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) {
                int n = n0 + 16 * half + j;
                r[j] = n < p->N ? widened16(p->w + (size_t)n * p->K + k0, p->bf16) : _mm512_setzero_si512();
            }
            transpose16(r); /* r[kk]: weight k0 + kk of the 16 rows */
            for (int kk = 0; kk < 16; kk++) _mm512_store_si512(panel + (size_t)(k0 + kk) * PANEL + 16 * half, r[kk]);
        }
}

/* Rows i0 .. i0 + XR - 1 of x times the panel -> their columns n0 .. of out (XR a constant at each call) */
static inline __attribute__((always_inline)) void panel_rows(const HalfRowsProduct *p, const float *panel, int n0, int i0, int XR) {
    __m512 acc[X_ROWS][2];
    rows_times_32(p->x + (size_t)i0 * p->K, p->K, panel, PANEL, p->K, XR, acc);
    int columns = p->N - n0 < PANEL ? p->N - n0 : PANEL;
    __mmask16 lo = columns >= 16 ? 0xFFFF : (__mmask16)((1u << columns) - 1);
    __mmask16 hi = columns >= 32 ? 0xFFFF : columns > 16 ? (__mmask16)((1u << (columns - 16)) - 1) : 0;
    for (int i = 0; i < XR; i++) {
        float *o = p->out + (size_t)(i0 + i) * p->N + n0;
        _mm512_mask_storeu_ps(o, lo, acc[i][0]);
        _mm512_mask_storeu_ps(o + 16, hi, acc[i][1]);
    }
}

#else /* AVX2 */

#define PANEL 16 /* two vectors of 8 columns */
#define X_ROWS 6 /* 12 accumulators of the 16 registers */

static inline __m256 widened8(const uint16_t *w, int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)w);
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

static void fill_panel(const HalfRowsProduct *p, int n0, float *panel) {
    for (int k0 = 0; k0 < p->K; k0 += 8)
        for (int half = 0; half < 2; half++) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) {
                int n = n0 + 8 * half + j;
                r[j] = n < p->N ? widened8(p->w + (size_t)n * p->K + k0, p->bf16) : _mm256_setzero_ps();
            }
            transpose8(r, r); /* r[kk]: weight k0 + kk of the 8 rows */
            for (int kk = 0; kk < 8; kk++) _mm256_store_ps(panel + (size_t)(k0 + kk) * PANEL + 8 * half, r[kk]);
        }
}

static inline __attribute__((always_inline)) void panel_rows(const HalfRowsProduct *p, const float *panel, int n0, int i0, int XR) {
    __m256 acc[X_ROWS][2];
    rows_times_16(p->x + (size_t)i0 * p->K, p->K, panel, PANEL, p->K, XR, acc); /* K >= 32 */
    int columns = p->N - n0 < PANEL ? p->N - n0 : PANEL;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(columns), lane), hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(columns - 8), lane);
    for (int i = 0; i < XR; i++) {
        float *o = p->out + (size_t)(i0 + i) * p->N + n0;
        _mm256_maskstore_ps(o, lo, acc[i][0]);
        _mm256_maskstore_ps(o + 8, hi, acc[i][1]);
    }
}

#endif

typedef void PanelRowsFn(const HalfRowsProduct *p, const float *panel, int n0, int i0);
#define PANEL_ROWS(XR) \
    static void panel_rows_##XR(const HalfRowsProduct *p, const float *panel, int n0, int i0) { panel_rows(p, panel, n0, i0, XR); }
PANEL_ROWS(1) PANEL_ROWS(2) PANEL_ROWS(3) PANEL_ROWS(4) PANEL_ROWS(5) PANEL_ROWS(6)
#if KERNELS_AVX512
PANEL_ROWS(7) PANEL_ROWS(8) PANEL_ROWS(9) PANEL_ROWS(10) PANEL_ROWS(11) PANEL_ROWS(12)
static PanelRowsFn *const PANEL_ROWS_FOR[X_ROWS] = {panel_rows_1, panel_rows_2, panel_rows_3,  panel_rows_4,
                                                    panel_rows_5, panel_rows_6, panel_rows_7,  panel_rows_8,
                                                    panel_rows_9, panel_rows_10, panel_rows_11, panel_rows_12};
#else
static PanelRowsFn *const PANEL_ROWS_FOR[X_ROWS] = {panel_rows_1, panel_rows_2, panel_rows_3,
                                                    panel_rows_4, panel_rows_5, panel_rows_6};
#endif

static void panel_group(const void *product, int gi) {
    const HalfRowsProduct *p = product;
    float *panel = thread_buffer(sizeof(float) * PANEL * (size_t)p->K);
    if (!panel) {
        __atomic_store_n(p->out_of_memory, 1, __ATOMIC_RELAXED);
        return;
    }
    int n0 = gi * PANEL;
    fill_panel(p, n0, panel);
    for (int i0 = 0; i0 < p->M; i0 += X_ROWS) {
        int rows = p->M - i0 < X_ROWS ? p->M - i0 : X_ROWS;
        PANEL_ROWS_FOR[rows - 1](p, panel, n0, i0);
    }
}

int half_rows_matmul(const float *x, int M, int K, const uint16_t *w, int bf16, int N, float *out) {
    if (K % 32 || K <= 0) return STATUS_BAD_WIDTH;
    int out_of_memory = 0;
    HalfRowsProduct p = {x, M, K, N, bf16, w, out, &out_of_memory};
    for_each_group((N + PANEL - 1) / PANEL, panel_group, &p);
    return out_of_memory ? STATUS_OUT_OF_MEMORY : STATUS_OK;
}
