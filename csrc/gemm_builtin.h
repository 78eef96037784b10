/* gemm_builtin.h - the engine's own fp32 GEMM (gemm_builtin.c): the CPU
 * backend's default GEMM, with micro-kernels for AVX-512, AVX2+FMA and a
 * portable fallback that all give the same bits.
 *
 * The kernels read op(B) in column panels: panel p holds columns
 * [p*NR, p*NR + NR) of op(B) as [K][NR] floats (K < 1: one row of zeros),
 * columns past N zero; NR is the ISA's (rl_gemm_panel_width). Two ways in:
 * - a weight W [N, K] that is used many times (a layer's, packed once at
 *   load; a kept-quantized one dequantized into a packed scratch) is packed
 *   with rl_gemm_pack_b / rl_gemm_pack_rows for the ISA that will run it
 *   and multiplied with rl_gemm_f32_packed;
 * - any other B (attention's per-head products) goes to rl_gemm_f32, which
 *   packs it inside the call (O(N*K) against O(M*N*K) for the product) and
 *   keeps nothing.
 * Both give the same bits.
 *
 * Exactness: every output element is
 *     acc = 0; for k = 0..K-1: acc = fma(a[m,k], b[k,n], acc)    (fp32, one rounding each)
 *     t = alpha * acc; t = t + bias[n]; c = t | c + t | beta * c + t
 * in every ISA (the fallback uses fmaf), so its bits depend on its operands
 * alone: not on M, N, which rows share the call, the blocking, the thread
 * count or the ISA. */
#ifndef RL_GEMM_BUILTIN_H
#define RL_GEMM_BUILTIN_H

#include <stddef.h>
#include <stdint.h>

/* K blocking: a K longer than RL_GEMM_KMIN is summed in ceil(K / RL_GEMM_KC)
 * equal blocks, the fp32 partial sums stored and reloaded between blocks (the
 * same bits as one pass; measured to gain only once a panel outgrows L2's
 * share); here for the tests that cut K at the block edges. */
#define RL_GEMM_KC 512
#define RL_GEMM_KMIN 4096

typedef enum {
    RL_ISA_GENERIC = 0,   /* portable C, fmaf                     */
    RL_ISA_AVX2 = 1,      /* AVX2 + FMA, 6 x 16 register tile     */
    RL_ISA_AVX512 = 2,    /* AVX-512F, 12 x 32 register tile      */
    RL_ISA_COUNT
} rl_cpu_isa;

/* "generic", "avx2" or "avx512". */
const char *rl_gemm_isa_name(rl_cpu_isa isa);
/* 1 when this build has the ISA's kernel and this CPU (and OS) runs it. */
int rl_gemm_isa_available(rl_cpu_isa isa);
/* The ISA to use: RJEPA_CPU_ISA (avx512 | avx2 | generic) when set, else the
 * widest available. 0, or -1 with a message in err when the variable names
 * an unknown ISA or one this CPU lacks. */
int rl_gemm_isa_from_env(rl_cpu_isa *isa, char *err, size_t cap);

/* Row-major C[M, N] = beta * C + (alpha * A[M, K] op(B) + bias), op(B) = B^T
 * for B [N, K] (transb = 1) or B [K, N] (transb = 0); lda/ldb/ldc are row
 * strides; bias [N] or NULL. beta == 0: C is only written (it may hold NaN).
 * n_threads > 1 splits the column panels over OpenMP threads when not already
 * inside a parallel region. Returns 0, or -1 when its scratch could not be
 * allocated (C is then unspecified). */
int rl_gemm_f32(rl_cpu_isa isa, int transb, int64_t M, int64_t N, int64_t K, float alpha,
                const float *A, int64_t lda, const float *B, int64_t ldb, const float *bias,
                float beta, float *C, int64_t ldc, int n_threads);

/* NR of the ISA's kernel (the portable kernel's when this build or CPU
 * lacks the ISA, as rl_gemm_f32 falls back): 16 or 32. */
int rl_gemm_panel_width(rl_cpu_isa isa);
/* Floats of a packed W [N, K]: ceil(N / NR) * NR * max(K, 1). */
size_t rl_gemm_packed_floats(rl_cpu_isa isa, int64_t N, int64_t K);
/* Rows [r0, r0 + n) of W [N, K] (row r0 at W, row stride ldw) into `packed`
 * (rl_gemm_packed_floats of them), zeroing the padding columns when the rows
 * reach the last panel. Rows may come in any pieces (the parts of a fused
 * matrix); disjoint pieces may be written by different threads. */
void rl_gemm_pack_rows(rl_cpu_isa isa, int64_t N, int64_t K, int64_t r0, int64_t n,
                       const float *W, int64_t ldw, float *packed);
/* All of W [N, K]: rl_gemm_pack_rows(isa, N, K, 0, N, W, ldw, packed). */
void rl_gemm_pack_b(rl_cpu_isa isa, int64_t N, int64_t K, const float *W, int64_t ldw,
                    float *packed);
/* rl_gemm_f32 with transb = 1 and W [N, K] packed for `isa` (rl_gemm_pack_b):
 * bitwise the same result. */
int rl_gemm_f32_packed(rl_cpu_isa isa, int64_t M, int64_t N, int64_t K, float alpha,
                       const float *A, int64_t lda, const float *packed, const float *bias,
                       float beta, float *C, int64_t ldc, int n_threads);

/* rl_gemm_f32 without a bias, on the ISA rl_gemm_isa_from_env picks (the
 * widest available when RJEPA_CPU_ISA is unset or invalid). */
int rl_gemm_builtin(int transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                    int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc,
                    int n_threads);

#endif /* RL_GEMM_BUILTIN_H */
