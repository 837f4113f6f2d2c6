/* What the files that lay numbers out as AMX tiles (amx_matmul.c, prompt_attention.c) share: the tile
 * configuration, float32 to bfloat16 pairs, and the 16 x 16 transpose of 32-bit words that turns 16
 * rows of bfloat16 pairs into a B tile. Not part of plainllama.h: Python never calls these. Include
 * only where the compiler targets AVX-512 BF16 (the files' #if). */
#ifndef PLAINLLAMA_AMX_H
#define PLAINLLAMA_AMX_H

#include <immintrin.h>
#include <stdint.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Static, not built on the stack: gcc does not see that ldtilecfg reads its operand and dropped the
 * stores that filled a local one, and the tiles were configured from garbage. Every tile: 16 rows of 64 bytes. */
static const TileConfig TILES __attribute__((aligned(64))) = {
    .palette = 1, .bytes_per_row = {64, 64, 64, 64, 64, 64, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 16, 16}};

/* 32 float32 (lo: the first 16, hi: the next 16) -> 32 bfloat16 in order, rounded to nearest even */
static inline __m512i pair_bf16(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

/* r[c] = row c of a 16 x 16 matrix of dwords -> r[i] = column i */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) { /* interleave dwords of row pairs */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* then qwords of row quads: 4 x 4 blocks within each 128-bit lane */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) { /* then move the 128-bit lanes: two rounds of a 4 x 4 lane transpose */
        t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
        t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
        r[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd);
    }
}

#endif
