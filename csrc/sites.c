/* sites.c - names, widths and depths of the activation sites (sites.h). */
#include "sites.h"

static const char *const SITE_NAMES[RL_SITE_COUNT] = {
    "resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post",
};

void rl_site_decode(int32_t code, int64_t *block, int *kind)
{
    int64_t v = -1 - (int64_t)code;
    *block = v / RL_SITE_COUNT;
    *kind = (int)(v % RL_SITE_COUNT);
}

const char *rl_site_name(int kind)
{
    return kind >= 0 && kind < RL_SITE_COUNT ? SITE_NAMES[kind] : "?";
}

int64_t rl_output_width(const rl_config *cfg, int32_t code)
{
    if (code >= 0) return cfg->hidden_size;
    int64_t block;
    int kind;
    rl_site_decode(code, &block, &kind);
    if (kind == RL_SITE_MLP_POST) return cfg->intermediate_size;
    if (kind == RL_SITE_ATTN_Z) return cfg->num_heads * cfg->head_dim;
    return cfg->hidden_size;
}

int64_t rl_output_depth(int32_t code)
{
    if (code >= 0) return 2 * (int64_t)code;
    int64_t block;
    int kind;
    rl_site_decode(code, &block, &kind);
    if (kind == RL_SITE_RESID_PRE) return 2 * block;
    if (kind <= RL_SITE_RESID_MID) return 2 * block + 1;
    return 2 * block + 2;
}

rl_status rl_output_check(const rl_config *cfg, int64_t i, int32_t code)
{
    if (code >= 0) return RL_OK;   /* a hidden-state index: engine.c checks it */
    int64_t block;
    int kind;
    rl_site_decode(code, &block, &kind);
    /* a site of block b runs block b (resid_pre only the blocks before it) */
    int64_t loaded = rl_config_loaded_layers(cfg);
    int64_t need = kind == RL_SITE_RESID_PRE ? block : block + 1;
    if (block >= cfg->num_layers || need > loaded)
        return RL_FAIL(RL_ERR_INVALID, "layers[%lld]=%d names site %s of block %lld, but the "
                       "model has blocks 0..%lld and runs blocks 0..%lld (max_layer=%lld)",
                       (long long)i, code, rl_site_name(kind), (long long)block,
                       (long long)cfg->num_layers - 1, (long long)loaded - 1,
                       (long long)cfg->max_layer);
    return RL_OK;
}
