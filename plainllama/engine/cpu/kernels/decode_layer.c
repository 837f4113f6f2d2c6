/* One decoding step of one transformer layer in a single call: model.py's TransformerBlock.forward
 * for one new token per row, with the weights in the layouts of cpu_matmul.c.
 *
 * Why this file exists: in a decode step the products read the weights (memory-bound, done by the
 * kernels in cpu_matmul.c), and everything between them (two RMSNorms, rotary embeddings, the KV
 * cache write, attention over the cache, SiLU, two residual adds) is a few thousand floats of work.
 * Done with PyTorch, that in-between work is ~60 operator calls per layer at 3-5 us of dispatch each,
 * and each runs with cold caches right after a product has streamed megabytes of weights: measured on
 * the default model, 8-9 ms of a 15 ms step. Here it is a few loops in the same call.
 *
 * The arithmetic is model.py's, step by step (the comments name the Python lines); the test
 * tests/test_decode_layer.py checks this path against model.py's on the same weights.
 *
 * Shapes: M rows (a batch or beams, one new token each), D width, H query heads, K key/value heads,
 * Hd head width, F feed-forward width, S = start + 1 positions attended to.
 * The cache is model.py's LayerCache: k and v [rows >= M, K, length, Hd], contiguous, float32 or
 * float16 (`f16` below: decode_block.py's cache_dtype holds it in float16, half the bytes a long context
 * reads per token; the arithmetic stays float32, each element widened as it is loaded).
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plainllama.h"
#include "exp16.h"
#include "vectors.h"

static int part_product(const MatrixPart *p, const float *x, int M, int K, float *out) {
    switch (p->layout) {
    case LAYOUT_Q4: return q4_matmul(x, M, K, p->w, p->d, p->m, (const uint8_t *)p->sc, p->mn, p->rows, out);
    case LAYOUT_Q8: return q8_matmul(x, M, K, p->w, p->d, p->rows, out);
    case LAYOUT_F16: return f16_matmul(x, M, K, p->w, p->rows, out);
    case LAYOUT_BF16: return bf16_matmul(x, M, K, p->w, p->rows, out);
    case LAYOUT_Q6: return q6_matmul(x, M, K, p->w, p->sc, p->d, p->rows, out);
    case LAYOUT_Q3: return q3_matmul(x, M, K, p->w, p->sc, p->d, p->rows, out);
    case LAYOUT_Q2: return q2_matmul(x, M, K, p->w, (const uint8_t *)p->sc, p->d, p->m, p->rows, out);
    case LAYOUT_Q5: return q5_matmul(x, M, K, p->w, p->qh, p->d, p->m, (const uint8_t *)p->sc, p->mn, p->rows, out);
    }
    return STATUS_BAD_LAYOUT;
}

/* out [M, out_features] = x [M, in_features] @ W^T */
static int linear(const Linear *l, const float *x, int M, float *out) {
    if (l->n_parts == 1) return part_product(&l->parts[0], x, M, l->in_features, out);
    int column = 0;
    for (int i = 0; i < l->n_parts; i++) {
        const MatrixPart *p = &l->parts[i];
        float *part_out = malloc(sizeof(float) * (size_t)M * p->rows);
        if (!part_out) return STATUS_OUT_OF_MEMORY;
        int code = part_product(p, x, M, l->in_features, part_out);
        for (int r = 0; r < M && code == 0; r++)
            memcpy(out + (size_t)r * l->out_features + column, part_out + (size_t)r * p->rows, sizeof(float) * p->rows);
        free(part_out);
        if (code) return code;
        column += p->rows;
    }
    return 0;
}

/* RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, per row, in float32. */
static void rms_norm(const float *x, const float *weight, int M, int D, float eps, float *out) {
    for (int r = 0; r < M; r++) {
        const float *xr = x + (size_t)r * D;
        /* the mean of thousands of squares, summed in float64 without losing the small ones, in 8
         * running sums (one sum was a chain of float64 adds, 0.7 ms for 512 rows of 2048) */
        double sums[8] = {0}, squares = 0;
        int i = 0;
        for (; i + 8 <= D; i += 8)
            for (int j = 0; j < 8; j++) sums[j] += (double)xr[i + j] * xr[i + j];
        for (; i < D; i++) squares += (double)xr[i] * xr[i];
        for (int j = 0; j < 8; j++) squares += sums[j];
        float scale = 1.0f / sqrtf((float)(squares / D) + eps);
        for (i = 0; i < D; i++) out[(size_t)r * D + i] = xr[i] * scale * weight[i];
    }
}

