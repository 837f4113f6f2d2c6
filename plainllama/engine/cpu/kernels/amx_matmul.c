/* Matrix products for prompts (many rows of activations) on CPUs with AMX, Intel's matrix units:
 * out [M, N] float32 = x [M, K] float32 times W [N, K]^T, W in any layout (plainllama.h's Layout).
 *
 * Why this file exists: a prompt of 512 tokens multiplies every weight by 512 rows, so it is bound
 * by arithmetic, not by memory. PyTorch's route was to unpack a slice of W to bfloat16, let oneDNN
 * reorder that slice into its own tiled layout and multiply, then convert the bfloat16 result back
 * to float32: three passes over every weight and one over every output besides the product (measured
 * on a 1B-shaped Q4_0 model: products 0.78 s + unpacking 0.2 s + output copies 0.15 s of a 1.5 s
 * prompt). Here each block of W is unpacked once, straight into the tile layout AMX reads, and the
 * products accumulate in float32 tiles stored straight into `out`.
 *
 * AMX in brief: eight tile registers of up to 16 rows x 64 bytes. TDPBF16PS C, A, B adds to C (16 x 16
 * float32) the product of A (16 rows x 32 bfloat16) and B (32 x 16 bfloat16, stored as 16 rows of 16
 * *pairs*: row r holds, for each of 16 columns n, the two values at k = 2r and 2r+1). One instruction
 * is 16 x 16 x 32 multiply-adds; a core does one every 16 cycles.
 *   A tiles: 16 rows of x, 32 consecutive k each. x is converted to bfloat16 once and laid out so that
 *            every A tile is 1 KB of contiguous memory (`pack_rows`).
 *   B tiles: 16 output features n, 32 k. Row r of the tile is dword r (the bfloat16 pair at k = 2r)
 *            of each of the 16 weight rows: a 16 x 16 transpose of 32-bit words (`pack_panels`).
 * Each step loads two A tiles and two B tiles and does four products (a 32 x 32 block of out).
 *
 * Unpacking: q4 with a scale per block, q8 and the 16-bit layouts straight from their blocks
 * (block_bf16; q4's and q8's whole groups, held in the decode loops' order, put back in GGUF's order
 * first); the others (K-quant scales, q5's fifth bits, Q6_K's, Q3_K's and Q2_K's regrouped values)
 * through the row unpacking the oneDNN path uses (unpack.h), 8 k-steps of 16 rows at a time, then
 * transposed. (q4 through that staging measured 0.99-1.01x at 512 rows, but 0.90x at 64.)
 * Before they came here (measured on a Xeon with AMX, 2 cores, 1B shapes, 512 rows): Q4_K, Q5_K and
 * Q6_K matrices went the oneDNN way at 0.67-0.68 TFLOP/s, against 1.4-1.5 for q4, q8 and f16 here.
 *
 * Blocking: a thread takes BLOCK_PANELS panels of 16 output features and unpacks them K_CHUNK k-steps
 * at a time (1 MB: stays in the core's 2 MB L2). Then, for every block of 32 rows of x, A_STEPS
 * k-steps of its A tiles (16 KB) serve each pair of panels in turn while they stay in L1, with the
 * four C tiles of the pair kept between runs in a small buffer of the thread's (`sums`, in L1; per
 * block of rows when K takes several chunks). Why: a tile product takes 16 cycles, and its 2 KB of
 * loads came from L2 for both A and B, at ~25 bytes a cycle from L2 to L1 (measured: a loop of
 * tile loads and products over 1 MB of tiles ran at 1.1-1.3 TFLOP/s on a core, with one operand in
 * L1 at 2.7, with both in L1 at 3.0). Keeping A in L1 halves what comes from L2, and 16 panels a
 * block rather than 8 halve how often x itself comes back from L3 (each pass over the rows re-reads
 * all of x). Tile stores cost little into L1 but much into `out`, whose rows lie N floats apart (a
 * multiple of 4 KB falls in the same cache sets): the finished sums also go through `sums`, then to
 * `out` a row at a time with vector stores (1.04-1.14x over tile stores straight into `out`).
 * Measured on the 1B shapes (2 cores, alternating, same bits): 16 panels x 64 steps x runs of 8
 * steps, with both, 1.06-1.18x the earlier 8 panels x 128 steps with whole-chunk runs (1.9-2.2 ->
 * 2.2-2.4 TFLOP/s with the unpacking, above oneDNN's 1.9-2.1 on already-unpacked bfloat16); 16 x
 * 128 steps (2 MB) 0.96-0.99x, runs of 4 or 16 steps 1.03-1.05x and 0.98x, 24 or 32 panels x 32
 * steps 0.97-1.09x. Unpacking the next chunk a tile at a time between tile products, to overlap it
 * with AMX's work, gave nothing: the tile loop already keeps the loads busy.
 *
 * Built only where the compiler targets AMX (-march=native on such a CPU); elsewhere amx_matmul
 * returns STATUS_NO_AMX and packed.py keeps its oneDNN path.
 */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "plainllama.h"
