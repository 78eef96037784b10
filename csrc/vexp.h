/* vexp.h - exp(x) in fp32 to about 1 ulp, in plain C (exp_f32) and in 8 AVX2
 * (exp8) or 16 AVX-512 (exp16) lanes with the same operations in the same
 * order, so every width gives the same bits: softmax (attention_cpu.c) and
 * SiLU (ops_cpu.c) spend most of their time in exp, which libm computes one
 * element at a time.
 *
 * Cody-Waite reduction by ln 2, Cephes' degree-7 polynomial, fmaf. Every
 * operation is exactly rounded IEEE (fmaf, floorf, +, *), so a vector FMA
 * gives what fmaf gives. Below -87.3 it returns 0 (exp is then under the
 * normal range), above 88.7 inf; a NaN stays NaN. */
#ifndef RL_VEXP_H
#define RL_VEXP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* the constants every width uses (one place, so the widths cannot drift apart) */
#define VEXP_HI 88.3762626647949f
#define VEXP_LO (-87.3365447504f)
#define VEXP_LOG2E 1.44269504088896341f
#define VEXP_LN2_HI (-0.693359375f)
#define VEXP_LN2_LO 2.12194440e-4f
#define VEXP_P0 1.9875691500e-4f
#define VEXP_P1 1.3981999507e-3f
#define VEXP_P2 8.3334519073e-3f
#define VEXP_P3 4.1665795894e-2f
#define VEXP_P4 1.6666665459e-1f
#define VEXP_P5 5.0000001201e-1f

static inline float exp_f32(float x)
{
    const float hi = VEXP_HI, lo = VEXP_LO;
    float xc = x > hi ? hi : x < lo ? lo : x;
    float n = floorf(fmaf(xc, VEXP_LOG2E, 0.5f));
    float r = fmaf(n, VEXP_LN2_HI, xc);
    r = fmaf(n, VEXP_LN2_LO, r);
    float r2 = r * r;
    float p = fmaf(VEXP_P0, r, VEXP_P1);
    p = fmaf(p, r, VEXP_P2);
    p = fmaf(p, r, VEXP_P3);
    p = fmaf(p, r, VEXP_P4);
    p = fmaf(p, r, VEXP_P5);
    p = fmaf(p, r2, r) + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    float y = p * scale;
    y = x < lo ? 0.0f : y;
    return x > hi ? INFINITY : y;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RL_VEC_X86 1

__attribute__((target("avx2,fma"))) static inline __m256 exp8(__m256 x)
{
    const __m256 hi = _mm256_set1_ps(VEXP_HI), lo = _mm256_set1_ps(VEXP_LO);
    /* max/min return their second operand for a NaN, so a NaN x stays NaN */
    __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(VEXP_LOG2E),
                                               _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(VEXP_LN2_HI), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(VEXP_LN2_LO), r);
    __m256 r2 = _mm256_mul_ps(r, r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(VEXP_P0), r, _mm256_set1_ps(VEXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(VEXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(VEXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(VEXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(VEXP_P5));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
}

__attribute__((target("avx512f"))) static inline __m512 exp16(__m512 x)
{
    const __m512 hi = _mm512_set1_ps(VEXP_HI), lo = _mm512_set1_ps(VEXP_LO);
    __m512 xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(VEXP_LOG2E),
                                                    _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(VEXP_LN2_HI), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(VEXP_LN2_LO), r);
    __m512 r2 = _mm512_mul_ps(r, r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(VEXP_P0), r, _mm512_set1_ps(VEXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(VEXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(VEXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(VEXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(VEXP_P5));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y, _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), y, _mm512_set1_ps(INFINITY));
}
#endif

#endif /* RL_VEXP_H */
