/* engine.c - model lifetime and the forward pass, written once over the
 * backend op table (common.h). No backend-specific code lives here.
 *
 * Design choices:
 * - rl_model_create first checks the config against the backend's
 *   capabilities (rl_backend_caps: storage dtypes, attention head dims,
 *   poolings), then allocates every weight buffer (so a model the backend
 *   cannot run or that does not fit fails at once, before any copy);
 *   rl_model_set_tensor converts one checkpoint tensor into its slot, Q/K/V
 *   and gate/up into fused buffers, a GEMM weight's rows in the backend's
 *   GEMM layout (rl_backend.gemm_pack_rows: the CPU packs its weights once,
 *   here, not per call).
 * - A batch is validated completely on the host before any device work; each
 *   error names the argument, the index and the offending value.
 * - Positions and absolute spans are computed on the host and uploaded.
 * - The forward stops after the deepest requested layer. After each hidden
 *   state index that was asked for, its spans are pooled once per requested
 *   pooling and per occurrence in `layers` into the workspace's pooled rows,
 *   so several poolings cost one forward. More spans than the workspace holds
 *   are pooled in chunks.
 * - The pooled rows of a forward are downloaded together: when the whole
 *   result [P, nl, S, d] fits them (RL_POOLED_ROWS_PER_TOKEN * max_tokens
 *   rows) it is pooled there in the result's own layout and fetched with one
 *   asynchronous download after the last layer, then one wait (be->sync) for
 *   the batch. A larger result goes through the rows as a ring: each piece is
 *   downloaded asynchronously as soon as it is pooled, and the engine waits
 *   only before it overwrites rows still being downloaded.
 */
#include "engine.h"
#include "qweights.h"
#include "sites.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct rl_model {
    rl_config cfg;
    rl_backend *be;
    int64_t n_loaded;      /* decoder layers loaded and run: rl_config_loaded_layers */
    rl_weights w;
    rl_workspace ws;
    int32_t *host_pos;     /* [max_tokens]    host scratch: positions               */
    int32_t *host_spans;   /* [max_tokens, 2] host scratch: absolute spans of a chunk */
    unsigned keep;         /* kinds kept quantized (qweights.h), 0: none  */
    rl_qweights *qw;       /* their stored bytes and dequantization scratch */
};

/* ---- weights ------------------------------------------------------------ */

static rl_status alloc_weight(rl_model *m, void **ptr, size_t elems, rl_dtype dt)
{
    size_t bytes = elems * rl_dtype_size(dt);
    RL_TRY(m->be->alloc(m->be, ptr, bytes));
    m->w.bytes += bytes;
    return RL_OK;
}

static rl_status alloc_layer(rl_model *m, rl_layer_weights *lw)
{
    const rl_config *c = &m->cfg;
    rl_dtype wd = m->be->weight_dtype;
    const int64_t ra = rl_backend_gemm_row_align(m->be);   /* GEMM weights: its layout */
    size_t d = (size_t)c->hidden_size, ff = (size_t)c->intermediate_size;
    size_t hd = (size_t)c->head_dim, q = (size_t)c->num_heads * hd;
    size_t qkv = q + 2 * (size_t)c->num_kv_heads * hd;
    size_t kv = (size_t)c->num_kv_heads * hd;
    int proj = c->qk_norm == RL_QK_NORM_PROJ;
    int pre = c->norms != RL_NORMS_POST, post = c->norms != RL_NORMS_PRE;
    if (pre) RL_TRY(alloc_weight(m, &lw->attn_norm, d, wd));
    if (!rl_qw_keeps(m->qw, RL_T_Q))
        RL_TRY(alloc_weight(m, &lw->wqkv, rl_gemm_matrix_elems(c, RL_T_Q, ra), wd));
    if (c->attn_qkv_bias) RL_TRY(alloc_weight(m, &lw->bqkv, qkv, wd));
    if (c->qk_norm) {
        RL_TRY(alloc_weight(m, &lw->q_norm, proj ? q : hd, wd));
        RL_TRY(alloc_weight(m, &lw->k_norm, proj ? kv : hd, wd));
    }
    if (!rl_qw_keeps(m->qw, RL_T_O))
        RL_TRY(alloc_weight(m, &lw->wo, rl_gemm_matrix_elems(c, RL_T_O, ra), wd));
    if (c->attn_o_bias) RL_TRY(alloc_weight(m, &lw->bo, d, wd));
    if (post) {
        RL_TRY(alloc_weight(m, &lw->post_attn_norm, d, wd));
        RL_TRY(alloc_weight(m, &lw->post_ffn_norm, d, wd));
    }
    if (pre) RL_TRY(alloc_weight(m, &lw->ffn_norm, d, wd));
    if (!rl_qw_keeps(m->qw, RL_T_GATE))
        RL_TRY(alloc_weight(m, &lw->wgu, rl_gemm_matrix_elems(c, RL_T_GATE, ra), wd));
    if (c->mlp_bias) {
        RL_TRY(alloc_weight(m, &lw->bgu, 2 * ff, wd));
        RL_TRY(alloc_weight(m, &lw->bdown, d, wd));
    }
    if (!rl_qw_keeps(m->qw, RL_T_DOWN))
        RL_TRY(alloc_weight(m, &lw->wdown, rl_gemm_matrix_elems(c, RL_T_DOWN, ra), wd));
    return RL_OK;
}

static void free_ptr(rl_backend *be, void **p)
{
    if (*p) be->free(be, *p);
    *p = NULL;
}

/* Every buffer of a layer, with the tensor kind that names it in messages:
 * one list for freeing and for the residency check. */
static const struct { size_t offset; rl_tensor_kind kind; } LAYER_BUFFERS[] = {
    {offsetof(rl_layer_weights, attn_norm), RL_T_ATTN_NORM},
    {offsetof(rl_layer_weights, wqkv), RL_T_Q},
    {offsetof(rl_layer_weights, bqkv), RL_T_Q_BIAS},
    {offsetof(rl_layer_weights, q_norm), RL_T_Q_NORM},
    {offsetof(rl_layer_weights, k_norm), RL_T_K_NORM},
    {offsetof(rl_layer_weights, wo), RL_T_O},
    {offsetof(rl_layer_weights, bo), RL_T_O_BIAS},
    {offsetof(rl_layer_weights, ffn_norm), RL_T_FFN_NORM},
    {offsetof(rl_layer_weights, wgu), RL_T_GATE},
    {offsetof(rl_layer_weights, bgu), RL_T_GATE_BIAS},
    {offsetof(rl_layer_weights, wdown), RL_T_DOWN},
    {offsetof(rl_layer_weights, bdown), RL_T_DOWN_BIAS},
    {offsetof(rl_layer_weights, post_attn_norm), RL_T_POST_ATTN_NORM},
    {offsetof(rl_layer_weights, post_ffn_norm), RL_T_POST_FFN_NORM},
};
#define N_LAYER_BUFFERS (sizeof LAYER_BUFFERS / sizeof LAYER_BUFFERS[0])

