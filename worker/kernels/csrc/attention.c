/* Decode attention straight from the paged KV cache: one query token per sequence.
 *
 * The cache of a layer is [2, kv_heads, slots, head_dim] (keys, then values), token t of a
 * sequence in slot block_table[t / block_size] * block_size + t % block_size. Each task is
 * one (sequence, kv head): every key and value row is read once, in place, for all the query
 * heads of its GQA group, so no gathered copy of the context is made. Scores are exact
 * (softmax over the whole context, no online rescaling). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec.h"

/* head_dim is a multiple of 8 (checked by the caller). Returns 0, or -1 when out of memory. */
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
            const int64_t ctx = context_lens[s];
            const int32_t *table = block_tables + s * max_blocks;
            const float *keys = cache + kh * slots * d;
            const float *values = cache + (kv_heads + kh) * slots * d;
            const float *qs = q + (s * heads + kh * group) * d;
            float *scores = malloc(sizeof(float) * (size_t)(group * ctx + group * d));
            if (!scores) {
                failed = 1;
                continue;
            }
            float *acc = scores + group * ctx;
            for (int64_t t = 0; t < ctx; t++) {
                const float *k = keys + ((int64_t)table[t / block_size] * block_size
                                         + t % block_size) * d;
                for (int64_t g = 0; g < group; g++) {
                    v8f dot = vsplat(0.0f);
                    for (int64_t c = 0; c < d; c += 8) dot += vload(qs + g * d + c) * vload(k + c);
                    scores[g * ctx + t] = hsum(dot) * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *row = scores + g * ctx;
                float max = -INFINITY, sum = 0.0f;
                for (int64_t t = 0; t < ctx; t++) max = row[t] > max ? row[t] : max;
                int64_t t = 0;
                v8f vsum = vsplat(0.0f);
                for (; t + 8 <= ctx; t += 8) {
                    v8f e = vexp(vload(row + t) - vsplat(max));
                    vstore(row + t, e);
                    vsum += e;
                }
                sum = hsum(vsum);
                for (; t < ctx; t++) {
                    row[t] = expf(row[t] - max);
                    sum += row[t];
                }
                float inv = 1.0f / sum;
                for (t = 0; t < ctx; t++) row[t] *= inv;
                for (int64_t c = 0; c < d; c++) acc[g * d + c] = 0.0f;
            }
            for (int64_t t = 0; t < ctx; t++) {
                const float *v = values + ((int64_t)table[t / block_size] * block_size
                                           + t % block_size) * d;
                for (int64_t g = 0; g < group; g++) {
                    v8f p = vsplat(scores[g * ctx + t]);
                    for (int64_t c = 0; c < d; c += 8)
                        vstore(acc + g * d + c, vload(acc + g * d + c) + p * vload(v + c));
                }
            }
            for (int64_t g = 0; g < group; g++)
                for (int64_t c = 0; c < d; c++) out[(s * heads + kh * group + g) * d + c] = acc[g * d + c];
            free(scores);
        }
    }
    return failed ? -1 : 0;
}
