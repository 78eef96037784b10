// cuda_bf16.h - the emulated device's bf16 types and conversions (RJEPA_CUDA=emu
// builds only): the subset of the toolkit's header that the kernels use, with
// the same rounding (round to nearest even; NaN becomes the canonical 0x7fff).
#ifndef RL_EMU_CUDA_BF16_H
#define RL_EMU_CUDA_BF16_H

#include "cuda_runtime.h"

struct __nv_bfloat16 {
    unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline float __bfloat162float(__nv_bfloat16 h)
{
    return ::rl_emu::bits_to_f32((uint32_t)h.__x << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    const uint32_t u = ::rl_emu::f32_to_bits(f);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u)
        h.__x = 0x7fff;
    else
        h.__x = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return h;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi)
{
    __nv_bfloat162 r;
    r.x = __float2bfloat16_rn(lo);
    r.y = __float2bfloat16_rn(hi);
    return r;
}
inline float2 __bfloat1622float2(__nv_bfloat162 h)
{
    return make_float2(__bfloat162float(h.x), __bfloat162float(h.y));
}

#endif // RL_EMU_CUDA_BF16_H
