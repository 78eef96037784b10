// cuda_kernels.cu - the CUDA kernels of the backend (all but the GEMMs,
// which are cuBLAS), each behind an extern "C" launcher in cuda_internal.h.
//
// Design choices:
// - bf16 storage, f32 arithmetic everywhere; one rounding per output.
// - The fp32 mode of the backend (rl_backend_cuda_create_ex(.., RL_F32, ..))
//   runs the same kernels templated over the element type T (bf16 or
//   float): to_f / from_f convert, and only the bf16 instantiations take the
//   16-byte vector paths. Attention in fp32 is the FMA kernel (k_attention
//   with T = float); the tensor-core kernel is bf16 only.
// - Memory-bound row kernels (embed, rmsnorm, glu, pool) read 16-byte
//   vectors when the row length allows it and fall back to scalars.
// - The model variants (Gemma-2/3, OLMo-2) are parameters of the same
//   kernels, never separate copies: embedding scale, RMSNorm times
//   (offset + w) from a bf16 or f32 input, written or added into the f32
//   residual (post-norms), GELU-tanh beside SiLU, q/k norm per head or over
//   the whole projection, attention scale, logit soft-cap and sliding
//   window. Their defaults (scale 1, offset 0, no cap, no window) give the
//   bits of the plain Llama block.
// - Attention: two tiled, flash-style kernels with the same grid, one block
//   per (sequence, 64-query tile, head), K/V tiles of the GQA kv head staged
//   in shared memory as bf16, causal online softmax in base 2, f32
//   accumulation; logits scaled, then soft-capped (cap * tanh(s / cap)),
//   then masked (causal, and the sliding window: a block starts at the
//   first key its first query sees, and a warp skips key blocks left of its
//   first query's window):
//   * k_attention_mma (default): bf16 tensor cores via mma.sync m16n8k16
//     (sm_80+), FlashAttention-2 register layout: 4 warps x 16 query rows;
//     S = Q K^T from Q fragments in registers and K rows in padded shared
//     memory; P (bf16, as in FA2) reuses S's accumulator layout as the A
//     operand of O += P V, V fragments via ldmatrix.trans. Rows padded by
//     16 bytes: conflict-free fragment loads.
//   * k_attention (RJEPA_ATTN=fma): f32 FMA on CUDA cores, P kept in f32.
//     2-4 threads share a query row, each owning interleaved 8-wide chunks of
//     the head dim (conflict-free 16-byte shared loads); partial dot products
//     meet by warp shuffles. Simple, the fallback and cross-check.
//   Attention is <1% of the FLOPs at 150-400 tokens per sequence.
// - Launchers return cudaGetLastError() right after the launch so every
//   launch is checked by the caller's CU_CHECK.
// - One source for nvcc and for the host compiler (the emulated device of
//   RJEPA_CUDA=emu, kernels/emu): launches go through RL_LAUNCH, the two
//   inline-asm warp operations have an emulated body, and no value is read
//   through a pointer to another type: bit casts and vector moves are
//   memcpy of aligned addresses (one 16-byte access under nvcc), so neither
//   compiler's aliasing rules can change the results.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda_internal.h"

typedef __nv_bfloat16 bf16;

// RL_LAUNCH(grid, block, smem, stream, kernel)(args...) is
// kernel<<<grid, block, smem, stream>>>(args...); the emulated device's
// cuda_runtime.h defines it as a call of its launcher.
#ifndef RL_LAUNCH
#define RL_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif

namespace {

// The bits of `from` as a To (no aliasing: memcpy of a local, a register move).
template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From &from)
{
    static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
    To to;
    memcpy(static_cast<void *>(&to), static_cast<const void *>(&from), sizeof(To));
    return to;
}
// A V (uint4, float4, uint32_t) at p, which is sizeof(V)-aligned: one vector
// access. nvcc lowers memcpy to byte moves whatever the alignment, so its
// device pass keeps the typed vector access it has always compiled (the
// CUDA idiom, which nvcc supports); the host compiler of the emulated device
// gets the memcpy, which has no aliasing rule to break.
template <typename V>
__device__ __forceinline__ V load_vec(const void *p)
{
#ifdef __CUDA_ARCH__
    return *static_cast<const V *>(p);
#else
    V v;
    memcpy(static_cast<void *>(&v), __builtin_assume_aligned(p, sizeof(V)), sizeof(V));
    return v;
#endif
}
template <typename V>
__device__ __forceinline__ void store_vec(void *p, const V &v)
{
#ifdef __CUDA_ARCH__
    *static_cast<V *>(p) = v;
#else
    memcpy(__builtin_assume_aligned(p, sizeof(V)), static_cast<const void *>(&v), sizeof(V));
#endif
}

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void unpack8(const uint4 &v, float *f)
{
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 p = __bfloat1622float2(bit_cast<__nv_bfloat162>(w[k]));
        f[2 * k] = p.x;
        f[2 * k + 1] = p.y;
    }
}

__device__ __forceinline__ uint4 pack8(const float *f)
{
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
        w[k] = bit_cast<uint32_t>(__floats2bfloat162_rn(f[2 * k], f[2 * k + 1]));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(float v) { return v; }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }

