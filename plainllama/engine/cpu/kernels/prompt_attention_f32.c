/* Attention for prompts in float32 on CPUs without bfloat16 arithmetic (with AVX-512: Intel Skylake-X
 * to Ice Lake and Tiger Lake; at the AVX2 level: Intel's laptops and desktops, AMD before Zen 4),
 * where prompt_attention.c cannot run: out = softmax(q k^T /
 * sqrt(Hd)) v with a boolean mask, the same arguments and the same flash-attention order as
 * prompt_attention.c, in float32 throughout (as PyTorch's float32 attention).
 *
 * Why: there the prompt's attention ran PyTorch's attention on tiles of 32 queries
 * (decode_block.query_tiles_attention, so that a query's numbers do not depend on the other queries),
 * 7.5% of a 1B-shaped Q6_K prompt's time on an Ice Lake emulated, with the copies and masks around it.
 *
 * How, per task (32 queries of one head of one sequence), for each block of 32 keys counted from key 0:
 *   scores S [32 x 32] = Q K^T: the block's keys transposed to K^T [Hd][32] (16 x 16 transposes), then
 *            12 queries at a time walk it with 24 accumulators, one broadcast of q[d] per query;
 *   softmax  per query: scale, mask, the new maximum, e^(s - max) (exp16.h), the sum, P in S;
 *   P V      32 head dims at a time: each key's row of V read where it lies, 12 queries' weights
 *            broadcast, 24 accumulators; then o = o * e^(old max - new max) + P V.
 * A query's numbers are computed from that query alone, its key blocks start at key 0, and a block in
 * which it sees no key changes nothing (its maximum stays, e^0 = 1 exactly, its weights are 0), so
 * the result is the same in any company (the server's prefix cache and chunked prompts rely on it;
 * tests/test_continuous.py). A query whose mask row allows nothing gets zeros. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plainllama.h"
#include "vectors.h"

#define QUERIES 32 /* queries per task */
#define KEYS 32    /* keys per step of the running softmax, in blocks from key 0 */

typedef struct {
    const float *q, *k, *v;
    long q_b, q_t, kv_b, kv_h, kv_t;
    int B, T, H, K, Hd, end;
    const uint8_t *allowed;
    int mask_rows;
    float *out;
} Call;

/* Per thread, for a task's G = H/K query heads of QUERIES rows each: the block's K^T [Hd][KEYS], the
 * scores then weights [G QUERIES][KEYS], o and P V [G QUERIES][Hd], each row's running maximum m, sum
 * l and e^(old max - new max) alpha [G QUERIES] */
typedef struct {
    float *kt, *S, *o, *pv, *m, *l, *alpha;
} Scratch;

#include "exp16.h"

#if KERNELS_AVX512

#define ROWS 12 /* queries per pass of the two products: 24 accumulators */

/* Keys kb .. kb + KEYS - 1 (zeros from `count` on) of key/value head g of sequence b -> kt [Hd][KEYS] */
static void transposed_keys(const Call *c, int b, int g, int kb, int count, float *kt) {
    const float *k = c->k + b * c->kv_b + g * c->kv_h + (long)kb * c->kv_t;
    for (int d0 = 0; d0 < c->Hd; d0 += 16)
        for (int half = 0; half < 2; half++) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) {
                int key = 16 * half + j;
                r[j] = key < count ? _mm512_castps_si512(_mm512_loadu_ps(k + key * c->kv_t + d0)) : _mm512_setzero_si512();
            }
            transpose16(r); /* r[dd]: dim d0 + dd of the 16 keys */
            for (int dd = 0; dd < 16; dd++) _mm512_store_si512(kt + (d0 + dd) * KEYS + 16 * half, r[dd]);
        }
}

