/* Weight rows unpacked to bfloat16 (f32 = 0) or float32 (f32 = 1), a stretch of one row at a time:
 * the bodies of the *_to_bf16 / *_to_f32 functions (cpu_matmul.c, q6_matmul.c), shared with AMX's
 * products (amx_matmul.c), which unpack the K-quant layouts through them. AVX-512 builds only.
 * Not part of plainllama.h: Python never calls these. */
#ifndef PLAINLLAMA_UNPACK_H
#define PLAINLLAMA_UNPACK_H

#include <stddef.h>
#include <stdint.h>

/* q4/q5 (any scales): blocks b0 .. b0 + nb - 1 of weight row n, 32 weights each, into out [32 * nb] */
void q4_unpack_blocks(const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
                      const uint8_t *mn, int K, size_t n, int b0, int nb, void *out, int f32);
/* q6: super-blocks sb0 .. sb0 + count - 1, numbered over the whole matrix row by row (K/256 per
 * row), 256 weights each, into out [256 * count] */
void q6_unpack_supers(const uint8_t *qs, const int8_t *sc, const uint16_t *d, size_t sb0, size_t count, void *out, int f32);

/* q2: the same for Q2_K's super-blocks */
void q2_unpack_supers(const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m, size_t sb0, size_t count,
                      void *out, int f32);
/* q3: the same for Q3_K's */
void q3_unpack_supers(const uint8_t *qs, const int8_t *sc, const uint16_t *d, size_t sb0, size_t count, void *out, int f32);

#endif
