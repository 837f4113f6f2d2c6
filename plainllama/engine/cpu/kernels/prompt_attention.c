/* Attention for prompts in bfloat16: out = softmax(q k^T / sqrt(Hd)) v, T queries per sequence
 * against its keys 0 .. end-1, with a boolean mask of which keys each query may see; on AMX's tiles,
 * or with AVX-512 BF16 on CPUs without AMX.
 *
 * Why this file exists: PyTorch's fused attention has to be called in tiles of 32 queries so that a
 * query's numbers do not depend on the other queries in the call (decode_block.query_tiles_attention),
 * and that took 8 ms a layer at 512 tokens on a 1B-shaped model (0.13 TFLOP/s), the largest cost after
 * the products once those ran on AMX (amx_matmul.c): an eighth of a prompt's time.
 *
 * How: flash attention (one pass over the keys with a running maximum and sum per query, so the
 * scores of a query against all keys are never held at once), 32 queries by 32 keys at a time:
 *   scores S [32 queries x 32 keys] = Q K^T: Q in A tiles (16 queries x 32 head dims, bfloat16), K^T
 *            in B tiles (pairs of head dims x 16 keys: 16 key rows transposed as 32-bit words, as
 *            amx_matmul.c does with weight rows);
 *   softmax  per query in AVX-512: scale, mask, the new maximum, e^(s - max) (exp16.h), the sum;
 *            the weights P rounded to bfloat16 into A tiles (16 queries x 32 keys);
 *   P V      into C tiles (16 queries x 16 head dims) with V in B tiles (pairs of keys x 16 dims);
 *            then o = o * e^(old max - new max) + P V in AVX-512 (tiles cannot be scaled by row).
 * Without AMX the two products run on the same tiles in memory with vdpbf16ps: a row of a B tile is
 * one pair (of dims, or of keys) for 16 columns, multiplied by that pair of a query's, broadcast.
 * Precision: q, k, v and P in bfloat16 with float32 sums, as PyTorch's bfloat16 attention.
 *
 * A query's result is the same in any company, bit for bit: both ways compute each query's row of a
 * product from that query alone; the keys go in blocks of 32 counted from key 0 (not from the first query); and a
 * block in which a query may see no key changes nothing for it (its maximum stays, its weights are 0,
 * o * 1 + 0 = o). So the prompt's queries split into chunks (the server's prefix cache, chunked
 * prompts) give the same numbers as the whole prompt (tests/test_continuous.py).
 *
 * Keys and values are converted to tiles once per call and key/value head, SLAB keys at a time (the
 * memory for that: 4 bytes per key and head dimension for each key/value head), and shared by the
 * query heads of the group. A query whose mask row allows nothing gets zeros (PyTorch gives NaN;
 * model.causal_mask never makes such a row). */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plainllama.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__linux__)

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#include "amx.h"
#include "exp16.h"

#define QUERIES 32 /* queries per task: two A tiles of 16 */
#define KEYS 32    /* keys per step of the running softmax, in blocks from key 0 */
#define SLAB 2048  /* keys converted to tiles at a time */

/* 16 keys (rows `stride` floats apart, the first `count` real, the rest zeros), head dims 0..31 ->
 * the B tile of Q K^T: row r holds, for each key n, the bfloat16 pair of dims 2r and 2r+1 */
static void key_tile(const float *k, long stride, int count, uint32_t *tile) {
    __m512i r[16];
    for (int n = 0; n < 16; n++)
        r[n] = n < count ? pair_bf16(_mm512_loadu_ps(k + n * stride), _mm512_loadu_ps(k + n * stride + 16))
                         : _mm512_setzero_si512();
    transpose16(r);
    for (int i = 0; i < 16; i++) _mm512_store_si512(tile + 16 * i, r[i]);
}

/* 32 keys' values (rows `stride` floats apart, the first `count` real), head dims 0..15 -> the B tile
 * of P V: row r holds, for each dim, the bfloat16 pair of keys 2r and 2r+1 */
static void value_tile(const float *v, long stride, int count, uint32_t *tile) {
    for (int r = 0; r < 16; r++) {
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
        if (2 * r < count) even = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + 2 * r * stride)));
        if (2 * r + 1 < count)
            odd = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + (2 * r + 1) * stride)));
        _mm512_store_si512(tile + 16 * r, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
}