/* S [n x KEYS] for queries q0 .. q0 + n - 1 (rows `q_t` floats apart): the sum over d of q[d] K^T[d] */
static inline __attribute__((always_inline)) void scores(const float *q, long q_t, const float *kt, int Hd, int n, float *S) {
    __m512 acc[ROWS][2];
    rows_times_32(q, q_t, kt, KEYS, Hd, n, acc);
    for (int i = 0; i < n; i++) {
        _mm512_store_ps(S + i * KEYS, acc[i][0]);
        _mm512_store_ps(S + i * KEYS + 16, acc[i][1]);
    }
}

/* P V [n x 32 dims] for queries i0 .. (weights P rows of KEYS) and dims d0 .. d0 + 31: the sum over
 * the block's `count` keys of P[key] V[key] (keys past count have weight 0 and are not read) */
static inline __attribute__((always_inline)) void weighted_values(const float *P, const float *v, long kv_t, int count, int n,
                                                                  float *pv, int Hd) {
    __m512 acc[ROWS][2];
    rows_times_32(P, KEYS, v, kv_t, count, n, acc);
    for (int i = 0; i < n; i++) {
        _mm512_store_ps(pv + i * Hd, acc[i][0]);
        _mm512_store_ps(pv + i * Hd + 16, acc[i][1]);
    }
}

/* Every n of 1 .. ROWS with its constant */
typedef void ScoresFn(const float *q, long q_t, const float *kt, int Hd, float *S);
typedef void ValuesFn(const float *P, const float *v, long kv_t, int count, float *pv, int Hd);
#define PASSES(N)                                                                                                         \
    static void scores_##N(const float *q, long q_t, const float *kt, int Hd, float *S) { scores(q, q_t, kt, Hd, N, S); } \
    static void values_##N(const float *P, const float *v, long kv_t, int count, float *pv, int Hd) {                   \
        weighted_values(P, v, kv_t, count, N, pv, Hd);                                                                    \
    }
PASSES(1) PASSES(2) PASSES(3) PASSES(4) PASSES(5) PASSES(6) PASSES(7) PASSES(8) PASSES(9) PASSES(10) PASSES(11) PASSES(12)
static ScoresFn *const SCORES[ROWS] = {scores_1, scores_2, scores_3, scores_4,  scores_5,  scores_6,
                                       scores_7, scores_8, scores_9, scores_10, scores_11, scores_12};
static ValuesFn *const VALUES[ROWS] = {values_1, values_2, values_3, values_4,  values_5,  values_6,
                                       values_7, values_8, values_9, values_10, values_11, values_12};

/* Queries r0 .. r0 + rows - 1 of the G query heads of key/value head g of sequence b against the keys
 * 0 .. stop - 1 -> out. Row r of the task (S, o, P V, m, l) is query r0 + r % QUERIES of head
 * g G + r / QUERIES; each row's arithmetic is the same as alone: only K^T is shared. */