/* apply_rotary for one head: pairs (a, b) -> (a cos - b sin, b cos + a sin), with model.py's tables
 * cos = (cos0, cos0, cos1, ...) and sin = (-sin0, sin0, -sin1, ...): x * cos + swapped(x) * sin. */
static void rotate(float *x, const float *cos, const float *sin, int Hd) {
    for (int i = 0; i < Hd; i += 2) {
        float a = x[i], b = x[i + 1];
        x[i] = a * cos[i] + b * sin[i];
        x[i + 1] = b * cos[i + 1] + a * sin[i + 1];
    }
}

#if KERNELS_AVX512

/* FeedForward's silu(gate) * up for one row: gate_up [2F] (gate, then up) -> out [F] */
static void swiglu_row(const float *gate_up, int F, float *out) {
    const float *gate = gate_up, *up = gate_up + F;
    int i = 0;
    for (; i + 16 <= F; i += 16) {
        _mm512_storeu_ps(out + i, swiglu16(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(up + i)));
    }
    for (; i < F; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* The attention's two inner loops (attend_piece below), at each level's width. */
#define KEYS_AT_ONCE 16

/* 16 cache elements at element i of row (the lanes of `in`; the others 0), widened to float32. A
 * masked load does not fuse with the multiply-add that uses it: whole chunks (every head width a
 * model has) take plain loads, 1.25x faster key scores. */
static inline __attribute__((always_inline)) __m512 cache_load(const void *row, int i, __mmask16 in, int f16) {
    if (f16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, (const uint16_t *)row + i));
    return _mm512_maskz_loadu_ps(in, (const float *)row + i);
}
static inline __attribute__((always_inline)) __m512 cache_load16(const void *row, int i, int f16) {
    if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i)));
    return _mm512_loadu_ps((const float *)row + i);
}

/* out[t] = q . keys[t] for t < n <= KEYS_AT_ONCE (keys Hd apart): each key's running sum in a register
 * of its own, one load of q serving every key, and the sixteen sums added by one transposing tree
 * (sums16_4x4): a dot product with its own horizontal sum each was a chain of dependent adds. Rows
 * from n on are not read (the last one is read in their place: its sum is dropped). */
static inline __attribute__((always_inline)) void key_scores(const float *q, const char *keys, int n, int Hd, int f16,
                                                            float *out) {
    const char *row[KEYS_AT_ONCE];
    for (int t = 0; t < KEYS_AT_ONCE; t++) row[t] = keys + (size_t)(t < n ? t : n - 1) * Hd * (f16 ? 2 : 4);
    __m512 acc[4][4];
    for (int t = 0; t < KEYS_AT_ONCE; t++) acc[t % 4][t / 4] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= Hd; i += 16) {
        __m512 qi = _mm512_loadu_ps(q + i);
        for (int t = 0; t < KEYS_AT_ONCE; t++) acc[t % 4][t / 4] = _mm512_fmadd_ps(qi, cache_load16(row[t], i, f16), acc[t % 4][t / 4]);
    }
    if (i < Hd) {
        __mmask16 in = (__mmask16)((1u << (Hd - i)) - 1);
        __m512 qi = _mm512_maskz_loadu_ps(in, q + i);
        for (int t = 0; t < KEYS_AT_ONCE; t++)
            acc[t % 4][t / 4] = _mm512_fmadd_ps(qi, cache_load(row[t], i, in, f16), acc[t % 4][t / 4]);
    }
    float sums[KEYS_AT_ONCE];
    sums16_4x4(acc, sums, 4); /* sums[4 i + r] = the sum of acc[r][i]: key 4 i + r */
    memcpy(out, sums, sizeof(float) * n);
}

