/* cuda_stub.c - the CUDA entry points of engine.h for a CPU-only build.
 *
 * Always compiled. Without RL_WITH_CUDA it defines the CUDA functions so that
 * asking for CUDA fails with a clear RL_ERR_DEVICE instead of a link error;
 * with RL_WITH_CUDA the real ones come from kernels/. The two device queries
 * the binding uses (rl_cuda_device_count, rl_cuda_check_device) also get weak
 * fallbacks built on rl_cuda_mem_info for CUDA builds whose kernels/ does not
 * define them.
 */
#include "common.h"

#define RL_NO_CUDA_MSG "CUDA is not built in (this build of rjepa_latent is CPU-only; " \
                       "rebuild with nvcc available or RJEPA_CUDA=1)"

#ifndef RL_WITH_CUDA

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

rl_status rl_cuda_mem_info(int device_index, size_t *free_bytes, size_t *total_bytes)
{
    *free_bytes = *total_bytes = 0;
    return RL_FAIL(RL_ERR_DEVICE, RL_NO_CUDA_MSG);
}

int rl_cuda_device_count(void) { return 0; }

rl_status rl_cuda_check_device(int device_index) { return RL_FAIL(RL_ERR_DEVICE, RL_NO_CUDA_MSG); }

#else /* RL_WITH_CUDA: fallbacks, overridden by strong definitions in kernels/ */

__attribute__((weak)) rl_status rl_cuda_check_device(int device_index)
{
    size_t f, t;
    if (device_index < 0)
        return RL_FAIL(RL_ERR_DEVICE, "CUDA device index must be >= 0, got %d", device_index);
    return rl_cuda_mem_info(device_index, &f, &t);
}

__attribute__((weak)) int rl_cuda_device_count(void)
{
    int n = 0;
    size_t f, t;
    while (n < 64 && rl_cuda_mem_info(n, &f, &t) == RL_OK) n++;
    return n;
}

#endif