typedef struct {
    const float *q, *k, *v;
    long q_b, q_t, kv_b, kv_h, kv_t;
    int B, T, H, K, Hd, end;
    const uint8_t *allowed;
    int mask_rows;
    float *out;
    int amx; /* the products on the tiles (else with vdpbf16ps) */
} Call;

/* Per thread: Q of the task in A tiles, the scores, P in A tiles, P V, o, each query's e^(old - new max) */
typedef struct {
    uint16_t *qa, *pa;
    float *scores, *pv, *o, alpha[QUERIES];
} Scratch;

/* Where query t of sequence b, head h, puts its Hd numbers (o, and in the end the result) */
static inline float *out_row(const Call *c, int b, int h, int t) {
    return c->out + ((long)b * c->T + t) * c->H * c->Hd + (long)h * c->Hd;
}

/* ---- the two products of a block of 32 keys, on the tiles or on the vector units --------------- */
/* qa: Q of 32 queries as A tiles (tile (g, s) at qa + (g * steps + s) * 512, row i of it query
 * 16g + i, 32 bfloat16 = the pairs of head dims 32s .. 32s+31); keys: the block's K^T tiles (tile (n, s),
 * n = 0, 1 its two groups of 16 keys, at keys + (n * steps + s) * 256 dwords; row r = dims pair r);
 * S [32 queries][32 keys] float32 */
#if HAVE_AMX
static void amx_scores(const uint16_t *qa, const uint32_t *keys, int steps, float *S) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int s = 0; s < steps; s++) {
        _tile_loadd(4, qa + s * 512, 64);
        _tile_loadd(5, qa + (steps + s) * 512, 64);
        _tile_loadd(6, keys + (size_t)s * 256, 64);
        _tile_loadd(7, keys + (size_t)(steps + s) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, S, 128);
    _tile_stored(1, S + 16, 128);
    _tile_stored(2, S + 16 * 32, 128);
    _tile_stored(3, S + 16 * 32 + 16, 128);
}
#endif

/* The same with AVX-512 BF16 (CPUs without AMX: AMD Zen 4 and 5, Intel Cooper Lake): a row of a K^T
 * tile is one dims pair of 16 keys, so vdpbf16ps against that pair of a query's dims, broadcast, adds
 * 16 keys' terms at once, with no sums across lanes; each row loaded serves 4 queries. Queries past
 * `rows` (up to the next multiple of 4) are computed from zeros and never read. */
static void vector_scores(const uint16_t *qa, const uint32_t *keys, int steps, int rows, float *S) {
    for (int i0 = 0; i0 < rows; i0 += 4) {
        __m512 lo[4], hi[4];
        for (int i = 0; i < 4; i++) lo[i] = hi[i] = _mm512_setzero_ps();
        for (int s = 0; s < steps; s++) {
            const uint32_t *k_lo = keys + (size_t)s * 256, *k_hi = keys + (size_t)(steps + s) * 256;
            const uint32_t *q = (const uint32_t *)(qa + ((i0 / 16) * steps + s) * 512 + 32 * (i0 % 16)); /* 4 rows of 16 pairs */
            for (int r = 0; r < 16; r++) {
                __m512bh kl = (__m512bh)_mm512_load_si512(k_lo + 16 * r), kh = (__m512bh)_mm512_load_si512(k_hi + 16 * r);
                for (int i = 0; i < 4; i++) {
                    __m512bh pair = (__m512bh)_mm512_set1_epi32((int)q[16 * i + r]);
                    lo[i] = _mm512_dpbf16_ps(lo[i], kl, pair);
                    hi[i] = _mm512_dpbf16_ps(hi[i], kh, pair);
                }
            }
        }
        for (int i = 0; i < 4; i++) {
            _mm512_storeu_ps(S + 32 * (i0 + i), lo[i]);
            _mm512_storeu_ps(S + 32 * (i0 + i) + 16, hi[i]);
        }
    }
}