/* o[i] = the sum over t < n of p[t] rows[t][i] (rows Hd apart), i < Hd: 64 columns at a time in
 * registers, two positions per turn in two sets of sums (one chain of multiply-adds per register
 * waited on its own latency). */
static inline __attribute__((always_inline)) void weighted_rows(const float *p, const char *rows, int n, int Hd, int f16,
                                                                float *o) {
    size_t row_bytes = (size_t)Hd * (f16 ? 2 : 4);
    for (int i0 = 0; i0 < Hd; i0 += 64) {
        __mmask16 in[4];
        __m512 a[4], b[4];
        for (int k = 0; k < 4; k++) {
            int left = Hd - i0 - 16 * k;
            in[k] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            a[k] = b[k] = _mm512_setzero_ps();
        }
        int t = 0, whole = Hd - i0 >= 64; /* whole: plain loads (the compiler makes a loop of each) */
        for (; t + 2 <= n; t += 2) {
            const char *r0 = rows + (size_t)t * row_bytes, *r1 = r0 + row_bytes;
            __m512 w0 = _mm512_set1_ps(p[t]), w1 = _mm512_set1_ps(p[t + 1]);
            for (int k = 0; k < 4; k++) {
                int at = i0 + 16 * k;
                a[k] = _mm512_fmadd_ps(w0, whole ? cache_load16(r0, at, f16) : cache_load(r0, at, in[k], f16), a[k]);
                b[k] = _mm512_fmadd_ps(w1, whole ? cache_load16(r1, at, f16) : cache_load(r1, at, in[k], f16), b[k]);
            }
        }
        if (t < n) {
            const char *r0 = rows + (size_t)t * row_bytes;
            for (int k = 0; k < 4; k++) a[k] = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), cache_load(r0, i0 + 16 * k, in[k], f16), a[k]);
        }
        for (int k = 0; k < 4; k++) _mm512_mask_storeu_ps(o + i0 + 16 * k, in[k], _mm512_add_ps(a[k], b[k]));
    }
}

#else /* AVX2: the same steps, 8 floats at a time */

static void swiglu_row(const float *gate_up, int F, float *out) {
    const float *gate = gate_up, *up = gate_up + F;
    int i = 0;
    for (; i + 8 <= F; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < F; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#define KEYS_AT_ONCE 8

/* 8 cache elements at element i of row, widened to float32; one element */
static inline __attribute__((always_inline)) __m256 cache_load(const void *row, int i, int f16) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
    return _mm256_loadu_ps((const float *)row + i);
}
static inline float cache_element(const void *row, int i, int f16) {
    return f16 ? _cvtsh_ss(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* key_scores at AVX2's width: eight keys' sums side by side, added by a transpose */
static inline __attribute__((always_inline)) void key_scores(const float *q, const char *keys, int n, int Hd, int f16,
                                                            float *out) {
    const char *row[KEYS_AT_ONCE];
    for (int t = 0; t < KEYS_AT_ONCE; t++) row[t] = keys + (size_t)(t < n ? t : n - 1) * Hd * (f16 ? 2 : 4);
    __m256 acc[KEYS_AT_ONCE];
    for (int t = 0; t < KEYS_AT_ONCE; t++) acc[t] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= Hd; i += 8) {
        __m256 qi = _mm256_loadu_ps(q + i);
        for (int t = 0; t < KEYS_AT_ONCE; t++) acc[t] = _mm256_fmadd_ps(qi, cache_load(row[t], i, f16), acc[t]);
    }
    __m256 columns[KEYS_AT_ONCE];
    transpose8(acc, columns); /* columns[j] lane t = acc[t] lane j */
    __m256 sums = columns[0];
    for (int j = 1; j < 8; j++) sums = _mm256_add_ps(sums, columns[j]);
    float s8[KEYS_AT_ONCE];
    _mm256_storeu_ps(s8, sums);
    for (int t = 0; t < n; t++) {
        float tail = 0; /* a head width that is not a multiple of 8 */
        for (int j = i; j < Hd; j++) tail += q[j] * cache_element(row[t], j, f16);
        out[t] = s8[t] + tail;
    }
}

/* weighted_rows at AVX2's width: 32 columns at a time, two positions per turn */
static inline __attribute__((always_inline)) void weighted_rows(const float *p, const char *rows, int n, int Hd, int f16,
                                                                float *o) {
    size_t row_bytes = (size_t)Hd * (f16 ? 2 : 4);
    int i0 = 0;
    for (; i0 + 32 <= Hd; i0 += 32) {
        __m256 a[4], b[4];
        for (int k = 0; k < 4; k++) a[k] = b[k] = _mm256_setzero_ps();
        int t = 0;
        for (; t + 2 <= n; t += 2) {
            const char *r0 = rows + (size_t)t * row_bytes, *r1 = r0 + row_bytes;
            __m256 w0 = _mm256_set1_ps(p[t]), w1 = _mm256_set1_ps(p[t + 1]);
            for (int k = 0; k < 4; k++) {
                a[k] = _mm256_fmadd_ps(w0, cache_load(r0, i0 + 8 * k, f16), a[k]);
                b[k] = _mm256_fmadd_ps(w1, cache_load(r1, i0 + 8 * k, f16), b[k]);
            }
        }
        if (t < n)
            for (int k = 0; k < 4; k++)
                a[k] = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), cache_load(rows + (size_t)t * row_bytes, i0 + 8 * k, f16), a[k]);
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(o + i0 + 8 * k, _mm256_add_ps(a[k], b[k]));
    }
    for (; i0 + 8 <= Hd; i0 += 8) { /* the columns past the last 32: 8, then one at a time */
        __m256 a = _mm256_setzero_ps();
        for (int t = 0; t < n; t++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), cache_load(rows + (size_t)t * row_bytes, i0, f16), a);
        _mm256_storeu_ps(o + i0, a);
    }
    for (; i0 < Hd; i0++) {
        float sum = 0;
        for (int t = 0; t < n; t++) sum += p[t] * cache_element(rows + (size_t)t * row_bytes, i0, f16);
        o[i0] = sum;
    }
}