static void **layer_buffer(rl_layer_weights *lw, size_t i)
{
    return (void **)((char *)lw + LAYER_BUFFERS[i].offset);
}

static void free_weights(rl_model *m)
{
    rl_backend *be = m->be;
    free_ptr(be, &m->w.embed);
    free_ptr(be, &m->w.final_norm);
    free_ptr(be, (void **)&m->w.inv_freq);
    free_ptr(be, (void **)&m->w.inv_freq_swa);
    if (m->w.layers)
        for (int64_t l = 0; l < m->n_loaded; l++)
            for (size_t i = 0; i < N_LAYER_BUFFERS; i++)
                free_ptr(be, layer_buffer(&m->w.layers[l], i));
    free(m->w.layers);
    free(m->w.filled);
    memset(&m->w, 0, sizeof m->w);
    rl_qw_free(m->qw, be);
    m->qw = NULL;
}

/* Fails with RL_ERR_DEVICE_MEMORY when the backend knows its free memory and
 * `need` bytes do not fit. */
static rl_status check_fits(rl_model *m, size_t need, const char *what, const char *advice)
{
    size_t free_b = 0, total_b = 0;
    if (m->be->mem_info(m->be, &free_b, &total_b) != RL_OK || total_b == 0) return RL_OK;
    if (need > free_b)
        return RL_FAIL(RL_ERR_DEVICE_MEMORY, "%s need %.1f MiB on %s but only %.1f MiB of %.1f MiB "
                       "are free; %s", what, need / 1048576.0, m->be->name, free_b / 1048576.0,
                       total_b / 1048576.0, advice);
    return RL_OK;
}

static rl_status alloc_weights(rl_model *m)
{
    const rl_config *c = &m->cfg;
    rl_dtype wd = m->be->weight_dtype;
    const int64_t ra = rl_backend_gemm_row_align(m->be);
    RL_TRY(check_fits(m, rl_weights_bytes(c, wd, ra) - rl_qw_dense_bytes_kept(c, m->keep, wd, ra)
                      + rl_qw_scratch_bytes(c, m->keep, wd, ra), "the model weights",
                      "lower max_layer or use a smaller model"));
    RL_TRY(rl_qw_create(m->be, c, m->n_loaded, m->keep, &m->qw));
    m->w.bytes += rl_qw_scratch_held(m->qw);
    m->w.layers = calloc((size_t)(m->n_loaded > 0 ? m->n_loaded : 1), sizeof *m->w.layers);
    m->w.filled = calloc((size_t)RL_T_COUNT * (size_t)(1 + m->n_loaded), 1);
    if (!m->w.layers || !m->w.filled) return RL_FAIL(RL_ERR_NOMEM, "out of host memory");
    if (!rl_qw_keeps(m->qw, RL_T_EMBED))
        RL_TRY(alloc_weight(m, &m->w.embed, (size_t)c->vocab_size * (size_t)c->hidden_size, wd));
    if (c->max_layer == c->num_layers)
        RL_TRY(alloc_weight(m, &m->w.final_norm, (size_t)c->hidden_size, wd));
    RL_TRY(alloc_weight(m, (void **)&m->w.inv_freq, (size_t)c->head_dim / 2, RL_F32));
    if (c->rope_swa)
        RL_TRY(alloc_weight(m, (void **)&m->w.inv_freq_swa, (size_t)c->head_dim / 2, RL_F32));
    for (int64_t l = 0; l < m->n_loaded; l++) RL_TRY(alloc_layer(m, &m->w.layers[l]));
    return RL_OK;
}

/* ---- capabilities ------------------------------------------------------ */

rl_status rl_backend_caps_get(int device_index, rl_backend_caps *out)
{
    memset(out, 0, sizeof *out);
    if (device_index < 0) {
        *out = *rl_cpu_caps();
        return RL_OK;
    }
    return rl_cuda_caps(out);
}

static void list_bits(char *buf, size_t cap, unsigned bits, int n, const char *(*name)(int))
{
    size_t len = 0;
    buf[0] = '\0';
    for (int i = 0; i < n; i++)
        if (bits & (1u << i)) {
            int w = snprintf(buf + len, cap - len, "%s'%s'", len ? ", " : "", name(i));
            if (w < 0 || (size_t)w >= cap - len) break;
            len += (size_t)w;
        }
}

static const char *dtype_name_of(int i) { return rl_dtype_name((rl_dtype)i); }

static const char *pool_name_of(int i) { return rl_pool_name(i); }

rl_status rl_caps_check_config(const rl_backend_caps *caps, const char *who, const rl_config *cfg,
                               rl_dtype dtype)
{
    char list[256];
    if ((unsigned)dtype >= 32 || !(caps->dtypes & (1u << dtype))) {
        list_bits(list, sizeof list, caps->dtypes, 3, dtype_name_of);
        return RL_FAIL(RL_ERR_INVALID, "dtype '%s' is not available on device '%s' (its storage "
                       "dtypes: %s)", rl_dtype_name(dtype), who, list);
    }
    if (caps->head_dims) {
        int ok = 0;
        size_t len = 0;
        list[0] = '\0';
        for (int i = 0; i < caps->n_head_dims; i++) {
            ok |= caps->head_dims[i] == cfg->head_dim;
            int w = snprintf(list + len, sizeof list - len, "%s%d", i ? ", " : "",
                             (int)caps->head_dims[i]);
            if (w > 0 && (size_t)w < sizeof list - len) len += (size_t)w;
        }
        if (!ok)
            return RL_FAIL(RL_ERR_INVALID, "device '%s' cannot run this model: head_dim %lld is "
                           "not supported by its attention kernel (supported head_dim: %s)", who,
                           (long long)cfg->head_dim, list);
    }
    if (caps->max_heads > 0 && cfg->num_heads > caps->max_heads)
        return RL_FAIL(RL_ERR_INVALID, "device '%s' cannot run this model: num_heads %lld is more "
                       "than its attention kernel runs (at most %lld)", who,
                       (long long)cfg->num_heads, (long long)caps->max_heads);
    unsigned missing = rl_config_features(cfg) & ~caps->features;
    for (int f = 0; f < RL_FEAT_COUNT; f++)
        if (missing & (1u << f)) {
            list_bits(list, sizeof list, caps->features, RL_FEAT_COUNT, rl_feature_name);
            return RL_FAIL(RL_ERR_INVALID, "device '%s' cannot run this model: it does not "
                           "support %s (it supports: %s)", who, rl_feature_name(f),
                           list[0] ? list : "none of the non-Llama features");
        }
    return RL_OK;
}

