/* A whole decode step of the decoder layers in one call: the same kernels, in the same order,
 * as the per-operator path (worker/model/transformer.py with KernelOps), without returning to
 * Python between them. At batch 1 the per-call overhead of some three hundred ctypes calls
 * was a tenth of the step. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* One projection: float32 weights, or int8 with per-(row, group) scales. */
typedef struct {
    const void *weight;
    const float *scale; /* NULL for float32 weights */
    const float *bias;  /* or NULL */
    int64_t out, in, group;
} npu_proj;

typedef struct {
    const float *input_norm, *post_norm;
    const float *next_norm; /* the next layer's input norm; the final norm after the last */
    const float *q_norm, *k_norm; /* or NULL */
    npu_proj qkv, o, gate_up, down;
    float *cache; /* this layer's [2, kv_heads, slots, head_dim] */
} npu_layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter, slots, block_size;
    float eps;
    const float *cos, *sin; /* [positions, head_dim] */
    /* per step */
    int64_t n, max_blocks;
    const int64_t *positions, *slot_mapping;
    const int32_t *block_tables, *context_lens;
    float *residual; /* [n, hidden]: the embeddings in, the residual stream after the last layer out */
    float *out;      /* [n, hidden]: the final norm's output */
    float *work;     /* scratch, npu_decode_workspace floats */
} npu_decode_step;

int64_t npu_decode_workspace(const npu_decode_step *s, int64_t n) {
    const int64_t q = s->heads * s->head_dim, kv = s->kv_heads * s->head_dim;
    return n * ((q + 2 * kv) + q + kv + q + s->hidden + 2 * s->inter + s->inter + s->hidden);
}

static int project(const npu_proj *p, const float *x, int64_t n, float *y) {
    if (p->scale == NULL) {
        npu_linear_f32(x, n, p->in, (const float *)p->weight, p->out, p->bias, y);
        return 0;
    }
    return npu_linear_i8(x, n, p->in, (const int8_t *)p->weight, p->scale, p->group, p->out,
                         p->bias, y);
}

/* Returns 0, or -1 when a kernel could not allocate its scratch memory. */
int npu_decode_forward(const npu_decode_step *s, const npu_layer *layers) {
    const int64_t n = s->n, d = s->head_dim, q_size = s->heads * d, kv_size = s->kv_heads * d;
    float *qkv = s->work, *q = qkv + n * (q_size + 2 * kv_size), *k = q + n * q_size;
    float *attn = k + n * kv_size, *delta = attn + n * q_size, *gate_up = delta + n * s->hidden;
    float *act = gate_up + n * 2 * s->inter, *x = act + n * s->inter;
    const float scale = 1.0f / sqrtf((float)d);
    int status = 0;
    npu_rms_norm(s->residual, layers[0].input_norm, s->eps, n, s->hidden, x);
    for (int64_t i = 0; i < s->layers && status == 0; i++) {
        const npu_layer *l = &layers[i];
        status |= project(&l->qkv, x, n, qkv);
        npu_qk_rope_store(qkv, n, s->heads, s->kv_heads, d, s->positions, s->cos, s->sin,
                          l->q_norm, l->k_norm, s->eps, q, k, l->cache, s->slots,
                          s->slot_mapping);
        status |= npu_decode_attention(q, n, s->heads, s->kv_heads, d, l->cache, s->slots,
                                       s->block_tables, s->max_blocks, s->context_lens,
                                       s->block_size, scale, attn);
        status |= project(&l->o, attn, n, delta);
        npu_add_rms_norm(s->residual, delta, l->post_norm, s->eps, n, s->hidden, x);
        status |= project(&l->gate_up, x, n, gate_up);
        npu_silu_mul(gate_up, n, s->inter, act);
        status |= project(&l->down, act, n, delta);
        npu_add_rms_norm(s->residual, delta, l->next_norm, s->eps, n, s->hidden,
                         i + 1 < s->layers ? x : s->out);
    }
    return status ? -1 : 0;
}
