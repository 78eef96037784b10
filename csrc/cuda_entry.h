/* cuda_entry.h - the CUDA backend's entry points: kernels/cuda_backend.c in a
 * CUDA build, cuda_stub.c (each fails with "CUDA is not built in") in a
 * CPU-only one. */
#ifndef RL_CUDA_ENTRY_H
#define RL_CUDA_ENTRY_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A CUDA backend on device_index. On failure *out is NULL and the message
 * says why (e.g. "CUDA is not built in"). */
rl_status rl_backend_cuda_create(int device_index, rl_backend **out);
/* The same with a storage dtype: RL_BF16 (what rl_backend_cuda_create
 * makes: bf16 weights and GEMM operands, f32 residual) or RL_F32 (everything
 * f32, fp32 GEMMs without TF32: the parity reference); RL_ERR_INVALID
 * otherwise. */
rl_status rl_backend_cuda_create_ex(int device_index, rl_dtype dtype, rl_backend **out);
int rl_cuda_compiled(void);
/* The CUDA backend's capabilities (rl_backend_caps_get(N >= 0) answers with
 * them); RL_ERR_DEVICE when CUDA is not built in. */
rl_status rl_cuda_caps(rl_backend_caps *out);
/* free/total bytes of a CUDA device without creating a backend. */
rl_status rl_cuda_mem_info(int device_index, size_t *free_bytes, size_t *total_bytes);
/* A snapshot of the pool (all zeros when CUDA is not built in). */
void rl_cuda_pinned_pool_stats(rl_pinned_pool_stats *out);
/* Frees every cached block now (blocks held by results are not touched). */
void rl_cuda_pinned_pool_trim(void);
/* Number of usable CUDA devices: 0 when not compiled in, no driver or no
 * device (never fails). */
int rl_cuda_device_count(void);
/* RL_OK if `device_index` can be used, else RL_ERR_DEVICE saying why (not
 * compiled in / no driver / no device / index out of range). */
rl_status rl_cuda_check_device(int device_index);

#ifdef __cplusplus
}
#endif
#endif /* RL_CUDA_ENTRY_H */
