/* qweights.c - weights kept quantized (qweights.h).
 *
 * Design choices:
 * - The quantized bytes live in backend memory (be->alloc); a descriptor per
 *   (kind, layer) points at them, so the same descriptor is what a device
 *   kernel reads.
 * - The CPU backend has no dequantization op (its memory is host memory):
 *   rows are dequantized here with quant.c / quant_hf.c, split across OpenMP
 *   threads by blocks of rows, into the scratch in the layout its GEMM reads
 *   (with the own GEMM each block is packed into its column panels at once;
 *   row-major with OpenBLAS). A device backend dequantizes with its own op
 *   (be->dequant_rows, into its weight dtype); one without it cannot keep
 *   weights quantized and says so.
 * - A tensor of several parts (AWQ, GPTQ, FP8 block scales: quant_hf.h) is
 *   one allocation, each part at a 64-byte aligned offset, so part[0] is
 *   what is freed and checked for residency, as for a GGUF tensor.
 * - Every tensor is validated here, on the host, before its bytes are
 *   uploaded (quant.c / quant_hf.c's checks): a device kernel then reads
 *   parts whose sizes and indices are known good, so a damaged file is an
 *   error naming the tensor, never a device fault.
 */
#include "qweights.h"
#include "ops_cpu.h"
#include "quant_hf.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct rl_qweights {
    unsigned kinds;
    int64_t n_loaded;
    rl_qtensor *t;          /* [(1 + n_loaded) * RL_T_COUNT]; part[0] in backend memory */
    void *scratch;          /* the largest kept matrix, weight_dtype */
    size_t scratch_bytes;
    size_t stored_bytes;
    int team;               /* the largest OpenMP team a dequantization ran on */
};

static int keeps(unsigned kinds, rl_tensor_kind k) { return (kinds >> k) & 1u; }

rl_status rl_qw_check_kinds(unsigned kinds)
{
    if (kinds & ~RL_QW_KEEPABLE)
        return RL_FAIL(RL_ERR_INVALID, "only embed, q, k, v, o, gate, up and down can be kept "
                       "quantized (keep mask 0x%x)", kinds);
    unsigned qkv = kinds & ((1u << RL_T_Q) | (1u << RL_T_K) | (1u << RL_T_V));
    unsigned gu = kinds & ((1u << RL_T_GATE) | (1u << RL_T_UP));
    if (qkv && qkv != ((1u << RL_T_Q) | (1u << RL_T_K) | (1u << RL_T_V)))
        return RL_FAIL(RL_ERR_INVALID, "q, k and v are one fused matrix: keep all three "
                       "quantized or none");
    if (gu && gu != ((1u << RL_T_GATE) | (1u << RL_T_UP)))
        return RL_FAIL(RL_ERR_INVALID, "gate and up are one fused matrix: keep both quantized "
                       "or neither");
    return RL_OK;
}

static size_t elems(const rl_config *c, rl_tensor_kind k)
{
    int64_t s[2];
    int nd = rl_tensor_shape(c, k, s);
    return nd == 2 ? (size_t)s[0] * (size_t)s[1] : nd == 1 ? (size_t)s[0] : 0;
}

static const rl_tensor_kind MATRICES[] = {RL_T_Q, RL_T_O, RL_T_GATE, RL_T_DOWN};

size_t rl_qw_dense_bytes_kept(const rl_config *cfg, unsigned kinds, rl_dtype wd,
                              int64_t gemm_row_align)
{
    size_t per_layer = 0, es = rl_dtype_size(wd);
    for (int i = 0; i < 4; i++)   /* a matrix is kept whole (rl_qw_check_kinds) */
        if (keeps(kinds, MATRICES[i]))
            per_layer += rl_gemm_matrix_elems(cfg, MATRICES[i], gemm_row_align);
    size_t bytes = per_layer * es * (size_t)rl_config_loaded_layers(cfg);
    if (keeps(kinds, RL_T_EMBED)) bytes += elems(cfg, RL_T_EMBED) * es;
    return bytes;
}

size_t rl_qw_scratch_bytes(const rl_config *cfg, unsigned kinds, rl_dtype wd,
                           int64_t gemm_row_align)
{
    size_t most = 0;
    for (int i = 0; i < 4; i++) {
        size_t n = rl_gemm_matrix_elems(cfg, MATRICES[i], gemm_row_align);
        if (keeps(kinds, MATRICES[i]) && n > most) most = n;
    }
    if (keeps(kinds, RL_T_EMBED) && !most) most = 1;   /* the table exists; no matrix scratch */
    return most * rl_dtype_size(wd);
}

