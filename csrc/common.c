/* common.c - errors, dtypes, conversions, tensor shapes and sizes.
 *
 * Design choices:
 * - The last error is thread-local: the binding reads it on the thread that
 *   called the failing function, so concurrent engines never mix messages.
 *   The file:line of the place that detected it is kept apart
 *   (rl_last_error_where): users read the message, bug reports the place.
 * - Conversions are bit-exact C (no intrinsics) so the CPU and CUDA builds
 *   agree on what a bf16/f16 checkpoint value is.
 * - Shapes and byte counts are derived here from the config only, so the
 *   binding can plan memory (plan_bytes) without creating a model.
 */
#include "common.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ---- errors ------------------------------------------------------------ */

/* The message for users and, apart, where it was recorded ("csrc/engine.c:123",
 * for bug reports): the binding raises the first and attaches the second. */
static _Thread_local char rl_err_msg[1024];
static _Thread_local char rl_err_where[256];

rl_status rl_error_set(rl_status st, const char *file, int line, const char *fmt, ...)
{
    char body[sizeof rl_err_msg];   /* an argument may be rl_last_error() itself */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    memcpy(rl_err_msg, body, sizeof body);
    snprintf(rl_err_where, sizeof rl_err_where, "%s:%d", file, line);
    return st;
}

const char *rl_last_error(void) { return rl_err_msg; }

const char *rl_last_error_where(void) { return rl_err_where; }

/* ---- dtypes ------------------------------------------------------------ */

size_t rl_dtype_size(rl_dtype dt)
{
    switch (dt) {
    case RL_F32: return 4;
    case RL_BF16: return 2;
    case RL_F16: return 2;
    }
    return 0;
}

const char *rl_dtype_name(rl_dtype dt)
{
    switch (dt) {
    case RL_F32: return "float32";
    case RL_BF16: return "bfloat16";
    case RL_F16: return "float16";
    }
    return "?";
}

static const char *const POOL_NAMES[RL_POOL_COUNT] = {"mean", "first", "last", "max"};

const char *rl_pool_name(int pool)
{
    return pool >= 0 && pool < RL_POOL_COUNT ? POOL_NAMES[pool] : "?";
}

int rl_pool_from_name(const char *name)
{
    for (int i = 0; i < RL_POOL_COUNT; i++)
        if (strcmp(name, POOL_NAMES[i]) == 0) return i;
    return -1;
}

static float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

float rl_bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