/* Lanes j .. j + 7 that count: valid and (ok NULL or ok[j + i] != 0), as all-ones int32 lanes */
static inline __m256i counts(const uint8_t *ok, int j, int n, __m256i valid) {
    if (!ok) return valid;
    int64_t bytes = 0;
    memcpy(&bytes, ok + j, n - j >= 8 ? 8 : (size_t)(n - j));
    __m256i zero = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)), _mm256_setzero_si256());
    return _mm256_andnot_si256(zero, valid);
}

#endif

/* Where each row's keys and values are: row r's cache holds `length[r]` positions per key/value
 * head (k[r], v[r]: [K, length[r], Hd], float16 if f16, else float32), and its new token is at
 * position start[r]. A batch sharing one cache tensor (decode_layer) and sequences with caches of
 * their own (decode_rows, the server's continuous batches) are both this. */
typedef struct {
    void *const *k, *const *v;
    const long *length;
    const int *start;
    int f16;
} RowCaches;

/* n floats -> the cache's float16, rounded to nearest even (as PyTorch's .half()). Values past
 * float16's range (65504) are held at its largest finite value: an infinite key would turn a whole
 * softmax into NaN. */
static void store_halves(const float *x, int n, uint16_t *out) {
    const __m256 top = _mm256_set1_ps(65504.0f), bottom = _mm256_set1_ps(-65504.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(x + i), bottom), top);
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) out[i] = _cvtss_sh(fminf(fmaxf(x[i], -65504.0f), 65504.0f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* A long cache comes from memory (a decode step's weights have pushed it out of the caches): its
 * rows are fetched into L2 AHEAD_KEYS positions before they are read, keys and values together. */
#define AHEAD_KEYS 32
static inline void fetch_row(const char *row, size_t bytes) {
    for (size_t at = 0; at < bytes; at += 64) _mm_prefetch(row + at, _MM_HINT_T1);
}

/* Softmax's numerators for n scores: p[j] = e^(p[j] scale - best), 0 where ok[j] == 0 (ok NULL: every
 * position counts); *best = the largest scaled score that counts (-inf if none does), *total = the
 * sum of the numerators. 16 (AVX2: 8) at a time, the last ones masked in. */
static void softmax_numerators(float *p, int n, const uint8_t *ok, float scale, float *best, float *total) {
#if KERNELS_AVX512
    __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
        __mmask16 valid = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1), in = valid;
        if (ok) in &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(valid, ok + j), _mm_set1_epi8(-1));
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, p + j), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(p + j, valid, x);
        top = _mm512_mask_max_ps(top, in, top, x);
    }
    *best = _mm512_reduce_max_ps(top);
    /* where nothing counts, best is -inf and p - best NaN: those lanes are zeroed below */
    __m512 shift = _mm512_set1_ps(*best), floor = _mm512_set1_ps(-100.0f);
    for (int j = 0; j < n; j += 16) {
        __mmask16 valid = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1), in = valid;
        if (ok) in &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(valid, ok + j), _mm_set1_epi8(-1));
        __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, p + j), shift), floor);
        __m512 e = _mm512_maskz_mov_ps(in, exp16(x));
        _mm512_mask_storeu_ps(p + j, valid, e);
        sum = _mm512_add_ps(sum, e);
    }
    *total = sum16(sum);