static rl_qtensor *slot(rl_qweights *qw, rl_tensor_kind kind, int64_t layer)
{
    int64_t s = rl_tensor_kind_is_global(kind) ? 0 : 1 + layer;
    return &qw->t[(size_t)s * RL_T_COUNT + kind];
}

rl_status rl_qw_create(rl_backend *be, const rl_config *cfg, int64_t n_loaded, unsigned kinds,
                       rl_qweights **out)
{
    *out = NULL;
    if (!kinds) return RL_OK;
    RL_TRY(rl_qw_check_kinds(kinds));
    if (!be->dequant_rows && strcmp(be->name, "cpu") != 0)
        return RL_FAIL(RL_ERR_INVALID, "device %s cannot keep weights quantized (no "
                       "dequantization kernels in this build); load with weights='dequantize'",
                       be->name);
    rl_qweights *qw = calloc(1, sizeof *qw);
    if (qw) qw->t = calloc((size_t)(1 + n_loaded) * RL_T_COUNT, sizeof *qw->t);
    if (!qw || !qw->t) {
        free(qw);
        return RL_FAIL(RL_ERR_NOMEM, "out of host memory");
    }
    qw->kinds = kinds;
    qw->n_loaded = n_loaded;
    size_t sb = rl_qw_scratch_bytes(cfg, kinds, be->weight_dtype, rl_backend_gemm_row_align(be));
    rl_status st = be->alloc(be, &qw->scratch, sb);
    if (st != RL_OK) {
        rl_qw_free(qw, be);
        return st;
    }
    qw->scratch_bytes = sb;
    *out = qw;
    return RL_OK;
}

void rl_qw_free(rl_qweights *qw, rl_backend *be)
{
    if (!qw) return;
    if (qw->t)
        for (size_t i = 0; i < (size_t)(1 + qw->n_loaded) * RL_T_COUNT; i++)
            if (qw->t[i].part[0]) be->free(be, (void *)qw->t[i].part[0]);
    if (qw->scratch) be->free(be, qw->scratch);
    free(qw->t);
    free(qw);
}

int rl_qw_keeps(const rl_qweights *qw, rl_tensor_kind kind) { return qw && keeps(qw->kinds, kind); }

rl_status rl_qw_verify_resident(const rl_qweights *qw, rl_backend *be)
{
    if (!qw) return RL_OK;
    if (qw->scratch && !be->is_resident(be, qw->scratch))
        return RL_FAIL(RL_ERR_DEVICE, "the dequantization scratch is not in %s memory", be->name);
    for (size_t i = 0; i < (size_t)(1 + qw->n_loaded) * RL_T_COUNT; i++)
        if (qw->t[i].part[0] && !be->is_resident(be, qw->t[i].part[0]))
            return RL_FAIL(RL_ERR_DEVICE, "quantized weight '%s' (slot %zu: 0 global, else layer "
                           "+ 1) is not in %s memory",
                           rl_tensor_kind_name((rl_tensor_kind)(i % RL_T_COUNT)), i / RL_T_COUNT,
                           be->name);
    return RL_OK;
}

size_t rl_qw_stored_bytes(const rl_qweights *qw) { return qw ? qw->stored_bytes : 0; }
size_t rl_qw_scratch_held(const rl_qweights *qw) { return qw ? qw->scratch_bytes : 0; }
int rl_qw_team(const rl_qweights *qw) { return qw ? qw->team : 0; }

static void saw_team(rl_qweights *qw, int team)
{
    if (team > qw->team) qw->team = team;
}

/* Raw bytes into backend memory through the i32 upload (the op that copies
 * without converting); a tail of 1-3 bytes goes as one padded word. */
static rl_status upload_bytes(rl_backend *be, void *dst, const void *src, size_t n)
{
    size_t words = n / 4;
    if (words) RL_TRY(be->upload_i32(be, dst, src, words));
    if (n % 4) {
        int32_t tail = 0;
        memcpy(&tail, (const char *)src + words * 4, n % 4);
        RL_TRY(be->upload_i32(be, (int32_t *)dst + words, &tail, 1));
    }
    return RL_OK;
}

#define PART_ALIGN 64

static int is_hf(const rl_qtensor *q)
{
    return q->family == RL_QF_AWQ || q->family == RL_QF_GPTQ || q->family == RL_QF_FP8_BLOCK;
}

/* quant.c decodes GGUF blocks, quant_hf.c the HF directory formats. */
static int validate_any(const rl_qtensor *q, char *err, size_t errlen)
{
    return is_hf(q) ? rl_qtensor_validate_hf(q, err, errlen) : rl_qtensor_validate(q, err, errlen);
}

