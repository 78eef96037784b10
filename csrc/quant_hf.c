/* quant_hf.c - AWQ / GPTQ / FP8-block dequantization on the CPU (quant_hf.h).
 *
 * Design choices:
 * - Every part size, the scales (finite) and g_idx (in range) are checked
 *   before anything is written, so a damaged file is an error, never an
 *   out-of-bounds read; FP8 NaN codes are found in the same pass as the
 *   dequantization and reported after it.
 * - Parts come from mmap'd safetensors slices, whose offsets need not be
 *   aligned: every load goes through memcpy (one unaligned load on x86/arm).
 * - Rows are split over OpenMP threads in blocks that share the parts'
 *   cache lines (8 rows per AWQ word column, 16 rows per GPTQ line of words);
 *   per row, the scales and zero points of every group are converted to fp32
 *   once, so the inner loops are shifts, a subtract and a multiply.
 * - Unpacked fields go to float through int32 (SSE2 has no unsigned
 *   conversion, which would keep the loops scalar).
 * - (q - zero) is a small integer, exact in fp32, so each weight is one
 *   rounding: the product with the exactly converted scale. */
#include "quant_hf.h"

#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static inline uint32_t ld_u32(const void *base, int64_t i)
{
    uint32_t v;
    memcpy(&v, (const unsigned char *)base + 4 * i, 4);
    return v;
}

static size_t scale_size(int dt) { return dt == RL_QHF_SCALE_F32 ? 4 : 2; }