#include "unpack.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)

#include "amx.h"
#include "q4_lanes.h"
#include "q8_lanes.h"
#include "exp16.h"

#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux hands tile state to a process only on request */
#define XFEATURE_XTILEDATA 18

#define BLOCK_PANELS 16 /* panels of 16 output features a thread unpacks together */
#define K_CHUNK 64      /* k-steps of 32 unpacked at a time: 16 panels x 64 steps x 1 KB = 1 MB */
_Static_assert(K_CHUNK % 16 == 0, "a chunk holds whole q8 groups (pack_panels)");
#define A_STEPS 8       /* k-steps of a block of rows' A tiles (2 x 8 KB) that serve every panel pair in turn */

/* Panels per block, at most `most` and a multiple of `step`: the threads take whole blocks, so with
 * few panels (a small model's [576, 576]: 36 panels; 3 blocks of 16 on 2 threads would leave a thread
 * idle half the time, 6 blocks of 6 leave none) the size that leaves the fewest panel slots idle,
 * the larger one on a tie (x is read once per block). */
static int panels_per_block(int panels, int most, int step) {
    int threads = omp_get_max_threads(), best = most, idle_best = -1;
    for (int bp = most; bp >= step; bp -= step) {
        int blocks = (panels + bp - 1) / bp, rounds = (blocks + threads - 1) / threads;
        int idle = rounds * threads * bp - panels;
        if (idle_best < 0 || idle < idle_best) best = bp, idle_best = idle;
    }
    return best;
}

int amx_available(void) {
    static int state = 0; /* 1 granted, -1 refused */
    if (!state) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

/* ---- one 32-weight block of one weight row, as 32 bfloat16 (16 dwords) ---------------------- */
/* Direct for q4 with per-block scales, q8 and the 16-bit layouts; the others are unpacked a stretch
 * of rows at a time into a staging buffer first (pack_panels). */

/* A q8 block's 32 numbers in GGUF's order at q, times its scale */
static inline __m512i q8_block_bf16(const int8_t *q, uint16_t d) {
    __m512 vs = _mm512_set1_ps(_cvtsh_ss(d));
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    return pair_bf16(_mm512_mul_ps(lo, vs), _mm512_mul_ps(hi, vs));
}

/* A q4 block's 16 bytes in GGUF's order at q (byte j holds weights j and j + 16), times its scale,
 * plus its minimum (or -8 times its scale) */
static inline __m512i q4_block_bf16(const uint8_t *q, const MatrixPart *W, size_t blk) {
    __m128i packed = _mm_loadu_si128((const __m128i *)q);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, _mm_set1_epi8(0x0F))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F))));
    float scale = _cvtsh_ss(W->d[blk]), minimum = W->m ? _cvtsh_ss(W->m[blk]) : -8.0f * scale;
    __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(minimum);
    return pair_bf16(_mm512_fmadd_ps(lo, vs, vm), _mm512_fmadd_ps(hi, vs, vm));
}

static inline __m512i block_bf16(const MatrixPart *W, size_t n, int K, int b) {
    size_t blk = n * (K / 32) + b;
    int layout = W->layout;
    const void *w = W->w;
    const uint16_t *d = W->d;
    if (layout == LAYOUT_Q4) { /* a block of a last, shorter group (whole groups: pack_panels) */
        uint8_t natural[16];
        q4_natural_block((const uint8_t *)w + n * (K / 2), K, b, natural);
        return q4_block_bf16(natural, W, blk);
    }
    if (layout == LAYOUT_Q8) /* a block of a last, shorter group, in GGUF's order (whole groups: pack_panels) */
        return q8_block_bf16((const int8_t *)w + n * K + 32 * b, d[blk]);
    const uint16_t *h = (const uint16_t *)w + 32 * blk;
    if (layout == LAYOUT_F16)
        return pair_bf16(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h)), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 16))));
    return _mm512_loadu_si512(h); /* BF16 as stored */
}

