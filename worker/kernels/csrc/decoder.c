/* A whole decode step of the decoder layers in one call: the same kernels, in the same order,
 * as the per-operator path (worker/model/transformer.py with KernelOps), without returning to
 * Python between them. At batch 1 the per-call overhead of some three hundred ctypes calls
 * was a tenth of the step.
 *
 * The scratch (s->work) holds the step's activations, then the one kernel scratch that the
 * int8 and bfloat16 projections and attention take in turn.
 *
 * A bfloat16 model runs here with its weights and KV cache in bfloat16, widened to float32 as
 * they are read, and its activations in float32 (as llama.cpp's CPU backend does): the bytes a
 * step reads are bfloat16's, and of PyTorch's per-operator rounding to bfloat16 only the
 * projections' inputs remain, where AMX tiles or, for several rows, AVX512-BF16 take them
 * (cpuk_linear_f32_wbf16). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* Floats of the activations for n rows: qkv, q, k, attention out, delta, gate_up, act, x. */
static int64_t activations(const cpuk_decode_step *s, int64_t n) {
    const int64_t q = s->heads * s->head_dim, kv = s->kv_heads * s->head_dim;
    return n * ((q + 2 * kv) + q + kv + q + s->hidden + 2 * s->inter + s->inter + s->hidden);
}

/* Bytes for n rows attending to at most max_context tokens. */
static int64_t workspace(const cpuk_decode_step *s, const cpuk_layer *layers, int64_t n,
                         int64_t max_context) {
    int64_t kernel = cpuk_decode_attention_workspace(n, s->heads, s->kv_heads, s->head_dim,
                                                     max_context);
    for (int64_t i = 0; i < s->layers; i++) {
        const cpuk_proj *projs[] = {&layers[i].qkv, &layers[i].o, &layers[i].gate_up,
                                    &layers[i].down};
        for (int p = 0; p < 4; p++) {
            int64_t b = projs[p]->bf16 ? cpuk_linear_wbf16_workspace(n, projs[p]->in)
                        : projs[p]->scale != NULL
                            ? cpuk_linear_i8_workspace(n, projs[p]->in, projs[p]->group)
                            : 0;
            kernel = b > kernel ? b : kernel;
        }
    }
    return activations(s, n) * (int64_t)sizeof(float) + kernel;
}

/* Scratch bytes for a step of n rows whose contexts are at most s->max_context tokens. */
int64_t cpuk_decode_workspace(const cpuk_decode_step *s, const cpuk_layer *layers, int64_t n) {
    return workspace(s, layers, n, s->max_context);
}

static void project(const cpuk_proj *p, const float *x, int64_t n, float *y, void *work,
                    int64_t work_bytes) {
    if (p->bf16)
        cpuk_linear_f32_wbf16(x, n, p->in, (const uint16_t *)p->weight, p->out, p->bias, y,
                              work, work_bytes);
    else if (p->scale == NULL)
        cpuk_linear_f32(x, n, p->in, (const float *)p->weight, p->out, p->bias, y);
    else
        cpuk_linear_i8(x, n, p->in, (const int8_t *)p->weight, p->scale, p->group, p->out,
                       p->bias, y, work, work_bytes);
}

/* Returns 0, or (computing nothing) the bytes of scratch the step needs when s->work_bytes
 * is short. */
int64_t cpuk_decode_forward(const cpuk_decode_step *s, const cpuk_layer *layers) {
    const int64_t n = s->n, d = s->head_dim, q_size = s->heads * d, kv_size = s->kv_heads * d;
    int64_t max_ctx = 0;
    for (int64_t i = 0; i < n; i++) max_ctx = s->context_lens[i] > max_ctx ? s->context_lens[i] : max_ctx;
    const int64_t need = workspace(s, layers, n, max_ctx);
    if (need > s->work_bytes) return need;
    float *qkv = s->work, *q = qkv + n * (q_size + 2 * kv_size), *k = q + n * q_size;
    float *attn = k + n * kv_size, *delta = attn + n * q_size, *gate_up = delta + n * s->hidden;
    float *act = gate_up + n * 2 * s->inter, *x = act + n * s->inter;
    void *work = x + n * s->hidden;
    const int64_t work_bytes = s->work_bytes - activations(s, n) * (int64_t)sizeof(float);
    const float scale = 1.0f / sqrtf((float)d);
    cpuk_rms_norm(s->residual, layers[0].input_norm, s->eps, n, s->hidden, x);
    for (int64_t i = 0; i < s->layers; i++) {
        const cpuk_layer *l = &layers[i];
        project(&l->qkv, x, n, qkv, work, work_bytes);
        cpuk_qk_rope_store(qkv, n, s->heads, s->kv_heads, d, s->positions, s->cos, s->sin,
                           l->q_norm, l->k_norm, s->eps, q, k, l->cache, s->cache_bf16,
                           s->slots, s->slot_mapping);
        cpuk_decode_attention(q, n, s->heads, s->kv_heads, d, l->cache, s->cache_bf16, s->slots,
                              s->block_tables, s->max_blocks, s->context_lens, s->block_size,
                              scale, attn, work, work_bytes);
        project(&l->o, attn, n, delta, work, work_bytes);
        cpuk_add_rms_norm(s->residual, delta, l->post_norm, s->eps, n, s->hidden, x);
        project(&l->gate_up, x, n, gate_up, work, work_bytes);
        cpuk_silu_mul(gate_up, n, s->inter, act);
        project(&l->down, act, n, delta, work, work_bytes);
        cpuk_add_rms_norm(s->residual, delta, l->next_norm, s->eps, n, s->hidden,
                          i + 1 < s->layers ? x : s->out);
    }
    return 0;
}