/* pa: the weights P of 32 queries as two A tiles (row i: query i's 32 bfloat16 weights, in pairs of
 * keys); values: the block's V tiles (tile d at values + d * 256 dwords: head dims 16d .. 16d+15, row r =
 * keys 2r and 2r+1); pv [32 queries][Hd] float32 */
#if HAVE_AMX
static void amx_weighted_values(const uint16_t *pa, const uint32_t *values, int Hd, float *pv) {
    _tile_loadd(4, pa, 64);
    _tile_loadd(5, pa + 512, 64);
    for (int dg = 0; dg < Hd / 16; dg += 2) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        _tile_loadd(6, values + (size_t)dg * 256, 64);
        _tile_loadd(7, values + (size_t)(dg + 1) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_stored(0, pv + 16 * dg, Hd * 4);
        _tile_stored(1, pv + 16 * (dg + 1), Hd * 4);
        _tile_stored(2, pv + 16 * Hd + 16 * dg, Hd * 4);
        _tile_stored(3, pv + 16 * Hd + 16 * (dg + 1), Hd * 4);
    }
}
#endif

/* The same with AVX-512 BF16: a row of a V tile is one pair of keys for 16 dims, against that pair of
 * a query's weights, broadcast; each row loaded serves 4 queries. Queries past `rows` (up to the next
 * multiple of 4) are computed from zeros and never read. */
static void vector_weighted_values(const uint16_t *pa, const uint32_t *values, int Hd, int rows, float *pv) {
    for (int i0 = 0; i0 < rows; i0 += 4) {
        const uint32_t *p = (const uint32_t *)(pa + (i0 / 16) * 512 + 32 * (i0 % 16)); /* 4 rows of 16 pairs */
        for (int dg = 0; dg < Hd / 16; dg += 2) {
            const uint32_t *v0 = values + (size_t)dg * 256, *v1 = v0 + 256;
            __m512 a[4], b[4];
            for (int i = 0; i < 4; i++) a[i] = b[i] = _mm512_setzero_ps();
            for (int r = 0; r < 16; r++) {
                __m512bh x0 = (__m512bh)_mm512_load_si512(v0 + 16 * r), x1 = (__m512bh)_mm512_load_si512(v1 + 16 * r);
                for (int i = 0; i < 4; i++) {
                    __m512bh pair = (__m512bh)_mm512_set1_epi32((int)p[16 * i + r]);
                    a[i] = _mm512_dpbf16_ps(a[i], x0, pair);
                    b[i] = _mm512_dpbf16_ps(b[i], x1, pair);
                }
            }
            for (int i = 0; i < 4; i++) {
                _mm512_storeu_ps(pv + (i0 + i) * Hd + 16 * dg, a[i]);
                _mm512_storeu_ps(pv + (i0 + i) * Hd + 16 * (dg + 1), b[i]);
            }
        }
    }
}

/* Queries r0 .. r0+31 of head h of sequence b against the keys k0 .. stop-1 (the slab's tiles kt, vt:
 * this key/value head's, from key k0). Running maxima m, sums l, o in out, and the result there when
 * `final` (no query of the block sees a key past stop). */
