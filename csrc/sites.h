/* sites.h - the activation sites of a decoder block, as outputs of a forward.
 *
 * A forward's outputs (rl_batch.layers) are hidden-state indices 0..max_layer
 * (HF's hidden_states: index L is after the final norm) or sites: points
 * inside block b, defined by the residual identities so they mean the same
 * in every family (rl_norms says where the norms sit):
 *   resid_pre  = the block's input (hidden-state index b)
 *   attn_z     = per-head attention output feeding o_proj   [nh * hd]
 *   attn_out   = what attention adds to the residual: o_proj(attn_z), after
 *                the post-attention norm where there is one (Gemma-2/3, OLMo-2)
 *   resid_mid  = resid_pre + attn_out
 *   mlp_post   = the gated activation feeding down_proj     [ff]
 *   mlp_out    = what the MLP adds: down_proj(mlp_post), after the
 *                post-feedforward norm where there is one
 *   resid_post = resid_mid + mlp_out (raw: before the final norm, also for the
 *                last block)
 * A site is written into rl_batch.layers as the negative code
 * RL_SITE_CODE(block, kind), so one array orders every output; its result
 * slot is [S, width] with the site's width (rl_output_width).
 */
#ifndef RL_SITES_H
#define RL_SITES_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    RL_SITE_RESID_PRE = 0,
    RL_SITE_ATTN_Z,
    RL_SITE_ATTN_OUT,
    RL_SITE_RESID_MID,
    RL_SITE_MLP_POST,
    RL_SITE_MLP_OUT,
    RL_SITE_RESID_POST,
    RL_SITE_COUNT
} rl_site;

/* the rl_batch.layers entry of site `kind` of block `block` (always < 0) */
#define RL_SITE_CODE(block, kind) ((int32_t)(-1 - ((int64_t)(block) * RL_SITE_COUNT + (kind))))

/* block and kind of a site code (< 0) */
void rl_site_decode(int32_t code, int64_t *block, int *kind);
/* "resid_pre", "attn_z", ... ("?" if out of range) */
const char *rl_site_name(int kind);
/* floats per row of an output: hidden_size, intermediate_size (mlp_post) or
 * num_heads * head_dim (attn_z) */
int64_t rl_output_width(const rl_config *cfg, int32_t code);
/* how far the forward runs for an output, in half blocks: 2k for hidden index
 * k and for resid_pre of block k; 2b + 1 for the attention sites of block b;
 * 2b + 2 for its MLP sites and resid_post */
int64_t rl_output_depth(int32_t code);
/* for a site code: RL_OK, or RL_ERR_INVALID naming entry `i`, the site, its
 * block and the blocks the model has and runs (hidden indices: RL_OK) */
rl_status rl_output_check(const rl_config *cfg, int64_t i, int32_t code);

#ifdef __cplusplus
}
#endif
#endif /* RL_SITES_H */
