/* The contract between the C kernels and Python: the weight layouts, the status codes, the structs
 * decode_layer reads and every exported function. engine/cpu/kernels/__init__.py reads the enums
 * below from this file (the layout numbers and the status messages are not written again in Python),
 * and tests/test_kernels_header.py checks the ctypes structs of decode_block.py against the sizes
 * and offsets a C compiler gives these.
 *
 * Shapes: x [M, K] float32 activations (M rows), W [N, K] one row per output feature, out [M, N]. */

#ifndef PLAINLLAMA_H
#define PLAINLLAMA_H

#include <stddef.h>
#include <stdint.h>

/* Which file holds the product kernels in a build: cpu_matmul.c where the compiler may use AVX-512
 * F/BW/VL/VNNI (set by -march=native and PLAINLLAMA_ISA's flags), cpu_matmul_avx2.c elsewhere. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__F16C__)
#define KERNELS_AVX512 1
#else
#define KERNELS_AVX512 0
#endif

/* How a weight matrix is stored (engine/cpu/packed.py's PackedWeight). */
enum Layout {
    LAYOUT_Q4 = 0,   /* nibbles uint8 [N, K/2] (each row's groups of 16 blocks as q4_lanes.h holds them), scales d float16 [N, K/32], optional minimums m [N, K/32]; or with
                      * K-quant scales sc, mn uint8 [N, K/32], d, m float16 [N, K/256]: d * sc and m * mn per block */
    LAYOUT_Q8 = 1,   /* int8 [N, K], each row's whole groups of 512 in q8_lanes.h's order; scales d float16 [N, K/32] */
    LAYOUT_F16 = 2,  /* float16 [N, K] */
    LAYOUT_BF16 = 3, /* bfloat16 [N, K] */
    LAYOUT_Q6 = 4,   /* Q6_K regrouped: 6-bit values uint8 [N, K/256 * 192], scales sc int8 [N, K/16], d float16 [N, K/256] (q6_matmul.c) */
    LAYOUT_Q5 = 5,   /* q4's nibbles, scales and optional minimums, plus fifth bits qh uint32 [N, K/32] (bit k: weight k): weight = d * q + m, or d * (q - 16) */
    LAYOUT_Q2 = 6,   /* Q2_K regrouped: 2-bit values uint8 [N, K/256 * 64], sc uint8 [N, K/16] (4-bit scale | 4-bit minimum << 4), d, m float16 [N, K/256]: weight = d * (sc & 15) * q - m * (sc >> 4) (q6_matmul.c) */
    LAYOUT_Q3 = 7,   /* Q3_K regrouped: 3-bit values uint8 [N, K/256 * 96], scales sc int8 [N, K/16], d float16 [N, K/256]: weight = d * sc * (q - 4) (q6_matmul.c) */
};

/* What every int-returning kernel returns. The comment after each is its message in Python. */
enum Status {
    STATUS_OK = 0,
    STATUS_OUT_OF_MEMORY = -1, /* out of memory for its working buffers */
    STATUS_NO_AMX = -2,        /* this CPU, or the operating system, does not allow AMX */
    STATUS_BAD_WIDTH = -3,     /* a width is not a multiple of the kernel's block (64 inputs for q4/q8, 256 for q6/q3/q2, 32 for 16-bit; 16 outputs for AMX) */
    STATUS_BAD_LAYOUT = -4,    /* unknown weight layout */
    STATUS_NO_BF16 = -5,       /* this build has no bfloat16 arithmetic (AVX-512 BF16 or AMX) */
    STATUS_NO_AVX2 = -6,       /* this build has no AVX2 with FMA */
};

/* A stored matrix [rows, in_features] in one layout. */
typedef struct {
    int layout, rows;
    const void *w;         /* nibbles, int8, 6-bit values or 16-bit floats */
    const uint16_t *d, *m; /* float16 scales and minimums (q4/q8/q6), or NULL */
    const int8_t *sc;      /* q6, q3: int8 scale per 16 weights; q2: uint8 scale and minimum per 16; q4/q5 with K-quant scales: uint8 per 32; or NULL */
    const uint8_t *mn;     /* q4/q5 with K-quant scales: uint8 minimum per 32, or NULL */
    const uint32_t *qh;    /* q5: fifth bits, or NULL */
} MatrixPart;

/* A linear layer: one matrix, or up to three of different layouts whose outputs lie side by side
 * (packed.py's StackedLinear, for files that store q, k and v in different types). */
typedef struct {
    int n_parts, in_features, out_features;
    MatrixPart parts[3];
} Linear;

/* One transformer layer as decode_layer reads it. */
typedef struct {
    int dim, n_heads, n_kv_heads, head_dim, hidden;
    float eps;
    const float *attention_norm, *ffn_norm; /* [D] float32 */
    Linear wqkv, wo, w13, w2;
} Layer;

/* cpu_matmul.c or cpu_matmul_avx2.c: the level the products were built for (2: AVX2, 3: AVX-512) */
int kernel_level(void);
/* cpu_matmul.c: products for a few rows (decoding), out [M, N] = x [M, K] W^T */
int q4_matmul(const float *x, int M, int K, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
              const uint8_t *mn, int N, float *out);
int q5_matmul(const float *x, int M, int K, const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m,
              const uint8_t *sc, const uint8_t *mn, int N, float *out);