static inline float ld_scale(const void *base, int dt, int64_t i)
{
    const unsigned char *p = (const unsigned char *)base;
    if (dt == RL_QHF_SCALE_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return dt == RL_QHF_SCALE_BF16 ? rl_bf16_to_f32(h) : rl_f16_to_f32(h);
}

static int check_part(const rl_qtensor *q, int i, const char *name, size_t want, char *err,
                      size_t errlen)
{
    if (!q->part[i])
        return fail(err, errlen, "%s is missing", name);
    if (q->part_bytes[i] != want)
        return fail(err, errlen, "%s has %zu bytes, expected %zu for a [%lld, %lld] weight", name,
                    q->part_bytes[i], want, (long long)q->rows, (long long)q->cols);
    return 0;
}

/* Scales [groups, rows] of rows [r0, r1): all finite. */
static int check_scales(const void *s, int dt, int64_t groups, int64_t rows, int64_t r0,
                        int64_t r1, char *err, size_t errlen)
{
    for (int64_t g = 0; g < groups; g++)
        for (int64_t r = r0; r < r1; r++) {
            float v = ld_scale(s, dt, g * rows + r);
            if (!isfinite(v))
                return fail(err, errlen, "scale [%lld, %lld] is %g (not finite)", (long long)g,
                            (long long)r, (double)v);
        }
    return 0;
}

/* ---- AWQ (GEMM packing) ------------------------------------------------- */

/* Shift of the output feature 8w + j inside its word. */
static const int awq_shift[8] = {0, 16, 4, 20, 8, 24, 12, 28};
#define AWQ_WORDS 8
#define AWQ_TILE 64

/* Bits, shape and part sizes of an AWQ tensor (no data read). */
static int awq_layout(const rl_qtensor *q, char *err, size_t errlen)
{
    const int64_t rows = q->rows, cols = q->cols, group = q->group;
    const int dt = RL_QHF_SCALE_DTYPE(q->subtype);
    if (RL_QHF_BITS(q->subtype) != 4)
        return fail(err, errlen, "AWQ with %d bits is not supported (4 bits only)",
                    RL_QHF_BITS(q->subtype));
    if (rows % 8 || group <= 0 || cols % group)
        return fail(err, errlen, "AWQ weight [%lld, %lld]: out_features must be a multiple of 8 "
                    "and in_features of the group size %lld", (long long)rows, (long long)cols,
                    (long long)group);
    const int64_t words = rows / 8, groups = cols / group;
    if (check_part(q, 0, "qweight", (size_t)(cols * words * 4), err, errlen) < 0 ||
        (q->part[1] && check_part(q, 1, "qzeros", (size_t)(groups * words * 4), err, errlen) < 0) ||
        check_part(q, 2, "scales", (size_t)(groups * rows) * scale_size(dt), err, errlen) < 0)
        return -1;
    return 0;
}

static int awq_rows(const rl_qtensor *q, int64_t r0, int64_t r1, float *out, int nt, int *team,
                    char *err, size_t errlen)
{
    const int64_t rows = q->rows, cols = q->cols, group = q->group;
    const int dt = RL_QHF_SCALE_DTYPE(q->subtype);
    if (awq_layout(q, err, errlen) < 0) return -1;
    const int64_t words = rows / 8, groups = cols / group;
    if (check_scales(q->part[2], dt, groups, rows, r0, r1, err, errlen) < 0) return -1;
    const void *qw = q->part[0], *qz = q->part[1], *sc = q->part[2];
    /* blocks of AWQ_WORDS word columns (8 output rows each): one line of
     * qweight per input feature feeds 8 * AWQ_WORDS rows */
    const int64_t first = r0 / 8, last = (r1 + 7) / 8;   /* word columns touched */
    const int64_t nblocks = (last - first + AWQ_WORDS - 1) / AWQ_WORDS;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        if (blk == 0) *team = omp_get_num_threads();
        const int64_t w0 = first + blk * AWQ_WORDS;
        const int64_t w1 = w0 + AWQ_WORDS < last ? w0 + AWQ_WORDS : last;
        const int64_t a = w0 * 8 > r0 ? w0 * 8 : r0, b = w1 * 8 < r1 ? w1 * 8 : r1;
        float tile[8 * AWQ_WORDS * AWQ_TILE];     /* [rows of the block][AWQ_TILE inputs] */
        const int full = a == w0 * 8 && b == w1 * 8;
        for (int64_t g = 0; g < groups; g++) {
            float s[8 * AWQ_WORDS], z[8 * AWQ_WORDS];
            for (int64_t o = a; o < b; o++) {
                s[o - a] = ld_scale(sc, dt, g * rows + o);
                z[o - a] = qz ? (float)((ld_u32(qz, g * words + o / 8) >> awq_shift[o % 8]) & 15u)
                              : 8.0f;
            }
            /* decode into an L1-sized tile, then write whole row segments */
            for (int64_t i0 = g * group; i0 < (g + 1) * group; i0 += AWQ_TILE) {
                const int64_t n = (g + 1) * group - i0 < AWQ_TILE ? (g + 1) * group - i0 : AWQ_TILE;
                if (full)
                    for (int64_t i = 0; i < n; i++)
                        for (int64_t w = w0; w < w1; w++) {
                            const uint32_t v = ld_u32(qw, (i0 + i) * words + w);
                            float *t = tile + (w - w0) * 8 * AWQ_TILE + i;
                            const float *sw = s + (w - w0) * 8, *zw = z + (w - w0) * 8;
                            for (int j = 0; j < 8; j++)
                                t[j * AWQ_TILE] =
                                    ((float)(int32_t)((v >> awq_shift[j]) & 15u) - zw[j]) * sw[j];
                        }
                else       /* a row range that cuts a word */
                    for (int64_t i = 0; i < n; i++)
                        for (int64_t o = a; o < b; o++) {
                            const uint32_t v = ld_u32(qw, (i0 + i) * words + o / 8);
                            tile[(o - a) * AWQ_TILE + i] =
                                ((float)(int32_t)((v >> awq_shift[o % 8]) & 15u) - z[o - a]) * s[o - a];
                        }
                for (int64_t o = a; o < b; o++)
                    memcpy(out + (o - r0) * cols + i0, tile + (o - a) * AWQ_TILE,
                           (size_t)n * sizeof(float));
            }
        }
    }
    return 0;
}

/* ---- GPTQ ---------------------------------------------------------------- */

#define GPTQ_BLOCK 64

/* One block of rows [a, b): S and Z hold groups floats per row. Inlined with
 * a constant `bits`, so the field extraction unrolls. */
static inline void gptq_block(const void *qw, const int32_t *gid, int64_t rows, int64_t cols,
                              int64_t a, int64_t b, int64_t r0, int64_t groups, const float *S,
                              const float *Z, float *out, int uniform, const int bits)
{
    const int pf = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t p = 0; p < cols / pf; p++)
        for (int64_t o = a; o < b; o++) {
            const uint32_t v = ld_u32(qw, p * rows + o);
            const float *s = S + (o - a) * groups, *z = Z + (o - a) * groups;
            float *dst = out + (o - r0) * cols + p * pf;
            const int32_t *g = gid + p * pf;
            if (uniform) {       /* one group for the whole word: scalars, no gathers */
                const float sg = s[g[0]], zg = z[g[0]];
                for (int j = 0; j < pf; j++)
                    dst[j] = ((float)(int32_t)((v >> (bits * j)) & mask) - zg) * sg;
            } else {
                for (int j = 0; j < pf; j++)
                    dst[j] = ((float)(int32_t)((v >> (bits * j)) & mask) - z[g[j]]) * s[g[j]];
            }
        }
}

