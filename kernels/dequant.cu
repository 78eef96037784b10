// dequant.cu - dequantization of weights kept quantized (GGUF blocks, and
// the AWQ / GPTQ / FP8 layouts of csrc/quant_hf.h) on the device, for
// csrc/qweights.c through the backend's dequant ops.
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
// - AWQ and GPTQ store their words along the output features (the logical
//   matrix transposed): a block decodes a 32x32 tile with its threads
//   running along the stored rows (coalesced reads) and writes it back
//   through shared memory along the logical rows (coalesced writes). Each
//   weight is quant_hf.c's one rounding: (q - zero), exact, times the scale.
// - The host validated every HF tensor when it was set (part sizes, finite
//   scales, g_idx in range, no FP8 NaN: rl_qtensor_validate_hf), so the
//   kernels index the parts without checks.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_dequant.h"
#include "quant.h"
#include "quant_hf.h"

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

// ---- AWQ / GPTQ / FP8 (quant_hf.h) -------------------------------------------

__device__ __forceinline__ uint32_t ld32(const void *base, int64_t i)
{
    return static_cast<const uint32_t *>(base)[i];   // parts sit at 64-byte aligned offsets
}

__device__ __forceinline__ float hf_scale(const void *base, int dt, int64_t i)
{
    if (dt == RL_QHF_SCALE_F32) return bits_f32(ld32(base, i));
    const uint8_t *p = static_cast<const uint8_t *>(base) + 2 * i;
    if (dt == RL_QHF_SCALE_BF16) return bits_f32(((uint32_t)p[0] | (uint32_t)p[1] << 8) << 16);
    return f16(p);
}

// e4m3fn code -> float as quant_hf.c: a normal code is its fp32 bits with
// the exponent rebased, a subnormal one m * 2^-9 (exact); NaN codes were
// refused on the host.
__device__ __forceinline__ float e4m3(uint32_t b)
{
    const uint32_t em = b & 0x7Fu;
    const float mag = em < 8 ? mul_rn((float)(int32_t)em, 0.001953125f)   // 2^-9
                             : bits_f32((em << 20) + (120u << 23));
    union { float f; uint32_t u; } v;
    v.f = mag;
    return bits_f32(v.u | (b & 0x80u) << 24);
}

struct hf_desc {
    int family, bits, dt, minus_one;
    int64_t rows, cols, group, groups;
    const void *p0, *p1, *p2, *p3;
};

__device__ const int kAwqShift[8] = {0, 16, 4, 20, 8, 24, 12, 28};

// the weight at logical (r, c)
__device__ float hf_decode(const hf_desc &d, int64_t r, int64_t c)
{
    if (d.family == RL_QF_AWQ) {
        const int64_t words = d.rows / 8, g = c / d.group;
        const int sh = kAwqShift[r % 8];
        const uint32_t q = (ld32(d.p0, c * words + r / 8) >> sh) & 15u;
        const float z = d.p1 ? (float)(int32_t)((ld32(d.p1, g * words + r / 8) >> sh) & 15u) : 8.0f;
        return mul_rn((float)(int32_t)q - z, hf_scale(d.p2, d.dt, g * d.rows + r));
    }
    if (d.family == RL_QF_GPTQ) {
        const int bits = d.bits, pf = 32 / bits;
        const uint32_t mask = (1u << bits) - 1u;
        const int64_t g = d.p3 ? (int64_t)(int32_t)ld32(d.p3, c) : c / d.group;
        const uint32_t q = (ld32(d.p0, (c / pf) * d.rows + r) >> (bits * (int)(c % pf))) & mask;
        const uint32_t zf = d.p1 ? ((ld32(d.p1, g * (d.rows / pf) + r / pf) >>
                                     (bits * (int)(r % pf))) & mask) + (d.minus_one ? 1u : 0u)
                                 : 1u << (bits - 1);
        return mul_rn((float)(int32_t)q - (float)zf, hf_scale(d.p2, d.dt, g * d.rows + r));
    }
    // FP8 block scales: [ceil(rows / B), ceil(cols / B)]
    const int64_t B = d.group, scols = (d.cols + B - 1) / B;
    const uint8_t q = static_cast<const uint8_t *>(d.p0)[r * d.cols + c];
    return mul_rn(e4m3(q), hf_scale(d.p1, d.dt, (r / B) * scols + c / B));
}

__device__ __forceinline__ void put(void *out, int64_t i, float v, int out_f32)
{
    if (out_f32) static_cast<float *>(out)[i] = v;
    else static_cast<__nv_bfloat16 *>(out)[i] = __float2bfloat16_rn(v);
}

#define HF_TILE 32
#define HF_ROWS 8   // blockDim.y: each thread does HF_TILE / HF_ROWS elements per tile