static void attend(const Call *c, int b, int g, int r0, int stop, Scratch *w) {
    int Hd = c->Hd, G = c->H / c->K, rows = c->T - r0 < QUERIES ? c->T - r0 : QUERIES;
    const float *v = c->v + b * c->kv_b + g * c->kv_h;
    const uint8_t *mask = c->allowed ? c->allowed + ((long)(c->mask_rows > 1 ? b : 0) * c->T + r0) * c->end : NULL;
    __m512 vscale = _mm512_set1_ps(1.0f / sqrtf((float)Hd)), minus_inf = _mm512_set1_ps(-INFINITY);
    float *m = w->m, *l = w->l, *alpha = w->alpha;
    for (int r = 0; r < G * QUERIES; r++) m[r] = -INFINITY, l[r] = 0.0f;
    memset(w->o, 0, sizeof(float) * G * QUERIES * Hd);
    for (int kb = 0; kb < stop; kb += KEYS) {
        int count = c->end - kb < KEYS ? c->end - kb : KEYS; /* keys past `end` are zeros, never seen */
        __mmask32 real = count == KEYS ? 0xFFFFFFFFu : ((1u << count) - 1), seen[QUERIES];
        transposed_keys(c, b, g, kb, count, w->kt);
        for (int i = 0; i < rows; i++)
            seen[i] = mask ? _mm256_mask_cmpneq_epi8_mask(real, _mm256_maskz_loadu_epi8(real, mask + (long)i * c->end + kb),
                                                          _mm256_setzero_si256())
                           : real;
        for (int hh = 0; hh < G; hh++) {
            const float *q = c->q + b * c->q_b + r0 * c->q_t + (long)(g * G + hh) * Hd;
            for (int i0 = 0; i0 < rows; i0 += ROWS) {
                int n = rows - i0 < ROWS ? rows - i0 : ROWS;
                SCORES[n - 1](q + i0 * c->q_t, c->q_t, w->kt, Hd, w->S + (hh * QUERIES + i0) * KEYS);
            }
            for (int i = 0; i < rows; i++) { /* P = e^(s / sqrt(Hd) - max) where seen, 0 elsewhere, into S */
                int r = hh * QUERIES + i;
                float *s = w->S + r * KEYS;
                __m512 s0 = _mm512_mul_ps(_mm512_load_ps(s), vscale), s1 = _mm512_mul_ps(_mm512_load_ps(s + 16), vscale);
                float best = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(minus_inf, (__mmask16)seen[i], s0),
                                                                _mm512_mask_mov_ps(minus_inf, (__mmask16)(seen[i] >> 16), s1)));
                float now = best > m[r] ? best : m[r];
                /* nothing seen yet (now = -inf): 1; a first finite maximum after -inf: e^-inf = 0 */
                alpha[r] = now == -INFINITY ? 1.0f : m[r] == -INFINITY ? 0.0f : _mm512_cvtss_f32(exp16(_mm512_set1_ps(m[r] - now)));
                m[r] = now;
                __m512 p0 = _mm512_maskz_mov_ps((__mmask16)seen[i], exp16(_mm512_sub_ps(s0, _mm512_set1_ps(now))));
                __m512 p1 = _mm512_maskz_mov_ps((__mmask16)(seen[i] >> 16), exp16(_mm512_sub_ps(s1, _mm512_set1_ps(now))));
                l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
                _mm512_store_ps(s, p0);
                _mm512_store_ps(s + 16, p1);
            }
            for (int d0 = 0; d0 < Hd; d0 += 32)
                for (int i0 = 0; i0 < rows; i0 += ROWS) {
                    int n = rows - i0 < ROWS ? rows - i0 : ROWS;
                    VALUES[n - 1](w->S + (hh * QUERIES + i0) * KEYS, v + (long)kb * c->kv_t + d0, c->kv_t, count,
                                  w->pv + (hh * QUERIES + i0) * Hd + d0, Hd);
                }
            for (int i = 0; i < rows; i++) { /* o = o e^(old max - new max) + P V */
                int r = hh * QUERIES + i;
                __m512 a = _mm512_set1_ps(alpha[r]);
                for (int d = 0; d < Hd; d += 16)
                    _mm512_store_ps(w->o + r * Hd + d, _mm512_fmadd_ps(_mm512_load_ps(w->o + r * Hd + d), a, _mm512_load_ps(w->pv + r * Hd + d)));
            }
        }
    }
    for (int hh = 0; hh < G; hh++)
        for (int i = 0; i < rows; i++) { /* o / l (no key seen: 0) */
            int r = hh * QUERIES + i;
            float *dst = c->out + ((long)b * c->T + r0 + i) * c->H * Hd + (long)(g * G + hh) * Hd;
            __m512 total = _mm512_set1_ps(l[r]);
            for (int d = 0; d < Hd; d += 16)
                _mm512_storeu_ps(dst + d, l[r] > 0 ? _mm512_div_ps(_mm512_load_ps(w->o + r * Hd + d), total) : _mm512_setzero_ps());
        }
}

#elif defined(__AVX2__) && defined(__FMA__)

