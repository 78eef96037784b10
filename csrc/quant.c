/* quant.c - CPU dequantization of weights kept in their stored format
 * (quant.h): the GGUF block types, row by row into fp32.
 *
 * Design choices:
 * - Each GGUF type is decoded block by block in the element order and with
 *   the float operations of gguf-py's `gguf.quants.dequantize` (the
 *   reference the tests compare against bitwise): scale products first
 *   (d * sc), then the value product, then the min subtracted or added as a
 *   separate rounding (the project compiles with -ffp-contract=off, so no
 *   FMA merges them).
 * - The per-block loops are plain integer/float loops over 16 or 32 lanes
 *   that GCC vectorizes; each type's row loop is built for AVX2 and for the
 *   baseline and picked at run time (target_clones), so one binary runs
 *   everywhere.
 * - Rows are independent (a row is a whole number of blocks), so a caller
 *   may dequantize any row range, and threads may split rows.
 * - Non-finite scales are refused by rl_qtensor_validate before any row is
 *   used; dequantizing itself never fails on block contents.
 */
#include "quant.h"
#include "common.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RL_CLONES
#endif

#define QK_K 256

static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1, 13, 25, 38, 53, 69, 89, 113};

typedef struct {
    int type;
    const char *name;
    int64_t block, bytes;
} type_info;

static const type_info TYPES[] = {
    {RL_GGML_F32, "F32", 1, 4},        {RL_GGML_F16, "F16", 1, 2},
    {RL_GGML_BF16, "BF16", 1, 2},      {RL_GGML_Q4_0, "Q4_0", 32, 18},
    {RL_GGML_Q4_1, "Q4_1", 32, 20},    {RL_GGML_Q5_0, "Q5_0", 32, 22},
    {RL_GGML_Q5_1, "Q5_1", 32, 24},    {RL_GGML_Q8_0, "Q8_0", 32, 34},
    {RL_GGML_Q2_K, "Q2_K", 256, 84},   {RL_GGML_Q3_K, "Q3_K", 256, 110},
    {RL_GGML_Q4_K, "Q4_K", 256, 144},  {RL_GGML_Q5_K, "Q5_K", 256, 176},
    {RL_GGML_Q6_K, "Q6_K", 256, 210},  {RL_GGML_IQ4_NL, "IQ4_NL", 32, 18},
    {RL_GGML_IQ4_XS, "IQ4_XS", 256, 136},
};

static const type_info *find_type(int t)
{
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (TYPES[i].type == t) return &TYPES[i];
    return NULL;
}

int rl_gguf_type_info(int ggml_type, int64_t *block_elems, int64_t *block_bytes)
{
    const type_info *ti = find_type(ggml_type);
    if (!ti) return 0;
    if (block_elems) *block_elems = ti->block;
    if (block_bytes) *block_bytes = ti->bytes;
    return 1;
}

const char *rl_gguf_type_name(int ggml_type)
{
    const type_info *ti = find_type(ggml_type);
    return ti ? ti->name : "?";
}

size_t rl_qtensor_row_bytes(const rl_qtensor *q)
{
    const type_info *ti = q->family == RL_QF_GGUF ? find_type(q->subtype) : NULL;
    if (!ti || q->cols <= 0 || q->cols % ti->block) return 0;
    return (size_t)(q->cols / ti->block) * (size_t)ti->bytes;
}

/* float16 -> float32 by table (exact, as rl_f16_to_f32: 256 KiB, filled once) */
static float F16_TABLE[65536];
static pthread_once_t f16_once = PTHREAD_ONCE_INIT;

static void fill_f16_table(void)
{
    for (uint32_t h = 0; h < 65536; h++) F16_TABLE[h] = rl_f16_to_f32((uint16_t)h);
}

static inline float f16(const uint8_t *p) { return F16_TABLE[p[0] | (p[1] << 8)]; }

static inline uint16_t u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* ---- validation ---------------------------------------------------------- */

/* Byte offsets of a block's float16 scales (d, and dmin / m where stored). */
static int scale_offsets(int type, int off[2])
{
    switch (type) {
    case RL_GGML_Q4_0: case RL_GGML_Q5_0: case RL_GGML_Q8_0: case RL_GGML_IQ4_NL:
    case RL_GGML_IQ4_XS:
        off[0] = 0; return 1;
    case RL_GGML_Q4_1: case RL_GGML_Q5_1: case RL_GGML_Q4_K: case RL_GGML_Q5_K:
        off[0] = 0; off[1] = 2; return 2;
    case RL_GGML_Q2_K: off[0] = 80; off[1] = 82; return 2;
    case RL_GGML_Q3_K: off[0] = 108; return 1;
    case RL_GGML_Q6_K: off[0] = 208; return 1;
    default: return 0;
    }
}