rl_status rl_backend_check_config(const rl_backend *be, const rl_config *cfg)
{
    if (!be->caps) return RL_FAIL(RL_ERR_INVALID, "backend %s states no capabilities", be->name);
    return rl_caps_check_config(be->caps, be->name, cfg, be->weight_dtype);
}

/* ---- model -------------------------------------------------------------- */

rl_status rl_model_create(const rl_config *cfg, rl_backend *be, rl_model **out)
{
    return rl_model_create_kept(cfg, be, 0, out);
}

rl_status rl_model_create_kept(const rl_config *cfg, rl_backend *be, unsigned keep, rl_model **out)
{
    *out = NULL;
    if (!be) return RL_FAIL(RL_ERR_INVALID, "no backend");
    rl_status st = cfg ? rl_config_validate(cfg) : RL_FAIL(RL_ERR_INVALID, "no config");
    if (st == RL_OK) st = rl_qw_check_kinds(keep);
    /* what the backend cannot run fails here, before any weight is allocated */
    if (st == RL_OK) st = rl_backend_check_config(be, cfg);
    if (st != RL_OK) { be->destroy(be); return st; }
    rl_model *m = calloc(1, sizeof *m);
    if (!m) { be->destroy(be); return RL_FAIL(RL_ERR_NOMEM, "out of host memory"); }
    m->cfg = *cfg;
    m->be = be;
    m->n_loaded = rl_config_loaded_layers(cfg);
    m->keep = keep;
    st = alloc_weights(m);
    if (st != RL_OK) { rl_model_free(m); return st; }
    *out = m;
    return RL_OK;
}

/* Destination of one tensor: buffer, element offset and dtype. */
static void *tensor_dest(rl_model *m, rl_tensor_kind kind, int64_t layer, size_t *off)
{
    const rl_config *c = &m->cfg;
    size_t d = (size_t)c->hidden_size, ff = (size_t)c->intermediate_size;
    size_t q = (size_t)(c->num_heads * c->head_dim), kv = (size_t)(c->num_kv_heads * c->head_dim);
    *off = 0;
    if (kind == RL_T_EMBED) return m->w.embed;
    if (kind == RL_T_FINAL_NORM) return m->w.final_norm;
    if (kind == RL_T_ROPE_INV_FREQ) return m->w.inv_freq;
    if (kind == RL_T_ROPE_INV_FREQ_SWA) return m->w.inv_freq_swa;
    rl_layer_weights *lw = &m->w.layers[layer];
    switch (kind) {
    case RL_T_ATTN_NORM: return lw->attn_norm;
    case RL_T_Q: return lw->wqkv;
    case RL_T_K: *off = q * d; return lw->wqkv;
    case RL_T_V: *off = (q + kv) * d; return lw->wqkv;
    case RL_T_Q_BIAS: return lw->bqkv;
    case RL_T_K_BIAS: *off = q; return lw->bqkv;
    case RL_T_V_BIAS: *off = q + kv; return lw->bqkv;
    case RL_T_Q_NORM: return lw->q_norm;
    case RL_T_K_NORM: return lw->k_norm;
    case RL_T_O: return lw->wo;
    case RL_T_O_BIAS: return lw->bo;
    case RL_T_FFN_NORM: return lw->ffn_norm;
    case RL_T_GATE: return lw->wgu;
    case RL_T_UP: *off = ff * d; return lw->wgu;
    case RL_T_DOWN: return lw->wdown;
    case RL_T_GATE_BIAS: return lw->bgu;
    case RL_T_UP_BIAS: *off = ff; return lw->bgu;
    case RL_T_DOWN_BIAS: return lw->bdown;
    case RL_T_POST_ATTN_NORM: return lw->post_attn_norm;
    case RL_T_POST_FFN_NORM: return lw->post_ffn_norm;
    default: return NULL;
    }
}

static void format_shape(char *buf, size_t n, const int64_t *shape, int ndim)
{
    if (ndim == 1) snprintf(buf, n, "[%lld]", (long long)shape[0]);
    else if (ndim == 2) snprintf(buf, n, "[%lld, %lld]", (long long)shape[0], (long long)shape[1]);
    else snprintf(buf, n, "(%d dimensions)", ndim);
}

static void format_tensor(char *buf, size_t n, rl_tensor_kind kind, int64_t layer)
{
    if (rl_tensor_kind_is_global(kind)) snprintf(buf, n, "'%s'", rl_tensor_kind_name(kind));
    else snprintf(buf, n, "'%s' of layer %lld", rl_tensor_kind_name(kind), (long long)layer);
}

