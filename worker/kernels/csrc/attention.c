/* Decode attention straight from the paged KV cache: one query token per sequence.
 *
 * The cache of a layer is [2, kv_heads, slots, head_dim] (keys, then values), token t of a
 * sequence in slot block_table[t / block_size] * block_size + t % block_size. Each task is
 * one (sequence, kv head), reading its keys and values in place, block by block, so no
 * gathered copy of the context is made. Scores are exact (softmax over the whole context, no
 * online rescaling). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec.h"

#define MAX_DV 32 /* head_dim / 8 vectors kept in registers: head_dim <= 256 */

/* scores[t] = scale * q . k_t for the block's `count` tokens. */
ALWAYS_INLINE void block_scores(const v8f *qv, int64_t dv, const float *keys, int64_t count,
                                float scale, float *scores) {
    for (int64_t t = 0; t < count; t++) {
        const float *k = keys + t * dv * 8;
        v8f a = vsplat(0.0f), b = vsplat(0.0f);
        int64_t c = 0;
        for (; c + 1 < dv; c += 2) {
            a += qv[c] * vload(k + 8 * c);
            b += qv[c + 1] * vload(k + 8 * c + 8);
        }
        if (c < dv) a += qv[c] * vload(k + 8 * c);
        scores[t] = hsum(a + b) * scale;
    }
}

/* One (sequence, kv head): the query heads of the group one after another, each streaming
 * the context block by block (a 16-token block of one head is 4 KiB for head_dim 64, so the
 * group's later heads read it from L1/L2, not memory). Returns 0, or -1 out of memory. */
static int attend(const float *qs, int64_t group, int64_t dv, const float *keys,
                  const float *values, const int32_t *table, int64_t ctx, int64_t block_size,
                  float scale, float *out) {
    const int64_t d = dv * 8;
    float *scores = malloc(sizeof(float) * (size_t)ctx);
    if (!scores) return -1;
    for (int64_t g = 0; g < group; g++) {
        v8f qv[MAX_DV];
        for (int64_t c = 0; c < dv; c++) qv[c] = vload(qs + g * d + 8 * c);
        float max = -INFINITY;
        for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
            int64_t count = ctx - t0 < block_size ? ctx - t0 : block_size;
            const float *k = keys + (int64_t)table[t0 / block_size] * block_size * d;
            block_scores(qv, dv, k, count, scale, scores + t0);
        }
        for (int64_t t = 0; t < ctx; t++) max = scores[t] > max ? scores[t] : max;
        v8f vsum = vsplat(0.0f);
        int64_t t = 0;
        for (; t + 8 <= ctx; t += 8) {
            v8f e = vexp(vload(scores + t) - vsplat(max));
            vstore(scores + t, e);
            vsum += e;
        }
        float sum = hsum(vsum);
        for (; t < ctx; t++) {
            scores[t] = expf(scores[t] - max);
            sum += scores[t];
        }
        v8f acc[MAX_DV];
        for (int64_t c = 0; c < dv; c++) acc[c] = vsplat(0.0f);
        for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
            int64_t count = ctx - t0 < block_size ? ctx - t0 : block_size;
            const float *v = values + (int64_t)table[t0 / block_size] * block_size * d;
            for (int64_t i = 0; i < count; i++) {
                v8f p = vsplat(scores[t0 + i]);
                for (int64_t c = 0; c < dv; c++) acc[c] += p * vload(v + i * d + 8 * c);
            }
        }
        v8f inv = vsplat(1.0f / sum);
        for (int64_t c = 0; c < dv; c++) vstore(out + g * d + 8 * c, acc[c] * inv);
    }
    free(scores);
    return 0;
}

/* q: [n, heads, d]; cache: this layer's [2, kv_heads, slots, d]; block_tables: [n,
 * max_blocks]; context_lens: [n]; out: [n, heads, d]. head_dim is a multiple of 8 up to 256
 * (checked by the caller). Returns 0, or -1 when a score buffer could not be allocated. */
int npu_decode_attention(const float *q, int64_t n, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, const float *cache, int64_t slots,
                         const int32_t *block_tables, int64_t max_blocks,
                         const int32_t *context_lens, int64_t block_size, float scale,
                         float *out) {
    const int64_t group = heads / kv_heads, d = head_dim;
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) reduction(| : failed)
    for (int64_t s = 0; s < n; s++) {
        for (int64_t kh = 0; kh < kv_heads; kh++) {
            const int64_t first = s * heads + kh * group;
            failed |= attend(q + first * d, group, d / 8, cache + kh * slots * d,
                             cache + (kv_heads + kh) * slots * d, block_tables + s * max_blocks,
                             context_lens[s], block_size, scale, out + first * d) != 0;
        }
    }
    return failed ? -1 : 0;
}
