/* After the qkv projection: optional per-head q/k RMSNorm (Qwen3), rotary embedding in the
 * rotate-half form, and the keys and values written to their cache slots, in one pass.
 * Rotated queries go to q_out and rotated keys also to k_out (a prefill attends to them
 * directly); the values stay readable in qkv. A bfloat16 cache gets them rounded once. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "vec.h"

ALWAYS_INLINE void head(const float *x, const float *norm, float eps, const float *cos,
                        const float *sin, int64_t d, float *out) {
    float tmp[512]; /* head_dim <= 512, checked by the caller */
    if (norm) {
        float ss = 0.0f;
        for (int64_t c = 0; c < d; c++) ss += x[c] * x[c];
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t c = 0; c < d; c++) tmp[c] = x[c] * r * norm[c];
    } else {
        memcpy(tmp, x, sizeof(float) * (size_t)d);
    }
    int64_t half = d / 2;
    for (int64_t c = 0; c < half; c++) out[c] = tmp[c] * cos[c] - tmp[c + half] * sin[c];
    for (int64_t c = half; c < d; c++) out[c] = tmp[c] * cos[c] + tmp[c - half] * sin[c];
}

/* d floats to element `at` of a float32 or (bf16) bfloat16 cache. */
ALWAYS_INLINE void put(void *cache, int64_t bf16, int64_t at, const float *x, int64_t d) {
    if (bf16)
        for (int64_t c = 0; c < d; c++) ((uint16_t *)cache)[at + c] = float_bf16(x[c]);
    else
        memcpy((float *)cache + at, x, sizeof(float) * (size_t)d);
}

/* qkv: [t, (heads + 2 * kv_heads) * d]; positions, slot_mapping: [t]; cos, sin: [P, d];
 * q_norm, k_norm: [d] or NULL; q_out: [t, heads, d]; k_out: [t, kv_heads, d];
 * cache: [2, kv_heads, slots, d], float32 or (cache_bf16) bfloat16. */
void cpuk_qk_rope_store(const float *qkv, int64_t t, int64_t heads, int64_t kv_heads, int64_t d,
                       const int64_t *positions, const float *cos, const float *sin,
                       const float *q_norm, const float *k_norm, float eps, float *q_out,
                       float *k_out, void *cache, int64_t cache_bf16, int64_t slots,
                       const int64_t *slot_mapping) {
    const int64_t width = (heads + 2 * kv_heads) * d;
#pragma omp parallel for schedule(static) if (t > 16)
    for (int64_t i = 0; i < t; i++) {
        const float *row = qkv + i * width;
        const float *c = cos + positions[i] * d, *s = sin + positions[i] * d;
        const int64_t slot = slot_mapping[i];
        for (int64_t h = 0; h < heads; h++)
            head(row + h * d, q_norm, eps, c, s, d, q_out + (i * heads + h) * d);
        for (int64_t h = 0; h < kv_heads; h++) {
            float *k = k_out + (i * kv_heads + h) * d;
            head(row + (heads + h) * d, k_norm, eps, c, s, d, k);
            put(cache, cache_bf16, (h * slots + slot) * d, k, d);
            put(cache, cache_bf16, ((kv_heads + h) * slots + slot) * d,
                row + (heads + kv_heads + h) * d, d);
        }
    }
}
