/* attention_cpu.c - the CPU backend's causal attention (interface and
 * exactness contract: attention_cpu.h).
 *
 * Design choices:
 * - One call = one block of query rows of one sequence for every query head
 *   of one KV group (GQA): the keys the block sees are packed once into K^T
 *   panels [hd][16 keys] and serve all the group's heads; values are read in
 *   place. No allocation: the caller passes per-thread scratch.
 * - Register tiles of 4 query rows. Scores: lanes over 16-key panels, the
 *   sum over head_dim in order (AVX-512: 4 panels, AVX2: 1 panel, portable
 *   C: 1 panel); output: lanes over head_dim, the sum over keys in order
 *   (AVX-512: 64 columns, AVX2 and portable C: 16). Lanes never share a sum,
 *   so every ISA computes each output with the same operations in the same
 *   order (vector FMA = fmaf) and the tile shapes do not change a bit.
 * - Causal and sliding-window masks: a tile computes only the key panels
 *   between its first row's first visible key and its last row's last one.
 *   Within that range a row's masked entries are exact zeros: they add
 *   nothing to the softmax sum (0 + x = x) nor to the value sums
 *   (fma(0, v, acc) = acc for finite v), so the bits are those of summing
 *   over the visible keys only, whatever the tile.
 * - Softmax: row max in vector lanes (exact in any order), exp in 16 / 8
 *   lanes (vexp.h, same bits as exp_f32), the sum in key order for the
 *   tile's 4 rows in lockstep (4 independent chains), then p * (1 / sum).
 */
#include "attention_cpu.h"

#include <math.h>
#include <string.h>

#include "vexp.h"

#define TR 4    /* query rows per register tile */
#define KP 16   /* keys per packed K^T panel    */

#if defined(RL_VEC_X86) && defined(__linux__)
/* fmaf is one correctly rounded operation whatever computes it: the "fma"
 * clone's vfmadd or libm's software fmaf, so both clones give the same bits */
#define RL_FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define RL_FMA_CLONES
#endif

int64_t rl_attention_scratch_floats(int64_t max_len, int64_t hd, int64_t window)
{
    int64_t nk = max_len;
    if (window > 0 && window - 1 + RL_ATT_QBLK < nk) nk = window - 1 + RL_ATT_QBLK;
    return (nk + KP - 1) / KP * KP * (hd + TR);
}

/* One register tile: TR query rows of one head (rows past the block repeat
 * its last row; their results are not stored). Key column c is key k0 + c. */
typedef struct {
    const float *qr[TR];   /* query rows                                         */
    float *pw[TR];         /* score / probability rows (distinct; written)        */
    const float *pr[TR];   /* the same rows, the last repeated past `rows` (read) */
    float *orow[TR];       /* output rows                                        */
    const float *kt;       /* K^T panels: panel p at kt + p * hd * KP            */
    const float *v;        /* value row of column 0; column c at v + c * W        */
    int64_t W, hd, rows;
} tile;

/* ---- portable C ------------------------------------------------------------ */

RL_FMA_CLONES static void qk_generic(const tile *t, int64_t pf, int64_t pl, float scale)
{
    const int64_t hd = t->hd;
    for (int64_t p = pf; p <= pl; p++) {
        const float *kt = t->kt + p * hd * KP;
        float acc[TR][KP];
        memset(acc, 0, sizeof acc);
        for (int64_t d = 0; d < hd; d++)
            for (int r = 0; r < TR; r++) {
                const float x = t->qr[r][d];
                for (int l = 0; l < KP; l++) acc[r][l] = fmaf(x, kt[d * KP + l], acc[r][l]);
            }
        for (int r = 0; r < TR; r++)
            for (int l = 0; l < KP; l++) t->pw[r][p * KP + l] = scale * acc[r][l];
    }
}