rl_status rl_model_set_tensor(rl_model *m, rl_tensor_kind kind, int64_t layer, const void *src,
                              rl_dtype src_dtype, const int64_t *shape, int ndim)
{
    const rl_config *c = &m->cfg;
    if ((int)kind < 0 || kind >= RL_T_COUNT)
        return RL_FAIL(RL_ERR_INVALID, "set_tensor: unknown tensor kind %d", (int)kind);
    int global = rl_tensor_kind_is_global(kind);
    if (global) layer = 0;
    char name[64];
    format_tensor(name, sizeof name, kind, layer);
    if (!global && (layer < 0 || layer >= m->n_loaded))
        return RL_FAIL(RL_ERR_INVALID, "set_tensor: layer %lld of %s is not loaded "
                       "(loaded layers: 0..%lld, num_layers=%lld, max_layer=%lld)",
                       (long long)layer, rl_tensor_kind_name(kind), (long long)m->n_loaded - 1,
                       (long long)c->num_layers, (long long)c->max_layer);
    if (src_dtype != RL_F32 && src_dtype != RL_BF16 && src_dtype != RL_F16)
        return RL_FAIL(RL_ERR_INVALID, "set_tensor: %s has unknown dtype %d", name, (int)src_dtype);
    if (!src || !shape) return RL_FAIL(RL_ERR_INVALID, "set_tensor: %s has no data", name);
    int64_t want[2];
    int wnd = rl_tensor_shape(c, kind, want);
    if (wnd == 0)
        return RL_FAIL(RL_ERR_INVALID, "set_tensor: %s is not used by this config "
                       "(attn_qkv_bias=%d attn_o_bias=%d mlp_bias=%d qk_norm=%d norms=%d rope_swa=%d, "
                       "final_norm only when max_layer == num_layers)", name, c->attn_qkv_bias,
                       c->attn_o_bias, c->mlp_bias, c->qk_norm, c->norms, c->rope_swa);
    if (ndim != wnd || shape[0] != want[0] || (ndim == 2 && shape[1] != want[1])) {
        char got_s[64], want_s[64];
        format_shape(got_s, sizeof got_s, shape, ndim);
        format_shape(want_s, sizeof want_s, want, wnd);
        return RL_FAIL(RL_ERR_INVALID, "set_tensor: %s has shape %s, expected %s", name, got_s, want_s);
    }
    if (rl_qw_keeps(m->qw, kind))
        return RL_FAIL(RL_ERR_INVALID, "set_tensor: %s is kept quantized in this model: hand "
                       "it over with set_tensor_quantized", name);
    size_t off, n = (size_t)want[0] * (size_t)(wnd == 2 ? want[1] : 1);
    void *dst = tensor_dest(m, kind, layer, &off);
    rl_dtype dst_dtype = kind == RL_T_ROPE_INV_FREQ || kind == RL_T_ROPE_INV_FREQ_SWA
                       ? RL_F32 : m->be->weight_dtype;
    rl_tensor_kind mat = rl_gemm_matrix_of(kind);
    if (mat != RL_T_COUNT && m->be->gemm_pack_rows) {   /* rows of a GEMM weight, in its layout */
        int64_t K, N = rl_gemm_matrix_rows(c, mat, &K);
        RL_TRY(m->be->gemm_pack_rows(m->be, dst, N, K, (int64_t)off / K, src, src_dtype, want[0]));
    } else {
        RL_TRY(m->be->upload(m->be, dst, dst_dtype, off, src, src_dtype, n));
    }
    m->w.filled[(size_t)(global ? 0 : 1 + layer) * RL_T_COUNT + kind] = 1;
    return RL_OK;
}

rl_status rl_model_set_tensor_quantized(rl_model *m, rl_tensor_kind kind, int64_t layer,
                                        const rl_qtensor *q)
{
    if ((int)kind < 0 || kind >= RL_T_COUNT || !rl_qw_keeps(m->qw, kind))
        return RL_FAIL(RL_ERR_INVALID, "set_tensor_quantized: tensor kind '%s' is not kept "
                       "quantized in this model", rl_tensor_kind_name(kind));
    int global = rl_tensor_kind_is_global(kind);
    if (global) layer = 0;
    char name[64];
    format_tensor(name, sizeof name, kind, layer);
    if (!global && (layer < 0 || layer >= m->n_loaded))
        return RL_FAIL(RL_ERR_INVALID, "set_tensor_quantized: layer %lld of %s is not loaded "
                       "(loaded layers: 0..%lld)", (long long)layer, rl_tensor_kind_name(kind),
                       (long long)m->n_loaded - 1);
    int64_t want[2];
    if (rl_tensor_shape(&m->cfg, kind, want) != 2 || q->rows != want[0] || q->cols != want[1])
        return RL_FAIL(RL_ERR_INVALID, "set_tensor_quantized: %s has shape [%lld, %lld], "
                       "expected [%lld, %lld]", name, (long long)q->rows, (long long)q->cols,
                       (long long)want[0], (long long)want[1]);
    size_t prev = rl_qw_stored_bytes(m->qw), added;
    RL_TRY(rl_qw_set(m->qw, m->be, kind, layer, q, name, &added));
    m->w.bytes = m->w.bytes + rl_qw_stored_bytes(m->qw) - prev;
    m->w.filled[(size_t)(global ? 0 : 1 + layer) * RL_T_COUNT + kind] = 1;
    return RL_OK;
}

rl_status rl_model_check_complete(const rl_model *m)
{
    int64_t s[2];
    for (int64_t slot = 0; slot <= m->n_loaded; slot++)
        for (int k = 0; k < RL_T_COUNT; k++) {
            if (rl_tensor_kind_is_global((rl_tensor_kind)k) != (slot == 0)) continue;
            if (!rl_tensor_shape(&m->cfg, (rl_tensor_kind)k, s)) continue;
            if (m->w.filled[(size_t)slot * RL_T_COUNT + k]) continue;
            char name[64];
            format_tensor(name, sizeof name, (rl_tensor_kind)k, slot - 1);
            return RL_FAIL(RL_ERR_STATE, "tensor %s was never set", name);
        }
    return RL_OK;
}

/* ---- workspace ---------------------------------------------------------- */

static void free_workspace(rl_model *m)
{
    rl_backend *be = m->be;
    rl_workspace *ws = &m->ws;
    void **ps[] = {&ws->x, &ws->h, &ws->proj, &ws->qkv, &ws->attn, &ws->gu, &ws->normed_out,
                   (void **)&ws->tokens, (void **)&ws->cu_seqlens, (void **)&ws->positions,
                   (void **)&ws->spans, (void **)&ws->pooled};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) free_ptr(be, ps[i]);
    memset(ws, 0, sizeof *ws);
    free(m->host_pos);
    free(m->host_spans);
    m->host_pos = m->host_spans = NULL;
}

static rl_status ws_alloc(rl_model *m, void **p, size_t bytes)
{
    RL_TRY(m->be->alloc(m->be, p, bytes));
    m->ws.bytes += bytes;
    return RL_OK;
}