/* Bits, shape and part sizes of a GPTQ tensor; *groups_out = the groups of
 * its scales (no data read). */
static int gptq_layout(const rl_qtensor *q, int64_t *groups_out, char *err, size_t errlen)
{
    const int64_t rows = q->rows, cols = q->cols;
    const int bits = RL_QHF_BITS(q->subtype), dt = RL_QHF_SCALE_DTYPE(q->subtype);
    if (bits != 2 && bits != 4 && bits != 8)
        return fail(err, errlen, "GPTQ with %d bits is not supported (2, 4 or 8 bits)", bits);
    const int64_t pf = 32 / bits;
    if (rows % pf || cols % pf)
        return fail(err, errlen, "GPTQ weight [%lld, %lld]: both sizes must be multiples of %lld",
                    (long long)rows, (long long)cols, (long long)pf);
    if (!q->part[2] || q->part_bytes[2] % ((size_t)rows * scale_size(dt)) ||
        q->part_bytes[2] == 0)
        return fail(err, errlen, "scales has %zu bytes, not a whole number of groups of %lld "
                    "scales", q->part_bytes[2], (long long)rows);
    const int64_t groups = (int64_t)(q->part_bytes[2] / ((size_t)rows * scale_size(dt)));
    if (!q->part[3] && (q->group <= 0 || cols % q->group || cols / q->group != groups))
        return fail(err, errlen, "scales hold %lld groups but in_features %lld in groups of %lld "
                    "need %lld", (long long)groups, (long long)cols, (long long)q->group,
                    (long long)(q->group > 0 ? (cols + q->group - 1) / q->group : 0));
    if (check_part(q, 0, "qweight", (size_t)(cols / pf * rows * 4), err, errlen) < 0 ||
        (q->part[1] && check_part(q, 1, "qzeros", (size_t)(groups * (rows / pf) * 4), err,
                                  errlen) < 0) ||
        (q->part[3] && check_part(q, 3, "g_idx", (size_t)(cols * 4), err, errlen) < 0))
        return -1;
    *groups_out = groups;
    return 0;
}

static int gptq_rows(const rl_qtensor *q, int64_t r0, int64_t r1, float *out, int nt, int *team,
                     char *err, size_t errlen)
{
    const int64_t rows = q->rows, cols = q->cols;
    const int bits = RL_QHF_BITS(q->subtype), dt = RL_QHF_SCALE_DTYPE(q->subtype);
    const int minus_one = (q->subtype & RL_QHF_ZERO_MINUS_ONE) != 0;
    int64_t groups;
    if (gptq_layout(q, &groups, err, errlen) < 0 ||
        check_scales(q->part[2], dt, groups, rows, r0, r1, err, errlen) < 0)
        return -1;
    const int64_t pf = 32 / bits;
    int32_t *gid = malloc((size_t)cols * sizeof(int32_t));
    if (!gid) return fail(err, errlen, "out of memory (%lld group indices)", (long long)cols);
    for (int64_t i = 0; i < cols; i++) {
        int32_t g = q->part[3] ? (int32_t)ld_u32(q->part[3], i) : (int32_t)(i / q->group);
        if (g < 0 || g >= groups) {
            free(gid);
            return fail(err, errlen, "g_idx[%lld] is %d, outside 0..%lld (the groups of scales)",
                        (long long)i, (int)g, (long long)groups - 1);
        }
        gid[i] = g;
    }
    /* every word's pf input features in one group (no act-order, groups of
     * whole words): the common layout, without per-feature gathers */
    int uniform = 1;
    for (int64_t i = 0; i < cols && uniform; i++) uniform = gid[i] == gid[i - i % pf];
    const void *qw = q->part[0], *qz = q->part[1], *sc = q->part[2];
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t nblocks = (r1 - r0 + GPTQ_BLOCK - 1) / GPTQ_BLOCK;
    int oom = 0;
#pragma omp parallel num_threads(nt)
    {
        if (omp_get_thread_num() == 0) *team = omp_get_num_threads();
        float *S = malloc(sizeof(float) * 2 * GPTQ_BLOCK * (size_t)groups);
        float *Z = S ? S + GPTQ_BLOCK * groups : NULL;
        if (!S) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            if (!S) continue;
            const int64_t a = r0 + blk * GPTQ_BLOCK;
            const int64_t b = a + GPTQ_BLOCK < r1 ? a + GPTQ_BLOCK : r1;
            for (int64_t o = a; o < b; o++)
                for (int64_t g = 0; g < groups; g++) {
                    S[(o - a) * groups + g] = ld_scale(sc, dt, g * rows + o);
                    uint32_t zf = qz ? (ld_u32(qz, g * (rows / pf) + o / pf) >>
                                        (bits * (o % pf))) & mask
                                     : 1u << (bits - 1);
                    Z[(o - a) * groups + g] = (float)(zf + (qz && minus_one ? 1u : 0u));
                }
            if (bits == 4) gptq_block(qw, gid, rows, cols, a, b, r0, groups, S, Z, out, uniform, 4);
            else if (bits == 8) gptq_block(qw, gid, rows, cols, a, b, r0, groups, S, Z, out, uniform, 8);
            else gptq_block(qw, gid, rows, cols, a, b, r0, groups, S, Z, out, uniform, 2);
        }
        free(S);
    }
    free(gid);
    if (oom) return fail(err, errlen, "out of memory (scales of %lld groups)", (long long)groups);
    return 0;
}

