/* attention_cpu.h - the CPU backend's causal attention kernel
 * (attention_cpu.c): one call computes a block of query rows of one sequence
 * for all the query heads that share one KV head.
 *
 * Exactness: every ISA (RJEPA_CPU_ISA) gives the same bits, and a row's bits
 * depend on its sequence's data alone (not on the batch, the blocking or the
 * thread count). For query row i of head h, with keys first..last visible:
 *     s_j  = scale * acc,  acc = 0; for d = 0..hd-1: acc = fma(q[d], k_j[d], acc)
 *     s_j  = cap * tanh(s_j / cap)                         (softcap > 0 only)
 *     e_j  = exp_f32(s_j - max_j s_j)                      (vexp.h)
 *     sum  = 0; for j = first..last: sum = sum + e_j       (in key order)
 *     p_j  = e_j * (1 / sum)
 *     o[d] = acc,  acc = 0; for j = first..last: acc = fma(p_j, v_j[d], acc)
 * (the order of the engine's own GEMM for the score and value products, so
 * the result equals those two GEMMs with the softmax between them). */
#ifndef RL_ATTENTION_CPU_H
#define RL_ATTENTION_CPU_H

#include <stdint.h>

#include "gemm_builtin.h"

/* Query rows per call (a thread's unit of work). */
#define RL_ATT_QBLK 64

/* Floats of scratch one call needs for sequences of up to max_len tokens. */
int64_t rl_attention_scratch_floats(int64_t max_len, int64_t hd, int64_t window);

/* Causal attention of query rows i0 .. i0+mb-1 of one sequence, for the
 * `group` query heads that share one KV head. Row i of query head g is at
 * q + i*W + g*hd, its output at o + i*Wo + g*hd; key / value row j at k + j*W,
 * v + j*W. window > 0: row i sees keys i-window < j <= i only. Scores are
 * scaled, then soft-capped when softcap > 0. scratch holds
 * rl_attention_scratch_floats(..) floats (any alignment). */
void rl_attention_block(rl_cpu_isa isa, const float *q, const float *k, const float *v, float *o,
                        int64_t W, int64_t Wo, int64_t hd, int64_t group, int64_t i0, int64_t mb,
                        float scale, int64_t window, float softcap, float *scratch);

#endif /* RL_ATTENTION_CPU_H */
