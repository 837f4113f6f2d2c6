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
 * The cache is model.py's LayerCache: k and v float32 [rows >= M, K, length, Hd], contiguous.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plainllama.h"
#include "exp16.h"

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

#if defined(__AVX512F__)

/* FeedForward's silu(gate) * up for one row: gate_up [2F] (gate, then up) -> out [F] */
static void swiglu_row(const float *gate_up, int F, float *out) {
    const float *gate = gate_up, *up = gate_up + F;
    int i = 0;
    for (; i + 16 <= F; i += 16) {
        _mm512_storeu_ps(out + i, swiglu16(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(up + i)));
    }
    for (; i < F; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static inline float dot(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + i), _mm512_maskz_loadu_ps(tail, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
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

static inline float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc2);
    }
    acc = _mm256_add_ps(acc, acc2);
    float tail = 0;
    for (; i < n; i++) tail += a[i] * b[i];
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s))) + tail;
}

#endif

/* Where each row's keys and values are: row r's cache holds `length[r]` positions per key/value
 * head (k[r], v[r]: float32 [K, length[r], Hd]), and its new token is at position start[r]. A batch
 * sharing one cache tensor (decode_layer) and sequences with caches of their own (decode_rows, the
 * server's continuous batches) are both this. */
typedef struct {
    float *const *k, *const *v;
    const long *length;
    const int *start;
} RowCaches;

/* A long cache comes from memory (a decode step's weights have pushed it out of the caches), read
 * one key or value row at a time: each is fetched into L2 AHEAD_KEYS rows before it is read. */
#define AHEAD_KEYS 32
static inline void fetch_row(const float *row, int Hd) {
    for (int at = 0; at < Hd; at += 16) _mm_prefetch((const char *)(row + at), _MM_HINT_T1);
}

/* p[j] = e^(p[j] - best) for j < S, p[j] > -inf or masked later (masked positions come in as -inf and
 * leave as a tiny value that attend sets to 0): 16 (AVX2: 8) at a time, the last ones masked in. */
static void exp_minus(float *p, int S, float best) {
#if defined(__AVX512F__)
    __m512 shift = _mm512_set1_ps(best), floor = _mm512_set1_ps(-100.0f); /* -inf - best would make NaN */
    for (int j = 0; j < S; j += 16) {
        __mmask16 in = S - j >= 16 ? 0xFFFF : (__mmask16)((1u << (S - j)) - 1);
        __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, p + j), shift), floor);
        _mm512_mask_storeu_ps(p + j, in, exp16(x));
    }
#else
    __m256 shift = _mm256_set1_ps(best);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j = 0; j < S; j += 8) {
        __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(S - j), lanes);
        __m256 x = _mm256_sub_ps(_mm256_maskload_ps(p + j, in), shift); /* exp8 clamps -inf */
        _mm256_maskstore_ps(p + j, in, exp8(x));
    }
#endif
}

/* model.py's attention() for one query per head: softmax(q k^T / sqrt(Hd)) v over positions
 * 0..start[r] of row r's cache, query head h reading key/value head h / (H / K). `allowed` [M, S]
 * (NULL: every position) is causal_mask's padding mask for left-padded batches (S = start + 1, the
 * same for every row then). q [M, q_stride], out [M, H * Hd]. Each row's arithmetic is its own:
 * the result for a row does not depend on which other rows are in the call.
 *
 * A task is a row's key/value head with its G = H / K query heads: each key and value is read once
 * for the G of them (a task per query head read them G times, and a long cache from memory at ~9
 * GB/s: 1024 positions added 6.7 ms to a 1B step), and e^x runs 16 scores at a time. */