#else
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 top = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
        __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - j), lanes);
        __m256 x = _mm256_mul_ps(_mm256_maskload_ps(p + j, valid), _mm256_set1_ps(scale));
        _mm256_maskstore_ps(p + j, valid, x);
        top = _mm256_max_ps(top, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, _mm256_castsi256_ps(counts(ok, j, n, valid))));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    *best = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    __m256 shift = _mm256_set1_ps(*best);
    for (int j = 0; j < n; j += 8) { /* exp8 clamps; NaN (nothing counts) is zeroed with the masked lanes */
        __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - j), lanes);
        __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(p + j, valid), shift)),
                                 _mm256_castsi256_ps(counts(ok, j, n, valid)));
        _mm256_maskstore_ps(p + j, valid, e);
        sum = _mm256_add_ps(sum, e);
    }
    *total = hsum8(sum);
#endif
}

/* Positions per attention task. A row's cache is cut into pieces of ATTEND_PIECE positions, and each
 * (row, key/value head, piece) is a task for any thread: with a task per key/value head, the default
 * model's three heads left one of two threads idle a third of the time. Each piece's softmax is
 * taken against its own maximum, and the pieces are combined in order afterwards (rescaled to the
 * row's maximum, as flash-decoding does), so a row's numbers do not depend on the number of threads
 * or on the other rows in the call. */
#define ATTEND_PIECE 128

/* One task: query heads q0 [G, Hd] against positions j0 .. j0 + n - 1 of one key/value head (its
 * keys and values float16 if f16, else float32). o [G, Hd] = sum over the positions of e^(s - best) v,
 * best [G] = the largest score s, total [G] = the sum of e^(s - best); masked positions (ok[j] == 0)
 * count for nothing. p: room for G * n floats. Inlined with f16 a constant: one loop per type. */
static inline __attribute__((always_inline)) void attend_piece(const float *q0, int G, int Hd, const void *key_rows,
                                                              const void *value_rows, int f16, int j0, int n,
                                                              const uint8_t *ok, float inv_sqrt, float *p, float *o,
                                                              float *best, float *total) {
    size_t row_bytes = (size_t)Hd * (f16 ? 2 : 4);
    const char *keys = (const char *)key_rows + j0 * row_bytes, *values = (const char *)value_rows + j0 * row_bytes;
    for (int a = 0; a < AHEAD_KEYS && a < n; a++) { /* the piece's first rows: a piece is a new stream */
        fetch_row(keys + a * row_bytes, row_bytes);
        fetch_row(values + a * row_bytes, row_bytes);
    }
    for (int t = 0; t < n; t += KEYS_AT_ONCE) { /* scores p [G, n] */
        int m = n - t < KEYS_AT_ONCE ? n - t : KEYS_AT_ONCE;
        for (int a = t + AHEAD_KEYS; a < t + AHEAD_KEYS + m && a < n; a++) {
            fetch_row(keys + a * row_bytes, row_bytes);
            fetch_row(values + a * row_bytes, row_bytes);
        }
        for (int hh = 0; hh < G; hh++) key_scores(q0 + (size_t)hh * Hd, keys + t * row_bytes, m, Hd, f16, p + (size_t)hh * n + t);
    }
    for (int hh = 0; hh < G; hh++) { /* softmax's numerators and their sum, then the weighted values */
        float *ph = p + (size_t)hh * n;
        softmax_numerators(ph, n, ok ? ok + j0 : NULL, inv_sqrt, best + hh, total + hh);
        weighted_rows(ph, values, n, Hd, f16, o + (size_t)hh * Hd);
    }
}

