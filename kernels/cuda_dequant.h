/* cuda_dequant.h - launchers of the dequantization kernels (dequant.cu) for
 * weights kept quantized: GGUF blocks (quant.h) and the AWQ / GPTQ / FP8
 * layouts (quant_hf.h) into bf16 or f32. */
#ifndef RL_CUDA_DEQUANT_H
#define RL_CUDA_DEQUANT_H

#include <stdint.h>
#include <cuda_runtime_api.h>

#include "quant.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when the kernels decode GGML type `ggml_type`. */
int rl_k_dequant_supports(int ggml_type);
/* out[(r - r0), :] = rows [r0, r1) of the GGUF tensor at `blocks` (device
 * memory, row_bytes per row, cols values per row), as bf16 (round to nearest
 * even) or f32 (out_f32); the f32 values are gguf-py's bitwise. */
cudaError_t rl_k_dequant_gguf(cudaStream_t s, int ggml_type, const void *blocks, size_t row_bytes,
                              int64_t cols, int64_t r0, int64_t r1, void *out, int out_f32);
/* x[t, :] = row tokens[t] * scale (f32 x; round_bf16: each value rounded to
 * bf16 first, as an embedding stored in bf16 would be). */
cudaError_t rl_k_dequant_gather(cudaStream_t s, int ggml_type, const void *blocks,
                                size_t row_bytes, int64_t cols, const int32_t *tokens, int64_t T,
                                float *x, float scale, int round_bf16);

/* 1 when the kernels decode `q`, an AWQ / GPTQ / FP8 descriptor whose
 * parts are device memory; the caller validated it on the host
 * (rl_qtensor_validate_hf) before its bytes were uploaded. */
int rl_k_dequant_hf_supports(const rl_qtensor *q);
/* out[(r - r0), :] = rows [r0, r1) of q's logical weight as f32 (out_f32;
 * csrc/quant_hf.c's values bitwise) or bf16 (those rounded to nearest even). */
cudaError_t rl_k_dequant_hf(cudaStream_t s, const rl_qtensor *q, int64_t r0, int64_t r1,
                            void *out, int out_f32);
/* x[t, :] = row tokens[t] of q * scale, as rl_k_dequant_gather. */
cudaError_t rl_k_dequant_hf_gather(cudaStream_t s, const rl_qtensor *q, const int32_t *tokens,
                                   int64_t T, float *x, float scale, int round_bf16);

#ifdef __cplusplus
}
#endif
#endif /* RL_CUDA_DEQUANT_H */