static int attend(const float *q, int q_stride, const RowCaches *c, int M, int H, int K, int Hd, const uint8_t *allowed,
                  float *out) {
    float inv_sqrt = 1.0f / sqrtf((float)Hd);
    int failed = 0, G = H / K;
    long work = 0;
    for (int r = 0; r < M; r++) work += (long)H * (c->start[r] + 1) * Hd;
    /* worth spreading over threads only when the caches are long */
#pragma omp parallel for collapse(2) schedule(static) if (work > (1L << 17))
    for (int r = 0; r < M; r++) {
        for (int g = 0; g < K; g++) {
            int S = c->start[r] + 1;
            const float *q0 = q + (size_t)r * q_stride + (size_t)g * G * Hd; /* query heads g G .. g G + G - 1 */
            const float *keys = c->k[r] + (size_t)g * c->length[r] * Hd, *values = c->v[r] + (size_t)g * c->length[r] * Hd;
            const uint8_t *ok = allowed ? allowed + (size_t)r * S : NULL;
            float *o0 = out + (size_t)r * H * Hd + (size_t)g * G * Hd, *p = malloc(sizeof(float) * (size_t)G * S), total[G];
            if (!p) {
                failed = 1;
                continue;
            }
            for (int j = 0; j < S; j++) /* scores p [G, S] */ {
                if (j + AHEAD_KEYS < S) fetch_row(keys + (size_t)(j + AHEAD_KEYS) * Hd, Hd);
                for (int hh = 0; hh < G; hh++)
                    p[(size_t)hh * S + j] = (ok && !ok[j]) ? -INFINITY : dot(q0 + (size_t)hh * Hd, keys + (size_t)j * Hd, Hd) * inv_sqrt;
            }
            for (int hh = 0; hh < G; hh++) { /* softmax's numerators and their sum, position by position */
                float *ph = p + (size_t)hh * S, best = -INFINITY;
                for (int j = 0; j < S; j++) best = ph[j] > best ? ph[j] : best;
                exp_minus(ph, S, best);
                total[hh] = 0;
                for (int j = 0; j < S; j++) total[hh] += ph[j] = (ok && !ok[j]) ? 0.0f : ph[j];
                memset(o0 + (size_t)hh * Hd, 0, sizeof(float) * Hd);
            }
            for (int j = 0; j < S; j++) {
                const float *v = values + (size_t)j * Hd;
                if (j + AHEAD_KEYS < S) fetch_row(values + (size_t)(j + AHEAD_KEYS) * Hd, Hd);
                for (int hh = 0; hh < G; hh++) {
                    float weight = p[(size_t)hh * S + j] / total[hh], *o = o0 + (size_t)hh * Hd;
                    for (int i = 0; i < Hd; i++) o[i] += weight * v[i];
                }
            }
            free(p);
        }
    }
    return failed ? -1 : 0;
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
                memcpy(c->k[r] + at, row + (size_t)(H + g) * Hd, sizeof(float) * Hd);
                memcpy(c->v[r] + at, row + (size_t)(H + K + g) * Hd, sizeof(float) * Hd);
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
 * `start` in the cache, model.py's LayerCache: k and v float32 [rows >= M, K, length, Hd],
 * contiguous. cos, sin [rope_rows, Hd] (rope_rows 1: shared by every row, else M).
 * Returns a Status: STATUS_OK, STATUS_OUT_OF_MEMORY, or a product's. */
int decode_layer(const Layer *L, const float *x, int M, const float *cos, const float *sin, int rope_rows,
                 float *cache_k, float *cache_v, long length, int start, const uint8_t *allowed, float *out) {
    float **k = malloc(sizeof(float *) * M), **v = malloc(sizeof(float *) * M);
    long *lengths = malloc(sizeof(long) * M);
    int *starts = malloc(sizeof(int) * M);
    int code = (k && v && lengths && starts) ? STATUS_OK : STATUS_OUT_OF_MEMORY;
    if (!code) {
        size_t row = (size_t)L->n_kv_heads * length * L->head_dim;
        for (int r = 0; r < M; r++) {
            k[r] = cache_k + r * row;
            v[r] = cache_v + r * row;
            lengths[r] = length;
            starts[r] = start;
        }
        RowCaches c = {k, v, lengths, starts};
        code = layer_step(L, x, M, cos, sin, rope_rows, &c, allowed, out);
    }
    free(k);
    free(v);
    free(lengths);
    free(starts);
    return code;
}

/* decode_layer for rows that are separate sequences (a server's continuous batch): row r at position
 * start[r], its cache k[r], v[r] float32 [K, length[r], Hd] (the address of each row's LayerCache
 * tensors, as int64). cos, sin [M, Hd], each row's own. The products read the weights once for all
 * rows; everything else is per row, so a row's result is the same in any company. */
int decode_rows(const Layer *L, const float *x, int M, const float *cos, const float *sin, const int64_t *cache_k,
                const int64_t *cache_v, const long *length, const int *start, float *out) {
    RowCaches c = {(float *const *)cache_k, (float *const *)cache_v, length, start};
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