// AWQ / GPTQ: rows [r0, r1) through 32x32 tiles (see the design notes)
__global__ void k_dequant_hf_t(hf_desc d, int64_t r0, int64_t r1, void *out, int out_f32)
{
    __shared__ float tile[HF_TILE][HF_TILE + 1];
    const int64_t tr = (r1 - r0 + HF_TILE - 1) / HF_TILE, tc = (d.cols + HF_TILE - 1) / HF_TILE;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int64_t t = blockIdx.x; t < tr * tc; t += gridDim.x) {
        const int64_t rb = r0 + (t / tc) * HF_TILE, cb = (t % tc) * HF_TILE;
        for (int k = ty; k < HF_TILE; k += HF_ROWS) {   // threads along the stored rows
            const int64_t r = rb + tx, c = cb + k;
            if (r < r1 && c < d.cols) tile[k][tx] = hf_decode(d, r, c);
        }
        __syncthreads();
        for (int k = ty; k < HF_TILE; k += HF_ROWS) {   // threads along the logical rows
            const int64_t r = rb + k, c = cb + tx;
            if (r < r1 && c < d.cols) put(out, (r - r0) * d.cols + c, tile[tx][k], out_f32);
        }
        __syncthreads();
    }
}

// FP8 (stored row-major, as the output): one thread per element
__global__ void k_dequant_hf_e(hf_desc d, int64_t r0, int64_t n, void *out, int out_f32)
{
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += step)
        put(out, i, hf_decode(d, r0 + i / d.cols, i % d.cols), out_f32);
}

__global__ void k_dequant_hf_gather(hf_desc d, const int32_t *__restrict__ tokens,
                                    float *__restrict__ x, float scale, int round_bf16)
{
    const int64_t t = blockIdx.x;
    for (int64_t c = threadIdx.x; c < d.cols; c += blockDim.x) {
        float v = hf_decode(d, tokens[t], c);
        if (round_bf16) v = __bfloat162float(__float2bfloat16_rn(v));
        x[t * d.cols + c] = v * scale;
    }
}

size_t hf_scale_size(int dt) { return dt == RL_QHF_SCALE_F32 ? 4 : 2; }

// the descriptor of a validated tensor; family 0 when it is not AWQ/GPTQ/FP8
hf_desc hf_desc_of(const rl_qtensor *q)
{
    hf_desc d = {};
    const int dt = RL_QHF_SCALE_DTYPE(q->subtype);
    if ((q->family != RL_QF_AWQ && q->family != RL_QF_GPTQ && q->family != RL_QF_FP8_BLOCK) ||
        q->rows <= 0 || q->cols <= 0 || q->group < 0 || !q->part[0] ||
        (dt != RL_QHF_SCALE_F16 && dt != RL_QHF_SCALE_BF16 && dt != RL_QHF_SCALE_F32))
        return d;
    d.family = q->family;
    d.bits = RL_QHF_BITS(q->subtype);
    d.dt = dt;
    d.minus_one = (q->subtype & RL_QHF_ZERO_MINUS_ONE) != 0;
    d.rows = q->rows;
    d.cols = q->cols;
    d.group = q->group;
    d.p0 = q->part[0];
    d.p1 = q->part[1];
    d.p2 = q->part[2];
    d.p3 = q->part[3];
    if (q->family == RL_QF_GPTQ) {
        if ((d.bits != 2 && d.bits != 4 && d.bits != 8) || !d.p2) return hf_desc{};
        d.groups = (int64_t)(q->part_bytes[2] / ((size_t)q->rows * hf_scale_size(dt)));
        if (!d.p3 && d.group <= 0) return hf_desc{};
    } else if (q->family == RL_QF_AWQ) {
        if (d.bits != 4 || d.group <= 0 || !d.p2) return hf_desc{};
    } else if (d.group <= 0 || !d.p1) {
        return hf_desc{};
    }
    return d;
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

int rl_k_dequant_hf_supports(const rl_qtensor *q) { return hf_desc_of(q).family != 0; }

cudaError_t rl_k_dequant_hf(cudaStream_t s, const rl_qtensor *q, int64_t r0, int64_t r1,
                            void *out, int out_f32)
{
    const hf_desc d = hf_desc_of(q);
    if (!d.family || r0 < 0 || r1 < r0 || r1 > d.rows) return cudaErrorInvalidValue;
    if (r1 == r0) return cudaSuccess;
    if (d.family == RL_QF_FP8_BLOCK) {
        const int64_t n = (r1 - r0) * d.cols;
        RL_LAUNCH(grid_of(n), 256, 0, s, k_dequant_hf_e)(d, r0, n, out, out_f32);
    } else {
        const int64_t tiles = ((r1 - r0 + HF_TILE - 1) / HF_TILE) * ((d.cols + HF_TILE - 1) / HF_TILE);
        const unsigned grid = (unsigned)(tiles < 65536 ? tiles : 65536);
        RL_LAUNCH(grid, dim3(HF_TILE, HF_ROWS), 0, s, k_dequant_hf_t)(d, r0, r1, out, out_f32);
    }
    return cudaGetLastError();
}

cudaError_t rl_k_dequant_hf_gather(cudaStream_t s, const rl_qtensor *q, const int32_t *tokens,
                                   int64_t T, float *x, float scale, int round_bf16)
{
    const hf_desc d = hf_desc_of(q);
    if (!d.family || T > 0x7fffffff) return cudaErrorInvalidValue;
    if (T == 0) return cudaSuccess;
    RL_LAUNCH((unsigned)T, 128, 0, s, k_dequant_hf_gather)(d, tokens, x, scale, round_bf16);
    return cudaGetLastError();
}

} // extern "C"
