// cuda_runtime.h - the emulated device's stand-in for the CUDA runtime header
// (RJEPA_CUDA=emu builds only). In C it is the runtime API; in C++ it adds
// what kernel source needs to compile with the host compiler: the kernel
// qualifiers, vector types, threadIdx / blockIdx / blockDim / gridDim (the
// running emulated thread's, see kernels/emu/emu_runtime.cpp), __syncthreads,
// __shfl_xor_sync, the bf16 mma / ldmatrix warp operations and the launch
// behind RL_LAUNCH. __shared__ variables are thread_local statics: each block
// runs on one worker thread at a time, so the worker's copy is the block's
// shared memory.
#ifndef RL_EMU_CUDA_RUNTIME_H
#define RL_EMU_CUDA_RUNTIME_H

#include "cuda_runtime_api.h"

#ifdef __cplusplus
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

#define RL_EMU_DEVICE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define __constant__ static const

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// CUDA's device math overloads that glibc lacks
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

namespace rl_emu {

inline uint32_t f32_to_bits(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_to_f32(uint32_t u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// The running emulated thread's indices (set by the block scheduler).
struct ThreadCtx {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
extern __thread ThreadCtx *tls_cur;

void syncthreads(int line);
// Warp collectives: every lane in `mask` arrives with its words; returns the
// 32 lanes' words (valid until the warp's next collective).
const uint64_t *warp_exchange(unsigned mask, int kind, int line, const uint64_t *words, int n);
int lane_id();
enum { COLL_SHFL = 1, COLL_MMA = 2, COLL_LDMATRIX = 3 };

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width, int line)
{
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t w = 0;
    std::memcpy(&w, &v, sizeof(T));
    const uint64_t *all = warp_exchange(mask, COLL_SHFL, line, &w, 1);
    const int lane = lane_id();
    int src = lane ^ lane_mask;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane; // outside the segment
    T r;
    std::memcpy(&r, &all[src * 16], sizeof(T));
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (D = A B + C, in place on c)
void mma_m16n8k16_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, int line);
// ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16
void ldmatrix_x2_trans(uint32_t &r0, uint32_t &r1, const void *row_addr, int line);

// Enqueues `body` (one emulated thread's run of the kernel) as a grid on `s`.
cudaError_t launch(const char *name, dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                   std::function<void()> body);

template <typename... P>
struct Launcher {
    void (*fn)(P...);
    const char *name;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    template <typename... A>
    void operator()(A &&...args) const
    {
        auto bound = std::make_tuple(static_cast<P>(std::forward<A>(args))...);
        auto f = fn;
        (void)launch(name, grid, block, smem, stream, [f, bound]() { std::apply(f, bound); });
    }
};
template <typename... P>
Launcher<P...> make_launcher(void (*fn)(P...), const char *name, dim3 grid, dim3 block,
                             size_t smem, cudaStream_t stream)
{
    return Launcher<P...>{fn, name, grid, block, smem, stream};
}

} // namespace rl_emu

#define threadIdx (static_cast<const uint3 &>(::rl_emu::tls_cur->thread_idx))
#define blockIdx (static_cast<const uint3 &>(::rl_emu::tls_cur->block_idx))
#define blockDim (static_cast<const dim3 &>(::rl_emu::tls_cur->block_dim))
#define gridDim (static_cast<const dim3 &>(::rl_emu::tls_cur->grid_dim))
#define warpSize 32
#define __syncthreads() ::rl_emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, ...) ::rl_emu::shfl_xor((mask), (v), __VA_ARGS__, 32, __LINE__)

// RL_LAUNCH(grid, block, smem, stream, kernel)(args...): kernel<<<grid, block, smem, stream>>>
#define RL_LAUNCH(grid, block, smem, stream, ...) \
    ::rl_emu::make_launcher(__VA_ARGS__, #__VA_ARGS__, (grid), (block), (smem), (stream))

#endif // __cplusplus
#endif // RL_EMU_CUDA_RUNTIME_H
