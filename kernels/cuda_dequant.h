/* cuda_dequant.h - launchers of the dequantization kernels (dequant.cu) for
 * weights kept quantized: GGUF blocks (quant.h) into bf16 or f32. */
#ifndef RL_CUDA_DEQUANT_H
#define RL_CUDA_DEQUANT_H

#include <stdint.h>
#include <cuda_runtime_api.h>

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

#ifdef __cplusplus
}
#endif
#endif /* RL_CUDA_DEQUANT_H */
