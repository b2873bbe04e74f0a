/* The kernels' entry points, for the whole-step decoder (decoder.c) and the ctypes bindings
 * (worker/kernels/cpu.py), which must agree with these signatures. */
#ifndef NPUSERVE_KERNELS_H
#define NPUSERVE_KERNELS_H

#include <stdint.h>

void npu_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n,
                    const float *bias, float *y);
int npu_linear_i8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                  int64_t group, int64_t n, const float *bias, float *y);
void npu_rms_norm(const float *x, const float *w, float eps, int64_t t, int64_t h, float *out);
void npu_add_rms_norm(float *residual, const float *delta, const float *w, float eps, int64_t t,
                      int64_t h, float *out);
void npu_silu_mul(const float *gate_up, int64_t t, int64_t inter, float *out);
void npu_qk_rope_store(const float *qkv, int64_t t, int64_t heads, int64_t kv_heads, int64_t d,
                       const int64_t *positions, const float *cos, const float *sin,
                       const float *q_norm, const float *k_norm, float eps, float *q_out,
                       float *k_out, float *cache, int64_t slots, const int64_t *slot_mapping);
int npu_decode_attention(const float *q, int64_t n, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, const float *cache, int64_t slots,
                         const int32_t *block_tables, int64_t max_blocks,
                         const int32_t *context_lens, int64_t block_size, float scale,
                         float *out);

#endif