/* The layouts unpacked through unpack.h's functions (K-quant scales, fifth bits, Q6_K's regrouped
 * values) rather than block_bf16: STAGE_STEPS k-steps of a panel's 16 rows at a time, one Q6_K
 * super-block, 16 x 256 bfloat16 = 8 KB, so the staging stays in L1 between unpacking and transposing. */
#define STAGE_STEPS 8

static inline int staged(const MatrixPart *W) { return W->layout >= LAYOUT_Q6 || W->sc; } /* q6, q5, q2, q3 */

static void stage_rows(const MatrixPart *W, int K, int N, size_t n0, int s, int count, uint16_t *stage) {
    for (int c = 0; c < 16; c++) {
        size_t n = n0 + c;
        uint16_t *row = stage + (size_t)c * 32 * STAGE_STEPS;
        if (n >= (size_t)N)
            memset(row, 0, (size_t)64 * count);
        else if (W->layout == LAYOUT_Q6) /* s and count are multiples of 8 (K a multiple of 256) */
            q6_unpack_supers(W->w, W->sc, W->d, n * (K / 256) + s / 8, count / 8, row, 0);
        else if (W->layout == LAYOUT_Q3)
            q3_unpack_supers(W->w, W->sc, W->d, n * (K / 256) + s / 8, count / 8, row, 0);
        else if (W->layout == LAYOUT_Q2)
            q2_unpack_supers(W->w, (const uint8_t *)W->sc, W->d, W->m, n * (K / 256) + s / 8, count / 8, row, 0);
        else
            q4_unpack_blocks(W->w, W->qh, W->d, W->m, (const uint8_t *)W->sc, W->mn, K, n, s, count, row, 0);
    }
}

/* Prefetching the next panel's weights while a panel is unpacked. A thread walks a panel's 16 rows
 * side by side, a k-step at a time: 16 short streams (a q4 row's chunk is 1 KB), each started anew
 * at every panel, which the hardware's prefetcher picks up too late. So each k-step also fetches
 * into L2 the same step of the next panel's rows, and the first step their scales (and minimums,
 * fifth bits) for the whole chunk. Measured on 64-token prefills of 1B-shaped files (unpacking's
 * share of the time, TSC per thread): Q8_0 107 -> 69 ms, Q4_0 100-107 -> 71, Q6_K 150 -> 106, Q4_K_M
 * 122 -> 101. Not for the 16-bit layouts, whose 4 KB rows the hardware does fetch in time: there the
 * prefetches cost 84 -> 93 ms. */

/* Bytes of W's values (`w`) per k-step of 32 weights that are fetched ahead; 0: none (16-bit) */
static int fetched_step_bytes(int layout) {
    switch (layout) {
    case LAYOUT_Q8: return 32;
    case LAYOUT_F16: case LAYOUT_BF16: return 0;
    case LAYOUT_Q6: return 24;
    case LAYOUT_Q3: return 12;
    case LAYOUT_Q2: return 8;
    default: return 16; /* q4, q5 */
    }
}

/* Into L2: the part of row n (`per_row` bytes of the array at `base`, running along the row in step
 * order) that holds k-steps s0 .. s0 + ns - 1 of its `steps` */
static inline void prefetch_span(const void *base, size_t n, size_t per_row, int s0, int ns, int steps) {
    if (!base) return;
    const char *row = (const char *)base + n * per_row;
    size_t lo = per_row * s0 / steps, hi = (per_row * (s0 + ns) + steps - 1) / steps;
    for (size_t at = lo & ~(size_t)63; at < hi; at += 64) _mm_prefetch(row + at, _MM_HINT_T1);
}