RL_FMA_CLONES static void pv_generic(const tile *t, int64_t cf, int64_t cl)
{
    for (int64_t d0 = 0; d0 < t->hd; d0 += KP) {
        const int64_t n = t->hd - d0 < KP ? t->hd - d0 : KP;
        float acc[TR][KP];
        memset(acc, 0, sizeof acc);
        for (int64_t c = cf; c <= cl; c++) {
            const float *vr = t->v + c * t->W + d0;
            for (int r = 0; r < TR; r++) {
                const float x = t->pr[r][c];
                if (n == KP)
                    for (int l = 0; l < KP; l++) acc[r][l] = fmaf(x, vr[l], acc[r][l]);
                else
                    for (int l = 0; l < n; l++) acc[r][l] = fmaf(x, vr[l], acc[r][l]);
            }
        }
        for (int64_t r = 0; r < t->rows; r++) memcpy(t->orow[r] + d0, acc[r], (size_t)n * 4);
    }
}

static float max_generic(const float *p, int64_t n)
{
    float mx = p[0];
    for (int64_t j = 1; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    return mx;
}

static void exp_generic(float *p, int64_t n, float mx)
{
    for (int64_t j = 0; j < n; j++) p[j] = exp_f32(p[j] - mx);
}

/* ---- AVX2 + FMA ------------------------------------------------------------ */
#ifdef RL_VEC_X86

__attribute__((target("avx2,fma"))) static void qk_avx2(const tile *t, int64_t pf, int64_t pl,
                                                         float scale)
{
    const int64_t hd = t->hd;
    const __m256 s = _mm256_set1_ps(scale);
    const float *q0 = t->qr[0], *q1 = t->qr[1], *q2 = t->qr[2], *q3 = t->qr[3];
    for (int64_t p = pf; p <= pl; p++) {
        const float *kt = t->kt + p * hd * KP;
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
               c30 = c00, c31 = c00;
        for (int64_t d = 0; d < hd; d++) {
            const __m256 b0 = _mm256_loadu_ps(kt + d * KP), b1 = _mm256_loadu_ps(kt + d * KP + 8);
            __m256 x;
#define ROW(i)                                      \
            x = _mm256_broadcast_ss(q##i + d);      \
            c##i##0 = _mm256_fmadd_ps(x, b0, c##i##0); \
            c##i##1 = _mm256_fmadd_ps(x, b1, c##i##1);
            ROW(0) ROW(1) ROW(2) ROW(3)
#undef ROW
        }
        float *o = t->pw[0] + p * KP;
        _mm256_storeu_ps(o, _mm256_mul_ps(s, c00)); _mm256_storeu_ps(o + 8, _mm256_mul_ps(s, c01));
        o = t->pw[1] + p * KP;
        _mm256_storeu_ps(o, _mm256_mul_ps(s, c10)); _mm256_storeu_ps(o + 8, _mm256_mul_ps(s, c11));
        o = t->pw[2] + p * KP;
        _mm256_storeu_ps(o, _mm256_mul_ps(s, c20)); _mm256_storeu_ps(o + 8, _mm256_mul_ps(s, c21));
        o = t->pw[3] + p * KP;
        _mm256_storeu_ps(o, _mm256_mul_ps(s, c30)); _mm256_storeu_ps(o + 8, _mm256_mul_ps(s, c31));
    }
}

/* lanes below n (1..8) set */
__attribute__((target("avx2,fma"))) static inline __m256i mask8(int64_t n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) static void pv_avx2(const tile *t, int64_t cf, int64_t cl)
{
    const float *p0 = t->pr[0], *p1 = t->pr[1], *p2 = t->pr[2], *p3 = t->pr[3];
    for (int64_t d0 = 0; d0 < t->hd; d0 += 16) {
        const int64_t n = t->hd - d0 < 16 ? t->hd - d0 : 16;
        /* lanes d0 .. d0+7 (all or the first n) and d0+8 .. (the rest, maybe none) */
        const __m256i m0 = mask8(n < 8 ? n : 8), m1 = mask8(n > 8 ? n - 8 : 0);
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
               c30 = c00, c31 = c00;
        for (int64_t c = cf; c <= cl; c++) {
            const float *vr = t->v + c * t->W + d0;
            __m256 b0, b1, x;
            if (n == 16) {
                b0 = _mm256_loadu_ps(vr);
                b1 = _mm256_loadu_ps(vr + 8);
            } else {
                b0 = _mm256_maskload_ps(vr, m0);
                b1 = _mm256_maskload_ps(vr + 8, m1);
            }
#define ROW(i)                                      \
            x = _mm256_broadcast_ss(p##i + c);      \
            c##i##0 = _mm256_fmadd_ps(x, b0, c##i##0); \
            c##i##1 = _mm256_fmadd_ps(x, b1, c##i##1);
            ROW(0) ROW(1) ROW(2) ROW(3)
#undef ROW
        }
        const __m256 acc[TR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
        for (int64_t r = 0; r < t->rows; r++) {
            float *o = t->orow[r] + d0;
            if (n == 16) {
                _mm256_storeu_ps(o, acc[r][0]);
                _mm256_storeu_ps(o + 8, acc[r][1]);
            } else {
                _mm256_maskstore_ps(o, m0, acc[r][0]);
                _mm256_maskstore_ps(o + 8, m1, acc[r][1]);
            }
        }
    }
}

__attribute__((target("avx2,fma"))) static float max_avx2(const float *p, int64_t n)
{
    __m256 m = _mm256_set1_ps(p[0]);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(_mm256_loadu_ps(p + j), m);
    float lane[8];
    _mm256_storeu_ps(lane, m);
    float mx = lane[0];
    for (int i = 1; i < 8; i++) mx = lane[i] > mx ? lane[i] : mx;
    for (; j < n; j++) mx = p[j] > mx ? p[j] : mx;
    return mx;
}

__attribute__((target("avx2,fma"))) static void exp_avx2(float *p, int64_t n, float mx)
{
    const __m256 m = _mm256_set1_ps(mx);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(p + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), m)));
    if (j < n) {
        const __m256i k = mask8(n - j);
        _mm256_maskstore_ps(p + j, k, exp8(_mm256_sub_ps(_mm256_maskload_ps(p + j, k), m)));
    }
}

/* ---- AVX-512 --------------------------------------------------------------- */

/* np (1..4) panels of 16 keys from column `col` for the tile's 4 rows */
__attribute__((target("avx512f"), always_inline)) static inline void
qk512_panels(const tile *t, const float *kt, int64_t col, __m512 s, const int np)
{
    const int64_t hd = t->hd;
    __m512 acc[TR][4];
#pragma GCC unroll 4
    for (int r = 0; r < TR; r++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) acc[r][u] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d++) {
        __m512 b[4];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++)
            b[u] = u < np ? _mm512_loadu_ps(kt + (u * hd + d) * KP) : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int r = 0; r < TR; r++) {
            const __m512 x = _mm512_set1_ps(t->qr[r][d]);
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++)
                if (u < np) acc[r][u] = _mm512_fmadd_ps(x, b[u], acc[r][u]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < TR; r++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++)
            if (u < np) _mm512_storeu_ps(t->pw[r] + col + u * KP, _mm512_mul_ps(s, acc[r][u]));
}