static int dequant_rows_any(const rl_qtensor *q, int64_t r0, int64_t r1, float *out, char *err,
                            size_t errlen)
{
    return is_hf(q) ? rl_dequant_hf_rows_f32(q, r0, r1, out, 1, NULL, err, errlen)
                    : rl_dequant_rows_f32(q, r0, r1, out, err, errlen);
}

rl_status rl_qw_set(rl_qweights *qw, rl_backend *be, rl_tensor_kind kind, int64_t layer,
                    const rl_qtensor *host, const char *name, size_t *bytes_added)
{
    *bytes_added = 0;
    char err[256];
    if (validate_any(host, err, sizeof err))
        return RL_FAIL(RL_ERR_INVALID, "set_tensor_quantized: %s: %s", name, err);
    rl_qtensor *dst = slot(qw, kind, layer);
    if (dst->part[0]) {   /* set again: the new bytes replace the old */
        be->free(be, (void *)dst->part[0]);
        for (int i = 0; i < RL_QUANT_MAX_PARTS; i++) qw->stored_bytes -= dst->part_bytes[i];
        memset(dst, 0, sizeof *dst);
    }
    size_t off[RL_QUANT_MAX_PARTS], total = 0, stored = 0;
    for (int i = 0; i < RL_QUANT_MAX_PARTS; i++) {
        off[i] = total;
        if (!host->part[i]) continue;
        total += (host->part_bytes[i] + PART_ALIGN - 1) / PART_ALIGN * PART_ALIGN;
        stored += host->part_bytes[i];
    }
    void *mem = NULL;
    RL_TRY(be->alloc(be, &mem, total));
    rl_status st = RL_OK;
    for (int i = 0; i < RL_QUANT_MAX_PARTS && st == RL_OK; i++)
        if (host->part[i])
            st = upload_bytes(be, (char *)mem + off[i], host->part[i], host->part_bytes[i]);
    if (st != RL_OK) {
        be->free(be, mem);
        return st;
    }
    *dst = *host;
    for (int i = 0; i < RL_QUANT_MAX_PARTS; i++) {
        dst->part[i] = host->part[i] ? (char *)mem + off[i] : NULL;
        dst->part_bytes[i] = host->part[i] ? host->part_bytes[i] : 0;
    }
    qw->stored_bytes += stored;
    *bytes_added = stored;
    return RL_OK;
}

/* Rows [0, q->rows) of a host-resident descriptor into out (fp32), nt
 * threads (the model's) splitting the rows; *team: the team that ran. */
static rl_status dequant_host(const rl_qtensor *q, float *out, int nt, int *team)
{
    if (is_hf(q)) {   /* threaded inside, in blocks that share cache lines */
        char e[256] = "";
        if (rl_dequant_hf_rows_f32(q, 0, q->rows, out, nt, team, e, sizeof e))
            return RL_FAIL(RL_ERR_INVALID, "dequantize: %s", e);
        return RL_OK;
    }
    int64_t rows = q->rows, cols = q->cols;
    int64_t chunk = (rows + nt - 1) / nt;
    int failed = 0;
    char err[256] = "";
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|:failed) if (rows * cols > 65536)
    for (int i = 0; i < nt; i++) {
        if (i == 0) *team = omp_get_num_threads();
        int64_t r0 = (int64_t)i * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
        if (r0 >= r1) continue;
        char e[256];
        if (rl_dequant_rows_f32(q, r0, r1, out + r0 * cols, e, sizeof e)) {
            failed = 1;
#pragma omp critical
            snprintf(err, sizeof err, "%s", e);
        }
    }
    if (failed) return RL_FAIL(RL_ERR_INVALID, "dequantize: %s", err);
    return RL_OK;
}

/* Rows of q into rows [row0, row0 + q->rows) of the fused [N, cols] matrix
 * in the backend's GEMM layout (be->gemm_pack_rows): threads take blocks of
 * the layout's row alignment (a panel), each dequantized into a small buffer
 * and packed at once, so there is no per-GEMM packing and no second scratch. */