int rl_qtensor_validate(const rl_qtensor *q, char *err, size_t errlen)
{
    if (q->family != RL_QF_GGUF) {
        snprintf(err, errlen, "quantization family %d is not supported by this build yet "
                 "(supported: GGUF blocks)", q->family);
        return 1;
    }
    const type_info *ti = find_type(q->subtype);
    if (!ti) {
        snprintf(err, errlen, "GGML type %d is not supported", q->subtype);
        return 1;
    }
    if (q->rows <= 0 || q->cols <= 0 || q->cols % ti->block) {
        snprintf(err, errlen, "shape [%lld, %lld] does not hold whole %s blocks of %lld "
                 "elements per row", (long long)q->rows, (long long)q->cols, ti->name,
                 (long long)ti->block);
        return 1;
    }
    size_t row_bytes = rl_qtensor_row_bytes(q);
    if (!q->part[0] || q->part_bytes[0] / row_bytes != (size_t)q->rows
        || q->part_bytes[0] % row_bytes) {
        snprintf(err, errlen, "holds %zu bytes of %s blocks, expected %zu for shape [%lld, %lld]",
                 q->part_bytes[0], ti->name, row_bytes * (size_t)q->rows, (long long)q->rows,
                 (long long)q->cols);
        return 1;
    }
    int off[2];
    int n = scale_offsets(q->subtype, off);
    if (!n) return 0;
    const uint8_t *b = q->part[0];
    size_t nblocks = q->part_bytes[0] / (size_t)ti->bytes;
    size_t per_row = row_bytes / (size_t)ti->bytes;
    for (size_t i = 0; i < nblocks; i++, b += ti->bytes)
        for (int k = 0; k < n; k++)
            if ((u16(b + off[k]) & 0x7c00u) == 0x7c00u) {
                snprintf(err, errlen, "%s block %zu of row %zu has a non-finite scale (%s) "
                         "(corrupt tensor data)", ti->name, i % per_row, i / per_row,
                         k ? "min" : "d");
                return 1;
            }
    return 0;
}

/* ---- block decoders (one block -> its elements) -------------------------- */