// 8 consecutive elements (16-byte aligned) <-> f32: one uint4 of bf16 or two of float
__device__ __forceinline__ void load8(const bf16 *p, float *f)
{
    unpack8(load_vec<uint4>(p), f);
}
__device__ __forceinline__ void load8(const float *p, float *f)
{
    const float4 a = load_vec<float4>(p), b = load_vec<float4>(p + 4);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
// load8, or zeros when !valid (p is not read then)
__device__ __forceinline__ void load8_or_zero(const bf16 *p, bool valid, float *f)
{
    uint4 v = make_uint4(0, 0, 0, 0);
    if (valid) v = load_vec<uint4>(p);
    unpack8(v, f);
}
__device__ __forceinline__ void load8_or_zero(const float *p, bool valid, float *f)
{
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
    if (valid) {
        a = load_vec<float4>(p);
        b = load_vec<float4>(p + 4);
    }
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void store8(bf16 *p, const float *f)
{
    store_vec(p, pack8(f));
}
__device__ __forceinline__ void store8(float *p, const float *f)
{
    store_vec(p, make_float4(f[0], f[1], f[2], f[3]));
    store_vec(p + 4, make_float4(f[4], f[5], f[6], f[7]));
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); all threads get it.
__device__ float block_sum(float v)
{
    __shared__ float part[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        float w = lane < nw ? part[lane] : 0.0f;
        w = warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

inline bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline unsigned grid_for(int64_t n, int threads, int64_t cap = 65536)
{
    int64_t g = (n + threads - 1) / threads;
    if (g < 1) g = 1;
    return (unsigned)(g < cap ? g : cap);
}

// ---- embedding gather: x[t, :] = f32(table[tokens[t], :]) -----------------

// (times `scale` in f32 when scale != 1: Gemma's sqrt(d); 1 keeps the row's bits)
template <typename T>
__global__ void k_embed(const int32_t *__restrict__ tokens, const T *__restrict__ table,
                        int64_t d, float scale, float *__restrict__ x, int vec)
{
    const int64_t t = blockIdx.x;
    const T *src = table + (int64_t)tokens[t] * d;
    float *dst = x + t * d;
    if (vec) { // 8 elements at a time (f32 table: two float4)
        for (int64_t i = threadIdx.x; i < d / 8; i += blockDim.x) {
            float f[8];
            load8(src + 8 * i, f);
#pragma unroll
            for (int e = 0; e < 8; e++) f[e] *= scale;
            store8(dst + 8 * i, f);
        }
    } else {
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) dst[i] = to_f(src[i]) * scale;
    }
}

// ---- RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (w + w_off), one block per row
// x: the f32 residual or a bf16 / f32 GEMM output (post-norms); w_off: 0, or
// Gemma's 1 (weights stored as w - 1). Out: bf16 or f32 y (= may be x, same
// dtype: each element is read before its thread writes it), or y += (f32
// residual: a post-norm added into the residual stream, one rounding).

constexpr int NORM_OUT_BF16 = RL_K_NORM_BF16, NORM_OUT_F32 = RL_K_NORM_F32,
              NORM_ADD_F32 = RL_K_NORM_ADD_F32;

// sum of squares of this thread's elements of a row (vec: 16-byte loads)
__device__ __forceinline__ float row_sumsq(const float *xr, int64_t d, int vec)
{
    float ss = 0.0f;
    if (vec) {
        for (int64_t i = threadIdx.x; i < d / 4; i += blockDim.x) {
            const float4 v = load_vec<float4>(xr + 4 * i);
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    }
    return ss;
}
__device__ __forceinline__ float row_sumsq(const bf16 *xr, int64_t d, int vec)
{
    float ss = 0.0f;
    if (vec) {
        for (int64_t i = threadIdx.x; i < d / 8; i += blockDim.x) {
            float f[8];
            load8(xr + 8 * i, f);
#pragma unroll
            for (int e = 0; e < 8; e++) ss += f[e] * f[e];
        }
    } else {
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss += to_f(xr[i]) * to_f(xr[i]);
    }
    return ss;
}

template <int OUT, typename X, typename W>
__global__ void k_rmsnorm(const X *x, const W *__restrict__ w, float w_off, void *y, int64_t d,
                          float eps, int vec)
{
    const int64_t row = blockIdx.x;
    const X *xr = x + row * d;
    const float inv = rsqrtf(block_sum(row_sumsq(xr, d, vec)) / (float)d + eps);
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        // no offset: w itself (-0 + 0 would be +0), the bits of x * inv * w
        float v = to_f(xr[i]) * inv * (w_off != 0.0f ? to_f(w[i]) + w_off : to_f(w[i]));
        if (OUT == NORM_OUT_F32)
            static_cast<float *>(y)[row * d + i] = v;
        else if (OUT == NORM_ADD_F32)
            static_cast<float *>(y)[row * d + i] += v;
        else
            static_cast<bf16 *>(y)[row * d + i] = __float2bfloat16_rn(v);
    }
}

template <int OUT, typename X, typename W>
void launch_rmsnorm(cudaStream_t s, const X *x, const W *w, float w_off, void *y, int64_t rows,
                    int64_t d, float eps, int vec)
{
    RL_LAUNCH((unsigned)rows, 256, 0, s, k_rmsnorm<OUT, X, W>)(x, w, w_off, y, d, eps, vec);
}

template <typename X, typename W>
void launch_rmsnorm_out(cudaStream_t s, const X *x, const W *w, float w_off, void *y, int out,
                        int64_t rows, int64_t d, float eps, int vec)
{
    if (out == NORM_OUT_F32)
        launch_rmsnorm<NORM_OUT_F32>(s, x, w, w_off, y, rows, d, eps, vec);
    else if (out == NORM_ADD_F32)
        launch_rmsnorm<NORM_ADD_F32>(s, x, w, w_off, y, rows, d, eps, vec);
    else
        launch_rmsnorm<NORM_OUT_BF16>(s, x, w, w_off, y, rows, d, eps, vec);
}

// ---- bias rows: y[m, n] = bias[n] (bf16 or f32 y), or y[m, n] += bias[n] (f32)
// (bias B: bf16, or f32 in the fp32 mode where y is always f32)

template <typename B>
__global__ void k_bias_rows(void *y, int y_f32, const B *__restrict__ bias, int64_t M,
                            int64_t N, int add)
{
    const int64_t total = M * N;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float b = to_f(bias[i % N]);
        if (y_f32) {
            float *yf = static_cast<float *>(y);
            yf[i] = add ? yf[i] + b : b;
        } else {
            static_cast<bf16 *>(y)[i] = from_f<bf16>(b); // exact for a bf16 bias
        }
    }
}

// ---- q/k RMSNorm (optional) + rotary embedding, in place ------------------
// One block per token, one warp per head (q heads then k heads, which are
// contiguous in a qkv row). HF rotate_half: pairs (i, i + hd/2). The norm is
// per head (Qwen3, Gemma 3: weights [hd]) or over the whole q / k projection
// of the token (OLMo 2: weights [nh*hd] / [nkv*hd], the sums taken by the
// block first); weights times (w + w_off).

template <typename T>
__global__ void k_qk_norm_rope(T *qkv, int64_t nh, int64_t nkv, int64_t hd,
                               const T *__restrict__ q_norm, const T *__restrict__ k_norm,
                               int whole, float w_off, float eps,
                               const float *__restrict__ inv_freq,
                               const int32_t *__restrict__ positions)
{
    const int64_t t = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int64_t stride = (nh + 2 * nkv) * hd, half = hd / 2;
    const float pos = (float)positions[t];
    T *row = qkv + t * stride;
    float q_inv = 1.0f, k_inv = 1.0f;
    if (whole && q_norm) {
        // every thread reads before block_sum's barriers, writes only after
        float sq = 0.0f, sk = 0.0f;
        for (int64_t i = threadIdx.x; i < nh * hd; i += blockDim.x) sq += to_f(row[i]) * to_f(row[i]);
        for (int64_t i = threadIdx.x; i < nkv * hd; i += blockDim.x)
            sk += to_f(row[nh * hd + i]) * to_f(row[nh * hd + i]);
        q_inv = rsqrtf(block_sum(sq) / (float)(nh * hd) + eps);
        k_inv = rsqrtf(block_sum(sk) / (float)(nkv * hd) + eps);
    }
    for (int64_t head = warp; head < nh + nkv; head += nwarps) {
        T *v = row + head * hd;
        const bool is_q = head < nh;
        const T *nw = is_q ? q_norm : k_norm;
        float inv = is_q ? q_inv : k_inv;
        if (nw && whole) {
            nw += (is_q ? head : head - nh) * hd; // this head's slice of the projection's weights
        } else if (nw) {
            float ss = 0.0f;
            for (int64_t i = lane; i < hd; i += 32) {
                float a = to_f(v[i]);
                ss += a * a;
            }
            inv = rsqrtf(warp_sum(ss) / (float)hd + eps);
        }
        // every lane has read what it needs (the shuffle above orders it);
        // each lane now reads and writes only its own pairs
        for (int64_t i = lane; i < half; i += 32) {
            float x1 = to_f(v[i]), x2 = to_f(v[i + half]);
            if (nw) {
                const float w1 = to_f(nw[i]), w2 = to_f(nw[i + half]);
                x1 = x1 * inv * (w_off != 0.0f ? w1 + w_off : w1);
                x2 = x2 * inv * (w_off != 0.0f ? w2 + w_off : w2);
            }
            float s, c;
            sincosf(pos * inv_freq[i], &s, &c);
            v[i] = from_f<T>(x1 * c - x2 * s);
            v[i + half] = from_f<T>(x2 * c + x1 * s);
        }
    }
}

// ---- varlen causal attention with GQA -------------------------------------

// What turns a q.k dot product into a base-2 logit, and which keys a query
// sees (the same for both kernels; HF order: scale, then soft-cap, then mask).
struct AttnScore {
    float mul;      // dot * mul: scale * log2(e); with a soft-cap scale / cap
    float cap_log2; // 0: none; else cap * log2(e): logit = cap_log2 * tanh(dot * mul)
    int window;     // 0: causal; else a sliding window: keys k with q - window < k <= q
};

__device__ __forceinline__ float capped(const AttnScore &a, float scaled)
{
    return a.cap_log2 > 0.0f ? a.cap_log2 * tanhf(scaled) : scaled;
}
// the first key a block whose first query is q0 can see
__device__ __forceinline__ int first_key(const AttnScore &a, int q0)
{
    return a.window > 0 ? max(0, q0 - a.window + 1) : 0;
}
// q sees keys k > key_floor(q) (and k <= q): -1, every key, without a window
__device__ __forceinline__ int key_floor(const AttnScore &a, int q)
{
    return a.window > 0 ? q - a.window : -1;
}

template <int HD, typename T>
struct AttnCfg {
    static constexpr int NCHUNK = HD / 8;                       // 8-wide chunks per row
    static constexpr int TPR = NCHUNK % 4 == 0 ? 4 : (NCHUNK % 2 == 0 ? 2 : 1); // threads/row
    static constexpr int CPT = NCHUNK / TPR;                    // chunks per thread
    static constexpr int BQ = 64;                               // query rows per block
    static constexpr int THREADS = BQ * TPR;
    static constexpr int JB = 16;                               // keys per softmax update
    // keys per smem tile: 32 KB of K+V, at most 64, a multiple of JB (for
    // bf16 this is min(8192 / HD, 64) for every supported HD)
    static constexpr int BK_FIT = 16384 / (int)sizeof(T) / HD / JB * JB;
    static constexpr int BK = BK_FIT < 64 ? BK_FIT : 64;
    static constexpr int U4 = 8 * (int)sizeof(T) / 16;         // uint4 per 8-wide chunk
    static constexpr int EPU = 16 / (int)sizeof(T);             // elements per uint4
    static_assert(BK >= JB, "key tile too small");
    static_assert(HD % 8 == 0, "head dim must be a multiple of 8");
    static_assert(BK % JB == 0, "key tile must be a multiple of the softmax block");
    static_assert(32 % TPR == 0, "a query row's threads must sit in one warp");
};

template <int HD, typename T>
__global__ void __launch_bounds__(AttnCfg<HD, T>::THREADS)
k_attention(const T *__restrict__ qkv, T *__restrict__ out,
            const int32_t *__restrict__ cu_seqlens, int nh, int nkv, AttnScore score)
{
    using C = AttnCfg<HD, T>;
    __shared__ __align__(16) T sK[C::BK * HD];
    __shared__ __align__(16) T sV[C::BK * HD];

    const int b = blockIdx.x, h = blockIdx.z;
    const int start = cu_seqlens[b], len = cu_seqlens[b + 1] - start;
    const int q0 = blockIdx.y * C::BQ;
    if (q0 >= len) return; // whole block leaves together

    const int tid = threadIdx.x, r = tid / C::TPR, g = tid % C::TPR;
    const int qi = q0 + r;
    const bool valid = qi < len;
    const int64_t stride = (int64_t)(nh + 2 * nkv) * HD;
    const int kvh = h / (nh / nkv);

    float q[C::CPT * 8], o[C::CPT * 8];
    {
        const T *qrow = qkv + (int64_t)(start + (valid ? qi : 0)) * stride + (int64_t)h * HD;
#pragma unroll
        for (int c = 0; c < C::CPT; c++) {
            load8_or_zero(qrow + (c * C::TPR + g) * 8, valid, q + c * 8);
        }
#pragma unroll
        for (int e = 0; e < C::CPT * 8; e++) {
            q[e] *= score.mul;
            o[e] = 0.0f;
        }
    }
    float m = -INFINITY, l = 0.0f;

    const int kv_end = min(len, q0 + C::BQ);                  // causal: keys <= last query
    const int warp_first_q = q0 + (tid >> 5) * (32 / C::TPR);
    const int warp_last_q = warp_first_q + 32 / C::TPR - 1;
    const int lo = key_floor(score, qi);                      // keys > lo are in the window
    const T *kbase = qkv + (int64_t)start * stride + (int64_t)(nh + kvh) * HD;
    const T *vbase = kbase + (int64_t)nkv * HD;

    for (int k0 = first_key(score, q0); k0 < kv_end; k0 += C::BK) {
        __syncthreads(); // the previous tile is no longer read
        for (int i = tid; i < C::BK * C::NCHUNK; i += C::THREADS) {
            const int j = i / C::NCHUNK, c = i % C::NCHUNK;
#pragma unroll
            for (int u = 0; u < C::U4; u++) { // one 8-wide chunk: U4 uint4 words
                uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
                if (k0 + j < kv_end) {
                    kv = load_vec<uint4>(kbase + (int64_t)(k0 + j) * stride + c * 8 + u * C::EPU);
                    vv = load_vec<uint4>(vbase + (int64_t)(k0 + j) * stride + c * 8 + u * C::EPU);
                }
                store_vec(sK + (i * C::U4 + u) * C::EPU, kv);
                store_vec(sV + (i * C::U4 + u) * C::EPU, vv);
            }
        }
        __syncthreads();
        const int nk = min(C::BK, kv_end - k0);
        for (int j0 = 0; j0 < nk; j0 += C::JB) {
            if (k0 + j0 > warp_last_q) break; // warp-uniform: every later key is masked
            // warp-uniform: these keys are left of the window of every query of the warp
            if (k0 + j0 + C::JB - 1 <= key_floor(score, warp_first_q)) continue;
            float s[C::JB];
#pragma unroll
            for (int jj = 0; jj < C::JB; jj++) {
                const T *krow = sK + (j0 + jj) * HD;
                float acc = 0.0f;
#pragma unroll
                for (int c = 0; c < C::CPT; c++) {
                    float kf[8];
                    load8(krow + (c * C::TPR + g) * 8, kf);
#pragma unroll
                    for (int e = 0; e < 8; e++) acc = fmaf(q[c * 8 + e], kf[e], acc);
                }
#pragma unroll
                for (int off = 1; off < C::TPR; off <<= 1)
                    acc += __shfl_xor_sync(0xffffffffu, acc, off);
                const int kj = k0 + j0 + jj;
                s[jj] = (j0 + jj < nk && kj <= qi && kj > lo) ? capped(score, acc) : -INFINITY;
            }
            float mx = m;
#pragma unroll
            for (int jj = 0; jj < C::JB; jj++) mx = fmaxf(mx, s[jj]);
            const float mref = mx == -INFINITY ? 0.0f : mx; // no -inf - -inf
            const float corr = exp2f(m - mref);
            l *= corr;
#pragma unroll
            for (int e = 0; e < C::CPT * 8; e++) o[e] *= corr;
#pragma unroll
            for (int jj = 0; jj < C::JB; jj++) {
                const float p = exp2f(s[jj] - mref);
                l += p;
                const T *vrow = sV + (j0 + jj) * HD;
#pragma unroll
                for (int c = 0; c < C::CPT; c++) {
                    float vf[8];
                    load8(vrow + (c * C::TPR + g) * 8, vf);
#pragma unroll
                    for (int e = 0; e < 8; e++) o[c * 8 + e] = fmaf(p, vf[e], o[c * 8 + e]);
                }
            }
            m = mx;
        }
    }
    if (valid) {
        const float inv_l = 1.0f / l;
        T *orow = out + (int64_t)(start + qi) * nh * HD + (int64_t)h * HD;
#pragma unroll
        for (int c = 0; c < C::CPT; c++) {
            float f[8];
#pragma unroll
            for (int e = 0; e < 8; e++) f[e] = o[c * 8 + e] * inv_l;
            store8(orow + (c * C::TPR + g) * 8, f);
        }
    }
}

template <int HD, typename T>
cudaError_t launch_attention(cudaStream_t s, const T *qkv, T *out, const int32_t *cu,
                             int64_t n_seqs, int64_t max_seqlen, int64_t nh, int64_t nkv,
                             AttnScore score)
{
    using C = AttnCfg<HD, T>;
    const int64_t tiles = (max_seqlen + C::BQ - 1) / C::BQ;
    if (n_seqs > 0x7fffffff || tiles > 65535 || nh > 65535) return cudaErrorInvalidConfiguration;
    dim3 grid((unsigned)n_seqs, (unsigned)tiles, (unsigned)nh);
    RL_LAUNCH(grid, C::THREADS, 0, s, k_attention<HD, T>)(qkv, out, cu, (int)nh, (int)nkv, score);
    return cudaGetLastError();
}

// ---- varlen causal attention on tensor cores (mma.sync m16n8k16 bf16) ------
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): g = lane / 4, t = lane % 4.
//   A 16x16 row-major: reg0 = (row g,   cols 2t, 2t+1), reg1 = (row g+8, cols 2t..),
//                      reg2 = (row g,   cols 2t+8..),   reg3 = (row g+8, cols 2t+8..)
//   B 16x8 (k x n):    reg0 = (k 2t, 2t+1; n g),        reg1 = (k 2t+8, 2t+9; n g)
//   C 16x8 f32:        c0,c1 = (row g, cols 2t, 2t+1),  c2,c3 = (row g+8, same cols)
// The low 16 bits of a register hold the element with the smaller index.

__device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1)
{
#ifdef RL_EMU_DEVICE
    ::rl_emu::mma_m16n8k16_bf16(c, a, b0, b1, __LINE__);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two 8x8 b16 matrices, transposed: lanes 0-7 give the row addresses of the
// first, lanes 8-15 of the second; lane l gets (row 2(l%4), 2(l%4)+1; col l/4).
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t &r0, uint32_t &r1, const bf16 *p)
{
#ifdef RL_EMU_DEVICE
    ::rl_emu::ldmatrix_x2_trans(r0, r1, p, __LINE__);
#else
    const unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(addr)
                 : "memory");