static void attend(const Call *c, int b, int h, int r0, int k0, int stop, int final, const uint32_t *kt,
                   const uint32_t *vt, float *m, float *l, Scratch *w) {
    int Hd = c->Hd, steps = Hd / 32, rows = c->T - r0 < QUERIES ? c->T - r0 : QUERIES;
    float scale = 1.0f / sqrtf((float)Hd);
    for (int i = 0; i < QUERIES; i++) { /* Q: tile (i / 16, s) at qa + ((i / 16) * steps + s) * 512 */
        const float *src = c->q + b * c->q_b + (r0 + i) * c->q_t + (long)h * Hd;
        for (int s = 0; s < steps; s++) {
            __m512i v = i < rows ? pair_bf16(_mm512_loadu_ps(src + 32 * s), _mm512_loadu_ps(src + 32 * s + 16)) : _mm512_setzero_si512();
            _mm512_store_si512(w->qa + ((i / 16) * steps + s) * 512 + 32 * (i % 16), v);
        }
    }
    memset(w->pa, 0, 2 * 512 * sizeof(uint16_t)); /* rows past the prompt stay zero */
    /* o here, not in `out`, whose rows of one head lie H Hd floats apart: 32 of them fall in the same
     * few sets of the L1 cache (measured: a third of the time went to updating o in place) */
    for (int i = 0; i < rows; i++) /* from the slab before, if any */
        if (k0 == 0)
            memset(w->o + i * Hd, 0, sizeof(float) * Hd);
        else
            memcpy(w->o + i * Hd, out_row(c, b, h, r0 + i), sizeof(float) * Hd);
    const uint8_t *mask = c->allowed ? c->allowed + ((long)(c->mask_rows > 1 ? b : 0) * c->T + r0) * c->end : NULL;
    for (int kb = k0; kb < stop; kb += KEYS) {
        int j = (kb - k0) / KEYS; /* the block within the slab */
        float *S = w->scores; /* [32 queries][32 keys] */
        const uint32_t *keys = kt + (size_t)2 * j * steps * 256;
#if HAVE_AMX
        if (c->amx)
            amx_scores(w->qa, keys, steps, S);
        else
#endif
            vector_scores(w->qa, keys, steps, rows, S);

        int valid = c->end - kb < KEYS ? c->end - kb : KEYS; /* keys past `end` are zeros, never seen */
        __mmask32 real = valid == 32 ? 0xFFFFFFFFu : ((1u << valid) - 1), seen[QUERIES];
        __m512 minus_inf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
        float best[QUERIES] __attribute__((aligned(64))), sums[QUERIES] __attribute__((aligned(64)));
        for (int i = rows; i < QUERIES; i++) best[i] = -INFINITY, seen[i] = 0; /* past the prompt */
        for (int i = 0; i < rows; i++) { /* each query's scores scaled, and their maximum where seen */
            seen[i] = real;
            if (mask)
                seen[i] = _mm256_mask_cmpneq_epi8_mask(real, _mm256_maskz_loadu_epi8(real, mask + (long)i * c->end + kb),
                                                       _mm256_setzero_si256());
            __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(S + 32 * i), vscale), s1 = _mm512_mul_ps(_mm512_loadu_ps(S + 32 * i + 16), vscale);
            _mm512_storeu_ps(S + 32 * i, s0);
            _mm512_storeu_ps(S + 32 * i + 16, s1);
            best[i] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(minus_inf, (__mmask16)seen[i], s0),
                                                         _mm512_mask_mov_ps(minus_inf, (__mmask16)(seen[i] >> 16), s1)));
        }
        for (int i = 0; i < QUERIES; i += 16) { /* the new maxima, and e^(old - new) to rescale by */
            __m512 old = _mm512_loadu_ps(m + i), now = _mm512_max_ps(old, _mm512_load_ps(best + i));
            /* old = now = -inf (nothing seen yet): 1; old = -inf below a finite now: e^-200 = 0 */
            __m512 alpha = exp16(_mm512_max_ps(_mm512_sub_ps(old, now), _mm512_set1_ps(-200.0f)));
            alpha = _mm512_mask_mov_ps(alpha, _mm512_cmp_ps_mask(now, minus_inf, _CMP_EQ_OQ), _mm512_set1_ps(1.0f));
            _mm512_storeu_ps(m + i, now);
            _mm512_storeu_ps(w->alpha + i, alpha);
        }
        for (int i = 0; i < rows; i++) { /* P = e^(s - max) where seen, 0 elsewhere, to bfloat16 */
            __mmask16 lo = (__mmask16)seen[i], hi = (__mmask16)(seen[i] >> 16);
            __m512 now = _mm512_set1_ps(m[i]);
            __m512 p0 = _mm512_maskz_mov_ps(lo, exp16(_mm512_sub_ps(_mm512_loadu_ps(S + 32 * i), now)));
            __m512 p1 = _mm512_maskz_mov_ps(hi, exp16(_mm512_sub_ps(_mm512_loadu_ps(S + 32 * i + 16), now)));
            sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
            _mm512_store_si512(w->pa + (i / 16) * 512 + 32 * (i % 16), pair_bf16(p0, p1));
        }
        for (int i = 0; i < rows; i++) l[i] = l[i] * w->alpha[i] + sums[i];

        float *pv = w->pv; /* [32 queries][Hd] */
        const uint32_t *values = vt + (size_t)j * (Hd / 16) * 256;