__attribute__((target("avx512f"))) static void qk_avx512(const tile *t, int64_t pf, int64_t pl,
                                                          float scale)
{
    const __m512 s = _mm512_set1_ps(scale);
    const int64_t hd = t->hd;
    int64_t p = pf;
    for (; p + 4 <= pl + 1; p += 4) qk512_panels(t, t->kt + p * hd * KP, p * KP, s, 4);
    switch (pl + 1 - p) {
    case 3: qk512_panels(t, t->kt + p * hd * KP, p * KP, s, 3); break;
    case 2: qk512_panels(t, t->kt + p * hd * KP, p * KP, s, 2); break;
    case 1: qk512_panels(t, t->kt + p * hd * KP, p * KP, s, 1); break;
    default: break;
    }
}

/* output columns d0 .. d0 + 16 nv (the last vector masked by m) */
__attribute__((target("avx512f"), always_inline)) static inline void
pv512_cols(const tile *t, int64_t cf, int64_t cl, int64_t d0, const int nv, __mmask16 m)
{
    __m512 acc[TR][4];
#pragma GCC unroll 4
    for (int r = 0; r < TR; r++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) acc[r][u] = _mm512_setzero_ps();
    for (int64_t c = cf; c <= cl; c++) {
        const float *vr = t->v + c * t->W + d0;
        __m512 b[4];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++)
            b[u] = u < nv - 1 ? _mm512_loadu_ps(vr + 16 * u)
                 : u == nv - 1 ? _mm512_maskz_loadu_ps(m, vr + 16 * u) : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int r = 0; r < TR; r++) {
            const __m512 x = _mm512_set1_ps(t->pr[r][c]);
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++)
                if (u < nv) acc[r][u] = _mm512_fmadd_ps(x, b[u], acc[r][u]);
        }
    }
    /* constant indices only, so that acc stays in registers */