#endif
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi)
{
    return bit_cast<uint32_t>(__floats2bfloat162_rn(lo, hi)); // .x (low half) = lo
}

__device__ __forceinline__ uint32_t ld_u32(const bf16 *p) { return load_vec<uint32_t>(p); }

template <int HD>
struct MmaCfg {
    static constexpr int BQ = 64;             // query rows per block: 4 warps x 16
    static constexpr int THREADS = 128;
    static constexpr int BK = HD <= 128 ? 64 : 32; // keys per shared tile
    static constexpr int LDS = HD + 8;        // padded row (elements): +16 bytes
    static constexpr int KS = HD / 16;        // k-steps of Q K^T
    static constexpr int NT = BK / 8;         // key n-tiles of S
    static constexpr int DT = HD / 8;         // dim n-tiles of O
    static_assert(HD % 16 == 0, "head dim must be a multiple of 16");
    static_assert(2 * BK * LDS * 2 <= 48 * 1024, "static shared memory limit");
};

template <int HD>
__global__ void __launch_bounds__(MmaCfg<HD>::THREADS)
k_attention_mma(const bf16 *__restrict__ qkv, bf16 *__restrict__ out,
                const int32_t *__restrict__ cu_seqlens, int nh, int nkv, AttnScore score)
{
    using C = MmaCfg<HD>;
    __shared__ __align__(16) bf16 sK[C::BK * C::LDS];
    __shared__ __align__(16) bf16 sV[C::BK * C::LDS];

    const int b = blockIdx.x, h = blockIdx.z;
    const int start = cu_seqlens[b], len = cu_seqlens[b + 1] - start;
    const int q0 = blockIdx.y * C::BQ;
    if (q0 >= len) return; // whole block leaves together

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8; // this thread's two query rows
    const int64_t stride = (int64_t)(nh + 2 * nkv) * HD;
    const int kvh = h / (nh / nkv);

    // Q fragments, all k-steps, straight from global (rows past the end: 0)
    uint32_t qa[C::KS][4];
    {
        const bf16 *q_r0 = qkv + (int64_t)(start + r0) * stride + (int64_t)h * HD;
        const bf16 *q_r1 = qkv + (int64_t)(start + r1) * stride + (int64_t)h * HD;
        const bool v0 = r0 < len, v1 = r1 < len;
#pragma unroll
        for (int ks = 0; ks < C::KS; ks++) {
            const int c = ks * 16 + 2 * t;
            qa[ks][0] = v0 ? ld_u32(q_r0 + c) : 0u;
            qa[ks][1] = v1 ? ld_u32(q_r1 + c) : 0u;
            qa[ks][2] = v0 ? ld_u32(q_r0 + c + 8) : 0u;
            qa[ks][3] = v1 ? ld_u32(q_r1 + c + 8) : 0u;
        }
    }
    float o[C::DT][4];
#pragma unroll
    for (int i = 0; i < C::DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; // l: this lane's partial sums

    const int kv_end = min(len, q0 + C::BQ);           // causal: keys <= last query
    const int warp_first_q = q0 + warp * 16, warp_last_q = warp_first_q + 15;
    const int lo0 = key_floor(score, r0), lo1 = key_floor(score, r1); // window: keys > lo
    const bf16 *kbase = qkv + (int64_t)start * stride + (int64_t)(nh + kvh) * HD;
    const bf16 *vbase = kbase + (int64_t)nkv * HD;

    for (int k0 = first_key(score, q0); k0 < kv_end; k0 += C::BK) {
        __syncthreads(); // the previous tile is no longer read
        for (int i = tid; i < C::BK * (HD / 8); i += C::THREADS) {
            const int j = i / (HD / 8), c = (i % (HD / 8)) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (k0 + j < kv_end) {
                kv = load_vec<uint4>(kbase + (int64_t)(k0 + j) * stride + c);
                vv = load_vec<uint4>(vbase + (int64_t)(k0 + j) * stride + c);
            }
            store_vec(sK + j * C::LDS + c, kv);
            store_vec(sV + j * C::LDS + c, vv);
        }
        __syncthreads();
        // warp-uniform: every key of this tile is masked (after the last query, or left
        // of the first query's window)
        if (k0 > warp_last_q || k0 + C::BK - 1 <= key_floor(score, warp_first_q)) continue;

        // S = Q K^T for BK keys: NT n-tiles of 8 keys
        float sc[C::NT][4];
#pragma unroll
        for (int nt = 0; nt < C::NT; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
            const bf16 *krow = sK + (nt * 8 + g) * C::LDS + 2 * t;
#pragma unroll
            for (int ks = 0; ks < C::KS; ks++)
                mma_bf16_16816(sc[nt], qa[ks], ld_u32(krow + ks * 16), ld_u32(krow + ks * 16 + 8));
        }
        // scale to base 2 (and soft-cap), causal + window + tile-end mask, row maxima
        // (rows r0: c0,c1; r1: c2,c3)
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < C::NT; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = k0 + nt * 8 + 2 * t + (i & 1);
                const int row = i < 2 ? r0 : r1, lo = i < 2 ? lo0 : lo1;
                const float v = (key <= row && key > lo && key < kv_end)
                                    ? capped(score, sc[nt][i] * score.mul) : -INFINITY;
                sc[nt][i] = v;
                if (i < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
            }
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) { // the 4 lanes of a row
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float ref0 = mx0 == -INFINITY ? 0.0f : mx0, ref1 = mx1 == -INFINITY ? 0.0f : mx1;
        const float corr0 = exp2f(m0 - ref0), corr1 = exp2f(m1 - ref1);
        m0 = mx0;
        m1 = mx1;
        l0 *= corr0;
        l1 *= corr1;
#pragma unroll
        for (int dt = 0; dt < C::DT; dt++) {
            o[dt][0] *= corr0; o[dt][1] *= corr0;
            o[dt][2] *= corr1; o[dt][3] *= corr1;
        }
        // P = exp2(S - m): f32 row sums, bf16 A fragments (S's C layout = PV's A layout)
        uint32_t pa[C::NT / 2][4];
#pragma unroll
        for (int nt = 0; nt < C::NT; nt++) {
            const float p0 = exp2f(sc[nt][0] - ref0), p1 = exp2f(sc[nt][1] - ref0);
            const float p2 = exp2f(sc[nt][2] - ref1), p3 = exp2f(sc[nt][3] - ref1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            pa[nt / 2][(nt & 1) * 2 + 0] = pack_bf16x2(p0, p1);
            pa[nt / 2][(nt & 1) * 2 + 1] = pack_bf16x2(p2, p3);
        }
        // O += P V: V[key][dim] is B (k = key, n = dim), loaded transposed
#pragma unroll
        for (int kk = 0; kk < C::NT / 2; kk++) {
            const bf16 *vrow = sV + (kk * 16 + (lane & 15)) * C::LDS;
#pragma unroll
            for (int dt = 0; dt < C::DT; dt++) {
                uint32_t b0, b1;
                ldmatrix_x2_trans(b0, b1, vrow + dt * 8);
                mma_bf16_16816(o[dt], pa[kk], b0, b1);
            }
        }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    bf16 *o_r0 = out + (int64_t)(start + r0) * nh * HD + (int64_t)h * HD + 2 * t;
    bf16 *o_r1 = out + (int64_t)(start + r1) * nh * HD + (int64_t)h * HD + 2 * t;
#pragma unroll
    for (int dt = 0; dt < C::DT; dt++) {
        if (r0 < len)
            store_vec(o_r0 + dt * 8, pack_bf16x2(o[dt][0] * inv0, o[dt][1] * inv0));
        if (r1 < len)
            store_vec(o_r1 + dt * 8, pack_bf16x2(o[dt][2] * inv1, o[dt][3] * inv1));
    }
}

template <int HD>
cudaError_t launch_attention_mma(cudaStream_t s, const bf16 *qkv, bf16 *out, const int32_t *cu,
                                 int64_t n_seqs, int64_t max_seqlen, int64_t nh, int64_t nkv,
                                 AttnScore score)
{
    using C = MmaCfg<HD>;
    const int64_t tiles = (max_seqlen + C::BQ - 1) / C::BQ;
    if (n_seqs > 0x7fffffff || tiles > 65535 || nh > 65535) return cudaErrorInvalidConfiguration;
    dim3 grid((unsigned)n_seqs, (unsigned)tiles, (unsigned)nh);
    RL_LAUNCH(grid, C::THREADS, 0, s, k_attention_mma<HD>)(qkv, out, cu, (int)nh, (int)nkv, score);
    return cudaGetLastError();
}

// ---- gated MLP: out[t, j] = act(gu[t, j]) * gu[t, ff + j] ------------------
// act: SiLU (SwiGLU) or GELU with the tanh approximation (GeGLU; torch's
// gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))).

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }
__device__ __forceinline__ float gelu_tanh_mul(float g, float u)
{
    const float kBeta = 0.7978845608028654f; // sqrt(2 / pi)
    return 0.5f * g * (1.0f + tanhf(kBeta * (g + 0.044715f * g * g * g))) * u;
}
template <int ACT>
__device__ __forceinline__ float act_mul(float g, float u)
{
    return ACT == RL_K_ACT_GELU_TANH ? gelu_tanh_mul(g, u) : silu_mul(g, u);
}

template <int ACT, typename E>
__global__ void k_glu(const E *__restrict__ gu, E *__restrict__ out, int64_t T, int64_t ff,
                      int vec)
{
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    if (vec) {
        const int64_t per_row = ff / 8, total = T * per_row;
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += step) {
            const int64_t t = i / per_row, j = (i % per_row) * 8;
            float g[8], u[8], r[8];
            load8(gu + t * 2 * ff + j, g);
            load8(gu + t * 2 * ff + ff + j, u);
#pragma unroll
            for (int e = 0; e < 8; e++) r[e] = act_mul<ACT>(g[e], u[e]);
            store8(out + t * ff + j, r);
        }
    } else {
        const int64_t total = T * ff;
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += step) {
            const int64_t t = i / ff, j = i % ff;
            out[i] = from_f<E>(act_mul<ACT>(to_f(gu[t * 2 * ff + j]), to_f(gu[t * 2 * ff + ff + j])));
        }
    }
}