uint16_t rl_f32_to_bf16(float f)
{
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)          /* NaN: keep it quiet NaN */
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);              /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float rl_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f)                               /* inf / NaN */
        return bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {                                /* zero / subnormal: man * 2^-24 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

void rl_convert_to_f32(float *dst, const void *src, rl_dtype src_dtype, size_t n)
{
    if (src_dtype == RL_F32) {
        memcpy(dst, src, n * 4);
    } else if (src_dtype == RL_BF16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = rl_bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = rl_f16_to_f32(s[i]);
    }
}

/* ---- tensor kinds and shapes ------------------------------------------- */

static const char *const kind_names[RL_T_COUNT] = {
    "embed", "final_norm", "rope_inv_freq", "attn_norm", "q", "k", "v",
    "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "o", "o_bias", "ffn_norm",
    "gate", "up", "down", "gate_bias", "up_bias", "down_bias", "rope_inv_freq_swa",
    "post_attn_norm", "post_ffn_norm",
};

const char *rl_tensor_kind_name(rl_tensor_kind kind)
{
    return ((int)kind >= 0 && kind < RL_T_COUNT) ? kind_names[kind] : "?";
}

int rl_tensor_kind_from_name(const char *name)
{
    for (int k = 0; k < RL_T_COUNT; k++)
        if (strcmp(name, kind_names[k]) == 0) return k;
    return -1;
}

int rl_tensor_kind_is_global(rl_tensor_kind kind)
{
    return kind == RL_T_EMBED || kind == RL_T_FINAL_NORM || kind == RL_T_ROPE_INV_FREQ ||
           kind == RL_T_ROPE_INV_FREQ_SWA;
}

static int shape1(int64_t shape[2], int64_t a) { shape[0] = a; shape[1] = 0; return 1; }
static int shape2(int64_t shape[2], int64_t a, int64_t b) { shape[0] = a; shape[1] = b; return 2; }

int rl_tensor_shape(const rl_config *c, rl_tensor_kind kind, int64_t shape[2])
{
    int64_t d = c->hidden_size, ff = c->intermediate_size, hd = c->head_dim;
    int64_t q = c->num_heads * hd, kv = c->num_kv_heads * hd;
    shape[0] = shape[1] = 0;
    switch (kind) {
    case RL_T_EMBED: return shape2(shape, c->vocab_size, d);
    case RL_T_FINAL_NORM: return c->max_layer == c->num_layers ? shape1(shape, d) : 0;
    case RL_T_ROPE_INV_FREQ: return shape1(shape, hd / 2);
    case RL_T_ATTN_NORM: return c->norms != RL_NORMS_POST ? shape1(shape, d) : 0;
    case RL_T_Q: return shape2(shape, q, d);
    case RL_T_K: return shape2(shape, kv, d);
    case RL_T_V: return shape2(shape, kv, d);
    case RL_T_Q_BIAS: return c->attn_qkv_bias ? shape1(shape, q) : 0;
    case RL_T_K_BIAS: return c->attn_qkv_bias ? shape1(shape, kv) : 0;
    case RL_T_V_BIAS: return c->attn_qkv_bias ? shape1(shape, kv) : 0;
    case RL_T_Q_NORM: return c->qk_norm ? shape1(shape, c->qk_norm == RL_QK_NORM_PROJ ? q : hd) : 0;
    case RL_T_K_NORM: return c->qk_norm ? shape1(shape, c->qk_norm == RL_QK_NORM_PROJ ? kv : hd) : 0;
    case RL_T_O: return shape2(shape, d, q);
    case RL_T_O_BIAS: return c->attn_o_bias ? shape1(shape, d) : 0;
    case RL_T_FFN_NORM: return c->norms != RL_NORMS_POST ? shape1(shape, d) : 0;
    case RL_T_GATE: return shape2(shape, ff, d);
    case RL_T_UP: return shape2(shape, ff, d);
    case RL_T_DOWN: return shape2(shape, d, ff);
    case RL_T_GATE_BIAS: return c->mlp_bias ? shape1(shape, ff) : 0;
    case RL_T_UP_BIAS: return c->mlp_bias ? shape1(shape, ff) : 0;
    case RL_T_DOWN_BIAS: return c->mlp_bias ? shape1(shape, d) : 0;
    case RL_T_ROPE_INV_FREQ_SWA: return c->rope_swa ? shape1(shape, hd / 2) : 0;
    case RL_T_POST_ATTN_NORM: return c->norms != RL_NORMS_PRE ? shape1(shape, d) : 0;
    case RL_T_POST_FFN_NORM: return c->norms != RL_NORMS_PRE ? shape1(shape, d) : 0;
    case RL_T_COUNT: break;
    }
    return 0;
}

int64_t rl_config_loaded_layers(const rl_config *cfg)
{
    /* hidden-state index k needs decoder layers 0..k-1 */
    return cfg->max_layer < cfg->num_layers ? cfg->max_layer : cfg->num_layers;
}

/* Limit on every dimension: keeps products in int64 and GEMM sizes in int32. */
#define RL_DIM_MAX ((int64_t)1 << 30)

rl_status rl_config_validate(const rl_config *c)
{
    const struct { const char *name; int64_t v; } dims[] = {
        {"vocab_size", c->vocab_size}, {"hidden_size", c->hidden_size},
        {"intermediate_size", c->intermediate_size}, {"num_layers", c->num_layers},
        {"num_heads", c->num_heads}, {"num_kv_heads", c->num_kv_heads},
        {"head_dim", c->head_dim},
    };
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].v <= 0 || dims[i].v > RL_DIM_MAX)
            return RL_FAIL(RL_ERR_INVALID, "config: %s must be in [1, %lld], got %lld",
                           dims[i].name, (long long)RL_DIM_MAX, (long long)dims[i].v);
    if (c->num_heads % c->num_kv_heads != 0)
        return RL_FAIL(RL_ERR_INVALID, "config: num_heads (%lld) must be a multiple of "
                       "num_kv_heads (%lld)", (long long)c->num_heads, (long long)c->num_kv_heads);
    if (c->head_dim % 2 != 0)
        return RL_FAIL(RL_ERR_INVALID, "config: head_dim must be even, got %lld",
                       (long long)c->head_dim);
    if ((c->num_heads + 2 * c->num_kv_heads) * c->head_dim > RL_DIM_MAX)
        return RL_FAIL(RL_ERR_INVALID, "config: (num_heads + 2*num_kv_heads) * head_dim is too large");
    if (c->max_layer < 0 || c->max_layer > c->num_layers)
        return RL_FAIL(RL_ERR_INVALID, "config: max_layer must be in [0, num_layers=%lld], got %lld",
                       (long long)c->num_layers, (long long)c->max_layer);
    if (!(c->rms_norm_eps >= 0.0) || !isfinite(c->rms_norm_eps))
        return RL_FAIL(RL_ERR_INVALID, "config: rms_norm_eps must be finite and >= 0, got %g",
                       c->rms_norm_eps);
    const struct { const char *name; float v; } scalars[] = {
        {"embed_scale", c->embed_scale}, {"attn_scale", c->attn_scale},
        {"attn_softcap", c->attn_softcap},
    };
    for (size_t i = 0; i < sizeof scalars / sizeof scalars[0]; i++)
        if (!(scalars[i].v >= 0.0f) || !isfinite(scalars[i].v))
            return RL_FAIL(RL_ERR_INVALID, "config: %s must be finite and >= 0 (0: none), got %g",
                           scalars[i].name, (double)scalars[i].v);
    if (c->norm_offset != 0.0f && c->norm_offset != 1.0f)
        return RL_FAIL(RL_ERR_INVALID, "config: norm_offset must be 0 or 1, got %g",
                       (double)c->norm_offset);
    if (c->act < 0 || c->act >= RL_ACT_COUNT)
        return RL_FAIL(RL_ERR_INVALID, "config: act must be 0 (silu) or 1 (gelu_tanh), got %d",
                       c->act);
    if (c->qk_norm < RL_QK_NORM_NONE || c->qk_norm > RL_QK_NORM_PROJ)
        return RL_FAIL(RL_ERR_INVALID, "config: qk_norm must be 0 (none), 1 (per head) or 2 "
                       "(whole projection), got %d", c->qk_norm);
    if (c->norms < RL_NORMS_PRE || c->norms > RL_NORMS_POST)
        return RL_FAIL(RL_ERR_INVALID, "config: norms must be 0 (pre), 1 (pre and post) or 2 "
                       "(post), got %d", c->norms);
    if (c->sliding_window < 0 || c->sliding_window > RL_DIM_MAX)
        return RL_FAIL(RL_ERR_INVALID, "config: sliding_window must be in [0, %lld] (0: none), "
                       "got %lld", (long long)RL_DIM_MAX, (long long)c->sliding_window);
    if (c->sliding_window > 0 && c->num_layers > RL_MAX_LAYERS)
        return RL_FAIL(RL_ERR_INVALID, "config: a sliding window is described for at most %d "
                       "layers (layer_sliding), this model has num_layers=%lld", RL_MAX_LAYERS,
                       (long long)c->num_layers);
    if (c->sliding_window > 0)
        for (int64_t l = 0; l < c->num_layers; l++)
            if (c->layer_sliding[l] > 1)
                return RL_FAIL(RL_ERR_INVALID, "config: layer_sliding[%lld] must be 0 or 1, got %d",
                               (long long)l, (int)c->layer_sliding[l]);
    if (c->rope_swa != 0 && c->rope_swa != 1)
        return RL_FAIL(RL_ERR_INVALID, "config: rope_swa must be 0 or 1, got %d", c->rope_swa);
    return RL_OK;
}