#if HAVE_AMX
        if (c->amx)
            amx_weighted_values(w->pa, values, Hd, pv);
        else
#endif
            vector_weighted_values(w->pa, values, Hd, rows, pv);
        for (int i = 0; i < rows; i++) {
            float *o = w->o + i * Hd;
            __m512 alpha = _mm512_set1_ps(w->alpha[i]);
            for (int d = 0; d < Hd; d += 16)
                _mm512_store_ps(o + d, _mm512_fmadd_ps(_mm512_load_ps(o + d), alpha, _mm512_load_ps(pv + i * Hd + d)));
        }
    }
    for (int i = 0; i < rows; i++) { /* o, or after the queries' last key the result o / l (no key seen: 0) */
        float *dst = out_row(c, b, h, r0 + i);
        __m512 total = _mm512_set1_ps(l[i]);
        for (int d = 0; d < Hd; d += 16) {
            __m512 o = _mm512_load_ps(w->o + i * Hd + d);
            _mm512_storeu_ps(dst + d, !final ? o : l[i] > 0 ? _mm512_div_ps(o, total) : _mm512_setzero_ps());
        }
    }
}

int prompt_attention_engine(void) { return HAVE_AMX && amx_available() ? 2 : 1; }

/* q: query t of sequence b, head h at q + b q_b + t q_t + h Hd; k, v: key j of sequence b, key/value
 * head g at k + b kv_b + g kv_h + j kv_t (head dims contiguous), j < end; allowed: [mask_rows, T, end]
 * bytes, mask_rows 1 (shared) or B, or NULL (every key); out [B, T, H * Hd].
 * Returns STATUS_OK, STATUS_OUT_OF_MEMORY or STATUS_BAD_WIDTH (Hd not a multiple of 32, or H not of K). */