/* The same at AVX2's width (nearly every x86 CPU in use: Intel's laptops and desktops, AMD before Zen
 * 4), where PyTorch's tiles of 32 queries had run it: the same tasks and blocks of keys, the products
 * 6 queries by 16 columns at a time (rows_times_16: 12 accumulators), e^x by exp8, and the masks as
 * vectors (AVX2 has no mask registers). */

#define ROWS 6 /* queries per pass of the two products: 12 accumulators */

/* Keys kb .. kb + KEYS - 1 (zeros from `count` on) of key/value head g of sequence b -> kt [Hd][KEYS] */
static void transposed_keys(const Call *c, int b, int g, int kb, int count, float *kt) {
    const float *k = c->k + b * c->kv_b + g * c->kv_h + (long)kb * c->kv_t;
    for (int d0 = 0; d0 < c->Hd; d0 += 8)
        for (int group = 0; group < KEYS / 8; group++) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) {
                int key = 8 * group + j;
                r[j] = key < count ? _mm256_loadu_ps(k + key * c->kv_t + d0) : _mm256_setzero_ps();
            }
            transpose8(r, r); /* r[dd]: dim d0 + dd of the 8 keys */
            for (int dd = 0; dd < 8; dd++) _mm256_store_ps(kt + (d0 + dd) * KEYS + 8 * group, r[dd]);
        }
}

/* 16 columns (keys c0 .. c0 + 15, or dims d0 .. d0 + 15) of n rows of a product: S or P V */
static inline __attribute__((always_inline)) void sixteen(const float *a, long a_stride, const float *b, long b_stride, int J,
                                                          int n, float *dst, long dst_stride) {
    __m256 acc[ROWS][2];
    rows_times_16(a, a_stride, b, b_stride, J, n, acc);
    for (int i = 0; i < n; i++) {
        _mm256_storeu_ps(dst + i * dst_stride, acc[i][0]);
        _mm256_storeu_ps(dst + i * dst_stride + 8, acc[i][1]);
    }
}

typedef void SixteenFn(const float *a, long a_stride, const float *b, long b_stride, int J, float *dst, long dst_stride);
#define SIXTEEN(N)                                                                                         \
    static void sixteen_##N(const float *a, long a_stride, const float *b, long b_stride, int J, float *dst, \
                            long dst_stride) {                                                             \
        sixteen(a, a_stride, b, b_stride, J, N, dst, dst_stride);                                          \
    }
SIXTEEN(1) SIXTEEN(2) SIXTEEN(3) SIXTEEN(4) SIXTEEN(5) SIXTEEN(6)
static SixteenFn *const SIXTEEN_FOR[ROWS] = {sixteen_1, sixteen_2, sixteen_3, sixteen_4, sixteen_5, sixteen_6};

/* The largest of v's 8 lanes */
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* Which of keys kb + 8j .. + 7 query row `allow` (NULL: all) may see, among the first `count` of the
 * block, as lanes of all ones: the mask bytes are read only below `count` (the row ends at `end`) */
static inline __m256 seen8(const uint8_t *allow, int j, int count) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i real = _mm256_cmpgt_epi32(_mm256_set1_epi32(count - 8 * j), lane);
    if (!allow) return _mm256_castsi256_ps(real);
    uint64_t bytes = 0;
    if (count >= 8 * j + 8)
        memcpy(&bytes, allow + 8 * j, 8);
    else
        for (int i = 0; i < count - 8 * j; i++) bytes |= (uint64_t)allow[8 * j + i] << (8 * i);
    __m256i byte = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes));
    return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpeq_epi32(byte, _mm256_setzero_si256()), real));
}