static inline void blk_q4_0(const uint8_t *b, float *y)
{
    float d = f16(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((int)(qs[j] & 0xF) - 8);
        y[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
    }
}

static inline void blk_q4_1(const uint8_t *b, float *y)
{
    float d = f16(b), m = f16(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        float lo = d * (float)(qs[j] & 0xF), hi = d * (float)(qs[j] >> 4);
        y[j] = lo + m;
        y[j + 16] = hi + m;
    }
}

static inline void blk_q5_0(const uint8_t *b, float *y)
{
    float d = f16(b);
    uint32_t qh = (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
        int hi = (qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static inline void blk_q5_1(const uint8_t *b, float *y)
{
    float d = f16(b), m = f16(b + 2);
    uint32_t qh = (uint32_t)b[4] | (uint32_t)b[5] << 8 | (uint32_t)b[6] << 16 | (uint32_t)b[7] << 24;
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
        int hi = (qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        float a = d * (float)lo, c = d * (float)hi;
        y[j] = a + m;
        y[j + 16] = c + m;
    }
}

static inline void blk_q8_0(const uint8_t *b, float *y)
{
    float d = f16(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = (float)qs[j] * d;
}

static inline void blk_iq4_nl(const uint8_t *b, float *y)
{
    float d = f16(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)IQ4_VALUES[qs[j] & 0xF];
        y[j + 16] = d * (float)IQ4_VALUES[qs[j] >> 4];
    }
}

/* Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin. */
static inline void blk_q2_k(const uint8_t *b, float *y)
{
    const uint8_t *sc = b, *qs = b + 16;
    float d = f16(b + 80), dmin = f16(b + 82);
    for (int g = 0; g < 16; g++) {
        float dl = d * (float)(sc[g] & 0xF), ml = dmin * (float)(sc[g] >> 4);
        /* element o = h*128 + s*32 + j takes bits 2s of qs[h*32 + j] */
        int h = g / 8, s = (g % 8) / 2, j0 = (g % 2) * 16;
        const uint8_t *q = qs + h * 32 + j0;
        float *out = y + g * 16;
        for (int j = 0; j < 16; j++) {
            float v = dl * (float)((q[j] >> (2 * s)) & 3);
            out[j] = v - ml;
        }
    }
}

/* Q3_K: hmask[32], qs[64], scales[12] (6-bit, packed), d. */
static inline void blk_q3_k(const uint8_t *b, float *y)
{
    const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
    float d = f16(b + 108), dl[16];
    for (int g = 0; g < 16; g++) {
        int lo = (sc[g % 8] >> (4 * (g / 8))) & 0xF;
        int hi = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
        dl[g] = d * (float)((int8_t)(uint8_t)(lo | hi << 4) - 32);
    }
    /* element h*128 + j*32 + l: bits 2j of qs[h*32 + l], bit h*4 + j of hm[l] */
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
            for (int half = 0; half < 2; half++) {
                float s = dl[h * 8 + 2 * j + half];
                float *out = y + h * 128 + j * 32 + half * 16;
                const uint8_t *q = qs + h * 32 + half * 16, *m = hm + half * 16;
                for (int l = 0; l < 16; l++) {
                    int low = (q[l] >> (2 * j)) & 3;
                    int high = ((m[l] >> (h * 4 + j)) & 1) ^ 1;
                    out[l] = s * (float)(low - (high << 2));
                }
            }
}

/* The 6-bit scales and mins of Q4_K / Q5_K sub-block i (0..7). */
static inline void scale_min_k4(const uint8_t *s, int i, int *sc, int *mn)
{
    if (i < 4) {
        *sc = s[i] & 0x3F;
        *mn = s[i + 4] & 0x3F;
    } else {
        *sc = (s[i + 4] & 0x0F) | ((s[i - 4] >> 2) & 0x30);
        *mn = (s[i + 4] >> 4) | ((s[i] >> 2) & 0x30);
    }
}

/* Q4_K: d, dmin, scales[12], qs[128]; sub-block 2g + s is nibble s of qs[g*32..]. */
static inline void blk_q4_k(const uint8_t *b, float *y)
{
    float d = f16(b), dmin = f16(b + 2);
    const uint8_t *scales = b + 4, *qs = b + 16;
    for (int i = 0; i < 8; i++) {
        int sc, mn;
        scale_min_k4(scales, i, &sc, &mn);
        float dl = d * (float)sc, ml = dmin * (float)mn;
        const uint8_t *q = qs + (i / 2) * 32;
        int shift = 4 * (i % 2);
        float *out = y + i * 32;
        for (int j = 0; j < 32; j++) {
            float v = dl * (float)((q[j] >> shift) & 0xF);
            out[j] = v - ml;
        }
    }
}

/* Q5_K: d, dmin, scales[12], qh[32] (bit i: sub-block i), qs[128]. */
static inline void blk_q5_k(const uint8_t *b, float *y)
{
    float d = f16(b), dmin = f16(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + 48;
    for (int i = 0; i < 8; i++) {
        int sc, mn;
        scale_min_k4(scales, i, &sc, &mn);
        float dl = d * (float)sc, ml = dmin * (float)mn;
        const uint8_t *q = qs + (i / 2) * 32;
        int shift = 4 * (i % 2);
        float *out = y + i * 32;
        for (int j = 0; j < 32; j++) {
            int v5 = ((q[j] >> shift) & 0xF) | ((qh[j] >> i) & 1) << 4;
            float v = dl * (float)v5;
            out[j] = v - ml;
        }
    }
}

/* Q6_K: ql[128], qh[64], scales[16] (int8), d. */
static inline void blk_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = f16(b + 208);
    /* within half h: element l + 32k takes nibble k/2 of ql[h*64 + l + 32(k%2)]
       and bits 2k of qh[h*32 + l] */
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 4; k++)
            for (int half = 0; half < 2; half++) {
                int g = h * 8 + k * 2 + half;
                float dl = d * (float)sc[g];
                const uint8_t *lo = ql + h * 64 + 32 * (k % 2) + half * 16;
                const uint8_t *hi = qh + h * 32 + half * 16;
                float *out = y + g * 16;
                for (int l = 0; l < 16; l++) {
                    int v = ((lo[l] >> (4 * (k / 2))) & 0xF) | ((hi[l] >> (2 * k)) & 3) << 4;
                    out[l] = dl * (float)(v - 32);
                }
            }
}

/* IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]; 8 sub-blocks of 32. */
static inline void blk_iq4_xs(const uint8_t *b, float *y)
{
    float d = f16(b);
    unsigned sh = u16(b + 2);
    const uint8_t *sl = b + 4, *qs = b + 8;
    for (int ib = 0; ib < 8; ib++) {
        int lo = (sl[ib / 2] >> (4 * (ib % 2))) & 0xF, hi = (sh >> (2 * ib)) & 3;
        float dl = d * (float)((int8_t)(uint8_t)(lo | hi << 4) - 32);
        const uint8_t *q = qs + ib * 16;
        float *out = y + ib * 32;
        for (int j = 0; j < 16; j++) {
            out[j] = dl * (float)IQ4_VALUES[q[j] & 0xF];
            out[j + 16] = dl * (float)IQ4_VALUES[q[j] >> 4];
        }
    }
}

/* ---- row loops (one clone per instruction set) ---------------------------- */

#define ROW_LOOP(NAME, BLK, BLOCK, BYTES)                                              \
    RL_CLONES static void NAME(const uint8_t *src, int64_t nblocks, float *out)        \
    {                                                                                   \
        for (int64_t i = 0; i < nblocks; i++) BLK(src + i * (BYTES), out + i * (BLOCK)); \
    }

ROW_LOOP(rows_q4_0, blk_q4_0, 32, 18)
ROW_LOOP(rows_q4_1, blk_q4_1, 32, 20)
ROW_LOOP(rows_q5_0, blk_q5_0, 32, 22)
ROW_LOOP(rows_q5_1, blk_q5_1, 32, 24)
ROW_LOOP(rows_q8_0, blk_q8_0, 32, 34)
ROW_LOOP(rows_iq4_nl, blk_iq4_nl, 32, 18)
ROW_LOOP(rows_q2_k, blk_q2_k, QK_K, 84)
ROW_LOOP(rows_q3_k, blk_q3_k, QK_K, 110)
ROW_LOOP(rows_q4_k, blk_q4_k, QK_K, 144)
ROW_LOOP(rows_q5_k, blk_q5_k, QK_K, 176)
ROW_LOOP(rows_q6_k, blk_q6_k, QK_K, 210)
ROW_LOOP(rows_iq4_xs, blk_iq4_xs, QK_K, 136)

static void rows_f16(const uint8_t *src, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++) out[i] = f16(src + 2 * i);
}

static void rows_bf16(const uint8_t *src, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)u16(src + 2 * i) << 16;
        memcpy(out + i, &bits, 4);
    }
}