template <int ACT, typename E>
void launch_glu(cudaStream_t s, const E *gu, E *out, int64_t T, int64_t ff, int vec)
{
    const int64_t n = vec ? T * (ff / 8) : T * ff;
    RL_LAUNCH(grid_for(n, 256), 256, 0, s, k_glu<ACT, E>)(gu, out, T, ff, vec);
}

// ---- cast: dst[i] = src[i] between f32 and bf16 (round to nearest even) ------

template <typename S, typename D>
__global__ void k_cast(const S *__restrict__ src, D *__restrict__ dst, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = from_f<D>(to_f(src[i]));
}

// ---- span pooling: out[s, :] = mean / first / last / max of rows [start, end)

template <typename T>
__device__ __forceinline__ float load_f(const T *p);
template <>
__device__ __forceinline__ float load_f<float>(const float *p) { return *p; }
template <>
__device__ __forceinline__ float load_f<bf16>(const bf16 *p) { return __bfloat162float(*p); }

template <typename T>
__global__ void k_pool(const T *__restrict__ x, int64_t d, const int32_t *__restrict__ spans,
                       int mode, float *__restrict__ out)
{
    const int64_t sp = blockIdx.x;
    const int64_t a = spans[2 * sp], e = spans[2 * sp + 1];
    float *o = out + sp * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        float v;
        if (mode == RL_POOL_FIRST) {
            v = load_f(x + a * d + c);
        } else if (mode == RL_POOL_LAST) {
            v = load_f(x + (e - 1) * d + c);
        } else if (mode == RL_POOL_MAX) {
            // a selection (exact); v != v keeps a NaN once seen, as the CPU op does
            v = load_f(x + a * d + c);
            for (int64_t r = a + 1; r < e; r++) {
                const float u = load_f(x + r * d + c);
                if (u > v || u != u) v = u;
            }
        } else {
            // summed in double, in row order, one rounding at the end: the CPU
            // op's arithmetic, so an f32 source gives its bits (a long span
            // summed in f32 drifts by ~len * 2^-24)
            double acc = 0.0;
            for (int64_t r = a; r < e; r++) acc += (double)load_f(x + r * d + c);
            v = (float)(acc / (double)(e - a));
        }
        o[c] = v;
    }
}