#pragma GCC unroll 4
    for (int r = 0; r < TR; r++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            if (r >= t->rows) break;
            if (u < nv - 1) _mm512_storeu_ps(t->orow[r] + d0 + 16 * u, acc[r][u]);
            else if (u == nv - 1) _mm512_mask_storeu_ps(t->orow[r] + d0 + 16 * u, m, acc[r][u]);
        }
}

__attribute__((target("avx512f"))) static void pv_avx512(const tile *t, int64_t cf, int64_t cl)
{
    for (int64_t d0 = 0; d0 < t->hd; d0 += 64) {
        const int64_t n = t->hd - d0 < 64 ? t->hd - d0 : 64;
        const int nv = (int)((n + 15) / 16);
        const __mmask16 m = (__mmask16)((1u << (n - 16 * (nv - 1))) - 1u);
        switch (nv) {
        case 4: pv512_cols(t, cf, cl, d0, 4, m); break;
        case 3: pv512_cols(t, cf, cl, d0, 3, m); break;
        case 2: pv512_cols(t, cf, cl, d0, 2, m); break;
        default: pv512_cols(t, cf, cl, d0, 1, m); break;
        }
    }
}

__attribute__((target("avx512f"))) static float max_avx512(const float *p, int64_t n)
{
    __m512 m = _mm512_set1_ps(p[0]);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) m = _mm512_max_ps(_mm512_loadu_ps(p + j), m);
    if (j < n) m = _mm512_mask_max_ps(m, (__mmask16)((1u << (n - j)) - 1u),
                                      _mm512_maskz_loadu_ps((__mmask16)((1u << (n - j)) - 1u), p + j), m);
    return _mm512_reduce_max_ps(m);
}

__attribute__((target("avx512f"))) static void exp_avx512(float *p, int64_t n, float mx)
{
    const __m512 m = _mm512_set1_ps(mx);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(p + j, exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), m)));
    if (j < n) {
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1u);
        _mm512_mask_storeu_ps(p + j, k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + j), m)));
    }
}
#endif /* RL_VEC_X86 */

/* ---- the block ------------------------------------------------------------- */

typedef struct {
    void (*qk)(const tile *, int64_t, int64_t, float);
    void (*pv)(const tile *, int64_t, int64_t);
    float (*max)(const float *, int64_t);
    void (*exp)(float *, int64_t, float);
} kernels;

static kernels kernels_of(rl_cpu_isa isa)
{
#ifdef RL_VEC_X86
    if (isa == RL_ISA_AVX512) return (kernels){qk_avx512, pv_avx512, max_avx512, exp_avx512};
    if (isa == RL_ISA_AVX2) return (kernels){qk_avx2, pv_avx2, max_avx2, exp_avx2};
#endif
    (void)isa;
    return (kernels){qk_generic, pv_generic, max_generic, exp_generic};
}