/* The AVX-512 attend's tasks and rows, at this width */
static void attend(const Call *c, int b, int g, int r0, int stop, Scratch *w) {
    int Hd = c->Hd, G = c->H / c->K, rows = c->T - r0 < QUERIES ? c->T - r0 : QUERIES;
    const float *v = c->v + b * c->kv_b + g * c->kv_h;
    const uint8_t *mask = c->allowed ? c->allowed + ((long)(c->mask_rows > 1 ? b : 0) * c->T + r0) * c->end : NULL;
    __m256 vscale = _mm256_set1_ps(1.0f / sqrtf((float)Hd)), minus_inf = _mm256_set1_ps(-INFINITY);
    float *m = w->m, *l = w->l, *alpha = w->alpha;
    for (int r = 0; r < G * QUERIES; r++) m[r] = -INFINITY, l[r] = 0.0f;
    memset(w->o, 0, sizeof(float) * G * QUERIES * Hd);
    for (int kb = 0; kb < stop; kb += KEYS) {
        int count = c->end - kb < KEYS ? c->end - kb : KEYS; /* keys past `end` are zeros, never seen */
        transposed_keys(c, b, g, kb, count, w->kt);
        for (int hh = 0; hh < G; hh++) {
            const float *q = c->q + b * c->q_b + r0 * c->q_t + (long)(g * G + hh) * Hd;
            for (int i0 = 0; i0 < rows; i0 += ROWS) {
                int n = rows - i0 < ROWS ? rows - i0 : ROWS;
                for (int c0 = 0; c0 < KEYS; c0 += 16)
                    SIXTEEN_FOR[n - 1](q + i0 * c->q_t, c->q_t, w->kt + c0, KEYS, Hd, w->S + (hh * QUERIES + i0) * KEYS + c0, KEYS);
            }
            for (int i = 0; i < rows; i++) { /* P = e^(s / sqrt(Hd) - max) where seen, 0 elsewhere, into S */
                int r = hh * QUERIES + i;
                float *s = w->S + r * KEYS;
                __m256 sv[KEYS / 8], seen[KEYS / 8], top = minus_inf;
                for (int j = 0; j < KEYS / 8; j++) {
                    sv[j] = _mm256_mul_ps(_mm256_loadu_ps(s + 8 * j), vscale);
                    seen[j] = seen8(mask ? mask + (long)i * c->end + kb : NULL, j, count);
                    top = _mm256_max_ps(top, _mm256_blendv_ps(minus_inf, sv[j], seen[j]));
                }
                float best = hmax8(top), now = best > m[r] ? best : m[r];
                /* nothing seen yet (now = -inf): 1; a first finite maximum after -inf: e^-inf = 0 */
                alpha[r] = now == -INFINITY ? 1.0f : m[r] == -INFINITY ? 0.0f : _mm256_cvtss_f32(exp8(_mm256_set1_ps(m[r] - now)));
                m[r] = now;
                __m256 total = _mm256_setzero_ps();
                for (int j = 0; j < KEYS / 8; j++) {
                    __m256 p = _mm256_and_ps(seen[j], exp8(_mm256_sub_ps(sv[j], _mm256_set1_ps(now))));
                    total = _mm256_add_ps(total, p);
                    _mm256_storeu_ps(s + 8 * j, p);
                }
                l[r] = l[r] * alpha[r] + hsum8(total);
            }
            for (int d0 = 0; d0 < Hd; d0 += 16)
                for (int i0 = 0; i0 < rows; i0 += ROWS) {
                    int n = rows - i0 < ROWS ? rows - i0 : ROWS; /* keys past count have weight 0 and are not read */
                    SIXTEEN_FOR[n - 1](w->S + (hh * QUERIES + i0) * KEYS, KEYS, v + (long)kb * c->kv_t + d0, c->kv_t, count,
                                       w->pv + (hh * QUERIES + i0) * Hd + d0, Hd);
                }
            for (int i = 0; i < rows; i++) { /* o = o e^(old max - new max) + P V */
                int r = hh * QUERIES + i;
                __m256 a = _mm256_set1_ps(alpha[r]);
                for (int d = 0; d < Hd; d += 8)
                    _mm256_store_ps(w->o + r * Hd + d, _mm256_fmadd_ps(_mm256_load_ps(w->o + r * Hd + d), a, _mm256_load_ps(w->pv + r * Hd + d)));
            }
        }
    }
    for (int hh = 0; hh < G; hh++)
        for (int i = 0; i < rows; i++) { /* o / l (no key seen: 0) */
            int r = hh * QUERIES + i;
            float *dst = c->out + ((long)b * c->T + r0 + i) * c->H * Hd + (long)(g * G + hh) * Hd;
            __m256 total = _mm256_set1_ps(l[r]);
            for (int d = 0; d < Hd; d += 8)
                _mm256_storeu_ps(dst + d, l[r] > 0 ? _mm256_div_ps(_mm256_load_ps(w->o + r * Hd + d), total) : _mm256_setzero_ps());
        }
}

