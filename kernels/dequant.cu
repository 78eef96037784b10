// dequant.cu - dequantization of weights kept quantized (GGUF blocks) on
// the device, for csrc/qweights.c through the backend's dequant ops.
//
// Design choices:
// - One thread per output element: it reads its block's scale(s) and its
//   own quant bits. Blocks are small (18-210 bytes) and neighbouring
//   threads read the same block, so the reads coalesce and hit the cache;
//   the kernel is memory-bound on the output, which is written once.
// - The float operations and their order are quant.c's (gguf-py's): the
//   scale product, the value product, then the min as a separate rounding;
//   the device intrinsics (__fmul_rn, __fadd_rn) keep nvcc from fusing them
//   into an FMA, so the f32 values equal the CPU's bitwise and a bf16 output
//   is their round-to-nearest-even, as an upload of the dequantized weights.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_dequant.h"
#include "quant.h"

#ifndef RL_LAUNCH
#define RL_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif

namespace {

__device__ __forceinline__ float mul_rn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

__device__ __forceinline__ float add_rn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

__device__ __forceinline__ float bits_f32(uint32_t u)
{
    union { uint32_t u; float f; } v;
    v.u = u;
    return v.f;
}

// float16 bits -> float, exact (subnormals included), as quant.c
__device__ __forceinline__ float f16(const uint8_t *p)
{
    const uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        const float v = (float)man * 5.9604644775390625e-08f;   // 2^-24
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

__device__ const int8_t kIQ4[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                    1, 13, 25, 38, 53, 69, 89, 113};

__device__ __forceinline__ int nibble(const uint8_t *qs, int j, int half)
{
    return j < half ? qs[j] & 0xF : qs[j - half] >> 4;
}

__device__ __forceinline__ void scale_min_k4(const uint8_t *s, int i, int *sc, int *mn)
{
    if (i < 4) {
        *sc = s[i] & 0x3F;
        *mn = s[i + 4] & 0x3F;
    } else {
        *sc = (s[i + 4] & 0x0F) | ((s[i - 4] >> 2) & 0x30);
        *mn = (s[i + 4] >> 4) | ((s[i] >> 2) & 0x30);
    }
}

// element o of the block at b
__device__ float decode(int type, const uint8_t *b, int o)
{
    switch (type) {
    case RL_GGML_F32: {
        const uint32_t u = (uint32_t)b[4 * o] | (uint32_t)b[4 * o + 1] << 8 |
                           (uint32_t)b[4 * o + 2] << 16 | (uint32_t)b[4 * o + 3] << 24;
        return bits_f32(u);
    }
    case RL_GGML_F16: return f16(b + 2 * o);
    case RL_GGML_BF16: return bits_f32(((uint32_t)b[2 * o] | (uint32_t)b[2 * o + 1] << 8) << 16);
    case RL_GGML_Q4_0: return mul_rn(f16(b), (float)(nibble(b + 2, o, 16) - 8));
    case RL_GGML_Q4_1: return add_rn(mul_rn(f16(b), (float)nibble(b + 4, o, 16)), f16(b + 2));
    case RL_GGML_Q5_0: case RL_GGML_Q5_1: {
        const int q1 = type == RL_GGML_Q5_1;
        const uint8_t *h = b + (q1 ? 4 : 2);
        const int bit = (h[o / 8] >> (o % 8)) & 1;
        const int v = nibble(h + 4, o, 16) | bit << 4;
        return q1 ? add_rn(mul_rn(f16(b), (float)v), f16(b + 2)) : mul_rn(f16(b), (float)(v - 16));
    }
    case RL_GGML_Q8_0: return mul_rn((float)(int8_t)b[2 + o], f16(b));
    case RL_GGML_IQ4_NL: return mul_rn(f16(b), (float)kIQ4[nibble(b + 2, o, 16)]);
    case RL_GGML_Q2_K: {
        const int g = o / 16, sc = b[g];
        const float dl = mul_rn(f16(b + 80), (float)(sc & 0xF));
        const float ml = mul_rn(f16(b + 82), (float)(sc >> 4));
        const int q = (b[16 + (o / 128) * 32 + o % 32] >> (2 * ((o % 128) / 32))) & 3;
        return add_rn(mul_rn(dl, (float)q), -ml);
    }
    case RL_GGML_Q3_K: {
        const int g = o / 16;
        const uint8_t *sc = b + 96;
        const int lo = (sc[g % 8] >> (4 * (g / 8))) & 0xF, hi = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
        const float dl = mul_rn(f16(b + 108), (float)((int8_t)(uint8_t)(lo | hi << 4) - 32));
        const int low = (b[32 + (o / 128) * 32 + o % 32] >> (2 * ((o % 128) / 32))) & 3;
        const int high = ((b[o % 32] >> (o / 32)) & 1) ^ 1;
        return mul_rn(dl, (float)(low - (high << 2)));
    }
    case RL_GGML_Q4_K: case RL_GGML_Q5_K: {
        const int i = o / 32, k5 = type == RL_GGML_Q5_K;
        int sc, mn;
        scale_min_k4(b + 4, i, &sc, &mn);
        const float dl = mul_rn(f16(b), (float)sc), ml = mul_rn(f16(b + 2), (float)mn);
        const uint8_t *qs = b + (k5 ? 48 : 16);
        int q = (qs[(i / 2) * 32 + o % 32] >> (4 * (i % 2))) & 0xF;
        if (k5) q |= ((b[16 + o % 32] >> i) & 1) << 4;
        return add_rn(mul_rn(dl, (float)q), -ml);
    }
    case RL_GGML_Q6_K: {
        const int h = o / 128, r = o % 128;
        const float dl = mul_rn(f16(b + 208), (float)(int8_t)b[192 + o / 16]);
        const int lo = (b[h * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
        const int hi = (b[128 + h * 32 + r % 32] >> (2 * (r / 32))) & 3;
        return mul_rn(dl, (float)((int8_t)(uint8_t)(lo | hi << 4) - 32));
    }
    case RL_GGML_IQ4_XS: {
        const int ib = o / 32;
        const unsigned sh = (unsigned)b[2] | (unsigned)b[3] << 8;
        const int lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF, hi = (sh >> (2 * ib)) & 3;
        const float dl = mul_rn(f16(b), (float)((int8_t)(uint8_t)(lo | hi << 4) - 32));
        return mul_rn(dl, (float)kIQ4[nibble(b + 8 + ib * 16, o % 32, 16)]);
    }
    default: return 0.0f;
    }
}

struct type_shape {
    int block, bytes;
};

type_shape shape_of(int type)
{
    int64_t b = 0, n = 0;
    if (!rl_gguf_type_info(type, &b, &n)) return {0, 0};
    return {(int)b, (int)n};
}

__global__ void k_dequant(int type, int block, int bytes, const uint8_t *__restrict__ src,
                          size_t row_bytes, int64_t cols, int64_t r0, int64_t n, void *out,
                          int out_f32)
{
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += step) {
        const int64_t r = i / cols, c = i % cols;
        const uint8_t *b = src + (size_t)(r0 + r) * row_bytes + (size_t)(c / block) * bytes;
        const float v = decode(type, b, (int)(c % block));
        if (out_f32) static_cast<float *>(out)[i] = v;
        else static_cast<__nv_bfloat16 *>(out)[i] = __float2bfloat16_rn(v);
    }
}

__global__ void k_dequant_gather(int type, int block, int bytes, const uint8_t *__restrict__ src,
                                 size_t row_bytes, int64_t cols, const int32_t *__restrict__ tokens,
                                 float *__restrict__ x, float scale, int round_bf16)
{
    const int64_t t = blockIdx.x;
    const uint8_t *row = src + (size_t)tokens[t] * row_bytes;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = decode(type, row + (size_t)(c / block) * bytes, (int)(c % block));
        if (round_bf16) v = __bfloat162float(__float2bfloat16_rn(v));
        x[t * cols + c] = v * scale;
    }
}

unsigned grid_of(int64_t n)
{
    int64_t g = (n + 255) / 256;
    return (unsigned)(g < 1 ? 1 : g < 65536 ? g : 65536);
}

} // namespace

extern "C" {

int rl_k_dequant_supports(int ggml_type) { return shape_of(ggml_type).block > 0; }

cudaError_t rl_k_dequant_gguf(cudaStream_t s, int ggml_type, const void *blocks, size_t row_bytes,
                              int64_t cols, int64_t r0, int64_t r1, void *out, int out_f32)
{
    const type_shape ts = shape_of(ggml_type);
    if (!ts.block || cols <= 0 || r1 < r0) return cudaErrorInvalidValue;
    const int64_t n = (r1 - r0) * cols;
    if (n == 0) return cudaSuccess;
    RL_LAUNCH(grid_of(n), 256, 0, s, k_dequant)(ggml_type, ts.block, ts.bytes,
                                              static_cast<const uint8_t *>(blocks), row_bytes,
                                              cols, r0, n, out, out_f32);
    return cudaGetLastError();
}

cudaError_t rl_k_dequant_gather(cudaStream_t s, int ggml_type, const void *blocks,
                                size_t row_bytes, int64_t cols, const int32_t *tokens, int64_t T,
                                float *x, float scale, int round_bf16)
{
    const type_shape ts = shape_of(ggml_type);
    if (!ts.block || cols <= 0 || T > 0x7fffffff) return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    RL_LAUNCH((unsigned)T, 128, 0, s, k_dequant_gather)(ggml_type, ts.block, ts.bytes,
                                                      static_cast<const uint8_t *>(blocks),
                                                      row_bytes, cols, tokens, x, scale,
                                                      round_bf16);
    return cudaGetLastError();
}

} // extern "C"
