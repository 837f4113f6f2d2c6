/* What the files that lay numbers out as AMX tiles (amx_matmul.c, prompt_attention.c) share: the tile
 * configuration and float32 to bfloat16 pairs (the 16 x 16 transpose of 32-bit words that turns 16
 * rows of bfloat16 pairs into a B tile is vectors.h's transpose16). Not part of plainllama.h: Python
 * never calls these. Include only where the compiler targets AVX-512 BF16 (the files' #if). */
#ifndef PLAINLLAMA_AMX_H
#define PLAINLLAMA_AMX_H

#include <immintrin.h>
#include <stdint.h>

#include "vectors.h" /* transpose16 */

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

#endif
