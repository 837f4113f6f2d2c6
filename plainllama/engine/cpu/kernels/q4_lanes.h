/* How q4 rows are held (q4 and q5 layouts: Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K): GGUF's nibbles, each
 * row's groups of 16 blocks (512 weights, 256 bytes) with their blocks side by side, so that one
 * vector load gives the decode loops a 4-byte piece of every block, block b in int32 lane b.
 *
 * Why: the decode loops put one block in each int32 lane (vpdpbusd sums a block's products in its
 * lane), and from GGUF's order (a block's 16 bytes together) a group took a 4 x 4 transpose of
 * 4-byte pieces, and the blocks came out in another order than their scales (a permutation of d, m,
 * the K-quant scales and the fifth bits per group). Held this way, a group is four loads and its
 * scales load in place. One row in L2 (benchmarks: docs/performance.md), per block: AVX-512 1.1-1.2x
 * less time; AVX2, where the loop had kept eight rows side by side to sum a block's products across
 * lanes, ~2x.
 *
 * The order: a row's group G (bytes 256 G ..) of B blocks (16, or fewer in a last group when K is not
 * a multiple of 512) holds piece p (p = 0..3: bytes 4p..4p+3 of each block, i.e. weights 4p..4p+3 in
 * the low nibbles and 16+4p..16+4p+3 in the high ones) at 4 B p, block 16 G + b's at 4 b of it. The
 * bytes, scales, minimums and fifth bits are GGUF's, unchanged; only the bytes' places in a row move
 * (within its group). Python holds the same order (packed.py, q4_lanes). */

#ifndef PLAINLLAMA_Q4_LANES_H
#define PLAINLLAMA_Q4_LANES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Where piece p of block b starts in a held q4 row of K weights, in bytes */
static inline size_t q4_piece(int K, int b, int p) {
    int nb = K / 32, g = b / 16, blocks = nb - 16 * g < 16 ? nb - 16 * g : 16;
    return (size_t)256 * g + (size_t)4 * blocks * p + 4 * (b % 16);
}

/* Block b of a held q4 row (`row`: its first byte) in GGUF's order: 16 bytes at out */
static inline void q4_natural_block(const uint8_t *row, int K, int b, uint8_t out[16]) {
    for (int p = 0; p < 4; p++) memcpy(out + 4 * p, row + q4_piece(K, b, p), 4);
}

#if defined(__AVX2__)
#include <immintrin.h>

/* Blocks b .. b + 7 of a held q4 row, b a multiple of 8 within a whole group (16 blocks), in GGUF's
 * order: block b + j in blocks[j]. The four pieces' 32 bytes (8 blocks each) transposed in 4-byte
 * units: each 128-bit lane of a 4 x 4 transpose is one block. */
static inline void q4_blocks8(const uint8_t *row, int b, __m128i blocks[8]) {
    const uint8_t *at = row + (size_t)256 * (b / 16) + 32 * (b / 8 % 2);
    __m256i p0 = _mm256_loadu_si256((const __m256i *)at), p1 = _mm256_loadu_si256((const __m256i *)(at + 64));
    __m256i p2 = _mm256_loadu_si256((const __m256i *)(at + 128)), p3 = _mm256_loadu_si256((const __m256i *)(at + 192));
    __m256i a = _mm256_unpacklo_epi32(p0, p1), c = _mm256_unpackhi_epi32(p0, p1);
    __m256i e = _mm256_unpacklo_epi32(p2, p3), f = _mm256_unpackhi_epi32(p2, p3);
    __m256i t[4] = {_mm256_unpacklo_epi64(a, e), _mm256_unpackhi_epi64(a, e), _mm256_unpacklo_epi64(c, f),
                    _mm256_unpackhi_epi64(c, f)}; /* t[i]: blocks i (low 128 bits) and 4 + i (high) */
    for (int i = 0; i < 4; i++) {
        blocks[i] = _mm256_castsi256_si128(t[i]);
        blocks[4 + i] = _mm256_extracti128_si256(t[i], 1);
    }
}
#endif

#endif
