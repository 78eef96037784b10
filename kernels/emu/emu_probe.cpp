// emu_probe.cpp - entry points for the emulated device's own tests
// (tests/test_emu_device.py calls them through ctypes): one warp running the
// emulated mma / ldmatrix on fragments the test lays out from the PTX ISA
// tables, and small kernels that use barriers right or wrong.
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

namespace rl_emu {
void set_order(int order, uint64_t seed); // emu_runtime.cpp
}

namespace {

cudaError_t run_on_one_block(unsigned threads, std::function<void()> body)
{
    cudaError_t e = ::rl_emu::launch("probe", dim3(1), dim3(threads), 0, nullptr, std::move(body));
    if (e != cudaSuccess) return e;
    return cudaStreamSynchronize(nullptr);
}

// a block-wide sum through shared memory, with or without its barriers
void block_sum_kernel(const float *in, float *out, int with_barrier)
{
    __shared__ float part[256];
    const int i = threadIdx.x;
    part[i] = in[i];
    if (with_barrier) __syncthreads();
    float s = 0.0f;
    for (unsigned j = 0; j < blockDim.x; j++) s += part[j];
    if (with_barrier) __syncthreads();
    out[i] = s;
}

} // namespace

extern "C" {

// lane l's mma.m16n8k16 operands a[4 l .. 4 l + 3], b[2 l], b[2 l + 1], c[4 l ..]
// (c updated in place to D = A B + C)
int rl_emu_probe_mma(const uint32_t *a, const uint32_t *b, float *c)
{
    return run_on_one_block(32, [a, b, c] {
        const int l = threadIdx.x;
        uint32_t ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
        float rc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
        ::rl_emu::mma_m16n8k16_bf16(rc, ra, b[2 * l], b[2 * l + 1], __LINE__);
        std::memcpy(c + 4 * l, rc, sizeof rc);
    });
}

// lane l passes base + row_offset[l] (in 16-bit elements) to ldmatrix.x2.trans; gets out[2 l], out[2 l + 1]
int rl_emu_probe_ldmatrix_x2_trans(const uint16_t *base, const int32_t *row_offset, uint32_t *out)
{
    return run_on_one_block(32, [base, row_offset, out] {
        const int l = threadIdx.x;
        uint32_t r0 = 0, r1 = 0;
        ::rl_emu::ldmatrix_x2_trans(r0, r1, base + row_offset[l], __LINE__);
        out[2 * l] = r0;
        out[2 * l + 1] = r1;
    });
}

// __shfl_xor_sync of each lane's value with lane ^ mask
int rl_emu_probe_shfl_xor(const float *in, int lane_mask, float *out)
{
    return run_on_one_block(32, [in, lane_mask, out] {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, in[threadIdx.x], lane_mask);
    });
}

// out[i] = sum(in[0 .. threads)) through shared memory; with_barrier = 0 drops the barriers
int rl_emu_probe_block_sum(const float *in, float *out, int threads, int with_barrier)
{
    return run_on_one_block((unsigned)threads, [in, out, with_barrier] {
        block_sum_kernel(in, out, with_barrier);
    });
}

// Misuses of barriers, each must end as an error with a diagnostic, never a hang:
// 1: a quarter of the block skips __syncthreads for a warp shuffle (deadlock)
// 2: even and odd threads wait at different __syncthreads
// 3: a warp shuffle that lane 31 skips (it has left the kernel)
// 4: lanes of one warp in different shuffles
int rl_emu_probe_misuse(int which)
{
    return run_on_one_block(64, [which] {
        const int i = threadIdx.x;
        if (which == 1) {
            if (i < 48) __syncthreads();
            else (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
        } else if (which == 2) {
            if (i % 2) __syncthreads();
            else __syncthreads();
        } else if (which == 3) {
            if (i == 31) return;
            (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
        } else if (which == 4) {
            if (i % 2) (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
            else (void)__shfl_xor_sync(0xffffffffu, 2.0f, 2);
        }
    });
}

// RJEPA_EMU_ORDER at run time: 0 forward, 1 reverse, 2 shuffle (seed)
void rl_emu_set_order(int order, unsigned long long seed) { ::rl_emu::set_order(order, seed); }

} // extern "C"