/* ---- FP8 e4m3fn with block scales ----------------------------------------- */

/* e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities,
 * S.1111.111 is NaN. A normal code is its fp32 bits directly (exponent
 * rebased by 120); a subnormal one is m * 2^-9, an exact product. No table
 * and no subnormal fp32 arithmetic (which a flush-to-zero mode set by any
 * library in the process would change), and the loop vectorizes. */
static inline float e4m3_to_f32(uint32_t b)
{
    const uint32_t em = b & 0x7Fu;
    const uint32_t normal = (em << 20) + (120u << 23);
    const float sub = (float)(int32_t)em * 0x1p-9f;   /* the value when em < 8 */
    uint32_t sub_bits;
    memcpy(&sub_bits, &sub, 4);
    const uint32_t m = 0u - (uint32_t)(em < 8);   /* a mask, not a branch: it vectorizes */
    const uint32_t out = (sub_bits & m) | (normal & ~m) | (b & 0x80u) << 24;
    float v;
    memcpy(&v, &out, 4);
    return v;
}

/* Block edge, shape and part sizes of an FP8 tensor (no data read). */
static int fp8_layout(const rl_qtensor *q, char *err, size_t errlen)
{
    const int64_t rows = q->rows, cols = q->cols, B = q->group;
    const int dt = RL_QHF_SCALE_DTYPE(q->subtype);
    if (B <= 0) return fail(err, errlen, "FP8 block size %lld is not positive", (long long)B);
    const int64_t srows = (rows + B - 1) / B, scols = (cols + B - 1) / B;
    if (check_part(q, 0, "weight", (size_t)(rows * cols), err, errlen) < 0 ||
        check_part(q, 1, "weight_scale_inv", (size_t)(srows * scols) * scale_size(dt), err,
                   errlen) < 0)
        return -1;
    return 0;
}

static int fp8_rows(const rl_qtensor *q, int64_t r0, int64_t r1, float *out, int nt, int *team,
                    char *err, size_t errlen)
{
    const int64_t rows = q->rows, cols = q->cols, B = q->group;
    const int dt = RL_QHF_SCALE_DTYPE(q->subtype);
    if (fp8_layout(q, err, errlen) < 0) return -1;
    const int64_t srows = (rows + B - 1) / B, scols = (cols + B - 1) / B;
    if (check_scales(q->part[1], dt, 1, srows * scols, (r0 / B) * scols,
                     ((r1 + B - 1) / B) * scols, err, errlen) < 0)
        return -1;
    const unsigned char *w = (const unsigned char *)q->part[0];
    const void *sc = q->part[1];
    int64_t nan_at = -1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        if (r == r0) *team = omp_get_num_threads();
        const unsigned char *src = w + r * cols;
        float *dst = out + (r - r0) * cols;
        unsigned bad = 0;
        for (int64_t cb = 0; cb < scols; cb++) {
            const float s = ld_scale(sc, dt, (r / B) * scols + cb);
            const int64_t end = (cb + 1) * B < cols ? (cb + 1) * B : cols;
            for (int64_t c = cb * B; c < end; c++) {
                dst[c] = e4m3_to_f32(src[c]) * s;
                bad |= (unsigned)((src[c] & 0x7Fu) == 0x7Fu);
            }
        }
        if (bad) {
#pragma omp critical(rl_fp8_nan)
            if (nan_at < 0 || r < nan_at) nan_at = r;
        }
    }
    if (nan_at >= 0) {
        int64_t c = 0;
        while ((w[nan_at * cols + c] & 0x7Fu) != 0x7Fu) c++;
        return fail(err, errlen, "weight [%lld, %lld] is an e4m3 NaN", (long long)nan_at,
                    (long long)c);
    }
    return 0;
}