// The FMA kernel for element type T, dispatched on the head dim.
template <typename T>
cudaError_t attention_fma(cudaStream_t s, const T *q, T *o, const int32_t *cu, int64_t n_seqs,
                          int64_t max_seqlen, int64_t nh, int64_t nkv, int64_t hd, AttnScore sc)
{
    switch (hd) {
    case 16: return launch_attention<16, T>(s, q, o, cu, n_seqs, max_seqlen, nh, nkv, sc);
    case 32: return launch_attention<32, T>(s, q, o, cu, n_seqs, max_seqlen, nh, nkv, sc);
    case 64: return launch_attention<64, T>(s, q, o, cu, n_seqs, max_seqlen, nh, nkv, sc);
    case 80: return launch_attention<80, T>(s, q, o, cu, n_seqs, max_seqlen, nh, nkv, sc);
    case 96: return launch_attention<96, T>(s, q, o, cu, n_seqs, max_seqlen, nh, nkv, sc);
    case 128: return launch_attention<128, T>(s, q, o, cu, n_seqs, max_seqlen, nh, nkv, sc);
    case 256: return launch_attention<256, T>(s, q, o, cu, n_seqs, max_seqlen, nh, nkv, sc);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace

// ---- launchers -------------------------------------------------------------

extern "C" {

cudaError_t rl_k_embed(cudaStream_t s, const int32_t *tokens, int64_t T, const void *table,
                       int table_f32, int64_t d, float scale, float *x)
{
    if (T > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const int vec = d % 8 == 0 && aligned16(table) && aligned16(x);
    if (table_f32)
        RL_LAUNCH((unsigned)T, 128, 0, s, k_embed<float>)(tokens, static_cast<const float *>(table), d,
                                                    scale, x, vec);
    else
        RL_LAUNCH((unsigned)T, 128, 0, s, k_embed<bf16>)(tokens, static_cast<const bf16 *>(table), d,
                                                   scale, x, vec);
    return cudaGetLastError();
}

cudaError_t rl_k_rmsnorm(cudaStream_t s, const void *x, int x_f32, const void *w, int w_f32,
                         float w_off, void *y, int out, int64_t rows, int64_t d, float eps)
{
    if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
    if (out != NORM_OUT_BF16 && out != NORM_OUT_F32 && out != NORM_ADD_F32)
        return cudaErrorInvalidValue;
    const int vec = d % (x_f32 ? 4 : 8) == 0 && aligned16(x);
    const float *xf = static_cast<const float *>(x), *wf = static_cast<const float *>(w);
    const bf16 *xb = static_cast<const bf16 *>(x), *wb = static_cast<const bf16 *>(w);
    if (x_f32 && w_f32) launch_rmsnorm_out(s, xf, wf, w_off, y, out, rows, d, eps, vec);
    else if (x_f32) launch_rmsnorm_out(s, xf, wb, w_off, y, out, rows, d, eps, vec);
    else if (w_f32) launch_rmsnorm_out(s, xb, wf, w_off, y, out, rows, d, eps, vec);
    else launch_rmsnorm_out(s, xb, wb, w_off, y, out, rows, d, eps, vec);
    return cudaGetLastError();
}

cudaError_t rl_k_bias_rows(cudaStream_t s, void *y, int y_f32, const void *bias, int bias_f32,
                           int64_t M, int64_t N, int add)
{
    if (bias_f32 && !y_f32) return cudaErrorInvalidValue; // no f32 bias into bf16 y
    if (bias_f32)
        RL_LAUNCH(grid_for(M * N, 256), 256, 0, s, k_bias_rows<float>)(
            y, y_f32, static_cast<const float *>(bias), M, N, add);
    else
        RL_LAUNCH(grid_for(M * N, 256), 256, 0, s, k_bias_rows<bf16>)(
            y, y_f32, static_cast<const bf16 *>(bias), M, N, add);
    return cudaGetLastError();
}

cudaError_t rl_k_qk_norm_rope(cudaStream_t s, void *qkv, int f32, int64_t T, int64_t nh,
                              int64_t nkv, int64_t hd, const void *q_norm, const void *k_norm,
                              int whole, float w_off, float eps, const float *inv_freq,
                              const int32_t *positions)
{
    if (T > 0x7fffffff) return cudaErrorInvalidConfiguration;
    if (f32)
        RL_LAUNCH((unsigned)T, 128, 0, s, k_qk_norm_rope<float>)(
            static_cast<float *>(qkv), nh, nkv, hd, static_cast<const float *>(q_norm),
            static_cast<const float *>(k_norm), whole, w_off, eps, inv_freq, positions);
    else
        RL_LAUNCH((unsigned)T, 128, 0, s, k_qk_norm_rope<bf16>)(
            static_cast<bf16 *>(qkv), nh, nkv, hd, static_cast<const bf16 *>(q_norm),
            static_cast<const bf16 *>(k_norm), whole, w_off, eps, inv_freq, positions);
    return cudaGetLastError();
}

int rl_k_attention_supports(int64_t hd)
{
    switch (hd) {
    case 16: case 32: case 64: case 80: case 96: case 128: case 256: return 1;
    default: return 0;
    }
}

cudaError_t rl_k_attention(cudaStream_t s, const void *qkv, void *out, int f32,
                           const int32_t *cu_seqlens, int64_t n_seqs, int64_t max_seqlen,
                           int64_t nh, int64_t nkv, int64_t hd, float scale, float softcap,
                           int64_t window, int use_mma)
{
    if (n_seqs <= 0 || max_seqlen <= 0) return cudaSuccess;
    if (!aligned16(qkv) || !aligned16(out) || nkv <= 0 || nh % nkv != 0 || !(softcap >= 0.0f) ||
        window < 0)
        return cudaErrorInvalidValue;
    AttnScore sc;
    sc.mul = softcap > 0.0f ? scale / softcap : scale * kLog2e;
    sc.cap_log2 = softcap > 0.0f ? softcap * kLog2e : 0.0f;
    // a window as long as the longest sequence masks nothing: plain causal
    sc.window = window >= max_seqlen ? 0 : (int)window;
    if (f32) // fp32 mode: the FMA kernel on f32 q/k/v (tensor cores are bf16 only)
        return attention_fma<float>(s, static_cast<const float *>(qkv), static_cast<float *>(out),
                                    cu_seqlens, n_seqs, max_seqlen, nh, nkv, hd, sc);
    const bf16 *q = static_cast<const bf16 *>(qkv);
    bf16 *o = static_cast<bf16 *>(out);
    if (use_mma) {
        switch (hd) {
        case 16: return launch_attention_mma<16>(s, q, o, cu_seqlens, n_seqs, max_seqlen, nh, nkv, sc);
        case 32: return launch_attention_mma<32>(s, q, o, cu_seqlens, n_seqs, max_seqlen, nh, nkv, sc);
        case 64: return launch_attention_mma<64>(s, q, o, cu_seqlens, n_seqs, max_seqlen, nh, nkv, sc);
        case 80: return launch_attention_mma<80>(s, q, o, cu_seqlens, n_seqs, max_seqlen, nh, nkv, sc);
        case 96: return launch_attention_mma<96>(s, q, o, cu_seqlens, n_seqs, max_seqlen, nh, nkv, sc);
        case 128: return launch_attention_mma<128>(s, q, o, cu_seqlens, n_seqs, max_seqlen, nh, nkv, sc);
        case 256: return launch_attention_mma<256>(s, q, o, cu_seqlens, n_seqs, max_seqlen, nh, nkv, sc);
        default: return cudaErrorInvalidValue;
        }
    }
    return attention_fma<bf16>(s, q, o, cu_seqlens, n_seqs, max_seqlen, nh, nkv, hd, sc);
}

cudaError_t rl_k_glu(cudaStream_t s, const void *gu, void *out, int f32, int64_t T, int64_t ff,
                     int act)
{
    if (act != RL_K_ACT_SILU && act != RL_K_ACT_GELU_TANH) return cudaErrorInvalidValue;
    const int vec = ff % 8 == 0 && aligned16(gu) && aligned16(out);
    if (f32) {
        const float *g = static_cast<const float *>(gu);
        float *o = static_cast<float *>(out);
        if (act == RL_K_ACT_GELU_TANH) launch_glu<RL_K_ACT_GELU_TANH>(s, g, o, T, ff, vec);
        else launch_glu<RL_K_ACT_SILU>(s, g, o, T, ff, vec);
    } else {
        const bf16 *g = static_cast<const bf16 *>(gu);
        bf16 *o = static_cast<bf16 *>(out);
        if (act == RL_K_ACT_GELU_TANH) launch_glu<RL_K_ACT_GELU_TANH>(s, g, o, T, ff, vec);
        else launch_glu<RL_K_ACT_SILU>(s, g, o, T, ff, vec);
    }
    return cudaGetLastError();
}

cudaError_t rl_k_cast(cudaStream_t s, const void *src, int src_f32, void *dst, int dst_f32,
                      int64_t n)
{
    if (n <= 0) return cudaSuccess;
    const unsigned g = grid_for(n, 256);
    if (src_f32 && dst_f32)
        RL_LAUNCH(g, 256, 0, s, k_cast<float, float>)(static_cast<const float *>(src), static_cast<float *>(dst), n);
    else if (src_f32)
        RL_LAUNCH(g, 256, 0, s, k_cast<float, bf16>)(static_cast<const float *>(src), static_cast<bf16 *>(dst), n);
    else if (dst_f32)
        RL_LAUNCH(g, 256, 0, s, k_cast<bf16, float>)(static_cast<const bf16 *>(src), static_cast<float *>(dst), n);
    else
        RL_LAUNCH(g, 256, 0, s, k_cast<bf16, bf16>)(static_cast<const bf16 *>(src), static_cast<bf16 *>(dst), n);
    return cudaGetLastError();
}

cudaError_t rl_k_pool(cudaStream_t s, const void *x, int x_f32, int64_t d, const int32_t *spans,
                      int64_t S, int mode, float *out)
{
    if (S > 0x7fffffff) return cudaErrorInvalidConfiguration;
    if (x_f32)
        RL_LAUNCH((unsigned)S, 256, 0, s, k_pool<float>)(static_cast<const float *>(x), d, spans, mode, out);
    else
        RL_LAUNCH((unsigned)S, 256, 0, s, k_pool<bf16>)(static_cast<const bf16 *>(x), d, spans, mode, out);
    return cudaGetLastError();
}

} // extern "C"