/* model.py's attention() for one query per head: softmax(q k^T / sqrt(Hd)) v over positions
 * 0..start[r] of row r's cache, query head h reading key/value head h / (H / K). `allowed` [M, S]
 * (NULL: every position) is causal_mask's padding mask for left-padded batches (S = start + 1, the
 * same for every row then). q [M, q_stride], out [M, H * Hd]. Each row's arithmetic is its own:
 * the result for a row does not depend on which other rows are in the call.
 *
 * A task reads its keys and values once for the G = H / K query heads that share them (a task per
 * query head read them G times, and a long cache from memory at ~9 GB/s: 1024 positions added 6.7
 * ms to a 1B step). */
static int attend(const float *q, int q_stride, const RowCaches *c, int M, int H, int K, int Hd, const uint8_t *allowed,
                  float *out) {
    float inv_sqrt = 1.0f / sqrtf((float)Hd);
    int failed = 0, G = H / K, tasks = 0, first[M + 1]; /* row r's tasks: first[r] .. first[r + 1] - 1 */
    long work = 0;
    for (int r = 0; r < M; r++) {
        first[r] = tasks;
        tasks += K * ((c->start[r] + ATTEND_PIECE) / ATTEND_PIECE); /* pieces of start + 1 positions */
        work += (long)H * (c->start[r] + 1) * Hd;
    }
    first[M] = tasks;
    /* per task and query head: o [Hd], then best and total */
    size_t part = (size_t)Hd + 2;
    float *parts = malloc(sizeof(float) * (size_t)tasks * G * part);
    if (!parts) return STATUS_OUT_OF_MEMORY;
    /* worth spreading over threads once there are ~10 us of work (1-2 us to start the threads) */
#pragma omp parallel for schedule(dynamic, 1) if (work > (1L << 15))
    for (int task = 0; task < tasks; task++) {
        int r = 0;
        while (first[r + 1] <= task) r++;
        int pieces = (first[r + 1] - first[r]) / K, g = (task - first[r]) / pieces, piece = (task - first[r]) % pieces;
        int S = c->start[r] + 1, j0 = piece * ATTEND_PIECE, n = S - j0 < ATTEND_PIECE ? S - j0 : ATTEND_PIECE;
        float *p = malloc(sizeof(float) * (size_t)G * n), *mine = parts + (size_t)task * G * part;
        if (!p) {
            failed = 1;
            continue;
        }
        const float *qg = q + (size_t)r * q_stride + (size_t)g * G * Hd;
        const uint8_t *ok = allowed ? allowed + (size_t)r * S : NULL;
        size_t head = (size_t)g * c->length[r] * Hd; /* elements before key/value head g */
        float *best = mine + (size_t)G * Hd, *total = best + G;
        if (c->f16)
            attend_piece(qg, G, Hd, (const uint16_t *)c->k[r] + head, (const uint16_t *)c->v[r] + head, 1, j0, n, ok, inv_sqrt,
                         p, mine, best, total);
        else
            attend_piece(qg, G, Hd, (const float *)c->k[r] + head, (const float *)c->v[r] + head, 0, j0, n, ok, inv_sqrt, p,
                         mine, best, total);
        free(p);
    }
    /* each query head's pieces, in order: out = sum e^(best_c - best) o_c / sum e^(best_c - best) total_c */
    for (int r = 0; r < M && !failed; r++) {
        int pieces = (first[r + 1] - first[r]) / K;
        for (int g = 0; g < K; g++)
            for (int hh = 0; hh < G; hh++) {
                float *o = out + (size_t)r * H * Hd + (size_t)(g * G + hh) * Hd, top = -INFINITY, sum = 0, weight[pieces];
                const float *piece_o[pieces];
                for (int k = 0; k < pieces; k++) {
                    const float *mine = parts + (size_t)(first[r] + g * pieces + k) * G * part;
                    piece_o[k] = mine + (size_t)hh * Hd;
                    weight[k] = mine[(size_t)G * Hd + hh]; /* the piece's best */
                    top = weight[k] > top ? weight[k] : top;
                }
                for (int k = 0; k < pieces; k++) {
                    const float *mine = parts + (size_t)(first[r] + g * pieces + k) * G * part;
                    weight[k] = weight[k] == -INFINITY ? 0.0f : expf(weight[k] - top); /* a piece all masked: 0 */
                    sum += weight[k] * mine[(size_t)G * Hd + G + hh];
                }
                for (int k = 0; k < pieces; k++) weight[k] /= sum;
                for (int i = 0; i < Hd; i++) o[i] = weight[0] * piece_o[0][i];
                for (int k = 1; k < pieces; k++) /* each column summed over the pieces in order */
                    for (int i = 0; i < Hd; i++) o[i] += weight[k] * piece_o[k][i];
            }
    }
    free(parts);
    return failed ? STATUS_OUT_OF_MEMORY : STATUS_OK;
}