/* Row n's scales, minimums and fifth bits for k-steps s0 .. s0 + ns - 1 (plainllama.h's Layout) */
static void prefetch_side(const MatrixPart *W, int K, size_t n, int s0, int ns) {
    int steps = K / 32, supers = W->layout >= LAYOUT_Q6 && W->layout != LAYOUT_Q5; /* q6, q2, q3 */
    size_t scales = W->layout == LAYOUT_Q8 || !(supers || W->sc) ? (size_t)steps * 2 : (size_t)(K / 256) * 2;
    prefetch_span(W->d, n, scales, s0, ns, steps);
    prefetch_span(W->m, n, scales, s0, ns, steps);
    prefetch_span(W->sc, n, supers ? (size_t)K / 16 : (size_t)steps, s0, ns, steps);
    prefetch_span(W->mn, n, (size_t)steps, s0, ns, steps);
    prefetch_span(W->qh, n, (size_t)steps * 4, s0, ns, steps);
}

/* B tiles of panels p0 .. p0+np-1 (a panel = 16 weight rows; one past N is zeros), k-steps
 * s0 .. s0+ns-1: tile (p, s) at tiles + (p * ns + s) * 256 dwords. `stage`: 16 x 32 x STAGE_STEPS
 * bfloat16 of scratch. */
static void pack_panels(const MatrixPart *W, int K, int N, int p0, int np, int s0, int ns, uint32_t *tiles,
                        uint16_t *stage) {
    int ahead = fetched_step_bytes(W->layout);
    size_t row_bytes = (size_t)(K / 32) * ahead;
    /* q8 and q4 (with a scale per block): whole groups of 16 blocks (k-steps) are held in the decode
     * loops' order (q8_lanes.h, q4_lanes.h); each is put back in GGUF's order for the panel's 16 rows in
     * `stage` (512 or 256 bytes a row), steps in_stage .. + 15 */
    int q8 = W->layout == LAYOUT_Q8, q4 = W->layout == LAYOUT_Q4 && !staged(W), whole = K / 512 * 16;
    for (int p = 0; p < np; p++) {
        size_t n0 = (size_t)16 * (p0 + p), next = n0 + 16;
        int fetch = ahead && next + 16 <= (size_t)N;
        if (fetch)
            for (int c = 0; c < 16; c++) prefetch_side(W, K, next + c, s0, ns);
        int in_stage = -16;
        for (int g = 0; g < ns; g += STAGE_STEPS) {
            int count = ns - g < STAGE_STEPS ? ns - g : STAGE_STEPS;
            if (staged(W)) stage_rows(W, K, N, n0, s0 + g, count, stage);
            if ((q8 || q4) && (s0 + g) % 16 == 0 && s0 + g + 16 <= whole) {
                in_stage = s0 + g;
                for (int c = 0; c < 16 && n0 + c < (size_t)N; c++) {
                    if (q8) {
                        q8_natural_group((const int8_t *)W->w + (n0 + c) * K + 32 * (size_t)in_stage, (int8_t *)stage + 512 * c);
                        continue;
                    }
                    __m128i blocks[8];
                    for (int half = 0; half < 2; half++) {
                        q4_blocks8((const uint8_t *)W->w + (n0 + c) * (K / 2), in_stage + 8 * half, blocks);
                        for (int j = 0; j < 8; j++) _mm_storeu_si128((__m128i *)((uint8_t *)stage + 256 * c + 16 * (8 * half + j)), blocks[j]);
                    }
                }
            }
            for (int s = g; s < g + count; s++) {
                uint32_t *tile = tiles + ((size_t)p * ns + s) * 256;
                if (fetch) /* step s of the next panel's 16 rows */
                    for (int c = 0; c < 16; c++) {
                        const char *at = (const char *)W->w + (next + c) * row_bytes + (size_t)(s0 + s) * ahead;
                        for (int l = 0; l < ahead; l += 64) _mm_prefetch(at + l, _MM_HINT_T1);
                    }
                __m512i r[16];
                for (int c = 0; c < 16; c++) {
                    if (staged(W))
                        r[c] = _mm512_loadu_si512(stage + (size_t)c * 32 * STAGE_STEPS + 32 * (s - g));
                    else if (s0 + s < in_stage + 16 && n0 + c < (size_t)N)
                        r[c] = q8 ? q8_block_bf16((const int8_t *)stage + 512 * c + 32 * (s0 + s - in_stage), W->d[(n0 + c) * (K / 32) + s0 + s])
                                  : q4_block_bf16((const uint8_t *)stage + 256 * c + 16 * (s0 + s - in_stage), W, (n0 + c) * (K / 32) + s0 + s);
                    else
                        r[c] = n0 + c < (size_t)N ? block_bf16(W, n0 + c, K, s0 + s) : _mm512_setzero_si512();
                }
                transpose16(r);
                for (int i = 0; i < 16; i++) _mm512_store_si512(tile + 16 * i, r[i]);
            }
        }
    }
}