#endif

#if KERNELS_AVX512 || (defined(__AVX2__) && defined(__FMA__))

int prompt_attention_f32(const float *q, long q_b, long q_t, const float *k, const float *v, long kv_b, long kv_h,
                         long kv_t, int B, int T, int H, int K, int Hd, int end, const uint8_t *allowed, int mask_rows,
                         float *out) {
    if (Hd % 32 || Hd <= 0 || K <= 0 || H % K || end <= 0) return STATUS_BAD_WIDTH;
    Call c = {q, k, v, q_b, q_t, kv_b, kv_h, kv_t, B, T, H, K, Hd, end, allowed, mask_rows, out};
    int blocks = (T + QUERIES - 1) / QUERIES;
    size_t rows = (size_t)(H / K) * QUERIES; /* a task's rows: every query head of one key/value head */
    int status = STATUS_OK;
#pragma omp parallel
    {
        Scratch w = {aligned_alloc(64, sizeof(float) * Hd * KEYS), aligned_alloc(64, sizeof(float) * rows * KEYS),
                     aligned_alloc(64, sizeof(float) * rows * Hd),  aligned_alloc(64, sizeof(float) * rows * Hd),
                     malloc(sizeof(float) * rows),                  malloc(sizeof(float) * rows),
                     malloc(sizeof(float) * rows)};
        if (!w.kt || !w.S || !w.o || !w.pv || !w.m || !w.l || !w.alpha) {
#pragma omp atomic write
            status = STATUS_OUT_OF_MEMORY;
        }
#pragma omp barrier
        if (status == STATUS_OK) { /* every thread sees the same status here and takes the same loop */
#pragma omp for collapse(3) schedule(dynamic)
            for (int b = 0; b < B; b++)
                for (int g = 0; g < K; g++) /* a key/value head's query heads together: K^T transposed once for them */
                    for (int qb = 0; qb < blocks; qb++) {
                        int r0 = qb * QUERIES, stop = 0; /* one past the last key a query of the task sees */
                        for (int t = r0; t < T && t < r0 + QUERIES; t++) {
                            const uint8_t *row = allowed ? allowed + ((long)(mask_rows > 1 ? b : 0) * T + t) * end : NULL;
                            int j = end;
                            if (row)
                                while (j > stop && !row[j - 1]) j--;
                            if (j > stop) stop = j;
                        }
                        attend(&c, b, g, r0, stop, &w);
                    }
        }
        free(w.kt);
        free(w.S);
        free(w.o);
        free(w.pv);
        free(w.m);
        free(w.l);
        free(w.alpha);
    }
    return status;
}

#else

int prompt_attention_f32(const float *q, long q_b, long q_t, const float *k, const float *v, long kv_b, long kv_h,
                         long kv_t, int B, int T, int H, int K, int Hd, int end, const uint8_t *allowed, int mask_rows,
                         float *out) {
    (void)q; (void)q_b; (void)q_t; (void)k; (void)v; (void)kv_b; (void)kv_h; (void)kv_t; (void)B; (void)T; (void)H;
    (void)K; (void)Hd; (void)end; (void)allowed; (void)mask_rows; (void)out;
    return STATUS_NO_AVX2;
}

#endif