/* Shape and scale dtype, the checks every family shares. */
static int check_header(const rl_qtensor *q, char *err, size_t errlen)
{
    if (q->rows <= 0 || q->cols <= 0)
        return fail(err, errlen, "weight shape [%lld, %lld] is empty", (long long)q->rows,
                    (long long)q->cols);
    /* far above any model; keeps every byte count below in int64 */
    if (q->cols > (INT64_C(1) << 40) || q->rows > (INT64_C(1) << 56) / q->cols)
        return fail(err, errlen, "weight shape [%lld, %lld] is too large", (long long)q->rows,
                    (long long)q->cols);
    const int dt = RL_QHF_SCALE_DTYPE(q->subtype);
    if (dt != RL_QHF_SCALE_F16 && dt != RL_QHF_SCALE_BF16 && dt != RL_QHF_SCALE_F32)
        return fail(err, errlen, "scale dtype code %d is not f16, bf16 or f32", dt);
    return 0;
}

int rl_qtensor_validate_hf(const rl_qtensor *q, char *err, size_t errlen)
{
    if (!q) return fail(err, errlen, "no tensor");
    if (check_header(q, err, errlen) < 0) return -1;
    const int dt = RL_QHF_SCALE_DTYPE(q->subtype);
    const int64_t rows = q->rows, cols = q->cols;
    switch (q->family) {
    case RL_QF_AWQ:
        if (awq_layout(q, err, errlen) < 0) return -1;
        return check_scales(q->part[2], dt, cols / q->group, rows, 0, rows, err, errlen);
    case RL_QF_GPTQ: {
        int64_t groups;
        if (gptq_layout(q, &groups, err, errlen) < 0 ||
            check_scales(q->part[2], dt, groups, rows, 0, rows, err, errlen) < 0)
            return -1;
        if (q->part[3])
            for (int64_t i = 0; i < cols; i++) {
                const int32_t g = (int32_t)ld_u32(q->part[3], i);
                if (g < 0 || g >= groups)
                    return fail(err, errlen, "g_idx[%lld] is %d, outside 0..%lld (the groups of "
                                "scales)", (long long)i, (int)g, (long long)groups - 1);
            }
        return 0;
    }
    case RL_QF_FP8_BLOCK: {
        if (fp8_layout(q, err, errlen) < 0) return -1;
        const int64_t B = q->group, n = ((rows + B - 1) / B) * ((cols + B - 1) / B);
        if (check_scales(q->part[1], dt, 1, n, 0, n, err, errlen) < 0) return -1;
        const unsigned char *w = (const unsigned char *)q->part[0];
        for (int64_t i = 0; i < rows * cols; i++)
            if ((w[i] & 0x7Fu) == 0x7Fu)
                return fail(err, errlen, "weight [%lld, %lld] is an e4m3 NaN",
                            (long long)(i / cols), (long long)(i % cols));
        return 0;
    }
    default: return fail(err, errlen, "quantized family %d is not an HF directory format",
                         q->family);
    }
}

int rl_dequant_hf_rows_f32(const rl_qtensor *q, int64_t r0, int64_t r1, float *out,
                           int n_threads, int *team, char *err, size_t errlen)
{
    int ran = 0;
    if (!team) team = &ran;
    *team = 0;
    if (n_threads < 1) return fail(err, errlen, "n_threads is %d, not >= 1", n_threads);
    if (!q || !out) return fail(err, errlen, "no tensor or no output");
    if (check_header(q, err, errlen) < 0) return -1;
    if (r0 < 0 || r1 < r0 || r1 > q->rows)
        return fail(err, errlen, "rows [%lld, %lld) outside 0..%lld", (long long)r0,
                    (long long)r1, (long long)q->rows);
    if (r0 == r1) return 0;
    switch (q->family) {
    case RL_QF_AWQ: return awq_rows(q, r0, r1, out, n_threads, team, err, errlen);
    case RL_QF_GPTQ: return gptq_rows(q, r0, r1, out, n_threads, team, err, errlen);
    case RL_QF_FP8_BLOCK: return fp8_rows(q, r0, r1, out, n_threads, team, err, errlen);
    default: return fail(err, errlen, "quantized family %d is not an HF directory format",
                         q->family);
    }
}