/* x float32 [M, K] -> A tiles: rows 16g..16g+15, k-step s at xp + (g * K/32 + s) * 512; rows past M zero */
static void pack_rows(const float *x, int M, int K, uint16_t *xp) {
    int steps = K / 32, groups = (M + 31) / 32 * 2;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < groups * 16; row++) {
        uint16_t *dst = xp + (size_t)(row / 16) * steps * 512 + 32 * (row % 16);
        for (int s = 0; s < steps; s++) {
            __m512i v = _mm512_setzero_si512();
            if (row < M) {
                const float *src = x + (size_t)row * K + 32 * s;
                v = pair_bf16(_mm512_loadu_ps(src), _mm512_loadu_ps(src + 16));
            }
            _mm512_store_si512(dst + (size_t)s * 512, v);
        }
    }
}

/* One run of tile products: C tiles 0-3 (rows 0-15 of A by B panel b0, rows 0-15 by b1, rows 16-31
 * by b0, rows 16-31 by b1) start from `c` (four 1 KB tiles in that order), or from zeros if `fresh`,
 * and add k-steps s1 .. end-1 of A tiles a0 (rows 0-15) and a1 (rows 16-31) times B tiles b0 and b1
 * (a tile a k-step: 512 bfloat16 of A, 256 pairs of B). The sums stay in the tile registers. */