/* x [M, D], one token per row -> out [M, D]; writes each row's key and value at its position in its
 * cache. cos, sin [rope_rows, Hd] (rope_rows 1: shared by every row, else M). */
static int layer_step(const Layer *L, const float *x, int M, const float *cos, const float *sin, int rope_rows,
                      const RowCaches *c, const uint8_t *allowed, float *out) {
    int D = L->dim, H = L->n_heads, K = L->n_kv_heads, Hd = L->head_dim, F = L->hidden;
    int qkv_width = (H + 2 * K) * Hd;
    float *normed = malloc(sizeof(float) * (size_t)M * (D > F ? D : F));
    float *qkv = malloc(sizeof(float) * (size_t)M * qkv_width);
    float *att = malloc(sizeof(float) * (size_t)M * H * Hd);
    float *proj = malloc(sizeof(float) * (size_t)M * D);
    float *hidden = malloc(sizeof(float) * (size_t)M * 2 * F);
    int code = (normed && qkv && att && proj && hidden) ? STATUS_OK : STATUS_OUT_OF_MEMORY;

    /* h = x + attention(attention_norm(x)) */
    if (!code) {
        rms_norm(x, L->attention_norm, M, D, L->eps, normed);
        code = linear(&L->wqkv, normed, M, qkv); /* [M, (H + 2K) Hd]: queries, keys, values */
    }
    if (!code) {
        for (int r = 0; r < M; r++) {
            float *row = qkv + (size_t)r * qkv_width;
            const float *cr = cos + (size_t)(rope_rows == 1 ? 0 : r) * Hd, *sr = sin + (size_t)(rope_rows == 1 ? 0 : r) * Hd;
            for (int h = 0; h < H + K; h++) rotate(row + (size_t)h * Hd, cr, sr, Hd); /* q and k */
            for (int g = 0; g < K; g++) {                                              /* cache.update */
                size_t at = ((size_t)g * c->length[r] + c->start[r]) * Hd;
                const float *key = row + (size_t)(H + g) * Hd, *value = row + (size_t)(H + K + g) * Hd;
                if (c->f16) {
                    store_halves(key, Hd, (uint16_t *)c->k[r] + at);
                    store_halves(value, Hd, (uint16_t *)c->v[r] + at);
                } else {
                    memcpy((float *)c->k[r] + at, key, sizeof(float) * Hd);
                    memcpy((float *)c->v[r] + at, value, sizeof(float) * Hd);
                }
            }
        }
        code = attend(qkv, qkv_width, c, M, H, K, Hd, allowed, att);
    }
    if (!code) code = linear(&L->wo, att, M, proj);
    if (!code) {
        for (size_t i = 0; i < (size_t)M * D; i++) out[i] = x[i] + proj[i];
        /* out = h + feed_forward(ffn_norm(h)), feed_forward = w2(silu(gate) * up) */
        rms_norm(out, L->ffn_norm, M, D, L->eps, normed);
        code = linear(&L->w13, normed, M, hidden); /* [M, 2F]: gate, then up */
    }
    if (!code) {
        for (int r = 0; r < M; r++) swiglu_row(hidden + (size_t)r * 2 * F, F, normed + (size_t)r * F);
        code = linear(&L->w2, normed, M, proj);
    }
    if (!code)
        for (size_t i = 0; i < (size_t)M * D; i++) out[i] += proj[i];
    free(normed);
    free(qkv);
    free(att);
    free(proj);
    free(hidden);
    return code;
}