int q8_matmul(const float *x, int M, int K, const int8_t *qs, const uint16_t *d, int N, float *out);
int f16_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *out);
int bf16_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *out);
/* q6_matmul.c: the same for Q6_K kept as stored, and its rows unpacked to bfloat16 or float32 */
int q6_matmul(const float *x, int M, int K, const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, float *out);
int q6_to_bf16(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, uint16_t *out);
int q6_to_f32(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, float *out);
/* q6_matmul.c too: the same for Q2_K kept as stored */
int q2_matmul(const float *x, int M, int K, const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m,
              int N, float *out);
int q2_to_bf16(const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m, int N, int K, uint16_t *out);
int q2_to_f32(const uint8_t *qs, const uint8_t *sc, const uint16_t *d, const uint16_t *m, int N, int K, float *out);
/* q6_matmul.c too: the same for Q3_K kept as stored */
int q3_matmul(const float *x, int M, int K, const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, float *out);
int q3_to_bf16(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, uint16_t *out);
int q3_to_f32(const uint8_t *qs, const int8_t *sc, const uint16_t *d, int N, int K, float *out);
/* cpu_matmul.c: rows unpacked to bfloat16 or float32 [N, K] (prompts on CPUs without AMX multiply
 * these with oneDNN: bfloat16 where the CPU multiplies it natively, float32 elsewhere) */
int q4_to_bf16(const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
               const uint8_t *mn, int N, int K, uint16_t *out);
int q4_to_f32(const uint8_t *qs, const uint32_t *qh, const uint16_t *d, const uint16_t *m, const uint8_t *sc,
              const uint8_t *mn, int N, int K, float *out);
int q8_to_bf16(const int8_t *qs, const uint16_t *d, int N, int K, uint16_t *out);
int q8_to_f32(const int8_t *qs, const uint16_t *d, int N, int K, float *out);
/* q8_lanes.c: Q8_0 rows [N, K] in GGUF's order -> the order q8 rows are held in (q8_lanes.h), in place */
int q8_to_lanes(int8_t *qs, long N, int K);
/* q4_lanes.c: q4 nibbles [N, K/2] in GGUF's order -> the order q4 rows are held in (q4_lanes.h), in place */
int q4_to_lanes(uint8_t *qs, long N, int K);
int f16_to_bf16(const uint16_t *w, size_t n, uint16_t *out);
/* float32_rows.c: a prompt's rows times 16-bit weights (bf16: 0 float16, 1 bfloat16) in float32, for
 * CPUs without bfloat16 arithmetic; each output one chain of FMAs over k in order, so a row's result
 * is the same whatever M and the other rows */
int half_rows_matmul(const float *x, int M, int K, const uint16_t *w, int bf16, int N, float *out);
/* cpu_matmul.c: read every byte of buf with all threads (the memory bandwidth bound) */
double read_bytes(const uint8_t *buf, size_t n);

/* amx_matmul.c: products for many rows (prompts) on Intel AMX, W [N, K] in any layout (W->rows is
 * not read); xp: workspace of (M rounded up to 32) * K bfloat16, 64-byte aligned */
int amx_available(void);
int amx_matmul(const float *x, int M, int K, const MatrixPart *W, int N, float *out, uint16_t *xp);
/* amx_matmul.c too: hidden [M, F] = silu(x Wg^T) * (x Wu^T) for W [2F, K] = the gate's rows, then the up's */
int amx_swiglu(const float *x, int M, int K, const MatrixPart *W, int F, float *hidden, uint16_t *xp);
/* prompt_attention.c: a prompt's attention in bfloat16, softmax(q k^T / sqrt(Hd)) v with a boolean
 * mask; q row t of sequence b at q + b q_b + t q_t (heads side by side), key j of head g at
 * k + b kv_b + g kv_h + j kv_t (v alike), allowed [mask_rows, T, end] bytes or NULL, out [B, T, H * Hd].
 * The engine: 2 AMX, 1 AVX-512 BF16, 0 none in this build (prompt_attention returns STATUS_NO_BF16). */
int prompt_attention_engine(void);
int prompt_attention(const float *q, long q_b, long q_t, const float *k, const float *v, long kv_b, long kv_h,
                     long kv_t, int B, int T, int H, int K, int Hd, int end, const uint8_t *allowed, int mask_rows,
                     float *out);
/* prompt_attention_f32.c: the same in float32, for CPUs without bfloat16 arithmetic, in AVX-512 and
 * AVX2 builds (a build without AVX2 and FMA returns STATUS_NO_AVX2) */
int prompt_attention_f32(const float *q, long q_b, long q_t, const float *k, const float *v, long kv_b, long kv_h,
                         long kv_t, int B, int T, int H, int K, int Hd, int end, const uint8_t *allowed, int mask_rows,
                         float *out);

/* decode_layer.c: one decode step of a layer (one new token per row), and a prompt's in-between steps */
int decode_layer(const Layer *L, const float *x, int M, const float *cos, const float *sin, int rope_rows, void *cache_k,
                 void *cache_v, int cache_f16, long length, int start, const uint8_t *allowed, float *out);
int decode_rows(const Layer *L, const float *x, int M, const float *cos, const float *sin, const int64_t *cache_k,
                const int64_t *cache_v, int cache_f16, const long *length, const int *start, float *out);
int rms_norm_rows(const float *x, const float *weight, long M, int D, float eps, float *out);
int rotate_rows(float *x, long B, int T, int width, int heads, int Hd, const float *cos, const float *sin, int rope_rows);
int swiglu_rows(const float *gate_up, long M, int F, float *out);

#endif