static inline void tile_run(const float *c, int fresh, const uint16_t *a0, const uint16_t *a1, const uint32_t *b0,
                            const uint32_t *b1, int s1, int end) {
    if (fresh) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    } else {
        _tile_loadd(0, c, 64);
        _tile_loadd(1, c + 256, 64);
        _tile_loadd(2, c + 512, 64);
        _tile_loadd(3, c + 768, 64);
    }
    for (int s = s1; s < end; s++) {
        _tile_loadd(4, a0 + 512 * s, 64);
        _tile_loadd(5, a1 + 512 * s, 64);
        _tile_loadd(6, b0 + 256 * s, 64);
        _tile_loadd(7, b1 + 256 * s, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

static inline void store_sums(float *c) {
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
}

/* Whether the tiles can take W [N, K] here: STATUS_OK, or why not */
static int can_multiply(const MatrixPart *W, int K, int N) {
    if (!amx_available()) return STATUS_NO_AMX;
    if (W->layout < LAYOUT_Q4 || W->layout > LAYOUT_Q3) return STATUS_BAD_LAYOUT;
    int supers = W->layout == LAYOUT_Q6 || W->layout == LAYOUT_Q3 || W->layout == LAYOUT_Q2; /* 256 weights a block */
    if (K % 32 || N % 16 || (supers && K % 256)) return STATUS_BAD_WIDTH;
    return STATUS_OK;
}

/* out [M, N] = x [M, K] W^T. `xp`: workspace of (M rounded up to 32) * K bfloat16, 64-byte aligned.
 * Returns STATUS_OK, STATUS_OUT_OF_MEMORY, STATUS_NO_AMX, or STATUS_BAD_WIDTH (K not a multiple of 32 or N of 16). */
int amx_matmul(const float *x, int M, int K, const MatrixPart *W, int N, float *out, uint16_t *xp) {
    int code = can_multiply(W, K, N);
    if (code != STATUS_OK) return code;
    int steps = K / 32, panels = N / 16, row_blocks = (M + 31) / 32;
    int per_block = panels_per_block(panels, BLOCK_PANELS, 2), blocks = (panels + per_block - 1) / per_block;
    pack_rows(x, M, K, xp);
    int status = 0;
#pragma omp parallel
    {
        _tile_loadconfig(&TILES);
        uint32_t *tiles = aligned_alloc(64, (size_t)BLOCK_PANELS * K_CHUNK * 1024);
        uint16_t *stage = aligned_alloc(64, (size_t)16 * 32 * STAGE_STEPS * sizeof(uint16_t));
        int ld_tail = 16 * BLOCK_PANELS; /* the last, partial block of rows goes to `tail` first */
        float *tail = aligned_alloc(64, (size_t)32 * ld_tail * sizeof(float));
        int chunked = steps > K_CHUNK; /* partial sums kept per block of rows between chunks of K */
        float *sums = aligned_alloc(64, (size_t)(chunked ? row_blocks : 1) * (BLOCK_PANELS / 2) * 4096);
        if (!tiles || !tail || !stage || !sums) {
#pragma omp atomic write
            status = STATUS_OUT_OF_MEMORY;
        }
#pragma omp for schedule(static)
        for (int block = 0; block < blocks; block++) {
            int failed;
#pragma omp atomic read
            failed = status;
            if (failed) continue; /* a thread could not allocate its buffers: the call returns -1 */
            int p0 = block * per_block;
            int np = panels - p0 < per_block ? panels - p0 : per_block, np_even = (np + 1) & ~1;
            for (int s0 = 0; s0 < steps; s0 += K_CHUNK) {
                int ns = steps - s0 < K_CHUNK ? steps - s0 : K_CHUNK, last_chunk = s0 + ns == steps;
                pack_panels(W, K, N, p0, np_even, s0, ns, tiles, stage);
                for (int rb = 0; rb < row_blocks; rb++) {
                    int whole = 32 * rb + 32 <= M;
                    float *o_block = whole ? out + (size_t)32 * rb * N + 16 * p0 : tail;
                    int ld = whole ? N : ld_tail;
                    const uint16_t *a0 = xp + ((size_t)2 * rb * steps + s0) * 512, *a1 = a0 + (size_t)steps * 512;
                    float *sums_rb = sums + (size_t)(chunked ? rb : 0) * (BLOCK_PANELS / 2) * 1024;
                    for (int s1 = 0; s1 < ns; s1 += A_STEPS) {
                        int end = s1 + A_STEPS < ns ? s1 + A_STEPS : ns, final = last_chunk && end == ns;
                        for (int p = 0; p < np_even; p += 2) {
                            const uint32_t *b0 = tiles + (size_t)p * ns * 256, *b1 = b0 + (size_t)ns * 256;
                            float *c = sums_rb + (size_t)(p / 2) * 1024; /* C tiles 0-3, 1 KB each */
                            tile_run(c, s0 + s1 == 0, a0, a1, b0, b1, s1, end);
                            store_sums(c);
                            if (!final) continue;
                            float *o = o_block + 16 * p;
                            int width = p + 1 < np ? 32 : 16; /* not the zero panel past N */
                            for (int r = 0; r < 32; r++) {
                                const float *row = c + (r < 16 ? 0 : 512) + 16 * (r % 16);
                                _mm512_storeu_ps(o + (size_t)r * ld, _mm512_load_ps(row));
                                if (width == 32) _mm512_storeu_ps(o + (size_t)r * ld + 16, _mm512_load_ps(row + 256));
                            }
                        }
                    }
                }
            }
            if (M % 32) {
                int m0 = M - M % 32;
                for (int r = 0; r < M % 32; r++)
                    memcpy(out + (size_t)(m0 + r) * N + 16 * p0, tail + (size_t)r * ld_tail, (size_t)np * 16 * sizeof(float));
            }
        }
        free(tiles);
        free(stage);
        free(tail);
        free(sums);
        _tile_release();
    }
    return status;
}

/* hidden [M, F] = silu(x Wg^T) * (x Wu^T) for W [2F, K] = the gate's rows, then the up's (the
 * feed-forward's stacked w1 and w3), without writing x W^T [M, 2F] first: a thread multiplies a block
 * of the gate's panels and the same block of the up's, each panel pair of tiles (gate p, up p) gives
 * the same 16 columns of both, and SwiGLU (exp16.h's swiglu16, the layer step's formula) runs on
 * them in L1. The products are amx_matmul's (same tiles, same order of sums), so the result has the
 * bits of amx_matmul followed by swiglu_rows, and skips a write and a read of the [M, 2F] product:
 * 48 MB of a 1B-shaped layer's 512-token prompt. The blocking is amx_matmul's (runs of A_STEPS
 * k-steps of A in L1 over every panel pair, C between runs in a buffer of the thread's). Same
 * statuses as amx_matmul; F a multiple of 16. */
#define SWIGLU_PANELS 8 /* panels of the gate (and as many of the up) a thread unpacks together: 8 rather
                           than 4 with the runs of A_STEPS, 1.04-1.14x on the 1B [16384, 2048] (6: 1.05-1.12x) */

int amx_swiglu(const float *x, int M, int K, const MatrixPart *W, int F, float *hidden, uint16_t *xp) {
    int code = can_multiply(W, K, F);
    if (code != STATUS_OK) return code;
    int steps = K / 32, panels = F / 16, row_blocks = (M + 31) / 32, N = 2 * F;
    int per_block = panels_per_block(panels, SWIGLU_PANELS, 1), blocks = (panels + per_block - 1) / per_block;
    int chunks = (steps + K_CHUNK - 1) / K_CHUNK;
    pack_rows(x, M, K, xp);
    int status = 0;
#pragma omp parallel
    {
        _tile_loadconfig(&TILES);
        uint32_t *tiles = aligned_alloc(64, (size_t)2 * SWIGLU_PANELS * K_CHUNK * 1024); /* gate's, then up's */
        uint16_t *stage = aligned_alloc(64, (size_t)16 * 32 * STAGE_STEPS * sizeof(uint16_t));
        /* per row block and panel: C tiles gate rows 0-15, up 0-15, gate 16-31, up 16-31 */
        float *sums = aligned_alloc(64, (size_t)(chunks > 1 ? row_blocks : 1) * SWIGLU_PANELS * 4 * 1024);
        if (!tiles || !stage || !sums) {
#pragma omp atomic write
            status = STATUS_OUT_OF_MEMORY;
        }
#pragma omp for schedule(static)
        for (int block = 0; block < blocks; block++) {
            int failed;
#pragma omp atomic read
            failed = status;
            if (failed) continue;
            int p0 = block * per_block, np = panels - p0 < per_block ? panels - p0 : per_block;
            for (int chunk = 0; chunk < chunks; chunk++) {
                int s0 = chunk * K_CHUNK, ns = steps - s0 < K_CHUNK ? steps - s0 : K_CHUNK, last = chunk == chunks - 1;
                uint32_t *up_tiles = tiles + (size_t)np * ns * 256;
                pack_panels(W, K, N, p0, np, s0, ns, tiles, stage);
                pack_panels(W, K, N, panels + p0, np, s0, ns, up_tiles, stage);
                for (int rb = 0; rb < row_blocks; rb++) {
                    const uint16_t *a0 = xp + ((size_t)2 * rb * steps + s0) * 512, *a1 = a0 + (size_t)steps * 512;
                    for (int s1 = 0; s1 < ns; s1 += A_STEPS) {
                        int end = s1 + A_STEPS < ns ? s1 + A_STEPS : ns, final = last && end == ns;
                        for (int p = 0; p < np; p++) {
                            const uint32_t *bg = tiles + (size_t)p * ns * 256, *bu = up_tiles + (size_t)p * ns * 256;
                            float *c = sums + ((size_t)(chunks > 1 ? rb : 0) * SWIGLU_PANELS + p) * 1024;
                            tile_run(c, s0 + s1 == 0, a0, a1, bg, bu, s1, end);
                            store_sums(c);
                            if (!final) continue;
                            for (int r = 0; r < 32 && 32 * rb + r < M; r++) { /* 16 columns of 32 rows */
                                const float *gate = c + (r < 16 ? 0 : 512) + 16 * (r % 16), *up = gate + 256;
                                _mm512_storeu_ps(hidden + (size_t)(32 * rb + r) * F + 16 * (p0 + p),
                                                 swiglu16(_mm512_load_ps(gate), _mm512_load_ps(up)));
                            }
                        }
                    }
                }
            }
        }
        free(tiles);
        free(stage);
        free(sums);
        _tile_release();
    }
    return status;
}

#else

int amx_available(void) { return 0; }

int amx_matmul(const float *x, int M, int K, const MatrixPart *W, int N, float *out, uint16_t *xp) {
    (void)x; (void)M; (void)K; (void)W; (void)N; (void)out; (void)xp;
    return STATUS_NO_AMX;
}

int amx_swiglu(const float *x, int M, int K, const MatrixPart *W, int F, float *hidden, uint16_t *xp) {
    (void)x; (void)M; (void)K; (void)W; (void)F; (void)hidden; (void)xp;
    return STATUS_NO_AMX;
}

#endif