/* x [M, D] at position `start` (one token per row) -> out [M, D]; writes the rows' keys and values at
 * `start` in the cache, model.py's LayerCache: k and v [rows >= M, K, length, Hd], contiguous,
 * float16 if cache_f16, else float32. cos, sin [rope_rows, Hd] (rope_rows 1: shared by every row,
 * else M). Returns a Status: STATUS_OK, STATUS_OUT_OF_MEMORY, or a product's. */
int decode_layer(const Layer *L, const float *x, int M, const float *cos, const float *sin, int rope_rows, void *cache_k,
                 void *cache_v, int cache_f16, long length, int start, const uint8_t *allowed, float *out) {
    void **k = malloc(sizeof(void *) * M), **v = malloc(sizeof(void *) * M);
    long *lengths = malloc(sizeof(long) * M);
    int *starts = malloc(sizeof(int) * M);
    int code = (k && v && lengths && starts) ? STATUS_OK : STATUS_OUT_OF_MEMORY;
    if (!code) {
        size_t row = (size_t)L->n_kv_heads * length * L->head_dim * (cache_f16 ? 2 : 4); /* bytes */
        for (int r = 0; r < M; r++) {
            k[r] = (char *)cache_k + r * row;
            v[r] = (char *)cache_v + r * row;
            lengths[r] = length;
            starts[r] = start;
        }
        RowCaches c = {k, v, lengths, starts, cache_f16};
        code = layer_step(L, x, M, cos, sin, rope_rows, &c, allowed, out);
    }
    free(k);
    free(v);
    free(lengths);
    free(starts);
    return code;
}

/* decode_layer for rows that are separate sequences (a server's continuous batch): row r at position
 * start[r], its cache k[r], v[r] [K, length[r], Hd] (the address of each row's LayerCache tensors, as
 * int64; float16 if cache_f16, else float32). cos, sin [M, Hd], each row's own. The products read the
 * weights once for all rows; everything else is per row, so a row's result is the same in any company. */
int decode_rows(const Layer *L, const float *x, int M, const float *cos, const float *sin, const int64_t *cache_k,
                const int64_t *cache_v, int cache_f16, const long *length, const int *start, float *out) {
    RowCaches c = {(void *const *)cache_k, (void *const *)cache_v, length, start, cache_f16};
    return layer_step(L, x, M, cos, sin, M, &c, NULL, out);
}

/* ---- the same steps for many rows, for prompts (decode_block.py's KernelBlock._prompt_step) ---- */

/* RMSNorm of x [M, D] -> out [M, D] */
int rms_norm_rows(const float *x, const float *weight, long M, int D, float eps, float *out) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) rms_norm(x + r * D, weight, 1, D, eps, out + r * D);
    return 0;
}

/* apply_rotary in place on the first `heads` heads of each row of x [B * T, width]; cos, sin
 * [rope_rows * T, Hd]: row b * T + t takes table row t if rope_rows is 1, else b * T + t. */
int rotate_rows(float *x, long B, int T, int width, int heads, int Hd, const float *cos, const float *sin, int rope_rows) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < B * T; r++) {
        long table = rope_rows == 1 ? r % T : r;
        for (int h = 0; h < heads; h++) rotate(x + r * width + (long)h * Hd, cos + table * Hd, sin + table * Hd, Hd);
    }
    return 0;
}

/* silu(gate) * up: gate_up [M, 2F] -> out [M, F] */
int swiglu_rows(const float *gate_up, long M, int F, float *out) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < M; r++) swiglu_row(gate_up + r * 2 * F, F, out + r * F);
    return 0;
}
