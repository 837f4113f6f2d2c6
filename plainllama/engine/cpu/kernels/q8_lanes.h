/* How q8 rows are held: Q8_0's int8 numbers, each row's whole groups of 16 blocks (512 weights) in
 * the order the AVX-512 decode loop reads them, so that it loads them instead of transposing them.
 *
 * Why: that loop (cpu_matmul.c) puts one block in each of a vector's 16 int32 lanes, so that
 * vpdpbusd sums a block's 32 products in its lane over 8 steps of 4 weights. From GGUF's order (a
 * block's 32 bytes together) that takes 24 shuffles per row and group, and with them the loop did
 * not keep its reads going while it computed: 16 layers of the 1B shapes in Q8_0, one row, read
 * 27.4-27.5 GB/s, and 30.0-30.1 with the groups held in this order (benchmarks/kernels_ab.py --rows 1
 * --layers 16, alternating in one process; the read loop ~33; docs/performance.md).
 *
 * The AVX2 loop reads the same order a half group (8 blocks, the 32-byte halves of each step) at a
 * time, with x arranged alike (cpu_matmul_avx2.c); the unpacking for prompts puts groups back in
 * GGUF's order (q8_natural_group below, amx_matmul.c's pack_panels, cpu_matmul_avx2.c).
 *
 * The order: a row's group G (bytes 512 G ..) holds step s (weights 4s..4s+3 of every block) at
 * 64 s, lane l of it (4 bytes) from block 16 G + Q8_LANES[l]. A last group of fewer than 16 blocks
 * (K not a multiple of 512) stays in GGUF's order. The numbers and scales are Q8_0's, unchanged:
 * only their places in the row move. Python holds the same order (packed.py, q8_lanes). */

#ifndef PLAINLLAMA_Q8_LANES_H
#define PLAINLLAMA_Q8_LANES_H

#include <stddef.h>

/* lane -> block of its group: the order cpu_matmul.c's transposes leave a group's blocks in (it
 * still transposes a last, shorter group), so that one permutation of the scales serves every group */
static const int Q8_LANES[16] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};
/* block of a group -> its lane */
static const int Q8_LANE_OF[16] = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15};

/* Where piece s (weights 4s..4s+3) of block b starts in a q8 row of K weights, in bytes; the pieces of
 * a block lie 64 bytes apart in a whole group, 4 in the last, shorter one (q8_piece_stride). */
static inline size_t q8_piece(int K, int b, int s) {
    if (b >= K / 512 * 16) return (size_t)32 * b + 4 * s;
    return (size_t)512 * (b / 16) + 64 * s + 4 * Q8_LANE_OF[b % 16];
}
static inline int q8_piece_stride(int K, int b) { return b >= K / 512 * 16 ? 4 : 64; }

#if defined(__AVX512F__)
#include <immintrin.h>
#include <stdint.h>

/* A whole group as held (512 bytes at src) -> its 16 blocks in GGUF's order at out (512 bytes): the
 * decode loop's transposes undone (cpu_matmul.c, q8_group_steps). Steps s and s + 4 give back the
 * 128-bit lanes of the register r[s] that loop transposed (its lanes 0, 2 and 1, 3); each 4 x 4
 * transpose within 128-bit lanes undoes itself. AVX-512 builds: the unpacking for prompts. */
static inline void q8_natural_group(const int8_t *src, int8_t *out) {
    const __m512i from_low = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), from_high = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    __m512i t[2][4];
    for (int s = 0; s < 4; s++) {
        __m512i a = _mm512_loadu_si512(src + 64 * s), b = _mm512_loadu_si512(src + 64 * (s + 4));
        t[0][s] = _mm512_permutex2var_epi64(a, from_low, b);  /* blocks 0..7's pieces s and s + 4 */
        t[1][s] = _mm512_permutex2var_epi64(a, from_high, b); /* blocks 8..15's */
    }
    for (int h = 0; h < 2; h++) {
        __m512i a = _mm512_unpacklo_epi32(t[h][0], t[h][1]), b = _mm512_unpackhi_epi32(t[h][0], t[h][1]);
        __m512i c = _mm512_unpacklo_epi32(t[h][2], t[h][3]), e = _mm512_unpackhi_epi32(t[h][2], t[h][3]);
        _mm512_storeu_si512(out + 256 * h, _mm512_unpacklo_epi64(a, c));       /* blocks 8h, 8h + 1 */
        _mm512_storeu_si512(out + 256 * h + 64, _mm512_unpackhi_epi64(a, c));  /* 8h + 2, 8h + 3 */
        _mm512_storeu_si512(out + 256 * h + 128, _mm512_unpacklo_epi64(b, e)); /* 8h + 4, 8h + 5 */
        _mm512_storeu_si512(out + 256 * h + 192, _mm512_unpackhi_epi64(b, e)); /* 8h + 6, 8h + 7 */
    }
}
#endif

#endif
