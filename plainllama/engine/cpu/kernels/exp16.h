/* e^x for 16 floats at once, for the softmax of attention (decode_layer.c, prompt_attention.c,
 * prompt_attention_f32.c) and SiLU (decode_layer.c, amx_matmul.c); in AVX2 builds e^x for 8 floats
 * (decode_layer.c's SiLU and softmax, prompt_attention_f32.c). Not part of plainllama.h: Python never
 * calls it. */
#ifndef PLAINLLAMA_EXP16_H
#define PLAINLLAMA_EXP16_H

#include <immintrin.h>

#if defined(__AVX512F__)

/* e^x for 16 floats: e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its Taylor
 * polynomial to degree 7 (relative error < 2e-7 over that range, about one float32 step), and 2^n
 * applied by vscalefps, which also gives 0 and inf where the result leaves float32's range. */
static inline __m512 exp16(__m512 x) {
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln 2 in two parts: exact n * hi */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* SwiGLU's silu(gate) * up for 16 values: the one formula of the layer step (decode_layer.c) and the
 * AMX products that finish with it (amx_matmul.c), so both give the same bits */
static inline __m512 swiglu16(__m512 gate, __m512 up) {
    __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate))));
    return _mm512_mul_ps(silu, up);
}

#endif

/* Also in AVX-512 builds: a CPU with AVX-512 but without its VNNI (Intel Skylake-SP) builds the
 * AVX2 kernels (plainllama.h's KERNELS_AVX512), whose softmax and SiLU take exp8. */
#if defined(__AVX2__) && defined(__FMA__)

/* e^x for 8 floats as exp16 computes it; 2^n is put into the exponent bits directly, so x is first
 * clamped to [-87.3, 88.7], where 2^n stays a normal float: below, e^x < 1.2e-38 gives a value
 * within a float32 step of the true tiny result for silu's use (g / (1 + e^-g) then underflows to 0
 * or -0 either way; a softmax's weights: where it must not see, it masks); above, inf becomes 1.6e38.
 * e^0 = 1 exactly. decode_layer.c's SiLU and prompt_attention_f32.c at the AVX2 level. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

#endif

#endif