static void rows_f32(const uint8_t *src, int64_t n, float *out) { memcpy(out, src, (size_t)n * 4); }

typedef void (*row_fn)(const uint8_t *, int64_t, float *);

static row_fn row_function(int type)
{
    switch (type) {
    case RL_GGML_F32: return rows_f32;
    case RL_GGML_F16: return rows_f16;
    case RL_GGML_BF16: return rows_bf16;
    case RL_GGML_Q4_0: return rows_q4_0;
    case RL_GGML_Q4_1: return rows_q4_1;
    case RL_GGML_Q5_0: return rows_q5_0;
    case RL_GGML_Q5_1: return rows_q5_1;
    case RL_GGML_Q8_0: return rows_q8_0;
    case RL_GGML_Q2_K: return rows_q2_k;
    case RL_GGML_Q3_K: return rows_q3_k;
    case RL_GGML_Q4_K: return rows_q4_k;
    case RL_GGML_Q5_K: return rows_q5_k;
    case RL_GGML_Q6_K: return rows_q6_k;
    case RL_GGML_IQ4_NL: return rows_iq4_nl;
    case RL_GGML_IQ4_XS: return rows_iq4_xs;
    default: return NULL;
    }
}

int rl_dequant_rows_f32(const rl_qtensor *q, int64_t r0, int64_t r1, float *out, char *err,
                        size_t errlen)
{
    if (q->family != RL_QF_GGUF) {
        snprintf(err, errlen, "dequantizing quantization family %d is not supported by this "
                 "build yet (supported: GGUF blocks)", q->family);
        return 1;
    }
    const type_info *ti = find_type(q->subtype);
    row_fn fn = row_function(q->subtype);
    size_t row_bytes = rl_qtensor_row_bytes(q);
    if (!ti || !fn || !row_bytes) {
        snprintf(err, errlen, "GGML type %d with %lld columns cannot be dequantized", q->subtype,
                 (long long)q->cols);
        return 1;
    }
    if (r0 < 0 || r1 > q->rows || r0 > r1) {
        snprintf(err, errlen, "rows [%lld, %lld) are outside [0, %lld)", (long long)r0,
                 (long long)r1, (long long)q->rows);
        return 1;
    }
    pthread_once(&f16_once, fill_f16_table);
    const uint8_t *src = (const uint8_t *)q->part[0] + (size_t)r0 * row_bytes;
    int64_t per_row = q->cols / ti->block;
    fn(src, (r1 - r0) * per_row, out);
    return 0;
}