/* ---- features ---------------------------------------------------------- */

static const char *const FEATURE_NAMES[RL_FEAT_COUNT] = {
    "embed_scale", "norm_offset", "act=gelu_tanh", "post-norms", "no pre-norms",
    "qk_norm=whole projection", "attn_softcap", "sliding_window", "rope_swa",
};

const char *rl_feature_name(int feature)
{
    return feature >= 0 && feature < RL_FEAT_COUNT ? FEATURE_NAMES[feature] : "?";
}

unsigned rl_config_features(const rl_config *c)
{
    unsigned f = 0;
    int sliding = 0;
    if (c->sliding_window > 0 && c->num_layers <= RL_MAX_LAYERS)
        for (int64_t l = 0; l < c->num_layers; l++) sliding |= c->layer_sliding[l] != 0;
    if (c->embed_scale != 0.0f) f |= 1u << RL_FEAT_EMBED_SCALE;
    if (c->norm_offset != 0.0f) f |= 1u << RL_FEAT_NORM_OFFSET;
    if (c->act == RL_ACT_GELU_TANH) f |= 1u << RL_FEAT_GELU_TANH;
    if (c->norms != RL_NORMS_PRE) f |= 1u << RL_FEAT_POST_NORMS;
    if (c->norms == RL_NORMS_POST) f |= 1u << RL_FEAT_NO_PRE_NORMS;
    if (c->qk_norm == RL_QK_NORM_PROJ) f |= 1u << RL_FEAT_QK_NORM_PROJ;
    if (c->attn_softcap != 0.0f) f |= 1u << RL_FEAT_SOFTCAP;
    if (sliding) f |= 1u << RL_FEAT_SLIDING_WINDOW;
    if (c->rope_swa) f |= 1u << RL_FEAT_ROPE_SWA;
    return f;
}

/* ---- sizes ------------------------------------------------------------- */

/* Byte counts saturate at SIZE_MAX instead of wrapping: every dimension may
 * be up to 2^30, so a product of three (or a sum over layers) can pass 2^64,
 * and a wrapped count would make an impossible plan look small. */
static size_t sat_mul(size_t a, size_t b)
{
    size_t r;
    return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}