static rl_status alloc_workspace(rl_model *m, int64_t max_tokens)
{
    const rl_config *c = &m->cfg;
    rl_workspace *ws = &m->ws;
    size_t T = (size_t)max_tokens, d = (size_t)c->hidden_size, ff = (size_t)c->intermediate_size;
    size_t hd = (size_t)c->head_dim, nh = (size_t)c->num_heads, nkv = (size_t)c->num_kv_heads;
    size_t a = rl_dtype_size(m->be->act_dtype), r = rl_dtype_size(m->be->res_dtype);
    RL_TRY(check_fits(m, rl_workspace_bytes(c, m->be->act_dtype, m->be->res_dtype, max_tokens),
                      "the workspace buffers", "lower max_batch_tokens"));
    RL_TRY(ws_alloc(m, &ws->x, T * d * r));
    RL_TRY(ws_alloc(m, &ws->h, T * (d > ff ? d : ff) * a));
    if (c->norms != RL_NORMS_PRE) RL_TRY(ws_alloc(m, &ws->proj, T * d * a));
    RL_TRY(ws_alloc(m, &ws->qkv, T * (nh + 2 * nkv) * hd * a));
    RL_TRY(ws_alloc(m, &ws->attn, T * nh * hd * a));
    RL_TRY(ws_alloc(m, &ws->gu, T * 2 * ff * a));
    RL_TRY(ws_alloc(m, &ws->normed_out, T * d * r));
    RL_TRY(ws_alloc(m, (void **)&ws->tokens, T * 4));
    RL_TRY(ws_alloc(m, (void **)&ws->cu_seqlens, (T + 1) * 4));
    RL_TRY(ws_alloc(m, (void **)&ws->positions, T * 4));
    RL_TRY(ws_alloc(m, (void **)&ws->spans, T * 2 * 4));
    RL_TRY(ws_alloc(m, (void **)&ws->pooled, RL_POOLED_ROWS_PER_TOKEN * T * d * 4));
    m->host_pos = malloc(T * 4);
    m->host_spans = malloc(T * 2 * 4);
    if (!m->host_pos || !m->host_spans) return RL_FAIL(RL_ERR_NOMEM, "out of host memory");
    ws->max_tokens = max_tokens;
    ws->pooled_rows = RL_POOLED_ROWS_PER_TOKEN * max_tokens;
    return RL_OK;
}

rl_status rl_model_reserve(rl_model *m, int64_t max_tokens)
{
    if (max_tokens < 1 || max_tokens > (int64_t)1 << 30)
        return RL_FAIL(RL_ERR_INVALID, "max_tokens must be in [1, 2^30], got %lld",
                       (long long)max_tokens);
    free_workspace(m);
    rl_status st = alloc_workspace(m, max_tokens);
    if (st != RL_OK) free_workspace(m);
    return st;
}

/* ---- batch validation --------------------------------------------------- */

static rl_status validate_seqs(const rl_model *m, const rl_batch *b)
{
    if (b->n_tokens < 1) return RL_FAIL(RL_ERR_INVALID, "tokens is empty (T=0)");
    if (b->n_tokens > m->ws.max_tokens)
        return RL_FAIL(RL_ERR_INVALID, "tokens has %lld tokens, more than max_tokens=%lld "
                       "(call reserve with a larger max_tokens)", (long long)b->n_tokens,
                       (long long)m->ws.max_tokens);
    if (!b->tokens || !b->cu_seqlens) return RL_FAIL(RL_ERR_INVALID, "tokens or cu_seqlens is NULL");
    if (b->n_seqs < 1)
        return RL_FAIL(RL_ERR_INVALID, "cu_seqlens must have B+1 >= 2 entries, got %lld",
                       (long long)b->n_seqs + 1);
    const int32_t *cu = b->cu_seqlens;
    if (cu[0] != 0) return RL_FAIL(RL_ERR_INVALID, "cu_seqlens[0] must be 0, got %d", cu[0]);
    for (int64_t i = 0; i < b->n_seqs; i++)
        if (cu[i + 1] <= cu[i])
            return RL_FAIL(RL_ERR_INVALID, "cu_seqlens[%lld]=%d is not greater than "
                           "cu_seqlens[%lld]=%d: sequence %lld is empty or offsets decrease",
                           (long long)i + 1, cu[i + 1], (long long)i, cu[i], (long long)i);
    if (cu[b->n_seqs] != b->n_tokens)
        return RL_FAIL(RL_ERR_INVALID, "cu_seqlens[%lld]=%d must equal the number of tokens %lld",
                       (long long)b->n_seqs, cu[b->n_seqs], (long long)b->n_tokens);
    int64_t V = m->cfg.vocab_size;
    for (int64_t t = 0; t < b->n_tokens; t++)
        if (b->tokens[t] < 0 || b->tokens[t] >= V)
            return RL_FAIL(RL_ERR_INVALID, "tokens[%lld]=%d is out of range [0, vocab_size=%lld)",
                           (long long)t, b->tokens[t], (long long)V);
    return RL_OK;
}

static rl_status validate_outputs(const rl_model *m, const rl_batch *b)
{
    if (b->n_layers < 1 || !b->layers) return RL_FAIL(RL_ERR_INVALID, "layers is empty");
    for (int64_t i = 0; i < b->n_layers; i++) {
        if (b->layers[i] < 0) {   /* a site (sites.h) */
            RL_TRY(rl_output_check(&m->cfg, i, b->layers[i]));
            continue;
        }
        if (b->layers[i] > m->cfg.max_layer)
            return RL_FAIL(RL_ERR_INVALID, "layers[%lld]=%d is out of range [0, max_layer=%lld]",
                           (long long)i, b->layers[i], (long long)m->cfg.max_layer);
    }
    unsigned pools = m->be->caps->poolings;
    if (b->n_poolings < 1 || b->n_poolings > RL_MAX_POOLINGS || !b->poolings)
        return RL_FAIL(RL_ERR_INVALID, "n_poolings must be in [1, %d] with a poolings array, "
                       "got %lld%s", RL_MAX_POOLINGS, (long long)b->n_poolings,
                       b->poolings ? "" : " and NULL");
    for (int64_t q = 0; q < b->n_poolings; q++) {
        int id = (int)b->poolings[q];
        if (id < 0 || id >= 32 || !(pools & (1u << id))) {
            char list[64];
            list_bits(list, sizeof list, pools, RL_POOL_COUNT, pool_name_of);
            return RL_FAIL(RL_ERR_INVALID, "poolings[%lld]: pooling %d is not supported by %s (it "
                           "supports %s; ids: mean=0, first=1, last=2, max=3)", (long long)q, id,
                           m->be->name, list);
        }
    }
    if (b->n_spans < 0) return RL_FAIL(RL_ERR_INVALID, "n_spans is negative");
    if (b->n_spans > 0 && (!b->spans || !b->span_seq))
        return RL_FAIL(RL_ERR_INVALID, "spans or span_seq is NULL");
    for (int64_t i = 0; i < b->n_spans; i++) {
        int32_t s = b->span_seq[i], st = b->spans[2 * i], en = b->spans[2 * i + 1];
        if (s < 0 || s >= b->n_seqs)
            return RL_FAIL(RL_ERR_INVALID, "span_seq[%lld]=%d is out of range [0, %lld)",
                           (long long)i, s, (long long)b->n_seqs);
        int32_t len = b->cu_seqlens[s + 1] - b->cu_seqlens[s];
        if (st < 0 || en > len || st >= en)
            return RL_FAIL(RL_ERR_INVALID, "spans[%lld]=[%d, %d) is %s (sequence %d has %d tokens; "
                           "need 0 <= start < end <= %d)", (long long)i, st, en,
                           st >= en ? "empty or reversed" : "out of range", s, len, len);
    }
    return RL_OK;
}