static rl_status dequant_packed(rl_qweights *qw, rl_backend *be, const rl_qtensor *q, int64_t row0,
                                int64_t N, void *out)
{
    const int64_t A = rl_backend_gemm_row_align(be), cols = q->cols;
    const int64_t r_end = row0 + q->rows, first = row0 / A, nb = (r_end - 1) / A - first + 1;
    int failed = 0, oom = 0, team = 1;
    char err[256] = "";
#pragma omp parallel num_threads(rl_backend_cpu_threads(be)) reduction(|:failed, oom) \
    if (q->rows * cols > 65536)
    {
#pragma omp single nowait
        team = omp_get_num_threads();
        float *rows = malloc((size_t)(A * cols) * sizeof *rows);
        if (!rows) oom = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            if (!rows) continue;
            const int64_t a = (first + b) * A > row0 ? (first + b) * A : row0;
            const int64_t e = (first + b + 1) * A < r_end ? (first + b + 1) * A : r_end;
            char e_msg[256];
            if (dequant_rows_any(q, a - row0, e - row0, rows, e_msg, sizeof e_msg)) {
                failed = 1;
#pragma omp critical
                snprintf(err, sizeof err, "%s", e_msg);
                continue;
            }
            if (be->gemm_pack_rows(be, out, N, cols, a, rows, RL_F32, e - a) != RL_OK) oom = 1;
        }
        free(rows);
    }
    saw_team(qw, team);
    if (oom) return RL_FAIL(RL_ERR_NOMEM, "out of host memory (dequantizing %lld rows at a time)",
                            (long long)A);
    if (failed) return RL_FAIL(RL_ERR_INVALID, "dequantize: %s", err);
    return RL_OK;
}

static rl_status dequant_into(rl_qweights *qw, rl_backend *be, const rl_qtensor *q, void *out)
{
    if (be->dequant_rows) return be->dequant_rows(be, q, 0, q->rows, out, be->weight_dtype);
    int team = 0;
    rl_status st = dequant_host(q, out, rl_backend_cpu_threads(be), &team);
    saw_team(qw, team);
    return st;
}

rl_status rl_qw_matrix(rl_qweights *qw, rl_backend *be, int64_t layer, rl_tensor_kind first,
                       const void *dense, const void **w)
{
    *w = dense;
    if (!rl_qw_keeps(qw, first)) return RL_OK;
    rl_tensor_kind parts[3] = {first, RL_T_COUNT, RL_T_COUNT};
    if (first == RL_T_Q) parts[1] = RL_T_K, parts[2] = RL_T_V;
    if (first == RL_T_GATE) parts[1] = RL_T_UP;
    size_t es = rl_dtype_size(be->weight_dtype);
    int64_t N = 0, row = 0;
    for (int i = 0; i < 3 && parts[i] != RL_T_COUNT; i++) {
        const rl_qtensor *q = slot(qw, parts[i], layer);
        if (!q->part[0])
            return RL_FAIL(RL_ERR_STATE, "quantized tensor '%s' of layer %lld was never set",
                           rl_tensor_kind_name(parts[i]), (long long)layer);
        N += q->rows;
    }
    for (int i = 0; i < 3 && parts[i] != RL_T_COUNT; i++) {
        const rl_qtensor *q = slot(qw, parts[i], layer);
        if (be->gemm_pack_rows) RL_TRY(dequant_packed(qw, be, q, row, N, qw->scratch));
        else RL_TRY(dequant_into(qw, be, q, (char *)qw->scratch + (size_t)row * (size_t)q->cols * es));
        row += q->rows;
    }
    *w = qw->scratch;
    return RL_OK;
}

rl_status rl_qw_embed(rl_qweights *qw, rl_backend *be, const int32_t *tokens_host,
                      const int32_t *tokens_dev, int64_t T, int64_t d, void *x, float scale)
{
    const rl_qtensor *q = slot(qw, RL_T_EMBED, 0);
    if (!q->part[0]) return RL_FAIL(RL_ERR_STATE, "quantized tensor 'embed' was never set");
    if (be->dequant_gather) return be->dequant_gather(be, q, tokens_dev, T, x, scale);
    float *out = x;
    int failed = 0, team = 1;
    char err[256] = "";
#pragma omp parallel for num_threads(rl_backend_cpu_threads(be)) schedule(static) \
    reduction(|:failed) if (T * d > 65536)
    for (int64_t t = 0; t < T; t++) {
        if (t == 0) team = omp_get_num_threads();
        float *o = out + t * d;
        char e[256];
        if (dequant_rows_any(q, tokens_host[t], tokens_host[t] + 1, o, e, sizeof e)) {
            failed = 1;
#pragma omp critical
            snprintf(err, sizeof err, "%s", e);
            continue;
        }
        /* as the embedding op: an fp32 multiply, none when the scale is 1 */
        if (scale != 1.0f)
            for (int64_t i = 0; i < d; i++) o[i] = o[i] * scale;
    }
    saw_team(qw, team);
    if (failed) return RL_FAIL(RL_ERR_INVALID, "embed: %s", err);
    return RL_OK;
}