static size_t sat_add(size_t a, size_t b)
{
    size_t r;
    return __builtin_add_overflow(a, b, &r) ? SIZE_MAX : r;
}

static size_t tensor_elems(const rl_config *c, rl_tensor_kind kind)
{
    int64_t s[2];
    int nd = rl_tensor_shape(c, kind, s);
    if (nd == 0) return 0;
    return (size_t)s[0] * (size_t)(nd == 2 ? s[1] : 1);   /* <= 2^60: no overflow */
}

rl_tensor_kind rl_gemm_matrix_of(rl_tensor_kind kind)
{
    switch (kind) {
    case RL_T_Q: case RL_T_K: case RL_T_V: return RL_T_Q;
    case RL_T_O: return RL_T_O;
    case RL_T_GATE: case RL_T_UP: return RL_T_GATE;
    case RL_T_DOWN: return RL_T_DOWN;
    default: return RL_T_COUNT;
    }
}

int64_t rl_gemm_matrix_rows(const rl_config *c, rl_tensor_kind first, int64_t *K)
{
    int64_t s[2], rows = 0;
    *K = 0;
    for (int k = 0; k < RL_T_COUNT; k++)
        if (rl_gemm_matrix_of((rl_tensor_kind)k) == first &&
            rl_tensor_shape(c, (rl_tensor_kind)k, s) == 2) {
            rows += s[0];
            *K = s[1];
        }
    return rows;
}

size_t rl_gemm_weight_elems(int64_t row_align, int64_t N, int64_t K)
{
    int64_t a = row_align > 1 ? row_align : 1;
    return sat_mul((size_t)((N + a - 1) / a * a), (size_t)K);
}

int64_t rl_backend_gemm_row_align(const rl_backend *be)
{
    return be->gemm_pack_rows && be->gemm_row_align > 1 ? be->gemm_row_align : 1;
}

size_t rl_gemm_matrix_elems(const rl_config *c, rl_tensor_kind first, int64_t row_align)
{
    int64_t K, N = rl_gemm_matrix_rows(c, first, &K);
    return rl_gemm_weight_elems(row_align, N, K);
}

size_t rl_weights_bytes(const rl_config *c, rl_dtype wdt, int64_t gemm_row_align)
{
    static const rl_tensor_kind MATRICES[] = {RL_T_Q, RL_T_O, RL_T_GATE, RL_T_DOWN};
    size_t es = rl_dtype_size(wdt), per_layer = 0;
    for (int k = 0; k < RL_T_COUNT; k++)
        if (!rl_tensor_kind_is_global((rl_tensor_kind)k) &&
            rl_gemm_matrix_of((rl_tensor_kind)k) == RL_T_COUNT)
            per_layer = sat_add(per_layer, tensor_elems(c, (rl_tensor_kind)k));
    for (int i = 0; i < 4; i++)   /* in the backend's GEMM layout */
        per_layer = sat_add(per_layer, rl_gemm_matrix_elems(c, MATRICES[i], gemm_row_align));
    size_t bytes = sat_mul(es, tensor_elems(c, RL_T_EMBED) + tensor_elems(c, RL_T_FINAL_NORM));
    /* inv_freq tables are f32 */
    bytes = sat_add(bytes, 4 * (tensor_elems(c, RL_T_ROPE_INV_FREQ) +
                                tensor_elems(c, RL_T_ROPE_INV_FREQ_SWA)));
    return sat_add(bytes, sat_mul(sat_mul(es, per_layer), (size_t)rl_config_loaded_layers(c)));
}

size_t rl_workspace_bytes(const rl_config *c, rl_dtype act, rl_dtype res, int64_t max_tokens)
{
    size_t T = (size_t)max_tokens, a = rl_dtype_size(act), r = rl_dtype_size(res);
    size_t d = (size_t)c->hidden_size, ff = (size_t)c->intermediate_size;
    size_t hd = (size_t)c->head_dim, nh = (size_t)c->num_heads, nkv = (size_t)c->num_kv_heads;
    size_t wide = d > ff ? d : ff;
    size_t proj = c->norms != RL_NORMS_PRE ? d : 0;
    /* per token: x, normed_out (res); h, qkv, attn, gu, proj (act); pooled
     * (RL_POOLED_ROWS_PER_TOKEN rows of d f32); tokens, cu_seqlens, positions,
     * spans (i32); the +1 of cu_seqlens below.
     * Each term is <= 2^33 (dims <= 2^30, (nh+2nkv)*hd <= 2^30). */
    size_t per_token = d * r * 2 + (wide + (nh + 2 * nkv) * hd + nh * hd + 2 * ff + proj) * a
                     + RL_POOLED_ROWS_PER_TOKEN * d * 4 + 4 * 5;
    return sat_add(sat_mul(T, per_token), 4);
}