/* ---- forward ------------------------------------------------------------ */

typedef struct {
    const rl_batch *b;
    rl_result *res;
    int spans_resident;    /* all spans fit the workspace and were uploaded once */
    int pooled_direct;     /* the whole result fits the pooled rows, in its layout */
    int64_t ring_next;     /* otherwise: next free pooled float of the ring       */
    int64_t width_total;   /* sum of the outputs' widths (sites.h)                */
} fwd_state;

static rl_status upload_span_chunk(rl_model *m, const rl_batch *b, int64_t s0, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        int32_t base = b->cu_seqlens[b->span_seq[s0 + i]];
        m->host_spans[2 * i] = base + b->spans[2 * (s0 + i)];
        m->host_spans[2 * i + 1] = base + b->spans[2 * (s0 + i) + 1];
    }
    return m->be->upload_i32(m->be, m->ws.spans, m->host_spans, (size_t)(2 * n));
}

/* 1 if some output of the batch is `code` */
static int wants(const rl_batch *b, int32_t code)
{
    for (int64_t p = 0; p < b->n_layers; p++)
        if (b->layers[p] == code) return 1;
    return 0;
}

/* Pools `src` (rows of the output's width) over every span, once per
 * pooling, into each result slot [q, p] whose output p is `code` (a hidden
 * index or a site, sites.h): in place in the pooled rows (fs->pooled_direct,
 * downloaded by forward_run), or through the ring. Slot [q, p] is [S, w_p]
 * at float S * (q * width_total + the widths of outputs before p). */
static rl_status pool_index(rl_model *m, fwd_state *fs, int64_t code, const void *src, rl_dtype dt)
{
    const rl_batch *b = fs->b;
    if (!wants(b, (int32_t)code) || b->n_spans == 0) return RL_OK;
    rl_backend *be = m->be;
    int64_t w = rl_output_width(&m->cfg, (int32_t)code), S = b->n_spans, nl = b->n_layers;
    int64_t ring_floats = m->ws.pooled_rows * m->cfg.hidden_size;
    /* spans per piece: what the workspace's spans hold, and (ring) what the ring holds */
    int64_t chunk = m->ws.max_tokens;
    if (!fs->pooled_direct && ring_floats / w < chunk) chunk = ring_floats / w;
    for (int64_t s0 = 0; s0 < S; s0 += chunk) {
        int64_t n = S - s0 < chunk ? S - s0 : chunk;
        const int32_t *spans = m->ws.spans + (fs->spans_resident ? 2 * s0 : 0);
        if (!fs->spans_resident) RL_TRY(upload_span_chunk(m, b, s0, n));
        for (int64_t q = 0; q < b->n_poolings; q++) {
            int64_t before = 0;
            for (int64_t p = 0; p < nl; before += rl_output_width(&m->cfg, b->layers[p]), p++) {
                if (b->layers[p] != code) continue;
                size_t slot = (size_t)S * (size_t)(q * fs->width_total + before)
                            + (size_t)s0 * (size_t)w;
                if (fs->pooled_direct) {
                    RL_TRY(be->pool(be, src, dt, w, spans, n, b->poolings[q], m->ws.pooled + slot));
                    continue;
                }
                /* a piece fits once the ring wraps; the floats it reuses are free
                   once the downloads before are done */
                if (fs->ring_next + n * w > ring_floats) {
                    RL_TRY(be->sync(be));
                    fs->ring_next = 0;
                }
                float *rows = m->ws.pooled + fs->ring_next;
                RL_TRY(be->pool(be, src, dt, w, spans, n, b->poolings[q], rows));
                RL_TRY(be->download_f32_async(be, fs->res->data + slot, rows, (size_t)(n * w)));
                fs->ring_next += n * w;
            }
        }
    }
    return RL_OK;
}

/* attn_out / mlp_out of block l when asked for: what the branch adds to the
 * residual, computed apart from the residual path (which keeps its fused
 * add, so asking for a site changes no other output): with post-norms the
 * post-norm of the projection the layer's GEMM already wrote to proj, else
 * the projection of `in` once more. normed_out (free until the final norm)
 * holds it. */
static rl_status site_branch_out(rl_model *m, fwd_state *fs, const rl_segments *seg,
                                 int32_t code, const void *in, const void *w, const void *bias,
                                 const void *post_norm, int64_t K, int64_t T)
{
    if (!wants(fs->b, code)) return RL_OK;
    rl_backend *be = m->be;
    const rl_config *c = &m->cfg;
    int64_t d = c->hidden_size;
    if (c->norms != RL_NORMS_PRE) {
        RL_TRY(be->rmsnorm(be, m->ws.proj, be->act_dtype, post_norm, m->ws.normed_out,
                           be->res_dtype, T, d, (float)c->rms_norm_eps, c->norm_offset, 0));
        return pool_index(m, fs, code, m->ws.normed_out, be->res_dtype);
    }
    /* act_dtype is never wider than res_dtype: the [T, d] projection fits normed_out */
    RL_TRY(be->gemm(be, seg, in, w, bias, m->ws.normed_out, T, d, K, 0));
    return pool_index(m, fs, code, m->ws.normed_out, be->act_dtype);
}

/* One decoder layer: x += f(norm(x)) for attention then MLP (rl_norms: the
 * pre-norm may be absent; with post-norms the output of f is normed, fused
 * with the residual add, instead of accumulated by its GEMM). */