/* K^T of keys 0..nk-1 (rows strided by W) as panels [hd][KP], zero-padded */
static void pack_kt(float *kt, const float *k, int64_t W, int64_t hd, int64_t nk)
{
    for (int64_t p = 0; p * KP < nk; p++) {
        float *dst = kt + p * hd * KP;
        for (int l = 0; l < KP; l++) {
            int64_t j = p * KP + l;
            if (j < nk) {
                const float *src = k + j * W;
                if (j + 8 < nk)   /* rows are W apart: fetch ahead of the strided walk */
                    for (int64_t d = 0; d < hd; d += 16) __builtin_prefetch(src + 8 * W + d);
                for (int64_t d = 0; d < hd; d++) dst[d * KP + l] = src[d];
            } else {
                for (int64_t d = 0; d < hd; d++) dst[d * KP + l] = 0.0f;
            }
        }
    }
}

void rl_attention_block(rl_cpu_isa isa, const float *q, const float *k, const float *v, float *o,
                        int64_t W, int64_t Wo, int64_t hd, int64_t group, int64_t i0, int64_t mb,
                        float scale, int64_t window, float softcap, float *scratch)
{
    const kernels K = kernels_of(isa);
    /* key columns: c = key - k0, k0 the first key any row of the block sees */
    const int64_t k0 = window > 0 && i0 - window + 1 > 0 ? i0 - window + 1 : 0;
    const int64_t nk = i0 + mb - k0, ldp = (nk + KP - 1) / KP * KP;
    float *kt = scratch, *P = scratch + ldp * hd;
    pack_kt(kt, k + k0 * W, W, hd, nk);
    tile t = {.kt = kt, .v = v + k0 * W, .W = W, .hd = hd};
    for (int64_t g = 0; g < group; g++)
        for (int64_t r0 = 0; r0 < mb; r0 += TR) {
            const int64_t rows = mb - r0 < TR ? mb - r0 : TR;
            int64_t first[TR], last[TR];
            t.rows = rows;
            for (int r = 0; r < TR; r++) {
                const int64_t rr = r < rows ? r : rows - 1, i = i0 + r0 + rr;
                t.qr[r] = q + i * W + g * hd;
                t.pw[r] = P + r * ldp;
                t.pr[r] = P + rr * ldp;
                t.orow[r] = o + i * Wo + g * hd;
                first[r] = (window > 0 && i - window + 1 > k0 ? i - window + 1 : k0) - k0;
                last[r] = i - k0;
            }
            /* columns cf..cl: the first row's first visible key to the last row's last */
            const int64_t cf = first[0], cl = last[TR - 1];
            K.qk(&t, cf / KP, cl / KP, scale);
            for (int64_t r = 0; r < rows; r++) {
                float *p = t.pw[r];
                const int64_t a = first[r], b = last[r];
                if (softcap > 0.0f)
                    for (int64_t j = a; j <= b; j++) p[j] = softcap * tanhf(p[j] / softcap);
                K.exp(p + a, b - a + 1, K.max(p + a, b - a + 1));
                for (int64_t j = cf; j < a; j++) p[j] = 0.0f;
                for (int64_t j = b + 1; j <= cl; j++) p[j] = 0.0f;
            }
            /* sums in key order, the rows' chains interleaved */
            float sum[TR] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t c = cf; c <= cl; c++)
                for (int r = 0; r < TR; r++) sum[r] += t.pr[r][c];
            for (int64_t r = 0; r < rows; r++) {
                const float inv = 1.0f / sum[r];
                float *p = t.pw[r];
                for (int64_t j = first[r]; j <= last[r]; j++) p[j] *= inv;
            }
            K.pv(&t, cf, cl);
        }
}