int prompt_attention(const float *q, long q_b, long q_t, const float *k, const float *v, long kv_b, long kv_h,
                     long kv_t, int B, int T, int H, int K, int Hd, int end, const uint8_t *allowed, int mask_rows,
                     float *out) {
    if (Hd % 32 || Hd <= 0 || K <= 0 || H % K) return STATUS_BAD_WIDTH;
    Call c = {q, k, v, q_b, q_t, kv_b, kv_h, kv_t, B, T, H, K, Hd, end, allowed, mask_rows, out,
              prompt_attention_engine() == 2};
    int blocks = (T + QUERIES - 1) / QUERIES, steps = Hd / 32;
    long slab = end < SLAB ? (end + KEYS - 1) / KEYS * KEYS : SLAB;
    size_t pairs = (size_t)B * K, rows = (size_t)B * H * blocks * QUERIES; /* m, l: per head, T rounded up */
    int *reach = malloc(sizeof(int) * (size_t)B * blocks); /* one past the last key a block of queries sees */
    float *m = malloc(sizeof(float) * rows), *l = malloc(sizeof(float) * rows);
    uint32_t *kt = aligned_alloc(64, pairs * slab * Hd * 2 + 64), *vt = aligned_alloc(64, pairs * slab * Hd * 2 + 64);
    int status = reach && m && l && kt && vt ? STATUS_OK : STATUS_OUT_OF_MEMORY;
    int last = 0; /* one past the last key any query sees */
    if (status == STATUS_OK) {
        for (size_t i = 0; i < rows; i++) m[i] = -INFINITY, l[i] = 0.0f;
        for (int b = 0; b < B; b++)
            for (int qb = 0; qb < blocks; qb++) {
                int r = 0;
                for (int t = qb * QUERIES; t < T && t < (qb + 1) * QUERIES; t++) {
                    const uint8_t *row = allowed ? allowed + ((long)(mask_rows > 1 ? b : 0) * T + t) * end : NULL;
                    int j = end;
                    if (row)
                        while (j > r && !row[j - 1]) j--;
                    if (j > r) r = j;
                }
                reach[b * blocks + qb] = r;
                if (r > last) last = r;
            }
    }
#pragma omp parallel if (status == STATUS_OK)
    {
        Scratch w = {aligned_alloc(64, (size_t)2 * steps * 1024), aligned_alloc(64, 2048), aligned_alloc(64, 4096),
                     aligned_alloc(64, (size_t)QUERIES * Hd * sizeof(float)),
                     aligned_alloc(64, (size_t)QUERIES * Hd * sizeof(float)), {0}};
        if (!w.qa || !w.pa || !w.scores || !w.pv || !w.o) {
#pragma omp atomic write
            status = STATUS_OUT_OF_MEMORY;
        }
#pragma omp barrier
        if (status == STATUS_OK) { /* every thread sees the same status here and takes the same loops */
#if HAVE_AMX
            if (c.amx) _tile_loadconfig(&TILES);
#endif
#pragma omp for collapse(2) schedule(static)
            for (int b = 0; b < B; b++) /* queries that see no key at all */
                for (int qb = 0; qb < blocks; qb++)
                    for (int t = qb * QUERIES; t < T && t < (qb + 1) * QUERIES && !reach[b * blocks + qb]; t++)
                        memset(out + ((long)b * T + t) * H * Hd, 0, sizeof(float) * H * Hd);
            for (int k0 = 0; k0 < last; k0 += slab) {
                int length = last - k0 < slab ? (last - k0 + KEYS - 1) / KEYS * KEYS : (int)slab;
#pragma omp for collapse(2) schedule(static)
                for (size_t p = 0; p < pairs; p++)
                    for (int kg = 0; kg < length / 16; kg++) {
                        int b = p / K, g = p % K, first = k0 + 16 * kg, count = end - first < 16 ? end - first : 16;
                        const float *src = k + b * kv_b + g * kv_h + first * kv_t;
                        for (int s = 0; s < steps; s++)
                            key_tile(src + 32 * s, kv_t, count, kt + ((p * (slab / 16) + kg) * steps + s) * 256);
                    }
#pragma omp for collapse(2) schedule(static)
                for (size_t p = 0; p < pairs; p++)
                    for (int kb = 0; kb < length / KEYS; kb++) {
                        int b = p / K, g = p % K, first = k0 + KEYS * kb, count = end - first < KEYS ? end - first : KEYS;
                        const float *src = v + b * kv_b + g * kv_h + first * kv_t;
                        for (int dg = 0; dg < Hd / 16; dg++)
                            value_tile(src + 16 * dg, kv_t, count, vt + ((p * (slab / KEYS) + kb) * (Hd / 16) + dg) * 256);
                    }
#pragma omp for collapse(3) schedule(dynamic)
                for (int b = 0; b < B; b++)
                    for (int h = 0; h < H; h++)
                        for (int qb = 0; qb < blocks; qb++) {
                            int stop = reach[b * blocks + qb] < k0 + length ? reach[b * blocks + qb] : k0 + length;
                            if (stop <= k0) continue;
                            size_t p = (size_t)b * K + h / (H / K);
                            size_t at = ((size_t)b * H + h) * blocks * QUERIES + qb * QUERIES;
                            attend(&c, b, h, qb * QUERIES, k0, stop, stop == reach[b * blocks + qb], kt + p * (slab / 16) * steps * 256,
                                   vt + p * (slab / KEYS) * (Hd / 16) * 256, m + at, l + at, &w);
                        }
            }
#if HAVE_AMX
            if (c.amx) _tile_release();
#endif
        }
        free(w.qa);
        free(w.pa);
        free(w.scores);
        free(w.pv);
        free(w.o);
    }
    free(reach);
    free(m);
    free(l);
    free(kt);
    free(vt);
    return status;
}

#else

int prompt_attention_engine(void) { return 0; }

int prompt_attention(const float *q, long q_b, long q_t, const float *k, const float *v, long kv_b, long kv_h,
                     long kv_t, int B, int T, int H, int K, int Hd, int end, const uint8_t *allowed, int mask_rows,
                     float *out) {
    (void)q; (void)q_b; (void)q_t; (void)k; (void)v; (void)kv_b; (void)kv_h; (void)kv_t; (void)B; (void)T; (void)H;
    (void)K; (void)Hd; (void)end; (void)allowed; (void)mask_rows; (void)out;
    return STATUS_NO_BF16;
}

#endif