static rl_status run_layer(rl_model *m, fwd_state *fs, const rl_segments *seg, int64_t l,
                           int64_t T, int attn_only)
{
    const rl_config *c = &m->cfg;
    rl_backend *be = m->be;
    rl_workspace *ws = &m->ws;
    const rl_layer_weights *lw = &m->w.layers[l];
    int64_t d = c->hidden_size, ff = c->intermediate_size, hd = c->head_dim;
    int64_t nh = c->num_heads, nkv = c->num_kv_heads, nqkv = (nh + 2 * nkv) * hd;
    float eps = (float)c->rms_norm_eps, off = c->norm_offset;
    rl_dtype act = be->act_dtype, res = be->res_dtype;
    int sliding = c->sliding_window > 0 && c->layer_sliding[l];
    const float *inv_freq = sliding && c->rope_swa ? m->w.inv_freq_swa : m->w.inv_freq;
    float scale = c->attn_scale > 0.0f ? c->attn_scale : (float)(1.0 / sqrt((double)hd));
    /* the O and down GEMMs accumulate into x, or write proj for a post-norm */
    int pre = c->norms != RL_NORMS_POST, post = c->norms != RL_NORMS_PRE;
    void *out = post ? ws->proj : ws->x;

    if (pre) RL_TRY(be->rmsnorm(be, ws->x, res, lw->attn_norm, ws->h, act, T, d, eps, off, 0));
    else RL_TRY(be->cast(be, ws->x, res, ws->h, act, T * d));
    const void *w;   /* the dense weight, or a kept one dequantized into the scratch */
    RL_TRY(rl_qw_matrix(m->qw, be, l, RL_T_Q, lw->wqkv, &w));
    RL_TRY(be->gemm(be, seg, ws->h, w, lw->bqkv, ws->qkv, T, nqkv, d, 0));
    RL_TRY(be->qk_norm_rope(be, seg, ws->qkv, T, nh, nkv, hd, lw->q_norm, lw->k_norm, c->qk_norm,
                            off, eps, inv_freq));
    RL_TRY(be->attention(be, seg, ws->qkv, ws->attn, T, nh, nkv, hd, scale,
                         sliding ? c->sliding_window : 0, c->attn_softcap));
    RL_TRY(pool_index(m, fs, RL_SITE_CODE(l, RL_SITE_ATTN_Z), ws->attn, act));
    RL_TRY(rl_qw_matrix(m->qw, be, l, RL_T_O, lw->wo, &w));
    RL_TRY(be->gemm(be, seg, ws->attn, w, lw->bo, out, T, d, nh * hd, !post));
    if (post)
        RL_TRY(be->rmsnorm(be, ws->proj, act, lw->post_attn_norm, ws->x, res, T, d, eps, off, 1));
    RL_TRY(site_branch_out(m, fs, seg, RL_SITE_CODE(l, RL_SITE_ATTN_OUT), ws->attn, w,
                           lw->bo, lw->post_attn_norm, nh * hd, T));
    RL_TRY(pool_index(m, fs, RL_SITE_CODE(l, RL_SITE_RESID_MID), ws->x, res));
    if (attn_only) return RL_OK;

    if (pre) RL_TRY(be->rmsnorm(be, ws->x, res, lw->ffn_norm, ws->h, act, T, d, eps, off, 0));
    else RL_TRY(be->cast(be, ws->x, res, ws->h, act, T * d));
    RL_TRY(rl_qw_matrix(m->qw, be, l, RL_T_GATE, lw->wgu, &w));
    RL_TRY(be->gemm(be, seg, ws->h, w, lw->bgu, ws->gu, T, 2 * ff, d, 0));
    RL_TRY(be->glu(be, ws->gu, ws->h, T, ff, c->act));
    RL_TRY(pool_index(m, fs, RL_SITE_CODE(l, RL_SITE_MLP_POST), ws->h, act));
    RL_TRY(rl_qw_matrix(m->qw, be, l, RL_T_DOWN, lw->wdown, &w));
    RL_TRY(be->gemm(be, seg, ws->h, w, lw->bdown, out, T, d, ff, !post));
    if (post)
        RL_TRY(be->rmsnorm(be, ws->proj, act, lw->post_ffn_norm, ws->x, res, T, d, eps, off, 1));
    RL_TRY(site_branch_out(m, fs, seg, RL_SITE_CODE(l, RL_SITE_MLP_OUT), ws->h, w,
                           lw->bdown, lw->post_ffn_norm, ff, T));
    return pool_index(m, fs, RL_SITE_CODE(l, RL_SITE_RESID_POST), ws->x, res);
}

/* Uploads tokens, offsets and positions; fills the segment description. */
static rl_status upload_batch(rl_model *m, const rl_batch *b, rl_segments *seg)
{
    rl_backend *be = m->be;
    int64_t max_len = 0;
    for (int64_t s = 0; s < b->n_seqs; s++) {
        int32_t lo = b->cu_seqlens[s], hi = b->cu_seqlens[s + 1];
        for (int32_t t = lo; t < hi; t++) m->host_pos[t] = t - lo;
        if (hi - lo > max_len) max_len = hi - lo;
    }
    RL_TRY(be->upload_i32(be, m->ws.tokens, b->tokens, (size_t)b->n_tokens));
    RL_TRY(be->upload_i32(be, m->ws.cu_seqlens, b->cu_seqlens, (size_t)b->n_seqs + 1));
    RL_TRY(be->upload_i32(be, m->ws.positions, m->host_pos, (size_t)b->n_tokens));
    seg->cu_seqlens_host = b->cu_seqlens;
    seg->cu_seqlens_dev = m->ws.cu_seqlens;
    seg->positions_dev = m->ws.positions;
    seg->n_seqs = b->n_seqs;
    seg->max_seqlen = max_len;
    return RL_OK;
}

