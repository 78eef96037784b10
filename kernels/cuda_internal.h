/* cuda_internal.h - private declarations shared by the CUDA backend files.
 *
 * The backend is split by language:
 * - cuda_backend.c   (C, compiled with the engine sources when RL_WITH_CUDA):
 *   the rl_backend object, device checks and the current-device scope,
 *   memory and the pinned result pool, uploads with host-side dtype
 *   conversion (OpenMP) into pinned staging buffers, GEMM via cuBLAS.
 * - cublas_loader.c  (C): dlopen()s libcublas at backend creation and
 *   resolves the few entry points used, with our own typedefs and constants
 *   (no cuBLAS header or library is needed to build).
 * - cuda_kernels.cu  (CUDA C++): the element-wise / reduction / attention
 *   kernels, behind extern "C" launchers that return the cudaError_t of the
 *   launch (cudaGetLastError right after it).
 *
 * In the default mode all tensors here are bf16 (stored as uint16_t bit
 * patterns), except the residual stream and pooled outputs (f32) and rope
 * inv_freq (f32). In the fp32 mode (rl_backend_cuda_create_ex with RL_F32)
 * weights and GEMM operands are f32 too; the launchers take void pointers
 * and an f32 flag for the element type of weights / activations.
 */
#ifndef RL_CUDA_INTERNAL_H
#define RL_CUDA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#include "engine.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- cuBLAS, loaded at run time (cublas_loader.c) --------------------- */

/* Values checked against cublas_api.h / library_types.h of cuBLAS 13 by
 * tests/test_cuda_build.py (when RJEPA_CUBLAS_INCLUDE points at headers). */
typedef struct rl_cublas_context *rl_cublas_handle;
typedef int rl_cublas_status;
enum {
    RL_CUBLAS_STATUS_SUCCESS = 0,
    RL_CUBLAS_OP_N = 0,
    RL_CUBLAS_OP_T = 1,
    RL_CUBLAS_DEFAULT_MATH = 0,
    /* a flag or'ed into the math mode: split-K and other reductions keep the
       compute type (f32), never the output type (bf16) */
    RL_CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,
    RL_CUBLAS_COMPUTE_32F = 68,
    RL_CUBLAS_GEMM_DEFAULT = -1,
    RL_CUDA_R_32F = 0,
    RL_CUDA_R_16BF = 14
};

typedef struct {
    void *lib;            /* dlopen handle of libcublas                        */
    char path[1024];      /* where it was found (for messages)                 */
    rl_cublas_status (*create)(rl_cublas_handle *h);
    rl_cublas_status (*destroy)(rl_cublas_handle h);
    rl_cublas_status (*set_stream)(rl_cublas_handle h, cudaStream_t s);
    rl_cublas_status (*set_workspace)(rl_cublas_handle h, void *ws, size_t bytes);
    rl_cublas_status (*set_math_mode)(rl_cublas_handle h, int mode);
    rl_cublas_status (*gemm_ex)(rl_cublas_handle h, int transa, int transb, int m, int n, int k,
                                const void *alpha, const void *A, int Atype, int lda,
                                const void *B, int Btype, int ldb, const void *beta, void *C,
                                int Ctype, int ldc, int compute_type, int algo);
    const char *(*status_string)(rl_cublas_status st); /* may be NULL */
    rl_cublas_status (*get_version)(rl_cublas_handle h, int *version);
} rl_cublas_api;

/* Finds and opens libcublas (see cublas_loader.c for the search order);
 * RL_ERR_DEVICE with a message naming the places tried and the fix. */
rl_status rl_cublas_load(rl_cublas_api *api);
void rl_cublas_unload(rl_cublas_api *api);

/* ---- kernel launchers (cuda_kernels.cu) ------------------------------- */
/* Each enqueues on `s` and returns cudaGetLastError() of the launch. */

/* f32 / table_f32 / x_f32 / w_f32 / bias_f32: that operand is float, else bf16. */

/* x[t, :] = f32(table[tokens[t], :]) * scale (scale 1: the row's exact values) */
cudaError_t rl_k_embed(cudaStream_t s, const int32_t *tokens, int64_t T, const void *table,
                       int table_f32, int64_t d, float scale, float *x);
/* rl_k_rmsnorm's `out`: where y = rmsnorm(x) * (w + w_off) goes */
enum {
    RL_K_NORM_BF16 = 0,    /* y bf16, overwritten                                  */
    RL_K_NORM_F32 = 1,     /* y f32, overwritten                                   */
    RL_K_NORM_ADD_F32 = 2  /* y f32 += (a post-norm added into the residual)       */
};
cudaError_t rl_k_rmsnorm(cudaStream_t s, const void *x, int x_f32, const void *w, int w_f32,
                         float w_off, void *y, int out, int64_t rows, int64_t d, float eps);
/* y[M, N] (bf16 or f32) = bias broadcast ([N]) ; add=1: y += bias (f32 y only);
 * an f32 bias needs an f32 y */
cudaError_t rl_k_bias_rows(cudaStream_t s, void *y, int y_f32, const void *bias, int bias_f32,
                           int64_t M, int64_t N, int add);
/* q/k RMSNorm (q_norm, k_norm both set, or both NULL: none) times (w + w_off),
 * per head (whole=0: weights [hd]) or over the token's whole q and k
 * projections (whole=1: weights [nh*hd] and [nkv*hd]); then RoPE. In place. */
cudaError_t rl_k_qk_norm_rope(cudaStream_t s, void *qkv, int f32, int64_t T, int64_t nh,
                              int64_t nkv, int64_t hd, const void *q_norm, const void *k_norm,
                              int whole, float w_off, float eps, const float *inv_freq,
                              const int32_t *positions);
/* Head dims the attention kernel is instantiated for; 1 if `hd` is one. */
int rl_k_attention_supports(int64_t hd);
/* f32: q/k/v and out are float (always the FMA kernel); else bf16, on
 * tensor cores when use_mma. Logits: s = q.k * scale, then with softcap > 0
 * s = softcap * tanh(s / softcap); window > 0: query i sees keys j with
 * i - window < j <= i (0: every j <= i). */
cudaError_t rl_k_attention(cudaStream_t s, const void *qkv, void *out, int f32,
                           const int32_t *cu_seqlens, int64_t n_seqs, int64_t max_seqlen,
                           int64_t nh, int64_t nkv, int64_t hd, float scale, float softcap,
                           int64_t window, int use_mma);
/* rl_k_glu's activation of the gate */
enum { RL_K_ACT_SILU = 0, RL_K_ACT_GELU_TANH = 1 };
/* out[T, ff] = act(gu[:, :ff]) * gu[:, ff:] */
cudaError_t rl_k_glu(cudaStream_t s, const void *gu, void *out, int f32, int64_t T, int64_t ff,
                     int act);
/* dst[0..n) = src[0..n), f32 <-> bf16 (round to nearest even) or a plain copy */
cudaError_t rl_k_cast(cudaStream_t s, const void *src, int src_f32, void *dst, int dst_f32,
                      int64_t n);
cudaError_t rl_k_pool(cudaStream_t s, const void *x, int x_f32, int64_t d, const int32_t *spans,
                      int64_t S, int mode, float *out);

#ifdef __cplusplus
}
#endif
#endif /* RL_CUDA_INTERNAL_H */
