/* cuda_stub.c - the CUDA entry points of cuda_entry.h for a CPU-only build.
 *
 * Always compiled; empty with RL_WITH_CUDA (the real ones come from
 * kernels/). Without it, asking for CUDA fails with a clear RL_ERR_DEVICE
 * instead of a link error, and the queries answer "nothing".
 */
#include "cuda_entry.h"

#include <string.h>

#ifndef RL_WITH_CUDA

#define RL_NO_CUDA_MSG "CUDA is not built in (this build of rjepa_latent is CPU-only; " \
                       "rebuild with nvcc available or RJEPA_CUDA=1)"

rl_status rl_backend_cuda_create(int device_index, rl_backend **out)
{
    *out = NULL;
    return RL_FAIL(RL_ERR_DEVICE, RL_NO_CUDA_MSG);
}

rl_status rl_backend_cuda_create_ex(int device_index, rl_dtype dtype, rl_backend **out)
{
    (void)dtype;
    return rl_backend_cuda_create(device_index, out);
}

int rl_cuda_compiled(void) { return 0; }

rl_status rl_cuda_caps(rl_backend_caps *out)
{
    memset(out, 0, sizeof *out);
    return RL_FAIL(RL_ERR_DEVICE, RL_NO_CUDA_MSG);
}

rl_status rl_cuda_mem_info(int device_index, size_t *free_bytes, size_t *total_bytes)
{
    *free_bytes = *total_bytes = 0;
    return RL_FAIL(RL_ERR_DEVICE, RL_NO_CUDA_MSG);
}

int rl_cuda_device_count(void) { return 0; }

rl_status rl_cuda_check_device(int device_index) { return RL_FAIL(RL_ERR_DEVICE, RL_NO_CUDA_MSG); }

void rl_cuda_pinned_pool_stats(rl_pinned_pool_stats *out) { memset(out, 0, sizeof *out); }

void rl_cuda_pinned_pool_trim(void) {}

#else  /* RL_WITH_CUDA: kernels/cuda_backend.c defines all of the above */
typedef int rl_cuda_stub_unused_; /* ISO C forbids an empty translation unit */
#endif