static rl_status forward_run(rl_model *m, fwd_state *fs)
{
    const rl_batch *b = fs->b;
    rl_backend *be = m->be;
    rl_workspace *ws = &m->ws;
    const rl_config *c = &m->cfg;
    rl_segments seg;
    RL_TRY(upload_batch(m, b, &seg));
    fs->spans_resident = b->n_spans <= ws->max_tokens;
    /* P * S * width_total floats (P * width_total and S are each < 2^40: no overflow in
       the division) */
    const int64_t slots = b->n_poolings * fs->width_total;
    fs->pooled_direct = b->n_spans == 0 ||
                        slots <= ws->pooled_rows * c->hidden_size / b->n_spans;
    fs->ring_next = 0;
    if (fs->spans_resident && b->n_spans > 0) RL_TRY(upload_span_chunk(m, b, 0, b->n_spans));

    /* in half blocks (rl_output_depth): the last block runs only its attention
       half when no output needs more */
    int64_t deepest = 0, halves = 0, T = b->n_tokens;
    for (int64_t p = 0; p < b->n_layers; p++) {
        if (b->layers[p] > deepest) deepest = b->layers[p];
        int64_t h = rl_output_depth(b->layers[p]);
        if (h > halves) halves = h;
    }
    float escale = c->embed_scale != 0.0f ? c->embed_scale : 1.0f;
    if (rl_qw_keeps(m->qw, RL_T_EMBED))
        RL_TRY(rl_qw_embed(m->qw, be, b->tokens, ws->tokens, T, c->hidden_size, ws->x, escale));
    else RL_TRY(be->embed(be, ws->tokens, T, m->w.embed, c->hidden_size, ws->x, escale));
    RL_TRY(pool_index(m, fs, 0, ws->x, be->res_dtype));
    RL_TRY(pool_index(m, fs, RL_SITE_CODE(0, RL_SITE_RESID_PRE), ws->x, be->res_dtype));
    int64_t n_run = (halves + 1) / 2 < c->num_layers ? (halves + 1) / 2 : c->num_layers;
    for (int64_t l = 0; l < n_run; l++) {
        RL_TRY(run_layer(m, fs, &seg, l, T, 2 * l + 1 == halves));
        if (l + 1 < c->num_layers) {
            RL_TRY(pool_index(m, fs, l + 1, ws->x, be->res_dtype));
            RL_TRY(pool_index(m, fs, RL_SITE_CODE(l + 1, RL_SITE_RESID_PRE), ws->x,
                              be->res_dtype));
        }
    }
    if (deepest == c->num_layers) {
        RL_TRY(be->rmsnorm(be, ws->x, be->res_dtype, m->w.final_norm, ws->normed_out,
                           be->res_dtype, T, c->hidden_size, (float)c->rms_norm_eps,
                           c->norm_offset, 0));
        RL_TRY(pool_index(m, fs, c->num_layers, ws->normed_out, be->res_dtype));
    }
    if (fs->pooled_direct && b->n_spans > 0)
        RL_TRY(be->download_f32_async(be, fs->res->data, ws->pooled,
                                      (size_t)(slots * b->n_spans)));
    return be->sync(be); /* the batch's one wait (ring: its last) */
}

rl_status rl_model_forward(rl_model *m, const rl_batch *b, rl_result *res)
{
    memset(res, 0, sizeof *res);
    if (!b) return RL_FAIL(RL_ERR_INVALID, "no batch");
    RL_TRY(rl_model_check_complete(m));
    if (m->ws.max_tokens == 0)
        return RL_FAIL(RL_ERR_STATE, "no workspace: call reserve(max_tokens) before forward");
    RL_TRY(validate_seqs(m, b));
    RL_TRY(validate_outputs(m, b));

    /* P * width_total cannot overflow (P <= RL_MAX_POOLINGS, nl counts an array in
       memory, widths are < 2^31); its product with the bytes of S floats must not.
       A piece of the ring is at least one span of the widest output. */
    int64_t width_total = 0, ring_floats = m->ws.pooled_rows * m->cfg.hidden_size;
    for (int64_t p = 0; p < b->n_layers; p++) {
        int64_t w = rl_output_width(&m->cfg, b->layers[p]);
        if (w > ring_floats)
            return RL_FAIL(RL_ERR_INVALID, "layers[%lld] has rows of %lld floats, more than the "
                           "%lld pooled floats of a workspace of max_tokens=%lld (reserve more "
                           "tokens)", (long long)p, (long long)w, (long long)ring_floats,
                           (long long)m->ws.max_tokens);
        width_total += w;
    }
    size_t per_layer = (size_t)b->n_spans * 4;
    size_t slots = (size_t)b->n_poolings * (size_t)width_total;
    if (per_layer > 0 && slots > ((size_t)1 << 62) / per_layer)
        return RL_FAIL(RL_ERR_NOMEM, "result of %lld poolings x %lld layers x %lld spans is too "
                       "large", (long long)b->n_poolings, (long long)b->n_layers,
                       (long long)b->n_spans);
    size_t bytes = slots * per_layer;
    void *data = NULL;
    RL_TRY(m->be->host_alloc(m->be, &data, bytes > 0 ? bytes : 4));
    res->data = data;
    res->n_poolings = b->n_poolings;
    res->n_layers = b->n_layers;
    res->n_spans = b->n_spans;
    res->hidden = m->cfg.hidden_size;
    res->release = m->be->host_release;
    fwd_state fs = {b, res, 0, 0, 0, width_total};
    rl_status st = forward_run(m, &fs);
    if (st != RL_OK) {
        /* downloads into the result may still be queued: let them finish before
           its memory is given back (a failing wait records only a device error) */
        (void)m->be->sync(m->be);
        rl_result_free(res);
    }
    return st;
}

void rl_result_free(rl_result *res)
{
    if (res->data && res->release) res->release(res->data);
    memset(res, 0, sizeof *res);
}

/* ---- accessors and teardown --------------------------------------------- */

const rl_config *rl_model_config(const rl_model *m) { return &m->cfg; }
rl_backend *rl_model_backend(rl_model *m) { return m->be; }
size_t rl_model_weight_bytes(const rl_model *m) { return m->w.bytes; }
size_t rl_model_workspace_bytes(const rl_model *m) { return m->ws.bytes; }
int rl_model_dequant_team(const rl_model *m) { return rl_qw_team(m->qw); }
int64_t rl_model_max_tokens(const rl_model *m) { return m->ws.max_tokens; }

static rl_status check_resident(rl_model *m, const void *p, rl_tensor_kind kind, int64_t layer)
{
    if (!p || m->be->is_resident(m->be, p)) return RL_OK;
    char name[64];
    format_tensor(name, sizeof name, kind, layer);
    return RL_FAIL(RL_ERR_DEVICE, "weight %s is not in %s memory", name, m->be->name);
}

rl_status rl_model_verify_resident(rl_model *m)
{
    RL_TRY(check_resident(m, m->w.embed, RL_T_EMBED, 0));
    RL_TRY(check_resident(m, m->w.final_norm, RL_T_FINAL_NORM, 0));
    RL_TRY(check_resident(m, m->w.inv_freq, RL_T_ROPE_INV_FREQ, 0));
    RL_TRY(check_resident(m, m->w.inv_freq_swa, RL_T_ROPE_INV_FREQ_SWA, 0));
    for (int64_t l = 0; l < m->n_loaded; l++)
        for (size_t i = 0; i < N_LAYER_BUFFERS; i++)
            RL_TRY(check_resident(m, *layer_buffer(&m->w.layers[l], i), LAYER_BUFFERS[i].kind, l));
    return rl_qw_verify_resident(m->qw, m->be);
}

void rl_model_free(rl_model *m)
{
    if (!m) return;
    free_workspace(m);
    free_weights(m);
    if (m->be) m->be->destroy(m->be);
    free(m);
}
